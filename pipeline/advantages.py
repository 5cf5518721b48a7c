"""Token-level returns, KL penalties and advantage estimators.

Every function works on (batch, tokens) float32 tensors of *response* tokens, right-padded,
with a 0/1 `mask` of the same shape; masked positions of every output are exactly 0.
Estimators are registered by name in `ESTIMATORS`; a new one is one decorated function.
The formulas are explained, with the reasons they are unbiased, in docs/algorithms.md.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

GROUP_STD_EPS = 1e-6  # grpo: A = (G - mean) / (std + eps); std is the unbiased (n-1) one
WHITEN_EPS = 1e-8  # whitening: A = (A - mean) / sqrt(var + eps) over all valid tokens


def check_same_shape(**tensors: torch.Tensor) -> None:
    """Raise ValueError naming every tensor when their shapes differ."""
    shapes = {name: tuple(t.shape) for name, t in tensors.items()}
    if len(set(shapes.values())) > 1:
        listed = ", ".join(f"{name}={shape}" for name, shape in shapes.items())
        raise ValueError(f"shape mismatch: {listed}; all must be (batch, tokens)")


def check_known(kind: str, name: str, known) -> None:
    """Raise ValueError when `name` is not in the registry `known`, listing the known names."""
    if name not in known:
        raise ValueError(f"unknown {kind} {name!r}; known: {', '.join(sorted(known))}")


def check_finite(name: str, values: torch.Tensor, mask: torch.Tensor) -> None:
    """Raise ValueError naming the first sample whose valid entries hold NaN or inf."""
    bad = ~torch.isfinite(values) & mask.bool()
    if bad.any():
        sample, token = (int(i) for i in bad.nonzero()[0])
        raise ValueError(f"{name} holds NaN or inf at sample {sample}, token {token}")


def returns_to_go(token_rewards: torch.Tensor, mask: torch.Tensor, gamma: float = 1.0) -> torch.Tensor:
    """G_t = sum_{k>=t, mask_k=1} gamma^(k-t) r_k, and 0 where mask == 0."""
    check_same_shape(token_rewards=token_rewards, mask=mask)
    check_finite("token_rewards", token_rewards, mask)
    mask = mask.to(torch.float32)
    rewards = torch.where(mask.bool(), token_rewards.to(torch.float32), 0.0)  # padding may hold garbage
    returns = torch.zeros_like(rewards)
    running = torch.zeros(rewards.shape[0], dtype=torch.float32, device=rewards.device)
    for t in reversed(range(rewards.shape[1])):
        running = rewards[:, t] + gamma * running  # G_t = r_t + gamma * G_{t+1}
        returns[:, t] = running
    return returns * mask


KL_KINDS = ("k1", "k2", "k3")


def kl_penalty(logprobs: torch.Tensor, ref_logprobs: torch.Tensor, kind: str = "k1") -> torch.Tensor:
    """Per-token estimate of KL(pi || pi_ref) from the sampled token's log-probs.

    k1 = logp - logp_ref
    k2 = 0.5 * (logp - logp_ref)^2
    k3 = exp(logp_ref - logp) - (logp_ref - logp) - 1   (log-ratio clamped to [-20, 20] so exp stays finite)
    Masking is the caller's job.
    """
    check_known("KL kind", kind, KL_KINDS)
    check_same_shape(logprobs=logprobs, ref_logprobs=ref_logprobs)
    log_ratio = logprobs.to(torch.float32) - ref_logprobs.to(torch.float32)
    if kind == "k1":
        return log_ratio
    if kind == "k2":
        return 0.5 * log_ratio.square()
    ref_over_pi = (-log_ratio).clamp(-20.0, 20.0)  # k3
    return torch.exp(ref_over_pi) - ref_over_pi - 1.0


def masked_whiten(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """(x - mean) / sqrt(var + eps) over all valid tokens of the batch; 0 where mask == 0."""
    mask = mask.to(torch.float32)
    count = mask.sum().clamp(min=1.0)
    mean = (values * mask).sum() / count
    var = ((values - mean).square() * mask).sum() / count
    return (values - mean) * torch.rsqrt(var + WHITEN_EPS) * mask


def outcome_aligned_returns(returns: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """G~_{j,t}: G_{j,t} up to the sample's last valid token, then the return of that last token.

    A sample that ended before position t still takes part in the group statistics at t with
    the return of its final token (for a sequence-level reward: the reward itself), so that
    responses of different lengths compare outcomes, not zeros.
    """
    positions = torch.arange(mask.shape[1], device=mask.device).expand_as(mask)
    last = torch.where(mask.bool(), positions, torch.full_like(positions, -1)).max(dim=1).values
    index = torch.minimum(positions, last.clamp(min=0).unsqueeze(1))
    return returns.gather(1, index)


class GroupStats:
    """Per-position statistics of G~ over the samples sharing a prompt (group id).

    Samples with no valid token take no part. All tensors are (batch, tokens), gathered back
    to each sample's own group.
    """

    def __init__(self, returns: torch.Tensor, mask: torch.Tensor, group_ids: torch.Tensor):
        if group_ids.dim() != 1 or group_ids.shape[0] != returns.shape[0]:
            raise ValueError(
                f"group_ids must have shape ({returns.shape[0]},), got {tuple(group_ids.shape)}"
            )
        _, group = torch.unique(group_ids, return_inverse=True)
        num_groups = int(group.max()) + 1 if group.numel() else 0
        present = mask.bool().any(dim=1).to(torch.float32).unsqueeze(1)  # (B, 1)
        self.values = outcome_aligned_returns(returns, mask) * present

        def per_group_sum(x: torch.Tensor) -> torch.Tensor:
            totals = torch.zeros(num_groups, x.shape[1], dtype=x.dtype, device=x.device)
            return totals.index_add_(0, group, x)[group]

        self.count = per_group_sum(present.expand_as(self.values))  # n_g
        self.total = per_group_sum(self.values)  # sum_j G~_{j,t}
        self.mean = self.total / self.count.clamp(min=1.0)
        squared_dev = (self.values - self.mean).square() * present
        self.std = torch.sqrt(per_group_sum(squared_dev) / (self.count - 1).clamp(min=1.0))


Estimator = Callable[..., torch.Tensor]
ESTIMATORS: dict[str, Estimator] = {}
DEFAULT_WHITEN: dict[str, bool] = {}


def register_estimator(name: str, whiten_by_default: bool = False) -> Callable[[Estimator], Estimator]:
    """Register `fn(returns, mask, group_ids) -> advantages` under `name`."""

    def decorate(fn: Estimator) -> Estimator:
        ESTIMATORS[name] = fn
        DEFAULT_WHITEN[name] = whiten_by_default
        return fn

    return decorate


@register_estimator("reinforce")
def _reinforce(returns, mask, group_ids):
    return returns  # A_t = G_t


@register_estimator("rloo")
def _rloo(returns, mask, group_ids):
    # A_{i,t} = G_{i,t} - (sum_j G~_{j,t} - G~_{i,t}) / (n - 1); a group of one has no baseline -> A = 0
    stats = GroupStats(returns, mask, group_ids)
    leave_one_out = (stats.total - stats.values) / (stats.count - 1).clamp(min=1.0)
    return torch.where(stats.count > 1, returns - leave_one_out, torch.zeros_like(returns))


@register_estimator("grpo")
def _grpo(returns, mask, group_ids):
    # A_{i,t} = (G_{i,t} - mean_g G~_t) / (std_g G~_t + eps); std is 0 for a group of one -> A = 0
    stats = GroupStats(returns, mask, group_ids)
    return (returns - stats.mean) / (stats.std + GROUP_STD_EPS)


@register_estimator("reinforce++", whiten_by_default=True)
def _reinforce_pp(returns, mask, group_ids):
    return returns  # A_t = G_t, then whitened over the batch


@register_estimator("reinforce++_baseline", whiten_by_default=True)
def _reinforce_pp_baseline(returns, mask, group_ids):
    # A_{i,t} = G_{i,t} - mean_g G~_t, then whitened over the batch
    return returns - GroupStats(returns, mask, group_ids).mean


def compute_advantages(
    name: str,
    token_rewards: torch.Tensor,
    mask: torch.Tensor,
    group_ids: torch.Tensor,
    gamma: float = 1.0,
    whiten: bool | None = None,
) -> torch.Tensor:
    """Per-token advantages from per-token rewards with the estimator `name`.

    `whiten=None` takes the estimator's default (on for reinforce++ variants, off otherwise).
    """
    check_known("advantage estimator", name, ESTIMATORS)
    mask = mask.to(torch.float32)
    returns = returns_to_go(token_rewards, mask, gamma)
    advantages = ESTIMATORS[name](returns, mask, group_ids.to(returns.device)) * mask
    if DEFAULT_WHITEN[name] if whiten is None else whiten:
        advantages = masked_whiten(advantages, mask)
    return advantages
