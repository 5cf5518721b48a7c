"""The driver's faults before any actor starts, caused for real through `tokenforge train`: a Ray address
nothing answers at (one line in seconds, not a hang), Ctrl-C while the prompts load or while Ray is being
joined (one line, never a traceback), and storage errors that may pass (classified on errors a real server
and a real closed port give)."""

import errno
import http.server
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pyarrow.fs as pafs
import pytest

from pipeline.errors import TransientStorageError
from pipeline.storage import Storage, is_transient

REPO = Path(__file__).parent.parent


def start_train(*overrides: str, env: dict | None = None) -> subprocess.Popen:
    environment = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
    environment.pop("RAY_ADDRESS", None)
    return subprocess.Popen(
        [sys.executable, "-m", "pipeline.cli", "train", *overrides],
        cwd=REPO,
        env=environment,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def one_line_error(process: subprocess.Popen, timeout: float) -> str:
    """The single stderr line of a train that exited 2 (no traceback)."""
    out, err = process.communicate(timeout=timeout)
    assert process.returncode == 2, out[-2000:] + err[-3000:]
    assert "Traceback" not in err and err.strip().count("\n") == 0, err[-3000:]
    assert err.startswith("tokenforge: error: "), err
    return err.strip()


@pytest.fixture
def silent_port():
    """A port on 127.0.0.1 that accepts connections and never answers; yields (port, the connections accepted)."""
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(16)
    accepted = []
    threading.Thread(target=lambda: [accepted.append(server.accept()) for _ in range(16)], daemon=True).start()
    yield server.getsockname()[1], accepted
    server.close()


@pytest.mark.parametrize("address", ["127.0.0.1:1", "nosuchhost.invalid:6379", "silent"])
def test_an_unreachable_ray_address_is_one_line_in_seconds(tmp_path, silent_port, address):
    """A closed port, a name that does not resolve, a server that never answers: Ray itself would retry the GCS
    for minutes or for ever, printing its reconnect lines."""
    address = f"127.0.0.1:{silent_port[0]}" if address == "silent" else address
    start = time.monotonic()
    line = one_line_error(start_train(f"output_dir={tmp_path / 'run'}", f"ray.address={address}"), timeout=90)
    assert f"ray.address='{address}': no Ray cluster answers there" in line and "ray start --head" in line
    assert time.monotonic() - start < 90


def test_ctrl_c_while_the_prompts_load_is_one_line(tmp_path):
    """data.train_file is large enough that reading it takes a while: SIGINT once the driver has it open."""
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text('{"prompt": "12+34=", "answer": "46"}\n' * 400_000)
    process = start_train(f"output_dir={tmp_path / 'run'}", f"data.train_file={prompts}")
    deadline = time.monotonic() + 120
    while str(prompts) not in open_files(process.pid):
        assert process.poll() is None and time.monotonic() < deadline, process.communicate()
        time.sleep(0.01)
    process.send_signal(signal.SIGINT)
    line = one_line_error(process, timeout=60)
    assert line == "tokenforge: error: interrupted before the run started (nothing written); run the same command again"


def open_files(pid: int) -> set[str]:
    """The paths a process has open (those that close while we look are skipped)."""
    paths = set()
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        try:
            paths.add(os.readlink(fd))
        except OSError:
            continue
    return paths


def test_ctrl_c_while_joining_ray_is_one_line_with_the_resume_command(tmp_path, silent_port):
    """ray.address is a port that accepts connections and never answers: SIGINT while the driver waits on it."""
    port, accepted = silent_port
    out = tmp_path / "run"
    process = start_train(f"output_dir={out}", f"ray.address=127.0.0.1:{port}")
    deadline = time.monotonic() + 120
    while len(accepted) < 2:  # the TCP probe, then the wait for the GCS to answer
        assert process.poll() is None and time.monotonic() < deadline, process.communicate()
        time.sleep(0.05)
    process.send_signal(signal.SIGINT)
    line = one_line_error(process, timeout=60)
    assert (
        line
        == f"tokenforge: error: interrupted; continue from the last checkpoint with: tokenforge train --resume {out}"
    )


class Answers503(http.server.BaseHTTPRequestHandler):
    """An S3 endpoint that is overloaded: every request gets 503 SlowDown."""

    def reply(self):
        body = b"<Error><Code>SlowDown</Code><Message>Please reduce your request rate.</Message></Error>"
        self.send_response(503)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    do_GET = do_PUT = do_HEAD = do_POST = do_DELETE = reply

    def log_message(self, *args):
        pass


def s3_error(port: int) -> OSError:
    """The error pyarrow raises writing to an S3 endpoint on 127.0.0.1:port (few retries, short timeouts)."""
    fs = pafs.S3FileSystem(
        endpoint_override=f"127.0.0.1:{port}",
        scheme="http",
        region="us-east-1",
        retry_strategy=pafs.AwsStandardS3RetryStrategy(max_attempts=1),
        connect_timeout=2,
        request_timeout=2,
    )
    with pytest.raises(OSError) as raised:
        fs.get_file_info("bucket/run/metrics.jsonl")
    return raised.value


def test_transient_storage_errors_are_told_from_lasting_ones():
    """Retried (within trainer.max_failures): S3 throttling/5xx, a refused connection. Not retried: a full disk,
    a missing permission (tests/test_faults.py runs those for real)."""
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Answers503)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        assert is_transient(s3_error(server.server_address[1]))
    finally:
        server.shutdown()
    closed = socket.socket()
    closed.bind(("127.0.0.1", 0))
    port = closed.getsockname()[1]
    closed.close()
    assert is_transient(s3_error(port))
    with pytest.raises(TransientStorageError):
        Storage(f"s3://bucket/run?endpoint_override=127.0.0.1:{port}&scheme=http&region=us-east-1").exists(
            "metrics.jsonl"
        )
    for errno_, text in (
        (errno.ENOSPC, "No space left on device"),
        (errno.EACCES, "Permission denied"),
        (errno.EROFS, "Read-only file system"),
    ):
        assert not is_transient(OSError(errno_, text))
    assert not is_transient(OSError("AWS Error ACCESS_DENIED during PutObject operation: HTTP status 403"))


def test_a_failure_is_named_in_one_line_without_rays_colour_codes():
    """The first line of a learner call that failed on its dead critic, as Ray formats it (seen in a real run)."""
    from ray.exceptions import ActorDiedError, RayTaskError

    from pipeline.driver.actor_group import failure_cause

    line = "\x1b[36mray::Learner.save()\x1b[39m (pid=18416, ip=192.0.2.2, actor_id=45977df6)"
    error = RayTaskError("Learner.save", line + "\n  File ...", ActorDiedError()).as_instanceof_cause()
    assert failure_cause(error) == (
        "RayTaskError(ActorDiedError): ray::Learner.save() (pid=18416, ip=192.0.2.2, actor_id=45977df6)"
    )
