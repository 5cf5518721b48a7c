"""`tokenforge eval`: greedy eval metrics of a checkpoint, in-process (no Ray needed)."""

from __future__ import annotations

import tempfile
from pathlib import Path

import pyarrow.compute as pc

from actors.reward_worker import RewardWorker
from actors.rollout_worker import RolloutWorker
from pipeline.batch import mean_reward
from pipeline.config import load_config
from pipeline.errors import TokenforgeError
from pipeline.lora import export, is_adapter_dir
from pipeline.models import check_model_dir
from pipeline.trainer import load_inputs, with_builtin_defaults


def evaluate_checkpoint(path: str, data_file: str | None = None, overrides: list[str] = ()) -> dict[str, float]:
    """eval/<metric> for the model in `path`, on `data_file` or the run's (or built-in) eval set.

    A checkpoint inside a tokenforge run (output_dir/checkpoints/step_N) uses that run's config; a
    LoRA checkpoint is evaluated with its adapter merged into the base model.
    """
    checkpoint = Path(path)
    if not is_adapter_dir(checkpoint):
        check_model_dir(checkpoint)
    run_config = checkpoint.parent.parent / "config.yaml"
    config = with_builtin_defaults(load_config(run_config if run_config.is_file() else None, overrides))
    if data_file:
        config.data.eval_file = data_file
    if config.data.eval_file is None:
        raise TokenforgeError("the run has no eval set (data.eval_file is null); pass one with --data")
    with tempfile.TemporaryDirectory(prefix="tokenforge-eval-") as merged:
        model_dir = export(checkpoint, merged, merge=True) if is_adapter_dir(checkpoint) else checkpoint
        config.model.path = str(model_dir)
        _, eval_prompts = load_inputs(config)
        names = config.trainer.eval_metrics
        rollout = RolloutWorker(config, str(model_dir))
        scorer = RewardWorker(config, str(model_dir), names)
        samples = rollout.generate(eval_prompts, group_size=1, greedy=True)
    result = {"checkpoint": str(checkpoint), "eval_samples": samples.num_rows}
    scored, dropped = scorer.score_all(samples, names)
    scored = scored.filter(pc.invert(dropped))
    result.update({f"eval/{name}": mean_reward(scored, name) for name in names})
    return result
