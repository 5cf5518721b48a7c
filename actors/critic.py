"""Critic: the learned value baseline V(s_t) of algorithm.estimator=gae, trained beside the policy.

A value model (pipeline/models/value.py) on critic.model_path or the policy's starting model, with its own
AdamW at a constant critic.lr and its own files in the run's checkpoint (critic/). The learner reaches it through
a CriticHandle: in its own process (critic.placement=learner) or as a Ray actor of its own (actor). It calls
`values` once per step, before the advantages (V of the batch under the critic as it stands), then `update` once
per minibatch with the value targets R_t = A_t + V(s_t) (pipeline/algorithm/advantages.py::value_targets) and
those values as V_old of the clipped value loss.
"""

from __future__ import annotations

import math
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import ray
import torch

from pipeline.algorithm.loss import value_loss
from pipeline.config import TrainConfig
from pipeline.errors import TokenforgeError
from pipeline.models.hf import micro_batches, mixed_autocast, select_rows
from pipeline.models.lora import trainable_model
from pipeline.models.value import ValueModel
from pipeline.runtime.threads import torch_threads

CRITIC_DIR = "critic"  # the critic's files inside a checkpoint directory
CRITIC_STATE = "critic_state.pt"  # its value head and optimizer


class Critic:
    def __init__(
        self,
        config: TrainConfig,
        policy_base: str,
        device: str,
        checkpoint: str | dict[str, bytes] | None = None,
        own_process: bool = False,
    ):
        """The critic of `config` (config.critic) on `device`, on critic.model_path or else `policy_base` (the
        policy's starting model); `checkpoint`: a checkpoint's critic/ files to continue from (weights, value head
        and optimizer), as a local directory or as its files' bytes (`files()`: an actor on another node gets them
        so). `own_process`: it is an actor of its own (sets its torch threads)."""
        self.config = cfg = config.critic
        self.device = device
        if own_process:
            torch.set_num_threads(torch_threads(cfg.num_threads))
        if isinstance(checkpoint, dict):
            with tempfile.TemporaryDirectory(prefix="tokenforge-critic-") as local:
                write_files(checkpoint, local)
                self._load(config, policy_base, local)
        else:
            self._load(config, policy_base, checkpoint)

    def _load(self, config: TrainConfig, policy_base: str, checkpoint: str | None) -> None:
        """The value model and its optimizer, from a local critic/ directory of a checkpoint when given."""
        cfg, device = self.config, self.device
        base = cfg.model_path or policy_base
        trust = config.model.trust_remote_code
        lm = trainable_model(
            checkpoint or base, base, cfg.lora, trust, device, cfg.precision, cfg.gradient_checkpointing
        )
        self.model = ValueModel(lm)
        self.optimizer = torch.optim.AdamW([p for p in self.model.parameters() if p.requires_grad], lr=self.config.lr)
        if checkpoint is not None:
            state = torch.load(Path(checkpoint) / CRITIC_STATE, map_location=device, weights_only=True)
            self.model.head.load_state_dict(state["head"])
            self.optimizer.load_state_dict(state["optimizer"])

    @torch.no_grad()
    def values(self, sequences: dict[str, torch.Tensor]) -> torch.Tensor:
        """V(s_t) of every response token: (B, R) fp32 (padding positions hold values too; mask them)."""
        sequences = to_device(sequences, self.device)
        with mixed_autocast(self.device, self.config.precision):
            rows = micro_batches(sequences["input_ids"].shape[0], self.config.micro_batch_size)
            return torch.cat([self.model(select_rows(sequences, r)) for r in rows]).float()

    def update(self, sequences, mask, old_values, targets) -> dict[str, float]:
        """One optimizer step on a minibatch: the clipped value loss of (V, V_old = old_values, R = targets)
        normalised by the minibatch's valid tokens, accumulated over micro-batches, its gradient norm clipped to
        critic.grad_clip. A NaN/inf loss or gradient norm skips the step (weights and Adam moments untouched).
        Returns critic/value_loss, critic/clip_frac, critic/grad_norm and critic/skipped (0 or 1)."""
        sequences, mask, old_values, targets = to_device((sequences, mask, old_values, targets), self.device)
        num_tokens = float(mask.sum())
        loss_sum, clipped = 0.0, 0.0
        for rows in micro_batches(mask.shape[0], self.config.micro_batch_size):
            with mixed_autocast(self.device, self.config.precision):
                values = self.model(select_rows(sequences, rows))
            loss, parts = value_loss(
                values, old_values[rows], targets[rows], mask[rows], clip=self.config.clip, num_tokens=num_tokens
            )
            loss.backward()
            loss_sum += float(loss.detach())
            clipped += parts["value_clip_frac"] * float(mask[rows].sum()) / max(num_tokens, 1.0)
        grad_norm = float(torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.config.grad_clip))
        finite = math.isfinite(loss_sum) and math.isfinite(grad_norm)
        if finite:
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return {
            "critic/value_loss": loss_sum,
            "critic/clip_frac": clipped,
            "critic/grad_norm": grad_norm,
            "critic/skipped": float(not finite),
        }

    def save_local(self, directory: str | Path) -> None:
        """The critic's files in `directory` (a checkpoint's critic/): its LM (or LoRA adapters) in HF format, and
        the value head with the optimizer state."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        self.model.lm.save_pretrained(directory)
        state = {"head": self.model.head.state_dict(), "optimizer": self.optimizer.state_dict()}
        torch.save(state, directory / CRITIC_STATE)

    def files(self) -> dict[str, bytes]:
        """The files save_local writes, by relative path."""
        with tempfile.TemporaryDirectory(prefix="tokenforge-critic-") as local:
            self.save_local(local)
            return read_files(local)


def read_files(directory: str | Path) -> dict[str, bytes]:
    return {str(f.relative_to(directory)): f.read_bytes() for f in Path(directory).rglob("*") if f.is_file()}


def write_files(files: dict[str, bytes], directory: str | Path) -> None:
    for name, data in files.items():
        (Path(directory) / name).parent.mkdir(parents=True, exist_ok=True)
        (Path(directory) / name).write_bytes(data)


class CriticHandle:
    """The learner's critic, where critic.placement puts it. `call(method, *args)` starts a call of a Critic method
    and returns a function that waits for its result: the actor computes while the learner goes on (the critic's
    update of a minibatch beside the policy's), in the learner's process the call runs at once. The actor may be on
    another node (under Tune, in the trial's placement group: its bundle is in actor_bundles); its checkpoint files
    travel as bytes. It dies with the learner, its owner; a lost critic fails the learner's step, and the run
    restarts from its last checkpoint."""

    def __init__(
        self, config: TrainConfig, policy_base: str, device: str, checkpoint: str | dict[str, bytes] | None = None
    ):
        """checkpoint: a checkpoint's critic/ files, as a local directory or as their bytes (read_files)."""
        cfg = config.critic
        self.local = self.actor = None
        if cfg.placement == "learner":
            with torch.random.fork_rng(devices=[]):  # the learner's RNG (its minibatches) as with an actor
                self.local = Critic(config, policy_base, device, checkpoint)
            return
        if not ray.is_initialized():
            raise TokenforgeError("critic.placement=actor needs Ray (the learner runs outside it): set it to learner")
        name = ray.get_runtime_context().get_actor_name()
        files = read_files(checkpoint) if isinstance(checkpoint, (str, Path)) else checkpoint
        self.actor = (
            ray.remote(Critic)
            .options(
                name=f"{name}-critic-0" if name else None,  # tests find its process by this name
                num_cpus=cfg.num_cpus,
                num_gpus=cfg.num_gpus or 0,  # null (not decided by the driver, as in tests): the CPU
                max_restarts=0,
            )
            .remote(config, policy_base, "cuda" if cfg.num_gpus else "cpu", files, own_process=True)
        )
        ray.get(self.actor.__ray_ready__.remote())

    def save(self, directory: str | Path) -> None:
        """The critic's files into the local `directory` (a checkpoint's critic/)."""
        if self.actor is None:
            self.local.save_local(directory)
        else:
            write_files(ray.get(self.actor.files.remote()), directory)

    def call(self, method: str, *args) -> Callable[[], Any]:
        if self.actor is None:
            result = getattr(self.local, method)(*args)
            return lambda: result
        ref = getattr(self.actor, method).remote(*to_device(args, "cpu"))  # the actor moves them to its device
        return lambda: ray.get(ref)


def to_device(value, device: str):
    """`value` with every tensor in it (in tuples, lists, dicts) on `device`."""
    if isinstance(value, torch.Tensor):
        return value.to(device)
    if isinstance(value, dict):
        return {k: to_device(v, device) for k, v in value.items()}
    if isinstance(value, (tuple, list)):
        return type(value)(to_device(v, device) for v in value)
    return value
