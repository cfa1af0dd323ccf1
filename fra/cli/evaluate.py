"""`fra evaluate`: downstream evaluation of a backbone.

    fra evaluate fer CONFIG [--set key=value ...] [--backbone SOURCE] [--name RUN] [--trust-pickle] [--print-config]
    fra evaluate attributes|affect CONFIG [...same options]   (fra.cli.evaluate_targets)
    fra evaluate landmarks CONFIG [...same options]   (fra.cli.evaluate_landmarks)

CONFIG is a :class:`fra.evaluation.fer.FERConfig` YAML (e.g. ``pipelines/fer_rafdb_finetune.yaml``);
``--backbone`` overrides ``backbone.source`` (a checkpoint / export path, ``models:/name@alias``,
``runs:/<id>/path``, ``random:resnet18``). ``--trust-pickle`` sets ``backbone.trust_pickle``: an
MLflow model without ``backbone.pt`` is then unpickled instead of refused. Writes ``results.json``,
``confusion.png``, ``config.yaml`` and ``model.pt`` under ``run.storage_path`` and prints the
headline numbers.
"""
from __future__ import annotations

import argparse
import logging

log = logging.getLogger(__name__)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    tasks = parser.add_subparsers(dest="task", metavar="TASK", required=True)
    fer = tasks.add_parser("fer", help="facial expression recognition: fine-tune or linear probe (FRA_SPEC §9)")
    fer.add_argument("config", help="FER config YAML (pipelines/fer_*.yaml)")
    fer.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                     help="override a config value, e.g. --set protocol=linear --set optim.epochs=10")
    fer.add_argument("--backbone", default=None, help="backbone source (overrides backbone.source)")
    fer.add_argument("--name", default=None, help="run directory name (default: <run.name>-<time>)")
    fer.add_argument("--trust-pickle", action="store_true",
                     help="unpickle an MLflow model that has no backbone.pt (runs code from the registry: "
                          "only if you trust every writer to it); sets backbone.trust_pickle")
    fer.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    from fra.cli import evaluate_targets

    evaluate_targets.add_parsers(tasks)
    from fra.cli import evaluate_landmarks

    evaluate_landmarks.add_parser(tasks)


def run(args: argparse.Namespace) -> int:
    if args.task in ("attributes", "affect"):
        from fra.cli import evaluate_targets

        return evaluate_targets.run(args)
    if args.task == "landmarks":
        from fra.cli import evaluate_landmarks

        return evaluate_landmarks.run(args)
    import yaml

    from fra.config import check_path_component, load_config, to_dict
    from fra.evaluation.fer import FERConfig, evaluate_fer, resolve_optim

    if args.name is not None:
        check_path_component("--name", args.name)  # a folder under run.storage_path
    overrides = list(args.overrides) + (["backbone.trust_pickle=true"] if args.trust_pickle else [])
    cfg = load_config(FERConfig, args.config, overrides)
    if cfg.backbone.trust_pickle:
        log.warning("backbone.trust_pickle is on: an MLflow model without backbone.pt will be unpickled")
    if args.print_config:
        print(yaml.safe_dump({**to_dict(cfg), "resolved_optim": resolve_optim(cfg)}, sort_keys=False), end="")
        return 0
    from fra import console

    if console.current() is not None:  # quiet console: Ray's output goes to the run's log file
        console.current().log_to(cfg.run.storage_path, f"evaluate-{cfg.run.name}")
    result = evaluate_fer(cfg, args.backbone, run_name=args.name)
    console.echo(f"FER {cfg.protocol} on {cfg.data.shards}: top-1 last {result.top1_last:.2f}%  "
          f"mean of last {result.summary['last_k']} {result.top1_mean_last5:.2f}%  "
          f"mean-class {result.mean_class_acc:.2f}%  macro-F1 {result.macro_f1:.2f}%  "
          f"[best epoch {result.best_epoch} on test: {result.top1_best:.2f}%]")
    console.echo(f"results: {result.results_path}")
    return 0
