"""Tiny causal LMs made from scratch (no hub download): char-level GPT-2s, a Llama with a BPE chat tokenizer, a
GPT-NeoX with a SentencePiece-style Unigram tokenizer, and a Llava (vision-language) with a word-level tokenizer.

Used by scripts/make_task_model.py for the shipped models and by the tests.
"""

from __future__ import annotations

import json
from collections.abc import Iterable

from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import (
    CLIPImageProcessor,
    CLIPVisionConfig,
    GPT2Config,
    GPT2LMHeadModel,
    GPTNeoXConfig,
    GPTNeoXForCausalLM,
    LlamaConfig,
    LlamaForCausalLM,
    LlavaConfig,
    LlavaForConditionalGeneration,
    LlavaProcessor,
    PreTrainedTokenizerFast,
)

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


# --- a tiny modern chat model: byte-level BPE tokenizer with BOS and a Llama-3-style chat template, Llama body ---

CHAT_BOS, CHAT_EOT, CHAT_PAD = "<|begin_of_text|>", "<|eot_id|>", "<|pad|>"
CHAT_SPECIAL_TOKENS = [CHAT_BOS, "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>", CHAT_EOT, CHAT_PAD]
# Llama 3's pre-tokenizer split: digits in groups of up to three, never glued to a space or a letter
LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
# Llama 3's chat template: BOS, then per turn a role header, the trimmed content and the end-of-turn token
CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n' + message['content'] | trim + '<|eot_id|>' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
)


def chat_corpus_text(messages: list[dict[str, str]]) -> str:
    """A conversation as the BPE trainer should see it: the chat template's text between its special tokens."""
    return "".join(f"{m['role']}\n\n{m['content'].strip()}" for m in messages)


def add_bos(backend, bos: str) -> None:
    """The tokenizer puts `bos` before every text it encodes (and before each text of a pair)."""
    backend.post_processor = processors.TemplateProcessing(
        single=f"{bos}:0 $A:0", pair=f"{bos}:0 $A:0 {bos}:1 $B:1", special_tokens=[(bos, backend.token_to_id(bos))]
    )


def make_bpe_chat_tokenizer(corpus: Iterable[str], vocab_size: int = 512) -> PreTrainedTokenizerFast:
    """Byte-level BPE trained on `corpus` (see chat_corpus_text), Llama-3 style.

    Calling the tokenizer adds BOS (a TemplateProcessing post-processor, as in Llama/Gemma tokenizers;
    `add_special_tokens=False` leaves it out); the chat template starts with the BOS *string*, so a
    rendered conversation must be tokenised with `add_special_tokens=False` to hold one BOS, not two.
    EOS is the end-of-turn token `<|eot_id|>` that closes every turn, so generation stops after the
    assistant's answer. Pads on the left. Every token in CHAT_SPECIAL_TOKENS is special in tokenizer.json, so
    skip_special_tokens drops it; tokenizer_config.json names only BOS, EOS and PAD (transformers 5 would write
    the others as a list of `extra_special_tokens`, which transformers 4.x cannot read).
    """
    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(LLAMA3_SPLIT), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=CHAT_SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    backend.train_from_iterator(corpus, trainer)
    add_bos(backend, CHAT_BOS)
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token=CHAT_BOS,
        eos_token=CHAT_EOT,
        pad_token=CHAT_PAD,
        padding_side="left",
        chat_template=CHAT_TEMPLATE,
    )


def make_tiny_llama(
    tokenizer: PreTrainedTokenizerFast,
    hidden_size: int = 128,
    num_hidden_layers: int = 4,
    num_attention_heads: int = 4,
    num_key_value_heads: int = 2,
    intermediate_size: int = 512,
    max_position_embeddings: int = 128,
) -> LlamaForCausalLM:
    """A randomly initialised Llama (RoPE, RMSNorm, SwiGLU, grouped-query attention) sized for `tokenizer`.

    head_dim = hidden_size / num_attention_heads = 32 by default: vLLM's CPU backend refuses 16.
    About 1.05M parameters with a 512-token vocabulary.
    """
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        num_hidden_layers=num_hidden_layers,
        num_attention_heads=num_attention_heads,
        num_key_value_heads=num_key_value_heads,
        intermediate_size=intermediate_size,
        max_position_embeddings=max_position_embeddings,
        tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    return LlamaForCausalLM(config)


# --- a tiny Pythia-style model: SentencePiece-style Unigram tokenizer, GPT-NeoX body ---

SP_PAD, SP_BOS, SP_EOS, SP_UNK = "<pad>", "<s>", "</s>", "<unk>"


def make_unigram_tokenizer(corpus: Iterable[str], alphabet: str, vocab_size: int = 256) -> PreTrainedTokenizerFast:
    """A Unigram language-model tokenizer (SentencePiece's default algorithm, as in T5, ALBERT, XLNet) trained on
    `corpus`: a space becomes "▁" and every word gets one in front (Metaspace), so a token covers one or more
    characters ("▁abc", "pq") and a text is split into its most probable pieces; decoding drops the "▁" in front
    of the text. Every character of `alphabet` is a token of its own, so any text over it (and spaces) round-trips.
    Calling the tokenizer adds BOS `<s>` (a TemplateProcessing post-processor, as Llama 2's SentencePiece tokenizer
    does); EOS `</s>`, PAD `<pad>`; pads on the left.
    """
    backend = Tokenizer(models.Unigram())
    backend.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always")
    backend.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="always")
    trainer = trainers.UnigramTrainer(
        vocab_size=vocab_size,
        special_tokens=[SP_PAD, SP_BOS, SP_EOS, SP_UNK],
        unk_token=SP_UNK,
        initial_alphabet=list(alphabet),
        show_progress=False,
    )
    backend.train_from_iterator(corpus, trainer)
    # the trainer's sums run in no fixed order, so the pieces' log-probabilities differ between runs in their last
    # bits; rounded, the same corpus gives the same tokenizer.json every time
    trained = json.loads(backend.to_str())["model"]
    backend.model = models.Unigram([(piece, round(score, 9)) for piece, score in trained["vocab"]], trained["unk_id"])
    add_bos(backend, SP_BOS)
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token=SP_BOS,
        eos_token=SP_EOS,
        pad_token=SP_PAD,
        unk_token=SP_UNK,
        padding_side="left",
    )


def make_tiny_gpt_neox(
    tokenizer: PreTrainedTokenizerFast,
    hidden_size: int = 128,
    num_hidden_layers: int = 4,
    num_attention_heads: int = 4,
    intermediate_size: int = 512,
    max_position_embeddings: int = 64,
) -> GPTNeoXForCausalLM:
    """A randomly initialised GPT-NeoX (Pythia's architecture) sized for `tokenizer`: attention and MLP read the
    same LayerNorm'd input and add to the residual in parallel (x + attn(ln1 x) + mlp(ln2 x)), LayerNorms with
    biases, a GeLU MLP, rotary positions on a quarter of each head's dimensions, an untied output embedding.

    head_dim = hidden_size / num_attention_heads = 32 by default (vLLM's CPU backend refuses 16).
    About 0.86M parameters with a 256-token vocabulary.
    """
    config = GPTNeoXConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        num_hidden_layers=num_hidden_layers,
        num_attention_heads=num_attention_heads,
        intermediate_size=intermediate_size,
        max_position_embeddings=max_position_embeddings,
        hidden_dropout=0.0,
        attention_dropout=0.0,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    return GPTNeoXForCausalLM(config)


# --- a tiny Llava: CLIP vision tower + projector + Llama, with a word-level tokenizer and a Llava processor ---

IMAGE_TOKEN = "<image>"


def make_word_tokenizer(corpus: Iterable[str]) -> PreTrainedTokenizerFast:
    """One token per word or punctuation mark of `corpus` (split on whitespace and punctuation), plus the image
    token; decoding joins tokens with spaces. Pads on the left."""
    words = sorted({w for text in corpus for w in pre_tokenizers.Whitespace().pre_tokenize_str(text) for w in [w[0]]})
    vocab = {token: i for i, token in enumerate([PAD, EOS, UNK, IMAGE_TOKEN, *words])}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token=UNK))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    backend.decoder = decoders.WordPiece(prefix="##")  # joins tokens with spaces
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        pad_token=PAD,
        eos_token=EOS,
        unk_token=UNK,
        padding_side="left",
        extra_special_tokens={"image_token": IMAGE_TOKEN},
    )


IMAGE_SIZE, PATCH_SIZE = 32, 8  # (32 / 8)^2 = 16 image tokens per image


def make_tiny_llava(
    tokenizer: PreTrainedTokenizerFast, vision_hidden: int = 64, hidden_size: int = 128, num_hidden_layers: int = 3
) -> LlavaForConditionalGeneration:
    """A randomly initialised Llava: a 2-layer CLIP vision tower on IMAGE_SIZE pixels in PATCH_SIZE patches, a
    2-layer MLP projector and a Llama (head_dim 32) whose context holds the 16 image tokens, a prompt and a caption.
    About 0.9M parameters with a 60-word vocabulary."""
    vision = CLIPVisionConfig(
        image_size=IMAGE_SIZE,
        patch_size=PATCH_SIZE,
        hidden_size=vision_hidden,
        intermediate_size=4 * vision_hidden,
        num_hidden_layers=2,
        num_attention_heads=4,
        projection_dim=vision_hidden,
    )
    text = make_tiny_llama(
        tokenizer,
        hidden_size=hidden_size,
        num_hidden_layers=num_hidden_layers,
        intermediate_size=4 * hidden_size,
        max_position_embeddings=64,
    ).config
    config = LlavaConfig(
        vision_config=vision,
        text_config=text,
        image_token_id=tokenizer.convert_tokens_to_ids(IMAGE_TOKEN),
        vision_feature_select_strategy="default",  # the patch features, CLS dropped
        vision_feature_layer=-1,
        image_seq_length=(IMAGE_SIZE // PATCH_SIZE) ** 2,
        tie_word_embeddings=True,
    )
    return LlavaForConditionalGeneration(config)


def make_llava_processor(tokenizer: PreTrainedTokenizerFast) -> LlavaProcessor:
    """make_tiny_llava's processor: images resized and centre-cropped to IMAGE_SIZE, CLIP's normalisation, and the
    image token expanded into one token per patch."""
    image_processor = CLIPImageProcessor(
        size={"shortest_edge": IMAGE_SIZE}, crop_size={"height": IMAGE_SIZE, "width": IMAGE_SIZE}
    )
    return LlavaProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        patch_size=PATCH_SIZE,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,  # CLIP's CLS
        image_token=IMAGE_TOKEN,
    )
