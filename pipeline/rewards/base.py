"""Reward components: named scorers in a registry (type name -> class with typed options).

A component class is registered with `@register_component(type)`. It declares its options as a
pydantic model (`Options`, validated at start-up with the config), is built once per reward
worker with `(options, env)` and is called on a whole batch (`RewardInputs`). Per sample it returns
one float (sequence-level: placed on the last response token) or one float per response token
(token-level); `score_component` checks that and turns it into per-token rows.

The components themselves live in pipeline/rewards/components.py.
"""

from __future__ import annotations

import numbers
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, fields
from typing import Any, ClassVar

import torch
from pydantic import BaseModel, ConfigDict

from pipeline.errors import TokenforgeError


@dataclass
class TrainerState:
    """What TRL passes reward functions as `trainer_state` (the fields they read)."""

    global_step: int = 0
    max_steps: int = 0


@dataclass
class RewardInputs:
    """One batch as reward components see it (lists are row-aligned)."""

    prompts: list  # the dataset's prompts: text, or a conversation (a list of {role, content} messages)
    completions: list  # as TRL gives them: text, or [{"role": "assistant", "content": text}] for a conversation
    completion_ids: list[list[int]]
    texts: list[str]  # each completion's text: the decoded response, special tokens removed
    token_spans: list[list[tuple[int, int]]]  # per response token, its [start, end) characters in texts[i]
    columns: dict[str, list]  # the dataset's own columns, e.g. columns["answer"]
    stop_ids: frozenset[int] = frozenset()  # token ids that end a response (EOS, rollout.stop_token_ids)
    prompt_texts: list[str] = field(default_factory=list)  # the prompts as the model saw them
    prompt_ids: list[list[int]] = field(default_factory=list)
    behaviour_logprobs: list[list[float]] = field(default_factory=list)  # log pi of each response token
    sample_ids: list[int] = field(default_factory=list)  # for error messages
    trainer_state: TrainerState = field(default_factory=TrainerState)

    def select(self, rows: Sequence[int]) -> RewardInputs:
        """The same batch restricted to `rows`."""
        values = {}
        for f in fields(self):
            value = getattr(self, f.name)
            if isinstance(value, dict):
                values[f.name] = {k: [v[i] for i in rows] for k, v in value.items()}
            elif isinstance(value, list):
                values[f.name] = [value[i] for i in rows] if value else []
            else:
                values[f.name] = value
        return RewardInputs(**values)


@dataclass
class ComponentEnv:
    """What a component may need from the worker that builds it."""

    tokenizer: Any  # the policy's tokenizer
    device: str = "cpu"
    # a column of the training set (data.train_file), for components with corpus statistics (cider's document
    # frequencies); None where there is none
    train_column: Callable[[str], list] | None = None


class NoOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")


class RewardComponent(ABC):
    """Base class: subclasses set `Options` and implement `__call__`."""

    type_name: ClassVar[str]
    Options: ClassVar[type[BaseModel]] = NoOptions

    def __init__(self, options: BaseModel, env: ComponentEnv):
        self.options = options
        self.env = env

    @classmethod
    def required_columns(cls, options: BaseModel) -> tuple[str, ...]:
        """Dataset columns this component reads (checked against the data files at start-up)."""
        return ()

    @classmethod
    def train_columns(cls, options: BaseModel) -> tuple[str, ...]:
        """Training-set columns it computes statistics from (ComponentEnv.train_column), e.g. cider's references."""
        return ()

    @abstractmethod
    def __call__(self, inputs: RewardInputs) -> list:
        """Per sample: one float (sequence-level), one float per response token (token-level), or None
        when the component does not apply to the sample (TRL's rule: it then adds nothing)."""


COMPONENTS: dict[str, type[RewardComponent]] = {}


def register_component(type_name: str) -> Callable[[type[RewardComponent]], type[RewardComponent]]:
    def decorate(cls: type[RewardComponent]) -> type[RewardComponent]:
        cls.type_name = type_name
        COMPONENTS[type_name] = cls
        return cls

    return decorate


FLOAT32_MAX = float(torch.finfo(torch.float32).max)  # rewards are stored as float32 (pipeline.batch)


class RewardError(TokenforgeError):
    """A component failed or returned something unusable; the message names component and sample."""


def score_component(name: str, component: RewardComponent, inputs: RewardInputs) -> list[list[float] | None]:
    """Run one component and return one float per response token for every sample (None: not applicable)."""
    scores = component(inputs)
    if len(scores) != len(inputs.completion_ids):
        raise RewardError(f"reward {name!r} returned {len(scores)} scores for {len(inputs.completion_ids)} samples")
    rows = []
    for i, (score, ids) in enumerate(zip(scores, inputs.completion_ids)):
        if score is None:
            rows.append(None)
            continue
        if isinstance(score, (list, tuple)) or (hasattr(score, "ndim") and score.ndim == 1):  # token-level
            row = [reward_value(name, inputs, i, x) for x in score]
            if len(row) != len(ids):
                raise RewardError(
                    f"reward {name!r}, {describe_sample(inputs, i)}: {len(row)} token rewards for {len(ids)} "
                    "response tokens"
                )
        else:  # sequence-level: the reward sits on the last response token
            row = [0.0] * len(ids)
            row[-1] = reward_value(name, inputs, i, score)
        if not all(abs(x) <= FLOAT32_MAX for x in row):  # False for NaN; inf also once stored as float32
            raise RewardError(
                f"reward {name!r}, {describe_sample(inputs, i)}: NaN, inf or a value beyond float32's range "
                f"(|r| > {FLOAT32_MAX:.4g}) in {row}"
            )
        rows.append(row)
    return rows


def reward_value(name: str, inputs: RewardInputs, i: int, value: Any) -> float:
    """One reward as a float: a real number (python, numpy or a 0-d tensor), never a bool or a string, which
    float() would turn silently into 1.0/0.0 or a parsed number."""
    dtype = str(getattr(value, "dtype", ""))
    is_number = isinstance(value, numbers.Real) or (getattr(value, "ndim", None) == 0 and dtype != "")
    if not is_number or isinstance(value, bool) or dtype in ("bool", "torch.bool"):
        raise RewardError(
            f"reward {name!r}, {describe_sample(inputs, i)}: returned {value!r} ({type(value).__name__}); "
            "a reward is a number (or a list of one number per response token, or None)"
        )
    return float(value)


def describe_sample(inputs: RewardInputs, i: int) -> str:
    sample = inputs.sample_ids[i] if inputs.sample_ids else i
    prompt = repr(inputs.prompts[i])
    return f"sample {sample} (prompt {prompt if len(prompt) <= 80 else prompt[:77] + '...'})"
