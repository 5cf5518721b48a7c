"""Benchmark: the critic in the learner's process (critic.placement=learner) vs a Ray actor of its own (actor).

Runs `tokenforge train -c examples/critic.yaml` (the default task with the critic: 256 samples per step, 2
minibatches x 2 passes) for --steps steps with each placement and each seed, one run at a time, and prints the
mean step time and the learner's time (time/step_s, time/learner/total_s, its values and critic phases: for the
actor, the time the learner waits for it) over the steps after the first --skip, and the held-out exact match
at the last step (both placements make the same updates, so it must agree up to float rounding).

    python benchmarks/critic_placement.py [--steps 30] [--seeds 0 1] [KEY=VALUE ...]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from default_train import run_seed  # noqa: E402

CONFIG = str(Path(__file__).resolve().parent.parent / "examples" / "critic.yaml")
PHASES = ["time/step_s", "time/learner/total_s", "time/learner/values_s", "time/learner/critic_s"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--skip", type=int, default=3, help="leave out the first steps (start-up)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args()
    print("| placement | seed | " + " | ".join(p.removeprefix("time/") for p in PHASES) + " | final exact match |")
    print("|---" * (len(PHASES) + 3) + "|")
    with tempfile.TemporaryDirectory(prefix="tokenforge-placement-") as tmp:
        for seed in args.seeds:
            for placement in ("learner", "actor"):
                workdir = Path(tmp) / placement
                workdir.mkdir(exist_ok=True)
                overrides = [f"trainer.total_steps={args.steps}", f"critic.placement={placement}", *args.overrides]
                run = run_seed(seed, overrides, 1.0, workdir, config=CONFIG)
                lines = (workdir / f"seed_{seed}" / "metrics.jsonl").read_text().splitlines()
                steps = [r for r in map(json.loads, lines) if r["step"] > args.skip]
                means = [statistics.mean(r.get(p, 0.0) for r in steps) for p in PHASES]
                print(
                    f"| {placement} | {seed} | " + " | ".join(f"{m:.3f}" for m in means) + f" | {run['final']:.3f} |",
                    flush=True,
                )


if __name__ == "__main__":
    main()
