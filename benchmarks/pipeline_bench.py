"""Benchmark: where a training step's time goes, for trainer.max_staleness 0, 1, 2 and 1 vs 2 rollout workers.

Each setting is one real `tokenforge train` run of the default task (a fresh local Ray), --steps steps
with no eval after step 0, no dumps and no mid-run checkpoints; the first --skip steps (start-up, warm-up)
are left out and the rest summarised by their medians from metrics.jsonl:

- step: time/step_s; samples/s and generated tokens/s over the measured steps;
- the actors' own busy seconds per step: generate (time/generate_s, the slowest rollout worker), learn
  (time/learner/total_s), sync (time/sync_s: the slowest worker's receive and load);
- what the driver waited for: rollout, reward, learn (time/*_s), and its own share
  (time/driver_overhead_frac);
- idle: the learner's (1 - learn / step) and the rollout workers' (1 - generate / step);
- step / max(generate, learn): 1.0 is perfect overlap of generation and learning.

    python benchmarks/pipeline_bench.py [--steps 40] [--settings s0 s1 s2 s0w2 s1w2] [--curves --seeds 0 1 2]

--curves: the learning curve (held-out exact match per sample) of staleness 0 and 1 over --curve-steps
steps and --seeds, plotted to docs/staleness_curve.png with the table of final values.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from default_train import DEFAULTS_BEFORE_PANEL, run_seed  # noqa: E402

STALE = ["algorithm.is_cap=2.0"]  # the truncated importance weight of off-policy samples
SETTINGS = {  # name: (label, overrides)
    "s0": ("staleness 0, 1 rollout worker", ["trainer.max_staleness=0"]),
    "s1": ("staleness 1, 1 rollout worker", ["trainer.max_staleness=1", *STALE]),
    "s2": ("staleness 2, 1 rollout worker", ["trainer.max_staleness=2", *STALE]),
    "s0w2": (
        "staleness 0, 2 rollout workers",
        ["trainer.max_staleness=0", "rollout.num_workers=2", "rollout.num_cpus_per_worker=0.25"],
    ),
    "s1w2": (
        "staleness 1, 2 rollout workers",
        ["trainer.max_staleness=1", *STALE, "rollout.num_workers=2", "rollout.num_cpus_per_worker=0.25"],
    ),
}
QUIET = [
    "trainer.dump_rollouts_every=0",
    "trainer.dump_eval=false",
    "trainer.loggers=[jsonl]",
    "data.max_eval_samples=50",
]


def measure(name: str, steps: int, skip: int, extra: list[str], workdir: Path) -> dict:
    label, overrides = SETTINGS[name]
    overrides = [
        *DEFAULTS_BEFORE_PANEL,  # the figures in docs/performance.md: 64 x 8
        *overrides,
        *QUIET,
        f"trainer.total_steps={steps}",
        f"trainer.eval_every={steps}",
        f"trainer.save_every={steps}",
        *extra,
    ]
    run_seed(0, overrides, target=2.0, workdir=workdir / name)
    records = [json.loads(line) for line in (workdir / name / "seed_0" / "metrics.jsonl").read_text().splitlines()]
    rows = [r for r in records if r["step"] > skip and "time/step_s" in r]

    def median(key: str) -> float:
        return statistics.median(r.get(key, 0.0) for r in rows)

    seconds = sum(r["time/step_s"] for r in rows)
    result = {
        "setting": label,
        "step_s": median("time/step_s"),
        "generate_s": median("time/generate_s"),
        "learn_busy_s": median("time/learner/total_s"),
        "sync_s": median("time/sync_s"),
        "wait_rollout_s": median("time/rollout_s"),
        "wait_reward_s": median("time/reward_s"),
        "wait_learn_s": median("time/learn_s"),
        "driver_overhead": median("time/driver_overhead_frac"),
        "samples_per_s": sum(r["rollout/samples"] for r in rows) / seconds,
        "tokens_per_s": sum(r["learner/tokens"] for r in rows) / seconds,
        "learner_phases": {
            k.removeprefix("time/learner/"): median(k) for k in rows[0] if k.startswith("time/learner/")
        },
    }
    result["learner_idle"] = 1 - result["learn_busy_s"] / result["step_s"]
    result["rollout_idle"] = 1 - result["generate_s"] / result["step_s"]
    result["overlap_ratio"] = result["step_s"] / max(result["generate_s"], result["learn_busy_s"])
    return result


def print_table(results: list[dict]) -> None:
    print(
        "\n| setting | step | generate | learn | sync | waits: rollout / reward / learn | driver overhead "
        "| idle: learner / rollout | step / max(gen, learn) | samples/s | tokens/s |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for r in results:
        print(
            f"| {r['setting']} | {r['step_s']:.3f} s | {r['generate_s']:.3f} s | {r['learn_busy_s']:.3f} s "
            f"| {r['sync_s'] * 1000:.0f} ms "
            f"| {r['wait_rollout_s']:.3f} / {r['wait_reward_s']:.3f} / {r['wait_learn_s']:.3f} s "
            f"| {r['driver_overhead']:.1%} "
            f"| {r['learner_idle']:.0%} / {r['rollout_idle']:.0%} | {r['overlap_ratio']:.2f} "
            f"| {r['samples_per_s']:.0f} | {r['tokens_per_s']:.0f} |"
        )
    print("\nlearner phases (median seconds per step):")
    for r in results:
        print(f"  {r['setting']}: " + ", ".join(f"{k} {v:.3f}" for k, v in r["learner_phases"].items()))


def curves(seeds: list[int], steps: int, extra: list[str], workdir: Path, plot: Path) -> None:
    """Held-out exact match vs samples for staleness 0 and 1, each seed; plotted and tabulated."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = {}
    for name in ("s0", "s1"):
        label, overrides = SETTINGS[name]
        runs[label] = [
            run_seed(
                seed,
                [
                    *DEFAULTS_BEFORE_PANEL,
                    *overrides,
                    *QUIET[:3],
                    f"trainer.total_steps={steps}",
                    "trainer.eval_every=10",
                    *extra,
                ],
                2.0,
                workdir / f"curve_{name}",
            )
            for seed in seeds
        ]
    figure, axis = plt.subplots(figsize=(6, 4))
    print("\n| setting | seeds | baseline | final held-out exact match (mean ± sd) | best | training seconds (mean) |")
    print("|---|---|---|---|---|---|")
    for (label, results), colour in zip(runs.items(), ("tab:blue", "tab:orange")):
        for i, r in enumerate(results):
            samples = [step * r["samples_per_step"] for step, _, _ in r["curve"]]
            axis.plot(samples, [v for _, _, v in r["curve"]], color=colour, alpha=0.7, label=label if i == 0 else None)
        finals = [r["final"] for r in results]
        print(
            f"| {label} | {len(results)} | {results[0]['baseline']:.3f} | {statistics.mean(finals):.3f} ± "
            f"{statistics.stdev(finals) if len(finals) > 1 else 0:.3f} | {max(r['best'] for r in results):.3f} "
            f"| {statistics.mean(r['curve'][-1][1] for r in results):.0f} s |"
        )
    axis.set(xlabel="samples", ylabel="held-out exact match (greedy)", title="default task: staleness 0 vs 1")
    axis.legend()
    figure.tight_layout()
    figure.savefig(plot, dpi=120)
    print(f"\nplot: {plot}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--settings", nargs="*", default=list(SETTINGS), choices=list(SETTINGS), help="none: only --curves"
    )
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--skip", type=int, default=5, help="first steps left out (start-up)")
    parser.add_argument("--curves", action="store_true", help="also the learning curves of staleness 0 and 1")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--curve-steps", type=int, default=150)
    parser.add_argument("--plot", type=Path, default=Path(__file__).parent.parent / "docs" / "staleness_curve.png")
    parser.add_argument("overrides", nargs="*", help="key=value for every run")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="tokenforge-pipeline-bench-") as tmp:
        results = []
        for name in args.settings:
            results.append(measure(name, args.steps, args.skip, args.overrides, Path(tmp)))
            print(json.dumps(results[-1]), flush=True)
        if results:
            print_table(results)
        if args.curves:
            curves(args.seeds, args.curve_steps, args.overrides, Path(tmp), args.plot)


if __name__ == "__main__":
    main()
