"""`fra evaluate attributes` and `fra evaluate affect`: attribute recognition and valence / arousal.

    fra evaluate attributes CONFIG [--set key=value ...] [--backbone SOURCE] [--name RUN] [--trust-pickle] [--print-config]
    fra evaluate affect CONFIG [...same options]

CONFIG is a :class:`fra.evaluation.attributes.AttributesConfig` or
:class:`fra.evaluation.affect.AffectConfig` YAML (``pipelines/attributes_synthetic.yaml``,
``pipelines/affect_synthetic.yaml``). Writes ``results.json``, a plot, ``config.yaml`` and
``model.pt`` under ``run.storage_path`` and prints the headline numbers.
"""
from __future__ import annotations

import argparse
import logging

log = logging.getLogger(__name__)

TASKS = {
    "attributes": ("facial attributes (CelebA protocol): MLP head, BCE, mean / per-attribute accuracy",
                   "fra.evaluation.attributes", "AttributesConfig", "evaluate_attributes"),
    "affect": ("valence / arousal regression (AffectNet): CCC, PCC, RMSE, SAGR",
               "fra.evaluation.affect", "AffectConfig", "evaluate_affect"),
}


def add_parsers(tasks) -> None:
    for name, (help_text, *_rest) in TASKS.items():
        p = tasks.add_parser(name, help=help_text)
        p.add_argument("config", help=f"{name} config YAML (pipelines/{name}_*.yaml)")
        p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                       help="override a config value, e.g. --set protocol=linear --set optim.epochs=10")
        p.add_argument("--backbone", default=None, help="backbone source (overrides backbone.source)")
        p.add_argument("--name", default=None, help="run directory name (default: <run.name>-<time>)")
        p.add_argument("--trust-pickle", action="store_true",
                       help="unpickle an MLflow model that has no backbone.pt (runs code from the registry: "
                            "only if you trust every writer to it); sets backbone.trust_pickle")
        p.add_argument("--print-config", action="store_true", help="print the resolved config and exit")


def run(args: argparse.Namespace) -> int:
    import importlib

    import yaml

    from fra.config import check_path_component, load_config, to_dict
    from fra.evaluation.targets import resolve_optim

    _, module_name, config_name, fn_name = TASKS[args.task]
    module = importlib.import_module(module_name)
    if args.name is not None:
        check_path_component("--name", args.name)
    overrides = list(args.overrides) + (["backbone.trust_pickle=true"] if args.trust_pickle else [])
    cfg = load_config(getattr(module, config_name), args.config, overrides)
    if cfg.backbone.trust_pickle:
        log.warning("backbone.trust_pickle is on: an MLflow model without backbone.pt will be unpickled")
    if args.print_config:
        print(yaml.safe_dump({**to_dict(cfg), "resolved_optim": resolve_optim(cfg, module.DEFAULTS)},
                             sort_keys=False), end="")
        return 0
    r = getattr(module, fn_name)(cfg, args.backbone, run_name=args.name)
    unit = "%" if r.metric == "mean_acc" else ""
    print(f"{args.task} {cfg.protocol} on {cfg.data.shards}: {r.metric} last {r.last:.4g}{unit}  "
          f"mean of last {r.summary['last_k']} {r.mean_last_k:.4g}{unit}  "
          f"[best epoch {r.best_epoch} on test: {r.best_on_test:.4g}{unit}]")
    if r.kind == "affect":
        for name in r.names:
            print(f"  {name}: CCC {r.report['ccc'][name]:.4f}  PCC {r.report['pcc'][name]:.4f}  "
                  f"RMSE {r.report['rmse'][name]:.4f}  SAGR {r.report['sagr'][name]:.4f}")
    else:
        print(f"  mean balanced accuracy {r.report['mean_balanced_acc']:.2f}%  "
              f"({len(r.names)} attributes, {r.report['num_samples']} test images)")
    print(f"results: {r.results_path}")
    return 0
