"""Per-token rewards for the learner: each component normalised, the weighted sum, the KL-in-reward penalty.

Every function works on (batch, tokens) response tensors, right-padded, with a 0/1 `mask` (as in
advantages.py) and returns float64 (STATS_DTYPE) rewards whose masked positions are exactly 0.
The learner calls them in this order: composite_token_rewards -> kl_in_reward -> advantages.
See docs/algorithms.md.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import NamedTuple

import torch

from pipeline.algorithm.advantages import GROUP_STD_EPS, STATS_DTYPE, GroupStats, kl_penalty

NORMALIZATIONS = ("none", "batch", "group")


def normalize_rewards(
    rewards: torch.Tensor,
    mask: torch.Tensor,
    group_ids: torch.Tensor,
    mode: str,
    counted: torch.Tensor | None = None,
) -> torch.Tensor:
    """Affine-normalise one component's (batch, T) token rewards so that each sample's total
    s_j = sum_t r_{j,t} becomes (s_j - mean) / (std + eps), with mean/std over the batch or the
    sample's group (over the rows `counted` marks, default all: self_critical's greedy rows are normalised with
    their group's statistics but take no part in them). Tokens keep their shape: every r_{j,t} is divided by
    (std + eps) and the mean is taken off the sample's last response token. A group (or batch) whose totals are
    all equal (up to rounding, see pipeline.algorithm.advantages.GroupStats), a group of one included, has no
    spread to divide by: its normalised rewards are 0, like GRPO's advantages for such a group. Float64 out.
    """
    if mode == "none":
        return rewards.to(STATS_DTYPE)
    valid = mask.bool()
    rewards = torch.where(valid, rewards.to(STATS_DTYPE), 0.0)
    totals = rewards.sum(1, keepdim=True)  # s_j, as a (batch, 1) column
    keys = group_ids if mode == "group" else torch.zeros_like(group_ids)
    present = valid.any(dim=1) if counted is None else valid.any(dim=1) & counted
    stats = GroupStats(totals, rewards.abs().sum(1, keepdim=True), present, keys)
    scale = torch.where(stats.equal, 0.0, 1.0 / (stats.std + GROUP_STD_EPS))  # 1 / (std + eps), (batch, 1)
    last = (valid.sum(1) - 1).clamp(min=0)
    shifted = rewards.clone()
    shifted[torch.arange(len(rewards)), last] -= stats.mean[:, 0]
    return torch.where(valid, shifted * scale, 0.0)


class ComponentRewards(NamedTuple):
    """One reward component's scores for a batch, as the learner composes them."""

    weight: float  # w_i (reward.weights: what Tune searches)
    rewards: torch.Tensor  # (batch, T) token rewards r_i, 0 on the rows it does not apply to
    applies: torch.Tensor  # (batch,) bool: the samples it applies to (a None score: not applicable)
    normalize: str  # the component's `normalize` mode (NORMALIZATIONS)


def composite_token_rewards(
    components: Iterable[ComponentRewards],
    mask: torch.Tensor,
    group_ids: torch.Tensor,
    counted: torch.Tensor | None = None,
) -> torch.Tensor:
    """r_t = sum_i w_i * norm_i(r_i)_t in float64, each component normalised over the samples it applies to
    (norm_i: normalize_rewards with its mode, statistics over the `counted` rows; a sample it does not apply to
    gets 0 from it)."""
    token_rewards = torch.zeros_like(mask, dtype=STATS_DTYPE)
    for weight, rewards, applies, mode in components:
        token_rewards += weight * normalize_rewards(rewards, mask * applies[:, None], group_ids, mode, counted)
    return token_rewards


def component_reward_stats(rewards: torch.Tensor, applies: torch.Tensor) -> dict[str, float]:
    """{mean, std} of one raw component's per-sample totals sum_t r_{i,t} over the samples it applies to (std: the
    unbiased one, 0 for a single sample); {} when it applies to none."""
    totals = rewards.sum(1)[applies]
    if not len(totals):
        return {}
    return {"mean": float(totals.mean()), "std": float(totals.std()) if len(totals) > 1 else 0.0}


def kl_in_reward(
    token_rewards: torch.Tensor,
    behaviour_logprobs: torch.Tensor,
    ref_logprobs: torch.Tensor,
    mask: torch.Tensor,
    coef: float,
    kind: str,
) -> torch.Tensor:
    """r_t - beta * KL_t in float64 on the valid tokens (padding unchanged), KL_t = kl_penalty(kind) of the sampling
    (behaviour) policy against the reference, beta = `coef`."""
    kl = kl_penalty(behaviour_logprobs, ref_logprobs, kind).to(STATS_DTYPE)
    return token_rewards - coef * kl * mask
