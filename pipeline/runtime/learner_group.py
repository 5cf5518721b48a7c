"""The learner group's plumbing (learner.num_workers > 1), inside each learner rank.

The ranks form one torch.distributed process group (gloo on CPU, NCCL on GPUs) and each holds a shard of the
policy with FSDP2 (`fully_shard` per transformer block, the blocks named by the model's `_no_split_modules`, then
the whole model). Every rank reads the whole scored batch, so rewards, normalisation and advantages are those of
the single learner; each rank then runs forward and backward on its own rows of a minibatch (`rank_rows`,
balanced by tokens), with the loss divided by the minibatch's *global* counts, and FSDP2 sums (never averages)
the gradients across ranks: the summed gradient is the single learner's. Every FSDP2 forward and backward is a
collective, so every rank runs as many micro-batches as the rank with the most (`padded_micro_batches`): a rank
with fewer rows runs a zero-weighted one.
"""

from __future__ import annotations

import contextlib
import socket
import warnings
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

import ray
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_optimizer_state_dict,
)
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard
from torch.distributed.tensor import DTensor, distribute_tensor

from pipeline.errors import TokenforgeError


@dataclass(frozen=True)
class Rank:
    """This process's place in the learner group: `rank` of `world` (world 1: the single learner, no group)."""

    rank: int = 0
    world: int = 1

    @property
    def grouped(self) -> bool:
        return self.world > 1


def group_address() -> str:
    """host:port for the group's rendezvous on this node: its Ray address and a port free now."""
    with socket.socket() as probe:
        probe.bind(("", 0))
        port = probe.getsockname()[1]
    return f"{ray.util.get_node_ip_address()}:{port}"


class CollectiveTimeout(RuntimeError):
    """A learner rank gave up waiting in a collective: another rank died or hangs (the run may restart)."""


@contextlib.contextmanager
def collectives_named(rank: Rank, timeout_s: float):
    """A collective of the group that times out, as one line naming this rank and its node."""
    try:
        yield
    except RuntimeError as error:
        if not (rank.grouped and "timed out" in str(error).lower()):
            raise
        raise CollectiveTimeout(
            f"learner rank {rank.rank} of {rank.world} on {ray.util.get_node_ip_address()} waited {timeout_s:.0f}s in "
            "a collective of the learner group (0.9 x trainer.actor_timeout_s): another rank died or hangs"
        ) from None


def join_process_group(address: str, rank: Rank, device: str, timeout_s: float) -> None:
    """Enter the group's default process group (every rank at once): NCCL between GPUs, gloo on CPU. A rank that
    never comes, or a collective that hangs, fails after `timeout_s`."""
    backend = "nccl" if torch.device(device).type == "cuda" else "gloo"
    dist.init_process_group(
        backend,
        init_method=f"tcp://{address}",
        rank=rank.rank,
        world_size=rank.world,
        timeout=timedelta(seconds=timeout_s),
    )


# learner.precision -> FSDP2's mixed precision: the dtype the gathered weights compute in, and the dtype gradients
# are summed in across ranks. The shards (master weights) and the optimizer keep the dtype the model was loaded in:
# fp32, except under bf16 (bf16 weights). bf16-mixed computes in bf16 where the single learner autocasts.
MIXED_PRECISION = {
    "fp32": MixedPrecisionPolicy(),
    "bf16-mixed": MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32),
    "bf16": MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32),
}


def shard_model(model: torch.nn.Module, precision: str, device: str) -> torch.nn.Module:
    """Shard `model` (loaded on the CPU) in place across the process group, each rank's shard moved to `device`,
    computing as learner.precision `precision` says (MIXED_PRECISION; "fp32": in the dtype it was loaded in):
    each transformer block (a module whose class is in the model's `_no_split_modules`) is one FSDP2 unit, the
    rest is the root's. Gradients are summed across ranks (the losses are already divided by global counts), in
    sums only: gloo has no pre-multiplied sum."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model  # a LoRA model's transformer
    blocks = set(getattr(base, "_no_split_modules", None) or [])
    units = [module for module in model.modules() if type(module).__name__ in blocks]
    if not units:  # the root alone would gather the whole model on every device at each forward
        raise TokenforgeError(
            f"learner.num_workers > 1 shards per transformer block, but no module of {type(base).__name__} is one of "
            f"its _no_split_modules ({', '.join(sorted(blocks)) or 'none named'}); use learner.num_workers=1"
        )
    policy = MIXED_PRECISION[precision]
    mesh = init_device_mesh(torch.device(device).type, (dist.get_world_size(),))
    for module in units:
        fully_shard(module, mesh=mesh, mp_policy=policy)
    fully_shard(model, mesh=mesh, mp_policy=policy)
    for module in model.modules():
        if isinstance(module, FSDPModule):
            module.set_gradient_divide_factor(1.0)
            module.set_force_sum_reduction_for_comms(True)
    return model


def rank_rows(tokens: torch.Tensor, world: int) -> list[torch.Tensor]:
    """Each rank's rows of a minibatch: contiguous runs (a group's samples mostly stay together) balanced by
    tokens, row i going to the rank whose share [r/N, (r+1)/N) of the tokens holds the middle of row i's tokens
    (by rows when no row has a token). `tokens`: each row's token count. Some ranks may get no row."""
    rows = len(tokens)
    weights = tokens.double() if float(tokens.sum()) > 0 else torch.ones(rows, dtype=torch.float64)
    ends = weights.cumsum(0)
    middles = (ends - weights / 2) / ends[-1] if rows else ends
    owner = (middles * world).floor().long().clamp(max=world - 1)
    return [torch.nonzero(owner == r).flatten() for r in range(world)]


def padded_micro_batches(counts: list[int], size: int) -> int:
    """Micro-batches every rank runs: those of the rank with the most rows (`counts`: each rank's rows), at
    least one (FSDP2's forward and backward are collectives that every rank must enter)."""
    return max(1, *(-(-n // size) for n in counts))


def sum_across_ranks(values: dict[str, float], device: str) -> dict[str, float]:
    """Each value summed over the ranks (float64, one all-reduce; every rank passes the same keys)."""
    keys = sorted(values)
    stacked = torch.tensor([values[k] for k in keys], dtype=torch.float64, device=device)
    dist.all_reduce(stacked)
    return dict(zip(keys, stacked.tolist()))


def from_rank0(tensor: torch.Tensor | None, shape: tuple, device: str) -> torch.Tensor:
    """Rank 0's fp32 `tensor` on every rank (the others pass None and its shape)."""
    received = tensor.float() if tensor is not None else torch.empty(shape, dtype=torch.float32, device=device)
    dist.broadcast(received, src=0)
    return received


def all_rows(part: torch.Tensor) -> torch.Tensor:
    """The whole tensor from each rank's rows of it (zeros elsewhere): their sum over the ranks (exact)."""
    dist.all_reduce(part)
    return part


def full_state_dict(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The whole (unsharded) state dict on rank 0's CPU, gathered one tensor at a time (a collective: every rank
    calls it; the others get {}), so that no rank ever holds the whole model on its device."""
    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def whole(tensor: torch.Tensor) -> torch.Tensor:
    """A sharded tensor gathered whole onto the CPU (a collective: every rank gets it); any other as it is."""
    return (tensor.full_tensor() if isinstance(tensor, DTensor) else tensor).cpu()


def save_optimizer_shards(model: torch.nn.Module, optimizer: torch.optim.Optimizer, directory: Path) -> None:
    """The optimizer's state as torch.distributed.checkpoint files in the local `directory` (a collective): each
    rank writes its own shard's file, rank 0 also the metadata that maps every shard; any number of ranks, or a
    single learner, reads them back (load_optimizer_whole)."""
    state = get_optimizer_state_dict(model, optimizer)
    dcp.save({"optimizer": state}, storage_writer=dcp.FileSystemWriter(directory))


def load_optimizer_whole(model: torch.nn.Module, optimizer: torch.optim.Optimizer, directory: Path) -> None:
    """Load the optimizer state that save_optimizer_shards wrote (by any number of ranks) into an optimizer over
    a whole (unsharded) model, in this process alone."""
    state = get_optimizer_state_dict(model, optimizer)  # the layout to fill (it makes the state's tensors)
    with warnings.catch_warnings():  # that it reads in one process, which no_dist says
        warnings.filterwarnings("ignore", "torch.distributed is disabled, unavailable or uninitialized")
        dcp.load({"optimizer": state}, storage_reader=dcp.FileSystemReader(directory), no_dist=True)
    set_optimizer_state_dict(model, optimizer, state)


def sharded_optimizer_state(state: dict, optimizer: torch.optim.Optimizer) -> dict:
    """A whole optimizer state (the single learner's, or load_optimizer_whole's) with each tensor of a sharded
    parameter cut into this rank's shard of it, as the parameter is: ready for optimizer.load_state_dict."""
    params = [p for group in optimizer.param_groups for p in group["params"]]

    def shard(value, param):
        if isinstance(param, DTensor) and torch.is_tensor(value) and value.shape == param.shape:
            return distribute_tensor(value.to(param.device), param.device_mesh, param.placements)
        return value  # Adam's step count, or a parameter that is not sharded

    state = dict(state)
    state["state"] = {i: {k: shard(v, params[i]) for k, v in entry.items()} for i, entry in state["state"].items()}
    return state
