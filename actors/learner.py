"""Learner: the policy, its optimizer, an optional frozen reference and an optional critic; one step per call.

A plain class; the driver wraps it with `ray.remote` (GPU when configured). `train_step` reads a
scored rollout batch (pipeline.batch schema) top to bottom: the batch as tensors -> composite token
rewards -> (KL in reward) -> (the critic's values) -> advantages (the math: pure functions of
pipeline/algorithm/) -> learner.updates_per_batch passes, each of learner.minibatches minibatches: the
critic's step, then the policy's on the minibatch's informative rows (micro-batched forward, loss,
backward, one optimizer step, skipped when the advantages, loss or gradient norm are not finite) -> metrics.
"""

from __future__ import annotations

import contextlib
import itertools
import math
import tempfile
import time
import warnings
from dataclasses import dataclass, replace
from pathlib import Path

import pyarrow as pa
import torch

from actors.critic import CRITIC_DIR, CriticHandle, read_files
from pipeline.algorithm.advantages import (
    NEEDS_GREEDY,
    advantages_if_finite,
    check_finite,
    informative_rows,
    value_targets,
)
from pipeline.algorithm.loss import explained_variance, policy_loss
from pipeline.algorithm.rewards import ComponentRewards, component_reward_stats, composite_token_rewards, kl_in_reward
from pipeline.batch import LEARNED_SCHEMA, greedy_baselines, pad_right, response_mask, reward_column, sampled_rows
from pipeline.config import LearnerConfig, TrainConfig
from pipeline.data.images import IMAGE_COLUMN, batch_images
from pipeline.errors import TokenforgeError
from pipeline.models.hf import (
    build_sequences,
    can_share_prompts,
    image_token_ids,
    is_vision_language,
    load_model,
    load_processor,
    load_tokenizer,
    loaded_dtypes,
    micro_batches,
    mixed_autocast,
    model_config,
    response_logprobs,
    select_rows,
    with_images,
    with_suppressed,
)
from pipeline.models.lora import check_mergeable, merged_from_state, merged_state_dict, trainable_model
from pipeline.runtime.learner_group import (
    Rank,
    all_rows,
    collectives_named,
    from_rank0,
    full_state_dict,
    join_process_group,
    load_optimizer_whole,
    padded_micro_batches,
    rank_rows,
    save_optimizer_shards,
    shard_model,
    sharded_optimizer_state,
    sum_across_ranks,
    whole,
)
from pipeline.runtime.threads import torch_threads
from pipeline.storage import Storage, local_copy, read_manifest

LEARNER_STATE = "learner_state.pt"
OPTIMIZER_SHARDS = "optimizer"  # a learner group's optimizer state: one torch.distributed.checkpoint file per rank


def lr_factor(learner: LearnerConfig, k: int, total_updates: int) -> float:
    """Multiplier of `learner.lr` for update k (0-based)."""
    warmup = learner.warmup_steps
    if k < warmup:
        return (k + 1) / (warmup + 1)  # linear warm-up
    if learner.lr_schedule == "constant":
        return 1.0
    # cosine: r + (1 - r) * (1 + cos(pi * p)) / 2, p = progress after warm-up in [0, 1]
    progress = min(1.0, (k - warmup) / max(1, total_updates - 1 - warmup))
    return learner.min_lr_ratio + (1 - learner.min_lr_ratio) * (1 + math.cos(math.pi * progress)) / 2


class PhaseClock:
    """Seconds per phase of a learner step (time/learner/<phase>_s); on a GPU each phase ends with a sync,
    so that its kernels are counted in it."""

    def __init__(self, device: str):
        self.cuda = torch.device(device).type == "cuda"
        self.totals: dict[str, float] = {}

    def add(self, phase: str, seconds: float) -> None:
        self.totals[phase] = self.totals.get(phase, 0.0) + seconds

    @contextlib.contextmanager
    def __call__(self, phase: str):
        start = time.perf_counter()
        yield
        if self.cuda:
            torch.cuda.synchronize()
        self.add(phase, time.perf_counter() - start)

    def seconds(self) -> dict[str, float]:
        return {f"time/learner/{phase}_s": seconds for phase, seconds in self.totals.items()}


@dataclass(frozen=True)
class UpdateRows:
    """The row-aligned tensors an update reads: the model's input sequences, behaviour log-probs, advantages and
    mask, and where there are, the reference log-probs, the critic's V(s_t) before the step and its targets R_t."""

    sequences: dict
    behaviour: torch.Tensor
    advantages: torch.Tensor
    mask: torch.Tensor
    ref_logprobs: torch.Tensor | None = None
    values: torch.Tensor | None = None
    targets: torch.Tensor | None = None

    def rows(self, index: torch.Tensor) -> UpdateRows:
        def pick(t):
            return None if t is None else t[index]

        tensors = ("behaviour", "advantages", "mask", "ref_logprobs", "values", "targets")
        return replace(
            self, sequences=select_rows(self.sequences, index), **{k: pick(getattr(self, k)) for k in tensors}
        )


class Learner:
    def __init__(
        self,
        config: TrainConfig,
        policy_path: str,
        reference_path: str,
        use_gpu: bool = False,
        resume: tuple[str, str] | None = None,
    ):
        """`policy_path`: the policy's weights (a model dir, a checkpoint, or a LoRA checkpoint's adapter);
        `reference_path`: the base model (the KL reference, and the base that LoRA adapters sit on);
        `resume`: (storage URI, checkpoint directory) of a published checkpoint to continue from instead
        (this process downloads it and loads weights, optimizer and schedule)."""
        if resume is None:
            self._build(config, policy_path, reference_path, use_gpu)
            return
        storage = Storage(resume[0])
        manifest = read_manifest(storage, resume[1])
        if manifest is None:
            raise TokenforgeError(f"checkpoint {storage.display(resume[1])!r} is not published (no valid manifest)")
        with local_copy(storage, resume[1], manifest) as local:
            self._build(config, str(local), reference_path, use_gpu, critic_checkpoint=str(local / CRITIC_DIR))
            self.load_state(str(local))

    def _build(
        self, config: TrainConfig, policy_path: str, reference_path: str, use_gpu: bool, critic_checkpoint=None
    ) -> None:
        """critic_checkpoint: a checkpoint's critic/ directory to load the critic from (with config.critic)."""
        torch.manual_seed(config.seed)
        torch.set_num_threads(torch_threads(config.learner.num_threads))
        self.config = config
        self.device = "cuda" if use_gpu and torch.cuda.is_available() else "cpu"
        trust = config.model.trust_remote_code
        self.tokenizer = load_tokenizer(reference_path, trust)  # the base's: training never changes it
        vision = is_vision_language(model_config(reference_path, trust))  # its images through its processor
        self.processor = load_processor(reference_path, self.tokenizer, trust) if vision else None
        # a group's ranks load on the CPU: sharding (join_group) moves each rank's shard alone to its device
        load_on = "cpu" if config.learner.num_workers > 1 else self.device
        # with LoRA the base stays frozen; with a LoRA checkpoint, its adapters are loaded
        self.model = trainable_model(
            policy_path,
            reference_path,
            config.model.lora,
            trust,
            load_on,
            config.learner.precision,
            config.learner.gradient_checkpointing,
        )
        # one forward per distinct prompt: not with checkpointing (no cache), LoRA dropout (one mask per group), or a
        # model whose cache holds recurrent state or whose RoPE follows the sequence's length (can_share_prompts)
        lora_dropout = config.model.lora is not None and config.model.lora.dropout > 0
        self.share_prompts = (
            config.learner.share_prompts
            and not (config.learner.gradient_checkpointing or lora_dropout)
            and can_share_prompts(self.model)
        )
        self.reference = None  # with LoRA the reference is the policy with its adapters switched off
        if config.algorithm.needs_reference and config.model.lora is None:
            reference = load_model(reference_path, trust, load_on, config.model.dtype)
            self.reference = reference.eval().requires_grad_(False)
        self.rank = Rank()  # the single learner until join_group
        self.collective_timeout_s = 0.0
        self.pretrain_steps = 0 if config.critic is None else config.critic.pretrain_steps
        self._optimizer()
        self.critic = None  # in a group, rank 0's alone (join_group): it sends the values to the other ranks
        self.reference_path = reference_path
        self.critic_checkpoint = None  # a group's resumed critic files (bytes), until join_group
        if config.critic is not None and config.learner.num_workers == 1:
            self.critic = CriticHandle(config, reference_path, self.device, critic_checkpoint)
        elif config.critic is not None and critic_checkpoint is not None and Path(critic_checkpoint).is_dir():
            self.critic_checkpoint = read_files(critic_checkpoint)
        self.policy_version = 0
        self.nonfinite_streak = 0  # consecutive steps whose update was skipped for NaN/inf

    def _optimizer(self) -> None:
        """AdamW over the trainable weights (LoRA: the adapters only) and its lr schedule, which counts the policy's
        optimizer steps: minibatches x updates_per_batch per step after critic.pretrain_steps."""
        config = self.config
        self.optimizer = torch.optim.AdamW(
            [p for p in self.model.parameters() if p.requires_grad],
            lr=config.learner.lr,
            betas=config.learner.adam_betas,
            weight_decay=config.learner.weight_decay,
        )
        policy_steps = max(1, config.trainer.total_steps - self.pretrain_steps)
        total_updates = policy_steps * config.learner.updates_per_batch * config.learner.minibatches
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lambda k: lr_factor(config.learner, k, total_updates)
        )

    def join_group(self, address: str, rank: int, world: int) -> None:
        """Become rank `rank` of a learner group of `world` (learner.num_workers; every rank at once, after each
        was built as a single learner): join the process group at `address` (rank 0's group_address), shard the
        policy and the reference with FSDP2, and rebuild the optimizer over the shards with the state it had (a
        resumed one's included), each rank keeping its shard of it."""
        self.rank = Rank(rank, world)
        # a collective gives up before the driver does on the call, so that its line, naming the rank, comes first
        self.collective_timeout_s = 0.9 * self.config.trainer.actor_timeout_s
        join_process_group(address, self.rank, self.device, self.collective_timeout_s)
        state, schedule = self.optimizer.state_dict(), self.scheduler.state_dict()
        shard_model(self.model, self.config.learner.precision, self.device)
        if self.reference is not None:  # frozen, in model.dtype as the single learner's (no cast)
            shard_model(self.reference, "fp32", self.device)
        if self.config.model.lora is not None:
            check_mergeable(self.model)  # now, not at the first weight sync
        self._optimizer()
        self.optimizer.load_state_dict(sharded_optimizer_state(state, self.optimizer))
        self.scheduler.load_state_dict(schedule)
        if self.config.critic is not None and rank == 0:
            self.critic = CriticHandle(self.config, self.reference_path, self.device, self.critic_checkpoint)
        self.critic_checkpoint = None

    def train_step(self, batch: pa.Table, step: int | None = None) -> dict[str, float]:
        """One learner step on a scored rollout batch; `step` (the driver's) names it in errors."""
        with collectives_named(self.rank, self.collective_timeout_s):
            return self._train_step(batch, step)

    def _train_step(self, batch: pa.Table, step: int | None) -> dict[str, float]:
        start = time.perf_counter()
        clock = PhaseClock(self.device)  # time/learner/*: where the update's time goes
        rows, token_rewards, metrics, finite = self._prepare(batch, clock)
        clock.add("prepare", time.perf_counter() - start - clock.totals.get("values", 0.0))  # rewards, ref, advantages
        trained = self._trained(rows, batch)
        totals, skipped = self._update(trained, clock, finite)
        self._count_nonfinite(skipped, step)
        self.policy_version += 1
        self.last_step = (batch.column("response_ids"), token_rewards, rows.advantages, rows.mask)  # learned_columns
        metrics.update(totals)
        metrics.update(clock.seconds())
        metrics["time/learner/total_s"] = time.perf_counter() - start
        metrics.update(self._step_metrics(sampled_rows(batch), trained.advantages, trained.mask, skipped))
        return metrics

    def _trained(self, rows: UpdateRows, batch: pa.Table) -> UpdateRows:
        """The rows an update trains on: the samples, without the greedy baselines of self_critical."""
        greedy = greedy_baselines(batch)
        return rows.rows(torch.nonzero(~greedy).squeeze(1).to(self.device)) if greedy.any() else rows

    def gradients(self, batch: pa.Table) -> tuple[dict[str, torch.Tensor], dict[str, float]]:
        """The policy's gradient of one update on all of `batch` (train_step's first with learner.minibatches=1,
        clipped to learner.grad_clip) by parameter name, whole and on the CPU, and its loss metrics; the weights and
        the optimizer stay as they are. In a group every rank calls it and gets the whole gradient."""
        clock = PhaseClock(self.device)  # (not reported)
        rows, _, _, _ = self._prepare(batch, clock)
        totals = self._minibatch_gradients(self._trained(rows, batch), clock)
        grads = {name: whole(p.grad) for name, p in self.model.named_parameters() if p.grad is not None}
        self.optimizer.zero_grad(set_to_none=True)
        return grads, totals

    def _prepare(self, batch: pa.Table, clock: PhaseClock) -> tuple[UpdateRows, torch.Tensor, dict[str, float], bool]:
        """The update's rows of a scored batch: composite token rewards -> (KL in reward) -> (the critic's values)
        -> advantages. Returns (the rows, the token rewards, the reward and value metrics, whether the advantages
        are finite)."""
        algo = self.config.algorithm
        mask, behaviour, group_ids, sequences = self._batch_tensors(batch)
        check_finite("behaviour_logprobs", behaviour, mask)  # here, on the whole batch: a group's ranks fail together
        metrics = self._staleness_metrics(batch)
        greedy = greedy_baselines(batch).to(self.device)  # self_critical's baselines: scored, not in the metrics
        components = self._reward_components(batch, mask.shape[1])
        for name, component in components.items():
            stats = component_reward_stats(component.rewards, component.applies & ~greedy)  # of the raw component
            metrics.update({f"reward/{name}/{stat}": value for stat, value in stats.items()})
        # r_t = sum_i w_i * norm_i(r_i)_t, normalised with the samples' statistics (the greedy rows' not among them)
        token_rewards = composite_token_rewards(components.values(), mask, group_ids, ~greedy)
        metrics["reward/total/mean"] = float(token_rewards.sum(1)[~greedy].mean())
        if greedy.any():
            metrics["reward/greedy_baseline/mean"] = float(token_rewards.sum(1)[greedy].mean())
        ref_logprobs = (
            self._out_of_memory_as_one_line(self._reference_logprobs, sequences) if algo.needs_reference else None
        )
        if algo.kl_in_reward_coef > 0:
            without_kl = token_rewards
            beta = algo.kl_in_reward_coef
            token_rewards = kl_in_reward(token_rewards, behaviour, ref_logprobs, mask, beta, algo.kl_kind)
            metrics["reward/kl_penalty/mean"] = float((token_rewards - without_kl).sum(1)[~greedy].mean())  # per sample
        values = None
        if self.config.critic is not None:
            with clock("values"):  # V(s_t) under the critic as it stands (recomputed each step: never stale)
                if self.critic is not None:
                    pending = self._out_of_memory_as_one_line(self.critic.call, "values", sequences)
                    values = self._out_of_memory_as_one_line(pending).to(self.device)
                if self.rank.grouped:  # rank 0 holds the critic
                    values = from_rank0(values, mask.shape, self.device)
        # a NaN/inf reward (or float32 overflow of huge returns) skips the update instead of reaching the weights
        advantages, finite = advantages_if_finite(
            algo.estimator,
            token_rewards,
            mask,
            group_ids,
            algo.gamma,
            algo.whiten,
            values=values,
            lam=algo.lam,
            greedy_baseline=greedy if algo.estimator in NEEDS_GREEDY else None,
        )
        rows = UpdateRows(sequences, behaviour, advantages, mask, ref_logprobs, values)
        if values is not None and finite:  # R_t = A_t + V(s_t), of GAE before whitening
            rows = replace(rows, targets=value_targets(token_rewards, values, mask, algo.gamma, algo.lam).float())
            metrics.update(self._value_metrics(values, rows.targets, mask))
        keep = informative_rows(advantages[~greedy], algo.skip_zero_advantage, algo.kl_coef, algo.entropy_coef)
        metrics["learner/kept_frac"] = len(keep) / max(1, int((~greedy).sum()))
        return rows, token_rewards, metrics, finite

    def _batch_tensors(self, batch: pa.Table) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, dict]:
        """(response mask, behaviour log-probs, group ids, the model's input sequences) of `batch`, on the device."""
        mask = response_mask(batch).to(self.device)
        behaviour = pad_right(batch.column("behaviour_logprobs").to_pylist()).to(self.device)
        group_ids = torch.tensor(batch.column("group_id").to_pylist(), device=self.device)
        sequences = build_sequences(
            batch.column("prompt_ids").to_pylist(),
            batch.column("response_ids").to_pylist(),
            self.tokenizer.pad_token_id,
            self.device,
        )
        if self.processor is not None:  # a VLM: its image token is never sampled, with or without images
            sequences = with_suppressed(sequences, image_token_ids(self.processor))
        if self.processor is not None and IMAGE_COLUMN in batch.column_names:  # the rollout worker's, read again
            images, image_of = batch_images(batch, self.processor)
            images = {k: v.to(self.device) for k, v in images.items()}
            sequences = with_images(sequences, images, torch.tensor(image_of, device=self.device))
        return mask, behaviour, group_ids, sequences

    def _staleness_metrics(self, batch: pa.Table) -> dict[str, float]:
        """policy/staleness_{mean,max}: of each sample, the learner's version now minus the version that sampled it."""
        staleness = self.policy_version - torch.tensor(batch.column("policy_version").to_pylist(), dtype=torch.float64)
        return {"policy/staleness_mean": float(staleness.mean()), "policy/staleness_max": float(staleness.max())}

    def _reward_components(self, batch: pa.Table, width: int) -> dict[str, ComponentRewards]:
        """Each weighted component's scores in `batch` as (batch, width) token rewards on the device; a sample it
        does not apply to (None) scores 0 there and is left out of its normalisation."""
        components = {}
        for name, weight in self.config.reward.weights.items():
            rows = batch.column(reward_column(name)).to_pylist()
            applies = torch.tensor([row is not None for row in rows], device=self.device)
            rewards = pad_right([row or [] for row in rows], width=width).to(self.device)
            components[name] = ComponentRewards(weight, rewards, applies, self.config.reward.components[name].normalize)
        return components

    def _minibatches(self, batch_size: int, epoch: int) -> list[torch.Tensor]:
        """learner.minibatches disjoint row sets covering the batch: a fresh random split each pass (PPO's), drawn
        from (seed, policy version, pass) alone, so that a learner group's ranks draw the same split whatever else
        their RNGs did (LoRA dropout on different rows) and a resume draws it again; each in batch order (a group's
        samples stay together, for share_prompts)."""
        parts = self.config.learner.minibatches
        draw = torch.Generator().manual_seed(hash((self.config.seed, self.policy_version, epoch)) % 2**63)
        order = torch.randperm(batch_size, generator=draw) if parts > 1 else torch.arange(batch_size)
        return [rows.sort().values.to(self.device) for rows in torch.tensor_split(order, parts) if len(rows)]

    def _update(self, rows: UpdateRows, clock: PhaseClock, finite: bool) -> tuple[dict[str, float], int]:
        """learner.updates_per_batch passes over the batch, each one optimizer step per minibatch: the critic's (with
        a critic), then the policy's on the minibatch's informative rows, its loss normalised by the minibatch's
        counts (pipeline.algorithm.loss.policy_loss): gradients, then a step unless the loss or gradient norm is
        NaN/inf, after which (as with `finite` False: non-finite advantages) every update is skipped. The policy
        waits for critic.pretrain_steps; after that its schedule steps every time. Returns (the last update's loss
        metrics and the critic's means, the number of updates skipped)."""
        totals: dict[str, float] = {}
        critic_steps: list[dict[str, float]] = []
        skipped = 0
        for epoch in range(self.config.learner.updates_per_batch):
            for part in map(rows.rows, self._minibatches(len(rows.mask), epoch)):
                critic_step = None  # the critic's step on this minibatch; an actor of its own computes it meanwhile
                if self.critic is not None and finite:
                    with clock("critic"):
                        critic_step = self._out_of_memory_as_one_line(
                            self.critic.call, "update", part.sequences, part.mask, part.values, part.targets
                        )
                if self.policy_version >= self.pretrain_steps:  # until then the policy waits (its schedule too)
                    policy, finite = self._policy_step(part, clock, finite)
                    totals = policy or totals
                    with warnings.catch_warnings():  # the schedule follows steps, also those whose update was skipped,
                        warnings.filterwarnings("ignore", "Detected call of `lr_scheduler.step")  # which torch warns
                        self.scheduler.step()
                skipped += not finite
                if critic_step is not None:
                    with clock("critic"):
                        critic_steps.append(self._out_of_memory_as_one_line(critic_step))
                    skipped += int(critic_steps[-1]["critic/skipped"])
        if critic_steps:  # the critic's loss and clip fraction: means over its steps; its gradient norm: the last
            totals.update({k: sum(s[k] for s in critic_steps) / len(critic_steps) for k in critic_steps[0]})
            totals["critic/grad_norm"] = critic_steps[-1]["critic/grad_norm"]
            totals["critic/lr"] = self.config.critic.lr  # constant
        return totals, skipped

    def _policy_step(self, part: UpdateRows, clock: PhaseClock, finite: bool) -> tuple[dict[str, float], bool]:
        """The policy's optimizer step on a minibatch's informative rows, its loss normalised by the minibatch's
        counts; no step once `finite` is False or when the loss or gradient norm is NaN/inf. Returns (its loss
        metrics, or {} without a step; whether every update so far was finite)."""
        totals = self._minibatch_gradients(part, clock) if finite else {}
        if not totals:
            return {}, finite
        finite = math.isfinite(totals["loss/policy"]) and math.isfinite(totals["loss/grad_norm"])
        with clock("optimizer"):
            if finite:  # a NaN/inf loss or gradient never reaches the weights (nor Adam's moments)
                self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
        return totals, finite

    def _minibatch_gradients(self, part: UpdateRows, clock: PhaseClock) -> dict[str, float]:
        """The gradient of the policy's loss on a minibatch's informative rows, normalised by the minibatch's counts
        (accumulated in the weights' .grad, clipped); returns its loss metrics, or {} when no row is informative."""
        algo = self.config.algorithm
        counts = {
            "num_tokens": float(part.mask.sum()),
            "num_seqs": float(part.mask.shape[0]),
            "max_len": float(self.config.rollout.max_new_tokens),
        }
        kept = part.rows(informative_rows(part.advantages, algo.skip_zero_advantage, algo.kl_coef, algo.entropy_coef))
        return self._out_of_memory_as_one_line(self._gradients, kept, counts, clock) if len(kept.mask) else {}

    @staticmethod
    def _value_metrics(values: torch.Tensor, targets: torch.Tensor, mask: torch.Tensor) -> dict[str, float]:
        """critic/value_mean (token mean of V before the step) and critic/explained_var (1 - Var(R - V) / Var(R))."""
        return {
            "critic/value_mean": float((values * mask).sum() / mask.sum().clamp(min=1)),
            "critic/explained_var": explained_variance(values, targets, mask),
        }

    def _step_metrics(self, batch: pa.Table, advantages: torch.Tensor, mask: torch.Tensor, skipped: int) -> dict:
        """The step's advantage, response and learner metrics (after the update)."""
        lengths = mask.sum(1)
        return {
            "advantage/abs_mean": float((advantages.abs() * mask).sum() / mask.sum()),
            "advantage/zero_frac": float((advantages == 0).all(dim=1).float().mean()),  # samples without signal
            "response/length_mean": float(lengths.mean()),
            "response/finished_frac": sum(batch.column("finished").to_pylist()) / batch.num_rows,
            "learner/policy_version": float(self.policy_version),
            "learner/tokens": float(lengths.sum()),
            "learner/skipped_nonfinite": float(skipped),
        }

    def learned_columns(self) -> pa.Table:
        """The last train_step's per-token rewards, advantages and decoded tokens, row-aligned with its batch
        (pipeline.batch.LEARNED_SCHEMA); the driver appends them to the rollout dump."""
        response_ids, token_rewards, advantages, mask = self.last_step
        lengths = mask.sum(1).long().tolist()
        ids = response_ids.to_pylist()
        flat = self.tokenizer.batch_decode([[t] for row in ids for t in row])  # each token on its own
        starts = [0, *itertools.accumulate(len(row) for row in ids)]
        columns = {
            "token_rewards": [row[:n] for row, n in zip(token_rewards.float().cpu().tolist(), lengths)],
            "total_reward": (token_rewards * mask).sum(1).cpu().tolist(),
            "advantages": [row[:n] for row, n in zip(advantages.float().cpu().tolist(), lengths)],
            "response_tokens": [flat[a:b] for a, b in zip(starts, starts[1:])],
        }
        return pa.Table.from_pydict(columns, schema=LEARNED_SCHEMA)

    def _out_of_memory_as_one_line(self, fn, *args):
        """fn(*args), with running out of GPU (or CPU) memory reported as one line naming the setting to lower."""
        try:
            return fn(*args)
        except (torch.OutOfMemoryError, RuntimeError) as error:
            if not isinstance(error, torch.OutOfMemoryError) and "can't allocate memory" not in str(error):
                raise
            size = self.config.learner.micro_batch_size
            raise TokenforgeError(
                f"the learner ran out of {self.device} memory in a micro-batch of up to {size} samples; lower "
                f"learner.micro_batch_size (now {size}), or set learner.gradient_checkpointing / "
                "learner.precision=bf16-mixed"
            ) from None

    def _count_nonfinite(self, skipped: int, step: int | None) -> None:
        """Stop the run after learner.max_nonfinite_steps consecutive steps with a skipped (non-finite) update."""
        self.nonfinite_streak = self.nonfinite_streak + 1 if skipped else 0
        limit = self.config.learner.max_nonfinite_steps
        if self.nonfinite_streak >= limit:
            where = f"step {step}" if step is not None else f"update {self.policy_version + 1}"
            raise TokenforgeError(
                f"{limit} consecutive steps up to {where} had a NaN/inf advantage, loss or gradient norm; their "
                "updates were skipped and the weights are those before them. Lower learner.lr, look for huge reward "
                "values, or raise learner.max_nonfinite_steps"
            )

    def _gradients(self, kept: UpdateRows, counts, clock: PhaseClock) -> dict[str, float]:
        """Accumulate the gradient of one update over all micro-batches of the `kept` rows (losses normalised by
        the minibatch's `counts`), clip it, and return the loss, gradient norm and policy metrics; `clock` times
        its phases."""
        algo, cfg = self.config.algorithm, self.config.learner
        sequences, behaviour, advantages, mask, ref_logprobs = (
            kept.sequences,
            kept.behaviour,
            kept.advantages,
            kept.mask,
            kept.ref_logprobs,
        )
        kept_tokens = float(mask.sum())
        totals = {"loss/policy": 0.0}
        for rows, real in self._my_micro_batches(mask.sum(1)):
            with clock("forward"), self.autocast():
                logprobs, entropy = response_logprobs(
                    self.model,
                    select_rows(sequences, rows),
                    self.config.rollout.temperature,
                    cfg.logprob_chunk_tokens,
                    self.share_prompts,
                    lockstep=self.rank.grouped,
                )
            with clock("loss"):
                loss, parts = policy_loss(
                    logprobs,
                    behaviour[rows],
                    advantages[rows],
                    mask[rows],
                    agg=algo.agg,
                    loss=algo.loss,
                    is_cap=algo.is_cap,
                    clip_low=algo.clip_low,
                    clip_high=algo.clip_high,
                    ref_logprobs=None if ref_logprobs is None else ref_logprobs[rows],
                    kl_coef=algo.kl_coef,
                    kl_kind=algo.kl_loss_kind,
                    entropy=entropy if algo.entropy_coef > 0 else entropy.detach(),
                    entropy_coef=algo.entropy_coef,
                    **counts,
                )
            with clock("backward"):
                (loss if real else 0.0 * loss).backward()  # a group's padding micro-batch adds nothing
            share = float(mask[rows].sum()) / kept_tokens if real else 0.0  # token-weighted mean of the metrics
            totals["loss/policy"] += float(loss.detach()) if real else 0.0
            for key, value in parts.items():  # every key on every rank (a rank of padding only too): one all-reduce
                totals[f"policy/{key}"] = totals.get(f"policy/{key}", 0.0) + share * value
        if self.rank.grouped:  # each rank's share of the loss and the metrics' means: their sums are the whole's
            totals = sum_across_ranks(totals, self.device)
        with clock("optimizer"):  # the norm of the whole gradient (FSDP2 computes it over the shards)
            totals["loss/grad_norm"] = float(torch.nn.utils.clip_grad_norm_(self.model.parameters(), cfg.grad_clip))
        totals["learner/lr"] = self.optimizer.param_groups[0]["lr"]
        return totals

    def _my_micro_batches(self, tokens: torch.Tensor) -> list[tuple[torch.Tensor, bool]]:
        """This rank's micro-batches of a minibatch (`tokens`: each row's token count) as (row indices, real): the
        single learner's cover every row; in a group, this rank's rows (rank_rows: balanced by tokens), and as
        many more (row 0, real False: to be weighted 0) as it takes to run as many micro-batches as every rank."""
        size = self.config.learner.micro_batch_size
        rows = torch.arange(len(tokens), device=tokens.device)
        if not self.rank.grouped:
            return [(rows[part], True) for part in micro_batches(len(rows), size)]
        shares = rank_rows(tokens, self.rank.world)
        mine = [(shares[self.rank.rank][part], True) for part in micro_batches(len(shares[self.rank.rank]), size)]
        return mine + [(rows[:1], False)] * (padded_micro_batches([len(r) for r in shares], size) - len(mine))

    def autocast(self):
        """bf16 autocast of the forward pass under learner.precision=bf16-mixed (a no-op otherwise)."""
        return mixed_autocast(self.device, self.config.learner.precision)

    @torch.no_grad()
    def _reference_logprobs(self, sequences) -> torch.Tensor:
        """log pi_ref(y_t) of every response token of the batch; in a group each rank computes its rows (balanced by
        their response tokens) and the ranks sum their (otherwise zero) tensors."""
        temperature, chunk = self.config.rollout.temperature, self.config.learner.logprob_chunk_tokens
        model = self.reference if self.reference is not None else self.model
        adapters_off = self.model.disable_adapter() if self.reference is None else contextlib.nullcontext()
        ids, width = sequences["input_ids"], sequences["prompt_width"]
        logprobs = torch.zeros(ids.shape[0], ids.shape[1] - width, device=ids.device)
        tokens = sequences["attention_mask"][:, width:].sum(1)
        with adapters_off, self.autocast():
            for rows, real in self._my_micro_batches(tokens):
                part = response_logprobs(
                    model, select_rows(sequences, rows), temperature, chunk, self.share_prompts, self.rank.grouped
                )[0]
                if real:
                    logprobs[rows] = part
        return all_rows(logprobs) if self.rank.grouped else logprobs

    def get_version(self) -> int:
        return self.policy_version

    def get_weights(self, copy: bool = True) -> dict[str, torch.Tensor]:
        """The policy weights on the CPU, each in the dtype the rollout model holds it in (model.dtype, or fp32 for
        what the model class keeps in fp32; integer buffers as they are), LoRA adapters merged in (published once
        per sync; every rollout worker reads it). copy=False: a tensor already on the CPU in that dtype is the
        model's own (for a caller that copies them at once, e.g. into one flat buffer)."""
        lora = self.config.model.lora is not None
        if self.rank.grouped:  # every rank calls it: the shards are gathered to rank 0's CPU, one tensor at a time
            with collectives_named(self.rank, self.collective_timeout_s):
                weights = full_state_dict(self.model)  # {} on the other ranks
            if lora and weights:
                weights = merged_from_state(self.model, weights)
        else:
            weights = merged_state_dict(self.model) if lora else self.model.state_dict()  # merged: already a CPU copy
        floats = [name for name, v in weights.items() if v.is_floating_point()]
        dtypes = loaded_dtypes(self.model, floats, self.config.model.dtype)  # integer buffers keep their type
        copy = copy and not (lora or self.rank.grouped)
        return {k: v.detach().to("cpu", dtypes.get(k, v.dtype), copy=copy) for k, v in weights.items()}

    def save(self, storage_uri: str, directory: str) -> dict[str, dict]:
        """Upload the HF-format model (or, with LoRA, the adapter) + tokenizer (safetensors) and the
        optimizer/version/RNG state to `directory` of the run's storage, from this process. Returns the
        manifest entries ({file: {size, sha256}}); the driver publishes the checkpoint. In a group every rank
        calls it and uploads its own files; the manifest lists those of every rank."""
        with tempfile.TemporaryDirectory(prefix="tokenforge-save-") as scratch:
            self.save_local(scratch)
            return Storage(storage_uri).upload_dir(scratch, directory)

    def save_local(self, directory: str) -> None:
        """The checkpoint's files in a local directory. In a group every rank calls it: the weights are gathered
        whole to rank 0's CPU one tensor at a time (the HF-format model that eval, export and from_pretrained read),
        and each rank writes its shard of the optimizer's state (OPTIMIZER_SHARDS/, torch.distributed.checkpoint),
        which any number of ranks, or a single learner, resumes; rank 0 writes the rest."""
        grouped = self.rank.grouped
        sharded = grouped and bool(self.optimizer.state)  # no state yet (no step): its param groups are all
        with collectives_named(self.rank, self.collective_timeout_s):
            weights = full_state_dict(self.model) if grouped else None  # None: the model's own
            if sharded:
                save_optimizer_shards(self.model, self.optimizer, Path(directory) / OPTIMIZER_SHARDS)
        if self.rank.rank:
            return
        self.model.save_pretrained(directory, state_dict=weights)
        if self.processor is not None:  # a VLM's processor (its image processor's config, and the tokenizer)
            self.processor.save_pretrained(directory)
        self.tokenizer.save_pretrained(directory)
        state = {
            "optimizer": None if sharded else self.optimizer.state_dict(),  # None: in OPTIMIZER_SHARDS/
            "scheduler": self.scheduler.state_dict(),
            "policy_version": self.policy_version,
            "torch_rng": torch.get_rng_state(),
        }
        torch.save(state, Path(directory) / LEARNER_STATE)
        if self.critic is not None:
            self.critic.save(Path(directory) / CRITIC_DIR)

    def load_state(self, directory: str) -> int:
        # on the CPU: the RNG state must be a CPU tensor; load_state_dict moves Adam's moments to their weights' device
        state = torch.load(Path(directory) / LEARNER_STATE, map_location="cpu", weights_only=True)
        if state["optimizer"] is None:  # a learner group's shards, read whole (join_group shards them again)
            load_optimizer_whole(self.model, self.optimizer, Path(directory) / OPTIMIZER_SHARDS)
        else:
            self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        # The config's lr wins over the saved one (Tune's PBT may have changed it): lr_k = lr * factor(k)
        self.scheduler.base_lrs = [self.config.learner.lr] * len(self.optimizer.param_groups)
        for group in self.optimizer.param_groups:
            group["initial_lr"] = self.config.learner.lr
            group["lr"] = self.config.learner.lr * self.scheduler.lr_lambdas[0](self.scheduler.last_epoch)
        self.policy_version = state["policy_version"]
        torch.set_rng_state(state["torch_rng"])
        return self.policy_version
