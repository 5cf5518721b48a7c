"""Faults caused for real on a real local Ray: SIGKILL of a rollout worker, a reward worker, the learner
and the driver; a full and a read-only disk under the run directory. Each run must finish (or stop
with one line) with every planned step exactly once and nothing half-written ever loaded."""

import json
import os
import random
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import ray
import torch
from safetensors.torch import load_file

from pipeline.config import load_config
from pipeline.driver.trainer import train

pytestmark = pytest.mark.slow  # minutes of real faults: CI runs them as their own step (pytest -m slow)

REPO = Path(__file__).parent.parent
TINY = [  # a short synchronous run that checkpoints often (the overlapped runs add STALE)
    "trainer.max_staleness=0",
    "trainer.total_steps=8",
    "trainer.eval_every=4",
    "trainer.save_every=2",
    "trainer.prompts_per_step=8",
    "rollout.group_size=4",
    "data.max_eval_samples=20",
    "trainer.keep_checkpoints=null",
]


def records(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def final_weights(out: Path) -> dict[str, torch.Tensor]:
    return load_file(out / "checkpoints" / "step_8" / "model.safetensors")


def kill_when(out: Path, role: str, at_step: int, index: int = 0, sig=signal.SIGKILL) -> threading.Thread:
    """A thread that SIGKILLs (or sends `sig` to) the process of this run's `role` actor `index` once metrics.jsonl
    reaches `at_step`."""

    before = set(ray.util.list_named_actors())  # actors of earlier runs still being torn down

    def run() -> None:
        deadline = time.time() + 300
        while time.time() < deadline:
            if (out / "metrics.jsonl").exists() and any(r["step"] >= at_step for r in records(out)):
                break
            time.sleep(0.2)
        (name,) = [n for n in set(ray.util.list_named_actors()) - before if n.endswith(f"-{role}-{index}")]
        pid = ray.get(ray.get_actor(name).__ray_call__.remote(lambda _: os.getpid()))
        os.kill(pid, sig)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread


@pytest.fixture(scope="module")
def straight(ray_cluster, tmp_path_factory) -> Path:
    """The same run without faults: every faulted run must end with exactly its weights."""
    out = tmp_path_factory.mktemp("straight")
    train(load_config(overrides=[*TINY, f"output_dir={out}"]))
    return out


# overlapped steps: the rollouts of step s+1 come from the weights of step s-1, except after a checkpoint
STALE = ["trainer.max_staleness=1", "algorithm.is_cap=2.0"]


@pytest.fixture(scope="module")
def straight_stale(ray_cluster, tmp_path_factory) -> Path:
    """The run that the driver-kill test at max_staleness=1 must reproduce (a checkpoint every step, as it has)."""
    out = tmp_path_factory.mktemp("straight_stale")
    train(load_config(overrides=[*TINY, *STALE, "trainer.save_every=1", f"output_dir={out}"]))
    return out


def learning_metrics(out: Path) -> list[dict]:
    """Each step's reward/*, loss/* and policy/* metrics: what a resumed run must reproduce exactly."""
    return [{k: v for k, v in r.items() if k.split("/")[0] in ("reward", "loss", "policy")} for r in records(out)]


@pytest.mark.parametrize(
    ("role", "sync"), [("rollout", "object_store"), ("reward", "object_store"), ("rollout", "collective")]
)
def test_a_killed_worker_is_restarted_and_the_step_completes_with_every_sample(straight, tmp_path, role, sync):
    """With rollout.weight_sync=collective the restarted worker is not in the broadcast group: it gets the
    weights through the object store and the group is formed again with it."""
    out = tmp_path / "run"
    killer = kill_when(out, role, at_step=3)
    train(load_config(overrides=[*TINY, f"output_dir={out}", f"rollout.weight_sync={sync}"]))
    killer.join(timeout=5)
    lines = records(out)
    assert [r["step"] for r in lines] == list(range(9))
    assert all(r["rollout/samples"] == 32 for r in lines[1:])  # 8 prompts x 4 samples, every step
    faults = sum(
        r.get("fault/rollout_restarts", 0) + r.get("reward/worker_deaths", 0) + r.get("reward/resubmits", 0)
        for r in lines
    )
    assert faults >= 1
    torch.testing.assert_close(
        final_weights(out), final_weights(straight), rtol=0, atol=1e-6
    )  # nothing lost or doubled


def test_a_killed_learner_restarts_the_pipeline_from_the_last_checkpoint(straight, tmp_path, capsys):
    out = tmp_path / "run"
    killer = kill_when(out, "learner", at_step=5)
    train(load_config(overrides=[*TINY, f"output_dir={out}"]))
    killer.join(timeout=5)
    assert "failure 1 of at most 3" in capsys.readouterr().out
    assert [r["step"] for r in records(out)] == list(range(9))  # steps after step 4's checkpoint redone, once
    torch.testing.assert_close(final_weights(out), final_weights(straight), rtol=0, atol=1e-6)


GROUP = ["learner.num_workers=2", "learner.num_cpus=0.5"]


def test_a_killed_learner_rank_restarts_the_group_from_the_last_checkpoint(ray_cluster, tmp_path, capsys):
    """learner.num_workers=2: rank 1's death fails the step at once (rank 0 waits for it in a collective), and the
    run goes on from its last checkpoint with a new group, to the weights of a run without the fault."""
    straight = tmp_path / "straight"
    train(load_config(overrides=[*TINY, *GROUP, f"output_dir={straight}"]))
    out = tmp_path / "run"
    killer = kill_when(out, "learner", at_step=5, index=1)
    started = time.monotonic()
    train(load_config(overrides=[*TINY, *GROUP, f"output_dir={out}"]))
    killer.join(timeout=5)
    assert time.monotonic() - started < 120  # not held until a collective's timeout (trainer.actor_timeout_s)
    assert "failure 1 of at most 3" in capsys.readouterr().out
    assert [r["step"] for r in records(out)] == list(range(9))  # steps after step 4's checkpoint redone, once
    torch.testing.assert_close(final_weights(out), final_weights(straight), rtol=0, atol=1e-6)


def test_a_hung_learner_rank_is_one_line_naming_the_waiting_rank_and_the_run_goes_on(ray_cluster, tmp_path, capsys):
    """SIGSTOP rank 1 (a rank that hangs, not one that dies): rank 0 gives up in its collective after 0.9 x
    trainer.actor_timeout_s, which fails the step with one line naming it and its node, before the driver's own
    timeout; the stopped process is killed with the pipeline and the run ends from its last checkpoint."""
    out = tmp_path / "run"
    killer = kill_when(out, "learner", at_step=3, index=1, sig=signal.SIGSTOP)
    train(load_config(overrides=[*TINY, *GROUP, "trainer.actor_timeout_s=20", f"output_dir={out}"]))
    killer.join(timeout=5)
    failure = next(line for line in capsys.readouterr().out.splitlines() if "failure 1 of at most 3" in line)
    # the collective may be the gather that publishes the weights: its error then reaches the driver through the
    # rollout call that takes them, which the line names first ("rollout: CollectiveTimeout: learner rank 0 ...")
    assert re.search(
        r"(learner|rollout): CollectiveTimeout: learner rank 0 of 2 on [0-9.]+ waited 18s in a collective", failure
    )
    assert [r["step"] for r in records(out)] == list(range(9))


def test_a_killed_critic_actor_restarts_the_pipeline_from_the_last_checkpoint(ray_cluster, tmp_path, capsys):
    """critic.placement=actor (the default): the learner's step fails on the lost critic, and the run goes on from
    its last checkpoint (the critic's files included) with a new learner and critic."""
    out = tmp_path / "run"
    killer = kill_when(out, "critic", at_step=3)
    critic = ["algorithm.estimator=gae", "algorithm.loss=ppo_clip"]  # critic.placement=actor, the default
    train(load_config(overrides=[*TINY, *critic, f"output_dir={out}"]))
    killer.join(timeout=5)
    failure = next(line for line in capsys.readouterr().out.splitlines() if "failure 1 of at most 3" in line)
    assert "ActorDiedError" in failure and "\x1b" not in failure  # the learner's call on its dead critic, uncoloured
    lines = records(out)
    assert [r["step"] for r in lines] == list(range(9))  # steps after the last checkpoint redone, once
    assert all("critic/value_loss" in r for r in lines[1:])
    assert (out / "checkpoints" / "step_8" / "critic" / "critic_state.pt").is_file()


def driver(out: Path, address: str, *extra: str) -> subprocess.Popen:
    """`tokenforge train` of the TINY run into `out` (then `extra` overrides), or `extra` = ("--resume", ...)."""
    resuming = extra[:1] == ("--resume",)
    command = [
        sys.executable,
        "-m",
        "pipeline.cli",
        "train",
        *([] if resuming else [*TINY, f"output_dir={out}"]),
        *extra,
    ]
    env = {**os.environ, "RAY_ADDRESS": address, "PYTHONUNBUFFERED": "1"}
    return subprocess.Popen(command, env=env, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def unpublished(out: Path) -> set[str]:
    root = out / "checkpoints"
    return {p.name for p in root.glob("step_*") if not (p / "MANIFEST.json").exists()} if root.is_dir() else set()


@pytest.mark.parametrize(("seed", "overlap"), [(0, []), (1, []), (0, STALE)], ids=["sync-0", "sync-1", "staleness1-0"])
def test_a_driver_sigkilled_at_random_moments_resumes_exactly(request, ray_cluster, tmp_path, seed, overlap):
    """SIGKILL the driver at a random moment, resume, SIGKILL it again inside a checkpoint's publication (a
    checkpoint directory without its manifest yet), resume to the end: every step exactly once, the straight
    run's weights and per-step reward/loss/policy metrics, and the checkpoint that was cut short never loaded
    (and deleted). With overlap (max_staleness=1) the straight run checkpoints every step too: a checkpoint is
    a synchronisation point of the rollout queue."""
    straight = request.getfixturevalue("straight_stale" if overlap else "straight")
    rng = random.Random(seed)
    out, address = tmp_path / "run", ray_cluster.get_runtime_context().gcs_address
    # a checkpoint every step: the more publications, the more windows to be killed in (same weights)
    process, logs, cut_short, left = driver(out, address, *overlap, "trainer.save_every=1"), [], set(), set()
    for kill in range(2):  # once at a random moment, then once inside publication
        if kill == 1:  # wait for a save in progress (not one the first kill left behind), then kill it there
            deadline = time.time() + 60
            while not unpublished(out) - left and process.poll() is None and time.time() < deadline:
                pass  # no sleep: a publication on a fast disk takes milliseconds
            cut_short = unpublished(out) - left
        else:  # a random moment in the run's first half, counted in steps (seconds differ between machines)
            lines, metrics = rng.randint(1, 4), out / "metrics.jsonl"  # lines: step 0 (the first eval), 1, ...
            while process.poll() is None and not (metrics.exists() and metrics.read_text().count("\n") >= lines):
                time.sleep(0.005)
        if process.poll() is not None:
            break
        process.send_signal(signal.SIGKILL)
        logs.append(process.communicate()[0])
        left = unpublished(out)
        process = driver(out, address, "--resume", str(out))
    log = process.communicate(timeout=300)[0]
    logs.append(log)
    assert len(logs) >= 3 and cut_short, "the driver was not killed inside a checkpoint's publication"
    resumed = re.search(r"resuming .* from (checkpoints/step_\d+|step 0)", logs[2])  # the start after that kill
    assert resumed and resumed.group(1).split("/")[-1] not in cut_short  # never the checkpoint cut short
    assert process.returncode == 0, log[-3000:]
    if overlap:  # a resume from step 0 has no steps in flight: seed 0 kills after step 3's line, past checkpoint 2
        assert re.search(r"resuming .* from checkpoints/step_[1-9]", logs[1]), logs[1][-3000:]
    assert [r["step"] for r in records(out)] == list(range(9))
    assert learning_metrics(out) == learning_metrics(straight)
    torch.testing.assert_close(final_weights(out), final_weights(straight), rtol=0, atol=0)
    assert not unpublished(out)  # the resume deleted what a kill cut short


def test_ctrl_c_is_one_line_with_the_resume_command(ray_cluster, tmp_path):
    """SIGINT (Ctrl-C) of the driver mid-run: no traceback, one line naming the --resume command, exit 2."""
    out = tmp_path / "run"
    # 1,000 steps: the TINY run's 8 took ~1 s on a quiet machine, so the signal could arrive after the end
    process = driver(
        out, ray_cluster.get_runtime_context().gcs_address, "trainer.total_steps=1000", "trainer.save_every=1000"
    )
    while not (out / "metrics.jsonl").exists() and process.poll() is None:
        time.sleep(0.05)
    process.send_signal(signal.SIGINT)
    log = process.communicate(timeout=60)[0]
    assert process.returncode == 2, log[-3000:]
    assert records(out)[-1]["step"] < 1000  # stopped mid-run
    assert (
        f"tokenforge: error: interrupted; continue from the last checkpoint with: tokenforge train --resume {out}"
        in log
    )
    assert "Traceback" not in log


def train_over_a_tmpfs(
    mount_at: Path, options: str, out: Path, overrides: list[str] = (), extra_env: dict[str, str] | None = None
) -> subprocess.CompletedProcess:
    """A tiny `tokenforge train` into `out`, its process in a private mount namespace where a tmpfs mounted
    with `options` (size=200k, ro) covers `mount_at`; skips where mount namespaces are not allowed."""
    if subprocess.run(["unshare", "--mount", "true"], capture_output=True).returncode != 0:
        pytest.skip("needs mount namespaces (unshare --mount) to mount a small tmpfs")
    script = (
        f"mount -t tmpfs -o {options} tmpfs {mount_at} && exec {sys.executable} -m pipeline.cli train "
        f"output_dir={out} {' '.join([*TINY, 'ray.num_cpus=2', *overrides])}"
    )
    env = {**os.environ, "PYTHONUNBUFFERED": "1", **(extra_env or {})}
    env.pop("RAY_ADDRESS", None)
    command = ["unshare", "--mount", "--propagation", "private", "bash", "-c", script]
    return subprocess.run(command, capture_output=True, text=True, timeout=300, cwd=REPO, env=env)


def test_a_full_or_read_only_disk_is_one_line_naming_the_run(tmp_path):
    """A 200 KiB tmpfs (the first checkpoint does not fit) and a read-only one, each mounted over the run
    directory in a private mount namespace of the driver's process."""
    for options, reason in (("size=200k", "no space left"), ("ro", "read-only file system")):
        out = tmp_path / options.replace("=", "")
        out.mkdir()
        result = train_over_a_tmpfs(out, options, out)
        assert result.returncode == 2, result.stderr[-2000:]
        last = result.stderr.strip().splitlines()[-1]
        assert last.startswith("tokenforge: error: ") and f"storage '{out}/" in last and reason in last, result.stderr[
            -2000:
        ]


def test_ctrl_c_while_waiting_for_a_gpu_is_one_line(ray_cluster, tmp_path):
    """learner.num_gpus null on a cluster without GPUs, told to wait for the autoscaler: SIGINT during the wait."""
    out, address = tmp_path / "run", ray_cluster.get_runtime_context().gcs_address
    process = driver(out, address, "ray.autoscale_wait_s=600")
    log = ""
    while "waiting up to 600s for the autoscaler to start a GPU node" not in log:
        line = process.stdout.readline()
        assert line, log + process.communicate()[0]
        log += line
    process.send_signal(signal.SIGINT)
    log += process.communicate(timeout=60)[0]
    assert process.returncode == 2, log[-3000:]
    assert (
        f"tokenforge: error: interrupted; continue from the last checkpoint with: tokenforge train --resume {out}"
        in log
    )
    assert "Traceback" not in log


def test_a_learner_failing_on_a_full_tmp_counts_against_max_failures(tmp_path):
    """The learner's scratch copy of its checkpoint fills a 200 KiB tmpfs (TMPDIR): an OSError in the actor, not a
    storage error. Each attempt restarts the pipeline, and once trainer.max_failures is spent the run ends in one
    line."""
    scratch, out = tmp_path / "scratch", tmp_path / "run"
    scratch.mkdir()
    result = train_over_a_tmpfs(
        scratch, "size=200k", out, ["trainer.max_failures=1"], {"TMPDIR": str(scratch), "RAY_TMPDIR": "/tmp"}
    )
    assert result.returncode == 2, result.stdout[-2000:] + result.stderr[-3000:]
    assert "failure 1 of at most 1 (ActorFailed: learner: " in result.stdout, (
        result.stdout[-2000:] + result.stderr[-3000:]
    )
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith(
        "tokenforge: error: the run failed 2 times (trainer.max_failures=1), last: ActorFailed: learner: "
    ), last
    assert (
        "No space left on device" in last
        and f"tokenforge train --resume {out}" in last
        and "Traceback" not in result.stderr
    )
