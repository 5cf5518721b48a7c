"""Study: token-level vs sequence-level credit for the same reward, on the built-in tasks (docs/credit.md).

For each task, each arm (a reward given at sequence or token level, same total scale) runs the real
`tokenforge train` once per seed with the same budget of samples, one run at a time. Per arm it reports,
as mean and 95% confidence interval over seeds (Student t): samples and seconds to the task's target,
the area under the eval curve (the mean eval value over the budget, trapezoids over samples), and the
final eval value; it plots every arm's mean curve with its confidence band per task, and writes every
run's eval records to a JSON file from which `--from-json` redraws the tables and plots.

    python benchmarks/credit_assignment.py [--tasks reverse summarize addition captioning] [--seeds 0 1 2 3 4]
        [--failure-modes] [--out docs/credit] [--overrides key=value ...]   # the overrides go to every run

Runs that never reach the target are counted at the budget (a lower bound: "censored") and flagged.
"""

import argparse
import json
import math
import statistics
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import matplotlib.pyplot as plt
from default_train import DEFAULTS_BEFORE_PANEL, SYNCHRONOUS, run_seed
from scipy.stats import t as student_t


@dataclass
class Task:
    config: str | None  # example config (None = the default run, the addition task)
    metric: str  # the eval metric the target is on
    target: float
    arms: dict[str, list[str]]  # name -> reward overrides
    failure_modes: dict[str, list[str]] = field(default_factory=dict)  # extra arms of --failure-modes
    also: list[str] = field(default_factory=list)  # other eval metrics to report
    # the settings under every arm; None: those of the time docs/credit.md's runs were made (the defaults before
    # the panel for the default run, synchronous for an example config)
    settings: list[str] | None = None


def weights(**w: float) -> str:
    return "reward.weights={" + ", ".join(f"{k}: {v}" for k, v in w.items()) + "}"


# The same rewards with a learned per-token value baseline instead of the group's (GAE with lam = 1: A_t = G_t -
# V(s_t), whitened; a critic initialised from the policy), everything else as the task's config
CRITIC = ["algorithm.estimator=gae"]
# The same partial-credit reward at sequence and at token level isolates the placement of credit; exact match
# (sequence) against the two tells what partial credit adds.
CHAR_ARMS = {
    "sequence: exact_match": [weights(exact_match=1.0)],
    "sequence: digit_match summed": [weights(digit_match=1.0), "reward.components.digit_match={level: sequence}"],
    "token: digit_match": [weights(digit_match=1.0)],
}
CHAR_CRITIC_ARMS = {
    "critic, sequence: digit_match summed": [*CHAR_ARMS["sequence: digit_match summed"], *CRITIC],
    "critic, token: digit_match": [*CHAR_ARMS["token: digit_match"], *CRITIC],
    # an untrained critic (V = 0) leaves token-level returns uncentred per position (early tokens carry more of
    # the answer's reward), which whitening over the batch turns into a bias by position: 10 steps of critic only
    "critic pretrained 10 steps, token: digit_match": [
        *CHAR_ARMS["token: digit_match"],
        *CRITIC,
        "critic.pretrain_steps=10",
    ],
    "critic pretrained 10 steps, sequence: digit_match summed": [
        *CHAR_ARMS["sequence: digit_match summed"],
        *CRITIC,
        "critic.pretrain_steps=10",
    ],
}
TASKS = {
    "reverse": Task(
        "examples/reverse.yaml",
        "eval/exact_match",
        0.35,
        CHAR_ARMS | CHAR_CRITIC_ARMS,
        failure_modes={
            # order-blind partial credit: right characters in the wrong order still earn the unigram matches
            "token: chrf": [weights(chrf=1.0), "reward.components.chrf={level: token, column: answer}"],
            "token: digit_match, gamma 0.9": [weights(digit_match=1.0), "algorithm.gamma=0.9"],
            # gamma 0: each token is credited with its own reward only, not with the mistakes after it
            "token: digit_match, gamma 0": [weights(digit_match=1.0), "algorithm.gamma=0"],
            # grpo divides each position's advantages by that position's std over the group, which turns
            # small differences in the returns of near-certain tokens into unit-sized advantages; rloo does not
            "token: digit_match, rloo": [weights(digit_match=1.0), "algorithm.estimator=rloo"],
            "sequence: digit_match summed, rloo": [
                weights(digit_match=1.0),
                "reward.components.digit_match={level: sequence}",
                "algorithm.estimator=rloo",
            ],
        },
        also=["eval/digit_match", "eval/chrf"],
    ),
    "summarize": Task(
        "examples/summarize.yaml",
        "eval/exact_match",
        0.93,
        {
            "sequence: rougeL": [weights(rouge=1.0), "reward.components.rouge={level: sequence}"],
            "token: rougeL": [weights(rouge=1.0), "reward.components.rouge={level: token}"],
            "critic, sequence: rougeL": [weights(rouge=1.0), "reward.components.rouge={level: sequence}", *CRITIC],
            "critic, token: rougeL": [weights(rouge=1.0), "reward.components.rouge={level: token}", *CRITIC],
        },
        also=["eval/rouge"],
    ),
    "addition": Task(
        None,
        "eval/exact_match",
        0.85,
        CHAR_ARMS | {"exact_match + 0.5 digit_match (the default run)": [weights(exact_match=1.0, digit_match=0.5)]},
        also=["eval/digit_match"],
    ),
    # docs/captioning.md: SCST's greedy baseline against the group baselines, CIDEr-D per sequence or per token
    "captioning": Task(
        "examples/captioning.yaml",
        "eval/cider",
        2.3,  # +10% over the warm start's 2.086
        {
            f"{estimator}, {level}: cider": [
                f"algorithm.estimator={estimator}",
                f"reward.components.cider={{level: {level}}}",
            ]
            for estimator in ("self_critical", "grpo", "rloo")
            for level in ("sequence", "token")
        },
        also=["eval/bleu4", "eval/rouge"],
        settings=[],  # the example's own (the defaults of 2026-12-07 on)
    ),
}


def mean_ci(values: list[float]) -> tuple[float, float]:
    """Mean and the half-width of its 95% confidence interval, t_{0.975, n-1} * s / sqrt(n)."""
    if len(values) < 2:
        return (values[0] if values else math.nan), math.nan
    return statistics.mean(values), student_t.ppf(0.975, len(values) - 1) * statistics.stdev(values) / math.sqrt(
        len(values)
    )


def area_under_curve(points: list[tuple[float, float]], budget: float) -> float:
    """(1 / budget) * integral of the eval value over samples 0..budget (trapezoids; the last value carried on
    to the budget): the mean eval value over the budget."""
    if len(points) < 2:
        return points[0][1]
    points = points + [(budget, points[-1][1])] if points[-1][0] < budget else points
    return sum((x1 - x0) * (y0 + y1) / 2 for (x0, y0), (x1, y1) in zip(points, points[1:])) / budget


def reached(target: float, run: dict) -> tuple[int, float] | None:
    """(step, seconds) of the run's first eval at or above `target` that the next eval confirms (one eval on
    500 prompts has a standard error of ~0.02, so a single touch is not counted); None: never."""
    curve = run["curve"]
    return next(
        (
            (step, seconds)
            for (step, seconds, value), (_, _, after) in zip(curve, curve[1:])
            if min(value, after) >= target
        ),
        None,
    )


def summarise(task: Task, runs: list[dict]) -> dict:
    budget = max(r["steps"] * r["samples_per_step"] for r in runs)
    hits = [reached(task.target, r) for r in runs]
    return {
        "reached": sum(hit is not None for hit in hits),
        "runs": len(runs),
        "samples": [hit[0] * r["samples_per_step"] if hit else budget for hit, r in zip(hits, runs)],
        "seconds": [hit[1] for hit in hits if hit],
        "auc": mean_ci(
            [area_under_curve([(s * r["samples_per_step"], v) for s, _, v in r["curve"]], budget) for r in runs]
        ),
        "final": mean_ci([r["final"] for r in runs]),
        **{m: mean_ci([r["evals"][-1].get(m, math.nan) for r in runs]) for m in task.also},
    }


def show(value: tuple[float, float], digits: int = 3) -> str:
    mean, half = value
    return "-" if math.isnan(mean) else f"{mean:.{digits}f}" + ("" if math.isnan(half) else f" ± {half:.{digits}f}")


def to_target(values: list[float], reached: int, runs: int, unit: str = "") -> str:
    """Mean ± CI when every run reached the target; else, for samples (the runs that did not reach it count
    at the budget), a lower bound without an interval, and for seconds (only reached runs have them) '-'."""
    if reached == runs:
        return show(mean_ci(values), 0) + unit
    return f">= {statistics.mean(values):.0f} (censored)" if not unit else "-"


def table(name: str, task: Task, results: dict[str, list[dict]]) -> str:
    lines = [
        f"### {name}: target {task.metric} >= {task.target} (two evals in a row)",
        "",
        f"| arm | runs reaching | samples to target | seconds to target | area under curve | final {task.metric} | "
        + " | ".join(f"final {m}" for m in task.also)
        + " |",
        "|---" * (6 + len(task.also)) + "|",
    ]
    for arm, runs in results.items():
        s = summarise(task, runs)
        lines.append(
            f"| {arm} | {s['reached']}/{s['runs']} | {to_target(s['samples'], s['reached'], s['runs'])} | "
            f"{to_target(s['seconds'], s['reached'], s['runs'], ' s')} | "
            f"{show(s['auc'])} | {show(s['final'])} | " + " | ".join(show(s[m]) for m in task.also) + " |"
        )
    return "\n".join(lines)


def plot(name: str, task: Task, results: dict[str, list[dict]], path: Path) -> None:
    figure, axis = plt.subplots(figsize=(7, 4.5))
    for color, (arm, runs) in zip(plt.rcParams["axes.prop_cycle"].by_key()["color"], results.items()):
        curves = [{step: value for step, _, value in r["curve"]} for r in runs]
        steps = sorted(set.intersection(*(set(c) for c in curves)))  # the eval steps every run has
        x = [step * runs[0]["samples_per_step"] for step in steps]
        stats = [mean_ci([c[step] for c in curves]) for step in steps]
        axis.plot(x, [m for m, _ in stats], color=color, label=f"{arm} ({len(runs)} seeds)")
        if len(runs) > 1:
            axis.fill_between(x, [m - h for m, h in stats], [m + h for m, h in stats], color=color, alpha=0.2)
    axis.axhline(task.target, color="gray", linestyle="--", linewidth=1)
    axis.set_xlabel("samples")
    axis.set_ylabel(f"{task.metric} (greedy, held out)")
    axis.set_title(f"{name}: mean and 95% CI over seeds")
    axis.legend(fontsize=8)
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=110)
    plt.close(figure)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", nargs="+", choices=TASKS, default=["reverse", "summarize"])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    parser.add_argument("--arms", nargs="+", help="only these arms (names as in the table)")
    parser.add_argument("--failure-modes", action="store_true", help="also the failure-mode arms (hacking, gamma < 1)")
    parser.add_argument(
        "--out", type=Path, default=Path("docs/credit"), help="prefix of the plots and the JSON of all runs"
    )
    parser.add_argument("--from-json", type=Path, help="redraw tables and plots from a JSON written earlier")
    parser.add_argument(
        "--overrides", nargs="+", default=[], help="key=value for every run, e.g. learner.num_threads=1"
    )
    args = parser.parse_args()

    results = json.loads(args.from_json.read_text()) if args.from_json else {}
    if not args.from_json:
        json_path = args.out.with_name(args.out.name + "_runs.json")
        results = (
            json.loads(json_path.read_text()) if json_path.exists() else {}
        )  # runs of earlier invocations are kept
        with tempfile.TemporaryDirectory(prefix="tokenforge-credit-") as workdir:
            for name in args.tasks:
                task = TASKS[name]
                arms = task.arms | (task.failure_modes if args.failure_modes else {})
                for a, (arm, overrides) in enumerate(arms.items()):
                    if args.arms and arm not in args.arms:
                        continue
                    runs = results.setdefault(name, {}).setdefault(arm, [])
                    settings = [*overrides, *args.overrides]
                    if any(r["overrides"] != settings for r in runs):  # never average runs of different settings
                        print(
                            f"{name} / {arm}: dropping {len(runs)} earlier runs made with other overrides", flush=True
                        )
                        runs.clear()
                    for seed in args.seeds:
                        pinned = task.settings
                        if pinned is None:
                            pinned = SYNCHRONOUS if task.config else DEFAULTS_BEFORE_PANEL
                        run_settings = [*pinned, *settings]
                        run = run_seed(  # as docs/credit.md's runs: the defaults of the time, then the arm's
                            seed, run_settings, task.target, Path(workdir) / f"{name}_{a}", task.metric, task.config
                        )
                        for stale in ("reached_step", "reached_s"):  # recomputed from the curve by `reached`
                            run.pop(stale)
                        runs[:] = [r for r in runs if r["seed"] != seed] + [run | {"overrides": settings}]
                        json_path.parent.mkdir(parents=True, exist_ok=True)
                        json_path.write_text(json.dumps(results, indent=1))
                        print(
                            name,
                            arm,
                            json.dumps({k: v for k, v in run.items() if k not in ("curve", "evals")}),
                            flush=True,
                        )
    for name, arms in results.items():
        print("\n" + table(name, TASKS[name], arms))
        plot(name, TASKS[name], arms, args.out.with_name(f"{args.out.name}_{name}.png"))
    print(f"\nplots: {args.out}_<task>.png")


if __name__ == "__main__":
    main()
