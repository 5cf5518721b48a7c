"""End to end on a real local Ray: train, checkpoints, resume, eval of a checkpoint."""

import json

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from pipeline.cli import main
from pipeline.config import load_config
from pipeline.trainer import train

SMALL = ["trainer.eval_every=10", "trainer.save_every=10", "data.max_eval_samples=200"]


def read_metrics(out) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def short_run(ray_cluster, tmp_path_factory):
    out = tmp_path_factory.mktemp("short_run")
    config = load_config(overrides=[*SMALL, "trainer.total_steps=40", f"output_dir={out}"])
    train(config)
    return out


def test_short_run_writes_everything_and_reward_rises(short_run):
    records = read_metrics(short_run)
    assert [r["step"] for r in records] == list(range(41))
    assert [r["step"] for r in records if "eval/exact_match" in r] == [0, 10, 20, 30, 40]
    assert all(0.0 <= r["eval/exact_match"] <= 1.0 for r in records if "eval/exact_match" in r)
    trained = records[1:]
    for key in ("reward/exact_match/mean", "reward/digit_match/mean", "loss/policy", "time/step_s", "throughput/tokens_per_s", "response/length_mean", "time/elapsed_s"):
        assert all(key in r for r in trained), key
    first = sum(r["reward/total/mean"] for r in trained[:10]) / 10
    last = sum(r["reward/total/mean"] for r in trained[-10:]) / 10
    assert last > first, (first, last)
    assert list((short_run / "tensorboard").glob("events.out.tfevents.*"))
    assert load_config(short_run / "config.yaml").model.path.endswith("assets/addition/model")


def test_checkpoints_are_hf_models_with_trainer_state(short_run):
    steps = sorted(p.name for p in (short_run / "checkpoints").iterdir())
    assert steps == ["step_10", "step_20", "step_30", "step_40"]
    last = short_run / "checkpoints" / "step_40"
    model = AutoModelForCausalLM.from_pretrained(last)
    assert torch.equal(model.state_dict()["lm_head.weight"], load_file(last / "model.safetensors")["transformer.wte.weight"])
    state = json.loads((last / "trainer_state.json").read_text())
    assert state["step"] == 40 and state["sampler"]["position"] == (40 * 64) % 9000


def test_eval_command_on_a_checkpoint(short_run, capsys):
    main(["eval", str(short_run / "checkpoints" / "step_40")])
    result = json.loads(capsys.readouterr().out)
    final = read_metrics(short_run)[-1]
    assert result["eval_samples"] == 200  # the run's own config (max_eval_samples) applies
    assert result["eval/exact_match"] == pytest.approx(final["eval/exact_match"])


def test_rerun_into_a_used_output_dir_is_refused(short_run, capsys):
    with pytest.raises(SystemExit):
        main(["train", f"output_dir={short_run}"])
    assert "already holds a run; resume it with --resume" in capsys.readouterr().err


def test_resume_continues_exactly_where_it_stopped(ray_cluster, tmp_path):
    straight, interrupted = tmp_path / "straight", tmp_path / "interrupted"
    common = [*SMALL, "trainer.prompts_per_step=16", "trainer.save_every=3", "trainer.eval_every=3"]
    train(load_config(overrides=[*common, "trainer.total_steps=6", f"output_dir={straight}"]))
    train(load_config(overrides=[*common, "trainer.total_steps=3", f"output_dir={interrupted}"]))
    main(["train", "--resume", str(interrupted), "trainer.total_steps=6"])

    resumed = read_metrics(interrupted)
    assert [r["step"] for r in resumed] == list(range(7))
    for a, b in zip(read_metrics(straight)[4:], resumed[4:]):
        assert a["reward/total/mean"] == pytest.approx(b["reward/total/mean"])
        assert a["loss/policy"] == pytest.approx(b["loss/policy"], rel=1e-4, abs=1e-6)
    assert resumed[-1]["learner/policy_version"] == 6.0
    assert resumed[-1]["time/elapsed_s"] >= resumed[3]["time/elapsed_s"]
    final = [load_file(run / "checkpoints" / "step_6" / "model.safetensors") for run in (straight, interrupted)]
    assert all(torch.allclose(final[0][k], final[1][k], atol=1e-5) for k in final[0])
