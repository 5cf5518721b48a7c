"""`tokenforge report`: report.png and report.md from a run's metrics (the Tune experiment's: tests/test_tune.py)."""

import json

import pytest
from PIL import Image

from pipeline.cli import main


def drawn_series(png) -> list[str]:
    """The series the figure holds, as written into the PNG's tokenforge-series text chunk."""
    return json.loads(Image.open(png).text["tokenforge-series"])


def markdown_rows(md: str) -> dict[tuple[str, str], list[str]]:
    """(panel, series) -> [points, first, last, min, max] from report.md's table."""
    rows = {}
    for line in md.splitlines():
        cells = [c.strip() for c in line.strip("|").split("|")]
        if len(cells) == 7 and cells[1].startswith("`"):
            rows[(cells[0], cells[1].strip("`"))] = cells[2:]
    return rows


def test_run_report_plots_every_series_of_the_run(observed_run, capsys):
    main(["report", str(observed_run)])
    run = observed_run
    assert capsys.readouterr().out.strip().splitlines()[-1] == (
        f"tokenforge: wrote {run}/report.png and {run}/report.md; "
        f"next: tokenforge samples {run} | tensorboard --logdir {run}/tensorboard"
    )
    series = drawn_series(run / "report.png")
    for expected in [
        "eval metrics vs samples: eval/exact_match",
        "eval metrics vs time: eval/exact_match",
        "rewards (mean per sample): reward/exact_match/mean",
        "rewards (mean per sample): reward/digit_match/mean",
        "rewards (mean per sample): reward/total/mean",
        "entropy: policy/entropy",
        "response length (tokens): response/length_mean",
        *[f"step time (s): {part}" for part in ("rollout", "reward", "learn", "publish", "other")],
        "samples without signal: advantage/zero_frac",
    ]:
        assert expected in series, expected
    md = (run / "report.md").read_text()
    assert "![report](report.png)" in md and "| KL to the reference | not logged by this run (no reference model" in md
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    evals = [r["eval/exact_match"] for r in records if "eval/exact_match" in r]
    rows = markdown_rows(md)
    assert rows[("eval metrics vs samples", "eval/exact_match")] == [
        "3",
        f"{evals[0]:.4g}",
        f"{evals[-1]:.4g}",
        f"{min(evals):.4g}",
        f"{max(evals):.4g}",
    ]
    zero = [r["advantage/zero_frac"] for r in records if "advantage/zero_frac" in r]
    assert rows[("samples without signal", "advantage/zero_frac")][:3] == ["4", f"{zero[0]:.4g}", f"{zero[-1]:.4g}"]
    # the stack's top is the step time: the parts, with `other`, add up to time/step_s
    last = records[-1]
    other = last["time/step_s"] - sum(last[f"time/{p}_s"] for p in ("rollout", "reward", "learn", "publish"))
    assert rows[("step time (s)", "other")][2] == f"{other:.4g}"


@pytest.mark.parametrize(
    ("target", "phrases"),
    [
        ("{tmp}/missing", ["'{tmp}/missing' does not exist", "pass a run's output_dir or storage URI"]),
        (
            "{tmp}",
            ["'{tmp}' is neither a tokenforge run", "pass a run's output_dir / storage URI or an experiment directory"],
        ),
    ],
)
def test_bad_report_targets_are_one_line(tmp_path, capsys, target, phrases):
    with pytest.raises(SystemExit) as exit_info:
        main(["report", target.format(tmp=tmp_path)])
    err = capsys.readouterr().err.strip()
    assert exit_info.value.code == 2 and err.startswith("tokenforge: error: ") and "\n" not in err
    assert all(phrase.format(tmp=tmp_path) in err for phrase in phrases), err
