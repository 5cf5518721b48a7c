"""`tokenforge tune`: Ray Tune over whole tokenforge pipelines.

Each trial runs `train()` (driver + learner + rollout and reward workers) inside its own placement
group: bundle 0 for the driver, one for the learner, one per rollout worker, one per reward worker.
The trial function is the only caller of `tune.report`: at every eval it reports the eval metrics,
reward components and throughput with a fresh checkpoint, and at start it restores from
`tune.get_checkpoint()`, so PBT exploits and failure retries resume real state with the trial's
current (possibly mutated) hyperparameters.
"""

from __future__ import annotations

import csv
import io
import json
import logging
import os
import signal
import sys
import tempfile
import threading
from pathlib import Path
from typing import Any

import yaml
from ray import tune

from pipeline import run_paths
from pipeline import storage as store
from pipeline.config import TrainConfig, config_to_yaml, config_with, read_yaml
from pipeline.driver.placement import (
    actor_bundles,
    connect_ray,
    decide_learner_gpus,
    ensure_resources,
    named_bundles,
    withdraw_resource_request,
)
from pipeline.driver.trainer import train
from pipeline.errors import TokenforgeError
from pipeline.outputs.experiment_files import SEARCHED_FILE, SPEC_FILE
from pipeline.outputs.next_steps import after_tune
from pipeline.outputs.report import draw, experiment_panels, trial_label
from pipeline.outputs.trackers import tune_callbacks
from pipeline.preflight import check
from pipeline.storage import Storage
from pipeline.tune.spec import TuneSpec, load_spec, param_space, scheduler, searcher

RESTORES_FILE = (
    "restores.jsonl"  # in each trial's directory: one line per start from a checkpoint (PBT exploit or retry)
)
POINTER = "checkpoint.json"  # what a Tune checkpoint holds: where the real one is (the run's own storage)


def trial_resources(config: TrainConfig, driver_cpus: float) -> tune.PlacementGroupFactory:
    """Bundle 0: the trial's driver; then the learner, each rollout worker, each reward worker."""
    return tune.PlacementGroupFactory([{"CPU": driver_cpus}, *actor_bundles(config)])


def restore_into(run: Storage, pointer: dict) -> dict:
    """Copy the published checkpoint a Tune checkpoint points at (the trial's own, or a PBT donor's) into
    `run` as its only checkpoint, manifest last; returns what was restored (for restores.jsonl)."""
    source = Storage(pointer["run_uri"])
    manifest = store.read_manifest(source, pointer["checkpoint"])
    if manifest is None:
        raise TokenforgeError(
            f"Tune restores {source.display(pointer['checkpoint'])!r}, which is gone or unpublished "
            "(pruned? keep trainer.keep_checkpoints >= tune.num_to_keep)"
        )
    target = store.checkpoint_dir(manifest["step"])
    if store.read_manifest(run, target) != manifest:  # not already this run's (however its URI is spelled)
        # copied in full before anything of this run is deleted: a donor that prunes the checkpoint meanwhile
        # fails the restore but costs this run nothing
        staging = f"{store.CHECKPOINTS}/incoming"
        run.delete_dir(staging)
        for name in manifest["files"]:
            run.write_bytes(
                f"{staging}/{name}", source.read_bytes(f"{pointer['checkpoint']}/{name}"), staged=False
            )  # read through the manifest written after them
        # later checkpoints of this trial's own must not win a resume over the restored one; earlier ones stay
        # (Tune may still hand them to another trial)
        for step in [s for s in store.checkpoint_steps(run) if s >= manifest["step"]]:
            run.delete_dir(store.checkpoint_dir(step))
        for name in manifest["files"]:
            run.move(f"{staging}/{name}", f"{target}/{name}")
        run.delete_dir(staging)
        store.publish_checkpoint(run, manifest["step"], manifest["files"])
    weights = next(
        manifest["files"][n]["sha256"]
        for n in ("model.safetensors", "adapter_model.safetensors")
        if n in manifest["files"]
    )
    return {"step": manifest["step"], "model_sha256": weights, "source": source.display(pointer["checkpoint"])}


def run_trial(params: dict[str, Any], base: dict, experiment_uri: str, keep: int | None) -> None:
    """One trial: the base config with this trial's params, trained with reports to Tune. Its run lives
    in the experiment's storage (trial directory/run); Tune's checkpoints point at the run's own."""
    config = config_with(TrainConfig.model_validate(base), params)
    logging.getLogger("ray.train").setLevel(logging.WARNING)  # no "Checkpoint successfully created" line per report
    trial = Storage(experiment_uri).child(Path(tune.get_context().get_trial_dir()).name)
    run = trial.child("run")
    config.storage.uri = run.uri
    config.trainer.max_failures = 0  # a failure ends the trial; Tune retries it (tune.max_failures) from its checkpoint
    # W&B / MLflow: one tracker run per trial made by Tune's own callbacks (tune_callbacks), not by the trial
    config.trainer.loggers = [name for name in config.trainer.loggers if name not in ("wandb", "mlflow")]
    own = config.trainer.keep_checkpoints  # every checkpoint Tune keeps must still exist: keep at least as many
    config.trainer.keep_checkpoints = None if keep is None or own is None else max(keep, own)
    trial.write_text(SEARCHED_FILE, json.dumps(params))
    restored = tune.get_checkpoint()
    if restored:
        with restored.as_directory() as pointer_dir:
            pointer = json.loads((Path(pointer_dir) / POINTER).read_text())
        restore = restore_into(run, pointer)
        trial.append_text(RESTORES_FILE, json.dumps({**restore, "params": params}) + "\n")
    else:
        run.delete_dir("")  # a retry with nothing to restore starts over

    def report(record: dict, saved: str | None) -> None:
        if saved is None:
            tune.report(record)
            return
        with tempfile.TemporaryDirectory(prefix="tokenforge-pointer-") as pointer_dir:
            (Path(pointer_dir) / POINTER).write_text(json.dumps({"run_uri": run.uri, "checkpoint": saved}))
            tune.report(record, checkpoint=tune.Checkpoint.from_directory(pointer_dir))

    train(config, resume=restored is not None, report=report)


def trainable(spec: TuneSpec, base: TrainConfig, experiment_uri: str):
    """The trial function with the base config bound and resources from each trial's own config."""
    return tune.with_resources(
        tune.with_parameters(
            run_trial, base=base.model_dump(mode="json"), experiment_uri=experiment_uri, keep=spec.tune.num_to_keep
        ),
        lambda params: trial_resources(config_with(base, params), spec.tune.driver_cpus),
    )


def check_trials_fit(spec: TuneSpec, base: TrainConfig) -> None:
    """Every trial's placement group (driver + actors) must fit the cluster, or it would wait forever. An autoscaler
    request made meanwhile is withdrawn: from then on the trials' placement groups are the autoscaler's demand."""
    driver = ("trial driver", {"CPU": spec.tune.driver_cpus})
    try:
        for params in [{}, *[{k: d.example()} for k, d in spec.search.items()]]:
            ensure_resources(base, [driver, *named_bundles(config_with(base, params))])
    finally:
        withdraw_resource_request()


def run(spec_path: str, overrides: list[str] = ()) -> str:
    """Validate the spec, run the experiment, write the results; returns the experiment's URI."""
    spec, base = load_spec(spec_path, overrides)
    connect_ray(base)
    base = decide_learner_gpus(base)  # trials and bundles agree on GPUs
    check_trials_fit(spec, base)
    block = spec.tune
    if not store.is_uri(block.storage_path):  # inside a Ray job a relative storage_path goes under the output root
        chosen = Path(
            run_paths.resolve_new(
                str(Path(block.storage_path) / block.name), Path.exists, "tune.storage_path/tune.name"
            )
        )
        block.storage_path, block.name = str(chosen.parent.resolve()), chosen.name
    experiment = Storage(block.storage_path).child(block.name)
    if experiment.list_dir(""):
        raise TokenforgeError(
            f"tune experiment {experiment.display()!r} exists; resume it with --resume or set tune.name"
        )
    experiment.write_text(
        SPEC_FILE, yaml.safe_dump({"spec": spec.model_dump(mode="json"), "base": base.model_dump(mode="json")})
    )
    tuner = tune.Tuner(
        trainable(spec, base, experiment.uri),
        param_space=param_space(spec),
        tune_config=tune.TuneConfig(
            metric=block.metric,
            mode=block.mode,
            num_samples=block.num_samples,
            max_concurrent_trials=block.max_concurrent_trials,
            search_alg=searcher(spec),
            scheduler=scheduler(spec),
        ),
        run_config=run_config(spec, base, block.storage_path),
    )
    return write_results(spec, base, fit(tuner), experiment)


def fit(tuner: tune.Tuner) -> tune.ResultGrid:
    """tuner.fit(), leaving the process's SIGINT/SIGUSR1 handlers as they were: Tune installs its own and restores
    them only when a signal arrives, so after a finished experiment the next Ctrl-C in the same process (a notebook,
    a script that trains next) would be swallowed as "Stop signal received" instead of interrupting."""
    handlers = {}  # Tune installs handlers only from the main thread, and one installed from C reads as None
    if threading.current_thread() is threading.main_thread():
        signals = [s for s in (signal.SIGINT, getattr(signal, "SIGUSR1", None)) if s is not None]
        handlers = {s: h for s in signals if (h := signal.getsignal(s)) is not None}
    # Tune's classic status table, trimmed by run_config's reporter, for a new experiment and a resumed one alike: the
    # newer console output ignores that reporter and prints Ray's own TensorBoard command for /tmp/ray/session_*
    os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")
    # Tune's own console lines: the warning that a trial's checkpoint forced a snapshot of the experiment state
    # (Tune's checkpoints here are pointers of a few bytes; 0 turns that one warning off, as its text says), and
    # ray.tune.tune's INFO lines (state files written, total run time) before tokenforge's summary says where it all is
    os.environ.setdefault("TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S", "0")
    logging.getLogger("ray.tune.tune").setLevel(logging.WARNING)
    try:
        return tuner.fit()
    finally:
        for s, handler in handlers.items():
            signal.signal(s, handler)


def run_config(spec: TuneSpec, base: TrainConfig, storage: str) -> tune.RunConfig:
    block = spec.tune
    return tune.RunConfig(
        callbacks=tune_callbacks(base),  # W&B / MLflow runs, one per trial, for the base config's trainer.loggers
        name=block.name,
        storage_path=storage,
        failure_config=tune.FailureConfig(max_failures=block.max_failures),
        verbose=1,  # the status table only: no per-result dumps of every metric of every report
        checkpoint_config=tune.CheckpointConfig(num_to_keep=block.num_to_keep),
        progress_reporter=LiveTable(
            parameter_columns=list(spec.search),
            metric_columns=["step", block.metric, "reward/total/mean", "throughput/samples_per_s"],
            max_report_frequency=5 if sys.stdout.isatty() else 30,
        ),
    )


class LiveTable(tune.CLIReporter):
    """Tune's status table, redrawn in place on a terminal (cursor up over the last one, clear, draw);
    printed anew each time elsewhere (a log keeps every table)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.drawn = 0  # lines of the table on screen

    def report(self, trials, done: bool, *sys_info: str) -> None:
        # without "Result logdir: /tmp/ray/session_*/artifacts/...": Ray's driver scratch, not the experiment's
        # directory
        lines = self._progress_str(trials, done, *sys_info).splitlines()
        table = "\n".join(line for line in lines if not line.startswith("Result logdir: "))
        if not sys.stdout.isatty():
            print(table, flush=True)
            return
        print((f"\x1b[{self.drawn}F\x1b[J" if self.drawn else "") + table, flush=True)
        self.drawn = table.count("\n") + 1


def resume(experiment_uri: str, trust_run_config: bool = False) -> str:
    """Continue an interrupted experiment (unfinished and errored trials), local or at a URI. Tune's restore
    unpickles the experiment's state (searcher, scheduler, trials), and a pickle runs code as it loads: no check
    of the directory's YAML could make that safe, so it needs the user's word that the directory is trusted."""
    experiment = Storage(experiment_uri)
    if not experiment.exists(SPEC_FILE):
        raise TokenforgeError(
            f"--resume: {experiment.display()!r} is not a tokenforge tune experiment (no {SPEC_FILE})"
        )
    if not trust_run_config:
        raise TokenforgeError(
            f"tune --resume {experiment.display()}: resuming loads the experiment directory's Python pickles (Tune's "
            "saved state), which run code with your privileges; pass --trust-run-config if you trust this directory "
            "(e.g. you wrote it)"
        )
    data = read_yaml(experiment.read_text(SPEC_FILE), experiment.display(SPEC_FILE), "tune spec")
    spec, base = TuneSpec.model_validate(data["spec"]), check(TrainConfig.model_validate(data["base"]))
    connect_ray(base)
    tuner = tune.Tuner.restore(
        experiment.uri, trainable=trainable(spec, base, experiment.uri), resume_unfinished=True, resume_errored=True
    )
    return write_results(spec, base, fit(tuner), experiment)


def write_results(spec: TuneSpec, base: TrainConfig, results: tune.ResultGrid, experiment: Storage) -> str:
    """trials.csv + console table, best_config.yaml (a train config), objective.png."""
    metric, mode = spec.tune.metric, spec.tune.mode
    params = list(spec.search)
    rows = []
    for result in results:
        history = result.metrics_dataframe
        values = history[metric].dropna().tolist() if history is not None and metric in history else []
        rows.append(
            {
                "trial": Path(result.path).name if result.path else "",
                **{key: result.config.get(key) for key in params},
                metric: values[-1] if values else None,
                f"best {metric}": (max(values) if mode == "max" else min(values)) if values else None,
                "steps": int(history["step"].max()) if history is not None and "step" in history else 0,
                "status": "ERROR" if result.error else "TERMINATED",
            }
        )
    table = io.StringIO()
    writer = csv.DictWriter(table, fieldnames=list(rows[0]) if rows else ["trial"], lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    experiment.write_text("trials.csv", table.getvalue())
    print_table(
        [
            {
                "trial": trial_label(result.config, params),
                **{k: v for k, v in row.items() if k not in ("trial", *params)},
            }
            for result, row in zip(results, rows)
        ]
    )
    finished = [r for r in results if not r.error and r.metrics_dataframe is not None and metric in r.metrics_dataframe]
    if finished:
        best = results.get_best_result(metric=metric, mode=mode, scope="last", filter_nan_and_inf=True)
        best_config = config_with(base, best.config)
        best_config.output_dir = f"runs/{spec.tune.name}-best"
        experiment.write_text("best_config.yaml", config_to_yaml(best_config))
        print(
            f"best trial: {trial_label(best.config, params)}: {metric} {best.metrics.get(metric)}; "
            f"config: {experiment.display('best_config.yaml')}"
        )
    panels, _ = experiment_panels(experiment)  # every trial's objective, labelled by its searched values
    experiment.write_bytes("objective.png", draw(panels, f"Tune experiment {experiment.display()}"))
    print(f"results: {experiment.display()} (trials.csv, best_config.yaml, objective.png)")
    print(after_tune(experiment, experiment.child(f"{Path(best.path).name}/run") if finished else None), flush=True)
    return experiment.uri


def print_table(rows: list[dict]) -> None:
    if not rows:
        print("no trials")
        return
    cells = [[str(k) for k in rows[0]]] + [
        [f"{v:.4g}" if isinstance(v, float) else str(v) for v in r.values()] for r in rows
    ]
    widths = [max(len(row[i]) for row in cells) for i in range(len(cells[0]))]
    for row in cells:
        print("  ".join(cell.ljust(width) for cell, width in zip(row, widths)))
