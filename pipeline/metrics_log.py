"""Per-step metrics: metrics.jsonl (through the run's storage), TensorBoard events and a live progress line.

A metrics line is durable before the checkpoint that covers it is published (the trainer writes the
line first). On resume the file is cut back to the checkpoint's step in one atomic rewrite (a torn
last line, from a kill mid-write, is dropped with the rest), and TensorBoard hides the events past
that step (`purge_step`).
"""

from __future__ import annotations

import json
import sys
import tempfile
import time
from pathlib import Path

from torch.utils.tensorboard import SummaryWriter

from pipeline.storage import Storage

METRICS_FILE = "metrics.jsonl"
TENSORBOARD = "tensorboard"


def read_metrics(storage: Storage) -> list[dict]:
    """The run's metrics records, without a torn last line."""
    if not storage.exists(METRICS_FILE):
        return []
    records = []
    for line in storage.read_text(METRICS_FILE).splitlines():
        try:
            records.append(json.loads(line))
        except ValueError:  # a line cut short by a kill: it and anything after it never counted
            break
    return records


class MetricsLog:
    def __init__(self, storage: Storage, total_steps: int, keep_through: int = -1, elapsed_s: float = 0.0):
        """`keep_through`: the step of the checkpoint a resumed run continues from (-1: from scratch); the
        lines written after it are dropped."""
        self.storage = storage
        self.total_steps = total_steps
        self.start = time.time() - elapsed_s  # time/elapsed_s continues across resumes
        self.first_step, self.first_time = max(keep_through, 0), time.time()
        self.latest_eval: dict[str, float] = {}
        resumed = storage.exists(METRICS_FILE)
        if resumed:
            kept = [r for r in read_metrics(storage) if r["step"] <= keep_through]
            storage.write_text(METRICS_FILE, "".join(json.dumps(r) + "\n" for r in kept))
        # TensorBoard writes local files: into the run directory when it is local, else into a scratch
        # directory copied to storage with every checkpoint (sync_tensorboard)
        self.scratch = None if storage.local else tempfile.TemporaryDirectory(prefix="tokenforge-tb-")
        events = storage.path(TENSORBOARD) if storage.local else self.scratch.name
        self.tensorboard = SummaryWriter(events, purge_step=keep_through + 1 if resumed else None)
        self.interactive = sys.stderr.isatty()

    def elapsed(self) -> float:
        return time.time() - self.start

    def write(self, step: int, metrics: dict[str, float]) -> dict:
        record = {"step": step, "time/elapsed_s": round(self.elapsed(), 3), **metrics}
        self.storage.append_text(METRICS_FILE, json.dumps(record) + "\n")
        for key, value in metrics.items():
            self.tensorboard.add_scalar(key, value, step)
        self.tensorboard.flush()
        self.latest_eval.update({k: v for k, v in metrics.items() if k.startswith("eval/")})
        self._progress(step, metrics)
        return record

    def sync_tensorboard(self) -> None:
        """Copy the TensorBoard events to remote storage (a no-op when the run directory is local)."""
        if self.scratch is not None:
            self.storage.upload_dir(Path(self.scratch.name), TENSORBOARD)

    def _progress(self, step: int, metrics: dict[str, float]) -> None:
        done = step - self.first_step
        rate = (time.time() - self.first_time) / done if done > 0 else 0.0
        eta = rate * (self.total_steps - step)
        parts = [f"step {step}/{self.total_steps}"]
        if "reward/total/mean" in metrics:
            parts.append(f"reward {metrics['reward/total/mean']:.3f}")
        parts += [f"{k} {v:.3f}" for k, v in self.latest_eval.items()]
        if "throughput/tokens_per_s" in metrics:
            parts.append(f"{metrics['throughput/tokens_per_s']:.0f} tok/s")
        parts.append(f"elapsed {self.elapsed():.0f}s ETA {eta:.0f}s")
        line = " | ".join(parts)
        is_eval = any(k.startswith("eval/") for k in metrics)
        if self.interactive:
            print("\r" + line.ljust(100), end="\n" if is_eval or step == self.total_steps else "", file=sys.stderr, flush=True)
        elif is_eval or step % 10 == 0 or step == self.total_steps:
            print(line, file=sys.stderr, flush=True)

    def close(self) -> None:
        self.sync_tensorboard()
        self.tensorboard.close()
        if self.scratch is not None:
            self.scratch.cleanup()
