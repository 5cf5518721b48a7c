"""The critic (algorithm.estimator=gae) and PPO-style minibatches in the learner, without Ray, on the shipped tiny
model: where gradients go, what a minibatch step normalises by, and an exact resume through a published checkpoint."""

import pyarrow as pa
import pytest
import ray
import torch
from builders import scored_batches, with_reward

from actors.learner import Learner
from pipeline import storage as store
from pipeline.config import load_config
from pipeline.driver.placement import decide_learner_gpus
from pipeline.errors import ConfigError
from pipeline.storage import Storage

PROMPTS = pa.table(
    {
        "prompt": ["13+54=", "2+2=", "99+99=", "40+2="],
        "answer": ["67", "4", "198", "42"],
        "group_id": [10, 11, 12, 13],
    }
)
GAE = ["algorithm.estimator=gae", "algorithm.lam=0.95", "algorithm.loss=ppo_clip", "learner.lr=1e-3"]
GAE += ["critic.placement=learner"]  # in this process: the learner is used without Ray here


@pytest.fixture(scope="module")
def batches(builtin_model_path) -> list[pa.Table]:
    """Two scored rollout batches of 4 prompts x 4 samples."""
    return scored_batches(builtin_model_path, PROMPTS, group_size=4, max_new_tokens=6)


def learner(model_path: str, *overrides: str) -> Learner:
    return Learner(load_config(overrides=[*GAE, *overrides]), model_path, model_path)


def weights(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def changed(before: dict, module: torch.nn.Module) -> set[str]:
    return {k for k, v in module.state_dict().items() if not torch.equal(before[k], v)}


def test_gae_sets_up_a_critic_and_a_critic_needs_gae():
    config = load_config(overrides=["algorithm.estimator=gae", "critic.lr=3e-4"])
    assert config.critic is not None and config.critic.lr == 3e-4
    defaults = load_config(overrides=["algorithm.estimator=gae"]).critic
    assert defaults.clip == 0.2 and defaults.placement == "actor"
    with pytest.raises(ConfigError, match=r"'critic': set, but algorithm.estimator='grpo' uses no values"):
        load_config(overrides=["critic.lr=1e-3"])
    with pytest.raises(ConfigError, match=r"'learner.minibatches': 4 updates per batch are off-policy"):
        load_config(overrides=["algorithm.is_cap=null", "learner.minibatches=4"])


def test_the_critic_trains_alone_for_its_pretrain_steps_and_its_gradient_reaches_only_itself(
    batches, builtin_model_path
):
    tf = learner(builtin_model_path, "critic.pretrain_steps=1")
    assert tf.critic.local.model.lm is not tf.model  # its own copy of the starting model
    policy, critic = weights(tf.model), weights(tf.critic.local.model)
    metrics = tf.train_step(batches[0])
    assert not changed(policy, tf.model)  # step 1: the critic only; the policy's schedule waits
    assert {"head.weight", "head.bias"} <= changed(critic, tf.critic.local.model)
    assert any(k.startswith("lm.") for k in changed(critic, tf.critic.local.model))
    assert tf.scheduler.last_epoch == 0 and "loss/policy" not in metrics
    for key in ("critic/value_loss", "critic/explained_var", "critic/value_mean", "critic/clip_frac"):
        assert key in metrics, key
    assert metrics["critic/value_mean"] == 0.0  # the zero-initialised head: the first advantages are the returns

    # a critic step leaves every policy weight without a gradient, and a policy step every critic weight
    policy, critic = weights(tf.model), weights(tf.critic.local.model)
    tf.train_step(batches[1])
    assert changed(policy, tf.model) and changed(critic, tf.critic.local.model)
    assert all(p.grad is None for p in tf.model.parameters()) and all(
        p.grad is None for p in tf.critic.local.model.parameters()
    )


@pytest.mark.filterwarnings("ignore:Seems like `optimizer.step\\(\\)` has been overridden")
def test_minibatches_are_optimizer_steps_on_disjoint_parts_each_normalised_by_its_own_counts(
    batches, builtin_model_path
):
    """With an estimator whose advantages are per sample (reinforce, unwhitened), one step of M = 2 minibatches
    equals two M = 1 steps on the two halves that the learner draws."""
    common = ["algorithm.estimator=reinforce", "algorithm.loss=ppo_clip", "learner.lr=1e-3", "learner.warmup_steps=0"]
    common += ["learner.lr_schedule=constant"]
    split = Learner(load_config(overrides=[*common, "learner.minibatches=2"]), builtin_model_path, builtin_model_path)
    whole = Learner(load_config(overrides=common), builtin_model_path, builtin_model_path)
    halves = split._minibatches(batches[0].num_rows, epoch=0)  # drawn from (seed, version 0, pass 0)
    last = split.train_step(batches[0])
    for half in halves:
        last_of_whole = whole.train_step(batches[0].take(half.sort().values.tolist()))
    assert split.scheduler.last_epoch == 2  # two optimizer steps in one learner step
    # the second minibatch's loss, normalised by its own tokens (the whole batch's would about halve it)
    assert last["loss/policy"] == pytest.approx(last_of_whole["loss/policy"], rel=1e-4)
    for name, value in split.model.state_dict().items():  # the same sums in the same order: equal to rounding
        torch.testing.assert_close(value, whole.model.state_dict()[name], rtol=0, atol=1e-7)


@pytest.mark.parametrize("lora", [False, True])
def test_a_run_with_the_critic_resumes_exactly_from_a_published_checkpoint(batches, builtin_model_path, tmp_path, lora):
    overrides = ["learner.minibatches=2", "learner.updates_per_batch=2", *(["critic.lora={r: 4}"] if lora else [])]
    straight = learner(builtin_model_path, *overrides)
    trainable = {name for name, p in straight.critic.local.model.named_parameters() if p.requires_grad}
    if lora:  # the adapters and the value head train; the critic's transformer stays as it was
        assert "head.weight" in trainable and all("lora_" in n for n in trainable - {"head.weight", "head.bias"})
    straight.train_step(batches[0])
    storage = Storage(str(tmp_path))
    files = straight.save(storage.uri, store.checkpoint_dir(1))
    directory = store.publish_checkpoint(storage, 1, files)
    assert any(name.startswith("critic/adapter_model" if lora else "critic/model") for name in files)
    straight.train_step(batches[1])

    resumed = Learner(straight.config, builtin_model_path, builtin_model_path, resume=(storage.uri, directory))
    resumed.train_step(batches[1])
    for model, other in ((straight.model, resumed.model), (straight.critic.local.model, resumed.critic.local.model)):
        for name, value in model.state_dict().items():
            assert torch.equal(value, other.state_dict()[name]), name


def actor_critic_weights(tf: Learner) -> dict[str, torch.Tensor]:
    state = ray.get(tf.critic.actor.__ray_call__.remote(lambda critic: critic.model.state_dict()))  # no globals
    return {k: v.clone() for k, v in state.items()}


def test_a_critic_of_its_own_makes_the_same_updates_and_resumes_through_a_checkpoint(
    ray_cluster, batches, builtin_model_path, tmp_path
):
    """critic.placement=actor: its step of a minibatch runs beside the policy's, in another process, with the same
    result as in the learner's; a checkpoint's critic/ files travel to and from it as bytes."""
    overrides = ["learner.minibatches=2", "critic.pretrain_steps=1"]
    inside = learner(builtin_model_path, *overrides)
    own = learner(builtin_model_path, *overrides, "critic.placement=actor")
    assert own.critic.local is None and own.critic.actor is not None
    state = torch.get_rng_state()  # the two learners share this process's RNG: each step starts from the same
    first = inside.train_step(batches[0])
    torch.set_rng_state(state)
    assert first["critic/value_loss"] == own.train_step(batches[0])["critic/value_loss"]
    storage = Storage(str(tmp_path))
    directory = store.publish_checkpoint(storage, 1, own.save(storage.uri, store.checkpoint_dir(1)))
    resumed = Learner(own.config, builtin_model_path, builtin_model_path, resume=(storage.uri, directory))
    torch.set_rng_state(resumed_state := torch.get_rng_state())  # the checkpoint's RNG, now this process's
    expected = inside.train_step(batches[1])
    torch.set_rng_state(resumed_state)
    got = resumed.train_step(batches[1])
    for key in ("loss/policy", "critic/value_loss", "critic/explained_var", "critic/value_mean"):
        assert got[key] == pytest.approx(expected[key], rel=1e-6, abs=1e-9), key
    remote = actor_critic_weights(resumed)
    for name, value in weights(inside.critic.local.model).items():
        torch.testing.assert_close(remote[name], value, rtol=0, atol=1e-6)
    for name, value in weights(inside.model).items():
        torch.testing.assert_close(resumed.model.state_dict()[name], value, rtol=0, atol=1e-6)


def test_a_nan_reward_skips_the_critics_step_and_the_policys_and_counts(batches, builtin_model_path):
    tf = learner(builtin_model_path, "learner.minibatches=2", "learner.max_nonfinite_steps=2")
    policy, critic = weights(tf.model), weights(tf.critic.local.model)
    metrics = tf.train_step(with_reward(batches[0], "exact_match", float("nan")), step=1)
    assert metrics["learner/skipped_nonfinite"] == 2.0  # both minibatches
    assert not changed(policy, tf.model) and not changed(critic, tf.critic.local.model)
    assert not tf.critic.local.optimizer.state_dict()["state"]  # Adam's moments untouched too


@pytest.mark.parametrize(
    "settings",
    [["critic.precision=bf16", "critic.gradient_checkpointing=true"], ["critic.precision=bf16-mixed"]],
)
def test_the_critic_trains_in_bf16_and_with_gradient_checkpointing(batches, builtin_model_path, settings):
    tf = learner(builtin_model_path, "critic.micro_batch_size=5", *settings)  # 16 samples: micro-batches 5,5,5,1
    before = weights(tf.critic.local.model)
    metrics = tf.train_step(batches[0])
    assert metrics["critic/value_loss"] > 0 and metrics["critic/skipped"] == 0.0
    assert changed(before, tf.critic.local.model)
    dtype = next(p.dtype for n, p in tf.critic.local.model.named_parameters() if n.startswith("lm."))
    assert dtype == (torch.bfloat16 if "critic.precision=bf16" in settings else torch.float32)


def test_a_critic_actor_follows_the_learners_device(ray_cluster, capsys):
    """critic.num_gpus null: a CPU actor beside a CPU learner; beside a GPU learner, with no spare GPU in the
    cluster (this one has none), the critic runs in the learner's process on its GPU, said in one line; an explicit
    critic.num_gpus stays."""
    gae = ["algorithm.estimator=gae"]
    cpu = decide_learner_gpus(load_config(overrides=[*gae, "learner.num_gpus=0"])).critic
    assert (cpu.placement, cpu.num_gpus) == ("actor", 0.0)
    gpu = decide_learner_gpus(load_config(overrides=[*gae, "learner.num_gpus=1"])).critic
    assert gpu.placement == "learner" and "the critic runs in the learner's process" in capsys.readouterr().out
    explicit = decide_learner_gpus(load_config(overrides=[*gae, "learner.num_gpus=1", "critic.num_gpus=0"])).critic
    assert (explicit.placement, explicit.num_gpus) == ("actor", 0.0)
