"""The built-in reward components (see pipeline/rewards.py for the interface and docs/rewards.md).

Rule-based: exact_match, regex_match, length_penalty, digit_match (token-level).
Reference-based (sacrebleu, rouge-score; sentence scores in [0, 1]): bleu, chrf, rouge; chrf and rouge (rougeL)
also as token-level rewards (`level: token`) that sum to the sentence score.
Model-based (local HF models, batched on the worker's device): classifier, teacher_logprob (token-level).
User code: python (`module:function` or `path/to/file.py:function`, sync or async).
"""

from __future__ import annotations

import asyncio
import importlib
import importlib.util
import inspect
import re
import string
from collections import Counter
from pathlib import Path
from typing import Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from pipeline.models import build_sequences, check_model_dir, load_model, load_tokenizer, response_logprobs
from pipeline.prompts import is_conversation
from pipeline.rewards import COMPONENTS, ComponentEnv, RewardComponent, RewardError, RewardInputs, register_component

__all__ = ["COMPONENTS"]  # the registry, with every built-in component registered


class BaseOptions(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)


class ColumnOptions(BaseOptions):
    column: str = "answer"
    """Dataset column holding the reference answer."""


class ReferenceOptions(BaseOptions):
    column: str = "reference"
    """Dataset column holding the reference text (a string or a list of strings)."""


def references(value) -> list[str]:
    return [str(v) for v in value] if isinstance(value, (list, tuple)) else [str(value)]


Level = Literal["sequence", "token"]


def chars_to_tokens(char_credit: list[float], spans: list[tuple[int, int]]) -> list[float]:
    """Per-token reward from per-character credit: a token earns the credit of the characters it covers,
    r_t = sum_{j in [start_t, end_t)} c_j (a token covering no character, e.g. EOS, earns 0)."""
    return [sum(char_credit[start:end]) for start, end in spans]


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

    def sentence_scores(self, text: str, refs: list[str]) -> list[float]:
        return [self.metric.sentence_score(text, [r]).score / 100 for r in refs]

    def __call__(self, inputs: RewardInputs) -> list[float]:
        refs = inputs.columns[self.options.column]
        return [self.metric.sentence_score(c, references(r)).score / 100 for c, r in zip(inputs.texts, refs)]


@register_component("bleu")
class Bleu(SacrebleuComponent):
    """Sentence BLEU (sacrebleu, effective order) / 100."""

    def __init__(self, options: ReferenceOptions, env: ComponentEnv):
        super().__init__(options, env)
        from sacrebleu.metrics import BLEU

        self.metric = BLEU(effective_order=True)


def matched_char_ngrams(text: str, reference: str, max_order: int) -> list[float]:
    """chrF's character n-gram matches placed on the characters of `text`: per character j,
    m_j = sum over orders n (with n-grams on both sides) of the matched n-grams covering j, each / (n * H_n),
    H_n = the number of n-grams of `text`; so sum_j m_j = sum_n M_n / H_n, the sum of chrF's n-gram precisions.
    As in chrF, whitespace is removed first; of the k occurrences of an n-gram that the reference holds
    only c times, the first min(k, c) count as matched (chrF's clipped count)."""
    kept = [j for j, ch in enumerate(text) if not ch.isspace()]  # chrF's n-grams skip whitespace
    letters = "".join(text[j] for j in kept)
    reference = "".join(reference.split())
    credit = [0.0] * len(text)
    for n in range(1, max_order + 1):
        grams = [letters[k : k + n] for k in range(len(letters) - n + 1)]
        available = Counter(reference[k : k + n] for k in range(len(reference) - n + 1))
        if not grams or not available:
            continue  # an order without n-grams on one side is not in chrF's average
        for k, gram in enumerate(grams):
            if available[gram] > 0:
                available[gram] -= 1
                for j in kept[k : k + n]:
                    credit[j] += 1 / (n * len(grams))
    return credit


@register_component("chrf")
class Chrf(SacrebleuComponent):
    """Sentence chrF (sacrebleu; word_order=2 gives chrF++) / 100. `level: token`: the sentence score S
    (best reference) shared out over the response tokens in proportion to the matched character n-grams
    they cover, r_t = S * m_t / sum_t m_t (m from `matched_char_ngrams`), so sum_t r_t = S."""

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
            refs = references(ref)
            scores = self.sentence_scores(text, refs)
            best = max(range(len(refs)), key=scores.__getitem__)
            credit = matched_char_ngrams(text, refs[best], self.metric.char_order)
            total = sum(credit)
            rows.append(chars_to_tokens([scores[best] * c / total if total else 0.0 for c in credit], spans))
        return rows


def rouge_words(text: str) -> list[tuple[str, int, int]]:
    """rouge-score's default tokenisation (lowercase, runs of [a-z0-9], no stemming) with each word's
    [start, end) characters in `text`."""
    lowered, origin = [], []  # text.lower() char by char, and the index in `text` of each of its characters
    for j, ch in enumerate(text):
        lowered.append(ch.lower())
        origin += [j] * len(lowered[-1])
    lowered = "".join(lowered)
    return [(m.group(), origin[m.start()], origin[m.end() - 1] + 1) for m in re.finditer(r"[a-z0-9]+", lowered)]


def lcs_positions(a: list[str], b: list[str]) -> list[int]:
    """Indices into `a` of one longest common subsequence of a and b (dynamic programme, then backtrack)."""
    lengths = [[0] * (len(b) + 1) for _ in range(len(a) + 1)]  # lengths[i][j] = LCS of a[i:] and b[j:]
    for i in range(len(a) - 1, -1, -1):
        for j in range(len(b) - 1, -1, -1):
            lengths[i][j] = lengths[i + 1][j + 1] + 1 if a[i] == b[j] else max(lengths[i + 1][j], lengths[i][j + 1])
    used, i, j = [], 0, 0
    while i < len(a) and j < len(b):
        if a[i] == b[j]:
            used.append(i)
            i, j = i + 1, j + 1
        elif lengths[i + 1][j] >= lengths[i][j + 1]:
            i += 1
        else:
            j += 1
    return used


@register_component("rouge")
class Rouge(ReferenceComponent):
    """ROUGE F-measure, precision or recall of the completion against its reference (rouge-score; best
    over references). Precision = overlap / completion length, recall = overlap / reference length.
    `level: token` (rougeL): with L = the LCS of completion words c and reference words r, ROUGE-L is L * u
    (u = 2 / (|c| + |r|) for the F-measure, 1 / |c| precision, 1 / |r| recall); each completion word in
    the LCS earns u, spread evenly over its characters, so the tokens' rewards sum to the sentence score."""

    class Options(ReferenceOptions):
        rouge_type: Literal["rouge1", "rouge2", "rougeL", "rougeLsum"] = "rougeL"
        measure: Literal["fmeasure", "precision", "recall"] = "fmeasure"
        level: Level = "sequence"

        @model_validator(mode="after")
        def token_level_is_rouge_l(self):
            if self.level == "token" and self.rouge_type != "rougeL":
                raise ValueError("level: token is defined for rouge_type: rougeL (credit by the longest common subsequence)")
            return self

    def __init__(self, options: Options, env: ComponentEnv):
        super().__init__(options, env)
        from rouge_score.rouge_scorer import RougeScorer

        self.scorer = RougeScorer([options.rouge_type])

    def score(self, text: str, reference: str) -> float:
        return getattr(self.scorer.score(reference, text)[self.options.rouge_type], self.options.measure)  # (target, prediction)

    def word_credit(self, text: str, reference: str) -> list[float]:
        """Per character of `text`: u / len(word) on the characters of each LCS word (see the class doc)."""
        words, ref_words = rouge_words(text), [w for w, _, _ in rouge_words(reference)]
        unit = {
            "fmeasure": 2 / (len(words) + len(ref_words)) if words or ref_words else 0.0,
            "precision": 1 / len(words) if words else 0.0,
            "recall": 1 / len(ref_words) if ref_words else 0.0,
        }[self.options.measure]
        credit = [0.0] * len(text)
        for i in lcs_positions([w for w, _, _ in words], ref_words):
            _, start, end = words[i]
            for j in range(start, end):
                credit[j] = unit / (end - start)
        return credit

    def __call__(self, inputs: RewardInputs) -> list:
        rows = []
        for text, spans, ref in zip(inputs.texts, inputs.token_spans, inputs.columns[self.options.column]):
            refs = references(ref)
            scores = [self.score(text, r) for r in refs]
            best = max(range(len(refs)), key=scores.__getitem__)
            rows.append(scores[best] if self.options.level == "sequence" else chars_to_tokens(self.word_credit(text, refs[best]), spans))
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
        self.tokenizer.padding_side = "right"  # positions start at 0 for every text; the model pools the last real token
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
                f"teacher_logprob: the tokenizer in {options.path!r} differs from the policy's; the teacher must share its vocabulary"
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
        raise ValueError(f"cannot import {module_name!r}: {type(error).__name__}: {error}") from None
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
