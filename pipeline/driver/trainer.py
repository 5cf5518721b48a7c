"""The driver: prompts -> rollout workers -> reward pool -> learner -> weight sync, once per step.

`train(config)` is the whole run. It validates every input before Ray starts, creates the three
actor roles with resources from config, evaluates greedily at step 0 and every
`trainer.eval_every` steps, writes metrics and checkpoints through the run's storage, and can resume.
Ray Tune (and any other caller) gets each eval step's metrics and checkpoint through the `report`
callback.

Faults: a rollout or reward worker that dies is restarted by Ray and its shard resubmitted (the
rollout worker first gets the current weights back). A dead or failing learner, a lost node, an actor that
stops answering or a storage error that may pass (RECOVERABLE) ends the attempt: the pipeline is rebuilt from
the last published checkpoint, up to `trainer.max_failures` times, then the run stops naming the cause and
the `--resume` command.
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import pyarrow as pa
import pyarrow.compute as pc
import ray

from actors.rollout_worker import GENERATE_SECONDS, rollout_worker_class
from actors.vllm_worker import check_servable
from pipeline import storage as store
from pipeline.algorithm.advantages import NEEDS_GREEDY
from pipeline.batch import sampled_rows
from pipeline.config import TrainConfig, config_to_yaml
from pipeline.data.inputs import check_data_unchanged, load_inputs, with_builtin_defaults
from pipeline.data.loading import PromptSampler
from pipeline.driver.actor_group import ACTOR_LOST, ActorFailed, ActorGroup, ActorTimeout, ShardCalls, failure_cause
from pipeline.driver.learner_group import save_learner, start_learners, submit_train_step
from pipeline.driver.placement import connect_ray, decide_learner_gpus, ensure_resources, withdraw_resource_request
from pipeline.driver.reward_pool import RewardPool
from pipeline.driver.weight_sync import WEIGHT_SYNCS, WeightSync
from pipeline.errors import TokenforgeError, TransientStorageError
from pipeline.outputs import dumps
from pipeline.outputs.metrics_log import METRICS_FILE, MetricsLog, read_metrics
from pipeline.outputs.trackers import Trackers, require_loggers
from pipeline.preflight import check
from pipeline.rewards.coco import eval_scores
from pipeline.rewards.components import statistics_columns
from pipeline.runtime.weights import StaleWeights
from pipeline.storage import Storage

Report = Callable[[dict, str | None], None]  # (metrics record, published checkpoint directory or None)
TRAINER_STATE = "trainer_state.json"
# What ends an attempt but not the run: a dead or restarting actor, a lost node, an actor that stopped answering or
# failed (a CUDA fault, a full /tmp), a rollout worker still on stale weights after its resyncs, a storage hiccup
RECOVERABLE = (
    *ACTOR_LOST,
    ray.exceptions.NodeDiedError,
    ray.exceptions.ObjectLostError,
    ActorTimeout,
    ActorFailed,
    StaleWeights,
    TransientStorageError,
)


class Pipeline:
    """The driver's handles on the three actor roles, and the weights the rollout workers must hold."""

    def __init__(
        self,
        config: TrainConfig,
        run_id: str,
        resume: tuple[str, str] | None = None,
        train_data: pa.Table | None = None,
    ):
        """Rollout and reward workers start from model.path; the learner too, or from the published
        checkpoint `resume` = (storage URI, directory); `train_data`: the training set's columns that reward
        components compute statistics from (statistics_columns). Use it as a context manager: every actor it
        started is killed on the way out, whatever happens."""
        self.train_data = train_data
        self.config = config
        self.groups: list[ActorGroup] = []
        self.version = 0  # of the last published weights
        self.weight_sync: WeightSync | None = None  # rollout.weight_sync's strategy
        self.load_s = 0.0  # the slowest worker's receive-and-load seconds of the last version they loaded
        try:
            self._start(config, run_id, resume)
        except BaseException:
            self.close()
            raise

    def _start(self, config: TrainConfig, run_id: str, resume: tuple[str, str] | None) -> None:
        timeout = config.trainer.actor_timeout_s
        rollout = config.rollout
        self.rollout = ActorGroup(
            rollout_worker_class(rollout.backend),
            rollout.num_workers,
            role="rollout",
            run_id=run_id,
            num_cpus=rollout.num_cpus_per_worker,
            num_gpus=rollout.num_gpus_per_worker,
            resources=rollout.resources_per_worker,
            timeout_s=timeout,
            init_args=(config, config.model.path),
            max_restarts=-1,  # a dead worker comes back; generate() gives it the current weights first
        )
        self.groups.append(self.rollout)
        self.reward = RewardPool(config, config.model.path, run_id, self.train_data)
        self.groups.append(self.reward.group)
        self.learner = start_learners(config, config.model.path, run_id, timeout, resume)
        self.groups.append(self.learner)
        self.weight_sync = WEIGHT_SYNCS[rollout.weight_sync](self.learner, self.rollout, run_id, timeout)

    @property
    def weights(self):
        """The ObjectRef of the last published weights, if they are in the object store."""
        return self.weight_sync.weights

    def close(self) -> None:
        for group in self.groups:
            group.close()

    def __enter__(self) -> Pipeline:
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

    def submit_generation(self, prompts: pa.Table, step: int, greedy: bool = False) -> ShardCalls:
        """Start sampling `prompts` (one shard per rollout worker) with the weights published last; returns at once."""
        group_size = 1 if greedy else self.config.rollout.group_size
        baseline = not greedy and self.config.algorithm.estimator in NEEDS_GREEDY  # self_critical: + greedy rows
        return self.rollout.submit_shards(
            "generate",
            prompts,
            group_size=group_size,
            greedy=greedy,
            step=step,
            version=self.version,
            greedy_baseline=baseline,
        )

    def generated_and_scored(
        self, calls: ShardCalls, names: list[str], step: int, timings: dict[str, float]
    ) -> tuple[pa.Table, int]:
        """(the samples of `calls` with one reward/<name> column per component, without those dropped by
        on_error=drop; the number generated). Each shard is scored as soon as it is generated.
        Adds to timings: time/rollout_s (waiting for generation), time/reward_s (the rest), time/generate_s (the
        slowest rollout worker's own seconds of generation)."""
        spent: dict[str, float] = {"time/generate_s": 0.0}

        def generated():  # each shard as it is done; the slowest worker's own generation seconds in time/generate_s
            for i, table in self.rollout.shard_results(calls, on_restart=self._give_weights):
                seconds = float(table.schema.metadata[GENERATE_SECONDS.encode()])
                spent["time/generate_s"] = max(spent["time/generate_s"], seconds)
                yield i, table.replace_schema_metadata(None)

        shards = waited(generated(), spent, "time/rollout_s")
        with timed(spent, "time/reward_s"):
            scored, dropped = self.reward.score_pieces(shards, len(calls.refs), names, step)
        spent["time/reward_s"] -= spent["time/rollout_s"]
        for key, seconds in spent.items():
            timings[key] = timings.get(key, 0.0) + seconds
        self._note_loaded()
        return scored.filter(pc.invert(dropped)), sampled_rows(scored).num_rows  # (self_critical's greedy rows aside)

    def _give_weights(self, worker) -> dict:
        """A restarted rollout worker (or one whose broadcast failed) holds other weights: give it the published
        ones; its shard is resubmitted asking for their version."""
        self.weight_sync.give(worker, self.version)
        return {"version": self.version}

    def sync_weights(self) -> None:
        """Publish the learner's weights as a new version (rollout.weight_sync): one object in the object store
        that each rollout worker fetches, or a broadcast from the learner. A worker loads it after the call it
        is running (never mid-generation), and every generation submitted from now on asks for that version."""
        learner = self.learner.actors[0]
        self.version = self.learner.get([learner.get_version.remote()])[0]
        self.weight_sync.publish(self.version)

    def _note_loaded(self) -> None:
        """After a generation with the last published weights: record how long the workers took to receive them."""
        seconds = self.weight_sync.loaded_seconds()
        if seconds is not None:
            self.load_s = seconds

    def evaluate(self, eval_prompts: pa.Table | None, step: int) -> tuple[dict[str, float], pa.Table | None]:
        """(eval/<metric> of greedy samples on the held-out prompts, those samples scored with eval/<metric>
        per sample: the eval dump's table); ({}, None) without eval prompts."""
        if eval_prompts is None:
            return {}, None
        names = self.config.trainer.eval_metrics
        scored, _ = self.generated_and_scored(self.submit_generation(eval_prompts, step, greedy=True), names, step, {})
        return eval_scores(self.config, scored, names), dumps.eval_dump(scored, names)

    def take_faults(self) -> dict[str, float]:
        """fault/* and reward/* counters since the last call (for the step's metrics)."""
        return {**self.rollout.take_faults(), **self.reward.take_counts()}


def waited(items: Iterator, timings: dict[str, float], key: str) -> Iterator:
    """`items`, adding to timings[key] the seconds spent waiting for each."""
    timings[key] = 0.0
    while True:
        start = time.perf_counter()
        item = next(items, None)
        timings[key] += time.perf_counter() - start
        if item is None:
            return
        yield item


@contextmanager
def timed(timings: dict[str, float], key: str) -> Iterator[None]:
    """timings[key] = seconds spent in the with-block."""
    start = time.perf_counter()
    yield
    timings[key] = time.perf_counter() - start


class RolloutQueue:
    """The steps whose rollouts were submitted: each generated with the weights published when it was
    submitted, so with trainer.max_staleness = k up to k versions behind the learner that trains on it."""

    def __init__(self, pipeline: Pipeline, sampler: PromptSampler, config: TrainConfig, first_step: int):
        self.pipeline, self.sampler, self.config = pipeline, sampler, config
        self.next_step = first_step  # the first step not submitted yet
        self.calls: dict[int, ShardCalls] = {}  # step -> its generation, in flight
        self.ready: dict[int, tuple[pa.Table, int]] = {}  # step -> (scored samples, samples generated)

    def submit_through(self, last: int) -> None:
        """Start the generation of every step up to `last` not started yet."""
        while self.next_step <= last:
            step = self.next_step
            prompts = self.sampler.next_batch(first_group_id=step * self.config.trainer.prompts_per_step)
            self.calls[step] = self.pipeline.submit_generation(prompts, step)
            self.next_step += 1

    def prepare(self, step: int, timings: dict[str, float]) -> None:
        """Wait for the samples of `step` to be generated and scored (if it was submitted and is not ready)."""
        if step in self.calls:
            names = list(self.config.reward.weights)
            self.ready[step] = self.pipeline.generated_and_scored(self.calls.pop(step), names, step, timings)

    def take(self, step: int, timings: dict[str, float]) -> tuple[pa.Table, int]:
        """(the scored samples of `step`, the number generated), waited for if need be."""
        self.prepare(step, timings)
        return self.ready.pop(step)


class Checkpointer:
    """Decides which steps end with a checkpoint, and writes them: every trainer.save_every steps, the last step,
    and with a `report` callback (Tune) every eval step, so that each report carries a checkpoint. A checkpoint is
    also where the rollout queue synchronises (submit_limit): resuming from it must reproduce the straight run."""

    def __init__(self, config: TrainConfig, storage: Storage, pipeline: Pipeline, reports: bool):
        self.config, self.storage, self.pipeline, self.reports = config, storage, pipeline, reports

    def saves(self, step: int) -> bool:
        """Whether `step` ends with a checkpoint (and, with overlap, a synchronisation of the rollout queue)."""
        trainer_cfg = self.config.trainer
        every = step % trainer_cfg.save_every == 0
        return every or step == trainer_cfg.total_steps or (self.reports and step % trainer_cfg.eval_every == 0)

    def submit_limit(self, step: int) -> int:
        """The last step whose rollouts may start at `step`: they start with the current weights (version step - 1),
        up to step + trainer.max_staleness, but none past the next checkpoint: a run resumed from checkpoint c
        generates steps c+1..c+k with version c, so the straight run must too, or the resume would not be exact
        (docs/reliability.md)."""
        last = step
        while last < step + self.config.trainer.max_staleness and not self.saves(last):
            last += 1
        return last

    def maybe_save(self, step: int, sampler: PromptSampler, log: MetricsLog) -> str | None:
        """At a step that saves: the TensorBoard events synced, the checkpoint published (then the old ones
        pruned); returns its directory, or None at other steps."""
        if not self.saves(step):
            return None
        log.sync_tensorboard()
        # nothing past a checkpoint's step is submitted before it (submit_limit): the sampler stands at its step
        state = {"step": step, "sampler": sampler.state(), "elapsed_s": log.elapsed()}
        saved = self.save(step, state)
        self.prune()
        return saved

    def save(self, step: int, trainer_state: dict) -> str:
        """Upload the learner's files (from the learner's process) and the trainer state, then publish the
        manifest, last; returns the checkpoint's directory."""
        directory = store.checkpoint_dir(step)
        files = save_learner(self.pipeline.learner, self.storage.uri, directory)
        state = json.dumps(trainer_state, indent=1).encode()
        self.storage.write_bytes(f"{directory}/{TRAINER_STATE}", state)
        files[TRAINER_STATE] = {"size": len(state), "sha256": store.sha256_bytes(state)}
        return store.publish_checkpoint(self.storage, step, files)

    def prune(self) -> None:
        """trainer.keep_checkpoints newest checkpoints, plus the best by the first eval metric with keep_best."""
        keep = self.config.trainer.keep_checkpoints
        if keep is None:
            return
        protected = set()
        metric = f"eval/{self.config.trainer.eval_metrics[0]}"
        if self.config.trainer.keep_best:
            published = set(store.published_steps(self.storage))
            records = read_metrics(self.storage)
            scored = [(r[metric], r["step"]) for r in records if metric in r and r["step"] in published]
            protected = {max(scored)[1]} if scored else set()
        store.prune_checkpoints(self.storage, keep, protected)


# the seconds of the step spent waiting for the actors (or writing dumps); the rest is the driver's own
WAITS = ("time/rollout_s", "time/reward_s", "time/learn_s", "time/publish_s", "time/dump_s")


def step_metrics(
    learned: dict[str, float],
    timings: dict[str, float],
    faults: dict[str, float],
    sync_s: float,
    generated: int,
    trained: int,
) -> dict[str, float]:
    """A training step's metrics: the learner's (`learned`), the driver's timings, the fault counters, and what
    follows from them: time/driver_overhead_frac = 1 - sum(WAITS) / time/step_s, time/sync_s (the slowest rollout
    worker's receive-and-load seconds of the last weights), rollout/samples (generated: prompts_per_step x
    group_size, whatever failed on the way), throughput/tokens_per_s = learner/tokens / time/step_s and
    throughput/samples_per_s = trained / time/step_s (trained: the samples that reached the learner)."""
    step_s = timings["time/step_s"]
    metrics = {
        **learned,
        **timings,
        "time/driver_overhead_frac": 1 - sum(timings.get(k, 0.0) for k in WAITS) / step_s,
        "time/sync_s": sync_s,
        **faults,
    }
    metrics["rollout/samples"] = float(generated)
    metrics["throughput/tokens_per_s"] = metrics["learner/tokens"] / step_s
    metrics["throughput/samples_per_s"] = trained / step_s
    return metrics


def run_steps(
    config: TrainConfig,
    storage: Storage,
    pipeline: Pipeline,
    sampler: PromptSampler,
    eval_prompts: pa.Table | None,
    log: MetricsLog,
    done_steps: int,
    report: Report | None,
) -> dict:
    """The training loop from step `done_steps` + 1 on; returns the last metrics record."""
    trainer_cfg = config.trainer
    record: dict = {}

    def evaluate(step: int, metrics: dict[str, float]) -> pa.Table | None:
        """Eval metrics into `metrics` (and time/eval_s, the whole eval's seconds); the samples to
        eval/step_N.parquet (trainer.dump_eval)."""
        with timed(metrics, "time/eval_s"):
            scores, samples = pipeline.evaluate(eval_prompts, step)
            metrics.update(scores)
            if samples is not None and trainer_cfg.dump_eval:
                with timed(metrics, "time/eval_dump_s"):
                    dumps.write_dump(storage, dumps.EVAL, step, samples)
        return samples

    if done_steps == 0 and eval_prompts is not None:
        metrics: dict[str, float] = {}
        samples = evaluate(0, metrics)
        record = log.write(0, metrics)
        log.log_samples(0, samples)
        if report:
            report(record, None)

    checkpointer = Checkpointer(config, storage, pipeline, reports=report is not None)
    queue = RolloutQueue(pipeline, sampler, config, first_step=done_steps + 1)
    for step in range(done_steps + 1, trainer_cfg.total_steps + 1):
        # every step logs the generation's timings, 0 where it generated nothing (overlapped, the last step)
        timings = dict.fromkeys(("time/rollout_s", "time/reward_s", "time/generate_s"), 0.0)
        with timed(timings, "time/step_s"):
            queue.submit_through(checkpointer.submit_limit(step))
            rollouts, generated = queue.take(step, timings)  # generated (now, or during the last update) and scored
            trained = sampled_rows(rollouts).num_rows  # what the update trains on: not self_critical's greedy rows
            learning = submit_train_step(pipeline.learner, rollouts, step) if trained else None
            if trainer_cfg.max_staleness:
                queue.prepare(step + 1, timings)  # while the learner updates: the next batch, generated and scored
            with timed(timings, "time/learn_s"):
                learned = pipeline.learner.get(learning)[0] if learning else {"learner/tokens": 0.0}
            with timed(timings, "time/publish_s"):
                pipeline.sync_weights()
            if trained and dumps.dumps_rollouts(trainer_cfg, step):
                with timed(timings, "time/dump_s"):
                    columns = pipeline.learner.get([pipeline.learner.actors[0].learned_columns.remote()])[0]
                    dumps.write_dump(storage, dumps.ROLLOUTS, step, dumps.rollout_dump(rollouts, columns))
        metrics = step_metrics(learned, timings, pipeline.take_faults(), pipeline.load_s, generated, trained)

        is_last = step == trainer_cfg.total_steps
        samples = evaluate(step, metrics) if step % trainer_cfg.eval_every == 0 or is_last else None
        record = log.write(step, metrics)  # durable before the checkpoint that covers it is published
        if samples is not None:
            log.log_samples(step, samples)
        saved = checkpointer.maybe_save(step, sampler, log)
        if report and any(k.startswith("eval/") for k in metrics):
            report(record, saved)
    return record


def start_state(storage: Storage, resume: bool) -> tuple[str | None, dict]:
    """(the checkpoint directory to resume from or None, its trainer state or a fresh one). Resuming, a
    checkpoint cut short (no valid manifest) is deleted first, a newer one whose files fail their sha256
    is deleted with a warning, and without any checkpoint the run starts again from step 0."""
    fresh = {"step": 0, "sampler": {"epoch": 0, "position": 0}, "elapsed_s": 0.0}
    if not resume:
        return None, fresh
    store.remove_unpublished(storage)
    latest = store.resumable_checkpoint(storage, warn=lambda line: print(f"tokenforge: warning: {line}", flush=True))
    if latest is None:
        return None, fresh
    directory, _ = latest
    return directory, json.loads(storage.read_text(f"{directory}/{TRAINER_STATE}"))


def attempt(
    config: TrainConfig, storage: Storage, train_prompts, eval_prompts, resume: bool, report: Report | None
) -> dict:
    """One attempt at the run: actors from scratch (or from the last published checkpoint) to the last step."""
    ensure_resources(
        config
    )  # a restart after a lost node waits for the autoscaler's replacement (ray.autoscale_wait_s)
    latest, state = start_state(storage, resume)
    if resume:
        print(
            f"tokenforge: resuming {storage.display()} from "
            + (f"{latest} (step {state['step']})" if latest else "step 0 (no checkpoint yet)"),
            flush=True,
        )
    resume_from = (storage.uri, latest) if latest else None
    statistics = statistics_columns(config, train_prompts)  # e.g. cider's references, for its document frequencies
    with Pipeline(config, uuid.uuid4().hex[:8], resume_from, statistics) as pipeline:
        placement = {group.role: group.placements() for group in pipeline.groups}
        withdraw_resource_request()  # placed: the autoscaler may scale idle nodes down again
        storage.write_text("placement.json", json.dumps(placement, indent=1))
        if report is None:  # a Tune trial's are in its placement.json: Tune's console shows the trials
            for role, actors in placement.items():
                print(
                    f"tokenforge: {role}: " + ", ".join(f"{a['device']} on {a['node_ip']}" for a in actors), flush=True
                )
        if config.learner.num_gpus and placement["learner"][0]["device"] == "cpu":
            print(
                "tokenforge: the learner holds a Ray GPU but torch sees no CUDA device on "
                f"{placement['learner'][0]['node_ip']}: "
                "it runs on CPU there (install a CUDA build of torch on GPU nodes)",
                flush=True,
            )
        if latest:
            pipeline.sync_weights()  # the rollout workers started from model.path
        sampler = PromptSampler(train_prompts, config.trainer.prompts_per_step, config.seed, config.data.shuffle)
        sampler.load_state(state["sampler"])
        keep_through = state["step"] if latest else -1  # from step 0, even its eval line is redone
        log = MetricsLog(
            storage,
            config.trainer.total_steps,
            keep_through,
            elapsed_s=state["elapsed_s"],
            progress=report is None,  # under Tune its status table shows the trials' progress
            tensorboard="tensorboard" in config.trainer.loggers,
            trackers=Trackers(config, storage),
        )
        try:
            return run_steps(config, storage, pipeline, sampler, eval_prompts, log, state["step"], report)
        finally:
            log.close()


def train(config: TrainConfig, resume: bool = False, report: Report | None = None) -> dict[str, float]:
    """Run (or resume) training; returns the last step's metrics record. Ctrl-C at any moment ends it with one
    line (how to continue), and an autoscaler request this run made is withdrawn however it ends."""
    config = with_builtin_defaults(check(config))  # a bad config is one line before Ray starts
    storage = Storage(config.run_uri)
    try:
        return train_with_retries(config, storage, resume, report)
    except KeyboardInterrupt:
        if storage.exists("config.yaml"):
            raise TokenforgeError(
                "interrupted; continue from the last checkpoint with: "
                f"tokenforge train --resume {storage.for_commands()}"
            ) from None
        raise TokenforgeError(
            "interrupted before the run started (nothing written); run the same command again"
        ) from None
    finally:
        withdraw_resource_request()  # the cluster may scale down again


def train_with_retries(config: TrainConfig, storage: Storage, resume: bool, report: Report | None) -> dict[str, float]:
    """Check the inputs, join Ray, then attempt the run, retrying a RECOVERABLE failure from the last checkpoint."""
    train_prompts, eval_prompts = load_inputs(config)
    require_loggers(config)
    check_servable(config)  # rollout.backend=vllm: a model its engine refuses, in one line before Ray starts
    if not resume and storage.exists(METRICS_FILE):
        raise TokenforgeError(
            f"{storage.display()!r} already holds a run; resume it with --resume or pick another output_dir / "
            "storage.uri"
        )
    if resume:
        latest = store.latest_checkpoint(storage)
        if latest and latest[1]["step"] >= config.trainer.total_steps:
            print(
                f"tokenforge: {storage.display()} is complete (step {latest[1]['step']} of "
                f"{config.trainer.total_steps}); raise trainer.total_steps to train on",
                flush=True,
            )
            return next((r for r in reversed(read_metrics(storage)) if r["step"] == latest[1]["step"]), {})
    check_data_unchanged(storage, config, train_prompts, eval_prompts, resume)
    storage.write_text("config.yaml", config_to_yaml(config))
    connect_ray(config)
    config = decide_learner_gpus(config)
    failures = 0
    while True:
        try:
            return attempt(config, storage, train_prompts, eval_prompts, resume or failures > 0, report)
        except RECOVERABLE as error:
            failures += 1
            cause = failure_cause(error)
            if failures > config.trainer.max_failures:
                raise TokenforgeError(
                    f"the run failed {failures} times (trainer.max_failures={config.trainer.max_failures}), "
                    f"last: {cause}; "
                    f"continue it with: tokenforge train --resume {storage.for_commands()}"
                ) from None
            print(
                f"tokenforge: failure {failures} of at most {config.trainer.max_failures} ({cause}); "
                "restarting the pipeline from the last checkpoint",
                flush=True,
            )
