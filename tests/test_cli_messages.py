"""What a new user meets on the command line: where the results are, what to run next, no noise."""

import os
import re
import subprocess
import sysconfig
from pathlib import Path

from pipeline.cli import main

REPO = Path(__file__).parent.parent
SCRIPTS = Path(sysconfig.get_path("scripts"))  # this installation's console scripts (.venv/bin)


# How the commands a run prints name tokenforge in a shell that never activated the venv (the README's), from the
# repository's root: by its path, relative where the venv is inside the checkout (`.venv/bin/tokenforge`)
TOKENFORGE = str(SCRIPTS.relative_to(REPO) if SCRIPTS.is_relative_to(REPO) else SCRIPTS) + os.sep + "tokenforge"


def fresh_shell(home: Path) -> dict[str, str]:
    """A new user's environment: a fresh HOME, no RAY_AUTH_MODE, the venv's bin not on PATH."""
    home.mkdir()
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_AUTH_MODE", "RAY_AUTH_TOKEN_PATH", "RAY_ADDRESS")}
    path = os.pathsep.join(p for p in env["PATH"].split(os.pathsep) if Path(p) != SCRIPTS)
    return {**env, "HOME": str(home), "PATH": path}


def test_a_fresh_train_says_where_its_results_are_and_its_next_commands_run_as_printed(tmp_path):
    """A real `.venv/bin/tokenforge train` as a new user runs the README's first command, on a local Ray: the
    next commands it prints name the console scripts it ran from, and run as printed."""
    home, out = tmp_path / "home", tmp_path / "run"
    env = fresh_shell(home)
    tokenforge, tensorboard = TOKENFORGE, TOKENFORGE.removesuffix("tokenforge") + "tensorboard"

    def run(command: list[str]) -> subprocess.CompletedProcess:
        return subprocess.run(command, capture_output=True, text=True, timeout=400, check=False, env=env, cwd=REPO)

    result = run(
        [
            str(SCRIPTS / "tokenforge"),
            "train",
            f"output_dir={out}",
            "trainer.total_steps=2",
            "trainer.eval_every=2",
            "trainer.prompts_per_step=8",
            "rollout.group_size=4",
            "data.max_eval_samples=20",
            "ray.num_cpus=2",
        ]
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert "Token authentication is enabled" not in result.stderr  # token auth is on, and said so before Ray starts
    assert (home / ".ray" / "auth_token").stat().st_mode & 0o777 == 0o600  # Ray alone would write it 0644
    step0 = next(line for line in result.stderr.splitlines() if line.startswith("step 0/2"))
    assert "ETA" not in step0, step0  # no rate before the first step: no `ETA 0s`
    last = result.stdout.strip().splitlines()[-1]
    score = re.search(r"eval/exact_match ([0-9.]+)", result.stdout).group(1)
    assert last == (
        f"tokenforge: run {out} at step 2 (eval/exact_match {score}); "
        f"last checkpoint: {out}/checkpoints/step_2; next: {tokenforge} report {out} | {tokenforge} samples {out} | "
        f"{tensorboard} --logdir {out}/tensorboard | {tokenforge} eval {out}"
    )
    report = run(last.split("next: ")[1].split(" | ")[0].split())
    assert report.returncode == 0 and (out / "report.png").is_file(), report.stderr[-2000:]
    assert os.access(REPO / tensorboard, os.X_OK)  # relative to the working directory, or absolute


def test_export_ends_with_what_it_wrote_and_the_next_commands_without_progress_bars(tmp_path):
    """`tokenforge export` (here of the built-in model directory) as the console script in a new user's shell:
    the one closing line every command prints, not a bare `wrote X`, and no transformers "Loading weights" bar."""
    model, exported = REPO / "pipeline" / "assets" / "addition" / "model", tmp_path / "exported"
    result = subprocess.run(
        [TOKENFORGE, "export", str(model), str(exported)],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
        env=fresh_shell(tmp_path / "home"),
        cwd=REPO,
    )
    assert result.returncode == 0 and "Loading weights" not in result.stderr, result.stderr[-2000:]
    assert result.stdout.strip().splitlines()[-1] == (
        f"tokenforge: wrote {exported}, a plain HF model from {model}; "
        f"next: {TOKENFORGE} eval {exported} | {TOKENFORGE} train model.path={exported}"
    )
    assert (exported / "config.json").is_file()


def test_resume_of_a_finished_run_says_so_and_where_it_is(observed_run, capsys):
    before = (observed_run / "config.yaml").stat().st_mtime_ns
    main(["train", "--resume", str(observed_run)])
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[0] == f"tokenforge: {observed_run} is complete (step 4 of 4); raise trainer.total_steps to train on"
    assert lines[-1].startswith(f"tokenforge: run {observed_run} at step 4 (eval/exact_match ")
    assert f"last checkpoint: {observed_run}/checkpoints/step_4; next: tokenforge report {observed_run}" in lines[-1]
    assert (observed_run / "config.yaml").stat().st_mtime_ns == before


def test_eval_of_a_run_directory_takes_its_latest_checkpoint(observed_run, capsys):
    main(["eval", str(observed_run)])
    line = capsys.readouterr().out.strip()
    assert re.fullmatch(
        rf"tokenforge: evaluated {observed_run}/checkpoints/step_4 on 50 samples of \S+ \(eval/exact_match [0-9.]+\); "
        rf"next: tokenforge samples {observed_run} --eval \| tokenforge report {observed_run}",
        line,
    ), line


def test_readme_gives_the_tensorboard_command_a_default_run_prints():
    assert "tensorboard --logdir runs/default/tensorboard" in (REPO / "README.md").read_text()
