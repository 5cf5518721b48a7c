"""Benchmark: RLlib's PPO on the token environment vs `tokenforge train`, same budget of samples.

Both start from the shipped warm start of the default task (`addition`, eval exact match 0.575) with
the same rewards (exact_match 1.0 + digit_match 0.5) and are evaluated the same way: greedy exact
match on the 1,000 held-out prompts, by tokenforge's rollout worker and reward worker (for RLlib,
loaded with the RLModule's LM weights), at step 0 and every --eval-every samples. A sample is one
completion (tokenforge: prompts_per_step x group_size per step; RLlib: one episode). Arms (TOKENFORGE_ARMS):
tokenforge's default with trainer.total_steps sized to the budget (so is its lr schedule), the default with 4
PPO-clipped minibatch steps per batch, examples/critic.yaml (GAE with a critic), the same without the critic
(reinforce++: whitened returns, no baseline), and RLlib PPO. Each run is a fresh process with its own local Ray
on all cores (2 here). Prints a Markdown table and plots exact match against samples and training seconds.

    python benchmarks/rllib_baseline.py [--samples 102400] [--seeds 0 1] [--eval-every 12800]
        [--plot docs/rllib_baseline.png] [--ppo num_epochs=1 lr=5e-4 ...] [--arms tokenforge tokenforge-critic rllib]

`--ppo-run OUT` is the RLlib arm's own process (the benchmark starts it; usable alone).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml
from default_train import DEFAULTS_BEFORE_PANEL

REPO = Path(__file__).resolve().parent.parent
CRITIC = str(REPO / "examples" / "critic.yaml")
TOKENFORGE_ARMS = {  # arm: (label, config file or None for the default, overrides)
    "tokenforge": (
        "tokenforge train (the defaults before 2026-12-07: grpo, 64 prompts x 8, synchronous, 1 update per batch)",
        None,
        DEFAULTS_BEFORE_PANEL,
    ),
    "tokenforge-minibatches": (
        "those defaults + 4 PPO-clip minibatches per batch",
        None,
        [*DEFAULTS_BEFORE_PANEL, "learner.minibatches=4", "algorithm.loss=ppo_clip"],
    ),
    "tokenforge-critic": ("examples/critic.yaml (gae + critic, 256 prompts x 1, 2 minibatches x 2 passes)", CRITIC, []),
    "tokenforge-no-critic": (
        "examples/critic.yaml without the critic (reinforce++)",
        CRITIC,
        ["algorithm.estimator=reinforce++", "critic=null"],
    ),
}
ARMS = {**{arm: label for arm, (label, _, _) in TOKENFORGE_ARMS.items()}, "rllib": "RLlib PPO on the token env"}


def ppo_run(out: Path, seed: int, samples: int, eval_every: int, ppo: dict) -> None:
    """The RLlib arm: PPO until `samples` episodes, greedy eval every `eval_every`; out/metrics.jsonl
    (tokenforge's field names plus `samples`) and out/final (HF checkpoint for `tokenforge eval`)."""
    import ray
    import torch

    from pipeline.rllib.policy import GreedyEvaluator, ppo_config, save_hf_checkpoint
    from pipeline.rllib.token_env import env_train_config

    out.mkdir(parents=True, exist_ok=True)
    ray.init(num_cpus=os.cpu_count(), include_dashboard=False)
    config = env_train_config()
    evaluate = GreedyEvaluator(config)
    # the evaluator's RolloutWorker set this process to its rollout threads (1); RLlib samples and learns here,
    # so give it the threads tokenforge's learner got when docs/rllib.md was measured (2)
    torch.set_num_threads(2)
    algo = ppo_config(seed=seed, **ppo).build_algo()
    start = time.time()
    with open(out / "metrics.jsonl", "w") as log:

        def write(step: int, episodes: int, record: dict) -> None:
            state = algo.get_module().hf_state_dict()
            record = {
                "step": step,
                "samples": episodes,
                "time/elapsed_s": round(time.time() - start, 3),
                **record,
                **evaluate(state),
            }
            log.write(json.dumps(record) + "\n")
            log.flush()
            print(json.dumps(record), file=sys.stderr, flush=True)

        write(0, 0, {})
        episodes, step, next_eval = 0, 0, eval_every
        while episodes < samples:
            result = algo.train()
            step += 1
            episodes = int(result["env_runners"]["num_episodes_lifetime"])
            if episodes >= next_eval or episodes >= samples:
                learner = result["learners"]["default_policy"]
                write(
                    step,
                    episodes,
                    {
                        "reward/total/mean": float(result["env_runners"]["episode_return_mean"]),
                        "response/length_mean": float(result["env_runners"]["episode_len_mean"]),
                        "loss/policy": float(learner["policy_loss"]),
                        "loss/vf": float(learner["vf_loss"]),
                        "policy/entropy": float(learner["entropy"]),
                        "policy/kl": float(learner["mean_kl_loss"]),
                        "learner/vf_explained_var": float(learner["vf_explained_var"]),
                    },
                )
                next_eval = (episodes // eval_every + 1) * eval_every
    save_hf_checkpoint(algo.get_module(), config, out / "final")
    algo.stop()
    ray.shutdown()


def subprocess_env(workdir: Path) -> dict:
    return {**os.environ, "HOME": str(workdir), "RAY_AUTH_MODE": "token"}


def run_rllib(seed: int, samples: int, eval_every: int, ppo: list[str], workdir: Path) -> dict:
    out = workdir / f"rllib_seed_{seed}"
    command = [
        sys.executable,
        __file__,
        "--ppo-run",
        str(out),
        "--seed",
        str(seed),
        "--samples",
        str(samples),
        "--eval-every",
        str(eval_every),
        "--ppo",
        *ppo,
    ]
    start = time.time()
    with open(workdir / f"rllib_seed_{seed}.log", "w") as log:
        subprocess.run(command, check=True, env=subprocess_env(workdir), stdout=log, stderr=log)
    wall = time.time() - start
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    check = subprocess.run(
        [sys.executable, "-m", "pipeline.cli", "eval", str(out / "final"), "--json"],
        check=True,
        capture_output=True,
        text=True,
        env=subprocess_env(workdir),
    )
    return {
        "seed": seed,
        "wall_s": wall,
        "curve": [(r["samples"], r["time/elapsed_s"], r["eval/exact_match"]) for r in records],
        "tokenforge_eval_of_final": json.loads(check.stdout)["eval/exact_match"],
    }


def run_tokenforge(arm: str, seed: int, samples: int, eval_every: int, workdir: Path) -> dict:
    from default_train import run_seed

    from pipeline.preflight import load_config

    _, config_file, overrides = TOKENFORGE_ARMS[arm]
    config = load_config(config_file, overrides)
    per_step = config.trainer.prompts_per_step * config.rollout.group_size
    steps, every = samples // per_step, max(1, eval_every // per_step)  # the lr schedule spans the budget
    overrides = [*overrides, f"trainer.total_steps={steps}", f"trainer.eval_every={every}"]
    run = run_seed(seed, overrides, 2.0, workdir / arm, config=config_file)
    return {"seed": seed, "wall_s": run["wall_s"], "curve": [(s * per_step, t, v) for s, t, v in run["curve"]]}


def first_reaching(curve: list, target: float) -> tuple | None:
    return next(((n, t) for n, t, v in curve if v >= target), None)


def mean_sd(values: list[float], fmt: str = "{:.3f}") -> str:
    if not values:
        return "-"
    if len(values) == 1:
        return fmt.format(values[0])
    return f"{fmt.format(statistics.mean(values))} ± {fmt.format(statistics.stdev(values))}"


def table(results: dict[str, list[dict]], targets: list[float]) -> str:
    head = (
        "| arm | samples | eval exact match at the end | best | "
        + " | ".join(f"samples / s to {t}" for t in targets)
        + " | training s | samples/s | wall s (command) |"
    )
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for arm, runs in results.items():
        finals = [r["curve"][-1][2] for r in runs]
        cells = [
            ARMS[arm],
            mean_sd([r["curve"][-1][0] for r in runs], "{:,.0f}"),
            mean_sd(finals),
            mean_sd([max(v for _, _, v in r["curve"]) for r in runs]),
        ]
        for target in targets:
            hits = [first_reaching(r["curve"], target) for r in runs]
            reached = [h for h in hits if h]
            cell = f"{len(reached)}/{len(runs)}"
            if reached:
                cell += (
                    f": {mean_sd([h[0] for h in reached], '{:,.0f}')} / {mean_sd([h[1] for h in reached], '{:.0f}')}"
                )
            cells.append(cell)
        seconds = [r["curve"][-1][1] for r in runs]
        cells += [
            mean_sd(seconds, "{:.0f}"),
            mean_sd([r["curve"][-1][0] / r["curve"][-1][1] for r in runs], "{:.0f}"),
            mean_sd([r["wall_s"] for r in runs], "{:.0f}"),
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot(results: dict[str, list[dict]], path: Path, samples: int) -> None:
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(1, 2, figsize=(11, 4.2), sharey=True)
    colors = dict(zip(ARMS, ["tab:blue", "tab:green", "tab:purple", "tab:gray", "tab:red"]))
    for arm, runs in results.items():
        color = colors[arm]
        for i, run in enumerate(runs):
            n, t, v = zip(*run["curve"])
            label = f"{ARMS[arm]}" if i == 0 else None
            axes[0].plot(n, v, color=color, marker=".", alpha=0.8, label=label)
            axes[1].plot(t, v, color=color, marker=".", alpha=0.8, label=label)
    axes[0].set_xlabel("samples (completions)")
    axes[1].set_xlabel("training seconds (2 CPU cores, evals included)")
    axes[0].set_ylabel("eval/exact_match (greedy, 1,000 held-out)")
    for axis in axes:
        axis.grid(alpha=0.3)
    axes[0].legend(loc="lower right")
    figure.suptitle(f"addition task, shipped warm start, {samples:,} samples per run")
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=110)


def parse_ppo(items: list[str]) -> dict:
    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep:
            raise SystemExit(f"--ppo {item!r} is not key=value (e.g. num_epochs=2)")
        value = yaml.safe_load(value)
        try:
            value = float(value) if isinstance(value, str) else value  # YAML reads 5e-4 as text
        except ValueError:
            pass
        out[key] = value
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=102_400, help="completions per run (tokenforge: 512 per step)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--eval-every", type=int, default=12_800, help="samples between evals (tokenforge: 25 steps)")
    parser.add_argument("--targets", type=float, nargs="+", default=[0.8, 0.85])
    parser.add_argument("--plot", type=Path, default=Path("docs/rllib_baseline.png"))
    parser.add_argument("--arms", nargs="+", choices=list(ARMS), default=list(ARMS))
    parser.add_argument("--ppo", nargs="*", default=[], metavar="KEY=VALUE", help="ppo_config keyword arguments")
    parser.add_argument("--ppo-run", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--seed", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--keep", type=Path, help="keep run directories here (default: a temp dir)")
    args = parser.parse_args()
    if args.ppo_run:
        ppo_run(args.ppo_run, args.seed, args.samples, args.eval_every, parse_ppo(args.ppo))
        return
    parse_ppo(args.ppo)
    results: dict[str, list[dict]] = {arm: [] for arm in args.arms}
    with tempfile.TemporaryDirectory(prefix="tokenforge-rllib-") as tmp:
        workdir = args.keep or Path(tmp)
        workdir.mkdir(parents=True, exist_ok=True)
        for seed in args.seeds:
            for arm in args.arms:
                if arm == "rllib":
                    run = run_rllib(seed, args.samples, args.eval_every, args.ppo, workdir)
                else:
                    run = run_tokenforge(arm, seed, args.samples, args.eval_every, workdir)
                results[arm].append(run)
                print(arm, json.dumps(run), flush=True)
    print(f"\nPPO settings: {parse_ppo(args.ppo) or 'ppo_config defaults'}\n")
    print(table(results, args.targets))
    plot(results, args.plot, args.samples)
    print(f"\nplot: {args.plot}")


if __name__ == "__main__":
    main()
