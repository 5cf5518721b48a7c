"""Hand-computed and property tests of the learner's pure algorithm steps: pipeline.algorithm.rewards
(composite token rewards, component stats, KL in the reward) and advantages_if_finite / informative_rows of
pipeline.algorithm.advantages. They pin, without a model, what the learner-level tests of test_mutation_kills.py
pin through Learner.train_step."""

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from pipeline.algorithm.advantages import (
    STATS_DTYPE,
    advantages_if_finite,
    compute_advantages,
    informative_rows,
    kl_penalty,
)
from pipeline.algorithm.rewards import (
    NORMALIZATIONS,
    ComponentRewards,
    component_reward_stats,
    composite_token_rewards,
    kl_in_reward,
    normalize_rewards,
)

T = torch.tensor
THIRD = 1 / 3  # neither it nor 2 + 1/6 is a float32
FLOAT32 = st.floats(-1e3, 1e3, allow_nan=False, width=32)


@st.composite
def ragged(draw, max_rows: int = 6, max_len: int = 4):
    """(lengths, group ids): ragged response lengths >= 1 and unequal groups (ids 0..2, any sizes)."""
    lengths = draw(st.lists(st.integers(1, max_len), min_size=1, max_size=max_rows))
    groups = draw(st.lists(st.integers(0, 2), min_size=len(lengths), max_size=len(lengths)))
    return lengths, T(groups)


def mask_of(lengths: list[int]) -> torch.Tensor:
    width = max(lengths)
    return T([[1.0] * n + [0.0] * (width - n) for n in lengths])


@st.composite
def component(draw, lengths: list[int]):
    """One component's (batch, width) float32 rewards as the learner pads them: 0 on padding and on the samples it
    does not apply to, which are drawn too (at least one of each kind is likely)."""
    width = max(lengths)
    applies = draw(st.lists(st.booleans(), min_size=len(lengths), max_size=len(lengths)))
    rows = [[draw(FLOAT32) for _ in range(n)] if on else [] for n, on in zip(lengths, applies)]
    rewards = T([row + [0.0] * (width - len(row)) for row in rows])
    weight = draw(st.floats(-3.0, 3.0, allow_nan=False))  # e.g. 0.1: not a float32
    return ComponentRewards(weight, rewards, T(applies), draw(st.sampled_from(NORMALIZATIONS)))


def test_composite_rewards_are_weighted_float64_sums():
    """2 * exact + 0.5 * digit with digit = 1/3 as a float32: the sum is a float64 (2 + 1/6 rounded to float32 would
    be off by about 1e-7); padding stays exactly 0."""
    mask = T([[1.0, 1.0], [1.0, 0.0]])
    exact = ComponentRewards(2.0, T([[0.0, 1.0], [1.0, 0.0]]), T([True, True]), "none")
    digit = ComponentRewards(0.5, T([[THIRD, THIRD], [THIRD, 0.0]]), T([True, True]), "none")
    out = composite_token_rewards([exact, digit], mask, T([0, 0]))
    third = float(torch.tensor(THIRD))  # the float32 1/3 the batch holds
    expected = torch.tensor([[0.5 * third, 2.0 + 0.5 * third], [2.0 + 0.5 * third, 0.0]], dtype=torch.float64)
    assert out.dtype == STATS_DTYPE and torch.equal(out, expected)
    assert not torch.equal(expected.float().double(), expected)  # float32 sums would differ


def test_a_component_is_normalised_over_the_samples_it_applies_to():
    """Batch normalisation of a component that does not apply to sample 0: samples 1-3 are normalised among
    themselves (as if sample 0 were not there) and sample 0 gets 0 from it."""
    mask = torch.ones(4, 2)
    rewards = T([[0.0, 0.0], [0.0, 1.0], [0.0, 2.0], [THIRD, 0.0]])
    applies = T([False, True, True, True])
    out = composite_token_rewards([ComponentRewards(1.0, rewards, applies, "batch")], mask, T([0, 0, 1, 1]))
    alone = normalize_rewards(rewards[1:], mask[1:], T([0, 1, 1]), "batch")
    assert torch.equal(out[1:], alone) and torch.equal(out[0], torch.zeros(2, dtype=STATS_DTYPE))


@settings(max_examples=60, deadline=None)
@given(st.data())
def test_property_composite_rewards_sum_each_weighted_normalised_component(data):
    """Any ragged batch, unequal groups, 1-3 components each applying to some samples with its own normalisation:
    r_t = sum_i w_i * normalize_rewards(r_i, mask of the samples i applies to)_t, accumulated in float64 (equal to
    the last bit), 0 on padding."""
    lengths, groups = data.draw(ragged())
    mask = mask_of(lengths)
    components = data.draw(st.lists(component(lengths), min_size=1, max_size=3))
    out = composite_token_rewards(components, mask, groups)
    expected = torch.zeros(mask.shape, dtype=torch.float64)
    for weight, rewards, applies, mode in components:
        expected = expected + weight * normalize_rewards(rewards, mask * applies[:, None].float(), groups, mode)
    assert out.dtype == STATS_DTYPE and torch.equal(out, expected)
    assert torch.equal(out[mask == 0], torch.zeros_like(out[mask == 0]))


def test_component_stats_hand_computed():
    rewards = T([[0.0, 0.0, 0.0], [0.25, 0.0, 0.5], [0.0, 0.0, 0.0], [1.0, 0.0, 0.0]])
    assert component_reward_stats(rewards, T([False, True, False, False])) == {"mean": 0.75, "std": 0.0}  # one sample
    two = component_reward_stats(rewards, T([False, True, False, True]))  # totals 0.75 and 1.0
    assert two["mean"] == 0.875 and two["std"] == pytest.approx(float(T([0.75, 1.0]).std()))  # unbiased: 0.1768
    assert component_reward_stats(rewards, T([False] * 4)) == {}


@settings(max_examples=60, deadline=None)
@given(st.data())
def test_property_component_stats_are_those_of_the_totals_it_applies_to(data):
    """mean and unbiased std (0 for one sample) of the raw per-sample totals over the samples the component applies
    to, whatever the others hold; {} when it applies to none."""
    lengths, _ = data.draw(ragged())
    weight, rewards, applies, _ = data.draw(component(lengths))
    rewards = torch.where(applies[:, None], rewards, 1e3)  # what it does not apply to never counts
    totals = [math.fsum(row) for row, on in zip(rewards.double().tolist(), applies.tolist()) if on]
    stats = component_reward_stats(rewards, applies)
    if not totals:
        assert stats == {}
        return
    mean = math.fsum(totals) / len(totals)
    std = math.sqrt(math.fsum((t - mean) ** 2 for t in totals) / (len(totals) - 1)) if len(totals) > 1 else 0.0
    scale = max([abs(v) for v in rewards.flatten().tolist()] + [1.0]) * rewards.shape[1]
    assert stats["mean"] == pytest.approx(mean, abs=1e-5 * scale)
    assert stats["std"] == pytest.approx(std, abs=1e-5 * scale)


@pytest.mark.parametrize("kind", ["k1", "k3"])
def test_the_kl_penalty_in_the_reward_is_scaled_in_float64(kind):
    """r_t - 0.1 * KL_t with log-probs of -1/3 and -1.1: 0.1 * KL_t in float32 would be off by about 1e-9."""
    behaviour, ref, mask = T([[-THIRD, -1.1, 0.0]]), T([[-1.1, -THIRD, 0.0]]), T([[1.0, 1.0, 0.0]])
    rewards = torch.tensor([[0.0, 1.0, 0.0]], dtype=torch.float64)
    out = kl_in_reward(rewards, behaviour, ref, mask, 0.1, kind)
    kl = kl_penalty(behaviour, ref, kind).double()
    assert out.dtype == STATS_DTYPE and torch.equal(out, rewards - 0.1 * kl * mask)
    assert not torch.equal((0.1 * kl).float().double(), 0.1 * kl)  # a float32 product would differ
    assert out[0, 2] == 0.0


@settings(max_examples=60, deadline=None)
@given(st.data())
def test_property_kl_in_reward_subtracts_beta_kl_on_valid_tokens_only(data):
    """Any ragged batch: valid tokens get r_t - beta * KL_t (kind's estimator, float64 to the last bit), padding keeps
    its reward; beta 0 changes nothing."""
    lengths, _ = data.draw(ragged())
    mask = mask_of(lengths)
    logprob = st.floats(-20.0, 0.0, allow_nan=False, width=32)
    behaviour = T([[data.draw(logprob) for _ in row] for row in mask.tolist()])
    ref = T([[data.draw(logprob) for _ in row] for row in mask.tolist()])
    rewards = T([[data.draw(FLOAT32) for _ in row] for row in mask.tolist()], dtype=torch.float64) * mask
    beta, kind = data.draw(st.floats(0.0, 2.0)), data.draw(st.sampled_from(["k1", "k2", "k3"]))
    out = kl_in_reward(rewards, behaviour, ref, mask, beta, kind)
    kl = kl_penalty(behaviour, ref, kind).double()
    valid = mask.bool()
    assert torch.equal(out[valid], rewards[valid] - beta * kl[valid])
    assert torch.equal(out[~valid], rewards[~valid])
    assert torch.equal(kl_in_reward(rewards, behaviour, ref, mask, 0.0, kind), rewards)


ESTIMATOR_ARGS = st.tuples(
    st.sampled_from(["reinforce", "rloo", "grpo", "reinforce++_baseline"]),
    st.sampled_from([1.0, 0.5, 0.9]),
    st.sampled_from([None, True, False]),
)


@settings(max_examples=60, deadline=None)
@given(st.data(), ESTIMATOR_ARGS)
def test_property_finite_rewards_give_the_estimators_advantages(data, args):
    """Finite rewards (ragged, unequal groups, padding holding anything): exactly compute_advantages with the given
    estimator, gamma and whitening, and True."""
    name, gamma, whiten = args
    lengths, groups = data.draw(ragged())
    mask = mask_of(lengths)
    rewards = T([[data.draw(FLOAT32) for _ in row] for row in mask.tolist()], dtype=torch.float64) / 3
    rewards = torch.where(mask.bool(), rewards, math.nan)  # padding is never read
    advantages, finite = advantages_if_finite(name, rewards, mask, groups, gamma, whiten)
    assert finite and advantages.dtype == torch.float32
    assert torch.equal(advantages, compute_advantages(name, rewards, mask, groups, gamma, whiten))


@settings(max_examples=40, deadline=None)
@given(st.data(), st.sampled_from([math.inf, -math.inf, math.nan]))
def test_property_a_non_finite_valid_reward_gives_zeros_and_false(data, bad):
    lengths, groups = data.draw(ragged())
    mask = mask_of(lengths)
    rewards = torch.zeros(mask.shape, dtype=torch.float64)
    valid = mask.nonzero().tolist()
    row, token = valid[data.draw(st.integers(0, len(valid) - 1))]
    rewards[row, token] = bad
    advantages, finite = advantages_if_finite("grpo", rewards, mask, groups)
    assert not finite and torch.equal(advantages, torch.zeros_like(mask))


def test_advantages_that_overflow_float32_are_returned_with_false():
    """Rewards of 2e38 on each of three tokens, reinforce: returns of 6e38 and 4e38 fit a float64, not a float32."""
    mask = torch.ones(2, 3)
    rewards = torch.full((2, 3), 2e38, dtype=torch.float64)
    advantages, finite = advantages_if_finite("reinforce", rewards, mask, T([0, 1]))
    assert not finite and torch.isinf(advantages[:, :2]).all() and torch.isfinite(advantages[:, 2]).all()


def test_informative_rows_by_hand():
    advantages = T([[0.0, 0.5], [0.0, 0.0], [-1e-45, 0.0], [0.0, 0.0]])  # a float32 subnormal still counts
    assert informative_rows(advantages, True, 0.0, 0.0).tolist() == [0, 2]
    for skip, kl_coef, entropy_coef in [(False, 0.0, 0.0), (True, 0.05, 0.0), (True, 0.0, 0.01)]:
        assert informative_rows(advantages, skip, kl_coef, entropy_coef).tolist() == [0, 1, 2, 3]


ADVANTAGE = st.sampled_from([0.0, -0.0, 1e-45, -THIRD, 1e30])  # -0.0 is 0, a float32 subnormal is not


@settings(max_examples=60, deadline=None)
@given(
    st.lists(st.lists(ADVANTAGE, min_size=3, max_size=3), min_size=1, max_size=8),
    st.booleans(),
    st.sampled_from([0.0, 0.1]),
    st.sampled_from([0.0, 0.01]),
)
def test_property_informative_rows_drop_all_zero_rows_only_without_kl_or_entropy(rows, skip, kl_coef, entropy_coef):
    advantages = T(rows)
    kept = informative_rows(advantages, skip, kl_coef, entropy_coef).tolist()
    if skip and kl_coef == 0 and entropy_coef == 0:
        assert kept == [i for i, row in enumerate(rows) if any(v != 0 for v in row)]
    else:
        assert kept == list(range(len(rows)))


def test_rows_left_out_of_the_statistics_get_the_same_affine_map():
    """self_critical's greedy rows (counted False) take no part in a component's group statistics but are mapped
    like the samples: totals 1 and 3 give mean 2 and std sqrt(2), and the greedy row's 2.5 becomes 0.5 / sqrt(2)."""
    rewards = torch.tensor([[0.0, 1.0], [0.0, 3.0], [0.0, 2.5]])
    mask, groups, counted = torch.ones(3, 2), torch.zeros(3, dtype=torch.long), torch.tensor([True, True, False])
    normalised = normalize_rewards(rewards, mask, groups, "group", counted).sum(1)
    expected = torch.tensor([-1.0, 1.0, 0.5], dtype=torch.float64) / (math.sqrt(2) + 1e-6)
    assert torch.allclose(normalised, expected, atol=1e-12)
