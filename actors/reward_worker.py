"""RewardWorker: builds its reward components once and scores rollout batches, one component per call.

A plain class; the driver runs `reward.num_workers` of them as a pool of Ray actors
(pipeline/driver/reward_pool.py), which handles timeouts, retries and dead workers. Errors raised by a
component are handled here, per sample, by the component's `on_error` policy.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import pyarrow as pa
import torch

from pipeline.batch import DATASET_PROMPT, TOKEN_REWARD_TYPE, metadata_columns, reward_column
from pipeline.config import TrainConfig
from pipeline.data.loading import load_prompts
from pipeline.data.prompts import as_completion
from pipeline.models.hf import load_tokenizer
from pipeline.rewards.base import (
    ComponentEnv,
    RewardError,
    RewardInputs,
    TrainerState,
    describe_sample,
    score_component,
)
from pipeline.rewards.components import COMPONENTS, component_options


@dataclass
class Scores:
    """One component's scores for a shard: a float per response token per sample, and the samples
    (shard row indices) that failed and were handled by on_error=zero/drop."""

    rows: list[list[float] | None]  # None: the component does not apply to the sample
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


def token_spans(tokenizer, ids: list[int], text: str) -> list[tuple[int, int]]:
    """[start, end) of the characters each token contributes to `text` (the decode of `ids` without special
    tokens; special tokens get an empty span): the spans partition `text`, in order. From the tokenizer's
    offset mapping of `text` when it re-encodes to the same tokens (the usual case), else by decoding growing
    prefixes (sampled ids need not be the canonical encoding, e.g. "1", "2" for "12"): either way a BPE token
    covering several characters gets all of them, never its text decoded on its own, and a character split
    over several tokens belongs to the last of them only, the one that completes it (a token's reward
    never depends on a later token)."""
    special = set(tokenizer.all_special_ids)
    plain = [t for t in ids if t not in special]
    encoded = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True) if tokenizer.is_fast else None
    if encoded is not None and encoded.input_ids == plain:
        plain_spans = [tuple(span) for span in encoded.offset_mapping]
    else:
        # a prefix holds the characters its decode shares with `text`: one that ends inside a character's bytes
        # decodes them to U+FFFD, which `text` does not have there, so that character waits for its last byte
        prefixes = [tokenizer.decode(plain[: k + 1], skip_special_tokens=True) for k in range(len(plain))]
        ends = [len(os.path.commonprefix([prefix, text])) for prefix in prefixes]
        for k in range(len(ends) - 2, -1, -1):  # and every longer prefix holds it (ends never decrease)
            ends[k] = min(ends[k], ends[k + 1])
        plain_spans = list(zip([0, *ends[:-1]], ends))
    # a character split over several tokens (the bytes of "é" under byte-level BPE) belongs to the last of
    # them, the one that completes it: an earlier token keeps only the characters before its successor's
    for k in range(len(plain_spans) - 2, -1, -1):
        start, end = plain_spans[k]
        plain_spans[k] = (start, max(start, min(end, plain_spans[k + 1][0])))
    spans, k, position = [], 0, 0
    for token in ids:
        if token in special:
            spans.append((position, position))
        else:
            spans.append(plain_spans[k])
            position = plain_spans[k][1]
            k += 1
    return spans


class RewardWorker:
    def __init__(
        self,
        config: TrainConfig,
        tokenizer_path: str,
        names: list[str],
        use_gpu: bool = False,
        train_data: pa.Table | None = None,
    ):
        """`train_data`: the training-set columns the components compute statistics from (statistics_columns; the
        driver's, so that no worker reads the data file on its own node); None: read from data.train_file here
        (in-process uses: `tokenforge eval`, the RLlib baseline)."""
        self.config = config
        self.tokenizer = load_tokenizer(tokenizer_path, config.model.trust_remote_code)
        data = config.data
        if train_data is None:
            source = (data.train_file, "data.train_file", data.train_split, data.image_prompt)
            train_column = lambda name: load_prompts(*source).column(name).to_pylist()  # noqa: E731
        else:
            train_column = lambda name: train_data.column(name).to_pylist()  # noqa: E731
        device = "cuda" if use_gpu and torch.cuda.is_available() else "cpu"
        env = ComponentEnv(self.tokenizer, device, train_column=train_column)
        self.components = {}
        for name in names:
            spec = config.reward.components[name]
            self.components[name] = COMPONENTS[spec.type](component_options(config, name), env)
        self.stop_ids = frozenset({self.tokenizer.eos_token_id, *config.rollout.stop_token_ids})

    def inputs(self, batch: pa.Table, step: int = 0) -> RewardInputs:
        response_ids = batch.column("response_ids").to_pylist()
        texts = batch.column("response").to_pylist()
        prompts = batch.column(DATASET_PROMPT).to_pylist()
        return RewardInputs(
            prompts=prompts,
            completions=[as_completion(p, text) for p, text in zip(prompts, texts)],
            completion_ids=response_ids,
            texts=texts,
            token_spans=[token_spans(self.tokenizer, ids, text) for ids, text in zip(response_ids, texts)],
            columns={
                name: batch.column(name).to_pylist() for name in metadata_columns(batch) if name != DATASET_PROMPT
            },
            stop_ids=self.stop_ids,
            prompt_texts=batch.column("prompt_text").to_pylist(),
            prompt_ids=batch.column("prompt_ids").to_pylist(),
            behaviour_logprobs=batch.column("behaviour_logprobs").to_pylist(),
            sample_ids=batch.column("sample_id").to_pylist(),
            trainer_state=TrainerState(global_step=step, max_steps=self.config.trainer.total_steps),
        )

    def score_all(self, batch: pa.Table, names: list[str], step: int = 0) -> tuple[pa.Table, pa.Array]:
        """In-process scoring of several components: `batch` with their reward columns, and the drop mask."""
        return with_scores(batch, {name: self.score(batch, name, step) for name in names}, self.config)

    def score(self, batch: pa.Table, name: str, step: int = 0) -> Scores:
        """Component `name` on every sample of `batch` (`step`: the trainer step, for trainer_state). If the
        batch call fails, samples are scored one by one to find the failing ones: on_error=raise stops
        with the first, zero/drop score them 0."""
        inputs, component = self.inputs(batch, step), self.components[name]
        try:
            return Scores(score_component(name, component, inputs), [])
        except Exception as batch_error:  # noqa: BLE001 - any user-code error is handled by on_error
            rows, failed = [], []
            for i in range(len(inputs.texts)):
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
