"""The built-in reward components (see pipeline/rewards/base.py for the interface and docs/rewards.md).

Rule-based: exact_match, regex_match, length_penalty, digit_match (token-level).
Reference-based (sacrebleu, rouge-score; sentence scores in [0, 1]): bleu, chrf, rouge; chrf and rouge (rougeL)
also as token-level rewards (`level: token`) that sum to the sentence score. cider: CIDEr-D (0-10), also token-level.
Model-based (local HF models, batched on the worker's device): classifier, teacher_logprob (token-level).
User code: python (`module:function` or `path/to/file.py:function`, sync or async).
"""

from __future__ import annotations

import asyncio
import bisect
import importlib
import importlib.util
import inspect
import itertools
import re
import string
from collections import Counter
from pathlib import Path
from typing import Literal

import pyarrow as pa
import torch
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from pipeline.batch import is_conversation
from pipeline.config import TrainConfig
from pipeline.models.hf import build_sequences, check_model_dir, load_model, load_tokenizer, response_logprobs
from pipeline.rewards.base import (
    COMPONENTS,
    ComponentEnv,
    RewardComponent,
    RewardError,
    RewardInputs,
    register_component,
)
from pipeline.rewards.cider import CiderD

__all__ = ["COMPONENTS", "component_options"]  # the registry, with every built-in component registered


def statistics_columns(config: TrainConfig, train: pa.Table) -> pa.Table:
    """The training-set columns that the components in use compute statistics from (RewardComponent.train_columns):
    what the driver hands the reward workers, so that none reads the data file on its own node."""
    names = {
        c
        for name in config.reward.components
        for c in COMPONENTS[config.reward.components[name].type].train_columns(component_options(config, name))
    }
    return train.select(sorted(names))


def component_options(config: TrainConfig, name: str) -> BaseModel:
    """The validated options of component `name` of `config` (an instance of its type's Options)."""
    spec = config.reward.components[name]
    return COMPONENTS[spec.type].Options.model_validate(spec.options())


class BaseOptions(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)


class ColumnOptions(BaseOptions):
    column: str = "answer"
    """Dataset column holding the reference answer."""


class ReferenceOptions(BaseOptions):
    column: str = "reference"
    """Dataset column holding the reference text (a string or a list of strings)."""


class CocoEvalOptions(ReferenceOptions):
    eval_as: Literal["mean", "coco"] = "mean"
    """eval/<name>: the mean of the per-sample scores, or (coco) the figure over the whole eval set as the COCO
    caption evaluation computes it (pipeline/rewards/coco.py)."""


def references(value) -> list[str]:
    return [str(v) for v in value] if isinstance(value, (list, tuple)) else [str(value)]


Level = Literal["sequence", "token"]


def as_level(token_rows: list[list[float]], level: Level) -> list:
    """A token-level component's rewards as asked: per token, or their sum as one sequence-level reward."""
    return token_rows if level == "token" else [sum(row) for row in token_rows]


class ReferenceComponent(RewardComponent):
    Options = ReferenceOptions

    @classmethod
    def required_columns(cls, options: ReferenceOptions) -> tuple[str, ...]:
        return (options.column,)


@register_component("exact_match")
class ExactMatch(ReferenceComponent):
    """1 if the completion equals the reference after normalisation, else 0."""

    class Options(ColumnOptions):
        numeric: bool = False
        """Compare as numbers when both sides parse as floats ("1.50" == "1.5")."""
        case_sensitive: bool = True
        ignore_punctuation: bool = False
        ignore_whitespace: bool = False
        """Remove all whitespace (leading/trailing whitespace is always stripped)."""

    def normalize(self, text: str) -> str:
        o = self.options
        text = text.strip() if o.case_sensitive else text.strip().lower()
        if o.ignore_punctuation:
            text = text.translate(str.maketrans("", "", string.punctuation))
        return re.sub(r"\s+", "", text) if o.ignore_whitespace else text

    def same(self, completion: str, reference: str) -> bool:
        if self.options.numeric:
            try:
                return float(completion) == float(reference)
            except ValueError:
                pass
        return self.normalize(completion) == self.normalize(reference)

    def __call__(self, inputs: RewardInputs) -> list[float]:
        refs = inputs.columns[self.options.column]
        return [float(any(self.same(c, r) for r in references(ref))) for c, ref in zip(inputs.texts, refs)]


@register_component("digit_match")
class DigitMatch(ReferenceComponent):
    """Token-level credit for each answer character generated in its place, and for the stop token (EOS)
    in its place; any answer text, not only digits.

    With answer a (n characters), a token whose text covers characters [s, e) of the completion earns
    (number of them equal to a[s:e]) / (n + 1), so one BPE token covering several digits earns for each;
    the stop token earns 1 / (n + 1) when everything before it is exactly a. A fully correct response
    therefore earns 1 in total. Character positions come from RewardInputs.token_spans. `level: sequence`
    gives the same total as one reward on the last token (partial credit without per-token placement).
    """

    class Options(ColumnOptions):
        level: Level = "token"

    def __call__(self, inputs: RewardInputs) -> list[list[float]]:
        rows = []
        for ids, spans, text, answer in zip(
            inputs.completion_ids, inputs.token_spans, inputs.texts, inputs.columns[self.options.column]
        ):
            answer = str(answer)
            unit = 1.0 / (len(answer) + 1)
            row = []
            for token, (start, end) in zip(ids, spans):
                if token in inputs.stop_ids:
                    row.append(unit if text[:start] == answer else 0.0)
                    break
                row.append(unit * sum(text[j] == answer[j] for j in range(start, min(end, len(answer)))))
            rows.append(row + [0.0] * (len(ids) - len(row)))
        return as_level(rows, self.options.level)


@register_component("regex_match")
class RegexMatch(RewardComponent):
    """`match` if the completion matches `pattern` (format rewards), else `miss`."""

    class Options(BaseOptions):
        pattern: str
        full_match: bool = True
        """Whole completion must match (re.fullmatch); false = anywhere (re.search)."""
        match: float = 1.0
        miss: float = 0.0

        @field_validator("pattern")
        @classmethod
        def compiles(cls, pattern: str) -> str:
            try:
                re.compile(pattern)
            except re.error as error:
                raise ValueError(f"not a valid regular expression: {error}") from None
            return pattern

    def __call__(self, inputs: RewardInputs) -> list[float]:
        o = self.options
        find = re.compile(o.pattern, re.DOTALL).fullmatch if o.full_match else re.compile(o.pattern, re.DOTALL).search
        return [o.match if find(c) else o.miss for c in inputs.texts]


@register_component("length_penalty")
class LengthPenalty(RewardComponent):
    """Penalty on response length L (tokens): -|L - target| / target, and/or DAPO's soft overlong
    penalty: 0 up to max_length - buffer, then linearly down to -1 at max_length, -1 beyond."""

    class Options(BaseOptions):
        target: int | None = Field(None, ge=1)
        max_length: int | None = Field(None, ge=1)
        buffer: int = Field(0, ge=0)

        @model_validator(mode="after")
        def something_to_do(self):
            if self.target is None and self.max_length is None:
                raise ValueError("set target and/or max_length")
            if self.max_length is not None and self.buffer >= self.max_length:
                raise ValueError("buffer must be below max_length")
            return self

    def __call__(self, inputs: RewardInputs) -> list[float]:
        o, out = self.options, []
        for ids in inputs.completion_ids:
            length, penalty = len(ids), 0.0
            if o.target is not None:
                penalty -= abs(length - o.target) / o.target
            if o.max_length is not None:
                start = o.max_length - o.buffer
                if length > o.max_length:
                    penalty -= 1.0
                elif length > start:
                    penalty -= (length - start) / o.buffer  # buffer > 0 here
            out.append(penalty)
        return out


class SacrebleuComponent(ReferenceComponent):
    """A sacrebleu sentence metric (`self.metric`, set by the subclass) / 100, against the references."""

    def __call__(self, inputs: RewardInputs) -> list[float]:
        refs = inputs.columns[self.options.column]
        return [self.metric.sentence_score(c, references(r)).score / 100 for c, r in zip(inputs.texts, refs)]


@register_component("bleu")
class Bleu(SacrebleuComponent):
    """Sentence BLEU (sacrebleu, effective order) / 100; with `eval_as: coco`, eval/<name> is corpus BLEU-4."""

    Options = CocoEvalOptions

    def __init__(self, options: CocoEvalOptions, env: ComponentEnv):
        super().__init__(options, env)
        from sacrebleu.metrics import BLEU

        self.metric = BLEU(effective_order=True)


def prefix_ends(spans: list[tuple[int, int]], length: int) -> list[int]:
    """Per response token, the end of the text written up to and including it (a running maximum of the
    span ends); the last token's prefix is the whole text, so the rewards always sum to the text's score."""
    ends = list(itertools.accumulate((end for _, end in spans), max, initial=0))[1:]
    if ends:
        ends[-1] = length
    return ends


def best_prefix_scores(per_reference: list[list[float]]) -> list[float]:
    """score(prefix) = max over the references of score(prefix, reference), position by position: the
    total is the best reference's score (as the libraries take it) and r_t still depends only on tokens <= t."""
    return [max(scores) for scores in zip(*per_reference)]


def increments(scores: list[float]) -> list[float]:
    """r_t = score(prefix_t) - score(prefix_{t-1}), score(empty) = 0: the rewards sum to the last score, and
    r_t depends only on the tokens up to t, so returns-to-go G_t = score(full) - score(prefix_{t-1})."""
    return [now - before for before, now in zip([0.0, *scores], scores)]


def chrf_from_statistics(hyp: list[int], ref: list[int], match: list[int], beta: float) -> float:
    """sacrebleu's sentence chrF / 100 from per-order n-gram counts (CHRF._compute_f_score without eps
    smoothing): precision and recall averaged over the orders that have n-grams on both sides, then
    F_beta = (1 + b^2) P R / (b^2 P + R)."""
    orders = [(m / h, m / r) for h, r, m in zip(hyp, ref, match) if h > 0 and r > 0]
    if not orders:
        return 0.0
    precision = sum(p for p, _ in orders) / len(orders)
    recall = sum(r for _, r in orders) / len(orders)
    factor = beta**2
    return (1 + factor) * precision * recall / (factor * precision + recall) if precision + recall else 0.0


def prefix_chrf(text: str, ends: list[int], reference: str, max_order: int, beta: float) -> list[float]:
    """chrF of text[:end] against `reference` for every end in `ends` (ascending), updating the clipped
    n-gram matches one character at a time: O(len(text) * max_order). Whitespace is removed first, as in chrF."""
    reference = "".join(reference.split())
    ref_grams = [Counter(reference[k : k + n] for k in range(len(reference) - n + 1)) for n in range(1, max_order + 1)]
    ref_counts = [sum(c.values()) for c in ref_grams]
    seen = [Counter() for _ in range(max_order)]
    hyp_counts, matches, letters, scores, j = [0] * max_order, [0] * max_order, "", [], 0
    for end in ends:
        for ch in text[j:end]:
            if ch.isspace():
                continue
            letters += ch
            for n in range(1, min(max_order, len(letters)) + 1):  # the n-grams that end at this character
                gram = letters[-n:]
                seen[n - 1][gram] += 1
                hyp_counts[n - 1] += 1
                matches[n - 1] += (
                    seen[n - 1][gram] <= ref_grams[n - 1][gram]
                )  # chrF clips matches at the reference count
        j = max(j, end)
        scores.append(chrf_from_statistics(hyp_counts, ref_counts, matches, beta))
    return scores


@register_component("chrf")
class Chrf(SacrebleuComponent):
    """Sentence chrF (sacrebleu; word_order=2 gives chrF++) / 100. `level: token`: each token earns what it
    adds to the score, r_t = chrF(prefix_t) - chrF(prefix_{t-1}), chrF(prefix) the best over the references,
    so the rewards sum to the sentence score and a token's reward never depends on the tokens after it."""

    class Options(ReferenceOptions):
        word_order: int = Field(0, ge=0)
        level: Level = "sequence"

        @model_validator(mode="after")
        def token_level_is_char_only(self):
            if self.level == "token" and self.word_order:
                raise ValueError("level: token shares out character n-gram matches only; use word_order: 0")
            return self

    def __init__(self, options: Options, env: ComponentEnv):
        super().__init__(options, env)
        from sacrebleu.metrics import CHRF

        self.metric = CHRF(word_order=options.word_order)

    def __call__(self, inputs: RewardInputs) -> list:
        if self.options.level == "sequence":
            return super().__call__(inputs)
        rows = []
        for text, spans, ref in zip(inputs.texts, inputs.token_spans, inputs.columns[self.options.column]):
            ends = prefix_ends(spans, len(text))
            per_reference = [
                prefix_chrf(text, ends, r, self.metric.char_order, self.metric.beta) for r in references(ref)
            ]
            rows.append(increments(best_prefix_scores(per_reference)))
        return rows


def rouge_words(text: str) -> list[tuple[str, list[int]]]:
    """rouge-score's default tokenisation (lowercase, runs of [a-z0-9], no stemming): each word with the
    index in `text` of each of its characters (lowercasing may turn one character into two)."""
    lowered, origin = [], []  # text.lower() char by char, and the index in `text` of each of its characters
    for j, ch in enumerate(text):
        lowered.append(ch.lower())
        origin += [j] * len(lowered[-1])
    lowered = "".join(lowered)
    return [(m.group(), origin[m.start() : m.end()]) for m in re.finditer(r"[a-z0-9]+", lowered)]


def lcs_row(previous: list[int], word: str, reference: list[str]) -> list[int]:
    """The LCS table's next row: row[j] = LCS(completion words so far + [word], reference[:j])."""
    row = [0]
    for j, ref_word in enumerate(reference, start=1):
        row.append(previous[j - 1] + 1 if word == ref_word else max(previous[j], row[j - 1]))
    return row


@register_component("rouge")
class Rouge(ReferenceComponent):
    """ROUGE F-measure, precision or recall of the completion against its reference (rouge-score; best
    over references). Precision = overlap / completion length, recall = overlap / reference length.
    `level: token` (rougeL): each token earns what it adds to the score, r_t = ROUGE-L(prefix_t) -
    ROUGE-L(prefix_{t-1}), best over the references (a word cut by the prefix counts as the word so far),
    so the rewards sum to the sentence score, a word that extends the LCS earns, and a word that does not
    costs what it lowers the precision by, at the token that wrote it."""

    class Options(CocoEvalOptions):  # eval_as: coco is COCO's ROUGE-L (beta 1.2) whatever rouge_type says
        rouge_type: Literal["rouge1", "rouge2", "rougeL", "rougeLsum"] = "rougeL"
        measure: Literal["fmeasure", "precision", "recall"] = "fmeasure"
        level: Level = "sequence"

        @model_validator(mode="after")
        def token_level_is_rouge_l(self):
            if self.level == "token" and self.rouge_type != "rougeL":
                raise ValueError(
                    "level: token is defined for rouge_type: rougeL (credit by the longest common subsequence)"
                )
            return self

    def __init__(self, options: Options, env: ComponentEnv):
        super().__init__(options, env)
        from rouge_score.rouge_scorer import RougeScorer
        from rouge_score.scoring import fmeasure

        self.scorer = RougeScorer([options.rouge_type])
        self.fmeasure = fmeasure

    def score(self, text: str, reference: str) -> float:
        return getattr(
            self.scorer.score(reference, text)[self.options.rouge_type], self.options.measure
        )  # (target, prediction)

    def measure(self, lcs: int, words: int, ref_words: int) -> float:
        """rouge-score's value for an LCS of `lcs` words between `words` completion and `ref_words` reference words."""
        if not lcs:
            return 0.0
        precision, recall = lcs / words, lcs / ref_words
        return {"precision": precision, "recall": recall, "fmeasure": self.fmeasure(precision, recall)}[
            self.options.measure
        ]

    def prefix_scores(self, words: list[tuple[str, list[int]]], ends: list[int], reference: str) -> list[float]:
        """ROUGE-L of text[:end] for every end in `ends` (ascending), `words` = rouge_words(text): one LCS row
        per completed word, plus one for the part of a word the prefix cuts: O(tokens * reference words)."""
        ref_words = [w for w, _ in rouge_words(reference)]
        rows, scores = [[0] * (len(ref_words) + 1)], []  # rows[i]: the LCS row after the first i words
        for end in ends:
            while len(rows) <= len(words) and words[len(rows) - 1][1][-1] < end:  # words finished by `end`
                rows.append(lcs_row(rows[-1], words[len(rows) - 1][0], ref_words))
            row, count = rows[-1], len(rows) - 1
            if count < len(words) and words[count][1][0] < end:  # the prefix cuts the next word: its part so far
                word, origin = words[count]
                row, count = lcs_row(row, word[: bisect.bisect_left(origin, end)], ref_words), count + 1
            scores.append(self.measure(row[-1], count, len(ref_words)))
        return scores

    def __call__(self, inputs: RewardInputs) -> list:
        rows = []
        for text, spans, ref in zip(inputs.texts, inputs.token_spans, inputs.columns[self.options.column]):
            if self.options.level == "sequence":
                rows.append(max(self.score(text, r) for r in references(ref)))
            else:
                words, ends = rouge_words(text), prefix_ends(spans, len(text))
                rows.append(
                    increments(best_prefix_scores([self.prefix_scores(words, ends, r) for r in references(ref)]))
                )
        return rows


def prefix_words(words: list[tuple[str, list[int]]], ends: list[int]) -> list[list[str]]:
    """The words of text[:end] for every end in `ends` (`words` = rouge_words(text)): those the prefix finishes,
    then the part so far of a word it cuts."""
    prefixes = []
    for end in ends:
        done = [word for word, origin in words if origin[-1] < end]
        cut = [word[: bisect.bisect_left(origin, end)] for word, origin in words if origin[0] < end <= origin[-1]]
        prefixes.append(done + cut)
    return prefixes


@register_component("cider")
class Cider(ReferenceComponent):
    """CIDEr-D (pipeline/rewards/cider.py; 0 to 10) of the completion against all the references of its row, words
    as rouge-score splits them (lowercase runs of [a-z0-9]), document frequencies from the training set's
    references (this `column` of data.train_file), as self-critical sequence training does. `level: token`: r_t =
    CIDEr-D(prefix_t) - CIDEr-D(prefix_{t-1}) (a word cut by the prefix counts as the word so far), so the rewards
    sum to the completion's score and a token's reward never depends on the tokens after it."""

    class Options(CocoEvalOptions):
        level: Level = "sequence"
        eval_as: Literal["mean", "coco"] = "coco"
        """eval/<name>: CIDEr-D over the eval set as pycocoevalcap computes it (coco: document frequencies from
        the eval set's references), or the mean of the per-sample rewards (mean: the training set's)."""

    @classmethod
    def train_columns(cls, options: Options) -> tuple[str, ...]:
        return (options.column,)

    def __init__(self, options: Options, env: ComponentEnv):
        super().__init__(options, env)
        if env is None or env.train_column is None:
            raise RewardError("cider takes its document frequencies from the training set: set data.train_file")
        corpus = env.train_column(options.column)
        self.cider = CiderD([[self.words(r) for r in references(value)] for value in corpus])

    @staticmethod
    def words(text: str) -> list[str]:
        return [word for word, _ in rouge_words(text)]

    def __call__(self, inputs: RewardInputs) -> list:
        rows = []
        for text, spans, ref in zip(inputs.texts, inputs.token_spans, inputs.columns[self.options.column]):
            refs = [self.words(r) for r in references(ref)]
            if self.options.level == "sequence":
                rows.append(self.cider.score(self.words(text), refs))
            else:
                prefixes = prefix_words(rouge_words(text), prefix_ends(spans, len(text)))
                rows.append(increments([self.cider.score(words, refs) for words in prefixes]))
        return rows


class ModelOptions(BaseOptions):
    path: str
    """Local HF model directory."""
    batch_size: int = Field(64, ge=1)
    trust_remote_code: bool = False

    @field_validator("path")
    @classmethod
    def is_model_dir(cls, path: str) -> str:
        check_model_dir(path, key="path")
        return path


def batches(n: int, size: int) -> list[range]:
    return [range(start, min(n, start + size)) for start in range(0, n, size)]


@register_component("classifier")
class Classifier(RewardComponent):
    """Probability (or logit) of `label` under a local HF sequence-classification model. A conversation is
    rendered with the reward model's own chat template (its turns, then the completion as the assistant's
    turn; `text: completion` scores the assistant turn alone) when it has one, else scored as plain text."""

    class Options(ModelOptions):
        label: int | str = 1
        """Label index or name (config.label2id)."""
        output: Literal["probability", "logit"] = "probability"
        text: Literal["completion", "prompt_completion"] = "completion"

    def __init__(self, options: Options, env: ComponentEnv):
        super().__init__(options, env)
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        self.tokenizer = AutoTokenizer.from_pretrained(options.path, trust_remote_code=options.trust_remote_code)
        self.tokenizer.padding_side = (
            "right"  # positions start at 0 for every text; the model pools the last real token
        )
        self.model = AutoModelForSequenceClassification.from_pretrained(
            options.path, trust_remote_code=options.trust_remote_code
        )
        self.model.to(env.device).eval()
        label2id = self.model.config.label2id or {}
        self.label = (
            label2id[options.label] if isinstance(options.label, str) and options.label in label2id else options.label
        )
        if not isinstance(self.label, int) or not 0 <= self.label < self.model.config.num_labels:
            raise RewardError(f"classifier {options.path!r} has no label {options.label!r} (labels: {label2id})")

    def render(self, inputs: RewardInputs, i: int) -> tuple[str, bool]:
        """The text the reward model scores for sample i, and whether it is already templated."""
        both = self.options.text == "prompt_completion"
        if is_conversation(inputs.prompts[i]) and self.tokenizer.chat_template:
            messages = (inputs.prompts[i] if both else []) + inputs.completions[i]
            return self.tokenizer.apply_chat_template(messages, tokenize=False), True
        prompt = inputs.prompt_texts[i] if inputs.prompt_texts else str(inputs.prompts[i])
        return (prompt + inputs.texts[i] if both else inputs.texts[i]), False

    @torch.no_grad()
    def __call__(self, inputs: RewardInputs) -> list[float]:
        rendered = [self.render(inputs, i) for i in range(len(inputs.texts))]
        # a chat template already holds the special tokens: add none a second time
        ids = [self.tokenizer(text, add_special_tokens=not templated).input_ids for text, templated in rendered]
        out = []
        for rows in batches(len(ids), self.options.batch_size):
            encoded = self.tokenizer.pad({"input_ids": [ids[i] for i in rows]}, return_tensors="pt").to(self.env.device)
            logits = self.model(**encoded).logits.float()
            scores = logits.softmax(-1) if self.options.output == "probability" else logits
            out += scores[:, self.label].tolist()
        return out


@register_component("teacher_logprob")
class TeacherLogprob(RewardComponent):
    """Token-level: r_t = log p_teacher(y_t | prefix), or with subtract_policy
    r_t = log p_teacher(y_t | prefix) - log pi_behaviour(y_t | prefix) (per-token reverse-KL distillation).
    The teacher must share the policy's vocabulary."""

    class Options(ModelOptions):
        subtract_policy: bool = False

    def __init__(self, options: Options, env: ComponentEnv):
        super().__init__(options, env)
        teacher_tokenizer = load_tokenizer(options.path, options.trust_remote_code)
        if teacher_tokenizer.get_vocab() != env.tokenizer.get_vocab():
            raise RewardError(
                f"teacher_logprob: the tokenizer in {options.path!r} differs from the policy's; the teacher must "
                "share its vocabulary"
            )
        self.model = load_model(options.path, options.trust_remote_code, env.device).eval()

    @torch.no_grad()
    def __call__(self, inputs: RewardInputs) -> list[list[float]]:
        out = []
        for rows in batches(len(inputs.completion_ids), self.options.batch_size):
            response = [inputs.completion_ids[i] for i in rows]
            sequences = build_sequences(
                [inputs.prompt_ids[i] for i in rows], response, self.env.tokenizer.pad_token_id, self.env.device
            )
            logprobs, _ = response_logprobs(self.model, sequences)
            for k, i in enumerate(rows):
                row = logprobs[k, : len(response[k])].tolist()
                if self.options.subtract_policy:
                    row = [t - b for t, b in zip(row, inputs.behaviour_logprobs[i])]
                out.append(row)
        return out


def import_function(spec: str):
    """`package.module:function` or `path/to/file.py:function` -> the function."""
    module_name, sep, attr = spec.rpartition(":")
    if not sep or not module_name or not attr:
        raise ValueError(f"{spec!r} is not module:function (e.g. my_rewards:format_reward)")
    try:
        if module_name.endswith(".py"):
            file = Path(module_name)
            if not file.is_file():
                raise ValueError(f"file {module_name!r} does not exist")
            module_spec = importlib.util.spec_from_file_location(file.stem, file.resolve())
            module = importlib.util.module_from_spec(module_spec)
            module_spec.loader.exec_module(module)
        else:
            module = importlib.import_module(module_name)
    except ValueError:
        raise
    except Exception as error:  # noqa: BLE001 - importing user code can raise anything
        missing = isinstance(error, ModuleNotFoundError) and f"{module_name}.".startswith(f"{error.name}.")
        where = (
            (
                f" (a module is looked up in the working directory and on PYTHONPATH; or name its file: "
                f"path/to/{module_name.replace('.', '/')}.py:{attr})"
            )
            if missing
            else ""
        )
        raise ValueError(f"cannot import {module_name!r}: {type(error).__name__}: {error}{where}") from None
    function = getattr(module, attr, None)
    if not callable(function):
        raise ValueError(f"{module_name!r} has no function {attr!r}")  # noqa: TRY004 - pydantic reports ValueError
    return function


@register_component("python")
class PythonFunction(RewardComponent):
    """A user function called exactly as TRL calls reward functions:
    f(prompts=, completions=, completion_ids=, trainer_state=, **dataset_columns) on the batch, with
    conversations and their completions as message lists. It returns per sample a float
    (sequence-level), a list of floats (token-level) or None (not applicable: the sample gets nothing
    from it, TRL's rule). `async def` functions are awaited."""

    class Options(BaseOptions):
        function: str
        """`package.module:function` (importable on every node) or `path/to/file.py:function`."""

        @field_validator("function")
        @classmethod
        def imports(cls, spec: str) -> str:
            """The pre-flight check: the function imports (its module's top-level code runs)."""
            import_function(spec)
            return spec

    def __init__(self, options: Options, env: ComponentEnv):
        super().__init__(options, env)
        self.function = import_function(options.function)

    def __call__(self, inputs: RewardInputs) -> list:
        kwargs = dict(
            inputs.columns,
            prompts=inputs.prompts,
            completions=inputs.completions,
            completion_ids=inputs.completion_ids,
            trainer_state=inputs.trainer_state,
        )
        result = self.function(**kwargs)
        if inspect.isawaitable(result):
            result = asyncio.run(result)
        return list(result)
