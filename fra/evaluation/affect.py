"""Valence / arousal regression (DOWNSTREAM_SPEC §5; the affect numbers FRL reports) on Ray Train.

Python API:

* ``AffectConfig`` — FER's sections (:mod:`fra.evaluation.fer`) plus ``task`` (``head``,
  ``loss``, ``clip``). Load with ``load_config(AffectConfig, path, overrides)``.
* ``evaluate_affect(cfg, backbone_source=None, *, run_name=None) -> TargetResult``.

Data: shards with a ``targets`` column named ``[valence, arousal]`` in the manifest: AffectNet
through its reader (every card; ``affectnet_va`` keeps only rows with both values in [-1, 1],
protocol: the official validation CSV is the test set), or synthetic faces written with
``with_attributes=true`` (targets from :mod:`fra.data.synthetic_attributes`).

Protocol (ours where FRL publishes none, DOWNSTREAM_SPEC §5 and §7.6): the ResNet trunk with a
linear head of 2 outputs (``task.head: mlp`` puts the attribute MLP there instead), loss MSE +
(1 - CCC) (``task.loss``), FER's transforms without RandomErasing, predictions clipped to [-1, 1]
before scoring (emonet does; ``task.clip``). Metrics per target, from sums all-reduced over the
workers: CCC (the headline, mean over valence and arousal), PCC, RMSE and SAGR, as emonet computes
them (:mod:`fra.evaluation.target_metrics`). emonet's horizontal-flip test-time averaging and its
"cleaned" test subset are not applied.

Headline as FER's: the last epoch's mean CCC and the mean over the last ``run.last_k`` epochs; the
best epoch selected on the test split is kept, labelled as such.
"""
from __future__ import annotations

from dataclasses import field
from pathlib import Path
from typing import Any

import numpy as np

from fra.config import config, location, one_of
from fra.evaluation.fer import FERBackbone, FERData, FEROptim, FERRun, FERScaling
from fra.evaluation.target_metrics import affect_metrics_from_stats, affect_report
from fra.evaluation.targets import JobKind, TargetResult, run_job

DEFAULTS = {"finetune": {"optimizer": "adamw", "lr": 2e-4, "lr_head": 2e-4, "weight_decay": 0.05},
            "linear": {"optimizer": "sgd", "lr": 0.02, "lr_head": None, "weight_decay": 0.0}}


@config("task")
class AffectTask:
    head: str = one_of("linear", "mlp")
    loss: str = one_of("mse+ccc", "mse", "ccc")
    clip: bool = True  # clip predictions to [-1, 1] before scoring


@config("tracking")
class AffectTracking:
    enabled: bool = True
    mlflow_uri: str = location("")  # "" = sqlite under run.storage_path
    experiment: str = "fra-affect"


@config()
class AffectConfig:
    """Everything ``fra evaluate affect`` needs (see the module docstring)."""

    protocol: str = one_of("finetune", "linear")
    data: FERData = field(default_factory=FERData)
    optim: FEROptim = field(default_factory=FEROptim)
    scaling: FERScaling = field(default_factory=FERScaling)
    backbone: FERBackbone = field(default_factory=FERBackbone)
    tracking: AffectTracking = field(default_factory=AffectTracking)
    run: FERRun = field(default_factory=lambda: FERRun(name="affect"))
    task: AffectTask = field(default_factory=AffectTask)


def mean_ccc(stats) -> float:
    """Mean CCC over the targets of summed statistics (what each epoch reports to Ray)."""
    return float(np.nanmean(affect_metrics_from_stats(np.asarray(stats, np.float64))["ccc"]))


def plot_affect(report: dict, names: list[str], path: Path, title: str) -> Path:
    """Bars of CCC, PCC, RMSE and SAGR per target."""
    import io

    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    from fra.utils.io import atomic_write_bytes

    metrics = ("ccc", "pcc", "rmse", "sagr")
    x = np.arange(len(metrics))
    fig, ax = plt.subplots(figsize=(5, 3), dpi=100)
    for i, name in enumerate(names):
        vals = [report[m][name] if report[m][name] is not None else 0.0 for m in metrics]
        ax.bar(x + (i - (len(names) - 1) / 2) * 0.35, vals, width=0.35, label=name)
    ax.set_xticks(x, [m.upper() for m in metrics])
    ax.axhline(0, color="black", lw=0.5)
    ax.legend(fontsize=7)
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    plt.close(fig)
    return atomic_write_bytes(path, buf.getvalue())


JOB = JobKind(kind="affect", column="targets", manifest_field="targets", metric="mean_ccc", report=affect_report,
              defaults=DEFAULTS, plot=plot_affect)


def evaluate_affect(cfg: AffectConfig, backbone_source: Any = None, *, run_name: str | None = None) -> TargetResult:
    """Train a valence / arousal head on a backbone and write the results (module docstring)."""
    return run_job(cfg, JOB, {"head": cfg.task.head, "loss": cfg.task.loss, "clip": cfg.task.clip}, backbone_source,
                   run_name=run_name, score=(__name__, "mean_ccc"))


__all__ = ["AffectConfig", "AffectTask", "AffectTracking", "evaluate_affect", "mean_ccc", "JOB"]
