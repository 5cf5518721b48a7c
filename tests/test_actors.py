"""The three actor classes used directly, without Ray, on the shipped tiny model."""

import math
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pytest
import torch
from transformers import AutoModelForCausalLM

from actors.learner import Learner, lr_factor
from actors.reward_worker import RewardWorker
from actors.rollout_worker import RolloutWorker
from pipeline.batch import ROLLOUT_SCHEMA, make_rollout_table, pad_right, response_mask, reward_column
from pipeline.config import LearnerConfig, load_config
from pipeline.errors import TokenforgeError
from pipeline.models.hf import build_sequences, load_model, response_logprobs

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
    for ids, logps, finished in zip(*(batch.column(c).to_pylist() for c in ("response_ids", "behaviour_logprobs", "finished"))):
        assert 1 <= len(ids) <= 6 and len(logps) == len(ids)
        assert all(lp <= 0 for lp in logps)
        assert finished == (ids[-1] == eos) and eos not in ids[:-1]


def test_top_p_keeps_only_the_nucleus(builtin_model_path):
    """top_p below the top token's probability leaves only that token: sampling equals greedy decoding."""
    config = config_with_rollout(temperature=1.0, top_p=1e-6, max_new_tokens=6, seed=5)
    nucleus = RolloutWorker(config, builtin_model_path).generate(PROMPTS, group_size=4, step=3)
    greedy = RolloutWorker(config, builtin_model_path).generate(PROMPTS, group_size=4, greedy=True)
    assert nucleus.column("response_ids").to_pylist() == greedy.column("response_ids").to_pylist()
    wide = RolloutWorker(config_with_rollout(max_new_tokens=6, seed=5), builtin_model_path).generate(PROMPTS, group_size=4, step=3)
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


def scored_rows(responses: list[str], answer: str, worker: RolloutWorker) -> pa.Table:
    """A hand-made rollout batch: `responses` to the prompt `a+b=` ('$' stands for EOS)."""
    tok = worker.tokenizer
    ids = [[tok.eos_token_id if c == "$" else tok.convert_tokens_to_ids(c) for c in r] for r in responses]
    core = {
        "sample_id": list(range(len(ids))),
        "group_id": [0] * len(ids),
        "prompt_text": ["a+b="] * len(ids),
        "prompt_ids": [tok("1+2=").input_ids] * len(ids),
        "response_ids": ids,
        "behaviour_logprobs": [[-1.0] * len(r) for r in ids],
        "response": [r.replace("$", "") for r in responses],
        "finished": [r.endswith("$") for r in responses],
        "policy_version": [0] * len(ids),
        "worker": ["local"] * len(ids),
    }
    return make_rollout_table(core, pa.table({"prompt": ["a+b="] * len(ids), "answer": [answer] * len(ids)}))


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
    table, _ = RewardWorker(config, model_path, list(config.reward.weights)).score_all(batch, list(config.reward.weights))
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
    with pytest.raises(ValueError, match=r"set_weights: the state dict lacks 1 of the model's weights, e\.g\. 'lm_head\.weight'"):
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
    assert changed.optimizer.param_groups[0]["lr"] == pytest.approx(3e-3 * lr_factor(mutated.learner, 1, mutated.trainer.total_steps))


def test_reference_model_is_frozen_when_kl_is_on(builtin_model_path, learner_and_batch):
    _, batch = learner_and_batch
    config = load_config(overrides=["algorithm.kl_in_reward_coef=0.05", "algorithm.kl_coef=0.01", "algorithm.kl_kind=k3"])
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
        learner = Learner(load_config(overrides=[f"algorithm.skip_zero_advantage={skip}"]), builtin_model_path, builtin_model_path)
        grads = captured_gradients(learner)
        runs[skip] = (grads, learner.train_step(batch))
    (skipped, skipped_metrics), (full, full_metrics) = runs[True], runs[False]
    assert skipped_metrics["learner/kept_frac"] < 1.0 == full_metrics["learner/kept_frac"]
    assert skipped_metrics["loss/policy"] == pytest.approx(full_metrics["loss/policy"], abs=1e-6)
    assert all(torch.allclose(skipped[n], full[n], atol=1e-6) for n in full)


def with_reward(batch: pa.Table, name: str, value: float) -> pa.Table:
    """`batch` with component `name` replaced by `value` on every sample's last token (as a broken scorer might)."""
    rows = [[0.0] * (len(r) - 1) + [value] for r in batch.column("response_ids").to_pylist()]
    column = batch.schema.get_field_index(reward_column(name))
    return batch.set_column(column, reward_column(name), pa.array(rows, type=pa.list_(pa.float32())))


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
    assert str(error.value) == (  # the whole message: what happened, that the weights are safe, what to do
        "2 consecutive steps up to step 6 had a NaN/inf advantage, loss or gradient norm; their updates were skipped "
        "and the weights are those before them. Lower learner.lr, look for huge reward values, or raise "
        "learner.max_nonfinite_steps"
    )


def test_several_updates_per_batch_are_importance_weighted(learner_and_batch, builtin_model_path):
    """updates_per_batch=2 with is_cap: the second update sees pi_theta != pi_behaviour (the first moved it),
    so the IS weights leave 1 and the cap binds on some tokens."""
    _, batch = learner_and_batch
    config = load_config(overrides=["learner.updates_per_batch=2", "algorithm.is_cap=1.0", "learner.lr=1e-3", "learner.warmup_steps=0"])
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
    config = load_config(overrides=["reward.components.exact_match.normalize=group", "reward.components.digit_match.normalize=group"])
    normalised = Learner(config, builtin_model_path, builtin_model_path).train_step(batch)
    assert plain["reward/total/mean"] > 0.1
    assert normalised["reward/total/mean"] == pytest.approx(0.0, abs=1e-9)
    assert normalised["reward/exact_match/mean"] == plain["reward/exact_match/mean"]  # metrics of the raw component


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
batch = RolloutWorker(config, config.model.path).generate(prompts.append_column("group_id", pa.array(range(256))), group_size=8)
scored = RewardWorker(config, config.model.path, list(config.reward.weights)).score_all(batch, list(config.reward.weights))[0]
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
    result = subprocess.run([sys.executable, "-c", OUT_OF_MEMORY], capture_output=True, text=True, timeout=300,
                            cwd=Path(__file__).parent.parent)
    assert result.stderr.strip().splitlines()[-1] == (
        "ONE LINE: the learner ran out of cpu memory in a micro-batch of up to 4096 samples; lower "
        "learner.micro_batch_size (now 4096), or set learner.gradient_checkpointing / learner.precision=bf16-mixed"
    ), result.stderr[-2000:]
