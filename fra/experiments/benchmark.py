"""Method benchmark: random init vs BYOL vs SwAV (FRL's recipe) vs FRA under one budget.

An experiment built on the pipeline (its shard stage, pretraining and evaluation jobs), not part
of it: nothing in fra's library imports this module; `fra run` dispatches ``kind: benchmark`` here.

``fra run pipelines/benchmark_synthetic.yaml`` (a pipeline file with ``kind: benchmark``):

1. writes the evaluation shards once (synthetic faces of identities disjoint from pretraining);
2. for every method and seed, pretrains on Ray Train from the *shared* ``pretrain`` section
   (same backbone, data, epochs, batch and workers for every method; a method only adds
   its own keys, e.g. SwAV's optimiser) — ``random`` skips pretraining; FRA runs carry the
   region-awareness score (FRA's heat maps against the ground-truth part masks, with the same
   model at step 0, random maps and the collapsed / oracle anchors);
3. evaluates each backbone with every section of ``evaluate`` (FER protocols: linear probe,
   fine-tune), ``landmarks`` (face alignment: NME, lower is better) and ``attributes`` (facial
   attributes: mean accuracy), each keyed by a protocol label, with the same budget and shards
   for every method;
4. aggregates mean ± sample std over seeds into ``results.json``, ``table.md`` and one
   MLflow run (metrics ``<method>.<protocol>.<metric>.mean/std`` for FER,
   ``<method>.landmarks.<label>.<metric>`` / ``<method>.attributes.<label>.<metric>``, the
   table as an artifact).

Resume is per part: ``benchmark_state.json`` records, for every (method, seed) cell, the
pretraining result (backbone path, region score, losses) and each evaluation separately, each
with the hash of its own configuration (an evaluation's hash includes the pretraining's and the
shard jobs that wrote its data). Adding an evaluation later runs only that evaluation on the
stored backbone; changing the pretraining re-runs the pretraining and its evaluations; an
interrupted benchmark resumes at the first unfinished part (inside a pretraining, Ray Train
resumes from the last checkpoint).
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
LANDMARK_KEYS = ("nme_mean_last_k", "nme_last", "fr_last", "auc_last")
ATTRIBUTE_KEYS = ("mean_acc_mean_last_k", "mean_acc_last", "mean_balanced_acc_last", "majority_acc")
REGION_KEYS = ("miou", "nmi", "norm_nmi")
ANCHOR_KEYS = ("floor_nmi", "oracle_nmi")
# Evaluation tasks: config section of the benchmark -> (run folder, metric keys).
TASKS = {"evaluate": ("fer", FER_KEYS), "landmarks": ("landmarks", LANDMARK_KEYS),
         "attributes": ("attributes", ATTRIBUTE_KEYS)}
STATE_VERSION = 2


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
    evaluate: dict = field(default_factory=dict)  # protocol label -> FER config section (FERConfig)
    landmarks: dict = field(default_factory=dict)  # protocol label -> face-alignment section (LandmarkConfig)
    attributes: dict = field(default_factory=dict)  # protocol label -> attribute section (AttributesConfig)

    def __post_init__(self) -> None:
        if not self.seeds or len(set(self.seeds)) != len(self.seeds):
            raise ConfigError(f"seeds must be a non-empty list of distinct integers, got {self.seeds}")
        names = [m.name for m in self.methods]
        if not names or len(set(names)) != len(names):
            raise ConfigError(f"methods must be a non-empty list with unique names, got {names}")
        if not self.evaluate:
            raise ConfigError("evaluate must name at least one FER protocol section, e.g. {linear: {...}}")
        reserved = {"method", "seed", "region", "region_init", "region_random_maps", "region_anchors", *TASKS}
        clash = sorted(set(self.evaluate) & reserved)
        if clash:
            raise ConfigError(f"evaluate protocol labels {clash} clash with result keys; rename them")
        for task in TASKS:
            for label, section in getattr(self, task).items():
                if not isinstance(section, dict):
                    raise ConfigError(f"{task}.{label} must be a mapping (a {task} config section), "
                                      f"got {type(section).__name__}")


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
        for task, label in evaluations(cfg):
            eval_config(cfg, m, cfg.seeds[0], task, label)
    return cfg


def evaluations(cfg: BenchmarkConfig) -> list[tuple[str, str]]:
    """(task, protocol label) of every evaluation of a cell, in run order."""
    return [(task, label) for task in TASKS for label in getattr(cfg, task)]


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


def _config_class(task: str):
    if task == "evaluate":
        from fra.evaluation.fer import FERConfig

        return FERConfig
    if task == "landmarks":
        from fra.evaluation.landmarks import LandmarkConfig

        return LandmarkConfig
    from fra.evaluation.attributes import AttributesConfig

    return AttributesConfig


def eval_config(cfg: BenchmarkConfig, m: BenchmarkMethod, seed: int, task: str, label: str, backbone: str = "auto"):
    """The config of one evaluation of a cell (FERConfig, LandmarkConfig or AttributesConfig).

    Random init evaluates ``random:<arch>`` (the pretraining's backbone, freshly initialised
    under the cell's seed); the others the cell's pretrained backbone (``auto`` until it exists).
    """
    arch = str((cfg.pretrain.get("model") or {}).get("backbone", "resnet50")).removesuffix("_encoder")
    source = f"random:{arch}" if m.method == "random" else backbone
    folder = TASKS[task][0]
    section = _merge(getattr(cfg, task)[label], {"run": {"seed": seed, "name": f"{m.name}-s{seed}-{label}",
                                                         "storage_path": f"{cfg.storage_path}/{folder}"},
                                                 "backbone": {"source": source}})
    section = _with_defaults(section, {"tracking": {"mlflow_uri": tracking_uri(cfg), "experiment": f"{cfg.name}"}})
    return from_dict(_config_class(task), section, f"{task}.{label}")


def fer_config(cfg: BenchmarkConfig, m: BenchmarkMethod, seed: int, protocol: str, backbone: str = "auto"):
    """The FER config of one cell and protocol (:func:`eval_config` of ``evaluate``)."""
    return eval_config(cfg, m, seed, "evaluate", protocol, backbone)


def _hash(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


def pretrain_digest(cfg: BenchmarkConfig, m: BenchmarkMethod, seed: int) -> str:
    pre = pretrain_config(cfg, m, seed)
    return _hash({"pretrain": to_dict(pre) if pre else None})


def eval_digest(cfg: BenchmarkConfig, m: BenchmarkMethod, seed: int, task: str, label: str) -> str:
    """Hash of one evaluation: its own config, the pretraining it evaluates, and the shard jobs
    that write the shards it reads (so a new shard job for another task does not touch it)."""
    ev = eval_config(cfg, m, seed, task, label)
    root = str(ev.data.shards)
    shards = [to_dict(j) for j in cfg.shards if str(j.out).rstrip("/") == root.rstrip("/")]
    return _hash({"config": to_dict(ev), "pretrain": pretrain_digest(cfg, m, seed), "shards": shards})


class BenchmarkState:
    """``benchmark_state.json``: per cell, the pretraining and each evaluation with its config hash.

    Layout: ``{"version": 2, "cells": {"<method>/s<seed>": {"pretrain": {"config_hash", "result"},
    "evals": {"<task>/<label>": {"config_hash", "result"}}}}}``. Entries of the older layout (one
    hash over a whole cell) are not reused.
    """

    def __init__(self, path: Path):
        self.path = path
        data = json.loads(path.read_text()) if path.exists() else {}
        if data.get("version") != STATE_VERSION:
            if data.get("cells"):
                log.warning("%s has the older one-hash-per-cell layout: its cells will be run again", path)
            data = {"version": STATE_VERSION, "cells": {}}
        self.data = data

    def done(self, key: str, part: str, digest: str) -> dict | None:
        """The recorded result of a cell's part (``pretrain`` or ``<task>/<label>``) if its hash matches."""
        cell = self.data["cells"].get(key, {})
        entry = cell.get("pretrain") if part == "pretrain" else cell.get("evals", {}).get(part)
        return entry["result"] if entry and entry.get("config_hash") == digest else None

    def record(self, key: str, part: str, digest: str, result: dict) -> None:
        cell = self.data["cells"].setdefault(key, {"evals": {}})
        entry = {"config_hash": digest, "result": result}
        if part == "pretrain":
            cell["pretrain"] = entry
        else:
            cell.setdefault("evals", {})[part] = entry
        atomic_write_json(self.path, self.data)


# ---- the jobs (module-level so tests can count the calls without Ray) -----------------------
def run_pretraining(pre: PretrainConfig) -> dict:
    """Pretrain one cell on Ray Train; the stored part: backbone, region score, losses."""
    from fra.train.ray_trainer import pretrain_ray

    res = pretrain_ray(pre)
    losses = [h["loss"] for h in res.return_value.get("history", []) if "loss" in h]
    out: dict[str, Any] = {"backbone": st.dirname(res.backbone), "checkpoint": str(res.checkpoint),
                           "pretrain_steps": res.return_value.get("step"),
                           "pretrain_loss_first": losses[0] if losses else None,
                           "pretrain_loss_last": losses[-1] if losses else None}
    score = res.region_score or {}
    if score:
        out["region"] = {k: score[k] for k in REGION_KEYS if k in score}
        out["region_init"] = {k: score[f"init_{k}"] for k in REGION_KEYS if f"init_{k}" in score}
        out["region_random_maps"] = {k: score[f"random_{k}"] for k in REGION_KEYS if f"random_{k}" in score}
        out["region_anchors"] = {k: score[k] for k in ANCHOR_KEYS if k in score}
    return out


def _landmark_throughput(history: list[dict]) -> dict:
    """Training and evaluation images/s of a landmark run (median over epochs; test images / eval time)."""
    train = [h["train_images_per_s"] for h in history if h.get("train_images_per_s")]
    evals = [h["test"]["full"]["count"] / h["eval_seconds"] for h in history
             if h.get("eval_seconds") and isinstance(h.get("test"), dict) and h["test"].get("full", {}).get("count")]
    return {"train_images_per_s": statistics.median(train) if train else None,
            "eval_images_per_s": statistics.median(evals) if evals else None,
            "train_images": sum(int(h.get("images", 0)) for h in history)}


def run_evaluation(task: str, ev) -> dict:
    """Run one evaluation (its config's backbone source); the headline numbers as a dict."""
    if task == "evaluate":
        from fra.evaluation.fer import evaluate_fer

        r = evaluate_fer(ev)
        return {"top1_mean_last5": r.top1_mean_last5, "top1_last": r.top1_last, "mean_class_acc": r.mean_class_acc,
                "macro_f1": r.macro_f1, "results_path": str(r.results_path)}
    if task == "landmarks":
        from fra.evaluation.landmarks import evaluate_landmarks

        r = evaluate_landmarks(ev)
        return {"nme_mean_last_k": r.nme_mean_last_k, "nme_last": r.nme_last, "fr_last": r.fr_last,
                "auc_last": r.auc_last, "nme_best_selected_on_test": r.nme_best, "job_seconds": r.seconds,
                **_landmark_throughput(r.history), "results_path": str(r.results_path)}
    from fra.evaluation.attributes import evaluate_attributes

    r = evaluate_attributes(ev)
    rates = [p for p in (r.report.get("positive_rate") or {}).values() if p is not None]
    return {"mean_acc_mean_last_k": r.mean_last_k, "mean_acc_last": r.last,
            "mean_balanced_acc_last": r.report.get("mean_balanced_acc"),
            # the accuracy of always predicting each attribute's majority value on the test set
            "majority_acc": 100.0 * statistics.fmean(max(p, 1 - p) for p in rates) if rates else None,
            "results_path": str(r.results_path)}


def _start_ray(cfg: BenchmarkConfig) -> None:
    from fra.pipeline import _ensure_ray

    _ensure_ray(cfg)


def _write_shards(cfg: BenchmarkConfig) -> None:
    from fra.pipeline_stages import StageContext, run_shards

    run_shards(StageContext(cfg.storage_path, tracking_uri(cfg)), cfg.shards, {})


def _part_name(task: str, label: str) -> str:
    return label if task == "evaluate" else f"{task}/{label}"


def run_cell(cfg: BenchmarkConfig, m: BenchmarkMethod, seed: int, state: BenchmarkState,
             echo: Callable[[str], None] = print) -> tuple[dict, int]:
    """Pretrain (unless random or recorded), then run every evaluation not recorded under its hash.

    Returns:
        (the cell's results: pretraining fields, ``<protocol>`` for FER, ``landmarks`` /
        ``attributes`` by label; number of parts that ran).
    """
    key = f"{m.name}/s{seed}"
    cell: dict[str, Any] = {"method": m.method, "seed": seed}
    ran = 0
    pre = pretrain_config(cfg, m, seed)
    backbone = "auto"
    if pre is not None:
        digest = pretrain_digest(cfg, m, seed)
        part = state.done(key, "pretrain", digest)
        if part is None:
            echo(f"  {key}: pretraining ({m.method}) ...")
            t0 = time.perf_counter()
            part = run_pretraining(pre)
            part["pretrain_seconds"] = round(time.perf_counter() - t0, 1)
            state.record(key, "pretrain", digest, part)
            ran += 1
            echo(f"  {key}: pretrained in {part['pretrain_seconds']:.0f} s")
        cell.update(part)
        backbone = part["backbone"]
    for task, label in evaluations(cfg):
        name = f"{task}/{label}"
        digest = eval_digest(cfg, m, seed, task, label)
        result = state.done(key, name, digest)
        if result is None:
            echo(f"  {key}: {name} ...")
            t0 = time.perf_counter()
            result = run_evaluation(task, eval_config(cfg, m, seed, task, label, backbone))
            result["seconds"] = round(time.perf_counter() - t0, 1)
            state.record(key, name, digest, result)
            ran += 1
            echo(f"  {key}: {name} done in {result['seconds']:.0f} s")
        if task == "evaluate":
            cell[label] = result
        else:
            cell.setdefault(task, {})[label] = result
    return cell, ran


def _mean_std(values: list[float]) -> dict:
    vals = [float(v) for v in values if v is not None and math.isfinite(float(v))]
    if not vals:
        return {}
    return {"mean": statistics.fmean(vals), "std": statistics.stdev(vals) if len(vals) > 1 else 0.0, "n": len(vals)}


def aggregate(cfg: BenchmarkConfig, cells: dict[str, dict]) -> dict:
    """Per method: mean ± sample std over seeds of each evaluation metric and of the region score."""
    rows = {}
    fra_init = [c.get("region_init") for c in cells.values() if c.get("region_init")]
    for m in cfg.methods:
        mine = [cells[f"{m.name}/s{s}"] for s in cfg.seeds if f"{m.name}/s{s}" in cells]
        row: dict[str, Any] = {"method": m.method, "seeds": [c["seed"] for c in mine]}
        for protocol in cfg.evaluate:
            row[protocol] = {k: _mean_std([c[protocol][k] for c in mine if protocol in c]) for k in FER_KEYS}
        for task in ("landmarks", "attributes"):
            keys = TASKS[task][1]
            for label in getattr(cfg, task):
                done = [c[task][label] for c in mine if label in (c.get(task) or {})]
                row.setdefault(task, {})[label] = {k: _mean_std([d.get(k) for d in done]) for k in keys}
        regions = [c["region"] for c in mine if c.get("region")]
        if m.method == "random" and fra_init:
            regions = fra_init  # the FRA model at step 0, scored in the FRA cells
        if regions:
            row["region"] = {k: _mean_std([r.get(k) for r in regions]) for k in REGION_KEYS}
        for extra in ("region_random_maps", "region_anchors"):
            found = [c[extra] for c in mine if c.get(extra)]
            if found:
                row[extra] = {k: _mean_std([r.get(k) for r in found]) for k in found[0]}
        rows[m.name] = row
    return rows


def _fmt(stat: dict, pct: bool = True, digits: int | None = None) -> str:
    if not stat:
        return "—"
    d = digits if digits is not None else (1 if pct else 3)
    return f"{stat['mean']:.{d}f} ± {stat['std']:.{d}f}"


def table_markdown(cfg: BenchmarkConfig, rows: dict) -> str:
    protocols = list(cfg.evaluate)
    head = ["method"] + [f"FER {p} top-1 (%)" for p in protocols] + [f"FER {p} macro-F1 (%)" for p in protocols] + \
           [f"landmarks {p} NME (%, lower is better)" for p in cfg.landmarks] + \
           [f"attributes {p} mean acc (%)" for p in cfg.attributes] + \
           [f"attributes {p} balanced acc (%)" for p in cfg.attributes] + \
           ["region mIoU", "region NMI", "region norm. NMI"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name, row in rows.items():
        lm, at = row.get("landmarks") or {}, row.get("attributes") or {}
        cells = [name] + [_fmt(row[p]["top1_mean_last5"]) for p in protocols] + \
                [_fmt(row[p]["macro_f1"]) for p in protocols] + \
                [_fmt(lm.get(p, {}).get("nme_mean_last_k", {}), digits=2) for p in cfg.landmarks] + \
                [_fmt(at.get(p, {}).get("mean_acc_mean_last_k", {})) for p in cfg.attributes] + \
                [_fmt(at.get(p, {}).get("mean_balanced_acc_last", {})) for p in cfg.attributes] + \
                [_fmt((row.get("region") or {}).get(k, {}), pct=False) for k in REGION_KEYS]
        lines.append("| " + " | ".join(cells) + " |")
    notes = [f"Mean ± sample std over seeds {cfg.seeds}; every evaluation uses identities never seen in "
             "pretraining, the same shards and budget for every method. FER top-1 is the mean of the last "
             "evaluations."]
    if cfg.landmarks:
        notes.append("Landmarks: NME normalised by the inter-ocular distance (%, lower is better), mean of the "
                     "last evaluations.")
    if cfg.attributes:
        majority = [r["attributes"][p]["majority_acc"] for r in rows.values() for p in cfg.attributes
                    if (r.get("attributes") or {}).get(p, {}).get("majority_acc")]
        notes.append("Attributes: mean binary accuracy over the attributes (mean of the last evaluations) and the "
                     "last epoch's mean balanced accuracy (chance 50 %)"
                     + (f"; always predicting each attribute's majority value scores {majority[0]['mean']:.1f} % "
                        "mean accuracy on these test faces." if majority else "."))
    maps = next((r["region_random_maps"] for r in rows.values() if r.get("region_random_maps")), None)
    anchors = next((r["region_anchors"] for r in rows.values() if r.get("region_anchors")), None)
    region = ("Region scores: FRA's K heat maps vs the ground-truth part masks (Hungarian-matched mIoU, NMI, and "
              "norm. NMI = (NMI − collapsed map) / (oracle − collapsed map): 0 for one query everywhere, 1 for "
              "the majority part per map cell); the random init row is the same FRA model at step 0; BYOL and "
              "SwAV have no heat maps (—).")
    if maps:
        region += " Random heat maps: " + ", ".join(f"{k} {_fmt(maps[k], False)}" for k in REGION_KEYS if k in maps) + "."
    if anchors and "oracle_nmi" in anchors:
        region += f" Oracle NMI {_fmt(anchors['oracle_nmi'], False)}."
    notes.append(region)
    return "\n".join(lines) + "\n\n" + "\n".join(notes) + "\n"


def _metrics(cfg: BenchmarkConfig, rows: dict) -> dict[str, float]:
    metrics = {}

    def put(prefix: str, stats: dict) -> None:
        for k, stat in stats.items():
            if stat:
                metrics[f"{prefix}.{k}.mean"], metrics[f"{prefix}.{k}.std"] = stat["mean"], stat["std"]

    for name, row in rows.items():
        for p in cfg.evaluate:
            put(f"{name}.{p}", row[p])
        for task in ("landmarks", "attributes"):
            for label, stats in (row.get(task) or {}).items():
                put(f"{name}.{task}.{label}", stats)
        put(f"{name}.region", row.get("region") or {})
    return metrics


def _log_mlflow(cfg: BenchmarkConfig, rows: dict, files: list[Path]) -> str | None:
    from fra import tracking

    uri = tracking_uri(cfg)
    try:
        run_id, _ = tracking.start_run(uri, cfg.name, f"benchmark:{cfg.storage_path}", f"{cfg.name}-table",
                                       {"seeds": ",".join(map(str, cfg.seeds)),
                                        "methods": ",".join(m.name for m in cfg.methods),
                                        "protocols": ",".join(cfg.evaluate),
                                        "landmarks": ",".join(cfg.landmarks) or "-",
                                        "attributes": ",".join(cfg.attributes) or "-"})
        logger = tracking.RunLogger(uri, run_id)
        logger.log_metrics(_metrics(cfg, rows), 0)
        logger.close()
        for f in files:
            tracking.log_artifacts(uri, run_id, f)
        tracking.end_run(uri, run_id)
        return run_id
    except Exception as exc:  # noqa: BLE001 - the table on disk is the result; tracking is a copy
        log.warning("MLflow logging of the benchmark table failed (the table is in %s): %s", cfg.storage_path, exc)
        return None


def _summary(cfg: BenchmarkConfig, cell: dict) -> str:
    parts = [f"{p} {cell[p]['top1_mean_last5']:.1f}%" for p in cfg.evaluate]
    parts += [f"NME {lab} {r['nme_mean_last_k']:.2f}%" for lab, r in (cell.get("landmarks") or {}).items()]
    parts += [f"attributes {lab} {r['mean_acc_mean_last_k']:.1f}%" for lab, r in (cell.get("attributes") or {}).items()]
    return ", ".join(parts)


def run_benchmark(cfg: BenchmarkConfig, echo: Callable[[str], None] = print) -> dict:
    """Run (or resume) every part of every cell, then write and log the table. Returns the aggregated rows."""
    storage = Path(cfg.storage_path)
    storage.mkdir(parents=True, exist_ok=True)
    t_start = time.perf_counter()
    _start_ray(cfg)
    state = BenchmarkState(storage / "benchmark_state.json")
    if cfg.shards:
        echo(f"[shards] {len(cfg.shards)} job(s) (finished shards are verified and skipped)")
        _write_shards(cfg)
    cells = {}
    total = len(cfg.methods) * len(cfg.seeds)
    for i, (m, seed) in enumerate(((m, s) for m in cfg.methods for s in cfg.seeds), start=1):
        key = f"{m.name}/s{seed}"
        t0 = time.perf_counter()
        cells[key], ran = run_cell(cfg, m, seed, state, echo)
        if ran:
            echo(f"[{i}/{total}] {key}: {ran} part(s) ran in {time.perf_counter() - t0:.0f} s "
                 f"({_summary(cfg, cells[key])})")
        else:
            echo(f"[{i}/{total}] {key}: already done, skipping")
    rows = aggregate(cfg, cells)
    table = table_markdown(cfg, rows)
    results = storage / "results.json"
    atomic_write_json(results, {"name": cfg.name, "seeds": cfg.seeds, "rows": rows, "cells": cells})
    table_path = storage / "table.md"
    atomic_write_text(table_path, table)
    run_id = _log_mlflow(cfg, rows, [results, table_path])
    echo(table)
    echo(f"results: {results}\ntable:   {table_path}\nMLflow:  {tracking_uri(cfg)} run {run_id}\n"
         f"wall time of this run: {time.perf_counter() - t_start:.0f} s")
    return rows


__all__ = ["BenchmarkConfig", "BenchmarkMethod", "load_benchmark", "run_benchmark", "aggregate", "eval_config",
           "table_markdown", "is_benchmark_file", "BenchmarkState"]
