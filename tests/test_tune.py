"""`tokenforge tune`: spec validation, and real Tune experiments on the session's local Ray."""

import hashlib
import json
import os
import pickle
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from test_cli_errors import run_cli
from test_report import drawn_series

from pipeline.cli import main
from pipeline.config import load_config
from pipeline.driver.trainer import train
from pipeline.errors import ConfigError
from pipeline.outputs.experiment_files import SPEC_FILE
from pipeline.tune.experiment import RESTORES_FILE
from pipeline.tune.experiment import resume as resume_experiment
from pipeline.tune.experiment import run as run_experiment
from pipeline.tune.spec import load_spec

REPO = Path(__file__).parent.parent
SMOKE = REPO / "tune_configs" / "smoke.yaml"
TINY = {  # a small, fast trial that fits twice into the test cluster's 2 CPUs
    "trainer.total_steps": 8,
    "trainer.eval_every": 2,
    "trainer.prompts_per_step": 8,
    "data.max_eval_samples": 50,
    "rollout.group_size": 4,
    "learner.num_cpus": 0.25,
    "rollout.num_cpus_per_worker": 0.25,
    "reward.num_cpus_per_worker": 0.25,
}


def write_spec(tmp_path: Path, search: dict, tune: dict, base: dict | None = None) -> Path:
    spec = {
        "base": {"overrides": {**TINY, **(base or {})}},
        "search": search,
        "tune": {"storage_path": str(tmp_path / "results"), **tune},
    }
    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


@pytest.mark.parametrize(
    ("search", "tune", "message"),
    [
        ({"learner.lr": {"strategy": "normal", "values": [0, 1]}}, {}, "unknown strategy 'normal'"),
        ({"learner.lr": {"strategy": "loguniform", "values": [0, 1]}}, {}, "loguniform: low must be > 0"),
        ({"learner.lr": {"strategy": "uniform", "values": [1]}}, {}, "uniform needs 2 numbers"),
        (
            {"learner.lrate": {"strategy": "choice", "values": [1]}},
            {},
            "search key 'learner.lrate': the base config has no such key",
        ),
        (
            {"reward.weights.bleu": {"strategy": "choice", "values": [1]}},
            {},
            "search key 'reward.weights.bleu': the base config has no such key",
        ),
        (
            {"learner.lr": {"strategy": "choice", "values": ["fast"]}},
            {},
            "search key 'learner.lr': config key 'learner.lr': Input should be a valid number",
        ),
        (
            {"learner.lr": {"strategy": "choice", "values": [1e-3]}},
            {"scheduler": {"name": "hyperband"}},
            "unknown tune.scheduler.name 'hyperband'",
        ),
        (
            {"learner.lr": {"strategy": "choice", "values": [1e-3]}},
            {"scheduler": {"name": "asha", "grace": 2}},
            "tune.scheduler.grace: not an option of scheduler 'asha'",
        ),
        (
            {"learner.lr": {"strategy": "choice", "values": [1e-3]}},
            {"search_alg": "annealing"},
            "unknown tune.search_alg 'annealing'",
        ),
        (
            {"learner.lr": {"strategy": "grid", "values": [1e-3]}},
            {"search_alg": "optuna"},
            "'grid' only works with search_alg random",
        ),
        (
            {"reward.weights.digit_match": {"strategy": "uniform", "values": [0, 1]}},
            {"metric": "reward/total/mean"},
            "the reward weights are searched",
        ),
        (
            {"learner.lr": {"strategy": "choice", "values": [1e-3]}},
            {"metric": "reward/total/mean"},
            "the objective must be a held-out eval metric",
        ),
        (
            {"learner.lr": {"strategy": "choice", "values": [1e-3]}},
            {"metric": "eval/chrf"},
            "the objective must be a held-out eval metric",
        ),
        ({"learner.lr": {"strategy": "choice", "values": [1e-3]}}, {"mode": "maximise"}, "tune spec key 'tune.mode'"),
        (
            {"learner.lr": {"strategy": "choice", "values": [1e-3]}},
            {"shceduler": "asha"},
            "tune spec key 'tune.shceduler': unknown key",
        ),
    ],
)
def test_bad_specs_are_rejected_before_any_trial(tmp_path, search, tune, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        load_spec(write_spec(tmp_path, search, tune))


def test_the_critics_lr_and_gaes_lambda_are_searchable(tmp_path):
    search = {
        "critic.lr": {"strategy": "loguniform", "values": [1e-4, 1e-2]},
        "algorithm.lam": {"strategy": "choice", "values": [0.9, 1.0]},
    }
    spec, base = load_spec(write_spec(tmp_path, search, {}, {"algorithm.estimator": "gae"}))
    assert base.critic is not None and set(spec.search) == {"critic.lr", "algorithm.lam"}
    with pytest.raises(ConfigError, match=re.escape("search key 'critic.lr': the base config has no such key")):
        load_spec(
            write_spec(tmp_path, {"critic.lr": {"strategy": "choice", "values": [1e-3]}}, {})
        )  # grpo: no critic to search


def test_relative_data_and_model_paths_reach_trials_absolute(tmp_path, monkeypatch, builtin_model_path):
    """Tune runs a trial in its trial folder: relative paths that exist where `tokenforge tune` runs are
    made absolute; a dataset name (no such file here) stays as it is."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "model").symlink_to(builtin_model_path)
    (tmp_path / "train.jsonl").write_text('{"prompt": "1+1=", "answer": "2"}\n')
    spec = write_spec(
        tmp_path,
        {"learner.lr": {"strategy": "choice", "values": [1e-3]}},
        {},
        {
            "model.path": "model",
            "data.train_file": "train.jsonl",
            "data.eval_file": "train.jsonl",
            "algorithm.estimator": "gae",
            "critic.model_path": "model",
        },
    )
    _, base = load_spec(spec)
    assert (base.model.path, base.data.train_file) == (str(tmp_path / "model"), str(tmp_path / "train.jsonl"))
    assert base.critic.model_path == str(tmp_path / "model")
    _, named = load_spec(spec, ["base.overrides={data.train_file: some/dataset, data.eval_file: some/dataset}"])
    assert named.data.train_file == "some/dataset"


def test_shipped_specs_validate():
    for path in sorted((REPO / "tune_configs").glob("*.yaml")):
        spec, _ = load_spec(path)
        assert spec.tune.metric.startswith("eval/"), path


def marked_reward(tmp_path: Path, builtin_model_path: str, name: str, function: str) -> dict:
    """Overrides adding reward component `name` (tests/reward_fns.py `function`, weight 0.1) on the built-in prompts
    plus a `marker_dir` column: the per-test directory where the function keeps its marker files."""
    train_file = tmp_path / "train.jsonl"
    rows = [
        json.loads(line) for line in (Path(builtin_model_path).parent / "train.jsonl").read_text().splitlines()[:200]
    ]
    train_file.write_text("".join(json.dumps({**r, "marker_dir": str(tmp_path)}) + "\n" for r in rows))
    return {
        f"reward.components.{name}": {
            "type": "python",
            "function": f"{Path(__file__).parent / 'reward_fns.py'}:{function}",
        },
        f"reward.weights.{name}": 0.1,
        "data.train_file": str(train_file),
        "data.eval_file": str(Path(builtin_model_path).parent / "eval.jsonl"),
    }


def trial_dirs(experiment: Path) -> list[Path]:
    return sorted(p for p in experiment.iterdir() if p.is_dir() and (p / "run").is_dir())


def metrics(trial: Path) -> list[dict]:
    return [json.loads(line) for line in (trial / "run" / "metrics.jsonl").read_text().splitlines()]


def test_smoke_spec_end_to_end(ray_cluster, tmp_path, capsys, caplog):
    ctrl_c = signal.getsignal(signal.SIGINT)
    experiment = Path(run_experiment(str(SMOKE), [f"tune.storage_path={tmp_path}"]))
    assert signal.getsignal(signal.SIGINT) is ctrl_c  # Tune's handler is gone: the next Ctrl-C interrupts again
    console = capsys.readouterr().out
    assert (
        "Result for " not in console and len(console.splitlines()) < 100
    )  # status tables + the summary, no per-result dumps
    assert (
        "Result logdir" not in console and "/tmp/ray" not in console
    )  # Ray's driver scratch directory: not the results
    tune_lines = [r.getMessage() for r in caplog.records if r.name.startswith("ray.tune")]  # Tune's own log lines
    assert not [line for line in tune_lines if "snapshotting" in line or "Total run time" in line], tune_lines
    summary = console[
        console.rindex("trial ") :
    ].splitlines()  # the final table: one row per trial, named by its values
    assert summary[1].startswith("digit_match=0 ") and summary[2].startswith("digit_match=0.5 ")
    assert summary[-1].startswith(f"tokenforge: experiment {experiment}; best trial's run {experiment}/run_trial_")
    assert summary[-1].endswith(
        f"next: tokenforge report {experiment} | tensorboard --logdir {experiment} | tokenforge samples "
        + summary[-1].split("best trial's run ")[1].split(" ")[0]
    )
    rows = (experiment / "trials.csv").read_text().splitlines()
    assert len(rows) == 3 and rows[0].startswith("trial,reward.weights.digit_match,eval/exact_match")
    assert all(row.endswith(",12,TERMINATED") for row in rows[1:])
    for trial in trial_dirs(experiment):
        pointers = [json.loads(p.read_text()) for p in trial.glob("checkpoint_*/checkpoint.json")]  # Tune's checkpoints
        assert pointers and all(p["run_uri"] == str(trial / "run") for p in pointers), trial  # point at the run's own
        assert all((trial / "run" / p["checkpoint"] / "MANIFEST.json").is_file() for p in pointers)
        assert [r["step"] for r in metrics(trial) if "eval/exact_match" in r] == [0, 4, 8, 12]
    assert (experiment / "objective.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert drawn_series(experiment / "objective.png") == [  # the legend: the searched values, not trial names
        "eval/exact_match of every trial: digit_match=0",
        "eval/exact_match of every trial: digit_match=0.5",
    ]
    main(["report", str(experiment)])
    assert capsys.readouterr().out.startswith(f"tokenforge: wrote {experiment}/report.png and {experiment}/report.md")
    assert drawn_series(experiment / "report.png") == drawn_series(experiment / "objective.png")
    report = (experiment / "report.md").read_text()
    best = load_config(experiment / "best_config.yaml", [f"output_dir={tmp_path / 'best'}", "trainer.total_steps=2"])
    final = {float(row.split(",")[1]): float(row.split(",")[2]) for row in rows[1:]}  # weight -> last eval
    assert final[best.reward.weights["digit_match"]] == max(final.values())  # the best trial's, not any trial's
    assert f"| `reward.weights.digit_match` | {best.reward.weights['digit_match']} |" in report
    assert re.search(
        rf"Best trial: `run_trial_\w+_reward_weights_digit_match={best.reward.weights['digit_match']:.4f}_[^`]+`, "
        rf"eval/exact_match {max(final.values()):.4g}",
        report,
    )
    assert train(best)["step"] == 2


def checkpoint_hashes(trial: Path) -> dict[int, str]:
    """step -> sha256 of the weights of each published checkpoint of the trial's run."""
    return {
        json.loads((c / "trainer_state.json").read_text())["step"]: hashlib.sha256(
            (c / "model.safetensors").read_bytes()
        ).hexdigest()
        for c in (trial / "run" / "checkpoints").glob("step_*")
        if (c / "MANIFEST.json").is_file()
    }


def test_pbt_exploit_continues_from_the_donor_checkpoint_with_mutated_params(ray_cluster, tmp_path):
    spec = write_spec(
        tmp_path,
        {"learner.lr": {"strategy": "loguniform", "values": [1e-4, 3e-3]}},  # a resample is always a new lr
        {
            "name": "pbt",
            "num_samples": 2,
            "num_to_keep": None,
            "scheduler": {
                "name": "pbt",
                "perturbation_interval": 2,
                "quantile_fraction": 0.5,
                "resample_probability": 1.0,
                "synch": True,
            },
        },  # perturb once both trials reported: no race with a late-starting trial
        base={"learner.lr_schedule": "constant", "learner.warmup_steps": 0},
    )
    experiment = Path(run_experiment(str(spec)))
    restores = [
        (trial, json.loads(line))
        for trial in trial_dirs(experiment)
        if (trial / RESTORES_FILE).exists()
        for line in (trial / RESTORES_FILE).read_text().splitlines()
    ]
    for trial, restore in restores:  # synchronous PBT also pauses trials and resumes them from their own checkpoint
        source = Path(restore["source"])  # the checkpoint Tune pointed at: its step and its very weights were restored
        assert (
            restore["step"] > 0 and source.parents[2].parent == experiment
        )  # <experiment>/<trial>/run/checkpoints/step_N
        assert json.loads((source / "trainer_state.json").read_text())["step"] == restore["step"]
        assert hashlib.sha256((source / "model.safetensors").read_bytes()).hexdigest() == restore["model_sha256"]
    exploits = [(trial, r) for trial, r in restores if Path(r["source"]).parents[2] != trial]
    assert exploits, "PBT never exploited"
    for trial, restore in exploits:  # the donor's weights at that step (the restore replaced the trial's own there)
        donor = Path(restore["source"]).parents[2]
        assert donor != trial and checkpoint_hashes(donor)[restore["step"]] == restore["model_sha256"]
        assert checkpoint_hashes(trial)[restore["step"]] == restore["model_sha256"]
        before = [r for r in metrics(trial) if r["step"] == restore["step"]][0]["learner/lr"]
        after = [r for r in metrics(trial) if r["step"] == restore["step"] + 1]
        assert after and after[-1]["learner/lr"] == pytest.approx(
            restore["params"]["learner.lr"]
        )  # mutated lr in effect
        assert after[-1]["learner/lr"] != pytest.approx(before)  # and it is not the lr the trial had
    assert all(r.endswith(",8,TERMINATED") for r in (experiment / "trials.csv").read_text().splitlines()[1:])


def test_a_crashing_trial_is_retried_from_its_last_checkpoint(ray_cluster, tmp_path, builtin_model_path):
    spec = write_spec(
        tmp_path,
        {"reward.weights.flaky": {"strategy": "choice", "values": [0.1]}},
        {"name": "retry", "max_failures": 1},
        base=marked_reward(tmp_path, builtin_model_path, "flaky", "fail_on_sixth_call"),
    )
    experiment = Path(run_experiment(str(spec)))
    # steps 1-5, the sixth call failing at step 6, its 32 samples rescored one by one (all pass alone, so the
    # step fails), then steps 5-8 again from the step-4 checkpoint: 5 + 1 + 32 + 4
    assert (tmp_path / "calls").read_text() == "42"
    (trial,) = trial_dirs(experiment)
    restores = [json.loads(line) for line in (trial / RESTORES_FILE).read_text().splitlines()]
    assert [r["step"] for r in restores] == [4]  # failed in step 6; the last checkpoint was step 4
    assert [r["step"] for r in metrics(trial)] == list(range(9))  # no step lost or repeated
    assert (experiment / "trials.csv").read_text().splitlines()[1].endswith(",8,TERMINATED")


def test_resume_continues_an_interrupted_experiment(ray_cluster, tmp_path, builtin_model_path, capsys, monkeypatch):
    # each trial holds after step 10 until `hold` goes, so Ctrl-C lands mid-run on a machine of any speed
    spec = write_spec(
        tmp_path,
        {"reward.weights.digit_match": {"strategy": "grid", "values": [0.0, 0.5]}},
        {"name": "interrupted", "max_concurrent_trials": 2},
        base={"trainer.total_steps": 24, **marked_reward(tmp_path, builtin_model_path, "held", "hold_after_ten_calls")},
    )
    (tmp_path / "hold").touch()
    env = {**os.environ, "RAY_ADDRESS": ray_cluster.get_runtime_context().gcs_address, "PYTHONUNBUFFERED": "1"}
    process = subprocess.Popen([sys.executable, "-m", "pipeline.cli", "tune", str(spec)], env=env, cwd=REPO)
    experiment = tmp_path / "results" / "interrupted"
    try:
        deadline = time.time() + 240
        while time.time() < deadline and not (
            experiment.is_dir()
            and len(trial_dirs(experiment)) == 2
            and all(
                (t / "run" / "metrics.jsonl").exists() and any(r["step"] == 10 for r in metrics(t))
                for t in trial_dirs(experiment)
            )
        ):
            time.sleep(1)
        process.send_signal(signal.SIGINT)
        assert process.wait(timeout=120) == 0  # Tune stops gracefully on Ctrl-C and the command says where to resume
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    first = {trial: max(r["step"] for r in metrics(trial)) for trial in trial_dirs(experiment)}
    assert len(first) == 2 and set(first.values()) == {10}, first  # both held in step 11
    # the run checkpoints Tune's registered checkpoints point at (read now: the resumed run prunes them)
    registered = {
        trial: [json.loads(p.read_text())["checkpoint"] for p in sorted(trial.glob("checkpoint_*/checkpoint.json"))]
        for trial in first
    }
    assert all(len(pointers) >= 2 for pointers in registered.values()), registered
    (tmp_path / "hold").unlink()
    monkeypatch.delenv("RAY_AIR_NEW_OUTPUT", raising=False)  # as in a new process: `tokenforge tune --resume`
    capsys.readouterr()
    resume_experiment(str(experiment), trust_run_config=True)
    console = capsys.readouterr().out  # Tune's trimmed status table, not its newer output with Ray's /tmp/ray paths
    assert "To visualize your results with TensorBoard" not in console and "/tmp/ray" not in console, console[-2000:]
    for trial in first:
        assert [r["step"] for r in metrics(trial)] == list(range(25))  # every step exactly once
        # it continued from a checkpoint instead of starting over
        earliest = int(registered[trial][0].rsplit("_", 1)[1])
        restores = [json.loads(line)["step"] for line in (trial / RESTORES_FILE).read_text().splitlines()]
        assert restores and restores[-1] >= earliest
    assert all(r.endswith(",24,TERMINATED") for r in (experiment / "trials.csv").read_text().splitlines()[1:])


def test_tune_resume_refuses_to_load_an_experiments_pickles_without_trust(capsys, tmp_path):
    """Tuner.restore unpickles the experiment directory's state, and a pickle runs code as it loads: no look at the
    directory's YAML can make that safe, so resuming needs --trust-run-config."""
    marker = tmp_path / "ran"

    class Payload:
        def __reduce__(self):
            return Path.touch, (marker,)

    experiment = tmp_path / "experiment"
    experiment.mkdir()
    (experiment / SPEC_FILE).write_text(
        yaml.safe_dump({"spec": {"search": {"learner.lr": {"strategy": "choice", "values": [1e-3]}}}, "base": {}})
    )
    (experiment / "tuner.pkl").write_bytes(pickle.dumps(Payload()))
    err = run_cli(["tune", "--resume", str(experiment)], capsys)
    assert "loads the experiment directory's Python pickles" in err and "pass --trust-run-config" in err
    assert not marker.exists()


def test_the_status_table_is_redrawn_in_place_on_a_terminal(monkeypatch):
    """On a terminal each report moves the cursor up over the previous table and clears it; in a log each table
    stays."""
    import io

    from pipeline.tune.experiment import LiveTable

    class Terminal(io.StringIO):
        def isatty(self) -> bool:
            return True

    for stream, redrawn in ((Terminal(), True), (io.StringIO(), False)):
        monkeypatch.setattr("sys.stdout", stream)
        reporter = LiveTable(metric_columns=["step"])
        reporter.report([], False, "first")
        first = stream.getvalue()
        reporter.report([], True, "second")
        second = stream.getvalue()[len(first) :]
        assert "\x1b[J" not in first and ("== Status ==" in first) and "second" in second
        assert second.startswith(f"\x1b[{first.count(chr(10))}F\x1b[J") == redrawn, repr(second[:20])


@pytest.mark.slow  # whole runs: CI's slow step (pytest -m slow), not the README's suite
def test_a_trial_with_a_learner_group_places_its_ranks_in_the_trials_placement_group(ray_cluster, tmp_path):
    """learner.num_workers=2: the trial's placement group holds both ranks' bundles (actor_bundles), the ranks are
    created inside it (no placement group of their own, which the trial's would starve) and train."""
    spec = write_spec(
        tmp_path,
        {"learner.lr": {"strategy": "choice", "values": [5e-4]}},
        {"name": "group"},
        base={"learner.num_workers": 2, "trainer.total_steps": 2},
    )
    experiment = Path(run_experiment(str(spec)))
    (trial,) = trial_dirs(experiment)
    assert [r["step"] for r in metrics(trial)] == [0, 1, 2]
    assert (experiment / "trials.csv").read_text().splitlines()[1].endswith(",2,TERMINATED")
