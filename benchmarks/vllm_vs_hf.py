"""Generated tokens/s of the two rollout backends (rollout.backend=hf | vllm) vs model size and batch.

Random-init char-level GPT-2s of about 1M, 10M and 100M parameters (head size 32-64, which vLLM's CPU
attention serves), prompts `a+b=` from the addition task, `rollout.max_new_tokens` new tokens sampled at
temperature 1 (a random model stops at EOS now and then: tokens/s counts the tokens actually generated).
Each (backend, model) runs in a fresh subprocess (vLLM binds the process's OpenMP threads and replaces
torch.set_num_threads), one warm-up generate, then the best of --repeats timed generate calls per batch.
The engine's start-up is reported apart.

    python benchmarks/vllm_vs_hf.py                      # CPU (run it in the vLLM venv: scripts/test_vllm.sh builds it)
    python benchmarks/vllm_vs_hf.py --device cuda --batches 8 64 256 1024 --sizes 10M 100M 350M   # a GPU machine

--device cuda gives both workers a GPU (rollout.num_gpus_per_worker=1); CPU: VLLM_CPU_KVCACHE_SPACE and
--threads (the HF loop's torch threads) apply. Writes --out (JSON) and prints a markdown table.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

SIZES = {  # name -> (n_embd, n_layer, n_head): ~12 * n_layer * n_embd^2 parameters
    "1M": (128, 4, 4),
    "10M": (256, 12, 8),
    "100M": (768, 14, 12),
    "350M": (1024, 24, 16),
}


def make_model(size: str, directory: Path) -> int:
    import torch

    from pipeline.models.tiny import make_char_tokenizer, make_tiny_gpt2

    torch.manual_seed(0)
    n_embd, n_layer, n_head = SIZES[size]
    tokenizer = make_char_tokenizer()
    model = make_tiny_gpt2(tokenizer, n_embd=n_embd, n_layer=n_layer, n_head=n_head, n_positions=64)
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return sum(p.numel() for p in model.parameters())


def run_one(
    backend: str, size: str, batches: list[int], new_tokens: int, repeats: int, device: str, threads: int
) -> dict:
    """In this process: one backend on one model, every batch size."""
    import pyarrow as pa

    from actors.rollout_worker import rollout_worker_class
    from pipeline.config import load_config

    with tempfile.TemporaryDirectory() as scratch:
        params = make_model(size, Path(scratch))
        overrides = [
            f"model.path={scratch}",
            f"rollout.backend={backend}",
            f"rollout.max_new_tokens={new_tokens}",
            f"rollout.num_threads={threads}",
            f"rollout.num_gpus_per_worker={1 if device == 'cuda' else 0}",
            f"rollout.vllm.max_num_seqs={max(batches)}",
        ]
        config = load_config(overrides=overrides)
        start = time.perf_counter()
        worker = rollout_worker_class(backend)(config, scratch)
        start_s = time.perf_counter() - start
        result = {
            "backend": backend,
            "size": size,
            "params": params,
            "device": worker.device,
            "start_s": start_s,
            "batches": {},
        }
        for batch in batches:
            prompts = pa.table(
                {"prompt": [f"{i % 100}+{(7 * i) % 100}=" for i in range(batch)], "group_id": list(range(batch))}
            )
            worker.generate(prompts, group_size=1, step=0)  # warm-up
            best = None
            for step in range(1, repeats + 1):
                t = time.perf_counter()
                table = worker.generate(prompts, group_size=1, step=step)
                seconds = time.perf_counter() - t
                tokens = sum(len(r) for r in table.column("response_ids").to_pylist())
                if best is None or tokens / seconds > best["tokens_per_s"]:
                    best = {"tokens": tokens, "seconds": seconds, "tokens_per_s": tokens / seconds}
            result["batches"][str(batch)] = best
        if hasattr(worker, "close"):
            worker.close()
        return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", nargs="+", default=["1M", "10M", "100M"], choices=list(SIZES))
    parser.add_argument("--batches", nargs="+", type=int, default=[8, 64])
    parser.add_argument("--backends", nargs="+", default=["hf", "vllm"], choices=["hf", "vllm"])
    parser.add_argument("--new-tokens", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--threads", type=int, default=2, help="the HF loop's torch threads (CPU)")
    parser.add_argument("--out", default="benchmarks/vllm_vs_hf.json")
    parser.add_argument("--one", nargs=2, metavar=("BACKEND", "SIZE"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    if args.one:
        result = run_one(*args.one, args.batches, args.new_tokens, args.repeats, args.device, args.threads)
        print("RESULT " + json.dumps(result), flush=True)
        return
    results = []
    for size in args.sizes:
        for backend in args.backends:
            command = [
                sys.executable,
                __file__,
                "--one",
                backend,
                size,
                "--batches",
                *map(str, args.batches),
                "--new-tokens",
                str(args.new_tokens),
                "--repeats",
                str(args.repeats),
                "--device",
                args.device,
                "--threads",
                str(args.threads),
            ]
            done = subprocess.run(command, capture_output=True, text=True, cwd=ROOT)
            lines = [line for line in done.stdout.splitlines() if line.startswith("RESULT ")]
            if done.returncode or not lines:
                tail = (done.stderr or done.stdout).strip().splitlines()[-1:] or ["no output"]
                results.append({"backend": backend, "size": size, "error": tail[0]})
                print(f"{backend} {size}: failed: {tail[0]}", flush=True)
                continue
            results.append(json.loads(lines[-1][len("RESULT ") :]))
            r = results[-1]
            print(
                f"{backend} {size} ({r['params'] / 1e6:.1f}M, {r['device']}): start {r['start_s']:.1f} s, "
                + ", ".join(f"batch {b}: {v['tokens_per_s']:.0f} tok/s" for b, v in r["batches"].items()),
                flush=True,
            )
    Path(args.out).write_text(json.dumps({"args": vars(args), "results": results}, indent=1))
    print("\n| model | params | batch | " + " | ".join(f"{b} tok/s" for b in args.backends) + " | vllm / hf |")
    print("|---|---|---|" + "---|" * len(args.backends) + "---|")
    for size in args.sizes:
        by = {r["backend"]: r for r in results if r["size"] == size and "error" not in r}
        if not by:
            continue
        params = next(iter(by.values()))["params"]
        for batch in map(str, args.batches):
            rates = {b: by[b]["batches"][batch]["tokens_per_s"] for b in by}
            ratio = f"{rates['vllm'] / rates['hf']:.2f}x" if {"hf", "vllm"} <= rates.keys() else "-"
            cells = " | ".join(f"{rates[b]:.0f}" if b in rates else "-" for b in args.backends)
            print(f"| {size} | {params / 1e6:.1f}M | {batch} | {cells} | {ratio} |")
    starts = ", ".join(f"{r['backend']} {r['size']} {r['start_s']:.1f} s" for r in results if "error" not in r)
    print(f"\nworker start-up (engine and model load): {starts}")


if __name__ == "__main__":
    main()
