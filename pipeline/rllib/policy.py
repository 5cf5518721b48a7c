"""RLlib (new API stack) baseline on the token environment: an RLModule wrapping a Hugging Face
causal LM, PPO's config for it, and tokenforge's greedy evaluation of its weights.

    from pipeline.rllib.policy import ppo_config
    algo = ppo_config({"reward.weights.digit_match": 0.25}).build_algo()
    algo.train()

The module's policy is the LM itself: its action-distribution inputs are the logits at the last
real position of the observation (softmax of them is exactly the distribution tokenforge's rollout
worker samples from at temperature 1). PPO's value function is a small MLP head on the LM's final
hidden state at that position, detached by default so value-loss gradients never reach the LM.
See docs/rllib.md.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pyarrow.compute as pc
import torch
from ray.rllib.algorithms.ppo import PPOConfig
from ray.rllib.core.columns import Columns
from ray.rllib.core.distribution.torch.torch_distribution import TorchCategorical
from ray.rllib.core.rl_module.apis.value_function_api import ValueFunctionAPI
from ray.rllib.core.rl_module.rl_module import RLModuleSpec
from ray.rllib.core.rl_module.torch import TorchRLModule
from torch import nn

from actors.reward_worker import RewardWorker
from actors.rollout_worker import RolloutWorker
from pipeline.config import TrainConfig
from pipeline.data.inputs import load_inputs
from pipeline.errors import ConfigError
from pipeline.models.hf import load_model, load_tokenizer
from pipeline.rewards.coco import eval_scores
from pipeline.rllib.token_env import ENV_ID, env_train_config, register_rllib_env

MODULE_OPTIONS = {
    "model_path": "local HF causal LM directory (required; ppo_config fills it from the env's config)",
    "trust_remote_code": "allow the model's own modelling code (default false)",
    "value_hidden": "width of the value head's hidden layer (default 64)",
    "value_detach": "value head on a detached hidden state: value loss never changes the LM (default true)",
}


def rllib_model_keys() -> set[str]:
    """Keys RLlib itself may merge into every module's model_config (old and new API stack defaults)."""
    from ray.rllib.core.rl_module.default_model_config import DefaultModelConfig
    from ray.rllib.models.catalog import MODEL_DEFAULTS

    return {f.name for f in dataclasses.fields(DefaultModelConfig)} | set(MODEL_DEFAULTS)


class CausalLMModule(TorchRLModule, ValueFunctionAPI):
    """Policy = a HF causal LM over the token environment's observation {tokens, length};
    value = a small MLP on its last hidden state. `model_config` keys: MODULE_OPTIONS."""

    def setup(self):
        options = dict(self.model_config or {})
        unknown = sorted(set(options) - set(MODULE_OPTIONS) - rllib_model_keys())  # RLlib merges its own keys in
        if unknown or "model_path" not in options:
            problem = f"unknown key {unknown[0]!r}" if unknown else "'model_path' is missing"
            raise ConfigError(f"CausalLMModule model_config: {problem}; keys: {', '.join(MODULE_OPTIONS)}")
        self.model = load_model(options["model_path"], options.get("trust_remote_code", False))
        self.model.train(False)  # no dropout: PPO's ratios compare the same function (as tokenforge's learner)
        hidden = self.model.config.get_text_config().hidden_size
        width = int(options.get("value_hidden", 64))
        self.value_head = nn.Sequential(nn.Linear(hidden, width), nn.Tanh(), nn.Linear(width, 1))
        self.value_detach = bool(options.get("value_detach", True))
        self.action_dist_cls = TorchCategorical

    def last_position(self, obs: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """Logits and final hidden state at the last real token of each row: (B, vocab), (B, hidden).

        Tokens are right-padded, so positions are 0..L-1 from the first real token (tokenforge's
        layout counts positions the same way) and causal attention never sees the padding."""
        length = obs["length"].long().reshape(-1)
        tokens = obs["tokens"].long()[:, : int(length.max())]  # columns past the longest row are all padding
        positions = torch.arange(tokens.shape[1], device=tokens.device).expand_as(tokens)
        attention = (positions < length[:, None]).long()
        out = self.model(input_ids=tokens, attention_mask=attention, position_ids=positions, output_hidden_states=True)
        rows, last = torch.arange(tokens.shape[0], device=tokens.device), length - 1
        return out.logits[rows, last].float(), out.hidden_states[-1][rows, last].float()

    def _forward(self, batch: dict[str, Any], **kwargs) -> dict[str, Any]:
        logits, _ = self.last_position(batch[Columns.OBS])
        return {Columns.ACTION_DIST_INPUTS: logits}

    def _forward_train(self, batch: dict[str, Any], **kwargs) -> dict[str, Any]:
        self.model.train(False)  # forward_train switched the whole module to train mode
        logits, hidden = self.last_position(batch[Columns.OBS])
        return {Columns.ACTION_DIST_INPUTS: logits, Columns.EMBEDDINGS: hidden}

    def compute_values(self, batch: dict[str, Any], embeddings: Any | None = None) -> torch.Tensor:
        if embeddings is None:
            with torch.set_grad_enabled(torch.is_grad_enabled() and not self.value_detach):
                _, embeddings = self.last_position(batch[Columns.OBS])
        if self.value_detach:
            embeddings = embeddings.detach()
        return self.value_head(embeddings).squeeze(-1)

    def hf_state_dict(self) -> dict[str, torch.Tensor]:
        """The wrapped LM's weights under their HF names (what RolloutWorker.set_weights loads)."""
        return {k: v.detach().cpu() for k, v in self.model.state_dict().items()}


def ppo_config(
    env_config: Mapping[str, Any] | None = None,
    *,
    num_envs: int = 64,
    train_batch_size: int = 1792,
    minibatch_size: int = 512,
    num_epochs: int = 1,
    lr: float = 5e-4,
    value_hidden: int = 64,
    seed: int | None = None,
    **training: Any,
) -> PPOConfig:
    """RLlib PPO on the token environment with CausalLMModule, sampling in the driver process
    (num_env_runners=0, `num_envs` vectorised envs, one batched forward per step) and a local
    learner. gamma 1 (the return is the completion's total reward, as in tokenforge), lambda 1,
    gradient-norm clip 1.0 (tokenforge's default); `training` passes any other PPOConfig.training key.
    The model is the env config's `model.path` (the task's shipped warm start by default)."""
    env_config = dict(env_config or {})
    config = env_train_config(env_config)
    register_rllib_env()
    settings = {"gamma": 1.0, "lambda_": 1.0, "grad_clip": 1.0, "clip_param": 0.2} | training
    algo_config = (
        PPOConfig()
        .environment(ENV_ID, env_config=env_config)
        # truncate_episodes (RLlib's default): episodes run on across sample() calls. Not complete_episodes:
        # it resets every env on each call, with the debugging seed when one is set, so every iteration
        # would replay the same num_envs prompts (and drop the slowest, longest episodes).
        .env_runners(num_env_runners=0, num_envs_per_env_runner=num_envs, batch_mode="truncate_episodes")
        .learners(num_learners=0)
        .training(
            train_batch_size_per_learner=train_batch_size,
            minibatch_size=minibatch_size,
            num_epochs=num_epochs,
            lr=lr,
            **settings,
        )
        .rl_module(
            rl_module_spec=RLModuleSpec(
                module_class=CausalLMModule,
                model_config={
                    "model_path": config.model.path,
                    "trust_remote_code": config.model.trust_remote_code,
                    "value_hidden": value_hidden,
                },
            )
        )
    )
    if seed is not None:
        algo_config = algo_config.debugging(seed=seed)
    return algo_config


class GreedyEvaluator:
    """tokenforge's eval on any weights of the config's model: greedy decoding of the held-out prompts
    by a RolloutWorker, scored by a RewardWorker on `trainer.eval_metrics` (Pipeline.evaluate's code
    path, in-process)."""

    def __init__(self, config: TrainConfig):
        self.config = config
        _, self.prompts = load_inputs(config)
        self.rollout = RolloutWorker(config, config.model.path)
        self.scorer = RewardWorker(config, config.model.path, config.trainer.eval_metrics)

    def __call__(self, state_dict: dict[str, torch.Tensor] | None = None) -> dict[str, float]:
        if state_dict is not None:
            self.rollout.set_weights(state_dict, 0)
        samples = self.rollout.generate(self.prompts, group_size=1, greedy=True)
        scored, dropped = self.scorer.score_all(samples, self.config.trainer.eval_metrics)
        scored = scored.filter(pc.invert(dropped))
        return eval_scores(self.config, scored, self.config.trainer.eval_metrics)


def save_hf_checkpoint(module: CausalLMModule, config: TrainConfig, directory: str | Path) -> Path:
    """The module's LM and the task's tokenizer as a HF model directory (`tokenforge eval DIR` reads it)."""
    directory = Path(directory)
    module.model.save_pretrained(directory)
    load_tokenizer(config.model.path, config.model.trust_remote_code).save_pretrained(directory)
    return directory
