"""The rollout batch: one pyarrow Table per step. This module is its only schema definition.

Rows are samples. Core columns are below; the prompt's own dataset columns ride along unchanged
(`prompt` itself, text or a conversation, and e.g. `answer`, `completion`), reward scoring adds
one `reward/<component>` column per component holding one float per response token, and the
learner's per-token rewards and advantages (LEARNED_SCHEMA) complete it in the rollout dumps.
"""

from __future__ import annotations

from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import torch

ROLLOUT_SCHEMA = pa.schema(
    [
        ("sample_id", pa.int64()),  # unique within the step: group_id * group_size + k
        ("group_id", pa.int64()),  # samples of the same prompt share it
        ("prompt_text", pa.string()),  # the prompt as the model saw it (a conversation rendered by its chat template)
        ("prompt_ids", pa.list_(pa.int32())),
        ("response_ids", pa.list_(pa.int32())),  # generated tokens, EOS included when emitted
        ("behaviour_logprobs", pa.list_(pa.float32())),  # log pi_behaviour of each response token
        ("response", pa.string()),  # decoded response, special tokens removed
        ("finished", pa.bool_()),  # ended with EOS (False = cut at max_new_tokens)
        ("policy_version", pa.int64()),  # learner update count of the weights that sampled it
        ("worker", pa.string()),  # the rollout worker that sampled it (its Ray actor name; "local" outside Ray)
        # the greedy response of its prompt, decoded for the self_critical estimator's baseline: scored, never
        # trained on (sample_id -1 - group_id)
        ("greedy_baseline", pa.bool_()),
    ]
)
CORE_COLUMNS = frozenset(ROLLOUT_SCHEMA.names)
# What the learner computed from a scored batch, row-aligned with it (Learner.learned_columns): the
# rollout dumps (pipeline/outputs/dumps.py) are the scored batch with these columns appended.
LEARNED_SCHEMA = pa.schema(
    [
        (
            "token_rewards",
            pa.list_(pa.float32()),
        ),  # r_t = sum_i w_i * norm_i(r_i)_t (- beta * KL_t), per response token
        ("total_reward", pa.float64()),  # sum_t r_t
        ("advantages", pa.list_(pa.float32())),  # A_t of the advantage estimator, per response token
        ("response_tokens", pa.list_(pa.string())),  # each response token decoded on its own
    ]
)
REWARD_PREFIX = "reward/"
TOKEN_REWARD_TYPE = pa.list_(pa.float32())


def reward_column(component: str) -> str:
    return f"{REWARD_PREFIX}{component}"


DATASET_PROMPT = "prompt"  # the dataset's prompt column (text, or a list of {role, content} messages)


def is_conversation(prompt: Any) -> bool:
    return isinstance(prompt, list)


def metadata_columns(table: pa.Table) -> list[str]:
    """The dataset's own columns carried through (everything not core, learned or a reward), `prompt` included."""
    return [
        n
        for n in table.column_names
        if n not in CORE_COLUMNS and n not in LEARNED_SCHEMA.names and not n.startswith(REWARD_PREFIX)
    ]


def make_rollout_table(core: dict[str, list], metadata: pa.Table) -> pa.Table:
    """Core columns (validated against ROLLOUT_SCHEMA) + the prompt rows' metadata, row-aligned."""
    table = pa.Table.from_pydict(core, schema=ROLLOUT_SCHEMA)
    for name in metadata.column_names:
        if name not in CORE_COLUMNS:
            table = table.append_column(name, metadata.column(name))
    return table


def greedy_baselines(table: pa.Table) -> torch.Tensor:
    """(batch,) bool: the rows that are greedy baselines (self_critical), not samples."""
    return torch.tensor(table.column("greedy_baseline").to_pylist(), dtype=torch.bool)


def sampled_rows(table: pa.Table) -> pa.Table:
    """The samples of a rollout batch, without its greedy baselines (a dump written before they existed: all)."""
    if "greedy_baseline" not in table.column_names:
        return table
    return table.filter(pc.invert(table.column("greedy_baseline")))


def pad_right(
    rows: list[list], value: float = 0, dtype: torch.dtype = torch.float32, width: int | None = None
) -> torch.Tensor:
    """Ragged rows -> (batch, width) tensor padded on the right with `value` (width: the longest row's by default)."""
    width = max((len(r) for r in rows), default=0) if width is None else width
    out = torch.full((len(rows), width), value, dtype=dtype)
    for i, row in enumerate(rows):
        out[i, : len(row)] = torch.as_tensor(row, dtype=dtype)
    return out


def response_mask(table: pa.Table) -> torch.Tensor:
    """(batch, max_response_len) float mask of valid response tokens."""
    lengths = torch.as_tensor(pc.list_value_length(table.column("response_ids")).to_numpy().astype("int64"))
    width = int(lengths.max()) if len(lengths) else 0
    return (torch.arange(width) < lengths[:, None]).to(torch.float32)


def mean_reward(table: pa.Table, component: str) -> float:
    """Mean over the samples it applies to of a component's total reward (sum over the sample's tokens)."""
    sums = [sum(row) for row in table.column(reward_column(component)).to_pylist() if row is not None]
    return sum(sums) / len(sums) if sums else 0.0
