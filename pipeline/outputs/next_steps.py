"""The one line every command ends with: where its results are and the next command to try.

A new user's first run used to end with a raw JSON dict, naming neither the run directory nor the
checkpoint; these lines name the run (its path or URI), the last published checkpoint and the
commands that read it. The commands are written as the user's shell can run them: the README's first command
runs `.venv/bin/tokenforge` without activating the venv, so a bare `tokenforge` would not be found there.
"""

from __future__ import annotations

import os
import shutil
import sysconfig
from pathlib import Path

from pipeline import storage as store
from pipeline.outputs.metrics_log import TENSORBOARD
from pipeline.storage import Storage


def program(name: str) -> str:
    """How to run this installation's console script `name` (`tokenforge`, `tensorboard`) from the user's shell:
    the bare name when PATH finds this installation's, else its path (relative under the working directory:
    `.venv/bin/tokenforge`)."""
    script = Path(sysconfig.get_path("scripts")) / name
    found = shutil.which(name)
    if not script.exists() or (found is not None and os.path.samefile(found, script)):
        return name
    return str(script.relative_to(Path.cwd())) if script.is_relative_to(Path.cwd()) else str(script)


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
    tf, tensorboard = program("tokenforge"), program("tensorboard")
    return (
        f"tokenforge: run {where} at {step}{f' ({scores})' if scores else ''}; "
        f"last checkpoint: {latest_checkpoint_text(run)}; "
        f"next: {tf} report {where} | {tf} samples {where} | {tensorboard} --logdir {run.display(TENSORBOARD)} "
        f"| {tf} eval {where}"
    )


def after_eval(result: dict) -> str:
    """`result`: evaluate_checkpoint's (its `run` is the checkpoint's run, or None for a plain model directory)."""
    evaluated = (
        f"tokenforge: evaluated {result['checkpoint']} on {result['eval_samples']} samples of {result['data']} "
        f"({metrics_text(result)})"
    )
    tf = program("tokenforge")
    if result["run"] is None:
        return f"{evaluated}; next: {tf} train model.path={result['checkpoint']}"
    return f"{evaluated}; next: {tf} samples {result['run']} --eval | {tf} report {result['run']}"


def after_export(checkpoint: str, out: Path, adapter: bool, merge: bool) -> str:
    """`adapter`: the checkpoint holds a LoRA adapter (written as it is unless `merge`)."""
    tf = program("tokenforge")
    if adapter and not merge:
        merged = f"{tf} export {checkpoint} {out}-merged --merge"
        return f"tokenforge: wrote {out}, the LoRA adapter of {checkpoint}; next: {tf} eval {out} | {merged}"
    what = "a plain HF model with the LoRA adapter merged" if adapter else "a plain HF model"
    return f"tokenforge: wrote {out}, {what} from {checkpoint}; next: {tf} eval {out} | {tf} train model.path={out}"


def after_tune(experiment: Storage, best_run: Storage | None) -> str:
    where = experiment.display()
    best = (
        f"best trial's run {best_run.display()} (last checkpoint: {latest_checkpoint_text(best_run)})"
        if best_run
        else "no finished trial"
    )
    tf = program("tokenforge")
    return (
        f"tokenforge: experiment {where}; {best}; next: {tf} report {where} | {program('tensorboard')} --logdir {where}"
        + (f" | {tf} samples {best_run.display()}" if best_run else "")
    )


def after_report(target: Storage, is_experiment: bool) -> str:
    where = target.display()
    tensorboard = f"{program('tensorboard')} --logdir {where if is_experiment else target.display(TENSORBOARD)}"
    more = tensorboard if is_experiment else f"{program('tokenforge')} samples {where} | {tensorboard}"
    return f"tokenforge: wrote {target.display('report.png')} and {target.display('report.md')}; next: {more}"
