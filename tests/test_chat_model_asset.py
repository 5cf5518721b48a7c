"""The shipped chat-addition asset: a tiny Llama with a BPE tokenizer, BOS and a chat template (no Ray).

Made by `scripts/make_task_data.py --task chat-addition` and `scripts/make_task_model.py --task chat-addition`.
"""

import json
import re

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

from pipeline.models.hf import ASSETS, positions_from_mask

CHAT = ASSETS / "chat_addition"
MODEL = CHAT / "model"
# greedy exact match of the shipped model on the first 200 eval prompts (0.412 on all 1,000, where the
# model script stopped; its RolloutWorker path, this test's loop and HF generate agree prompt for prompt)
SHIPPED_EXACT_MATCH_200 = 0.39
MESSAGES = [
    {"role": "system", "content": "Answer with the number only."},
    {"role": "user", "content": "What is 37+45?"},
]


def read_jsonl(name: str) -> list[dict]:
    return [json.loads(line) for line in (CHAT / name).read_text().splitlines()]


@pytest.fixture(scope="module")
def tokenizer():
    return AutoTokenizer.from_pretrained(MODEL)


def chat_ids(tokenizer, messages, **kwargs) -> list[int]:
    out = tokenizer.apply_chat_template(messages, **kwargs)
    return out["input_ids"] if hasattr(out, "keys") else out  # a BatchEncoding in transformers 5, a list in 4


def test_tokenizer_adds_bos_by_default_only(tokenizer):
    bos = tokenizer.bos_token_id
    assert bos is not None and tokenizer.eos_token == "<|eot_id|>" and tokenizer.pad_token_id not in (None, bos)
    assert tokenizer("hi").input_ids[0] == bos
    assert tokenizer("hi", add_special_tokens=False).input_ids == tokenizer("hi").input_ids[1:]
    assert bos not in tokenizer("hi", add_special_tokens=False).input_ids
    config = json.loads((MODEL / "tokenizer_config.json").read_text())
    assert config["chat_template"].startswith("{{ bos_token }}")  # inline, not only in chat_template.jinja
    assert config["tokenizer_class"] == "PreTrainedTokenizerFast"  # a name transformers 4.x knows too


def test_chat_template_renders_one_bos_and_the_assistant_header(tokenizer):
    text = tokenizer.apply_chat_template(MESSAGES, add_generation_prompt=True, tokenize=False)
    assert text.startswith(tokenizer.bos_token)
    assert text.endswith("<|start_header_id|>assistant<|end_header_id|>\n\n")
    assert text.count("<|eot_id|>") == 2  # each turn closed by the end-of-turn token (= EOS)
    ids = chat_ids(tokenizer, MESSAGES, add_generation_prompt=True)
    assert ids == tokenizer(text, add_special_tokens=False).input_ids
    assert ids.count(tokenizer.bos_token_id) == 1
    # the trap: tokenising the rendered text with special tokens on gives two BOS
    assert tokenizer(text).input_ids[:2] == [tokenizer.bos_token_id] * 2
    without = tokenizer.apply_chat_template(MESSAGES, add_generation_prompt=False, tokenize=False)
    assert text.startswith(without) and "assistant" not in without


def test_answer_tokens_continue_the_prompt_and_end_with_eos(tokenizer):
    """An assistant turn tokenises as prompt ids + answer ids + EOS, so the answer can be scored on its own."""
    answer = {"role": "assistant", "content": "82"}
    full = chat_ids(tokenizer, [*MESSAGES, answer])
    prompt = chat_ids(tokenizer, MESSAGES, add_generation_prompt=True)
    assert full == prompt + tokenizer("82", add_special_tokens=False).input_ids + [tokenizer.eos_token_id]


def test_some_tokens_cover_several_digits(tokenizer):
    answers = [row["answer"] for row in read_jsonl("eval.jsonl")]
    lengths = [len(tokenizer(a, add_special_tokens=False).input_ids) for a in answers]
    shorter = sum(n < len(a) for n, a in zip(lengths, answers)) / len(answers)
    # about half: the sums from 100 up start with a two-digit token ("14" "2"), most operands stay one digit a token
    assert shorter >= 0.4, f"only {shorter:.0%} of answers tokenise into fewer tokens than characters"
    assert max(lengths) > 1  # and the BPE did not make every answer one token
    assert tokenizer.convert_ids_to_tokens(tokenizer("142", add_special_tokens=False).input_ids) == ["14", "2"]
    assert 256 < len(tokenizer) <= 2048
    assert tokenizer.decode(tokenizer("What is 100+42?").input_ids, skip_special_tokens=True) == "What is 100+42?"


def test_model_loads_as_a_llama_with_head_dim_32(tokenizer):
    config = AutoConfig.from_pretrained(MODEL)
    assert config.model_type == "llama"
    assert config.hidden_size // config.num_attention_heads >= 32  # vLLM's CPU backend refuses 16
    assert (config.bos_token_id, config.eos_token_id, config.pad_token_id) == (
        tokenizer.bos_token_id,
        tokenizer.eos_token_id,
        tokenizer.pad_token_id,
    )
    assert config.vocab_size == len(tokenizer)
    generation = json.loads((MODEL / "generation_config.json").read_text())
    assert generation["eos_token_id"] == tokenizer.eos_token_id and generation["bos_token_id"] == tokenizer.bos_token_id
    model = AutoModelForCausalLM.from_pretrained(MODEL)
    assert 0.5e6 < sum(p.numel() for p in model.parameters()) < 4e6
    assert (MODEL / "model.safetensors").stat().st_size < 20e6


def test_data_files_hold_conversational_prompts_and_sums():
    train, evaluation = read_jsonl("train.jsonl"), read_jsonl("eval.jsonl")
    assert len(train) == 9000 and len(evaluation) == 1000
    pairs = {}
    for split, rows in [("train", train), ("eval", evaluation)]:
        pairs[split] = set()
        for row in rows:
            messages = row["prompt"]
            assert isinstance(messages, list) and messages[-1]["role"] == "user"
            assert all(m["role"] in ("system", "user") and m["content"] for m in messages)
            a, b = map(int, re.findall(r"\d+", messages[-1]["content"]))
            assert row["answer"] == str(a + b)
            pairs[split].add((a, b))
    assert not pairs["train"] & pairs["eval"]  # held-out operand pairs
    assert any(row["prompt"][0]["role"] == "system" for row in train)


@torch.no_grad()
def greedy(model, tokenizer, texts: list[str], max_new_tokens: int = 6) -> list[str]:
    """Batched greedy decoding until EOS: left-padded prompts, positions counted from the first real token."""
    encoded = tokenizer(texts, add_special_tokens=False, padding=True, return_tensors="pt")
    ids, attention = encoded.input_ids, encoded.attention_mask
    done, out = torch.zeros(len(texts), dtype=torch.bool), []
    for _ in range(max_new_tokens):
        logits = model(input_ids=ids, attention_mask=attention, position_ids=positions_from_mask(attention)).logits
        token = logits[:, -1].argmax(-1).masked_fill(done, tokenizer.eos_token_id)
        out.append(token)
        done |= token == tokenizer.eos_token_id
        if done.all():
            break
        ids = torch.cat([ids, token[:, None]], 1)
        attention = torch.cat([attention, torch.ones_like(attention[:, :1])], 1)
    return [c.strip() for c in tokenizer.batch_decode(torch.stack(out, 1), skip_special_tokens=True)]


def test_shipped_model_greedy_exact_match(tokenizer):
    torch.set_num_threads(2)
    rows = read_jsonl("eval.jsonl")[:200]
    model = AutoModelForCausalLM.from_pretrained(MODEL, dtype=torch.float32).eval()
    texts = [tokenizer.apply_chat_template(r["prompt"], add_generation_prompt=True, tokenize=False) for r in rows]
    completions = greedy(model, tokenizer, texts)
    score = sum(c == r["answer"] for c, r in zip(completions, rows)) / len(rows)
    assert abs(score - SHIPPED_EXACT_MATCH_200) <= 0.03, score
