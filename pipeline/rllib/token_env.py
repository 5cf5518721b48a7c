"""Text generation as a token-level MDP: a gymnasium environment over any tokenforge task.

An episode is one prompt; an action is one token id; the observation is the token ids so far
(prompt + response, right-padded to a fixed width; the prompt encoded as the rollout worker
encodes it, a conversation through the chat template) and their count; the episode ends
(`terminated`) where the rollout worker ends a response (EOS, a `rollout.stop_token_ids` token, a
`rollout.stop` string) or after `rollout.max_new_tokens` response tokens. Both ends are real ends
of the completion (it is scored as it stands), so `truncated` is never set and RL libraries do
not bootstrap past them; `info["finished"]` says whether the response stopped by itself.

Rewards are the task's weighted reward components (`reward.weights`), computed by the reward
pool's own code (`RewardWorker.score_all`, in-process, or the `RewardPool` actors):

- `reward_timing="dense"` (default): after each token before the last, every token-level
  component scores the completion so far and the env pays `sum_i w_i * r_i,t` for the new token t;
  on the last step the whole completion is scored exactly as the pool scores it and the env pays
  the rest, `pool total - already paid`. The episode's rewards therefore always sum to the
  pool's per-sample total, and each step's reward equals the pool's per-token row
  (`sum_i w_i * r_i,t`) for every component whose token value depends only on the tokens up to t
  (`digit_match`, `teacher_logprob`; not `rouge`/`chrf` at `level: token`). A component that looks ahead
  is settled on the last step. Sequence-level components pay on the last step.
- `reward_timing="final"`: the whole completion is scored once at the end and the total is paid on
  the last step (0 before it): one scoring call per episode.

`reward_backend="pool"` scores through a `RewardPool` of Ray actors (one call per episode, so
only with `reward_timing="final"`). See docs/rllib.md.
"""

from __future__ import annotations

import json
import math
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

try:
    import gymnasium as gym
    from gymnasium import spaces
except ImportError as error:  # pragma: no cover - depends on the install
    raise ImportError("pipeline.rllib.token_env needs gymnasium: pip install 'tokenforge[rllib]'") from error

from actors.reward_worker import RewardWorker
from pipeline.batch import DATASET_PROMPT, make_rollout_table, reward_column
from pipeline.config import TrainConfig, config_with, load_config, parse_override, validate_config
from pipeline.data.images import IMAGE_COLUMN
from pipeline.data.inputs import load_inputs, with_builtin_defaults
from pipeline.data.prompts import encode_prompts, set_chat_template
from pipeline.errors import ConfigError, TokenforgeError
from pipeline.models.hf import load_tokenizer
from pipeline.preflight import check
from pipeline.rewards.base import FLOAT32_MAX
from pipeline.rewards.components import component_options

ENV_ID = "tokenforge/TokenGeneration-v0"
SPLITS = ("train", "eval")
REWARD_BACKENDS = ("local", "pool")
REWARD_TIMINGS = ("dense", "final")
ENV_OPTIONS = ("config", "overrides", "split", "reward_backend", "reward_timing", "render_mode")


def resolve_config(
    config: TrainConfig | str | Path | Mapping | None = None, overrides: Sequence[str] | Mapping = ()
) -> TrainConfig:
    """A tokenforge config from a TrainConfig, a YAML path, a mapping of sections or None (the
    defaults), plus dotted overrides (`"a.b=value"` strings or a {dotted key: value} mapping);
    null model/data paths filled from the built-in task."""
    if config is None:
        base = load_config()
    elif isinstance(config, TrainConfig):
        base = config
    elif isinstance(config, (str, Path)):
        base = load_config(config)
    elif isinstance(config, Mapping):
        base = validate_config(dict(config))
    else:
        raise ConfigError(f"env config 'config': {type(config).__name__} is not a TrainConfig, YAML path or mapping")
    if isinstance(overrides, str):
        overrides = [overrides]
    values = dict(overrides) if isinstance(overrides, Mapping) else dict(parse_override(text) for text in overrides)
    return with_builtin_defaults(check(config_with(base, values) if values else base))


def check_env_config(config: TrainConfig, reward_backend: str, reward_timing: str, split: str) -> None:
    """Refuse settings the environment cannot honour, with one line naming the key."""
    for key, value, known in [
        ("split", split, SPLITS),
        ("reward_backend", reward_backend, REWARD_BACKENDS),
        ("reward_timing", reward_timing, REWARD_TIMINGS),
    ]:
        if value not in known:
            raise ConfigError(f"env option {key!r}: {value!r} is not one of {', '.join(known)}")
    if reward_backend == "pool" and reward_timing == "dense":
        raise ConfigError(
            "env option 'reward_backend': 'pool' scores once per episode (a pool call per token would cost a Ray "
            "round trip each); use reward_timing='final' with it, or reward_backend='local' for dense rewards"
        )
    for name in config.reward.weights:
        spec = config.reward.components[name]
        if spec.normalize != "none":
            raise ConfigError(
                f"config key 'reward.components.{name}.normalize': {spec.normalize!r} needs the other samples of a "
                "batch, which a one-episode environment does not have; use 'none' in the environment"
            )
        if spec.type == "teacher_logprob" and component_options(config, name).subtract_policy:
            raise ConfigError(
                f"config key 'reward.components.{name}.subtract_policy': needs the policy's log-probs, which an "
                "environment is not given; set it false (the RL library's KL term plays that role)"
            )
    if config.algorithm.kl_in_reward_coef > 0:
        raise ConfigError(
            "config key 'algorithm.kl_in_reward_coef': the KL penalty belongs to the learner, not the environment; "
            "set it to 0 and use the RL library's own KL term"
        )


def parse_env_config(env_config: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """TokenEnv's keyword arguments from an RLlib/Tune `env_config`: env options (ENV_OPTIONS) plus,
    at the top level, any tokenforge config key, dotted (`"reward.weights.digit_match": 0.25`) so
    Tune can search it; those join `overrides`."""
    options: dict[str, Any] = {}
    extra: dict[str, Any] = {}
    for key, value in dict(env_config or {}).items():
        if key in ENV_OPTIONS:
            options[key] = value
        elif key.split(".")[0] in TrainConfig.model_fields:
            extra[key] = value
        else:
            raise ConfigError(
                f"env_config key {key!r} is neither an env option ({', '.join(ENV_OPTIONS)}) nor a tokenforge config "
                "key (e.g. seed, reward.weights.digit_match; see `tokenforge train --help-config`)"
            )
    if extra:
        overrides = options.get("overrides", ())
        overrides = [overrides] if isinstance(overrides, str) else overrides
        merged = dict(overrides) if isinstance(overrides, Mapping) else dict(parse_override(t) for t in overrides)
        options["overrides"] = {**merged, **extra}
    return options


def from_env_config(env_config: Mapping[str, Any] | None = None) -> TokenEnv:
    """A TokenEnv from an RLlib/Tune `env_config` (see parse_env_config)."""
    return TokenEnv(**parse_env_config(env_config))


def env_train_config(env_config: Mapping[str, Any] | None = None) -> TrainConfig:
    """The checked tokenforge config an `env_config` describes, without building the environment."""
    options = parse_env_config(env_config)
    config = resolve_config(options.get("config"), options.get("overrides", ()))
    check_env_config(
        config,
        options.get("reward_backend", "local"),
        options.get("reward_timing", "dense"),
        options.get("split", "train"),
    )
    return config


@dataclass
class Task:
    """What every env of one config shares in a process (loaded once: prompts, tokenizer, scorer)."""

    config: TrainConfig
    tables: dict[str, pa.Table]  # split -> prompt rows (dataset columns)
    prompt_texts: dict[str, list[str]]  # split -> each prompt as the model sees it (chat template applied)
    prompt_ids: dict[str, list[list[int]]]  # split -> its token ids, as the rollout worker encodes them
    width: int  # longest prompt (both splits) + max_new_tokens: the observation's token width
    vocab_size: int
    tokenizer: Any
    scorer: RewardWorker | None = None


_TASKS: dict[str, Task] = {}


def load_task(config: TrainConfig, with_scorer: bool) -> Task:
    key = json.dumps(config.model_dump(mode="json"), sort_keys=True)
    task = _TASKS.get(key)
    if task is None:
        from transformers import AutoConfig

        train, evaluation = load_inputs(config)
        if IMAGE_COLUMN in train.column_names:  # its observations are token ids alone
            raise TokenforgeError(
                "the token environment takes text prompts; the data has images (its `image` field): train a "
                "vision-language model with `tokenforge train`"
            )
        tokenizer = load_tokenizer(config.model.path, config.model.trust_remote_code)
        set_chat_template(tokenizer, config.model.chat_template)
        tables = {"train": train}
        if evaluation is not None:  # data.eval_file: null leaves the env without an eval split
            tables["eval"] = evaluation.drop_columns(["group_id"])
        prompt_texts, prompt_ids = {}, {}
        for split, table in tables.items():
            prompts = table.column(DATASET_PROMPT).to_pylist()
            prompt_texts[split], prompt_ids[split] = encode_prompts(tokenizer, prompts, config.data.add_special_tokens)
        longest = max(len(ids) for rows in prompt_ids.values() for ids in rows)
        model_config = AutoConfig.from_pretrained(config.model.path, trust_remote_code=config.model.trust_remote_code)
        vocab_size = int(model_config.get_text_config().vocab_size)
        width = longest + config.rollout.max_new_tokens
        task = Task(config, tables, prompt_texts, prompt_ids, width, vocab_size, tokenizer)
        _TASKS[key] = task
    if with_scorer and task.scorer is None:
        task.scorer = RewardWorker(config, config.model.path, list(config.reward.weights))
    return task


def is_token_level(score: Any) -> bool:
    """The reward contract's test (pipeline.rewards.base.score_component): a list per sample is token-level."""
    return isinstance(score, (list, tuple)) or (hasattr(score, "ndim") and score.ndim == 1)


class TokenEnv(gym.Env):
    """One prompt per episode, one token per step; rewards from the task's reward components.

    Args:
        config: a TrainConfig, a YAML file, a mapping of config sections, or None (the defaults:
            the built-in `addition` task and its rewards). Used: task, model, data, reward,
            rollout.max_new_tokens, seed.
        overrides: dotted overrides, `"reward.weights.digit_match=0.25"` strings or a mapping.
        split: "train" (a random prompt per reset) or "eval" (held-out prompts in file order,
            from the first again whenever reset gets a seed).
        reward_backend: "local" (an in-process RewardWorker) or "pool" (RewardPool actors; needs
            a running Ray and reward_timing="final").
        reward_timing: "dense" or "final" (see the module docstring).
        render_mode: None or "ansi" (the prompt and the completion so far).

    `reset(options={"index": i})` starts the episode on prompt i of the split.
    """

    metadata = {"render_modes": ["ansi"], "render_fps": 1}

    def __init__(
        self,
        config: TrainConfig | str | Path | Mapping | None = None,
        overrides: Sequence[str] | Mapping = (),
        split: str = "train",
        reward_backend: str = "local",
        reward_timing: str = "dense",
        render_mode: str | None = None,
    ):
        self.config = resolve_config(config, overrides)
        check_env_config(self.config, reward_backend, reward_timing, split)
        if render_mode not in (None, *self.metadata["render_modes"]):
            raise ConfigError(f"env option 'render_mode': {render_mode!r} is not one of None, 'ansi'")
        self.split, self.reward_backend, self.reward_timing, self.render_mode = (
            split,
            reward_backend,
            reward_timing,
            render_mode,
        )
        self.task = load_task(self.config, with_scorer=reward_backend == "local")
        if split not in self.task.tables:
            raise ConfigError("env option 'split': 'eval' needs held-out prompts, and data.eval_file is null")
        self.weights = dict(self.config.reward.weights)
        self.pool = None
        if reward_backend == "pool":
            import ray

            from pipeline.driver.reward_pool import RewardPool

            if not ray.is_initialized():
                raise TokenforgeError("env option 'reward_backend': 'pool' needs a running Ray (call ray.init() first)")
            self.pool = RewardPool(self.config, self.config.model.path, run_id=f"env-{uuid.uuid4().hex[:8]}")
        tokenizer = self.task.tokenizer
        self.eos_id, self.pad_id = tokenizer.eos_token_id, tokenizer.pad_token_id
        # a response ends as the rollout worker ends it: EOS, a rollout.stop_token_ids token, a rollout.stop string
        self.stop_ids = frozenset({self.eos_id, *self.config.rollout.stop_token_ids})
        self.stop_strings = tuple(self.config.rollout.stop)
        self.max_new_tokens = self.config.rollout.max_new_tokens
        self.width = self.task.width
        self.action_space = spaces.Discrete(self.task.vocab_size)
        self.observation_space = spaces.Dict(
            {
                "tokens": spaces.Box(0, self.task.vocab_size - 1, shape=(self.width,), dtype=np.int64),
                "length": spaces.Box(1, self.width, shape=(), dtype=np.int64),
            }
        )
        self._sequence_level: set[str] = set()  # components seen returning one float: not scored on prefixes
        self._cursor = 0  # eval split: next prompt
        self._episodes = 0
        self._index: int | None = None
        self._response: list[int] = []
        self._paid = 0.0
        self._done = True

    # -- gymnasium API -------------------------------------------------------------------------

    def reset(self, *, seed: int | None = None, options: dict | None = None):
        super().reset(seed=seed)
        count = self.task.tables[self.split].num_rows
        index = (options or {}).get("index")
        if index is not None:
            if not isinstance(index, (int, np.integer)) or not 0 <= index < count:
                raise TokenforgeError(
                    f"reset option 'index': {index!r} is not a prompt index of split {self.split!r} (0-{count - 1})"
                )
            index = int(index)
        elif self.split == "train":
            index = int(self.np_random.integers(count))
        else:
            if seed is not None:
                self._cursor = 0
            index, self._cursor = self._cursor, (self._cursor + 1) % count
        self._index, self._response, self._paid, self._done = index, [], 0.0, False
        self._episodes += 1
        return self._observation(), {"prompt_index": index}

    def step(self, action):
        if self._done:
            raise TokenforgeError("step() on a finished episode; call reset() first")
        if not self.action_space.contains(action):
            raise TokenforgeError(f"action {action} is not a token id in [0, {self.action_space.n})")
        token = int(action)
        self._response.append(token)
        finished = token in self.stop_ids or self._reached_stop_string()
        self._done = finished or len(self._response) >= self.max_new_tokens
        info: dict[str, Any] = {}
        if self._done:
            reward, info = self._settle(finished)
        elif self.reward_timing == "dense":
            reward = self._advance()
        else:
            reward = 0.0
        return self._observation(), reward, self._done, False, info

    def render(self):
        if self.render_mode == "ansi":
            return self.prompt_text + self.task.tokenizer.decode(self._response, skip_special_tokens=False)
        return None

    def close(self):
        if self.pool is not None:
            import ray

            for actor in self.pool.actors:
                ray.kill(actor)
            self.pool = None

    # -- internals -----------------------------------------------------------------------------

    @property
    def prompt_text(self) -> str:
        """The episode's prompt as the model sees it (a conversation rendered by the chat template)."""
        return self.task.prompt_texts[self.split][self._index]

    def _reached_stop_string(self) -> bool:
        """Whether the newest token brought a `rollout.stop` string into the text, wherever in that token's text
        the string ends (the rollout worker's rule: a BPE token such as "43" runs past a stop "4")."""
        if not self.stop_strings:
            return False
        before = len(self.task.tokenizer.decode(self._response[:-1], skip_special_tokens=True))
        text = self.task.tokenizer.decode(self._response, skip_special_tokens=True)
        return any(stop in text[max(0, before - len(stop) + 1) :] for stop in self.stop_strings)

    def _observation(self) -> dict[str, np.ndarray]:
        ids = self.task.prompt_ids[self.split][self._index] + self._response
        tokens = np.full(self.width, self.pad_id, dtype=np.int64)
        tokens[: len(ids)] = ids
        return {"tokens": tokens, "length": np.array(len(ids), dtype=np.int64)}

    def _batch(self, finished: bool) -> pa.Table:
        """The completion so far as a one-row rollout batch (pipeline.batch schema), as the pool gets it."""
        prompt_row = self.task.tables[self.split].slice(self._index, 1)
        core = {
            "sample_id": [self._episodes],
            "group_id": [self._episodes],
            "prompt_text": [self.prompt_text],
            "prompt_ids": [self.task.prompt_ids[self.split][self._index]],
            "response_ids": [list(self._response)],
            "behaviour_logprobs": [[0.0] * len(self._response)],  # the env does not know the policy
            "response": [self.task.tokenizer.decode(self._response, skip_special_tokens=True)],
            "finished": [finished],
            "policy_version": [0],
            "worker": ["token_env"],
            "greedy_baseline": [False],
        }
        return make_rollout_table(core, prompt_row)

    def _advance(self) -> float:
        """Dense reward of the newest token: the token-level components' value for it, scored on the
        completion so far (rounded to float32, as the pool stores rewards). A component that fails
        on a prefix pays nothing here; the final scoring applies its on_error policy."""
        scorer = self.task.scorer
        inputs = scorer.inputs(self._batch(finished=False))
        reward = 0.0
        for name, weight in self.weights.items():
            if name in self._sequence_level:
                continue
            try:
                score = scorer.components[name](inputs)[0]
            except Exception:  # noqa: BLE001, S112 - judged on the whole completion at the end
                continue
            if score is None:  # does not apply to this sample (so far): pays nothing
                continue
            if not is_token_level(score):
                self._sequence_level.add(name)
                continue
            values = list(score)
            if len(values) == len(self._response):
                value = float(np.float32(values[-1])) if abs(float(values[-1])) <= FLOAT32_MAX else math.nan
                if math.isfinite(value):
                    reward += weight * value
        self._paid += reward
        return reward

    def _settle(self, finished: bool) -> tuple[float, dict[str, Any]]:
        """Score the whole completion as the pool does; pay its weighted total minus what was paid."""
        batch, names = self._batch(finished), list(self.weights)
        if self.pool is not None:
            scored, dropped = self.pool.score(batch, names)
        else:
            scored, dropped = self.task.scorer.score_all(batch, names)
        rows = {name: scored.column(reward_column(name))[0].as_py() for name in names}
        per_token = [0.0] * len(self._response)  # r_t = sum_i w_i * r_i,t, summed in the learner's order
        for name, weight in self.weights.items():
            if rows[name] is not None:  # None: the component does not apply to the sample, it adds nothing
                per_token = [r + weight * x for r, x in zip(per_token, rows[name])]
        total = sum(per_token)
        info = {
            "response": batch.column("response")[0].as_py(),
            "finished": finished,
            "reward_rows": rows,
            "reward_total": total,
            "dropped": bool(dropped[0].as_py()),
        }
        return total - self._paid, info


def register_rllib_env(name: str = ENV_ID) -> str:
    """Register TokenEnv with Ray Tune's registry (RLlib's `config.environment(name, env_config=...)`)."""
    from ray.tune.registry import register_env

    register_env(name, from_env_config)
    return name


if ENV_ID not in gym.registry:
    gym.register(id=ENV_ID, entry_point="pipeline.rllib.token_env:TokenEnv")
