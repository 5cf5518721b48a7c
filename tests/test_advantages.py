"""Hand-computed and property tests of pipeline.algorithm.advantages."""

import math

import pytest
import torch
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from pipeline.algorithm.advantages import (
    DEFAULT_WHITEN,
    ESTIMATORS,
    GROUP_BASELINE,
    NEEDS_GREEDY,
    NEEDS_VALUES,
    GroupStats,
    advantages_if_finite,
    compute_advantages,
    gae,
    kl_penalty,
    masked_whiten,
    outcome_aligned,
    returns_to_go,
    value_targets,
)

T = torch.tensor
GROUP_ESTIMATORS = sorted(GROUP_BASELINE)  # rloo, grpo, reinforce++_baseline


def R(rows):
    """Expected returns: float64, as returns_to_go gives them."""
    return torch.tensor(rows, dtype=torch.float64)


def some_values(shape) -> torch.Tensor:
    """Fixed V(s_t) (float64, non-dyadic) for the tests that run every estimator, gae included."""
    return torch.sin(torch.arange(math.prod(shape), dtype=torch.float64).reshape(shape) * 1.7 + 0.3) * 2


def values_for(name: str, mask: torch.Tensor, groups: torch.Tensor) -> dict:
    """values= or greedy_baseline= (each group's first row) for the estimators that need them, nothing for the
    others."""
    if name in NEEDS_GREEDY:
        first = torch.ones(len(groups), dtype=torch.bool)
        first[1:] = groups[1:] != groups[:-1]
        return {"greedy_baseline": first}
    return {"values": some_values(mask.shape)} if name in NEEDS_VALUES else {}


def test_returns_to_go_discounted_and_ragged():
    rewards = T([[1.0, 2.0, 3.0], [4.0, 5.0, 9.0]])
    mask = T([[1.0, 1.0, 1.0], [1.0, 1.0, 0.0]])
    # row 0: G2 = 3, G1 = 2 + .5*3 = 3.5, G0 = 1 + .5*3.5 = 2.75 ; row 1: G1 = 5, G0 = 4 + 2.5, padding 0
    assert torch.equal(returns_to_go(rewards, mask, gamma=0.5), R([[2.75, 3.5, 3.0], [6.5, 5.0, 0.0]]))


def test_returns_to_go_skips_masked_rewards_but_counts_their_positions():
    rewards, mask = T([[1.0, 2.0, 3.0]]), T([[1.0, 0.0, 1.0]])
    assert torch.equal(returns_to_go(rewards, mask), R([[4.0, 0.0, 3.0]]))
    # gamma^(k-t): G0 = 1 + 0.5^2 * 3
    assert torch.equal(returns_to_go(rewards, mask, gamma=0.5), R([[1.75, 0.0, 3.0]]))


def test_kl_kinds_by_hand():
    logp, ref = T([[-1.0]]), T([[-2.0]])
    assert kl_penalty(logp, ref, "k1").item() == pytest.approx(1.0)
    assert kl_penalty(logp, ref, "k2").item() == pytest.approx(0.5)
    assert kl_penalty(logp, ref, "k3").item() == pytest.approx(math.exp(-1.0))  # e^-1 - (-1) - 1
    assert kl_penalty(ref, ref, "k3").item() == 0.0


# Sequence-level rewards on the last token, ragged lengths: group 0 = A (len 2, r=1), B (len 3, r=0),
# C (len 1, r=0.5); group 1 = D alone (len 2, r=2).
SEQ_REWARDS = T([[0.0, 1.0, 0.0], [0.0, 0.0, 0.0], [0.5, 0.0, 0.0], [0.0, 2.0, 0.0]])
SEQ_MASK = T([[1.0, 1.0, 0.0], [1.0, 1.0, 1.0], [1.0, 0.0, 0.0], [1.0, 1.0, 0.0]])
SEQ_GROUPS = torch.tensor([7, 7, 7, 3])


def test_rloo_sequence_level_equals_classic_leave_one_out():
    adv = compute_advantages("rloo", SEQ_REWARDS, SEQ_MASK, SEQ_GROUPS)
    # A: 1 - (0 + .5)/2 ; B: 0 - (1 + .5)/2 ; C: .5 - (1 + 0)/2 ; D: group of one -> 0
    expected = T([[0.75, 0.75, 0.0], [-0.75, -0.75, -0.75], [0.0, 0.0, 0.0], [0.0, 0.0, 0.0]])
    assert torch.allclose(adv, expected)


def test_grpo_sequence_level_equals_classic_group_norm():
    adv = compute_advantages("grpo", SEQ_REWARDS, SEQ_MASK, SEQ_GROUPS)
    # group 0: mean .5, unbiased std sqrt((.25 + .25 + 0) / 2) = .5
    a, b = 0.5 / (0.5 + 1e-6), -0.5 / (0.5 + 1e-6)
    expected = T([[a, a, 0.0], [b, b, b], [0.0, 0.0, 0.0], [0.0, 0.0, 0.0]])
    assert torch.allclose(adv, expected)


# Token-level rewards, one group: X = [1, 0, 1] (len 3), Y = [0, 1] (len 2).
TOK_REWARDS = T([[1.0, 0.0, 1.0], [0.0, 1.0, 0.0]])
TOK_MASK = T([[1.0, 1.0, 1.0], [1.0, 1.0, 0.0]])
ONE_GROUP = torch.tensor([0, 0])


def test_rloo_token_level_position_aligned_baseline():
    # G_X = [2, 1, 1], G_Y = [1, 1] -> G~_Y = [1, 1, 1]; A_X = G_X - G~_Y, A_Y = G_Y - G_X[:2]
    adv = compute_advantages("rloo", TOK_REWARDS, TOK_MASK, ONE_GROUP)
    assert torch.allclose(adv, T([[1.0, 0.0, 0.0], [-1.0, 0.0, 0.0]]))


def test_rloo_token_level_with_discount():
    # gamma .5: G_X = [1.25, .5, 1], G_Y = [.5, 1] -> G~_Y = [.5, 1, 1]
    adv = compute_advantages("rloo", TOK_REWARDS, TOK_MASK, ONE_GROUP, gamma=0.5)
    assert torch.allclose(adv, T([[0.75, -0.5, 0.0], [-0.75, 0.5, 0.0]]))


def test_reinforce_is_returns_to_go():
    adv = compute_advantages("reinforce", TOK_REWARDS, TOK_MASK, ONE_GROUP)
    assert torch.equal(adv, T([[2.0, 1.0, 1.0], [1.0, 1.0, 0.0]]))


def test_reinforce_pp_whitens_over_valid_tokens():
    # G over valid tokens = [2, 1, 1, 1, 1]: mean 1.2, var .16 -> (G - 1.2) / .4
    adv = compute_advantages("reinforce++", TOK_REWARDS, TOK_MASK, ONE_GROUP)
    expected = T([[2.0, -0.5, -0.5], [-0.5, -0.5, 0.0]])
    assert torch.allclose(adv, expected, atol=1e-5)
    raw = compute_advantages("reinforce++", TOK_REWARDS, TOK_MASK, ONE_GROUP, whiten=False)
    assert torch.equal(raw, T([[2.0, 1.0, 1.0], [1.0, 1.0, 0.0]]))


def test_reinforce_pp_baseline_subtracts_group_mean_then_whitens():
    # G~ = [[2, 1, 1], [1, 1, 1]]: group mean per position [1.5, 1, 1]
    raw = compute_advantages("reinforce++_baseline", TOK_REWARDS, TOK_MASK, ONE_GROUP, whiten=False)
    assert torch.allclose(raw, T([[0.5, 0.0, 0.0], [-0.5, 0.0, 0.0]]))
    whitened = compute_advantages("reinforce++_baseline", TOK_REWARDS, TOK_MASK, ONE_GROUP)
    # the group baseline already centres: whitening only divides by the batch std, so zeros stay exact
    # (valid values [.5, 0, 0, -.5, 0]: mean 0, var .1)
    scale = 1 / math.sqrt(0.1 + 1e-8)
    assert torch.allclose(whitened, raw * scale, atol=1e-5)
    assert torch.equal(whitened[raw == 0], torch.zeros(int((raw == 0).sum())))


@pytest.mark.parametrize("name", ["rloo", "grpo", "reinforce++_baseline"])
def test_all_equal_group_has_zero_advantage(name):
    rewards = T([[0.0, 1.0], [0.0, 1.0], [1.0, 0.0]])
    mask = T([[1.0, 1.0], [1.0, 1.0], [1.0, 0.0]])
    adv = compute_advantages(name, rewards, mask, torch.tensor([0, 0, 0]), whiten=False)
    assert torch.equal(adv, torch.zeros_like(adv))


@pytest.mark.parametrize("name", ["rloo", "grpo"])
def test_group_of_one_has_zero_advantage(name):
    adv = compute_advantages(name, T([[0.0, 3.0]]), T([[1.0, 1.0]]), torch.tensor([5]))
    assert torch.equal(adv, torch.zeros(1, 2))


def test_bad_input_errors_name_the_offender():
    with pytest.raises(ValueError, match="unknown advantage estimator 'ppo'.*grpo"):
        compute_advantages("ppo", TOK_REWARDS, TOK_MASK, ONE_GROUP)
    with pytest.raises(ValueError, match=r"token_rewards=\(2, 3\), mask=\(2, 2\)"):
        returns_to_go(TOK_REWARDS, TOK_MASK[:, :2])
    with pytest.raises(ValueError, match="NaN or inf at sample 1, token 0"):
        returns_to_go(T([[1.0, 0.0], [float("nan"), 0.0]]), T([[1.0, 1.0], [1.0, 0.0]]))
    with pytest.raises(ValueError, match=r"group_ids must have shape \(2,\)"):
        compute_advantages("grpo", TOK_REWARDS, TOK_MASK, torch.tensor([0, 0, 1]))
    with pytest.raises(ValueError, match="unknown KL kind 'k4'"):
        kl_penalty(TOK_REWARDS, TOK_REWARDS, "k4")


def test_nan_in_padding_is_ignored():
    rewards = T([[1.0, float("nan")]])
    assert torch.equal(returns_to_go(rewards, T([[1.0, 0.0]])), R([[1.0, 0.0]]))


# Non-dyadic values float32 cannot hold exactly: thirds, tenths, sevenths (ties exact, spreads >= 1/210)
THIRDS_TENTHS = st.one_of(
    st.integers(-30, 30).map(lambda k: k / 3),
    st.integers(-50, 50).map(lambda k: k / 10),
    st.integers(-21, 21).map(lambda k: k / 7),
)
ANY_FLOAT32 = st.floats(-5, 5, allow_nan=False, width=32)


@st.composite
def ragged_groups(draw, token_level: bool, values=ANY_FLOAT32, max_size: int = 5):
    """Random groups (of unequal sizes) of ragged responses; sequence-level rewards sit on the last valid token."""
    num_groups = draw(st.integers(1, 4))
    sizes = [draw(st.integers(1, max_size)) for _ in range(num_groups)]
    width = draw(st.integers(1, 6))
    rows = sum(sizes)
    lengths = [draw(st.integers(1, width)) for _ in range(rows)]
    mask = torch.zeros(rows, width)
    rewards = torch.zeros(rows, width)
    finite = values
    for i, n in enumerate(lengths):
        mask[i, :n] = 1.0
        if token_level:
            rewards[i] = T([draw(finite) for _ in range(width)])
        else:
            rewards[i, n - 1] = draw(finite)
    groups = torch.tensor([g for g, size in enumerate(sizes) for _ in range(size)])
    return rewards, mask, groups


@settings(max_examples=60, deadline=None)
@given(ragged_groups(token_level=False, values=THIRDS_TENTHS))
def test_property_group_estimators_match_classic_sequence_formulas(data):
    rewards, mask, groups = data
    scalar = rewards.sum(1).double()  # r_i
    rloo = compute_advantages("rloo", rewards, mask, groups)
    grpo = compute_advantages("grpo", rewards, mask, groups)
    for i in range(len(scalar)):
        peers = scalar[groups == groups[i]]
        n = len(peers)
        classic_rloo = 0.0 if n == 1 else scalar[i] - (peers.sum() - scalar[i]) / (n - 1)
        std = peers.std() if n > 1 else torch.tensor(0.0)
        classic_grpo = 0.0 if std == 0 else (scalar[i] - peers.mean()) / (std + 1e-6)
        valid = mask[i].bool()
        assert torch.allclose(rloo[i][valid], torch.full_like(rloo[i][valid], float(classic_rloo)), atol=1e-4)
        assert torch.allclose(grpo[i][valid], torch.full_like(grpo[i][valid], float(classic_grpo)), atol=1e-3)


@settings(max_examples=60, deadline=None)
@given(ragged_groups(token_level=True), st.sampled_from(sorted(ESTIMATORS)), st.floats(0.0, 1.0), st.booleans())
def test_property_masked_positions_are_exactly_zero_and_finite(data, name, gamma, whiten):
    rewards, mask, groups = data
    rewards = torch.where(mask.bool(), rewards, torch.full_like(rewards, float("inf")))  # padding garbage
    adv = compute_advantages(name, rewards, mask, groups, gamma=gamma, whiten=whiten, **values_for(name, mask, groups))
    assert adv.dtype == torch.float32
    assert torch.isfinite(adv).all()
    assert torch.equal(adv[mask == 0], torch.zeros_like(adv[mask == 0]))
    assert torch.equal(
        returns_to_go(rewards, mask, gamma)[mask == 0], torch.zeros(int((mask == 0).sum()), dtype=torch.float64)
    )


@settings(max_examples=40, deadline=None)
@given(ragged_groups(token_level=True))
def test_property_rloo_baseline_ignores_own_actions(data):
    """Changing one sample's rewards moves only its own advantage by exactly its own return change."""
    rewards, mask, groups = data
    before = compute_advantages("rloo", rewards, mask, groups)
    changed = rewards.clone()
    changed[0] += 1.0
    after = compute_advantages("rloo", changed, mask, groups)
    own_delta = returns_to_go(changed, mask) - returns_to_go(rewards, mask)
    if (groups == groups[0]).sum() > 1:
        assert torch.allclose(after[0] - before[0], own_delta[0].float(), atol=1e-4)


@st.composite
def groups_some_identical(draw, values):
    """Ragged groups of unequal sizes; each group is, at random, made of copies of one sample (same
    per-token rewards, same length) or of independent samples. Returns (rewards, mask, groups, identical)."""
    num_groups = draw(st.integers(1, 5))
    width = draw(st.integers(1, 7))
    rows, lengths, groups, identical = [], [], [], []
    for g in range(num_groups):
        size, same = draw(st.integers(1, 6)), draw(st.booleans())
        for k in range(size):
            if k == 0 or not same:
                length = draw(st.integers(1, width))
                row = [draw(values) for _ in range(width)]
            rows.append(row)
            lengths.append(length)
            groups.append(g)
            identical.append(same)
    mask = (torch.arange(width) < torch.tensor(lengths)[:, None]).float()
    return T(rows), mask, torch.tensor(groups), torch.tensor(identical)


@settings(max_examples=120, deadline=None)
@given(
    groups_some_identical(st.one_of(THIRDS_TENTHS, st.floats(-1e6, 1e6, allow_nan=False, width=32))),
    st.sampled_from(GROUP_ESTIMATORS),
    st.sampled_from([1.0, 0.9, 1 / 3]),
    st.sampled_from([None, True, False]),
)
def test_property_identical_groups_get_exactly_zero_advantage(data, name, gamma, whiten):
    """The issue's defect: float32 means of 1/3-like returns left O(0.1) advantages on identical groups."""
    rewards, mask, groups, identical = data
    adv = compute_advantages(name, rewards, mask, groups, gamma=gamma, whiten=whiten)
    assert torch.equal(adv[identical], torch.zeros_like(adv[identical]))


def test_the_issue_reproduction_is_exactly_zero():
    # 8 samples, one group, rewards [0, 0, 1] + 0.5 * [1/3, 1/3, 1/3]: grpo gave [0, 0.1057, 0] before
    rewards = (T([0.0, 0.0, 1.0]) + 0.5 * T([1 / 3] * 3)).repeat(8, 1)
    for name in GROUP_ESTIMATORS:
        adv = compute_advantages(name, rewards, torch.ones(8, 3), torch.zeros(8, dtype=torch.long))
        assert torch.equal(adv, torch.zeros(8, 3)), name


def test_sequence_rewards_equal_across_ragged_lengths_give_zero():
    # every sample earned 0.1 (on its own last token), lengths 1..4: outcome-aligned returns are all 0.1
    mask = (torch.arange(4) < T([1, 2, 3, 4])[:, None]).float()
    rewards = torch.zeros(4, 4)
    rewards[torch.arange(4), T([0, 1, 2, 3]).long()] = 0.1
    for name in GROUP_ESTIMATORS:
        assert torch.equal(compute_advantages(name, rewards, mask, torch.zeros(4, dtype=torch.long)), torch.zeros(4, 4))


@settings(max_examples=60, deadline=None)
@given(ragged_groups(token_level=True, values=THIRDS_TENTHS), st.sampled_from(sorted(ESTIMATORS)), st.randoms())
def test_property_permuting_samples_permutes_advantages(data, name, random):
    rewards, mask, groups = data
    order = list(range(len(groups)))
    random.shuffle(order)
    order = torch.tensor(order)
    values = values_for(name, mask, groups)
    adv = compute_advantages(name, rewards, mask, groups, **values)
    permuted = compute_advantages(
        name, rewards[order], mask[order], groups[order], **{k: v[order] for k, v in values.items()}
    )
    assert torch.allclose(permuted, adv[order], rtol=1e-5, atol=1e-6)


@settings(max_examples=60, deadline=None)
@given(ragged_groups(token_level=False, values=THIRDS_TENTHS), st.sampled_from(["rloo", "grpo"]), THIRDS_TENTHS)
def test_property_a_constant_added_to_every_sequence_reward_changes_nothing(data, name, constant):
    rewards, mask, groups = data
    rewards = rewards.double()  # r + c computed without float32 rounding of the sum
    last = mask.sum(1).long() - 1
    shifted = rewards.clone()
    shifted[torch.arange(len(rewards)), last] += constant
    before = compute_advantages(name, rewards, mask, groups)
    after = compute_advantages(name, shifted, mask, groups)
    assert torch.allclose(before, after, rtol=1e-5, atol=1e-5)


HUGE = st.floats(-1.0000000150474662e30, 1.0000000150474662e30, allow_nan=False, width=32)  # float32(1e30)


@settings(max_examples=100, deadline=None)
@given(
    ragged_groups(token_level=True, values=HUGE),
    st.sampled_from(sorted(ESTIMATORS)),
    st.sampled_from([1.0, 0.5]),
    st.sampled_from([None, True, False]),
)
def test_property_finite_inputs_up_to_1e30_give_finite_advantages(data, name, gamma, whiten):
    rewards, mask, groups = data
    adv = compute_advantages(name, rewards, mask, groups, gamma=gamma, whiten=whiten, **values_for(name, mask, groups))
    assert torch.isfinite(adv).all()


@pytest.mark.mutant
def test_kl_penalty_defaults_to_k1_and_refuses_mismatched_shapes():
    logp, ref = T([[-1.0, -0.25]]), T([[-2.0, -0.5]])
    assert torch.equal(kl_penalty(logp, ref), kl_penalty(logp, ref, "k1"))
    with pytest.raises(ValueError, match=r"logprobs=\(2, 2\), ref_logprobs=\(1, 2\); all must be \(batch, tokens\)"):
        kl_penalty(logp.repeat(2, 1), ref)  # (1, 2) would broadcast silently


@pytest.mark.mutant
def test_k3_clamps_the_log_ratio_to_plus_minus_20():
    """k3 = exp(-d) + d - 1 with d = logp - logp_ref clamped to [-20, 20] (docs/algorithms.md)."""
    logp, ref = T([[-30.0, -1.0, -0.5]]), T([[-1.0, -30.0, -0.5]])  # d = -29, +29, 0
    k3 = kl_penalty(logp, ref, "k3")
    assert k3[0, 0].item() == pytest.approx(math.exp(20.0) - 20.0 - 1.0, rel=1e-6)
    assert k3[0, 1].item() == pytest.approx(math.exp(-20.0) + 20.0 - 1.0, rel=1e-6)
    assert k3[0, 2].item() == 0.0


@pytest.mark.mutant
def test_kl_penalty_is_float32_for_any_input_precision():
    """Both log-probs are converted to float32 before the difference: float64 inputs give the float32 result."""
    logp = torch.tensor([[-1 / 3, -2 / 7]], dtype=torch.float64)
    ref = torch.tensor([[-1 / 7, -1 / 9]], dtype=torch.float64)
    for kind in ("k1", "k2", "k3"):
        kl = kl_penalty(logp, ref, kind)
        assert kl.dtype == torch.float32
        assert torch.equal(kl, kl_penalty(logp.float(), ref.float(), kind))


@pytest.mark.mutant
def test_masked_whiten_centres_by_default_and_computes_in_float64():
    values = T([[1 / 3, 2 / 3, 9.0], [1 / 7, 0.0, 0.0]])
    mask = T([[1.0, 1.0, 0.0], [1.0, 0.0, 0.0]])
    out = masked_whiten(values, mask)
    assert out.dtype == torch.float64
    valid = values[mask.bool()].double()
    expected = (valid - valid.mean()) / torch.sqrt(valid.var(unbiased=False) + 1e-8)
    assert torch.allclose(out[mask.bool()], expected, rtol=1e-12, atol=0)
    assert out[0, 2] == 0 and out[1, 1] == 0


@pytest.mark.mutant
def test_whitening_a_single_valid_token():
    """One valid token: its mean is itself and its variance 0, so centred whitening gives exactly 0 and the
    uncentred form divides by sqrt(1e-8) only."""
    mask = T([[1.0, 0.0]])
    assert torch.equal(compute_advantages("reinforce++", T([[0.7, 5.0]]), mask, T([0])), torch.zeros(1, 2))
    expected = torch.tensor([[0.5 / math.sqrt(1e-8), 0.0]], dtype=torch.float64)
    assert torch.allclose(masked_whiten(T([[0.5, 5.0]]), mask, center=False), expected, rtol=1e-12, atol=0)


@pytest.mark.mutant
def test_an_unknown_estimator_lists_every_known_one_exactly():
    with pytest.raises(
        ValueError,
        match=r"unknown advantage estimator 'ppo'; known: gae, grpo, reinforce, reinforce\+\+, reinforce\+\+_baseline, "
        r"rloo, self_critical$",
    ):
        compute_advantages("ppo", T([[1.0]]), T([[1.0]]), T([0]))


@pytest.mark.mutant
def test_an_empty_batch_gives_empty_advantages():
    for name in ("reinforce", "rloo", "grpo", "reinforce++", "reinforce++_baseline", "gae", "self_critical"):
        empty = torch.zeros(0, 3)
        advantages = compute_advantages(
            name,
            empty,
            empty,
            torch.zeros(0, dtype=torch.long),
            **values_for(name, empty, torch.zeros(0, dtype=torch.long)),
        )
        assert advantages.shape == (0, 3) and advantages.dtype == torch.float32


@pytest.mark.mutant
def test_rloo_scales_with_the_rewards_down_to_tiny_magnitudes():
    """Exact zeros come only from values equal up to EQUAL_RTOL x the rewards' own size: rewards of 1e-7 and 2e-7
    are as different as 1 and 2 (A scales with them), while 1000 and 1000 + 1e-4 count as equal."""
    mask, groups = T([[1.0, 1.0], [1.0, 1.0]]), T([0, 0])
    for scale in (1.0, 1e-3, 1e-7):
        rewards = torch.tensor([[0.0, 1.0], [0.0, 2.0]], dtype=torch.float64) * scale
        assert torch.allclose(
            compute_advantages("rloo", rewards, mask, groups), T([[-1.0, -1.0], [1.0, 1.0]]) * scale, rtol=1e-5, atol=0
        )
    near = torch.tensor([[0.0, 1000.0], [0.0, 1000.0001]], dtype=torch.float64)
    for name in ("rloo", "grpo", "reinforce++_baseline"):
        assert torch.equal(compute_advantages(name, near, mask, groups), torch.zeros(2, 2))


@pytest.mark.mutant
def test_the_equality_tolerance_is_inclusive_and_uses_discounted_magnitudes():
    """Values exactly EQUAL_RTOL x M apart count as equal (M = 2^40 from a +-2^39 pair of tokens; 1e-6 x 2^40 is
    exact in float64); and M is sum_k gamma^(k-t) |r_k|, so a far-off +-1e6 pair hardly widens it with gamma = 0.1."""
    tolerance = 1e-6 * 2.0**40
    rewards = torch.tensor([[tolerance, 0.0], [2.0**39, -(2.0**39)]], dtype=torch.float64)
    advantages = compute_advantages("rloo", rewards, torch.ones(2, 2), T([0, 0]))
    assert advantages[:, 0].tolist() == [0.0, 0.0]  # spread == tolerance at t = 0: equal
    assert (advantages[:, 1] != 0).all()
    rewards = torch.tensor([[1.0, 0.0, 1e6, -1e6], [1.5, 0.0, 1e6, -1e6]], dtype=torch.float64)
    advantages = compute_advantages("rloo", rewards, torch.ones(2, 4), T([0, 0]), gamma=0.1)
    assert torch.allclose(advantages[:, 0], T([-0.5, 0.5]))  # spread 0.5 > 1e-6 x (1.5 + 0.01e6 + 0.001e6)


@pytest.mark.mutant
def test_returns_to_go_names_token_rewards_when_a_valid_reward_is_not_finite():
    with pytest.raises(ValueError, match="token_rewards holds NaN or inf at sample 1, token 0"):
        returns_to_go(T([[1.0, 0.0], [math.inf, 0.0]]), T([[1.0, 0.0], [1.0, 0.0]]))


@pytest.mark.mutant
def test_returns_to_go_sums_float32_rewards_in_float64():
    """G_t is float64 whatever the rewards' precision: 1e8 + 1 (not a float32) survives the sum."""
    returns = returns_to_go(T([[1e8, 1.0]]), T([[1.0, 1.0]]))
    assert returns.dtype == torch.float64
    assert returns.tolist() == [[100000001.0, 1.0]]


@pytest.mark.mutant
def test_group_stats_of_float32_values_are_float64():
    """GroupStats converts float32 values and magnitudes to float64 (its docstring: every tensor float64)."""
    values = T([[1e8], [1.0], [3.0]])
    stats = GroupStats(values, values.abs(), T([1.0, 1.0, 1.0]), T([0, 0, 1]))
    for name in ("values", "count", "total", "mean", "std"):
        assert getattr(stats, name).dtype == torch.float64, name
    assert stats.total[:, 0].tolist() == [100000001.0, 100000001.0, 3.0]
    assert stats.mean[:, 0].tolist() == [50000000.5, 50000000.5, 3.0]  # a group of one: its own value


@pytest.mark.mutant
def test_grpo_divides_by_std_plus_eps():
    """A = (G - mean) / (std + 1e-6): with rewards 0 and 2e-6 (unequal: spread 2e-6 > 1e-6 x 2e-6) the
    unbiased std is sqrt(2) x 1e-6, so A = +-1e-6 / ((sqrt(2) + 1) x 1e-6)."""
    rewards = torch.tensor([[0.0], [2e-6]], dtype=torch.float64)
    advantages = compute_advantages("grpo", rewards, torch.ones(2, 1), T([0, 0]))
    expected = 1 / (math.sqrt(2) + 1)
    assert torch.allclose(advantages[:, 0], T([-expected, expected]), rtol=1e-5, atol=0)


@pytest.mark.mutant
def test_outcome_aligned_stays_on_the_inputs_device():
    """Positions are made on the mask's device (the meta device stands in for a GPU: mixing devices raises)."""
    mask = T([[1.0, 1.0, 0.0], [1.0, 0.0, 0.0]]).to("meta")
    aligned = outcome_aligned(torch.zeros(2, 3, dtype=torch.float64, device="meta"), mask)
    assert aligned.device.type == "meta" and aligned.shape == (2, 3)


# GAE: three ragged responses (lengths 3, 2, 1), padding holding garbage; gamma = 0.5, lam = 0.5 (gamma lam = 0.25).
GAE_REWARDS = T([[1.0, 0.0, 2.0], [0.0, 4.0, math.inf], [-1.0, math.nan, 5.0]], dtype=torch.float64)
GAE_VALUES = T([[0.5, 1.0, 1.5], [2.0, 1.0, math.nan], [0.25, -math.inf, 3.0]], dtype=torch.float64)
GAE_MASK = T([[1.0, 1.0, 1.0], [1.0, 1.0, 0.0], [1.0, 0.0, 0.0]])


def test_gae_by_hand_ragged_with_the_last_valid_token_terminal():
    # row 0: delta_2 = 2 + 0 - 1.5 = .5 (terminal: V(s_3) = 0)    A_2 = .5
    #        delta_1 = 0 + .5 * 1.5 - 1 = -.25                     A_1 = -.25 + .25 * .5 = -.125
    #        delta_0 = 1 + .5 * 1 - .5 = 1                         A_0 = 1 + .25 * -.125 = .96875
    # row 1: delta_1 = 4 + 0 - 1 = 3 (terminal, the inf reward and NaN value are padding)   A_1 = 3
    #        delta_0 = 0 + .5 * 1 - 2 = -1.5                                                A_0 = -1.5 + .25 * 3 = -.75
    # row 2: delta_0 = -1 + 0 - .25                                                          A_0 = -1.25
    expected = R([[0.96875, -0.125, 0.5], [-0.75, 3.0, 0.0], [-1.25, 0.0, 0.0]])
    assert torch.equal(gae(GAE_REWARDS, GAE_VALUES, GAE_MASK, 0.5, 0.5), expected)
    # R_t = A_t + V(s_t): [1.46875, .875, 2], [1.25, 4], [-1]
    targets = R([[1.46875, 0.875, 2.0], [1.25, 4.0, 0.0], [-1.0, 0.0, 0.0]])
    assert torch.equal(value_targets(GAE_REWARDS, GAE_VALUES, GAE_MASK, 0.5, 0.5), targets)
    critic_output = GAE_VALUES.clone().requires_grad_()  # V is a constant of both: no gradient reaches the critic
    assert not gae(GAE_REWARDS, critic_output, GAE_MASK, 0.5, 0.5).requires_grad
    assert not value_targets(GAE_REWARDS, critic_output, GAE_MASK, 0.5, 0.5).requires_grad


def test_gae_counts_a_masked_position_inside_a_response_in_the_discount():
    # gamma = lam = .5; r = [1, -, 2], V = [.5, -, 1.5]: the hole is a reward-0 step worth gamma V(s_2) = .75
    # t = 2: delta = 2 - 1.5 = .5, A = .5 ; t = 1: delta = 0 + .75 - .75 = 0, A = .25 * .5 = .125 ;
    # t = 0: delta = 1 + .5 * .75 - .5 = .875, A = .875 + .25 * .125 = .90625
    rewards, values = T([[1.0, math.nan, 2.0]], dtype=torch.float64), T([[0.5, math.inf, 1.5]], dtype=torch.float64)
    assert torch.equal(gae(rewards, values, T([[1.0, 0.0, 1.0]]), 0.5, 0.5), R([[0.90625, 0.0, 0.5]]))


def test_gae_is_registered_as_a_whitened_centred_estimator_that_needs_values():
    assert NEEDS_VALUES == {"gae"} and DEFAULT_WHITEN["gae"] and "gae" not in GROUP_BASELINE
    groups = T([0, 0, 1])
    raw = gae(GAE_REWARDS, GAE_VALUES, GAE_MASK, 0.5, 0.5)
    default = compute_advantages("gae", GAE_REWARDS, GAE_MASK, groups, 0.5, values=GAE_VALUES, lam=0.5)
    assert torch.equal(default, masked_whiten(raw, GAE_MASK, center=True).float())
    unwhitened = compute_advantages("gae", GAE_REWARDS, GAE_MASK, groups, 0.5, False, GAE_VALUES, 0.5)
    assert torch.equal(unwhitened, raw.float())
    positional = advantages_if_finite("gae", GAE_REWARDS, GAE_MASK, groups, 0.5, False, GAE_VALUES, 0.5)
    assert torch.equal(positional[0], raw.float()) and positional[1]


def test_values_errors_name_the_estimator_and_the_offender():
    groups = T([0, 0, 1])
    for compute in (compute_advantages, advantages_if_finite):
        with pytest.raises(ValueError, match="advantage estimator 'gae' needs values"):
            compute("gae", GAE_REWARDS, GAE_MASK, groups)
        with pytest.raises(ValueError, match=r"values=\(3, 2\), mask=\(3, 3\)"):
            compute("gae", GAE_REWARDS, GAE_MASK, groups, values=GAE_VALUES[:, :2])
    bad = GAE_VALUES.clone()
    bad[1, 1] = math.nan
    with pytest.raises(ValueError, match="values holds NaN or inf at sample 1, token 1"):
        compute_advantages("gae", GAE_REWARDS, GAE_MASK, groups, values=bad)
    advantages, finite = advantages_if_finite("gae", GAE_REWARDS, GAE_MASK, groups, values=bad)
    assert not finite and torch.equal(advantages, torch.zeros(3, 3))


@st.composite
def ragged_rewards_and_values(draw, holes: bool = False):
    """(rewards, values, mask) float64 of thirds/tenths/sevenths on valid tokens and NaN/inf garbage on padding;
    right-padded ragged lengths, or (holes) any 0/1 mask."""
    rows, width = draw(st.integers(1, 5)), draw(st.integers(1, 6))
    if holes:
        mask = T([[float(draw(st.booleans())) for _ in range(width)] for _ in range(rows)])
    else:
        mask = (torch.arange(width) < T([draw(st.integers(1, width)) for _ in range(rows)])[:, None]).float()
    garbage = st.sampled_from([math.nan, math.inf, -math.inf, 1e300])

    def tensor():
        return T([[draw(THIRDS_TENTHS if m else garbage) for m in row] for row in mask.tolist()], dtype=torch.float64)

    return tensor(), tensor(), mask


def reference_gae(rewards: list, values: list, length: int, gamma: float, lam: float) -> list:
    """A_t = sum_{l=0}^{T-t} (gamma lam)^l delta_{t+l} straight from the definition, one response, V(s_{T+1}) = 0."""
    advantages = [0.0] * len(rewards)
    for t in range(length):
        for k in range(t, length):
            next_value = values[k + 1] if k + 1 < length else 0.0
            advantages[t] += (gamma * lam) ** (k - t) * (rewards[k] + gamma * next_value - values[k])
    return advantages


UNIT = st.floats(0.0, 1.0)


@settings(max_examples=80, deadline=None)
@given(ragged_rewards_and_values(), UNIT, UNIT)
def test_property_gae_matches_a_per_sample_reference_loop_and_ignores_padding(data, gamma, lam):
    rewards, values, mask = data
    advantages = gae(rewards, values, mask, gamma, lam)
    assert advantages.dtype == torch.float64
    for i, length in enumerate(mask.sum(1).long().tolist()):
        expected = reference_gae(rewards[i].tolist(), values[i].tolist(), length, gamma, lam)
        assert torch.allclose(advantages[i], R(expected), rtol=1e-12, atol=1e-12)
    valid = mask.bool()
    clean_rewards, clean_values = torch.where(valid, rewards, 0.0), torch.where(valid, values, 0.0)
    assert torch.equal(gae(clean_rewards, clean_values, mask, gamma, lam), advantages)  # garbage changes nothing
    targets = value_targets(rewards, values, mask, gamma, lam)
    assert torch.equal(targets, torch.where(valid, advantages + clean_values, 0.0))  # R_t = A_t + V(s_t)


@settings(max_examples=60, deadline=None)
@given(ragged_rewards_and_values(holes=True), UNIT)
def test_property_gae_with_lam_1_is_returns_minus_values_so_no_separate_value_baseline_estimator(data, gamma):
    """lam = 1 telescopes: sum_l gamma^l (r_{t+l} + gamma V_{t+l+1} - V_{t+l}) = G_t - V_t (terminal V = 0), for
    any mask; with V = 0 it is returns_to_go to the last bit, and its value targets are the returns."""
    rewards, values, mask = data
    returns = returns_to_go(rewards, mask, gamma)
    clean_values = torch.where(mask.bool(), values, 0.0)
    assert torch.allclose(gae(rewards, values, mask, gamma, 1.0), returns - clean_values, rtol=1e-12, atol=1e-12)
    assert torch.allclose(value_targets(rewards, values, mask, gamma, 1.0), returns, rtol=1e-12, atol=1e-12)
    assert torch.equal(gae(rewards, torch.zeros_like(values), mask, gamma, 1.0), returns)


def test_self_critical_by_hand_sequence_and_token_level():
    """Group 0: samples earning 1/3 and 0.7 against a greedy response earning 0.5 (sequence level, on the last token);
    group 1 lost its greedy response: no baseline, advantages 0."""
    mask = T([[1.0, 1.0, 0.0], [1.0, 0.0, 0.0], [1.0, 1.0, 1.0], [1.0, 1.0, 0.0]])
    rewards = T([[0.0, 1 / 3, 0.0], [0.7, 0.0, 0.0], [0.0, 0.0, 0.5], [0.0, 0.9, 0.0]])
    groups, greedy = T([0, 0, 0, 1]), T([False, False, True, False])
    adv = compute_advantages("self_critical", rewards, mask, groups, greedy_baseline=greedy)
    expected = T([[1 / 3 - 0.5, 1 / 3 - 0.5, 0.0], [0.7 - 0.5, 0.0, 0.0], [0.0, 0.0, 0.0], [0.0, 0.0, 0.0]])
    assert torch.allclose(adv, expected, atol=1e-7)
    # token level: per-token returns minus the greedy response's at the same position, its last return past its end
    rewards = T([[0.25, 0.5, 0.125], [0.3, 0.0, 0.0], [0.1, 0.2, 0.0], [0.0, 0.9, 0.0]])
    mask = T([[1.0, 1.0, 1.0], [1.0, 0.0, 0.0], [1.0, 1.0, 0.0], [1.0, 1.0, 0.0]])
    adv = compute_advantages("self_critical", rewards, mask, groups, greedy_baseline=greedy)
    greedy_returns = [0.1 + 0.2, 0.2, 0.2]  # G'_0, G'_1, then G'_1 again (outcome-aligned)
    expected = T([[0.875 - greedy_returns[0], 0.625 - greedy_returns[1], 0.125 - greedy_returns[2]], [0.0] * 3])
    expected[1, 0] = 0.3 - greedy_returns[0]
    assert torch.allclose(adv[:2], expected, atol=1e-7) and not adv[2:].any()


def test_self_critical_without_greedy_rows_is_an_error():
    with pytest.raises(ValueError, match="'self_critical' needs the rows of each prompt's greedy response"):
        compute_advantages("self_critical", T([[1.0]]), T([[1.0]]), T([0]))


@st.composite
def groups_with_a_greedy_row(draw, token_level: bool):
    """ragged_groups whose groups each hold a greedy row (its first) but where one group may have lost it."""
    rewards, mask, groups = draw(ragged_groups(token_level, values=THIRDS_TENTHS))
    greedy = torch.ones(len(groups), dtype=torch.bool)
    greedy[1:] = groups[1:] != groups[:-1]
    if draw(st.booleans()):
        greedy[0] = False  # group 0 without a baseline
    return rewards, mask, groups, greedy


@settings(max_examples=80, deadline=None)
@given(groups_with_a_greedy_row(token_level=False))
def test_property_self_critical_sequence_level_is_reward_minus_the_greedy_reward(data):
    """SCST's formula: A_i = r_i - r_greedy(i) on every valid token; 0 for the greedy rows, for a group without one,
    and (exactly) when the two rewards are equal."""
    rewards, mask, groups, greedy = data
    adv = compute_advantages("self_critical", rewards, mask, groups, greedy_baseline=greedy)
    scalar = rewards.sum(1).double()
    for i in range(len(groups)):
        baseline = [j for j in range(len(groups)) if greedy[j] and groups[j] == groups[i]]
        expected = 0.0 if greedy[i] or not baseline else float(scalar[i] - scalar[baseline[0]])
        valid = mask[i].bool()
        assert torch.allclose(adv[i][valid], torch.full_like(adv[i][valid], expected), atol=1e-6)
        if baseline and scalar[i] == scalar[baseline[0]]:
            assert not adv[i].any()


@settings(max_examples=60, deadline=None)
@given(groups_with_a_greedy_row(token_level=True))
def test_property_self_critical_baseline_ignores_the_samples_own_actions(data):
    """Changing one sample's rewards moves only its own advantages, by exactly its own return change."""
    rewards, mask, groups, greedy = data
    sample = next((i for i in range(len(groups)) if not greedy[i] and greedy[groups == groups[i]].any()), None)
    if sample is None:
        return
    before = compute_advantages("self_critical", rewards, mask, groups, greedy_baseline=greedy)
    changed = rewards.clone()
    changed[sample] += 1.0
    after = compute_advantages("self_critical", changed, mask, groups, greedy_baseline=greedy)
    assume(bool(after[sample][mask[sample].bool()].all()))  # not equal to the baseline by chance (then exactly 0)
    own = (returns_to_go(changed, mask) - returns_to_go(rewards, mask))[sample].float()
    assert torch.allclose(after[sample] - before[sample], own, atol=1e-5)
    others = torch.arange(len(groups)) != sample
    assert torch.allclose(after[others], before[others])


def test_self_critical_whitening_leaves_the_greedy_rows_out_of_the_statistics():
    rewards, mask = T([[0.2], [0.9], [0.5]]), torch.ones(3, 1)
    groups, greedy = T([0, 0, 0]), T([False, False, True])
    whitened = compute_advantages("self_critical", rewards, mask, groups, whiten=True, greedy_baseline=greedy)
    raw = torch.tensor([[0.2 - 0.5], [0.9 - 0.5]], dtype=torch.float64)  # the samples' A: var over these two alone
    variance = (raw - raw.mean()).square().mean()  # not re-centred (its own baseline), divided by the batch std
    assert torch.allclose(whitened[:2], (raw / torch.sqrt(variance + 1e-8)).float(), atol=1e-6)
    assert whitened[2].item() == 0.0
