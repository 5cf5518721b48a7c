"""The RLlib baseline (pipeline/rllib/policy.py): the RLModule's policy is tokenforge's policy, RLlib's
PPO trains on the token environment, and tokenforge's eval reads the trained weights."""

import gymnasium as gym
import numpy as np
import pyarrow as pa
import pytest
import torch
from ray.rllib.core.columns import Columns
from ray.rllib.core.rl_module.rl_module import RLModuleSpec
from ray.tune.registry import ENV_CREATOR, _global_registry
from safetensors.torch import load_file

from actors.rollout_worker import RolloutWorker
from pipeline.errors import ConfigError
from pipeline.evaluate import evaluate_checkpoint
from pipeline.models.hf import BUILTIN_MODEL, build_sequences, response_logprobs
from pipeline.rllib.policy import CausalLMModule, GreedyEvaluator, ppo_config, save_hf_checkpoint
from pipeline.rllib.token_env import ENV_ID, TokenEnv, env_train_config, register_rllib_env


def build_module(env: TokenEnv, **options) -> CausalLMModule:
    spec = RLModuleSpec(
        module_class=CausalLMModule,
        observation_space=env.observation_space,
        action_space=env.action_space,
        model_config={"model_path": env.config.model.path, **options},
    )
    return spec.build()


def test_module_policy_is_the_rollout_workers_distribution():
    """Softmax of the module's logits at each step = pi(token | prefix) as tokenforge samples and learns it."""
    env = TokenEnv(split="eval")
    module = build_module(env)
    config = env.config
    prompts = env.task.tables["eval"].slice(0, 6).append_column("group_id", pa.array(range(6), pa.int64()))
    worker = RolloutWorker(config.model_copy(update={"seed": 1}), config.model.path)
    batch = worker.generate(prompts, group_size=2, step=1)
    observations, actions, expected = [], [], []
    columns = [batch.column(name).to_pylist() for name in ("group_id", "response_ids", "behaviour_logprobs")]
    for index, response, logprobs in zip(*columns):
        obs, _ = env.reset(options={"index": index})
        for token, logprob in zip(response, logprobs):
            observations.append(obs)
            actions.append(token)
            expected.append(logprob)
            obs, *_ = env.step(token)
    obs_batch = {key: torch.as_tensor(np.stack([o[key] for o in observations])) for key in ("tokens", "length")}
    with torch.no_grad():
        logits = module.forward_inference({Columns.OBS: obs_batch})[Columns.ACTION_DIST_INPUTS]
    logp = torch.log_softmax(logits, -1).gather(-1, torch.tensor(actions)[:, None]).squeeze(-1)
    assert torch.allclose(logp, torch.tensor(expected), atol=1e-5)
    # and the learner's recomputation on tokenforge's own layout agrees with it
    responses = batch.column("response_ids").to_pylist()
    sequences = build_sequences(batch.column("prompt_ids").to_pylist(), responses, env.pad_id)
    with torch.no_grad():
        learner_logp, _ = response_logprobs(module.model, sequences)
    flat = torch.cat([learner_logp[i, : len(r)] for i, r in enumerate(responses)])
    assert torch.allclose(flat, logp, atol=1e-5)


def test_value_head_is_detached_by_default():
    env = TokenEnv(split="eval")
    obs, _ = env.reset(options={"index": 0})
    batch = {Columns.OBS: {k: torch.as_tensor(v)[None] for k, v in obs.items()}}
    for detach, reaches_lm in [(True, False), (False, True)]:
        module = build_module(env, value_detach=detach)
        module.compute_values(batch).sum().backward()
        assert (module.model.transformer.wte.weight.grad is not None) == reaches_lm
        assert module.value_head[0].weight.grad is not None


@pytest.mark.parametrize(
    ("model_config", "message"),
    [
        ({"model_path": str(BUILTIN_MODEL), "value_hiden": 8}, "unknown key 'value_hiden'"),
        ({}, "'model_path' is missing"),
    ],
)
def test_module_config_errors_are_one_line(model_config, message):
    env = TokenEnv(split="eval")
    spec = RLModuleSpec(
        module_class=CausalLMModule,
        observation_space=env.observation_space,
        action_space=env.action_space,
        model_config=model_config,
    )
    with pytest.raises(ConfigError, match=message) as error:
        spec.build()
    assert "\n" not in str(error.value)


def test_registered_for_gymnasium_and_tune():
    assert gym.spec(ENV_ID).entry_point == "pipeline.rllib.token_env:TokenEnv"
    name = register_rllib_env("tokenforge-test-env")
    env = _global_registry.get(ENV_CREATOR, name)({"split": "eval", "reward.weights.digit_match": 0.25})
    assert isinstance(env, TokenEnv) and env.weights["digit_match"] == 0.25


@pytest.fixture(scope="module")
def trained(ray_cluster, tmp_path_factory):
    """RLlib PPO, 2 iterations on a tiny batch, sampling in the driver (what CI can afford)."""
    algo = ppo_config(
        {"reward.weights.digit_match": 0.25},
        num_envs=4,
        train_batch_size=64,
        minibatch_size=32,
        lr=1e-3,
        seed=0,
    ).build_algo()
    results = [algo.train() for _ in range(2)]
    module = algo.get_module()
    env = algo.env_runner.env.unwrapped.envs[0].unwrapped
    yield algo, module, results, env
    algo.stop()


def test_ppo_runs_two_iterations_on_the_token_env(trained, builtin_model_path):
    algo, module, results, env = trained
    assert [r["training_iteration"] for r in results] == [1, 2]
    runners = results[-1]["env_runners"]
    assert runners["num_episodes_lifetime"] >= 2 * 64 / 9  # complete episodes of at most 8 tokens + EOS step
    assert 1 <= runners["episode_len_mean"] <= env.max_new_tokens
    learner = results[-1]["learners"]["default_policy"]
    assert all(np.isfinite(float(learner[k])) for k in ("policy_loss", "vf_loss", "entropy"))
    assert env.weights == {"exact_match": 1.0, "digit_match": 0.25}  # the env_config's dotted key reached the env
    start = load_file(f"{builtin_model_path}/model.safetensors")
    now = module.hf_state_dict()
    assert any(not torch.equal(now[k], start[k]) for k in start)  # PPO changed the LM


def test_tokenforge_eval_reads_the_module_weights(trained, tmp_path):
    """The in-process GreedyEvaluator and `tokenforge eval` on a saved checkpoint give the same number."""
    _, module, _, _ = trained
    config = env_train_config({"data.max_eval_samples": 200})
    in_process = GreedyEvaluator(config)(module.hf_state_dict())
    saved = save_hf_checkpoint(module, config, tmp_path / "rllib_final")
    by_command = evaluate_checkpoint(str(saved), overrides=["data.max_eval_samples=200"])
    assert by_command["eval/exact_match"] == pytest.approx(in_process["eval/exact_match"])
    assert 0.3 < in_process["eval/exact_match"] < 1.0  # still the warm start's neighbourhood after 2 small updates


def first_prompts(episodes) -> set[tuple[int, ...]]:
    """The prompt (first observation's real tokens) of every episode that starts in these chunks."""
    starts = [e.get_observations(0) for e in episodes if e.t_started == 0]
    return {tuple(obs["tokens"][: obs["length"]].tolist()) for obs in starts}


def test_sampling_draws_new_prompts_on_every_call(trained):
    """With a debugging seed, RLlib's complete_episodes mode resets all envs with that seed on every
    sample() call and replays the same prompts each iteration; ppo_config's mode must not."""
    algo = trained[0]
    seen = [first_prompts(algo.env_runner.sample()) for _ in range(3)]
    assert all(seen) and not (seen[1] <= seen[0] or seen[2] <= seen[0] | seen[1])
