"""RewardWorker: builds its reward components once and scores rollout batches, one component per call.

A plain class; the driver runs `reward.num_workers` of them as a pool of Ray actors
(pipeline/reward_pool.py), which handles timeouts, retries and dead workers. Errors raised by a
component are handled here, per sample, by the component's `on_error` policy.
"""

from __future__ import annotations

from dataclasses import dataclass

import pyarrow as pa
import torch

from pipeline.batch import TOKEN_REWARD_TYPE, metadata_columns, reward_column
from pipeline.config import TrainConfig
from pipeline.models import load_tokenizer
from pipeline.reward_components import COMPONENTS
from pipeline.rewards import ComponentEnv, RewardError, RewardInputs, describe_sample, score_component


@dataclass
class Scores:
    """One component's scores for a shard: a float per response token per sample, and the samples
    (shard row indices) that failed and were handled by on_error=zero/drop."""

    rows: list[list[float]]
    failed: list[int]

    @staticmethod
    def concat(parts: list[Scores]) -> Scores:
        """Scores of consecutive shards as one (failed indices shifted to whole-batch rows)."""
        rows, failed = [], []
        for part in parts:
            failed += [len(rows) + i for i in part.failed]
            rows += part.rows
        return Scores(rows, failed)


def with_scores(batch: pa.Table, scores: dict[str, Scores], config: TrainConfig) -> tuple[pa.Table, pa.Array]:
    """`batch` plus a reward/<name> column per component, and the mask of rows that on_error=drop excludes."""
    dropped = [False] * batch.num_rows
    for name, result in scores.items():
        batch = batch.append_column(reward_column(name), pa.array(result.rows, type=TOKEN_REWARD_TYPE))
        if config.reward.components[name].on_error == "drop":
            for i in result.failed:
                dropped[i] = True
    return batch, pa.array(dropped)


class RewardWorker:
    def __init__(self, config: TrainConfig, tokenizer_path: str, names: list[str], use_gpu: bool = False):
        self.config = config
        self.tokenizer = load_tokenizer(tokenizer_path, config.model.trust_remote_code)
        env = ComponentEnv(self.tokenizer, "cuda" if use_gpu and torch.cuda.is_available() else "cpu")
        self.components = {}
        for name in names:
            spec = config.reward.components[name]
            self.components[name] = COMPONENTS[spec.type](config.component_options(name), env)
        self._token_text: dict[int, str] = {}

    def _decode_token(self, token_id: int) -> str:
        if token_id not in self._token_text:
            self._token_text[token_id] = self.tokenizer.decode([token_id])
        return self._token_text[token_id]

    def inputs(self, batch: pa.Table) -> RewardInputs:
        response_ids = batch.column("response_ids").to_pylist()
        return RewardInputs(
            prompts=batch.column("prompt").to_pylist(),
            completions=batch.column("completion").to_pylist(),
            completion_ids=response_ids,
            completion_tokens=[[self._decode_token(t) for t in ids] for ids in response_ids],
            columns={name: batch.column(name).to_pylist() for name in metadata_columns(batch)},
            eos_token=self.tokenizer.eos_token,
            prompt_ids=batch.column("prompt_ids").to_pylist(),
            behaviour_logprobs=batch.column("behaviour_logprobs").to_pylist(),
            sample_ids=batch.column("sample_id").to_pylist(),
        )

    def score_all(self, batch: pa.Table, names: list[str]) -> tuple[pa.Table, pa.Array]:
        """In-process scoring of several components: `batch` with their reward columns, and the drop mask."""
        return with_scores(batch, {name: self.score(batch, name) for name in names}, self.config)

    def score(self, batch: pa.Table, name: str) -> Scores:
        """Component `name` on every sample of `batch`. If the batch call fails, samples are scored one by
        one to find the failing ones: on_error=raise stops with the first, zero/drop score them 0."""
        inputs, component = self.inputs(batch), self.components[name]
        try:
            return Scores(score_component(name, component, inputs), [])
        except Exception as batch_error:  # noqa: BLE001 - any user-code error is handled by on_error
            rows, failed = [], []
            for i in range(len(inputs.prompts)):
                try:
                    rows += score_component(name, component, inputs.select([i]))
                except Exception as error:  # noqa: BLE001
                    if self.config.reward.components[name].on_error == "raise":
                        raise RewardError(component_failure(name, inputs, i, error)) from None
                    rows.append([0.0] * len(inputs.completion_ids[i]))
                    failed.append(i)
            if not failed:  # every sample scores on its own: the batch-level output was wrong
                raise RewardError(f"reward {name!r}: {type(batch_error).__name__}: {batch_error}") from None
            return Scores(rows, failed)


def component_failure(name: str, inputs: RewardInputs, i: int, error: Exception) -> str:
    if isinstance(error, RewardError):  # already names component and sample
        return str(error)
    return f"reward {name!r} failed on {describe_sample(inputs, i)}: {type(error).__name__}: {error}"
