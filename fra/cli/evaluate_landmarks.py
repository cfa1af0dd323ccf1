"""`fra evaluate landmarks`: face alignment of a backbone under a heat-map head.

    fra evaluate landmarks CONFIG [--set key=value ...] [--backbone SOURCE] [--name RUN] [--trust-pickle] [--print-config]

CONFIG is a :class:`fra.evaluation.landmarks.LandmarkConfig` YAML (``pipelines/landmarks_*.yaml``'s
``landmarks`` section has the same keys). Writes ``results.json``, ``points.png``, ``config.yaml`` and
``model.pt`` under ``run.storage_path`` and prints the headline numbers.
"""
from __future__ import annotations

import argparse
import logging

log = logging.getLogger(__name__)


def add_parser(tasks) -> None:
    p = tasks.add_parser("landmarks", help="face alignment: heat-map head, STAR loss, NME / FR / AUC (WFLW, 300W, AFLW-19)")
    p.add_argument("config", help="landmark config YAML")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config value, e.g. --set model.loss=awing --set optim.epochs=10")
    p.add_argument("--backbone", default=None, help="backbone source (overrides backbone.source)")
    p.add_argument("--name", default=None, help="run directory name (default: <run.name>-<time>)")
    p.add_argument("--trust-pickle", action="store_true",
                   help="unpickle an MLflow model that has no backbone.pt (runs code from the registry: "
                        "only if you trust every writer to it); sets backbone.trust_pickle")
    p.add_argument("--print-config", action="store_true", help="print the resolved config and exit")


def run(args: argparse.Namespace) -> int:
    import yaml

    from fra.config import check_path_component, load_config, to_dict
    from fra.evaluation.landmarks import LandmarkConfig, evaluate_landmarks

    if args.name is not None:
        check_path_component("--name", args.name)
    overrides = list(args.overrides) + (["backbone.trust_pickle=true"] if args.trust_pickle else [])
    cfg = load_config(LandmarkConfig, args.config, overrides)
    if cfg.backbone.trust_pickle:
        log.warning("backbone.trust_pickle is on: an MLflow model without backbone.pt will be unpickled")
    if args.print_config:
        print(yaml.safe_dump(to_dict(cfg), sort_keys=False), end="")
        return 0
    r = evaluate_landmarks(cfg, args.backbone, run_name=args.name)
    print(f"landmarks ({cfg.model.loss}) on {cfg.data.shards}: NME last {r.nme_last:.3f}%  "
          f"mean of last {r.summary['last_k']} {r.nme_mean_last_k:.3f}%  FR {r.fr_last:.2f}%  AUC {r.auc_last:.4f}  "
          f"[best epoch {r.best_epoch} on test: {r.nme_best:.3f}%]")
    for subset, rep in r.subsets.items():
        if subset != "full":
            print(f"  {subset}: NME {rep['nme']:.3f}%  FR {rep['fr']:.2f}%  AUC {rep['auc']:.4f}  ({rep['count']} faces)")
    print(f"results: {r.results_path}")
    return 0
