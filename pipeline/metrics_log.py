"""Per-step metrics: metrics.jsonl, TensorBoard events and a live progress line."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

from torch.utils.tensorboard import SummaryWriter

METRICS_FILE = "metrics.jsonl"


class MetricsLog:
    def __init__(self, output_dir: Path, total_steps: int, resume_step: int = 0, elapsed_s: float = 0.0):
        self.path = output_dir / METRICS_FILE
        self.total_steps = total_steps
        self.start = time.time() - elapsed_s  # time/elapsed_s continues across resumes
        self.first_step, self.first_time = resume_step, time.time()
        self.latest_eval: dict[str, float] = {}
        if self.path.exists():  # a resumed run drops the lines written after its checkpoint
            kept = [line for line in self.path.read_text().splitlines() if json.loads(line)["step"] <= resume_step]
            self.path.write_text("".join(line + "\n" for line in kept))
        self.tensorboard = SummaryWriter(str(output_dir / "tensorboard"))
        self.interactive = sys.stderr.isatty()

    def elapsed(self) -> float:
        return time.time() - self.start

    def write(self, step: int, metrics: dict[str, float]) -> dict:
        record = {"step": step, "time/elapsed_s": round(self.elapsed(), 3), **metrics}
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")
        for key, value in metrics.items():
            self.tensorboard.add_scalar(key, value, step)
        self.tensorboard.flush()
        self.latest_eval.update({k: v for k, v in metrics.items() if k.startswith("eval/")})
        self._progress(step, metrics)
        return record

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
        self.tensorboard.close()
