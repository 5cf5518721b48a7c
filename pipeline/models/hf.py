"""Loading local HF models/tokenizers and computing response-token log-probs.

Sequences are laid out as [left-padded prompt | right-padded response], the same layout for
generation (rollout worker) and for scoring (learner), so positions agree.
"""

from __future__ import annotations

import functools
import inspect
import logging
import re
from pathlib import Path

import torch
import torch.utils.checkpoint
import transformers
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoModelForImageTextToText,
    AutoProcessor,
    AutoTokenizer,
    PreTrainedTokenizerBase,
    ProcessorMixin,
)

from pipeline.errors import TokenforgeError

ASSETS = Path(__file__).parent.parent / "assets"
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
log = logging.getLogger("tokenforge")


def builtin_paths(task: str) -> tuple[Path, Path, Path]:
    """(model dir, train file, eval file) of a built-in task: its prompts are JSONL, or Parquet when they hold
    images."""
    suffix = ".parquet" if (ASSETS / task / "train.parquet").is_file() else ".jsonl"
    return ASSETS / task / "model", ASSETS / task / f"train{suffix}", ASSETS / task / f"eval{suffix}"


BUILTIN_MODEL, BUILTIN_TRAIN, BUILTIN_EVAL = builtin_paths("addition")


def check_model_dir(path: str | Path, key: str = "model.path") -> Path:
    path = Path(path)
    if not (path / "config.json").is_file():
        hint = "leave it null for the built-in model" if key == "model.path" else "save one with save_pretrained"
        raise TokenforgeError(
            f"{key} {str(path)!r} is not a local HF model directory (no config.json); point {key} at one, or {hint}"
        )
    return path


# the files a tokenizer is saved as (one suffices); without any, transformers builds an empty tokenizer silently
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "tokenizer.model",
    "vocab.json",
    "vocab.txt",
    "spiece.model",
)


def from_pretrained(auto_class, path: Path, trust_remote_code: bool, **kwargs):
    """`auto_class.from_pretrained`, with a model that needs its own code (and no consent) as one line."""
    try:
        return auto_class.from_pretrained(path, trust_remote_code=trust_remote_code, **kwargs)
    except ValueError as error:
        if trust_remote_code or "trust_remote_code" not in str(error):
            raise
        raise TokenforgeError(
            f"{str(path)!r} needs its own Python code to load (auto_map in its config); if you trust that code, set "
            "trust_remote_code=true for it (model.trust_remote_code, or the reward component's trust_remote_code "
            "option)"
        ) from None


_warned_pad: set[str] = set()


def load_tokenizer(path: str | Path, trust_remote_code: bool = False) -> PreTrainedTokenizerBase:
    """The model's tokenizer, padding on the left; it must define EOS. Without a pad token it pads with
    EOS (as peers do; padding is masked out everywhere), logged once per process."""
    path = check_model_dir(path)
    if not any((path / name).is_file() for name in TOKENIZER_FILES):
        raise TokenforgeError(
            f"{str(path)!r} holds no tokenizer (none of {', '.join(TOKENIZER_FILES)}); save the model's tokenizer "
            "there (tokenizer.save_pretrained(path))"
        )
    tokenizer = from_pretrained(AutoTokenizer, path, trust_remote_code)
    if tokenizer.eos_token_id is None:
        raise TokenforgeError(
            f"tokenizer in {str(path)!r} has no eos token; set `eos_token` in its tokenizer_config.json"
        )
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
        if str(path) not in _warned_pad:
            _warned_pad.add(str(path))
            log.warning(
                "tokenizer in %r has no pad token: padding with its eos token %r", str(path), tokenizer.eos_token
            )
    tokenizer.padding_side = "left"
    return tokenizer


def model_config(path: str | Path, trust_remote_code: bool = False, key: str = "model.path"):
    """The model directory's HF config (AutoConfig); `key` names the setting in the error when it is not one."""
    return from_pretrained(AutoConfig, check_model_dir(path, key), trust_remote_code)


def is_vision_language(config) -> bool:
    """Whether an HF config is an image-text-to-text model's (Llava-style: a vision tower, a projector, a causal LM)."""
    return getattr(config, "vision_config", None) is not None


def load_processor(path: str | Path, tokenizer: PreTrainedTokenizerBase, trust_remote_code: bool = False):
    """A vision-language model's processor (AutoProcessor: image processor + tokenizer), holding `tokenizer`
    (load_tokenizer's: left padding, a pad token)."""
    processor = from_pretrained(AutoProcessor, check_model_dir(path), trust_remote_code)
    if not isinstance(processor, ProcessorMixin) or getattr(processor, "image_processor", None) is None:
        raise TokenforgeError(
            f"{str(path)!r} is a vision-language model but holds no image processor (processor_config.json); save its "
            "processor there (processor.save_pretrained(path))"
        )
    processor.tokenizer = tokenizer
    return processor


def context_length(path: str | Path, trust_remote_code: bool = False) -> int:
    config = model_config(path, trust_remote_code).get_text_config()  # a VLM's language model keeps it in text_config
    for key in ("max_position_embeddings", "n_positions", "max_seq_len"):
        if getattr(config, key, None):
            return int(getattr(config, key))
    raise TokenforgeError(f"model config in {str(path)!r} states no context length (max_position_embeddings)")


def quiet_transformers() -> None:
    """No per-load progress bars ("Loading weights") or info lines from transformers in every actor's log and
    on the terminal of `tokenforge export` / `eval`; its errors still show."""
    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()


def load_model(
    path: str | Path, trust_remote_code: bool = False, device: str = "cpu", dtype: str = "float32"
) -> torch.nn.Module:
    quiet_transformers()
    vision = is_vision_language(model_config(path, trust_remote_code))
    auto_class = AutoModelForImageTextToText if vision else AutoModelForCausalLM
    model = from_pretrained(auto_class, check_model_dir(path), trust_remote_code, dtype=DTYPES[dtype])
    return model.to(device)


def loaded_dtypes(model: torch.nn.Module, names, dtype: str) -> dict[str, torch.dtype]:
    """The dtype of each weight in `names` (state dict names of `model`, or of its base with LoRA) in a copy of the
    model that load_model(..., dtype) loads: `dtype`, except the weights the model class keeps in fp32 under
    it, e.g. the MoE router's `gate.weight` and `e_score_correction_bias` of Dots1, Ernie-4.5-MoE and
    Nemotron-H under bf16 and fp16. transformers' from_pretrained rule (its dtype plan:
    `_keep_in_fp32_modules_strict` under bf16 and fp16, `_keep_in_fp32_modules` under fp16 too), with each
    glob matched as from_pretrained matches it (`*` any text, searched anywhere in the name)."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    # the class attributes that transformers' (private) _get_dtype_plan reads
    globs = list(getattr(base, "_keep_in_fp32_modules_strict", None) or []) if dtype in ("bfloat16", "float16") else []
    if dtype == "float16":
        globs += getattr(base, "_keep_in_fp32_modules", None) or []
    patterns = [(re.compile(glob.replace("*", ".*")), torch.float32) for glob in globs]
    return {name: next((kept for pattern, kept in patterns if pattern.search(name)), DTYPES[dtype]) for name in names}


def build_sequences(
    prompt_ids: list[list[int]], response_ids: list[list[int]], pad_id: int, device: str = "cpu"
) -> dict[str, torch.Tensor]:
    """Token ids, attention mask and position ids of [left-padded prompt | right-padded response]."""
    prompt_width = max(len(p) for p in prompt_ids)
    response_width = max(len(r) for r in response_ids)
    ids = torch.full((len(prompt_ids), prompt_width + response_width), pad_id, dtype=torch.long)
    attention = torch.zeros_like(ids)
    for i, (prompt, response) in enumerate(zip(prompt_ids, response_ids)):
        start = prompt_width - len(prompt)
        ids[i, start:prompt_width] = torch.as_tensor(prompt)
        ids[i, prompt_width : prompt_width + len(response)] = torch.as_tensor(response)
        attention[i, start : prompt_width + len(response)] = 1
    return {
        "input_ids": ids.to(device),
        "attention_mask": attention.to(device),
        "position_ids": positions_from_mask(attention).to(device),
        "prompt_width": prompt_width,
    }


def select_rows(sequences: dict[str, torch.Tensor], rows: slice | torch.Tensor) -> dict[str, torch.Tensor]:
    """Some rows of `build_sequences` output (the prompt width stays that of the whole batch; a vision-language
    batch's `images` stay whole, `image_of` is per row)."""
    return {k: (v[rows] if torch.is_tensor(v) else v) for k, v in sequences.items()}


def with_images(sequences: dict, images: dict[str, torch.Tensor], image_of: torch.Tensor) -> dict:
    """`sequences` with a vision-language model's images: `images` holds the model's image inputs (pixel_values,
    ...), one entry per distinct image (a group shares its image), and `image_of` (B,) the entry of each row."""
    return {**sequences, "images": images, "image_of": image_of}


def with_suppressed(sequences: dict, suppressed: tuple[int, ...]) -> dict:
    """`sequences` whose log-probs leave out the token ids the rollout worker never samples (`suppress`): a
    vision-language model's image token, whether or not the prompts hold images."""
    return {**sequences, "suppressed": suppressed}


def suppress(logits: torch.Tensor, suppressed: tuple[int, ...] | None) -> torch.Tensor:
    """`logits` with the `suppressed` token ids at -inf (a copy; `logits` itself when there are none): the rollout
    worker samples from, and the learner scores with, softmax over the other tokens. A vision-language model's image
    token is one: sampled in a response it would ask for an image the prompt does not have."""
    if not suppressed:
        return logits
    return logits.index_fill(-1, torch.tensor(suppressed, device=logits.device), -torch.inf)


def image_token_ids(processor) -> tuple[int, ...]:
    """The ids of a processor's image token (what `suppress` keeps out of responses)."""
    return (processor.tokenizer.convert_tokens_to_ids(processor.image_token),)


def image_inputs(model: torch.nn.Module, sequences: dict, image_of: torch.Tensor | None = None) -> dict:
    """The image inputs (floats in the model's dtype) of the rows whose images are `image_of` (default: every row of
    `sequences`); {} for a text model."""
    if "images" not in sequences:
        return {}
    index = sequences["image_of"] if image_of is None else image_of
    dtype = getattr(model, "dtype", torch.float32)
    return {k: v[index].to(dtype) if v.is_floating_point() else v[index] for k, v in sequences["images"].items()}


def positions_from_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """Position of each token counted from the first real token (left padding gets 0)."""
    return (attention_mask.cumsum(-1) - 1).clamp(min=0)


def response_logprobs(
    model: torch.nn.Module,
    sequences: dict[str, torch.Tensor],
    temperature: float = 1.0,
    chunk_tokens: int = 4096,
    share_prompts: bool = False,
    lockstep: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """log pi(y_t | prefix) and the entropy H_t of pi(. | prefix) for each response token: (B, R) each, fp32.

    pi is softmax(logits / temperature), the distribution the rollout worker samples from. The
    logits stay in the model's dtype; the fp32 log-softmax over the vocabulary is taken
    `chunk_tokens` tokens at a time and recomputed in the backward pass (activation checkpointing),
    so a (B, R, vocab) fp32 tensor never exists at once. share_prompts: run each distinct prompt
    through the model once (shared_prompt_logits), not once per sample of its group; `lockstep` (a learner
    group, whose ranks must all run the same forwards) takes that path even when no two samples share one.
    """
    ids, width = sequences["input_ids"], sequences["prompt_width"]
    # logits at position p predict token p + 1: the response starts at `width`, predicted from width - 1,
    # so only the last R + 1 positions need logits (the prompt's are never computed where the model allows).
    # The last position predicts nothing; it gets a dummy target and is dropped at the end, so that the
    # logits are flattened as a view, never copied.
    logits = shared_prompt_logits(model, sequences, lockstep) if share_prompts else None
    if logits is None:
        logits = last_logits(model, sequences, ids.shape[1] - width + 1)
    logits = suppress(logits, sequences.get("suppressed"))
    flat = logits.reshape(-1, logits.shape[-1])
    targets = torch.nn.functional.pad(ids[:, width:], (0, 1)).reshape(-1)
    if torch.is_grad_enabled():  # keep only the logits for the backward; recompute each chunk's fp32 softmax there
        chunk = functools.partial(torch.utils.checkpoint.checkpoint, token_logprob_entropy, use_reentrant=False)
    else:
        chunk = token_logprob_entropy
    parts = [
        chunk(flat[i : i + chunk_tokens], targets[i : i + chunk_tokens], temperature)
        for i in range(0, flat.shape[0], chunk_tokens)
    ]
    logprobs = torch.cat([p[0] for p in parts]).reshape(logits.shape[:2])[:, :-1]
    entropy = torch.cat([p[1] for p in parts]).reshape(logits.shape[:2])[:, :-1]
    return logprobs, entropy


def shared_prompt_logits(
    model: torch.nn.Module, sequences: dict[str, torch.Tensor], lockstep: bool = False
) -> torch.Tensor | None:
    """last_logits(model, sequences, R + 1) with each distinct prompt computed once: the G samples of a group
    share their prompt, whose keys and values do not depend on the response (causal attention), so the
    prompts go through the model once, their KV cache is copied to each sample's row (differentiably: the
    gradient of every sample reaches the shared prompt), and the responses run on top of it. The same
    numbers up to float rounding, with prompt work / G. None when no two samples share a prompt (unless
    `lockstep`), or when the model's cache is not attention_kv_only (then the caller runs the plain forward)."""
    ids, mask, positions, width = (
        sequences[k] for k in ("input_ids", "attention_mask", "position_ids", "prompt_width")
    )
    # a prompt is its tokens, its mask (padding may look like a real token) and, for a VLM, its image
    parts = [ids[:, :width], mask[:, :width]] + ([sequences["image_of"][:, None]] if "images" in sequences else [])
    distinct, prompt_of = torch.unique(
        torch.cat(parts, dim=1), dim=0, return_inverse=True
    )  # prompt_of: (B,) row of each sample's prompt
    if len(distinct) == len(ids) and not lockstep:
        return None
    first = forward_logits(
        model,
        {
            "input_ids": distinct[:, :width],
            "attention_mask": distinct[:, width : 2 * width],
            "position_ids": positions_from_mask(distinct[:, width : 2 * width]),
            "use_cache": True,
            **image_inputs(model, sequences, distinct[:, 2 * width] if "images" in sequences else None),
        },
        keep=1,  # the last prompt position (prompts are left-padded) predicts the first response token
    )
    key = cache_keyword(model)
    cache = getattr(first, key, None)
    if not attention_kv_only(cache):
        return None
    cache.reorder_cache(prompt_of)  # (distinct, ...) -> (B, ...): index_select, so gradients flow back to `distinct`
    rest = forward_logits(
        model,
        {"input_ids": ids[:, width:], "attention_mask": mask, "position_ids": positions[:, width:], key: cache},
        keep=ids.shape[1] - width,
    )
    return torch.cat([first.logits[:, -1:][prompt_of], rest.logits[:, -(ids.shape[1] - width) :]], dim=1)


def attention_kv_only(cache) -> bool:
    """A transformers DynamicCache of attention keys and values only: no recurrent state (linear-attention / SSM
    layers), which the responses' forward would update in place, breaking the backward through a shared prompt."""
    return isinstance(cache, transformers.DynamicCache) and not any(getattr(cache, "is_linear", []))


def can_share_prompts(model: torch.nn.Module) -> bool:
    """Whether shared_prompt_logits applies to `model`: its RoPE does not follow the sequence's length, and a
    one-token forward returns an attention_kv_only cache."""
    if rope_follows_length(model.config.get_text_config()):
        return False
    device = next(model.parameters()).device
    with torch.no_grad():
        out = model(input_ids=torch.zeros(1, 1, dtype=torch.long, device=device), use_cache=True)
    return attention_kv_only(getattr(out, cache_keyword(model), None))


def rope_follows_length(config) -> bool:
    """Whether the model's rotary frequencies depend on the length of the sequence it runs: RoPE types `dynamic`
    (NTK scaling recomputed past the original context) and `longrope` (`su` in older remote code: long factors
    once the sequence passes it), in `rope_parameters` or `rope_scaling`, per layer type too. Then a prompt run
    alone gets other keys than in its whole sequence past the original context, so its cache cannot be shared
    (a tiny Llama's gradients then differ by 5% under dynamic, 40% under longrope)."""

    def types(params) -> set[str]:  # every rope type named in a (nested) rope parameters dict
        if not isinstance(params, dict):
            return set()
        own = {params[key] for key in ("rope_type", "type") if isinstance(params.get(key), str)}
        return own.union(*(types(value) for value in params.values()))

    named = types(getattr(config, "rope_parameters", None)) | types(getattr(config, "rope_scaling", None))
    return any("dynamic" in kind or kind in ("longrope", "su") for kind in named)


def cache_keyword(model: torch.nn.Module) -> str:
    """The KV-cache keyword of the model's forward and output: `cache` since transformers 5.24, `past_key_values`
    before and in most remote code (a LoRA model: its base model's)."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return "cache" if "cache" in inspect.signature(base.forward).parameters else "past_key_values"


def last_logits(model: torch.nn.Module, sequences: dict[str, torch.Tensor], keep: int) -> torch.Tensor:
    """The logits of the last `keep` positions: (B, keep, vocab) in the model's dtype."""
    inputs = {k: sequences[k] for k in ("input_ids", "attention_mask", "position_ids")}
    return forward_logits(model, {**inputs, **image_inputs(model, sequences)}, keep).logits[:, -keep:]


def forward_logits(model: torch.nn.Module, inputs: dict, keep: int):
    """model(**inputs) with the LM head on the last `keep` positions: HF causal LMs take `logits_to_keep` and
    apply their head (and any logit soft-capping) to those positions only; a model whose forward has no
    logits_to_keep computes all positions (the caller slices)."""
    try:
        return model(**inputs, logits_to_keep=keep)
    except TypeError as error:
        if "logits_to_keep" not in str(error):
            raise
        return model(**inputs)


def token_logprob_entropy(
    logits: torch.Tensor, targets: torch.Tensor, temperature: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """For (N, vocab) logits and (N,) targets: log pi(target) and H(pi), pi = softmax(logits / T) in fp32."""
    log_pi = torch.log_softmax(logits.float() / temperature, dim=-1)
    # H = -sum_v pi(v) log pi(v), with 0 log 0 = 0: a -inf logit (a suppressed token) would otherwise give
    # 0 * -inf = NaN, in the forward and, through the product's derivative, in the backward
    entropy = -(log_pi.exp() * log_pi.masked_fill(torch.isneginf(log_pi), 0.0)).sum(-1)
    return log_pi.gather(-1, targets[:, None]).squeeze(-1), entropy


def micro_batches(batch_size: int, size: int) -> list[slice]:
    """Consecutive row slices of at most `size` rows covering a batch of `batch_size`."""
    return [slice(start, start + size) for start in range(0, batch_size, size)]


def mixed_autocast(device: str, precision: str):
    """bf16 autocast of a forward pass under precision bf16-mixed (a no-op otherwise)."""
    enabled = precision == "bf16-mixed"
    return torch.autocast(device_type=torch.device(device).type, dtype=torch.bfloat16, enabled=enabled)


def without_dropout(model: torch.nn.Module, train: bool) -> torch.nn.Module:
    """`model` in train mode (`train`: HF recomputes activations only then) or eval mode, with every dropout
    but LoRA's own switched off, so that the learner's log-probs are those the rollout workers sampled with."""
    model.train(train)
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Dropout):
            if "lora_dropout" in name:
                module.train()  # model.lora.dropout, when set, regularises the adapters
            else:
                module.p = 0.0
        if isinstance(getattr(module, "attention_dropout", None), float):
            module.attention_dropout = 0.0  # attention implementations that read it in train mode
    return model


def enable_checkpointing(model: torch.nn.Module) -> None:
    """Activation (gradient) checkpointing: transformers >= 5.2x calls it activation_checkpointing_enable."""
    if hasattr(model, "activation_checkpointing_enable"):
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
