"""`tokenforge` command line: train, eval, tune.

    tokenforge train [-c CONFIG] [key=value ...]      train (default: the built-in addition task)
    tokenforge train --resume OUTPUT_DIR [key=value]  continue a run from its latest checkpoint
    tokenforge eval CHECKPOINT_DIR [--data FILE]      greedy eval metrics of any checkpoint
    tokenforge export CHECKPOINT_DIR OUT [--merge]    a checkpoint as a plain HF model (LoRA merged)
    tokenforge train --help-config                    every config key with its default and meaning
    tokenforge tune SPEC.yaml [key=value ...]         Ray Tune search over whole pipelines
    tokenforge tune --resume EXPERIMENT_DIR           continue an interrupted search
    tokenforge validate-cluster FILE                  Ray schema + security checks of a cluster YAML

Errors in the user's input print one line and exit 2; `--debug` shows the traceback.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from pipeline.errors import TokenforgeError


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="tokenforge", description="Token-level REINFORCE fine-tuning on Ray.")
    commands = parser.add_subparsers(dest="command", required=True)

    train = commands.add_parser("train", help="train a policy (default: built-in addition task)")
    train.add_argument("-c", "--config", help="YAML config file")
    train.add_argument("--resume", metavar="RUN", help="continue the run in RUN (output_dir or storage URI) from its latest checkpoint")
    train.add_argument("--trust-run-config", action="store_true", help="allow the run's config to run remote model code or python rewards")
    train.add_argument("--help-config", action="store_true", help="list every config key and exit")
    train.add_argument("--debug", action="store_true", help="show tracebacks")
    train.add_argument("overrides", nargs="*", metavar="key=value", help="dotted config overrides")

    evaluate = commands.add_parser("eval", help="print greedy eval metrics of a checkpoint")
    evaluate.add_argument("checkpoint", help="a checkpoint (output_dir/checkpoints/step_N), a run (its newest checkpoint) or any HF model dir; local or a URI")
    evaluate.add_argument("--trust-run-config", action="store_true", help="allow the run's config to run remote model code or python rewards")
    evaluate.add_argument("--data", help="eval prompts (.jsonl/.parquet); default: the run's eval file or the built-in one")
    evaluate.add_argument("--debug", action="store_true", help="show tracebacks")
    evaluate.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides (e.g. trainer.eval_metrics=[exact_match])")

    exporting = commands.add_parser("export", help="write a checkpoint as a plain HF model (merging a LoRA adapter)")
    exporting.add_argument("checkpoint", help="checkpoint directory (output_dir/checkpoints/step_N)")
    exporting.add_argument("out", help="directory to write the model and tokenizer to")
    exporting.add_argument("--merge", action="store_true", help="merge a LoRA adapter into its base (else the adapter is written)")
    exporting.add_argument("--debug", action="store_true", help="show tracebacks")

    tuning = commands.add_parser("tune", help="Ray Tune search over whole pipelines (see docs/tuning.md)")
    tuning.add_argument("spec", nargs="?", help="tune spec YAML (base config, search space, tune block)")
    tuning.add_argument("--resume", metavar="EXPERIMENT_DIR", help="continue an interrupted experiment")
    tuning.add_argument("--debug", action="store_true", help="show tracebacks")
    tuning.add_argument("overrides", nargs="*", metavar="key=value", help="dotted spec overrides (e.g. tune.num_samples=4)")

    cluster = commands.add_parser("validate-cluster", help="check a cluster YAML: Ray's schema and tokenforge's security rules")
    cluster.add_argument("file", help="cluster YAML (e.g. cluster.yaml, cluster.local.yaml)")
    cluster.add_argument("--debug", action="store_true", help="show tracebacks")
    return parser


def run_validate_cluster(args: argparse.Namespace) -> None:
    from pipeline.cluster_check import validate_cluster

    for line in validate_cluster(args.file):
        print(f"{args.file}: {line}")


def run_tune(args: argparse.Namespace) -> None:
    from pipeline import tune
    from pipeline.run_paths import resolve_existing

    if bool(args.spec) == bool(args.resume):
        raise TokenforgeError("tune takes a SPEC.yaml or --resume EXPERIMENT_DIR (one of them)")
    if args.resume:
        if args.overrides:
            raise TokenforgeError("--resume continues the experiment as it was; drop the key=value overrides")
        tune.resume(resolve_existing(args.resume))
    else:
        tune.run(args.spec, args.overrides)


def run_train(args: argparse.Namespace) -> None:
    from pipeline.config import describe_fields, load_config
    from pipeline.evaluate import load_run_config
    from pipeline.metrics_log import METRICS_FILE
    from pipeline.run_paths import resolve_existing, resolve_new
    from pipeline.storage import Storage, is_uri
    from pipeline.trainer import train

    if args.help_config:
        print("\n".join(describe_fields()))
        return
    if args.resume:
        if args.config:
            raise TokenforgeError("--resume takes the run's own config.yaml; drop -c")
        location = resolve_existing(args.resume)
        where = [f"storage.uri={location}"] if is_uri(location) else ["storage.uri=null", f"output_dir={location}"]
        run = Storage(location)
        if not run.exists("config.yaml"):
            raise TokenforgeError(f"--resume: {run.display('config.yaml')!r} does not exist; is {args.resume!r} a tokenforge run?")
        config = load_run_config(run, [*args.overrides, *where], args.trust_run_config)
    else:
        config = load_config(args.config, args.overrides)
        config.output_dir = resolve_new(config.output_dir, lambda path: (path / METRICS_FILE).exists(), "output_dir")
    record = train(config, resume=bool(args.resume))
    print(json.dumps({k: v for k, v in record.items() if k.startswith(("step", "eval/", "time/elapsed"))}))


def run_export(args: argparse.Namespace) -> None:
    from pipeline.lora import export, is_adapter_dir
    from pipeline.models import check_model_dir

    if not is_adapter_dir(args.checkpoint):
        check_model_dir(args.checkpoint, key="checkpoint")
    print(f"wrote {export(args.checkpoint, args.out, args.merge)}")


def run_eval(args: argparse.Namespace) -> None:
    from pipeline.evaluate import evaluate_checkpoint

    print(json.dumps(evaluate_checkpoint(args.checkpoint, args.data, args.overrides, args.trust_run_config), indent=1))


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    try:
        commands = {
            "train": run_train,
            "eval": run_eval,
            "export": run_export,
            "tune": run_tune,
            "validate-cluster": run_validate_cluster,
        }
        commands[args.command](args)
    except TokenforgeError as error:
        if args.debug:
            raise
        print(f"tokenforge: error: {error}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
