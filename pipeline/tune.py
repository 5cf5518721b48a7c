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
import hashlib
import json
import os
import shutil
from pathlib import Path
from typing import Any

import yaml
from ray import tune

from pipeline import checkpoint, run_paths
from pipeline.config import TrainConfig, config_with, save_config
from pipeline.errors import TokenforgeError
from pipeline.trainer import actor_bundles, connect_ray, learner_gpus, train
from pipeline.tune_spec import TuneSpec, load_spec, param_space, scheduler, searcher

SPEC_FILE = "tokenforge_tune.yaml"  # spec + resolved base config, kept in the experiment dir for --resume
RESTORES_FILE = "restores.jsonl"  # one line per trial start from a checkpoint (PBT exploit or retry)


def trial_resources(config: TrainConfig, driver_cpus: float) -> tune.PlacementGroupFactory:
    """Bundle 0: the trial's driver; then the learner, each rollout worker, each reward worker."""
    return tune.PlacementGroupFactory([{"CPU": driver_cpus}, *actor_bundles(config)])


def run_trial(params: dict[str, Any], base: dict) -> None:
    """One trial: the base config with this trial's params, trained with reports to Tune."""
    config = config_with(TrainConfig.model_validate(base), params)
    trial_dir = Path(tune.get_context().get_trial_dir())
    out = trial_dir / "run"
    config.output_dir = str(out)
    restored = tune.get_checkpoint()
    if restored:
        with restored.as_directory() as source:
            state = checkpoint.read_trainer_state(Path(source))
            shutil.rmtree(checkpoint.checkpoint_root(out), ignore_errors=True)  # only the restored state counts
            target = checkpoint.checkpoint_root(out) / f"step_{state['step']}"
            shutil.copytree(source, target)
        weights = hashlib.sha256((target / "model.safetensors").read_bytes()).hexdigest()
        with open(trial_dir / RESTORES_FILE, "a") as f:
            record = {"step": state["step"], "params": params, "model_sha256": weights, "source": restored.path}
            f.write(json.dumps(record) + "\n")
    elif out.exists():
        shutil.rmtree(out)  # a retry with nothing to restore starts over

    def report(record: dict, saved: Path | None) -> None:
        tune.report(record, checkpoint=tune.Checkpoint.from_directory(str(saved)) if saved else None)

    train(config, resume=restored is not None, report=report)


def trainable(spec: TuneSpec, base: TrainConfig):
    """The trial function with the base config bound and resources from each trial's own config."""
    return tune.with_resources(
        tune.with_parameters(run_trial, base=base.model_dump(mode="json")),
        lambda params: trial_resources(config_with(base, params), spec.tune.driver_cpus),
    )


def run(spec_path: str, overrides: list[str] = ()) -> Path:
    """Validate the spec, run the experiment, write the results; returns the results dir."""
    spec, base = load_spec(spec_path, overrides)
    connect_ray(base)
    base = config_with(base, {"learner.num_gpus": learner_gpus(base)})  # trials and bundles agree on GPUs
    block = spec.tune
    remote = run_paths.is_uri(block.storage_path)  # s3://, gs://: Tune writes there; our summary files stay local
    if not remote:  # inside a Ray job a relative storage_path goes under the output root, with a fresh name if taken
        chosen = Path(run_paths.resolve_new(str(Path(block.storage_path) / block.name), Path.exists, "tune.storage_path/tune.name"))
        block.storage_path, block.name = str(chosen.parent.resolve()), chosen.name
    storage = block.storage_path
    experiment = Path("tune_results" if remote else storage) / block.name
    if not remote and experiment.exists():
        raise TokenforgeError(f"tune experiment {str(experiment)!r} exists; resume it with --resume or set tune.name")
    experiment.mkdir(parents=True, exist_ok=True)
    (experiment / SPEC_FILE).write_text(yaml.safe_dump({"spec": spec.model_dump(mode="json"), "base": base.model_dump(mode="json")}))
    os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")  # the classic table, trimmed by the reporter below
    tuner = tune.Tuner(
        trainable(spec, base),
        param_space=param_space(spec),
        tune_config=tune.TuneConfig(
            metric=block.metric,
            mode=block.mode,
            num_samples=block.num_samples,
            max_concurrent_trials=block.max_concurrent_trials,
            search_alg=searcher(spec),
            scheduler=scheduler(spec),
        ),
        run_config=run_config(spec, storage),
    )
    return write_results(spec, base, tuner.fit(), experiment)


def run_config(spec: TuneSpec, storage: str) -> tune.RunConfig:
    block = spec.tune
    return tune.RunConfig(
        name=block.name,
        storage_path=storage,
        failure_config=tune.FailureConfig(max_failures=block.max_failures),
        checkpoint_config=tune.CheckpointConfig(num_to_keep=block.num_to_keep),
        progress_reporter=tune.CLIReporter(
            parameter_columns=list(spec.search),
            metric_columns=["step", block.metric, "reward/total/mean", "throughput/samples_per_s"],
            max_report_frequency=30,
        ),
    )


def resume(experiment_dir: str) -> Path:
    """Continue an interrupted experiment (unfinished and errored trials)."""
    experiment = Path(experiment_dir).resolve()
    saved = experiment / SPEC_FILE
    if not saved.is_file():
        raise TokenforgeError(f"--resume: {str(experiment)!r} is not a tokenforge tune experiment (no {SPEC_FILE})")
    data = yaml.safe_load(saved.read_text())
    spec, base = TuneSpec.model_validate(data["spec"]), TrainConfig.model_validate(data["base"])
    connect_ray(base)
    tuner = tune.Tuner.restore(str(experiment), trainable=trainable(spec, base), resume_unfinished=True, resume_errored=True)
    return write_results(spec, base, tuner.fit(), experiment)


def write_results(spec: TuneSpec, base: TrainConfig, results: tune.ResultGrid, experiment: Path) -> Path:
    """trials.csv + console table, best_config.yaml (a train config), objective.png."""
    metric, mode = spec.tune.metric, spec.tune.mode
    params = list(spec.search)
    rows = []
    for result in results:
        history = result.metrics_dataframe
        values = history[metric].dropna().tolist() if history is not None and metric in history else []
        rows.append(
            {
                "trial": Path(result.path).name,
                **{key: result.config.get(key) for key in params},
                metric: values[-1] if values else None,
                f"best {metric}": (max(values) if mode == "max" else min(values)) if values else None,
                "steps": int(history["step"].max()) if history is not None and "step" in history else 0,
                "status": "ERROR" if result.error else "TERMINATED",
            }
        )
    with open(experiment / "trials.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]) if rows else ["trial"])
        writer.writeheader()
        writer.writerows(rows)
    print_table(rows)
    finished = [r for r in results if not r.error and r.metrics_dataframe is not None and metric in r.metrics_dataframe]
    if finished:
        best = results.get_best_result(metric=metric, mode=mode, scope="last", filter_nan_and_inf=True)
        best_config = config_with(base, best.config)
        best_config.output_dir = f"runs/{spec.tune.name}-best"
        save_config(best_config, experiment / "best_config.yaml")
        print(f"best trial {Path(best.path).name}: {metric} {best.metrics.get(metric)}; config: {experiment / 'best_config.yaml'}")
    plot_objective(results, metric, experiment / "objective.png")
    print(f"results: {experiment} (trials.csv, best_config.yaml, objective.png)")
    return experiment


def print_table(rows: list[dict]) -> None:
    if not rows:
        print("no trials")
        return
    cells = [[str(k) for k in rows[0]]] + [[f"{v:.4g}" if isinstance(v, float) else str(v) for v in r.values()] for r in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(cells[0]))]
    for row in cells:
        print("  ".join(cell.ljust(width) for cell, width in zip(row, widths)))


def plot_objective(results: tune.ResultGrid, metric: str, path: Path) -> None:
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(7, 4.5))
    for result in results:
        history = result.metrics_dataframe
        if history is not None and metric in history:
            points = history[["step", metric]].dropna()
            axis.plot(points["step"], points[metric], marker="o", markersize=3, label=Path(result.path).name[-24:])
    axis.set_xlabel("training step")
    axis.set_ylabel(metric)
    axis.legend(fontsize=7)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)

