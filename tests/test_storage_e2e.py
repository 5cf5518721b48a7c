"""A run's artifacts in one storage URI, on a real S3-compatible server (moto's server mode on 127.0.0.1,
as Ray's own storage tests use) and across nodes that do not share a disk: a two-node local cluster
whose worker node sees the driver's run directory as an empty tmpfs of its own (a private mount
namespace), so any process reading another node's local files fails the test, as across machines.
Also node loss and placement on an advertised (fake) GPU."""

import http.client
import http.server
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pyarrow.fs as pafs
import pytest
from local_cluster import LocalCluster, can_mask, free_ports, kill
from test_tune import marked_reward, write_spec

from pipeline.cli import main
from pipeline.config import load_config
from pipeline.driver.trainer import train
from pipeline.storage import Storage, latest_checkpoint
from pipeline.tune.experiment import resume as resume_experiment

pytestmark = pytest.mark.slow  # minutes of S3 and multi-node clusters: CI runs them as their own step (pytest -m slow)

REPO = Path(__file__).parent.parent
TINY = [
    "trainer.total_steps=6",
    "trainer.eval_every=3",
    "trainer.save_every=3",
    "trainer.prompts_per_step=8",
    "rollout.group_size=4",
    "data.max_eval_samples=20",
]
SMALL_ACTORS = ["learner.num_cpus=0.25", "rollout.num_cpus_per_worker=0.25", "reward.num_cpus_per_worker=0.25"]


@pytest.fixture(scope="module")
def s3():
    """A moto S3 server on 127.0.0.1 with one bucket; yields a function naming a fresh prefix's URI."""
    from moto.server import ThreadedMotoServer

    (port,) = free_ports(1)
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    options = f"endpoint_override=127.0.0.1:{port}&scheme=http&region=us-east-1"
    pafs.S3FileSystem(
        endpoint_override=f"127.0.0.1:{port}", scheme="http", region="us-east-1", allow_bucket_creation=True
    ).create_dir("runs")
    names = iter(range(1000))
    yield lambda: f"s3://runs/test-{next(names)}?{options}"
    server.stop()


def steps_of(storage: Storage) -> list[int]:
    return [json.loads(line)["step"] for line in storage.read_text("metrics.jsonl").splitlines()]


def test_train_resume_and_eval_with_every_artifact_on_s3(ray_cluster, s3, tmp_path, capsys):
    uri = s3()
    train(load_config(overrides=[*TINY, f"storage.uri={uri}", f"output_dir={tmp_path / 'unused'}"]))
    run = Storage(uri)
    assert steps_of(run) == list(range(7)) and run.exists("config.yaml") and run.exists("placement.json")
    assert run.list_dir("checkpoints") == ["step_3", "step_6"] and run.list_dir("tensorboard")
    directory, manifest = latest_checkpoint(run)
    assert directory == "checkpoints/step_6" and {"model.safetensors", "learner_state.pt", "trainer_state.json"} <= set(
        manifest["files"]
    )
    assert run.list_dir("rollouts") == ["step_3.parquet", "step_6.parquet"] and run.list_dir("eval") == [
        "step_0.parquet",
        "step_3.parquet",
        "step_6.parquet",
    ]
    capsys.readouterr()
    main(["samples", uri, "--worst", "1"])  # read back from the URI
    assert capsys.readouterr().out.startswith(f"{uri.split('?')[0]}/rollouts/step_6.parquet: worst 1 groups")
    main(["report", uri])
    assert run.exists("report.png") and run.exists("report.md")
    assert not (tmp_path / "unused").exists()  # nothing on the local disk
    main(["train", "--resume", uri, "trainer.total_steps=9"])
    assert steps_of(run) == list(range(10))
    capsys.readouterr()
    main(["eval", uri, "data.max_eval_samples=20", "--json"])  # a run at a URI: its newest checkpoint
    result = json.loads(capsys.readouterr().out)
    assert result["checkpoint"].endswith("checkpoints/step_9") and result["eval_samples"] == 20


def trials_held_with_a_tune_checkpoint(experiment: Storage) -> bool:
    """Both trials hold in step 11 and each has a checkpoint Tune registered (not only the run's own). Seeing a
    Tune checkpoint's directory alone was not enough: the driver may not have processed the report that made it
    yet, and a Ctrl-C then leaves the trial without one to restore (a CI run on a busy machine did)."""
    trials = [t for t in experiment.list_dir("") if t.startswith("run_trial")]
    return len(trials) == 2 and all(
        experiment.exists(f"{t}/run/metrics.jsonl")
        and 10 in steps_of(experiment.child(f"{t}/run"))
        and any(c.startswith("checkpoint_") for c in experiment.list_dir(t))
        for t in trials
    )


def test_tune_on_s3_with_a_retried_trial_and_a_resume_from_the_uri(ray_cluster, s3, tmp_path, builtin_model_path):
    """Two trials write everything to S3; one trial's reward fails once (its trial restarts from its
    checkpoint); the experiment is interrupted (SIGINT) and resumed with `tune --resume s3://...`. Each trial's
    reward process holds after its tenth step until `hold` goes, so the interrupt lands mid-run on a machine of any
    speed (on a quiet machine both trials once finished before it, and nothing was left to restore)."""
    uri = s3()
    root, _, options = uri.partition("?")
    rewards = {
        **marked_reward(tmp_path, builtin_model_path, "flaky", "fail_on_sixth_call"),
        **marked_reward(tmp_path, builtin_model_path, "held", "hold_after_ten_calls"),
    }
    spec = write_spec(
        tmp_path,
        {"reward.weights.digit_match": {"strategy": "grid", "values": [0.0, 0.5]}},
        {"name": "s3tune", "max_failures": 1, "max_concurrent_trials": 2},
        base={"trainer.total_steps": 24, **rewards},
    )
    (tmp_path / "hold").touch()
    spec.write_text(spec.read_text().replace(str(tmp_path / "results"), f"{root}?{options}"))
    env = {**os.environ, "RAY_ADDRESS": ray_cluster.get_runtime_context().gcs_address, "PYTHONUNBUFFERED": "1"}
    process = subprocess.Popen([sys.executable, "-m", "pipeline.cli", "tune", str(spec)], env=env, cwd=REPO)
    experiment = Storage(f"{root}/s3tune?{options}")
    try:
        deadline = time.time() + 300
        while time.time() < deadline and not trials_held_with_a_tune_checkpoint(experiment):
            time.sleep(1)
        process.send_signal(signal.SIGINT)
        assert process.wait(timeout=120) == 0
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    (tmp_path / "hold").unlink()
    resume_experiment(experiment.uri, trust_run_config=True)
    trials = [t for t in experiment.list_dir("") if t.startswith("run_trial")]
    assert len(trials) == 2
    for trial in trials:
        assert steps_of(experiment.child(f"{trial}/run")) == list(range(25))
    rows = experiment.read_text("trials.csv").splitlines()[1:]
    assert len(rows) == 2 and all(r.endswith(",24,TERMINATED") for r in rows)
    restores = [
        json.loads(line)
        for t in trials
        if experiment.exists(f"{t}/restores.jsonl")
        for line in experiment.read_text(f"{t}/restores.jsonl").splitlines()
    ]
    assert all(experiment.exists(f"{t}/restores.jsonl") for t in trials)  # each trial resumed from its checkpoint
    assert all(r["source"].startswith(root) for r in restores)  # restored from S3
    assert int((tmp_path / "calls").read_text()) > 6  # the flaky reward did fail once


@pytest.mark.parametrize("target", ["new object", "existing object", "checkpoint file"])
def test_ctrl_c_during_an_s3_write_leaves_the_object_as_it_was(s3, tmp_path, target):
    """pyarrow's output stream has no abort: a `with` block interrupted by Ctrl-C closes the stream, which completes
    the upload with what it holds (nothing, between open and write: an empty object; an existing metrics.jsonl
    replaced by it). A real SIGINT lands while a 64 MiB write is under way: a proxy in front of moto sends it when
    the upload's first request arrives and answers that request a moment later (a timer could fire before or after
    the write on a busy machine). Afterwards the key holds what it held before (nothing, or the old content) and no
    temporary key is left."""
    uri = s3()
    run = Storage(uri)
    data = b"x" * (64 << 20)
    if target == "existing object":
        run.write_text("metrics.jsonl", "old\n")
    if target == "checkpoint file":
        (tmp_path / "local").mkdir()
        (tmp_path / "local" / "model.safetensors").write_bytes(data)
    name = "model.safetensors" if target == "checkpoint file" else "metrics.jsonl"
    proxy = InterruptingS3(moto_endpoint(uri), name)
    interrupted = Storage(through(proxy, uri))
    write = {
        "checkpoint file": lambda: interrupted.upload_dir(tmp_path / "local", "checkpoints/step_3"),
    }.get(target, lambda: interrupted.write_bytes("metrics.jsonl", data))
    try:
        with pytest.raises(KeyboardInterrupt):
            write()
    finally:
        proxy.shutdown()
    assert proxy.sent
    if target == "checkpoint file":
        assert not run.exists("checkpoints/step_3/model.safetensors")
    elif target == "existing object":
        assert run.read_text("metrics.jsonl") == "old\n" and run.list_dir("") == ["metrics.jsonl"]
    else:
        assert not run.exists("metrics.jsonl") and run.list_dir("") == []
    run.write_bytes("metrics.jsonl", b"new\n")  # and the next write goes through
    assert run.read_text("metrics.jsonl") == "new\n" and "metrics.jsonl" in run.list_dir("")


def test_resume_on_s3_falls_back_past_a_corrupt_checkpoint(s3):
    from pipeline import storage as store

    run = Storage(s3())
    for step, weights in ((2, b"good weights"), (4, b"good weights")):
        run.write_bytes(f"{store.checkpoint_dir(step)}/model.safetensors", weights)
        store.publish_checkpoint(
            run, step, {"model.safetensors": {"size": len(weights), "sha256": store.sha256_bytes(weights)}}
        )
    run.write_bytes(f"{store.checkpoint_dir(4)}/model.safetensors", b"rotten bytes")  # same size, other bytes
    warnings = []
    assert store.resumable_checkpoint(run, warnings.append)[0] == store.checkpoint_dir(2)
    assert len(warnings) == 1 and "step_4' is corrupt: model.safetensors does not match" in warnings[0]
    assert store.checkpoint_steps(run) == [2]


@pytest.fixture
def masked_cluster(tmp_path, s3):
    """Head (the driver's node) + a worker node that sees `tmp_path` as its own empty disk; the learner
    must run on the worker node (its resource), the rollout and reward workers on the head."""
    if not can_mask():
        pytest.skip("needs mount namespaces (unshare --mount) to give a node its own disk")
    nodes = LocalCluster({"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing"})
    try:
        nodes.start_head(cpus=2, resources='{"head_node": 1}')
        nodes.add_node(cpus=1, resources='{"learner_node": 1}', masked=tmp_path)
        yield nodes
    finally:
        nodes.shutdown()


def driver(nodes: LocalCluster, *args: str, timeout: int = 400) -> subprocess.CompletedProcess:
    env = {**nodes.env, "RAY_ADDRESS": nodes.gcs, "PYTHONUNBUFFERED": "1"}
    return subprocess.run(
        [sys.executable, "-m", "pipeline.cli", "train", *TINY, *SMALL_ACTORS, *args],
        env=env,
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def test_nodes_without_a_shared_disk_need_storage_uri(masked_cluster, tmp_path, s3):
    """A local output_dir is on the driver's disk only: the learner's checkpoint files, written on its own
    node, are not there, and the run stops at the first checkpoint saying so. With storage.uri on S3
    (reachable from every node) the same run completes, and nothing is written to the local disk."""
    pinned = [
        "learner.resources={learner_node: 1}",
        "rollout.resources_per_worker={head_node: 0.1}",
        "reward.resources_per_worker={head_node: 0.1}",
    ]
    local = driver(masked_cluster, f"output_dir={tmp_path / 'local'}", *pinned)
    assert local.returncode == 2, local.stderr[-2000:]
    assert "not visible from the driver" in local.stderr and "storage.uri" in local.stderr
    uri = s3()
    shared = driver(masked_cluster, f"storage.uri={uri}", f"output_dir={tmp_path / 'unused'}", *pinned)
    assert shared.returncode == 0, shared.stderr[-3000:]
    run = Storage(uri)
    assert steps_of(run) == list(range(7)) and latest_checkpoint(run)[0] == "checkpoints/step_6"
    placement = json.loads(run.read_text("placement.json"))
    assert placement["learner"][0]["node_id"] != placement["rollout"][0]["node_id"]


LEARNER_NODE = {
    "learner_node": {"resources": {"CPU": 1, "learner_node": 1}, "node_config": {}, "min_workers": 1, "max_workers": 1}
}


def train_process(nodes: LocalCluster, *args: str) -> subprocess.Popen:
    env = {**nodes.env, "RAY_ADDRESS": nodes.gcs, "PYTHONUNBUFFERED": "1"}
    return subprocess.Popen(
        [sys.executable, "-m", "pipeline.cli", "train", *args],
        env=env,
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def wait_for_lines(out: Path, count: int, process: subprocess.Popen) -> None:
    deadline = time.time() + 300
    while not ((out / "metrics.jsonl").exists() and len((out / "metrics.jsonl").read_text().splitlines()) >= count):
        assert time.time() < deadline and process.poll() is None, process.communicate()
        time.sleep(0.5)


def train_with_the_learner_on_its_node(nodes: LocalCluster, out: Path) -> subprocess.Popen:
    """A 40-step tiny run whose learner needs the learner_node resource, once its first 5 metrics lines exist."""
    process = train_process(
        nodes,
        *TINY,
        "trainer.total_steps=40",
        *SMALL_ACTORS,
        f"output_dir={out}",
        "learner.resources={learner_node: 1}",
        "learner.num_gpus=0",
    )
    wait_for_lines(out, 5, process)
    return process


def test_a_lost_node_is_waited_for_under_the_default_settings_where_an_autoscaler_runs(tmp_path):
    """A cluster with Ray's autoscaler (its fake multi-node provider: nodes are local processes) keeps one node of
    the learner's type. That node dies (every process of it SIGKILLed) at step 4 of 40; with the default
    ray.autoscale_wait_s (null) the run sees the autoscaler and waits for a replacement instead of failing, restarts
    from the step-3 checkpoint once one has joined, and ends with every step once. Ray 2.60's fake provider never
    replaces a lost node itself (the autoscaler keeps it as "uninitialized"), so the test starts the replacement."""
    nodes = LocalCluster()
    try:
        nodes.start_autoscaling_head(cpus=2, worker_types=LEARNER_NODE)
        deadline = time.time() + 180
        while not nodes.autoscaled_nodes():  # min_workers: 1
            assert time.time() < deadline, "the autoscaler launched no node"
            time.sleep(1)
        out = tmp_path / "run"
        process = train_with_the_learner_on_its_node(nodes, out)
        ((_, pids),) = nodes.autoscaled_nodes().items()
        kill(pids)
        log = ""
        while "asking the autoscaler and waiting up to 900s (ray.autoscale_wait_s)" not in log:  # null: it saw one
            line = process.stdout.readline()
            assert line, log + process.communicate()[1][-3000:]
            log += line
        nodes.add_node(cpus=1, resources='{"learner_node": 1}')
        rest, err = process.communicate(timeout=600)
        log += rest
        assert process.returncode == 0, log[-2000:] + err[-3000:]
        assert "failure 1 of at most 3" in log
        assert [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()] == list(
            range(41)
        )
    finally:
        nodes.shutdown()


def test_a_lost_node_without_an_autoscaler_fails_fast_naming_the_setting(tmp_path):
    """The same loss on a cluster started by hand (no autoscaler: nothing can replace the node): one line at the
    first restart naming the actor that no longer fits and ray.autoscale_wait_s, not a wait."""
    nodes = LocalCluster()
    try:
        nodes.start_head(cpus=2, resources='{"head_node": 1}')
        first = nodes.add_node(cpus=1, resources='{"learner_node": 1}')
        out = tmp_path / "run"
        process = train_with_the_learner_on_its_node(nodes, out)
        nodes.kill_node(first)
        log, err = process.communicate(timeout=300)
        assert process.returncode == 2, log[-2000:] + err[-3000:]
        last = err.strip().splitlines()[-1]
        assert last.startswith(
            "tokenforge: error: the actors need 1 learner_node in total but the Ray cluster has 0"
        ), err[-3000:]
        assert "the cluster has no autoscaler to add a node; set ray.autoscale_wait_s" in last
    finally:
        nodes.shutdown()


def test_an_actor_bigger_than_every_node_is_one_line(tmp_path):
    """Two nodes of 1 CPU: a learner asking 1.5 CPUs fits the cluster's total (with 0.25 for each worker) but no
    node. One line names it and the largest node at once (not after 4 x trainer.actor_timeout_s)."""
    nodes = LocalCluster()
    try:
        nodes.start_head(cpus=1)
        nodes.add_node(cpus=1)
        process = train_process(
            nodes,
            *TINY,
            "learner.num_cpus=1.5",
            "rollout.num_cpus_per_worker=0.25",
            "reward.num_cpus_per_worker=0.25",
            "learner.num_gpus=0",
            "trainer.actor_timeout_s=20",
            "ray.autoscale_wait_s=2",
            f"output_dir={tmp_path / 'run'}",
        )
        log, err = process.communicate(timeout=300)
        assert process.returncode == 2, log[-2000:] + err[-3000:]
        assert err.strip().splitlines()[-1] == (
            "tokenforge: error: the learner asks 1.5 CPU on one node, but no Ray node has that (the most any node has: "
            "1 CPU) (after waiting ray.autoscale_wait_s=2s for the autoscaler); lower "
            "learner.num_cpus/num_gpus/resources, rollout.*_per_worker, reward.*_per_worker or the worker counts"
        ), err[-3000:]
    finally:
        nodes.shutdown()


def test_the_learner_takes_the_gpu_node_and_says_where_it_runs(tmp_path):
    """A second node advertises one (fake) GPU: learner.num_gpus null decides 1 GPU, the learner lands on that
    node, and the first log lines say so (torch sees no CUDA there, which the run also says)."""
    nodes = LocalCluster()
    try:
        nodes.start_head(cpus=2)
        nodes.add_node(cpus=1, gpus=1)
        out = tmp_path / "run"
        result = subprocess.run(
            [
                sys.executable,
                "-m",
                "pipeline.cli",
                "train",
                *TINY,
                *SMALL_ACTORS,
                "trainer.total_steps=1",
                f"output_dir={out}",
            ],
            env={**nodes.env, "RAY_ADDRESS": nodes.gcs},
            cwd=REPO,
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert result.returncode == 0, result.stderr[-3000:]
        placement = json.loads((out / "placement.json").read_text())
        gpu_node = next(
            n["NodeID"]
            for n in json.loads(
                subprocess.run(
                    [sys.executable, "-c", "import ray, json; ray.init(); print(json.dumps(ray.nodes()))"],
                    env={**nodes.env, "RAY_ADDRESS": nodes.gcs},
                    capture_output=True,
                    text=True,
                    check=True,
                ).stdout.splitlines()[-1]
            )
            if n["Resources"].get("GPU")
        )
        assert placement["learner"][0]["node_id"] == gpu_node
        assert "learner holds a Ray GPU but torch sees no CUDA device" in result.stdout
    finally:
        nodes.shutdown()


class FaultyS3(http.server.ThreadingHTTPServer):
    """A proxy on 127.0.0.1 in front of the moto server that fails one chosen upload as an overloaded or a
    forbidding S3 would: the `nth` staged upload of `name` (its temporary key `name.tmp-<id>`, which the AWS SDK's
    own retries reuse) gets `status` with the S3 error `code` on every request for that key; every other request
    is forwarded to moto as it came."""

    def __init__(self, upstream: str, name: str, nth: int, status: int, code: str):
        super().__init__(("127.0.0.1", 0), ForwardOrFail)
        self.upstream, self.name, self.nth, self.status, self.code = upstream, name, nth, status, code
        self.uploads: list[str] = []  # the staged keys of `name` seen, in order
        self.failed = 0  # requests answered with the error
        threading.Thread(target=self.serve_forever, daemon=True).start()

    @property
    def endpoint(self) -> str:
        return f"127.0.0.1:{self.server_address[1]}"

    def fails(self, method: str, key: str, copy: bool) -> bool:
        if method == "PUT" and not copy and f"/{self.name}.tmp-" in key and key not in self.uploads:
            self.uploads.append(key)
        return len(self.uploads) >= self.nth and key == self.uploads[self.nth - 1]


class ForwardOrFail(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # the SDK keeps its connections open

    def handle_one(self):
        server: FaultyS3 = self.server
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            body = b""
            while size := int(self.rfile.readline().split(b";")[0], 16):
                body += self.rfile.read(size)
                self.rfile.readline()
            self.rfile.readline()
        else:
            body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
        if server.fails(self.command, self.path.split("?")[0], "x-amz-copy-source" in self.headers):
            server.failed += 1
            status, headers = server.status, {}
            data = f"<Error><Code>{server.code}</Code><Message>injected by the test</Message></Error>".encode()
        else:
            upstream = http.client.HTTPConnection(server.upstream, timeout=60)
            sent = {k: v for k, v in self.headers.items() if k.lower() not in ("transfer-encoding", "content-length")}
            upstream.request(self.command, self.path, body=body, headers={**sent, "Content-Length": str(len(body))})
            response = upstream.getresponse()
            status, data = response.status, response.read()
            dropped = ("transfer-encoding", "connection", "content-length")  # the reply is relayed whole
            headers = {k: v for k, v in response.getheaders() if k.lower() not in dropped}
            if self.command == "HEAD":  # no body, but the object's size
                headers["Content-Length"] = response.getheader("Content-Length", "0")
            upstream.close()
        self.send_response(status)
        for key, value in headers.items():
            self.send_header(key, value)
        if self.command != "HEAD":
            self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(data)

    do_GET = do_PUT = do_HEAD = do_POST = do_DELETE = handle_one

    def log_message(self, *args):
        pass


class InterruptingS3(FaultyS3):
    """A proxy in front of the moto server that forwards every request, and sends this process a SIGINT (Ctrl-C)
    when the first upload request (a PUT) for a key holding `name` arrives, answering it a moment later: the
    signal is pending while the write waits on that answer, so Python raises KeyboardInterrupt inside the write."""

    def __init__(self, upstream: str, name: str):
        super().__init__(upstream, name, nth=0, status=0, code="")
        self.sent = False

    def fails(self, method: str, key: str, copy: bool) -> bool:
        if method == "PUT" and not copy and self.name in key and not self.sent:
            self.sent = True
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(0.5)
        return False


def through(proxy: FaultyS3, uri: str) -> str:
    """`uri` (on the moto server) reached through `proxy`."""
    return uri.replace(f"endpoint_override={proxy.upstream}", f"endpoint_override={proxy.endpoint}")


def moto_endpoint(uri: str) -> str:
    return uri.split("endpoint_override=")[1].split("&")[0]


def test_a_transient_s3_error_in_a_run_is_retried_from_the_last_checkpoint(ray_cluster, s3, tmp_path):
    """`tokenforge train` on S3 whose 5th metrics upload (step 4's line; checkpoint step 3 is published) meets
    503 SlowDown on every try the AWS SDK makes: the run counts one failure against trainer.max_failures, restarts
    from step 3 and completes every step once. The same upload forbidden (403 AccessDenied, lasting) ends the run
    with one line, exit 2, and no retry."""
    env = {**os.environ, "RAY_ADDRESS": ray_cluster.get_runtime_context().gcs_address, "PYTHONUNBUFFERED": "1"}

    def run(status: int, code: str) -> tuple[subprocess.CompletedProcess, Storage, FaultyS3]:
        uri = s3()
        proxy = FaultyS3(moto_endpoint(uri), "metrics.jsonl", nth=5, status=status, code=code)
        command = [
            sys.executable,
            "-m",
            "pipeline.cli",
            "train",
            *TINY,
            *SMALL_ACTORS,
            f"storage.uri={through(proxy, uri)}",
            f"output_dir={tmp_path / 'unused'}",
        ]
        done = subprocess.run(command, env=env, cwd=REPO, capture_output=True, text=True, timeout=400)
        proxy.shutdown()
        return done, Storage(uri), proxy

    slow, storage, proxy = run(503, "SlowDown")
    assert slow.returncode == 0, slow.stdout[-2000:] + slow.stderr[-3000:]
    assert proxy.failed >= 1 and "Traceback" not in slow.stderr
    restarts = [line for line in slow.stdout.splitlines() if line.startswith("tokenforge: failure ")]
    assert len(restarts) == 1, slow.stdout[-3000:]
    assert restarts[0].startswith("tokenforge: failure 1 of at most 3 (TransientStorageError: storage "), restarts
    assert "metrics.jsonl" in restarts[0] and "resuming" in slow.stdout and "(step 3)" in slow.stdout
    assert steps_of(storage) == list(range(7)) and latest_checkpoint(storage)[0] == "checkpoints/step_6"

    forbidden, storage, proxy = run(403, "AccessDenied")
    assert forbidden.returncode == 2 and proxy.failed >= 1, forbidden.stdout[-2000:] + forbidden.stderr[-3000:]
    last = forbidden.stderr.strip().splitlines()[-1]  # after Ray's own lines about joining the cluster
    assert "Traceback" not in forbidden.stderr and last.startswith("tokenforge: error: storage "), forbidden.stderr[
        -3000:
    ]
    assert "metrics.jsonl" in last and "ACCESS_DENIED" in last
    assert "tokenforge: failure " not in forbidden.stdout


# The autoscaler request standing in the GCS, as a list of bundles. request_resources stores it in the GCS's
# internal KV under AUTOSCALER_RESOURCE_REQUEST_CHANNEL (JSON) for autoscaler v1, which `ray start
# --autoscaling-config` runs, and as the cluster resource constraint of the GCS's autoscaler state for v2.
STANDING_REQUEST = """
import json, ray
from ray.autoscaler.v2.utils import is_autoscaler_v2
ray.init()
if is_autoscaler_v2(fetch_from_server=True):
    from ray._raylet import GcsClient
    from ray.autoscaler.v2.sdk import get_cluster_resource_state
    state = get_cluster_resource_state(GcsClient(ray.get_runtime_context().gcs_address))
    bundles = [dict(r.request.resources_bundle) for c in state.cluster_resource_constraints
               for r in c.resource_requests for _ in range(r.count)]
else:
    from ray._private.ray_constants import AUTOSCALER_RESOURCE_REQUEST_CHANNEL
    from ray.experimental.internal_kv import _internal_kv_get
    bundles = json.loads(_internal_kv_get(AUTOSCALER_RESOURCE_REQUEST_CHANNEL) or "[]")
print(json.dumps(bundles))
"""


def standing_request(nodes: LocalCluster) -> list[dict]:
    read = subprocess.run(
        [sys.executable, "-c", STANDING_REQUEST],
        env={**nodes.env, "RAY_ADDRESS": nodes.gcs},
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    return json.loads(read.stdout.strip().splitlines()[-1])


def test_the_autoscaler_request_is_withdrawn_when_the_run_fails(tmp_path):
    """On a cluster with Ray's autoscaler (fake multi-node provider), a run whose learner asks for a resource no node
    type has asks the autoscaler for its actors' bundles (seen standing in the GCS while it waits), waits
    ray.autoscale_wait_s, fails in one line, and leaves no request behind: the cluster may scale down."""
    nodes = LocalCluster()
    try:
        nodes.start_autoscaling_head(
            cpus=2,
            worker_types={"small": {"resources": {"CPU": 1}, "node_config": {}, "min_workers": 0, "max_workers": 1}},
        )
        process = train_process(
            nodes,
            *TINY,
            *SMALL_ACTORS,
            "learner.num_gpus=0",
            "learner.resources={nowhere: 1}",
            "ray.autoscale_wait_s=30",
            f"output_dir={tmp_path / 'run'}",
        )
        deadline, seen = time.time() + 120, []
        while not seen and process.poll() is None:
            assert time.time() < deadline, "the request never showed in the GCS"
            seen = standing_request(nodes)
        assert {"CPU": 0.25, "nowhere": 1.0} in seen, seen
        out, err = process.communicate(timeout=300)
        assert process.returncode == 2, out[-2000:] + err[-3000:]
        last = err.strip().splitlines()[-1]  # after Ray's own lines about joining the cluster
        assert "Traceback" not in err and last.startswith("tokenforge: error: the actors need 1 nowhere in total"), err[
            -3000:
        ]
        assert "after waiting ray.autoscale_wait_s=30s" in last
        assert standing_request(nodes) == []
    finally:
        nodes.shutdown()
