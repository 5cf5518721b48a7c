"""The three actor classes used directly, without Ray, on the shipped tiny model."""

import math
import subprocess
import sys
import warnings
from pathlib import Path

import pyarrow as pa
import pytest
import torch
from builders import rollout_table, with_reward
from transformers import AutoModelForCausalLM

from actors.learner import Learner, lr_factor
from actors.reward_worker import RewardWorker
from actors.rollout_worker import RolloutWorker, sample_tokens
from pipeline.algorithm.advantages import compute_advantages, kl_penalty
from pipeline.algorithm.loss import policy_loss
from pipeline.algorithm.rewards import normalize_rewards
from pipeline.batch import ROLLOUT_SCHEMA, TOKEN_REWARD_TYPE, pad_right, response_mask, reward_column
from pipeline.config import LearnerConfig, load_config
from pipeline.errors import TokenforgeError
from pipeline.models.hf import build_sequences, load_model, response_logprobs

T = torch.tensor
PROMPTS = pa.table({"prompt": ["13+54=", "2+2=", "99+99="], "answer": ["67", "4", "198"], "group_id": [10, 11, 12]})


def config_with_rollout(seed: int = 0, **rollout):
    """The default config with these rollout settings."""
    return load_config(overrides=[f"seed={seed}", *(f"rollout.{k}={v}" for k, v in rollout.items())])


@pytest.fixture(scope="module")
def worker(builtin_model_path):
    return RolloutWorker(config_with_rollout(temperature=0.7, max_new_tokens=6, seed=3), builtin_model_path)


def test_rollout_batch_follows_schema(worker):
    batch = worker.generate(PROMPTS, group_size=4, step=1)
    assert batch.schema.names == [*ROLLOUT_SCHEMA.names, "prompt", "answer"]  # the dataset's columns ride along
    assert batch.num_rows == 12
    assert batch.column("sample_id").to_pylist() == [g * 4 + k for g in (10, 11, 12) for k in range(4)]
    assert batch.column("answer").to_pylist() == ["67"] * 4 + ["4"] * 4 + ["198"] * 4
    eos = worker.tokenizer.eos_token_id
    for ids, logps, finished in zip(
        *(batch.column(c).to_pylist() for c in ("response_ids", "behaviour_logprobs", "finished"))
    ):
        assert 1 <= len(ids) <= 6 and len(logps) == len(ids)
        assert all(lp <= 0 for lp in logps)
        assert finished == (ids[-1] == eos) and eos not in ids[:-1]


def test_top_p_keeps_only_the_nucleus(builtin_model_path):
    """top_p below the top token's probability leaves only that token: sampling equals greedy decoding."""
    config = config_with_rollout(temperature=1.0, top_p=1e-6, max_new_tokens=6, seed=5)
    nucleus = RolloutWorker(config, builtin_model_path).generate(PROMPTS, group_size=4, step=3)
    greedy = RolloutWorker(config, builtin_model_path).generate(PROMPTS, group_size=4, greedy=True)
    assert nucleus.column("response_ids").to_pylist() == greedy.column("response_ids").to_pylist()
    wide = RolloutWorker(config_with_rollout(max_new_tokens=6, seed=5), builtin_model_path).generate(
        PROMPTS, group_size=4, step=3
    )
    assert wide.column("response_ids").to_pylist() != greedy.column("response_ids").to_pylist()


def test_each_prompt_is_prefilled_once_for_its_group_with_the_same_samples(builtin_model_path):
    """The rollout worker runs each prompt once and copies its KV cache to the group's samples: the same tokens
    and (to float rounding) log-probs as prefilling every sample."""
    shared = RolloutWorker(config_with_rollout(max_new_tokens=6, seed=7), builtin_model_path)
    plain = RolloutWorker(config_with_rollout(max_new_tokens=6, seed=7), builtin_model_path)
    plain.share_prompts = False
    prefill = []
    shared.model.register_forward_pre_hook(lambda _m, _a, kw: prefill.append(kw["input_ids"].shape), with_kwargs=True)
    a, b = shared.generate(PROMPTS, group_size=8, step=2), plain.generate(PROMPTS, group_size=8, step=2)
    assert prefill[0][0] == 3 and all(shape == (24, 1) for shape in prefill[1:])  # 3 prompts once, then 24 rows
    assert a.column("response_ids").to_pylist() == b.column("response_ids").to_pylist()
    for x, y in zip(*(t.column("behaviour_logprobs").to_pylist() for t in (a, b))):
        assert x == pytest.approx(y, abs=1e-5)


def test_sampling_is_seeded_by_step_and_greedy_is_deterministic(worker):
    first = worker.generate(PROMPTS, group_size=4, step=5)
    again = worker.generate(PROMPTS, group_size=4, step=5)
    assert first.column("response_ids").equals(again.column("response_ids"))
    greedy = worker.generate(PROMPTS, group_size=3, greedy=True)
    rows = greedy.column("response_ids").to_pylist()
    assert rows[0] == rows[1] == rows[2]


def test_behaviour_logprobs_match_the_learner_recomputation(worker):
    """Same weights, same layout: the learner must see exactly the log-probs that sampled the tokens."""
    batch = worker.generate(PROMPTS, group_size=4, step=2)
    sequences = build_sequences(
        batch.column("prompt_ids").to_pylist(), batch.column("response_ids").to_pylist(), worker.tokenizer.pad_token_id
    )
    with torch.no_grad():
        logprobs, entropy = response_logprobs(worker.model, sequences, temperature=0.7)
    for i, behaviour in enumerate(batch.column("behaviour_logprobs").to_pylist()):
        assert torch.allclose(logprobs[i, : len(behaviour)], torch.tensor(behaviour), atol=1e-4)
    assert (entropy >= 0).all()


DYADIC = torch.log(T([[0.5, 0.25, 0.125, 0.125], [0.125, 0.125, 0.25, 0.5]]))  # softmax gives these exactly


def sampled_from(monkeypatch, logits, temperature, top_p, seed=0):
    """(tokens, logprobs, the weights torch.multinomial drew from)."""
    drawn = []
    real = torch.multinomial

    def recording(probs, *args, **kwargs):
        drawn.append(probs.clone())
        return real(probs, *args, **kwargs)

    monkeypatch.setattr(torch, "multinomial", recording)
    tokens, logprobs = sample_tokens(logits, temperature, top_p, False, torch.Generator().manual_seed(seed))
    return tokens, logprobs, drawn[0]


@pytest.mark.mutant
def test_sample_tokens_draws_from_the_tempered_softmax_and_reports_its_log_prob(monkeypatch):
    logits = T([[1.0, -0.5, 0.25, 2.0], [0.0, 3.0, -1.0, 0.5], [0.3, 0.2, 0.1, 0.0]])
    tokens, logprobs, probs = sampled_from(monkeypatch, logits, 0.7, 1.0)
    log_pi = torch.log_softmax(logits / 0.7, dim=-1)
    assert tokens.shape == (3,) and logprobs.shape == (3,)
    assert torch.equal(probs, log_pi.exp())  # top_p = 1: nothing cut, not even tokens of probability < 2^-24
    assert torch.equal(logprobs, log_pi.gather(-1, tokens[:, None]).squeeze(-1))
    tiny = T([[0.0, -18.0]])  # p = [1 - 1.5e-8, 1.5e-8]: in float32 the mass before token 1 rounds to 1.0
    assert sampled_from(monkeypatch, tiny, 1.0, 1.0)[2][0, 1] > 0


@pytest.mark.mutant
def test_top_p_keeps_the_smallest_prefix_whose_mass_reaches_top_p(monkeypatch):
    """Nucleus with exact dyadic probabilities: top_p = 0.75 keeps the two most likely tokens of each row
    (their mass is exactly 0.75; the third token's preceding mass equals top_p, so it is cut)."""
    _, _, probs = sampled_from(monkeypatch, DYADIC, 1.0, 0.75)
    assert torch.equal(probs, T([[0.5, 0.25, 0.0, 0.0], [0.0, 0.0, 0.25, 0.5]]))
    tokens, logprobs, _ = sampled_from(monkeypatch, DYADIC.repeat(200, 1), 1.0, 0.75, seed=3)
    assert set(tokens[0::2].tolist()) == {0, 1} and set(tokens[1::2].tolist()) == {2, 3}
    assert torch.equal(
        logprobs, torch.log_softmax(DYADIC.repeat(200, 1), -1).gather(-1, tokens[:, None]).squeeze(-1)
    )  # untruncated pi


@pytest.mark.mutant
def test_sample_tokens_greedy_and_one_row():
    logits = T([[0.1, 0.9, 0.3], [2.0, 1.0, 0.0], [0.0, 0.0, 5.0]])
    tokens, logprobs = sample_tokens(logits, 0.5, 0.9, True, torch.Generator())
    assert tokens.tolist() == [1, 0, 2]
    assert torch.allclose(logprobs, torch.log_softmax(logits / 0.5, -1).max(-1).values)
    one, one_logprob = sample_tokens(logits[:1], 1.0, 1.0, False, torch.Generator().manual_seed(0))
    assert one.shape == (1,) and one_logprob.shape == (1,)


@pytest.mark.mutant
def test_sampling_uses_only_the_given_generator():
    logits = torch.zeros(64, 5)
    draws = []
    for global_seed in (1, 2):
        torch.manual_seed(global_seed)
        draws.append(sample_tokens(logits, 1.0, 0.9, False, torch.Generator().manual_seed(7))[0])
    assert torch.equal(draws[0], draws[1])


class ScriptedModel(torch.nn.Module):
    """Stands in for the policy in RolloutWorker._sample: at generation step t, row i puts logit 2 on
    script[i][t] (0 elsewhere), and every call is recorded with its cache."""

    def __init__(self, script, vocab):
        super().__init__()
        self.script, self.vocab, self.calls = script, vocab, []

    def forward(self, input_ids, attention_mask, position_ids, use_cache, past_key_values=None):
        step = len(self.calls)
        self.calls.append(
            dict(
                input_ids=input_ids.clone(),
                attention_mask=attention_mask.clone(),
                position_ids=position_ids.clone(),
                use_cache=use_cache,
                cache=past_key_values,
            )
        )
        logits = torch.zeros(input_ids.shape[0], input_ids.shape[1], self.vocab)
        for i, row in enumerate(self.script):
            logits[i, -1, row[min(step, len(row) - 1)]] = 2.0
        return type("Out", (), {"logits": logits, "past_key_values": ("cache", step)})()


def scripted_worker(builtin_model_path, script, **rollout):
    worker = RolloutWorker(config_with_rollout(**rollout), builtin_model_path)
    worker.model = ScriptedModel(script, len(worker.tokenizer))
    worker.cache_key = "past_key_values"
    return worker


@pytest.mark.mutant
def test_generation_loop_stops_rows_at_eos_pads_after_it_and_feeds_the_cache(builtin_model_path):
    eos, pad = 1, 0
    script = [[5, eos, 7, eos], [6, 6, 6, 6], [eos, 8, 8, 8]]  # stops at step 1, never, at step 0
    worker = scripted_worker(builtin_model_path, script, max_new_tokens=4, temperature=0.5)
    ids = T([[pad, 3, 4], [3, 4, 4], [pad, pad, 3]])
    attention = (ids != pad).long()
    tokens, logprobs, lengths, finished = worker._sample(ids, attention, torch.arange(3), greedy=True)
    assert tokens.tolist() == [[5, eos, pad, pad], [6, 6, 6, 6], [eos, pad, pad, pad]]
    assert lengths == [2, 4, 1] and finished == [True, False, True]
    top = float(torch.log_softmax(T([2.0] + [0.0] * 14) / 0.5, -1)[0])  # log pi of the scripted token
    assert torch.allclose(logprobs, T([[top, top, 0, 0], [top] * 4, [top, 0, 0, 0]]))
    assert (logprobs[tokens == pad] == 0).all()
    calls = worker.model.calls
    assert len(calls) >= 4  # the prompt, then one call per generated token (but the last, at least)
    assert torch.equal(calls[0]["input_ids"], ids) and torch.equal(calls[0]["attention_mask"], attention)
    assert calls[0]["position_ids"].tolist() == [[0, 0, 1], [0, 1, 2], [0, 0, 0]]
    for t, call in enumerate(calls[1:4], start=1):
        assert call["use_cache"] is True and call["cache"] == ("cache", t - 1)  # the previous call's cache
        assert call["input_ids"].tolist() == [[row[t - 1]] for row in script]  # the token sampled last
        assert torch.equal(call["attention_mask"], torch.cat([attention, torch.ones(3, t, dtype=torch.long)], 1))
        assert call["position_ids"].tolist() == [[1 + t], [2 + t], [t]]
    assert calls[0]["use_cache"] is True


@pytest.mark.mutant
def test_generation_loop_ends_as_soon_as_every_row_stopped(builtin_model_path):
    eos = 1
    worker = scripted_worker(builtin_model_path, [[5, eos], [eos]], max_new_tokens=6)
    ids = T([[3, 4], [3, 4]])
    tokens, logprobs, lengths, finished = worker._sample(ids, torch.ones_like(ids), torch.arange(2), greedy=True)
    assert tokens.shape == (2, 2) and lengths == [2, 1] and finished == [True, True]
    assert len(worker.model.calls) == 2


@pytest.mark.mutant
def test_generation_loop_samples_unless_greedy_with_the_configured_top_p(builtin_model_path):
    """Scripted logit 2 vs 0 elsewhere: sampling leaves the scripted token often; top_p = 1e-6 keeps only it."""
    script = [[5] * 6] * 4
    ids = T([[3, 4]] * 4)
    sampled = scripted_worker(builtin_model_path, script, max_new_tokens=6)._sample(
        ids, torch.ones_like(ids), torch.arange(4), greedy=False
    )[0]
    assert (sampled != 5).any()
    nucleus = scripted_worker(builtin_model_path, script, max_new_tokens=6, top_p=1e-6)._sample(
        ids, torch.ones_like(ids), torch.arange(4), greedy=False
    )[0]
    assert (nucleus == 5).all()


@pytest.mark.mutant
def test_a_one_character_stop_string_stops_a_row_on_its_first_token(builtin_model_path):
    """rollout.stop equal to the first character a row generates (greedy) ends that row after one token; the other
    rows are cut after their first occurrence of it, as by the stop-string rule everywhere else."""
    prompts = pa.table({"prompt": ["13+54=", "2+2=", "99+99=", "7+1="], "group_id": [0, 1, 2, 3]})
    free = RolloutWorker(config_with_rollout(max_new_tokens=6), builtin_model_path)
    full = free.generate(prompts, group_size=1, greedy=True).column("response_ids").to_pylist()
    first = full[0][0]
    stop = free.tokenizer.decode([first])
    assert first != free.tokenizer.eos_token_id and len(stop) == 1
    cut = RolloutWorker(config_with_rollout(max_new_tokens=6, stop=f"['{stop}']"), builtin_model_path)
    batch = cut.generate(prompts, group_size=1, greedy=True)
    assert batch.column("response_ids").to_pylist() == [r[: r.index(first) + 1] if first in r else r for r in full]
    assert batch.column("response_ids").to_pylist()[0] == [first] and batch.column("finished").to_pylist()[0]


def scored_rows(responses: list[str], answer: str, worker: RolloutWorker) -> pa.Table:
    """A hand-made rollout batch: `responses` to the prompt `a+b=` ('$' stands for EOS)."""
    tok = worker.tokenizer
    ids = [[tok.eos_token_id if c == "$" else tok.convert_tokens_to_ids(c) for c in r] for r in responses]
    n = len(ids)
    metadata = pa.table({"prompt": ["a+b="] * n, "answer": [answer] * n})
    return rollout_table(
        [tok("1+2=").input_ids] * n,
        ids,
        [r.replace("$", "") for r in responses],
        metadata,
        prompt_texts=["a+b="] * n,
        finished=[r.endswith("$") for r in responses],
    )


def test_reward_worker_scores_exact_and_digit_match(worker, builtin_model_path):
    batch = scored_rows(["67$", "68$", "67", "678$", "7$"], "67", worker)
    scorer = RewardWorker(load_config(), builtin_model_path, ["exact_match", "digit_match"])
    assert scorer.score(batch, "exact_match").rows == [[0, 0, 1], [0, 0, 0], [0, 1], [0, 0, 0, 0], [0, 0]]
    third = pytest.approx(1 / 3)
    digit = scorer.score(batch, "digit_match").rows
    assert digit[0] == [third, third, third]  # both digits and EOS in place
    assert digit[1] == [third, 0, 0]  # wrong second digit, so EOS is not in place either
    assert digit[2] == [third, third]  # cut before EOS
    assert digit[3] == [third, third, 0, 0]  # an extra digit: nothing after the answer earns
    assert digit[4] == [0, 0]


@pytest.fixture
def learner_and_batch(worker, builtin_model_path):
    config = load_config(overrides=["reward.weights={exact_match: 2.0, digit_match: 0.5}", "learner.lr=1e-4"])
    learner = Learner(config, builtin_model_path, builtin_model_path)
    batch = worker.generate(PROMPTS, group_size=8, step=9)
    return learner, scored(batch, config, builtin_model_path)


def scored(batch: pa.Table, config, model_path: str) -> pa.Table:
    """`batch` with every weighted component's reward column, scored by a RewardWorker."""
    table, _ = RewardWorker(config, model_path, list(config.reward.weights)).score_all(
        batch, list(config.reward.weights)
    )
    return table


def test_learner_step_applies_weights_exactly_and_publishes_loadable_weights(learner_and_batch, builtin_model_path):
    learner, batch = learner_and_batch
    worker = RolloutWorker(config_with_rollout(max_new_tokens=6), builtin_model_path)  # its own: set_weights changes it
    before = {k: v.clone() for k, v in learner.get_weights().items()}
    metrics = learner.train_step(batch)
    expected = 2.0 * metrics["reward/exact_match/mean"] + 0.5 * metrics["reward/digit_match/mean"]
    assert metrics["reward/total/mean"] == pytest.approx(expected)
    assert metrics["learner/policy_version"] == 1.0 and learner.get_version() == 1
    assert metrics["learner/tokens"] == sum(len(r) for r in batch.column("response_ids").to_pylist())
    weights = learner.get_weights()
    assert all(t.device.type == "cpu" for t in weights.values())
    assert any(not torch.equal(before[k], weights[k]) for k in weights)
    assert worker.set_weights(weights, 1) == 1 and worker.generate(PROMPTS, 1).column("policy_version")[0].as_py() == 1
    with pytest.raises(
        ValueError, match=r"set_weights: the state dict lacks 1 of the model's weights, e\.g\. 'lm_head\.weight'"
    ):
        worker.set_weights({k: v for k, v in weights.items() if k != "lm_head.weight"}, 2)


def test_learner_raises_the_likelihood_of_winning_samples(learner_and_batch):
    """Samples that solved a prompt some of their group failed get more likely after updates."""
    learner, batch = learner_and_batch
    solved = [sum(r) for r in batch.column(reward_column("exact_match")).to_pylist()]
    groups = batch.column("group_id").to_pylist()
    contrast = {g for g in groups if len({s for s, h in zip(solved, groups) if h == g}) > 1}
    winners = [i for i, (s, g) in enumerate(zip(solved, groups)) if s == 1 and g in contrast]
    assert winners, "the fixed sample batch should hold a prompt solved by some samples only"
    sequences = build_sequences(batch.column("prompt_ids").to_pylist(), batch.column("response_ids").to_pylist(), 0)
    mask = response_mask(batch)

    def winners_logprob() -> float:
        with torch.no_grad():
            return float((response_logprobs(learner.model, sequences)[0] * mask)[winners].sum())

    start = winners_logprob()
    learner.train_step(batch)  # a small step (lr 1e-4): Adam's first steps move every weight by ~lr
    assert winners_logprob() > start


def test_learner_checkpoint_round_trip(learner_and_batch, tmp_path, builtin_model_path):
    learner, batch = learner_and_batch
    learner.train_step(batch)
    learner.save_local(str(tmp_path))
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path)
    assert all(torch.equal(reloaded.state_dict()[k], v) for k, v in learner.get_weights().items())
    assert (tmp_path / "model.safetensors").is_file() and (tmp_path / "tokenizer.json").is_file()
    fresh = Learner(learner.config, str(tmp_path), builtin_model_path)
    assert fresh.load_state(str(tmp_path)) == 1
    assert fresh.optimizer.state_dict()["state"].keys() == learner.optimizer.state_dict()["state"].keys()
    # a resumed run with another lr (e.g. mutated by PBT) uses the new lr at the saved schedule position
    mutated = learner.config.model_copy(update={"learner": learner.config.learner.model_copy(update={"lr": 3e-3})})
    changed = Learner(mutated, str(tmp_path), builtin_model_path)
    changed.load_state(str(tmp_path))
    assert changed.optimizer.param_groups[0]["lr"] == pytest.approx(
        3e-3 * lr_factor(mutated.learner, 1, mutated.trainer.total_steps)
    )


def test_reference_model_is_frozen_when_kl_is_on(builtin_model_path, learner_and_batch):
    _, batch = learner_and_batch
    config = load_config(
        overrides=["algorithm.kl_in_reward_coef=0.05", "algorithm.kl_coef=0.01", "algorithm.kl_kind=k3"]
    )
    learner = Learner(config, builtin_model_path, builtin_model_path)
    assert not any(p.requires_grad for p in learner.reference.parameters())
    metrics = learner.train_step(batch)
    assert metrics["policy/kl"] == pytest.approx(0.0, abs=1e-6)  # policy == reference before the update
    assert learner.train_step(batch)["policy/kl"] > 1e-6  # the policy moved; the reference did not
    original = load_model(builtin_model_path).state_dict()
    assert all(torch.equal(original[k], v) for k, v in learner.reference.state_dict().items())


def test_kl_in_the_reward_lowers_the_rewards_by_beta_times_kl(builtin_model_path, learner_and_batch):
    """r_t -= beta * k1_t with k1 = logp_behaviour - logp_ref: a batch sampled by a policy that moved away
    from the reference has positive mean k1, so its total reward drops by beta * sum_t k1_t per sample."""
    _, batch = learner_and_batch
    moved = Learner(load_config(overrides=["learner.lr=1e-3"]), builtin_model_path, builtin_model_path)
    for _ in range(3):
        moved.train_step(batch)
    sampler = RolloutWorker(config_with_rollout(max_new_tokens=6, seed=4), builtin_model_path)
    sampler.set_weights(moved.get_weights(), 3)
    config = load_config(overrides=["algorithm.kl_in_reward_coef=0.5"])
    fresh = scored(sampler.generate(PROMPTS, group_size=8, step=1), config, builtin_model_path)
    plain = Learner(load_config(), builtin_model_path, builtin_model_path).train_step(fresh)
    penalised = Learner(config, builtin_model_path, builtin_model_path).train_step(fresh)
    sequences = build_sequences(fresh.column("prompt_ids").to_pylist(), fresh.column("response_ids").to_pylist(), 0)
    with torch.no_grad():
        ref = response_logprobs(load_model(builtin_model_path), sequences)[0]
    mask = response_mask(fresh)
    k1 = ((pad_right(fresh.column("behaviour_logprobs").to_pylist()) - ref) * mask).sum(1).mean()
    assert k1 > 0.01
    assert penalised["reward/total/mean"] == pytest.approx(plain["reward/total/mean"])  # the components' total
    assert penalised["reward/kl_penalty/mean"] == pytest.approx(-0.5 * float(k1), rel=1e-4)
    assert penalised["advantage/abs_mean"] != pytest.approx(plain["advantage/abs_mean"])  # and it reaches A


@pytest.mark.parametrize("agg", ["token-mean", "seq-mean-token-mean", "seq-mean-token-sum", "seq-mean-token-sum-norm"])
@pytest.mark.filterwarnings("ignore:Seems like `optimizer.step\\(\\)` has been overridden")
def test_learner_micro_batches_give_the_full_batch_gradient(learner_and_batch, builtin_model_path, agg):
    _, batch = learner_and_batch
    runs = []
    for micro in (5, 1000):
        config = load_config(overrides=[f"learner.micro_batch_size={micro}", f"algorithm.agg={agg}"])
        learner = Learner(config, builtin_model_path, builtin_model_path)
        grads = {}
        model = learner.model
        learner.optimizer.step = lambda grads=grads, model=model: grads.update(
            {n: p.grad.clone() for n, p in model.named_parameters()}
        )
        runs.append((grads, learner.train_step(batch)))
    (small, small_metrics), (full, full_metrics) = runs
    assert small_metrics["loss/policy"] == pytest.approx(full_metrics["loss/policy"], abs=1e-6)
    assert small_metrics["loss/grad_norm"] == pytest.approx(full_metrics["loss/grad_norm"], rel=1e-4)
    assert all(torch.allclose(small[n], full[n], atol=1e-6) for n in full)


def test_samples_without_advantage_are_left_out_of_the_update(learner_and_batch, worker, builtin_model_path):
    learner, _ = learner_and_batch
    greedy = worker.generate(PROMPTS, group_size=4, greedy=True)  # identical samples per group: A = 0 everywhere
    greedy = scored(greedy, learner.config, builtin_model_path)
    before = learner.get_weights()
    metrics = learner.train_step(greedy)
    assert metrics["learner/kept_frac"] == 0.0 and "loss/policy" not in metrics
    assert all(torch.equal(before[k], v) for k, v in learner.get_weights().items())
    assert metrics["learner/policy_version"] == 1.0
    assert learner.scheduler.last_epoch == 1  # the lr schedule follows steps, updates or not

    config = load_config(overrides=["algorithm.skip_zero_advantage=false"])
    assert Learner(config, builtin_model_path, builtin_model_path).train_step(greedy)["learner/kept_frac"] == 1.0


def test_learning_rate_schedule_warms_up_then_follows_the_cosine():
    constant = LearnerConfig(warmup_steps=4, lr_schedule="constant")
    cosine = LearnerConfig(warmup_steps=4, lr_schedule="cosine", min_lr_ratio=0.2)
    assert [lr_factor(constant, k, 20) for k in (0, 3, 4, 19)] == [0.2, 0.8, 1.0, 1.0]
    # after warm-up: r + (1 - r) * (1 + cos(pi * (k - 4) / 15)) / 2
    assert [lr_factor(cosine, k, 20) for k in (0, 3, 4)] == [0.2, 0.8, 1.0]
    assert lr_factor(cosine, 19, 20) == pytest.approx(0.2)
    assert lr_factor(cosine, 4 + 15 / 2, 20) == pytest.approx(0.6)


def captured_gradients(learner: Learner) -> dict[str, torch.Tensor]:
    """Make `learner.optimizer.step` record the gradients instead of applying them."""
    grads: dict[str, torch.Tensor] = {}
    model = learner.model
    learner.optimizer.step = lambda: grads.update({n: p.grad.clone() for n, p in model.named_parameters()})
    return grads


@pytest.mark.filterwarnings("ignore:Seems like `optimizer.step\\(\\)` has been overridden")
def test_skipping_zero_advantage_samples_keeps_the_gradient(learner_and_batch, builtin_model_path):
    _, batch = learner_and_batch
    runs = {}
    for skip in (True, False):
        learner = Learner(
            load_config(overrides=[f"algorithm.skip_zero_advantage={skip}"]), builtin_model_path, builtin_model_path
        )
        grads = captured_gradients(learner)
        runs[skip] = (grads, learner.train_step(batch))
    (skipped, skipped_metrics), (full, full_metrics) = runs[True], runs[False]
    assert skipped_metrics["learner/kept_frac"] < 1.0 == full_metrics["learner/kept_frac"]
    assert skipped_metrics["loss/policy"] == pytest.approx(full_metrics["loss/policy"], abs=1e-6)
    assert all(torch.allclose(skipped[n], full[n], atol=1e-6) for n in full)


def test_non_finite_steps_are_skipped_and_the_run_goes_on_until_too_many(learner_and_batch, builtin_model_path):
    _, batch = learner_and_batch
    config = load_config(overrides=["algorithm.estimator=reinforce", "learner.max_nonfinite_steps=2"])
    learner = Learner(config, builtin_model_path, builtin_model_path)
    inf_reward = with_reward(batch, "exact_match", float("inf"))
    inf_loss = with_reward(batch, "exact_match", 3e38)  # finite reward and advantage; -A * logp summed overflows

    def state() -> tuple[dict, dict]:
        return learner.get_weights(), {k: v.copy() for k, v in learner.optimizer.state_dict()["state"].items()}

    for bad, step in ((inf_reward, 1), (inf_loss, 3)):
        before_weights, before_optimizer = state()
        metrics = learner.train_step(bad, step=step)
        assert metrics["learner/skipped_nonfinite"] == 1.0
        weights, optimizer = state()
        assert all(torch.equal(before_weights[k], v) for k, v in weights.items())  # bit-identical
        assert optimizer.keys() == before_optimizer.keys()
        good = learner.train_step(batch, step=step + 1)  # the run goes on, and the streak restarts
        assert good["learner/skipped_nonfinite"] == 0.0 and math.isfinite(good["loss/policy"])
        assert any(not torch.equal(weights[k], v) for k, v in learner.get_weights().items())
    assert learner.scheduler.last_epoch == 4
    learner.train_step(inf_loss, step=5)
    with pytest.raises(TokenforgeError) as error:
        learner.train_step(inf_reward, step=6)
    message = str(error.value)  # what happened, that the weights are safe, what to do
    assert (
        "2 consecutive steps up to step 6 had a NaN/inf" in message and "the weights are those before them" in message
    )
    assert "learner.lr" in message and "learner.max_nonfinite_steps" in message


def test_several_updates_per_batch_are_importance_weighted(learner_and_batch, builtin_model_path):
    """updates_per_batch=2 with is_cap: the second update sees pi_theta != pi_behaviour (the first moved it),
    so the IS weights leave 1 and the cap binds on some tokens."""
    _, batch = learner_and_batch
    config = load_config(
        overrides=["learner.updates_per_batch=2", "algorithm.is_cap=1.0", "learner.lr=1e-3", "learner.warmup_steps=0"]
    )
    learner = Learner(config, builtin_model_path, builtin_model_path)
    metrics = learner.train_step(batch)  # the metrics are the last update's
    assert metrics["policy/is_weight/mean"] != pytest.approx(1.0, abs=1e-4)
    assert 0.0 < metrics["policy/is_weight/clip_frac"] < 1.0
    assert learner.scheduler.last_epoch == 2 and learner.get_version() == 1  # two updates, one policy version


def test_group_normalisation_is_applied_by_the_learner(learner_and_batch, builtin_model_path):
    """normalize: group makes every group's composite total 0 on average; without it, the mean total is
    the weighted reward itself."""
    _, batch = learner_and_batch
    plain = Learner(load_config(), builtin_model_path, builtin_model_path).train_step(batch)
    config = load_config(
        overrides=["reward.components.exact_match.normalize=group", "reward.components.digit_match.normalize=group"]
    )
    normalised = Learner(config, builtin_model_path, builtin_model_path).train_step(batch)
    assert plain["reward/total/mean"] > 0.1
    assert normalised["reward/total/mean"] == pytest.approx(0.0, abs=1e-9)
    assert normalised["reward/exact_match/mean"] == plain["reward/exact_match/mean"]  # metrics of the raw component


EOS = 1
RESPONSES = [[4, EOS], [5, 6, EOS], [4, EOS], [4, EOS]]  # groups 0 | 1; group 1's samples are identical
EXACT = [[0.0, 1.0], [0.0, 0.0, 0.0], [0.0, 1.0], [0.0, 1.0]]
DIGIT = [[1 / 3, 1 / 3], [1 / 3, 0.0, 0.0], [1 / 3, 1 / 3], [1 / 3, 1 / 3]]


def hand_scored_batch(
    exact=EXACT, digit=DIGIT, finished=(True, False, True, True), behaviour=None, versions=(0, 0, 0, 0)
) -> pa.Table:
    """RESPONSES to the prompt 1+2= in groups 0 | 1, scored by hand: exact_match and digit_match token rewards."""
    metadata = pa.table({"prompt": ["1+2="] * 4, "answer": ["3"] * 4})
    table = rollout_table(
        [[4, 13, 5, 14]] * 4,
        RESPONSES,
        ["1", "23", "1", "1"],
        metadata,
        prompt_texts=["1+2="] * 4,
        group_ids=[0, 0, 1, 1],
        finished=finished,
        versions=versions,
        behaviour=behaviour or [[-1.0 - 0.1 * k for k in range(len(r))] for r in RESPONSES],
    )
    table = table.append_column(reward_column("exact_match"), pa.array(exact, type=TOKEN_REWARD_TYPE))
    return table.append_column(reward_column("digit_match"), pa.array(digit, type=TOKEN_REWARD_TYPE))


def learner_for(builtin_model_path, *overrides):
    config = load_config(overrides=["reward.weights={exact_match: 2.0, digit_match: 0.5}", *overrides])
    return Learner(config, builtin_model_path, builtin_model_path)


@pytest.mark.mutant
def test_learner_step_reports_every_metric_with_its_value(builtin_model_path):
    learner = learner_for(builtin_model_path)
    batch = hand_scored_batch()
    metrics = learner.train_step(batch)
    assert set(metrics) == {
        "reward/exact_match/mean",
        "reward/exact_match/std",
        "reward/digit_match/mean",
        "reward/digit_match/std",
        "reward/total/mean",
        "learner/kept_frac",
        "loss/policy",
        "loss/grad_norm",
        "learner/lr",
        "policy/is_weight/mean",
        "policy/is_weight/clip_frac",
        "policy/entropy",
        "advantage/abs_mean",
        "response/length_mean",
        "response/finished_frac",
        "learner/policy_version",
        "learner/tokens",
        "learner/skipped_nonfinite",
        "advantage/zero_frac",
        "policy/staleness_mean",
        "policy/staleness_max",
        "time/learner/prepare_s",
        "time/learner/forward_s",
        "time/learner/loss_s",
        "time/learner/backward_s",
        "time/learner/optimizer_s",
        "time/learner/total_s",
    }
    assert (
        metrics["policy/staleness_mean"] == metrics["policy/staleness_max"] == 0.0
    )  # sampled by version 0, the learner's
    phases = [metrics[f"time/learner/{phase}_s"] for phase in ("prepare", "forward", "loss", "backward", "optimizer")]
    assert all(seconds > 0 for seconds in phases) and sum(phases) <= metrics["time/learner/total_s"]
    assert metrics["advantage/zero_frac"] == 0.5  # group 1's two samples: every token's advantage exactly 0
    digit_totals = torch.tensor([2 / 3, 1 / 3, 2 / 3, 2 / 3])
    assert metrics["reward/exact_match/mean"] == 0.75 and metrics["reward/exact_match/std"] == pytest.approx(0.5)
    assert metrics["reward/digit_match/mean"] == pytest.approx(7 / 12)
    assert metrics["reward/digit_match/std"] == pytest.approx(float(digit_totals.std()))
    assert metrics["reward/total/mean"] == pytest.approx(2.0 * 0.75 + 0.5 * 7 / 12)
    assert metrics["learner/kept_frac"] == 0.5  # group 1 is all equal: A = 0, left out
    mask = response_mask(batch)
    rewards = 2.0 * pad_right(EXACT, width=3).double() + 0.5 * pad_right(DIGIT, width=3).double()
    advantages = compute_advantages("grpo", rewards, mask, torch.tensor([0, 0, 1, 1]))
    assert metrics["advantage/abs_mean"] == pytest.approx(float((advantages.abs() * mask).sum() / 9))
    assert metrics["response/length_mean"] == 2.25 and metrics["learner/tokens"] == 9.0
    assert metrics["response/finished_frac"] == 0.75
    assert metrics["learner/policy_version"] == 1.0 and metrics["learner/skipped_nonfinite"] == 0.0
    assert metrics["learner/lr"] == pytest.approx(learner.config.learner.lr / (learner.config.learner.warmup_steps + 1))
    later = learner.train_step(hand_scored_batch(versions=(0, 1, 1, 1)))  # the learner holds version 1 now
    assert later["learner/policy_version"] == 2.0 and learner.get_version() == 2
    assert (later["policy/staleness_mean"], later["policy/staleness_max"]) == (0.25, 1.0)


@pytest.mark.parametrize(
    ("agg", "loss", "clip"),
    [
        ("token-mean", "reinforce", {}),
        ("seq-mean-token-sum-norm", "reinforce", {}),
        ("seq-mean-token-mean", "ppo_clip", {"clip_low": 0.05, "clip_high": 0.1}),
    ],
)
@pytest.mark.mutant
def test_learner_loss_is_the_policy_loss_of_the_whole_batch(builtin_model_path, agg, loss, clip):
    """loss/policy equals policy_loss on the full batch with the configured loss, aggregation and clip range (its own
    token and sequence counts, max_len = rollout.max_new_tokens), although zero-advantage samples were left out of
    the pass; the policy metrics are token means over the kept samples."""
    overrides = [f"algorithm.agg={agg}", f"algorithm.loss={loss}", "learner.micro_batch_size=1"]
    learner = learner_for(builtin_model_path, *overrides, *(f"algorithm.{k}={v}" for k, v in clip.items()))
    batch = hand_scored_batch()
    mask = response_mask(batch)
    sequences = build_sequences(batch.column("prompt_ids").to_pylist(), RESPONSES, learner.tokenizer.pad_token_id)
    with torch.no_grad():
        logprobs, entropy = response_logprobs(learner.model, sequences, learner.config.rollout.temperature)
    rewards = 2.0 * pad_right(EXACT, width=3).double() + 0.5 * pad_right(DIGIT, width=3).double()
    advantages = compute_advantages("grpo", rewards, mask, torch.tensor([0, 0, 1, 1]))
    behaviour = pad_right(batch.column("behaviour_logprobs").to_pylist())  # far from the model's: ratios leave 1
    clip = {**clip, "is_cap": learner.config.algorithm.is_cap}  # the default's truncation (2.0) applies too
    expected, _ = policy_loss(
        logprobs, behaviour, advantages, mask, agg=agg, loss=loss, max_len=learner.config.rollout.max_new_tokens, **clip
    )
    kept = policy_loss(logprobs[:2], behaviour[:2], advantages[:2], mask[:2], agg=agg, loss=loss, **clip)[1]
    metrics = learner.train_step(batch)
    assert metrics["loss/policy"] == pytest.approx(float(expected), rel=1e-5)
    assert metrics["policy/is_weight/mean"] == pytest.approx(kept["is_weight/mean"], rel=1e-5)
    assert metrics["policy/is_weight/clip_frac"] == pytest.approx(kept["is_weight/clip_frac"], rel=1e-5)
    assert metrics["policy/entropy"] == pytest.approx(float((entropy[:2] * mask[:2]).sum() / mask[:2].sum()), rel=1e-5)
    if loss == "ppo_clip":
        assert 0 < metrics["policy/is_weight/clip_frac"] < 1  # the clip range binds on some tokens, not all


def first_gradient(learner, batch) -> torch.Tensor:
    """The gradient of the learner's next update (its optimizer step replaced by a recorder), flattened."""
    grads = []
    learner.optimizer.step = lambda: grads.append(torch.cat([p.grad.flatten() for p in learner.model.parameters()]))
    learner.train_step(batch)
    return grads[0]


@pytest.mark.filterwarnings("ignore:Seems like `optimizer.step\\(\\)` has been overridden")
@pytest.mark.mutant
def test_entropy_and_kl_loss_terms_reach_the_gradient(builtin_model_path):
    """entropy_coef and kl_coef (with kl_loss_kind) each change the update; the KL gradient is 0 while the policy
    equals the reference, so the policy first takes a step away from it."""
    batch = hand_scored_batch()
    plain = first_gradient(learner_for(builtin_model_path), batch)
    assert not torch.allclose(
        first_gradient(learner_for(builtin_model_path, "algorithm.entropy_coef=0.5"), batch), plain
    )
    moved = learner_for(builtin_model_path, "learner.lr=1e-2", "learner.warmup_steps=0")
    moved.train_step(batch)
    grads = {}
    for name, overrides in {
        "none": [],
        "k2": ["algorithm.kl_coef=0.5"],
        "k3": ["algorithm.kl_coef=0.5", "algorithm.kl_loss_kind=k3"],
    }.items():
        learner = learner_for(builtin_model_path, "algorithm.skip_zero_advantage=false", *overrides)
        learner.model.load_state_dict(moved.model.state_dict())
        grads[name] = first_gradient(learner, batch)
    assert not torch.allclose(grads["k2"], grads["none"]) and not torch.allclose(grads["k3"], grads["k2"])


@pytest.mark.mutant
def test_a_component_that_applies_to_one_sample_has_std_0(builtin_model_path):
    learner = learner_for(builtin_model_path)
    digit = [None, [0.25, 0.0, 0.5], None, None]
    metrics = learner.train_step(hand_scored_batch(digit=digit))
    assert metrics["reward/digit_match/mean"] == 0.75 and metrics["reward/digit_match/std"] == 0.0
    assert metrics["reward/total/mean"] == pytest.approx(2.0 * 0.75 + 0.5 * 0.75 / 4)


@pytest.mark.mutant
def test_skipped_updates_are_counted_per_update_and_warn_about_nothing(builtin_model_path):
    learner = learner_for(
        builtin_model_path, "learner.updates_per_batch=2", "algorithm.is_cap=2.0", "learner.max_nonfinite_steps=1"
    )
    inf = [[0.0, float("inf")], [0.0, 0.0, 0.0], [0.0, 1.0], [0.0, 1.0]]
    with pytest.raises(TokenforgeError, match="up to update 1 had a NaN/inf"):
        learner.train_step(hand_scored_batch(exact=inf))  # no `step`: the update number names it
    learner = learner_for(builtin_model_path, "learner.updates_per_batch=2", "algorithm.is_cap=2.0")
    assert learner.train_step(hand_scored_batch(exact=inf))["learner/skipped_nonfinite"] == 2.0
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        learner.train_step(hand_scored_batch(exact=inf))  # the schedule steps without optimizer steps, silently
    assert not [w for w in caught if "lr_scheduler" in str(w.message)]
    assert learner.scheduler.last_epoch == 4


@pytest.mark.mutant
def test_reference_log_probs_cover_every_row_in_micro_batches(builtin_model_path):
    """Four samples only two tokens wide, micro-batches of one: the reference log-probs hold all four rows."""
    learner = learner_for(builtin_model_path, "algorithm.kl_coef=0.05", "learner.micro_batch_size=1")
    sequences = build_sequences([[4], [5], [6], [7]], [[8], [9], [4], [EOS]], learner.tokenizer.pad_token_id)
    assert sequences["input_ids"].shape == (4, 2)
    with torch.no_grad():
        expected = response_logprobs(learner.reference, sequences, learner.config.rollout.temperature)[0]
    assert torch.allclose(learner._reference_logprobs(sequences), expected, atol=1e-6)


@pytest.mark.mutant
def test_the_lora_reference_is_the_base_model_with_the_adapters_switched_off(builtin_model_path):
    """With LoRA there is no reference copy: the reference log-probs are the policy's with its adapters off, also
    once the adapters have moved away from 0 (at the start they are equal by construction); the adapters are on
    again afterwards."""
    from pipeline.data.inputs import with_builtin_defaults

    config = with_builtin_defaults(
        load_config(
            overrides=[
                "task=chat_addition",
                "model.lora={r: 4, alpha: 8, target_modules: [q_proj, v_proj]}",
                "algorithm.kl_coef=0.05",
            ]
        )
    )
    learner = Learner(config, config.model.path, config.model.path)
    assert learner.reference is None
    torch.manual_seed(0)
    with torch.no_grad():
        for name, parameter in learner.model.named_parameters():
            if "lora_B" in name:
                parameter.normal_(0.0, 0.5)
    prompt = learner.tokenizer("12+30=").input_ids
    sequences = build_sequences(
        [prompt, prompt],
        [learner.tokenizer("42", add_special_tokens=False).input_ids, [learner.tokenizer.eos_token_id]],
        learner.tokenizer.pad_token_id,
    )
    temperature = config.rollout.temperature
    with torch.no_grad():
        policy = response_logprobs(learner.model, sequences, temperature)[0]
        base = response_logprobs(load_model(config.model.path), sequences, temperature)[0]
    assert not torch.allclose(policy, base, atol=1e-3)  # the adapters matter
    assert torch.allclose(learner._reference_logprobs(sequences), base, atol=1e-5)
    with torch.no_grad():
        assert torch.equal(response_logprobs(learner.model, sequences, temperature)[0], policy)


@pytest.mark.mutant
def test_the_learner_takes_the_fp32_log_softmax_logprob_chunk_tokens_at_a_time(builtin_model_path, monkeypatch):
    """learner.logprob_chunk_tokens bounds the tokens whose fp32 log-softmax is held at once, in the reference
    pass (no grad) and in the policy's forward and backward passes."""
    import pipeline.models.hf

    seen = []
    real = pipeline.models.hf.token_logprob_entropy

    def recording(logits, targets, temperature):
        seen.append((torch.is_grad_enabled(), logits.shape[0]))
        return real(logits, targets, temperature)

    monkeypatch.setattr(pipeline.models.hf, "token_logprob_entropy", recording)
    learner = learner_for(builtin_model_path, "algorithm.kl_coef=0.05", "learner.logprob_chunk_tokens=2")
    learner.train_step(hand_scored_batch())
    assert {grad for grad, _ in seen} == {True, False}
    assert max(rows for _, rows in seen) == 2


@pytest.mark.mutant
def test_the_learner_passes_clip_high_to_the_ppo_loss(builtin_model_path):
    """Behaviour log-probs 1 below the model's: every ratio is e, above 1 + clip_high, so the winners' clipped
    terms are (1 + clip_high) * A and the loss depends on clip_high (0.1 here, not the default 0.2)."""
    learner = learner_for(builtin_model_path, "algorithm.loss=ppo_clip", "algorithm.clip_high=0.1")
    prompts = hand_scored_batch().column("prompt_ids").to_pylist()
    sequences = build_sequences(prompts, RESPONSES, learner.tokenizer.pad_token_id)
    with torch.no_grad():
        logprobs, _ = response_logprobs(learner.model, sequences, learner.config.rollout.temperature)
    behaviour = [(logprobs[i, : len(r)] - 1.0).tolist() for i, r in enumerate(RESPONSES)]
    batch = hand_scored_batch(behaviour=behaviour)
    mask = response_mask(batch)
    rewards = 2.0 * pad_right(EXACT, width=3).double() + 0.5 * pad_right(DIGIT, width=3).double()
    advantages = compute_advantages("grpo", rewards, mask, torch.tensor([0, 0, 1, 1]))
    args = (logprobs, pad_right(behaviour), advantages, mask)
    common = dict(agg=learner.config.algorithm.agg, loss="ppo_clip", max_len=learner.config.rollout.max_new_tokens)
    expected = float(policy_loss(*args, clip_high=0.1, **common)[0])
    assert expected != pytest.approx(float(policy_loss(*args, clip_high=0.2, **common)[0]), rel=1e-3)
    assert learner.train_step(batch)["loss/policy"] == pytest.approx(expected, rel=1e-5)


@pytest.mark.mutant
def test_the_learner_sums_the_weighted_rewards_in_float64(builtin_model_path):
    """2.0 * exact + 0.5 * digit with digit = 1/3 (float32 in the batch): the token rewards and their totals are
    float64 sums (2 + 1/6 is not a float32: rounding it moves the total by about 1e-7)."""
    learner = learner_for(builtin_model_path)
    batch = hand_scored_batch()
    learner.train_step(batch)
    rewards = 2.0 * pad_right(EXACT, width=3).double() + 0.5 * pad_right(DIGIT, width=3).double()
    expected = (rewards * response_mask(batch)).sum(1)
    assert rewards.float().double().ne(rewards).any()  # float32 token rewards would differ
    assert torch.allclose(
        T(learner.learned_columns().column("total_reward").to_pylist(), dtype=torch.float64),
        expected,
        rtol=0,
        atol=1e-12,
    )


@pytest.mark.mutant
def test_the_learner_normalises_a_component_over_the_samples_it_applies_to(builtin_model_path):
    """digit_match with normalize: batch, not applicable (None) to sample 0: the learner's token rewards are
    2 * exact + 0.5 * normalize_rewards(digit, mask of the samples it applies to); sample 0 gets exact alone."""
    learner = learner_for(builtin_model_path, "reward.components.digit_match.normalize=batch")
    digit = [None, [1 / 3, 0.0, 0.0], [1 / 3, 1 / 3], [1 / 3, 1 / 3]]
    batch = hand_scored_batch(digit=digit)
    learner.train_step(batch)
    mask = response_mask(batch)
    applies = T([False, True, True, True])
    component = pad_right([row or [] for row in digit], width=3)
    rewards = 2.0 * pad_right(EXACT, width=3).double() + 0.5 * normalize_rewards(
        component, mask * applies[:, None], torch.tensor([0, 0, 1, 1]), "batch"
    )
    totals = T(learner.learned_columns().column("total_reward").to_pylist(), dtype=torch.float64)
    assert torch.allclose(totals, (rewards * mask).sum(1), rtol=0, atol=1e-9)
    assert totals[0] == 2.0


@pytest.mark.mutant
def test_a_component_that_applies_to_two_samples_reports_their_std(builtin_model_path):
    learner = learner_for(builtin_model_path)
    metrics = learner.train_step(hand_scored_batch(digit=[None, [0.25, 0.0, 0.5], None, [1.0, 0.0]]))
    assert metrics["reward/digit_match/mean"] == 0.875  # totals 0.75 and 1.0
    assert metrics["reward/digit_match/std"] == pytest.approx(float(T([0.75, 1.0]).std()))  # unbiased, 0.1768


@pytest.mark.parametrize("kind", ["k1", "k3"])
@pytest.mark.mutant
def test_the_kl_penalty_in_the_reward_is_scaled_in_float64(builtin_model_path, kind):
    """r_t - beta * KL_t with beta = 0.1 and the configured estimator: beta * KL_t in float64 (in float32 it is
    off by about 1e-8 per token)."""
    learner = learner_for(builtin_model_path, "algorithm.kl_in_reward_coef=0.1", f"algorithm.kl_kind={kind}")
    batch = hand_scored_batch()
    learner.train_step(batch)
    mask = response_mask(batch)
    behaviour = pad_right(batch.column("behaviour_logprobs").to_pylist())
    sequences = build_sequences(batch.column("prompt_ids").to_pylist(), RESPONSES, learner.tokenizer.pad_token_id)
    kl = kl_penalty(behaviour, learner._reference_logprobs(sequences), kind)
    assert (0.1 * kl.double()).float().double().ne(0.1 * kl.double())[mask.bool()].any()
    rewards = (
        2.0 * pad_right(EXACT, width=3).double() + 0.5 * pad_right(DIGIT, width=3).double() - 0.1 * kl.double() * mask
    )
    totals = T(learner.learned_columns().column("total_reward").to_pylist(), dtype=torch.float64)
    assert torch.allclose(totals, (rewards * mask).sum(1), rtol=0, atol=1e-12)


@pytest.mark.mutant
def test_the_learner_uses_the_configured_gamma_and_whitening(builtin_model_path):
    learner = learner_for(
        builtin_model_path, "algorithm.estimator=reinforce", "algorithm.gamma=0.5", "algorithm.whiten=true"
    )
    batch = hand_scored_batch()
    learner.train_step(batch)
    mask, groups = response_mask(batch), torch.tensor([0, 0, 1, 1])
    rewards = 2.0 * pad_right(EXACT, width=3).double() + 0.5 * pad_right(DIGIT, width=3).double()
    expected = compute_advantages("reinforce", rewards, mask, groups, 0.5, True)
    for other in (
        compute_advantages("reinforce", rewards, mask, groups, 1.0, True),
        compute_advantages("reinforce", rewards, mask, groups, 0.5),
    ):
        assert not torch.allclose(other, expected, atol=1e-3)
    learned = learner.learned_columns().column("advantages").to_pylist()
    assert all(row == pytest.approx(expected[i, : len(row)].tolist(), abs=1e-6) for i, row in enumerate(learned))


@pytest.mark.mutant
def test_an_update_whose_gradient_norm_is_not_finite_is_skipped_although_its_loss_is_finite(builtin_model_path):
    """Winners' rewards of 1e30 with reinforce (no baseline): the loss (about 1e30) is a float32, the gradient's
    squared norm is not, so the update is skipped and counted."""
    learner = learner_for(builtin_model_path, "algorithm.estimator=reinforce", "learner.max_nonfinite_steps=5")
    before = {k: v.clone() for k, v in learner.model.state_dict().items()}
    metrics = learner.train_step(hand_scored_batch(exact=[[0.0, 1e30], [0.0, 0.0, 0.0], [0.0, 1e30], [0.0, 1e30]]))
    assert math.isfinite(metrics["loss/policy"]) and not math.isfinite(metrics["loss/grad_norm"])
    assert metrics["learner/skipped_nonfinite"] == 1.0
    assert all(torch.equal(before[k], v) for k, v in learner.model.state_dict().items())


@pytest.mark.mutant
def test_the_learner_holds_no_gradients_between_steps(builtin_model_path):
    """After each update the gradients are freed (set to None), not kept as zero tensors."""
    learner = learner_for(builtin_model_path)
    learner.train_step(hand_scored_batch())
    assert all(p.grad is None for p in learner.model.parameters())


@pytest.mark.mutant
def test_a_skipped_first_update_does_not_warn_about_the_schedule(builtin_model_path):
    """The first step's update skipped (a NaN/inf reward): the schedule steps without an optimizer step, which torch
    warns about; the learner silences that warning."""
    learner = learner_for(builtin_model_path)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        metrics = learner.train_step(
            hand_scored_batch(exact=[[0.0, float("inf")], [0.0, 0.0, 0.0], [0.0, 1.0], [0.0, 1.0]])
        )
    assert metrics["learner/skipped_nonfinite"] == 1.0
    assert not [w for w in caught if "lr_scheduler" in str(w.message)]


@pytest.mark.mutant
def test_the_learner_silences_only_torchs_schedule_order_warning(builtin_model_path):
    """torch's other scheduler warning (optimizer.step replaced after the schedule was made) still shows."""
    learner = learner_for(builtin_model_path)
    step = learner.optimizer.step
    learner.optimizer.step = lambda: step()
    with pytest.warns(UserWarning, match=r"Seems like `optimizer\.step\(\)` has been overridden"):
        learner.train_step(hand_scored_batch())


@pytest.mark.mutant
def test_cosine_schedule_of_one_update_after_warmup_and_beyond_the_last_update():
    cosine = LearnerConfig(warmup_steps=4, lr_schedule="cosine", min_lr_ratio=0.2)
    assert [lr_factor(cosine, k, 6) for k in (4, 5)] == [1.0, pytest.approx(0.2)]  # 1 update to decay over
    assert lr_factor(cosine, 30, 20) == pytest.approx(0.2)  # past the planned updates it stays at the floor


OUT_OF_MEMORY = """
import os, resource, sys
import pyarrow as pa
from actors.learner import Learner
from actors.reward_worker import RewardWorker
from actors.rollout_worker import RolloutWorker
from pipeline.config import load_config
from pipeline.data.inputs import with_builtin_defaults
from pipeline.data.loading import load_prompts
from pipeline.errors import TokenforgeError

config = with_builtin_defaults(load_config(overrides=["algorithm.kl_coef=0.1", "learner.micro_batch_size=4096"]))
prompts = load_prompts(config.data.train_file, "train").slice(0, 256)
prompts = prompts.append_column("group_id", pa.array(range(256)))
batch = RolloutWorker(config, config.model.path).generate(prompts, group_size=8)
components = list(config.reward.weights)
scored = RewardWorker(config, config.model.path, components).score_all(batch, components)[0]
learner = Learner(config, config.model.path, config.model.path)
mapped = int(open("/proc/self/statm").read().split()[0]) * os.sysconf("SC_PAGE_SIZE")
resource.setrlimit(resource.RLIMIT_AS, (mapped + 300 * 2**20, resource.RLIM_INFINITY))  # 300 MiB more, at most
try:
    learner.train_step(scored, step=1)
except TokenforgeError as error:
    sys.exit(f"ONE LINE: {error}")
"""


def test_running_out_of_memory_in_the_learner_is_one_line_naming_the_micro_batch():
    """A real allocation failure (the address space capped 300 MiB above the loaded learner, a 2,048-sample
    micro-batch with a KL reference): the first forward to fail, the reference's, is the one-line message."""
    result = subprocess.run(
        [sys.executable, "-c", OUT_OF_MEMORY],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=Path(__file__).parent.parent,
    )
    assert result.stderr.strip().splitlines()[-1] == (
        "ONE LINE: the learner ran out of cpu memory in a micro-batch of up to 4096 samples; lower "
        "learner.micro_batch_size (now 4096), or set learner.gradient_checkpointing / learner.precision=bf16-mixed"
    ), result.stderr[-2000:]
