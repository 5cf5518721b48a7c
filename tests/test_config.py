"""Config loading: YAML + dotted overrides, validation errors naming the key."""

import pytest

from pipeline.config import config_from_yaml, config_to_yaml, describe_fields
from pipeline.errors import ConfigError
from pipeline.preflight import load_config


def test_defaults_and_overrides(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("trainer:\n  total_steps: 7\nreward:\n  weights: {exact_match: 2.0}\n")
    config = load_config(path, ["rollout.group_size=4", "algorithm.is_cap=2.5", "algorithm.whiten=true"])
    assert config.trainer.total_steps == 7
    assert config.reward.weights == {"exact_match": 2.0}
    assert config.rollout.group_size == 4 and config.algorithm.is_cap == 2.5 and config.algorithm.whiten is True
    assert config.model.path is None and config.seed == 0


def test_override_inside_a_mapping_keeps_its_other_entries(tmp_path):
    assert load_config(overrides=["reward.weights.digit_match=1.5"]).reward.weights == {
        "exact_match": 1.0,
        "digit_match": 1.5,
    }
    path = tmp_path / "run.yaml"
    path.write_text("reward:\n  weights: {exact_match: 2.0}\n")  # a file's mapping replaces the default one
    assert load_config(path, ["reward.weights.digit_match=0.1"]).reward.weights == {
        "exact_match": 2.0,
        "digit_match": 0.1,
    }


def test_resolved_config_round_trips(tmp_path):
    config = load_config(overrides=["reward.weights.digit_match=0.25", "seed=3"])
    (tmp_path / "config.yaml").write_text(config_to_yaml(config))
    assert load_config(tmp_path / "config.yaml") == config


@pytest.mark.parametrize(
    "override, message",
    [
        ("trainer.total_step=5", "'trainer.total_step': unknown config key"),
        ("trainer.total_steps=many", "'trainer.total_steps': Input should be a valid integer"),
        ("rollout.num_workers=0", "'rollout.num_workers': Input should be greater than or equal to 1"),
        ("reward.num_workers=0", "'reward.num_workers': Input should be greater than or equal to 1"),
        ("reward.weights.blue=1.0", "'reward.weights': component 'blue' names no component type"),
        ("algorithm.estimator=ppo", "'algorithm.estimator': unknown estimator 'ppo'"),
        ("algorithm.agg=sum", "'algorithm.agg': unknown aggregation 'sum'"),
        ("trainer.eval_metrics=[accuracy]", "'trainer.eval_metrics': component 'accuracy' names no component type"),
        ("reward.weights={}", "'reward.weights': Dictionary should have at least 1 item"),
        ("rollout=3", "'rollout': Input should be a valid dictionary"),
        ("total_steps", "is not key=value"),
        (
            "rollout.resources_per_worker={a:",
            "override 'rollout.resources_per_worker={a:': the value is not valid YAML",
        ),
        # settings that silently learn nothing, or learn off-policy uncorrected
        ("rollout.group_size=1", "'rollout.group_size': 1 with algorithm.estimator='grpo' gives every advantage 0"),
        ("rollout.group_size=1 algorithm.estimator=rloo", "'rollout.group_size': 1 with algorithm.estimator='rloo'"),
        (
            "rollout.group_size=1 algorithm.estimator=reinforce++_baseline",
            "'rollout.group_size': 1 with algorithm.estimator='reinforce++_baseline'",
        ),
        (
            "rollout.group_size=1 algorithm.estimator=reinforce++ reward.components.digit_match.normalize=group",
            "'reward.components.digit_match.normalize': 'group' with rollout.group_size=1",
        ),
        (
            "algorithm.is_cap=null learner.updates_per_batch=2",
            "'learner.updates_per_batch': 2 updates per batch are off-policy",
        ),
        ("algorithm.kl_loss_kind=k1", "'algorithm.kl_loss_kind': k1 in the loss has zero expected gradient"),
        # non-finite numbers, out-of-range betas and resources
        ("learner.lr=.inf", "'learner.lr': Input should be a finite number"),
        ("reward.weights.exact_match=.nan", "'reward.weights.exact_match': Input should be a finite number"),
        ("trainer.actor_timeout_s=.inf", "'trainer.actor_timeout_s': Input should be a finite number"),
        (
            "reward.components.length_penalty.target=.nan reward.weights.length_penalty=1",
            "'reward.components.length_penalty.target': Input should be a finite number",
        ),
        ("learner.adam_betas=[0.9,1.0]", "'learner.adam_betas.1': Input should be less than 1"),
        ("learner.adam_betas=[-0.1,0.9]", "'learner.adam_betas.0': Input should be greater than or equal to 0"),
        (
            "rollout.resources_per_worker.gpu_node=-1",
            "'rollout.resources_per_worker.gpu_node': Input should be greater than or equal to 0",
        ),
        ("learner.resources.x=.inf", "'learner.resources.x': Input should be a finite number"),
        (
            "reward.resources_per_worker.x=-2",
            "'reward.resources_per_worker.x': Input should be greater than or equal to 0",
        ),
        ("learner.max_nonfinite_steps=0", "'learner.max_nonfinite_steps': Input should be greater than or equal to 1"),
        (
            "algorithm.is_cap=null trainer.max_staleness=1",
            "'trainer.max_staleness': 1 trains on samples from weights up to 1 versions old (off-policy); "
            "set algorithm.is_cap",
        ),
        ("trainer.max_staleness=-1", "'trainer.max_staleness': Input should be greater than or equal to 0"),
        ("rollout.weight_sync=nccl", "'rollout.weight_sync': Input should be 'object_store' or 'collective'"),
    ],
)
def test_bad_keys_and_values_name_the_key(override, message):
    with pytest.raises(ConfigError) as error:
        load_config(overrides=override.split(" "))
    assert message in str(error.value)


def test_settings_that_do_learn_are_accepted():
    assert load_config(overrides=["rollout.group_size=1", "algorithm.estimator=reinforce++"]).rollout.group_size == 1
    assert load_config(overrides=["learner.updates_per_batch=2", "algorithm.is_cap=2"]).learner.updates_per_batch == 2
    assert (
        load_config(overrides=["learner.updates_per_batch=2", "algorithm.loss=ppo_clip"]).algorithm.loss == "ppo_clip"
    )
    assert load_config(overrides=["trainer.max_staleness=2", "algorithm.is_cap=2"]).trainer.max_staleness == 2
    assert load_config(overrides=["trainer.max_staleness=1", "algorithm.loss=ppo_clip"]).trainer.max_staleness == 1
    assert load_config().rollout.weight_sync == "object_store"
    # a run's config.yaml written when null meant "pick by backend" still loads (resume, tokenforge eval)
    assert config_from_yaml("rollout:\n  weight_sync: null\n", "config.yaml").rollout.weight_sync == "object_store"
    config = load_config(overrides=["algorithm.kl_coef=0.01"])
    assert (config.algorithm.kl_kind, config.algorithm.kl_loss_kind) == ("k1", "k2")


def test_missing_and_malformed_config_files(tmp_path):
    with pytest.raises(ConfigError, match="config file '.*nope.yaml' does not exist"):
        load_config(tmp_path / "nope.yaml")
    (tmp_path / "list.yaml").write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="must hold a mapping"):
        load_config(tmp_path / "list.yaml")


def test_every_key_is_documented():
    lines = describe_fields()
    assert any(line.startswith("trainer.total_steps = 300  # Number of learner updates.") for line in lines)
    assert all("# None" not in line for line in lines), [line for line in lines if "# None" in line]
    # the keys of a section that is null by default are listed too (setting one turns the section on)
    assert any(line.startswith("critic.lr = 0.001  # The critic's AdamW learning rate") for line in lines)
    assert any(line.startswith("model.lora.r = 8") for line in lines)
