"""The driver: prompts -> rollout workers -> reward pool -> learner -> weight sync, once per step.

`train(config)` is the whole run. It validates every input before Ray starts, creates the three
actor roles with resources from config, evaluates greedily at step 0 and every
`trainer.eval_every` steps, writes metrics and checkpoints, and can resume. Ray Tune (and any
other caller) gets each eval step's metrics and checkpoint through the `report` callback.
"""

from __future__ import annotations

import json
import os
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import ray

from actors.learner import Learner
from actors.rollout_worker import RolloutWorker
from pipeline import checkpoint
from pipeline.actor_group import ActorGroup
from pipeline.batch import DATASET_PROMPT, mean_reward
from pipeline.config import TrainConfig, save_config
from pipeline.data import PromptSampler, load_prompts
from pipeline.errors import TokenforgeError
from pipeline.metrics_log import METRICS_FILE, MetricsLog
from pipeline.models import builtin_paths, context_length, load_tokenizer
from pipeline.prompts import encode_prompts, set_chat_template
from pipeline.reward_components import COMPONENTS
from pipeline.reward_pool import RewardPool

Report = Callable[[dict, Path | None], None]


def with_builtin_defaults(config: TrainConfig) -> TrainConfig:
    """Fill null model/data paths with the built-in task's (the resolved config names them). An `auto`
    eval file is the built-in eval set only when the training prompts are the built-in ones too."""
    config = config.model_copy(deep=True)
    model, train, evaluation = builtin_paths(config.task)
    if config.data.eval_file == "auto":
        config.data.eval_file = str(evaluation) if config.data.evaluates else None
    config.model.path = config.model.path or str(model)
    config.data.train_file = config.data.train_file or str(train)
    return config


def load_inputs(config: TrainConfig) -> tuple[pa.Table, pa.Table | None]:
    """Train and eval prompts (None: data.eval_file is null), checked against the reward components,
    the chat template and the context length."""
    tokenizer = load_tokenizer(config.model.path, config.model.trust_remote_code)
    set_chat_template(tokenizer, config.model.chat_template)
    limit = context_length(config.model.path, config.model.trust_remote_code)
    needed = set()
    for name, spec in config.reward.components.items():
        needed.update(COMPONENTS[spec.type].required_columns(config.component_options(name)))
    data = config.data
    tables = []
    for key, source, split in [("data.train_file", data.train_file, data.train_split), ("data.eval_file", data.eval_file, data.eval_split)]:
        if source is None:
            tables.append(None)
            continue
        table = load_prompts(source, key, split)
        missing = sorted(needed - set(table.column_names))
        if missing:
            raise TokenforgeError(
                f"{key}: the reward components need fields {missing}, missing from the file (set the component's `column` option to use another field)"
            )
        try:
            _, ids = encode_prompts(tokenizer, table.column(DATASET_PROMPT).to_pylist(), data.add_special_tokens)
        except TokenforgeError as error:
            raise TokenforgeError(f"{key}: {error}") from None
        longest = max(range(len(ids)), key=lambda i: len(ids[i]))
        if len(ids[longest]) + config.rollout.max_new_tokens > limit:
            raise TokenforgeError(
                f"{key}: prompt {longest} has {len(ids[longest])} tokens; with rollout.max_new_tokens="
                f"{config.rollout.max_new_tokens} it exceeds the model context of {limit} tokens"
            )
        tables.append(table)
    train_table, eval_table = tables
    if eval_table is not None:
        if data.max_eval_samples:
            eval_table = eval_table.slice(0, data.max_eval_samples)
        eval_table = eval_table.append_column("group_id", pa.array(range(eval_table.num_rows), pa.int64()))
    return train_table, eval_table


def connect_ray(config: TrainConfig) -> None:
    """Join `ray.address` or RAY_ADDRESS if given, else start a local Ray."""
    if ray.is_initialized():
        return
    address = config.ray.address or os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address)
    else:
        ray.init(num_cpus=config.ray.num_cpus, include_dashboard=False)


def learner_gpus(config: TrainConfig) -> float:
    if config.learner.num_gpus is not None:
        return config.learner.num_gpus
    return 1.0 if ray.cluster_resources().get("GPU", 0) >= 1 else 0.0


def actor_bundles(config: TrainConfig) -> list[dict[str, float]]:
    """Ray resources of every actor: the learner, then each rollout worker, then each reward worker."""

    def bundle(cpus: float, gpus: float, custom: dict[str, float]) -> dict[str, float]:
        return {"CPU": cpus, **({"GPU": gpus} if gpus else {}), **custom}

    rollout, reward = config.rollout, config.reward
    return [
        bundle(config.learner.num_cpus, learner_gpus(config), config.learner.resources),
        *[bundle(rollout.num_cpus_per_worker, rollout.num_gpus_per_worker, rollout.resources_per_worker)] * rollout.num_workers,
        *[bundle(reward.num_cpus_per_worker, reward.num_gpus_per_worker, reward.resources_per_worker)] * reward.num_workers,
    ]


def check_resources(config: TrainConfig) -> None:
    """Fail fast when the cluster can never hold the actors this config asks for. With
    `ray.autoscale_wait_s` > 0, first ask Ray's autoscaler for them and wait that long."""
    wanted: dict[str, float] = {}
    for bundle in actor_bundles(config):
        for name, amount in bundle.items():
            wanted[name] = wanted.get(name, 0) + amount

    def missing() -> dict[str, tuple[float, float]]:
        have = ray.cluster_resources()
        return {r: (amount, have.get(r, 0)) for r, amount in wanted.items() if amount > have.get(r, 0) + 1e-9}

    if missing() and config.ray.autoscale_wait_s > 0:
        from ray.autoscaler.sdk import request_resources

        request_resources(bundles=[{r: a for r, a in wanted.items() if a > 0}])
        deadline = time.time() + config.ray.autoscale_wait_s
        while missing() and time.time() < deadline:
            time.sleep(5)
    for resource, (amount, have) in missing().items():
        raise TokenforgeError(
            f"the actors need {amount:g} {resource} in total but the Ray cluster has {have:g}"
            + (f" (after waiting ray.autoscale_wait_s={config.ray.autoscale_wait_s:g}s for the autoscaler)" if config.ray.autoscale_wait_s else "")
            + "; lower learner.num_cpus/num_gpus/resources, rollout.*_per_worker, reward.*_per_worker or the worker counts"
        )


class Pipeline:
    """The driver's handles on the three actor roles."""

    def __init__(self, config: TrainConfig, policy_path: str, run_id: str):
        """Rollout and reward workers start from model.path; the learner from `policy_path` (model.path or
        the checkpoint to resume): call sync_weights() before generating from a checkpoint. Use it as a
        context manager: every actor it started is killed on the way out, whatever happens."""
        self.config = config
        self.groups: list[ActorGroup] = []
        try:
            self._start(config, policy_path, run_id)
        except BaseException:
            self.close()
            raise

    def _start(self, config: TrainConfig, policy_path: str, run_id: str) -> None:
        timeout = config.trainer.actor_timeout_s
        rollout = config.rollout
        self.rollout = ActorGroup(
            RolloutWorker,
            rollout.num_workers,
            role="rollout",
            run_id=run_id,
            num_cpus=rollout.num_cpus_per_worker,
            num_gpus=rollout.num_gpus_per_worker,
            resources=rollout.resources_per_worker,
            timeout_s=timeout,
            init_args=(config, config.model.path),
        )
        self.groups.append(self.rollout)
        self.reward = RewardPool(config, config.model.path, run_id)
        self.groups.append(self.reward.group)
        gpus = learner_gpus(config)
        self.learner = ActorGroup(
            Learner,
            1,
            role="learner",
            run_id=run_id,
            num_cpus=config.learner.num_cpus,
            num_gpus=gpus,
            resources=config.learner.resources,
            timeout_s=timeout,
            init_args=(config, policy_path, config.model.path, gpus > 0),
        )
        self.groups.append(self.learner)

    def close(self) -> None:
        for group in self.groups:
            for actor in group.actors:
                ray.kill(actor)

    def __enter__(self) -> Pipeline:
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

    def generate(self, prompts: pa.Table, step: int, greedy: bool = False) -> pa.Table:
        group_size = 1 if greedy else self.config.rollout.group_size
        return self.rollout.map_shards("generate", prompts, group_size=group_size, greedy=greedy, step=step)

    def score(self, batch: pa.Table, names: list[str], step: int) -> pa.Table:
        """`batch` with one reward/<name> column per component, without the samples dropped by on_error=drop."""
        scored, dropped = self.reward.score(batch, names, step)
        return scored.filter(pc.invert(dropped))

    def sync_weights(self) -> int:
        """Learner -> every rollout worker: one object in the object store, fetched by each worker."""
        learner = self.learner.actors[0]
        version = self.learner.get([learner.get_version.remote()])[0]
        weights = learner.get_weights.remote()  # one ObjectRef; Ray resolves it in each worker
        self.rollout.call_all("set_weights", weights, version)
        return version

    def evaluate(self, eval_prompts: pa.Table | None, step: int) -> dict[str, float]:
        """eval/<metric> of greedy samples on the held-out prompts ({} without them)."""
        if eval_prompts is None:
            return {}
        names = self.config.trainer.eval_metrics
        scored = self.score(self.generate(eval_prompts, step, greedy=True), names, step)
        return {f"eval/{name}": mean_reward(scored, name) for name in names}


@contextmanager
def timed(timings: dict[str, float], key: str) -> Iterator[None]:
    """timings[key] = seconds spent in the with-block."""
    start = time.time()
    yield
    timings[key] = time.time() - start


def run_steps(
    config: TrainConfig,
    pipeline: Pipeline,
    sampler: PromptSampler,
    eval_prompts: pa.Table | None,
    log: MetricsLog,
    out: Path,
    done_steps: int,
    report: Report | None,
) -> dict:
    """The training loop from step `done_steps` + 1 on; returns the last metrics record."""
    trainer_cfg = config.trainer
    record: dict = {}
    if done_steps == 0 and eval_prompts is not None:
        record = log.write(0, pipeline.evaluate(eval_prompts, step=0))
        if report:
            report(record, None)
    for step in range(done_steps + 1, trainer_cfg.total_steps + 1):
        timings: dict[str, float] = {}
        with timed(timings, "time/step_s"):
            prompts = sampler.next_batch(first_group_id=step * trainer_cfg.prompts_per_step)
            with timed(timings, "time/rollout_s"):
                rollouts = pipeline.generate(prompts, step)
            with timed(timings, "time/reward_s"):
                rollouts = pipeline.score(rollouts, list(config.reward.weights), step)
            with timed(timings, "time/learn_s"):
                metrics = (
                    pipeline.learner.call_all("train_step", rollouts, step=step)[0]
                    if rollouts.num_rows
                    else {"learner/tokens": 0.0}
                )
            with timed(timings, "time/sync_s"):
                pipeline.sync_weights()
        metrics.update(timings)
        metrics.update(pipeline.reward.take_counts())
        metrics["throughput/tokens_per_s"] = metrics["learner/tokens"] / timings["time/step_s"]
        metrics["throughput/samples_per_s"] = rollouts.num_rows / timings["time/step_s"]

        is_last = step == trainer_cfg.total_steps
        if step % trainer_cfg.eval_every == 0 or is_last:
            metrics.update(pipeline.evaluate(eval_prompts, step))
        saved = None
        if step % trainer_cfg.save_every == 0 or is_last or (report and step % trainer_cfg.eval_every == 0):
            partial = checkpoint.partial_dir(out, step)
            pipeline.learner.call_all("save", str(partial))
            saved = checkpoint.finish(partial, {"step": step, "sampler": sampler.state(), "elapsed_s": log.elapsed()})
        record = log.write(step, metrics)
        if report and any(k.startswith("eval/") for k in metrics):
            report(record, saved)
    return record


def train(config: TrainConfig, resume: bool = False, report: Report | None = None) -> dict[str, float]:
    """Run (or resume) training; returns the last step's metrics record."""
    config = with_builtin_defaults(config)
    out = Path(config.output_dir)
    train_prompts, eval_prompts = load_inputs(config)
    latest = checkpoint.latest(out) if resume else None
    if resume and latest is None:
        raise TokenforgeError(f"--resume: no checkpoint under {str(out / 'checkpoints')!r}")
    if not resume and (out / METRICS_FILE).exists():
        raise TokenforgeError(
            f"output_dir {str(out)!r} already holds a run; resume it with --resume or pick another output_dir"
        )
    state = (
        checkpoint.read_trainer_state(latest)
        if latest
        else {"step": 0, "sampler": {"epoch": 0, "position": 0}, "elapsed_s": 0.0}
    )
    out.mkdir(parents=True, exist_ok=True)
    save_config(config, out / "config.yaml")

    connect_ray(config)
    check_resources(config)
    with Pipeline(config, str(latest or config.model.path), run_id=uuid.uuid4().hex[:8]) as pipeline:
        placement = {group.role: group.node_ids() for group in pipeline.groups}  # where each actor runs
        (out / "placement.json").write_text(json.dumps(placement, indent=1))
        if latest:
            pipeline.learner.call_all("load_state", str(latest))
            pipeline.sync_weights()  # the rollout workers started from model.path
        sampler = PromptSampler(train_prompts, config.trainer.prompts_per_step, config.seed, config.data.shuffle)
        sampler.load_state(state["sampler"])
        log = MetricsLog(out, config.trainer.total_steps, resume_step=state["step"], elapsed_s=state["elapsed_s"])
        try:
            record = run_steps(config, pipeline, sampler, eval_prompts, log, out, state["step"], report)
        finally:
            log.close()
    return record
