"""CIDEr-D, corpus BLEU-4 and ROUGE-L against the reference implementation (pycocoevalcap's scorers), over random
captions and references, and the `cider` reward component (sequence and token level) built on CIDEr-D."""

import json
import math

import pytest
from builders import component
from hypothesis import given, settings
from hypothesis import strategies as st
from pycocoevalcap.bleu.bleu import Bleu
from pycocoevalcap.cider.cider import Cider
from pycocoevalcap.rouge.rouge import Rouge
from test_token_metrics import tokenised

from actors.reward_worker import RewardWorker
from pipeline.preflight import load_config
from pipeline.rewards.base import ComponentEnv, RewardError
from pipeline.rewards.cider import CiderD
from pipeline.rewards.coco import coco_bleu4, coco_rouge_l
from pipeline.rewards.components import rouge_words

WORDS = st.lists(st.sampled_from(["a", "red", "blue", "circle", "square", "on", "left", "two", "the"]), max_size=12)
IMAGES = st.lists(  # per image: its caption (maybe empty) and 1-5 references (unequal numbers, never empty)
    st.tuples(WORDS, st.lists(WORDS.filter(bool), min_size=1, max_size=5)), min_size=1, max_size=6
)


@settings(max_examples=200, deadline=None)
@given(IMAGES)
def test_cider_d_is_pycocoevalcaps(images):
    captions = [caption for caption, _ in images]
    references = [refs for _, refs in images]
    ids = range(len(images))
    expected_mean, expected = Cider().compute_score(
        {i: [" ".join(r) for r in references[i]] for i in ids}, {i: [" ".join(captions[i])] for i in ids}
    )
    cider = CiderD(references)  # document frequencies over the evaluated references, as pycocoevalcap
    got = [cider.score(captions[i], references[i]) for i in ids]
    assert got == pytest.approx(list(expected), rel=1e-9, abs=1e-12)
    assert cider.corpus(captions, references) == pytest.approx(float(expected_mean), rel=1e-9, abs=1e-12)


@settings(max_examples=200, deadline=None)
@given(IMAGES)
def test_corpus_bleu4_and_rouge_l_are_pycocoevalcaps(images):
    captions = [caption or ["a"] for caption, _ in images]  # pycocoevalcap's ROUGE-L divides by the caption's length
    references = [refs for _, refs in images]
    gts = {i: [" ".join(r) for r in refs] for i, refs in enumerate(references)}
    res = {i: [" ".join(c)] for i, c in enumerate(captions)}
    bleu, _ = Bleu(4).compute_score(gts, res, verbose=0)
    assert coco_bleu4(captions, references) == pytest.approx(bleu[3], rel=1e-9, abs=1e-12)
    rouge, _ = Rouge().compute_score(gts, res)
    assert coco_rouge_l(captions, references) == pytest.approx(float(rouge), rel=1e-9, abs=1e-12)


def test_coco_bleu4_and_rouge_l_by_hand():
    """One caption, one reference of 4 words it matches in its first 3: precisions 3/3, 2/2, 1/1 and (no 4-gram)
    1e-15/1e-9; brevity penalty exp(1 - 4/3). ROUGE-L: P = 1, R = 3/4, (1 + 1.44) x 0.75 / (0.75 + 1.44)."""
    caption, refs = ["a", "red", "circle"], [["a", "red", "circle", "left"]]
    assert coco_bleu4([caption], [refs]) == pytest.approx((1e-15 / 1e-9) ** 0.25 * math.exp(1 - 4 / 3), rel=1e-6)
    assert coco_rouge_l([caption], [refs]) == pytest.approx(2.44 * 0.75 / (0.75 + 1.44))


def test_cider_d_by_hand():
    """Two images, so idf(w) = log 2 - log df(w): 0 for an n-gram in both images' references, log 2 otherwise."""
    cider = CiderD([[["red", "circle"]], [["red", "square", "left"]]])
    # equal to its only reference: cosine 1 for the orders with n-grams (1-3), none of 4 words: 10 x 3 / 4
    assert cider.score(["red", "square", "left"], [["red", "square", "left"]]) == pytest.approx(7.5)
    assert cider.score(["red"], [["red", "circle"]]) == 0.0  # "red" is in every image's references: weight 0
    # cosine 1 on unigrams, no bigram; lengths (bigrams) 0 and 1: the Gaussian penalty exp(-1 / (2 x 6^2))
    assert cider.score(["circle"], [["red", "circle"]]) == pytest.approx(2.5 * math.exp(-1 / 72))
    # "circle" twice: min(2 log 2, log 2) log 2 / (2 log 2 x log 2) = 1/2 on unigrams (CIDEr-D's clipping)
    assert cider.score(["circle", "circle"], [["red", "circle"]]) == pytest.approx(1.25)
    assert cider.score(["circle"], []) == 0.0


def split(text: str) -> str:
    """The words the component scores (rouge-score's split), space-separated for pycocoevalcap."""
    return " ".join(word for word, _ in rouge_words(text))


def cider_component(corpus: list, **options):
    """The `cider` reward component with `corpus` as the training set's reference column."""
    return component("cider", ComponentEnv(None, train_column=lambda name: corpus), **options)


CAPTIONS = st.lists(st.sampled_from(["a", "Red", "circle", "two", "squares", ",", ".", "left"]), max_size=10).map(
    " ".join
)


@settings(max_examples=150, deadline=None)
@given(text=CAPTIONS, refs=st.lists(CAPTIONS, min_size=1, max_size=4), others=IMAGES, cuts=st.lists(st.integers(0, 60)))
def test_the_cider_reward_is_pycocoevalcaps_score_and_its_token_rewards_sum_to_it(text, refs, others, cuts):
    """Sequence level: pycocoevalcap's CIDEr-D of the caption, document frequencies over the training references
    (this row's and other images'); token level: per-token increments that sum to it, for any tokenisation."""
    corpus = [refs, *[[" ".join(r) for r in references] for _, references in others]]
    inputs = tokenised([text], [cuts], {"reference": [refs]})
    score = cider_component(corpus)(inputs)[0]
    gts = {i: [split(r) for r in image] for i, image in enumerate(corpus)}  # the other images' words: df > 0
    _, expected = Cider().compute_score(gts, {i: [split(text) if i == 0 else ""] for i in gts})
    assert score == pytest.approx(float(expected[0]), rel=1e-9, abs=1e-12)
    rewards = cider_component(corpus, level="token")(inputs)[0]
    assert len(rewards) == len(inputs.completion_ids[0]) and rewards[-1] == 0  # the stop token adds no word
    assert sum(rewards) == pytest.approx(score, abs=1e-9)


def test_token_cider_credits_the_token_that_completes_a_word():
    """Character by character, "red" earns nothing until its last character completes the reference's word."""
    corpus = [["red circle"], ["blue square"]]
    rewards = cider_component(corpus, level="token")(tokenised(["red"], [[1, 2]], {"reference": [["red circle"]]}))[0]
    full = cider_component(corpus)(tokenised(["red"], [[]], {"reference": [["red circle"]]}))[0]
    assert full > 0 and rewards == pytest.approx([0.0, 0.0, full, 0.0])
    # "red" | " c" | "ircle": the cut word "c" (in no reference) already lowers the score, at the token that wrote it
    inputs = tokenised(["red circle"], [[3, 5]], {"reference": [["red circle"]]})
    rewards = cider_component(corpus, level="token")(inputs)[0]
    red = 10 * math.exp(-1 / 72) * 2**-0.5 / 4  # unigram cosine 1/sqrt(2), one word short of the reference
    assert rewards == pytest.approx([red, 1.25 - red, 5.0 - 1.25, 0.0])  # "red c": unigram cosine 1/2, same length


def test_the_reward_worker_gives_cider_the_training_references(builtin_model_path, tmp_path):
    train_file = tmp_path / "train.jsonl"
    rows = [{"prompt": "1+1=", "reference": ["two", "2"]}, {"prompt": "2+2=", "reference": "four"}]
    train_file.write_text("".join(json.dumps(r) + "\n" for r in rows))
    config = load_config(
        overrides=[
            "reward.components.cider={type: cider}",
            "reward.weights={cider: 1.0}",
            "trainer.eval_metrics=[cider]",
            f"data.train_file={train_file}",
            "data.eval_file=null",
        ]
    )
    cider = RewardWorker(config, builtin_model_path, ["cider"]).components["cider"].cider
    assert cider.log_images == pytest.approx(math.log(2)) and cider.document_frequency[("two",)] == 1
    with pytest.raises(RewardError, match="set data.train_file"):
        component("cider", ComponentEnv(None))
