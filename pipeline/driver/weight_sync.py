"""rollout.weight_sync=collective: the learner broadcasts each policy version to the rollout workers.

The learner (rank 0) and the rollout workers (ranks 1..N) form a `ray.util.collective` group: gloo over
TCP on CPU, NCCL when the learner and every rollout worker compute on a GPU (NCCL needs cupy; not run
on this project's CPU machines). The learner sends the weights as the rollout model holds them (LoRA
merged: its get_weights(), each tensor in the dtype the rollout model loads it in: model.dtype, or fp32 for
what the model class keeps in fp32) as one flat byte buffer; each worker receives it into a buffer that its
model's weights are typed views of (`flat_weights`), so the broadcast itself updates the model. A broadcast takes one message per worker along gloo's tree, where the object
store path (rollout.weight_sync=object_store) serves every worker a copy of one object.

The functions below run inside the actors (`actor.__ray_call__.remote(fn, ...)`, in the actor's call
order): a worker receives between two generate calls, never mid-generation. A rollout worker that Ray
restarts is not in the group; the driver gives it the last broadcast version through the object store
(`published_weights`) and forms the group again, with the new process, before the next broadcast.

rollout.weight_sync=object_store: the learner publishes each version as one PackedWeights object. Its
floating-point weights are one numpy byte buffer, which Ray keeps out of band in the object store, so
every rollout worker on a node maps the same shared-memory pages (ray.get copies nothing) and points its
model's weights at them (`adopt`): one copy per node, however many workers share it.
"""

from __future__ import annotations

import time
import warnings
from dataclasses import dataclass

import numpy as np
import ray
import ray.util.collective as collective
import torch
import torch.distributed as dist

from pipeline.driver.actor_group import ActorGroup
from pipeline.errors import TokenforgeError

Layout = list[tuple[str, tuple[int, ...], str]]  # (name, shape, dtype) of each tensor, in the order of the flat buffer


def floating(weights: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The floating-point tensors of a state dict: what the broadcast carries (integer buffers never train)."""
    return {name: t for name, t in weights.items() if t.is_floating_point()}


def layout_of(weights: dict[str, torch.Tensor]) -> Layout:
    """The flat buffer's layout of a state dict's floating-point tensors, each in its own dtype (a model in bf16
    keeps its MoE router weights in fp32): the widest dtype first, so that every tensor starts at a byte
    offset that is a multiple of its element size (a typed view of the byte buffer needs it)."""
    floats = sorted(floating(weights).items(), key=lambda item: -item[1].element_size())  # stable: state dict order
    return [(name, tuple(t.shape), str(t.dtype)) for name, t in floats]


def split(flat: torch.Tensor, layout: Layout) -> dict[str, torch.Tensor]:
    """The tensors of `layout` as typed views of consecutive slices of the byte buffer `flat` (uint8)."""
    views, offset = {}, 0
    for name, shape, dtype in layout:
        dtype = torch_dtype(dtype)
        size = torch.Size(shape).numel() * dtype.itemsize  # bytes
        views[name] = flat[offset : offset + size].view(dtype).view(shape)
        offset += size
    return views


def adopt(model: torch.nn.Module, tensors: dict[str, torch.Tensor], copy: bool) -> None:
    """Make the model's parameters and buffers named in `tensors` hold their values by re-pointing them
    (`.data`), never by writing into the memory they held (which may be a read-only object-store buffer).
    copy=False: a tensor already on the model's device is used as it is (no copy); the caller must not change
    it afterwards, and its dtype must be the model's own for that weight (a cast would be a new tensor, and
    rounding an fp32-kept weight through bf16 would lose what the learner holds). Weights not named keep
    their values."""
    current = {**dict(model.named_buffers()), **dict(model.named_parameters(remove_duplicate=False))}
    for name, value in tensors.items():
        if name not in current:
            raise ValueError(f"weight {name!r} of the learner is not in the rollout model")
        target = current[name]
        if target.shape != value.shape:
            raise ValueError(f"weight {name!r} has shape {tuple(target.shape)} in the rollout model, {tuple(value.shape)} in the learner's")
        if not copy and target.dtype != value.dtype:
            raise ValueError(f"weight {name!r} is {target.dtype} in the rollout model, {value.dtype} in the learner's published weights")
        target.data = value.to(target.device, target.dtype, copy=copy)  # tied weights: both names get the last one


@dataclass
class PackedWeights:
    """A published policy version: the floating-point weights as one flat byte buffer (`data`: numpy uint8, so
    that the object store shares it between the workers of a node without a copy) in `layout` order, each
    tensor in its own dtype, and the other tensors (integer buffers) as they are."""

    layout: Layout
    data: np.ndarray
    others: dict[str, torch.Tensor]

    @classmethod
    def pack(cls, weights: dict[str, torch.Tensor]) -> PackedWeights:
        layout = layout_of(weights)
        flat = torch.cat([weights[name].reshape(-1).view(torch.uint8) for name, _, _ in layout])
        others = {name: t.clone() for name, t in weights.items() if not t.is_floating_point()}  # not the learner's own
        return cls(layout, flat.numpy(), others)

    def flat(self) -> torch.Tensor:
        """The flat byte buffer as a tensor sharing `data`'s memory (read-only when it came from the object store)."""
        with warnings.catch_warnings():  # torch warns on a read-only array; nothing writes into it (adopt re-points)
            warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
            return torch.from_numpy(self.data)

    def tensors(self) -> dict[str, torch.Tensor]:
        """The state dict, its floating-point tensors views of the flat buffer."""
        return {**split(self.flat(), self.layout), **self.others}


def torch_dtype(name: str) -> torch.dtype:
    return getattr(torch, name.removeprefix("torch."))


def packed_weights(learner) -> PackedWeights:
    """The learner's weights as a version to publish through the object store."""
    return PackedWeights.pack(learner.get_weights(copy=False))  # pack() copies them into its flat buffer


def weight_layout(learner) -> Layout:
    """The layout of the learner's published weights."""
    return layout_of(learner.get_weights(copy=False))


def join(instance, world_size: int, rank: int, group: str, backend: str, timeout_s: float, layout=None) -> None:
    """Enter the group (every rank at once); a rollout worker also allocates its receive buffer."""
    collective.init_collective_group(world_size, rank, backend=backend, group_name=group, gloo_timeout=int(timeout_s * 1000))
    if layout is not None:
        instance.weight_buffer = flat_weights(instance.model, layout)


def flat_weights(model: torch.nn.Module, layout: Layout) -> torch.Tensor:
    """One byte buffer for the weights of `layout`, with the model's parameters and buffers re-pointed at typed
    views of its slices (their values copied in): a broadcast into it updates the model in place, with no
    second copy."""
    device = next(model.parameters()).device
    size = sum(torch.Size(shape).numel() * torch_dtype(dtype).itemsize for _, shape, dtype in layout)
    flat = torch.empty(size, dtype=torch.uint8, device=device)
    views = split(flat, layout)
    values = model.state_dict()  # the tensors the weights hold now (re-pointing leaves them as they are)
    adopt(model, views, copy=False)  # refuses an unknown name, or a shape or dtype that differs
    for name, view in views.items():
        view.copy_(values[name])
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


def published_weights(learner) -> PackedWeights:
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
