"""Eval metrics over a whole eval set, as the COCO caption evaluation (pycocoevalcap) computes them, so that eval
figures compare with published ones; and `eval_scores`, which gives each eval metric its figure.

On captions already split into words, each caption c_i with the references S_i of its image. The words are the
reward components' (Cider.words: lowercase runs of ASCII letters and digits). COCO's evaluation splits with the
Stanford PTB tokenizer instead, which keeps hyphenated words whole ("t-shirt"), splits clitics ("man 's") and keeps
non-ASCII letters: the formulas are pycocoevalcap's (tested), but on text with such words the figures can differ
slightly from published ones.

- CIDEr-D: mean_i CIDEr-D(c_i, S_i), document frequencies over the evaluated set's references (cider.py).
- BLEU-4, corpus level: BP * prod_{n=1..4} ((sum_i match_n(i) + 1e-15) / (sum_i count_n(i) + 1e-9))^(1/4), where
  match_n(i) = the n-grams of c_i clipped to their largest count in one reference, count_n(i) = c_i's n-grams, and
  BP = exp(1 - R/C) when C < R (C = sum_i |c_i|, R = sum_i the length of the reference closest to |c_i|, the
  shorter on a tie), else 1. The 1e-15 and 1e-9 are pycocoevalcap's (a caption set without any 4-gram match
  scores ~0, not an error).
- ROUGE-L: mean_i ((1 + b^2) P_i R_i) / (R_i + b^2 P_i), b = 1.2, P_i = max_j LCS(c_i, s_j) / |c_i|,
  R_i = max_j LCS(c_i, s_j) / |s_j| (0 when either is 0).
"""

from __future__ import annotations

import math
from collections import Counter

import pyarrow as pa

from pipeline.batch import mean_reward
from pipeline.config import TrainConfig
from pipeline.rewards.cider import CiderD, ngram_counts
from pipeline.rewards.components import Cider, component_options, references

BLEU_TINY, BLEU_SMALL = 1e-15, 1e-9
ROUGE_BETA = 1.2


def coco_cider(captions: list[list[str]], refs: list[list[list[str]]]) -> float:
    return CiderD(refs).corpus(captions, refs)


def coco_bleu4(captions: list[list[str]], refs: list[list[list[str]]]) -> float:
    matches, counts, length, ref_length = [0] * 4, [0] * 4, 0, 0
    for caption, references_ in zip(captions, refs, strict=True):
        clip = Counter()
        for reference in references_:
            clip |= ngram_counts(reference)  # each n-gram's largest count in one reference
        for gram, count in ngram_counts(caption).items():
            matches[len(gram) - 1] += min(count, clip[gram])
        for n in range(4):
            counts[n] += max(0, len(caption) - n)
        length += len(caption)
        ref_length += min((abs(len(r) - len(caption)), len(r)) for r in references_)[1]  # closest, shorter on a tie
    score = math.prod((m + BLEU_TINY) / (c + BLEU_SMALL) for m, c in zip(matches, counts)) ** 0.25
    ratio = (length + BLEU_TINY) / (ref_length + BLEU_SMALL)
    return score * math.exp(1 - 1 / ratio) if ratio < 1 else score


def lcs_length(a: list[str], b: list[str]) -> int:
    row = [0] * (len(b) + 1)
    for x in a:
        diagonal, row[0] = 0, 0
        for j, y in enumerate(b, 1):
            diagonal, row[j] = row[j], diagonal + 1 if x == y else max(row[j], row[j - 1])
    return row[-1]


def coco_rouge_l(captions: list[list[str]], refs: list[list[list[str]]]) -> float:
    total = 0.0
    for caption, references_ in zip(captions, refs, strict=True):
        lcs = [lcs_length(caption, r) for r in references_]
        precision = max((n / len(caption) if caption else 0.0) for n in lcs)
        recall = max((n / len(r) if r else 0.0) for n, r in zip(lcs, references_))
        if precision and recall:
            total += (1 + ROUGE_BETA**2) * precision * recall / (recall + ROUGE_BETA**2 * precision)
    return total / len(captions)


COCO_METRICS = {"cider": coco_cider, "bleu": coco_bleu4, "rouge": coco_rouge_l}  # by component type


def eval_scores(config: TrainConfig, scored: pa.Table, names: list[str]) -> dict[str, float]:
    """eval/<name> of scored greedy eval samples: the COCO figure over the whole set for a component whose `eval_as`
    option is coco (cider by default; bleu and rouge when set), else the mean of its per-sample scores."""
    scores = {}
    for name in names:
        options, kind = component_options(config, name), config.reward.components[name].type
        if getattr(options, "eval_as", "mean") == "coco":
            captions = [Cider.words(text) for text in scored.column("response").to_pylist()]
            refs = [[Cider.words(r) for r in references(v)] for v in scored.column(options.column).to_pylist()]
            scores[f"eval/{name}"] = COCO_METRICS[kind](captions, refs) if captions else 0.0
        else:
            scores[f"eval/{name}"] = mean_reward(scored, name)
    return scores
