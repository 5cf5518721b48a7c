"""Bad input: each case is one clear line on stderr and exit code 2, before any Ray work."""

import json
import shutil
import subprocess
import sys

import pytest

from pipeline.cli import main


def run_cli(argv, capsys) -> str:
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and err.startswith("tokenforge: error: "), err
    return err


def jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


@pytest.fixture
def model_copy(tmp_path, builtin_model_path):
    return shutil.copytree(builtin_model_path, tmp_path / "model")


def test_unknown_and_mistyped_keys(capsys, tmp_path):
    assert "'trainer.totl_steps': unknown config key" in run_cli(["train", "trainer.totl_steps=3"], capsys)
    assert "'rollout.group_size': Input should be a valid integer" in run_cli(["train", "rollout.group_size=big"], capsys)


def test_zero_workers(capsys):
    assert "'rollout.num_workers': Input should be greater than or equal to 1" in run_cli(["train", "rollout.num_workers=0"], capsys)
    assert "'reward.num_workers'" in run_cli(["train", "reward.num_workers=0"], capsys)


def test_missing_model_path(capsys, tmp_path):
    err = run_cli(["train", f"model.path={tmp_path / 'missing'}", f"output_dir={tmp_path / 'out'}"], capsys)
    assert "is not a local HF model directory" in err and "missing" in err


def test_dataset_missing_or_without_prompt_or_with_empty_prompt(capsys, tmp_path):
    out = f"output_dir={tmp_path / 'out'}"
    err = run_cli(["train", f"data.train_file={tmp_path / 'nope.jsonl'}", out], capsys)
    assert "data.train_file: file" in err and "does not exist" in err
    no_prompt = jsonl(tmp_path / "q.jsonl", [{"question": "1+1=", "answer": "2"}])
    assert "has no `prompt` field (fields: question, answer)" in run_cli(["train", f"data.train_file={no_prompt}", out], capsys)
    empty = jsonl(tmp_path / "e.jsonl", [{"prompt": "1+1=", "answer": "2"}, {"prompt": " ", "answer": "0"}])
    assert "row 1 has an empty or non-text prompt" in run_cli(["train", f"data.eval_file={empty}", out], capsys)
    no_answer = jsonl(tmp_path / "a.jsonl", [{"prompt": "1+1="}])
    assert "need fields ['answer']" in run_cli(["train", f"data.train_file={no_answer}", out], capsys)


def test_prompt_longer_than_context(capsys, tmp_path):
    long = jsonl(tmp_path / "long.jsonl", [{"prompt": "1+1=", "answer": "2"}, {"prompt": "1" * 30 + "+1=", "answer": "2"}])
    err = run_cli(["train", f"data.train_file={long}", f"output_dir={tmp_path / 'out'}"], capsys)
    assert "prompt 1 has 33 tokens; with rollout.max_new_tokens=8 it exceeds the model context of 32 tokens" in err


@pytest.mark.parametrize("role", ["pad", "eos"])
def test_tokenizer_without_pad_or_eos(capsys, tmp_path, model_copy, role):
    config_file = model_copy / "tokenizer_config.json"
    tokenizer_config = json.loads(config_file.read_text())
    tokenizer_config.pop(f"{role}_token")
    config_file.write_text(json.dumps(tokenizer_config))
    err = run_cli(["train", f"model.path={model_copy}", f"output_dir={tmp_path / 'out'}"], capsys)
    assert f"has no {role} token; set `{role}_token`" in err


def test_resume_without_a_run(capsys, tmp_path):
    assert "config.yaml' does not exist; is" in run_cli(["train", "--resume", str(tmp_path)], capsys)


def test_real_process_prints_no_traceback(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "pipeline.cli", "train", "rollout.num_workers=0"], capture_output=True, text=True, check=False
    )
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    assert result.stderr.strip().startswith("tokenforge: error: config key 'rollout.num_workers'")


def test_resources_the_cluster_can_never_provide_fail_fast(ray_cluster, capsys, tmp_path):
    out = f"output_dir={tmp_path / 'out'}"
    err = run_cli(["train", "learner.num_gpus=8", out], capsys)
    assert "the actors need 8 GPU in total but the Ray cluster has 0" in err
    err = run_cli(["train", "rollout.resources_per_worker={tpu_pod: 1}", out], capsys)
    assert "the actors need 1 tpu_pod in total but the Ray cluster has 0" in err


def test_reward_component_needs_a_column_the_data_lacks(capsys, tmp_path):
    err = run_cli(["train", "reward.weights={chrf: 1.0}", f"output_dir={tmp_path / 'out'}"], capsys)
    assert "data.train_file: the reward components need fields ['reference'], missing from the file" in err
