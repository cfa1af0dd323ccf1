"""Method benchmark: random init vs BYOL vs SwAV (FRL's recipe) vs FRA under one budget.

An experiment built on the pipeline (its shard stage, pretraining and FER evaluation), not part
of it: nothing in fra's library imports this module; `fra run` dispatches ``kind: benchmark`` here.

``fra run pipelines/benchmark_synthetic.yaml`` (a pipeline file with ``kind: benchmark``):

1. writes the FER shards once (identity-disjoint synthetic faces);
2. for every method and seed, pretrains on Ray Train from the *shared* ``pretrain`` section
   (same backbone, data, epochs, batch and workers for every method; a method only adds
   its own keys, e.g. SwAV's optimiser) — ``random`` skips pretraining;
3. evaluates each backbone with every FER protocol of ``evaluate`` (linear probe, fine-tune)
   on the held-out identities, and takes the region-awareness score of FRA runs (FRA's heat
   maps against the ground-truth part masks; the ``random`` row shows a random-init FRA's);
4. aggregates mean ± sample std over seeds into ``results.json``, ``table.md`` and one
   MLflow run (metrics ``<method>.<metric>.mean/std``, the table as an artifact).

Every finished (method, seed) cell is recorded in ``benchmark_state.json`` with the hash of
its configuration, so an interrupted benchmark resumes at the first unfinished cell (and
inside it, Ray Train resumes from the last checkpoint).
"""
from __future__ import annotations

import hashlib
import json
import logging
import math
import statistics
import time
from dataclasses import field
from pathlib import Path
from typing import Any, Callable

from fra.config import (PretrainConfig, apply_overrides, bounded, config, from_dict, load_yaml, location, one_of,
                        path_component, to_dict)
from fra.typed_config import REQUIRED
from fra import storage as st
from fra.errors import ConfigError
from fra.pipeline import PipelineTracking, RayRuntime, ShardJob, _substitute, _with_defaults
from fra.utils.io import atomic_write_json, atomic_write_text

log = logging.getLogger(__name__)

METHODS = ("random", "byol", "swav", "fra")
FER_KEYS = ("top1_mean_last5", "top1_last", "mean_class_acc", "macro_f1")
REGION_KEYS = ("miou", "nmi")


@config("methods[]")
class BenchmarkMethod:
    """One row of the table.

    Attributes:
        name: row label (unique).
        method: random | byol | swav | fra.
        pretrain: keys merged over the shared ``pretrain`` section for this method only.
    """

    name: str = path_component()  # also names the method's run folders
    method: str = one_of(*METHODS, default=REQUIRED)
    pretrain: dict = field(default_factory=dict)


@config()
class BenchmarkConfig:
    kind: str = one_of("benchmark")
    name: str = path_component("benchmark")
    storage_path: str = location("runs/benchmark", required=True)
    seeds: list[int] = bounded([0, 1, 2], ge=0)
    ray: RayRuntime = field(default_factory=RayRuntime)
    tracking: PipelineTracking = field(default_factory=PipelineTracking)
    shards: list[ShardJob] = field(default_factory=list)
    pretrain: dict = field(default_factory=dict)  # shared by every method
    methods: list[BenchmarkMethod] = field(default_factory=list)
    evaluate: dict = field(default_factory=dict)  # protocol label -> FER config section

    def __post_init__(self) -> None:
        if not self.seeds or len(set(self.seeds)) != len(self.seeds):
            raise ConfigError(f"seeds must be a non-empty list of distinct integers, got {self.seeds}")
        names = [m.name for m in self.methods]
        if not names or len(set(names)) != len(names):
            raise ConfigError(f"methods must be a non-empty list with unique names, got {names}")
        if not self.evaluate:
            raise ConfigError("evaluate must name at least one FER protocol section, e.g. {linear: {...}}")


def is_benchmark_file(path: str | Path) -> bool:
    """True when a pipeline YAML declares ``kind: benchmark``."""
    raw = load_yaml(path)
    return isinstance(raw, dict) and raw.get("kind") == "benchmark"


def load_benchmark(path: str | Path, overrides=()) -> BenchmarkConfig:
    """Read, override, substitute and validate; every cell's configs are checked before anything runs."""
    raw = apply_overrides(load_yaml(path), list(overrides))
    name = str(raw.get("name", Path(path).stem))
    if "://" in str(raw.get("storage_path", "")):
        raise ConfigError(f"{path}: the method benchmark keeps its table and state in a local folder; "
                          "storage_path must be a path, not a URI")
    storage = str(Path(raw.get("storage_path", f"runs/{name}")).expanduser().resolve())
    raw = _substitute(raw, {"storage": storage, "name": name})
    raw["storage_path"], raw["name"] = storage, name
    cfg = from_dict(BenchmarkConfig, raw)
    for m in cfg.methods:
        pretrain_config(cfg, m, cfg.seeds[0])
        for protocol in cfg.evaluate:
            fer_config(cfg, m, cfg.seeds[0], protocol)
    return cfg


def tracking_uri(cfg: BenchmarkConfig) -> str:
    return cfg.tracking.mlflow_uri or f"sqlite:///{Path(cfg.storage_path) / 'mlflow.db'}"


def _merge(base: dict, over: dict) -> dict:
    out = dict(base)
    for k, v in over.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def pretrain_config(cfg: BenchmarkConfig, m: BenchmarkMethod, seed: int) -> PretrainConfig | None:
    """The pretraining config of one cell (None for random init)."""
    if m.method == "random":
        return None
    section = _merge(_merge(cfg.pretrain, m.pretrain), {"model": {"method": m.method}})
    section = _merge(section, {"run": {"seed": seed, "name": f"{m.name}-s{seed}",
                                       "storage_path": f"{cfg.storage_path}/pretrain"},
                               "data": {"seed": seed}})
    section = _with_defaults(section, {"tracking": {"mlflow_uri": tracking_uri(cfg), "experiment": f"{cfg.name}"}})
    return from_dict(PretrainConfig, section)


def fer_config(cfg: BenchmarkConfig, m: BenchmarkMethod, seed: int, protocol: str, backbone: str = "auto"):
    from fra.evaluation.fer import FERConfig

    arch = str((cfg.pretrain.get("model") or {}).get("backbone", "resnet50")).removesuffix("_encoder")
    source = f"random:{arch}" if m.method == "random" else backbone
    section = _merge(cfg.evaluate[protocol], {"run": {"seed": seed, "name": f"{m.name}-s{seed}-{protocol}",
                                                      "storage_path": f"{cfg.storage_path}/fer"},
                                              "backbone": {"source": source}})
    section = _with_defaults(section, {"tracking": {"mlflow_uri": tracking_uri(cfg), "experiment": f"{cfg.name}"}})
    return from_dict(FERConfig, section)


def _hash(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


class BenchmarkState:
    """``benchmark_state.json``: finished cells with their config hash and results."""

    def __init__(self, path: Path):
        self.path = path
        self.data = json.loads(path.read_text()) if path.exists() else {"cells": {}}

    def done(self, key: str, digest: str) -> dict | None:
        cell = self.data["cells"].get(key)
        return cell["result"] if cell and cell.get("config_hash") == digest else None

    def record(self, key: str, digest: str, result: dict) -> None:
        self.data["cells"][key] = {"config_hash": digest, "result": result}
        atomic_write_json(self.path, self.data)


def run_cell(cfg: BenchmarkConfig, m: BenchmarkMethod, seed: int) -> dict:
    """Pretrain (unless random), evaluate with every protocol, score regions (FRA)."""
    from fra.evaluation.fer import evaluate_fer

    out: dict[str, Any] = {"method": m.method, "seed": seed}
    t0 = time.perf_counter()
    pre = pretrain_config(cfg, m, seed)
    backbone = "auto"
    if pre is not None:
        from fra.train.ray_trainer import pretrain_ray

        res = pretrain_ray(pre)
        backbone = st.dirname(res.backbone)
        losses = [h["loss"] for h in res.return_value.get("history", []) if "loss" in h]
        out.update(backbone=backbone, pretrain_steps=res.return_value.get("step"),
                   pretrain_loss_first=losses[0] if losses else None, pretrain_loss_last=losses[-1] if losses else None)
        if res.region_score:
            out["region"] = {k: res.region_score[k] for k in REGION_KEYS}
            out["region_init"] = {k: res.region_score[f"init_{k}"] for k in REGION_KEYS}
            out["region_random_maps"] = {k: res.region_score[f"random_{k}"] for k in REGION_KEYS}
    out["pretrain_seconds"] = round(time.perf_counter() - t0, 1)
    for protocol in cfg.evaluate:
        t1 = time.perf_counter()
        r = evaluate_fer(fer_config(cfg, m, seed, protocol, backbone))
        out[protocol] = {"top1_mean_last5": r.top1_mean_last5, "top1_last": r.top1_last,
                         "mean_class_acc": r.mean_class_acc, "macro_f1": r.macro_f1,
                         "results_path": str(r.results_path), "seconds": round(time.perf_counter() - t1, 1)}
    return out


def _mean_std(values: list[float]) -> dict:
    vals = [float(v) for v in values if v is not None and math.isfinite(float(v))]
    if not vals:
        return {}
    return {"mean": statistics.fmean(vals), "std": statistics.stdev(vals) if len(vals) > 1 else 0.0, "n": len(vals)}


def aggregate(cfg: BenchmarkConfig, cells: dict[str, dict]) -> dict:
    """Per method: mean ± sample std over seeds of each FER metric and of the region score."""
    rows = {}
    fra_init = [c.get("region_init") for c in cells.values() if c.get("region_init")]
    for m in cfg.methods:
        mine = [cells[f"{m.name}/s{s}"] for s in cfg.seeds if f"{m.name}/s{s}" in cells]
        row: dict[str, Any] = {"method": m.method, "seeds": [c["seed"] for c in mine]}
        for protocol in cfg.evaluate:
            row[protocol] = {k: _mean_std([c[protocol][k] for c in mine if protocol in c]) for k in FER_KEYS}
        regions = [c["region"] for c in mine if c.get("region")]
        if m.method == "random" and fra_init:
            regions = fra_init  # the random-init FRA heat maps scored in the FRA cells
        if regions:
            row["region"] = {k: _mean_std([r[k] for r in regions]) for k in REGION_KEYS}
        maps = [c["region_random_maps"] for c in mine if c.get("region_random_maps")]
        if maps:
            row["region_random_maps"] = {k: _mean_std([r[k] for r in maps]) for k in REGION_KEYS}
        rows[m.name] = row
    return rows


def _fmt(stat: dict, pct: bool = True) -> str:
    if not stat:
        return "—"
    return f"{stat['mean']:.1f} ± {stat['std']:.1f}" if pct else f"{stat['mean']:.3f} ± {stat['std']:.3f}"


def table_markdown(cfg: BenchmarkConfig, rows: dict) -> str:
    protocols = list(cfg.evaluate)
    head = ["method"] + [f"FER {p} top-1 (%)" for p in protocols] + [f"FER {p} macro-F1 (%)" for p in protocols] + \
           ["region mIoU", "region NMI"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name, row in rows.items():
        cells = [name] + [_fmt(row[p]["top1_mean_last5"]) for p in protocols] + \
                [_fmt(row[p]["macro_f1"]) for p in protocols] + \
                [_fmt((row.get("region") or {}).get(k, {}), pct=False) for k in REGION_KEYS]
        lines.append("| " + " | ".join(cells) + " |")
    maps = next((r["region_random_maps"] for r in rows.values() if r.get("region_random_maps")), None)
    notes = [f"Mean ± sample std over seeds {cfg.seeds}; FER top-1 is the mean of the last evaluations "
             "(test identities never seen in pretraining or training)."]
    notes.append("Region scores: FRA's K heat maps vs the ground-truth part masks (Hungarian-matched mIoU, NMI); "
                 "the random row scores a randomly initialised FRA; BYOL and SwAV have no heat maps (—)."
                 + (f" Random heat maps score mIoU {_fmt(maps['miou'], False)}, NMI {_fmt(maps['nmi'], False)}."
                    if maps else ""))
    return "\n".join(lines) + "\n\n" + "\n".join(notes) + "\n"


def _log_mlflow(cfg: BenchmarkConfig, rows: dict, files: list[Path]) -> str | None:
    from fra import tracking

    uri = tracking_uri(cfg)
    try:
        run_id, _ = tracking.start_run(uri, cfg.name, f"benchmark:{cfg.storage_path}", f"{cfg.name}-table",
                                       {"seeds": ",".join(map(str, cfg.seeds)),
                                        "methods": ",".join(m.name for m in cfg.methods),
                                        "protocols": ",".join(cfg.evaluate)})
        logger = tracking.RunLogger(uri, run_id)
        metrics = {}
        for name, row in rows.items():
            for p in cfg.evaluate:
                for k, stat in row[p].items():
                    if stat:
                        metrics[f"{name}.{p}.{k}.mean"], metrics[f"{name}.{p}.{k}.std"] = stat["mean"], stat["std"]
            for k, stat in (row.get("region") or {}).items():
                metrics[f"{name}.region.{k}.mean"], metrics[f"{name}.region.{k}.std"] = stat["mean"], stat["std"]
        logger.log_metrics(metrics, 0)
        logger.close()
        for f in files:
            tracking.log_artifacts(uri, run_id, f)
        tracking.end_run(uri, run_id)
        return run_id
    except Exception as exc:  # noqa: BLE001 - the table on disk is the result; tracking is a copy
        log.warning("MLflow logging of the benchmark table failed (the table is in %s): %s", cfg.storage_path, exc)
        return None


def run_benchmark(cfg: BenchmarkConfig, echo: Callable[[str], None] = print) -> dict:
    """Run (or resume) every cell, then write and log the table. Returns the aggregated rows."""
    from fra.pipeline import _ensure_ray
    from fra.pipeline_stages import StageContext, run_shards

    storage = Path(cfg.storage_path)
    storage.mkdir(parents=True, exist_ok=True)
    _ensure_ray(cfg)
    state = BenchmarkState(storage / "benchmark_state.json")
    if cfg.shards:
        echo(f"[shards] {len(cfg.shards)} job(s) (finished shards are verified and skipped)")
        run_shards(StageContext(cfg.storage_path, tracking_uri(cfg)), cfg.shards, {})
    cells = {}
    total = len(cfg.methods) * len(cfg.seeds)
    for i, (m, seed) in enumerate(((m, s) for m in cfg.methods for s in cfg.seeds), start=1):
        key = f"{m.name}/s{seed}"
        pre = pretrain_config(cfg, m, seed)
        digest = _hash({"pretrain": to_dict(pre) if pre else None, "shards": [to_dict(j) for j in cfg.shards],
                        "evaluate": {p: to_dict(fer_config(cfg, m, seed, p)) for p in cfg.evaluate}})
        done = state.done(key, digest)
        if done is not None:
            echo(f"[{i}/{total}] {key}: already done, skipping")
            cells[key] = done
            continue
        echo(f"[{i}/{total}] {key}: running ...")
        t0 = time.perf_counter()
        cells[key] = run_cell(cfg, m, seed)
        state.record(key, digest, cells[key])
        summary = ", ".join(f"{p} {cells[key][p]['top1_mean_last5']:.1f}%" for p in cfg.evaluate)
        echo(f"[{i}/{total}] {key}: done in {time.perf_counter() - t0:.0f} s ({summary})")
    rows = aggregate(cfg, cells)
    table = table_markdown(cfg, rows)
    results = storage / "results.json"
    atomic_write_json(results, {"name": cfg.name, "seeds": cfg.seeds, "rows": rows, "cells": cells})
    table_path = storage / "table.md"
    atomic_write_text(table_path, table)
    run_id = _log_mlflow(cfg, rows, [results, table_path])
    echo(table)
    echo(f"results: {results}\ntable:   {table_path}\nMLflow:  {tracking_uri(cfg)} run {run_id}")
    return rows


__all__ = ["BenchmarkConfig", "BenchmarkMethod", "load_benchmark", "run_benchmark", "aggregate",
           "table_markdown", "is_benchmark_file"]
