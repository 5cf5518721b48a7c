"""Builders the test files share: reward components from their options, hand-made rollout batches, a tiny
reward model, scored batches of the shipped model."""

import pyarrow as pa
import torch

from pipeline.batch import make_rollout_table, reward_column
from pipeline.rewards.base import RewardComponent
from pipeline.rewards.components import COMPONENTS


def component(type_name: str, env=None, **options) -> RewardComponent:
    """The reward component of type `type_name` with these options."""
    cls = COMPONENTS[type_name]
    return cls(cls.Options(**options), env)


def rollout_table(
    prompt_ids,
    response_ids,
    responses,
    metadata: pa.Table,
    *,
    prompt_texts,
    group_ids=None,
    finished=None,
    behaviour=None,
    versions=None,
) -> pa.Table:
    """A hand-made rollout batch of these responses (one row each) with the dataset's columns `metadata`. By default
    one group, every sample finished, behaviour log-probs of -1, sampled by policy version 0."""
    n = len(response_ids)
    core = {
        "sample_id": list(range(n)),
        "group_id": list(group_ids) if group_ids is not None else [0] * n,
        "prompt_text": list(prompt_texts),
        "prompt_ids": list(prompt_ids),
        "response_ids": list(response_ids),
        "behaviour_logprobs": behaviour or [[-1.0] * len(r) for r in response_ids],
        "response": list(responses),
        "finished": list(finished) if finished is not None else [True] * n,
        "policy_version": list(versions) if versions is not None else [0] * n,
        "worker": ["local"] * n,
        "greedy_baseline": [False] * n,
    }
    return make_rollout_table(core, metadata)


def llama_classifier(path, tokenizer):
    """A tiny random Llama sequence classifier (2 labels) for `tokenizer`, saved with it to `path`; returns the
    model."""
    from transformers import LlamaConfig, LlamaForSequenceClassification

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=2,
        num_labels=2,
        pad_token_id=tokenizer.pad_token_id,
    )
    model = LlamaForSequenceClassification(config).eval()
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return model


def with_reward(batch: pa.Table, name: str, value: float) -> pa.Table:
    """`batch` with component `name` replaced by `value` on every sample's last token (as a broken scorer might)."""
    rows = [[0.0] * (len(r) - 1) + [value] for r in batch.column("response_ids").to_pylist()]
    column = batch.schema.get_field_index(reward_column(name))
    return batch.set_column(column, reward_column(name), pa.array(rows, type=pa.list_(pa.float32())))


def scored_batches(model_path: str, prompts: pa.Table, group_size: int, max_new_tokens: int) -> list[pa.Table]:
    """Two rollout batches (steps 1 and 2) of `prompts` x `group_size` samples at temperature 1, scored by the
    default task's reward components."""
    from actors.reward_worker import RewardWorker
    from actors.rollout_worker import RolloutWorker
    from pipeline.config import load_config

    config = load_config(overrides=["seed=3", "rollout.temperature=1.0", f"rollout.max_new_tokens={max_new_tokens}"])
    worker = RolloutWorker(config, model_path)
    names = list(config.reward.weights)
    scorer = RewardWorker(config, model_path, names)
    return [scorer.score_all(worker.generate(prompts, group_size=group_size, step=s), names)[0] for s in (1, 2)]
