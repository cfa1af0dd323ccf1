"""Attribute and valence/arousal metrics against hand calculations and numpy/scipy formulas."""
from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import stats as sps

from fra.evaluation.target_metrics import (affect_report, affect_stats, attribute_report, attribute_stats, ccc, pcc,
                                           rmse, sagr, summarise_scalar)

# y and two predictions: p1 - mean(p1) = 0.6 (y - mean(y)) with equal means; p2 = y + 0.5.
Y = np.array([0.5, -0.5, 0.0, 1.0])
P1 = np.array([0.4, -0.2, 0.1, 0.7])
P2 = Y + 0.5


def test_affect_metrics_by_hand():
    # var_y = (0.0625 + 0.5625 + 0.0625 + 0.5625) / 4 = 0.3125; var_p1 = 0.36 var_y = 0.1125; cov = 0.1875
    report = affect_report(affect_stats(np.stack([P1, P2], 1), np.stack([Y, Y], 1)), ["valence", "arousal"])
    assert report["ccc"]["valence"] == pytest.approx(0.375 / 0.425)  # = 15/17, PCC 1 but shrunk
    assert report["pcc"]["valence"] == pytest.approx(1.0)
    assert report["rmse"]["valence"] == pytest.approx(math.sqrt(0.05))  # errors 0.1, 0.3, 0.1, 0.3
    assert report["sagr"]["valence"] == pytest.approx(0.75)  # y = 0 vs p = 0.1 counts as a miss
    # p2 = y + 0.5: CCC = 2 var / (2 var + 0.25) = 0.625 / 0.875; signs (+, 0, +, +) vs (+, -, 0, +)
    assert report["ccc"]["arousal"] == pytest.approx(5 / 7)
    assert report["rmse"]["arousal"] == pytest.approx(0.5)
    assert report["sagr"]["arousal"] == pytest.approx(0.5)
    assert report["mean_ccc"] == pytest.approx((15 / 17 + 5 / 7) / 2)
    assert report["num_samples"] == 4


def test_affect_statistics_match_numpy_and_scipy_and_add_up_over_shards():
    rng = np.random.default_rng(0)
    y = np.clip(rng.normal(0.1, 0.4, (200, 2)), -1, 1)
    p = np.clip(0.7 * y + rng.normal(0.05, 0.2, y.shape), -1, 1)
    p[:5] = 0.0
    y[:3] = 0.0
    whole = affect_stats(p, y)
    assert np.allclose(affect_stats(p[:77], y[:77]) + affect_stats(p[77:], y[77:]), whole)  # all-reduce = one pass
    report = affect_report(whole, ["valence", "arousal"])
    for j, name in enumerate(["valence", "arousal"]):
        yj, pj = y[:, j], p[:, j]
        r = sps.pearsonr(yj, pj)[0]
        ccc_ref = 2 * np.cov(yj, pj, ddof=0)[0, 1] / (yj.var() + pj.var() + (yj.mean() - pj.mean()) ** 2)
        assert report["pcc"][name] == pytest.approx(r, rel=1e-9) == pytest.approx(pcc(yj, pj), rel=1e-9)
        assert report["ccc"][name] == pytest.approx(ccc_ref, rel=1e-9) == pytest.approx(ccc(yj, pj), rel=1e-9)
        assert report["rmse"][name] == pytest.approx(np.sqrt(np.mean((yj - pj) ** 2))) == pytest.approx(rmse(yj, pj))
        assert report["sagr"][name] == pytest.approx(np.mean(np.sign(yj) == np.sign(pj))) == pytest.approx(sagr(yj, pj))


def test_attribute_accuracy_by_hand():
    logits = np.array([[2.0, -1.0, 0.0], [-3.0, 1.0, -0.5]])  # logit 0 = sigmoid 0.5 counts as positive
    targets = np.array([[1, 0, 0], [1, 1, 0]])
    report = attribute_report(attribute_stats(logits, targets), ["a", "b", "c"])
    assert report["per_attribute_acc"] == {"a": 50.0, "b": 100.0, "c": 50.0}
    assert report["mean_acc"] == pytest.approx(400 / 6)  # 4 of 6 (image, attribute) pairs right
    # a: TPR 1/2, no negatives -> 50; b: TPR 1, TNR 1 -> 100; c: no positives, TNR 1/2 -> 50
    assert report["per_attribute_balanced_acc"] == {"a": 50.0, "b": 100.0, "c": 50.0}
    assert report["positive_rate"] == {"a": 1.0, "b": 0.5, "c": 0.0}
    with pytest.raises(ValueError, match="0 or 1"):
        attribute_stats(logits, targets * 2)


def test_mean_accuracy_is_the_mean_of_per_attribute_accuracies():
    rng = np.random.default_rng(1)
    logits, targets = rng.normal(size=(57, 40)), rng.random((57, 40)) < 0.3
    report = attribute_report(attribute_stats(logits[:20], targets[:20]) + attribute_stats(logits[20:], targets[20:]),
                              [str(i) for i in range(40)])
    elementwise = 100 * np.mean((logits >= 0) == targets)
    assert report["mean_acc"] == pytest.approx(elementwise)
    assert report["mean_acc"] == pytest.approx(np.mean(list(report["per_attribute_acc"].values())))


def test_summary_reports_last_mean_and_test_selected_best_separately():
    score = {1: 60.0, 2: 75.0, 3: 70.0, 4: 72.0, 5: 71.0, 6: 69.0}
    val = {1: 1.0, 2: 3.0, 3: 2.0, 4: 5.0, 5: 4.0, 6: 0.0}
    history = [{"epoch": e, "test_stats": score[e], "val_stats": val[e]} for e in score]
    out = summarise_scalar(history, lambda s: s, last_k=3, eval_every=2)
    assert out["last"] == 69.0 and out["mean_last_k"] == pytest.approx((72 + 71 + 69) / 3) and out["last_k"] == 3
    assert (out["best"], out["best_epoch"], out["best_candidates"]) == (75.0, 2, 3)  # among epochs 2, 4, 6
    assert (out["val_best_epoch"], out["at_val_best"]) == (4, 72.0)
    low = summarise_scalar(history, lambda s: s, last_k=1, eval_every=1, higher_is_better=False)
    assert (low["best"], low["best_epoch"], low["mean_last_k"]) == (60.0, 1, 69.0)
