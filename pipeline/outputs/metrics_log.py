"""Per-step metrics: metrics.jsonl (through the run's storage), TensorBoard events, the trackers of
pipeline/outputs/trackers.py (W&B, MLflow) and a live progress line.

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
from tqdm import tqdm

from pipeline.errors import TokenforgeError
from pipeline.outputs.trackers import Trackers
from pipeline.storage import Storage

METRICS_FILE = "metrics.jsonl"
TENSORBOARD = "tensorboard"


def read_metrics(storage: Storage) -> list[dict]:
    """The run's metrics records, without a torn last line (a write cut short by a kill: it never counted).
    A line that is not JSON with records after it is damage a kill cannot cause: refused, naming the line,
    rather than dropping the history after it."""
    if not storage.exists(METRICS_FILE):
        return []
    lines = storage.read_text(METRICS_FILE).splitlines()
    records = []
    for number, line in enumerate(lines, 1):
        try:
            records.append(json.loads(line))
        except ValueError:
            if any(rest.strip() for rest in lines[number:]):
                raise TokenforgeError(
                    f"{storage.display(METRICS_FILE)} line {number} is not valid JSON, with {len(lines) - number} "
                    "lines after it; "
                    "repair or delete that line (the records after it are kept), then run the command again"
                ) from None
            break
    return records


class MetricsLog:
    def __init__(
        self,
        storage: Storage,
        total_steps: int,
        keep_through: int = -1,
        elapsed_s: float = 0.0,
        progress: bool = True,
        tensorboard: bool = True,
        trackers: Trackers | None = None,
    ):
        """`keep_through`: the step of the checkpoint a resumed run continues from (-1: from scratch); the
        lines written after it are dropped. `progress`: show the progress line on stderr. `tensorboard`:
        write TensorBoard events; `trackers`: W&B / MLflow runs that get every record too."""
        self.storage = storage
        self.total_steps = total_steps
        self.start = time.time() - elapsed_s  # time/elapsed_s continues across resumes
        self.first_step = max(keep_through, 0)
        self.rate_from: tuple[int, float] | None = None  # (step, time) the ETA's rate is measured from
        self.latest_eval: dict[str, float] = {}
        resumed = storage.exists(METRICS_FILE)
        if resumed:
            kept = [r for r in read_metrics(storage) if r["step"] <= keep_through]
            storage.write_text(METRICS_FILE, "".join(json.dumps(r) + "\n" for r in kept))
        # TensorBoard writes local files: into the run directory when it is local, else into a scratch
        # directory copied to storage with every checkpoint (sync_tensorboard)
        self.scratch = (
            None if storage.local or not tensorboard else tempfile.TemporaryDirectory(prefix="tokenforge-tb-")
        )
        events = storage.path(TENSORBOARD) if storage.local else self.scratch.name if self.scratch else None
        self.tensorboard = (
            SummaryWriter(events, purge_step=keep_through + 1 if resumed else None) if tensorboard else None
        )
        self.trackers = trackers
        self.interactive = sys.stderr.isatty()
        self.bar: tqdm | None = None  # the live progress bar, on a terminal
        self.progress = progress

    def elapsed(self) -> float:
        return time.time() - self.start

    def write(self, step: int, metrics: dict[str, float]) -> dict:
        record = {"step": step, "time/elapsed_s": round(self.elapsed(), 3), **metrics}
        self.storage.append_text(METRICS_FILE, json.dumps(record) + "\n")
        if self.tensorboard is not None:
            for key, value in metrics.items():
                self.tensorboard.add_scalar(key, value, step)
            self.tensorboard.flush()
        if self.trackers is not None:
            self.trackers.log(step, metrics)
        self.latest_eval.update({k: v for k, v in metrics.items() if k.startswith("eval/")})
        if self.progress:
            self._progress(step, metrics)
        return record

    def sync_tensorboard(self) -> None:
        """Copy the TensorBoard events to remote storage (a no-op when the run directory is local)."""
        if self.scratch is not None:
            self.storage.upload_dir(Path(self.scratch.name), TENSORBOARD)

    def _progress(self, step: int, metrics: dict[str, float]) -> None:
        """On a terminal, a live tqdm bar (step, ETA, reward, last eval, throughput) with each eval's line kept
        above it; otherwise (a log file, a Ray job) one plain line per step."""
        # The ETA's rate counts from the end of the first step this process trains, not from its start: the
        # actors' start-up, step 0's eval and the first step's warm-up (allocations, first kernels) made the first
        # ETA several times the real remaining time. ETA = (now - t_r) / (step - r) * (total - step).
        now = time.time()
        if step <= self.first_step + 1:
            self.rate_from = (step, now)
        fields = []
        if "reward/total/mean" in metrics:
            fields.append(f"reward {metrics['reward/total/mean']:.3f}")
        fields += [f"{k} {v:.3f}" for k, v in self.latest_eval.items()]
        if "throughput/tokens_per_s" in metrics:
            fields.append(f"{metrics['throughput/tokens_per_s']:.0f} tok/s")
        timing = f"elapsed {self.elapsed():.0f}s"
        if self.rate_from is not None and step > self.rate_from[0]:  # no rate before a step after the first: no guess
            rate_step, rate_time = self.rate_from
            timing += f" ETA {(now - rate_time) / (step - rate_step) * (self.total_steps - step):.0f}s"
        line = " | ".join([f"step {step}/{self.total_steps}", *fields, timing])
        if not self.interactive:
            print(line, file=sys.stderr, flush=True)
            return
        if self.bar is None:
            # the bar's time is the line's (elapsed, ETA), not tqdm's own estimate, which counts the first step too
            self.bar = tqdm(
                total=self.total_steps,
                initial=step,
                desc="step",
                file=sys.stderr,
                dynamic_ncols=True,
                bar_format="{desc} {n_fmt}/{total_fmt} {bar}{postfix}",
            )  # tqdm puts ", " before the postfix
        if any(k.startswith("eval/") for k in metrics):
            self.bar.write(line, file=sys.stderr)
        self.bar.set_postfix_str(" | ".join([*fields, timing]), refresh=False)
        self.bar.update(step - self.bar.n)

    def log_samples(self, step: int, samples) -> None:
        """An eval's scored samples (the eval dump's table) to the trackers that show tables."""
        if self.trackers is not None:
            self.trackers.log_samples(step, samples)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        if self.trackers is not None:
            self.trackers.close()
        if self.tensorboard is None:
            return
        self.sync_tensorboard()
        self.tensorboard.close()
        if self.scratch is not None:
            self.scratch.cleanup()
