"""The sort task and its model kind (issue 30's third panel pair): a GPT-NeoX with a SentencePiece-style Unigram
tokenizer, made by `scripts/make_task_model.py --task sort --out DIR` (not shipped; here untrained). No Ray."""

import importlib.util
import json
import sys
from pathlib import Path

import pyarrow as pa
import pytest
import torch
from builders import rollout_table
from transformers import AutoModelForCausalLM, GPTNeoXForCausalLM

from actors.reward_worker import RewardWorker
from actors.rollout_worker import RolloutWorker
from pipeline.config import load_config
from pipeline.data.prompts import encode_prompts
from pipeline.models.hf import ASSETS, load_tokenizer

SCRIPTS = Path(__file__).parent.parent / "scripts"
SORT = ASSETS / "sort"


def script(name: str):
    """A module of scripts/ (not a package), imported from its file; its main() is not run."""
    spec = importlib.util.spec_from_file_location(name, SCRIPTS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look their module up while the class is made
    spec.loader.exec_module(module)
    return module


make_task_data, make_task_model = script("make_task_data"), script("make_task_model")
TASK = make_task_model.TASKS["sort"]


def read_jsonl(name: str) -> list[dict]:
    return [json.loads(line) for line in (SORT / name).read_text().splitlines()]


@pytest.fixture(scope="module")
def rows() -> list[dict]:
    return read_jsonl("eval.jsonl") + read_jsonl("train.jsonl")


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, rows) -> Path:
    """The task's tokenizer (trained on the shipped training prompts, as the script does) and an untrained model,
    saved as the script saves them."""
    path = tmp_path_factory.mktemp("sort_model")
    torch.manual_seed(0)
    tokenizer = TASK.make_tokenizer(read_jsonl("train.jsonl"))
    TASK.make_model(tokenizer).save_pretrained(path)
    make_task_model.save_tokenizer(TASK, tokenizer, path)
    return path


def test_sort_data_is_the_generators_and_answers_are_the_prompts_letters_in_order(rows):
    generated, eval_size = make_task_data.sort_rows()
    assert rows == generated and eval_size == len(read_jsonl("eval.jsonl")) == 500
    for row in rows:
        letters = row["prompt"].removesuffix("=")
        assert 4 <= len(letters) <= 8 and letters.isalpha() and letters.islower()
        assert row["answer"] == "".join(sorted(letters))
    assert sum((SORT / name).stat().st_size for name in ("train.jsonl", "eval.jsonl")) < 300_000


def test_the_unigram_tokenizer_round_trips_the_tasks_text_in_pieces_of_several_letters(model_dir, rows):
    tokenizer = load_tokenizer(model_dir)  # as tokenforge loads it
    assert json.loads((model_dir / "tokenizer.json").read_text())["model"]["type"] == "Unigram"
    lengths = []
    for text in [r["prompt"] for r in rows] + [r["answer"] for r in rows]:
        ids = tokenizer(text, add_special_tokens=False).input_ids
        assert tokenizer.unk_token_id not in ids and tokenizer.decode(ids) == text
        lengths.append(len(ids))
    answer_lengths = lengths[len(rows) :]
    # answers of 4-8 letters in 2-6 tokens (several letters per token), EOS still within max_new_tokens
    assert min(answer_lengths) == 2 and max(answer_lengths) + 1 <= TASK.max_new_tokens
    assert sum(answer_lengths) < 0.7 * sum(len(r["answer"]) for r in rows)


def test_the_tokenizer_is_the_same_every_time_it_is_made_from_the_same_prompts():
    train = read_jsonl("train.jsonl")
    assert len({TASK.make_tokenizer(train).backend_tokenizer.to_str() for _ in range(3)}) == 1


def test_the_tokenizer_adds_bos_once_and_defines_eos_and_pad_as_the_rollout_worker_needs(model_dir):
    tokenizer = load_tokenizer(model_dir)
    special = (tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id)
    assert None not in special and len(set(special)) == 3 and tokenizer.padding_side == "left"
    _, [ids] = encode_prompts(tokenizer, ["dbca="])  # a text prompt, as the rollout worker tokenises it
    assert ids[0] == tokenizer.bos_token_id and ids[1:] == tokenizer("dbca=", add_special_tokens=False).input_ids
    config = json.loads((model_dir / "tokenizer_config.json").read_text())
    assert config["tokenizer_class"] == "PreTrainedTokenizerFast"  # a name transformers 4.x (vLLM) knows too


def test_the_model_is_a_small_gpt_neox_with_the_tokenizers_special_tokens(model_dir):
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    tokenizer = load_tokenizer(model_dir)
    assert type(model) is GPTNeoXForCausalLM
    assert model.config.use_parallel_residual and not model.config.tie_word_embeddings
    assert 0.5e6 < sum(p.numel() for p in model.parameters()) < 2e6
    assert (model.config.eos_token_id, model.config.pad_token_id) == (tokenizer.eos_token_id, tokenizer.pad_token_id)


def test_rollouts_stop_at_the_tokenizers_eos(model_dir, tmp_path):
    """A model made to put EOS first greedily: every response is that one token, finished (not 8 tokens cut)."""
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    eos = load_tokenizer(model_dir).eos_token_id
    with torch.no_grad():  # the final LayerNorm outputs its bias e_0 whatever the input; only EOS reads e_0
        model.gpt_neox.final_layer_norm.weight.zero_()
        model.gpt_neox.final_layer_norm.bias.zero_()[0] = 1.0
        model.get_output_embeddings().weight.zero_()[eos, 0] = 10.0
    model.save_pretrained(tmp_path)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (tmp_path / name).write_bytes((model_dir / name).read_bytes())
    worker = RolloutWorker(load_config(overrides=[f"rollout.max_new_tokens={TASK.max_new_tokens}"]), str(tmp_path))
    batch = worker.generate(pa.table({"prompt": ["dbca=", "qzpa="], "group_id": [0, 1]}), group_size=1, greedy=True)
    assert batch.column("response_ids").to_pylist() == [[eos], [eos]]
    assert batch.column("finished").to_pylist() == [True, True] and batch.column("response").to_pylist() == ["", ""]


def test_exact_and_digit_match_score_multi_letter_unigram_tokens(model_dir):
    """The answer abcdz as "▁abc" "d" "z" EOS: exact match 1 (on EOS); digit_match credits each token its letters in
    place (3/6, 1/6, 1/6) and EOS 1/6; a response missing "d" gets credit for "▁abc" only."""
    tokenizer = load_tokenizer(model_dir)
    token = tokenizer.convert_tokens_to_ids
    right = [token("▁abc"), token("d"), token("z"), tokenizer.eos_token_id]
    wrong = [token("▁abc"), token("z"), tokenizer.eos_token_id]
    assert tokenizer.unk_token_id not in right + wrong and tokenizer.decode(right, skip_special_tokens=True) == "abcdz"
    config = load_config(overrides=[f"model.path={model_dir}", "reward.weights={exact_match: 1.0, digit_match: 0.5}"])
    worker = RewardWorker(config, str(model_dir), ["exact_match", "digit_match"])
    texts, ids = encode_prompts(tokenizer, ["zdcab="])
    batch = rollout_table(
        ids * 2,
        [right, wrong],
        tokenizer.batch_decode([right, wrong], skip_special_tokens=True),
        pa.Table.from_pylist([{"prompt": "zdcab=", "answer": "abcdz"}] * 2),
        prompt_texts=texts * 2,
    )
    assert worker.score(batch, "exact_match").rows == [[0.0, 0.0, 0.0, 1.0], [0.0, 0.0, 0.0]]  # on the last token
    assert worker.score(batch, "digit_match").rows == [
        [pytest.approx(3 / 6), pytest.approx(1 / 6), pytest.approx(1 / 6), pytest.approx(1 / 6)],
        [pytest.approx(3 / 6), 0.0, 0.0],
    ]
