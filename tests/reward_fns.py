"""User reward functions for the `python` component tests (TRL's signature: keyword lists)."""

import asyncio
import os
import time
from pathlib import Path


def completion_length(prompts, completions, completion_ids, **columns):
    """Sequence-level: the completion's character count."""
    return [float(len(c)) for c in completions]


def content_length(prompts, completions, completion_ids, **columns):
    """Sequence-level: the completion's character count; a conversational completion is a message list."""
    return [float(len(c[0]["content"] if isinstance(c, list) else c)) for c in completions]


async def async_token_index(prompts, completions, completion_ids, **columns):
    """Token-level, async: token t earns t / 10; also reads the dataset column `answer`."""
    await asyncio.sleep(0)
    assert len(columns["answer"]) == len(prompts)
    return [[t / 10 for t in range(len(ids))] for ids in completion_ids]


def fail_on_seven(prompts, completions, completion_ids, **columns):
    """Raises when any completion in the call contains '7'."""
    if any("7" in c for c in completions):
        raise ValueError("no sevens")
    return [1.0] * len(completions)


def hang(prompts, completions, completion_ids, **columns):
    time.sleep(3600)
    return [0.0] * len(completions)


def crash_once(prompts, completions, completion_ids, marker_dir, row, **columns):
    """Kills its worker process the first time it runs (until `crashed` exists in the dataset column
    `marker_dir`, a per-test directory), then scores 1 and appends the `row` of every sample it scored
    to `scored`, so a test can tell "scored once" from "scored twice"."""
    directory = Path(marker_dir[0])
    try:
        os.close(os.open(directory / "crashed", os.O_CREAT | os.O_EXCL))  # atomic: only one worker ever crashes
    except FileExistsError:
        with open(directory / "scored", "a") as log:
            log.write("".join(f"{r}\n" for r in row))
        return [1.0] * len(completions)
    os._exit(1)


def fail_on_sixth_call(prompts, completions, completion_ids, marker_dir, **columns):
    """Scores 0; raises on the sixth call ever (a counter file in the per-test directory `marker_dir`, a
    dataset column, survives worker and trial restarts)."""
    counter = Path(marker_dir[0]) / "calls"
    calls = int(counter.read_text()) + 1 if counter.exists() else 1
    counter.write_text(str(calls))
    if calls == 6:
        raise RuntimeError("flaky reward service")
    return [0.0] * len(completions)


def log_scoring(prompts, completions, completion_ids, marker_dir, row, **columns):
    """Scores 1; appends "<first row> <time>" to `scored` in the per-test directory `marker_dir` as it starts."""
    with open(Path(marker_dir[0]) / "scored", "a") as log:
        log.write(f"{row[0]} {time.time()}\n")
    return [1.0] * len(completions)


calls_in_this_process = 0


def hold_after_ten_calls(prompts, completions, completion_ids, marker_dir, **columns):
    """Scores 0; from its process's eleventh call on, waits while `hold` exists in the per-test directory `marker_dir`
    (a dataset column): a trial stops after its tenth step, however fast the machine, until the test removes `hold`."""
    global calls_in_this_process
    calls_in_this_process += 1
    while calls_in_this_process > 10 and (Path(marker_dir[0]) / "hold").exists():
        time.sleep(0.1)
    return [0.0] * len(completions)
