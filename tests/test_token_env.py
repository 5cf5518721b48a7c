"""The token-level MDP environment (pipeline/rllib/token_env.py): gymnasium's checker, rewards equal to the
reward pool's, reset/step contract and bad input. Real models, real reward components, real Ray."""

import subprocess
import sys
import warnings
from pathlib import Path

import gymnasium as gym
import numpy as np
import pyarrow as pa
import pytest
from gymnasium.utils.env_checker import check_env

from actors.reward_worker import RewardWorker
from actors.rollout_worker import RolloutWorker
from pipeline.batch import reward_column
from pipeline.driver.reward_pool import RewardPool
from pipeline.errors import ConfigError, TokenforgeError
from pipeline.rllib.token_env import ENV_ID, TokenEnv, env_train_config, from_env_config, resolve_config

FNS = Path(__file__).parent / "env_reward_fns.py"


def play(env: TokenEnv, index: int, response: list[int]) -> tuple[list[float], list[bool], dict]:
    """Feed `response` token by token on prompt `index`; per-step rewards, terminated flags, last info."""
    env.reset(options={"index": index})
    rewards, ends, info = [], [], {}
    for token in response:
        _, reward, terminated, truncated, info = env.step(token)
        assert truncated is False
        rewards.append(reward)
        ends.append(terminated)
    return rewards, ends, info


def weighted_rows(batch: pa.Table, weights: dict[str, float]) -> list[list[float]]:
    """Per-token composite reward sum_i w_i * r_i,t of every row of a scored batch (the learner's r_t)."""
    rows = [[0.0] * len(ids) for ids in batch.column("response_ids").to_pylist()]
    for name, weight in weights.items():
        for row, values in zip(rows, batch.column(reward_column(name)).to_pylist()):
            row[:] = [r + weight * v for r, v in zip(row, values)]
    return rows


@pytest.fixture(scope="module")
def sampled():
    """Sampled completions (temperature 1.5: right and wrong ones; 3 tokens at most, so 3-digit sums are cut
    off) of the first 24 held-out prompts."""
    config = resolve_config(overrides=["data.max_eval_samples=24", "rollout.max_new_tokens=3"])
    env = TokenEnv(config, split="eval")
    prompts = env.task.tables["eval"].append_column("group_id", pa.array(range(24), pa.int64()))
    worker_config = config.model_copy(update={"seed": 7}, deep=True)
    worker_config.rollout.temperature = 1.5
    worker = RolloutWorker(worker_config, config.model.path)
    batch = worker.generate(prompts, group_size=4, step=1)
    return config, batch


@pytest.mark.parametrize("options", [{}, {"reward_timing": "final", "split": "eval"}])
def test_passes_gymnasium_check_env(options):
    env = gym.make(ENV_ID, render_mode="ansi", **options)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # any checker warning fails the test
        check_env(env.unwrapped)
    assert env.unwrapped.observation_space["tokens"].shape == (env.unwrapped.width,)


def test_episode_rewards_equal_the_reward_pool(ray_cluster, sampled):
    config, batch = sampled
    finished = batch.column("finished").to_pylist()
    assert any(finished) and not all(finished)  # both ends of an episode are covered
    pool = RewardPool(config, config.model.path, run_id="env-test")
    scored, _ = pool.score(batch, list(config.reward.weights))
    expected = weighted_rows(scored, config.reward.weights)
    correct = scored.column(reward_column("exact_match")).to_pylist()
    assert 0 < sum(sum(r) for r in correct) < batch.num_rows  # right and wrong completions
    dense, final = TokenEnv(config, split="eval"), TokenEnv(config, split="eval", reward_timing="final")
    pooled = TokenEnv(config, split="eval", reward_backend="pool", reward_timing="final")
    try:
        responses, indices = batch.column("response_ids").to_pylist(), batch.column("group_id").to_pylist()
        for i, (response, index) in enumerate(zip(responses, indices)):
            total = sum(expected[i])
            for env in (dense, final, pooled):
                rewards, ends, info = play(env, index, response)
                assert ends == [False] * (len(response) - 1) + [True]
                assert sum(rewards) == pytest.approx(total, rel=1e-12, abs=1e-12)
                assert info["reward_total"] == pytest.approx(total, rel=1e-12, abs=1e-12)
                assert info["finished"] == finished[i]
                assert info["response"] == batch.column("response")[i].as_py()
            # dense: every step pays the pool's per-token composite reward of that token
            rewards, _, _ = play(dense, index, response)
            assert rewards == pytest.approx(expected[i], rel=1e-12, abs=1e-12)
            rewards, _, _ = play(final, index, response)
            assert rewards[:-1] == [0.0] * (len(response) - 1)
    finally:
        pooled.close()
        for actor in pool.actors:
            ray_cluster.kill(actor)


def test_a_component_that_looks_ahead_is_settled_on_the_last_step():
    """Token t of `share_of_length` is worth 1/len(whole completion): on a prefix of t tokens it
    reads 1/t. Dense pays those, and the last step pays the rest, so the sum is still the pool's."""
    env = TokenEnv(
        overrides=[
            f"reward.components.share={{type: python, function: '{FNS}:share_of_length'}}",
            f"reward.components.whole={{type: python, function: '{FNS}:prefix_error'}}",
            "reward.weights={share: 2.0, whole: 0.5}",
        ],
        split="eval",
    )
    eos = env.eos_id
    rewards, _, info = play(env, 0, [5, 6, 7, eos])
    assert rewards[:3] == pytest.approx([2.0 / 1, 2.0 / 2, 2.0 / 3])  # prefix values; `whole` fails on prefixes: 0
    assert info["reward_rows"] == {"share": pytest.approx([0.25] * 4), "whole": [0.0, 0.0, 0.0, 1.0]}
    assert sum(rewards) == pytest.approx(2.0 * 1.0 + 0.5 * 1.0)


@pytest.mark.parametrize(
    "overrides",
    [
        ["task=chat_addition"],  # conversations through the chat template, BOS, BPE tokens of several digits
        ["rollout.stop=['4']", "rollout.stop_token_ids=[9]"],  # the rollout worker's other ends of a response
        ["task=chat_addition", "rollout.stop=['4']"],  # a stop string inside a BPE token of several digits
    ],
    ids=["chat_addition", "stop_strings_and_ids", "stop_string_inside_a_token"],
)
def test_env_replays_the_rollout_workers_samples(overrides):
    """The env sees the prompt ids the rollout worker sampled from, ends an episode where the worker ended
    the response, and pays the in-process reward worker's per-token rows (sampled at temperature 1.5)."""
    config = resolve_config(overrides=["data.max_eval_samples=16", "rollout.temperature=1.5", *overrides])
    env = TokenEnv(config, split="eval")
    prompts = env.task.tables["eval"].append_column("group_id", pa.array(range(16), pa.int64()))
    batch = RolloutWorker(config, config.model.path).generate(prompts, group_size=4, step=1)
    scored, _ = RewardWorker(config, config.model.path, list(config.reward.weights)).score_all(
        batch, list(config.reward.weights)
    )
    expected = weighted_rows(scored, config.reward.weights)
    finished = batch.column("finished").to_pylist()
    assert any(finished)
    columns = ("group_id", "prompt_ids", "response_ids", "response")
    for i, (index, prompt_ids, response, text) in enumerate(zip(*(batch.column(c).to_pylist() for c in columns))):
        assert env.task.prompt_ids["eval"][index] == prompt_ids
        rewards, ends, info = play(env, index, response)
        assert ends == [False] * (len(response) - 1) + [True]
        assert info["finished"] == finished[i] and info["response"] == text
        assert rewards == pytest.approx(expected[i], rel=1e-12, abs=1e-12)


def test_a_stop_string_inside_a_token_ends_the_episode():
    """The rollout worker's rule: a token whose text brings a stop string ends the response, even when the
    string ends inside the token's text (chat_addition's BPE has tokens of two digits)."""
    env = TokenEnv(overrides=["task=chat_addition", "rollout.max_new_tokens=4"], split="eval")
    two = next(t for t in env.task.tokenizer.get_vocab() if len(t) == 2 and t.isdigit() and t[0] != t[1])
    stopping = TokenEnv(env.config, overrides=[f"rollout.stop=['{two[0]}']"], split="eval")
    token = env.task.tokenizer.convert_tokens_to_ids(two)
    _, ends, info = play(stopping, 0, [token])
    assert ends == [True] and info["finished"] is True and info["response"] == two
    _, ends, info = play(env, 0, [token] * 4)  # without the stop string: cut at max_new_tokens
    assert ends == [False, False, False, True] and info["finished"] is False


def test_episode_ends_at_eos_or_max_new_tokens():
    env = TokenEnv(overrides=["rollout.max_new_tokens=3"], split="eval")
    digit = env.task.tokenizer.convert_tokens_to_ids("5")
    rewards, ends, info = play(env, 0, [digit] * 3)
    assert ends == [False, False, True] and info["finished"] is False and info["response"] == "555"
    with pytest.raises(TokenforgeError, match=r"on a finished episode; call reset\(\) first"):
        env.step(digit)
    _, ends, info = play(env, 0, [env.eos_id])
    assert ends == [True] and info["finished"] is True and info["response"] == ""


def test_observation_is_prompt_then_response_right_padded():
    env = TokenEnv(split="eval")
    obs, info = env.reset(options={"index": 2})
    prompt = env.task.prompt_ids["eval"][2]
    assert info == {"prompt_index": 2} and obs["length"] == len(prompt)
    obs, *_ = env.step(7)
    assert obs["tokens"][: len(prompt) + 1].tolist() == [*prompt, 7]
    assert (obs["tokens"][len(prompt) + 1 :] == env.pad_id).all() and obs["length"] == len(prompt) + 1
    assert obs in env.observation_space


def test_reset_order_and_seeding():
    evaluation = TokenEnv(split="eval")
    first = [evaluation.reset(seed=3 if i == 0 else None)[1]["prompt_index"] for i in range(3)]
    assert first == [0, 1, 2]
    assert evaluation.reset(seed=5)[1]["prompt_index"] == 0  # a seed starts the held-out prompts over
    train = TokenEnv()
    draws = [train.reset(seed=11)[1]["prompt_index"], *(train.reset()[1]["prompt_index"] for _ in range(4))]
    again = [train.reset(seed=11)[1]["prompt_index"], *(train.reset()[1]["prompt_index"] for _ in range(4))]
    assert draws == again and len(set(draws)) > 1


def test_env_config_takes_dotted_tokenforge_keys():
    env = from_env_config(
        {"reward.weights.digit_match": 0.25, "split": "eval", "overrides": ["rollout.max_new_tokens=4"]}
    )
    assert env.weights == {"exact_match": 1.0, "digit_match": 0.25}
    assert env.max_new_tokens == 4 and env.split == "eval"
    assert env_train_config({"reward.weights.digit_match": 0.25}).reward.weights["digit_match"] == 0.25


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (
            lambda: from_env_config({"reward_timming": "final"}),
            "env_config key 'reward_timming' is neither an env option",
        ),
        (lambda: from_env_config({"trainer.totl_steps": 3}), "config key 'trainer.totl_steps': unknown config key"),
        (
            lambda: from_env_config({"reward.weights.nope": 1.0}),
            "component 'nope' names no component type",
        ),
        (lambda: TokenEnv(split="test"), "env option 'split': 'test' is not one of train, eval"),
        (lambda: TokenEnv(reward_backend="remote"), "env option 'reward_backend': 'remote' is not one of local, pool"),
        (lambda: TokenEnv(reward_backend="pool"), "env option 'reward_backend': 'pool' scores once per episode"),
        (lambda: TokenEnv(render_mode="human"), "env option 'render_mode': 'human' is not one of None, 'ansi'"),
        (lambda: TokenEnv(config=3), "env config 'config': int is not a TrainConfig, YAML path or mapping"),
        (lambda: TokenEnv(config="missing.yaml"), "config file 'missing.yaml' does not exist"),
        (
            lambda: TokenEnv(overrides=["reward.components.exact_match.normalize=group"]),
            "config key 'reward.components.exact_match.normalize': 'group' needs the other samples of a batch",
        ),
        (
            lambda: TokenEnv(overrides=["algorithm.kl_in_reward_coef=0.1"]),
            "config key 'algorithm.kl_in_reward_coef': the KL penalty belongs to the learner",
        ),
        (
            lambda: TokenEnv(str(Path(__file__).parent.parent / "examples" / "captioning.yaml")),
            "the token environment takes text prompts; the data has images (its `image` field): train a "
            "vision-language model with `tokenforge train`",
        ),
        (
            lambda: TokenEnv(overrides=["task=subtraction"]),
            "config key 'task': Input should be 'addition', 'words', 'reverse', 'summarize', 'chat_addition' or "
            "'captioning'",
        ),
    ],
)
def test_bad_input_is_one_clear_line(make, message):
    with pytest.raises(TokenforgeError) as error:
        make()
    assert message in str(error.value) and "\n" not in str(error.value), str(error.value)


def test_teacher_with_subtract_policy_is_refused(builtin_model_path):
    with pytest.raises(ConfigError, match="subtract_policy': needs the policy's log-probs") as error:
        TokenEnv(
            overrides=[
                f"reward.components.teacher={{type: teacher_logprob, path: '{builtin_model_path}', "
                f"subtract_policy: true}}",
                "reward.weights={teacher: 1.0}",
            ]
        )
    assert "\n" not in str(error.value)


def test_pool_backend_needs_ray():
    """In a fresh process (this session's Ray may already run): one line, no Ray started behind the user's back."""
    code = "from pipeline.rllib.token_env import TokenEnv; TokenEnv(reward_backend='pool', reward_timing='final')"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode != 0
    expected = "TokenforgeError: env option 'reward_backend': 'pool' needs a running Ray (call ray.init() first)"
    assert expected in result.stderr


def test_bad_actions_and_reset_options():
    env = TokenEnv(split="eval")
    with pytest.raises(
        TokenforgeError, match=r"reset option 'index': 5000 is not a prompt index of split 'eval' \(0-999\)"
    ):
        env.reset(options={"index": 5000})
    env.reset()
    with pytest.raises(TokenforgeError, match=r"action 15 is not a token id in \[0, 15\)"):
        env.step(15)
    with pytest.raises(TokenforgeError, match=r"action -1 is not a token id"):
        env.step(np.int64(-1))


def test_render_shows_prompt_and_completion():
    env = TokenEnv(split="eval", render_mode="ansi")
    env.reset(options={"index": 0})
    for char in "67":
        env.step(env.task.tokenizer.convert_tokens_to_ids(char))
    assert env.render() == env.prompt_text + "67"
