"""Policy-gradient losses over (batch, tokens) response tensors with a 0/1 mask.

`policy_loss` builds a per-token loss l_t (registry `LOSSES`), adds optional KL and entropy
terms, and reduces it with an aggregation mode (registry `AGGREGATIONS`). Every reduction
divides by *global* counts passed in by the caller (`num_tokens`, `num_seqs`), so the gradient
summed over micro-batches equals the gradient of one big batch. `value_loss` is the critic's
(optionally clipped) regression loss on the same counts; `explained_variance` its fit. See docs/algorithms.md.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from pipeline.algorithm.advantages import STATS_DTYPE, check_finite, check_known, check_same_shape, kl_penalty

TokenLoss = Callable[..., tuple[torch.Tensor, dict[str, torch.Tensor]]]
LOSSES: dict[str, TokenLoss] = {}


def register_loss(name: str) -> Callable[[TokenLoss], TokenLoss]:
    def decorate(fn: TokenLoss) -> TokenLoss:
        LOSSES[name] = fn
        return fn

    return decorate


@register_loss("reinforce")
def _reinforce_loss(logprobs, behaviour_logprobs, advantages, is_cap=None, **_):
    # l_t = -A_t * w_t * log pi_theta(y_t), with w_t = min(pi_theta / pi_behaviour, is_cap) detached
    ratio = torch.exp(logprobs.detach() - behaviour_logprobs)
    if is_cap is None:
        return -advantages * logprobs, {"is_weight": ratio, "clipped": torch.zeros_like(ratio)}  # w_t = 1
    weight = ratio.clamp(max=is_cap)
    return -advantages * weight * logprobs, {"is_weight": ratio, "clipped": ratio > is_cap}


@register_loss("ppo_clip")
def _ppo_clip_loss(logprobs, behaviour_logprobs, advantages, clip_low=0.2, clip_high=0.2, **_):
    # l_t = -min(rho_t * A_t, clip(rho_t, 1 - clip_low, 1 + clip_high) * A_t), rho_t = pi_theta / pi_behaviour
    ratio = torch.exp(logprobs - behaviour_logprobs)
    unclipped = ratio * advantages
    clipped = ratio.clamp(1.0 - clip_low, 1.0 + clip_high) * advantages
    return -torch.minimum(unclipped, clipped), {"is_weight": ratio.detach(), "clipped": (clipped < unclipped).detach()}


Aggregation = Callable[[torch.Tensor, torch.Tensor, float, float, float], torch.Tensor]
# l_it = losses[i, t], the loss of response token t of sample i; m = its 0/1 mask, n_i = sum_t m_it
AGGREGATIONS: dict[str, Aggregation] = {
    # sum_{i,t} l_it / N_tokens
    "token-mean": lambda losses, m, tokens, seqs, max_len: (losses * m).sum() / tokens,
    # sum_i (sum_t l_it / n_i) / N_seqs
    "seq-mean-token-mean": lambda losses, m, tokens, seqs, max_len: (
        ((losses * m).sum(1) / m.sum(1).clamp(min=1.0)).sum() / seqs
    ),
    # sum_i sum_t l_it / N_seqs
    "seq-mean-token-sum": lambda losses, m, tokens, seqs, max_len: (losses * m).sum() / seqs,
    # sum_i sum_t l_it / (N_seqs * max_len)   (Dr. GRPO: a fixed length, not each sample's own)
    "seq-mean-token-sum-norm": lambda losses, m, tokens, seqs, max_len: (losses * m).sum() / (seqs * max_len),
}


def policy_loss(
    logprobs: torch.Tensor,
    behaviour_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    agg: str = "token-mean",
    loss: str = "reinforce",
    is_cap: float | None = None,
    *,
    clip_low: float = 0.2,
    clip_high: float = 0.2,
    ref_logprobs: torch.Tensor | None = None,
    kl_coef: float = 0.0,
    kl_kind: str = "k2",
    entropy: torch.Tensor | None = None,
    entropy_coef: float = 0.0,
    num_tokens: float | None = None,
    num_seqs: float | None = None,
    max_len: float | None = None,
) -> tuple[torch.Tensor, dict[str, float]]:
    """Aggregated loss and its metrics (floats: token means over this call's valid tokens).

    total per-token loss = l_t + kl_coef * KL_t(kl_kind) - entropy_coef * H_t
    kl_kind k2 gives the gradient of KL(pi || pi_ref), k3 that of KL(pi_ref || pi); k1 is refused (its
    gradient, kl_coef * grad log pi, is 0 in expectation). Terms with a 0 coefficient are left out.
    num_tokens / num_seqs: the global counts of the whole update (default: this batch's);
    max_len: the fixed length of `seq-mean-token-sum-norm` (default: tokens dimension).
    """
    check_known("loss", loss, LOSSES)
    check_known("aggregation", agg, AGGREGATIONS)
    check_same_shape(logprobs=logprobs, behaviour_logprobs=behaviour_logprobs, advantages=advantages, mask=mask)
    mask = mask.to(torch.float32)
    check_finite("advantages", advantages, mask)
    check_finite("behaviour_logprobs", behaviour_logprobs, mask)
    valid_mask = mask.bool()
    advantages = torch.where(valid_mask, advantages, 0.0)  # padding may hold garbage (inf, NaN):
    behaviour_logprobs = torch.where(valid_mask, behaviour_logprobs, 0.0)  # keep it out of the backward too

    token_loss, parts = LOSSES[loss](
        logprobs, behaviour_logprobs, advantages, is_cap=is_cap, clip_low=clip_low, clip_high=clip_high
    )
    valid = mask.sum().clamp(min=1.0)

    def token_mean(x: torch.Tensor) -> float:
        return float((x.detach().to(torch.float32) * mask).sum() / valid)

    metrics = {"is_weight/mean": token_mean(parts["is_weight"]), "is_weight/clip_frac": token_mean(parts["clipped"])}
    if ref_logprobs is not None:
        check_same_shape(logprobs=logprobs, ref_logprobs=ref_logprobs)
        kl = kl_penalty(logprobs, ref_logprobs, kl_kind)
        metrics["kl"] = token_mean(kl)
        if kl_coef:
            if kl_kind == "k1":  # grad(logp - logp_ref) = grad logp, whose expectation under pi is 0
                raise ValueError("kl_kind 'k1' in the loss has zero expected gradient; use k2 or k3")
            token_loss = token_loss + kl_coef * kl
    elif kl_coef:
        raise ValueError("kl_coef > 0 needs ref_logprobs (enable the reference model)")
    if entropy is None and entropy_coef:
        raise ValueError("entropy_coef > 0 needs the per-token entropy tensor")
    if entropy is not None:
        check_same_shape(logprobs=logprobs, entropy=entropy)
        metrics["entropy"] = token_mean(entropy)
        if entropy_coef:
            token_loss = token_loss - entropy_coef * entropy

    token_loss = torch.where(valid_mask, token_loss, 0.0)
    num_tokens = float(valid) if num_tokens is None else float(num_tokens)
    num_seqs = float(mask.any(dim=1).sum().clamp(min=1.0)) if num_seqs is None else float(num_seqs)
    max_len = float(mask.shape[1]) if max_len is None else float(max_len)
    return AGGREGATIONS[agg](token_loss, mask, num_tokens, num_seqs, max_len), metrics


def value_loss(
    values: torch.Tensor,
    old_values: torch.Tensor,
    targets: torch.Tensor,
    mask: torch.Tensor,
    clip: float | None = None,
    num_tokens: float | None = None,
) -> tuple[torch.Tensor, dict[str, float]]:
    """The critic's loss sum_{valid t} l_t / num_tokens (float32; float64 for float64 values) and its metrics
    (floats, token means over this call's valid tokens: `value_clip_frac`, where the clipped term is strictly the
    larger, and `value_mean`, of V).

    l_t = 0.5 (V_t - R_t)^2, or with `clip` c (PPO value clipping, as in verl and OpenRLHF)
    l_t = 0.5 max((V_t - R_t)^2, (V_old_t + clip(V_t - V_old_t, -c, c) - R_t)^2).
    V = `values` (the critic's, with gradient), V_old = `old_values` (when the batch's values were computed),
    R = `targets` (`value_targets`). num_tokens: the global valid-token count of the whole minibatch (default:
    this call's), so micro-batch gradients sum to the minibatch's. Padding may hold anything (NaN, inf): it
    reaches neither the loss nor the gradient.
    """
    check_same_shape(values=values, old_values=old_values, targets=targets, mask=mask)
    if clip is not None and clip < 0:
        raise ValueError(f"value clip must be >= 0, got {clip}")
    check_finite("old_values", old_values, mask)
    check_finite("targets", targets, mask)
    valid = mask.bool()
    dtype = torch.promote_types(values.dtype, torch.float32)  # float32 for a bf16 critic, float64 stays
    mask = mask.to(dtype)
    # garbage replaced before any arithmetic, so no NaN enters the backward either
    v = torch.where(valid, values.to(dtype), 0.0)
    old = torch.where(valid, old_values.to(dtype), 0.0)
    target = torch.where(valid, targets.to(dtype), 0.0)
    error = (v - target).square()  # (V_t - R_t)^2
    if clip is None:
        token_loss, clipped = 0.5 * error, torch.zeros_like(error, dtype=torch.bool)
    else:
        change = v - old
        # V_old + clip(V - V_old, -c, c), written V + (clip(d) - d) so that it is V to the last bit when unclipped
        v_clipped = v + (change.clamp(-clip, clip) - change)
        error_clipped = (v_clipped - target).square()
        token_loss, clipped = 0.5 * torch.maximum(error, error_clipped), error_clipped > error
    count = mask.sum().clamp(min=1.0)
    num_tokens = float(count) if num_tokens is None else float(num_tokens)
    metrics = {
        "value_clip_frac": float((clipped.float() * mask).sum() / count),
        "value_mean": float((v.detach() * mask).sum() / count),
    }
    return torch.where(valid, token_loss, 0.0).sum() / num_tokens, metrics


def explained_variance(values: torch.Tensor, targets: torch.Tensor, mask: torch.Tensor) -> float:
    """1 - Var(R - V) / Var(R) over the valid tokens (float64): 1 for perfect values, 0 for values no better than the
    targets' mean, negative for worse. Returns 0.0 when Var(R) = 0 (all valid targets equal, or no valid token):
    there is nothing to explain, and the ratio would be 0/0."""
    check_same_shape(values=values, targets=targets, mask=mask)
    valid = mask.bool()
    v = values.detach()[valid].to(STATS_DTYPE)
    r = targets.detach()[valid].to(STATS_DTYPE)
    if r.numel() == 0 or bool(r.max() == r.min()):  # Var(R) = 0 exactly (rounding could make it 1e-35)
        return 0.0
    # population variances: their n / (n - 1) factors would cancel
    return float(1.0 - (r - v).var(correction=0) / r.var(correction=0))
