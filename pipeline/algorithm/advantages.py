"""Token-level returns, KL penalties and advantage estimators.

Every function works on (batch, tokens) tensors of *response* tokens, right-padded, with a 0/1
`mask` of the same shape; masked positions of every output are exactly 0. Returns and every
statistic are computed in float64 and advantages are returned in float32. Group statistics treat
values that differ only by rounding as equal, so a group whose samples earned the same rewards
gets advantages that are exactly 0 (no float32 rounding is ever amplified into a signal).
Estimators are registered by name in `ESTIMATORS`; a new one is one decorated function.
The formulas are explained, with the reasons they are unbiased, in docs/algorithms.md.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

STATS_DTYPE = torch.float64  # returns, group statistics and whitening
GROUP_STD_EPS = 1e-6  # grpo: A = (G - mean) / (std + eps); std is the unbiased (n-1) one
WHITEN_EPS = 1e-8  # whitening: A = A / sqrt(var + eps) over all valid tokens (centred first without a baseline)
# Values count as equal when they differ by at most EQUAL_RTOL x the magnitude of the rewards summed into
# them: rewards arrive as float32 (each rounded by up to 6e-8 of itself), so smaller differences are rounding.
EQUAL_RTOL = 1e-6


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
    """G_t = sum_{k>=t, mask_k=1} gamma^(k-t) r_k, and 0 where mask == 0; float64 (STATS_DTYPE)."""
    check_same_shape(token_rewards=token_rewards, mask=mask)
    check_finite("token_rewards", token_rewards, mask)
    valid = mask.bool()
    rewards = torch.where(valid, token_rewards.to(STATS_DTYPE), 0.0)  # padding may hold garbage
    returns = torch.zeros_like(rewards)
    running = torch.zeros(rewards.shape[0], dtype=STATS_DTYPE, device=rewards.device)
    for t in reversed(range(rewards.shape[1])):
        running = rewards[:, t] + gamma * running  # G_t = r_t + gamma * G_{t+1}
        returns[:, t] = running
    return torch.where(valid, returns, 0.0)


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


def masked_whiten(values: torch.Tensor, mask: torch.Tensor, center: bool = True) -> torch.Tensor:
    """(x - mean) / sqrt(var + eps) over all valid tokens of the batch (without `- mean` when not
    `center`, which keeps exact zeros exact); 0 where mask == 0. Float64 statistics."""
    valid = mask.bool()
    values = torch.where(valid, values.to(STATS_DTYPE), 0.0)
    count = valid.sum().clamp(min=1)
    mean = values.sum() / count
    var = torch.where(valid, (values - mean).square(), 0.0).sum() / count
    centred = values - mean if center else values
    return torch.where(valid, centred * torch.rsqrt(var + WHITEN_EPS), 0.0)


def outcome_aligned(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """x~_{j,t}: x_{j,t} up to the sample's last valid token, then the value at that last token.

    Applied to returns: a sample that ended before position t still takes part in the group
    statistics at t with the return of its final token (for a sequence-level reward: the reward
    itself), so that responses of different lengths compare outcomes, not zeros.
    """
    positions = torch.arange(mask.shape[1], device=mask.device).expand_as(mask)
    last = torch.where(mask.bool(), positions, torch.full_like(positions, -1)).max(dim=1).values
    index = torch.minimum(positions, last.clamp(min=0).unsqueeze(1))
    return values.gather(1, index)


class GroupStats:
    """Per-column statistics of `values` (batch, columns) over the samples sharing a group id.

    `magnitude` (same shape, >= 0) is the size of what was summed into each value (e.g. the
    returns-to-go of |r|); `equal` marks the columns where every member of the group holds the
    same value up to EQUAL_RTOL x the largest magnitude, a group of one included. Rows with
    `present` False take no part. Every tensor is float64, (batch, columns), gathered back to each
    sample's own group.
    """

    def __init__(self, values: torch.Tensor, magnitude: torch.Tensor, present: torch.Tensor, group_ids: torch.Tensor):
        if group_ids.dim() != 1 or group_ids.shape[0] != values.shape[0]:
            raise ValueError(f"group_ids must have shape ({values.shape[0]},), got {tuple(group_ids.shape)}")
        _, group = torch.unique(group_ids, return_inverse=True)
        num_groups = int(group.max()) + 1 if group.numel() else 0
        member = present.bool().unsqueeze(1).expand_as(values)
        self.values = torch.where(member, values.to(STATS_DTYPE), 0.0)

        def per_group(x: torch.Tensor, reduce: str, fill: float) -> torch.Tensor:
            x = torch.where(member, x.to(STATS_DTYPE), fill)  # non-members never win a max/min nor add
            out = torch.full((num_groups, x.shape[1]), fill, dtype=STATS_DTYPE, device=x.device)
            index = group.unsqueeze(1).expand_as(x)
            return out.scatter_reduce(0, index, x, reduce=reduce, include_self=True)[group]

        self.count = per_group(torch.ones_like(self.values), "sum", 0.0)  # n_g
        self.total = per_group(self.values, "sum", 0.0)  # sum_j x_{j,t}
        self.mean = self.total / self.count.clamp(min=1.0)
        squared_dev = (self.values - self.mean).square()
        self.std = torch.sqrt(per_group(squared_dev, "sum", 0.0) / (self.count - 1).clamp(min=1.0))  # unbiased
        spread = per_group(self.values, "amax", -torch.inf) - per_group(self.values, "amin", torch.inf)
        self.equal = spread <= EQUAL_RTOL * per_group(magnitude, "amax", 0.0)


def group_stats_of_returns(returns: torch.Tensor, magnitude: torch.Tensor, mask: torch.Tensor, group_ids) -> GroupStats:
    """GroupStats of the outcome-aligned returns G~ at every position (samples with no valid token take no part)."""
    return GroupStats(
        outcome_aligned(returns, mask), outcome_aligned(magnitude, mask), mask.bool().any(dim=1), group_ids
    )


Estimator = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]
ESTIMATORS: dict[str, Estimator] = {}
DEFAULT_WHITEN: dict[str, bool] = {}
GROUP_BASELINE: set[str] = set()  # estimators whose advantages are already centred within each group


def register_estimator(
    name: str, whiten_by_default: bool = False, group_baseline: bool = False
) -> Callable[[Estimator], Estimator]:
    """Register `fn(returns, magnitude, mask, group_ids) -> advantages` (float64) under `name`."""

    def decorate(fn: Estimator) -> Estimator:
        ESTIMATORS[name] = fn
        DEFAULT_WHITEN[name] = whiten_by_default
        if group_baseline:
            GROUP_BASELINE.add(name)
        return fn

    return decorate


@register_estimator("reinforce")
def _reinforce(returns, magnitude, mask, group_ids):
    return returns  # A_t = G_t


@register_estimator("rloo", group_baseline=True)
def _rloo(returns, magnitude, mask, group_ids):
    # A_{i,t} = G_{i,t} - (sum_j G~_{j,t} - G~_{i,t}) / (n - 1); 0 where the group's G~_t are all equal
    # (a group of one included: it has no baseline)
    stats = group_stats_of_returns(returns, magnitude, mask, group_ids)
    leave_one_out = (stats.total - stats.values) / (stats.count - 1).clamp(min=1.0)
    return torch.where(stats.equal, 0.0, returns - leave_one_out)


@register_estimator("grpo", group_baseline=True)
def _grpo(returns, magnitude, mask, group_ids):
    # A_{i,t} = (G_{i,t} - mean_g G~_t) / (std_g G~_t + eps); 0 where the group's G~_t are all equal
    stats = group_stats_of_returns(returns, magnitude, mask, group_ids)
    return torch.where(stats.equal, 0.0, (returns - stats.mean) / (stats.std + GROUP_STD_EPS))


@register_estimator("reinforce++", whiten_by_default=True)
def _reinforce_pp(returns, magnitude, mask, group_ids):
    return returns  # A_t = G_t, then whitened over the batch


@register_estimator("reinforce++_baseline", whiten_by_default=True, group_baseline=True)
def _reinforce_pp_baseline(returns, magnitude, mask, group_ids):
    # A_{i,t} = G_{i,t} - mean_g G~_t (0 where the group's G~_t are all equal), then scaled by the batch std
    stats = group_stats_of_returns(returns, magnitude, mask, group_ids)
    return torch.where(stats.equal, 0.0, returns - stats.mean)


def compute_advantages(
    name: str,
    token_rewards: torch.Tensor,
    mask: torch.Tensor,
    group_ids: torch.Tensor,
    gamma: float = 1.0,
    whiten: bool | None = None,
) -> torch.Tensor:
    """Per-token float32 advantages from per-token rewards (float32 or float64) with the estimator `name`.

    `whiten=None` takes the estimator's default (on for reinforce++ variants, off otherwise).
    Whitening re-centres on the batch mean only for estimators without a group baseline, so a group
    whose samples all earned the same rewards keeps advantages of exactly 0.
    """
    check_known("advantage estimator", name, ESTIMATORS)
    returns = returns_to_go(token_rewards, mask, gamma)
    magnitude = returns_to_go(token_rewards.abs(), mask, gamma)  # sum_{k>=t} gamma^(k-t) |r_k|
    advantages = ESTIMATORS[name](returns, magnitude, mask, group_ids.to(returns.device))
    advantages = torch.where(mask.bool(), advantages, 0.0)
    if DEFAULT_WHITEN[name] if whiten is None else whiten:
        advantages = masked_whiten(advantages, mask, center=name not in GROUP_BASELINE)
    return advantages.to(torch.float32)


def advantages_if_finite(
    name: str,
    token_rewards: torch.Tensor,
    mask: torch.Tensor,
    group_ids: torch.Tensor,
    gamma: float = 1.0,
    whiten: bool | None = None,
) -> tuple[torch.Tensor, bool]:
    """(compute_advantages(...), whether every valid reward and advantage is finite). A NaN/inf valid reward
    gives zeros (float32, shaped like `mask`) and False without computing advantages; finite rewards whose
    advantages overflow float32 give those advantages and False. The learner skips the update when False."""
    valid = mask.bool()
    if not bool(torch.isfinite(token_rewards[valid]).all()):
        return torch.zeros_like(mask), False
    advantages = compute_advantages(name, token_rewards, mask, group_ids, gamma, whiten)
    return advantages, bool(torch.isfinite(advantages[valid]).all())


def informative_rows(
    advantages: torch.Tensor, skip_zero_advantage: bool, kl_coef: float, entropy_coef: float
) -> torch.Tensor:
    """Indices of the rows that need a forward/backward pass: all of them, or (skip_zero_advantage, DAPO-style) those
    with a nonzero advantage on some token. A row whose A_t are all 0 adds no policy-gradient term; with no KL or
    entropy loss (kl_coef = entropy_coef = 0) it adds nothing at all, and as the loss is normalised by the whole
    batch's counts, leaving it out changes the cost, never the gradient."""
    rows = torch.arange(len(advantages), device=advantages.device)
    if skip_zero_advantage and kl_coef == 0 and entropy_coef == 0:
        return rows[(advantages != 0).any(dim=1)]
    return rows
