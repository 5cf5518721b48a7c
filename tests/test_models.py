"""Real-model conventions without Ray: BOS and chat templates, BPE tokens in token-level rewards, stop
rules, chunked fp32 log-probs, mixed precision, gradient checkpointing, LoRA and export."""

import json
import math
import warnings
from pathlib import Path

import pyarrow as pa
import pytest
import torch
from builders import component, llama_classifier, rollout_table
from chat_tokenizer import make_bpe_chat_tokenizer
from hypothesis import given, settings
from hypothesis import strategies as st
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM
from transformers.convert_slow_tokenizer import bytes_to_unicode

from actors.learner import Learner
from actors.reward_worker import RewardWorker, token_spans
from actors.rollout_worker import RolloutWorker
from pipeline.batch import response_mask
from pipeline.cli import main
from pipeline.config import load_config
from pipeline.data.inputs import with_builtin_defaults
from pipeline.data.prompts import encode_prompts
from pipeline.models.hf import build_sequences, can_share_prompts, load_model, response_logprobs, rope_follows_length
from pipeline.models.tiny import make_tiny_llama
from pipeline.rewards.base import ComponentEnv, RewardInputs

CHAT = [{"role": "user", "content": "What is 12+30?"}]
FNS = Path(__file__).parent / "reward_fns.py"


@pytest.fixture(scope="module")
def tokenizer():
    return make_bpe_chat_tokenizer()


@pytest.fixture(scope="module")
def chat_model(tmp_path_factory, tokenizer):
    """A tiny random Llama with the BPE chat tokenizer, saved as a local HF model directory."""
    path = tmp_path_factory.mktemp("llama")
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=2,
        max_position_embeddings=128,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    LlamaForCausalLM(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return str(path)


def chat_config(chat_model, *overrides):
    """The random chat model with a reward whose value differs between samples (the completion's length in
    characters), so that every group has advantages to learn from."""
    return with_builtin_defaults(
        load_config(
            overrides=[
                f"model.path={chat_model}",
                "rollout.max_new_tokens=6",
                "reward.weights={chars: 1.0}",
                f"reward.components.chars={{type: python, function: '{FNS}:content_length'}}",
                *overrides,
            ]
        )
    )


def test_text_prompts_get_the_tokenizers_bos_and_chats_get_it_once(tokenizer):
    texts, ids = encode_prompts(tokenizer, ["What is 1+1?", CHAT])
    assert ids[0] == tokenizer("What is 1+1?").input_ids and ids[0][0] == tokenizer.bos_token_id  # as TRL does
    assert ids[1] == tokenizer.apply_chat_template(CHAT, add_generation_prompt=True, tokenize=True)["input_ids"]
    assert ids[1].count(tokenizer.bos_token_id) == 1 and texts[1].endswith("<|assistant|>\n")
    assert tokenizer(texts[1]).input_ids[:2] == [tokenizer.bos_token_id] * 2  # the trap: BOS twice
    _, plain = encode_prompts(tokenizer, ["What is 1+1?"], add_special_tokens=False)  # data.add_special_tokens
    assert tokenizer.bos_token_id not in plain[0]


def test_token_spans_follow_bpe_tokens_that_cover_several_characters(tokenizer):
    ids = (
        tokenizer("4567", add_special_tokens=False).input_ids
        + tokenizer(" and 123", add_special_tokens=False).input_ids
    )
    ids.append(tokenizer.eos_token_id)
    text = tokenizer.decode(ids, skip_special_tokens=True)
    spans = token_spans(tokenizer, ids, text)
    assert [text[s:e] for s, e in spans] == [*(tokenizer.decode([t]) for t in ids[:-1]), ""]
    assert text[spans[0][0] : spans[0][1]] == "4567" and spans[-1] == (len(text), len(text))  # one token, 4 digits
    # the slow path (when the text re-encodes to other tokens): decoding growing prefixes gives the same spans
    split = [tokenizer.convert_tokens_to_ids(c) for c in "4567"] + ids[1:]
    assert tokenizer.decode(split, skip_special_tokens=True) == text
    assert [text[s:e] for s, e in token_spans(tokenizer, split, text)] == [*"4567", *(text[s:e] for s, e in spans[1:])]


def test_a_character_split_over_byte_tokens_belongs_to_the_token_that_completes_it(tokenizer):
    text = "日本 café"  # each of 日, 本, é is several byte-level tokens
    ids = tokenizer(text, add_special_tokens=False).input_ids + [tokenizer.eos_token_id]
    spans = token_spans(tokenizer, ids, tokenizer.decode(ids, skip_special_tokens=True))
    assert len(ids) > len(text) + 1
    assert "".join(text[s:e] for s, e in spans) == text  # every character once, in order
    for k, (start, end) in enumerate(spans[:-1]):
        if start == end:  # a byte of a character the next token completes
            assert spans[k + 1][0] == start
    # digit_match through these spans earns each character once: the whole answer, then EOS in place, is 1
    digit_match = component("digit_match", ComponentEnv(tokenizer))
    rewards = digit_match(
        RewardInputs(
            prompts=[""],
            completions=[text],
            completion_ids=[ids],
            texts=[text],
            token_spans=[spans],
            columns={"answer": [text]},
            stop_ids=frozenset({tokenizer.eos_token_id}),
        )
    )[0]
    assert sum(rewards) == pytest.approx(1.0)


@st.composite
def byte_tokenisations(draw, tokenizer):
    """A text of ASCII and 2-, 3- and 4-byte characters and one tokenisation of its UTF-8 bytes that a sampler
    could produce (rarely the canonical one): the bytes cut into random pieces, each a vocabulary token where
    there is one, else byte tokens. (text, ids, each token's [start, end) in the bytes)."""
    text = draw(st.text(alphabet="ab12 7é日😀", min_size=1, max_size=12))
    raw, to_symbol = text.encode(), bytes_to_unicode()  # byte-level BPE spells byte b as the symbol to_symbol[b]
    cuts = sorted(draw(st.sets(st.integers(1, len(raw) - 1), max_size=len(raw))) if len(raw) > 1 else set())
    ids, byte_spans = [], []
    for start, end in zip([0, *cuts], [*cuts, len(raw)]):
        token = tokenizer.convert_tokens_to_ids("".join(to_symbol[b] for b in raw[start:end]))
        pieces = [(start, end)] if token != tokenizer.unk_token_id else [(b, b + 1) for b in range(start, end)]
        for a, b in pieces:
            ids.append(tokenizer.convert_tokens_to_ids("".join(to_symbol[c] for c in raw[a:b])))
            byte_spans.append((a, b))
    return text, ids, byte_spans


@settings(max_examples=150, deadline=None)
@given(data=st.data())
def test_token_spans_give_each_character_to_the_token_that_completes_it_in_any_tokenisation(tokenizer, data):
    """Whatever tokens were sampled, a character belongs to the token holding its last byte (causal: no token is
    credited with a character a later token completes), and the spans partition the text."""
    text, ids, byte_spans = data.draw(byte_tokenisations(tokenizer))
    assert tokenizer.unk_token_id not in ids and tokenizer.decode(ids) == text
    char_ends = [len(text[: i + 1].encode()) for i in range(len(text))]  # byte offset where character i ends

    def complete(byte):  # characters complete within the first `byte` bytes
        return sum(e <= byte for e in char_ends)

    expected = [(complete(start), complete(end)) for start, end in byte_spans]
    spans = token_spans(tokenizer, [*ids, tokenizer.eos_token_id], text)
    assert spans == [*expected, (len(text), len(text))]
    assert "".join(text[s:e] for s, e in spans) == text and all(a[1] == b[0] for a, b in zip(spans, spans[1:]))


def test_digit_match_credits_each_digit_a_bpe_token_covers(tokenizer, chat_model):
    """Answer 4567 as the one token '4567' earns 4/5, then EOS in place 1/5; answer 123 as '12' + '4' earns
    2/4 for the first token only (and EOS is not in place)."""
    config = load_config(overrides=[f"model.path={chat_model}", "reward.weights={digit_match: 1.0}"])
    worker = RewardWorker(config, chat_model, ["digit_match"])
    token = tokenizer.convert_tokens_to_ids
    right, partial = [token("4567"), tokenizer.eos_token_id], [token("12"), token("4"), tokenizer.eos_token_id]
    assert tokenizer.unk_token_id not in right + partial
    rows = worker.score(chat_batch(tokenizer, [right, partial], answers=["4567", "123"]), "digit_match").rows
    assert rows[0] == [pytest.approx(4 / 5), pytest.approx(1 / 5)]
    assert rows[1] == [pytest.approx(2 / 4), 0.0, 0.0]


def chat_batch(tokenizer, responses: list[list[int]], answers: list[str], prompt=CHAT) -> pa.Table:
    texts, ids = encode_prompts(tokenizer, [prompt])
    metadata = pa.Table.from_pylist([{"prompt": prompt, "answer": a} for a in answers])
    return rollout_table(
        ids * len(responses),
        responses,
        tokenizer.batch_decode(responses, skip_special_tokens=True),
        metadata,
        prompt_texts=texts * len(responses),
    )


def test_rollouts_stop_at_stop_tokens_and_strings(builtin_model_path):
    prompts = pa.table({"prompt": ["13+54=", "2+2=", "99+99="], "group_id": [0, 1, 2]})
    plain = RolloutWorker(load_config(overrides=["rollout.max_new_tokens=6"]), builtin_model_path)
    free = plain.generate(prompts, group_size=4, step=1)
    nine = plain.tokenizer.convert_tokens_to_ids("9")
    by_token = RolloutWorker(
        load_config(overrides=["rollout.max_new_tokens=6", f"rollout.stop_token_ids=[{nine}]"]), builtin_model_path
    )
    by_string = RolloutWorker(
        load_config(overrides=["rollout.max_new_tokens=6", "rollout.stop=['9']"]), builtin_model_path
    )
    for worker in (by_token, by_string):
        batch = worker.generate(prompts, group_size=4, step=1)  # same seed and step: same samples, cut earlier
        for cut, full, finished in zip(
            *(t.column("response_ids").to_pylist() for t in (batch, free)), batch.column("finished").to_pylist()
        ):
            expected = full[: full.index(nine) + 1] if nine in full else full
            assert cut == expected and finished == (nine in full or full[-1] == plain.tokenizer.eos_token_id)
    assert any(nine in r for r in free.column("response_ids").to_pylist())  # the test exercises a stop


def test_a_stop_string_inside_a_multi_character_token_stops_the_row():
    """On the shipped chat model's BPE tokenizer a row stops on the token that brings a `rollout.stop`
    string, wherever in the token's text the string ends ("13" is one token: stop "1" stops there, though the
    text ends in "3"); a string split across two tokens stops on the second; text seen before does not."""
    config = with_builtin_defaults(load_config(overrides=["task=chat_addition", "rollout.stop=['1', '9+']"]))
    worker = RolloutWorker(config, config.model.path)
    thirteen, nine, plus = (worker.tokenizer.convert_tokens_to_ids(t) for t in ("13", "9", "+"))
    assert worker.tokenizer.decode([thirteen]) == "13"
    lengths = [0, 0]
    assert worker._reached_stop_string(torch.tensor([[thirteen], [nine]]), lengths).tolist() == [True, False]
    assert lengths == [2, 1]
    assert worker._reached_stop_string(torch.tensor([[thirteen, nine], [nine, plus]]), lengths).tolist() == [
        False,
        True,
    ]


def test_chunked_fp32_logprobs_and_their_gradients_equal_the_whole_softmax(builtin_model_path):
    model = load_model(builtin_model_path)
    sequences = build_sequences([[3, 4, 5], [6, 7]], [[8, 9, 10, 11], [12]], pad_id=0)
    results = []
    for chunk in (10_000, 3, 1):
        model.zero_grad()
        logprobs, entropy = response_logprobs(model, sequences, temperature=0.7, chunk_tokens=chunk)
        (logprobs.sum() + entropy.sum()).backward()
        results.append((logprobs.detach(), entropy.detach(), [p.grad.clone() for p in model.parameters()]))
    for logprobs, entropy, grads in results[1:]:
        assert torch.allclose(logprobs, results[0][0], atol=1e-6) and torch.allclose(entropy, results[0][1], atol=1e-6)
        assert all(torch.allclose(g, h, atol=1e-6) for g, h in zip(grads, results[0][2]))


def test_logprobs_of_the_kept_logits_equal_those_of_every_position(builtin_model_path):
    """The learner asks for the response positions' logits only (`logits_to_keep`); a model without that
    argument computes every position's and is sliced: same log-probs, same entropies, to 1e-6."""
    model = load_model(builtin_model_path)

    class EveryPosition(torch.nn.Module):  # a forward without logits_to_keep
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, input_ids, attention_mask, position_ids):
            return self.inner(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids)

    sequences = build_sequences([[3, 4, 5], [6, 7]], [[8, 9, 10, 11], [12]], pad_id=0)
    kept, every = response_logprobs(model, sequences), response_logprobs(EveryPosition(model), sequences)
    assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(kept, every))
    full = model(**{k: sequences[k] for k in ("input_ids", "attention_mask", "position_ids")}).logits
    by_hand = torch.log_softmax(full[:, 2:-1].float(), -1).gather(-1, sequences["input_ids"][:, 3:, None]).squeeze(-1)
    assert torch.allclose(kept[0], by_hand, atol=1e-6)


@pytest.fixture(scope="module")
def float64_models(builtin_model_path, tokenizer):
    """The shipped GPT-2 (learned positions) and a tiny Llama (RoPE, grouped-query attention), in float64."""
    torch.manual_seed(0)
    llama = make_tiny_llama(
        tokenizer,
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        intermediate_size=128,
    )
    return {"gpt2": load_model(builtin_model_path).double(), "llama": llama.double()}


@st.composite
def grouped_batches(draw, vocab: int):
    """Prompts of ragged lengths, each shared by a group of 1-5 samples (unequal groups; two groups may have
    the same prompt), responses of ragged lengths: (prompt ids, response ids) per sample."""
    tokens = st.integers(3, vocab - 1)
    prompts = draw(st.lists(st.lists(tokens, min_size=1, max_size=7), min_size=1, max_size=4))
    if draw(st.booleans()):
        prompts.append(prompts[0])
    rows = [
        (p, draw(st.lists(tokens, min_size=1, max_size=5))) for p in prompts for _ in range(draw(st.integers(1, 5)))
    ]
    return [p for p, _ in rows], [r for _, r in rows]


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
@settings(max_examples=15, deadline=None)
@given(data=st.data())
def test_sharing_each_prompt_gives_the_per_sample_forwards_logprobs_entropies_and_gradients(float64_models, arch, data):
    """learner.share_prompts: each distinct prompt runs once, its KV cache copied to its samples; the
    log-probs, entropies and gradients equal those of every sample's whole sequence."""
    model = float64_models[arch]
    prompts, responses = data.draw(grouped_batches(model.config.vocab_size))
    sequences = build_sequences(prompts, responses, pad_id=0)
    weights = torch.randn(2, *sequences["input_ids"][:, sequences["prompt_width"] :].shape, dtype=torch.float64)
    mask = torch.zeros_like(weights[0])
    for i, r in enumerate(responses):
        mask[i, : len(r)] = 1
    seen = []  # rows of each forward call
    hook = model.register_forward_pre_hook(lambda _m, _a, kw: seen.append(kw["input_ids"].shape[0]), with_kwargs=True)
    results = []
    for share in (False, True):
        model.zero_grad()
        seen.clear()
        logprobs, entropy = response_logprobs(model, sequences, temperature=0.7, share_prompts=share)
        ((weights[0] * logprobs + weights[1] * entropy) * mask).sum().backward()
        results.append(
            (
                logprobs.detach() * mask,
                entropy.detach() * mask,
                [p.grad.clone() for p in model.parameters()],
                list(seen),
            )
        )
    hook.remove()
    (plain_lp, plain_h, plain_g, plain_calls), (lp, h, g, calls) = results
    distinct = len({tuple(p) for p in prompts})
    assert plain_calls == [len(prompts)]
    assert calls == ([distinct, len(prompts)] if distinct < len(prompts) else [len(prompts)])  # the prompts once each
    # float64 weights, but fp32 inside (the log-softmax; Llama's RMSNorm and RoPE tables): agreement to fp32 rounding
    assert torch.allclose(lp, plain_lp, atol=1e-5) and torch.allclose(h, plain_h, atol=1e-5)
    assert all((a - b).norm() <= 1e-5 * b.norm() + 1e-12 for a, b in zip(g, plain_g))


def test_a_model_whose_cache_holds_recurrent_state_runs_every_sample_whole(float64_models):
    """Linear-attention layers (Qwen3-Next) keep a recurrent state that the responses' forward would update in
    place, so their prompts are not shared: the same log-probs, and a backward that works."""
    from transformers import Qwen3NextConfig, Qwen3NextForCausalLM

    torch.manual_seed(0)
    hybrid = Qwen3NextForCausalLM(
        Qwen3NextConfig(
            vocab_size=50,
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=2,
            num_key_value_heads=1,
            head_dim=16,
            linear_key_head_dim=8,
            linear_value_head_dim=8,
            linear_num_key_heads=2,
            linear_num_value_heads=2,
            layer_types=["linear_attention", "full_attention"],
            mlp_only_layers=[0, 1],
            num_experts=2,
            num_experts_per_tok=1,
            moe_intermediate_size=16,
            shared_expert_intermediate_size=16,
        )
    )
    assert (
        not can_share_prompts(hybrid)
        and can_share_prompts(float64_models["gpt2"])
        and can_share_prompts(float64_models["llama"])
    )
    sequences = build_sequences([[3, 4, 5], [3, 4, 5], [6, 7]], [[8, 9], [10], [11, 12]], pad_id=0)
    shared, plain = response_logprobs(hybrid, sequences, share_prompts=True), response_logprobs(hybrid, sequences)
    assert torch.equal(shared[0], plain[0])
    shared[0].sum().backward()  # raised "modified by an inplace operation" when the prompt was shared


@pytest.mark.parametrize(
    "rope",
    [
        {"rope_type": "dynamic", "factor": 4.0, "rope_theta": 10000.0},
        {
            "rope_type": "longrope",
            "short_factor": [1.0] * 8,
            "long_factor": [4.0] * 8,
            "original_max_position_embeddings": 8,
            "rope_theta": 10000.0,
        },
    ],
)
def test_a_rope_that_follows_the_sequence_length_runs_every_sample_whole(tokenizer, tmp_path, rope):
    """Dynamic-NTK and longrope frequencies depend on the length of the sequence the model runs: a prompt run alone
    gets other keys than inside a sequence past the original context (8 positions here). Such a model's prompts
    are not shared, and the learner's gradients are the plain forward's."""
    torch.manual_seed(0)
    LlamaForCausalLM(
        LlamaConfig(
            vocab_size=len(tokenizer),
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=2,
            num_key_value_heads=1,
            max_position_embeddings=8 if rope["rope_type"] == "dynamic" else 32,
            rope_parameters=rope,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        )
    ).save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    learner = Learner(chat_config(str(tmp_path)), str(tmp_path), str(tmp_path))
    assert not learner.share_prompts
    sequences = build_sequences(
        [[10, 11, 12, 13, 14]] * 2 + [[15, 16]], [[20, 21, 22, 23, 24, 25], [26, 27, 28], [29]], tokenizer.pad_token_id
    )
    grads = {}
    for name, share in (("learner", learner.share_prompts), ("plain", False), ("shared", True)):
        learner.model.zero_grad()
        response_logprobs(learner.model, sequences, share_prompts=share)[0].sum().backward()
        grads[name] = [p.grad.clone() for p in learner.model.parameters()]
    assert all(torch.equal(a, b) for a, b in zip(grads["learner"], grads["plain"]))
    assert any(
        (a - b).norm() > 1e-3 * b.norm() for a, b in zip(grads["shared"], grads["plain"])
    )  # what sharing would give


def test_length_dependent_rope_types_are_found_wherever_the_config_names_them():
    from types import SimpleNamespace as Config

    assert rope_follows_length(Config(rope_scaling={"type": "su", "short_factor": [1.0]}))  # Phi-3 remote code
    assert rope_follows_length(
        Config(
            rope_parameters={"full_attention": {"rope_type": "dynamic"}, "sliding_attention": {"rope_type": "default"}}
        )
    )
    assert not rope_follows_length(Config(rope_parameters={"rope_type": "yarn", "factor": 4.0}, rope_scaling=None))
    assert not rope_follows_length(Config())


def sampled_batch(config, model_path, prompts=None):
    worker = RolloutWorker(config, model_path)
    prompts = prompts or pa.table(
        {"prompt": [CHAT, [{"role": "user", "content": "What is 7+8?"}]], "answer": ["42", "15"], "group_id": [0, 1]}
    )
    batch = worker.generate(prompts, group_size=4, step=1)
    names = list(config.reward.weights)
    return RewardWorker(config, model_path, names).score_all(batch, names)[0]


def learner_logprobs(learner: Learner, batch: pa.Table) -> torch.Tensor:
    sequences = build_sequences(
        batch.column("prompt_ids").to_pylist(), batch.column("response_ids").to_pylist(), learner.tokenizer.pad_token_id
    )
    with torch.no_grad(), learner.autocast():
        return response_logprobs(learner.model, sequences, learner.config.rollout.temperature)[0]


def max_logprob_gap(learner: Learner, batch: pa.Table) -> float:
    """max |log pi_learner - log pi_behaviour| over the batch's response tokens (0 = on-policy ratio exactly 1)."""
    from pipeline.batch import pad_right

    mask = response_mask(batch).bool()
    behaviour = pad_right(batch.column("behaviour_logprobs").to_pylist())
    return float((learner_logprobs(learner, batch) - behaviour)[mask].abs().max())


def test_learner_log_probs_match_the_samplers_on_a_chat_model(chat_model):
    """fp32: within 1e-4 (the on-policy ratio is 1), with nucleus sampling too (the behaviour log-prob is the whole
    tempered softmax's, not the renormalised nucleus's: docs/algorithms.md); bf16 sampling against an fp32
    learner: the measured gap is documented in docs/models.md and bounded here."""
    config = chat_config(chat_model, "rollout.temperature=0.9")
    batch = sampled_batch(config, chat_model)
    assert max_logprob_gap(Learner(config, chat_model, chat_model), batch) < 1e-4
    nucleus = chat_config(chat_model, "rollout.temperature=0.9", "rollout.top_p=0.5")
    assert max_logprob_gap(Learner(nucleus, chat_model, chat_model), sampled_batch(nucleus, chat_model)) < 1e-4
    bf16 = chat_config(chat_model, "rollout.temperature=0.9", "model.dtype=bfloat16")
    assert 1e-4 < max_logprob_gap(Learner(bf16, chat_model, chat_model), sampled_batch(bf16, chat_model)) < 0.1


@pytest.mark.parametrize("precision", ["bf16-mixed", "bf16"])
def test_bf16_learners_take_a_finite_step_close_to_fp32(chat_model, precision):
    config = chat_config(chat_model)
    batch = sampled_batch(config, chat_model)
    fp32 = Learner(config, chat_model, chat_model)
    low = Learner(chat_config(chat_model, f"learner.precision={precision}"), chat_model, chat_model)
    assert (next(low.model.parameters()).dtype == torch.bfloat16) == (precision == "bf16")
    assert torch.allclose(learner_logprobs(low, batch), learner_logprobs(fp32, batch), atol=0.1)
    metrics = low.train_step(batch)
    assert metrics["learner/skipped_nonfinite"] == 0 and math.isfinite(metrics["loss/policy"])


@pytest.mark.filterwarnings("ignore:Seems like `optimizer.step\\(\\)` has been overridden")
def test_gradient_checkpointing_gives_the_same_gradient(chat_model):
    grads = []
    for checkpointing in (False, True):
        learner = Learner(
            chat_config(chat_model, f"learner.gradient_checkpointing={checkpointing}"), chat_model, chat_model
        )
        store = {}
        learner.optimizer.step = lambda store=store, model=learner.model: store.update(
            {n: p.grad.clone() for n, p in model.named_parameters()}
        )
        learner.train_step(sampled_batch(learner.config, chat_model))
        grads.append(store)
    assert grads[0] and all(torch.allclose(grads[0][n], grads[1][n], atol=1e-6) for n in grads[0])


LORA = "model.lora={r: 4, alpha: 8, target_modules: [q_proj, v_proj]}"


def test_prompts_are_shared_unless_checkpointing_or_lora_dropout_would_make_it_differ(chat_model):
    assert Learner(chat_config(chat_model), chat_model, chat_model).share_prompts
    assert Learner(chat_config(chat_model, LORA), chat_model, chat_model).share_prompts
    for off in (
        "learner.gradient_checkpointing=true",
        "learner.share_prompts=false",
        LORA.replace("r: 4", "r: 4, dropout: 0.1"),
    ):
        assert not Learner(chat_config(chat_model, off), chat_model, chat_model).share_prompts, off


def test_a_lora_learner_starts_without_transformers_deprecation_warning(chat_model, tmp_path):
    """peft asks the model for transformers 5's deprecated `is_gradient_checkpointing`: a FutureWarning (raw ANSI
    codes and all) in the learner's log at every start, fresh adapters or resumed ones, unless tokenforge
    ignores it around peft's calls."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        Learner(chat_config(chat_model, LORA), chat_model, chat_model).save_local(str(tmp_path / "ckpt"))
        Learner(chat_config(chat_model, LORA), str(tmp_path / "ckpt"), chat_model)
    assert not [w for w in caught if "is_gradient_checkpointing" in str(w.message)]


def test_lora_trains_adapters_only_and_publishes_merged_weights(chat_model, tmp_path):
    config = chat_config(chat_model, LORA, "learner.lr=1e-2", "algorithm.kl_coef=0.05")
    learner = Learner(config, chat_model, chat_model)
    trainable = {n for n, p in learner.model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n for n in trainable)
    assert sum(len(group["params"]) for group in learner.optimizer.param_groups) == len(trainable)  # adapters only
    base = load_model(chat_model).state_dict()
    assert all(torch.equal(base[k], v) for k, v in learner.get_weights().items())  # B = 0 at the start
    batch = sampled_batch(config, chat_model)
    metrics = learner.train_step(batch)
    assert metrics["policy/kl"] == pytest.approx(0.0, abs=1e-6)  # reference = the policy with its adapters off
    learner.train_step(batch)
    merged = learner.get_weights()
    changed = {k for k in merged if not torch.equal(merged[k], base[k])}
    assert changed and all(k.endswith(("q_proj.weight", "v_proj.weight")) for k in changed)
    sampler = RolloutWorker(config, chat_model)  # merged weights load into a plain model and give its log-probs
    sampler.set_weights(merged, 2)
    assert max_logprob_gap(learner, sampler.generate(pa.table({"prompt": [CHAT], "group_id": [0]}), 4, step=3)) < 1e-4

    learner.save_local(str(tmp_path / "ckpt"))
    assert (tmp_path / "ckpt" / "adapter_model.safetensors").is_file() and not (
        tmp_path / "ckpt" / "model.safetensors"
    ).exists()
    resumed = Learner(config, str(tmp_path / "ckpt"), chat_model)
    assert resumed.load_state(str(tmp_path / "ckpt")) == 2
    assert all(torch.allclose(resumed.get_weights()[k], v) for k, v in merged.items())
    main(["export", str(tmp_path / "ckpt"), str(tmp_path / "plain"), "--merge"])
    exported = AutoModelForCausalLM.from_pretrained(tmp_path / "plain").state_dict()
    assert all(torch.allclose(exported[k], v, atol=1e-6) for k, v in merged.items())
    assert json.loads((tmp_path / "plain" / "config.json").read_text())["model_type"] == "llama"


def test_classifier_scores_a_conversation_through_the_reward_models_chat_template(tokenizer, tmp_path):
    model = llama_classifier(tmp_path, tokenizer)
    response = tokenizer("42", add_special_tokens=False).input_ids + [tokenizer.eos_token_id]
    config = load_config(overrides=[f"model.path={tmp_path}", "reward.weights={exact_match: 1.0}"])
    inputs = RewardWorker(config, str(tmp_path), []).inputs(chat_batch(tokenizer, [response], answers=["42"]))
    classifier = component("classifier", ComponentEnv(tokenizer), path=str(tmp_path), text="prompt_completion")
    conversation = CHAT + [{"role": "assistant", "content": "42"}]
    assert inputs.completions[0] == conversation[-1:]  # TRL's form of a conversational completion
    rendered = tokenizer.apply_chat_template(conversation, tokenize=False)
    with torch.no_grad():
        expected = (
            model(**tokenizer(rendered, add_special_tokens=False, return_tensors="pt")).logits.softmax(-1)[0, 1].item()
        )
    assert classifier(inputs) == [pytest.approx(expected, abs=1e-6)]


def test_a_token_at_minus_infinity_leaves_the_entropy_and_its_gradient_finite():
    """A suppressed token (a vision-language model's image token: logit -inf) has probability 0: it adds 0 to the
    entropy and the entropy's gradient stays finite (0 * -inf in the product's derivative would be NaN)."""
    from pipeline.models.hf import suppress, token_logprob_entropy

    logits = torch.tensor([[0.3, -1.2, 2.0, 0.7], [1.0, 1.0, -0.5, 0.2]], requires_grad=True)
    logprobs, entropy = token_logprob_entropy(suppress(logits, (2,)), torch.tensor([0, 3]), 1.0)
    (logprobs.sum() + 0.01 * entropy.sum()).backward()
    assert torch.isfinite(logits.grad).all() and torch.isfinite(entropy).all()
    kept = torch.log_softmax(logits.detach()[:, [0, 1, 3]], -1)
    assert torch.allclose(entropy, -(kept.exp() * kept).sum(-1))
