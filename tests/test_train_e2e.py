"""End to end on a real local Ray: train, checkpoints, resume, eval of a checkpoint."""

import json
import time

import pyarrow.parquet as pq
import pytest
import ray
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from pipeline.cli import main
from pipeline.config import load_config
from pipeline.data.inputs import with_builtin_defaults
from pipeline.driver.placement import decide_learner_gpus
from pipeline.driver.trainer import Pipeline, train
from pipeline.errors import TokenforgeError
from pipeline.evaluate import evaluate_checkpoint
from pipeline.models.hf import BUILTIN_MODEL
from pipeline.runtime.threads import torch_threads

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
    # step 0 evaluates the shipped model: the same figure `tokenforge eval` (no Ray) gives for it
    baseline = evaluate_checkpoint(str(BUILTIN_MODEL), overrides=["data.max_eval_samples=200"])
    assert records[0]["eval/exact_match"] == baseline["eval/exact_match"] and 0.3 < baseline["eval/exact_match"] < 0.8
    trained = records[1:]
    for key in (
        "reward/exact_match/mean",
        "reward/digit_match/mean",
        "loss/policy",
        "time/step_s",
        "throughput/tokens_per_s",
        "response/length_mean",
        "time/elapsed_s",
    ):
        assert all(key in r for r in trained), key
    first = sum(r["reward/total/mean"] for r in trained[:10]) / 10
    last = sum(r["reward/total/mean"] for r in trained[-10:]) / 10
    assert last > first, (first, last)
    assert list((short_run / "tensorboard").glob("events.out.tfevents.*"))
    assert load_config(short_run / "config.yaml").model.path.endswith("assets/addition/model")


def test_checkpoints_are_published_hf_models_with_trainer_state_and_old_ones_pruned(short_run):
    steps = sorted(p.name for p in (short_run / "checkpoints").iterdir())
    assert steps == ["step_20", "step_30", "step_40"]  # trainer.keep_checkpoints: the newest 3
    last = short_run / "checkpoints" / "step_40"
    manifest = json.loads((last / "MANIFEST.json").read_text())
    assert manifest["step"] == 40 and set(manifest["files"]) == {p.name for p in last.iterdir()} - {"MANIFEST.json"}
    model = AutoModelForCausalLM.from_pretrained(last)
    assert torch.equal(
        model.state_dict()["lm_head.weight"], load_file(last / "model.safetensors")["transformer.wte.weight"]
    )
    state = json.loads((last / "trainer_state.json").read_text())
    prompts = load_config(short_run / "config.yaml").trainer.prompts_per_step
    assert state["step"] == 40 and state["sampler"]["position"] == (40 * prompts) % 9000


def test_eval_command_on_a_checkpoint(short_run, capsys):
    main(["eval", str(short_run / "checkpoints" / "step_40"), "--json"])
    result = json.loads(capsys.readouterr().out)
    final = read_metrics(short_run)[-1]
    assert result["eval_samples"] == 200  # the run's own config (max_eval_samples) applies
    assert result["eval/exact_match"] == pytest.approx(final["eval/exact_match"])


def test_rerun_into_a_used_output_dir_is_refused(short_run, capsys):
    with pytest.raises(SystemExit):
        main(["train", f"output_dir={short_run}"])
    assert "already holds a run; resume it with --resume" in capsys.readouterr().err


def test_resume_continues_exactly_where_it_stopped(ray_cluster, tmp_path, capsys):
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
    before = (interrupted / "config.yaml").stat().st_mtime_ns
    main(["train", "--resume", str(interrupted)])  # a finished run: says so, starts nothing, rewrites nothing
    assert f"{interrupted} is complete (step 6 of 6)" in capsys.readouterr().out
    assert (interrupted / "config.yaml").stat().st_mtime_ns == before
    final = [load_file(run / "checkpoints" / "step_6" / "model.safetensors") for run in (straight, interrupted)]
    assert all(torch.allclose(final[0][k], final[1][k], atol=1e-5) for k in final[0])


def test_staleness_one_trains_on_the_last_versions_samples_and_checkpoints_the_sampler_of_its_step(
    ray_cluster, tmp_path
):
    """trainer.max_staleness=1: the rollouts of step s+1 are generated while the learner trains on step s, with
    the weights of step s - 1, and the learner reports it, except after a checkpoint (step 3 here): the
    checkpoint's step is a synchronisation point, so step 4 samples with version 3, as a run resumed there
    does; a checkpoint records the sampler as of its own step."""
    out = tmp_path / "stale"
    overrides = [
        *SMALL,
        "trainer.prompts_per_step=16",
        "trainer.total_steps=5",
        "trainer.save_every=3",
        "trainer.eval_every=3",
    ]
    train(
        load_config(
            overrides=[
                *overrides,
                "trainer.max_staleness=1",
                "algorithm.is_cap=2.0",
                "trainer.dump_rollouts_every=1",
                f"output_dir={out}",
            ]
        )
    )
    trained = read_metrics(out)[1:]
    assert [r["policy/staleness_max"] for r in trained] == [0.0, 1.0, 1.0, 0.0, 1.0]
    assert [r["learner/policy_version"] for r in trained] == [1.0, 2.0, 3.0, 4.0, 5.0]
    for step, version in zip(range(1, 6), [0, 0, 1, 3, 3]):  # max(0, s - 2), but none before checkpoint 3 after it
        versions = pq.read_table(out / "rollouts" / f"step_{step}.parquet", columns=["policy_version"]).column(0)
        assert set(versions.to_pylist()) == {version}, step
    assert trained[1]["policy/is_weight/mean"] != 1.0  # the off-policy samples are reweighted
    assert all(0 <= r["time/driver_overhead_frac"] < 1 and r["time/sync_s"] > 0 for r in trained[1:])
    # the next batch's generation during the update: none at the checkpoint's step 3, none after the last
    assert [r.get("time/generate_s", 0) > 0 for r in trained] == [True, True, False, True, False]
    state = json.loads((out / "checkpoints" / "step_3" / "trainer_state.json").read_text())
    assert state["sampler"]["position"] == 3 * 16  # step 4's prompts are drawn after the checkpoint, not before


def test_the_critic_trains_with_staleness_token_rewards_and_kl_in_the_reward_and_resumes(ray_cluster, tmp_path):
    """gae + a critic of its own in the whole pipeline: overlapped steps (values recomputed each step), the token-level
    digit_match reward, a KL penalty in the reward, minibatches; its files are in the checkpoint and a resume
    loads them."""
    out = tmp_path / "critic"
    overrides = [
        *SMALL,
        "trainer.prompts_per_step=16",
        "trainer.save_every=2",
        "algorithm.estimator=gae",
        "algorithm.lam=0.95",
        "algorithm.loss=ppo_clip",
        "algorithm.kl_in_reward_coef=0.05",
        "trainer.max_staleness=1",
        "learner.minibatches=2",
        "critic.pretrain_steps=1",
        f"output_dir={out}",
    ]
    train(load_config(overrides=[*overrides, "trainer.total_steps=2"]))
    assert (out / "checkpoints" / "step_2" / "critic" / "critic_state.pt").is_file()
    main(["train", "--resume", str(out), "trainer.total_steps=4"])
    trained = read_metrics(out)[1:]
    assert [r["step"] for r in trained] == [1, 2, 3, 4]
    assert "loss/policy" not in trained[0] and all("loss/policy" in r for r in trained[1:])  # pretraining: step 1
    assert trained[2]["policy/staleness_max"] == 0.0 and trained[3]["policy/staleness_max"] == 1.0
    for record in trained:
        assert "reward/kl_penalty/mean" in record  # the KL penalty is in the rewards the critic learns
        for key in ("critic/value_loss", "critic/explained_var", "critic/value_mean", "critic/clip_frac"):
            assert key in record and record[key] == record[key], key  # present and not NaN
    assert trained[2]["critic/value_mean"] != 0.0  # the resumed critic is the checkpoint's (a new one starts at 0)


@pytest.mark.parametrize("sync", ["object_store", "collective"])
def test_two_rollout_workers_split_the_step_and_get_the_same_weights(ray_cluster, tmp_path, builtin_model_path, sync):
    """Sharding across 2 rollout workers and one weight sync to both (rollout.weight_sync): after a learner step,
    each worker holds exactly the learner's weights and version, and the two shards make up the planned samples."""

    from pipeline.data.loading import PromptSampler, load_prompts

    config = with_builtin_defaults(
        load_config(
            overrides=[
                "rollout.num_workers=2",
                "rollout.num_cpus_per_worker=0.25",
                "learner.num_cpus=0.25",
                "reward.num_cpus_per_worker=0.25",
                f"rollout.weight_sync={sync}",
            ]
        )
    )
    with Pipeline(decide_learner_gpus(config), run_id=f"two-workers-{sync}") as pipeline:
        prompts = PromptSampler(load_prompts(config.data.train_file, "train"), 10, seed=0).next_batch(first_group_id=0)
        scored, generated = pipeline.generated_and_scored(
            pipeline.submit_generation(prompts, step=1), list(config.reward.weights), 1, timings := {}
        )
        assert generated == scored.num_rows == 10 * config.rollout.group_size and timings["time/rollout_s"] > 0
        assert scored.column("group_id").to_pylist() == [g for g in range(10) for _ in range(config.rollout.group_size)]
        assert scored.column("worker").unique().to_pylist() == [
            f"tokenforge-two-workers-{sync}-rollout-{i}" for i in range(2)
        ]
        pipeline.learner.call_all("train_step", scored, step=1)
        pipeline.sync_weights()  # the workers load version 1 after the call they run (the checks below queue after it)
        assert pipeline.version == 1
        learner_weights = pipeline.learner.call_all("get_weights")[0]

        def worker_state(worker, published):
            shared = None  # object store: are the model's floating weights inside the published object's pages?
            if published[0] is not None:
                data = ray.get(published[0]).data  # mapped at the same address as when the worker loaded it
                start, end = data.ctypes.data, data.ctypes.data + data.nbytes
                shared = all(start <= p.data_ptr() < end for p in worker.model.parameters())
            state = {k: v.clone() for k, v in worker.model.state_dict().items()}
            return worker.policy_version, state, hasattr(worker, "weight_buffer"), shared

        states = pipeline.rollout.get(
            [a.__ray_call__.remote(worker_state, [pipeline.weights]) for a in pipeline.rollout.actors]
        )
        assert len(states) == 2
        for version, weights, broadcast, shared in states:
            assert version == 1 and all(torch.equal(weights[k], v) for k, v in learner_weights.items())
            assert (
                broadcast == (sync == "collective") and (pipeline.weights is None) == broadcast
            )  # not the object store
            assert shared is (None if broadcast else True)  # both workers use the node's one copy, none of their own
        again, _ = pipeline.generated_and_scored(pipeline.submit_generation(prompts, step=2), ["exact_match"], 2, {})
        assert set(again.column("policy_version").to_pylist()) == {1}
        assert 0 < pipeline.load_s < 60  # both workers' receive-and-load time of version 1


def test_an_actor_that_does_not_answer_in_time_stops_the_run_naming_it(ray_cluster, tmp_path):
    config = load_config(
        overrides=["trainer.actor_timeout_s=0.001", f"output_dir={tmp_path / 'out'}", "trainer.total_steps=2"]
    )
    with pytest.raises(
        TokenforgeError, match=r"(rollout|reward|learner) actor gave no answer within 0s \(trainer.actor_timeout_s\)"
    ):
        train(config)
    deadline = time.time() + 30  # and none of its actors is left holding the cluster's CPUs
    while ray.available_resources().get("CPU", 0) < ray.cluster_resources()["CPU"] and time.time() < deadline:
        time.sleep(0.5)
    assert ray.available_resources().get("CPU", 0) == ray.cluster_resources()["CPU"]


def test_train_joins_a_running_cluster_by_ray_address(ray_cluster, tmp_path):
    """`ray.address` (here in a separate process, as a user would run it) joins the session's cluster."""
    import subprocess
    import sys

    out = tmp_path / "joined"
    address = ray_cluster.get_runtime_context().gcs_address
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "pipeline.cli",
            "train",
            f"ray.address={address}",
            f"output_dir={out}",
            "trainer.total_steps=2",
            "trainer.prompts_per_step=8",
            "rollout.group_size=4",
            "data.max_eval_samples=20",
            "learner.num_cpus=0.25",
            "rollout.num_cpus_per_worker=0.25",
            "reward.num_cpus_per_worker=0.25",
        ],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    placement = json.loads((out / "placement.json").read_text())
    assert (
        placement["learner"][0]["node_id"] == ray_cluster.get_runtime_context().get_node_id()
    )  # the session's (only) node


def test_lora_bf16_checkpointed_chat_model_resumes_and_exports(ray_cluster, tmp_path, capsys):
    """The shipped chat model (a Llama with a BPE tokenizer and a chat template) with LoRA adapters, a
    bf16-mixed learner and gradient checkpointing: 2 steps, a resume to 4, and the last checkpoint's merged
    export loads as a plain HF model that differs from the base only where the adapters trained."""
    out, exported = tmp_path / "run", tmp_path / "exported"
    lora = "model.lora={r: 4, alpha: 8, target_modules: [q_proj, v_proj]}"
    common = [
        "task=chat_addition",
        lora,
        "learner.precision=bf16-mixed",
        "learner.gradient_checkpointing=true",
        "learner.lr=1e-2",
        "trainer.prompts_per_step=8",
        "rollout.group_size=4",
        "trainer.eval_every=2",
        "trainer.save_every=2",
        "data.max_eval_samples=16",
        f"output_dir={out}",
    ]
    main(["train", *common, "trainer.total_steps=2"])
    main(["train", "--resume", str(out), "trainer.total_steps=4"])
    assert [r["step"] for r in read_metrics(out)] == [0, 1, 2, 3, 4]
    checkpoint = out / "checkpoints" / "step_4"
    assert (checkpoint / "adapter_config.json").is_file() and not (checkpoint / "model.safetensors").exists()

    main(["export", str(checkpoint), str(exported), "--merge"])
    merged = AutoModelForCausalLM.from_pretrained(exported).state_dict()
    base = AutoModelForCausalLM.from_pretrained(
        with_builtin_defaults(load_config(overrides=["task=chat_addition"])).model.path
    ).state_dict()
    assert merged.keys() == base.keys()
    changed = {k for k in base if not torch.equal(base[k], merged[k])}
    assert changed and all(".q_proj." in k or ".v_proj." in k for k in changed)


def test_each_actors_torch_threads_follow_its_ray_cpus(ray_cluster, builtin_model_path):
    """With num_threads unset, an actor computes with as many torch threads as Ray CPUs it holds (at least 1),
    so that actors overlapping on one node do not oversubscribe its cores; an explicit setting wins."""
    from actors.learner import Learner
    from actors.rollout_worker import RolloutWorker

    def threads(_actor) -> int:
        return torch.get_num_threads()

    assert torch_threads(None) == 1  # in the driver (e.g. `tokenforge eval`'s in-process worker, with Ray up)
    cases = [(Learner, 2, [], 2), (RolloutWorker, 0.5, [], 1), (RolloutWorker, 1, ["rollout.num_threads=2"], 2)]
    for cls, cpus, overrides, expected in cases:
        config = with_builtin_defaults(load_config(overrides=overrides))
        actor = (
            ray.remote(cls)
            .options(num_cpus=cpus)
            .remote(config, builtin_model_path, *([builtin_model_path] if cls is Learner else []))
        )
        assert ray.get(actor.__ray_call__.remote(threads)) == expected, (cls.__name__, cpus)
        ray.kill(actor)
