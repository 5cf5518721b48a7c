"""The learner group (learner.num_workers > 1) on a real local Ray, gloo on CPU: two FSDP2 ranks compute the single
learner's gradient of the same scored batch, report its loss and norm, and checkpoint so that two ranks or one
resume it."""

import uuid
from contextlib import contextmanager

import pyarrow as pa
import pytest
import ray
import torch
from builders import scored_batches, with_reward

from actors.learner import Learner
from pipeline import storage as store
from pipeline.config import load_config
from pipeline.driver.actor_group import ActorGroup
from pipeline.driver.learner_group import save_learner, start_learners, submit_train_step
from pipeline.driver.trainer import train
from pipeline.errors import ConfigError, TokenforgeError
from pipeline.outputs.metrics_log import read_metrics
from pipeline.runtime.learner_group import rank_rows, whole
from pipeline.storage import Storage

PROMPTS = pa.table(
    {
        "prompt": ["13+54=", "2+2=", "99+99=", "40+2=", "7+8="],
        "answer": ["67", "4", "198", "42", "15"],
        "group_id": [10, 11, 12, 13, 14],
    }
)
# no clipping: the raw gradients are compared; w = 1 (is_cap null): the importance weight exp(logp - b) would carry
# each side's fp32 rounding of logp into the gradient (the case with is_cap below has its own bound)
BASE = ["seed=5", "learner.grad_clip=1e9", "learner.num_cpus=0.5", "algorithm.is_cap=null", "trainer.max_staleness=0"]


@pytest.fixture(scope="module")
def batches(builtin_model_path) -> list[pa.Table]:
    """Two scored batches of 5 prompts x 3 samples, ragged (responses of 1 to 8 tokens)."""
    return scored_batches(builtin_model_path, PROMPTS, group_size=3, max_new_tokens=8)


@contextmanager
def learner_group(config, model_path: str, resume=None):
    group = start_learners(config, model_path, uuid.uuid4().hex[:8], timeout_s=180, resume=resume)
    try:
        yield group
    finally:
        group.close()


def assert_same_gradient(got: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]) -> None:
    """max |a - b| <= 1e-6 * max |b| over the whole gradient (fp32: the ranks' partial sums round differently)."""
    assert got.keys() == expected.keys()
    largest = max(float(b.abs().max()) for b in expected.values())
    worst = max(float((got[name] - b).abs().max()) for name, b in expected.items())
    assert worst <= 1e-6 * largest, (worst, largest)


CASES = {
    "grpo": [],
    "rloo, micro-batches of 1": ["algorithm.estimator=rloo", "learner.micro_batch_size=1"],
    "no prompt sharing, a KL term": ["learner.share_prompts=false", "algorithm.kl_coef=0.05"],
    "seq-mean-token-mean, micro-batches of 4": ["algorithm.agg=seq-mean-token-mean", "learner.micro_batch_size=4"],
    "LoRA, a KL term (the adapters off)": ["model.lora={r: 4}", "algorithm.kl_coef=0.05"],
    "gradient checkpointing": ["learner.gradient_checkpointing=true", "learner.micro_batch_size=4"],
}


@pytest.mark.parametrize("overrides", CASES.values(), ids=CASES.keys())
def test_two_ranks_compute_the_single_learners_gradient_loss_and_norm(
    ray_cluster, batches, builtin_model_path, overrides
):
    config = load_config(overrides=[*BASE, *overrides])
    expected, single = Learner(config, builtin_model_path, builtin_model_path).gradients(batches[0])
    grouped = load_config(overrides=[*BASE, *overrides, "learner.num_workers=2"])
    with learner_group(grouped, builtin_model_path) as group:
        results = group.call_all("gradients", batches[0])
    for got, metrics in results:  # every rank gets the whole gradient and the global metrics
        assert_same_gradient(got, expected)
        for key in ("loss/policy", "loss/grad_norm", "policy/entropy", "policy/is_weight/mean"):
            assert metrics[key] == pytest.approx(single[key], rel=1e-6), key


def test_a_rank_without_a_row_runs_padding_and_the_gradient_is_still_the_single_learners(
    ray_cluster, batches, builtin_model_path
):
    """One informative row on two ranks: rank 0 gets none (rank_rows), runs a zero-weighted micro-batch in step
    with rank 1, and reports the same metric keys, so the metrics' all-reduce matches."""
    one_row = with_reward(batches[0].slice(0, 1), "exact_match", 1.0)
    # (without prompt sharing: a group takes its two-forward path for a lone prompt, the single learner the plain
    # forward, equal to float rounding only, ~2e-6 here)
    overrides = [*BASE, "algorithm.estimator=reinforce", "rollout.group_size=1", "learner.share_prompts=false"]
    expected, single = Learner(load_config(overrides=overrides), builtin_model_path, builtin_model_path).gradients(
        one_row
    )
    with learner_group(load_config(overrides=[*overrides, "learner.num_workers=2"]), builtin_model_path) as group:
        results = group.call_all("gradients", one_row)
    for got, metrics in results:
        assert_same_gradient(got, expected)
        assert metrics["loss/policy"] == pytest.approx(single["loss/policy"], rel=1e-6)


def test_minibatches_passes_and_the_non_finite_guard_act_on_every_rank_together(
    ray_cluster, batches, builtin_model_path
):
    """Two minibatches x two passes (the RNG's split, the same on every rank) make the single learner's steps; a
    NaN reward skips the update on both ranks (the weights stay, the next step counts it)."""
    overrides = [*BASE, "learner.minibatches=2", "learner.updates_per_batch=2", "algorithm.is_cap=2.0"]
    single = Learner(load_config(overrides=overrides), builtin_model_path, builtin_model_path)
    expected = single.train_step(batches[0])
    with learner_group(load_config(overrides=[*overrides, "learner.num_workers=2"]), builtin_model_path) as group:
        got = group.get(submit_train_step(group, batches[0], 1))[0]
        before = group.call_all("get_weights")[0]
        skipped = group.get(submit_train_step(group, with_reward(batches[1], "exact_match", float("nan")), 2))
        after = group.call_all("get_weights")[0]
    for key in ("loss/policy", "loss/grad_norm", "policy/is_weight/mean", "learner/lr"):
        assert got[key] == pytest.approx(expected[key], rel=1e-5), key
    assert [m["learner/skipped_nonfinite"] for m in skipped] == [4.0, 4.0]  # every update, on both ranks
    assert all(torch.equal(after[k], v) for k, v in before.items())


def test_the_rows_are_split_by_tokens_and_every_rank_can_be_short():
    shares = rank_rows(torch.tensor([1, 1, 1, 1, 8, 8]), 2)  # 20 tokens: the first five rows hold 12 of them
    assert [s.tolist() for s in shares] == [[0, 1, 2, 3, 4], [5]]
    assert [s.tolist() for s in rank_rows(torch.tensor([3]), 2)] == [[], [0]]  # one row: a rank without any
    assert [s.tolist() for s in rank_rows(torch.tensor([0, 0, 0, 0]), 2)] == [[0, 1], [2, 3]]  # no token: by rows


def adam_state(group: ActorGroup) -> dict:
    """The group's AdamW state by parameter index, each tensor gathered whole (every rank takes part)."""

    def gathered(learner) -> dict:
        return {i: {k: whole(v) for k, v in s.items()} for i, s in learner.optimizer.state_dict()["state"].items()}

    return group.get([a.__ray_call__.remote(gathered) for a in group.actors])[0]


def test_a_checkpoint_of_two_ranks_resumes_on_two_exactly_and_on_one(
    ray_cluster, batches, builtin_model_path, tmp_path
):
    """On two ranks the next step is the same to the bit; one rank resumes the same weights and Adam moments and
    computes the same gradient (its weights after the step are not compared: Adam turns the rounding noise of a
    gradient that is 0 in exact arithmetic, such as GPT-2's key bias's, into a step of +-lr)."""
    config = load_config(overrides=[*BASE, "learner.num_workers=2", "learner.lr=1e-3", "learner.warmup_steps=0"])
    storage = Storage(str(tmp_path))
    with learner_group(config, builtin_model_path) as group:
        group.get(submit_train_step(group, batches[0], 1))
        files = save_learner(group, storage.uri, store.checkpoint_dir(1))
        directory = store.publish_checkpoint(storage, 1, files)
        saved, adam = group.call_all("get_weights")[0], adam_state(group)
        gradient = group.call_all("gradients", batches[1])[0][0]
        straight = group.get(submit_train_step(group, batches[1], 2))[0]
        expected = group.call_all("get_weights")[0]
    with learner_group(config, builtin_model_path, resume=(storage.uri, directory)) as group:
        again = group.get(submit_train_step(group, batches[1], 2))[0]
        resumed = group.call_all("get_weights")[0]
    assert again["loss/policy"] == straight["loss/policy"] and again["loss/grad_norm"] == straight["loss/grad_norm"]
    for name, value in expected.items():
        assert torch.equal(resumed[name], value), name
    single = load_config(overrides=[*BASE, "learner.lr=1e-3", "learner.warmup_steps=0"])
    one = Learner(single, builtin_model_path, builtin_model_path, resume=(storage.uri, directory))
    assert one.policy_version == 1
    for name, value in one.get_weights().items():
        assert torch.equal(value, saved[name]), name
    assert {"optimizer/.metadata", "optimizer/__0_0.distcp", "optimizer/__1_0.distcp"} <= files.keys()  # each rank's
    state = one.optimizer.state_dict()["state"]
    assert state.keys() == adam.keys()
    for i, entry in adam.items():
        for key, value in entry.items():
            assert torch.equal(state[i][key].cpu(), value), (i, key)
    assert_same_gradient(one.gradients(batches[1])[0], gradient)


def test_a_single_learners_checkpoint_resumes_into_a_group(ray_cluster, batches, builtin_model_path, tmp_path):
    one = Learner(load_config(overrides=[*BASE, "learner.lr=1e-3"]), builtin_model_path, builtin_model_path)
    one.train_step(batches[0])
    storage = Storage(str(tmp_path))
    directory = store.publish_checkpoint(storage, 1, one.save(storage.uri, store.checkpoint_dir(1)))
    config = load_config(overrides=[*BASE, "learner.lr=1e-3", "learner.num_workers=2"])
    with learner_group(config, builtin_model_path, resume=(storage.uri, directory)) as group:
        weights, adam = group.call_all("get_weights")[0], adam_state(group)
        gradient = group.call_all("gradients", batches[1])[0][0]
    for name, value in one.get_weights().items():
        assert torch.equal(weights[name], value), name
    for i, entry in one.optimizer.state_dict()["state"].items():
        for key, value in entry.items():
            assert torch.equal(adam[i][key], value.cpu()), (i, key)
    assert_same_gradient(gradient, one.gradients(batches[1])[0])


def test_a_lora_group_publishes_the_single_learners_merged_weights(ray_cluster, batches, builtin_model_path):
    """The adapters' update merged into the base weights (W + alpha / r * B @ A, GPT-2's Conv1D transposed), from
    the gathered shards, as the single learner merges them after the same step."""
    overrides = [*BASE, "model.lora={r: 4}", "learner.lr=1e-3", "learner.warmup_steps=0"]
    one = Learner(load_config(overrides=overrides), builtin_model_path, builtin_model_path)
    before = one.get_weights()
    one.train_step(batches[0])
    expected = one.get_weights()
    assert any(not torch.equal(expected[k], v) for k, v in before.items())  # the step moved the merged weights
    with learner_group(load_config(overrides=[*overrides, "learner.num_workers=2"]), builtin_model_path) as group:
        group.get(submit_train_step(group, batches[0], 1))
        got = group.call_all("get_weights")[0]
    assert got.keys() == expected.keys()
    for name, value in expected.items():
        torch.testing.assert_close(got[name], value, rtol=0, atol=1e-6)


def test_a_group_with_the_critic_makes_the_single_learners_steps(ray_cluster, batches, builtin_model_path, tmp_path):
    """algorithm.estimator=gae: rank 0 holds the one critic actor and sends its values to the other ranks; two
    steps (two minibatches each) and a checkpoint with the critic's files, as the single learner's."""
    critic = ["algorithm.estimator=gae", "algorithm.loss=ppo_clip", "learner.minibatches=2", "critic.num_cpus=0.25"]
    config = load_config(overrides=[*BASE, *critic])
    with learner_group(config, builtin_model_path) as single:  # an actor too: its critic is one of its own, as rank 0's
        expected = [single.get(submit_train_step(single, batch, i + 1))[0] for i, batch in enumerate(batches)]
    grouped = load_config(overrides=[*BASE, *critic, "learner.num_workers=2"])
    storage = Storage(str(tmp_path))
    with learner_group(grouped, builtin_model_path) as group:
        critics = [
            n for n in ray.util.list_named_actors() if n.startswith(f"tokenforge-{group.run_id}") and "critic" in n
        ]
        assert critics == [f"tokenforge-{group.run_id}-learner-0-critic-0"]
        got = [group.get(submit_train_step(group, batch, i + 1))[0] for i, batch in enumerate(batches)]
        files = save_learner(group, storage.uri, store.checkpoint_dir(2))
    for mine, theirs in zip(got, expected, strict=True):
        for key in ("loss/policy", "loss/grad_norm", "critic/value_loss", "critic/explained_var", "critic/value_mean"):
            assert mine[key] == pytest.approx(theirs[key], rel=1e-5, abs=1e-7), key
    assert any(name.startswith("critic/") for name in files)


def test_what_a_group_cannot_do_is_one_line(ray_cluster, builtin_model_path):
    overrides = ["algorithm.estimator=gae", "algorithm.loss=ppo_clip", "critic.placement=learner"]
    with pytest.raises(ConfigError, match=r"'learner.num_workers': 2 ranks do not work with critic.placement=learner"):
        load_config(overrides=[*overrides, "learner.num_workers=2"])
    with pytest.raises(ConfigError, match=r"'learner.num_gpus': 0.5 with learner.num_workers=2 would put two ranks"):
        load_config(overrides=["learner.num_gpus=0.5", "learner.num_workers=2"])
    config = load_config(overrides=[*BASE, "learner.num_workers=2", "model.lora={r: 4, target_modules: [wte]}"])
    with pytest.raises(
        TokenforgeError, match=r"model.lora adapts transformer.wte \(Embedding\), which a learner group"
    ):
        with learner_group(config, builtin_model_path):  # when the group forms, not at the first weight sync
            pass


@pytest.mark.slow  # whole runs: CI's slow step (pytest -m slow), not the README's suite
def test_a_run_with_two_learner_ranks_reports_the_single_learners_metrics(ray_cluster, tmp_path):
    """`tokenforge train learner.num_workers=2` against 1, same seed: the same rewards, loss and gradient norm step by
    step (the metrics are the group's, not rank 0's share), and the same eval; also with the weights broadcast to
    the rollout workers (rollout.weight_sync=collective: a gloo group of its own beside the learner group's)."""
    common = ["trainer.total_steps=3", "trainer.prompts_per_step=16", "trainer.eval_every=3", "learner.num_cpus=0.5"]
    common += ["data.max_eval_samples=40", "seed=7"]
    runs = {}
    for name, overrides in {
        "single": ["learner.num_workers=1"],
        "group": ["learner.num_workers=2"],
        "group, broadcast": ["learner.num_workers=2", "rollout.weight_sync=collective"],
    }.items():
        train(load_config(overrides=[*common, *overrides, f"output_dir={tmp_path / name}"]))
        runs[name] = read_metrics(Storage(str(tmp_path / name)))
    for name in ("group", "group, broadcast"):
        for single, grouped in zip(runs["single"][1:], runs[name][1:], strict=True):
            for key in ("reward/total/mean", "loss/policy", "loss/grad_norm", "policy/entropy"):
                assert grouped[key] == pytest.approx(single[key], rel=1e-5), (name, single["step"], key)
        assert runs[name][-1]["eval/exact_match"] == runs["single"][-1]["eval/exact_match"]
