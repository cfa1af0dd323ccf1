"""`fra pretrain CONFIG [--set key=value ...] [--name NAME] [--plain]`.

CONFIG is a PretrainConfig YAML or a pipeline YAML whose ``pretrain:`` section is one.
Overrides are relative to the PretrainConfig (``--set optim.epochs=2``; a leading
``pretrain.`` is accepted too). Re-running with the same name continues the run.
"""
from __future__ import annotations

import argparse
import logging

from fra.config import PretrainConfig, apply_overrides, from_dict, load_yaml
from fra.errors import ConfigError

log = logging.getLogger(__name__)

def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("config", metavar="CONFIG", help="pretrain or pipeline YAML (pipelines/*.yaml)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config value, e.g. --set optim.epochs=2 (repeatable)")
    parser.add_argument("--name", help="run name (run.name); the same name resumes that run")
    parser.add_argument("--plain", action="store_true",
                        help="single process, no Ray (fra.train.plain; data.source must be synthetic)")


def load_pretrain_config(path: str, overrides: list[str] = (), name: str | None = None) -> PretrainConfig:
    """PretrainConfig from either YAML shape, with overrides applied and validated."""
    raw = load_yaml(path)
    if "pretrain" in raw:  # a pipeline YAML (PretrainConfig has no such key)
        raw = raw["pretrain"]
        if not isinstance(raw, dict):
            raise ConfigError(f"{path}: the 'pretrain' section must be a mapping")
    overrides = [o.removeprefix("pretrain.") for o in overrides]
    if name:
        overrides.append(f"run.name={name}")
    return from_dict(PretrainConfig, apply_overrides(raw, overrides))


def run(args: argparse.Namespace) -> int:
    from fra import console

    cfg = load_pretrain_config(args.config, args.overrides, args.name)
    if args.plain:  # one process, no Ray: its log lines stay on the console
        from fra.train.plain import pretrain_plain

        result = pretrain_plain(cfg)
        console.echo(f"checkpoint: {result.checkpoint}\nbackbone:   {result.backbone}")
        return 0
    from fra.train.ray_trainer import pretrain_ray

    if console.current() is not None:  # quiet console: Ray's output goes to the run's log file
        console.current().log_to(cfg.run.storage_path, f"pretrain-{cfg.run.name}")
    console.echo(f"[pretrain] {cfg.run.name}: {cfg.model.method}, {cfg.optim.epochs} epoch(s) on Ray Train")
    result = pretrain_ray(cfg)
    rv = result.return_value
    console.echo(f"trained {rv.get('step')}/{rv.get('planned')} steps on {rv.get('world_size')} worker(s)\n"
                 f"checkpoint:  {result.checkpoint}\nbackbone:    {result.backbone}\nmodel card:  {result.model_card}\n"
                 f"mlflow:      {result.tracking_uri} run {result.mlflow_run_id}")
    return 0
