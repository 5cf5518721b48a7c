"""Benchmark: TRL's GRPOTrainer vs `tokenforge train` on a model/task pair, time and samples to a target.

Both systems train the same warm start on the same training prompts and are evaluated by the same code on the
same held-out prompts: greedy decoding (max 8 new tokens) of the first --eval-samples of the eval file by
tokenforge's RolloutWorker, scored by tokenforge's exact_match, at step 0 and every --eval-every steps. For
TRL this runs in a TrainerCallback on a copy of the trainer's weights; its time is not counted. Each run is
a fresh process (tokenforge: the real `tokenforge train` command with its own local Ray; TRL: this script
with --trl-run), one seed and one learning rate at a time; each system gets the learning rate of its grid
(--lrs-tokenforge, --lrs-trl) that reaches --target fastest (mean over seeds; a seed that never reaches it
ranks the lr last), per reward setting.

The pair: by default the shipped addition task and its warm start (pipeline/assets/addition/model, a 0.8M-parameter
char-level GPT-2 at 0.575 greedy exact match); --model DIR --train-file F --eval-file F name another, e.g. the
shipped chat Llama (pipeline/assets/chat_addition/{model,train.jsonl,eval.jsonl}) or the GPT-NeoX sort model that
`python scripts/make_task_model.py --task sort --out DIR` makes (data: pipeline/assets/sort/*.jsonl).

    python benchmarks/vs_trl.py [--model DIR --train-file F --eval-file F]
        [--seeds 0 1 2] [--lrs-tokenforge 2.5e-4 5e-4 1e-3] [--lrs-trl 2.5e-4 5e-4 1e-3]
        [--max-steps 300] [--target 0.80] [--eval-every 25] [--eval-samples 200] [--prompts-per-step 64]
        [--rewards exact default] [--threads 2] [--json OUT] [--quick]

Needs `pip install -c constraints.txt -e '.[bench]'` (TRL 1.16). Measured per run: training seconds to the
target (the first eval at or above it), completions sampled by then, completions per training second over the
whole run, and the final eval. Training seconds exclude model loading, actor/trainer start-up and every eval:
TRL: wall time from on_train_begin minus the time spent in the eval callback; tokenforge: `time/elapsed_s`
of metrics.jsonl (from the start of the step-0 eval) minus the `time/eval_s` of every eval so far.
`train_s_step_sum` in --json (the sum of time/step_s) is a lower bound that leaves out all driver overhead.

Equal in both systems (per compared pair):
  - model, tokenizer, train prompts (`prompt`, `answer`; answers must end, EOS included, within 8 tokens),
    prompt tokenization (`tokenizer(text)`), eval;
  - prompts per step x group size (--prompts-per-step x 8) completions per optimizer step, one optimizer step
    per generation batch (TRL: per_device_train_batch_size x gradient_accumulation_steps = that, micro-batches
    of tokenforge's learner.micro_batch_size, 256), sampled at temperature 1.0 (no top-p/top-k), at most 8 new
    tokens, stopping at EOS; truncated completions are trained on by both (mask_truncated_completions=False);
  - rewards: tokenforge's own reward components (same code) wrapped as TRL reward functions, same weights:
    `exact` = exact_match 1.0 only (the fair pair); `default` = tokenforge's default exact_match 1.0 +
    digit_match 0.5;
  - advantages: group-normalised (r - mean_group) / std_group, unbiased std (tokenforge estimator grpo, eps
    1e-6; TRL scale_rewards="group", eps 1e-4), one value for every token of a completion when the reward is
    sequence-level;
  - loss: on-policy REINFORCE (TRL's clipped ratio is exactly 1 with num_iterations=1, so its gradient is
    -A * grad log pi), summed over all completion tokens of the batch and divided by their number (TRL
    loss_type="dapo" = tokenforge agg token-mean), no KL (beta=0 / no reference model), no entropy bonus;
  - optimizer: torch AdamW (betas 0.9/0.999, eps 1e-8, weight decay 0), global grad-norm clip 1.0, fp32 weights
    and math (bf16=False), no gradient checkpointing, and the same learning-rate schedule: TRL is handed
    tokenforge's own LambdaLR (actors/learner.py lr_factor: 10 linear warm-up steps, cosine to 0.3x at
    --max-steps), so HF's "warm-up from 0" scheduler is not used;
  - torch threads (--threads): TRL's one process, and tokenforge's learner and rollout worker each.

Not equal (cannot be, or would no longer be the systems as shipped):
  - with --rewards default, tokenforge scores digit_match per token (its returns-to-go reach each token);
    TRL only takes a sequence reward, so it gets the same digit_match summed over the completion;
  - position ids: TRL's training forward passes no position_ids, so a left-padded prompt of GPT-2 (learned
    absolute positions) is scored at positions shifted by its padding while generate() uses the right ones.
    By default the TRL arm gets a forward pre-hook that fills position_ids = cumsum(attention_mask) - 1 (what
    generate and tokenforge use); --trl-stock-positions turns it off to measure TRL as shipped;
  - tokenforge leaves completions whose advantages are all 0 (groups with equal rewards) out of the learner's
    forward/backward (the gradient is the same, the whole-batch token count is kept); TRL computes them;
  - tokenforge runs each prompt once per group, in generation and in the learner, and copies its KV cache to
    the group's completions (learner.share_prompts: the same gradient up to float rounding); TRL runs every
    completion's whole sequence;
  - tokenforge runs generation, scoring and learning in separate Ray actors (processes) and pays for
    weight sync and Ray calls; TRL generates with HF generate() and learns in one process; TRL also computes
    per-token entropies for its logs;
  - sampling RNG and prompt order differ (each system seeds its own; the same --seeds are passed to both).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml
from default_train import SYNCHRONOUS

GROUP_SIZE = 8
MAX_NEW_TOKENS = 8
TEMPERATURE = 1.0
MICRO_BATCH = 256  # tokenforge's learner.micro_batch_size (default)
REWARDS = {"exact": {"exact_match": 1.0}, "default": {"exact_match": 1.0, "digit_match": 0.5}}


def pair_overrides(args: argparse.Namespace, reward: str) -> list[str]:
    """The pair (model, prompts), the reward and the evals: what every run of either system is given."""
    weights = ", ".join(f"{k}: {v}" for k, v in REWARDS[reward].items())
    pair = {"model.path": args.model, "data.train_file": args.train_file, "data.eval_file": args.eval_file}
    return [
        *(f"{key}={path.resolve()}" for key, path in pair.items() if path),
        f"trainer.eval_every={args.eval_every}",
        "trainer.eval_metrics=[exact_match]",
        f"data.max_eval_samples={args.eval_samples}",
        f"reward.weights={{{weights}}}",
    ]


def common_overrides(args: argparse.Namespace, reward: str, lr: float) -> list[str]:
    """tokenforge config overrides shared by the tokenforge arm and the TRL arm's evaluator/reward setup: the
    pair, and the training settings made equal in both (the module docstring)."""
    return pair_overrides(args, reward) + [
        f"trainer.total_steps={args.max_steps}",
        f"trainer.prompts_per_step={args.prompts_per_step}",
        f"rollout.group_size={GROUP_SIZE}",
        *SYNCHRONOUS,  # on-policy, as TRL (the default overlaps: --tokenforge-overrides can set it)
        f"rollout.max_new_tokens={MAX_NEW_TOKENS}",
        f"rollout.temperature={TEMPERATURE}",
        f"learner.lr={lr}",
        f"learner.micro_batch_size={MICRO_BATCH}",
        f"learner.num_threads={args.threads}",
        f"rollout.num_threads={args.threads}",
    ]


# ---------------------------------------------------------------------------------------------- tokenforge


def run_tokenforge(args: argparse.Namespace, reward: str, lr: float, seed: int, workdir: Path) -> dict:
    """One real `tokenforge train` run; its eval curve with training seconds that exclude the evals."""
    out = workdir / f"tokenforge_{reward}_{'own' if lr is None else f'lr{lr:g}'}_seed{seed}"
    settings = pair_overrides(args, reward) if args.tokenforge_defaults else common_overrides(args, reward, lr)
    overrides = settings + [
        # what TRL is not asked to do either: no rollout/eval dumps, no TensorBoard, no mid-run checkpoints
        "trainer.dump_rollouts_every=0",
        "trainer.dump_eval=false",
        "trainer.loggers=[jsonl]",
        "trainer.save_every=100000",
        *args.tokenforge_overrides,
    ]
    command = [sys.executable, "-m", "pipeline.cli", "train", f"seed={seed}", f"output_dir={out}", *overrides]
    env = {**os.environ, "HOME": str(workdir), "RAY_AUTH_MODE": "token"}
    log = workdir / f"{out.name}.log"
    start = time.time()
    with open(log, "w") as handle:
        # Ctrl-C must reach it even when this script was started in the background (which ignores SIGINT)
        restore = (lambda: signal.signal(signal.SIGINT, signal.SIG_DFL)) if args.stop_at_target else None
        process = subprocess.Popen(command, env=env, stdout=handle, stderr=subprocess.STDOUT, preexec_fn=restore)
        stopped = args.stop_at_target and stop_at_target(process, out / "metrics.jsonl", args.target)
    wall = time.time() - start
    if process.returncode and not stopped:
        raise SystemExit(f"tokenforge run failed ({process.returncode}), log {log}:\n" + tail(log))
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    config = yaml.safe_load((out / "config.yaml").read_text())
    return {
        "system": "tokenforge",
        "reward": reward,
        "lr": config["learner"]["lr"],
        "seed": seed,
        "wall_s": wall,
        "samples_per_step": config["trainer"]["prompts_per_step"] * config["rollout"]["group_size"],
        "stopped_at_target": bool(stopped),
        **tokenforge_curve(records),
        "config": config,
    }


def stop_at_target(process: subprocess.Popen, metrics: Path, target: float) -> bool:
    """Wait for a `tokenforge train` process; Ctrl-C it (SIGINT, as a user would) at its first eval at or above
    `target`. True if it was stopped so."""
    while process.poll() is None:
        time.sleep(0.5)
        text = metrics.read_text() if metrics.exists() else ""
        complete = text[: text.rfind("\n") + 1].splitlines()  # a line being written is not read yet
        evals = [r.get("eval/exact_match") for r in map(json.loads, complete)]
        if any(e is not None and e >= target for e in evals):
            process.send_signal(signal.SIGINT)
            process.wait()
            return True
    return False


def tokenforge_curve(records: list[dict]) -> dict:
    """Eval points (step, training seconds without evals, exact match) from metrics.jsonl records:
    train_s(s) = time/elapsed_s(s) - the time/eval_s of every eval up to and including step s."""
    curve, evals_so_far, step_sum = [], 0.0, 0.0
    for r in sorted(records, key=lambda r: r["step"]):
        step_sum += r.get("time/step_s", 0.0)
        evals_so_far += r.get("time/eval_s", 0.0)
        if "eval/exact_match" in r:
            curve.append(
                {
                    "step": r["step"],
                    "train_s": r["time/elapsed_s"] - evals_so_far,
                    "train_s_step_sum": step_sum,
                    "elapsed_s": r["time/elapsed_s"],
                    "exact_match": r["eval/exact_match"],
                }
            )
    return {"curve": curve, "steps": max(r["step"] for r in records), "eval_s_total": evals_so_far}


# ---------------------------------------------------------------------------------------------- TRL


def trl_run(spec: dict) -> None:
    """The TRL arm (its own process): GRPOTrainer with the settings of the module docstring; writes
    spec["out"] (JSON: the eval curve and the GRPOConfig used)."""
    import torch

    torch.set_num_threads(spec["threads"])
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    from actors.learner import lr_factor
    from actors.reward_worker import RewardWorker, token_spans
    from actors.rollout_worker import RolloutWorker
    from pipeline.batch import mean_reward
    from pipeline.data.inputs import load_inputs, with_builtin_defaults
    from pipeline.preflight import load_config  # component options checked, one line
    from pipeline.rewards.base import ComponentEnv, RewardInputs
    from pipeline.rewards.components import COMPONENTS, component_options

    config = with_builtin_defaults(load_config(None, spec["overrides"] + [f"seed={spec['seed']}"]))
    model_path = config.model.path
    train_table, eval_prompts = load_inputs(config)
    tokenizer = AutoTokenizer.from_pretrained(model_path)
    model = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32)
    filled = [0]  # full-sequence forwards that got position ids from the hook (TRL's training forwards)
    if not spec["stock_positions"]:

        def hook(module, args, kwargs):
            had = kwargs.get("position_ids") is not None
            args, kwargs = positions_hook(module, args, kwargs)
            filled[0] += not had and kwargs.get("position_ids") is not None
            return args, kwargs

        model.register_forward_pre_hook(hook, with_kwargs=True)

    # the same reward code as tokenforge's reward workers, as TRL reward functions (sequence-level totals)
    env = ComponentEnv(tokenizer, "cpu")
    stop_ids = frozenset({tokenizer.eos_token_id})

    def reward_function(name: str):
        component = COMPONENTS[config.reward.components[name].type](component_options(config, name), env)

        def score(prompts, completions, completion_ids, answer, **_) -> list[float]:
            # a conversation's completion is [{"role": "assistant", "content": text}] (TRL's and tokenforge's form)
            texts = [c[-1]["content"] if isinstance(c, list) else c for c in completions]
            inputs = RewardInputs(
                prompts=list(prompts),
                completions=list(completions),
                completion_ids=list(completion_ids),
                texts=texts,
                token_spans=[token_spans(tokenizer, i, t) for i, t in zip(completion_ids, texts)],
                columns={"answer": list(answer)},
                stop_ids=stop_ids,
            )
            return [float(sum(s)) if isinstance(s, list) else float(s) for s in component(inputs)]

        score.__name__ = name
        return score

    names = list(config.reward.weights)
    per_step = spec["prompts_per_step"] * GROUP_SIZE
    micro = min(MICRO_BATCH, per_step)
    if per_step % micro:
        raise SystemExit(f"--prompts-per-step x {GROUP_SIZE} = {per_step} is not a multiple of the micro-batch {micro}")
    max_steps = spec["max_steps"]
    grpo = dict(
        output_dir=spec["workdir"],
        seed=spec["seed"],
        data_seed=spec["seed"],
        use_cpu=True,
        bf16=False,
        fp16=False,
        gradient_checkpointing=False,
        use_vllm=False,
        report_to="none",
        save_strategy="no",
        eval_strategy="no",
        logging_steps=spec["eval_every"],
        disable_tqdm=True,
        dataloader_num_workers=0,
        log_completions=False,
        max_steps=max_steps,
        learning_rate=spec["lr"],
        max_grad_norm=1.0,
        weight_decay=0.0,
        per_device_train_batch_size=micro,
        gradient_accumulation_steps=per_step // micro,  # one generation per step
        num_generations=GROUP_SIZE,
        max_completion_length=MAX_NEW_TOKENS,
        temperature=TEMPERATURE,
        top_p=1.0,
        top_k=0,
        repetition_penalty=1.0,
        beta=0.0,
        num_iterations=1,
        loss_type="dapo",
        scale_rewards="group",
        mask_truncated_completions=False,
        reward_weights=[config.reward.weights[n] for n in names],
        multi_objective_aggregation="sum_then_normalize",
        disable_dropout=True,
        shuffle_dataset=True,
    )
    args = GRPOConfig(**grpo)
    optimizer = torch.optim.AdamW(model.parameters(), lr=spec["lr"], betas=(0.9, 0.999), weight_decay=0.0)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda k: lr_factor(config.learner, k, max_steps))

    evaluator = RolloutWorker(config, model_path)  # sets torch threads to rollout.num_threads (= spec threads)
    scorer = RewardWorker(config, model_path, ["exact_match"])

    def evaluate() -> float:
        evaluator.set_weights({k: v.detach().clone() for k, v in model.state_dict().items()}, 0)
        samples = evaluator.generate(eval_prompts, group_size=1, greedy=True)
        scored, _ = scorer.score_all(samples, ["exact_match"])
        return mean_reward(scored, "exact_match")

    curve: list[dict] = []

    class GreedyEval(TrainerCallback):
        """Greedy held-out exact match at step 0 and every eval_every optimizer steps; its time is not counted."""

        def on_train_begin(self, args, state, control, **kwargs):
            curve.append({"step": 0, "train_s": 0.0, "exact_match": evaluate()})
            self.eval_s, self.start = 0.0, time.perf_counter()

        def on_step_end(self, args, state, control, **kwargs):
            step = state.global_step
            if step % spec["eval_every"] and step != max_steps:
                return
            now = time.perf_counter()
            train_s = now - self.start - self.eval_s
            curve.append({"step": step, "train_s": train_s, "exact_match": evaluate()})
            self.eval_s += time.perf_counter() - now
            print(json.dumps({"trl_eval": curve[-1]}), flush=True)
            if spec["stop_at"] is not None and curve[-1]["exact_match"] >= spec["stop_at"]:
                control.should_training_stop = True

    dataset = Dataset.from_list(
        [
            {"prompt": p, "answer": a}
            for p, a in zip(train_table.column("prompt").to_pylist(), train_table.column("answer").to_pylist())
        ]
    )
    trainer = GRPOTrainer(
        model=model,
        reward_funcs=[reward_function(n) for n in names],
        args=args,
        train_dataset=dataset,
        processing_class=tokenizer,
        callbacks=[GreedyEval()],
        optimizers=(optimizer, scheduler),
    )
    torch.set_num_threads(spec["threads"])
    trainer.train()
    Path(spec["out"]).write_text(
        json.dumps(
            {
                "curve": curve,
                "steps": trainer.state.global_step,
                "position_ids_filled": filled[0],
                "grpo_config": {k: v for k, v in grpo.items() if k != "output_dir"},
                "trl_log": trainer.state.log_history,
            }
        )
    )


def positions_hook(module, args, kwargs):
    """position_ids = cumsum(attention_mask) - 1 for a full-sequence forward that got none (TRL's training
    forward), as generate() and tokenforge compute them; generate()'s own calls pass position_ids."""
    mask, ids = kwargs.get("attention_mask"), kwargs.get("input_ids", args[0] if args else None)
    if kwargs.get("position_ids") is None and mask is not None and ids is not None and mask.shape == ids.shape:
        kwargs["position_ids"] = (mask.long().cumsum(-1) - 1).clamp(min=0)
    return args, kwargs


def run_trl(args: argparse.Namespace, reward: str, lr: float, seed: int, workdir: Path) -> dict:
    name = f"trl_{reward}_lr{lr:g}_seed{seed}"
    spec = {
        "overrides": common_overrides(args, reward, lr),
        "seed": seed,
        "lr": lr,
        "threads": args.threads,
        "prompts_per_step": args.prompts_per_step,
        "max_steps": args.max_steps,
        "eval_every": args.eval_every,
        "stock_positions": args.trl_stock_positions,
        "stop_at": args.target if args.stop_at_target else None,
        "workdir": str(workdir / name),
        "out": str(workdir / f"{name}.json"),
    }
    log = workdir / f"{name}.log"
    start = time.time()
    with open(log, "w") as handle:
        done = subprocess.run(
            [sys.executable, __file__, "--trl-run", json.dumps(spec)],
            stdout=handle,
            stderr=subprocess.STDOUT,
            env={**os.environ, "HOME": str(workdir)},
        )
    wall = time.time() - start
    if done.returncode:
        raise SystemExit(f"TRL run failed ({done.returncode}), log {log}:\n" + tail(log))
    result = json.loads(Path(spec["out"]).read_text())
    return {
        "system": "trl",
        "reward": reward,
        "lr": lr,
        "seed": seed,
        "wall_s": wall,
        "samples_per_step": args.prompts_per_step * GROUP_SIZE,
        **result,
    }


# ---------------------------------------------------------------------------------------------- summary


def tail(path: Path, lines: int = 40) -> str:
    return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])


def summarize(run: dict, target: float) -> dict:
    curve = run["curve"]
    hit = next((p for p in curve if p["exact_match"] >= target), None)
    last = curve[-1]
    return {
        "reached": hit is not None,
        "time_s": hit["train_s"] if hit else None,
        "samples": hit["step"] * run["samples_per_step"] if hit else None,
        "completions_per_s": last["step"] * run["samples_per_step"] / last["train_s"] if last["train_s"] > 0 else None,
        "final": last["exact_match"],
        "best": max(p["exact_match"] for p in curve),
    }


def mean_sd(values: list[float], fmt: str = "{:.1f}") -> str:
    if not values:
        return "-"
    if len(values) == 1:
        return fmt.format(values[0])
    return f"{fmt.format(statistics.mean(values))} ± {fmt.format(statistics.stdev(values))}"


def rank(runs: list[dict]) -> tuple:
    """Sort key of one lr's runs: fewest seeds missing the target, then mean time to it, then final eval."""
    summaries = [r["summary"] for r in runs]
    missed = sum(not s["reached"] for s in summaries)
    times = [s["time_s"] for s in summaries if s["reached"]]
    return (missed, statistics.mean(times) if times else math.inf, -statistics.mean(s["final"] for s in summaries))


def table(results: list[dict], target: float) -> str:
    groups: dict[tuple, list[dict]] = {}
    for r in results:
        groups.setdefault((r["reward"], r["system"], r["lr"]), []).append(r)
    head = (
        f"| reward | system | lr | seeds | time to {target} (s) | samples to {target} | completions/s "
        "| final eval exact match | best lr |"
    )
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    best: dict[tuple, tuple] = {}
    for reward, system in dict.fromkeys((k[0], k[1]) for k in groups):
        lrs = {k[2]: v for k, v in groups.items() if k[:2] == (reward, system)}
        best_lr = min(lrs, key=lambda lr: rank(lrs[lr]))
        best[(reward, system)] = (best_lr, lrs[best_lr])
        for lr, runs in sorted(lrs.items()):
            s = [r["summary"] for r in runs]
            reached = [x for x in s if x["reached"]]
            n = f"{len(reached)}/{len(s)} reached"
            lines.append(
                "| "
                + " | ".join(
                    [
                        reward,
                        system,
                        f"{lr:g}",
                        f"{len(s)} ({n})",
                        mean_sd([x["time_s"] for x in reached]),
                        mean_sd([x["samples"] for x in reached], "{:,.0f}"),
                        mean_sd([x["completions_per_s"] for x in s if x["completions_per_s"]], "{:.0f}"),
                        mean_sd([x["final"] for x in s], "{:.3f}"),
                        "**best**" if lr == best_lr else "",
                    ]
                )
                + " |"
            )
    lines.append("")
    for reward in dict.fromkeys(k[0] for k in best):
        if (reward, "tokenforge") not in best or (reward, "trl") not in best:
            continue
        (tf_lr, tf), (trl_lr, trl) = best[(reward, "tokenforge")], best[(reward, "trl")]
        tf_t = [r["summary"]["time_s"] for r in tf if r["summary"]["reached"]]
        trl_t = [r["summary"]["time_s"] for r in trl if r["summary"]["reached"]]
        tf_n = [r["summary"]["samples"] for r in tf if r["summary"]["reached"]]
        trl_n = [r["summary"]["samples"] for r in trl if r["summary"]["reached"]]
        if tf_t and trl_t and statistics.mean(trl_t) > 0 and statistics.mean(trl_n) > 0:
            ratio = statistics.mean(tf_t) / statistics.mean(trl_t)
            samples = statistics.mean(tf_n) / statistics.mean(trl_n)
            lines.append(
                f"reward {reward}: time to {target}, tokenforge (lr {tf_lr:g}) / TRL (lr {trl_lr:g}) = "
                f"{ratio:.2f} (samples to target: {samples:.2f}; means over the seeds that reached it: "
                f"{len(tf_t)}/{len(tf)} and {len(trl_t)}/{len(trl)})"
            )
        elif tf_t and trl_t:
            lines.append(f"reward {reward}: no ratio, TRL was at {target} already at step 0")
        else:
            lines.append(
                f"reward {reward}: no ratio, the target was not reached by "
                + " and ".join(n for n, t in (("tokenforge", tf_t), ("TRL", trl_t)) if not t)
            )
    return "\n".join(lines)


def lrs(args: argparse.Namespace, system: str) -> list[float | None]:
    """The learning rates one system is run at (None: tokenforge at its own configured lr)."""
    if system == "trl":
        return args.lrs_trl
    return [None] if args.tokenforge_defaults else args.lrs_tokenforge


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--model", type=Path, metavar="DIR", help="warm-start model directory (default: the shipped addition model)"
    )
    parser.add_argument(
        "--train-file", type=Path, metavar="FILE", help="training prompts with an `answer` (default: addition's)"
    )
    parser.add_argument(
        "--eval-file", type=Path, metavar="FILE", help="held-out prompts with an `answer` (default: addition's)"
    )
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--lrs-tokenforge", type=float, nargs="+", default=[2.5e-4, 5e-4, 1e-3])
    parser.add_argument("--lrs-trl", type=float, nargs="+", default=[2.5e-4, 5e-4, 1e-3])
    parser.add_argument(
        "--max-steps", type=int, default=300, help="optimizer steps per run (both; sets the lr schedule)"
    )
    parser.add_argument(
        "--target", type=float, help="held-out greedy exact match to reach (default 0.80; --quick: 0.65)"
    )
    parser.add_argument("--eval-every", type=int, default=25, help="optimizer steps between evals")
    parser.add_argument("--eval-samples", type=int, default=200, help="the first N prompts of eval.jsonl")
    parser.add_argument(
        "--prompts-per-step", type=int, default=64, help=f"prompts per optimizer step (x {GROUP_SIZE} completions)"
    )
    parser.add_argument(
        "--rewards",
        nargs="+",
        choices=list(REWARDS),
        default=["exact"],
        help="exact: exact_match only (the fair pair); default: tokenforge's default exact_match 1.0 + digit_match 0.5",
    )
    parser.add_argument("--systems", nargs="+", choices=["tokenforge", "trl"], default=["tokenforge", "trl"])
    parser.add_argument(
        "--threads", type=int, default=2, help="torch threads: TRL's process, tokenforge's learner and rollout worker"
    )
    parser.add_argument(
        "--tokenforge-overrides",
        nargs="+",
        default=[],
        metavar="KEY=VALUE",
        help="extra config for every tokenforge run, e.g. trainer.max_staleness=1 algorithm.is_cap=2 "
        "learner.num_threads=1 rollout.num_threads=1",
    )
    parser.add_argument(
        "--tokenforge-defaults",
        action="store_true",
        help="tokenforge trains with its own settings (its defaults plus --tokenforge-overrides: lr, schedule, "
        "steps, prompts per step, group size, estimator, threads); only the pair, the reward and the evals are "
        "given, and --lrs-tokenforge is not used",
    )
    parser.add_argument(
        "--stop-at-target",
        action="store_true",
        help="end each run at its first eval at or above --target (tokenforge: Ctrl-C; TRL: should_training_stop); "
        "'final' is then the eval it stopped at",
    )
    parser.add_argument(
        "--trl-stock-positions", action="store_true", help="no position_ids fix for TRL's training forward"
    )
    parser.add_argument("--json", type=Path, help="write every run (config, raw eval curves) here")
    parser.add_argument("--keep", type=Path, help="keep run directories and logs here (default: a temporary directory)")
    parser.add_argument(
        "--quick",
        action="store_true",
        help="smoke test: 1 seed, 1 lr each, 6 steps of 8 prompts, eval every 3 steps on 50 prompts, target 0.65",
    )
    parser.add_argument("--trl-run", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.trl_run:
        trl_run(json.loads(args.trl_run))
        return
    if (args.train_file is None) != (args.eval_file is None):
        parser.error("--train-file and --eval-file go together (the built-in eval set only goes with its own prompts)")
    if args.quick:
        args.seeds, args.max_steps, args.eval_every = [args.seeds[0]], 6, 3
        args.eval_samples, args.prompts_per_step = 50, 8
        args.lrs_tokenforge, args.lrs_trl = [5e-4], [5e-4]
    if args.target is None:
        args.target = 0.65 if args.quick else 0.80
    results = []
    with tempfile.TemporaryDirectory(prefix="tokenforge-vs-trl-") as tmp:
        workdir = args.keep or Path(tmp)
        workdir.mkdir(parents=True, exist_ok=True)
        for reward in args.rewards:
            for seed in args.seeds:
                for system in args.systems:
                    for lr in lrs(args, system):
                        run = (run_tokenforge if system == "tokenforge" else run_trl)(args, reward, lr, seed, workdir)
                        run["summary"] = summarize(run, args.target)
                        results.append(run)
                        brief = {k: run[k] for k in ("system", "reward", "lr", "seed", "wall_s", "summary")}
                        print(json.dumps(brief), flush=True)
    settings = {k: v for k, v in vars(args).items() if k not in ("trl_run", "json", "keep")}
    print(f"\nsettings: {json.dumps(settings, default=str)}\n")
    print(table(results, args.target))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"settings": settings, "runs": results}, indent=1, default=str))
        print(f"\nraw curves: {args.json}")


if __name__ == "__main__":
    main()
