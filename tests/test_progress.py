"""The progress display: a live bar on a terminal, one line per step otherwise, an ETA only once a step after the
first is timed."""

import io
from types import SimpleNamespace

from pipeline.outputs.metrics_log import MetricsLog
from pipeline.storage import Storage

STEP = {"reward/total/mean": 0.5, "throughput/tokens_per_s": 1000.0}


def test_one_plain_line_per_step_when_not_a_terminal(tmp_path, capsys):
    log = MetricsLog(Storage(str(tmp_path)), total_steps=3, tensorboard=False)
    log.write(0, {"eval/exact_match": 0.5})
    for step in (1, 2, 3):
        log.write(step, {**STEP, **({"eval/exact_match": 0.75} if step == 3 else {})})
    log.close()
    lines = capsys.readouterr().err.splitlines()
    assert [line.split(" | ")[0] for line in lines] == ["step 0/3", "step 1/3", "step 2/3", "step 3/3"]
    assert "ETA" not in lines[0] + lines[1] and all(" ETA " in line for line in lines[2:])
    assert lines[2].startswith("step 2/3 | reward 0.500 | eval/exact_match 0.500 | 1000 tok/s | elapsed ")
    assert "eval/exact_match 0.750" in lines[3]


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_a_live_bar_on_a_terminal_keeps_the_eval_lines(tmp_path, monkeypatch):
    terminal = Terminal()
    monkeypatch.setattr("sys.stderr", terminal)
    log = MetricsLog(Storage(str(tmp_path)), total_steps=4, tensorboard=False)
    log.write(0, {"eval/exact_match": 0.5})
    log.write(1, STEP)
    log.write(2, {**STEP, "eval/exact_match": 0.625})
    log.close()
    out = terminal.getvalue()
    assert "\r" in out and "step 2/4 " in out and " ETA " in out  # the bar redrawn in place, with its remaining time
    assert "reward 0.500 | eval/exact_match 0.625 | 1000 tok/s" in out
    assert "\nstep 2/4 | reward 0.500 | eval/exact_match 0.625 | 1000 tok/s" in out.replace(
        "\r", "\n"
    )  # the eval's line stays


def test_the_eta_counts_from_the_end_of_the_first_step(tmp_path, capsys, monkeypatch):
    """The actors' start-up, step 0's eval and the first step's warm-up are no later step's cost: after 60 s of
    them, steps of 1 s each leave an ETA of 1 s per remaining step (counted from the start, it read 6x that)."""
    clock = [1000.0]
    monkeypatch.setattr("pipeline.outputs.metrics_log.time", SimpleNamespace(time=lambda: clock[0]))
    log = MetricsLog(Storage(str(tmp_path)), total_steps=10, tensorboard=False)
    clock[0] += 30
    log.write(0, {"eval/exact_match": 0.5})  # the actors started, step 0 evaluated
    clock[0] += 30
    log.write(1, STEP)  # the first step, with its warm-up
    for step in (2, 3, 4):
        clock[0] += 1
        log.write(step, STEP)
    lines = capsys.readouterr().err.splitlines()
    assert " ETA " not in lines[1]
    assert lines[2].endswith("ETA 8s") and lines[4].endswith("ETA 6s"), lines
