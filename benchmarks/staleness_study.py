"""Benchmark: does trainer.max_staleness=1 learn as well per sample as 0, on several model/task pairs?

Each run is one real `tokenforge train` (a fresh local Ray) of a built-in model/task pair, for --steps steps
with a held-out eval every --eval-every steps; staleness 1 adds `algorithm.is_cap` (--is-cap). Each run
takes the machine's CPU lock by itself (`flock /tmp/tf-cpu.lock`, --lock), so other jobs interleave between
runs. Per run it keeps the eval curve and, per step, what explains a difference: the importance weights
(policy/is_weight/mean, policy/is_weight/clip_frac), the entropy, the learning rate, the staleness and the
reward. Writes --json and a figure (held-out metric vs samples, one panel per pair, mean and each seed).

    python benchmarks/staleness_study.py [--pairs addition chat_addition reverse llama_addition] [--seeds 0 1 2 3 4]
        [--steps 60] [--eval-every 10] [--eval-samples 200] [--is-cap 2.0] [--json OUT] [--plot PNG]
        [--llama-model DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from default_train import DEFAULTS_BEFORE_PANEL

REPO = Path(__file__).parent.parent
PAIRS = {  # name: (config file or None for the default, the eval metric compared)
    "addition": (None, "eval/exact_match"),  # the default: char-level GPT-2, exact_match + digit_match
    "chat_addition": ("examples/chat_addition.yaml", "eval/exact_match"),  # Llama, BPE, chat template
    "reverse": ("examples/reverse.yaml", "eval/digit_match"),  # GPT-2, 11-21 token answers, token-level reward
    # the default task on a model the defaults were not tuned on: a char-level tiny Llama warm-started to ~0.40
    # (scripts/make_task_model.py --task llama-addition, made once into --llama-model)
    "llama_addition": (None, "eval/exact_match"),
}
QUIET = [
    "trainer.dump_rollouts_every=0",
    "trainer.dump_eval=false",
    "trainer.loggers=[jsonl]",
    "trainer.keep_checkpoints=1",
]
DIAGNOSTICS = (
    "policy/is_weight/mean",
    "policy/is_weight/clip_frac",
    "policy/entropy",
    "policy/staleness_mean",
    "learner/lr",
    "reward/total/mean",
    "loss/grad_norm",
)


def run(pair: str, staleness: int, seed: int, args: argparse.Namespace, workdir: Path) -> dict:
    """One `tokenforge train` under the CPU lock; its eval curve and per-step diagnostics."""
    config, metric = PAIRS[pair]
    out = workdir / f"{pair}_s{staleness}_seed{seed}"
    overrides = [
        *QUIET,
        f"seed={seed}",
        f"output_dir={out}",
        f"trainer.total_steps={args.steps}",
        f"trainer.eval_every={args.eval_every}",
        f"trainer.save_every={args.steps}",
        f"data.max_eval_samples={args.eval_samples}",
        *(DEFAULTS_BEFORE_PANEL if config is None else []),  # as measured (staleness and is_cap set next)
        f"trainer.max_staleness={staleness}",
        f"algorithm.is_cap={args.is_cap if staleness else 'null'}",
        *([f"model.path={llama_model(args)}"] if pair == "llama_addition" else []),
        *args.overrides,
    ]
    command = [
        *args.lock,
        sys.executable,
        "-m",
        "pipeline.cli",
        "train",
        *(["-c", config] if config else []),
        *overrides,
    ]
    env = {**os.environ, "HOME": str(workdir), "RAY_AUTH_MODE": "token"}
    start = time.time()
    done = subprocess.run(command, env=env, cwd=REPO, capture_output=True, text=True)
    if done.returncode:
        raise SystemExit(f"run {out.name} failed:\n{done.stderr[-3000:]}")
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    samples = records[1].get("rollout/samples", 0.0)
    return {
        "pair": pair,
        "staleness": staleness,
        "seed": seed,
        "wall_s": time.time() - start,
        "metric": metric,
        "samples_per_step": samples,
        "curve": [(r["step"], r[metric]) for r in records if metric in r],
        "steps": [{"step": r["step"], **{k: r[k] for k in DIAGNOSTICS if k in r}} for r in records[1:]],
        "train_s": sum(r["time/step_s"] for r in records[1:]),
    }


def llama_model(args: argparse.Namespace) -> Path:
    """The llama_addition pair's model, made by scripts/make_task_model.py (under the lock) the first time. It is
    made beside the target and renamed into place when done: make_task_model.py saves the untrained model first,
    so a study killed during the warm start must not find it at --llama-model next time."""
    if not args.llama_model.exists():
        partial = args.llama_model.with_name(args.llama_model.name + ".partial")
        shutil.rmtree(partial, ignore_errors=True)
        command = [*args.lock, sys.executable, "scripts/make_task_model.py", "--task", "llama-addition"]
        subprocess.run([*command, "--out", str(partial)], cwd=REPO, check=True)
        partial.rename(args.llama_model)
    return args.llama_model.resolve()


def summary(runs: list[dict]) -> str:
    """A Markdown table: per pair and staleness, the metric at step 0, its minimum, at the end, and the mean IS
    stats."""
    lines = [
        "| pair | staleness | seeds | step 0 | min (mean) | final (mean ± sd) | each seed's final "
        "| IS weight mean / clip frac | training s |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for pair in dict.fromkeys(r["pair"] for r in runs):
        for staleness in (0, 1):
            group = [r for r in runs if r["pair"] == pair and r["staleness"] == staleness]
            if not group:
                continue
            finals = [r["curve"][-1][1] for r in group]
            mins = [min(v for _, v in r["curve"]) for r in group]
            steps = [s for r in group for s in r["steps"]]
            is_mean = statistics.mean(s.get("policy/is_weight/mean", 1.0) for s in steps)
            clip = statistics.mean(s.get("policy/is_weight/clip_frac", 0.0) for s in steps)
            sd = statistics.stdev(finals) if len(finals) > 1 else 0.0
            lines.append(
                f"| {pair} ({group[0]['metric']}) | {staleness} | {len(group)} | {group[0]['curve'][0][1]:.3f} | "
                f"{statistics.mean(mins):.3f} | {statistics.mean(finals):.3f} ± {sd:.3f} | "
                f"{' '.join(f'{f:.3f}' for f in finals)} | {is_mean:.3f} / {clip:.4f} | "
                f"{statistics.mean(r['train_s'] for r in group):.0f} |"
            )
    return "\n".join(lines)


def plot(runs: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    pairs = list(dict.fromkeys(r["pair"] for r in runs))
    figure, axes = plt.subplots(1, len(pairs), figsize=(5 * len(pairs), 3.6), squeeze=False)
    for axis, pair in zip(axes[0], pairs):
        for staleness, colour in ((0, "tab:blue"), (1, "tab:orange")):
            group = [r for r in runs if r["pair"] == pair and r["staleness"] == staleness]
            for r in group:
                axis.plot(
                    [s * r["samples_per_step"] for s, _ in r["curve"]],
                    [v for _, v in r["curve"]],
                    color=colour,
                    alpha=0.25,
                    lw=0.8,
                )
            if group:
                steps = [s for s, _ in group[0]["curve"]]
                mean = [statistics.mean(r["curve"][i][1] for r in group) for i in range(len(steps))]
                axis.plot(
                    [s * group[0]["samples_per_step"] for s in steps],
                    mean,
                    color=colour,
                    lw=2,
                    label=f"staleness {staleness} (mean of {len(group)})",
                )
        axis.set_title(pair)
        axis.set_xlabel("samples")
        axis.set_ylabel(runs[0]["metric"] if pair == pairs[0] else [r for r in runs if r["pair"] == pair][0]["metric"])
        axis.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=110)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pairs", nargs="+", default=list(PAIRS), choices=list(PAIRS))
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    parser.add_argument("--settings", type=int, nargs="+", default=[0, 1], help="max_staleness values to run")
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--eval-every", type=int, default=10)
    parser.add_argument("--eval-samples", type=int, default=200)
    parser.add_argument("--is-cap", type=float, default=2.0)
    parser.add_argument("--lock", nargs="*", default=["flock", "/tmp/tf-cpu.lock"], help="prefix of each run's command")
    parser.add_argument(
        "--json", type=Path, default=Path("staleness_study.json"), help="results; runs already in it are kept"
    )
    parser.add_argument("--plot", type=Path, default=None)
    parser.add_argument(
        "--llama-model", type=Path, default=Path("llama_addition_model"), help="llama_addition's model (made if absent)"
    )
    parser.add_argument("overrides", nargs="*", help="key=value overrides for every run")
    args = parser.parse_args()

    runs = json.loads(args.json.read_text()) if args.json.exists() else []
    with tempfile.TemporaryDirectory() as tmp:
        for seed in args.seeds:  # seed-major: an interrupted study still has every pair and setting for its seeds
            for pair in args.pairs:
                for staleness in args.settings:
                    if any((r["pair"], r["staleness"], r["seed"]) == (pair, staleness, seed) for r in runs):
                        continue
                    runs.append(run(pair, staleness, seed, args, Path(tmp)))
                    args.json.write_text(json.dumps(runs, indent=1))
                    print(f"{pair} staleness {staleness} seed {seed}: {runs[-1]['curve']}", flush=True)
    print(summary(runs))
    if args.plot:
        plot(runs, args.plot)


if __name__ == "__main__":
    main()
