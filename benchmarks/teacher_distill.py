"""Benchmark: `teacher_logprob` as the only reward raises the student's eval metric.

The teacher is a stronger checkpoint of the same tiny model (e.g. the last checkpoint of a default
`tokenforge train` run; made first when --teacher is not given). The student starts from the
shipped warm start and is trained with r_t = log p_teacher(y_t | prefix) alone: no answer, no
exact match in the reward. Prints the student's eval exact match before and after, per seed.

    python benchmarks/teacher_distill.py [--teacher CHECKPOINT_DIR] [--seeds 0 1] [--steps 150]
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

from default_train import DEFAULTS_BEFORE_PANEL, run_seed

from pipeline.storage import Storage, latest_checkpoint


def make_teacher(workdir: Path) -> Path:
    out = workdir / "teacher"
    env = {**os.environ, "HOME": str(workdir), "RAY_AUTH_MODE": "token"}
    subprocess.run(
        [sys.executable, "-m", "pipeline.cli", "train", f"output_dir={out}", *DEFAULTS_BEFORE_PANEL],
        check=True,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    return out / latest_checkpoint(Storage(str(out)))[0]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--teacher", type=Path)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--steps", type=int, default=150)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="tokenforge-distill-") as workdir:
        teacher = args.teacher or make_teacher(Path(workdir))
        teacher_eval = json.loads(
            subprocess.run(
                [sys.executable, "-m", "pipeline.cli", "eval", str(teacher), "--json"],
                check=True,
                capture_output=True,
                text=True,
            ).stdout
        )
        print(f"teacher {teacher}: eval/exact_match {teacher_eval['eval/exact_match']:.3f}")
        overrides = [
            *DEFAULTS_BEFORE_PANEL,  # the figures in docs/rewards.md
            f"reward.components.teacher={{type: teacher_logprob, path: '{teacher}'}}",
            "reward.weights={teacher: 1.0}",
            f"trainer.total_steps={args.steps}",
        ]
        rows = [run_seed(seed, overrides, 1.0, Path(workdir) / "student") for seed in args.seeds]
    print("\n| seed | student eval/exact_match before | after | steps | wall time |")
    print("|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['seed']} | {r['baseline']:.3f} | {r['final']:.3f} | {r['steps']} | {r['wall_s']:.0f} s |")


if __name__ == "__main__":
    main()
