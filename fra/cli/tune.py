"""`fra tune [CONFIG] [--set key=value ...] [--name NAME] [--fresh] [--check]`.

CONFIG is a sweep YAML (``tune_configs/*.yaml``) or a pipeline YAML with a ``sweep:`` section;
without it the embedded demo (``tune_configs/demo_sweep.yaml``: synthetic faces, tiny ResNet-18)
runs. Each trial pretrains and is then evaluated on FER, or with ``objective.task: landmarks`` on
face alignment (the chained objective: a validation number; NME: lowest is best). Running the same
command again resumes an interrupted sweep without re-running finished trials. Writes
``results.csv``, ``objective.png``, ``best_pretrain.yaml`` (``fra pretrain`` runs it) and
``best_pipeline.yaml`` (``fra run`` runs it: the best trial's pretraining -> its evaluation ->
register -> promote) under ``run.storage_path/run.name``.
"""
from __future__ import annotations

import argparse


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("config", nargs="?", default=None, metavar="CONFIG",
                        help="sweep YAML (default: tune_configs/demo_sweep.yaml)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a sweep value, e.g. --set num_samples=8 --set pretrain.optim.epochs=2")
    parser.add_argument("--name", help="sweep name (run.name); the same name resumes that sweep")
    parser.add_argument("--fresh", action="store_true", help="refuse to resume an existing sweep of this name")
    parser.add_argument("--check", action="store_true", help="validate the config and search space, then exit")
    parser.add_argument("--print-config", action="store_true", help="print the resolved sweep config and exit")


def run(args: argparse.Namespace) -> int:
    import yaml

    from fra.config import to_dict
    from fra.tuning.config import load_sweep_config, objective_mode, resolve

    overrides = list(args.overrides) + ([f"run.name={args.name}"] if args.name else [])
    cfg = load_sweep_config(args.config, overrides)
    if args.print_config:
        print(yaml.safe_dump(to_dict(cfg), sort_keys=False), end="")
        return 0
    if args.check:
        res = resolve(cfg)
        for p in res.params:
            print(f"{p.name:<16} -> {p.path:<24} {p.kind} {list(p.args)}")
        obj = cfg.objective
        what = f"{obj.protocol}/{obj.metric}" if obj.task == "fer" else f"landmarks/{obj.metric}"
        print(f"ok: {cfg.num_samples} sample(s), scheduler {cfg.scheduler.name}, objective {what} "
              f"({'lower' if objective_mode(obj) == 'min' else 'higher'} is better)")
        return 0
    from fra import console
    from fra.tuning.sweep import SweepInterrupted, run_sweep

    if console.current() is not None:  # quiet console: Ray Tune's and the trials' output go to the log file
        console.current().log_to(cfg.run.storage_path, f"tune-{cfg.run.name}")
    try:
        result = run_sweep(cfg, resume=not args.fresh)
    except SweepInterrupted as exc:
        console.error(f"fra tune: {exc}")
        return 130
    console.echo(result.table_text)
    if result.best_trial_id is None:
        console.error(f"no trial finished its chained {cfg.objective.task} evaluation; see {result.table_path}")
        return 1
    params = ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in result.best_params.items())
    best = "lowest" if result.objective_mode == "min" else "highest"
    console.echo(f"best trial {result.best_trial_id} ({best}): {cfg.objective.metric}={result.best_objective:.2f}% "
                 f"({params})\n"
                 f"best config:   {result.best_config_path}\npipeline:      {result.best_pipeline_path}  (fra run)\n"
                 f"backbone:      {result.best_backbone}\ntable:         {result.table_path}\n"
                 f"plot:          {result.plot_path}\nmlflow run:    {result.mlflow_run_id or '-'}")
    return 0
