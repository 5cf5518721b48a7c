"""GPU check: the rollout-worker and learner classes on CUDA, without Ray, for three models.

`tiny` is the shipped addition model; `100m` is a random-init char-level GPT-2 (14 layers x 768,
about 100M parameters); `vlm` the shipped captioning Llava on its task (examples/captioning.yaml: images through the
rollout worker and the learner). For each size and variant (`grpo`: the defaults; `critic`: gae with a critic,
PPO-clipped minibatches, learner and critic in bf16-mixed; `scst_bf16`: the self_critical estimator, bf16 rollout
weights, bf16-mixed learner; the critic is not run on the vlm): generate prompts x group_size samples, score them
with the task's rewards, take learner steps and publish weights to the worker; print one JSON line per step with
times, throughput and peak GPU memory. Falls back to CPU when no GPU is visible. Then the learner group
(`learner.num_workers` = --ranks, default every visible GPU, 2 on CPU; the `group` variant): one process per rank
(torch.multiprocessing, no Ray), NCCL between GPUs or gloo on CPU, train_step on one scored batch and the weights'
gather to rank 0; one JSON line per rank and step with its step time and peak GPU memory. With one GPU the group
runs one rank on it (the multi-rank figures are then CPU figures: run it on CPU with --ranks 2).

    python benchmarks/gpu_check.py [--sizes tiny 100m vlm] [--variants grpo critic scst_bf16 group] [--prompts 64]
        [--steps 3]
        [--ranks N]

On the device machine (no Ray, no pydantic there): bash benchmarks/gpu_check.sh, with pydantic,
pydantic-core, annotated-types and typing-inspection carried as wheels in .whl/.
"""

import argparse
import json
import socket
import tempfile
import time
from pathlib import Path

import pyarrow as pa
import torch

from actors.learner import Learner
from actors.reward_worker import RewardWorker
from actors.rollout_worker import RolloutWorker
from pipeline.config import load_config
from pipeline.data.inputs import with_builtin_defaults
from pipeline.data.loading import load_prompts
from pipeline.models.hf import BUILTIN_MODEL, builtin_paths
from pipeline.models.tiny import make_char_tokenizer, make_tiny_gpt2

CONFIG_FILES = {"vlm": "examples/captioning.yaml"}  # the sizes that run another task than the default's


def config_for(size: str, overrides: list[str]):
    return with_builtin_defaults(load_config(CONFIG_FILES.get(size), overrides=overrides))


def model_dir(size: str, workdir: Path) -> Path:
    if size == "tiny":
        return BUILTIN_MODEL
    if size == "vlm":
        return builtin_paths("captioning")[0]
    tokenizer = make_char_tokenizer("0123456789+=")
    model = make_tiny_gpt2(tokenizer, n_embd=768, n_layer=14, n_head=12, n_positions=64)
    path = workdir / size
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def synchronize() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


VARIANTS = {
    "grpo": [],
    "critic": [
        "algorithm.estimator=gae",
        "algorithm.loss=ppo_clip",
        "learner.minibatches=2",
        "learner.precision=bf16-mixed",
        "critic.precision=bf16-mixed",
        "critic.micro_batch_size=128",
        "critic.placement=learner",  # the actor classes run without Ray here
    ],
    "scst_bf16": ["algorithm.estimator=self_critical", "model.dtype=bfloat16", "learner.precision=bf16-mixed"],
}


def scored_batch(config, path: Path, prompts: int, step: int, worker: RolloutWorker | None = None):
    """(prompts x group_size samples of the task's shipped training prompts, scored; generation seconds)."""
    worker = worker or RolloutWorker(config, str(path))
    scorer = RewardWorker(config, str(path), list(config.reward.weights))
    table = load_prompts(config.data.train_file, "data.train_file").slice(0, prompts)
    table = table.append_column("group_id", pa.array(range(table.num_rows), pa.int64()))
    start = time.time()
    greedy = config.algorithm.estimator == "self_critical"  # its baselines: each prompt's greedy response
    batch = worker.generate(table, config.rollout.group_size, step=step, greedy_baseline=greedy)
    synchronize()
    seconds = time.time() - start
    return scorer.score_all(batch, list(config.reward.weights))[0], seconds


def group_rank(rank: int, ranks: int, port: int, size: str, path: Path, batch: pa.Table, steps: int) -> None:
    """One rank of a learner group (a process of its own): join, then time train_step and the weights' gather."""
    gpu = torch.cuda.is_available()
    if gpu:
        torch.cuda.set_device(rank)
        torch.cuda.reset_peak_memory_stats()
    config = config_for(size, ["learner.micro_batch_size=128", f"learner.num_workers={ranks}"])
    learner = Learner(config, str(path), str(path), use_gpu=gpu)
    learner.join_group(f"127.0.0.1:{port}", rank, ranks)
    params = sum(p.numel() for p in learner.model.parameters())
    for step in range(1, steps + 1):
        start = time.time()
        metrics = learner.train_step(batch)
        synchronize()
        learn_s = time.time() - start
        start = time.time()
        learner.get_weights()  # gathered to rank 0
        synchronize()
        record = {
            "size": size,
            "variant": "group",
            "ranks": ranks,
            "rank": rank,
            "params_M": round(params / 1e6, 1),
            "device": learner.device,
            "step": step,
            "samples": batch.num_rows,
            "learn_s": round(learn_s, 4),
            "gather_s": round(time.time() - start, 4),
            "loss_policy": round(metrics["loss/policy"], 6),
            "grad_norm": round(metrics["loss/grad_norm"], 6),
            "peak_gpu_GiB": round(torch.cuda.max_memory_allocated() / 2**30, 2) if gpu else None,
        }
        print(json.dumps(record), flush=True)


def check_group(size: str, path: Path, prompts: int, steps: int, ranks: int) -> None:
    """The learner group on `ranks` processes, on the batch a single learner would get (generated here)."""
    config = config_for(size, [f"rollout.num_gpus_per_worker={int(torch.cuda.is_available())}"])
    batch, _ = scored_batch(config, path, prompts, step=1)
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    torch.multiprocessing.spawn(group_rank, args=(ranks, port, size, path, batch, steps), nprocs=ranks)


def check(size: str, variant: str, path: Path, prompts: int, steps: int) -> None:
    gpu = torch.cuda.is_available()
    overrides = [f"rollout.num_gpus_per_worker={int(gpu)}", "learner.micro_batch_size=128", *VARIANTS[variant]]
    config = config_for(size, overrides)
    if gpu:
        torch.cuda.reset_peak_memory_stats()
    worker = RolloutWorker(config, str(path))
    learner = Learner(config, str(path), str(path), use_gpu=gpu)
    params = sum(p.numel() for p in learner.model.parameters())
    for step in range(1, steps + 1):
        times = {}
        batch, times["rollout_s"] = scored_batch(config, path, prompts, step, worker)
        start = time.time()
        metrics = learner.train_step(batch)
        synchronize()
        times["learn_s"] = time.time() - start
        start = time.time()
        worker.set_weights(learner.get_weights(), learner.get_version())
        synchronize()
        times["sync_s"] = time.time() - start
        tokens = sum(len(ids) for ids in batch.column("response_ids").to_pylist())
        record = {
            "size": size,
            "variant": variant,
            "params_M": round(params / 1e6, 1),
            "device": worker.device,
            "step": step,
            "samples": batch.num_rows,
            **{k: round(v, 4) for k, v in times.items()},
            "gen_tokens_per_s": round(tokens / times["rollout_s"]),
            "learn_tokens_per_s": round(tokens / times["learn_s"]),
            "reward_total": round(metrics["reward/total/mean"], 4),
            "critic_value_loss": round(metrics["critic/value_loss"], 4) if "critic/value_loss" in metrics else None,
            "peak_gpu_GiB": round(torch.cuda.max_memory_allocated() / 2**30, 2) if gpu else None,
        }
        print(json.dumps(record), flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", nargs="+", default=["tiny", "100m", "vlm"], choices=["tiny", "100m", "vlm"])
    parser.add_argument("--variants", nargs="+", default=[*VARIANTS, "group"], choices=[*VARIANTS, "group"])
    parser.add_argument("--prompts", type=int, default=64)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--ranks", type=int, default=torch.cuda.device_count() or 2, help="learner group ranks")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as workdir:
        for size in args.sizes:
            path = model_dir(size, Path(workdir))
            for variant in args.variants:
                if size == "vlm" and variant == "critic":
                    continue  # a critic for a vision-language model is not supported yet
                if variant == "group":
                    check_group(size, path, args.prompts, args.steps, args.ranks)
                else:
                    check(size, variant, path, args.prompts, args.steps)


if __name__ == "__main__":
    main()
