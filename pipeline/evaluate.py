"""`tokenforge eval`: greedy eval metrics of a checkpoint, in-process (no Ray needed)."""

from __future__ import annotations

from pathlib import Path

import pyarrow.compute as pc

from actors.reward_worker import RewardWorker
from actors.rollout_worker import RolloutWorker
from pipeline.batch import mean_reward
from pipeline.config import load_config
from pipeline.models import check_model_dir
from pipeline.trainer import load_inputs, with_builtin_defaults


def evaluate_checkpoint(path: str, data_file: str | None = None, overrides: list[str] = ()) -> dict[str, float]:
    """eval/<metric> for the model in `path`, on `data_file` or the run's (or built-in) eval set.

    A checkpoint inside a tokenforge run (output_dir/checkpoints/step_N) uses that run's config.
    """
    model_dir = check_model_dir(path)
    run_config = model_dir.parent.parent / "config.yaml"
    config = load_config(run_config if run_config.is_file() else None, overrides)
    config = with_builtin_defaults(config)
    config.model.path = str(model_dir)
    if data_file:
        config.data.eval_file = data_file
    _, eval_prompts = load_inputs(config)
    names = config.trainer.eval_metrics
    rollout = RolloutWorker(str(model_dir), config.rollout, config.seed, config.model.trust_remote_code)
    scorer = RewardWorker(config, str(model_dir), names)
    samples = rollout.generate(eval_prompts, group_size=1, greedy=True)
    result = {"checkpoint": str(Path(path)), "eval_samples": samples.num_rows}
    scored, dropped = scorer.score_all(samples, names)
    scored = scored.filter(pc.invert(dropped))
    result.update({f"eval/{name}": mean_reward(scored, name) for name in names})
    return result
