"""`tokenforge samples`: the dumped completions of a run, ranked by group, with token-level rewards."""

import io
import re

import pytest
from rich.console import Console

from pipeline.cli import main
from pipeline.outputs import dumps
from pipeline.outputs.samples_view import group_scores, show_samples
from pipeline.storage import Storage


def shown_groups(out: str) -> list[int]:
    return [int(g) for g in re.findall(r"^group (\d+): ", out, flags=re.M)]


def test_worst_groups_of_the_latest_dump_by_default(observed_run, capsys):
    main(["samples", str(observed_run)])
    out = capsys.readouterr().out
    assert out.startswith(
        f"{observed_run}/rollouts/step_4.parquet: worst 5 groups by mean total_reward (of 64 samples)"
    )
    _, table = dumps.read_dump(Storage(str(observed_run)), dumps.ROLLOUTS, 4)
    means = group_scores(table, "total_reward")
    assert shown_groups(out) == sorted(means, key=lambda g: (means[g], g))[:5]
    assert out.count("answer: ") == 5 and re.search(
        r"\[\+0\.\d\d\]", out
    )  # without colour: token[reward] for each rewarded token


def test_best_group_and_eval_choices(observed_run, capsys):
    _, table = dumps.read_dump(Storage(str(observed_run)), dumps.ROLLOUTS, 2)
    means = group_scores(table, "total_reward")
    main(["samples", str(observed_run), "--step", "2", "--best", "3"])
    assert shown_groups(capsys.readouterr().out) == sorted(means, key=lambda g: (means[g], g))[::-1][:3]
    group = sorted(means)[4]
    main(["samples", str(observed_run), "--step", "2", "--group", str(group)])
    out = capsys.readouterr().out
    assert (
        shown_groups(out) == [group] and len(re.findall(r" (?:yes|cut) +│ +0 *$", out, flags=re.M)) == 4
    )  # its 4 samples, version 0 (generated beside step 1's: the default overlap)
    main(["samples", str(observed_run), "--eval", "--step", "0", "--worst", "2"])
    out = capsys.readouterr().out
    assert (
        "eval/step_0.parquet: worst 2 groups by mean eval/exact_match (of 50 samples)" in out
        and "(mean eval/exact_match 0.000)" in out
    )


def test_tokens_are_coloured_by_their_reward_on_a_colour_terminal(observed_run):
    buffer = io.StringIO()
    show_samples(
        str(observed_run), best=1, console=Console(file=buffer, force_terminal=True, color_system="standard", width=120)
    )
    out = buffer.getvalue()
    assert "\x1b[32m" in out or "\x1b[1;32m" in out  # green: rewarded tokens
    assert "[+" not in out  # the colours replace the numbers


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (
            ["/nonexistent/run"],
            "run directory '/nonexistent/run' does not exist; pass a run's output_dir or storage URI",
        ),
        (["{run}", "--step", "3"], "rollouts/step_3.parquet' does not exist; steps with rollouts dumps: 2, 4"),
        (["{run}", "--group", "9999"], "group 9999 is not in this dump (groups 64..79); pick one of its groups"),
        (["{run}", "--worst", "0"], "--worst takes a number of groups >= 1, got 0"),
        (["{tmp}"], "is not a tokenforge run (no config.yaml); pass the run's output_dir or storage URI"),
    ],
)
def test_bad_input_is_one_line(observed_run, tmp_path, capsys, args, message):
    with pytest.raises(SystemExit) as exit_info:
        main(["samples", *[a.format(run=observed_run, tmp=tmp_path) for a in args]])
    err = capsys.readouterr().err.strip()
    assert exit_info.value.code == 2 and err.count("\n") == 0 and message in err, err


@pytest.mark.slow
def test_the_error_path_exits_2_every_time(tmp_path):
    """`tokenforge samples` ending on a one-line error, 20 times as a process of its own (the console script):
    exit 2 each time. A review saw exit 134 ("terminate called without an active exception": a native thread
    alive at exit) in 5 of ~45 such runs."""
    import subprocess
    import sys
    from pathlib import Path

    import pyarrow as pa
    import pyarrow.parquet as pq

    (tmp_path / "config.yaml").write_text("{}\n")
    (tmp_path / "rollouts").mkdir()
    n = 2048  # a dump of some size, so pyarrow decodes it on its thread pool
    table = pa.table(
        {
            "group_id": [i // 8 for i in range(n)],
            "total_reward": [i / n for i in range(n)],
            "token_rewards": [[0.5] * 16] * n,
            "response_tokens": [["7"] * 16] * n,
        }
    )
    pq.write_table(table, tmp_path / "rollouts" / "step_2.parquet", row_group_size=64)
    command = [str(Path(sys.executable).parent / "tokenforge"), "samples", str(tmp_path), "--group", "9999"]
    for _ in range(20):
        result = subprocess.run(command, capture_output=True, text=True, timeout=300, check=False)
        assert (result.returncode, result.stderr.strip().splitlines()[-1:]) == (
            2,
            ["tokenforge: error: group 9999 is not in this dump (groups 0..255); pick one of its groups"],
        ), result.stderr
