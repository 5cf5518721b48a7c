"""The one line every command ends with: where its results are and the next command to try.

A new user's first run used to end with a raw JSON dict, naming neither the run directory nor the
checkpoint; these lines name the run (its path or URI), the last published checkpoint and the
commands that read it.
"""

from __future__ import annotations

from pipeline import storage as store
from pipeline.outputs.metrics_log import TENSORBOARD
from pipeline.storage import Storage


def latest_checkpoint_text(run: Storage) -> str:
    latest = store.latest_checkpoint(run)
    return run.display(latest[0]) if latest else "none yet"


def metrics_text(record: dict) -> str:
    """`eval/exact_match 0.905` for each eval metric of a metrics record (empty without any)."""
    return ", ".join(f"{k} {v:.4g}" for k, v in record.items() if k.startswith("eval/") and isinstance(v, float))


def after_train(run: Storage, record: dict) -> str:
    where = run.display()
    step = f"step {record['step']}" if "step" in record else "no step"
    scores = metrics_text(record)
    return (
        f"tokenforge: run {where} at {step}{f' ({scores})' if scores else ''}; last checkpoint: {latest_checkpoint_text(run)}; "
        f"next: tokenforge report {where} | tokenforge samples {where} | tensorboard --logdir {run.display(TENSORBOARD)} "
        f"| tokenforge eval {where}"
    )


def after_eval(result: dict) -> str:
    """`result`: evaluate_checkpoint's (its `run` is the checkpoint's run, or None for a plain model directory)."""
    evaluated = f"tokenforge: evaluated {result['checkpoint']} on {result['eval_samples']} samples of {result['data']} ({metrics_text(result)})"
    if result["run"] is None:
        return f"{evaluated}; next: tokenforge train model.path={result['checkpoint']}"
    return f"{evaluated}; next: tokenforge samples {result['run']} --eval | tokenforge report {result['run']}"


def after_tune(experiment: Storage, best_run: Storage | None) -> str:
    where = experiment.display()
    best = f"best trial's run {best_run.display()} (last checkpoint: {latest_checkpoint_text(best_run)})" if best_run else "no finished trial"
    return (
        f"tokenforge: experiment {where}; {best}; next: tokenforge report {where} | tensorboard --logdir {where}"
        + (f" | tokenforge samples {best_run.display()}" if best_run else "")
    )


def after_report(target: Storage, is_experiment: bool) -> str:
    where = target.display()
    more = f"tensorboard --logdir {where}" if is_experiment else f"tokenforge samples {where} | tensorboard --logdir {target.display(TENSORBOARD)}"
    return f"tokenforge: wrote {target.display('report.png')} and {target.display('report.md')}; next: {more}"
