"""Hand-computed tests of pipeline.algorithm.loss, the REINFORCE gradient identity and micro-batching."""

import math
import re

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from pipeline.algorithm.advantages import kl_penalty
from pipeline.algorithm.loss import AGGREGATIONS, LOSSES, explained_variance, policy_loss, value_loss
from pipeline.models.tiny import make_char_tokenizer, make_tiny_gpt2

T = torch.tensor
LOGP = T([[-1.0, -2.0], [-0.5, 0.0]])
ADV = T([[1.0, 2.0], [3.0, 0.0]])
MASK = T([[1.0, 1.0], [1.0, 0.0]])


@pytest.mark.parametrize(
    "agg, expected",
    [
        ("token-mean", 6.5 / 3),  # per-token losses -A*logp = [1, 4 | 1.5]
        ("seq-mean-token-mean", (2.5 + 1.5) / 2),
        ("seq-mean-token-sum", (5.0 + 1.5) / 2),
        ("seq-mean-token-sum-norm", 6.5 / (2 * 4)),  # max_len = 4
    ],
)
def test_reinforce_aggregations_by_hand(agg, expected):
    loss, metrics = policy_loss(LOGP, LOGP, ADV, MASK, agg=agg, max_len=4)
    assert loss.item() == pytest.approx(expected)
    assert metrics["is_weight/mean"] == pytest.approx(1.0)
    assert metrics["is_weight/clip_frac"] == 0.0


def test_reinforce_truncated_importance_weight():
    behaviour = T([[-1.5, -2.0], [-0.5, 0.0]])  # first token ratio e^0.5 = 1.6487 -> capped at 1.2
    loss, metrics = policy_loss(LOGP, behaviour, ADV, MASK, is_cap=1.2)
    assert loss.item() == pytest.approx((1.2 + 4.0 + 1.5) / 3)
    assert metrics["is_weight/mean"] == pytest.approx((math.exp(0.5) + 2) / 3)
    assert metrics["is_weight/clip_frac"] == pytest.approx(1 / 3)


def test_ppo_clip_by_hand():
    logp, behaviour = T([[-1.0, -1.0]]), T([[-1.5, -1.5]])  # ratio e^0.5 on both tokens
    loss, metrics = policy_loss(logp, behaviour, T([[1.0, -1.0]]), T([[1.0, 1.0]]), loss="ppo_clip", clip_high=0.2)
    # A = 1: -min(1.6487, 1.2) ; A = -1: -min(-1.6487, -1.2) = 1.6487
    assert loss.item() == pytest.approx((-1.2 + math.exp(0.5)) / 2)
    assert metrics["is_weight/clip_frac"] == pytest.approx(0.5)


def test_ppo_clip_low_binds_below_one_minus_eps():
    logp, behaviour = T([[-1.5, -1.5]]), T([[-1.0, -1.0]])  # ratio e^-0.5 = 0.6065 on both tokens
    advantages, mask = T([[-1.0, 1.0]]), T([[1.0, 1.0]])
    loss, metrics = policy_loss(logp, behaviour, advantages, mask, loss="ppo_clip", clip_low=0.3, clip_high=0.2)
    # A = -1: -min(-0.6065, -(1 - 0.3)) = 0.7 (clipped: no gradient) ; A = 1: -min(0.6065, 0.7) = -0.6065
    assert loss.item() == pytest.approx((0.7 - math.exp(-0.5)) / 2)
    assert metrics["is_weight/clip_frac"] == pytest.approx(0.5)
    theta = logp.clone().requires_grad_()
    policy_loss(theta, behaviour, advantages, mask, loss="ppo_clip", clip_low=0.3)[0].backward()
    assert theta.grad[0, 0] == 0.0 and theta.grad[0, 1] != 0.0


def test_kl_and_entropy_terms():
    ref = LOGP - 0.5  # log-ratio 0.5 everywhere: k2 = 0.5 * 0.5^2 = 0.125
    entropy = torch.full_like(LOGP, 2.0)
    loss, metrics = policy_loss(
        LOGP, LOGP, ADV, MASK, ref_logprobs=ref, kl_coef=0.1, kl_kind="k2", entropy=entropy, entropy_coef=0.01
    )
    assert loss.item() == pytest.approx(6.5 / 3 + 0.1 * 0.125 - 0.01 * 2.0)
    assert metrics["kl"] == pytest.approx(0.125)
    assert metrics["entropy"] == pytest.approx(2.0)


def test_kl_loss_gradients_are_kl_gradients():
    """Exact gradients over a 3-token vocabulary (no sampling): E_pi[grad l_t] for each kind against the
    gradient of the divergence it is meant to optimise. k1's expected gradient is 0, so it is refused."""
    theta = torch.tensor([0.3, -1.2, 0.8], requires_grad=True)
    ref = torch.log_softmax(torch.tensor([1.0, 0.0, -0.5]), -1)

    def expected_grad(kind: str) -> torch.Tensor:
        # E_{y~pi}[grad_theta l(y)] with l(y) = KL_kind(logp(y), logp_ref(y)), pi held fixed in the expectation
        probs = torch.softmax(theta, -1).detach()
        total = torch.zeros(3)
        for y in range(3):
            logp = torch.log_softmax(theta, -1)
            kl = kl_penalty(logp[y : y + 1][None], ref[y : y + 1][None], kind)[0, 0]
            total += probs[y] * torch.autograd.grad(kl, theta)[0]
        return total

    def divergence_grad(forward: bool) -> torch.Tensor:
        logp = torch.log_softmax(theta, -1)
        kl = (logp.exp() * (logp - ref)).sum() if forward else (ref.exp() * (ref - logp)).sum()
        return torch.autograd.grad(kl, theta)[0]

    assert torch.allclose(expected_grad("k2"), divergence_grad(forward=True), atol=1e-6)  # KL(pi || ref)
    assert torch.allclose(expected_grad("k3"), divergence_grad(forward=False), atol=1e-6)  # KL(ref || pi)
    assert torch.allclose(expected_grad("k1"), torch.zeros(3), atol=1e-6)
    with pytest.raises(ValueError, match="k1' in the loss has zero expected gradient"):
        policy_loss(LOGP, LOGP, ADV, MASK, ref_logprobs=LOGP, kl_coef=0.1, kl_kind="k1")


def test_entropy_of_minus_inf_logits_is_finite_and_unused_entropy_never_reaches_the_loss():
    from pipeline.models.hf import response_logprobs

    class Masked(torch.nn.Module):  # a model whose vocabulary has banned (-inf) entries, as some do
        def forward(self, input_ids, attention_mask, position_ids):
            logits = torch.zeros(*input_ids.shape, 4)
            logits[..., 3] = float("-inf")
            return type("Out", (), {"logits": logits})

    ids = torch.tensor([[1, 2, 0, 1]])
    sequences = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "position_ids": ids * 0, "prompt_width": 2}
    logprobs, entropy = response_logprobs(Masked(), sequences)
    assert torch.allclose(entropy, torch.full((1, 2), math.log(3.0)))  # uniform over the 3 allowed tokens
    nan_entropy = torch.full_like(LOGP, float("nan"))
    loss, _ = policy_loss(LOGP, LOGP, ADV, MASK, entropy=nan_entropy, entropy_coef=0.0)
    assert loss.item() == pytest.approx(6.5 / 3)


def test_bad_names_and_shapes():
    with pytest.raises(ValueError, match="unknown loss 'dpo'.*ppo_clip"):
        policy_loss(LOGP, LOGP, ADV, MASK, loss="dpo")
    with pytest.raises(ValueError, match="unknown aggregation 'sum'.*token-mean"):
        policy_loss(LOGP, LOGP, ADV, MASK, agg="sum")
    with pytest.raises(ValueError, match=r"advantages=\(2, 1\)"):
        policy_loss(LOGP, LOGP, ADV[:, :1], MASK)
    with pytest.raises(ValueError, match="advantages holds NaN or inf at sample 0, token 1"):
        policy_loss(LOGP, LOGP, T([[1.0, float("inf")], [0.0, 0.0]]), MASK)
    with pytest.raises(ValueError, match="needs ref_logprobs"):
        policy_loss(LOGP, LOGP, ADV, MASK, kl_coef=0.1)


def tiny_model_logprobs(model, ids):
    """log pi(y_t | y_<t) of tokens 1.. of each row: (B, T-1)."""
    logits = model(input_ids=ids).logits[:, :-1]
    return torch.log_softmax(logits, -1).gather(-1, ids[:, 1:, None]).squeeze(-1)


def test_reinforce_gradient_equals_hand_built_estimator():
    torch.manual_seed(0)
    tokenizer = make_char_tokenizer()
    model = make_tiny_gpt2(tokenizer, n_embd=16, n_layer=1, n_head=2)
    ids = torch.randint(3, len(tokenizer), (3, 5))
    mask = T([[1.0, 1.0, 1.0, 1.0], [1.0, 1.0, 0.0, 0.0], [1.0, 0.0, 0.0, 0.0]])
    advantages = torch.randn(3, 4) * mask
    params = [p for p in model.parameters() if p.requires_grad]

    logprobs = tiny_model_logprobs(model, ids)
    loss, _ = policy_loss(logprobs, logprobs.detach(), advantages, mask, agg="token-mean")
    autograd = torch.autograd.grad(loss, params)

    # -(1/N) sum_t A_t grad log pi(y_t), one token at a time
    estimate = [torch.zeros_like(p) for p in params]
    for i, t in mask.nonzero().tolist():
        token_grads = torch.autograd.grad(tiny_model_logprobs(model, ids)[i, t], params)
        for acc, g in zip(estimate, token_grads):
            acc -= advantages[i, t] * g / mask.sum()
    for a, e in zip(autograd, estimate):
        assert torch.allclose(a, e, atol=1e-6)


@pytest.mark.parametrize("agg", sorted(AGGREGATIONS))
@pytest.mark.parametrize("loss_name", ["reinforce", "ppo_clip"])
def test_micro_batches_sum_to_the_full_batch_gradient(agg, loss_name):
    torch.manual_seed(1)
    theta = torch.randn(6, 5, requires_grad=True)  # stands in for a model: logp = log_sigmoid(theta)
    behaviour = torch.nn.functional.logsigmoid(torch.randn(6, 5))
    advantages = torch.randn(6, 5)
    lengths = [5, 1, 3, 4, 2, 5]
    mask = torch.stack([(torch.arange(5) < n).float() for n in lengths])
    counts = {"num_tokens": float(mask.sum()), "num_seqs": 6.0, "max_len": 8.0}

    def loss_of(rows):
        logp = torch.nn.functional.logsigmoid(theta[rows])
        return policy_loss(logp, behaviour[rows], advantages[rows], mask[rows], agg=agg, loss=loss_name, **counts)[0]

    (full,) = torch.autograd.grad(loss_of(slice(0, 6)), theta)
    micro = sum(torch.autograd.grad(loss_of(slice(start, start + 2)), theta)[0] for start in (0, 2, 4))
    assert torch.allclose(full, micro, atol=1e-6)


@settings(max_examples=50, deadline=None)
@given(
    st.integers(1, 4),
    st.integers(1, 5),
    st.sampled_from(sorted(AGGREGATIONS)),
    st.sampled_from(["reinforce", "ppo_clip"]),
    st.integers(0, 10_000),
)
def test_property_padding_never_reaches_loss_or_gradient(rows, width, agg, loss_name, seed):
    generator = torch.Generator().manual_seed(seed)
    lengths = torch.randint(1, width + 1, (rows,), generator=generator)
    mask = (torch.arange(width) < lengths[:, None]).float()
    theta = torch.randn(rows, width, generator=generator, requires_grad=True)
    advantages = torch.randn(rows, width, generator=generator)
    garbage = torch.where(mask.bool(), advantages, torch.full_like(advantages, float("nan")))
    logp = torch.nn.functional.logsigmoid(theta)
    clean, _ = policy_loss(logp, logp.detach(), advantages * mask, mask, agg=agg, loss=loss_name)
    dirty, _ = policy_loss(logp, logp.detach(), garbage, mask, agg=agg, loss=loss_name)
    assert torch.equal(clean, dirty)
    (grad,) = torch.autograd.grad(dirty, theta)
    assert torch.isfinite(grad).all() and torch.equal(grad[mask == 0], torch.zeros(int((mask == 0).sum())))


@settings(max_examples=60, deadline=None)
@given(
    st.integers(2, 6),
    st.integers(1, 5),
    st.sampled_from(sorted(AGGREGATIONS)),
    st.sampled_from(["reinforce", "ppo_clip"]),
    st.integers(0, 10_000),
)
def test_property_leaving_zero_advantage_rows_out_keeps_the_gradient(rows, width, agg, loss_name, seed):
    """skip_zero_advantage: with the whole batch's counts, dropping rows whose advantages are all 0
    changes cost, never the gradient."""
    generator = torch.Generator().manual_seed(seed)
    lengths = torch.randint(1, width + 1, (rows,), generator=generator)
    mask = (torch.arange(width) < lengths[:, None]).float()
    theta = torch.randn(rows, width, generator=generator, requires_grad=True)
    behaviour = torch.nn.functional.logsigmoid(torch.randn(rows, width, generator=generator))
    advantages = torch.randn(rows, width, generator=generator) * mask
    zero = torch.rand(rows, generator=generator) < 0.5
    advantages[zero] = 0.0
    keep = (~zero).nonzero().squeeze(1)
    counts = {"num_tokens": float(mask.sum()), "num_seqs": float(rows), "max_len": float(width)}

    def grad(rows_used) -> torch.Tensor:
        logp = torch.nn.functional.logsigmoid(theta[rows_used])
        loss, _ = policy_loss(
            logp, behaviour[rows_used], advantages[rows_used], mask[rows_used], agg, loss_name, **counts
        )
        return torch.autograd.grad(loss, theta)[0]

    full = grad(torch.arange(rows))
    kept = grad(keep) if len(keep) else torch.zeros_like(theta)
    assert torch.allclose(full, kept, atol=1e-6)
    assert torch.equal(full[zero], torch.zeros_like(full[zero]))


@pytest.mark.mutant
def test_ppo_clip_defaults_to_0_2_on_both_sides():
    logp, behaviour = T([[-1.5, -0.5]]), T([[-1.0, -1.0]])  # ratios e^-0.5 = 0.61 and e^0.5 = 1.65
    advantages, mask = T([[-1.0, 1.0]]), T([[1.0, 1.0]])
    loss, metrics = policy_loss(logp, behaviour, advantages, mask, loss="ppo_clip")
    # A = -1: -min(-0.61, -0.8) = 0.8 ; A = 1: -min(1.65, 1.2) = -1.2
    assert loss.item() == pytest.approx((0.8 - 1.2) / 2)
    assert metrics["is_weight/clip_frac"] == 1.0
    token_loss, parts = LOSSES["ppo_clip"](logp, behaviour, advantages)  # the registered function's own defaults
    assert torch.allclose(token_loss, T([[0.8, -1.2]])) and parts["clipped"].tolist() == [[True, True]]


@pytest.mark.mutant
def test_policy_loss_passes_clip_high_to_ppo():
    """A clip_high other than the default reaches the PPO loss: ratio e^0.3 = 1.35 with A = 1 is clipped at
    1 + 0.1, not at 1 + 0.5."""
    logp, behaviour, advantages, mask = T([[-0.7]]), T([[-1.0]]), T([[1.0]]), T([[1.0]])
    for clip_high, expected in ((0.1, -1.1), (0.5, -math.exp(0.3))):
        loss, _ = policy_loss(logp, behaviour, advantages, mask, loss="ppo_clip", clip_high=clip_high)
        assert loss.item() == pytest.approx(expected, rel=1e-6)


@pytest.mark.mutant
def test_policy_loss_is_float32_whatever_the_masks_type():
    """The mask is converted to float32 first: a bool, int or float64 mask gives the float32 mask's loss and
    metrics, and a float32 loss."""
    logp, behaviour, advantages = T([[-0.5, -1.0, -2.0]]), T([[-0.75, -1.0, -1.5]]), T([[1 / 3, -0.5, 2.0]])
    entropy = torch.tensor([[1 / 3, 0.5, 1 / 7]], dtype=torch.float64)
    reference = policy_loss(
        logp, behaviour, advantages, T([[1.0, 1.0, 0.0]]), agg="seq-mean-token-mean", entropy=entropy
    )
    for dtype in (torch.bool, torch.int64, torch.float64):
        mask = torch.tensor([[1, 1, 0]], dtype=dtype)
        loss, metrics = policy_loss(logp, behaviour, advantages, mask, agg="seq-mean-token-mean", entropy=entropy)
        assert loss.dtype == torch.float32 and torch.equal(loss, reference[0]), dtype
        assert metrics == reference[1]
    # metrics are float32 token means, also of float64 inputs: mean(float32(1/3), float32(1/2))
    assert reference[1]["entropy"] == float((T([1 / 3]) + T([0.5])) / 2)


@pytest.mark.mutant
def test_an_unknown_loss_lists_every_known_one_exactly():
    with pytest.raises(ValueError, match=r"unknown loss 'dpo'; known: ppo_clip, reinforce$"):
        policy_loss(T([[0.0]]), T([[0.0]]), T([[0.0]]), T([[1.0]]), loss="dpo")


@pytest.mark.mutant
def test_k1_in_the_loss_is_refused_naming_k2_and_k3():
    with pytest.raises(ValueError, match=r"kl_kind 'k1' in the loss .*; use k2 or k3"):
        policy_loss(
            T([[-0.5]]), T([[-0.5]]), T([[1.0]]), T([[1.0]]), ref_logprobs=T([[-1.0]]), kl_coef=0.1, kl_kind="k1"
        )


@pytest.mark.mutant
def test_kl_and_entropy_coefficients_without_their_tensors_are_refused_naming_the_tensor():
    args = (T([[-0.5]]), T([[-0.5]]), T([[1.0]]), T([[1.0]]))
    with pytest.raises(ValueError, match=r"kl_coef > 0 needs ref_logprobs \(enable the reference model\)"):
        policy_loss(*args, kl_coef=0.1)
    with pytest.raises(ValueError, match="entropy_coef > 0 needs the per-token entropy tensor"):
        policy_loss(*args, entropy_coef=0.01)


@pytest.mark.mutant
def test_nothing_counts_as_clipped_or_capped_on_policy():
    """On-policy (ratio exactly 1): no PPO clip binds and a cap of exactly 1 does not count as capping."""
    ppo = policy_loss(LOGP, LOGP, ADV, MASK, loss="ppo_clip")[1]
    capped = policy_loss(LOGP, LOGP, ADV, MASK, is_cap=1.0)[1]
    for metrics in (ppo, capped):
        assert metrics["is_weight/mean"] == 1.0 and metrics["is_weight/clip_frac"] == 0.0


@pytest.mark.mutant
def test_kl_in_the_loss_defaults_to_k2():
    ref = LOGP - 0.5
    loss, metrics = policy_loss(LOGP, LOGP, ADV, MASK, ref_logprobs=ref, kl_coef=0.1)
    assert metrics["kl"] == pytest.approx(0.125)  # 0.5 * 0.5^2
    assert loss.item() == pytest.approx(6.5 / 3 + 0.1 * 0.125)


@pytest.mark.mutant
def test_every_shape_mismatch_is_named():
    good = dict(logprobs=LOGP, behaviour_logprobs=LOGP, advantages=ADV, mask=MASK)
    for name in good:
        bad = dict(good, **{name: good[name][:, :1]})  # (2, 1) would broadcast silently
        shapes = ", ".join(f"{k}={(2, 1) if k == name else (2, 2)}" for k in good)
        with pytest.raises(ValueError, match=re.escape(f"{shapes}; all must be (batch, tokens)")):
            policy_loss(**bad)
    for extra in ("ref_logprobs", "entropy"):
        with pytest.raises(ValueError, match=re.escape(f"logprobs=(2, 2), {extra}=(2, 1)")):
            policy_loss(**good, **{extra: LOGP[:, :1]})


@pytest.mark.mutant
def test_non_finite_behaviour_logprobs_are_refused_but_padding_may_hold_anything():
    with pytest.raises(ValueError, match="behaviour_logprobs holds NaN or inf at sample 1, token 0"):
        policy_loss(LOGP, T([[-1.0, -1.0], [float("-inf"), 0.0]]), ADV, MASK)
    garbage = T([[-1.0, -2.0], [-0.5, float("nan")]])
    assert policy_loss(LOGP, garbage, ADV, MASK)[0].item() == pytest.approx(6.5 / 3)


@pytest.mark.mutant
def test_a_single_valid_token_and_a_single_sequence():
    mask = T([[1.0, 0.0]])
    logp, advantages = T([[-2.0, -1.0]]), T([[1.5, 4.0]])
    for agg in ("token-mean", "seq-mean-token-mean", "seq-mean-token-sum"):
        loss, metrics = policy_loss(logp, logp, advantages, mask, agg=agg)
        assert loss.item() == 3.0 and metrics["is_weight/mean"] == 1.0, agg  # -1.5 * -2, over 1 token / 1 sequence


# The critic's loss. Valid tokens: (V, V_old, R) = (1, 1.5, 0), (2, 1, 3), (0, 0, .5); the padding holds garbage.
VALUES = T([[1.0, 2.0], [0.0, math.nan]])
OLD_VALUES = T([[1.5, 1.0], [0.0, math.inf]])
TARGETS = T([[0.0, 3.0], [0.5, -math.inf]])


def test_value_loss_by_hand_with_and_without_clipping():
    loss, metrics = value_loss(VALUES, OLD_VALUES, TARGETS, MASK)
    assert loss.item() == pytest.approx((0.5 * 1 + 0.5 * 1 + 0.5 * 0.25) / 3)  # 0.5 (V - R)^2
    assert metrics == {"value_clip_frac": 0.0, "value_mean": 1.0}
    # c = .2: V_clip = 1.5 - .2 = 1.3 -> (1.3 - 0)^2 = 1.69 > 1 ; 1 + .2 = 1.2 -> (1.2 - 3)^2 = 3.24 > 1 ;
    # 0 + 0 -> .25, equal to the unclipped term: not counted as clipped
    theta = VALUES.clone().requires_grad_()
    loss, metrics = value_loss(theta, OLD_VALUES, TARGETS, MASK, clip=0.2)
    assert loss.item() == pytest.approx(0.5 * (1.69 + 3.24 + 0.25) / 3)
    assert metrics["value_clip_frac"] == pytest.approx(2 / 3)
    (grad,) = torch.autograd.grad(loss, theta)
    # the clipped terms win on tokens 0 and 1 and do not move with V; token 2: (V - R) / 3
    assert torch.equal(grad, T([[0.0, 0.0], [-0.5 / 3, 0.0]]))
    # the clipped term is the smaller one: V = 1, V_old = 0, R = .1 -> V_clip = .2, (.2 - .1)^2 < (1 - .1)^2
    loss, metrics = value_loss(T([[1.0]]), T([[0.0]]), T([[0.1]]), T([[1.0]]), clip=0.2)
    assert loss.item() == pytest.approx(0.5 * 0.81) and metrics["value_clip_frac"] == 0.0


def test_value_loss_and_explained_variance_refuse_bad_input():
    with pytest.raises(ValueError, match=r"values=\(2, 2\), old_values=\(2, 1\), targets=\(2, 2\), mask=\(2, 2\)"):
        value_loss(VALUES, OLD_VALUES[:, :1], TARGETS, MASK)
    with pytest.raises(ValueError, match="value clip must be >= 0, got -0.1"):
        value_loss(VALUES, OLD_VALUES, TARGETS, MASK, clip=-0.1)
    with pytest.raises(ValueError, match="old_values holds NaN or inf at sample 1, token 1"):
        value_loss(VALUES, OLD_VALUES, TARGETS, torch.ones(2, 2))
    with pytest.raises(ValueError, match="targets holds NaN or inf at sample 1, token 1"):
        value_loss(VALUES, OLD_VALUES.nan_to_num(posinf=0.0), TARGETS, torch.ones(2, 2))
    with pytest.raises(ValueError, match=r"values=\(2, 2\), targets=\(2, 1\)"):
        explained_variance(VALUES, TARGETS[:, :1], MASK)


def critic_batch(rows: int, width: int, seed: int):
    """theta (stands in for the critic: V = 3 tanh(theta)), V_old, R and a ragged mask; NaN/inf on padding."""
    generator = torch.Generator().manual_seed(seed)
    lengths = torch.randint(1, width + 1, (rows,), generator=generator)
    mask = (torch.arange(width) < lengths[:, None]).float()
    theta = torch.randn(rows, width, generator=generator).requires_grad_()
    old = 3 * torch.tanh(theta.detach() + 0.3 * torch.randn(rows, width, generator=generator))
    targets = torch.randn(rows, width, generator=generator, dtype=torch.float64) * 2
    padding = ~mask.bool()
    return theta, old.masked_fill(padding, math.inf), targets.masked_fill(padding, math.nan), mask


@settings(max_examples=60, deadline=None)
@given(st.integers(2, 6), st.integers(1, 5), st.sampled_from([None, 0.0, 0.1, 0.5]), st.integers(0, 10_000), st.data())
def test_property_value_loss_micro_batches_sum_to_the_whole_batch(rows, width, clip, seed, data):
    """With the whole minibatch's token count, the micro-batch losses and gradients sum to the whole batch's."""
    theta, old, targets, mask = critic_batch(rows, width, seed)
    split = data.draw(st.integers(1, rows - 1))
    num_tokens = float(mask.sum())

    def loss_of(part: slice) -> torch.Tensor:
        values = 3 * torch.tanh(theta[part])
        return value_loss(values, old[part], targets[part], mask[part], clip, num_tokens)[0]

    whole = loss_of(slice(0, rows))
    micro = [loss_of(slice(0, split)), loss_of(slice(split, rows))]
    assert torch.allclose(whole, sum(micro), rtol=1e-6, atol=1e-6)
    (full,) = torch.autograd.grad(whole, theta)
    summed = sum(torch.autograd.grad(part, theta)[0] for part in micro)
    assert torch.allclose(full, summed, rtol=1e-6, atol=1e-7)


@settings(max_examples=60, deadline=None)
@given(st.integers(1, 4), st.integers(1, 5), st.floats(0.01, 2.0), st.integers(0, 10_000))
def test_property_value_clipping_inside_the_range_is_the_plain_loss_and_padding_never_reaches_it(
    rows, width, clip, seed
):
    """|V - V_old| < c: the clipped loss is the unclipped one (loss, gradient, clip_frac 0); the NaN/inf padding of
    V, V_old and R changes neither loss nor gradient, and the gradient w.r.t. V is 0 on padding."""
    theta, _, targets, mask = critic_batch(rows, width, seed)
    generator = torch.Generator().manual_seed(seed + 1)
    old = theta.detach() + (torch.rand(rows, width, generator=generator) * 2 - 1) * 0.99 * clip  # |V - V_old| < c
    padding = ~mask.bool()
    values = theta + torch.zeros_like(theta).masked_fill(padding, math.nan)  # garbage in V, its backward to theta
    clipped, metrics = value_loss(values, old.masked_fill(padding, -math.inf), targets, mask, clip)
    plain, _ = value_loss(theta, old, targets.masked_fill(padding, 0.0), mask)
    assert torch.equal(clipped, plain) and metrics["value_clip_frac"] == 0.0
    (grad_clipped,) = torch.autograd.grad(clipped, theta)
    (grad_plain,) = torch.autograd.grad(plain, theta)
    assert torch.equal(grad_clipped, grad_plain)
    assert torch.equal(grad_clipped[padding], torch.zeros(int(padding.sum())))


def test_explained_variance_by_hand():
    mask = T([[1.0, 1.0, 1.0, 0.0]])
    targets = T([[1.0, 2.0, 3.0, math.nan]], dtype=torch.float64)
    assert explained_variance(targets.float().nan_to_num(7.0), targets, mask) == 1.0  # perfect values
    # R - V = [0, 0, 1]: Var = 2/9 ; Var(R) = 2/3 -> 1 - 1/3
    assert explained_variance(T([[1.0, 2.0, 2.0, math.inf]]), targets, mask) == pytest.approx(2 / 3, abs=1e-12)
    assert explained_variance(T([[2.0, 2.0, 2.0, 0.0]]), targets, mask) == 0.0  # the mean: explains nothing
    # constant targets (Var(R) = 0, here 0.1 whose float mean is not exactly 0.1) and no valid token: 0.0, no NaN
    assert explained_variance(T([[0.0, 1.0, 2.0, 0.0]]), torch.full((1, 4), 0.1), mask) == 0.0
    assert explained_variance(T([[1.0]]), T([[2.0]]), T([[0.0]])) == 0.0
