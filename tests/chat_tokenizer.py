"""A real byte-level BPE tokenizer made in the test (the `tokenizers` library), Llama-style: its
post-processor adds BOS, its chat template starts with the BOS string, several digits can merge into
one token. For tests of the tokenizer conventions of real chat models."""

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import PreTrainedTokenizerFast

BOS, EOT, PAD = "<|begin_of_text|>", "<|eot_id|>", "<|pad|>"
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}{{ eos_token }}{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)


def make_bpe_chat_tokenizer() -> PreTrainedTokenizerFast:
    corpus = [f"What is {a}+{b}? {a + b} " for a in range(0, 100, 3) for b in range(0, 100, 7)] * 3
    corpus += ["the user and the assistant talk about numbers like 12 and 123 and 4567"] * 20
    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    backend.decoder = decoders.ByteLevel()
    special = [BOS, EOT, PAD, "<|user|>", "<|assistant|>", "<|system|>"]
    trainer = trainers.BpeTrainer(
        vocab_size=400, special_tokens=special, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    backend.train_from_iterator(corpus, trainer)
    bos_id = backend.token_to_id(BOS)
    backend.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A $B", special_tokens=[(BOS, bos_id)]
    )
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, bos_token=BOS, eos_token=EOT, pad_token=PAD)
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer
