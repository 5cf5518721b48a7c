"""`tokenforge eval`: greedy eval metrics of a checkpoint, in-process (no Ray needed).

The target may be a local HF model directory, a checkpoint (output_dir/checkpoints/step_N, local or
at a storage URI) or a whole run (its newest published checkpoint). A checkpoint of a run is
evaluated with the run's config; code that config would run (remote model code, python reward
functions) needs `--trust-run-config`.
"""

from __future__ import annotations

import re
import tempfile
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc

from actors.reward_worker import RewardWorker
from actors.rollout_worker import rollout_worker_class
from pipeline import storage as store
from pipeline.batch import DATASET_PROMPT, is_conversation
from pipeline.config import TrainConfig, code_it_would_run, config_from_yaml, parse_override
from pipeline.data.inputs import load_inputs, with_builtin_defaults
from pipeline.data.prompts import set_chat_template
from pipeline.errors import TokenforgeError
from pipeline.models.hf import builtin_paths, load_tokenizer
from pipeline.models.lora import export, is_adapter_dir
from pipeline.preflight import check
from pipeline.rewards.coco import eval_scores
from pipeline.storage import Storage

RUN_CONFIG = "config.yaml"


def load_run_config(run: Storage | None, overrides: list[str], trust_run_config: bool) -> TrainConfig:
    """The run's config (or the defaults) with `overrides`, refusing code the run's file would run unless trusted."""
    if run is None or not run.exists(RUN_CONFIG):
        return check(config_from_yaml("{}", "", overrides))
    text = run.read_text(RUN_CONFIG)
    # decided before anything the file names is imported: its pre-flight (check) imports the python reward functions
    untrusted = code_it_would_run(config_from_yaml(text, run.display(RUN_CONFIG)))
    chosen = {parse_override(override)[0] for override in overrides}  # what the user sets is not the file's
    untrusted = [setting for setting in untrusted if setting.split()[0] not in chosen]
    if untrusted and not trust_run_config:
        raise TokenforgeError(
            f"{run.display(RUN_CONFIG)} enables {', '.join(untrusted)}: that code would run with your privileges; "
            "pass --trust-run-config if you trust this run directory"
        )
    return check(config_from_yaml(text, run.display(RUN_CONFIG), overrides))


def locate(path: str) -> tuple[Storage | None, Storage | None, str | None]:
    """(the run, the storage holding the checkpoint or None for a plain local model dir, the checkpoint's
    directory in it: None for a run without a published checkpoint) for a model dir, a checkpoint or a
    run, local or at a URI."""
    local = not store.is_uri(path)
    if local and ((Path(path) / "config.json").is_file() or is_adapter_dir(path)):  # a model or checkpoint dir
        parent = Path(path).resolve().parent.parent
        if not (parent / RUN_CONFIG).is_file():
            return None, None, path
        if not (Path(path) / store.MANIFEST).is_file():
            raise TokenforgeError(
                f"{path!r} is not a published checkpoint of its run (no {store.MANIFEST}: a save cut short)"
            )
        return Storage(str(parent)), None, path
    location = Storage(path)
    if location.exists(store.MANIFEST):  # a checkpoint at a URI: .../checkpoints/step_N
        run_uri = re.sub(r"/checkpoints/step_\d+/?(\?|$)", r"\1", location.uri)
        return Storage(run_uri), location, ""
    if location.exists(RUN_CONFIG):  # a run: its newest published checkpoint
        latest = store.latest_checkpoint(location)
        return location, location, latest[0] if latest else None
    raise TokenforgeError(
        f"{path!r} is neither a model directory, a checkpoint (checkpoints/step_N) nor a run directory (config.yaml)"
    )


def check_default_data_fits(config: TrainConfig, model: str, eval_prompts: pa.Table) -> None:
    """A plain model directory evaluated without --data or data.eval_file gets task=`config.task`'s eval set:
    refuse it where the model cannot be meant for it (a chat model, one with a chat template, on plain-text prompts)."""
    tokenizer = load_tokenizer(config.model.path, config.model.trust_remote_code)
    set_chat_template(tokenizer, config.model.chat_template)
    if tokenizer.chat_template and not is_conversation(eval_prompts.column(DATASET_PROMPT)[0].as_py()):
        raise TokenforgeError(
            f"{model!r} is a chat model (its tokenizer has a chat template) but the default eval set "
            f"{config.data.eval_file!r} (task={config.task}) holds plain-text prompts; pass --data FILE with "
            "conversation prompts, or task=NAME for a built-in task it was made for (e.g. task=chat_addition)"
        )


def evaluate_checkpoint(
    path: str, data_file: str | None = None, overrides: list[str] = (), trust_run_config: bool = False
) -> dict[str, float]:
    """eval/<metric> for the model at `path`, on `data_file` or the run's (or built-in) eval set."""
    run, holder, directory = locate(path)
    config = with_builtin_defaults(load_run_config(run, overrides, trust_run_config))
    if directory is None:
        steps = store.checkpoint_steps(run)
        raise TokenforgeError(
            f"{run.display()!r} is a run without a published checkpoint"
            + (f" (unpublished: {', '.join(f'step_{s}' for s in steps)})" if steps else "")
        )
    if data_file:
        config.data.eval_file = data_file
    if config.data.eval_file is None:
        raise TokenforgeError("the run has no eval set (data.eval_file is null); pass one with --data")
    if run is None:  # a model without a run has no training set: statistics of the data (cider's) are the eval set's
        config.data.train_file, config.data.train_split = config.data.eval_file, config.data.eval_split
    with tempfile.TemporaryDirectory(prefix="tokenforge-eval-") as scratch:
        if holder is None:
            checkpoint = Path(directory)
        else:
            manifest = store.read_manifest(holder, directory)
            if manifest is None:
                raise TokenforgeError(
                    f"{holder.display(directory)!r} is not a published checkpoint (no valid manifest)"
                )
            checkpoint = holder.download_dir(directory, Path(scratch) / "checkpoint", manifest)
        model_dir = (
            export(checkpoint, Path(scratch) / "merged", merge=True) if is_adapter_dir(checkpoint) else checkpoint
        )
        config.model.path = str(model_dir)
        _, eval_prompts = load_inputs(config, components=config.trainer.eval_metrics)  # the rewards are not scored
        if run is None and not data_file and config.data.eval_file == str(builtin_paths(config.task)[2]):
            check_default_data_fits(config, path, eval_prompts)
        names = config.trainer.eval_metrics
        rollout = rollout_worker_class(config.rollout.backend)(config, str(model_dir))
        scorer = RewardWorker(config, str(model_dir), names)
        samples = rollout.generate(eval_prompts, group_size=1, greedy=True)
        if hasattr(rollout, "close"):  # rollout.backend=vllm: the engine and its process-wide state go now
            rollout.close()
    result = {
        "checkpoint": holder.display(directory) if holder else str(directory),
        "run": run.display() if run else None,
        "data": config.data.eval_file,
        "eval_samples": samples.num_rows,
    }
    scored, dropped = scorer.score_all(samples, names)
    scored = scored.filter(pc.invert(dropped))
    result.update(eval_scores(config, scored, names))
    return result
