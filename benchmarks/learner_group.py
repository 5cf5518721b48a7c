"""Benchmark: the learner group (learner.num_workers) vs the single learner, on this machine's CPUs (gloo).

For each model size (the shipped tiny GPT-2, and a ~85M-parameter GPT-2 on its tokenizer) and each number of ranks
N, starts N learner actors on a local Ray (the machine's CPUs shared among them: learner.num_cpus = CPUs / N),
forms the group, and times --steps train_step calls on one scored batch of the default task (--prompts prompts x
4 samples, generated and scored once) after one warm-up step. Prints the mean step time and, per rank, the
training state it holds (its shards of the weights and Adam's moments), its peak resident memory (which includes
loading the whole model before sharding it) and its resident memory after the steps; the seconds until a reader
holds a version's whole weights, gathered to rank 0 as one object (what the pipeline publishes) or as one object
per rank's shard that the reader concatenates (median of 3); and the loss of the last step, which every N must
agree on.

    python benchmarks/learner_group.py [--ranks 1 2] [--sizes tiny 85m] [--steps 3] [--prompts 16]
    python benchmarks/learner_group.py --memory-table   # docs/models.md's table: the ranks a model size needs
"""

from __future__ import annotations

import argparse
import os
import resource
import statistics
import sys
import tempfile
import time
import uuid
from pathlib import Path

import psutil
import pyarrow as pa
import ray
import torch
from torch.distributed.tensor import DTensor
from transformers import AutoTokenizer, GPT2Config, GPT2LMHeadModel

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from actors.reward_worker import RewardWorker  # noqa: E402
from actors.rollout_worker import RolloutWorker  # noqa: E402
from pipeline.config import load_config  # noqa: E402
from pipeline.data.inputs import load_inputs, with_builtin_defaults  # noqa: E402
from pipeline.driver.actor_group import ActorGroup  # noqa: E402
from pipeline.driver.learner_group import start_learners, submit_train_step  # noqa: E402
from pipeline.models.hf import BUILTIN_MODEL  # noqa: E402
from pipeline.runtime.weights import packed_weights  # noqa: E402


def model_dir(size: str, scratch: Path) -> str:
    """The shipped model, or a randomly initialised ~85M GPT-2 (12 layers of width 768) on its tokenizer."""
    if size == "tiny":
        return str(BUILTIN_MODEL)
    tokenizer = AutoTokenizer.from_pretrained(BUILTIN_MODEL)
    base = GPT2Config.from_pretrained(BUILTIN_MODEL)
    config = GPT2Config(**{**base.to_dict(), "n_embd": 768, "n_layer": 12, "n_head": 12})
    path = scratch / size
    torch.manual_seed(0)
    GPT2LMHeadModel(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return str(path)


def scored_batch(prompts: int):
    config = with_builtin_defaults(load_config(overrides=["seed=0"]))
    table = load_inputs(config)[0].slice(0, prompts)
    table = table.append_column("group_id", pa.array(range(table.num_rows), pa.int64()))
    worker = RolloutWorker(config, str(BUILTIN_MODEL))
    names = list(config.reward.weights)
    scorer = RewardWorker(config, str(BUILTIN_MODEL), names)
    return scorer.score_all(worker.generate(table, group_size=4, step=1), names)[0]


def memory(learner) -> tuple[float, float, float]:
    """(peak, current) resident memory of this process, and the training state it holds (its shards of the weights
    and of Adam's moments), GiB."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux

    def held(t: torch.Tensor) -> int:
        t = t.to_local() if isinstance(t, DTensor) else t
        return t.numel() * t.element_size()

    moments = [v for state in learner.optimizer.state.values() for v in state.values() if v.dim()]
    state = sum(map(held, learner.model.parameters())) + sum(map(held, moments))
    return peak, psutil.Process(os.getpid()).memory_info().rss / 2**30, state / 2**30


def own_shard(learner) -> dict[str, torch.Tensor]:
    """Each rank's shard of every weight (the alternative to gathering them to rank 0: one object per rank)."""
    return {
        k: (v.to_local() if isinstance(v, DTensor) else v).detach().clone()
        for k, v in learner.model.state_dict().items()
    }


def sync_seconds(group: ActorGroup, reps: int = 3) -> tuple[float, float]:
    """Seconds until a reader holds a version's whole weights: (gathered to rank 0 and packed as one object, as the
    pipeline publishes them; each rank's shard as an object of its own, concatenated by the reader)."""
    gathered, shards = [], []
    for _ in range(reps):
        start = time.perf_counter()
        refs = [a.__ray_call__.remote(packed_weights) for a in group.actors]
        ray.get(refs[0]).tensors()
        gathered.append(time.perf_counter() - start)
        start = time.perf_counter()
        parts = ray.get([a.__ray_call__.remote(own_shard) for a in group.actors])
        {
            name: torch.cat([part[name] for part in parts]) if parts[0][name].dim() else parts[0][name]
            for name in parts[0]
        }
        shards.append(time.perf_counter() - start)
        ray.get(refs)
    return statistics.median(gathered), statistics.median(shards)


def measure(path: str, ranks: int, batch, steps: int) -> dict:
    cpus = os.cpu_count() or 1
    overrides = [f"learner.num_workers={ranks}", f"learner.num_cpus={cpus / ranks}", "learner.num_gpus=0"]
    config = load_config(overrides=overrides)
    group = start_learners(config, path, uuid.uuid4().hex[:8], timeout_s=1800)
    try:
        group.get(submit_train_step(group, batch, 1))  # warm-up
        seconds = []
        for step in range(steps):
            start = time.perf_counter()
            metrics = group.get(submit_train_step(group, batch, step + 2))[0]
            seconds.append(time.perf_counter() - start)
        memories = group.get([a.__ray_call__.remote(memory) for a in group.actors])
        sync = sync_seconds(group)
        params = group.get(
            [group.actors[0].__ray_call__.remote(lambda learner: sum(p.numel() for p in learner.model.parameters()))]
        )[0]
    finally:
        group.close()
    return {
        "step_s": statistics.mean(seconds),
        "memories": memories,
        "loss": metrics["loss/policy"],
        "params": params,
        "sync": sync,
    }


# parameters of common open models (their model cards), for the table of what a learner group needs
MODELS = {
    "Qwen2.5-0.5B": 0.49e9,
    "Qwen2.5-1.5B": 1.54e9,
    "Llama-3.2-3B": 3.21e9,
    "Llama-3.1-8B": 8.03e9,
    "Qwen2.5-14B": 14.7e9,
    "Qwen2.5-32B": 32.5e9,
    "Llama-3.1-70B": 70.6e9,
}
# bytes per parameter of the training state, sharded over the ranks: fp32 and bf16-mixed keep fp32 weights (4),
# fp32 gradients (4) and Adam's two fp32 moments (8); bf16 keeps all four in bf16
STATE_BYTES = {"fp32 / bf16-mixed": 16, "bf16": 8}


def memory_table(gpu_gib: float = 80.0, usable: float = 0.7) -> None:
    """Per-rank GiB of the sharded training state (weights, gradients, Adam) for N = 1, 2, 4, 8, and the fewest
    ranks of `gpu_gib` GPUs whose `usable` share holds it (the rest: activations, one gathered block, the
    reference when KL is on, CUDA's own)."""
    ranks = (1, 2, 4, 8)
    print(
        "| model | parameters | precision | "
        + " | ".join(f"N={n} GiB/rank" for n in ranks)
        + f" | N for {gpu_gib:g} GiB |"
    )
    print("|---" * (len(ranks) + 4) + "|")
    for name, params in MODELS.items():
        for precision, per_param in STATE_BYTES.items():
            total = params * per_param / 2**30
            need = next((n for n in (1, 2, 4, 8, 16, 32) if total / n <= usable * gpu_gib), None)
            cells = " | ".join(f"{total / n:.1f}" for n in ranks)
            print(f"| {name} | {params / 1e9:.2f}B | {precision} | {cells} | {need or '>32'} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ranks", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--sizes", nargs="+", default=["tiny", "85m"], choices=["tiny", "85m"])
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--prompts", type=int, default=16)
    parser.add_argument("--memory-table", action="store_true", help="print docs/models.md's table and exit")
    args = parser.parse_args()
    if args.memory_table:
        memory_table()
        return
    ray.init(num_cpus=os.cpu_count(), include_dashboard=False)
    batch = scored_batch(args.prompts)
    print(f"{batch.num_rows} samples per step, {os.cpu_count()} CPUs shared by the ranks, gloo")
    print(
        "| model | parameters | ranks | step s | state per rank GiB | peak RSS per rank GiB | RSS after GiB | "
        "sync: gathered to rank 0 s | sync: a shard per rank s | loss |"
    )
    print("|---" * 10 + "|")
    with tempfile.TemporaryDirectory(prefix="tokenforge-group-bench-") as scratch:
        for size in args.sizes:
            path = model_dir(size, Path(scratch))
            for ranks in args.ranks:
                r = measure(path, ranks, batch, args.steps)
                states, peaks, nows = (", ".join(f"{m[i]:.2f}" for m in r["memories"]) for i in (2, 0, 1))
                print(
                    f"| {size} | {r['params'] / 1e6:.1f}M | {ranks} | {r['step_s']:.2f} | {states} | {peaks} | "
                    f"{nows} | {r['sync'][0]:.3f} | {r['sync'][1]:.3f} | {r['loss']:.6f} |",
                    flush=True,
                )


if __name__ == "__main__":
    main()
