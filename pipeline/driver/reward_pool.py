"""The reward pool: `reward.num_workers` RewardWorker actors that never hang the run.

A batch is split into one shard per worker and every (shard, component) pair is one task, so a
slow or broken component is caught on its own. The driver waits for each task at most
`reward.timeout_s`; a task that times out has its worker replaced by a fresh one (components
rebuilt) and is retried on the next idle worker, up to `reward.max_retries` times. A worker that
dies on its own (a crash, an OOM kill) is restarted by Ray and its task resubmitted the same way.
When the retries are spent the component's `on_error` policy decides: `raise` stops the run naming
component and samples, `zero` scores the samples 0, `drop` leaves them out of the update. Every sample's
score is taken exactly once.
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass

import pyarrow as pa
import ray

from actors.reward_worker import RewardWorker, Scores, with_scores
from pipeline.config import TrainConfig
from pipeline.driver.actor_group import ActorGroup, shard_bounds
from pipeline.errors import TokenforgeError


@dataclass
class Task:
    shard: int
    name: str
    attempt: int  # 0 for the first try
    worker: int
    deadline: float
    innocent: bool = False  # its worker was killed for another task's timeout: a retry does not count


class RewardPool:
    def __init__(self, config: TrainConfig, tokenizer_path: str, run_id: str, train_data: pa.Table | None = None):
        """`train_data`: the training set's columns the components compute statistics from, handed to every worker
        through the object store (one copy); None: each worker reads data.train_file itself."""
        reward = config.reward
        self.config = config
        # held here while the workers live: a restarted worker is built again from it (Ray keeps no copy of its own)
        self.train_data = None if train_data is None else ray.put(train_data)
        self.names = list(reward.components)
        self.group = ActorGroup(
            RewardWorker,
            reward.num_workers,
            role="reward",
            run_id=run_id,
            num_cpus=reward.num_cpus_per_worker,
            num_gpus=reward.num_gpus_per_worker,
            resources=reward.resources_per_worker,
            timeout_s=config.trainer.actor_timeout_s,  # start-up; scoring tasks use reward.timeout_s
            init_args=(
                config,
                tokenizer_path,
                self.names,
                reward.num_gpus_per_worker > 0,
                self.train_data,
            ),
            max_restarts=-1,  # a killed or crashed worker comes back with its components rebuilt
        )
        self.counts: Counter = Counter()
        self.started = False  # workers answered once: scoring deadlines then exclude their start-up

    @property
    def actors(self) -> list:
        return self.group.actors

    def score(self, batch: pa.Table, names: list[str], step: int = 0) -> tuple[pa.Table, pa.Array]:
        """`batch` with one reward/<name> column per component, and a boolean `dropped` mask (on_error=drop)."""
        return self.score_pieces([(0, batch)], 1, names, step)

    def score_pieces(
        self, pieces: Iterable[tuple[int, pa.Table]], count: int, names: list[str], step: int = 0
    ) -> tuple[pa.Table, pa.Array]:
        """`score` of a batch that arrives as `count` pieces (index, table) in any order, e.g. rollout shards as
        each is generated: scoring a piece starts as soon as it arrives; the result is in index order."""
        if not self.started:
            self.group.get([actor.__ray_ready__.remote() for actor in self.actors])
            self.started = True
        parts = max(1, len(self.actors) // count)  # scoring shards per piece: every worker gets one
        shards: list[pa.Table] = []  # in arrival order
        keys: list[tuple[int, int]] = []  # (piece, first row) of each shard
        pending: dict[ray.ObjectRef, Task] = {}
        results: dict[tuple[int, str], Scores] = {}

        def submit(shard: int, name: str, attempt: int, worker: int, deadline: float | None = None) -> None:
            worker %= len(self.actors)
            ref = self.actors[worker].score.remote(shards[shard], name, step)
            pending[ref] = Task(
                shard, name, attempt, worker, deadline or time.monotonic() + self.config.reward.timeout_s
            )

        def next_worker(after: int) -> int:
            """The next worker with nothing queued, else simply the next."""
            n = len(self.actors)
            busy = {t.worker for t in pending.values()}
            order = [(after + k) % n for k in range(1, n + 1)]
            return next((w for w in order if w not in busy), order[0])

        def retry(task: Task, reason: str) -> None:
            if task.innocent:
                submit(task.shard, task.name, task.attempt, next_worker(task.worker))
            elif task.attempt < self.config.reward.max_retries:
                self.counts["reward/retries"] += 1
                submit(task.shard, task.name, task.attempt + 1, next_worker(task.worker))
            else:
                results[task.shard, task.name] = self._give_up(task, shards[task.shard], reason)

        for piece, table in pieces:  # while the next piece is awaited, the pieces before it are scored
            for start, length in shard_bounds(table.num_rows, parts):
                shards.append(table.slice(start, length))
                keys.append((piece, start))
                for name in names:
                    submit(len(shards) - 1, name, 0, len(shards) - 1)
        while pending:
            wait_s = max(0.0, min(t.deadline for t in pending.values()) - time.monotonic())
            ready, _ = ray.wait(list(pending), num_returns=1, timeout=wait_s)
            if ready:
                task = pending.pop(ready[0])
                try:
                    results[task.shard, task.name] = ray.get(ready[0])
                except ray.exceptions.ActorUnavailableError:  # died and restarting: again, same try, same deadline
                    self.counts["reward/resubmits"] += 1
                    time.sleep(0.2)
                    submit(task.shard, task.name, task.attempt, next_worker(task.worker), task.deadline)
                except ray.exceptions.RayActorError as error:
                    self.counts["reward/worker_deaths"] += not task.innocent
                    retry(task, f"its worker died ({type(error).__name__})")
                except ray.exceptions.RayTaskError as error:
                    cause = error.cause  # the worker's own exception (str(error) holds the remote traceback)
                    if isinstance(cause, TokenforgeError):
                        raise TokenforgeError(str(cause)) from None
                    raise
                continue
            for ref, task in list(pending.items()):
                if task.deadline <= time.monotonic() and ref in pending:
                    del pending[ref]
                    self.counts["reward/timeouts"] += 1
                    self._replace(task.worker, pending)
                    retry(task, f"no result within reward.timeout_s={self.config.reward.timeout_s:g}s")

        # a deadline that passed while the next piece was awaited is handled once the loop runs: a timed-out task
        # is retried then, so a slow generation costs at most a late retry, never a lost score
        in_order = sorted(range(len(shards)), key=keys.__getitem__)
        batch = pa.concat_tables([shards[i] for i in in_order])
        scores = {name: Scores.concat([results[i, name] for i in in_order]) for name in names}
        for name, result in scores.items():
            self.counts[f"reward/{name}/errors"] += len(result.failed)
        scored, dropped = with_scores(batch, scores, self.config)
        self.counts["reward/dropped"] += sum(dropped.to_pylist())
        return scored, dropped

    def _replace(self, worker: int, pending: dict[ray.ObjectRef, Task]) -> None:
        """Replace a stuck worker by a fresh one (components rebuilt). Its other tasks will fail and be
        retried without using up their tries."""
        for task in pending.values():
            if task.worker == worker:
                task.innocent = True
        self.group.replace(worker)
        self.counts["reward/worker_replacements"] += 1

    def _give_up(self, task: Task, shard: pa.Table, reason: str) -> Scores:
        spec = self.config.reward.components[task.name]
        ids = shard.column("sample_id").to_pylist()
        if spec.on_error == "raise":
            raise TokenforgeError(
                f"reward {task.name!r}: samples {ids[0]}-{ids[-1]} not scored after {task.attempt + 1} tries: "
                f"{reason}; "
                f"raise reward.timeout_s or set reward.components.{task.name}.on_error to zero or drop"
            )
        lengths = [len(r) for r in shard.column("response_ids").to_pylist()]
        return Scores([[0.0] * n for n in lengths], list(range(len(lengths))))

    def take_counts(self) -> dict[str, float]:
        """Error/timeout/drop counters since the last call (for the step's metrics)."""
        counts, self.counts = dict(self.counts), Counter()
        return {k: float(v) for k, v in counts.items()}
