"""`fra run PIPELINE.yaml`: run (or resume) a declarative pipeline and print a summary."""
from __future__ import annotations

import argparse
from pathlib import Path


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("pipeline", help="pipeline YAML, e.g. pipelines/demo.yaml")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override any key, e.g. --set pretrain.optim.epochs=3")
    p.add_argument("--restart", action="store_true", help="forget recorded stages and run everything again")
    p.add_argument("--dry-run", action="store_true", help="validate every stage's config and stop")


def summary(cfg, outputs: dict, timings: dict | None = None) -> str:
    """The end of a run: a table of the stages (status, time, headline), then where things are."""
    from fra.console import table
    from fra.pipeline import tracking_uri

    timings = timings or {}
    rows = []
    for stage in cfg.stages:
        if stage not in outputs:
            continue
        status, seconds = timings.get(stage, ("done", None))
        rows.append([stage, "skipped" if status == "skipped" else "done",
                     "-" if status == "skipped" or seconds is None else f"{seconds:.0f} s", _headline(stage, outputs)])
    lines = [f"pipeline {cfg.name} finished: {' -> '.join(cfg.stages)}", table(rows, ["stage", "status", "time", "result"]),
             f"  storage: {cfg.storage_path}", f"  MLflow:  {tracking_uri(cfg)}"]
    if "pretrain" in outputs:
        lines.append(f"  pretrain checkpoint: {outputs['pretrain']['checkpoint']}")
        lines.append(f"  exported backbone:   {outputs['pretrain']['backbone']}")
        heatmaps = heatmap_location(tracking_uri(cfg), outputs["pretrain"].get("mlflow_run_id"))
        if heatmaps:
            lines.append(f"  heat maps per epoch: {heatmaps}")
    if "sweep" in outputs:
        s = outputs["sweep"]
        lines.append(f"  sweep best config:   {s.get('best_config_path') or s.get('best_config')}")
        if s.get("best_pipeline_path"):
            lines.append(f"  sweep best pipeline: {s['best_pipeline_path']}  (fra run reproduces the best trial)")
    if "evaluate" in outputs:
        lines.append(f"  FER results: {outputs['evaluate']['results_path']}")
    if "promote" in outputs:
        d = outputs["promote"]
        lines.append(f"  promotion: {d['decision']} ({d['reason']}); champion = {d['name']} v{d['champion']}"
                     f"  -> load with models:/{d['name']}@champion")
    return "\n".join(lines)


def _headline(stage: str, outputs: dict) -> str:
    """One short phrase per stage for the summary table."""
    out = outputs[stage]
    if stage == "shards":
        rows = sum(int(c.get("total", 0)) for job in out.values() for c in (job.get("counts") or {}).values()
                   if isinstance(c, dict))
        return f"{len(out)} shard set(s), {rows} images"
    if stage == "pretrain":
        return f"backbone exported to {Path(str(out['backbone'])).parent.name}/{Path(str(out['backbone'])).name}"
    if stage == "sweep":
        best = out.get("best_trial_id")
        return f"best trial {best}" if best else "no trial finished"
    if stage == "evaluate" and "top1_mean_last5" in out:
        return (f"FER top-1 {out['top1_mean_last5']:.2f}% (mean of last evals), last {out['top1_last']:.2f}%, "
                f"macro-F1 {out['macro_f1']:.2f}%")
    if stage == "evaluate":
        return ", ".join(f"{k} {v:.4g}" for k, v in out.items() if isinstance(v, float))[:100]
    if stage == "register":
        return f"registered: {out['name']} version {out['version']}"
    if stage == "promote":
        return f"{out['decision']}: champion {out['name']} v{out['champion']}"
    return ""


def heatmap_location(uri: str, run_id: str | None) -> str:
    """Where the pretraining run's per-epoch heat-map overlays are ("" if it logged none)."""
    if not run_id:
        return ""
    try:
        from mlflow.tracking import MlflowClient

        client = MlflowClient(uri)
        if not any(a.path == "heatmaps" for a in client.list_artifacts(run_id)):
            return ""
        return f"{client.get_run(run_id).info.artifact_uri}/heatmaps/epoch_NNN/grid.png"
    except Exception as exc:  # the summary must not fail on a tracking hiccup
        return f"MLflow run {run_id}, artifacts heatmaps/ ({type(exc).__name__} reading the store)"


def _quiet(storage: str, label: str) -> None:
    """The run's log file under ``<storage>/logs/``, and a quiet console (:mod:`fra.console`)."""
    from fra import console

    con = console.current()
    if con is not None:
        con.log_to(storage, label)


def run(args: argparse.Namespace) -> int:
    from fra import console
    from fra import storage as st
    from fra.experiments.benchmark import is_benchmark_file
    from fra.pipeline import load_pipeline, run_pipeline

    if is_benchmark_file(args.pipeline):  # kind: benchmark (pipelines/benchmark_synthetic.yaml)
        from fra.experiments.benchmark import load_benchmark, run_benchmark

        bench = load_benchmark(args.pipeline, args.overrides)
        if args.dry_run:
            print(f"benchmark {bench.name} is valid: {len(bench.methods)} methods x {len(bench.seeds)} seeds, "
                  f"FER protocols {list(bench.evaluate)}, landmark protocols {list(bench.landmarks)}, "
                  f"attribute protocols {list(bench.attributes)}")
            return 0
        if args.restart:
            (Path(bench.storage_path) / "benchmark_state.json").unlink(missing_ok=True)
        _quiet(bench.storage_path, f"benchmark-{bench.name}")
        run_benchmark(bench, echo=console.echo)
        return 0
    from fra.experiments.region_awareness import is_region_awareness_file

    if is_region_awareness_file(args.pipeline):  # kind: region_awareness (pipelines/region_awareness.yaml)
        from fra.experiments.region_awareness import load_region_awareness, run_region_awareness

        exp = load_region_awareness(args.pipeline, args.overrides)
        if args.dry_run:
            print(f"region-awareness experiment {exp.name} is valid: seeds {exp.seeds}")
            return 0
        if args.restart:
            (Path(exp.storage_path) / "state.json").unlink(missing_ok=True)
        _quiet(exp.storage_path, f"region-{exp.name}")
        return 0 if run_region_awareness(exp, echo=console.echo)["passed"] else 1
    cfg = load_pipeline(args.pipeline, args.overrides)
    if args.dry_run:
        print(f"pipeline {cfg.name} is valid: stages {cfg.stages}")
        return 0
    if args.restart:
        st.delete(st.join(cfg.storage_path, "pipeline_state.json"))
    _quiet(cfg.storage_path, "run")
    console.echo(f"fra run {cfg.name}: {' -> '.join(cfg.stages)}  (storage {st.redact(cfg.storage_path)})")
    timings: dict = {}
    outputs = run_pipeline(cfg, echo=console.echo, timings=timings)
    st.write_json(st.join(cfg.storage_path, "summary.json"), outputs)
    console.echo(summary(cfg, outputs, timings))
    return 0
