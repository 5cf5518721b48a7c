"""Prompt files (loaded with `datasets`) and the seeded, resumable prompt sampler."""

from __future__ import annotations

from pathlib import Path

import datasets
import numpy as np
import pyarrow as pa

from pipeline.batch import CORE_COLUMNS
from pipeline.errors import TokenforgeError

LOADERS = {".jsonl": "json", ".json": "json", ".parquet": "parquet"}


def load_prompts(path: str | Path, key: str) -> pa.Table:
    """A prompt file as a pyarrow Table; `key` (e.g. data.train_file) names it in errors."""
    path = Path(path)
    if not path.is_file():
        raise TokenforgeError(f"{key}: file {str(path)!r} does not exist")
    if path.suffix not in LOADERS:
        raise TokenforgeError(f"{key}: {str(path)!r} must be one of {', '.join(LOADERS)}")
    datasets.disable_progress_bars()
    try:
        table = datasets.load_dataset(LOADERS[path.suffix], data_files=str(path), split="train").data.table
    except Exception as error:  # noqa: BLE001 - datasets raises many types for unreadable files
        raise TokenforgeError(f"{key}: cannot read {str(path)!r}: {error}") from None
    if "prompt" not in table.column_names:
        raise TokenforgeError(f"{key}: {str(path)!r} has no `prompt` field (fields: {', '.join(table.column_names)})")
    reserved = sorted(set(table.column_names) & CORE_COLUMNS - {"prompt"})
    if reserved:
        raise TokenforgeError(f"{key}: {str(path)!r} uses reserved field names {reserved}; rename them")
    for row, prompt in enumerate(table.column("prompt").to_pylist()):
        if not isinstance(prompt, str) or not prompt.strip():
            raise TokenforgeError(f"{key}: {str(path)!r} row {row} has an empty or non-text prompt")
    if table.num_rows == 0:
        raise TokenforgeError(f"{key}: {str(path)!r} holds no prompts")
    return table.combine_chunks()


class PromptSampler:
    """Draws `batch_size` prompts per step, epoch after epoch, in a seeded order.

    Its whole state is (epoch, position), so a resumed run draws exactly the prompts it would have.
    """

    def __init__(self, table: pa.Table, batch_size: int, seed: int, shuffle: bool = True):
        self.table, self.batch_size, self.seed, self.shuffle = table, batch_size, seed, shuffle
        self.epoch, self.position = 0, 0

    def _order(self) -> np.ndarray:
        if not self.shuffle:
            return np.arange(self.table.num_rows)
        return np.random.default_rng([self.seed, self.epoch]).permutation(self.table.num_rows)

    def next_batch(self, first_group_id: int) -> pa.Table:
        """The next prompts, with a `group_id` column numbered from `first_group_id`."""
        indices = []
        while len(indices) < self.batch_size:
            order = self._order()
            take = order[self.position : self.position + self.batch_size - len(indices)]
            indices.extend(take.tolist())
            self.position += len(take)
            if self.position >= len(order):
                self.epoch, self.position = self.epoch + 1, 0
        batch = self.table.take(pa.array(indices))
        return batch.append_column(
            "group_id", pa.array(range(first_group_id, first_group_id + len(indices)), pa.int64())
        )

    def state(self) -> dict:
        return {"epoch": self.epoch, "position": self.position}

    def load_state(self, state: dict) -> None:
        self.epoch, self.position = state["epoch"], state["position"]
