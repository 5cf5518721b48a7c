"""Make a built-in task's tiny model: a char-level GPT-2, warm-started by supervised learning.

Trains on the task's training prompts (loss on answer tokens and EOS only) and stops as soon as
the greedy eval metric (addition: exact match; words: chrF) reaches --target, so that RL has room
to improve it. Saves a HF-format model (safetensors) + tokenizer. Deterministic for a given seed on CPU.

    python scripts/make_task_model.py --task addition|words [--target T] [--out pipeline/assets/<task>/model]
"""

import argparse
import json
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa
import torch
from sacrebleu.metrics import CHRF

from actors.rollout_worker import RolloutWorker
from pipeline.config import load_config
from pipeline.models import ASSETS
from pipeline.tiny_model import make_char_tokenizer, make_tiny_gpt2


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def balanced_by_shape(train: list[dict], size: int) -> list[dict]:
    """Addition batches: every operand shape equally often, so that the warm start is partly right on
    each shape instead of perfect on two-digit pairs and clueless on one-digit operands (RL cannot
    explore its way out of a shape where every sample is wrong at the same digit)."""
    by_shape = {}  # operand digit counts -> rows, e.g. (1, 2) for "7+35="
    for row in train:
        by_shape.setdefault(tuple(len(x) for x in row["prompt"][:-1].split("+")), []).append(row)
    shapes = sorted(by_shape)
    picks = torch.randint(len(shapes), (size,))
    return [by_shape[shapes[s]][torch.randint(len(by_shape[shapes[s]]), ()).item()] for s in picks.tolist()]


def uniform(train: list[dict], size: int) -> list[dict]:
    return [train[i] for i in torch.randint(len(train), (size,)).tolist()]


def exact_match(completions: list[str], rows: list[dict]) -> float:
    return sum(c == r["answer"] for c, r in zip(completions, rows)) / len(rows)


def chrf(completions: list[str], rows: list[dict]) -> float:
    metric = CHRF()
    return sum(metric.sentence_score(c, [r["reference"]]).score / 100 for c, r in zip(completions, rows)) / len(rows)


@dataclass
class Task:
    alphabet: str
    max_new_tokens: int
    n_positions: int
    target: float  # default --target
    eval_every: int  # default --eval-every
    draw_batch: Callable[[list[dict], int], list[dict]]
    metric: Callable[[list[str], list[dict]], float]


TASKS = {
    "addition": Task("0123456789+=", 5, 32, 0.55, 25, balanced_by_shape, exact_match),
    "words": Task("0123456789= -abcdefghijklmnopqrstuvwxyz", 32, 48, 0.55, 5, uniform, chrf),
}


def evaluate(task: Task, worker: RolloutWorker, model: torch.nn.Module, rows: list[dict]) -> float:
    worker.set_weights(model.state_dict(), version=0)
    prompts = pa.Table.from_pylist([{"prompt": r["prompt"], "group_id": i} for i, r in enumerate(rows)])
    return task.metric(worker.generate(prompts, group_size=1, greedy=True).column("response").to_pylist(), rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--task", choices=TASKS, default="addition")
    parser.add_argument("--out", type=Path, help="default: pipeline/assets/<task>/model")
    parser.add_argument("--target", type=float, help="stop once the eval metric reaches this (default: per task)")
    parser.add_argument("--seed", default=0, type=int)
    parser.add_argument("--lr", default=2e-3, type=float)
    parser.add_argument("--batch-size", default=64, type=int)
    parser.add_argument("--eval-every", type=int, help="default: per task")
    parser.add_argument("--max-steps", default=20000, type=int)
    args = parser.parse_args()

    task = TASKS[args.task]
    out = args.out or ASSETS / args.task / "model"
    target = task.target if args.target is None else args.target
    eval_every = args.eval_every or task.eval_every
    torch.manual_seed(args.seed)
    torch.set_num_threads(2)
    tokenizer = make_char_tokenizer(task.alphabet)
    model = make_tiny_gpt2(tokenizer, n_positions=task.n_positions)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    worker = RolloutWorker(load_config(overrides=[f"rollout.max_new_tokens={task.max_new_tokens}", "rollout.num_threads=2"]), str(out))

    train, evaluation = read_jsonl(ASSETS / args.task / "train.jsonl"), read_jsonl(ASSETS / args.task / "eval.jsonl")
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr)
    start, score = time.time(), 0.0
    for step in range(1, args.max_steps + 1):
        rows = task.draw_batch(train, args.batch_size)
        prompts = [tokenizer(r["prompt"]).input_ids for r in rows]
        answers = [tokenizer(r["answer"]).input_ids + [tokenizer.eos_token_id] for r in rows]
        width = max(len(p) + len(a) for p, a in zip(prompts, answers))
        ids = torch.full((len(rows), width), tokenizer.pad_token_id)
        labels = torch.full_like(ids, -100)  # loss only on the answer and EOS
        for i, (p, a) in enumerate(zip(prompts, answers)):
            ids[i, : len(p) + len(a)] = torch.tensor(p + a)
            labels[i, len(p) : len(p) + len(a)] = torch.tensor(a)
        loss = model(input_ids=ids, labels=labels).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if step % eval_every == 0:
            model.eval()
            score = evaluate(task, worker, model, evaluation)
            model.train()
            print(f"step {step} loss {loss.item():.3f} eval {task.metric.__name__} {score:.3f} ({time.time() - start:.0f}s)")
            if score >= target:
                break
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    params = sum(p.numel() for p in model.parameters())
    print(f"saved {params / 1e6:.2f}M-parameter model with eval {task.metric.__name__} {score:.3f} to {out}")


if __name__ == "__main__":
    main()
