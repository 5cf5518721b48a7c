"""What the rollout and eval dumps cost on the default run, as a share of step time.

Runs the real default `tokenforge train` (or reads a finished run with --run) and sums, from its
metrics.jsonl, the time spent writing dumps: `time/dump_s` (the learner's columns fetched, the
rollout batch written as Parquet; inside `time/step_s`) and `time/eval_dump_s` (each eval's
samples written). Prints the totals, their share of all step time and of the run's elapsed time,
and the share on a dump step alone.

    python benchmarks/dump_overhead.py [--run runs/default] [key=value ...]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path


def measure(run: Path) -> dict:
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in records if "time/step_s" in r]
    dumped = [r for r in steps if "time/dump_s" in r]
    rollout_dumps = sum(r["time/dump_s"] for r in dumped)
    eval_dumps = sum(r.get("time/eval_dump_s", 0.0) for r in records)
    step_time = sum(r["time/step_s"] for r in steps)
    return {
        "steps": len(steps),
        "rollout_dumps": len(dumped),
        "eval_dumps": sum("time/eval_dump_s" in r for r in records),
        "rollout_dump_s": rollout_dumps,
        "eval_dump_s": eval_dumps,
        "step_s": step_time,
        "elapsed_s": records[-1]["time/elapsed_s"],
        "share_of_step_time": (rollout_dumps + eval_dumps) / step_time,
        "share_of_elapsed": (rollout_dumps + eval_dumps) / records[-1]["time/elapsed_s"],
        "share_on_a_dump_step": sum(r["time/dump_s"] / r["time/step_s"] for r in dumped) / max(1, len(dumped)),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", type=Path, help="a finished run to read instead of training one")
    parser.add_argument("overrides", nargs="*", help="key=value overrides of the trained run")
    args = parser.parse_args()
    run = args.run
    if run is None:
        workdir = Path(tempfile.mkdtemp(prefix="tokenforge-dump-overhead-"))
        run = workdir / "run"
        env = {**os.environ, "HOME": str(workdir), "RAY_AUTH_MODE": "token"}
        subprocess.run(
            [sys.executable, "-m", "pipeline.cli", "train", f"output_dir={run}", *args.overrides],
            check=True,
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
    result = measure(run)
    print(json.dumps(result, indent=1))
    print(
        f"dumps: {result['rollout_dumps']} rollout ({result['rollout_dump_s']:.2f} s) + {result['eval_dumps']} eval "
        f"({result['eval_dump_s']:.2f} s) = {100 * result['share_of_step_time']:.2f}% of {result['steps']} steps' time "
        f"({result['step_s']:.0f} s), {100 * result['share_of_elapsed']:.2f}% of the run's "
        f"{result['elapsed_s']:.0f} s; "
        f"{100 * result['share_on_a_dump_step']:.1f}% of a dump step"
    )


if __name__ == "__main__":
    main()
