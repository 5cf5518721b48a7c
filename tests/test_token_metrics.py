"""Token-level versions of the reference metrics (rouge and chrf at `level: token`) and digit_match at
`level: sequence`: the per-token rewards sum to the library's sentence score for any text and any
tokenisation, a token's reward never depends on the tokens after it, and the credit lands on the tokens
that earn (or cost) it."""

import re

import pytest
from builders import component
from hypothesis import given, settings
from hypothesis import strategies as st
from rouge_score.rouge_scorer import RougeScorer
from rouge_score.tokenizers import DefaultTokenizer
from sacrebleu.metrics import CHRF

from pipeline.errors import ConfigError
from pipeline.preflight import load_config
from pipeline.rewards.base import RewardInputs
from pipeline.rewards.components import prefix_chrf, rouge_words

WORDS = ["ann", "bob", "3", "cats", "5", "pens", "Ann", "CATS", "has", "x"]


def tokenised(texts: list[str], cuts: list[list[int]], columns: dict) -> RewardInputs:
    """Each text split into tokens at `cuts` (character positions), then a stop token covering nothing."""
    spans = []
    for text, row_cuts in zip(texts, cuts):
        bounds = sorted({0, len(text), *(c for c in row_cuts if 0 < c < len(text))})
        spans.append([*zip(bounds, bounds[1:]), (len(text), len(text))])
    return RewardInputs(
        prompts=[""] * len(texts),
        completions=texts,
        completion_ids=[[1] * (len(s) - 1) + [0] for s in spans],
        texts=texts,
        token_spans=spans,
        columns=columns,
        stop_ids=frozenset({0}),
    )


# texts with words, punctuation, case, repeats and characters float32 or ASCII assumptions would miss
texts = st.lists(
    st.sampled_from([*WORDS, ",", " ", ".", "é", "İ", "ab\u0307", "  ", "\n", "\t", "\u00a0"]), max_size=12
).map(" ".join)
cut_lists = st.lists(st.integers(0, 80), max_size=20)


@settings(max_examples=150, deadline=None)
@given(
    text=texts,
    refs=st.lists(texts, min_size=1, max_size=3),
    cuts=cut_lists,
    measure=st.sampled_from(["fmeasure", "precision", "recall"]),
)
def test_token_rouge_l_sums_to_the_sentence_score_for_any_tokenisation(text, refs, cuts, measure):
    inputs = tokenised([text], [cuts], {"reference": [refs]})
    rewards = component("rouge", level="token", measure=measure)(inputs)[0]
    expected = max(getattr(RougeScorer(["rougeL"]).score(r, text)["rougeL"], measure) for r in refs)
    assert len(rewards) == len(inputs.completion_ids[0])
    assert sum(rewards) == pytest.approx(expected, abs=1e-9)
    assert rewards[-1] == 0  # the stop token adds no character


@settings(max_examples=150, deadline=None)
@given(text=texts, refs=st.lists(texts, min_size=1, max_size=3), cuts=cut_lists)
def test_token_chrf_sums_to_the_sentence_score_for_any_tokenisation(text, refs, cuts):
    inputs = tokenised([text], [cuts], {"reference": [refs]})
    rewards = component("chrf", level="token")(inputs)[0]
    assert sum(rewards) == pytest.approx(CHRF().sentence_score(text, refs).score / 100, abs=1e-9)
    assert rewards[-1] == 0


@settings(max_examples=100, deadline=None)
@given(
    prefix=texts,
    suffixes=st.tuples(texts, texts),
    refs=st.lists(texts, min_size=1, max_size=3),
    cuts=cut_lists,
    metric=st.sampled_from(["rouge", "chrf"]),
    joiner=st.sampled_from(["", " "]),
)
def test_token_rewards_of_a_prefix_do_not_depend_on_what_follows(prefix, suffixes, refs, cuts, metric, joiner):
    """Causal rewards: with returns-to-go, G_t = score(full) - score(before t), so what a token costs (a word
    outside the reference lowering precision) is charged to that token, not to the tokens before it; also
    when the suffix continues the prefix's last word, and whichever reference ends up the best."""
    texts_ = [prefix + joiner + suffix for suffix in suffixes]
    inputs = tokenised(texts_, [[*cuts, len(prefix)]] * 2, {"reference": [refs] * 2})
    first, second = component(metric, level="token")(inputs)
    tokens_in_prefix = sum(end <= len(prefix) for _, end in inputs.token_spans[0][:-1])
    assert first[:tokens_in_prefix] == second[:tokens_in_prefix]


@settings(max_examples=100, deadline=None)
@given(text=texts, reference=texts)
def test_token_chrf_never_pays_a_character_the_reference_lacks(text, reference):
    inputs = tokenised([text], [list(range(len(text)))], {"reference": [reference]})
    rewards = component("chrf", level="token")(inputs)[0]
    for ch, reward in zip(text, rewards):
        if ch not in reference:
            assert reward <= 1e-12, ch


@settings(max_examples=100, deadline=None)
@given(text=st.text(max_size=40))
def test_rouge_words_are_rouge_scores_tokens_with_their_characters(text):
    words = rouge_words(text)
    assert [w for w, _ in words] == DefaultTokenizer().tokenize(text)
    for word, origin in words:
        assert re.sub(r"[^a-z0-9]", "", "".join(text[j] for j in dict.fromkeys(origin)).lower()) == word


def test_token_rouge_l_pays_each_word_what_it_adds_and_charges_words_outside_the_reference():
    # reference: 6 words; by word: "bob" L=1 of 1 word: P=1, R=1/6, F=2/7; "bob 5": P=1, R=1/3, F=1/2;
    # "bob 5 dogs": L=2 of 3: P=2/3, R=1/3, F=4/9 (dogs is not in the reference: it costs 1/2 - 4/9)
    rewards = component("rouge", level="token")(
        tokenised(["bob 5 dogs"], [[3, 5]], {"reference": ["ann 3 cats, bob 5 pens"]})
    )[0]
    assert rewards == pytest.approx([2 / 7, 1 / 2 - 2 / 7, 4 / 9 - 1 / 2, 0.0])


def test_token_rouge_l_counts_a_word_cut_by_the_prefix_as_the_word_so_far():
    # char by char: "c" and "ca" are words outside the reference (F = 0), "cat" completes the only word (F = 1)
    rewards = component("rouge", level="token")(tokenised(["cat"], [[1, 2]], {"reference": ["cat"]}))[0]
    assert rewards == pytest.approx([0.0, 0.0, 1.0, 0.0])
    rewards = component("rouge", level="token")(tokenised(["ca cat"], [[1, 2, 3, 4, 5]], {"reference": ["cat"]}))[0]
    assert rewards == pytest.approx([0.0, 0.0, 0.0, 0.0, 0.0, 2 / 3, 0.0])  # "ca cat": P=1/2, R=1, F=2/3
    # "cat c": the cut word "c" already lowers precision (F = 2/3), at the token that wrote it
    rewards = component("rouge", level="token")(tokenised(["cat ca"], [[3, 4, 5]], {"reference": ["cat"]}))[0]
    assert rewards == pytest.approx([1.0, 0.0, -1 / 3, 0.0, 0.0])


def test_with_several_references_a_tokens_reward_does_not_wait_for_the_best_one():
    # "a b" then " c d": the first token is scored against the reference it matches so far ("a b")
    for metric in ("rouge", "chrf"):
        inputs = tokenised(["a b", "a c d"], [[1], [1]], {"reference": [["a b", "c d"]] * 2})
        first, second = component(metric, level="token")(inputs)
        assert first[0] == second[0] > 0


def test_characters_no_token_span_covers_belong_to_the_last_token():
    # spans that stop short of the text (an odd tokenizer's offsets): the sum is still the text's score
    inputs = RewardInputs(
        prompts=[""],
        completions=["cat dog"],
        completion_ids=[[1, 0]],
        texts=["cat dog"],
        token_spans=[[(0, 3), (3, 3)]],
        columns={"reference": ["cat dog"]},
    )
    cat = {
        "rouge": RougeScorer(["rougeL"]).score("cat dog", "cat")["rougeL"].fmeasure,
        "chrf": CHRF().sentence_score("cat", ["cat dog"]).score / 100,
    }
    for metric in ("rouge", "chrf"):
        first, last = component(metric, level="token")(inputs)[0]
        assert first == pytest.approx(cat[metric]) and first + last == pytest.approx(1.0)


def test_token_chrf_pays_right_characters_in_the_wrong_order_far_less_than_the_right_order():
    reference = "abcdefghijklmnop"
    inputs = tokenised([reference, reference[::-1]], [list(range(16))] * 2, {"reference": [reference] * 2})
    right, reversed_ = component("chrf", level="token")(inputs)
    assert sum(right) == pytest.approx(1.0)
    assert 0 < sum(reversed_) < 0.25  # every unigram matches, no longer n-gram does
    assert min(right[:-1]) > 0  # every character earns; the stop token covers none


def test_digit_match_at_sequence_level_is_its_token_rewards_summed():
    inputs = tokenised(["olleh", "olxeh", "ol"], [list(range(5))] * 3, {"answer": ["olleh"] * 3})
    tokens = component("digit_match")(inputs)
    assert component("digit_match", level="sequence")(inputs) == pytest.approx([sum(r) for r in tokens])
    assert component("digit_match", level="sequence")(inputs)[0] == pytest.approx(1.0)


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ("{type: rouge, rouge_type: rouge1, level: token}", "level: token is defined for rouge_type: rougeL"),
        (
            "{type: chrf, word_order: 2, level: token}",
            "level: token shares out character n-gram matches only; use word_order: 0",
        ),
        ("{type: chrf, level: word}", "'reward.components.m.level'"),
    ],
)
def test_token_level_metric_options_that_cannot_work_are_one_line_errors(options, message):
    with pytest.raises(ConfigError, match=re.escape(message)) as error:
        load_config(overrides=[f"reward.components.m={options}", "reward.weights={m: 1.0}"])
    assert "\n" not in str(error.value)


def test_sequence_level_reference_metrics_put_the_whole_score_on_the_last_token():
    """level: sequence (the default) is one number per sample, the library's score (the reward worker puts it on
    the last token), never rewards spread over the tokens."""
    text, ref = "ann 3 cats", "ann 3 cats, bob 5 pens"
    inputs = tokenised([text], [[3, 5, 7]], {"reference": [[ref]]})
    rouge = RougeScorer(["rougeL"]).score(ref, text)["rougeL"].fmeasure
    chrf = CHRF().sentence_score(text, [ref]).score / 100
    for name, score in (("rouge", rouge), ("chrf", chrf)):
        row = component(name)(inputs)[0]
        assert isinstance(row, float) and row == pytest.approx(score), name


def test_a_first_token_that_writes_no_text_earns_nothing():
    """A response that opens with a token covering no characters (a special token): its prefix is empty, so
    its reward is 0 and the first character's credit goes to the token that writes it."""
    inputs = tokenised(["ann 3"], [[]], {"reference": [["ann 3 cats"]]})
    inputs.token_spans[0].insert(0, (0, 0))
    inputs.completion_ids[0].insert(0, 2)
    for name in ("rouge", "chrf"):
        rewards = component(name, level="token")(inputs)[0]
        assert rewards[0] == 0.0 and rewards[1] > 0, (name, rewards)


@pytest.mark.parametrize("beta", [1, 3])
def test_token_chrf_follows_sacrebleus_f_beta_for_any_beta(beta):
    """chrf_from_statistics weighs recall beta times precision, (1 + b^2) P R / (b^2 P + R), as sacrebleu does for
    its `beta` (the component uses sacrebleu's default, 2)."""
    text, ref = "ann 3 cats bob", "ann 3 cats, bob 5 pens"
    expected = CHRF(beta=beta).sentence_score(text, [ref]).score / 100
    assert prefix_chrf(text, [len(text)], ref, 6, beta) == [pytest.approx(expected)]
