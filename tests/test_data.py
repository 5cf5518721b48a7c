"""Prompt files and the seeded, resumable prompt sampler."""

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline.data.loading import PromptSampler, load_prompts
from pipeline.errors import TokenforgeError
from pipeline.models.hf import BUILTIN_EVAL, BUILTIN_TRAIN


def test_builtin_task_files():
    train, evaluation = load_prompts(BUILTIN_TRAIN, "data.train_file"), load_prompts(BUILTIN_EVAL, "data.eval_file")
    assert train.num_rows == 9000 and evaluation.num_rows == 1000
    assert not set(train.column("prompt").to_pylist()) & set(evaluation.column("prompt").to_pylist())
    row = evaluation.slice(0, 1).to_pylist()[0]
    a, b = row["prompt"].rstrip("=").split("+")
    assert int(row["answer"]) == int(a) + int(b)


ROWS = [{"prompt": "1+1=", "answer": "2"}, {"prompt": "2+3=", "answer": "5"}]


def test_every_source_form_loads_the_same_rows(tmp_path):
    """.jsonl / .json / .parquet / .csv files, a save_to_disk directory (Dataset and DatasetDict), a
    directory of parquet shards, and a local dataset repository through datasets.load_dataset."""
    import datasets

    table = pa.Table.from_pylist(ROWS)
    (tmp_path / "p.jsonl").write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    (tmp_path / "p.json").write_text(json.dumps(ROWS))
    pq.write_table(table, tmp_path / "p.parquet")
    (tmp_path / "p.csv").write_text("prompt,answer\n1+1=,2\n2+3=,5\n")
    datasets.Dataset.from_list(ROWS).save_to_disk(str(tmp_path / "saved"))
    datasets.DatasetDict(
        {"train": datasets.Dataset.from_list(ROWS[:1]), "test": datasets.Dataset.from_list(ROWS)}
    ).save_to_disk(str(tmp_path / "saved_dict"))
    (tmp_path / "shards").mkdir()
    pq.write_table(table.slice(0, 1), tmp_path / "shards" / "part-0.parquet")
    pq.write_table(table.slice(1, 1), tmp_path / "shards" / "part-1.parquet")
    repo = tmp_path / "repo"  # a dataset repository as on the hub: a card naming its splits' files
    (repo / "data").mkdir(parents=True)
    (repo / "README.md").write_text(
        "---\nconfigs:\n- config_name: default\n  data_files:\n  - split: train\n    path: data/train.jsonl\n"
        "  - split: test\n    path: data/test.jsonl\n---\n"
    )
    (repo / "data" / "train.jsonl").write_text(json.dumps(ROWS[0]) + "\n")
    (repo / "data" / "test.jsonl").write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    for source in ("p.jsonl", "p.json", "p.parquet", "p.csv", "saved", "shards", "saved_dict", "repo"):
        loaded = load_prompts(tmp_path / source, "data.eval_file", split="test").to_pylist()
        assert [{"prompt": r["prompt"], "answer": str(r["answer"])} for r in loaded] == ROWS, source  # csv infers ints
    assert load_prompts(tmp_path / "repo", "data.train_file", split="train").num_rows == 1


def test_trl_formats_load_as_they_are(tmp_path):
    """TRL's prompt-completion format keeps its `completion` column; conversational prompts stay messages."""
    rows = [{"prompt": [{"role": "user", "content": "1+1="}], "completion": [{"role": "assistant", "content": "2"}]}]
    (tmp_path / "chat.jsonl").write_text(json.dumps(rows[0]) + "\n")
    assert load_prompts(tmp_path / "chat.jsonl", "data.train_file").to_pylist() == rows


def test_unreadable_sources_are_one_line_errors(tmp_path):
    (tmp_path / "p.txt").write_text("1+1=\n")
    with pytest.raises(
        TokenforgeError,
        match="data.train_file: cannot read .*p.txt'.*a file must be one of .jsonl, .json, .parquet, .csv",
    ):
        load_prompts(tmp_path / "p.txt", "data.train_file")
    with pytest.raises(TokenforgeError, match="data.train_file: '.*missing.jsonl' does not exist"):
        load_prompts(tmp_path / "missing.jsonl", "data.train_file")
    pq.write_table(pa.table({"prompt": ["1+1="], "group_id": [3]}), tmp_path / "r.parquet")
    with pytest.raises(TokenforgeError, match=r"field names tokenforge reserves for rollouts \['group_id'\]"):
        load_prompts(tmp_path / "r.parquet", "data.train_file")
    (tmp_path / "empty.jsonl").write_text("")
    with pytest.raises(TokenforgeError, match="data.train_file: cannot read '.*empty.jsonl': "):
        load_prompts(tmp_path / "empty.jsonl", "data.train_file")


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
