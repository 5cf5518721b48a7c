"""Benchmark: weight-sync time vs parameter count and rollout workers, object store vs collective broadcast.

For each model size (a GPT-2 with random weights, the shipped char tokenizer) it starts the real
pipeline actors (pipeline.driver.trainer.Pipeline: one Learner, N RolloutWorkers, a reward worker) and times
`Pipeline.sync_weights()` until every worker has loaded the version (the driver's wall time, blocking;
in training the driver does not wait for it), `--reps` times after one warm-up sync, for each
rollout.weight_sync. Prints a Markdown table of medians: seconds, and the growth from 1 to the most workers.

    python benchmarks/weight_sync.py [--sizes 1 10 30 100] [--workers 1 2 4] [--reps 5] [--dtype float32]

Sizes are millions of parameters. On one machine the object store is shared memory and the broadcast
goes over TCP loopback; across nodes both cross the network (the object store once per node that
fetches, the broadcast along gloo's tree).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import ray

sys.path.insert(0, str(Path(__file__).parent.parent))
from pipeline.config import load_config  # noqa: E402
from pipeline.data.inputs import with_builtin_defaults  # noqa: E402
from pipeline.driver.placement import decide_learner_gpus  # noqa: E402
from pipeline.driver.trainer import Pipeline  # noqa: E402
from pipeline.models.hf import BUILTIN_MODEL, load_tokenizer  # noqa: E402
from pipeline.models.tiny import make_tiny_gpt2  # noqa: E402

# (n_embd, n_layer) of a GPT-2 with about that many million parameters (12 L d^2, tiny vocabulary)
SHAPES = {1: (128, 5), 10: (256, 13), 30: (512, 10), 100: (768, 14)}


def random_model(millions: int, directory: Path) -> int:
    """A random-init GPT-2 of about `millions` M parameters with the shipped tokenizer; returns its count."""
    tokenizer = load_tokenizer(str(BUILTIN_MODEL))
    width, layers = SHAPES[millions]
    model = make_tiny_gpt2(tokenizer, n_embd=width, n_layer=layers, n_head=8, n_positions=64)
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return sum(p.numel() for p in model.parameters())


def time_syncs(model_dir: Path, workers: int, method: str, reps: int, dtype: str) -> list[float]:
    config = with_builtin_defaults(
        load_config(
            overrides=[
                f"model.path={model_dir}",
                f"model.dtype={dtype}",
                f"rollout.num_workers={workers}",
                f"rollout.weight_sync={method}",
                "rollout.num_cpus_per_worker=0.1",
                "learner.num_cpus=0.1",
                "reward.num_cpus_per_worker=0.1",
                "learner.num_gpus=0",
            ]
        )
    )
    with Pipeline(decide_learner_gpus(config), run_id=f"bench-{workers}-{method}-{time.time_ns() % 10**6}") as pipeline:
        pipeline.rollout.get([a.__ray_ready__.remote() for a in pipeline.rollout.actors])
        seconds = []
        for rep in range(reps + 1):  # the first forms the group / warms up the object store
            start = time.perf_counter()
            pipeline.sync_weights()
            pipeline.rollout.get(pipeline.weight_sync.pending)  # every receive (and a broadcast's send)
            if rep:
                seconds.append(time.perf_counter() - start)
        return seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[1, 10, 30, 100], choices=sorted(SHAPES))
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2, 4])
    parser.add_argument("--methods", nargs="+", default=["object_store", "collective"])
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    args = parser.parse_args()
    ray.init(num_cpus=os.cpu_count(), include_dashboard=False)
    rows = []
    with tempfile.TemporaryDirectory(prefix="tokenforge-sync-") as tmp:
        for size in args.sizes:
            model_dir = Path(tmp) / f"gpt2_{size}m"
            params = random_model(size, model_dir)
            for method in args.methods:
                medians = {}
                for workers in args.workers:
                    seconds = time_syncs(model_dir, workers, method, args.reps, args.dtype)
                    medians[workers] = statistics.median(seconds)
                    print(
                        f"{params / 1e6:.1f}M {method} {workers} workers: " + " ".join(f"{s:.3f}" for s in seconds),
                        flush=True,
                    )
                rows.append((params, method, medians))
    ray.shutdown()
    low, high = min(args.workers), max(args.workers)
    print(
        "\n| parameters | weight_sync | "
        + " | ".join(f"{w} worker{'s' if w > 1 else ''}" for w in args.workers)
        + f" | growth {low} -> {high} |"
    )
    print("|---|---|" + "---|" * len(args.workers) + "---|")
    for params, method, medians in rows:
        cells = " | ".join(f"{medians[w] * 1000:.0f} ms" for w in args.workers)
        print(f"| {params / 1e6:.1f}M | {method} | {cells} | {medians[high] / medians[low] - 1:+.0%} |")


if __name__ == "__main__":
    main()
