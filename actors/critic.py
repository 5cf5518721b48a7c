"""Critic: the learned value baseline V(s_t) of algorithm.estimator=gae, trained beside the policy.

A value model (pipeline/models/value.py) on critic.model_path or the policy's starting model, with its own
AdamW at a constant critic.lr and its own files in the run's checkpoint (critic/). The learner holds it in its
own process (docs/architecture.md says why) and calls `values` once per step, before the advantages (V of the
batch under the critic as it stands), then `update` once per minibatch with the value targets R_t = A_t + V(s_t)
(pipeline/algorithm/advantages.py::value_targets) and those values as V_old of the clipped value loss.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch

from pipeline.algorithm.loss import value_loss
from pipeline.config import TrainConfig
from pipeline.models.hf import micro_batches, mixed_autocast, select_rows
from pipeline.models.lora import trainable_model
from pipeline.models.value import ValueModel

CRITIC_DIR = "critic"  # the critic's files inside a checkpoint directory
CRITIC_STATE = "critic_state.pt"  # its value head and optimizer


class Critic:
    def __init__(self, config: TrainConfig, policy_base: str, device: str, checkpoint: str | None = None):
        """The critic of `config` (config.critic) on `device`, on critic.model_path or else `policy_base` (the
        policy's starting model); `checkpoint`: a local critic/ directory of a checkpoint to continue from
        (weights, value head and optimizer)."""
        self.config = cfg = config.critic
        self.device = device
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
        with mixed_autocast(self.device, self.config.precision):
            rows = micro_batches(sequences["input_ids"].shape[0], self.config.micro_batch_size)
            return torch.cat([self.model(select_rows(sequences, r)) for r in rows]).float()

    def update(self, sequences, mask, old_values, targets) -> dict[str, float]:
        """One optimizer step on a minibatch: the clipped value loss of (V, V_old = old_values, R = targets)
        normalised by the minibatch's valid tokens, accumulated over micro-batches, its gradient norm clipped to
        critic.grad_clip. A NaN/inf loss or gradient norm skips the step (weights and Adam moments untouched).
        Returns critic/value_loss, critic/clip_frac, critic/grad_norm and critic/skipped (0 or 1)."""
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
