"""Dataset prompts -> the text and token ids the model sees. One place, used by the rollout worker,
the start-up checks and `tokenforge eval`, so every path tokenizes a prompt the same way.

- Plain text is tokenized as `tokenizer(text)` does by default: with the tokenizer's own special
  tokens (e.g. the BOS that Llama/Gemma tokenizers add in their post-processor), as TRL does.
  `data.add_special_tokens: false` turns that off.
- A conversation (TRL's conversational format: a list of {role, content} messages) is rendered with
  the tokenizer's chat template (`add_generation_prompt=True`) and the rendered text is tokenized
  *without* adding special tokens: the template already holds them, so BOS never appears twice.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import jinja2
from transformers import PreTrainedTokenizerBase

from pipeline.batch import is_conversation
from pipeline.errors import TokenforgeError


def check_prompt(prompt: Any) -> str | None:
    """What is wrong with one dataset prompt (None if nothing): a non-empty string, or a non-empty list of
    {role, content} messages with string values."""
    if isinstance(prompt, str):
        return None if prompt.strip() else "is empty"
    if not is_conversation(prompt):
        return f"is neither text nor a list of messages ({type(prompt).__name__})"
    if not prompt:
        return "is an empty list of messages"
    for k, message in enumerate(prompt):
        if (
            not isinstance(message, dict)
            or not isinstance(message.get("role"), str)
            or not isinstance(message.get("content"), str)
        ):
            return f"message {k} is not {{role: str, content: str}}"
    return None


def set_chat_template(tokenizer: PreTrainedTokenizerBase, template_file: str | None) -> None:
    """Use the Jinja template in `template_file` (model.chat_template) instead of, or in the absence of,
    the tokenizer's own."""
    if template_file is None:
        return
    path = Path(template_file)
    if not path.is_file():
        raise TokenforgeError(f"model.chat_template: file {str(path)!r} does not exist")
    tokenizer.chat_template = path.read_text()


def render(tokenizer: PreTrainedTokenizerBase, prompt: str | list[dict]) -> str:
    """The text of a prompt as the model sees it (a conversation through the chat template)."""
    if not is_conversation(prompt):
        return prompt
    if not tokenizer.chat_template:
        raise TokenforgeError(
            "a prompt is a conversation (a list of messages) but the tokenizer has no chat template; "
            "set model.chat_template to a Jinja template file"
        )
    try:
        return tokenizer.apply_chat_template(prompt, add_generation_prompt=True, tokenize=False)
    except jinja2.TemplateError as error:  # a syntax error, or the template's own raise_exception
        line = f" (line {error.lineno})" if getattr(error, "lineno", None) else ""
        raise TokenforgeError(
            f"the chat template fails{line}: {type(error).__name__}: {error.message}; "
            "fix model.chat_template's file (or the chat_template in the model's tokenizer_config.json)"
        ) from None


def encode_prompts(
    tokenizer: PreTrainedTokenizerBase, prompts: list, add_special_tokens: bool = True
) -> tuple[list[str], list[list[int]]]:
    """(rendered text, token ids) of every prompt, in order."""
    texts = [render(tokenizer, p) for p in prompts]
    ids: list[list[int]] = [[] for _ in prompts]
    for conversational in (False, True):  # one batched tokenizer call per kind
        rows = [i for i, p in enumerate(prompts) if is_conversation(p) == conversational]
        if rows:
            special = add_special_tokens and not conversational
            encoded = tokenizer([texts[i] for i in rows], add_special_tokens=special).input_ids
            for i, row_ids in zip(rows, encoded):
                ids[i] = row_ids
    return texts, ids


def as_completion(prompt: Any, text: str) -> str | list[dict]:
    """A completion as reward functions get it (TRL's rule): text for a text prompt, a list with one
    assistant message for a conversation."""
    return [{"role": "assistant", "content": text}] if is_conversation(prompt) else text


TEXT_KEYS = ("input_ids", "attention_mask", "token_type_ids", "mm_token_type_ids")  # a processor's text outputs


def encode_image_prompts(
    processor, prompts: list, images: list, add_special_tokens: bool = True
) -> tuple[list[str], list[list[int]], dict]:
    """encode_prompts for a vision-language model: (rendered text, token ids, the model's image inputs) of each
    (prompt, image). A prompt without the processor's image token gets it in front. The processor expands that
    token into the image's tokens (they are in the ids); the image inputs (pixel_values, and e.g. image_sizes)
    have one entry per prompt, in order."""
    texts = [render(processor.tokenizer, p) for p in prompts]
    token = processor.image_token
    texts = [t if token in t else token + t for t in texts]
    special = add_special_tokens and not any(is_conversation(p) for p in prompts)
    encoded = processor(text=texts, images=images, return_tensors="pt", padding=True, add_special_tokens=special)
    ids = [row[mask.bool()].tolist() for row, mask in zip(encoded["input_ids"], encoded["attention_mask"])]
    inputs = {k: v for k, v in encoded.items() if k not in TEXT_KEYS}
    packed = [k for k, v in inputs.items() if len(v) != len(images)]
    if packed:  # e.g. Qwen2-VL's pixel_values: every image's patches in one sequence
        raise TokenforgeError(
            f"the model's processor packs the images' {', '.join(packed)} together (not one entry per image); "
            "tokenforge takes Llava-style models, whose image inputs have one entry per image, for now"
        )
    return texts, ids, inputs
