"""LoRA through `peft`: the learner trains adapters only; rollout workers get merged weights.

With `model.lora` set, the learner's policy is the base model (model.path, frozen) plus LoRA adapters
on the target modules: W x + (alpha / r) * B A x. Only A and B require gradients, so the optimizer
(and its state) covers the adapters alone. Checkpoints hold the adapter (peft's
adapter_model.safetensors + adapter_config.json); `tokenforge export` writes a plain HF model.
"""

from __future__ import annotations

import json
import re
import warnings
from contextlib import contextmanager
from pathlib import Path

import torch

from pipeline.config import LoraConfig
from pipeline.errors import TokenforgeError
from pipeline.models.hf import enable_checkpointing, load_model, without_dropout

ADAPTER_CONFIG = "adapter_config.json"


def is_adapter_dir(path: str | Path) -> bool:
    return (Path(path) / ADAPTER_CONFIG).is_file()


def require_peft():
    try:
        import peft
    except ImportError:
        raise TokenforgeError("model.lora needs the `peft` package: pip install peft (or 'tokenforge[lora]')") from None
    return peft


@contextmanager
def peft_quietly():
    """peft's PeftModel asks the model for transformers 5's deprecated `is_gradient_checkpointing`, a FutureWarning
    (with raw ANSI codes in Ray's log) at every learner start and export; only that warning is ignored, around peft."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="`is_gradient_checkpointing` is deprecated", category=FutureWarning)
        yield


VISION_TOWERS = ("vision_tower", "visual", "vision_model")  # what Llava, Qwen2-VL and Idefics/SmolVLM call theirs


def vision_tower_names(model: torch.nn.Module) -> list[str]:
    """The module names of a vision-language model's vision tower (empty for a text model)."""
    return [name for name, _ in model.named_modules() if name.rsplit(".", 1)[-1] in VISION_TOWERS]


def add_adapters(model: torch.nn.Module, options: LoraConfig, checkpoint: str | None = None) -> torch.nn.Module:
    """`model` wrapped with fresh LoRA adapters, or with the trainable adapters saved in `checkpoint`."""
    peft = require_peft()
    if checkpoint is not None:
        with peft_quietly():
            return peft.PeftModel.from_pretrained(model, checkpoint, is_trainable=True)
    vision = [] if options.vision_tower else vision_tower_names(model)
    config = peft.LoraConfig(
        r=options.r,
        lora_alpha=options.alpha,
        lora_dropout=options.dropout,
        target_modules=options.target_modules,
        exclude_modules=f"({'|'.join(map(re.escape, vision))})\\..*" if vision else None,  # (peft: a full match)
        bias="none",
    )
    try:
        with peft_quietly():
            return peft.get_peft_model(model, config)
    except ValueError as error:  # e.g. target modules that the model does not have
        raise TokenforgeError(f"model.lora: {str(error).splitlines()[0]}") from None


def trainable_model(
    path: str,
    base: str,
    lora: LoraConfig | None,
    trust_remote_code: bool,
    device: str,
    precision: str,
    checkpointing: bool,
) -> torch.nn.Module:
    """A model to train (the learner's policy, the critic's transformer): `path` (a model directory or a checkpoint)
    in full, or with `lora` the frozen `base` plus adapters (those saved at `path` when it holds them, else fresh
    ones); bf16 weights under precision bf16, else fp32; activation checkpointing when `checkpointing`; every
    dropout but LoRA's off (hf.without_dropout)."""
    dtype = "bfloat16" if precision == "bf16" else "float32"
    if lora is None:
        model = load_model(path, trust_remote_code, device, dtype)
    else:
        model = load_model(base, trust_remote_code, device, dtype)
        model = add_adapters(model, lora, path if is_adapter_dir(path) else None)
    if checkpointing:
        enable_checkpointing(model)
    return without_dropout(model, train=checkpointing)


def merged_state_dict(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The base model's state dict on the CPU, under its own names, with every adapter's update added:
    W' = W + (alpha / r) * B @ A (peft's get_delta_weight, one layer at a time on the model's device). The
    adapters stay unmerged in `model`, and the device never holds a second copy of the base weights."""
    from peft.tuners.lora import LoraLayer

    base = model.get_base_model()
    merged = {
        key.replace(".base_layer.", "."): value.detach().to("cpu", copy=True)
        for key, value in base.state_dict().items()
        if ".lora_" not in key
    }
    for name, module in base.named_modules():
        if isinstance(module, LoraLayer):
            for adapter in module.active_adapters:
                weight = f"{name}.weight"
                merged[weight] += module.get_delta_weight(adapter).detach().to("cpu", merged[weight].dtype)
    return merged


def check_mergeable(model: torch.nn.Module) -> None:
    """merged_from_state merges adapters of linear layers only: one line naming any other adapted layer."""
    from peft.tuners.lora import Linear as LoraLinear
    from peft.tuners.lora import LoraLayer

    for name, module in model.get_base_model().named_modules():
        if isinstance(module, LoraLayer) and not isinstance(module, LoraLinear):
            raise TokenforgeError(
                f"model.lora adapts {name} ({type(module).__name__}), which a learner group cannot merge yet (linear "
                "layers only); leave it out of model.lora.target_modules or use learner.num_workers=1"
            )


def merged_from_state(model: torch.nn.Module, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """merged_state_dict's result computed from `state`, the LoRA model's whole state dict on the CPU (a learner
    group's, gathered from its shards): W' = W + (alpha / r) * B @ A for each adapted linear layer, transposed where
    the layer stores W as (in, out) (GPT-2's Conv1D: fan_in_fan_out), as peft's get_delta_weight computes it.
    Every adapted layer must be linear: the group checks it once, when it forms (check_mergeable)."""
    from peft.tuners.lora import LoraLayer

    prefix = "base_model.model."  # the PeftModel's names of the base model's weights
    merged = {
        key.removeprefix(prefix).replace(".base_layer.", "."): value
        for key, value in state.items()
        if ".lora_" not in key
    }
    for name, module in model.get_base_model().named_modules():
        if not isinstance(module, LoraLayer):
            continue
        for adapter in module.active_adapters:
            a, b = (state[f"{prefix}{name}.lora_{part}.{adapter}.weight"] for part in "AB")
            delta = (b @ a) * module.scaling[adapter]
            weight = f"{name}.weight"
            merged[weight] += (delta.T if module.fan_in_fan_out else delta).to(merged[weight].dtype)
    return merged


def export(checkpoint: str | Path, out: str | Path, merge: bool) -> Path:
    """Write a checkpoint as a plain HF model (merging a LoRA adapter into its base when `merge`), or copy
    its adapter as it is (`merge` false). A full-weight checkpoint is saved as it is either way."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from pipeline.models.hf import quiet_transformers

    quiet_transformers()
    checkpoint, out = Path(checkpoint), Path(out)
    tokenizer = AutoTokenizer.from_pretrained(checkpoint)
    if not is_adapter_dir(checkpoint):
        AutoModelForCausalLM.from_pretrained(checkpoint).save_pretrained(out)
    else:
        peft = require_peft()
        base_path = json.loads((checkpoint / ADAPTER_CONFIG).read_text())["base_model_name_or_path"]
        with peft_quietly():
            model = peft.PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_path), checkpoint)
        (model.merge_and_unload() if merge else model).save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out
