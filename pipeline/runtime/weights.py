"""Policy weights as the actors hold and exchange them, and the stale-weights error (runs inside the actors).

The learner publishes each version as one PackedWeights object. Its floating-point weights are one numpy byte
buffer, which Ray keeps out of band in the object store, so every rollout worker on a node maps the same
shared-memory pages (ray.get copies nothing) and points its model's weights at them (`adopt`): one copy per
node, however many workers share it. A collective broadcast (pipeline/runtime/broadcast.py) sends the same
flat buffer and receives it into one that the model's weights are typed views of (`flat_weights`).

The functions taking the learner run in its process (`actor.__ray_call__.remote(fn)`, in the actor's call order);
the driver's side of each rollout.weight_sync strategy is pipeline/driver/weight_sync.py.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import numpy as np
import torch

Layout = list[tuple[str, tuple[int, ...], str]]  # (name, shape, dtype) of each tensor, in the order of the flat buffer


class StaleWeights(Exception):
    """A rollout worker asked to generate with weights it does not hold (it was restarted since the sync)."""


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
            raise ValueError(
                f"weight {name!r} has shape {tuple(target.shape)} in the rollout model, {tuple(value.shape)} in the "
                "learner's"
            )
        if not copy and target.dtype != value.dtype:
            raise ValueError(
                f"weight {name!r} is {target.dtype} in the rollout model, {value.dtype} in the learner's published "
                "weights"
            )
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


def packed_weights(learner) -> PackedWeights | None:
    """The learner's weights as a version to publish through the object store (None on a learner group's ranks
    but 0, which only take part in gathering them)."""
    weights = learner.get_weights(copy=False)
    return PackedWeights.pack(weights) if weights else None  # pack() copies them into its flat buffer


def weight_layout(learner) -> Layout:
    """The layout of the learner's published weights."""
    return layout_of(learner.get_weights(copy=False))


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


def published_weights(learner) -> PackedWeights:
    """The weights of the last broadcast (for a rollout worker that joins late, through the object store)."""
    return learner.published
