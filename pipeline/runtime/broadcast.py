"""rollout.weight_sync=collective, inside the actors: the learner broadcasts each policy version to the rollout
workers.

The learner (rank 0; a learner group's rank 0) and the rollout workers (ranks 1..N) form a group of their own: on
CPU a standalone gloo process group over a TCP store on the learner's node (a `ProcessGroupGloo` object, never
torch.distributed's default group, which a learner group's FSDP2 uses), NCCL through `ray.util.collective` (cupy's
communicators: no torch.distributed group either) when the learner and every rollout worker compute on a GPU (not
run on this project's CPU machines). The learner sends the weights as the rollout model holds them (LoRA merged: its
get_weights(), each tensor in the dtype the rollout model loads it in: model.dtype, or fp32 for what the model class
keeps in fp32) as one flat byte buffer; each worker receives it into a buffer that its model's weights are typed
views of (`flat_weights`), so the broadcast itself updates the model. A broadcast takes one message per worker along
gloo's tree, where the object store path (rollout.weight_sync=object_store) serves every worker a copy of one
object.

The functions below run inside the actors (`actor.__ray_call__.remote(fn, ...)`, in the actor's call order): a
worker receives between two generate calls, never mid-generation. The driver's side, which forms the group and calls
them, is pipeline/driver/weight_sync.py (BroadcastSync)."""

from __future__ import annotations

import time
from datetime import timedelta

import ray.util.collective as collective
import torch
import torch.distributed as dist

from pipeline.runtime.weights import flat_weights, packed_weights


def join(
    instance, world_size: int, rank: int, group: str, backend: str, timeout_s: float, address: str, layout=None
) -> None:
    """Enter the group (every rank at once; gloo meets at `address`, host:port on rank 0's node); a rollout worker
    also allocates its receive buffer."""
    if backend == "gloo":
        host, port = address.rsplit(":", 1)
        timeout = timedelta(seconds=timeout_s)
        store = dist.TCPStore(host, int(port), world_size, is_master=rank == 0, timeout=timeout)  # rank 0 serves it
        instance.sync_group = (store, dist.ProcessGroupGloo(dist.PrefixStore(group, store), rank, world_size, timeout))
    else:
        collective.init_collective_group(world_size, rank, backend=backend, group_name=group)
    if layout is not None:
        instance.weight_buffer = flat_weights(instance.model, layout)


def leave(instance, group: str) -> None:
    """Leave the group (a new process could not join it otherwise)."""
    instance.sync_group = None  # the gloo group and its store go with their last reference
    if collective.is_group_initialized(group):
        collective.destroy_collective_group(group)


def broadcast(instance, tensor: torch.Tensor, group: str) -> None:
    """Rank 0's `tensor` into every rank's `tensor`, over the group this process joined."""
    if getattr(instance, "sync_group", None) is None:
        collective.broadcast(tensor, src_rank=0, group_name=group)
        return
    options = dist.BroadcastOptions()
    options.rootRank = 0
    instance.sync_group[1].broadcast([tensor], options).wait()


def send(learner, group: str, backend: str) -> float:
    """Rank 0: broadcast the current weights as one flat buffer, kept as the last published version (a learner
    group's other ranks take part in gathering them: packed_weights)."""
    start = time.perf_counter()
    learner.published = packed_weights(learner)  # also for a worker that joins late, through the object store
    if learner.published is None:  # a learner group's rank > 0
        return 0.0
    flat = learner.published.flat()
    broadcast(learner, flat.to(learner.device) if backend == "nccl" else flat, group)
    return time.perf_counter() - start


def receive(worker, group: str, version: int) -> float:
    """Rank >= 1: receive a broadcast into the model's weights as policy `version`; returns the seconds taken."""
    start = time.perf_counter()
    broadcast(worker, worker.weight_buffer, group)  # straight into the model's weights
    worker.policy_version = version
    return time.perf_counter() - start


def device_of(instance) -> str:
    return str(instance.device)


def nccl_available(_instance) -> bool:
    return collective.nccl_available()
