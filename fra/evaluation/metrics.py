"""FER metrics from confusion matrices: accuracy, mean per-class accuracy, macro-F1, summaries.

Every metric is computed from a ``(C, C)`` confusion matrix (rows = true class, columns =
prediction), which is also what the workers all-reduce, so a sharded evaluation gives exactly
the numbers of a single-process one. Accuracies and F1 are in percent, like the reference's
printout (FRA_SPEC §9).

The reference reports only the best test-set top-1 over its evaluations, every ``--eval-freq``
epochs (5 in its README: the best of 20 over 100 epochs, selected on the test set). The headline
here is the last-epoch top-1 and the mean over the last ``last_k`` epochs; the best epoch is kept,
labelled as such, selected over the reference's schedule only, for comparison with published
numbers. :func:`is_evaluated_epoch` is the schedule that serves both: every ``eval_every``-th
epoch plus each of the last ``last_k``.
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Sequence

import numpy as np

from fra.utils.io import atomic_write_bytes


def confusion_matrix(preds, labels, num_classes: int) -> np.ndarray:
    """Count (true, predicted) pairs.

    Args:
        preds: predicted classes, shape (N,).
        labels: true classes, shape (N,).
        num_classes: C.

    Returns:
        int64 (C, C), ``m[t, p]`` = number of samples of class t predicted as p.
    """
    p = np.asarray(preds, dtype=np.int64).ravel()
    t = np.asarray(labels, dtype=np.int64).ravel()
    if p.shape != t.shape:
        raise ValueError(f"preds {p.shape} and labels {t.shape} differ in length")
    if t.size and (t.min() < 0 or t.max() >= num_classes or p.min() < 0 or p.max() >= num_classes):
        raise ValueError(f"labels/predictions outside [0, {num_classes})")
    return np.bincount(t * num_classes + p, minlength=num_classes * num_classes).reshape(num_classes, num_classes)


def top1(conf: np.ndarray) -> float:
    """Overall accuracy (%) of a confusion matrix; NaN when it is empty."""
    conf = np.asarray(conf)
    total = conf.sum()
    return float(100.0 * np.trace(conf) / total) if total else math.nan


def per_class_accuracy(conf: np.ndarray) -> np.ndarray:
    """Recall of each class (%); NaN for classes absent from the evaluated set."""
    conf = np.asarray(conf, dtype=np.float64)
    support = conf.sum(axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(support > 0, 100.0 * np.diag(conf) / support, np.nan)


def mean_class_accuracy(conf: np.ndarray) -> float:
    """Mean of the per-class accuracies over the classes present (%)."""
    acc = per_class_accuracy(conf)
    return float(np.nanmean(acc)) if np.isfinite(acc).any() else math.nan


def per_class_f1(conf: np.ndarray) -> np.ndarray:
    """F1 of each class (%): ``2 tp / (2 tp + fp + fn)``.

    NaN for a class that is neither present nor predicted (F1 undefined); 0 for a class that is
    present but never predicted correctly.
    """
    conf = np.asarray(conf, dtype=np.float64)
    tp = np.diag(conf)
    denom = conf.sum(axis=0) + conf.sum(axis=1)  # = 2 tp + fp + fn
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(denom > 0, 100.0 * 2 * tp / denom, np.nan)


def macro_f1(conf: np.ndarray) -> float:
    """Unweighted mean of the per-class F1 over the classes where it is defined (%)."""
    f1 = per_class_f1(conf)
    return float(np.nanmean(f1)) if np.isfinite(f1).any() else math.nan


def class_report(conf: np.ndarray, classes: Sequence[str]) -> dict:
    """All metrics of one confusion matrix, per-class values keyed by class name."""
    conf = np.asarray(conf, dtype=np.int64)
    if conf.shape != (len(classes), len(classes)):
        raise ValueError(f"confusion {conf.shape} does not match {len(classes)} classes")
    acc, f1 = per_class_accuracy(conf), per_class_f1(conf)
    return {
        "top1": top1(conf),
        "mean_class_acc": mean_class_accuracy(conf),
        "macro_f1": macro_f1(conf),
        "per_class_acc": {c: _num(a) for c, a in zip(classes, acc)},
        "per_class_f1": {c: _num(v) for c, v in zip(classes, f1)},
        "support": {c: int(s) for c, s in zip(classes, conf.sum(axis=1))},
        "num_samples": int(conf.sum()),
        "confusion": conf.tolist(),
    }


def is_evaluated_epoch(epoch: int, epochs: int, eval_every: int = 1, last_k: int = 1) -> bool:
    """Whether the (1-based) ``epoch`` of ``epochs`` is evaluated: the reference's schedule (every
    ``eval_every``-th epoch, ``--eval-freq``) plus each of the last ``last_k`` epochs, so that the
    headline mean covers the last ``last_k`` epochs whatever ``eval_every`` is."""
    return epoch % eval_every == 0 or epoch > epochs - last_k


def summarise(history: list[dict], classes: Sequence[str], last_k: int = 5, eval_every: int = 1) -> dict:
    """Summarise the per-epoch evaluations of one run.

    Args:
        history: one entry per evaluated epoch, ``{"epoch": int, "test_confusion": (C, C)}``
            and optionally ``"val_confusion"``.
        classes: class names in label order.
        last_k: the headline mean covers the evaluations of the last ``last_k`` epochs.
        eval_every: the reference's evaluation period; the best epoch (on test or on validation)
            is selected among the epochs it evaluates (multiples of ``eval_every``) only.

    Returns:
        ``top1_last``, ``top1_mean_last_k`` over the last ``last_k`` epochs' evaluations (headline;
        ``last_k`` says how many there were), ``top1_best`` and ``best_epoch`` (selected on the
        test set among ``best_candidates`` evaluations, the reference's number), the full report
        of the last epoch under ``last``, ``top1_curve`` and, with a validation split,
        ``val_best_epoch`` and ``top1_at_val_best`` (test top-1 at the epoch with the best
        validation top-1, chosen among the same epochs).
    """
    evaluated = [h for h in history if h.get("test_confusion") is not None]
    if not evaluated:
        raise ValueError("no evaluated epoch in the history")
    curve = [(int(h["epoch"]), top1(h["test_confusion"])) for h in evaluated]
    last_epoch = curve[-1][0]
    tail = [acc for e, acc in curve if e > last_epoch - last_k]
    # NOTE: "best epoch" as the reference: max over its own schedule only; the extra evaluations
    # of the last epochs (for the headline) would otherwise give the test set more picks.
    scheduled = [h for h in evaluated if int(h["epoch"]) % eval_every == 0] or evaluated
    candidates = [(int(h["epoch"]), top1(h["test_confusion"])) for h in scheduled]
    best_epoch, best = max(candidates, key=lambda ea: (ea[1], -ea[0]))  # ties: the earliest
    out = {
        "top1_last": curve[-1][1],
        "top1_mean_last_k": float(np.mean(tail)),
        "last_k": len(tail),
        "top1_best": best,
        "best_epoch": best_epoch,
        "best_candidates": len(candidates),
        "eval_every": eval_every,
        "last_epoch": last_epoch,
        "top1_curve": [{"epoch": e, "top1": a} for e, a in curve],
        "last": class_report(evaluated[-1]["test_confusion"], classes),
    }
    with_val = [h for h in scheduled if h.get("val_confusion") is not None]
    if with_val:
        pick = max(with_val, key=lambda h: (top1(h["val_confusion"]), -h["epoch"]))
        out["val_best_epoch"] = int(pick["epoch"])
        out["val_top1_best"] = top1(pick["val_confusion"])
        out["top1_at_val_best"] = top1(pick["test_confusion"])
        out["val_last"] = class_report([h for h in evaluated if h.get("val_confusion") is not None][-1]["val_confusion"],
                                       classes)
    return out


def plot_confusion(conf: np.ndarray, classes: Sequence[str], path: str | Path, title: str = "") -> Path:
    """Write a row-normalised confusion matrix with counts as a PNG (atomically)."""
    import io

    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    conf = np.asarray(conf, dtype=np.int64)
    with np.errstate(invalid="ignore", divide="ignore"):
        norm = np.nan_to_num(conf / conf.sum(axis=1, keepdims=True))
    n = len(classes)
    fig, ax = plt.subplots(figsize=(1.0 + 0.75 * n, 0.8 + 0.7 * n), dpi=100)
    ax.imshow(norm, cmap="Blues", vmin=0.0, vmax=1.0)
    for t in range(n):
        for p in range(n):
            ax.text(p, t, f"{100 * norm[t, p]:.0f}\n({conf[t, p]})", ha="center", va="center", fontsize=7,
                    color="white" if norm[t, p] > 0.6 else "black")
    ax.set_xticks(range(n), classes, rotation=45, ha="right")
    ax.set_yticks(range(n), classes)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(title or f"top-1 {top1(conf):.2f}%  mean-class {mean_class_accuracy(conf):.2f}%", fontsize=9)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    plt.close(fig)
    return atomic_write_bytes(path, buf.getvalue())


def _num(x: float) -> float | None:
    """JSON-friendly float: NaN becomes None."""
    return None if not np.isfinite(x) else float(x)
