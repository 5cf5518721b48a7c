"""RewardWorker: builds its reward components once and scores rollout batches.

A plain class; the driver runs `reward.num_workers` of them as a pool of Ray actors
(pipeline/actor_group.py) and appends the returned columns to the rollout batch.
"""

from __future__ import annotations

import pyarrow as pa

from pipeline.batch import TOKEN_REWARD_TYPE, metadata_columns, reward_column
from pipeline.models import load_tokenizer
from pipeline.rewards import COMPONENTS, RewardInputs, score_component


class RewardWorker:
    def __init__(self, tokenizer_path: str, component_names: list[str], trust_remote_code: bool = False):
        self.tokenizer = load_tokenizer(tokenizer_path, trust_remote_code)
        self.components = {name: COMPONENTS[name]() for name in component_names}
        self._token_text: dict[int, str] = {}

    def _decode_token(self, token_id: int) -> str:
        if token_id not in self._token_text:
            self._token_text[token_id] = self.tokenizer.decode([token_id])
        return self._token_text[token_id]

    def score(self, batch: pa.Table, names: list[str] | None = None) -> pa.Table:
        """One `reward/<name>` column (a float per response token) for each named component."""
        response_ids = batch.column("response_ids").to_pylist()
        inputs = RewardInputs(
            prompts=batch.column("prompt").to_pylist(),
            completions=batch.column("completion").to_pylist(),
            completion_ids=response_ids,
            completion_tokens=[[self._decode_token(t) for t in ids] for ids in response_ids],
            columns={name: batch.column(name).to_pylist() for name in metadata_columns(batch)},
            eos_token=self.tokenizer.eos_token,
        )
        columns = {}
        for name in names or list(self.components):
            rows = score_component(self.components[name], inputs)
            columns[reward_column(name)] = pa.array(rows, type=TOKEN_REWARD_TYPE)
        return pa.table(columns)
