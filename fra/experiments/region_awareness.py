"""Region-awareness experiment: do FRA's heat maps become facial regions on aligned faces?

An experiment built on fra's plain training loop and region score (issue 18 §3), not part of
the library: ``fra run`` dispatches ``kind: region_awareness`` here
(``pipelines/region_awareness.yaml``).

For every seed: pretrain FRA in process (:func:`fra.train.plain.pretrain_plain`, no Ray) on
rendered aligned synthetic faces, then score the final model's heat maps against the
ground-truth part masks of held-out identities, next to the same model at step 0
(:func:`fra.evaluation.region_score.score_model` with its floor / oracle anchors). A seed
passes when both criteria written in the pipeline file hold:

* the cluster loss of the last epoch (epoch mean) is below ``max_cluster_over_lnk`` · ln K;
* the normalised NMI gain over step 0 (``gain_norm_nmi``) is at least ``min_gain_norm_nmi``.

Per epoch the loss components and the three region diagnostics (cluster loss / ln K, spread of
the heat-map logits over K, mean pairwise cosine of the mask embeddings; see
:mod:`fra.losses.diagnostics`) go to the console (the loop's epoch line) and to one MLflow run
per seed, with the scores and the final heat-map grid. ``results.json`` and ``summary.md`` in
``storage_path`` hold every number; finished seeds are skipped on a re-run with the same
configuration.
"""
from __future__ import annotations

import hashlib
import json
import logging
import math
import shutil
import time
from dataclasses import field
from pathlib import Path
from typing import Callable

from fra.config import PretrainConfig, apply_overrides, bounded, config, from_dict, load_yaml, location, one_of, \
    path_component, to_dict
from fra.errors import ConfigError
from fra.pipeline import PipelineTracking, _substitute, _with_defaults
from fra.utils.io import atomic_write_json, atomic_write_text

log = logging.getLogger(__name__)

DIAG_KEYS = ("diag/cluster_over_lnk", "diag/dots_spread", "diag/mask_cos")
LOSS_KEYS = ("loss", "loss/inst", "loss/region", "loss/cluster")


@config("criteria")
class Criteria:
    """Pass criteria, checked on every seed."""

    max_cluster_over_lnk: float = bounded(0.9, gt=0)  # last epoch's cluster loss / ln K must be below
    min_gain_norm_nmi: float = bounded(0.1, ge=-1)  # normalised NMI gain over step 0 must reach


@config("score")
class ScoreSettings:
    """How the heat maps are scored (:func:`fra.evaluation.region_score.score_model`)."""

    n_images: int = bounded(64, ge=1)  # held-out faces
    min_cells: int = bounded(4, ge=1)  # score at >= 32 * min_cells px
    mode: str = one_of("batch", "proto")  # batch = the mask embeddings as training uses them


@config()
class RegionAwarenessConfig:
    kind: str = one_of("region_awareness")
    name: str = path_component("region_awareness")
    storage_path: str = location("runs/region_awareness", required=True)
    seeds: list[int] = bounded([0, 1], ge=0)
    criteria: Criteria = field(default_factory=Criteria)
    score: ScoreSettings = field(default_factory=ScoreSettings)
    tracking: PipelineTracking = field(default_factory=PipelineTracking)
    pretrain: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not self.seeds or len(set(self.seeds)) != len(self.seeds):
            raise ConfigError(f"seeds must be a non-empty list of distinct integers, got {self.seeds}")


def is_region_awareness_file(path: str | Path) -> bool:
    raw = load_yaml(path)
    return isinstance(raw, dict) and raw.get("kind") == "region_awareness"


def load_region_awareness(path: str | Path, overrides=()) -> RegionAwarenessConfig:
    """Read, override, substitute and validate (every seed's pretraining config included)."""
    raw = apply_overrides(load_yaml(path), list(overrides))
    name = str(raw.get("name", Path(path).stem))
    if "://" in str(raw.get("storage_path", "")):
        raise ConfigError(f"{path}: the region-awareness experiment trains in process and writes a local folder; "
                          "storage_path must be a path, not a URI")
    storage = str(Path(raw.get("storage_path", f"runs/{name}")).expanduser().resolve())
    raw = _substitute(raw, {"storage": storage, "name": name})
    raw["storage_path"], raw["name"] = storage, name
    cfg = from_dict(RegionAwarenessConfig, raw)
    for seed in cfg.seeds:
        pre = pretrain_config(cfg, seed)
        if pre.model.method != "fra" or pre.data.source != "synthetic":
            raise ConfigError(f"{path}: the experiment scores FRA heat maps against synthetic part masks: "
                              "pretrain.model.method must be fra and pretrain.data.source synthetic")
        if pre.model.num_proto < 2:
            raise ConfigError(f"{path}: pretrain.model.num_proto must be at least 2 (a cluster loss over K=1 is 0)")
    return cfg


def tracking_uri(cfg: RegionAwarenessConfig) -> str:
    return cfg.tracking.mlflow_uri or f"sqlite:///{Path(cfg.storage_path) / 'mlflow.db'}"


def _merge(base: dict, over: dict) -> dict:
    out = dict(base)
    for k, v in over.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def pretrain_config(cfg: RegionAwarenessConfig, seed: int) -> PretrainConfig:
    section = _merge(cfg.pretrain, {"run": {"seed": seed, "name": f"s{seed}",
                                           "storage_path": f"{cfg.storage_path}/pretrain"},
                                   "data": {"seed": seed}})
    section = _with_defaults(section, {"tracking": {"mlflow_uri": tracking_uri(cfg), "experiment": cfg.name}})
    return from_dict(PretrainConfig, section)


def _hash(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


def score_final(pre: PretrainConfig, checkpoint: Path, settings: ScoreSettings) -> dict:
    """The final model's region score with its step-0 baseline and anchors."""
    from fra.config import view_normalization
    from fra.data.synthetic import SyntheticFaces
    from fra.evaluation.region_score import score_model
    from fra.models import build_model
    from fra.train.checkpointing import load_checkpoint, restore

    model = build_model(pre.model)
    restore(load_checkpoint(checkpoint), model, restore_rng=False)
    s = pre.data.synthetic
    spec = SyntheticFaces(num_identities=s.num_identities, images_per_identity=s.images_per_identity, size=s.size,
                          seed=s.seed, intensity=tuple(s.intensity), jitter=s.jitter, align=s.align)
    n = min(settings.n_images, spec.split_size("test"))
    if n == 0:
        raise ConfigError("the synthetic test split is empty: raise pretrain.data.synthetic.num_identities")
    mean, std = view_normalization(pre)
    out = score_model(model.eval(), spec, n, pre.data.image_size, mean, std, mode=settings.mode, baseline=True,
                      seed=pre.run.seed, min_cells=settings.min_cells)
    return {k: v for k, v in out.items() if not isinstance(v, dict)}


def verdict(cfg: RegionAwarenessConfig, cell: dict) -> dict:
    c = cfg.criteria
    cluster_ok = cell["cluster_over_lnk_end"] < c.max_cluster_over_lnk
    gain_ok = cell["gain_norm_nmi"] >= c.min_gain_norm_nmi
    return {"cluster_below": cluster_ok, "gain_reached": gain_ok, "passed": cluster_ok and gain_ok}


def run_seed(cfg: RegionAwarenessConfig, seed: int, echo: Callable[[str], None]) -> dict:
    from fra.train.plain import pretrain_plain

    pre = pretrain_config(cfg, seed)
    t0 = time.perf_counter()
    res = pretrain_plain(pre)
    train_s = time.perf_counter() - t0
    epochs = [{k: h[k] for k in ("epoch", "steps", *LOSS_KEYS, *DIAG_KEYS) if k in h} for h in res.history]
    echo(f"seed {seed}: per epoch  loss / inst / region / cluster | cluster/lnK  dots spread  mask cos")
    for h in epochs:
        echo(f"  epoch {h['epoch'] + 1:3d}  " + " / ".join(f"{h.get(k, math.nan):.4f}" for k in LOSS_KEYS)
             + f" | {h.get(DIAG_KEYS[0], math.nan):.4f}  {h.get(DIAG_KEYS[1], math.nan):.5f}"
             f"  {h.get(DIAG_KEYS[2], math.nan):.4f}")
    t1 = time.perf_counter()
    score = score_final(pre, res.checkpoint, cfg.score)
    cell = {"seed": seed, "steps": sum(h.get("steps", 0) for h in res.history), "epochs": epochs,
            "cluster_over_lnk_end": epochs[-1]["diag/cluster_over_lnk"], "score": score,
            "norm_nmi": score["norm_nmi"], "init_norm_nmi": score["init_norm_nmi"],
            "gain_norm_nmi": score["gain_norm_nmi"], "train_seconds": round(train_s, 1),
            "score_seconds": round(time.perf_counter() - t1, 1), "run_dir": str(res.run_dir),
            "heatmaps": str(res.heatmaps[-1]) if res.heatmaps else None}
    cell["verdict"] = verdict(cfg, cell)
    _log_mlflow(cfg, pre, cell)
    return cell


def _log_mlflow(cfg: RegionAwarenessConfig, pre: PretrainConfig, cell: dict) -> None:
    from fra import tracking

    uri = tracking_uri(cfg)
    try:
        m = pre.model
        run_id, _ = tracking.start_run(
            uri, cfg.name, f"region_awareness:{cfg.storage_path}:s{cell['seed']}", f"{cfg.name}-s{cell['seed']}",
            {"seed": cell["seed"], "backbone": m.backbone, "num_proto": m.num_proto, "image_size": pre.data.image_size,
             "batch_size": pre.optim.batch_size, "lr": pre.optim.lr, "epochs": pre.optim.epochs,
             "teacher_temp": m.teacher_temp, "heatmap_scale": m.heatmap_scale, "dropout": m.dropout})
        logger = tracking.RunLogger(uri, run_id)
        for h in cell["epochs"]:
            logger.log_metrics({f"epoch/{k}": v for k, v in h.items() if k in LOSS_KEYS + DIAG_KEYS}, h["epoch"] + 1)
        final = {f"region/{k}": v for k, v in cell["score"].items() if isinstance(v, (int, float))}
        final.update({"passed": float(cell["verdict"]["passed"]), "cluster_over_lnk_end": cell["cluster_over_lnk_end"]})
        logger.log_metrics(final, cell["steps"])
        logger.close()
        if cell.get("heatmaps"):
            tracking.log_artifacts(uri, run_id, cell["heatmaps"], "heatmaps")
        tracking.end_run(uri, run_id)
    except Exception as exc:  # noqa: BLE001 - results.json is the record; tracking is a copy
        log.warning("MLflow logging of seed %s failed (results are in %s): %s", cell["seed"], cfg.storage_path, exc)


def summary_markdown(cfg: RegionAwarenessConfig, cells: dict[str, dict]) -> str:
    c = cfg.criteria
    lines = [f"Criteria: last-epoch cluster loss < {c.max_cluster_over_lnk}·ln K, and normalised NMI gain over "
             f"step 0 >= {c.min_gain_norm_nmi}, on every seed.", "",
             "| seed | steps | cluster/lnK (last epoch) | dots spread | mask cos | norm NMI step 0 -> end | gain | "
             "NMI (oracle) | passed |", "|---|---|---|---|---|---|---|---|---|"]
    for cell in cells.values():
        last, s = cell["epochs"][-1], cell["score"]
        lines.append(f"| {cell['seed']} | {cell['steps']} | {cell['cluster_over_lnk_end']:.4f} | "
                     f"{last.get('diag/dots_spread', math.nan):.5f} | {last.get('diag/mask_cos', math.nan):.4f} | "
                     f"{cell['init_norm_nmi']:.3f} -> {cell['norm_nmi']:.3f} | {cell['gain_norm_nmi']:+.3f} | "
                     f"{s['nmi']:.3f} ({s['oracle_nmi']:.3f}) | {'yes' if cell['verdict']['passed'] else 'no'} |")
    return "\n".join(lines) + "\n"


def _record(state_path: Path, key: str, entry: dict) -> None:
    """Add one seed's cell to ``state.json``, re-read under a lock: invocations that run different seeds at
    the same time (``--set seeds=[0]`` and ``--set seeds=[1]``, one thread each) keep each other's cells."""
    import fcntl

    with open(state_path.with_suffix(".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        state = json.loads(state_path.read_text()) if state_path.exists() else {"cells": {}}
        state["cells"][key] = entry
        atomic_write_json(state_path, state)


def run_region_awareness(cfg: RegionAwarenessConfig, echo: Callable[[str], None] = print) -> dict:
    """Run (or resume) every seed, judge, write ``results.json`` / ``summary.md``; returns the results."""
    storage = Path(cfg.storage_path)
    storage.mkdir(parents=True, exist_ok=True)
    state_path = storage / "state.json"
    state = json.loads(state_path.read_text()) if state_path.exists() else {"cells": {}}
    cells = {}
    t0 = time.perf_counter()
    for seed in cfg.seeds:
        key = f"s{seed}"
        digest = _hash({"pretrain": to_dict(pretrain_config(cfg, seed)), "score": to_dict(cfg.score)})
        done = state["cells"].get(key)
        if done and done.get("config_hash") == digest:
            echo(f"seed {seed}: already done, skipping")
            cells[key] = dict(done["result"], verdict=verdict(cfg, done["result"]))
            continue
        echo(f"seed {seed}: training ...")
        cells[key] = run_seed(cfg, seed, echo)
        _record(state_path, key, {"config_hash": digest, "result": cells[key]})
        v = cells[key]["verdict"]
        echo(f"seed {seed}: cluster/lnK {cells[key]['cluster_over_lnk_end']:.4f} "
             f"({'<' if v['cluster_below'] else 'not <'} {cfg.criteria.max_cluster_over_lnk}), normalised NMI gain "
             f"{cells[key]['gain_norm_nmi']:+.3f} ({'>=' if v['gain_reached'] else '<'} "
             f"{cfg.criteria.min_gain_norm_nmi}) -> {'PASS' if v['passed'] else 'FAIL'}")
    passed = all(c["verdict"]["passed"] for c in cells.values())
    first = cells[f"s{cfg.seeds[0]}"]
    if first.get("heatmaps") and Path(first["heatmaps"]).exists():
        shutil.copyfile(first["heatmaps"], storage / "heatmaps_grid.png")
    results = {"name": cfg.name, "seeds": cfg.seeds, "criteria": to_dict(cfg.criteria), "passed": passed,
               "wall_seconds_this_invocation": round(time.perf_counter() - t0, 1), "cells": cells}
    atomic_write_json(storage / "results.json", results)
    table = summary_markdown(cfg, cells)
    atomic_write_text(storage / "summary.md", table)
    echo(table)
    echo(f"{'PASSED' if passed else 'NOT PASSED'}: results {storage / 'results.json'}, MLflow {tracking_uri(cfg)}")
    return results


__all__ = ["RegionAwarenessConfig", "load_region_awareness", "run_region_awareness", "is_region_awareness_file"]
