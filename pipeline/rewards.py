"""Reward components: named scorers, sequence-level or token-level, in a registry.

A component is a class registered with `@register_component(name)`. It is built once per
reward worker and called on a whole batch (`RewardInputs`); it returns per sample either one
float (level "sequence": placed on the last response token) or one float per response token
(level "token"). `score_component` checks the output and turns it into per-token rows.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass
from typing import ClassVar

from pipeline.errors import TokenforgeError


@dataclass
class RewardInputs:
    """One batch as reward components see it (lists are row-aligned)."""

    prompts: list[str]
    completions: list[str]
    completion_ids: list[list[int]]
    completion_tokens: list[list[str]]  # each response token decoded on its own; EOS is `eos_token`
    columns: dict[str, list]  # the dataset's own columns, e.g. columns["answer"]
    eos_token: str


class RewardComponent(ABC):
    """Base class: subclasses set `level`, `required_columns` and implement `__call__`."""

    name: ClassVar[str]
    level: ClassVar[str]  # "sequence" or "token"
    required_columns: ClassVar[tuple[str, ...]] = ()

    @abstractmethod
    def __call__(self, inputs: RewardInputs) -> list:
        """Per sample: one float ("sequence") or one float per response token ("token")."""


COMPONENTS: dict[str, type[RewardComponent]] = {}


def register_component(name: str) -> Callable[[type[RewardComponent]], type[RewardComponent]]:
    def decorate(cls: type[RewardComponent]) -> type[RewardComponent]:
        cls.name = name
        COMPONENTS[name] = cls
        return cls

    return decorate


class RewardError(TokenforgeError):
    """A component returned something unusable; the message names component and sample."""


def score_component(component: RewardComponent, inputs: RewardInputs) -> list[list[float]]:
    """Run one component and return one float per response token for every sample."""
    scores = component(inputs)
    name = component.name
    if len(scores) != len(inputs.completion_ids):
        raise RewardError(f"reward {name!r} returned {len(scores)} scores for {len(inputs.completion_ids)} samples")
    rows = []
    for i, (score, ids) in enumerate(zip(scores, inputs.completion_ids)):
        if component.level == "sequence":
            row = [0.0] * len(ids)
            row[-1] = float(score)  # sequence-level reward sits on the last response token
        else:
            row = [float(x) for x in score]
            if len(row) != len(ids):
                raise RewardError(
                    f"reward {name!r}, sample {i}: {len(row)} token rewards for {len(ids)} response tokens"
                )
        if not all(math.isfinite(x) for x in row):
            raise RewardError(f"reward {name!r}, sample {i}: NaN or inf in {row}")
        rows.append(row)
    return rows


@register_component("exact_match")
class ExactMatch(RewardComponent):
    """1 if the completion (whitespace-stripped) equals the `answer` column, else 0."""

    level = "sequence"
    required_columns = ("answer",)

    def __call__(self, inputs: RewardInputs) -> list[float]:
        answers = inputs.columns["answer"]
        return [float(c.strip() == str(a).strip()) for c, a in zip(inputs.completions, answers)]


@register_component("digit_match")
class DigitMatch(RewardComponent):
    """Token-level credit for each answer character generated in its place, and for EOS in its place.

    With answer a (n characters), a token covering characters [k, k+len) earns
    (number of them equal to a[k:k+len]) / (n + 1); EOS earns 1 / (n + 1) when everything before
    it is exactly a. A fully correct response therefore earns 1 in total.
    """

    level = "token"
    required_columns = ("answer",)

    def __call__(self, inputs: RewardInputs) -> list[list[float]]:
        rows = []
        for tokens, answer in zip(inputs.completion_tokens, inputs.columns["answer"]):
            answer = str(answer)
            unit = 1.0 / (len(answer) + 1)
            row, text = [], ""
            for token in tokens:
                if token == inputs.eos_token:
                    row.append(unit if text == answer else 0.0)
                    break
                offset = len(text)
                row.append(unit * sum(c == answer[offset + j] for j, c in enumerate(token) if offset + j < len(answer)))
                text += token
            rows.append(row + [0.0] * (len(tokens) - len(row)))
        return rows
