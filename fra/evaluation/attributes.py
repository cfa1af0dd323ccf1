"""Facial attribute recognition (DOWNSTREAM_SPEC §1, FRA's ``main_far.py``) on Ray Train.

Python API:

* ``AttributesConfig`` — FER's sections (``data``, ``optim``, ``scaling``, ``backbone``,
  ``tracking``, ``run``; :mod:`fra.evaluation.fer`) plus ``task.head``. Load with
  ``load_config(AttributesConfig, path, overrides)``.
* ``evaluate_attributes(cfg, backbone_source=None, *, run_name=None) -> TargetResult``.

The reference's protocol: a torchvision ResNet whose ``fc`` is the attribute MLP
(:class:`fra.models.heads.AttributeMLP`: 512 -> 256 -> 40 with BN, dropout 0.2, ReLU), binary
cross-entropy averaged over images x attributes (no positive weights), the reference's transforms
(FER's without RandomErasing: resize to S x S, flip, colour jitter, translate, rotate; test: resize),
VGGFace2 normalisation. A logit >= 0 (sigmoid >= 0.5) predicts the attribute. Metrics: mean binary
accuracy over images x attributes (= mean of the per-attribute accuracies; the reference's
number), per-attribute accuracy, and (ours) balanced accuracy per attribute and its mean.

Honest reporting as FER's: the headline is the last epoch's mean accuracy and the mean over the
last ``run.last_k`` epochs; the reference prints the best epoch selected on the *test* split, kept
as ``best_epoch_selected_on_test``; ``data.val_split: val`` (CelebA's valid split, which the
reference never uses) adds the test accuracy at the epoch picked on validation.

Optimiser defaults (ours, DOWNSTREAM_SPEC §7.2: no CelebA command exists in the reference):
``finetune`` = AdamW, lr = lr_head = 2e-4, weight decay 0.05 (FRA's FER recipe), cosine after a
5-epoch warm-up; ``linear`` = the trunk frozen (BN statistics too) and only the head trained with
SGD at the reference's ``--lr_head`` 0.02. # NOTE: the reference's linear-probe path crashes
(DOWNSTREAM_SPEC §1, surprise 1); this one trains the whole MLP head on the frozen trunk.
"""
from __future__ import annotations

from dataclasses import field
from pathlib import Path
from typing import Any

import numpy as np

from fra.config import config, location, one_of
from fra.evaluation.fer import FERBackbone, FERData, FEROptim, FERRun, FERScaling
from fra.evaluation.target_metrics import attribute_report
from fra.evaluation.targets import JobKind, TargetResult, run_job

DEFAULTS = {"finetune": {"optimizer": "adamw", "lr": 2e-4, "lr_head": 2e-4, "weight_decay": 0.05},
            "linear": {"optimizer": "sgd", "lr": 0.02, "lr_head": None, "weight_decay": 0.0}}


@config("task")
class AttributesTask:
    head: str = one_of("mlp", "linear")  # mlp: the reference's attribute head; linear: one Linear


@config("tracking")
class AttributesTracking:
    enabled: bool = True
    mlflow_uri: str = location("")  # "" = sqlite under run.storage_path
    experiment: str = "fra-attributes"


@config()
class AttributesConfig:
    """Everything ``fra evaluate attributes`` needs (see the module docstring)."""

    protocol: str = one_of("finetune", "linear")
    data: FERData = field(default_factory=FERData)
    optim: FEROptim = field(default_factory=FEROptim)
    scaling: FERScaling = field(default_factory=FERScaling)
    backbone: FERBackbone = field(default_factory=FERBackbone)
    tracking: AttributesTracking = field(default_factory=AttributesTracking)
    run: FERRun = field(default_factory=lambda: FERRun(name="attributes"))
    task: AttributesTask = field(default_factory=AttributesTask)


def mean_accuracy(stats) -> float:
    """Mean binary accuracy (%) of summed statistics (what each epoch reports to Ray)."""
    s = np.asarray(stats, np.float64)
    return float(100.0 * s[0].sum() / (s[2] + s[4]).sum()) if (s[2] + s[4]).sum() else float("nan")


def plot_attributes(report: dict, names: list[str], path: Path, title: str) -> Path:
    """Horizontal bars: accuracy and balanced accuracy per attribute (%)."""
    import io

    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    from fra.utils.io import atomic_write_bytes

    acc = [report["per_attribute_acc"][n] or 0.0 for n in names]
    bal = [report["per_attribute_balanced_acc"][n] or 0.0 for n in names]
    y = np.arange(len(names))
    fig, ax = plt.subplots(figsize=(7, 1.2 + 0.22 * len(names)), dpi=100)
    ax.barh(y - 0.2, acc, height=0.4, label="accuracy")
    ax.barh(y + 0.2, bal, height=0.4, label="balanced accuracy")
    ax.set_yticks(y, names, fontsize=7)
    ax.invert_yaxis()
    ax.set_xlim(0, 100)
    ax.set_xlabel("%")
    ax.legend(fontsize=7, loc="lower right")
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    plt.close(fig)
    return atomic_write_bytes(path, buf.getvalue())


JOB = JobKind(kind="attributes", column="attributes", manifest_field="attributes", metric="mean_acc",
              report=attribute_report, defaults=DEFAULTS, plot=plot_attributes)


def evaluate_attributes(cfg: AttributesConfig, backbone_source: Any = None, *, run_name: str | None = None
                        ) -> TargetResult:
    """Fine-tune or probe a backbone on attribute shards and write the results (module docstring)."""
    return run_job(cfg, JOB, {"head": cfg.task.head, "loss": "bce"}, backbone_source, run_name=run_name,
                   score=(__name__, "mean_accuracy"))


__all__ = ["AttributesConfig", "AttributesTask", "AttributesTracking", "evaluate_attributes", "mean_accuracy", "JOB"]
