"""Face-alignment metrics against hand calculations (DOWNSTREAM_SPEC §4)."""
from __future__ import annotations

import math

import numpy as np
import pytest

from fra.evaluation.landmark_metrics import (ced_fr_auc, landmark_report, nme_per_image, normalizing_distance,
                                             summarise_landmarks)


def test_nme_inter_ocular_by_hand():
    # 4 points; the "eyes" are points 0 and 1, 10 px apart. Errors: 0, 3-4-5 triangle (5), 2, 0.
    gt = np.array([[[0, 0], [10, 0], [5, 5], [5, 10]]], float)
    pred = gt + np.array([[[0, 0], [3, 4], [0, 2], [0, 0]]], float)
    d = normalizing_distance(gt, "inter_ocular", (0, 1))
    assert d.tolist() == [10.0]
    assert nme_per_image(pred, gt, d).tolist() == pytest.approx([(0 + 5 + 2 + 0) / 4 / 10])  # 0.175


def test_inter_pupil_uses_group_means():
    # 300W inter-pupil: mean of one eye's points vs the other's. Eye A = (0,0),(2,0) -> (1,0);
    # eye B = (9,4),(11,4) -> (10,4); distance sqrt(81 + 16) = sqrt(97).
    gt = np.array([[[0, 0], [2, 0], [9, 4], [11, 4]]], float)
    assert normalizing_distance(gt, "inter_pupil", ([0, 1], [2, 3]))[0] == pytest.approx(math.sqrt(97))


def test_box_and_diagonal_normalisers():
    boxes = np.array([[10, 20, 40, 60]], float)  # w 30, h 40
    gt = np.zeros((1, 2, 2))
    assert normalizing_distance(gt, "box", boxes=boxes)[0] == pytest.approx(math.sqrt(1200))
    assert normalizing_distance(gt, "diag", boxes=boxes)[0] == pytest.approx(50.0)
    with pytest.raises(ValueError, match="unknown normalizer"):
        normalizing_distance(gt, "pupil")


def test_failure_rate_and_auc_by_hand():
    # CED is a step function: an image with NME e <= thr adds (thr - e) / thr / N to the AUC.
    # e = 0.02, 0.05, 0.20 at thr 0.10: AUC = (0.8 + 0.5 + 0) / 3 = 0.4333..., FR = 1/3.
    out = ced_fr_auc([0.02, 0.05, 0.20], 0.10)
    assert out["fr"] == pytest.approx(100 / 3)
    # Simpson's rule on a step function: each jump (1/3 high) can move the area by up to 4/3 of a grid
    # step (1e-4 / 0.1 = 1e-3 of the normalised axis), so the hand value holds to ~1e-3
    assert out["auc"] == pytest.approx(1.3 / 3, abs=1e-3)
    # at thr 0.05 the 0.05 image is not a failure (NME <= thr): FR = 1/3, AUC = (0.6 + 0 + 0) / 3
    out = ced_fr_auc([0.02, 0.05, 0.20], 0.05)
    assert out["fr"] == pytest.approx(100 / 3) and out["auc"] == pytest.approx(0.2, abs=1e-3)
    # every image perfect: FR 0, AUC 1; every image failing: FR 100, AUC 0
    assert ced_fr_auc([0.0, 0.0], 0.1) == {"fr": 0.0, "auc": pytest.approx(1.0), "threshold": 0.1}
    assert ced_fr_auc([0.3], 0.1)["fr"] == 100.0 and ced_fr_auc([0.3], 0.1)["auc"] == 0.0


def test_reference_arange_goes_past_the_threshold():
    # np.arange(0, 0.05 + 1e-4, 1e-4) ends at 0.0501 (DOWNSTREAM_SPEC §4): an image at 0.05005 fails at
    # thr 0.05 on our grid and passes on the reference's.
    assert ced_fr_auc([0.05005], 0.05)["fr"] == 100.0
    assert ced_fr_auc([0.05005], 0.05, reference_arange=True)["fr"] == 0.0


def test_report_per_subset():
    nme = np.array([0.02, 0.04, 0.12, 0.06])
    flags = np.array([[1, 0], [0, 1], [1, 1], [0, 0]])
    rep = landmark_report(nme, 0.10, flags, ["pose", "blur"])
    assert rep["full"]["nme"] == pytest.approx(6.0) and rep["full"]["fr"] == pytest.approx(25.0)
    assert rep["pose"]["nme"] == pytest.approx(7.0) and rep["pose"]["count"] == 2 and rep["pose"]["fr"] == 50.0
    assert rep["blur"]["nme"] == pytest.approx(8.0) and rep["blur"]["count"] == 2
    # pose subset: (0.10 - 0.02) / 0.10 / 2 = 0.4
    assert rep["pose"]["auc"] == pytest.approx(0.4, abs=1e-3)


def _entry(epoch, nme, val=None):
    h = {"epoch": epoch, "test": {"full": {"nme": nme}}}
    if val is not None:
        h["val"] = {"full": {"nme": val}}
    return h


def test_summary_headline_is_the_last_epoch_and_best_is_labelled():
    history = [_entry(1, 9.0, 8.0), _entry(2, 5.0, 6.5), _entry(3, 6.0, 6.0), _entry(4, 7.0, 7.5)]
    s = summarise_landmarks(history, last_k=2, eval_every=1)
    assert s["nme_last"] == 7.0 and s["nme_mean_last_k"] == pytest.approx(6.5) and s["last_k"] == 2
    assert (s["nme_best"], s["best_epoch"]) == (5.0, 2)  # selected on the test set
    assert (s["val_best_epoch"], s["nme_at_val_best"]) == (3, 6.0)
    # the best epoch is chosen among the scheduled evaluations only (every 2nd epoch here)
    s = summarise_landmarks([_entry(1, 1.0), _entry(2, 5.0), _entry(3, 4.0), _entry(4, 7.0)], last_k=1, eval_every=2)
    assert (s["nme_best"], s["best_epoch"]) == (5.0, 2)


def test_registry_metrics_and_lower_is_better_gating(tmp_path):
    """The register stage's landmark metrics (next to FER's) and promotion on NME: lower wins."""
    import json

    from fra.evaluation.landmarks_report import landmark_metrics_from_results
    from fra.pipeline_stages import _with_landmarks
    from fra.registry.connection import DATASET_TAG, PROTOCOL_TAG, READY, STATUS_TAG, ModelVersionInfo
    from fra.registry_promotion import _judge, gate_mode

    results = {"loss": "star", "headline": {"nme_last": 4.5, "nme_mean_last_k": 4.4, "fr_last": 3.0, "auc_last": 0.55,
                                            "normalizer": "inter_ocular"},
               "subsets_last": {"full": {"nme": 4.5}, "pose": {"nme": 7.5}, "blur": {"nme": float("nan")}},
               "dataset": {"name": "wflw", "fingerprint": "abc"}, "resolved": {"test_split": "test"}}
    path = tmp_path / "results.json"
    path.write_text(json.dumps(results))
    metrics, protocol, fingerprint = landmark_metrics_from_results(str(path))
    assert metrics == {"landmarks_nme_last": 4.5, "landmarks_nme_mean_last_k": 4.4, "landmarks_fr_last": 3.0,
                       "landmarks_auc_last": 0.55, "landmarks_nme.pose": 7.5}
    assert (protocol, fingerprint) == ("landmarks:star:inter_ocular/wflw/test", "abc")
    merged = _with_landmarks({"results_path": str(path)}, {"fer_top1_last": 80.0}, "finetune/rafdb/test", "f1")
    assert merged == ({"fer_top1_last": 80.0, **metrics}, "finetune/rafdb/test+landmarks:star:inter_ocular/wflw/test",
                      "f1+abc")
    assert [gate_mode(m) for m in ("landmarks_nme_mean_last_k", "landmarks_fr_last", "landmarks_auc_last",
                                   "fer_top1_mean_last5")] == ["min", "min", "max", "max"]
    assert gate_mode("landmarks_nme_last", "max") == "max"  # an explicit mode wins

    def version(v):
        return ModelVersionInfo(name="m", version=v, run_id="", model_id="", status=READY,
                                tags={STATUS_TAG: READY, PROTOCOL_TAG: protocol, DATASET_TAG: fingerprint})

    # NME 4.4 vs champion 4.6: lower is better, so the candidate wins; 4.8 loses
    assert _judge(version(2), version(1), 4.4, 4.6, "landmarks_nme_mean_last_k", 0.0, "min")[0] == "promoted"
    assert _judge(version(2), version(1), 4.8, 4.6, "landmarks_nme_mean_last_k", 0.0, "min")[0] == "refused"


def test_aflw19_reports_nme_box_next_to_nme_diag_by_hand():
    """AFLW-19 (DOWNSTREAM_SPEC §3): NME_diag by sqrt(w^2 + h^2) is the headline, NME_box by sqrt(w h)
    next to it, each with FR / AUC at 7 %. Two faces: box 30 x 40 (diag 50, box sqrt(1200) = 34.641),
    mean point error 1 px; box 60 x 80 (diag 100, box sqrt(4800) = 69.282), mean point error 5 px.
    diag: 0.02, 0.05 -> NME 3.5 %, FR 0 %, AUC ((0.05 + 0.02) / 0.07) / 2 = 0.5.
    box: 0.028868, 0.072169 -> NME 5.0518 %, FR 50 % (the second is past 7 %), AUC (0.041132 / 0.07) / 2 = 0.29380."""
    from types import SimpleNamespace

    from fra.evaluation.landmarks_data import landmark_protocol

    protocol = landmark_protocol(SimpleNamespace(dataset="aflw19", uri="x", attributes=("frontal",)))
    assert (protocol.normalizer, protocol.extra_normalizers, protocol.fr_threshold) == ("diag", ("box",), 0.07)
    boxes = np.array([[0, 0, 30, 40], [10, 10, 70, 90]], float)
    gt = np.zeros((2, 2, 2)) + 20.0
    pred = gt + np.array([[[1, 0], [0, 1]], [[3, 4], [0, 5]]], float)  # errors 1, 1 and 5, 5
    per = {k: nme_per_image(pred, gt, normalizing_distance(gt, k, boxes=boxes)) for k in ("diag", "box")}
    rep = landmark_report(per["diag"], 0.07, np.array([[1.0], [0.0]]), ["frontal"], {"box": per["box"]})
    full = rep["full"]
    assert (full["nme"], full["fr"], full["auc"]) == pytest.approx((3.5, 0.0, 0.5), abs=2e-3)
    assert (full["nme_box"], full["fr_box"], full["auc_box"]) == pytest.approx((5.0518, 50.0, 0.29380), abs=2e-3)
    assert full["nme_box"] / full["nme"] == pytest.approx(5.0518 / 3.5, rel=1e-4)
    assert rep["frontal"]["nme_box"] == pytest.approx(100 / math.sqrt(1200)) and rep["frontal"]["count"] == 1
    with pytest.raises(ValueError, match="extra NME 'box' has 1 images"):
        landmark_report(per["diag"], 0.07, extra={"box": per["box"][:1]})
    with pytest.raises(Exception, match="extra_normalizers.*inter_ocular"):
        landmark_protocol(SimpleNamespace(dataset="aflw19", uri="x", attributes=()),
                          {"extra_normalizers": ["inter_ocular"]})


def test_nme_box_headline_reaches_mlflow_and_the_registry(tmp_path):
    """A further normaliser's headline (last, mean of the last k) and per-subset numbers in the flat
    MLflow metrics and the registry's landmarks_* metrics (lower is better, as every NME)."""
    import json

    from fra.evaluation.landmarks_report import extra_headline, final_metrics, landmark_metrics_from_results
    from fra.registry_promotion import gate_mode

    rep = lambda nme, box: {"full": {"nme": nme, "fr": 0.0, "auc": 0.5, "nme_box": box, "fr_box": 50.0,  # noqa: E731
                                     "auc_box": 0.3, "count": 2}}
    history = [{"epoch": 1, "test": rep(4.0, 6.0)}, {"epoch": 2, "test": rep(3.0, 5.0)},
               {"epoch": 3, "test": rep(3.5, 4.0)}]
    head = extra_headline(history, ("box",), last_k=2)
    assert head == {"nme_box_last": 4.0, "nme_box_mean_last_k": 4.5, "fr_box_last": 50.0, "auc_box_last": 0.3}
    s = summarise_landmarks(history, last_k=2)
    resolved = {"protocol": {"extra_normalizers": ["box"]}, "test_split": "test"}
    results = {"loss": "star", "summary": s, "resolved": resolved,
               "headline": {"nme_last": 3.5, "nme_mean_last_k": 3.25, "fr_last": 0.0, "auc_last": 0.5,
                            "normalizer": "diag", **head},
               "subsets_last": s["last"], "dataset": {"name": "aflw19", "fingerprint": "f"}}
    flat = final_metrics(results)
    assert flat["nme_box.full"] == 4.0 and flat["fr_box.full"] == 50.0 and flat["nme_box_mean_last_k"] == 4.5
    path = tmp_path / "results.json"
    path.write_text(json.dumps(results))
    metrics, protocol, _ = landmark_metrics_from_results(str(path))
    assert metrics["landmarks_nme_box_last"] == 4.0 and metrics["landmarks_nme_box_mean_last_k"] == 4.5
    assert metrics["landmarks_nme_mean_last_k"] == 3.25 and protocol == "landmarks:star:diag/aflw19/test"
    assert gate_mode("landmarks_nme_box_mean_last_k") == "min"
