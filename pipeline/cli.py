"""`tokenforge` command line: train, eval, tune.

    tokenforge train [-c CONFIG] [key=value ...]      train (default: the built-in addition task)
    tokenforge train --resume OUTPUT_DIR [key=value]  continue a run from its latest checkpoint
    tokenforge eval CHECKPOINT_DIR [--data FILE]      greedy eval metrics of any checkpoint
    tokenforge export CHECKPOINT_DIR OUT [--merge]    a checkpoint as a plain HF model (LoRA merged)
    tokenforge train --help-config                    every config key with its default and meaning
    tokenforge tune SPEC.yaml [key=value ...]         Ray Tune search over whole pipelines
    tokenforge tune --resume EXPERIMENT_DIR --trust-run-config
                                                      continue an interrupted search (loads its pickles)
    tokenforge samples RUN [--step N] [--worst K | --best K | --group G] [--eval]
                                                      a run's dumped completions with token-level rewards
    tokenforge report RUN_OR_EXPERIMENT               report.png + report.md: the run's (or every trial's) curves
    tokenforge validate-cluster FILE [-c CONFIG]      Ray schema + security checks of a cluster YAML; the learner fits

Errors in the user's input print one line and exit 2; `--debug` shows the traceback.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from pipeline.errors import TokenforgeError


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="tokenforge", description="Token-level REINFORCE fine-tuning on Ray.")
    commands = parser.add_subparsers(dest="command", required=True)

    train = commands.add_parser("train", help="train a policy (default: built-in addition task)")
    train.add_argument("-c", "--config", help="YAML config file")
    train.add_argument(
        "--resume", metavar="RUN", help="continue the run in RUN (output_dir or storage URI) from its latest checkpoint"
    )
    train.add_argument(
        "--trust-run-config",
        action="store_true",
        help="allow the run's config to run remote model code or python rewards",
    )
    train.add_argument("--help-config", action="store_true", help="list every config key and exit")
    train.add_argument("--debug", action="store_true", help="show tracebacks")
    train.add_argument("overrides", nargs="*", metavar="key=value", help="dotted config overrides")

    evaluate = commands.add_parser("eval", help="print greedy eval metrics of a checkpoint")
    evaluate.add_argument(
        "checkpoint",
        help="a checkpoint (output_dir/checkpoints/step_N), a run (its newest checkpoint) or any HF model dir; "
        "local or a URI",
    )
    evaluate.add_argument(
        "--trust-run-config",
        action="store_true",
        help="allow the run's config to run remote model code or python rewards",
    )
    evaluate.add_argument(
        "--data", help="eval prompts (.jsonl/.parquet); default: the run's eval file or the built-in one"
    )
    evaluate.add_argument("--json", action="store_true", help="print the metrics as one JSON object (for scripts)")
    evaluate.add_argument("--debug", action="store_true", help="show tracebacks")
    evaluate.add_argument(
        "overrides", nargs="*", metavar="key=value", help="config overrides (e.g. trainer.eval_metrics=[exact_match])"
    )

    exporting = commands.add_parser("export", help="write a checkpoint as a plain HF model (merging a LoRA adapter)")
    exporting.add_argument("checkpoint", help="checkpoint directory (output_dir/checkpoints/step_N)")
    exporting.add_argument("out", help="directory to write the model and tokenizer to")
    exporting.add_argument(
        "--merge", action="store_true", help="merge a LoRA adapter into its base (else the adapter is written)"
    )
    exporting.add_argument("--debug", action="store_true", help="show tracebacks")

    tuning = commands.add_parser("tune", help="Ray Tune search over whole pipelines (see docs/tuning.md)")
    tuning.add_argument("spec", nargs="?", help="tune spec YAML (base config, search space, tune block)")
    tuning.add_argument("--resume", metavar="EXPERIMENT_DIR", help="continue an interrupted experiment")
    tuning.add_argument(
        "--trust-run-config",
        action="store_true",
        help="allow --resume to load the experiment's pickled Tune state (it runs code)",
    )
    tuning.add_argument("--debug", action="store_true", help="show tracebacks")
    tuning.add_argument(
        "overrides", nargs="*", metavar="key=value", help="dotted spec overrides (e.g. tune.num_samples=4)"
    )

    samples = commands.add_parser("samples", help="show a run's dumped completions with their token-level rewards")
    samples.add_argument("run", help="the run directory (output_dir) or storage URI")
    samples.add_argument("--step", type=int, help="the dump's step (default: the latest)")
    which = samples.add_mutually_exclusive_group()
    which.add_argument(
        "--worst", type=int, metavar="K", help="the K groups with the lowest mean reward (the default, K=5)"
    )
    which.add_argument("--best", type=int, metavar="K", help="the K groups with the highest mean reward")
    which.add_argument("--group", type=int, metavar="G", help="the samples of group G")
    samples.add_argument("--eval", action="store_true", help="the eval dump's greedy samples instead of the rollouts")
    samples.add_argument("--debug", action="store_true", help="show tracebacks")

    reporting = commands.add_parser(
        "report", help="plot a run's metrics (or a Tune experiment's trials) to report.png and report.md"
    )
    reporting.add_argument(
        "run", help="a run directory (output_dir) or storage URI, or a tokenforge tune experiment directory"
    )
    reporting.add_argument("--debug", action="store_true", help="show tracebacks")

    cluster = commands.add_parser(
        "validate-cluster", help="check a cluster YAML: Ray's schema and tokenforge's security rules"
    )
    cluster.add_argument("file", help="cluster YAML (e.g. cluster.yaml, cluster.local.yaml)")
    cluster.add_argument("--config", "-c", help="a run's config: check that its learner ranks fit a node type")
    cluster.add_argument("--debug", action="store_true", help="show tracebacks")
    cluster.add_argument("overrides", nargs="*", metavar="key=value", help="overrides of --config's keys")
    return parser


def run_validate_cluster(args: argparse.Namespace) -> None:
    from pipeline.cluster_check import validate_cluster
    from pipeline.config import load_config

    run_config = load_config(args.config, args.overrides) if args.config or args.overrides else None
    for line in validate_cluster(args.file, run_config):
        print(f"{args.file}: {line}")


def run_tune(args: argparse.Namespace) -> None:
    from pipeline.run_paths import resolve_existing
    from pipeline.tune import experiment

    if bool(args.spec) == bool(args.resume):
        raise TokenforgeError("tune takes a SPEC.yaml or --resume EXPERIMENT_DIR (one of them)")
    if args.resume:
        if args.overrides:
            raise TokenforgeError("--resume continues the experiment as it was; drop the key=value overrides")
        experiment.resume(resolve_existing(args.resume), args.trust_run_config)
    else:
        experiment.run(args.spec, args.overrides)


def run_train(args: argparse.Namespace) -> None:
    from pipeline.config import describe_fields
    from pipeline.driver.trainer import train
    from pipeline.evaluate import load_run_config
    from pipeline.outputs.metrics_log import METRICS_FILE
    from pipeline.outputs.next_steps import after_train
    from pipeline.preflight import load_config
    from pipeline.run_paths import resolve_existing, resolve_new
    from pipeline.storage import Storage, is_uri

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
            raise TokenforgeError(
                f"--resume: {run.display('config.yaml')!r} does not exist; is {args.resume!r} a tokenforge run?"
            )
        config = load_run_config(run, [*args.overrides, *where], args.trust_run_config)
    else:
        config = load_config(args.config, args.overrides)
        config.output_dir = resolve_new(config.output_dir, lambda path: (path / METRICS_FILE).exists(), "output_dir")
    record = train(config, resume=bool(args.resume))
    print(after_train(Storage(config.run_uri), record), flush=True)


def run_samples(args: argparse.Namespace) -> None:
    from pipeline.outputs.samples_view import show_samples
    from pipeline.run_paths import is_uri, resolve_existing

    for option in ("worst", "best"):
        if getattr(args, option) is not None and getattr(args, option) < 1:
            raise TokenforgeError(f"--{option} takes a number of groups >= 1, got {getattr(args, option)}")
    if not is_uri(args.run) and not Path(resolve_existing(args.run)).is_dir():
        raise TokenforgeError(f"run directory {args.run!r} does not exist; pass a run's output_dir or storage URI")
    show_samples(resolve_existing(args.run), args.step, args.worst, args.best, args.group, args.eval)


def run_report(args: argparse.Namespace) -> None:
    from pipeline.outputs.experiment_files import SPEC_FILE
    from pipeline.outputs.next_steps import after_report
    from pipeline.outputs.report import write_report
    from pipeline.run_paths import is_uri, resolve_existing

    location = resolve_existing(args.run)
    if not is_uri(location) and not Path(location).is_dir():
        raise TokenforgeError(
            f"run directory {args.run!r} does not exist; pass a run's output_dir or storage URI, or a tune experiment"
        )
    target = write_report(location)
    print(after_report(target, target.exists(SPEC_FILE)))


def run_export(args: argparse.Namespace) -> None:
    from pipeline.models.hf import check_model_dir
    from pipeline.models.lora import export, is_adapter_dir
    from pipeline.outputs.next_steps import after_export

    adapter = is_adapter_dir(args.checkpoint)
    if not adapter:
        check_model_dir(args.checkpoint, key="checkpoint")
    print(after_export(args.checkpoint, export(args.checkpoint, args.out, args.merge), adapter, args.merge))


def run_eval(args: argparse.Namespace) -> None:
    from pipeline.evaluate import evaluate_checkpoint
    from pipeline.outputs.next_steps import after_eval

    result = evaluate_checkpoint(args.checkpoint, args.data, args.overrides, args.trust_run_config)
    print(json.dumps(result, indent=1) if args.json else after_eval(result))


def parse(argv: list[str] | None) -> argparse.Namespace:
    """The command line; key=value overrides may also follow options (`eval MODEL --data F key=value`), which
    argparse alone leaves unparsed once an option has ended the positional list."""
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if extra and (not hasattr(args, "overrides") or any(e.startswith("-") or "=" not in e for e in extra)):
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    if extra:
        args.overrides = [*args.overrides, *extra]
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse(argv)
    if os.getcwd() not in sys.path:
        # `function: my_rewards:fn` imports my_rewards.py from the working directory, as `python -m` would (the
        # console script's path lacks it); last, so it shadows no installed package. Ray puts the driver's
        # working directory on its workers' sys.path too, so the actors import the same file.
        sys.path.append(os.getcwd())
    if args.command in ("train", "tune") and "RAY_ADDRESS" not in os.environ:
        # Token auth is tokenforge's default (docs/cluster.md). Saying so before Ray is imported is Ray's supported way
        # to start a local Ray with it without the warning "Token authentication is enabled ... Set
        # RAY_AUTH_MODE=disabled to opt out" opening every run; a RAY_AUTH_MODE the user set wins.
        os.environ.setdefault("RAY_AUTH_MODE", "token")
    try:
        commands = {
            "train": run_train,
            "eval": run_eval,
            "export": run_export,
            "tune": run_tune,
            "samples": run_samples,
            "report": run_report,
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
