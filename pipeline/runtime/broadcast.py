"""rollout.weight_sync=collective, inside the actors: the learner broadcasts each policy version to the rollout workers.

The learner (rank 0) and the rollout workers (ranks 1..N) form a `ray.util.collective` group: gloo over
TCP on CPU, NCCL when the learner and every rollout worker compute on a GPU (NCCL needs cupy; not run
on this project's CPU machines). The learner sends the weights as the rollout model holds them (LoRA
merged: its get_weights(), each tensor in the dtype the rollout model loads it in: model.dtype, or fp32 for
what the model class keeps in fp32) as one flat byte buffer; each worker receives it into a buffer that its
model's weights are typed views of (`flat_weights`), so the broadcast itself updates the model. A broadcast
takes one message per worker along gloo's tree, where the object store path (rollout.weight_sync=object_store)
serves every worker a copy of one object.

The functions below run inside the actors (`actor.__ray_call__.remote(fn, ...)`, in the actor's call
order): a worker receives between two generate calls, never mid-generation. The driver's side, which forms
the group and calls them, is pipeline/driver/weight_sync.py (BroadcastSync).
"""

from __future__ import annotations

import time

import ray.util.collective as collective
import torch.distributed as dist

from pipeline.runtime.weights import flat_weights, packed_weights


def join(instance, world_size: int, rank: int, group: str, backend: str, timeout_s: float, layout=None) -> None:
    """Enter the group (every rank at once); a rollout worker also allocates its receive buffer."""
    collective.init_collective_group(
        world_size, rank, backend=backend, group_name=group, gloo_timeout=int(timeout_s * 1000)
    )
    if layout is not None:
        instance.weight_buffer = flat_weights(instance.model, layout)


def leave(instance, group: str) -> None:
    """Leave the group, and torch.distributed's default group under it (else a new process could not join)."""
    if collective.is_group_initialized(group):
        collective.destroy_collective_group(group)
    if dist.is_initialized():
        dist.destroy_process_group()


def send(learner, group: str, backend: str) -> float:
    """Rank 0: broadcast the current weights as one flat buffer, kept as the last published version."""
    start = time.perf_counter()
    learner.published = packed_weights(learner)  # also for a worker that joins late, through the object store
    flat = learner.published.flat()
    collective.broadcast(flat.to(learner.device) if backend == "nccl" else flat, src_rank=0, group_name=group)
    return time.perf_counter() - start


def receive(worker, group: str, version: int) -> float:
    """Rank >= 1: receive a broadcast into the model's weights as policy `version`; returns the seconds taken."""
    start = time.perf_counter()
    collective.broadcast(worker.weight_buffer, src_rank=0, group_name=group)  # straight into the model's weights
    worker.policy_version = version
    return time.perf_counter() - start


def device_of(instance) -> str:
    return str(instance.device)


def nccl_available(_instance) -> bool:
    return collective.nccl_available()
