"""A real two-node Ray cluster on this machine, started as users start one, with work sent through
the Jobs API: `ray start --head` (127.0.0.1, token auth) plus `ray start --address` advertising other
resources, then `ray job submit --working-dir .`. Stops everything it started (and only that)."""

import json
import os
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
from local_cluster import BIN, LocalCluster

REPO = Path(__file__).parent.parent


@pytest.fixture(scope="module")
def cluster():
    nodes = LocalCluster()
    try:
        # learner_slot: one learner rank per node, so a group of two spans both
        nodes.start_head(cpus=2, resources='{"head_node": 1, "learner_slot": 1}')
        nodes.add_node(cpus=1, resources='{"worker_node": 1, "learner_slot": 1}')
        yield {"env": {**nodes.env, "RAY_ADDRESS": f"http://127.0.0.1:{nodes.dashboard}"}, "dashboard": nodes.dashboard}
    finally:
        nodes.shutdown()


def submit(cluster, *command: str, timeout: int = 600) -> str:
    """`ray job submit --working-dir .`; returns the job's logs after it SUCCEEDED."""
    job_id = f"tf-{int(time.time() * 1000)}"
    ray = str(BIN / "ray")
    subprocess.run(
        [ray, "job", "submit", "--no-wait", "--submission-id", job_id, "--working-dir", str(REPO), "--", *command],
        env=cluster["env"],
        check=True,
        capture_output=True,
        cwd=REPO,
        timeout=120,
    )
    deadline = time.time() + timeout
    status = ""
    while time.time() < deadline:
        status = subprocess.run(
            [ray, "job", "status", job_id], env=cluster["env"], capture_output=True, text=True, timeout=60, check=False
        ).stdout.lower()
        if any(f"' {word}" in status for word in ("succeeded", "failed", "stopped")):  # "Job 'id' succeeded"
            break
        time.sleep(3)
    logs = subprocess.run(
        [ray, "job", "logs", job_id], env=cluster["env"], capture_output=True, text=True, timeout=60, check=False
    ).stdout
    assert f"job '{job_id}' succeeded" in status, f"{status}\n{logs[-3000:]}"
    return logs


def test_requests_without_the_token_are_refused(cluster):
    url = f"http://127.0.0.1:{cluster['dashboard']}/api/jobs/"
    with pytest.raises(urllib.error.HTTPError) as refused:
        urllib.request.urlopen(url, timeout=30)
    assert refused.value.code in (401, 403)
    token = Path(os.environ["RAY_AUTH_TOKEN_PATH"]).read_text().strip()
    with urllib.request.urlopen(
        urllib.request.Request(url, headers={"Authorization": f"Bearer {token}"}), timeout=30
    ) as ok:
        assert ok.status == 200


def test_train_job_places_actors_on_both_nodes_as_configured(cluster):
    # A relative output_dir inside a job lands under ~/tokenforge-outputs on the driver's node (the job's HOME is
    # this session's temp HOME), not in Ray's temporary unpacked copy of the working dir.
    out = Path.home() / "tokenforge-outputs" / "runs" / "e2e-train"
    logs = submit(
        cluster,
        "tokenforge",
        "train",
        "output_dir=runs/e2e-train",
        "trainer.total_steps=4",
        "trainer.eval_every=2",
        "trainer.prompts_per_step=8",
        "rollout.group_size=4",
        "data.max_eval_samples=50",
        "learner.resources={head_node: 0.5}",
        "rollout.resources_per_worker={worker_node: 0.5}",
        "rollout.num_cpus_per_worker=0.5",
        "reward.resources_per_worker={worker_node: 0.25}",
    )
    assert f"tokenforge: output_dir runs/e2e-train -> {out} " in logs
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [0, 1, 2, 3, 4] and "eval/exact_match" in records[-1]
    placement = json.loads((out / "placement.json").read_text())
    (learner,), (rollout,), (reward,) = placement["learner"], placement["rollout"], placement["reward"]
    assert rollout["node_id"] == reward["node_id"] != learner["node_id"]  # the worker node's resource vs the head's


@pytest.mark.slow  # whole runs: CI's slow step (pytest -m slow), not the README's suite
def test_a_learner_group_spans_both_nodes(cluster):
    """learner.num_workers=2 with one learner_slot per node: the placement group cannot pack the ranks on one node,
    so they form their process group across the two (gloo over TCP), train, checkpoint and evaluate."""
    out = Path.home() / "tokenforge-outputs" / "runs" / "e2e-group"
    submit(
        cluster,
        "tokenforge",
        "train",
        "output_dir=runs/e2e-group",
        "trainer.total_steps=2",
        "trainer.prompts_per_step=8",
        "rollout.group_size=4",
        "data.max_eval_samples=20",
        "learner.num_workers=2",
        "learner.num_cpus=0.25",
        "learner.resources={learner_slot: 1}",
    )
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [0, 1, 2] and "eval/exact_match" in records[-1]
    ranks = json.loads((out / "placement.json").read_text())["learner"]
    assert len({rank["node_id"] for rank in ranks}) == 2
    assert (out / "checkpoints" / "step_2" / "optimizer" / "__1_0.distcp").is_file()  # the second node's shard


def test_resubmitted_train_job_writes_beside_the_first_run(cluster):
    first = Path.home() / "tokenforge-outputs" / "runs" / "e2e-again"
    args = [
        "output_dir=runs/e2e-again",
        "trainer.total_steps=1",
        "trainer.prompts_per_step=4",
        "rollout.group_size=2",
        "data.max_eval_samples=8",
    ]
    submit(cluster, "tokenforge", "train", *args)
    logs = submit(cluster, "tokenforge", "train", *args)
    assert f"-> {first}-2 " in logs and f"{first} holds an earlier run" in logs
    for run in (first, Path(f"{first}-2")):
        assert [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()] == [0, 1]


def test_smoke_tune_job(cluster):
    # The spec's relative storage_path (tune_results) inside a job: under ~/tokenforge-outputs.
    experiment = Path.home() / "tokenforge-outputs" / "tune_results" / "smoke"
    logs = submit(cluster, "tokenforge", "tune", "tune_configs/smoke.yaml", "tune.max_concurrent_trials=1")
    rows = (experiment / "trials.csv").read_text().splitlines()
    assert len(rows) == 3 and all(r.endswith(",12,TERMINATED") for r in rows[1:]), logs[-2000:]
    assert (experiment / "best_config.yaml").is_file()
