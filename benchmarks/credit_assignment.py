"""Benchmark: token-level vs sequence-level credit on the addition task.

Runs the default `tokenforge train` per seed twice: rewards exact_match + digit_match (token-level
credit for every digit in place) and exact_match alone (one reward on the last token). Prints the
samples and wall time each needed to reach --target eval exact match (mean and spread over seeds)
and plots eval exact match against samples for every run.

    python benchmarks/credit_assignment.py [--seeds 0 1 2] [--target 0.8] [--plot docs/credit_assignment.png]
"""

import argparse
import json
import statistics
import tempfile
from pathlib import Path

import matplotlib.pyplot as plt
from default_train import run_seed

VARIANTS = {
    "exact_match + digit_match (token-level)": ["reward.weights={exact_match: 1.0, digit_match: 0.5}"],
    "exact_match only (sequence-level)": ["reward.weights={exact_match: 1.0}"],
}
SAMPLES_PER_STEP = 64 * 8  # trainer.prompts_per_step * rollout.group_size (defaults)


def spread(values: list[float]) -> str:
    if len(values) < 2:
        return f"{values[0]:.0f}" if values else "-"
    return f"{statistics.mean(values):.0f} ± {statistics.stdev(values):.0f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--target", type=float, default=0.8)
    parser.add_argument("--plot", type=Path, default=Path("docs/credit_assignment.png"))
    args = parser.parse_args()
    results = {}
    with tempfile.TemporaryDirectory(prefix="tokenforge-credit-") as workdir:
        for v, (name, overrides) in enumerate(VARIANTS.items()):
            results[name] = []
            for seed in args.seeds:
                run = run_seed(seed, overrides, args.target, Path(workdir) / f"v{v}")
                results[name].append(run)
                print(name, json.dumps({k: x for k, x in run.items() if k != "curve"}), flush=True)

    print(f"\n| rewards | runs reaching {args.target} | samples to {args.target} | seconds to {args.target} | final eval exact match |")
    print("|---|---|---|---|---|")
    for name, runs in results.items():
        hit = [r for r in runs if r["reached_step"] is not None]
        samples = [r["reached_step"] * SAMPLES_PER_STEP for r in hit]
        finals = [r["final"] for r in runs]
        final = f"{statistics.mean(finals):.3f} ± {statistics.stdev(finals):.3f}" if len(finals) > 1 else f"{finals[0]:.3f}"
        print(f"| {name} | {len(hit)}/{len(runs)} | {spread(samples)} | {spread([r['reached_s'] for r in hit])} | {final} |")

    figure, axis = plt.subplots(figsize=(7, 4.5))
    for color, (name, runs) in zip(["tab:blue", "tab:orange"], results.items()):
        for i, run in enumerate(runs):
            steps, _, values = zip(*run["curve"])
            axis.plot([s * SAMPLES_PER_STEP for s in steps], values, color=color, alpha=0.8, label=name if i == 0 else None)
    axis.axhline(args.target, color="gray", linestyle="--", linewidth=1)
    axis.set_xlabel("samples")
    axis.set_ylabel("eval/exact_match (greedy, 1000 held-out prompts)")
    axis.set_title(f"Token-level vs sequence-level credit, seeds {args.seeds}")
    axis.legend()
    figure.tight_layout()
    args.plot.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(args.plot, dpi=120)
    print(f"\nplot: {args.plot}")


if __name__ == "__main__":
    main()
