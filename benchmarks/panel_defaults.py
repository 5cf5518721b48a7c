"""Benchmark: tokenforge's defaults on a panel of model/task pairs, against TRL's GRPOTrainer at its best lr.

The panel (the pairs differ in architecture, tokenizer and task; target = held-out greedy exact match):

| pair          | model                                       | tokenizer                                | target |
|---------------|---------------------------------------------|------------------------------------------|--------|
| addition      | shipped char-level GPT-2 (0.8M)             | one character per token                  | 0.80   |
| chat_addition | shipped Llama (1M; RoPE, RMSNorm, SwiGLU)   | byte-level BPE with a chat template      | 0.75   |
| sort          | GPT-NeoX (0.86M), made by make_task_model   | SentencePiece-style Unigram              | 0.55   |

(sort's target was 0.60 in the first screen: 0.41 at step 0 on these 200 prompts, and tokenforge's runs levelled
off at 0.56-0.59 without reaching it in 300 steps, so the target became 0.55; a run's summary is computed
again from its eval curve for the pair's target whenever the tables are printed.)

Each run is one `benchmarks/vs_trl.py` run (its matched evals, rewards and timing rules; exact_match only):
TRL's GRPOTrainer at each of --trl-lrs with vs_trl.py's settings (64 prompts x 8, tokenforge's lr schedule over
--max-steps), tokenforge with an arm's settings on top of the defaults before the switch this panel decided
(`old_default`: 64 prompts x 8, synchronous; the arms below are the bounded grid the defaults were chosen from;
`default`: the shipped defaults as they are now, `staleness1_groups4` since 2026-12-07). Both stop at their
first eval at or above the target, so that a run costs only its time to the target (a run that never reaches it
runs to the end).
Runs already in --json are kept and not run again, so the panel can be run a stage at a time.

    python benchmarks/panel_defaults.py --json benchmarks/results/DATE-panel_defaults.json
        [--pairs addition chat_addition sort] [--arms old_default ...] [--seeds 0] [--trl-lrs 2.5e-4 5e-4 1e-3]
        [--sort-model DIR]   # made with scripts/make_task_model.py --task sort if missing

Needs TRL: `pip install -c constraints.txt -e '.[bench]'`. Prints a table per pair with each arm's time and
completions to the target and their ratio to TRL's at its best lr (mean over the seeds; a seed that misses
the target counts as the whole run's time, and the ratio is then a lower bound, marked >=). The protocol of
docs/performance.md: a screen of every arm and --trl-lrs at seed 0, then the two best arms and TRL's best lr
with --seeds 1 2; TRL's best lr is then the one with the most seeds.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
import vs_trl  # noqa: E402
from default_train import DEFAULTS_BEFORE_PANEL  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
ASSETS = ROOT / "pipeline" / "assets"

PAIRS = {  # name: (model dir, or None for the default/--sort-model; data dir, or None for the default; target)
    "addition": (None, None, 0.80),
    "chat_addition": (ASSETS / "chat_addition" / "model", ASSETS / "chat_addition", 0.75),
    "sort": (None, ASSETS / "sort", 0.55),
}

# One sample per prompt, a shared-baseline estimator and 2 clipped minibatches x 2 passes: the update that
# examples/critic.yaml uses (docs/rllib.md), without the critic.
PPO_SHAPE = [
    "algorithm.estimator=reinforce++",
    "rollout.group_size=1",
    "trainer.prompts_per_step=256",
    "algorithm.loss=ppo_clip",
    "learner.minibatches=2",
    "learner.updates_per_batch=2",
]
STALENESS1_GROUPS4 = ["trainer.max_staleness=1", "algorithm.is_cap=2.0", "rollout.group_size=4"]
ARMS = {  # each arm's overrides on top of the defaults before the switch (the grid they were chosen from)
    arm: [*DEFAULTS_BEFORE_PANEL, *overrides]
    for arm, overrides in {
        "old_default": [],  # 64 prompts x 8, synchronous
        "staleness1": ["trainer.max_staleness=1", "algorithm.is_cap=2.0"],
        "grpo_minibatches": ["algorithm.loss=ppo_clip", "learner.minibatches=2", "learner.updates_per_batch=2"],
        "ppo_shape": PPO_SHAPE,
        "ppo_shape_staleness1": [*PPO_SHAPE, "trainer.max_staleness=1"],
        "ppo_shape_lr1e-3": [*PPO_SHAPE, "learner.lr=1e-3"],
        "staleness2": ["trainer.max_staleness=2", "algorithm.is_cap=2.0"],
        "staleness1_groups4": [*STALENESS1_GROUPS4, "trainer.prompts_per_step=128"],  # the defaults since 2026-12-07
        "staleness1_groups4_64": [*STALENESS1_GROUPS4, "trainer.prompts_per_step=64"],  # half the samples per step
        "staleness1_groups4_96": [*STALENESS1_GROUPS4, "trainer.prompts_per_step=96"],
        "groups4": ["rollout.group_size=4", "trainer.prompts_per_step=128"],  # staleness1_groups4, synchronous
        "staleness1_groups4_lr1e-3": [*STALENESS1_GROUPS4, "trainer.prompts_per_step=128", "learner.lr=1e-3"],
    }.items()
} | {"default": []}  # the shipped defaults, whatever they are now


def pair_args(name: str, args: argparse.Namespace, overrides: list[str]) -> argparse.Namespace:
    """vs_trl.py's arguments for one pair and one tokenforge arm."""
    model, data, target = PAIRS[name]
    if name == "sort":
        model = args.sort_model
    return argparse.Namespace(
        model=model,
        train_file=data / "train.jsonl" if data else None,
        eval_file=data / "eval.jsonl" if data else None,
        target=target,
        max_steps=args.max_steps,
        eval_every=args.eval_every,
        eval_samples=args.eval_samples,
        prompts_per_step=64,
        threads=2,
        tokenforge_defaults=True,
        tokenforge_overrides=overrides,
        stop_at_target=True,
        trl_stock_positions=False,
    )


def key(run: dict) -> str:
    return f"{run['pair']}|{run['arm']}|{run['seed']}"


def run_all(args: argparse.Namespace, done: dict[str, dict]) -> None:
    for pair in args.pairs:
        workdir = args.keep / pair
        workdir.mkdir(parents=True, exist_ok=True)
        jobs = [(a, "tokenforge", None) for a in args.arms] + [(f"trl_lr{lr:g}", "trl", lr) for lr in args.trl_lrs]
        for seed in args.seeds:
            for arm, system, lr in jobs:
                if f"{pair}|{arm}|{seed}" in done:
                    continue
                run_args = pair_args(pair, args, ARMS.get(arm, []))
                (workdir / arm).mkdir(exist_ok=True)
                if system == "trl":
                    run = vs_trl.run_trl(run_args, "exact", lr, seed, workdir / arm)
                else:
                    run = vs_trl.run_tokenforge(run_args, "exact", None, seed, workdir / arm)
                run.update(pair=pair, arm=arm, target=run_args.target, summary=vs_trl.summarize(run, run_args.target))
                run.pop("trl_log", None)
                done[key(run)] = run
                print(json.dumps({k: run[k] for k in ("pair", "arm", "seed", "wall_s", "summary")}), flush=True)
                args.json.write_text(json.dumps(list(done.values()), indent=1, default=str))


def cost(run: dict) -> tuple[float, float]:
    """(training seconds, completions) to the target; a run that missed it counts its whole length."""
    s, last = run["summary"], run["curve"][-1]
    if s["reached"]:
        return s["time_s"], s["samples"]
    return last["train_s"], last["step"] * run["samples_per_step"]


def tables(runs: list[dict]) -> str:
    out = []
    for r in runs:  # against the pair's target as it is now
        r["target"] = PAIRS[r["pair"]][2]
        r["summary"] = vs_trl.summarize(r, r["target"])
    for pair in dict.fromkeys(r["pair"] for r in runs):
        by_arm: dict[str, list[dict]] = {}
        for r in runs:
            if r["pair"] == pair:
                by_arm.setdefault(r["arm"], []).append(r)

        def mean_time(arm: str) -> float:
            return statistics.mean(cost(r)[0] for r in by_arm[arm])

        trl = [a for a in by_arm if a.startswith("trl_")]
        # TRL's best lr: the one run with the most seeds (the screen's best, run again with more seeds; a one-seed
        # mean is not compared with a three-seed one), then the fewest misses, then the shortest mean time
        rank = {a: (-len(by_arm[a]), sum(not r["summary"]["reached"] for r in by_arm[a]), mean_time(a)) for a in trl}
        best_trl = min(trl, key=rank.get) if trl else None
        trl_time = mean_time(best_trl) if trl else None
        target = by_arm[next(iter(by_arm))][0]["target"]
        out += [
            f"### {pair} (target {target})",
            "",
            f"| arm | seeds (reached) | time to {target} (s) | completions to {target} | completions/s "
            "| ratio to TRL's time (best lr) |",
            "|---|---|---|---|---|---|",
        ]
        for arm, rs in sorted(by_arm.items(), key=lambda kv: mean_time(kv[0])):
            times, samples = zip(*map(cost, rs))
            missed = any(not r["summary"]["reached"] for r in rs)
            rate = [s["completions_per_s"] for s in (r["summary"] for r in rs) if s["completions_per_s"]]
            ratio = "" if trl_time is None else f"{'>=' if missed else ''}{mean_time(arm) / trl_time:.2f}"
            name = f"**{arm}** (best TRL lr)" if arm == best_trl else arm
            out.append(
                f"| {name} | {len(rs)} ({sum(r['summary']['reached'] for r in rs)}) | {vs_trl.mean_sd(list(times))} "
                f"| {vs_trl.mean_sd(list(samples), '{:,.0f}')} | {vs_trl.mean_sd(rate, '{:.0f}')} | {ratio} |"
            )
        out.append("")
    return "\n".join(out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pairs", nargs="+", choices=list(PAIRS), default=list(PAIRS))
    parser.add_argument("--arms", nargs="*", choices=list(ARMS), default=["default"])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--trl-lrs", type=float, nargs="*", default=[2.5e-4, 5e-4, 1e-3])
    parser.add_argument("--max-steps", type=int, default=300, help="TRL's steps (and lr schedule) per run")
    parser.add_argument("--eval-every", type=int, default=10, help="steps between evals (each system's steps)")
    parser.add_argument("--eval-samples", type=int, default=200)
    parser.add_argument("--sort-model", type=Path, default=Path("runs/panel/sort_model"))
    parser.add_argument("--keep", type=Path, default=Path("runs/panel"), help="run directories and logs")
    parser.add_argument("--json", type=Path, required=True, help="every run; runs already in it are not redone")
    parser.add_argument("--table-only", action="store_true", help="print the tables of --json and stop")
    args = parser.parse_args()
    done = {key(r): r for r in json.loads(args.json.read_text())} if args.json.exists() else {}
    if not args.table_only:
        if "sort" in args.pairs and not (args.sort_model / "config.json").exists():
            make = [sys.executable, str(ROOT / "scripts" / "make_task_model.py"), "--task", "sort"]
            subprocess.run([*make, "--out", str(args.sort_model)], check=True)
        args.json.parent.mkdir(parents=True, exist_ok=True)
        run_all(args, done)
    print(tables(list(done.values())))


if __name__ == "__main__":
    main()
