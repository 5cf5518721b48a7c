"""Token-level returns, KL penalties and advantage estimators.

Every function works on (batch, tokens) tensors of *response* tokens, right-padded, with a 0/1
`mask` of the same shape; masked positions of every output are exactly 0. Returns and every
statistic are computed in float64 and advantages are returned in float32. Group statistics treat
values that differ only by rounding as equal, so a group whose samples earned the same rewards
gets advantages that are exactly 0 (no float32 rounding is ever amplified into a signal).
Estimators are registered by name in `ESTIMATORS`; a new one is one decorated function of an
`EstimatorInputs`. `gae` (and `value_targets`, the critic's regression targets) use a learned V(s_t).
The formulas are explained, with the reasons they are unbiased, in docs/algorithms.md.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

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


def gae(
    token_rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float, lam: float
) -> torch.Tensor:
    """Generalised advantage estimation (Schulman et al. 2016), float64, 0 where mask == 0.

    A_t = sum_{l>=0} (gamma lam)^l delta_{t+l},  delta_t = r_t + gamma V(s_{t+1}) - V(s_t).
    The last valid token of each response is terminal: V(s_{T+1}) = 0, no bootstrap (also for a
    response cut at max_new_tokens, as verl and OpenRLHF do). Padding (rewards and values) may hold
    garbage. A masked position inside a response counts as a reward-0 step worth gamma V(s_{t+1})
    (delta = 0 there), so its position counts in the discount as in `returns_to_go`, and lam = 1 gives
    exactly G_t - V(s_t) for any mask. V is a constant here (detached): no gradient flows into the critic.
    """
    check_same_shape(token_rewards=token_rewards, values=values, mask=mask)
    check_finite("token_rewards", token_rewards, mask)
    check_finite("values", values, mask)
    valid = mask.bool()
    rewards = torch.where(valid, token_rewards.to(STATS_DTYPE), 0.0)
    values = values.detach().to(STATS_DTYPE)  # its padding is never read (the torch.where below)
    advantages = torch.zeros_like(rewards)
    running = torch.zeros(rewards.shape[0], dtype=STATS_DTYPE, device=rewards.device)  # A_{t+1}
    next_value = torch.zeros_like(running)  # V(s_{t+1}); 0 past the last valid token (terminal)
    decay = gamma * lam
    for t in reversed(range(rewards.shape[1])):
        value = torch.where(valid[:, t], values[:, t], gamma * next_value)  # masked: V(s_t) = gamma V(s_{t+1})
        delta = rewards[:, t] + gamma * next_value - value  # delta_t = r_t + gamma V(s_{t+1}) - V(s_t)
        running = delta + decay * running  # A_t = delta_t + gamma lam A_{t+1}
        advantages[:, t] = running
        next_value = value
    return torch.where(valid, advantages, 0.0)


def value_targets(
    token_rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float, lam: float
) -> torch.Tensor:
    """The critic's regression targets R_t = A_t^GAE + V(s_t) (lam = 1: the returns G_t), float64, 0 where
    mask == 0; from the raw GAE advantages, before any whitening."""
    valid = mask.bool()
    advantages = gae(token_rewards, values, mask, gamma, lam)
    return torch.where(valid, advantages + values.detach().to(STATS_DTYPE), 0.0)  # R_t = A_t + V(s_t)


@dataclass(frozen=True)
class EstimatorInputs:
    """What an estimator may use; the (batch, tokens) tensors but `mask` are float64 and 0 where mask == 0."""

    token_rewards: torch.Tensor  # r_t
    returns: torch.Tensor  # G_t = sum_{k>=t} gamma^(k-t) r_k
    magnitude: torch.Tensor  # sum_{k>=t} gamma^(k-t) |r_k| (the size of what was summed into G_t)
    mask: torch.Tensor
    group_ids: torch.Tensor  # (batch,)
    gamma: float
    lam: float
    values: torch.Tensor | None = None  # V(s_t) from a critic, for the estimators in NEEDS_VALUES
    greedy_baseline: torch.Tensor | None = None  # (batch,) bool: the greedy rows, for the estimators in NEEDS_GREEDY


Estimator = Callable[[EstimatorInputs], torch.Tensor]
ESTIMATORS: dict[str, Estimator] = {}
DEFAULT_WHITEN: dict[str, bool] = {}
GROUP_BASELINE: set[str] = set()  # estimators whose advantages are already centred within each group
NEEDS_VALUES: set[str] = set()  # estimators that need V(s_t) (`values=`)
NEEDS_GREEDY: set[str] = set()  # estimators that need each prompt's greedy response scored (`greedy_baseline=`)


def register_estimator(
    name: str,
    whiten_by_default: bool = False,
    group_baseline: bool = False,
    needs_values: bool = False,
    needs_greedy: bool = False,
) -> Callable[[Estimator], Estimator]:
    """Register `fn(x: EstimatorInputs) -> advantages` (float64) under `name`."""

    def decorate(fn: Estimator) -> Estimator:
        ESTIMATORS[name] = fn
        DEFAULT_WHITEN[name] = whiten_by_default
        if group_baseline:
            GROUP_BASELINE.add(name)
        if needs_values:
            NEEDS_VALUES.add(name)
        if needs_greedy:
            NEEDS_GREEDY.add(name)
        return fn

    return decorate


@register_estimator("reinforce")
def _reinforce(x: EstimatorInputs) -> torch.Tensor:
    return x.returns  # A_t = G_t


@register_estimator("rloo", group_baseline=True)
def _rloo(x: EstimatorInputs) -> torch.Tensor:
    # A_{i,t} = G_{i,t} - (sum_j G~_{j,t} - G~_{i,t}) / (n - 1); 0 where the group's G~_t are all equal
    # (a group of one included: it has no baseline)
    stats = group_stats_of_returns(x.returns, x.magnitude, x.mask, x.group_ids)
    leave_one_out = (stats.total - stats.values) / (stats.count - 1).clamp(min=1.0)
    return torch.where(stats.equal, 0.0, x.returns - leave_one_out)


@register_estimator("grpo", group_baseline=True)
def _grpo(x: EstimatorInputs) -> torch.Tensor:
    # A_{i,t} = (G_{i,t} - mean_g G~_t) / (std_g G~_t + eps); 0 where the group's G~_t are all equal
    stats = group_stats_of_returns(x.returns, x.magnitude, x.mask, x.group_ids)
    return torch.where(stats.equal, 0.0, (x.returns - stats.mean) / (stats.std + GROUP_STD_EPS))


@register_estimator("reinforce++", whiten_by_default=True)
def _reinforce_pp(x: EstimatorInputs) -> torch.Tensor:
    return x.returns  # A_t = G_t, then whitened over the batch


@register_estimator("reinforce++_baseline", whiten_by_default=True, group_baseline=True)
def _reinforce_pp_baseline(x: EstimatorInputs) -> torch.Tensor:
    # A_{i,t} = G_{i,t} - mean_g G~_t (0 where the group's G~_t are all equal), then scaled by the batch std
    stats = group_stats_of_returns(x.returns, x.magnitude, x.mask, x.group_ids)
    return torch.where(stats.equal, 0.0, x.returns - stats.mean)


@register_estimator("gae", whiten_by_default=True, needs_values=True)
def _gae(x: EstimatorInputs) -> torch.Tensor:
    # A_t = sum_l (gamma lam)^l delta_{t+l}, then whitened over the batch (centred: no group baseline), as verl and
    # OpenRLHF do; lam = 1 is REINFORCE with a value baseline, A_t = G_t - V(s_t)
    return gae(x.token_rewards, x.values, x.mask, x.gamma, x.lam)


@register_estimator("self_critical", needs_greedy=True)
def _self_critical(x: EstimatorInputs) -> torch.Tensor:
    # SCST (Rennie et al., 2017): A_{i,t} = G_{i,t} - G~^greedy_{g(i),t}, the outcome-aligned return of the greedy
    # response of the sample's prompt at the same position (a sequence-level reward: R_i - R_greedy on every token).
    # 0 on the greedy rows, in a group without one (its greedy response was dropped) and where G and the baseline
    # are equal up to rounding. The baseline does not depend on the sample, so the gradient stays unbiased.
    greedy = x.greedy_baseline
    if not len(greedy):
        return x.returns
    _, group = torch.unique(x.group_ids, return_inverse=True)
    baseline_row = torch.full((int(group.max()) + 1,), -1, dtype=torch.long, device=group.device)  # per group
    rows = torch.nonzero(greedy).squeeze(1)
    baseline_row[group[rows]] = rows
    row = baseline_row[group]  # (batch,): each sample's greedy row, -1 if none
    baseline = outcome_aligned(x.returns, x.mask)[row.clamp(min=0)]
    magnitude = torch.maximum(x.magnitude, outcome_aligned(x.magnitude, x.mask)[row.clamp(min=0)])
    equal = (x.returns - baseline).abs() <= EQUAL_RTOL * magnitude
    scored = ((row >= 0) & ~greedy).unsqueeze(1)
    return torch.where(scored & ~equal, x.returns - baseline, 0.0)


def check_values(name: str, values: torch.Tensor | None, mask: torch.Tensor) -> None:
    """Raise ValueError when the estimator `name` needs values and has none, or `values` is not shaped like `mask`."""
    if values is None:
        if name in NEEDS_VALUES:
            raise ValueError(f"advantage estimator {name!r} needs values V(s_t) from a critic (values=...)")
        return
    check_same_shape(values=values, mask=mask)


def compute_advantages(
    name: str,
    token_rewards: torch.Tensor,
    mask: torch.Tensor,
    group_ids: torch.Tensor,
    gamma: float = 1.0,
    whiten: bool | None = None,
    values: torch.Tensor | None = None,
    lam: float = 1.0,
    greedy_baseline: torch.Tensor | None = None,
) -> torch.Tensor:
    """Per-token float32 advantages from per-token rewards (float32 or float64) with the estimator `name`.

    `whiten=None` takes the estimator's default (on for reinforce++ variants and gae, off otherwise).
    Whitening re-centres on the batch mean only for estimators without a group baseline, so a group
    whose samples all earned the same rewards keeps advantages of exactly 0. `values` (V(s_t), shaped
    like `mask`, finite on valid tokens) and `lam` are used by the estimators in NEEDS_VALUES (gae);
    `greedy_baseline` ((batch,) bool, the rows that are each prompt's greedy response) by those in NEEDS_GREEDY
    (self_critical), which give those rows advantages of 0.
    """
    check_known("advantage estimator", name, ESTIMATORS)
    check_values(name, values, mask)
    if name in NEEDS_GREEDY and greedy_baseline is None:
        raise ValueError(
            f"advantage estimator {name!r} needs the rows of each prompt's greedy response (greedy_baseline)"
        )
    valid = mask.bool()
    returns = returns_to_go(token_rewards, mask, gamma)
    if values is not None:
        check_finite("values", values, mask)
        values = torch.where(valid, values.to(STATS_DTYPE), 0.0)
    inputs = EstimatorInputs(
        token_rewards=torch.where(valid, token_rewards.to(STATS_DTYPE), 0.0),
        returns=returns,
        magnitude=returns_to_go(token_rewards.abs(), mask, gamma),  # sum_{k>=t} gamma^(k-t) |r_k|
        mask=mask,
        group_ids=group_ids.to(returns.device),
        gamma=gamma,
        lam=lam,
        values=values,
        greedy_baseline=None if greedy_baseline is None else greedy_baseline.to(returns.device),
    )
    advantages = torch.where(valid, ESTIMATORS[name](inputs), 0.0)
    if DEFAULT_WHITEN[name] if whiten is None else whiten:  # an estimator with its own baseline is not re-centred
        samples = mask if greedy_baseline is None else mask * ~inputs.greedy_baseline[:, None]  # greedy rows: 0
        advantages = masked_whiten(advantages, samples, center=name not in (GROUP_BASELINE | NEEDS_GREEDY))
    return advantages.to(torch.float32)


def advantages_if_finite(
    name: str,
    token_rewards: torch.Tensor,
    mask: torch.Tensor,
    group_ids: torch.Tensor,
    gamma: float = 1.0,
    whiten: bool | None = None,
    values: torch.Tensor | None = None,
    lam: float = 1.0,
    greedy_baseline: torch.Tensor | None = None,
) -> tuple[torch.Tensor, bool]:
    """(compute_advantages(...), whether every valid reward, value and advantage is finite). A NaN/inf valid reward
    or value gives zeros (float32, shaped like `mask`) and False without computing advantages; finite inputs whose
    advantages overflow float32 give those advantages and False. The learner skips the update when False."""
    check_values(name, values, mask)
    valid = mask.bool()
    inputs = [token_rewards] if values is None else [token_rewards, values]
    if not all(bool(torch.isfinite(x[valid]).all()) for x in inputs):
        return torch.zeros_like(mask), False
    advantages = compute_advantages(name, token_rewards, mask, group_ids, gamma, whiten, values, lam, greedy_baseline)
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
