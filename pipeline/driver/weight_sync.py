"""rollout.weight_sync=collective: the learner broadcasts each policy version to the rollout workers.

The learner (rank 0) and the rollout workers (ranks 1..N) form a `ray.util.collective` group: gloo over
TCP on CPU, NCCL when the learner and every rollout worker compute on a GPU (NCCL needs cupy; not run
on this project's CPU machines). The learner sends the weights in the rollout dtype (model.dtype, LoRA
merged: its get_weights()) as one flat buffer; each worker receives it into a buffer that its model's
weights are views of (`flat_weights`), so the broadcast itself updates the model. A broadcast takes one message per worker along gloo's tree, where the object
store path (rollout.weight_sync=object_store) serves every worker a copy of one object.

The functions below run inside the actors (`actor.__ray_call__.remote(fn, ...)`, in the actor's call
order): a worker receives between two generate calls, never mid-generation. A rollout worker that Ray
restarts is not in the group; the driver gives it the last broadcast version through the object store
(`published_weights`) and forms the group again, with the new process, before the next broadcast.
"""

from __future__ import annotations

import time

import ray
import ray.util.collective as collective
import torch
import torch.distributed as dist

from pipeline.driver.actor_group import ActorGroup
from pipeline.errors import TokenforgeError

Layout = list[tuple[str, tuple[int, ...]]]  # (name, shape) of each tensor, in the order of the flat buffer


def floating(weights: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The floating-point tensors of a state dict: what the broadcast carries (integer buffers never train)."""
    return {name: t for name, t in weights.items() if t.is_floating_point()}


def weight_layout(learner) -> tuple[Layout, str]:
    """(the layout of the learner's published weights, their dtype name)."""
    weights = floating(learner.get_weights())
    return [(name, tuple(t.shape)) for name, t in weights.items()], str(next(iter(weights.values())).dtype)


def join(instance, world_size: int, rank: int, group: str, backend: str, timeout_s: float, layout=None) -> None:
    """Enter the group (every rank at once); a rollout worker also allocates its receive buffer."""
    collective.init_collective_group(world_size, rank, backend=backend, group_name=group, gloo_timeout=int(timeout_s * 1000))
    if layout is not None:
        instance.weight_buffer = flat_weights(instance.model, *layout)


def flat_weights(model: torch.nn.Module, names: Layout, dtype: str) -> torch.Tensor:
    """One buffer for the weights named in `names`, with the model's parameters and buffers re-pointed at its
    slices (their values copied in): a broadcast into it updates the model in place, with no second copy."""
    device = next(model.parameters()).device
    flat = torch.empty(sum(torch.Size(shape).numel() for _, shape in names), dtype=getattr(torch, dtype.removeprefix("torch.")), device=device)
    parameters = dict(model.named_parameters(remove_duplicate=False))
    offset = 0
    for name, shape in names:
        tensor = parameters[name] if name in parameters else model.get_buffer(name)
        if tuple(tensor.shape) != shape:
            raise ValueError(f"weight {name!r} has shape {tuple(tensor.shape)} in the rollout model, {shape} in the learner's")
        view = flat[offset : offset + tensor.numel()].view(shape)
        view.copy_(tensor.detach())
        tensor.data = view  # tied weights (one tensor under two names) end up on the second name's slice
        offset += tensor.numel()
    return flat


def leave(instance, group: str) -> None:
    """Leave the group, and torch.distributed's default group under it (else a new process could not join)."""
    if collective.is_group_initialized(group):
        collective.destroy_collective_group(group)
    if dist.is_initialized():
        dist.destroy_process_group()


def send(learner, group: str, backend: str) -> float:
    """Rank 0: broadcast the current weights as one flat buffer, kept as the last published version."""
    start = time.perf_counter()
    weights = learner.get_weights()
    flat = torch.cat([t.reshape(-1) for t in floating(weights).values()])
    learner.published = weights  # for a worker that joins late (get_weights() made fresh CPU copies)
    collective.broadcast(flat.to(learner.device) if backend == "nccl" else flat, src_rank=0, group_name=group)
    return time.perf_counter() - start


def receive(worker, group: str, version: int) -> float:
    """Rank >= 1: receive a broadcast into the model's weights as policy `version`; returns the seconds taken."""
    start = time.perf_counter()
    collective.broadcast(worker.weight_buffer, src_rank=0, group_name=group)  # straight into the model's weights
    worker.policy_version = version
    return time.perf_counter() - start


def published_weights(learner) -> dict[str, torch.Tensor]:
    """The weights of the last broadcast (for a rollout worker that joins late, through the object store)."""
    return learner.published


def device_of(instance) -> str:
    return str(instance.device)


def nccl_available(_instance) -> bool:
    return collective.nccl_available()


class BroadcastGroup:
    """The driver's side: forms the group, and publishes a version as one send and N receives."""

    def __init__(self, learner: ActorGroup, rollout: ActorGroup, run_id: str, timeout_s: float):
        self.learner, self.rollout = learner, rollout
        self.run_id, self.formations = run_id, 0
        self.name = ""  # the group's name: a new one each time it is formed (no rendezvous key is ever reused)
        # a broadcast that a dead member cut short fails after this long (not after trainer.actor_timeout_s)
        self.timeout_s = min(timeout_s, 120.0)
        self.backend: str | None = None  # nccl when every member computes on a GPU, else gloo
        self.formed = False
        self.sent = False  # a version was broadcast (the learner holds it: published_weights)

    def form(self) -> None:
        """(Re)form the group: every member leaves any earlier one, then all join at once."""
        learner, workers = self.learner.actors[0], self.rollout.actors
        members = [learner, *workers]
        devices = self.rollout.get([m.__ray_call__.remote(device_of) for m in members])
        on_gpu = {d.startswith("cuda") for d in devices}
        if len(on_gpu) > 1 and any(d.startswith("cuda") for d in devices[1:]):
            raise TokenforgeError(
                f"rollout.weight_sync=collective needs the rollout workers on the learner's kind of device (learner: "
                f"{devices[0]}, rollout workers: {', '.join(devices[1:])}); use rollout.weight_sync=object_store"
            )
        self.backend = "nccl" if on_gpu == {True} else "gloo"
        if self.backend == "nccl" and not self.learner.get([learner.__ray_call__.remote(nccl_available)])[0]:
            raise TokenforgeError(
                "rollout.weight_sync=collective between GPUs broadcasts over NCCL, which ray.util.collective reaches "
                "through cupy: pip install cupy-cuda12x on the GPU nodes, or use rollout.weight_sync=object_store"
            )
        self.rollout.get([m.__ray_call__.remote(leave, self.name) for m in members])
        self.formations += 1
        self.name = f"tokenforge-{self.run_id}-weights-{self.formations}"
        layout = self.learner.get([learner.__ray_call__.remote(weight_layout)])[0]
        joins = [
            m.__ray_call__.remote(join, len(members), rank, self.name, self.backend, self.timeout_s, layout if rank else None)
            for rank, m in enumerate(members)
        ]
        self.rollout.get(joins)
        self.formed = True

    def publish(self, version: int) -> tuple[ray.ObjectRef, list[ray.ObjectRef]]:
        """Broadcast the learner's weights as `version`: (the send's ref, each worker's receive ref), not waited for."""
        if not self.formed:
            self.form()
        sending = self.learner.actors[0].__ray_call__.remote(send, self.name, self.backend)
        self.sent = True
        return sending, [w.__ray_call__.remote(receive, self.name, version) for w in self.rollout.actors]
