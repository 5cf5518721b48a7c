"""Rollout and eval dumps: the step's scored batch (+ the learner's columns) and each eval's greedy samples."""

import json

import pyarrow as pa
import pytest

from pipeline.batch import LEARNED_SCHEMA, ROLLOUT_SCHEMA
from pipeline.config import load_config
from pipeline.errors import TokenforgeError
from pipeline.outputs import dumps
from pipeline.storage import Storage


def metrics(run) -> dict[int, dict]:
    return {r["step"]: r for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines())}


def test_rollout_dumps_are_the_scored_batch_with_token_rewards_and_advantages(observed_run):
    storage = Storage(str(observed_run))
    assert dumps.dump_steps(storage, dumps.ROLLOUTS) == [2, 4]  # the eval steps (step 0 has no rollouts)
    step, table = dumps.read_dump(storage, dumps.ROLLOUTS, 2)
    components = ["reward/exact_match", "reward/digit_match"]
    assert table.column_names == [*ROLLOUT_SCHEMA.names, "prompt", "answer", *components, *LEARNED_SCHEMA.names]
    # 16 prompts x 4; with the default overlap (max_staleness=1) step 2's samples were generated beside step 1's
    assert table.num_rows == 16 * 4 and set(table.column("policy_version").to_pylist()) == {0}
    assert all(w.startswith("tokenforge-") and "-rollout-" in w for w in table.column("worker").to_pylist())
    for row in table.to_pylist():
        n = len(row["response_ids"])
        assert (
            n
            == len(row["behaviour_logprobs"])
            == len(row["token_rewards"])
            == len(row["advantages"])
            == len(row["response_tokens"])
        )
        # r_t = 1.0 * exact_match_t + 0.5 * digit_match_t (the default weights, no normalisation, no KL)
        expected = [e + 0.5 * d for e, d in zip(row["reward/exact_match"], row["reward/digit_match"])]
        assert row["token_rewards"] == pytest.approx(expected, abs=1e-6)
        assert row["total_reward"] == pytest.approx(sum(expected), abs=1e-6)
        assert "".join(row["response_tokens"]).startswith(row["response"])
    # the dumped batch is the one the step's metrics describe
    record = metrics(observed_run)[2]
    assert sum(table.column("total_reward").to_pylist()) / table.num_rows == pytest.approx(
        record["reward/total/mean"], abs=1e-6
    )
    zero = [all(a == 0 for a in row) for row in table.column("advantages").to_pylist()]
    assert sum(zero) / len(zero) == pytest.approx(record["advantage/zero_frac"])
    assert 0 < record["time/dump_s"] < record["time/step_s"] and "time/dump_s" not in metrics(observed_run)[1]


def test_eval_dumps_hold_each_greedy_sample_with_its_metric(observed_run):
    storage = Storage(str(observed_run))
    assert dumps.dump_steps(storage, dumps.EVAL) == [0, 2, 4]
    for step in (0, 4):
        _, table = dumps.read_dump(storage, dumps.EVAL, step)
        assert table.num_rows == 50 and {"prompt", "answer", "response", "eval/exact_match"} <= set(table.column_names)
        per_sample = table.column("eval/exact_match").to_pylist()
        assert sum(per_sample) / len(per_sample) == pytest.approx(metrics(observed_run)[step]["eval/exact_match"])
        assert [a == r for a, r in zip(table.column("answer").to_pylist(), table.column("response").to_pylist())] == [
            v == 1.0 for v in per_sample
        ]


@pytest.mark.parametrize(
    ("overrides", "steps"),
    [([], [5, 10, 12]), (["trainer.dump_rollouts_every=3"], [3, 6, 9, 12]), (["trainer.dump_rollouts_every=0"], [])],
)
def test_dump_schedule_follows_eval_by_default(overrides, steps):
    trainer = load_config(overrides=["trainer.total_steps=12", "trainer.eval_every=5", *overrides]).trainer
    assert [s for s in range(1, 13) if dumps.dumps_rollouts(trainer, s)] == steps


def test_missing_dumps_are_one_line_naming_what_exists(tmp_path):
    storage = Storage(str(tmp_path))
    with pytest.raises(
        TokenforgeError, match=r"rollouts' holds no dumps; a run writes them every trainer.dump_rollouts_every"
    ):
        dumps.read_dump(storage, dumps.ROLLOUTS)
    dumps.write_dump(storage, dumps.ROLLOUTS, 5, pa.table({"x": [1]}))
    with pytest.raises(
        TokenforgeError, match=r"rollouts/step_4.parquet' does not exist; steps with rollouts dumps: 5$"
    ):
        dumps.read_dump(storage, dumps.ROLLOUTS, 4)
    assert dumps.read_dump(storage, dumps.ROLLOUTS)[0] == 5


def test_docs_list_every_column_of_the_dump_schema():
    from pathlib import Path

    docs = (Path(__file__).parent.parent / "docs" / "observability.md").read_text()
    assert [n for n in [*ROLLOUT_SCHEMA.names, *LEARNED_SCHEMA.names] if f"| `{n}` |" not in docs] == []
