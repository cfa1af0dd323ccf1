"""Metrics of the attribute (multi-label) and affect (valence / arousal regression) evaluations.

Like FER's confusion matrices, every metric here is a function of *additive* statistics, so the
workers all-reduce-sum them and a sharded evaluation gives exactly the single-process numbers:

* attributes (DOWNSTREAM_SPEC §1, FRA's ``main_far.py``): a logit counts as a positive when
  sigmoid(logit) >= 0.5, i.e. logit >= 0. Per attribute the statistics are correct, true
  positives, positives, true negatives and negatives; accuracy is the element-wise accuracy
  over images x attributes, which equals the mean over attributes of the per-attribute accuracy
  (the reference's number). Balanced accuracy (mean of TPR and TNR) is added because CelebA's
  attributes are imbalanced (ours, not the reference's).
* affect (DOWNSTREAM_SPEC §5, emonet's ``metrics.py`` as FRL reports them): per target, the sums
  n, sum y, sum p, sum y^2, sum p^2, sum y p, sum (y - p)^2 and the number of sign agreements. From them RMSE,
  PCC (Pearson), CCC = 2 cov / (var_y + var_p + (mean_y - mean_p)^2) with population moments
  (ddof 0) and SAGR = mean(sign(y) == sign(p)) (sign(0) = 0, so a target of exactly 0 counts only
  when the prediction is exactly 0).

Accuracies are in percent; RMSE, PCC, CCC and SAGR are plain fractions as emonet prints them.
:func:`summarise_scalar` gives the honest headline of a run as FER's: the last epoch and the mean
of the last k, the best epoch selected on the test set labelled as such, and the epoch selected on
validation when there is one.
"""
from __future__ import annotations

import math
from typing import Callable, Sequence

import numpy as np

ATTRIBUTE_STATS = ("correct", "tp", "pos", "tn", "neg")
AFFECT_STATS = ("n", "sum_y", "sum_p", "sum_yy", "sum_pp", "sum_yp", "sum_se", "sign_agree")


# ---- attributes ----------------------------------------------------------------------------
def attribute_stats(logits, targets) -> np.ndarray:
    """(5, A) int64 statistics of one batch: rows :data:`ATTRIBUTE_STATS`.

    Args:
        logits: (N, A) raw scores; positive when >= 0 (sigmoid >= 0.5, the reference's threshold).
        targets: (N, A) 0/1 flags.
    """
    p = np.asarray(logits, dtype=np.float64) >= 0.0
    t = np.asarray(targets, dtype=np.float64)
    if p.shape != t.shape or p.ndim != 2:
        raise ValueError(f"logits {p.shape} and targets {t.shape} must both be (N, A)")
    if t.size and not np.isin(t, (0.0, 1.0)).all():
        raise ValueError("attribute targets must be 0 or 1")
    t = t > 0.5
    return np.stack([(p == t).sum(0), (p & t).sum(0), t.sum(0), (~p & ~t).sum(0), (~t).sum(0)]).astype(np.int64)


def attribute_report(stats, names: Sequence[str]) -> dict:
    """Mean and per-attribute accuracy (%) and balanced accuracy (%) from summed statistics."""
    s = np.asarray(stats, dtype=np.float64)
    if s.shape != (len(ATTRIBUTE_STATS), len(names)):
        raise ValueError(f"attribute statistics {s.shape} do not match {len(names)} attributes")
    correct, tp, pos, tn, neg = s
    n = pos + neg
    with np.errstate(invalid="ignore", divide="ignore"):
        acc = np.where(n > 0, 100.0 * correct / n, np.nan)
        tpr = np.where(pos > 0, tp / pos, np.nan)
        tnr = np.where(neg > 0, tn / neg, np.nan)
    balanced = 100.0 * np.nanmean(np.stack([tpr, tnr]), axis=0) if n.any() else np.full(len(names), np.nan)
    return {
        "mean_acc": float(100.0 * correct.sum() / n.sum()) if n.sum() else math.nan,
        "mean_balanced_acc": _nanmean(balanced),
        "per_attribute_acc": {k: _num(v) for k, v in zip(names, acc)},
        "per_attribute_balanced_acc": {k: _num(v) for k, v in zip(names, balanced)},
        "positive_rate": {k: _num(p / m) if m else None for k, p, m in zip(names, pos, n)},
        "num_samples": int(n[0]) if len(n) else 0,
    }


# ---- affect (regression) -------------------------------------------------------------------
def affect_stats(preds, targets) -> np.ndarray:
    """(8, D) float64 sums of one batch: rows :data:`AFFECT_STATS`, one column per target."""
    p = np.asarray(preds, dtype=np.float64)
    y = np.asarray(targets, dtype=np.float64)
    if p.shape != y.shape or p.ndim != 2:
        raise ValueError(f"predictions {p.shape} and targets {y.shape} must both be (N, D)")
    return np.stack([np.full(p.shape[1], p.shape[0], np.float64), y.sum(0), p.sum(0), (y * y).sum(0),
                     (p * p).sum(0), (y * p).sum(0), ((y - p) ** 2).sum(0), (np.sign(y) == np.sign(p)).sum(0)])


def affect_metrics_from_stats(stats) -> dict[str, np.ndarray]:
    """RMSE, PCC, CCC and SAGR per target (arrays of length D) from summed statistics."""
    n, sy, sp, syy, spp, syp, sse, agree = np.asarray(stats, dtype=np.float64)
    with np.errstate(invalid="ignore", divide="ignore"):
        my, mp = sy / n, sp / n
        vy, vp = syy / n - my ** 2, spp / n - mp ** 2  # population variances (ddof 0)
        cov = syp / n - my * mp
        vy, vp = np.maximum(vy, 0.0), np.maximum(vp, 0.0)  # float round-off of constant columns
        return {"rmse": np.sqrt(sse / n), "pcc": cov / np.sqrt(vy * vp),
                "ccc": 2 * cov / (vy + vp + (my - mp) ** 2), "sagr": agree / n}


def affect_report(stats, names: Sequence[str]) -> dict:
    """``{metric: {target: value}}`` plus the mean CCC over targets (``mean_ccc``) and ``num_samples``."""
    s = np.asarray(stats, dtype=np.float64)
    if s.shape != (len(AFFECT_STATS), len(names)):
        raise ValueError(f"affect statistics {s.shape} do not match targets {list(names)}")
    metrics = affect_metrics_from_stats(s)
    out = {m: {k: _num(v) for k, v in zip(names, vals)} for m, vals in metrics.items()}
    out["mean_ccc"] = _nanmean(metrics["ccc"])
    out["num_samples"] = int(s[0, 0]) if len(names) else 0
    return out


# Direct formulas on arrays (for reports and tests; the evaluation uses the statistics above).
def rmse(y, p) -> float:
    y, p = np.asarray(y, np.float64), np.asarray(p, np.float64)
    return float(np.sqrt(np.mean((y - p) ** 2)))


def pcc(y, p) -> float:
    return float(np.corrcoef(np.asarray(y, np.float64), np.asarray(p, np.float64))[0, 1])


def ccc(y, p) -> float:
    y, p = np.asarray(y, np.float64), np.asarray(p, np.float64)
    rho = pcc(y, p)
    return float(2 * rho * y.std() * p.std() / (y.var() + p.var() + (y.mean() - p.mean()) ** 2))


def sagr(y, p) -> float:
    return float(np.mean(np.sign(np.asarray(y, np.float64)) == np.sign(np.asarray(p, np.float64))))


# ---- run summaries -------------------------------------------------------------------------
def summarise_scalar(history: list[dict], score: Callable[[object], float], *, key: str = "test_stats",
                     last_k: int = 5, eval_every: int = 1, higher_is_better: bool = True) -> dict:
    """The headline of a run from per-epoch statistics, as FER's :func:`fra.evaluation.metrics.summarise`.

    Args:
        history: entries ``{"epoch", key: stats, ["val_stats": stats]}``; entries without ``key``
            were not evaluated.
        score: statistics -> the scalar the headline reports (mean accuracy, mean CCC ...).
        last_k: the headline mean covers the evaluations of the last ``last_k`` epochs.
        eval_every: the reference's evaluation period; the best epoch (on test or on validation)
            is picked among its epochs only.
        higher_is_better: direction of ``score``.

    Returns:
        ``last``, ``mean_last_k``, ``last_k``, ``best`` and ``best_epoch`` (selected on the test
        set: optimistic, the reference's way), ``best_candidates``, ``last_epoch``, ``curve``
        and, with validation statistics, ``val_best_epoch``, ``val_best`` and ``at_val_best``.
    """
    evaluated = [h for h in history if h.get(key) is not None]
    if not evaluated:
        raise ValueError("no evaluated epoch in the history")
    sign = 1.0 if higher_is_better else -1.0
    curve = [(int(h["epoch"]), score(h[key])) for h in evaluated]
    last_epoch = curve[-1][0]
    tail = [v for e, v in curve if e > last_epoch - last_k]
    scheduled = [h for h in evaluated if int(h["epoch"]) % eval_every == 0] or evaluated
    candidates = [(int(h["epoch"]), score(h[key])) for h in scheduled]
    best_epoch, best = max(candidates, key=lambda ev: (sign * _finite(ev[1]), -ev[0]))  # ties: the earliest
    out = {"last": curve[-1][1], "mean_last_k": float(np.mean(tail)), "last_k": len(tail), "best": best,
           "best_epoch": best_epoch, "best_candidates": len(candidates), "eval_every": eval_every,
           "last_epoch": last_epoch, "curve": [{"epoch": e, "value": v} for e, v in curve]}
    with_val = [h for h in scheduled if h.get("val_stats") is not None]
    if with_val:
        pick = max(with_val, key=lambda h: (sign * _finite(score(h["val_stats"])), -int(h["epoch"])))
        out.update(val_best_epoch=int(pick["epoch"]), val_best=score(pick["val_stats"]),
                   at_val_best=score(pick[key]))
    return out


def _finite(x: float) -> float:
    return x if math.isfinite(x) else -math.inf


def _nanmean(x) -> float:
    x = np.asarray(x, np.float64)
    return float(np.nanmean(x)) if np.isfinite(x).any() else math.nan


def _num(x) -> float | None:
    return None if x is None or not np.isfinite(x) else float(x)


__all__ = ["ATTRIBUTE_STATS", "AFFECT_STATS", "attribute_stats", "attribute_report", "affect_stats",
           "affect_metrics_from_stats", "affect_report", "rmse", "pcc", "ccc", "sagr", "summarise_scalar"]
