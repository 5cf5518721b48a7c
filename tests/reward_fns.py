"""User reward functions for the `python` component tests (TRL's signature: keyword lists)."""

import asyncio
import os
import tempfile
import time
from pathlib import Path

CRASH_MARKER = Path(tempfile.gettempdir()) / "tokenforge-test-crash-once"


def completion_length(prompts, completions, completion_ids, **columns):
    """Sequence-level: the completion's character count."""
    return [float(len(c)) for c in completions]


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


def crash_once(prompts, completions, completion_ids, **columns):
    """Kills its worker process the first time it runs (until CRASH_MARKER exists), then scores 1."""
    try:
        os.close(os.open(CRASH_MARKER, os.O_CREAT | os.O_EXCL))  # atomic: only one worker ever crashes
    except FileExistsError:
        return [1.0] * len(completions)
    os._exit(1)


FAIL_COUNTER = Path(tempfile.gettempdir()) / "tokenforge-test-fail-counter"


def fail_on_sixth_call(prompts, completions, completion_ids, **columns):
    """Scores 0; raises on the sixth call ever (a counter file survives worker and trial restarts)."""
    calls = int(FAIL_COUNTER.read_text()) + 1 if FAIL_COUNTER.exists() else 1
    FAIL_COUNTER.write_text(str(calls))
    if calls == 6:
        raise RuntimeError("flaky reward service")
    return [0.0] * len(completions)
