"""The `odenet` command: train, describe, evaluate, report."""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Sequence

from odenet import envvars
from odenet.config import ConfigError, RunConfig

EXIT_BAD_INPUT = 2
EXIT_DIVERGED = 3


def format_epoch(m, max_epochs: int) -> str:
    return (f"epoch {m.epoch:>3}/{max_epochs}  train_loss {m.train_loss:.4f}  train_acc {m.train_acc:.4f}  "
            f"val_loss {m.val_loss:.4f}  val_acc {m.val_acc:.4f}  fnfe {m.fnfe:6.1f}  bnfe {m.bnfe:6.1f}  "
            f"time {m.epoch_time_s:7.2f}s")


def cmd_train(args: argparse.Namespace) -> int:
    from odenet.failures import Diverged
    from odenet.run import execute
    from odenet.tracker import MlflowTracker
    from odenet.train import CHECKPOINT_FILE

    config = RunConfig.from_args(args)
    checkpoint_dir = Path(args.checkpoint_dir or Path("runs") / f"{config.model}-{time.strftime('%Y%m%d-%H%M%S')}")
    if (checkpoint_dir / CHECKPOINT_FILE).exists() and not args.resume:
        raise ConfigError([f"--checkpoint-dir {checkpoint_dir} already holds a run: pass --resume to "
                           f"continue it, or choose another folder"])
    if args.resume and not (checkpoint_dir / CHECKPOINT_FILE).exists():
        raise ConfigError([f"--resume: nothing to resume, no {CHECKPOINT_FILE} in {checkpoint_dir.resolve()}; "
                           f"pass the --checkpoint-dir of the run to continue" if args.checkpoint_dir else
                           "--resume needs the --checkpoint-dir of the run to continue (runs/MODEL-TIME)"])
    tracker = MlflowTracker.from_environment(experiment=args.experiment, run_name=args.run_name)
    print(f"run: {config.model} on {config.dataset}, checkpoints in {checkpoint_dir}", flush=True)
    try:
        outcome = execute(config, checkpoint_dir=checkpoint_dir, tracker=tracker,
                          on_epoch=lambda m: print(format_epoch(m, config.max_epochs), flush=True))
    except Diverged as exc:
        print(f"diverged: {exc.cause} at epoch {exc.epoch}"
              + (f", batch {exc.batch}" if exc.batch is not None else "") + f": {exc.detail}", file=sys.stderr)
        tracker.print_where()
        return EXIT_DIVERGED
    print(summary(outcome))
    tracker.print_where()
    return 0


def summary(outcome) -> str:
    from odenet.summary import summarize

    test, fitted = outcome.report, outcome.fitted
    run = summarize([m.as_dict() for m in fitted.history])
    lines = [
        f"best epoch {run['best_epoch']} of {run['epochs']} (val acc {run['best_val_acc']:.4f})"
        + (" (early stopping)" if fitted.stopped_early else ""),
        f"test accuracy {test.accuracy:.4f}  test loss {test.loss:.4f}  test fnfe {test.fnfe:.1f}",
        f"parameters {test.params_total:,} in total, {test.params_outside_head:,} outside the head",
    ]
    if outcome.reevaluation is not None:
        lines.append("solver re-evaluation:")
        lines.append(outcome.reevaluation.to_string(index=False))
    return "\n".join(lines)


def cmd_describe(args: argparse.Namespace) -> int:
    from odenet.models import build, describe

    print(describe(build(RunConfig.from_args(args))))
    return 0


def cmd_evaluate(args: argparse.Namespace) -> int:
    from odenet.run import evaluate_logged_run

    print(evaluate_logged_run(args.run_id, data_dir=args.data_dir, device=args.device,
                              test_subset=args.test_subset))
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    from odenet import progress, report

    progress.say(f"report: fetching the runs of {args.experiment!r} and their per-epoch metrics, then fitting "
                 "the tables, intervals and figures")

    print(report.main(args.experiment, out_dir=args.out))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="odenet", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    # Every command takes it after its name, where a user adds it to the line that misbehaved.
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--verbose", action="store_true",
                        help=f"show MLflow's, alembic's and Ray's INFO logs (or set ${envvars.LOG_LEVEL})")

    train = sub.add_parser("train", parents=[common], help="train one run and log it to MLflow")
    RunConfig.add_arguments(train)
    train.add_argument("--checkpoint-dir", metavar="DIR", help="where checkpoints go (default runs/MODEL-TIME)")
    train.add_argument("--resume", action="store_true", help="continue the run checkpointed in --checkpoint-dir")
    train.add_argument("--experiment", default="odenet", help="MLflow experiment name (default: odenet)")
    train.add_argument("--run-name", help="MLflow run name (default: MLflow picks one)")
    train.set_defaults(func=cmd_train)

    describe = sub.add_parser("describe", parents=[common], help="print a model's layers and parameter counts")
    RunConfig.add_arguments(describe)
    describe.set_defaults(func=cmd_describe)

    evaluate = sub.add_parser("evaluate", parents=[common],
                              help="re-run the test evaluation of a run logged in MLflow")
    evaluate.add_argument("--run-id", required=True, help="MLflow run id")
    evaluate.add_argument("--data-dir", help="data folder (default $ODENET_DATA_DIR)")
    evaluate.add_argument("--test-subset", type=int, help="evaluate on the first N test images")
    evaluate.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    evaluate.set_defaults(func=cmd_evaluate)

    report = sub.add_parser("report", parents=[common],
                            help="an experiment's tables with intervals and verdicts, logged to its parent run")
    report.add_argument("--experiment", required=True, help="MLflow experiment name")
    report.add_argument("--out", metavar="DIR",
                        help="where report.md, the CSV tables and the PNG figures go (default: reports/EXPERIMENT)")
    report.set_defaults(func=cmd_report)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from odenet import progress

    try:
        # Before MLflow or Ray is imported: they read their log levels once, at import.
        progress.quiet_third_party(args.verbose)
        progress.check()
    except ConfigError as exc:
        return bad_input(exc)
    from odenet.data import DataError
    from odenet.tracking import TrackingError

    try:
        return args.func(args)
    except (ConfigError, DataError, TrackingError) as exc:
        return bad_input(exc)


def bad_input(exc: Exception) -> int:
    print(f"error: {exc}", file=sys.stderr)
    return EXIT_BAD_INPUT


if __name__ == "__main__":
    sys.exit(main())
