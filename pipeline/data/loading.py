"""Prompt datasets (loaded with `datasets`, held as pyarrow Tables) and the seeded, resumable prompt sampler.

`data.train_file` / `data.eval_file` may be: a `.jsonl`, `.json`, `.parquet` or `.csv` file; a directory
written by `datasets.Dataset.save_to_disk` (or a DatasetDict's, then `data.*_split` picks the split);
a directory of parquet shards; or anything else `datasets.load_dataset` takes, e.g. a dataset name
(offline from the local cache when HF_DATASETS_OFFLINE=1) or a local dataset repository, with
`data.train_split` / `data.eval_split`. Each row needs a `prompt`: text, or a conversation (a list of
{role, content} messages, TRL's conversational format). Other fields ride along to the rewards.

A `.json` file of COCO captions (`images` and `annotations`, several captions per image) gives one row per image
with a caption: `prompt` = data.image_prompt, `image` = its file_name (resolved later against data.image_root),
`reference` = its captions, `image_id`.
"""

from __future__ import annotations

import json
from pathlib import Path

import datasets
import numpy as np
import pyarrow as pa

from pipeline.batch import CORE_COLUMNS
from pipeline.config import DEFAULT_IMAGE_PROMPT
from pipeline.data.prompts import check_prompt
from pipeline.errors import TokenforgeError

FILE_BUILDERS = {".jsonl": "json", ".json": "json", ".parquet": "parquet", ".csv": "csv"}


def coco_captions(path: Path, prompt: str) -> datasets.Dataset | None:
    """The rows of a COCO captions file (None when the file is not one JSON object with top-level `images` and
    `annotations`: a JSON array, or JSON Lines, is a plain prompt file)."""
    with open(path, "rb") as f:
        if f.read(64).lstrip(b"\xef\xbb\xbf \t\r\n")[:1] != b"{":
            return None
    try:
        data = json.loads(path.read_text(encoding="utf-8-sig"))
    except json.JSONDecodeError:  # JSON Lines (one object per line) is not one JSON document
        return None
    if not isinstance(data, dict) or not {"images", "annotations"} <= data.keys():
        return None
    files, captions = {}, {}
    for k, image in enumerate(data["images"]):
        if not isinstance(image, dict) or "id" not in image or "file_name" not in image:
            raise ValueError(f"images[{k}] is not an object with `id` and `file_name`")
        files[image["id"]] = image["file_name"]
    for k, note in enumerate(data["annotations"]):
        if not isinstance(note, dict) or "image_id" not in note:
            raise ValueError(f"annotations[{k}] is not an object with `image_id` and `caption`")
        if note["image_id"] not in files:
            raise ValueError(f"annotations[{k}] is of image_id {note['image_id']}, which `images` does not list")
        if not isinstance(note.get("caption"), str) or not note["caption"].strip():
            raise ValueError(f"annotations[{k}] has no caption (a non-empty string)")
        captions.setdefault(note["image_id"], []).append(note["caption"].strip())
    rows = [
        {"prompt": prompt, "image": files[i], "reference": refs, "image_id": i} for i, refs in captions.items()
    ]  # images without a caption have nothing to score
    return datasets.Dataset.from_list(rows)


def read_dataset(source: str, split: str, image_prompt: str) -> datasets.Dataset:
    """The `split` of a file, a saved dataset directory, a directory of parquet shards or a `load_dataset` name."""
    path = Path(source)
    if path.is_file() and path.suffix == ".json":
        coco = coco_captions(path, image_prompt)
        if coco is not None:
            return coco
    if path.is_file():
        if path.suffix not in FILE_BUILDERS:
            raise ValueError(f"a file must be one of {', '.join(FILE_BUILDERS)}")
        return datasets.load_dataset(FILE_BUILDERS[path.suffix], data_files=str(path), split="train")
    if path.is_dir() and ((path / "dataset_info.json").is_file() or (path / "dataset_dict.json").is_file()):
        saved = datasets.load_from_disk(str(path))  # Dataset.save_to_disk / DatasetDict.save_to_disk
        return saved[split] if isinstance(saved, datasets.DatasetDict) else saved
    if path.is_dir() and not any(path.glob("*.md")) and list(path.glob("*.parquet")):
        return datasets.load_dataset("parquet", data_files=str(path / "*.parquet"), split="train")
    return datasets.load_dataset(source, split=split)  # a dataset name or a local dataset repository


def load_prompts(
    source: str | Path, key: str, split: str = "train", image_prompt: str = DEFAULT_IMAGE_PROMPT
) -> pa.Table:
    """A prompt dataset as a pyarrow Table; `key` (e.g. data.train_file) names it in errors; `image_prompt`: the
    prompt of every image of a COCO captions file."""
    source = str(source)
    datasets.disable_progress_bars()
    try:
        dataset = read_dataset(source, split, image_prompt)
    except Exception as error:  # noqa: BLE001 - datasets raises many types for unreadable or unknown sources
        missing = not Path(source).exists() and ("/" in source.strip("./") or Path(source).suffix)
        if missing and isinstance(error, (FileNotFoundError, datasets.exceptions.DatasetNotFoundError)):
            raise TokenforgeError(
                f"{key}: {source!r} does not exist (a file, a dataset directory or a cached dataset name)"
            ) from None
        first_line = next(iter(str(error).splitlines()), "")
        raise TokenforgeError(f"{key}: cannot read {source!r}: {type(error).__name__}: {first_line}") from None
    if len(dataset) == 0:  # datasets refuses empty files itself; an empty split of a dataset can still get here
        raise TokenforgeError(f"{key}: {source!r} holds no prompts")
    table = dataset.data.table
    if "prompt" not in table.column_names:
        raise TokenforgeError(f"{key}: {source!r} has no `prompt` field (fields: {', '.join(table.column_names)})")
    reserved = sorted(set(table.column_names) & CORE_COLUMNS)
    if reserved:
        raise TokenforgeError(
            f"{key}: {source!r} uses field names tokenforge reserves for rollouts {reserved}; rename them"
        )
    for row, prompt in enumerate(table.column("prompt").to_pylist()):
        problem = check_prompt(prompt)
        if problem:
            raise TokenforgeError(f"{key}: {source!r} row {row}: the prompt {problem}")
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
