"""Reward components on hand-made inputs, the worker's on_error handling and normalisation (no Ray)."""

import math
import re
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
import torch
from builders import component, llama_classifier, rollout_table
from hypothesis import given, settings
from hypothesis import strategies as st
from rouge_score.rouge_scorer import RougeScorer
from sacrebleu.metrics import BLEU, CHRF
from transformers import GPT2Config, GPT2ForSequenceClassification

from actors.reward_worker import RewardWorker
from pipeline.algorithm.advantages import EQUAL_RTOL
from pipeline.algorithm.rewards import normalize_rewards
from pipeline.batch import reward_column
from pipeline.errors import ConfigError, TokenforgeError
from pipeline.models.hf import build_sequences, builtin_paths, load_model, load_tokenizer, response_logprobs
from pipeline.models.tiny import make_char_tokenizer
from pipeline.preflight import load_config
from pipeline.rewards.base import (
    FLOAT32_MAX,
    ComponentEnv,
    RewardComponent,
    RewardError,
    RewardInputs,
    score_component,
)
from pipeline.rewards.components import component_options

FNS = Path(__file__).parent / "reward_fns.py"
T = torch.tensor


def inputs(completions, columns=None, tokens=None) -> RewardInputs:
    """Char-level inputs: one token per character (or per entry of `tokens`, '<eos>' the stop token id 0),
    ids 1.. for the others."""
    tokens = tokens or [list(c) for c in completions]
    spans, ids = [], []
    for row in tokens:
        position, row_spans, row_ids = 0, [], []
        for k, token in enumerate(row):
            text = "" if token == "<eos>" else token
            row_spans.append((position, position + len(text)))
            row_ids.append(0 if token == "<eos>" else k + 1)
            position += len(text)
        spans.append(row_spans)
        ids.append(row_ids)
    return RewardInputs(
        prompts=[f"p{i}" for i in range(len(completions))],
        completions=completions,
        completion_ids=ids,
        texts=completions,
        token_spans=spans,
        columns=columns or {},
        stop_ids=frozenset({0}),
        sample_ids=[100 + i for i in range(len(completions))],
    )


def score(type_name: str, batch: RewardInputs, env=None, **options) -> list[list[float]]:
    return score_component(type_name, component(type_name, env, **options), batch)


def totals(rows):
    return [pytest.approx(sum(r)) for r in rows]


def gpt2_classifier(path, seed: int = 0, **config):
    """A tiny random GPT-2 sequence classifier (3 labels) on a char tokenizer of "abc", saved with it to `path`:
    (tokenizer, model)."""
    tokenizer = make_char_tokenizer("abc")
    torch.manual_seed(seed)
    config = GPT2Config(
        vocab_size=len(tokenizer), n_positions=16, n_embd=8, n_layer=1, n_head=2, num_labels=3, **config
    )
    config.pad_token_id = config.bos_token_id = config.eos_token_id = tokenizer.pad_token_id
    model = GPT2ForSequenceClassification(config).eval()
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return tokenizer, model


def test_exact_match_normalisation_options():
    batch = inputs(["42", " Hello, World ", "1.50", "abc"], {"answer": ["42", "hello world", "1.5", ["x", "abc"]]})
    assert [sum(r) for r in score("exact_match", batch)] == [1, 0, 0, 1]  # a list of references: any may match
    loose = score(
        "exact_match", batch, case_sensitive=False, ignore_punctuation=True, ignore_whitespace=True, numeric=True
    )
    assert [sum(r) for r in loose] == [1, 1, 1, 1]
    assert score("exact_match", inputs(["7"], {"sum": ["7"]}), column="sum") == [[1.0]]


def test_sequence_rewards_sit_on_the_last_token_and_token_rewards_stay_in_place():
    assert score("exact_match", inputs(["42"], {"answer": ["42"]})) == [[0.0, 1.0]]
    tokens = [["6", "7", "<eos>"], ["6", "8", "<eos>"], ["67"]]
    third = pytest.approx(1 / 3)
    rows = score("digit_match", inputs(["67", "68", "67"], {"answer": ["67"] * 3}, tokens))
    assert rows == [[third, third, third], [third, 0, 0], [pytest.approx(2 / 3)]]


def test_regex_and_length_penalty():
    batch = inputs(["<a>1</a>", "no tags", "x <a>2</a> y"])
    assert [sum(r) for r in score("regex_match", batch, pattern=r"<a>\d</a>")] == [1, 0, 0]
    assert [sum(r) for r in score("regex_match", batch, pattern=r"<a>\d</a>", full_match=False, miss=-0.5)] == [
        1,
        -0.5,
        1,
    ]
    lengths = inputs(["aaaa", "aaaaaaaa", "aaaaaaaaaa", "aaaaaaaaaaaa"])  # 4, 8, 10, 12 tokens
    assert totals(score("length_penalty", lengths, target=8)) == [-0.5, 0, -0.25, -0.5]
    # DAPO overlong: 0 up to 8, then -(L - 8) / 2 up to 10, -1 beyond
    assert totals(score("length_penalty", lengths, max_length=10, buffer=2)) == [0, 0, -1, -1]
    assert totals(score("length_penalty", inputs(["a" * 9]), max_length=10, buffer=2)) == [-0.5]


def test_reference_metrics_match_the_libraries():
    refs = ["the cat sat on the mat", "a quick brown fox"]
    hyps = ["the cat sat on a mat", "a quick brown fox"]
    batch = inputs(hyps, {"reference": refs})
    bleu, chrf, rouge = BLEU(effective_order=True), CHRF(), RougeScorer(["rougeL"])
    assert totals(score("bleu", batch)) == [bleu.sentence_score(h, [r]).score / 100 for h, r in zip(hyps, refs)]
    assert totals(score("chrf", batch)) == [chrf.sentence_score(h, [r]).score / 100 for h, r in zip(hyps, refs)]
    assert totals(score("rouge", batch)) == [rouge.score(r, h)["rougeL"].fmeasure for h, r in zip(hyps, refs)]
    # ROUGE-L is asymmetric in its precision/recall: a short hypothesis of a long reference has recall
    # 2/6 and precision 1, so swapping hypothesis and reference would change a recall-based score
    short = inputs(["the mat"], {"reference": ["the cat sat on the mat"]})
    recall = score("rouge", short, measure="recall")
    assert (
        sum(recall[0])
        == pytest.approx(rouge.score("the cat sat on the mat", "the mat")["rougeL"].recall)
        == pytest.approx(2 / 6)
    )
    assert sum(score("rouge", short, measure="precision")[0]) == pytest.approx(1.0)
    assert totals(score("chrf", batch))[1] == 1.0 and 0 < sum(score("bleu", batch)[0]) < 1
    assert sum(score("chrf", inputs(["zzz"], {"reference": ["abc"]}))[0]) == 0.0


def test_classifier_returns_the_probability_of_the_chosen_label(tmp_path):
    tokenizer, model = gpt2_classifier(tmp_path)
    batch = inputs(["ab", "cab"])
    with torch.no_grad():
        expected = [model(**tokenizer(t, return_tensors="pt")).logits.softmax(-1)[0, 2].item() for t in ["ab", "cab"]]
        raw = [model(**tokenizer(t, return_tensors="pt")).logits[0, 2].item() for t in ["ab", "cab"]]
    assert totals(score("classifier", batch, ComponentEnv(tokenizer), path=str(tmp_path), label=2)) == expected
    logits = score("classifier", batch, ComponentEnv(tokenizer), path=str(tmp_path), label=2, output="logit")
    assert [sum(r) for r in logits] == [pytest.approx(x, abs=1e-6) for x in raw]  # the raw logit, not a log-softmax
    with pytest.raises(RewardError, match="no label 'positive'"):
        component("classifier", ComponentEnv(tokenizer), path=str(tmp_path), label="positive")


def test_teacher_logprob_is_the_teachers_token_log_probability(builtin_model_path):
    tokenizer = load_tokenizer(builtin_model_path)
    prompt_ids = [tokenizer("12+30=").input_ids, tokenizer("5+5=").input_ids]
    response_ids = [tokenizer("42").input_ids + [tokenizer.eos_token_id], tokenizer("1").input_ids]
    batch = RewardInputs(
        ["12+30=", "5+5="],
        ["42", "1"],
        response_ids,
        [["4", "2", "<eos>"], ["1"]],
        {},
        tokenizer.eos_token,
        prompt_ids=prompt_ids,
        behaviour_logprobs=[[-1.0, -2.0, -3.0], [-0.5]],
    )
    with torch.no_grad():
        expected, _ = response_logprobs(
            load_model(builtin_model_path), build_sequences(prompt_ids, response_ids, tokenizer.pad_token_id)
        )
    rows = score("teacher_logprob", batch, ComponentEnv(tokenizer), path=builtin_model_path)
    assert rows[0] == pytest.approx(expected[0].tolist(), abs=1e-5)
    assert rows[1] == pytest.approx(expected[1, :1].tolist(), abs=1e-5)
    distill = score("teacher_logprob", batch, ComponentEnv(tokenizer), path=builtin_model_path, subtract_policy=True)
    assert distill[0] == pytest.approx([t - b for t, b in zip(expected[0].tolist(), [-1.0, -2.0, -3.0])], abs=1e-5)
    other = make_char_tokenizer("xyz")
    with pytest.raises(RewardError, match="differs from the policy's"):
        component("teacher_logprob", ComponentEnv(other), path=builtin_model_path)


def test_python_component_sync_and_async_sequence_and_token_level():
    batch = inputs(["ab", "abcd"], {"answer": ["1", "2"]})
    assert totals(score("python", batch, function=f"{FNS}:completion_length")) == [2.0, 4.0]
    assert score("python", batch, function=f"{FNS}:async_token_index") == [[0.0, 0.1], [0.0, 0.1, 0.2, 0.3]]
    assert totals(score("python", batch, function="reward_fns:completion_length")) == [2.0, 4.0]  # module:function


def test_component_output_errors_name_component_and_sample():
    class Short(RewardComponent):
        def __call__(self, batch):
            return [[1.0] for _ in batch.completion_ids]

    class Nan(RewardComponent):
        def __call__(self, batch):
            return [0.0, float("nan")]

    batch = inputs(["12", "34"])
    with pytest.raises(
        RewardError, match=r"reward 'short', sample 100 \(prompt 'p0'\): 1 token rewards for 2 response tokens"
    ):
        score_component("short", Short(None, None), batch)
    with pytest.raises(RewardError, match=r"reward 'nan', sample 101 \(prompt 'p1'\): NaN, inf"):
        score_component("nan", Nan(None, None), batch)

    class Huge(RewardComponent):  # finite as a Python float, inf once stored as float32
        def __call__(self, batch):
            return [[0.0, 3.5e38], 1.0]

    with pytest.raises(
        RewardError, match=r"reward 'huge', sample 100 \(prompt 'p0'\): NaN, inf or a value beyond float32's range"
    ):
        score_component("huge", Huge(None, None), batch)
    with pytest.raises(RewardError, match="returned 1 scores for 2 samples"):
        score_component("few", type("Few", (RewardComponent,), {"__call__": lambda self, b: [1.0]})(None, None), batch)


@pytest.mark.parametrize("bad", ["1.0", True, np.bool_(False), torch.tensor(True), b"1"])
def test_a_reward_that_is_not_a_number_names_component_and_sample(bad):
    """float() would take "1.0", True or a bool tensor silently; each is refused, sequence- and token-level."""
    batch = inputs(["12", "34"])
    for shape in ("sequence", "token"):
        scores = [1.0, bad] if shape == "sequence" else [[0.5, 0.5], [0.5, bad]]
        odd = type("Odd", (RewardComponent,), {"__call__": lambda self, b, scores=scores: scores})(None, None)
        with pytest.raises(
            RewardError, match=r"reward 'odd', sample 101 \(prompt 'p1'\): returned .* a reward is a number"
        ):
            score_component("odd", odd, batch)
    numbers = [np.float32(0.25), torch.tensor(0.5)]  # numpy and 0-d tensor numbers are rewards
    plain = type("Num", (RewardComponent,), {"__call__": lambda self, b: numbers})(None, None)
    assert [row[-1] for row in score_component("num", plain, batch)] == [0.25, 0.5]


@pytest.mark.mutant
def test_exact_match_whitespace_and_case_options_do_only_what_they_say():
    refs = {"answer": ["hello world", "a b", "straße"]}
    batch = inputs(["helloworld", "ab", "STRASSE"], refs)
    assert component("exact_match")(batch) == [0.0, 0.0, 0.0]
    assert component("exact_match", ignore_whitespace=True)(batch) == [1.0, 1.0, 0.0]
    # case-insensitive compares lower-cased text: "STRASSE".lower() is "strasse", not "straße"
    assert component("exact_match", case_sensitive=False)(batch) == [0.0, 0.0, 0.0]
    assert component("exact_match", case_sensitive=False)(inputs(["Hello World"], refs)) == [1.0]


@pytest.mark.mutant
def test_length_penalty_without_a_buffer_is_0_up_to_max_length_then_minus_1():
    lengths = inputs(["a" * 9, "a" * 10, "a" * 11])
    assert component("length_penalty", max_length=10)(lengths) == [0.0, 0.0, -1.0]
    assert component("length_penalty", max_length=10, buffer=2)(lengths) == [-0.5, -1.0, -1.0]


@pytest.mark.mutant
def test_classifier_scores_do_not_depend_on_the_batch_size(tmp_path):
    tokenizer, _ = gpt2_classifier(tmp_path)
    batch = inputs(["ab", "cabba", "c"])
    for output in ("probability", "logit"):
        whole = component("classifier", ComponentEnv(tokenizer), path=str(tmp_path), label=1, output=output)(batch)
        pairs = component(
            "classifier", ComponentEnv(tokenizer), path=str(tmp_path), label=1, output=output, batch_size=2
        )(batch)
        assert len(whole) == 3 and pairs == pytest.approx(whole, abs=1e-6)


@pytest.mark.mutant
def test_teacher_logprob_does_not_depend_on_the_batch_size(builtin_model_path):
    tokenizer = load_tokenizer(builtin_model_path)
    prompt_ids = [tokenizer(p).input_ids for p in ("12+30=", "5+5=", "1+1=")]
    response_ids = [tokenizer(r).input_ids + [tokenizer.eos_token_id] for r in ("42", "10", "2")]
    batch = RewardInputs(
        ["a", "b", "c"],
        ["42", "10", "2"],
        response_ids,
        ["42", "10", "2"],
        [[(0, 1)] * 3] * 3,
        {},
        prompt_ids=prompt_ids,
    )
    whole = component("teacher_logprob", ComponentEnv(tokenizer), path=builtin_model_path)(batch)
    pairs = component("teacher_logprob", ComponentEnv(tokenizer), path=builtin_model_path, batch_size=2)(batch)
    assert [len(r) for r in whole] == [3, 3, 2]
    assert all(a == pytest.approx(b, abs=1e-5) for a, b in zip(whole, pairs))


@pytest.mark.mutant
def test_python_function_specs_split_at_the_last_colon_and_name_what_is_wrong(tmp_path):
    from pipeline.rewards.components import import_function

    folder = tmp_path / "a:b"  # a colon in the path: the function name follows the last one
    folder.mkdir()
    (folder / "fns.py").write_text("def twice(completions, **kw):\n    return [2.0 for _ in completions]\n")
    assert import_function(f"{folder}/fns.py:twice")(completions=["x"]) == [2.0]
    for spec in (":twice", "fns.py:", "twice"):
        with pytest.raises(
            ValueError, match=rf"{re.escape(repr(spec))} is not module:function .*my_rewards:format_reward"
        ):
            import_function(spec)
    with pytest.raises(ValueError, match=rf"{re.escape(repr(str(folder / 'none.py')))} does not exist"):
        import_function(f"{folder}/none.py:twice")


@pytest.mark.mutant
def test_classifier_labels_by_name_or_index_within_range_and_prompt_completion_text(tmp_path):
    labels = {0: "neg", 1: "mid", 2: "pos"}
    tokenizer, _ = gpt2_classifier(tmp_path, seed=1, id2label=labels, label2id={v: k for k, v in labels.items()})
    env, path = ComponentEnv(tokenizer), str(tmp_path)
    batch = inputs(["ab", "cab"])
    assert component("classifier", env, path=path, label="pos")(batch) == component(
        "classifier", env, path=path, label=2
    )(batch)
    assert component("classifier", env, path=path, label=0)(batch) != component("classifier", env, path=path, label=1)(
        batch
    )
    for bad in (3, -1, "other"):
        with pytest.raises(
            RewardError, match=rf"{re.escape(repr(path))} has no label {re.escape(repr(bad))} \(labels: "
        ):
            component("classifier", env, path=path, label=bad)
    joined = component("classifier", env, path=path)(inputs(["caab", "bccab"]))
    batch.prompt_texts = ["ca", "bc"]  # the prompts as the model saw them come first
    assert component("classifier", env, path=path, text="prompt_completion")(batch) == pytest.approx(joined, abs=1e-6)
    batch.prompt_texts, batch.prompts = [], ["ca", "bc"]  # without them: the dataset's prompt text
    assert component("classifier", env, path=path, text="prompt_completion")(batch) == pytest.approx(joined, abs=1e-6)


@pytest.mark.mutant
def test_exact_match_is_case_sensitive_by_default():
    batch = inputs(["Hello World", "hello world"], {"answer": ["hello world", "hello world"]})
    assert component("exact_match")(batch) == [0.0, 1.0]
    assert component("exact_match", case_sensitive=False)(batch) == [1.0, 1.0]


@pytest.mark.mutant
def test_digit_match_tokens_after_the_stop_token_earn_nothing():
    """Answer "42", unit 1/3: a response that goes on after its stop token (id 1) earns nothing there."""
    batch = RewardInputs(
        prompts=["p"],
        completions=["42x"],
        completion_ids=[[5, 6, 1, 7, 8]],
        texts=["42x"],
        token_spans=[[(0, 1), (1, 2), (2, 2), (2, 3), (3, 3)]],
        columns={"answer": ["42"]},
        stop_ids=frozenset({1}),
    )
    assert component("digit_match")(batch) == [pytest.approx([1 / 3, 1 / 3, 1 / 3, 0.0, 0.0])]


@pytest.mark.mutant
def test_regex_dot_matches_newlines_in_full_and_partial_matches():
    batch = inputs(["<think>a\nb</think>42", "x\ny"])
    pattern = r"<think>.*</think>\d+"
    assert component("regex_match", pattern=pattern)(batch) == [1.0, 0.0]
    assert component("regex_match", pattern=r"x.y", full_match=False)(batch) == [0.0, 1.0]


@pytest.mark.mutant
def test_bleu_of_a_short_exact_answer_is_1():
    """Sentence BLEU with effective order: a two-word hypothesis equal to its reference scores 1 (without it,
    the missing 3- and 4-grams would make it 0)."""
    batch = inputs(["the cat", "a b c"], {"reference": ["the cat", ["x", "a b c"]]})
    assert component("bleu")(batch) == pytest.approx([1.0, 1.0])


CHAT_MODEL = builtin_paths("chat_addition")[0]


def chat_classifier(tmp_path):
    """A tiny random Llama reward model with the shipped chat model's tokenizer (BOS, chat template)."""
    tokenizer = load_tokenizer(CHAT_MODEL)
    return tokenizer, llama_classifier(tmp_path, tokenizer)


def probability_of_1(model, ids):
    with torch.no_grad():
        return model(input_ids=torch.tensor([ids])).logits.softmax(-1)[0, 1].item()


@pytest.mark.mutant
def test_classifier_scores_only_the_assistant_turn_of_a_conversation_by_default(tmp_path):
    tokenizer, model = chat_classifier(tmp_path)
    prompt = [{"role": "user", "content": "What is 12+30?"}]
    completion = [{"role": "assistant", "content": "42"}]
    batch = RewardInputs(
        prompts=[prompt],
        completions=[completion],
        completion_ids=[[5]],
        texts=["42"],
        token_spans=[[(0, 2)]],
        columns={},
    )
    classifier = component("classifier", ComponentEnv(tokenizer), path=str(tmp_path))
    alone = tokenizer.apply_chat_template(completion, tokenize=False)
    both = tokenizer.apply_chat_template(prompt + completion, tokenize=False)
    expected = probability_of_1(model, tokenizer(alone, add_special_tokens=False).input_ids)
    assert expected != pytest.approx(
        probability_of_1(model, tokenizer(both, add_special_tokens=False).input_ids), abs=1e-6
    )
    assert classifier(batch) == [pytest.approx(expected, abs=1e-6)]


@pytest.mark.mutant
def test_classifier_scores_plain_text_with_the_tokenizers_special_tokens_even_with_a_chat_template(tmp_path):
    """A text prompt is scored as text, not through the reward model's chat template, and its tokenizer's
    special tokens (BOS here) are added to it."""
    tokenizer, model = chat_classifier(tmp_path)
    batch = inputs(["42", "7 apples"])
    assert tokenizer("42").input_ids[0] == tokenizer.bos_token_id
    expected = [probability_of_1(model, tokenizer(t).input_ids) for t in batch.texts]
    assert expected[0] != pytest.approx(
        probability_of_1(model, tokenizer("42", add_special_tokens=False).input_ids), abs=1e-6
    )
    assert component("classifier", ComponentEnv(tokenizer), path=str(tmp_path))(batch) == pytest.approx(
        expected, abs=1e-6
    )


REMOTE_CODE = """
from transformers import GPT2Config, GPT2ForSequenceClassification, GPT2LMHeadModel, PreTrainedTokenizerFast


class TinyRemoteConfig(GPT2Config):
    model_type = "tiny-remote"


class TinyRemoteClassifier(GPT2ForSequenceClassification):
    config_class = TinyRemoteConfig


class TinyRemoteLM(GPT2LMHeadModel):
    config_class = TinyRemoteConfig


class TinyRemoteTokenizer(PreTrainedTokenizerFast):
    pass
"""


def remote_code_model(path, auto_class, class_name, custom_tokenizer=True):
    """A local model directory whose config, model and tokenizer classes are custom code in the directory
    (tiny_remote.py), as on the hub: transformers loads it only with trust_remote_code=True."""
    import importlib.util
    import json

    path.mkdir()
    (path / "tiny_remote.py").write_text(REMOTE_CODE)
    spec = importlib.util.spec_from_file_location(f"tiny_remote_{class_name}", path / "tiny_remote.py")
    code = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(code)
    tokenizer = make_char_tokenizer("abc")
    config = code.TinyRemoteConfig(
        vocab_size=len(tokenizer),
        n_positions=16,
        n_embd=8,
        n_layer=1,
        n_head=2,
        num_labels=2,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.eos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    config.auto_map = {"AutoConfig": "tiny_remote.TinyRemoteConfig", auto_class: f"tiny_remote.{class_name}"}
    torch.manual_seed(0)
    getattr(code, class_name)(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    if not custom_tokenizer:
        return tokenizer
    settings = json.loads((path / "tokenizer_config.json").read_text())
    settings.update(
        tokenizer_class="TinyRemoteTokenizer", auto_map={"AutoTokenizer": [None, "tiny_remote.TinyRemoteTokenizer"]}
    )
    (path / "tokenizer_config.json").write_text(json.dumps(settings))
    return tokenizer


@pytest.mark.mutant
def test_model_components_load_custom_code_only_with_trust_remote_code(tmp_path):
    """classifier and teacher_logprob pass trust_remote_code to the tokenizer and the model they load."""
    tokenizer = remote_code_model(tmp_path / "classifier", "AutoModelForSequenceClassification", "TinyRemoteClassifier")
    remote_code_model(tmp_path / "teacher", "AutoModelForCausalLM", "TinyRemoteLM")
    env = ComponentEnv(tokenizer)
    classifier = component("classifier", env, path=str(tmp_path / "classifier"), trust_remote_code=True)
    assert type(classifier.tokenizer).__name__ == "TinyRemoteTokenizer"
    assert type(classifier.model).__name__ == "TinyRemoteClassifier"
    assert len(classifier(inputs(["ab", "c"]))) == 2
    teacher = component("teacher_logprob", env, path=str(tmp_path / "teacher"), trust_remote_code=True)
    assert type(teacher.model).__name__ == "TinyRemoteLM"
    batch = RewardInputs(["a"], ["ab"], [[4, 5]], ["ab"], [[(0, 1), (1, 2)]], {}, prompt_ids=[[3]])
    assert len(teacher(batch)[0]) == 2
    for name, path in (("classifier", "classifier"), ("teacher_logprob", "teacher")):
        with pytest.raises((ValueError, TokenforgeError), match="contains custom code|needs its own Python code"):
            component(name, env, path=str(tmp_path / path))  # the default: custom code is refused
    remote_code_model(tmp_path / "model_only", "AutoModelForCausalLM", "TinyRemoteLM", custom_tokenizer=False)
    with pytest.raises(TokenforgeError, match="needs its own Python code"):
        component("teacher_logprob", env, path=str(tmp_path / "model_only"))  # a plain tokenizer, the model custom


def rollout_batch(tokenizer, completions: list[str], answers: list[str]) -> pa.Table:
    """A rollout batch of `completions` to the prompt 1+2=, each followed by EOS, in one group."""
    ids = [tokenizer(c).input_ids + [tokenizer.eos_token_id] for c in completions]
    n = len(ids)
    metadata = pa.table({"prompt": ["1+2="] * n, "answer": answers})
    return rollout_table([tokenizer("1+2=").input_ids] * n, ids, completions, metadata, prompt_texts=["1+2="] * n)


@pytest.mark.parametrize("policy", ["raise", "zero", "drop"])
def test_a_raising_component_follows_its_on_error_policy(builtin_model_path, policy):
    config = load_config(
        overrides=[
            f"reward.components.sevens={{type: python, function: '{FNS}:fail_on_seven', on_error: {policy}}}",
            "reward.weights.sevens=1",
        ]
    )
    worker = RewardWorker(config, builtin_model_path, ["exact_match", "sevens"])
    batch = rollout_batch(worker.tokenizer, ["3", "7", "17", "4"], ["3"] * 4)
    if policy == "raise":
        with pytest.raises(
            RewardError, match=r"reward 'sevens' failed on sample 1 \(prompt '1\+2='\): ValueError: no sevens"
        ):
            worker.score(batch, "sevens")
        return
    scores = worker.score(batch, "sevens")
    assert scores.failed == [1, 2]  # found by scoring the failed batch sample by sample
    assert [sum(r) for r in scores.rows] == [1.0, 0.0, 0.0, 1.0]
    assert [sum(r) for r in worker.score(batch, "exact_match").rows] == [1, 0, 0, 0]


def test_normalisation_over_batch_and_group():
    # two groups of two; sequence-level totals 1, 3 | 0, 0 on each sample's last token
    rewards = torch.tensor([[0.0, 1.0], [0.0, 3.0], [0.0, 0.0], [0.0, 0.0]])
    mask = torch.ones_like(rewards)
    groups = torch.tensor([0, 0, 1, 1])
    assert torch.equal(normalize_rewards(rewards, mask, groups, "none"), rewards.double())
    group = normalize_rewards(rewards, mask, groups, "group").sum(1)
    std = torch.tensor([1.0, 3.0]).std()
    assert torch.allclose(group.float(), torch.tensor([-1.0, 1.0, 0.0, 0.0]) / (std + 1e-6))
    batch = normalize_rewards(rewards, mask, groups, "batch").sum(1)
    totals_ = torch.tensor([1.0, 3.0, 0.0, 0.0])
    assert torch.allclose(batch.float(), (totals_ - totals_.mean()) / (totals_.std() + 1e-6))
    # token-level rows keep their shape; the mean comes off the last valid token only
    ragged = normalize_rewards(
        torch.tensor([[1.0, 1.0, 9.0], [2.0, 0.0, 0.0]]),
        torch.tensor([[1.0, 1.0, 0.0], [1.0, 0.0, 0.0]]),
        torch.tensor([0, 0]),
        "batch",
    )
    assert ragged[0, 2] == 0 and ragged[1, 1] == 0
    assert torch.allclose(ragged.sum(1), torch.zeros(2, dtype=torch.float64), atol=1e-5)


@pytest.mark.parametrize("mode", ["group", "batch"])
def test_normalisation_of_totals_without_spread_is_bounded(mode):
    """Token-level rewards whose totals are all equal (here 1/3 + 1/3 + 1/3, in different places) have no
    spread to divide by: they become 0, never r / 1e-6. One group of three, and a group of one."""
    third = 1 / 3
    rewards = torch.tensor([[third, third, third], [0.0, 2 * third, third], [third, 0.0, 2 * third], [0.0, 0.5, 0.0]])
    mask = torch.ones_like(rewards)
    groups = torch.tensor([0, 0, 0, 1]) if mode == "group" else torch.tensor([0, 0, 0, 0])
    if mode == "batch":
        rewards, mask = rewards[:3], mask[:3]
        groups = groups[:3]
    normalised = normalize_rewards(rewards, mask, groups, mode)
    assert torch.equal(normalised, torch.zeros_like(normalised))


@settings(max_examples=80, deadline=None)
@given(
    st.lists(st.lists(st.floats(-1e6, 1e6, allow_nan=False, width=32), min_size=1, max_size=5), min_size=1, max_size=8),
    st.sampled_from(["group", "batch"]),
    st.integers(1, 3),
)
def test_property_normalised_rewards_are_finite_and_bounded(rows, mode, num_groups):
    width = max(len(r) for r in rows)
    rewards = torch.tensor([r + [0.0] * (width - len(r)) for r in rows])
    mask = torch.tensor([[1.0] * len(r) + [0.0] * (width - len(r)) for r in rows])
    groups = torch.arange(len(rows)) % num_groups
    normalised = normalize_rewards(rewards, mask, groups, mode)
    assert torch.isfinite(normalised).all()
    # a group with values spread over a range R has std >= R / sqrt(2(n - 1)), and is normalised only when
    # R > RTOL * M (M: the largest sum of |r_t| in it), while |r_t - mean| <= 2M: so the result is at most
    # 2 sqrt(2(n - 1)) / RTOL whatever the rewards' scale (before: |r_t| / 1e-6, unbounded)
    n = len(rows) if mode == "batch" else -(-len(rows) // num_groups)
    assert float(normalised.abs().max()) <= 2 * math.sqrt(2 * max(n - 1, 1)) / EQUAL_RTOL


@pytest.mark.mutant
def test_normalisation_divides_every_token_and_takes_the_mean_off_the_last_valid_one():
    """Token-level rows of lengths 3, 2, 1 (padding holds garbage): s = [1/3 + 1/7 + 1, 2/3 + 1/9, 5/7];
    r_jt / (std(s) + 1e-6), minus mean(s) / (std(s) + 1e-6) on each row's last valid token, exactly."""
    rewards = torch.tensor(
        [[1 / 3, 1 / 7, 1.0, 9.0], [2 / 3, 1 / 9, 7.0, 7.0], [5 / 7, 3.0, 3.0, 3.0]], dtype=torch.float64
    )
    mask = T([[1.0, 1.0, 1.0, 0.0], [1.0, 1.0, 0.0, 0.0], [1.0, 0.0, 0.0, 0.0]])
    out = normalize_rewards(rewards, mask, torch.tensor([4, 4, 4]), "group")
    totals = (rewards * mask).sum(1)
    scale = 1.0 / (totals.std() + 1e-6)
    expected = torch.where(mask.bool(), rewards, 0.0) * scale
    for row, last in enumerate([2, 1, 0]):
        expected[row, last] -= totals.mean() * scale
    assert out.dtype == torch.float64
    assert torch.allclose(out, expected, rtol=1e-12, atol=1e-15)
    unchanged = normalize_rewards(rewards.float(), mask, torch.tensor([4, 4, 4]), "none")
    assert unchanged.dtype == torch.float64 and torch.equal(
        unchanged, rewards.float().double()
    )  # float64 in every mode


@pytest.mark.mutant
def test_samples_a_component_does_not_apply_to_take_no_part_in_its_normalisation():
    """A row with an all-zero mask (the component returned None for it) neither counts in the group's mean
    and std nor receives anything."""
    rewards = T([[0.0, 1.0], [0.0, 0.5], [9.0, 9.0], [0.0, 0.2]])
    applies = T([[1.0, 1.0], [1.0, 1.0], [0.0, 0.0], [1.0, 1.0]])
    groups = torch.tensor([0, 0, 0, 0])
    out = normalize_rewards(rewards, applies, groups, "batch")
    alone = normalize_rewards(rewards[[0, 1, 3]], applies[[0, 1, 3]], groups[:3], "batch")
    assert torch.equal(out[[0, 1, 3]], alone) and torch.equal(out[2], torch.zeros(2, dtype=torch.float64))
    equal = T([[1 / 3, 1 / 3], [0.0, 2 / 3], [9.0, 9.0], [2 / 3, 0.0]])  # totals 2/3 but for the row it skips
    assert torch.equal(normalize_rewards(equal, applies, groups, "group"), torch.zeros(4, 2, dtype=torch.float64))


@pytest.mark.mutant
def test_normalisation_sums_float32_rewards_in_float64():
    """Float32 rewards are converted before the totals are summed: 1e8 + 1 (not a float32) keeps its 1, so the
    result equals that of the same rewards in float64."""
    rewards = T([[1e8, 1.0], [1e8, 0.0], [0.0, 3.0]])
    mask, groups = torch.ones(3, 2), torch.tensor([0, 0, 0])
    for mode in ("batch", "group"):
        assert torch.equal(
            normalize_rewards(rewards, mask, groups, mode), normalize_rewards(rewards.double(), mask, groups, mode)
        )


@pytest.mark.mutant
def test_the_equality_tolerance_of_normalisation_is_each_groups_own_magnitude():
    """Group 0's totals 1 and 1 + 1e-5 differ by more than 1e-6 x their size, so they are normalised to -+0.707;
    huge rewards in group 1 do not widen group 0's tolerance (its magnitude is per sample, not the batch's)."""
    rewards = torch.tensor([[1.0], [1.00001], [1e6], [-1e6]], dtype=torch.float64)
    out = normalize_rewards(rewards, torch.ones(4, 1), torch.tensor([0, 0, 1, 1]), "group")
    half_spread = 0.5e-5
    expected = half_spread / (math.sqrt(2) * half_spread + 1e-6)
    assert torch.allclose(out[:2, 0], torch.tensor([-expected, expected], dtype=torch.float64), rtol=1e-9, atol=0)


class Fixed(RewardComponent):
    """A component returning the given per-sample scores."""

    def __init__(self, scores):
        super().__init__(None, None)
        self.scores = scores

    def __call__(self, inputs):
        return self.scores


def three_samples(lengths=(3, 2, 1)) -> RewardInputs:
    ids = [[7] * n for n in lengths]
    return RewardInputs(
        prompts=["a", "b", "c"],
        completions=["x"] * 3,
        completion_ids=ids,
        texts=["x"] * 3,
        token_spans=[[(0, 0)] * n for n in lengths],
        columns={},
        sample_ids=[5, 6, 7],
    )


@pytest.mark.mutant
def test_score_component_reads_arrays_as_token_rewards_and_scalars_as_sequence_rewards():
    scores = [np.array([0.25, 0.5, 1 / 3]), torch.tensor([1.5, -2.0]), np.float64(0.75)]
    assert score_component("c", Fixed(scores), three_samples()) == [
        [0.25, 0.5, pytest.approx(1 / 3)],
        [1.5, -2.0],
        [0.75],
    ]
    assert score_component("c", Fixed([2.5, None, torch.tensor(4.0)]), three_samples()) == [
        [0.0, 0.0, 2.5],
        None,
        [4.0],
    ]


@pytest.mark.mutant
def test_the_largest_float32_is_a_valid_reward_and_anything_beyond_is_not():
    assert score_component("c", Fixed([FLOAT32_MAX, [-FLOAT32_MAX, 0.0], 1.0]), three_samples()) == [
        [0.0, 0.0, FLOAT32_MAX],
        [-FLOAT32_MAX, 0.0],
        [1.0],
    ]
    beyond = float(np.nextafter(FLOAT32_MAX, np.inf))
    with pytest.raises(
        RewardError, match=r"reward 'c', sample 6 \(prompt 'b'\): NaN, inf or a value beyond float32's range"
    ):
        score_component("c", Fixed([1.0, [beyond, 0.0], 1.0]), three_samples())


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["reward.weights.blue=1.0"], "'reward.weights': component 'blue' names no component type"),
        (["trainer.eval_metrics=[blue]"], "'trainer.eval_metrics': component 'blue' names no component type"),
        (
            ["reward.components.fmt={type: regex_match, pattern: x}"],
            "'reward.components.fmt': configured but unused; give it a weight",
        ),
        (["reward.components.fmt={type: regx}", "reward.weights.fmt=1"], "unknown reward.components.fmt.type 'regx'"),
        (["reward.components.fmt={type: fmt}", "reward.weights.fmt=1"], "component 'fmt' names no component type"),
        (
            ["reward.components.fmt={type: regex_match}", "reward.weights.fmt=1"],
            "'reward.components.fmt.pattern': Field required",
        ),
        (
            ["reward.components.fmt={type: regex_match, pattern: '('}", "reward.weights.fmt=1"],
            "'reward.components.fmt.pattern': not a valid regular expression",
        ),
        (
            ["reward.components.exact_match={tolerance: 1}"],
            "'reward.components.exact_match.tolerance': unknown option of component type 'exact_match'",
        ),
        (
            ["reward.components.fn={type: python, function: no_such_module:f}", "reward.weights.fn=1"],
            "cannot import 'no_such_module': ModuleNotFoundError: No module named 'no_such_module' (a module is "
            "looked up in the working directory and on PYTHONPATH; or name its file: path/to/no_such_module.py:f)",
        ),
        (
            [f"reward.components.fn={{type: python, function: '{FNS}:nope'}}", "reward.weights.fn=1"],
            "has no function 'nope'",
        ),
        (["reward.components.fn={type: python, function: justaname}", "reward.weights.fn=1"], "is not module:function"),
        (
            ["reward.components.t={type: teacher_logprob, path: /no/such/dir}", "reward.weights.t=1"],
            "'reward.components.t': path '/no/such/dir' is not a local HF model directory",
        ),
        (["reward.components.exact_match={on_error: ignore}"], "'reward.components.exact_match.on_error'"),
    ],
)
def test_reward_config_errors_name_the_key(overrides, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        load_config(overrides=overrides)


def test_components_resolve_to_explicit_specs():
    config = load_config(
        overrides=[
            "reward.components.fmt={type: regex_match, pattern: '\\d+', normalize: group}",
            "reward.weights.fmt=0.2",
        ]
    )
    assert set(config.reward.components) == {"fmt", "exact_match", "digit_match"}
    assert config.reward.components["exact_match"].type == "exact_match"
    assert component_options(config, "fmt").pattern == "\\d+"
    assert config.reward.components["fmt"].normalize == "group"


TRL_FNS = Path(__file__).parent / "trl_reward_fns.py"


def hand_batch(tokenizer, prompts: list, responses: list[str], **columns) -> pa.Table:
    """A rollout batch of given responses (char model: one token per character, then EOS)."""
    ids = [tokenizer(r, add_special_tokens=False).input_ids + [tokenizer.eos_token_id] for r in responses]
    metadata = pa.Table.from_pylist(
        [{"prompt": p, **{k: v[i] for k, v in columns.items()}} for i, p in enumerate(prompts)]
    )
    return rollout_table(
        [[3]] * len(ids), ids, responses, metadata, prompt_texts=[str(p) for p in prompts], group_ids=range(len(ids))
    )


def trl_worker(builtin_model_path, *names: str) -> RewardWorker:
    overrides = [f"reward.components.{n}={{type: python, function: '{TRL_FNS}:{n}'}}" for n in names]
    config = load_config(overrides=[*overrides, f"reward.weights={{{', '.join(f'{n}: 1.0' for n in names)}}}"])
    return RewardWorker(config, builtin_model_path, list(names))


def test_trl_documentation_reward_functions_run_unchanged(builtin_model_path):
    tok = load_tokenizer(builtin_model_path)
    chat = [{"role": "user", "content": "add"}]
    conversational = hand_batch(tok, [chat, chat], ["<think>a</think><answer>b</answer>", "no tags"])
    worker = trl_worker(builtin_model_path, "format_reward_func")
    assert [sum(r) for r in worker.score(conversational, "format_reward_func").rows] == [1.0, 0.0]  # message lists
    text = hand_batch(tok, ["1+1=", "2+2="], ["\\boxed{2}", "x" * 23], ground_truth=["2", "4"])
    worker = trl_worker(builtin_model_path, "reward_len", "accuracy_reward")
    assert [sum(r) for r in worker.score(text, "reward_len").rows] == [-11.0, -3.0]
    assert [sum(r) for r in worker.score(text, "accuracy_reward").rows] == [1.0, 0.0]


def test_none_means_not_applicable_in_scores_metrics_and_eval_means(builtin_model_path):
    from actors.learner import Learner
    from pipeline.batch import mean_reward

    tok = load_tokenizer(builtin_model_path)
    batch = hand_batch(tok, ["a", "b", "c", "d"], ["1", "22", "3", "44"], task=["math", "chat", "math", "chat"])
    worker = trl_worker(builtin_model_path, "math_only")
    scored, dropped = worker.score_all(batch, ["math_only"], step=7)
    rows = scored.column(reward_column("math_only")).to_pylist()
    assert rows == [[0.0, 7.0], None, [0.0, 7.0], None] and not any(dropped.to_pylist())
    assert mean_reward(scored, "math_only") == 7.0  # over the samples it applies to
    config = load_config(
        overrides=[
            f"reward.components.math_only={{type: python, function: '{TRL_FNS}:math_only'}}",
            "reward.weights={math_only: 1.0}",
            "algorithm.estimator=reinforce",
        ]
    )
    metrics = Learner(config, builtin_model_path, builtin_model_path).train_step(scored)
    assert metrics["reward/math_only/mean"] == 7.0 and metrics["reward/total/mean"] == 3.5  # None adds 0 to the total


@pytest.mark.slow
def test_a_module_in_the_working_directory_is_found_by_the_cli_and_the_actors(ray_cluster, tmp_path):
    """`function: my_rewards:my_reward` run from the directory holding my_rewards.py, through the installed
    `tokenforge` console script (whose sys.path, unlike `python -m`'s, lacks the working directory): the
    pre-flight import and the reward workers both find the module, and its reward is in the metrics."""
    import json
    import os
    import subprocess
    import sys

    (tmp_path / "my_rewards.py").write_text(
        "def my_reward(completions, **columns):\n    return [float(len(c)) for c in completions]\n"
    )
    command = [
        str(Path(sys.executable).parent / "tokenforge"),
        "train",
        "trainer.total_steps=1",
        "trainer.prompts_per_step=4",
        "rollout.group_size=2",
        "data.max_eval_samples=4",
        "reward.components.mine={type: python, function: 'my_rewards:my_reward'}",
        "reward.weights.mine=0.1",
        f"output_dir={tmp_path / 'out'}",
    ]
    env = {**os.environ, "RAY_ADDRESS": ray_cluster.get_runtime_context().gcs_address}
    result = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600, check=False)
    assert result.returncode == 0, result.stderr[-2000:]
    last = json.loads((tmp_path / "out" / "metrics.jsonl").read_text().splitlines()[-1])
    assert last["step"] == 1 and last["reward/mine/mean"] > 0
