"""The progress display: a live bar on a terminal, one line per step otherwise, never an ETA before a step is timed."""

import io

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
    assert "ETA" not in lines[0] and all(" ETA " in line for line in lines[1:])
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
    assert "\r" in out and "step 2/4 " in out and "<" in out  # the bar redrawn in place, with its remaining time
    assert "reward 0.500 | eval/exact_match 0.625 | 1000 tok/s" in out
    assert "\nstep 2/4 | reward 0.500 | eval/exact_match 0.625 | 1000 tok/s" in out.replace("\r", "\n")  # the eval's line stays
