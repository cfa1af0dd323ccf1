"""Face-alignment metrics (DOWNSTREAM_SPEC §4): per-image NME, CED, failure rate and AUC, per subset.

* Per-image NME: ``(1/L) sum_l ||p_hat_l - p_l|| / d``, with ``d`` from the ground truth of that
  image: the distance between two points (inter-ocular: WFLW 60/72, 300W 36/45), between the
  means of two point groups (300W's inter-pupil), or from the face box (``box``: sqrt(w h),
  ``diag``: sqrt(w^2 + h^2), AFLW-19). Reported in percent.
* CED(x) = fraction of images with NME <= x on x = 0 .. thr in steps of 1e-4; FR@thr = 1 -
  CED(thr) (the fraction of *images* above thr, in percent); AUC@thr = Simpson(CED, x) / thr
  (a fraction, as STAR prints it).

NOTE: the references build x with ``np.arange(0, thr + step, step)``, which ends at 0.0501 for
thr = 0.05 and 0.0701 for 0.07 (float error) so their FR and AUC are taken slightly past thr;
here x is ``linspace(0, thr, round(thr / step) + 1)`` and ``reference_arange=True`` gives theirs.

Subsets: an image flagged 1 in attribute k belongs to subset k (WFLW's six attributes, 300W's
common / challenging, AFLW's frontal); every subset gets the same three numbers over its images.

Further normalisers: a report can carry the same three numbers under other normalisers next to
the protocol's (``nme_box`` / ``fr_box`` / ``auc_box``): AFLW-19 is published as NME_diag (FaRL,
FRL) and as NME_box = sqrt(w h) (FaRL), whose FR / AUC at 7 % FaRL takes box-normalised.
"""
from __future__ import annotations

import math
from typing import Sequence

import numpy as np

from fra.evaluation.metrics import is_evaluated_epoch

__all__ = ["normalizing_distance", "nme_per_image", "ced_fr_auc", "landmark_report", "summarise_landmarks",
           "is_evaluated_epoch"]

NORMALIZERS = ("inter_ocular", "inter_pupil", "box", "diag")


def normalizing_distance(gt: np.ndarray, kind: str, points: Sequence = (), boxes: np.ndarray | None = None
                         ) -> np.ndarray:
    """The per-image normaliser ``d`` (N,) from the ground truth.

    Args:
        gt: (N, L, 2) ground-truth points.
        kind: ``inter_ocular`` / ``inter_pupil`` (the distance between ``points[0]`` and
            ``points[1]``, each a point index or a list of indices whose mean is used), ``box``
            (sqrt(w h)) or ``diag`` (sqrt(w^2 + h^2)).
        points: the two points (or point groups) for the distance normalisers.
        boxes: (N, 4) x0, y0, x1, y1 for ``box`` / ``diag``.
    """
    gt = np.asarray(gt, np.float64)
    if kind in ("inter_ocular", "inter_pupil"):
        if len(points) != 2:
            raise ValueError(f"{kind} needs two points or point groups, got {points!r}")
        a, b = (gt[:, np.atleast_1d(p)].mean(axis=1) for p in points)
        return np.linalg.norm(a - b, axis=1)
    if kind in ("box", "diag"):
        if boxes is None:
            raise ValueError(f"normalizer {kind!r} needs the face boxes")
        boxes = np.asarray(boxes, np.float64)
        w, h = boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1]
        return np.sqrt(w * h) if kind == "box" else np.sqrt(w * w + h * h)
    raise ValueError(f"unknown normalizer {kind!r}; valid: {', '.join(NORMALIZERS)}")


def nme_per_image(pred: np.ndarray, gt: np.ndarray, norm: np.ndarray) -> np.ndarray:
    """(N,) mean point-to-point error of each image divided by its normaliser (a fraction, not %)."""
    pred, gt = np.asarray(pred, np.float64), np.asarray(gt, np.float64)
    if pred.shape != gt.shape or pred.ndim != 3 or pred.shape[-1] != 2:
        raise ValueError(f"pred {pred.shape} and gt {gt.shape} must both be (N, L, 2)")
    norm = np.asarray(norm, np.float64)
    if (norm <= 0).any():
        raise ValueError("a normalising distance is not positive (coincident reference points or an empty box)")
    return np.linalg.norm(pred - gt, axis=-1).mean(axis=-1) / norm


def ced_fr_auc(nme: np.ndarray, threshold: float, step: float = 1e-4, reference_arange: bool = False) -> dict:
    """Failure rate (%) and AUC (fraction) at ``threshold`` from per-image NMEs (fractions).

    Returns:
        ``{"fr": %, "auc": fraction, "threshold": thr}``; NaN for no images.
    """
    from scipy.integrate import simpson

    nme = np.asarray(nme, np.float64).ravel()
    if nme.size == 0:
        return {"fr": math.nan, "auc": math.nan, "threshold": threshold}
    if reference_arange:
        x = np.arange(0.0, threshold + step, step)
    else:
        x = np.linspace(0.0, threshold, int(round(threshold / step)) + 1)
    ced = (nme[None, :] <= x[:, None]).mean(axis=1)
    return {"fr": float(100.0 * (1.0 - ced[-1])), "auc": float(simpson(ced, x=x) / threshold),
            "threshold": threshold}


def landmark_report(nme: np.ndarray, threshold: float, attributes: np.ndarray | None = None,
                    attribute_names: Sequence[str] = (), extra: dict[str, np.ndarray] | None = None) -> dict:
    """NME (%), FR (%) and AUC on all images (``full``) and on each attribute's subset.

    Args:
        nme: (N,) per-image NME (fractions) under the protocol's normaliser.
        threshold: FR / AUC threshold (0.10 WFLW, 0.05 300W, 0.07 AFLW).
        attributes: (N, A) 0/1 flags, or None.
        attribute_names: the A subset names.
        extra: per-image NMEs (N,) under further normalisers, by name (AFLW-19: ``{"box": ...}`` next to
            its ``diag`` headline); each report gains ``nme_<name>``, ``fr_<name>``, ``auc_<name>``
            (same threshold).
    """
    nme = np.asarray(nme, np.float64).ravel()
    extra = {k: np.asarray(v, np.float64).ravel() for k, v in (extra or {}).items()}
    for name, values in extra.items():
        if values.shape != nme.shape:
            raise ValueError(f"extra NME {name!r} has {values.size} images, the main NME {nme.size}")

    def scores(keep: np.ndarray) -> dict:
        out = {}
        for suffix, values in (("", nme), *((f"_{k}", v) for k, v in extra.items())):
            values = values[keep]
            curve = ced_fr_auc(values, threshold)
            out.update({f"nme{suffix}": float(100.0 * values.mean()) if values.size else math.nan,
                        f"fr{suffix}": curve["fr"], f"auc{suffix}": curve["auc"]})
        out["count"] = int(keep.sum())
        return out

    report = {"full": scores(np.ones(nme.size, bool))}
    if attributes is not None and len(attribute_names):
        flags = np.asarray(attributes, np.float64).reshape(len(nme), len(attribute_names))
        for k, name in enumerate(attribute_names):
            report[name] = scores(flags[:, k] > 0.5)
    return report


def summarise_landmarks(history: list[dict], last_k: int = 5, eval_every: int = 1) -> dict:
    """Headline numbers of a run from its evaluated epochs (``{"epoch", "test": landmark_report}``).

    The headline is the last epoch's full-test NME and the mean over the last ``last_k`` epochs;
    ``nme_best`` / ``best_epoch`` is the minimum over the scheduled evaluations (every
    ``eval_every`` epochs), i.e. selected on the test set as the references do, labelled as such;
    with a ``val`` report, the epoch with the lowest validation NME and its test NME are added.
    """
    evaluated = [h for h in history if h.get("test") is not None]
    if not evaluated:
        raise ValueError("no evaluated epoch in the history")
    curve = [(int(h["epoch"]), h["test"]["full"]["nme"]) for h in evaluated]
    last_epoch = curve[-1][0]
    tail = [v for e, v in curve if e > last_epoch - last_k]
    scheduled = [h for h in evaluated if int(h["epoch"]) % eval_every == 0] or evaluated
    best = min(scheduled, key=lambda h: (h["test"]["full"]["nme"], h["epoch"]))
    out = {
        "nme_last": curve[-1][1],
        "nme_mean_last_k": float(np.mean(tail)),
        "last_k": len(tail),
        "nme_best": best["test"]["full"]["nme"],
        "best_epoch": int(best["epoch"]),
        "best_candidates": len(scheduled),
        "last_epoch": last_epoch,
        "nme_curve": [{"epoch": e, "nme": v} for e, v in curve],
        "last": evaluated[-1]["test"],
    }
    with_val = [h for h in scheduled if h.get("val") is not None]
    if with_val:
        pick = min(with_val, key=lambda h: (h["val"]["full"]["nme"], h["epoch"]))
        out.update(val_best_epoch=int(pick["epoch"]), val_nme_best=pick["val"]["full"]["nme"],
                   nme_at_val_best=pick["test"]["full"]["nme"])
    return out
