"""The typed run configuration: the one source of truth for every config key.

A run is configured by an optional YAML file plus dotted `key=value` overrides. Unknown keys,
wrong types and bad values raise `ConfigError` naming the key. Every field's docstring is its
documentation (`tokenforge train --help-config` prints them).

It holds names and types only, and imports no implementation (docs/architecture.md, "Layers"): the checks
that need one (each reward component's type and options) are pipeline/preflight.py's, which every entry
point runs before Ray starts.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import Annotated, Any, Literal, get_args

import yaml
from pydantic import AfterValidator, BaseModel, BeforeValidator, ConfigDict, Field, ValidationError, model_validator

from pipeline.algorithm.advantages import ESTIMATORS, GROUP_BASELINE, KL_KINDS, NEEDS_VALUES, check_known
from pipeline.algorithm.loss import AGGREGATIONS, LOSSES
from pipeline.errors import ConfigError
from pipeline.storage import credentials_error

DEFAULT_IMAGE_PROMPT = "describe the picture"  # data.image_prompt: the prompt of a COCO captions file's images
BUILTIN_TASKS = (
    "addition",
    "words",
    "reverse",
    "summarize",
    "chat_addition",
    "captioning",
)  # made by scripts/make_task_data.py and make_task_model.py


def one_of(what: str, known: Iterable[str]) -> AfterValidator:
    """Validator: every name in the value (a name, a list or a dict's keys) must be in `known`."""

    def check(value):
        for name in [value] if isinstance(value, str) else value:
            check_known(what, name, known)
        return value

    return AfterValidator(check)


def without_credentials(uri: str | None) -> str | None:
    """Validator of URI keys: refuse one with user:secret@ (storage.credentials_error), without echoing it."""
    if uri is not None and (problem := credentials_error(uri)):
        raise ValueError(problem)
    return uri


StorageUri = Annotated[str, AfterValidator(without_credentials)]


class Section(BaseModel):
    model_config = ConfigDict(
        extra="forbid", use_attribute_docstrings=True, validate_assignment=True, allow_inf_nan=False
    )


Resources = dict[str, Annotated[float, Field(ge=0)]]  # custom Ray resources: name -> amount


class LoraConfig(Section):
    r: int = Field(8, ge=1)
    """Rank of the LoRA update B @ A."""
    alpha: float = Field(16.0, gt=0)
    """Scale: the update is (alpha / r) * B @ A."""
    dropout: float = Field(0.0, ge=0, lt=1)
    """Dropout on the LoRA branch's input (0 keeps learner and rollout log-probs identical)."""
    target_modules: list[str] | Literal["all-linear"] = "all-linear"
    """Module names to adapt (e.g. [q_proj, v_proj]), or all-linear (every linear layer but the output head)."""
    vision_tower: bool = False
    """A vision-language model's vision tower gets adapters too; by default it stays frozen (the language model and
    the projector are adapted)."""


class ModelConfig(Section):
    path: str | None = None
    """Local HF model directory; null = the built-in model of `task`."""
    trust_remote_code: bool = False
    """Allow custom modelling code shipped with the model (off unless you trust the files)."""
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    """Weights of the rollout workers and the reference model (the learner's: learner.precision)."""
    chat_template: str | None = None
    """A Jinja chat-template file used instead of (or in the absence of) the tokenizer's own."""
    lora: LoraConfig | None = None
    """Train LoRA adapters only ({r, alpha, dropout, target_modules}, needs `peft`); null = full fine-tuning."""


class DataConfig(Section):
    train_file: str | None = None
    """Training prompts: a .jsonl/.json/.parquet/.csv file, a saved or parquet dataset directory, or a dataset name;
    null = the built-in ones of `task`."""
    eval_file: str | None = "auto"
    """Held-out prompts in the same forms; null = no evaluation; auto = the built-in eval set of `task` if train_file is
    null, else none."""
    train_split: str = "train"
    """Split of a dataset directory or name to train on."""
    eval_split: str = "test"
    """Split of a dataset directory or name to evaluate on."""
    image_prompt: str = DEFAULT_IMAGE_PROMPT
    """The prompt of each image of a COCO captions file (which holds none); the processor's image token is put in
    front of a prompt that lacks it."""
    image_root: str | None = None
    """Directory (or storage URI) that relative image paths are resolved against (a vision-language model's
    `image` field); null = the data file's directory."""
    add_special_tokens: bool = True
    """Tokenize text prompts with the tokenizer's special tokens (e.g. BOS), as `tokenizer(text)` and TRL do."""

    @property
    def evaluates(self) -> bool:
        """Whether the run has held-out prompts (see eval_file)."""
        return self.eval_file is not None and not (self.eval_file == "auto" and self.train_file is not None)

    shuffle: bool = True
    """Reshuffle the training prompts every epoch (seeded)."""
    max_eval_samples: int | None = Field(None, ge=1)
    """Evaluate on the first N eval prompts only; null = all."""


class TrainerConfig(Section):
    total_steps: int = Field(300, ge=1)
    """Number of learner updates."""
    prompts_per_step: int = Field(128, ge=1)
    """Prompts drawn per step; each is sampled rollout.group_size times (128 x 4 chosen on a panel of models:
    docs/performance.md, "Defaults on a panel")."""
    eval_every: int = Field(25, ge=1)
    """Greedy held-out evaluation every N steps (and at step 0 and the last step)."""
    eval_metrics: list[str] = ["exact_match"]
    """Reward components scored on greedy eval samples, reported as eval/<name> (mean per-sample total)."""
    loggers: list[Literal["tensorboard", "wandb", "mlflow", "jsonl"]] = ["tensorboard", "jsonl"]
    """Where metrics go: metrics.jsonl (always: resume and reports read it), TensorBoard, W&B, MLflow (extras
    tokenforge[wandb] / [mlflow], set up by their env vars)."""
    tracker_project: str = "tokenforge"
    """W&B project / MLflow experiment of the run (trainer.loggers wandb / mlflow)."""
    dump_rollouts_every: int | None = Field(None, ge=0)
    """Write the step's scored rollout batch to rollouts/step_N.parquet every N steps (and the last); null = on every
    eval step; 0 = never."""
    dump_eval: bool = True
    """Write each eval's greedy samples with per-sample metrics to eval/step_N.parquet."""
    save_every: int = Field(100, ge=1)
    """Write a checkpoint every N steps (and at the last step)."""
    keep_checkpoints: int | None = Field(3, ge=1)
    """Keep the newest N published checkpoints (older ones are deleted); null = keep all."""
    keep_best: bool = False
    """Also keep the checkpoint with the best first eval metric (trainer.eval_metrics[0], higher is better)."""
    max_failures: int = Field(3, ge=0)
    """Restart the pipeline in-process from the last checkpoint after this many failures (a dead learner, a lost node)
    before giving up."""
    actor_timeout_s: float = Field(600.0, gt=0)
    """Longest wait for one actor call before the run stops with an error naming the actor."""
    max_staleness: int = Field(1, ge=0)
    """0: each step's rollouts use the weights of the step before (synchronous, exactly on-policy); k >= 1 (default
    1): the rollouts of the next k steps are generated while the learner updates, from weights up to k versions old
    (corrected by algorithm.is_cap)."""

    @model_validator(mode="after")
    def keep_jsonl(self) -> TrainerConfig:
        if "jsonl" not in self.loggers:
            raise ConfigError(
                "config key 'trainer.loggers': metrics.jsonl (jsonl) is the run's own record that --resume, keep_best "
                f"and tokenforge report read; keep it in the list, e.g. {sorted({*self.loggers, 'jsonl'})}"
            )
        return self


class VllmConfig(Section):
    """rollout.backend=vllm: the engine's own settings (docs/models.md, "vLLM backend")."""

    gpu_memory_utilization: float = Field(0.5, gt=0, le=1)
    """Fraction of the GPU's memory the engine may take (weights, activations, KV cache) when kv_cache_gib is null; a
    learner on the same GPU needs the rest."""
    kv_cache_gib: float | None = Field(1.0, gt=0)
    """KV cache size in GiB (vLLM's kv_cache_memory_bytes; on CPU also VLLM_CPU_KVCACHE_SPACE, without which vLLM
    reserves most of the RAM); null = what gpu_memory_utilization leaves (GPU only)."""
    max_num_seqs: int = Field(256, ge=1)
    """Most sequences the engine decodes at once (a rollout shard of more queues)."""
    max_model_len: int | None = Field(None, ge=1)
    """Longest prompt + response the engine plans for; null = the model's context length."""
    enforce_eager: bool = True
    """No CUDA graphs / torch.compile: faster start-up; set false on GPU for faster long generations."""
    enable_prefix_caching: bool = True
    """Reuse the KV cache of a prompt across its group's samples (reset at every weight update)."""
    tensor_parallel_size: int = Field(1, ge=1)
    """GPUs one engine shards the model over (rollout.num_gpus_per_worker must cover them)."""
    engine_kwargs: dict[str, Any] = {}
    """Further vllm.LLM(...) keyword arguments, passed as they are (e.g. {quantization: fp8})."""


class RolloutConfig(Section):
    num_workers: int = Field(1, ge=1)
    """Rollout-generation actors; the prompts of a step are split across them."""
    group_size: int = Field(4, ge=1)
    """Samples per prompt (the group of the group estimators)."""
    temperature: float = Field(1.0, gt=0)
    """Sampling temperature; behaviour and learner log-probs use the same scaled logits."""
    top_p: float = Field(1.0, gt=0, le=1)
    """Nucleus sampling mass (1 = off). Tokens are drawn from the nucleus renormalised, but the behaviour log-prob
    recorded is that of the whole tempered softmax, the distribution the learner recomputes (see algorithm.is_cap)."""
    max_new_tokens: int = Field(8, ge=1)
    """Longest response; also the fixed length of seq-mean-token-sum-norm."""
    stop_token_ids: list[int] = []
    """Token ids that end a response (besides the tokenizer's EOS), e.g. a chat model's end-of-turn token."""
    stop: list[str] = []
    """Strings that end a response once generated (the token completing one is kept)."""
    num_cpus_per_worker: float = Field(0.5, gt=0)
    """Ray CPUs reserved by each rollout worker."""
    num_gpus_per_worker: float = Field(0.0, ge=0)
    """Ray GPUs for each rollout worker (0 = generate on CPU)."""
    resources_per_worker: Resources = {}
    """Custom Ray resources per rollout worker, e.g. {rollout_node: 1} to place workers on nodes that advertise it."""
    num_threads: int | None = Field(None, ge=1)
    """torch intra-op threads in each rollout worker; null = its Ray CPUs (rollout.num_cpus_per_worker, at least 1)."""
    weight_sync: Annotated[
        Literal["object_store", "collective"], BeforeValidator(lambda v: "object_store" if v is None else v)
    ] = "object_store"
    """How each new policy version reaches the rollout workers: one object in Ray's object store, mapped without a copy
    by every worker of a node (the default; docs/performance.md compares the two); or a broadcast from the learner over
    a ray.util.collective group (gloo on CPU, NCCL between GPUs: needs cupy; HF backend only), one message per worker.
    null = object_store."""
    backend: Literal["hf", "vllm"] = "hf"
    """Generation engine: hf (transformers with a KV-cache loop; the default, best for CPU and tiny models) or vllm (pip
    install 'tokenforge[vllm]'; docs/models.md). Same samples contract, different random draws for the same seed."""
    vllm: VllmConfig = VllmConfig()
    """Engine settings of rollout.backend=vllm."""

    @model_validator(mode="after")
    def check_backend(self) -> RolloutConfig:
        if self.backend != "vllm":
            return self
        if self.top_p < 1.0:
            raise ConfigError(
                f"config key 'rollout.top_p': {self.top_p:g} with rollout.backend=vllm: vLLM reports log-probs "
                "renormalised over the nucleus, not the tempered softmax the learner recomputes; use top_p=1 or "
                "rollout.backend=hf"
            )
        if (
            self.weight_sync == "collective"
        ):  # not with vLLM yet: its in-process engine sets up torch.distributed itself
            raise ConfigError(
                "config key 'rollout.weight_sync': collective is not supported with rollout.backend=vllm yet "
                "(the engine in the rollout worker initialises torch.distributed itself); use object_store"
            )
        if self.vllm.tensor_parallel_size > 1 and self.num_gpus_per_worker < self.vllm.tensor_parallel_size:
            raise ConfigError(
                f"config key 'rollout.vllm.tensor_parallel_size': {self.vllm.tensor_parallel_size} GPUs per engine, "
                "but "
                f"rollout.num_gpus_per_worker is {self.num_gpus_per_worker:g}; raise it to at least that"
            )
        if self.vllm.kv_cache_gib is None and self.num_gpus_per_worker == 0:
            raise ConfigError(
                "config key 'rollout.vllm.kv_cache_gib': null sizes the KV cache from gpu_memory_utilization, which on "
                "CPU reserves that fraction of the machine's RAM; give a size in GiB (e.g. 1)"
            )
        return self


class ComponentSpec(BaseModel):
    """One configured reward component: its type, error policy, normalisation and the type's own options."""

    model_config = ConfigDict(extra="allow", use_attribute_docstrings=True, allow_inf_nan=False)
    type: str | None = None
    """Registry type (exact_match, chrf, python, ...); null = the component's name."""
    on_error: Literal["raise", "zero", "drop"] = "raise"
    """A failing or timed-out sample: stop the run, score it 0, or leave it out of the update."""
    normalize: Literal["none", "batch", "group"] = "none"
    """Normalise each sample's total to (s - mean) / std over the batch or its group, before weighting."""

    def options(self) -> dict[str, Any]:
        """The type-specific options (every key that is not type/on_error/normalize)."""
        return dict(self.model_extra or {})


class RewardConfig(Section):
    num_workers: int = Field(1, ge=1)
    """Reward-scoring actors in the pool."""
    weights: Annotated[dict[str, float], Field(min_length=1)] = {"exact_match": 1.0, "digit_match": 0.5}
    """Weight of each reward component: total r_t = sum_i w_i * r_i,t. The keys are the components scored."""
    components: dict[str, ComponentSpec] = {}
    """Component name -> {type, on_error, normalize, options...}; a weighted name that is a registry type needs no
    entry."""
    timeout_s: float = Field(120.0, gt=0)
    """A scoring task not done in time is retried on another worker (its worker is restarted)."""
    max_retries: int = Field(2, ge=0)
    """Retries of a failed or timed-out scoring task before the component's on_error policy applies."""
    num_cpus_per_worker: float = Field(0.25, gt=0)
    """Ray CPUs reserved by each reward worker."""
    num_gpus_per_worker: float = Field(0.0, ge=0)
    """Ray GPUs for each reward worker (model-based components run there)."""
    resources_per_worker: Resources = {}
    """Custom Ray resources per reward worker (see rollout.resources_per_worker)."""


class AlgorithmConfig(Section):
    estimator: Annotated[str, one_of("estimator", ESTIMATORS)] = "grpo"
    """Advantage estimator: reinforce, rloo, grpo, reinforce++, reinforce++_baseline, gae (a learned per-token
    value baseline: trains the `critic`), or self_critical (SCST: the reward of each prompt's greedy response, decoded
    by the rollout worker in the same step, as the baseline)."""
    gamma: float = Field(1.0, ge=0, le=1)
    """Discount of the returns-to-go (and of GAE's TD errors)."""
    lam: float = Field(1.0, ge=0, le=1)
    """gae: lambda of A_t = sum_l (gamma lam)^l delta_{t+l}; 1 = returns-to-go minus V(s_t), lower = more of the
    critic's estimate, less variance."""
    whiten: bool | None = None
    """Whiten advantages over the batch; null = the estimator's default."""
    loss: Annotated[str, one_of("loss", LOSSES)] = "reinforce"
    """Policy loss: reinforce or ppo_clip."""
    agg: Annotated[str, one_of("aggregation", AGGREGATIONS)] = "token-mean"
    """Loss aggregation: token-mean, seq-mean-token-mean, seq-mean-token-sum, seq-mean-token-sum-norm."""
    is_cap: float | None = Field(2.0, gt=0)
    """Truncate the importance weight pi/pi_behaviour at this value; null = on-policy (w = 1). pi_behaviour is
    softmax(logits / rollout.temperature) of the weights that sampled, with rollout.top_p < 1 too (not the renormalised
    nucleus the token was drawn from), so the weight corrects for stale weights, never for the nucleus: on-policy it is
    1."""
    clip_low: float = Field(0.2, ge=0)
    """ppo_clip: lower clip range."""
    clip_high: float = Field(0.2, ge=0)
    """ppo_clip: upper clip range."""
    kl_in_reward_coef: float = Field(0.0, ge=0)
    """beta of r_t -= beta * KL_t (needs the reference model, loaded when > 0)."""
    kl_coef: float = Field(0.0, ge=0)
    """Coefficient of KL as a loss term (needs the reference model, loaded when > 0)."""
    kl_kind: Annotated[str, one_of("KL kind", KL_KINDS)] = "k1"
    """KL estimator of the reward penalty (kl_in_reward_coef): k1 (default), k2 or k3; see docs/algorithms.md."""
    kl_loss_kind: Annotated[str, one_of("KL kind", KL_KINDS)] = "k2"
    """KL estimator of the loss term (kl_coef): k2 (gradient of KL(pi||ref)) or k3 (of KL(ref||pi)); k1 is refused."""
    entropy_coef: float = Field(0.0, ge=0)
    """Entropy bonus coefficient."""
    skip_zero_advantage: bool = True
    """Leave samples whose advantages are all 0 out of the update (no policy gradient; not with KL/entropy loss)."""

    @property
    def needs_reference(self) -> bool:
        return self.kl_in_reward_coef > 0 or self.kl_coef > 0


class LearnerConfig(Section):
    lr: float = Field(5e-4, gt=0)
    """AdamW learning rate."""
    adam_betas: tuple[Annotated[float, Field(ge=0, lt=1)], Annotated[float, Field(ge=0, lt=1)]] = (0.9, 0.999)
    """AdamW (beta1, beta2), each in [0, 1)."""
    weight_decay: float = Field(0.0, ge=0)
    """AdamW weight decay."""
    warmup_steps: int = Field(10, ge=0)
    """Linear learning-rate warm-up over this many updates (tames Adam's first, sign-like steps)."""
    lr_schedule: Literal["constant", "cosine"] = "cosine"
    """After warm-up: keep `lr`, or decay it along a half cosine to `min_lr_ratio * lr` at the last update."""
    min_lr_ratio: float = Field(0.3, ge=0, le=1)
    """Final learning rate of the cosine schedule, as a fraction of `lr`."""
    grad_clip: float = Field(1.0, gt=0)
    """Clip the global gradient norm to this value."""
    micro_batch_size: int = Field(256, ge=1)
    """Samples per forward/backward; gradients accumulate to one update per step."""
    updates_per_batch: int = Field(1, ge=1)
    """Passes (epochs) over each rollout batch (>1 is off-policy: use is_cap or ppo_clip)."""
    minibatches: int = Field(1, ge=1)
    """Optimizer steps per pass, each on 1/minibatches of the batch's samples (reshuffled each pass) with its loss
    normalised by that minibatch's counts, as PPO does; a step makes minibatches x updates_per_batch optimizer steps,
    which the lr schedule (warmup_steps too) counts. micro_batch_size stays gradient accumulation inside a
    minibatch. >1 is off-policy after the first: use is_cap or ppo_clip."""
    num_workers: int = Field(1, ge=1)
    """Learner ranks: >1 is a learner group, one torch.distributed process group (NCCL on GPUs, gloo on CPU) in which
    each rank holds a shard of the policy and its optimizer state (FSDP2), placed on as few nodes as possible;
    num_gpus, num_cpus and resources are per rank (docs/architecture.md, "The learner group")."""
    num_gpus: float | None = Field(None, ge=0)
    """Ray GPUs for each learner rank (at most 1: a rank uses one device); null = 1 if the cluster has or can
    autoscale a GPU, else CPU (said at start)."""
    num_cpus: float = Field(1.0, gt=0)
    """Ray CPUs reserved by each learner rank."""
    resources: Resources = {}
    """Custom Ray resources for each learner rank (see rollout.resources_per_worker)."""
    num_threads: int | None = Field(None, ge=1)
    """torch intra-op threads in the learner; null = its Ray CPUs (learner.num_cpus, at least 1)."""
    precision: Literal["fp32", "bf16-mixed", "bf16"] = "fp32"
    """fp32; bf16-mixed (fp32 weights and optimizer, bf16 autocast forward); bf16 (bf16 weights). Log-probs are fp32 in
    all."""
    gradient_checkpointing: bool = False
    """Recompute activations in the backward pass instead of storing them (less activation memory, one more forward per
    micro-batch)."""
    logprob_chunk_tokens: int = Field(4096, ge=1)
    """Tokens whose fp32 log-softmax over the vocabulary is held at once (chunks are recomputed in the backward)."""
    share_prompts: bool = True
    """Run each distinct prompt of a micro-batch through the model once and the responses of its group on top of its KV
    cache (same gradient up to float rounding, prompt work / group size; docs/performance.md); false = every sample's
    whole sequence. Off by itself with gradient_checkpointing (no cache then), model.lora.dropout > 0 (one dropout mask
    per group), models whose cache holds recurrent state (linear attention, SSM), and models whose RoPE follows the
    sequence's length (rope type dynamic, longrope)."""
    max_nonfinite_steps: int = Field(3, ge=1)
    """Stop the run after this many consecutive steps whose loss or gradient norm was NaN/inf (each is skipped)."""


class CriticConfig(Section):
    model_path: str | None = None
    """The critic's transformer (a Hugging Face model directory); null = the policy's starting model (model.path).
    A linear value head on its last hidden state gives V(s_t) for each response token."""
    lr: float = Field(1e-3, gt=0)
    """The critic's AdamW learning rate (constant)."""
    pretrain_steps: int = Field(0, ge=0)
    """The first steps train only the critic: the policy keeps its weights (and its lr schedule waits) until then."""
    clip: float | None = Field(0.2, gt=0)
    """Clipped value loss 0.5 max((V - R)^2, (V_old + clip(V - V_old, -c, c) - R)^2); null = 0.5 (V - R)^2."""
    micro_batch_size: int = Field(256, ge=1)
    """Samples per forward/backward of the critic; gradients accumulate over a minibatch."""
    grad_clip: float = Field(1.0, gt=0)
    """Clip the critic's gradient norm to this value."""
    precision: Literal["fp32", "bf16-mixed", "bf16"] = "fp32"
    """As learner.precision, for the critic."""
    gradient_checkpointing: bool = False
    """As learner.gradient_checkpointing, for the critic."""
    lora: LoraConfig | None = None
    """LoRA adapters on the critic's transformer (its base frozen; the value head trains in full); null = full
    fine-tuning."""
    placement: Literal["actor", "learner"] = "actor"
    """actor: a Ray actor of its own (critic.num_cpus / num_gpus), whose update of a minibatch runs while the learner
    computes the policy's (1.5x faster steps here: docs/performance.md); learner: in the learner's process, one
    after the other, with no resources of its own (when they are short, or the learner runs without Ray)."""
    num_cpus: float = Field(0.25, gt=0)
    """Ray CPUs of the critic's actor (placement=actor)."""
    num_gpus: float | None = Field(None, ge=0)
    """GPUs of the critic's actor (placement=actor); > 0 puts it on CUDA. null: as the learner: none beside a CPU
    learner; beside a GPU learner one of its own when the cluster has a spare GPU, else the critic runs in the
    learner's process (on its GPU)."""
    num_threads: int | None = Field(None, ge=1)
    """torch intra-op threads of the critic's actor (placement=actor); null = its Ray CPUs (at least 1)."""


class StorageConfig(Section):
    uri: StorageUri | None = None
    """Where every artifact of the run goes: a local path or a pyarrow.fs URI (s3://bucket/prefix, gs://...,
    file:///mnt/shared/x); null = output_dir."""


class RayConfig(Section):
    address: str | None = None
    """Ray cluster to join; null = RAY_ADDRESS if set, else start a local Ray."""
    num_cpus: int | None = Field(None, ge=1)
    """CPUs of a locally started Ray (null = all cores)."""
    autoscale_wait_s: float | None = Field(None, ge=0)
    """If the cluster lacks the actors' resources (at start, or after losing a node): ask the autoscaler for them and
    wait this long; null = 900 s on a cluster with an autoscaler, else 0 (fail at once)."""


class TrainConfig(Section):
    task: Literal[BUILTIN_TASKS] = "addition"
    """Built-in task whose model and prompt files fill a null model.path / data.train_file / data.eval_file."""
    seed: int = 0
    """Seed of prompt order, sampling and initialisation."""
    output_dir: StorageUri = "runs/default"
    """Where config.yaml, metrics.jsonl, TensorBoard events and checkpoints go (unless storage.uri is set)."""
    model: ModelConfig = ModelConfig()
    data: DataConfig = DataConfig()
    trainer: TrainerConfig = TrainerConfig()
    rollout: RolloutConfig = RolloutConfig()
    reward: RewardConfig = RewardConfig()
    algorithm: AlgorithmConfig = AlgorithmConfig()
    learner: LearnerConfig = LearnerConfig()
    critic: CriticConfig | None = None
    """The learned value baseline of algorithm.estimator=gae (set with defaults when that estimator is chosen)."""
    storage: StorageConfig = StorageConfig()
    ray: RayConfig = RayConfig()

    @model_validator(mode="after")
    def check_learning_signal(self) -> TrainConfig:
        """Refuse combinations that silently learn nothing, reserve resources nothing uses, or learn off-policy
        uncorrected."""
        algo, group_size = self.algorithm, self.rollout.group_size
        if group_size < 2 and algo.estimator in GROUP_BASELINE:
            raise ConfigError(
                f"config key 'rollout.group_size': {group_size} with algorithm.estimator={algo.estimator!r} gives "
                "every advantage 0 (a group of one has no baseline); use group_size >= 2 or estimator reinforce++"
            )
        for name, spec in self.reward.components.items():
            if spec.normalize == "group" and group_size < 2:
                raise ConfigError(
                    f"config key 'reward.components.{name}.normalize': 'group' with rollout.group_size=1 scores every "
                    "sample 0 (a group of one has no spread); use 'batch' or group_size >= 2"
                )
        for key in ("updates_per_batch", "minibatches"):
            if getattr(self.learner, key) > 1 and algo.loss == "reinforce" and algo.is_cap is None:
                raise ConfigError(
                    f"config key 'learner.{key}': {getattr(self.learner, key)} updates per batch are "
                    "off-policy after the first; set algorithm.is_cap (e.g. 2.0) or algorithm.loss=ppo_clip"
                )
        if self.trainer.max_staleness > 0 and algo.loss == "reinforce" and algo.is_cap is None:
            raise ConfigError(
                f"config key 'trainer.max_staleness': {self.trainer.max_staleness} trains on samples from weights up "
                f"to {self.trainer.max_staleness} versions old (off-policy); set algorithm.is_cap (e.g. 2.0, the "
                "default) or algorithm.loss=ppo_clip, or trainer.max_staleness=0 (synchronous; the default is 1)"
            )
        if (self.learner.num_gpus or 0) > 1:
            raise ConfigError(
                f"config key 'learner.num_gpus': a learner rank trains on one device, so {self.learner.num_gpus:g} "
                "GPUs would be reserved and sit idle; use 1, and learner.num_workers to train on several"
            )
        self.check_learner_group()
        if self.critic is None and algo.estimator in NEEDS_VALUES:
            self.critic = CriticConfig()
        if self.critic is not None and algo.estimator not in NEEDS_VALUES:
            raise ConfigError(
                f"config key 'critic': set, but algorithm.estimator={algo.estimator!r} uses no values; set "
                f"algorithm.estimator to {' or '.join(sorted(NEEDS_VALUES))}, or remove the critic section"
            )
        if algo.kl_loss_kind == "k1":
            raise ConfigError(
                "config key 'algorithm.kl_loss_kind': k1 in the loss has zero expected gradient "
                "(grad(logp - logp_ref) = grad logp, whose mean under the policy is 0); use k2 or k3"
            )
        return self

    def check_learner_group(self) -> None:
        """Refuse what a learner group (learner.num_workers > 1) does not do yet."""
        if self.learner.num_workers == 1:
            return
        gpus = self.learner.num_gpus or 0
        if 0 < gpus < 1:
            raise ConfigError(
                f"config key 'learner.num_gpus': {gpus:g} with learner.num_workers={self.learner.num_workers} would "
                "put two ranks on one GPU, which NCCL refuses; use 1 (a GPU per rank) or 0"
            )
        unsupported = {
            "critic.placement=learner": self.critic is not None and self.critic.placement == "learner",
        }
        for key, used in unsupported.items():
            if used:
                raise ConfigError(
                    f"config key 'learner.num_workers': {self.learner.num_workers} ranks do not work with {key} yet; "
                    "use learner.num_workers=1 with it"
                )

    @model_validator(mode="after")
    def resolve_components(self) -> TrainConfig:
        """Give every component in use (weighted or an eval metric) an explicit spec, of the type of its name unless
        it names one, and refuse a configured component nothing uses. That each type exists and its options are
        valid is checked before Ray starts by pipeline/preflight.py, which knows the component library."""
        specs = self.reward.components
        in_use = list(dict.fromkeys([*self.reward.weights, *self.trainer.eval_metrics]))
        for name in [n for n in specs if n not in in_use]:
            if specs[name] == ComponentSpec(type=name):  # a plain spec filled in earlier: nothing is lost
                del specs[name]
            else:
                raise ConfigError(
                    f"config key 'reward.components.{name}': configured but unused; "
                    f"give it a weight (reward.weights.{name}) or list it in trainer.eval_metrics"
                )
        for name in in_use:
            spec = specs.setdefault(name, ComponentSpec())
            spec.type = spec.type or name
        return self

    @property
    def run_uri(self) -> str:
        """Where the run's artifacts live: storage.uri, else output_dir."""
        return self.storage.uri or self.output_dir


def parse_override(text: str) -> tuple[str, Any]:
    """`a.b=value` -> ('a.b', value parsed as a YAML scalar/list/mapping)."""
    key, sep, raw = text.partition("=")
    if not sep or not key:
        raise ConfigError(f"override {text!r} is not key=value (e.g. trainer.total_steps=50)")
    try:
        return key, yaml.safe_load(raw) if raw else ""
    except yaml.YAMLError as error:
        problem = getattr(error, "problem", None) or "not valid YAML"
        raise ConfigError(f"override {text!r}: the value is not valid YAML ({problem})") from None


def apply_override(data: dict, key: str, value: Any) -> None:
    """data[a][b] = value for key 'a.b' (sections created as needed)."""
    node, path = data, key.split(".")
    for part in path[:-1]:
        if node.get(part) is None:  # a section not set yet (e.g. critic: null): its defaults plus this key
            node[part] = {}
        node = node[part]
        if not isinstance(node, dict):
            raise ConfigError(f"config key {key!r}: {part!r} is not a section")
    node[path[-1]] = value


def config_with(config: TrainConfig, values: dict[str, Any]) -> TrainConfig:
    """`config` with dotted keys set, applied onto its effective values (so `reward.weights.x` keeps the
    other weights) and validated again."""
    data = config.model_dump(mode="json")
    for key, value in values.items():
        apply_override(data, key, value)
    return validate_config(data)


def load_config(path: str | Path | None = None, overrides: list[str] = ()) -> TrainConfig:
    """YAML file (optional) + dotted overrides -> a TrainConfig validated for names and types only; the reward
    components' types and options are checked by pipeline/preflight.py (`preflight.load_config` = this + `check`),
    which every entry point runs before Ray starts."""
    if path is None:
        return config_from_yaml("{}", "", overrides)
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {str(path)!r} does not exist")
    return config_from_yaml(path.read_text(), str(path), overrides)


def read_yaml(text: str, source: str, what: str = "config file") -> Any:
    """YAML text -> data; a syntax error is one line naming `source`, the line and column, and the problem."""
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        where = f" line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(error, "problem", None) or "not valid YAML"
        raise ConfigError(f"{what} {source!r}{where}: not valid YAML ({problem}); fix the YAML there") from None


def config_from_yaml(text: str, source: str, overrides: list[str] = ()) -> TrainConfig:
    """YAML text (from the file or URI `source`) + dotted overrides -> validated TrainConfig."""
    data = read_yaml(text, source) or {}
    if not isinstance(data, dict):
        raise ConfigError(f"config file {source!r} must hold a mapping of sections")
    config = validate_config(data)
    return config_with(config, dict(parse_override(text) for text in overrides)) if overrides else config


# vllm.LLM arguments that only size or tune the engine. Any other rollout.vllm.engine_kwargs key in a run's config
# needs trust: vLLM has arguments that load code (trust_remote_code, worker_cls, worker_extension_cls,
# logits_processors, kv_transfer_config's connector module, ...), and tokenforge passes them on unread.
PLAIN_ENGINE_KWARGS = {
    "quantization",
    "kv_cache_dtype",
    "block_size",
    "max_num_batched_tokens",
    "enable_chunked_prefill",
    "swap_space",
    "cpu_offload_gb",
    "max_logprobs",
    "disable_log_stats",
    "seed",
}


def code_it_would_run(config: TrainConfig) -> list[str]:
    """The settings of `config` that run code from outside tokenforge: remote model code, python reward
    functions, vLLM engine arguments that may load code, a Ray cluster to join. Each entry starts with its dotted
    key. A run directory's config.yaml needs the user's consent
    (--trust-run-config) for these: ask before its pre-flight (pipeline/preflight.py imports the python
    functions, and so runs their modules' top-level code; loading the config here imports nothing)."""
    found = ["model.trust_remote_code"] if config.model.trust_remote_code else []
    for name, spec in config.reward.components.items():
        options = spec.options()
        if spec.type == "python":
            found.append(f"reward.components.{name} (python function {options.get('function')})")
        if options.get("trust_remote_code"):
            found.append(f"reward.components.{name}.trust_remote_code")
    for key, value in config.rollout.vllm.engine_kwargs.items():
        if key not in PLAIN_ENGINE_KWARGS and not (key == "trust_remote_code" and value is False):
            found.append(f"rollout.vllm.engine_kwargs.{key}")
    if config.ray.address:  # the driver would send that cluster your Ray token and unpickle what it sends back
        found.append(f"ray.address (joins the cluster at {config.ray.address!r})")
    return found


def first_error(error: ValidationError, what: str, prefix: tuple = (), unknown: str = "unknown key") -> ConfigError:
    """pydantic's first error as one line naming the dotted key: "<what> 'a.b': message"."""
    first = error.errors()[0]
    key = ".".join(str(part) for part in (*prefix, *first["loc"])) or "config"
    message = unknown if first["type"] == "extra_forbidden" else first["msg"].removeprefix("Value error, ")
    return ConfigError(f"{what} {key!r}: {message}")


def validate_config(data: dict) -> TrainConfig:
    try:
        return TrainConfig.model_validate(data)
    except ValidationError as error:
        raise first_error(
            error, "config key", unknown="unknown config key (see `tokenforge train --help-config`)"
        ) from None


def config_to_yaml(config: TrainConfig) -> str:
    """The resolved config as YAML (`tokenforge train -c` accepts it)."""
    return yaml.safe_dump(config.model_dump(mode="json"), sort_keys=False)


def describe_fields(model: type[BaseModel] = TrainConfig, prefix: str = "") -> list[str]:
    """One line per config key: dotted name, default, docstring (wrapped in the source, joined here)."""
    lines = []
    for name, field in model.model_fields.items():
        annotation = field.annotation
        if isinstance(annotation, type) and issubclass(annotation, Section):
            lines += describe_fields(annotation, f"{prefix}{name}.")
            continue
        default = field.get_default(call_default_factory=True)
        lines.append(f"{prefix}{name} = {default!r}  # {' '.join(field.description.split())}")
        optional = [a for a in get_args(annotation) if isinstance(a, type) and issubclass(a, Section)]
        if optional:  # a section that is off (null) until one of its keys is set: its keys, with their defaults
            lines += describe_fields(optional[0], f"{prefix}{name}.")
    return lines
