"""Experiment trackers beside metrics.jsonl: TensorBoard, Weights & Biases, MLflow (`trainer.loggers`).

Each tracker gets the resolved config once, every metrics record, and a table of sample completions
on each eval step (the eval dump's prompt, references, greedy response and per-sample metrics).
W&B and MLflow are optional extras (`pip install tokenforge[wandb]` / `tokenforge[mlflow]`) and are
configured by their own environment variables (WANDB_MODE, WANDB_PROJECT, MLFLOW_TRACKING_URI, ...), and checked
before Ray starts (an online W&B needs a key its server accepts; an http(s) MLflow server must answer);
`trainer.tracker_project` names the W&B project / MLflow experiment. A resumed run continues the
same W&B / MLflow run: their ids are kept in the run's `trackers.json`.

metrics.jsonl (`jsonl`) is the run's own record (resume, keep_best, `tokenforge report` read it), so
it is always written; TensorBoard's events live in pipeline/outputs/metrics_log.py.

Under `tokenforge tune` the trials log nothing to W&B / MLflow themselves: Ray Tune's own
WandbLoggerCallback / MLflowLoggerCallback make one tracker run per trial (`tune_callbacks`).
"""

from __future__ import annotations

import base64
import json
import netrc
import os
import urllib.error
import urllib.request
import uuid
from typing import Any
from urllib.parse import urlparse

import pyarrow as pa

from pipeline.batch import DATASET_PROMPT, metadata_columns
from pipeline.config import TrainConfig
from pipeline.data.images import IMAGE_COLUMN, image_label
from pipeline.errors import TokenforgeError
from pipeline.storage import Storage

TRACKER_IDS = "trackers.json"  # {"wandb": run id, "mlflow": run id}: a resumed run logs to the same tracker runs
EXTRAS = {"wandb": "wandb", "mlflow": "mlflow"}  # logger -> the pip extra (and module) it needs
CHECK_TIMEOUT_S = 10  # the pre-flight request to a tracker server


def require(logger: str):
    """The tracker's module, or a one-line error naming the extra to install."""
    try:
        return __import__(EXTRAS[logger])
    except ImportError:
        raise TokenforgeError(
            f"trainer.loggers has {logger!r} but the {EXTRAS[logger]} package is not installed: "
            f"pip install 'tokenforge[{logger}]', or drop it from trainer.loggers"
        ) from None


def flat_config(config: TrainConfig) -> dict[str, Any]:
    """The config as dotted keys (`learner.lr`), lists and mappings as JSON text."""
    flat: dict[str, Any] = {}

    def walk(node: dict, prefix: str) -> None:
        for key, value in node.items():
            if isinstance(value, dict) and value:
                walk(value, f"{prefix}{key}.")
            else:
                flat[f"{prefix}{key}"] = (
                    value if isinstance(value, (int, float, str, bool)) or value is None else json.dumps(value)
                )

    walk(config.model_dump(mode="json"), "")
    return flat


def sample_rows(table: pa.Table, limit: int = 64) -> dict[str, list]:
    """Columns of the eval samples table the trackers log: prompt, reference fields, response, eval metrics."""
    references = [n for n in metadata_columns(table) if n != DATASET_PROMPT and not n.startswith("eval/")]
    names = ["prompt_text", *references, "response", *[n for n in table.column_names if n.startswith("eval/")]]
    head = table.slice(0, limit)

    def cell(name, v):  # an image as its path or size, a list as JSON
        if name == IMAGE_COLUMN:
            return image_label(v)
        return v if isinstance(v, (int, float, str, bool)) or v is None else json.dumps(v)

    return {name: [cell(name, v) for v in head.column(name).to_pylist()] for name in names}


def require_loggers(config: TrainConfig) -> None:
    """Every tracker trainer.loggers names is installed and its server answers (checked before Ray starts, so a
    wrong W&B key or an unreachable MLflow is one line, not a failure after the actors started)."""
    for logger in config.trainer.loggers:
        if logger in EXTRAS:
            require(logger)
    if "wandb" in config.trainer.loggers:
        check_wandb()
    if "mlflow" in config.trainer.loggers:
        check_mlflow(require("mlflow").get_tracking_uri())


def http_status(request: urllib.request.Request, what: str, fix: str) -> int:
    """The HTTP status of `request` (an error status included); an unreachable server is one line."""
    try:
        with urllib.request.urlopen(request, timeout=CHECK_TIMEOUT_S) as response:
            return response.status
    except urllib.error.HTTPError as error:
        return error.code
    except OSError as error:  # URLError, a refused connection, a timeout
        reason = getattr(error, "reason", error)
        raise TokenforgeError(
            f"trainer.loggers: {what} at {request.full_url} cannot be reached ({reason}); {fix}"
        ) from None


def check_wandb() -> None:
    """W&B online: an API key exists and W&B's server accepts it (the viewer query `wandb login` makes)."""
    if (
        os.environ.get("WANDB_MODE", "online") in ("offline", "disabled", "dryrun")
        or os.environ.get("WANDB_DISABLED") == "true"
    ):
        return
    base = os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai").rstrip("/")
    key = os.environ.get("WANDB_API_KEY") or wandb_netrc_key(urlparse(base).hostname)
    offline = "or set WANDB_MODE=offline (then `wandb sync` later), or drop wandb from trainer.loggers"
    if not key:
        raise TokenforgeError(
            f"trainer.loggers has 'wandb' but no W&B API key is set: run `wandb login` or set WANDB_API_KEY, {offline}"
        )
    request = urllib.request.Request(
        f"{base}/graphql",
        data=json.dumps({"query": "query Viewer { viewer { id } }"}).encode(),
        headers={
            "Content-Type": "application/json",
            "Authorization": "Basic " + base64.b64encode(f"api:{key}".encode()).decode(),
        },
    )
    status = http_status(request, "W&B", f"check WANDB_BASE_URL and the network, {offline}")
    if status in (401, 403):
        raise TokenforgeError(
            f"trainer.loggers: W&B at {base} refused the API key (HTTP {status}); set the right one with "
            "`wandb login --relogin` "
            f"or WANDB_API_KEY, {offline}"
        )


def wandb_netrc_key(host: str | None) -> str | None:
    """The key `wandb login` stored in ~/.netrc (or $NETRC) for `host`."""
    try:
        entry = netrc.netrc(os.environ.get("NETRC")).authenticators(host or "")
    except (OSError, netrc.NetrcParseError):
        return None
    return entry[2] if entry else None


def check_mlflow(uri: str) -> None:
    """An MLflow tracking server (http/https tracking URI) answers; local stores (files, sqlite) need no check."""
    if urlparse(uri).scheme not in ("http", "https"):
        return
    request = urllib.request.Request(f"{uri.rstrip('/')}/api/2.0/mlflow/experiments/search?max_results=1")
    http_status(
        request, "MLflow", "check MLFLOW_TRACKING_URI and that the server runs, or drop mlflow from trainer.loggers"
    )


class Trackers:
    """The W&B and MLflow runs of one tokenforge run (none when trainer.loggers names neither)."""

    def __init__(self, config: TrainConfig, storage: Storage):
        loggers = set(config.trainer.loggers)
        self.wandb = require("wandb") if "wandb" in loggers else None
        self.mlflow = require("mlflow") if "mlflow" in loggers else None
        if not (self.wandb or self.mlflow):
            return
        ids = json.loads(storage.read_text(TRACKER_IDS)) if storage.exists(TRACKER_IDS) else {}
        name, project = storage.display().rstrip("/").rsplit("/", 1)[-1], config.trainer.tracker_project
        if self.wandb:
            ids.setdefault("wandb", uuid.uuid4().hex[:12])
            self.wandb.init(
                project=project,
                name=name,
                id=ids["wandb"],
                resume="allow",
                config=config.model_dump(mode="json"),
                notes=storage.display(),
            )
        if self.mlflow:
            self.mlflow.set_experiment(project)
            run = self.mlflow.start_run(run_id=ids.get("mlflow"), run_name=None if "mlflow" in ids else name)
            ids["mlflow"] = run.info.run_id
            if "mlflow-params" not in ids:  # params are immutable in MLflow: logged once per run
                self.mlflow.log_params({k: str(v)[:6000] for k, v in flat_config(config).items()})
                self.mlflow.set_tag("tokenforge.run", storage.display())
                ids["mlflow-params"] = True
        storage.write_text(TRACKER_IDS, json.dumps(ids))

    def log(self, step: int, metrics: dict[str, float]) -> None:
        if self.wandb:
            self.wandb.log(metrics, step=step)
        if self.mlflow:
            self.mlflow.log_metrics(metrics, step=step)

    def log_samples(self, step: int, table: pa.Table) -> None:
        """The eval's sample completions as a table (W&B: `eval/samples`; MLflow: artifact eval/step_N.json)."""
        rows = sample_rows(table)
        if self.wandb:
            self.wandb.log(
                {"eval/samples": self.wandb.Table(columns=list(rows), data=[list(r) for r in zip(*rows.values())])},
                step=step,
            )
        if self.mlflow:
            self.mlflow.log_table(rows, artifact_file=f"eval/step_{step}.json")

    def close(self) -> None:
        if self.wandb:
            self.wandb.finish()
        if self.mlflow:
            self.mlflow.end_run()


def tune_callbacks(config: TrainConfig) -> list:
    """Ray Tune's own tracker callbacks for the loggers the base config names (one tracker run per trial)."""
    require_loggers(config)
    callbacks = []
    project = config.trainer.tracker_project
    if "wandb" in config.trainer.loggers:
        require("wandb")
        from ray.air.integrations.wandb import WandbLoggerCallback

        callbacks.append(WandbLoggerCallback(project=project, log_config=True))
    if "mlflow" in config.trainer.loggers:
        require("mlflow")
        from ray.air.integrations.mlflow import MLflowLoggerCallback

        callbacks.append(MLflowLoggerCallback(experiment_name=project, save_artifact=False))
    return callbacks
