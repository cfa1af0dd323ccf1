"""Sweep outputs: the results table (CSV + console), the objective plot, the best config files
(a pretrain config and a ``fra run`` pipeline).

Rows come from Tune's trials plus each trial's files. A trial's status is ``completed`` (its
``result.json`` holds the chained evaluation's objective), ``stopped_early`` (the scheduler recorded
``stopped_early.json`` before the evaluation), ``failed`` (Tune error, or training stopped by a
guard) or ``unfinished`` (an interrupted sweep). The columns follow ``objective.task`` (FER's
validation top-1 / macro-F1 and test numbers, or the landmark job's validation and test NME), and
the best trial is the highest objective, or the lowest for a ``min`` objective (NME).
"""
from __future__ import annotations

import copy
import csv
import io
import logging
import math
from typing import Any

import yaml

from fra import storage as st
from fra.redaction import redact
from fra.tuning.config import SweepConfig, finite, objective_mode
from fra.tuning.space import Param, set_paths
from fra.tuning.trial import STARTS_FILE

log = logging.getLogger(__name__)

STOPPED_FILE = "stopped_early.json"
# The chained evaluation's columns per objective.task (validation first: it is what selects).
TASK_COLUMNS = {"fer": ("val_top1", "val_macro_f1", "test_top1_last", "test_top1_mean_last5", "test_macro_f1"),
                "landmarks": ("val_nme", "val_nme_best", "test_nme_last", "test_nme_mean_last_k", "test_fr_last",
                              "test_auc_last")}
METRIC_COLUMNS = ("epochs", "proxy_top1", "objective", *TASK_COLUMNS["fer"], "seconds", "starts")
# What the objective is, for plot labels: (short name, unit).
OBJECTIVE_LABELS = {"val_top1": ("FER val top-1", "%"), "val_top1_best": ("FER best val top-1", "%"),
                    "val_macro_f1": ("FER val macro-F1", "%"), "val_nme": ("landmark val NME", "%"),
                    "val_nme_best": ("landmark best val NME", "%")}


def metric_columns(task: str = "fer") -> tuple[str, ...]:
    """The table's metric columns for ``objective.task``."""
    return ("epochs", "proxy_top1", "objective", *TASK_COLUMNS[task], "seconds", "starts")


def collect_rows(grid, params: list[Param], exp_dir: str, task: str = "fer") -> list[dict]:
    """One row per trial: id, status, searched values, proxy, the task's metrics, compute time, starts."""
    analysis = grid._experiment_analysis  # NOTE: the Trial objects (status) are only reachable here
    frames = analysis.trial_dataframes
    starts = count_starts(exp_dir)
    rows = []
    for trial in sorted(analysis.trials, key=lambda t: t.trial_id):
        tid = trial.trial_id
        done_file = st.join(exp_dir, "trials", tid, "result.json")
        done = st.read_json(done_file) if st.is_file(done_file) else {}
        final = done.get("report") or {}
        last = dict(trial.last_result or {})
        df = frames.get(tid)
        stopped = st.is_file(st.join(exp_dir, "trials", tid, STOPPED_FILE))
        row: dict[str, Any] = {"trial_id": tid, "status": _status(trial.status, final, stopped)}
        row.update({p.name: trial.config.get(p.path) for p in params})
        row["epochs"] = _last(df, "epoch", last.get("epoch"))
        row["proxy_top1"] = _last(df, "proxy_top1", None)
        for key in ("objective", *TASK_COLUMNS[task]):
            row[key] = final.get(key, last.get(key))
        row["seconds"] = last.get("time_total_s")
        row["starts"] = starts.get(tid, 0)
        row["error"] = final.get("failure") or (_error_line(trial) if trial.status == "ERROR" else "")
        rows.append(row)
    return rows


def _error_line(trial) -> str:
    text = str(trial.get_error() or "")
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    return lines[-1][:300] if lines else "error"


def _status(tune_status: str, final: dict, stopped: bool) -> str:
    if finite(final.get("objective")):
        return "completed"
    if tune_status == "ERROR" or final.get("failure"):
        return "failed"
    return "stopped_early" if stopped else "unfinished"


def _last(df, column: str, default):
    if df is None or column not in df:
        return default
    values = [v for v in df[column].tolist() if finite(v)]
    return values[-1] if values else default


def count_starts(exp_dir: str) -> dict[str, int]:
    """How many times each trial's trainable started (from ``trials/<id>/starts.json``)."""
    out: dict[str, int] = {}
    for path in st.list_files(st.join(exp_dir, "trials"), recursive=True):
        if st.basename(path) == STARTS_FILE:
            for entry in st.read_json(path):
                out[entry["trial_id"]] = out.get(entry["trial_id"], 0) + 1
    return out


def best_row(rows: list[dict], mode: str = "max") -> dict | None:
    """The completed trial with the highest objective (``mode="min"``: the lowest, as for NME;
    ties: the earlier trial)."""
    if mode not in ("max", "min"):
        raise ValueError(f"mode must be 'max' or 'min', got {mode!r}")
    done = [r for r in rows if r["status"] == "completed"]
    if not done:
        return None
    return (min if mode == "min" else max)(done, key=lambda r: r["objective"])


def write_table(rows: list[dict], params: list[Param], path: str, task: str = "fer") -> str:
    columns = ["trial_id", "status", *[p.name for p in params], *metric_columns(task), "error"]
    buf = io.StringIO()
    writer = csv.DictWriter(buf, columns, extrasaction="ignore")
    writer.writeheader()
    for row in rows:
        writer.writerow({k: "" if row.get(k) is None else row.get(k) for k in columns})
    return st.write_text(path, buf.getvalue())


def format_table(rows: list[dict], params: list[Param], task: str = "fer") -> str:
    """A fixed-width console table (the CSV without the error column)."""
    columns = ["trial_id", "status", *[p.name for p in params], *metric_columns(task)]
    cells = [[_fmt(r.get(c)) for c in columns] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) if cells else len(c) for i, c in enumerate(columns)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(columns, widths))]
    lines += ["  ".join(v.ljust(w) for v, w in zip(row, widths)) for row in cells]
    return "\n".join(lines)


def _fmt(v: Any) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "-"
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)


def plot_objective(rows: list[dict], params: list[Param], path: str, objective=None) -> str | None:
    """Objective against each searched parameter; stopped trials at their last proxy value.

    ``objective`` (:class:`~fra.tuning.config.ObjectiveSettings`, default FER val top-1) names the
    y axis and the direction; with a ``min`` objective (NME) the proxy of stopped trials, an accuracy,
    is not drawn on the same axis.
    """
    if not rows:
        return None
    metric = objective.metric if objective is not None else "val_top1"
    mode = objective_mode(objective) if objective is not None else "max"
    name, unit = OBJECTIVE_LABELS[metric]
    same_axis = mode == "max"  # the proxy (linear-probe top-1) shares the axis of accuracy objectives only
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    best = best_row(rows, mode)
    fig, axes = plt.subplots(1, len(params), figsize=(3.4 * len(params), 3.0), dpi=100, squeeze=False)
    for ax, p in zip(axes[0], params):
        values = [r[p.name] for r in rows]
        numeric = all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values)
        labels = sorted({repr(v) for v in values}) if not numeric else []
        xs = [v if numeric else labels.index(repr(v)) for v in values]
        for x, r in zip(xs, rows):
            if r["status"] == "completed":
                ax.scatter(x, r["objective"], color="tab:blue", zorder=3)
            elif same_axis and finite(r.get("proxy_top1")):
                ax.scatter(x, r["proxy_top1"], facecolors="none", edgecolors="gray", zorder=2)
        if best is not None:
            bx = best[p.name] if numeric else labels.index(repr(best[p.name]))
            ax.scatter(bx, best["objective"], marker="*", s=180, color="tab:red", zorder=4)
        if numeric and p.kind.startswith(("log", "qlog")):
            ax.set_xscale("log")
            ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())  # avoid overlapping labels
        if not numeric:
            ax.set_xticks(range(len(labels)), labels)
        ax.set_xlabel(p.name)
        ax.grid(alpha=0.3)
    better = "lower is better" if mode == "min" else "higher is better"
    axes[0][0].set_ylabel(f"objective ({name}, {unit}; {better})")
    hollow = " · hollow: proxy of early-stopped trials" if same_axis else ""
    which = "lowest" if mode == "min" else "highest"
    fig.suptitle(f"filled: chained objective ({metric}){hollow} · star: best ({which})", fontsize=8)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    plt.close(fig)
    return st.write_bytes(path, buf.getvalue())


def write_best(row: dict, exp_dir: str, cfg: SweepConfig, evaluation: dict, tracking_uri: str = "") -> dict[str, str]:
    """Write the best trial's ``best_pretrain.yaml``, ``best_pipeline.yaml`` and ``best.json``.

    ``best_pretrain.yaml`` is a PretrainConfig (``fra pretrain`` runs it); ``best_pipeline.yaml`` is
    a pipeline (``fra run`` runs it, see :func:`best_pipeline`).

    Args:
        row: the best row of :func:`collect_rows`.
        exp_dir: the sweep directory (holds ``trials/<id>/pretrain.yaml`` and ``result.json``).
        cfg: the sweep config.
        evaluation: the mapping of the chained evaluation (FER or landmarks per ``objective.task``; shards
            filled in).
        tracking_uri: the MLflow URI the sweep logged to ("" = the pipeline's own sqlite file).
    """
    tid = row["trial_id"]
    trial_cfg = yaml.safe_load(st.read_text(st.join(exp_dir, "trials", tid, "pretrain.yaml")))
    base_pretrain = cfg.pretrain
    # The trial's own settings, but a fresh run name and the base's storage and tracking.
    standalone = {**trial_cfg, "run": {**trial_cfg["run"], "name": f"{cfg.run.name}-best",
                                       "storage_path": base_pretrain.get("run", {}).get("storage_path", "runs")},
                  "tracking": {**trial_cfg["tracking"], "enabled": True, **base_pretrain.get("tracking", {})}}
    pipeline = best_pipeline(trial_cfg, cfg, evaluation, tracking_uri,
                             st.join(st.dirname(exp_dir), f"{cfg.run.name}-best"))
    if cfg.objective.task == "landmarks":
        what = (f"lowest; landmark validation carve; test NME last = {_fmt(row.get('test_nme_last'))}")
    else:
        what = f"highest; FER validation split; test top-1 last = {_fmt(row.get('test_top1_last'))}"
    header = (f"# Best trial {tid} of sweep {cfg.run.name}: {cfg.objective.metric} = {row['objective']:.4g} "
              f"({what}).\n# Written by fra tune from {exp_dir}.\n")
    stage = pipeline["stages"][1]
    out = {"config": st.join(exp_dir, "best_pretrain.yaml"), "pipeline": st.join(exp_dir, "best_pipeline.yaml"),
           "json": st.join(exp_dir, "best.json")}
    st.write_text(out["config"], header + f"# Run: fra pretrain {out['config']}\n"
                      + yaml.safe_dump(redact(standalone), sort_keys=False))
    st.write_text(out["pipeline"], header + f"# Run: fra run {out['pipeline']}  (pretrain -> {stage} -> "
                      f"register -> promote; --set stages=[pretrain,{stage}] to skip the registry)\n"
                      + yaml.safe_dump(redact(pipeline), sort_keys=False))
    done = st.read_json(st.join(exp_dir, "trials", tid, "result.json"))
    st.write_json(out["json"], {"trial_id": tid, "params": done["params"], "report": done["report"],
                                    "pretrain": done.get("pretrain", {}),
                                    cfg.objective.task: done.get(cfg.objective.task, {}),
                                    "config": str(out["config"]), "pipeline": str(out["pipeline"])})
    return out


def best_pipeline(trial_cfg: dict, cfg: SweepConfig, evaluation: dict, tracking_uri: str, storage: str) -> dict:
    """A ``fra run`` pipeline reproducing a trial: pretrain -> evaluation -> register -> promote.

    The pretrain section is the trial's resolved config and the evaluation section the trial's
    chained evaluation (same data and validation carve; FER: same protocol) of the pipeline's own
    pretraining: ``evaluate`` for FER, ``landmarks`` for a landmark objective, whose promotion
    gates on the headline NME, lower is better. Run names, storage and the MLflow URI are left to
    the pipeline unless the sweep's base sections set them.
    """
    pretrain = _pipeline_section(trial_cfg, cfg.pretrain)
    pretrain["tracking"] = {**pretrain["tracking"], "enabled": True, **cfg.pretrain.get("tracking", {})}
    if cfg.objective.task == "landmarks":
        values = {"backbone.source": "auto", "tracking.enabled": True}
        if not evaluation.get("data", {}).get("val_fraction"):
            values["data.val_fraction"] = cfg.objective.val_fraction
        stage, written = "landmarks", cfg.landmarks
        promote = {"gate_metric": "landmarks_nme_mean_last_k", "mode": "min", "margin": 0.0}
    else:
        values = {"protocol": cfg.objective.protocol, "backbone.source": "auto", "tracking.enabled": True}
        if not evaluation.get("data", {}).get("val_split"):
            values["data.val_fraction"] = cfg.objective.val_fraction
        stage, written = "evaluate", cfg.fer
        promote = {"gate_metric": "fer_top1_mean_last5", "margin": 0.0}
    section = _pipeline_section(set_paths(evaluation, values), written)
    ray = {k: v for k, v in (("address", cfg.run.ray_address), ("num_cpus", cfg.run.num_cpus)) if v}
    return {"name": f"{cfg.run.name}-best", "storage_path": str(storage),
            "stages": ["pretrain", stage, "register", "promote"], **({"ray": ray} if ray else {}),
            "tracking": {"mlflow_uri": tracking_uri}, "pretrain": pretrain, stage: section,
            "register": {"name": cfg.run.name}, "promote": promote}


def _pipeline_section(resolved: dict, written: dict) -> dict:
    """``resolved`` without the run name, and without storage and MLflow URI unless ``written`` sets them."""
    out = copy.deepcopy(resolved)
    out["run"].pop("name", None)
    for section, key in (("run", "storage_path"), ("tracking", "mlflow_uri")):
        if key not in (written.get(section) or {}):
            out.get(section, {}).pop(key, None)
    return out


__all__ = ["collect_rows", "count_starts", "best_row", "write_table", "format_table", "plot_objective",
           "write_best", "best_pipeline", "metric_columns", "METRIC_COLUMNS", "TASK_COLUMNS", "STOPPED_FILE"]
