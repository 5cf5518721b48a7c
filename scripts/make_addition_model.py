"""Make the built-in tiny addition model: a char-level GPT-2, warm-started by supervised learning.

Trains on the built-in training prompts (loss on answer tokens and EOS only) and stops as soon as
greedy exact match on the eval set reaches --target, so that RL has room to improve it. Saves a
HF-format model (safetensors) + tokenizer. Deterministic for a given seed on CPU.

    python scripts/make_addition_model.py [--target 0.45] [--out pipeline/assets/addition/model]
"""

import argparse
import json
import time
from pathlib import Path

import pyarrow as pa
import torch

from actors.rollout_worker import RolloutWorker
from pipeline.config import RolloutConfig
from pipeline.models import BUILTIN_EVAL, BUILTIN_MODEL, BUILTIN_TRAIN
from pipeline.tiny_model import make_char_tokenizer, make_tiny_gpt2


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def exact_match(worker: RolloutWorker, model: torch.nn.Module, rows: list[dict]) -> float:
    worker.set_weights(model.state_dict(), version=0)
    prompts = pa.Table.from_pylist([{"prompt": r["prompt"], "group_id": i} for i, r in enumerate(rows)])
    completions = worker.generate(prompts, group_size=1, greedy=True).column("completion").to_pylist()
    return sum(c == r["answer"] for c, r in zip(completions, rows)) / len(rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=BUILTIN_MODEL, type=Path)
    parser.add_argument("--target", default=0.45, type=float, help="stop once eval exact match reaches this")
    parser.add_argument("--seed", default=0, type=int)
    parser.add_argument("--lr", default=2e-3, type=float)
    parser.add_argument("--batch-size", default=64, type=int)
    parser.add_argument("--eval-every", default=25, type=int)
    parser.add_argument("--max-steps", default=20000, type=int)
    args = parser.parse_args()

    torch.manual_seed(args.seed)
    torch.set_num_threads(2)
    tokenizer = make_char_tokenizer("0123456789+=")
    model = make_tiny_gpt2(tokenizer)
    args.out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(args.out)
    tokenizer.save_pretrained(args.out)
    worker = RolloutWorker(str(args.out), RolloutConfig(max_new_tokens=5, num_threads=2))

    train, evaluation = read_jsonl(BUILTIN_TRAIN), read_jsonl(BUILTIN_EVAL)
    by_shape = {}  # operand digit counts -> rows, e.g. (1, 2) for "7+35="
    for row in train:
        by_shape.setdefault(tuple(len(x) for x in row["prompt"][:-1].split("+")), []).append(row)
    shapes = sorted(by_shape)
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr)
    start, score = time.time(), 0.0
    for step in range(1, args.max_steps + 1):
        # Balanced batches: every operand shape equally often, so that the warm start is partly right on
        # each shape instead of perfect on two-digit pairs and clueless on one-digit operands (RL cannot
        # explore its way out of a shape where every sample is wrong at the same digit).
        picks = torch.randint(len(shapes), (args.batch_size,))
        rows = [by_shape[shapes[s]][torch.randint(len(by_shape[shapes[s]]), ()).item()] for s in picks.tolist()]
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
        if step % args.eval_every == 0:
            model.eval()
            score = exact_match(worker, model, evaluation)
            model.train()
            print(f"step {step} loss {loss.item():.3f} eval exact match {score:.3f} ({time.time() - start:.0f}s)")
            if score >= args.target:
                break
    model.save_pretrained(args.out)
    tokenizer.save_pretrained(args.out)
    params = sum(p.numel() for p in model.parameters())
    print(f"saved {params / 1e6:.2f}M-parameter model with eval exact match {score:.3f} to {args.out}")


if __name__ == "__main__":
    main()
