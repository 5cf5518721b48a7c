"""Prompt files and the seeded, resumable prompt sampler."""

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline.data import PromptSampler, load_prompts
from pipeline.errors import TokenforgeError
from pipeline.models import BUILTIN_EVAL, BUILTIN_TRAIN


def test_builtin_task_files():
    train, evaluation = load_prompts(BUILTIN_TRAIN, "data.train_file"), load_prompts(BUILTIN_EVAL, "data.eval_file")
    assert train.num_rows == 9000 and evaluation.num_rows == 1000
    assert not set(train.column("prompt").to_pylist()) & set(evaluation.column("prompt").to_pylist())
    row = evaluation.slice(0, 1).to_pylist()[0]
    a, b = row["prompt"].rstrip("=").split("+")
    assert int(row["answer"]) == int(a) + int(b)


def test_parquet_and_unknown_suffix(tmp_path):
    pq.write_table(pa.table({"prompt": ["1+1="], "answer": ["2"]}), tmp_path / "p.parquet")
    assert load_prompts(tmp_path / "p.parquet", "data.train_file").column("answer").to_pylist() == ["2"]
    (tmp_path / "p.csv").write_text("prompt\n1+1=\n")
    with pytest.raises(TokenforgeError, match="data.train_file: .*p.csv' must be one of .jsonl, .json, .parquet"):
        load_prompts(tmp_path / "p.csv", "data.train_file")
    pq.write_table(pa.table({"prompt": ["1+1="], "group_id": [3]}), tmp_path / "r.parquet")
    with pytest.raises(TokenforgeError, match=r"reserved field names \['group_id'\]"):
        load_prompts(tmp_path / "r.parquet", "data.train_file")


def test_sampler_covers_each_epoch_once_and_resumes_exactly():
    table = pa.table({"prompt": [f"p{i}" for i in range(10)]})
    sampler = PromptSampler(table, batch_size=4, seed=7)
    batches = [sampler.next_batch(first_group_id=4 * k) for k in range(5)]  # 20 prompts = 2 epochs
    drawn = [p for b in batches for p in b.column("prompt").to_pylist()]
    assert sorted(drawn[:10]) == sorted(drawn[10:]) == sorted(table.column("prompt").to_pylist())
    assert drawn[:10] != drawn[10:]  # each epoch has its own order
    assert batches[1].column("group_id").to_pylist() == [4, 5, 6, 7]

    replay = PromptSampler(table, batch_size=4, seed=7)
    replay.next_batch(0)
    resumed = PromptSampler(table, batch_size=4, seed=7)
    resumed.load_state(replay.state())
    assert resumed.next_batch(4).equals(batches[1])
