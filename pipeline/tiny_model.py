"""Tiny causal LMs with a character-level tokenizer, made from scratch (no hub download).

Used by scripts/make_task_model.py for the shipped models and by the tests.
"""

from __future__ import annotations

from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast

PAD, EOS, UNK = "<pad>", "<eos>", "<unk>"
DEFAULT_ALPHABET = "0123456789+-=* abcdefghijklmnopqrstuvwxyz.,?"


def make_char_tokenizer(alphabet: str = DEFAULT_ALPHABET) -> PreTrainedTokenizerFast:
    """One token per character; decoding joins characters without spaces; pads on the left."""
    vocab = {token: i for i, token in enumerate([PAD, EOS, UNK, *dict.fromkeys(alphabet)])}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token=UNK))
    backend.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    backend.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, pad_token=PAD, eos_token=EOS, unk_token=UNK, padding_side="left"
    )


def make_tiny_gpt2(
    tokenizer: PreTrainedTokenizerFast, n_embd: int = 128, n_layer: int = 4, n_head: int = 4, n_positions: int = 32
) -> GPT2LMHeadModel:
    """A randomly initialised GPT-2 sized for `tokenizer` (about 0.8M parameters by default)."""
    config = GPT2Config(
        vocab_size=len(tokenizer),
        n_positions=n_positions,
        n_embd=n_embd,
        n_layer=n_layer,
        n_head=n_head,
        bos_token_id=tokenizer.eos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
    )
    return GPT2LMHeadModel(config)
