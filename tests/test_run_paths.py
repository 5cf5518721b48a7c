"""Relative output paths: the current directory on a laptop; under ~/tokenforge-outputs (or
$TOKENFORGE_OUTPUT_ROOT) inside a Ray job, with a fresh name when an earlier run holds the path.
The job environment is built the way Ray's JobSupervisor builds it (same variable, same JSON keys);
tests/test_cluster_e2e.py checks the same through a real `ray job submit --working-dir`."""

import json
from pathlib import Path

import pytest
from ray._private.runtime_env.constants import RAY_JOB_CONFIG_JSON_ENV_VAR
from ray.dashboard.modules.job.common import JOB_ID_METADATA_KEY

from pipeline import run_paths
from pipeline.cli import main


def holds_run(path: Path) -> bool:
    return (path / "metrics.jsonl").exists()


@pytest.fixture
def job_env(monkeypatch, tmp_path):
    """This process looks like the driver of Ray job 'raysubmit_abc' on a node whose HOME is tmp_path/home."""
    home = tmp_path / "home"
    home.mkdir()
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.delenv(run_paths.OUTPUT_ROOT_ENV, raising=False)
    job_config = {
        "runtime_env": {"working_dir": "gcs://_ray_pkg_0123.zip"},
        "metadata": {JOB_ID_METADATA_KEY: "raysubmit_abc"},
    }
    monkeypatch.setenv(RAY_JOB_CONFIG_JSON_ENV_VAR, json.dumps(job_config))
    monkeypatch.chdir(tmp_path)  # stands for Ray's unpacked working_dir copy
    return home


def test_ray_sets_the_variable_we_read():
    assert run_paths.RAY_JOB_ENV == RAY_JOB_CONFIG_JSON_ENV_VAR


def test_outside_a_job_relative_paths_stay_relative(monkeypatch, tmp_path):
    monkeypatch.delenv(RAY_JOB_CONFIG_JSON_ENV_VAR, raising=False)
    monkeypatch.delenv(run_paths.OUTPUT_ROOT_ENV, raising=False)
    monkeypatch.chdir(tmp_path)
    (tmp_path / "runs" / "default").mkdir(parents=True)
    (tmp_path / "runs" / "default" / "metrics.jsonl").write_text("{}\n")
    assert run_paths.ray_job_submission_id() is None and run_paths.output_root() is None
    assert (
        run_paths.resolve_new("runs/default", holds_run, "output_dir") == "runs/default"
    )  # the trainer refuses it, as before
    assert run_paths.resolve_existing("runs/default") == "runs/default"


def test_inside_a_job_relative_paths_go_under_the_output_root(job_env, capsys):
    assert run_paths.ray_job_submission_id() == "raysubmit_abc"
    first = run_paths.resolve_new("runs/default", holds_run, "output_dir")
    assert first == str(job_env / "tokenforge-outputs" / "runs" / "default")
    line = capsys.readouterr().out.strip()
    assert (
        line == f"tokenforge: output_dir runs/default -> {first} (relative outputs go under "
        f"{job_env / 'tokenforge-outputs'}, inside Ray job raysubmit_abc)"
    )
    Path(first).mkdir(parents=True)
    assert run_paths.resolve_new("runs/default", holds_run, "output_dir") == first  # an empty dir holds no run
    (Path(first) / "metrics.jsonl").write_text("{}\n")
    second = run_paths.resolve_new("runs/default", holds_run, "output_dir")
    assert second == first + "-2" and f"{first} holds an earlier run" in capsys.readouterr().out
    Path(second).mkdir()
    (Path(second) / "metrics.jsonl").write_text("{}\n")
    assert run_paths.resolve_new("runs/default", holds_run, "output_dir") == first + "-3"
    assert run_paths.resolve_existing("runs/default") == first  # --resume finds the run it names


def test_absolute_paths_and_uris_are_used_as_given(job_env, tmp_path, capsys):
    taken = tmp_path / "mine"
    taken.mkdir()
    (taken / "metrics.jsonl").write_text("{}\n")
    assert run_paths.resolve_new(str(taken), holds_run, "output_dir") == str(
        taken
    )  # the trainer refuses it: the user named it
    assert run_paths.resolve_new("s3://bucket/tune", holds_run, "tune.storage_path") == "s3://bucket/tune"
    assert run_paths.resolve_existing(str(taken)) == str(taken)
    assert capsys.readouterr().out == ""


def test_output_root_variable_wins(job_env, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv(run_paths.OUTPUT_ROOT_ENV, str(tmp_path / "nfs"))
    assert run_paths.resolve_new("runs/x", holds_run, "output_dir") == str(tmp_path / "nfs" / "runs" / "x")
    assert "set by $TOKENFORGE_OUTPUT_ROOT" in capsys.readouterr().out
    monkeypatch.delenv(RAY_JOB_CONFIG_JSON_ENV_VAR)  # `ray submit` (scripts/cluster_entry.py sets the variable)
    assert run_paths.resolve_new("runs/x", holds_run, "output_dir") == str(tmp_path / "nfs" / "runs" / "x")


def test_unreadable_job_config_still_counts_as_a_job(job_env, monkeypatch):
    monkeypatch.setenv(RAY_JOB_CONFIG_JSON_ENV_VAR, "not json")
    assert run_paths.ray_job_submission_id() == "unknown"
    assert run_paths.output_root() == job_env / "tokenforge-outputs"


def test_train_resume_inside_a_job_reads_the_run_under_the_output_root(job_env, capsys):
    with pytest.raises(SystemExit):
        main(["train", "--resume", "runs/default"])
    assert f"{job_env / 'tokenforge-outputs' / 'runs' / 'default' / 'config.yaml'}" in capsys.readouterr().err
