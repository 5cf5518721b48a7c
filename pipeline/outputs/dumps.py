"""Rollout and eval dumps: what the model generated and what it earned, as Parquet in the run's storage.

- `rollouts/step_N.parquet`: the step's scored rollout batch (pipeline.batch: ROLLOUT_SCHEMA, the
  dataset's columns, one `reward/<component>` list per component) with the learner's LEARNED_SCHEMA
  columns appended (per-token total reward, its sum, per-token advantages, decoded tokens). Written
  every `trainer.dump_rollouts_every` steps (default: every eval step).
- `eval/step_N.parquet`: each eval's greedy samples, scored (the same batch schema, group_size 1), with
  one `eval/<metric>` float per sample (the sum of the metric's token rewards, whose mean is the
  step's eval/<metric>). Written on every eval step unless `trainer.dump_eval` is off.

Both are written whole through the run's Storage (local or a URI), so a reader never sees half a file.
docs/observability.md lists every column.
"""

from __future__ import annotations

import re

import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.batch import LEARNED_SCHEMA, reward_column
from pipeline.config import TrainerConfig
from pipeline.errors import TokenforgeError
from pipeline.storage import Storage

ROLLOUTS = "rollouts"
EVAL = "eval"
DUMP_FILE = re.compile(r"^step_(\d+)\.parquet$")


def dump_path(kind: str, step: int) -> str:
    return f"{kind}/step_{step}.parquet"


def dumps_rollouts(trainer: TrainerConfig, step: int) -> bool:
    """Whether step `step` (>= 1) writes its rollout batch: every dump_rollouts_every steps (null: the
    eval steps, i.e. every eval_every and the last; 0: never)."""
    every = trainer.eval_every if trainer.dump_rollouts_every is None else trainer.dump_rollouts_every
    return every > 0 and (step % every == 0 or step == trainer.total_steps)


def rollout_dump(scored: pa.Table, learned: pa.Table) -> pa.Table:
    """The scored batch with the learner's columns (row-aligned) appended."""
    if learned.num_rows != scored.num_rows or learned.schema != LEARNED_SCHEMA:
        raise ValueError(f"learned columns ({learned.num_rows} rows) do not match the batch ({scored.num_rows} rows)")
    for name in LEARNED_SCHEMA.names:
        scored = scored.append_column(name, learned.column(name))
    return scored


def eval_dump(scored: pa.Table, metrics: list[str]) -> pa.Table:
    """The scored greedy eval samples with eval/<metric> = the sum of the metric's token rewards per sample."""
    for name in metrics:
        sums = [sum(row) if row is not None else None for row in scored.column(reward_column(name)).to_pylist()]
        scored = scored.append_column(f"eval/{name}", pa.array(sums, pa.float64()))  # None: not applicable
    return scored


def write_dump(storage: Storage, kind: str, step: int, table: pa.Table) -> None:
    """One Parquet file, written whole (zstd)."""
    buffer = pa.BufferOutputStream()
    pq.write_table(table, buffer, compression="zstd")
    storage.write_bytes(dump_path(kind, step), buffer.getvalue().to_pybytes())


def dump_steps(storage: Storage, kind: str) -> list[int]:
    """Steps with a dump of `kind`, ascending."""
    return sorted(int(m.group(1)) for name in storage.list_dir(kind) if (m := DUMP_FILE.match(name)))


def read_dump(storage: Storage, kind: str, step: int | None = None) -> tuple[int, pa.Table]:
    """(step, table) of the dump at `step` (None: the latest); a missing one is an error saying what exists."""
    steps = dump_steps(storage, kind)
    if not steps:
        raise TokenforgeError(
            f"{storage.display(kind)!r} holds no dumps; a run writes them every trainer.dump_rollouts_every steps "
            "(rollouts) and at each eval (eval)"
        )
    if step is None:
        step = steps[-1]
    elif step not in steps:
        raise TokenforgeError(
            f"{storage.display(dump_path(kind, step))!r} does not exist; steps with {kind} dumps: "
            + ", ".join(map(str, steps))
        )
    return step, pq.read_table(pa.BufferReader(storage.read_bytes(dump_path(kind, step))))
