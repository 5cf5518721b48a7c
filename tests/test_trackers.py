"""trainer.loggers: MLflow (a local file store) and W&B (offline) get the config, every metric and the eval
samples, read back here; under Tune, Ray Tune's own callbacks. Skipped, naming the package, without the extras."""

import json
import struct
import sys
from importlib.util import find_spec
from pathlib import Path

import pytest

from pipeline.cli import main
from pipeline.config import load_config
from pipeline.driver.trainer import train
from pipeline.outputs.trackers import tune_callbacks

needs_mlflow = pytest.mark.skipif(
    find_spec("mlflow") is None, reason="needs the mlflow package: pip install 'tokenforge[mlflow]'"
)
needs_wandb = pytest.mark.skipif(
    find_spec("wandb") is None, reason="needs the wandb package: pip install 'tokenforge[wandb]'"
)
TINY = [
    "trainer.total_steps=2",
    "trainer.eval_every=2",
    "trainer.prompts_per_step=8",
    "rollout.group_size=4",
    "data.max_eval_samples=20",
]


@pytest.fixture(scope="module")
def tracked_run(ray_cluster, tmp_path_factory):
    """A tiny run logging to every tracker installed (and not to TensorBoard); returns (run dir, tracker dir)."""
    root = tmp_path_factory.mktemp("trackers")
    loggers = ["jsonl", *[name for name in ("mlflow", "wandb") if find_spec(name)]]
    env = {
        "MLFLOW_TRACKING_URI": f"file://{root}/mlruns",
        "MLFLOW_ALLOW_FILE_STORE": "true",
        "WANDB_MODE": "offline",
        "WANDB_DIR": str(root),
        "WANDB_SILENT": "true",
    }
    with pytest.MonkeyPatch.context() as patch:
        for key, value in env.items():
            patch.setenv(key, value)
        train(
            load_config(
                overrides=[
                    *TINY,
                    f"trainer.loggers={loggers}",
                    "trainer.tracker_project=tf-test",
                    f"output_dir={root / 'run'}",
                ]
            )
        )
    records = [json.loads(line) for line in (root / "run" / "metrics.jsonl").read_text().splitlines()]
    return root, records


def test_tensorboard_is_a_logger_like_the_others(tracked_run):
    root, records = tracked_run
    assert [r["step"] for r in records] == [0, 1, 2] and not (root / "run" / "tensorboard").exists()


@needs_mlflow
def test_mlflow_file_store_round_trip(tracked_run, monkeypatch):
    from mlflow.tracking import MlflowClient

    root, records = tracked_run
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
    client = MlflowClient(tracking_uri=f"file://{root}/mlruns")
    (run,) = client.search_runs([client.get_experiment_by_name("tf-test").experiment_id])
    assert run.data.params["trainer.total_steps"] == "2" and run.data.params["reward.weights.digit_match"] == "0.5"
    history = {m.step: m.value for m in client.get_metric_history(run.info.run_id, "eval/exact_match")}
    assert history == {r["step"]: pytest.approx(r["eval/exact_match"]) for r in records if "eval/exact_match" in r}
    assert [m.value for m in client.get_metric_history(run.info.run_id, "reward/total/mean")] == pytest.approx(
        [r["reward/total/mean"] for r in records if "reward/total/mean" in r]
    )
    samples = json.loads(
        (root / "mlruns" / run.info.experiment_id / run.info.run_id / "artifacts" / "eval" / "step_2.json").read_text()
    )
    assert {"prompt_text", "answer", "response", "eval/exact_match"} <= set(samples["columns"]) and len(
        samples["data"]
    ) == 20


def wandb_records(path) -> list:
    """The protobuf records of an offline W&B run file (`run-<id>.wandb`: a LevelDB-style log of 32 KiB
    blocks after a 7-byte `:W&B` header; each chunk has a 7-byte header: crc32, length, type)."""
    from wandb.proto import wandb_internal_pb2

    data = Path(path).read_bytes()
    assert data[:4] == b":W&B"
    position, block, records, pending = 7, 32768, [], b""
    while position + 7 <= len(data):
        left = block - position % block
        _, length, kind = struct.unpack("<IHB", data[position : position + 7]) if left >= 7 else (0, 0, 0)
        if kind == 0:  # the block's zero padding
            position += left
            continue
        pending += data[position + 7 : position + 7 + length]
        position += 7 + length
        if kind in (1, 4):  # a full record, or the last chunk of one
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            records.append(record)
            pending = b""
    return records


@needs_wandb
def test_wandb_offline_round_trip(tracked_run):
    root, records = tracked_run
    (offline,) = (root / "wandb").glob("offline-run-*")
    history, config = {}, {}
    for record in wandb_records(next(offline.glob("run-*.wandb"))):
        kind = record.WhichOneof("record_type")
        if kind == "history":
            row = {(item.key or "/".join(item.nested_key)): json.loads(item.value_json) for item in record.history.item}
            history[row["_step"]] = row
        elif kind == "run":
            config = {item.key: json.loads(item.value_json) for item in record.run.config.update}
    assert config["trainer"]["total_steps"] == 2 and config["reward"]["weights"] == {
        "exact_match": 1.0,
        "digit_match": 0.5,
    }
    for record in records:
        for key in ("eval/exact_match", "reward/total/mean", "loss/policy"):
            if key in record:
                assert history[record["step"]][key] == pytest.approx(record[key]), (record["step"], key)
    assert history[2]["eval/samples/_type"] == "table-file"
    (table,) = (offline / "files" / "media" / "table" / "eval").glob("samples_2_*.table.json")
    samples = json.loads(table.read_text())
    assert {"prompt_text", "answer", "response", "eval/exact_match"} <= set(samples["columns"]) and len(
        samples["data"]
    ) == 20


@needs_mlflow
@needs_wandb
def test_tune_trials_log_through_ray_tunes_own_callbacks(monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")  # online, the W&B key would be checked against W&B's server first
    from ray.air.integrations.mlflow import MLflowLoggerCallback
    from ray.air.integrations.wandb import WandbLoggerCallback

    config = load_config(overrides=["trainer.loggers=[jsonl, wandb, mlflow]", "trainer.tracker_project=search"])
    wandb_cb, mlflow_cb = tune_callbacks(config)
    assert isinstance(wandb_cb, WandbLoggerCallback) and wandb_cb.project == "search"
    assert isinstance(mlflow_cb, MLflowLoggerCallback) and mlflow_cb.experiment_name == "search"
    assert tune_callbacks(load_config()) == []


def test_a_missing_extra_is_one_line_naming_it_before_ray_starts(monkeypatch, tmp_path, capsys):
    monkeypatch.setitem(sys.modules, "wandb", None)  # as if not installed
    with pytest.raises(SystemExit) as exit_info:
        main(["train", "trainer.loggers=[jsonl, wandb]", f"output_dir={tmp_path / 'run'}"])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and err.startswith("tokenforge: error: ") and err.count("\n") == 1
    assert "trainer.loggers has 'wandb'" in err and "pip install 'tokenforge[wandb]'" in err
    assert not (tmp_path / "run").exists()


def one_line_error(argv, capsys) -> str:
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    err = capsys.readouterr().err.strip()
    assert exit_info.value.code == 2 and err.count("\n") == 0 and err.startswith("tokenforge: error: "), err
    return err


@needs_wandb
def test_a_wrong_wandb_key_is_one_line_before_ray(capsys, monkeypatch, tmp_path):
    """A fake W&B server on 127.0.0.1 answers the login's viewer query with 401, as W&B does for a wrong key."""
    import threading
    import time
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    queries = []

    class WrongKey(BaseHTTPRequestHandler):
        def do_POST(self):
            queries.append(
                (self.path, self.headers["Authorization"], self.rfile.read(int(self.headers["Content-Length"])))
            )
            self.send_response(401)
            self.end_headers()
            self.wfile.write(b'{"errors": [{"message": "user is not logged in"}]}')

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), WrongKey)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    base = f"http://127.0.0.1:{server.server_port}"
    for key, value in {"WANDB_BASE_URL": base, "WANDB_API_KEY": "x" * 40, "WANDB_MODE": "online"}.items():
        monkeypatch.setenv(key, value)
    start = time.monotonic()
    try:
        err = one_line_error(["train", "trainer.loggers=[jsonl, wandb]", f"output_dir={tmp_path / 'out'}"], capsys)
    finally:
        server.shutdown()
    assert (
        f"trainer.loggers: W&B at {base} refused the API key (HTTP 401); set the right one with `wandb login --relogin`"
        in err
    )
    assert time.monotonic() - start < 30 and queries and queries[0][0] == "/graphql" and b"viewer" in queries[0][2]
    assert not (tmp_path / "out" / "config.yaml").exists()  # stopped before the run began (and before Ray)


@needs_mlflow
def test_an_unreachable_mlflow_is_one_line_before_ray(capsys, monkeypatch, tmp_path):
    import socket
    import time

    with socket.socket() as probe:  # a port nothing listens on
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"http://127.0.0.1:{port}")
    start = time.monotonic()
    err = one_line_error(["train", "trainer.loggers=[jsonl, mlflow]", f"output_dir={tmp_path / 'out'}"], capsys)
    assert (
        f"trainer.loggers: MLflow at http://127.0.0.1:{port}/api/2.0/mlflow/experiments/search?max_results=1 "
        "cannot be reached" in err
    )
    assert "check MLFLOW_TRACKING_URI" in err and time.monotonic() - start < 30
    assert not (tmp_path / "out" / "config.yaml").exists()
