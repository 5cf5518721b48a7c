"""The reward pool on a real local Ray: timeouts, retries, dead workers, on_error policies."""

from pathlib import Path

import pyarrow as pa
import pytest
import ray
from test_rewards import rollout_batch

from pipeline.batch import reward_column
from pipeline.config import load_config
from pipeline.driver.reward_pool import RewardPool
from pipeline.errors import TokenforgeError
from pipeline.models.hf import load_tokenizer

FNS = Path(__file__).parent / "reward_fns.py"
COMPLETIONS = ["3", "7", "17", "4", "3", "13"]


@pytest.fixture
def make_pool(ray_cluster, builtin_model_path):
    pools = []

    def make(function: str, on_error: str, workers: int = 2, timeout_s: float = 60, retries: int = 1) -> RewardPool:
        config = load_config(
            overrides=[
                f"reward.components.user={{type: python, function: '{FNS}:{function}', on_error: {on_error}}}",
                "reward.weights.user=1",
                f"reward.num_workers={workers}",
                f"reward.timeout_s={timeout_s}",
                f"reward.max_retries={retries}",
            ]
        )
        pool = RewardPool(config, builtin_model_path, run_id=f"test{len(pools)}")
        pools.append(pool)
        return pool

    yield make
    for pool in pools:
        for actor in pool.actors:
            ray.kill(actor)


@pytest.fixture
def batch(builtin_model_path):
    return rollout_batch(load_tokenizer(builtin_model_path), COMPLETIONS, ["3"] * len(COMPLETIONS))


def totals(table, name):
    return [sum(row) for row in table.column(reward_column(name)).to_pylist()]


@pytest.mark.parametrize("policy", ["zero", "drop", "raise"])
def test_a_hanging_component_times_out_and_follows_on_error(make_pool, batch, policy):
    pool = make_pool("hang", policy, timeout_s=2, retries=1)
    if policy == "raise":
        with pytest.raises(
            TokenforgeError,
            match=r"reward 'user': samples 0-2 not scored after 2 tries: no result within reward.timeout_s=2s",
        ):
            pool.score(batch, ["exact_match", "user"])
        return
    scored, dropped = pool.score(batch, ["exact_match", "user"])
    assert scored.column("sample_id").to_pylist() == list(range(6))
    assert totals(scored, "exact_match") == [1, 0, 0, 0, 1, 0]  # the healthy component is unaffected
    assert totals(scored, "user") == [0] * 6
    assert dropped.to_pylist() == [policy == "drop"] * 6
    counts = pool.take_counts()
    assert counts["reward/timeouts"] == 4  # 2 shards x (1 try + 1 retry)
    assert counts["reward/user/errors"] == 6
    assert counts.get("reward/dropped", 0) == (6 if policy == "drop" else 0)
    # the killed workers were restarted and serve the next batch
    again, _ = pool.score(batch, ["exact_match"])
    assert totals(again, "exact_match") == [1, 0, 0, 0, 1, 0]


@pytest.mark.parametrize("policy", ["zero", "drop", "raise"])
def test_a_raising_component_through_the_pool(make_pool, batch, policy):
    pool = make_pool("fail_on_seven", policy)
    if policy == "raise":
        with pytest.raises(
            TokenforgeError, match=r"reward 'user' failed on sample 1 \(prompt '1\+2='\): ValueError: no sevens"
        ):
            pool.score(batch, ["user"])
        return
    scored, dropped = pool.score(batch, ["user"])
    assert totals(scored, "user") == [1, 0, 0, 1, 1, 1]  # "7" and "17" fail
    assert dropped.to_pylist() == [False, *[policy == "drop"] * 2, False, False, False]
    assert pool.take_counts()["reward/user/errors"] == 2


def test_a_worker_that_dies_mid_batch_loses_and_double_counts_nothing(make_pool, batch, tmp_path):
    rows = list(range(batch.num_rows))
    marked = batch.append_column("marker_dir", pa.array([str(tmp_path)] * len(rows))).append_column(
        "row", pa.array(rows)
    )
    pool = make_pool("crash_once", "raise", retries=1)
    scored, dropped = pool.score(marked, ["exact_match", "user"])
    assert (tmp_path / "crashed").exists()  # a worker really died
    assert scored.num_rows == batch.num_rows and not any(dropped.to_pylist())
    assert scored.column("sample_id").to_pylist() == batch.column("sample_id").to_pylist()
    assert totals(scored, "user") == [1] * 6
    assert sorted(map(int, (tmp_path / "scored").read_text().split())) == rows  # every sample scored exactly once
    assert totals(scored, "exact_match") == [1, 0, 0, 0, 1, 0]
    counts = pool.take_counts()
    assert counts.get("reward/resubmits", 0) + counts.get("reward/worker_deaths", 0) >= 1


def test_a_piece_is_scored_as_soon_as_it_arrives(make_pool, batch, tmp_path):
    """score_pieces: the pieces of a batch (rollout shards, as each is generated) are scored as they arrive, not
    once the last has, and the result is in piece order whatever order they came in."""
    import time

    rows = list(range(batch.num_rows))
    marked = batch.append_column("marker_dir", pa.array([str(tmp_path)] * len(rows))).append_column(
        "row", pa.array(rows)
    )
    pool = make_pool("log_scoring", "raise", workers=2)
    pool.score(marked.slice(0, 1), ["user"])  # the workers are up
    (tmp_path / "scored").unlink()
    arrivals = {}

    def pieces():  # the second half first, the first half 3 s later
        for index, start in ((1, 3), (0, 0)):
            arrivals[index] = time.time()
            yield index, marked.slice(start, 3)
            time.sleep(3)

    scored, _ = pool.score_pieces(pieces(), 2, ["user"])
    started = {
        int(row): float(t) for row, t in (line.split() for line in (tmp_path / "scored").read_text().splitlines())
    }
    assert started[3] < arrivals[0]  # the piece that came first was scored while the other was awaited
    assert scored.column("row").to_pylist() == rows and totals(scored, "user") == [1.0] * 6
