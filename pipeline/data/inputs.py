"""A run's inputs: the built-in task's defaults and the prompt datasets, checked before Ray starts
against the reward components, the chat template and the model's context length."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pyarrow as pa

from pipeline.batch import DATASET_PROMPT
from pipeline.config import TrainConfig
from pipeline.data.images import IMAGE_COLUMN, open_image, resolve_images
from pipeline.data.loading import load_prompts
from pipeline.data.prompts import encode_image_prompts, encode_prompts, set_chat_template
from pipeline.errors import TokenforgeError
from pipeline.models.hf import (
    builtin_paths,
    context_length,
    is_vision_language,
    load_processor,
    load_tokenizer,
    model_config,
)
from pipeline.rewards.components import COMPONENTS, component_options
from pipeline.storage import Storage, is_uri

DATA_FINGERPRINT = "data_fingerprint.json"  # {"data.train_file": {"source": ..., "sha256": ...}, "data.eval_file": ...}


def with_builtin_defaults(config: TrainConfig) -> TrainConfig:
    """Fill null model/data paths with the built-in task's (the resolved config names them). An `auto`
    eval file is the built-in eval set only when the training prompts are the built-in ones too."""
    config = config.model_copy(deep=True)
    model, train, evaluation = builtin_paths(config.task)
    if config.data.eval_file == "auto":
        config.data.eval_file = str(evaluation) if config.data.evaluates else None
    config.model.path = config.model.path or str(model)
    config.data.train_file = config.data.train_file or str(train)
    return config


def load_inputs(config: TrainConfig, components: list[str] | None = None) -> tuple[pa.Table, pa.Table | None]:
    """Train and eval prompts (None: data.eval_file is null), checked against the reward components (those named in
    `components`, default all), the chat template and the context length."""
    tokenizer = load_tokenizer(config.model.path, config.model.trust_remote_code)
    set_chat_template(tokenizer, config.model.chat_template)
    limit = context_length(config.model.path, config.model.trust_remote_code)
    vision = is_vision_language(model_config(config.model.path, config.model.trust_remote_code))
    processor = load_processor(config.model.path, tokenizer, config.model.trust_remote_code) if vision else None
    if config.critic is not None and config.critic.model_path:  # it reads the policy's token ids
        critic = model_config(config.critic.model_path, config.model.trust_remote_code, key="critic.model_path")
        if getattr(critic, "vocab_size", len(tokenizer)) < len(tokenizer):
            raise TokenforgeError(
                f"config key 'critic.model_path': its vocabulary ({critic.vocab_size} ids) is smaller than the "
                f"policy tokenizer's ({len(tokenizer)}); the critic reads the policy's token ids, so use a model with "
                "the policy's tokenizer"
            )
    outside = [i for i in config.rollout.stop_token_ids if not 0 <= i < len(tokenizer)]
    if outside:
        raise TokenforgeError(
            f"config key 'rollout.stop_token_ids': {outside} outside the tokenizer's vocabulary "
            f"(ids 0..{len(tokenizer) - 1}), "
            "so no response would ever stop there; use the ids of tokens it has (tokenizer.convert_tokens_to_ids)"
        )
    needed = set()
    for name, spec in config.reward.components.items():
        if components is not None and name not in components:
            continue
        needed.update(COMPONENTS[spec.type].required_columns(component_options(config, name)))
    data = config.data
    tables = []
    for key, source, split in [
        ("data.train_file", data.train_file, data.train_split),
        ("data.eval_file", data.eval_file, data.eval_split),
    ]:
        if source is None:
            tables.append(None)
            continue
        table = load_prompts(source, key, split, data.image_prompt)
        images = processor is not None and IMAGE_COLUMN in table.column_names  # a VLM's text-only data: text alone
        if images:
            table = checked_images(config, table, key, source)
        missing = sorted(needed - set(table.column_names))
        if missing:
            raise TokenforgeError(
                f"{key}: the reward components need fields {missing}, missing from the file (set the component's "
                "`column` option to use another field)"
            )
        for column in sorted(needed):  # a reference list must hold one (a metric has nothing to compare with)
            empty = next((row for row, v in enumerate(table.column(column).to_pylist()) if v == []), None)
            if empty is not None:
                raise TokenforgeError(f"{key}: row {empty}: `{column}` is an empty list; give it at least one value")
        try:
            _, ids = encode_prompts(tokenizer, table.column(DATASET_PROMPT).to_pylist(), data.add_special_tokens)
        except TokenforgeError as error:
            raise TokenforgeError(f"{key}: {error}") from None
        longest = max(range(len(ids)), key=lambda i: len(ids[i]))
        if images:  # with its image tokens (the image of the longest text stands for all)
            image = open_image(table.column(IMAGE_COLUMN)[longest].as_py(), f"{key} row {longest}")
            prompt = table.column(DATASET_PROMPT)[longest].as_py()
            ids[longest] = encode_image_prompts(processor, [prompt], [image], data.add_special_tokens)[1][0]
        if len(ids[longest]) + config.rollout.max_new_tokens > limit:
            raise TokenforgeError(
                f"{key}: prompt {longest} has {len(ids[longest])} tokens; with rollout.max_new_tokens="
                f"{config.rollout.max_new_tokens} it exceeds the model context of {limit} tokens"
            )
        tables.append(table)
    train_table, eval_table = tables
    if eval_table is not None:
        if data.max_eval_samples:
            eval_table = eval_table.slice(0, data.max_eval_samples)
        eval_table = eval_table.append_column("group_id", pa.array(range(eval_table.num_rows), pa.int64()))
    return train_table, eval_table


def checked_images(config: TrainConfig, table: pa.Table, key: str, source: str) -> pa.Table:
    """A vision-language model's prompts with images: paths resolved (against data.image_root, or the data file's
    directory) and checked to exist; what does not take images yet is one line."""
    if config.critic is not None:
        raise TokenforgeError(
            "config section 'critic': a value model for a vision-language model's images is not supported yet; use "
            "an estimator without a critic (self_critical, grpo, rloo) and no critic section"
        )
    if config.rollout.backend == "vllm":
        raise TokenforgeError(
            f"{key}: rollout.backend=vllm does not take images yet (the prompts have an `{IMAGE_COLUMN}` field); use "
            "rollout.backend=hf"
        )
    root = config.data.image_root or str(Path(source).parent if Path(source).is_file() else Path(source))
    return resolve_images(table, key, root if is_uri(root) else str(Path(root).resolve()))


def fingerprint(table: pa.Table | None) -> str | None:
    """sha256 of a prompt table's columns and rows, as one Arrow IPC stream (fast for millions of rows; the
    same loading code gives the same bytes for the same prompts)."""
    if table is None:
        return None
    sink = pa.BufferOutputStream()
    with pa.ipc.new_stream(sink, table.schema.remove_metadata()) as stream:
        stream.write_table(table.replace_schema_metadata(None).combine_chunks())
    return hashlib.sha256(sink.getvalue()).hexdigest()


def check_data_unchanged(
    storage: Storage, config: TrainConfig, train: pa.Table, evaluation: pa.Table | None, resume: bool
) -> None:
    """A new run records its prompts' fingerprints; a resumed run refuses prompts other than those it started on
    (the sampler's position would point into other data and the eval curve would change meaning)."""
    current = {
        "data.train_file": {"source": config.data.train_file, "sha256": fingerprint(train)},
        "data.eval_file": {"source": config.data.eval_file, "sha256": fingerprint(evaluation)},
    }
    if resume and storage.exists(DATA_FINGERPRINT):
        recorded = json.loads(storage.read_text(DATA_FINGERPRINT))
        for key, now in current.items():
            if recorded.get(key, {}).get("sha256") != now["sha256"]:
                raise TokenforgeError(
                    f"--resume: {key} {now['source']!r} holds other prompts than the run started on (fingerprints in "
                    f"{storage.display(DATA_FINGERPRINT)}); restore that data, start a new run (tokenforge train -c "
                    f"{storage.display('config.yaml')} output_dir=NEW), or delete {DATA_FINGERPRINT} to go on with "
                    "the new data"
                )
        return
    storage.write_text(DATA_FINGERPRINT, json.dumps(current, indent=1))
