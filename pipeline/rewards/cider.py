"""CIDEr-D (Vedantam et al., CVPR 2015), as pycocoevalcap's `Cider` scorer computes it, on captions already split
into words.

For a caption c and the references S = {s_1..s_m} of its image, with g_n(x) the TF-IDF vector of x's n-grams:

    g_n(x)[w] = count_x(w) * (log |I| - log max(1, df(w)))     (|I| images; df(w): images whose references have w)
    CIDEr-D_n(c, S) = 10 / m * sum_j exp(-(l(c) - l(s_j))^2 / (2 sigma^2))
                      * sum_w min(g_n(c)[w], g_n(s_j)[w]) g_n(s_j)[w] / (|g_n(c)| |g_n(s_j)|)
    CIDEr-D(c, S) = mean over n = 1..4 of CIDEr-D_n(c, S),  sigma = 6

l(x) is the number of words (pycocoevalcap counts bigrams, words - 1: the same differences, and an empty caption
has no n-gram to score). The document
frequencies come from a corpus of reference sets: the training references for a reward (as self-critical sequence
training does), the evaluated set's own references for `eval/cider` (as COCO's evaluation does, so that it compares
with published numbers).
"""

from __future__ import annotations

import math
from collections import Counter
from functools import lru_cache

MAX_N = 4
SIGMA = 6.0

Vector = tuple[list[dict[tuple[str, ...], float]], list[float], int]  # per order: weights, norms; the length


def ngram_counts(words: list[str] | tuple[str, ...]) -> Counter:
    """Every n-gram of `words` for n = 1..4 (as tuples), with its count."""
    return Counter(tuple(words[i : i + n]) for n in range(1, MAX_N + 1) for i in range(len(words) - n + 1))


class CiderD:
    """CIDEr-D with the document frequencies of `reference_sets` (per image, the word lists of its references)."""

    def __init__(self, reference_sets: list[list[list[str]]]):
        if not reference_sets:
            raise ValueError("CIDEr-D needs at least one image's references for its document frequencies")
        self.document_frequency = Counter(
            gram for references in reference_sets for gram in {g for words in references for g in ngram_counts(words)}
        )
        self.log_images = math.log(len(reference_sets))
        self.reference_vector = lru_cache(maxsize=65536)(self.vector)  # the same references come back every step

    def vector(self, words: tuple[str, ...]) -> Vector:
        """g_n(words) for n = 1..4, their norms |g_n|, and the length l."""
        weights, norms = [{} for _ in range(MAX_N)], [0.0] * MAX_N
        for gram, count in ngram_counts(words).items():
            weight = count * (self.log_images - math.log(max(1.0, self.document_frequency[gram])))
            weights[len(gram) - 1][gram] = weight
            norms[len(gram) - 1] += weight * weight
        return weights, [math.sqrt(n) for n in norms], len(words)

    def score(self, words: list[str], references: list[list[str]]) -> float:
        """CIDEr-D(words, references) (0 without references)."""
        if not references:
            return 0.0
        weights, norms, length = self.vector(tuple(words))
        total = 0.0
        for reference in references:
            ref_weights, ref_norms, ref_length = self.reference_vector(tuple(reference))
            penalty = math.exp(-((length - ref_length) ** 2) / (2 * SIGMA**2))
            for n in range(MAX_N):
                if norms[n] and ref_norms[n]:
                    dot = sum(
                        min(w, ref_weights[n].get(g, 0.0)) * ref_weights[n].get(g, 0.0) for g, w in weights[n].items()
                    )
                    total += penalty * dot / (norms[n] * ref_norms[n])
        return 10.0 * total / (MAX_N * len(references))

    def corpus(self, captions: list[list[str]], references: list[list[list[str]]]) -> float:
        """The mean CIDEr-D of `captions`, each against its image's references."""
        return sum(self.score(c, r) for c, r in zip(captions, references, strict=True)) / len(captions)
