"""Checkpoint layout: output_dir/checkpoints/step_<N>/ = HF model + tokenizer + learner and trainer state.

A checkpoint is written into `step_<N>.partial/` and renamed into place only when complete, so
a crash never leaves a half-written `step_<N>/` behind.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path

from pipeline.errors import TokenforgeError

TRAINER_STATE = "trainer_state.json"
STEP_DIR = re.compile(r"^step_(\d+)$")


def checkpoint_root(output_dir: Path) -> Path:
    return output_dir / "checkpoints"


def partial_dir(output_dir: Path, step: int) -> Path:
    path = checkpoint_root(output_dir) / f"step_{step}.partial"
    shutil.rmtree(path, ignore_errors=True)
    path.mkdir(parents=True)
    return path


def finish(partial: Path, trainer_state: dict) -> Path:
    """Write the trainer state and move the completed checkpoint into place."""
    (partial / TRAINER_STATE).write_text(json.dumps(trainer_state, indent=1))
    final = partial.with_suffix("")
    shutil.rmtree(final, ignore_errors=True)
    os.replace(partial, final)
    return final


def latest(output_dir: Path) -> Path | None:
    root = checkpoint_root(output_dir)
    steps = [(int(m.group(1)), p) for p in root.glob("step_*") if (m := STEP_DIR.match(p.name))] if root.is_dir() else []
    return max(steps)[1] if steps else None


def read_trainer_state(checkpoint: Path) -> dict:
    path = checkpoint / TRAINER_STATE
    if not path.is_file():
        raise TokenforgeError(f"{str(checkpoint)!r} is not a tokenforge checkpoint (no {TRAINER_STATE})")
    return json.loads(path.read_text())
