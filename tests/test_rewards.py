"""Reward components on hand-made inputs, the worker's on_error handling and normalisation (no Ray)."""

import math
import re
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from rouge_score.rouge_scorer import RougeScorer
from sacrebleu.metrics import BLEU, CHRF
from transformers import GPT2Config, GPT2ForSequenceClassification

from actors.reward_worker import RewardWorker
from pipeline.algorithm.advantages import EQUAL_RTOL
from pipeline.batch import make_rollout_table, reward_column
from pipeline.errors import ConfigError
from pipeline.models.hf import build_sequences, load_model, load_tokenizer, response_logprobs
from pipeline.preflight import load_config
from pipeline.rewards.components import COMPONENTS, component_options
from pipeline.rewards.base import (
    ComponentEnv,
    RewardComponent,
    RewardError,
    RewardInputs,
    normalize_rewards,
    score_component,
)
from pipeline.models.tiny import make_char_tokenizer

FNS = Path(__file__).parent / "reward_fns.py"


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


def build(type_name: str, env=None, **options) -> RewardComponent:
    cls = COMPONENTS[type_name]
    return cls(cls.Options(**options), env)


def score(type_name: str, batch: RewardInputs, env=None, **options) -> list[list[float]]:
    return score_component(type_name, build(type_name, env, **options), batch)


def totals(rows):
    return [pytest.approx(sum(r)) for r in rows]


def test_exact_match_normalisation_options():
    batch = inputs(["42", " Hello, World ", "1.50", "abc"], {"answer": ["42", "hello world", "1.5", ["x", "abc"]]})
    assert [sum(r) for r in score("exact_match", batch)] == [1, 0, 0, 1]  # a list of references: any may match
    loose = score("exact_match", batch, case_sensitive=False, ignore_punctuation=True, ignore_whitespace=True, numeric=True)
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
    assert [sum(r) for r in score("regex_match", batch, pattern=r"<a>\d</a>", full_match=False, miss=-0.5)] == [1, -0.5, 1]
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
    assert sum(recall[0]) == pytest.approx(rouge.score("the cat sat on the mat", "the mat")["rougeL"].recall) == pytest.approx(2 / 6)
    assert sum(score("rouge", short, measure="precision")[0]) == pytest.approx(1.0)
    assert totals(score("chrf", batch))[1] == 1.0 and 0 < sum(score("bleu", batch)[0]) < 1
    assert sum(score("chrf", inputs(["zzz"], {"reference": ["abc"]}))[0]) == 0.0


def test_classifier_returns_the_probability_of_the_chosen_label(tmp_path):
    tokenizer = make_char_tokenizer("abc")
    torch.manual_seed(0)
    config = GPT2Config(vocab_size=len(tokenizer), n_positions=16, n_embd=8, n_layer=1, n_head=2, num_labels=3)
    config.pad_token_id = config.bos_token_id = config.eos_token_id = tokenizer.pad_token_id
    model = GPT2ForSequenceClassification(config).eval()
    model.save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    batch = inputs(["ab", "cab"])
    with torch.no_grad():
        expected = [model(**tokenizer(t, return_tensors="pt")).logits.softmax(-1)[0, 2].item() for t in ["ab", "cab"]]
        raw = [model(**tokenizer(t, return_tensors="pt")).logits[0, 2].item() for t in ["ab", "cab"]]
    assert totals(score("classifier", batch, ComponentEnv(tokenizer), path=str(tmp_path), label=2)) == expected
    logits = score("classifier", batch, ComponentEnv(tokenizer), path=str(tmp_path), label=2, output="logit")
    assert [sum(r) for r in logits] == [pytest.approx(x, abs=1e-6) for x in raw]  # the raw logit, not a log-softmax
    with pytest.raises(RewardError, match="no label 'positive'"):
        build("classifier", ComponentEnv(tokenizer), path=str(tmp_path), label="positive")


def test_teacher_logprob_is_the_teachers_token_log_probability(builtin_model_path):
    tokenizer = load_tokenizer(builtin_model_path)
    prompt_ids = [tokenizer("12+30=").input_ids, tokenizer("5+5=").input_ids]
    response_ids = [tokenizer("42").input_ids + [tokenizer.eos_token_id], tokenizer("1").input_ids]
    batch = RewardInputs(
        ["12+30=", "5+5="], ["42", "1"], response_ids, [["4", "2", "<eos>"], ["1"]], {}, tokenizer.eos_token,
        prompt_ids=prompt_ids, behaviour_logprobs=[[-1.0, -2.0, -3.0], [-0.5]],
    )
    with torch.no_grad():
        expected, _ = response_logprobs(load_model(builtin_model_path), build_sequences(prompt_ids, response_ids, tokenizer.pad_token_id))
    rows = score("teacher_logprob", batch, ComponentEnv(tokenizer), path=builtin_model_path)
    assert rows[0] == pytest.approx(expected[0].tolist(), abs=1e-5)
    assert rows[1] == pytest.approx(expected[1, :1].tolist(), abs=1e-5)
    distill = score("teacher_logprob", batch, ComponentEnv(tokenizer), path=builtin_model_path, subtract_policy=True)
    assert distill[0] == pytest.approx([t - b for t, b in zip(expected[0].tolist(), [-1.0, -2.0, -3.0])], abs=1e-5)
    other = make_char_tokenizer("xyz")
    with pytest.raises(RewardError, match="differs from the policy's"):
        build("teacher_logprob", ComponentEnv(other), path=builtin_model_path)


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
    with pytest.raises(RewardError, match=r"reward 'short', sample 100 \(prompt 'p0'\): 1 token rewards for 2 response tokens"):
        score_component("short", Short(None, None), batch)
    with pytest.raises(RewardError, match=r"reward 'nan', sample 101 \(prompt 'p1'\): NaN, inf"):
        score_component("nan", Nan(None, None), batch)
    class Huge(RewardComponent):  # finite as a Python float, inf once stored as float32
        def __call__(self, batch):
            return [[0.0, 3.5e38], 1.0]

    with pytest.raises(RewardError, match=r"reward 'huge', sample 100 \(prompt 'p0'\): NaN, inf or a value beyond float32's range"):
        score_component("huge", Huge(None, None), batch)
    with pytest.raises(RewardError, match="returned 1 scores for 2 samples"):
        score_component("few", type("Few", (RewardComponent,), {"__call__": lambda self, b: [1.0]})(None, None), batch)


@pytest.mark.parametrize("bad", ["1.0", True, np.bool_(False), torch.tensor(True), b"1"])
def test_a_reward_that_is_not_a_number_names_component_and_sample(bad):
    """float() would take "1.0", True or a bool tensor silently; each is refused, sequence- and token-level."""
    batch = inputs(["12", "34"])
    for shape in ("sequence", "token"):
        scores = [1.0, bad] if shape == "sequence" else [[0.5, 0.5], [0.5, bad]]
        component = type("Odd", (RewardComponent,), {"__call__": lambda self, b, scores=scores: scores})(None, None)
        with pytest.raises(RewardError, match=r"reward 'odd', sample 101 \(prompt 'p1'\): returned .* a reward is a number"):
            score_component("odd", component, batch)
    numbers = [np.float32(0.25), torch.tensor(0.5)]  # numpy and 0-d tensor numbers are rewards
    plain = type("Num", (RewardComponent,), {"__call__": lambda self, b: numbers})(None, None)
    assert [row[-1] for row in score_component("num", plain, batch)] == [0.25, 0.5]


def rollout_batch(tokenizer, completions: list[str], answers: list[str]) -> pa.Table:
    ids = [tokenizer(c).input_ids + [tokenizer.eos_token_id] for c in completions]
    core = {
        "sample_id": list(range(len(ids))),
        "group_id": [0] * len(ids),
        "prompt_text": ["1+2="] * len(ids),
        "prompt_ids": [tokenizer("1+2=").input_ids] * len(ids),
        "response_ids": ids,
        "behaviour_logprobs": [[-1.0] * len(r) for r in ids],
        "response": completions,
        "finished": [True] * len(ids),
        "policy_version": [0] * len(ids),
        "worker": ["local"] * len(ids),
    }
    return make_rollout_table(core, pa.table({"prompt": ["1+2="] * len(ids), "answer": answers}))


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
        with pytest.raises(RewardError, match=r"reward 'sevens' failed on sample 1 \(prompt '1\+2='\): ValueError: no sevens"):
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
    ragged = normalize_rewards(torch.tensor([[1.0, 1.0, 9.0], [2.0, 0.0, 0.0]]), torch.tensor([[1.0, 1.0, 0.0], [1.0, 0.0, 0.0]]), torch.tensor([0, 0]), "batch")
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


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["reward.weights.blue=1.0"], "'reward.weights': component 'blue' names no component type"),
        (["trainer.eval_metrics=[blue]"], "'trainer.eval_metrics': component 'blue' names no component type"),
        (["reward.components.fmt={type: regex_match, pattern: x}"], "'reward.components.fmt': configured but unused; give it a weight"),
        (["reward.components.fmt={type: regx}", "reward.weights.fmt=1"], "unknown reward.components.fmt.type 'regx'"),
        (["reward.components.fmt={type: fmt}", "reward.weights.fmt=1"], "component 'fmt' names no component type"),
        (["reward.components.fmt={type: regex_match}", "reward.weights.fmt=1"], "'reward.components.fmt.pattern': Field required"),
        (["reward.components.fmt={type: regex_match, pattern: '('}", "reward.weights.fmt=1"], "'reward.components.fmt.pattern': not a valid regular expression"),
        (["reward.components.exact_match={tolerance: 1}"], "'reward.components.exact_match.tolerance': unknown option of component type 'exact_match'"),
        (["reward.components.fn={type: python, function: no_such_module:f}", "reward.weights.fn=1"], "cannot import 'no_such_module': ModuleNotFoundError: No module named 'no_such_module' (a module is looked up in the working directory and on PYTHONPATH; or name its file: path/to/no_such_module.py:f)"),
        ([f"reward.components.fn={{type: python, function: '{FNS}:nope'}}", "reward.weights.fn=1"], "has no function 'nope'"),
        (["reward.components.fn={type: python, function: justaname}", "reward.weights.fn=1"], "is not module:function"),
        (["reward.components.t={type: teacher_logprob, path: /no/such/dir}", "reward.weights.t=1"], "'reward.components.t': path '/no/such/dir' is not a local HF model directory"),
        (["reward.components.exact_match={on_error: ignore}"], "'reward.components.exact_match.on_error'"),
    ],
)
def test_reward_config_errors_name_the_key(overrides, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        load_config(overrides=overrides)


def test_components_resolve_to_explicit_specs():
    config = load_config(overrides=["reward.components.fmt={type: regex_match, pattern: '\\d+', normalize: group}", "reward.weights.fmt=0.2"])
    assert set(config.reward.components) == {"fmt", "exact_match", "digit_match"}
    assert config.reward.components["exact_match"].type == "exact_match"
    assert component_options(config, "fmt").pattern == "\\d+"
    assert config.reward.components["fmt"].normalize == "group"


TRL_FNS = Path(__file__).parent / "trl_reward_fns.py"


def hand_batch(tokenizer, prompts: list, responses: list[str], **columns) -> pa.Table:
    """A rollout batch of given responses (char model: one token per character, then EOS)."""
    ids = [tokenizer(r, add_special_tokens=False).input_ids + [tokenizer.eos_token_id] for r in responses]
    core = {
        "sample_id": list(range(len(ids))),
        "group_id": list(range(len(ids))),
        "prompt_text": [str(p) for p in prompts],
        "prompt_ids": [[3]] * len(ids),
        "response_ids": ids,
        "behaviour_logprobs": [[-1.0] * len(r) for r in ids],
        "response": responses,
        "finished": [True] * len(ids),
        "policy_version": [0] * len(ids),
        "worker": ["local"] * len(ids),
    }
    return make_rollout_table(core, pa.Table.from_pylist([{"prompt": p, **{k: v[i] for k, v in columns.items()}} for i, p in enumerate(prompts)]))


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
    config = load_config(overrides=[f"reward.components.math_only={{type: python, function: '{TRL_FNS}:math_only'}}",
                                     "reward.weights={math_only: 1.0}", "algorithm.estimator=reinforce"])
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

    (tmp_path / "my_rewards.py").write_text("def my_reward(completions, **columns):\n    return [float(len(c)) for c in completions]\n")
    command = [str(Path(sys.executable).parent / "tokenforge"), "train", "trainer.total_steps=1", "trainer.prompts_per_step=4",
               "rollout.group_size=2", "data.max_eval_samples=4", "reward.components.mine={type: python, function: 'my_rewards:my_reward'}",
               "reward.weights.mine=0.1", f"output_dir={tmp_path / 'out'}"]
    env = {**os.environ, "RAY_ADDRESS": ray_cluster.get_runtime_context().gcs_address}
    result = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600, check=False)
    assert result.returncode == 0, result.stderr[-2000:]
    last = json.loads((tmp_path / "out" / "metrics.jsonl").read_text().splitlines()[-1])
    assert last["step"] == 1 and last["reward/mine/mean"] > 0
