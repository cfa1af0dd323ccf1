"""Turn a finished face-alignment run into files and an MLflow run: results.json, points.png, model.pt.

``results.json`` holds the headline (last-epoch NME and the mean of the last k evaluations, with
FR and AUC of the last epoch), the reference-style best epoch (labelled as selected on the test
set), the validation-selected epoch when there is one, per-subset reports (WFLW attributes, 300W
common / challenging, AFLW frontal), the per-epoch curve, the corrupt images skipped while
streaming, and the provenance. ``points.png`` shows test faces with the true (green) and
predicted (red) points of the last evaluation.
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from fra.config import dump_yaml
from fra.evaluation.landmark_metrics import summarise_landmarks
from fra.evaluation.report import epoch_metrics, finish_run, run_params, skipped_per_pass
from fra.utils.io import atomic_torch_save, atomic_write_bytes, atomic_write_json

log = logging.getLogger(__name__)


@dataclass
class LandmarkResult:
    """What one face-alignment evaluation produced (NME and FR in %, AUC a fraction)."""

    nme_last: float
    nme_mean_last_k: float  # headline
    fr_last: float
    auc_last: float
    nme_best: float  # best epoch, selected on the test set (references; optimistic)
    best_epoch: int
    subsets: dict[str, dict]  # last epoch's report per subset ("full" included)
    results_path: str | Path
    run_dir: str | Path
    picture_path: str | Path | None = None
    model_path: str | Path | None = None
    nme_at_val_best: float | None = None
    val_best_epoch: int | None = None
    backbone: dict = field(default_factory=dict)
    mlflow_run_id: str | None = None
    seconds: float = 0.0
    summary: dict = field(default_factory=dict, repr=False)
    history: list[dict] = field(default_factory=list, repr=False)


def draw_examples(examples: list[dict], path: str | Path, columns: int = 4) -> Path:
    """A PNG grid of crops with the true (green) and predicted (red) points; returns the path."""
    import io

    from PIL import Image, ImageDraw

    if not examples:
        raise ValueError("no examples to draw")
    size = examples[0]["image"].shape[-1]
    cols = min(columns, len(examples))
    rows = -(-len(examples) // cols)
    sheet = Image.new("RGB", (cols * size, rows * size), (255, 255, 255))
    r = max(1.0, size / 128)
    for k, ex in enumerate(examples):
        tile = Image.fromarray(np.ascontiguousarray(np.asarray(ex["image"]).transpose(1, 2, 0)))
        draw = ImageDraw.Draw(tile)
        for colour, pts in (((0, 230, 0), ex["gt"]), ((255, 40, 40), ex["pred"])):
            for x, y in np.asarray(pts, np.float64):
                draw.ellipse((x - r, y - r, x + r, y + r), fill=colour)
        sheet.paste(tile, ((k % cols) * size, (k // cols) * size))
    buf = io.BytesIO()
    sheet.save(buf, format="PNG")
    return atomic_write_bytes(path, buf.getvalue())


def write_outputs(cfg, out: dict, context: dict, location: str, seconds: float) -> LandmarkResult:
    """Write the run's files to ``location`` (local folder or URI; staged locally, then published),
    log them to MLflow, and build the :class:`LandmarkResult`."""
    import tempfile

    from fra import storage as st

    staging = None if st.is_uri(location) else Path(location)
    run_dir = staging or Path(tempfile.mkdtemp(prefix="fra-landmarks-"))
    run_dir.mkdir(parents=True, exist_ok=True)
    summary = summarise_landmarks(out["history"], last_k=cfg.run.last_k, eval_every=cfg.run.eval_every)
    last = summary["last"]
    skipped = skipped_per_pass(out["history"])
    if any(skipped.values()):
        log.warning("landmarks: corrupt images skipped while streaming (one pass over each split): %s", skipped)
    images = sum(h.get("images", 0) for h in out["history"])
    protocol = context["resolved"]["protocol"]
    results = {
        "task": "landmarks",
        "loss": cfg.model.loss,
        "headline": {"nme_last": summary["nme_last"], "nme_mean_last_k": summary["nme_mean_last_k"],
                     "fr_last": last["full"]["fr"], "auc_last": last["full"]["auc"],
                     "normalizer": protocol["normalizer"], "fr_threshold": protocol["fr_threshold"],
                     **extra_headline(out["history"], protocol.get("extra_normalizers", ()), cfg.run.last_k)},
        "subsets_last": last,
        "best_epoch_selected_on_test": {"nme_best": summary["nme_best"], "best_epoch": summary["best_epoch"],
                                        "candidates": summary["best_candidates"], "eval_every": cfg.run.eval_every,
                                        "note": "references' protocol (minimum of the test NME over the evaluations "
                                                "every eval_every epochs); optimistic"},
        "summary": summary,
        "history": out["history"],
        "skipped_corrupt_images": skipped,
        "seconds": seconds,
        "train_images_per_s_total": images / max(seconds, 1e-9),
        **context,
    }
    results_path = atomic_write_json(run_dir / "results.json", results)
    dump_yaml(cfg, run_dir / "config.yaml")
    picture = draw_examples(out["examples"], run_dir / "points.png") if out.get("examples") else None
    model_path = None
    if cfg.run.save_model and out.get("state_dict") is not None:
        import torch

        sd = {k: torch.from_numpy(np.array(v)) for k, v in out["state_dict"].items()}
        model_path = atomic_torch_save({"format": "fra-landmarks/1", "arch": context["backbone"]["backbone.arch"],
                                        "num_points": protocol["num_points"], "loss": cfg.model.loss,
                                        "state_dict": sd}, run_dir / "model.pt")
    artifacts = [results_path, run_dir / "config.yaml"] + ([picture] if picture else [])
    mlflow_id = _log_mlflow(cfg, summary, results, artifacts, location)
    if st.is_uri(location):
        import shutil

        st.publish(run_dir, location)
        shutil.rmtree(run_dir, ignore_errors=True)
        results_path = st.join(location, "results.json")
        picture = st.join(location, "points.png") if picture else None
        model_path = st.join(location, "model.pt") if model_path else None
    log.info("landmarks: NME last %.3f%%, mean of last %d %.3f%%, FR %.2f%%, AUC %.4f, best (on test) %.3f%% @%d; "
             "results in %s", summary["nme_last"], summary["last_k"], summary["nme_mean_last_k"], last["full"]["fr"],
             last["full"]["auc"], summary["nme_best"], summary["best_epoch"], results_path)
    return LandmarkResult(
        nme_last=summary["nme_last"], nme_mean_last_k=summary["nme_mean_last_k"], fr_last=last["full"]["fr"],
        auc_last=last["full"]["auc"], nme_best=summary["nme_best"], best_epoch=summary["best_epoch"], subsets=last,
        results_path=results_path, run_dir=location, picture_path=picture, model_path=model_path,
        nme_at_val_best=summary.get("nme_at_val_best"), val_best_epoch=summary.get("val_best_epoch"),
        backbone=context["backbone"], mlflow_run_id=mlflow_id, seconds=seconds, summary=summary,
        history=out["history"])


def extra_headline(history: list[dict], names, last_k: int) -> dict[str, float]:
    """``nme_<n>_last``, ``nme_<n>_mean_last_k``, ``fr_<n>_last``, ``auc_<n>_last`` of each further normaliser
    ``n`` (AFLW-19: ``box`` next to the ``diag`` headline), over the evaluations the headline covers
    (the last evaluated epoch; those of the last ``last_k`` epochs)."""
    evaluated = [h for h in history if h.get("test") is not None]
    if not evaluated:
        return {}
    tail = [h for h in evaluated if int(h["epoch"]) > int(evaluated[-1]["epoch"]) - last_k]
    out, full = {}, evaluated[-1]["test"]["full"]
    for n in names:
        out.update({f"nme_{n}_last": full[f"nme_{n}"],
                    f"nme_{n}_mean_last_k": float(np.mean([h["test"]["full"][f"nme_{n}"] for h in tail])),
                    f"fr_{n}_last": full[f"fr_{n}"], f"auc_{n}_last": full[f"auc_{n}"]})
    return out


def final_metrics(results: dict) -> dict[str, float]:
    """Flat final metrics of a results.json: headline, test-selected best, and per-subset NME / FR / AUC."""
    summary = results["summary"]
    out = {f"nme_{k}": v for k, v in (("last", summary["nme_last"]), ("mean_last_k", summary["nme_mean_last_k"]))}
    out.update(nme_best_on_test=summary["nme_best"], best_epoch_on_test=summary["best_epoch"])
    if "nme_at_val_best" in summary:
        out.update(nme_at_val_best=summary["nme_at_val_best"], val_best_epoch=summary["val_best_epoch"])
    for subset, rep in summary["last"].items():
        for key, value in rep.items():  # nme, fr, auc (and nme_box, fr_box, auc_box ...)
            if key != "count" and isinstance(value, (int, float)) and np.isfinite(value):
                out[f"{key}.{subset}"] = float(value)
    for n in ((results.get("resolved") or {}).get("protocol") or {}).get("extra_normalizers") or ():
        for key in (f"nme_{n}_last", f"nme_{n}_mean_last_k"):  # the further normalisers' headline
            if isinstance(results["headline"].get(key), (int, float)):
                out[key] = float(results["headline"][key])
    return out


def _log_mlflow(cfg, summary: dict, results: dict, artifacts: list[Path], run_dir: str) -> str | None:
    """Params, per-epoch and final metrics, and the artifacts (points.png included). Tracking
    failures are logged, never raised."""
    if not cfg.tracking.enabled:
        return None
    try:
        from mlflow.entities import Metric

        from fra import storage as st
        from fra import tracking

        uri = tracking.resolve_tracking_uri(cfg.tracking.mlflow_uri, cfg.run.storage_path)
        params = run_params(results)
        run_id, _ = tracking.start_run(uri, cfg.tracking.experiment, f"landmarks:{run_dir}", st.basename(run_dir),
                                       params, tags={"fra.kind": "landmark-eval", "fra.loss": cfg.model.loss})
        now = int(time.time() * 1000)
        metrics = epoch_metrics(results["history"], now)
        metrics += [Metric(f"{split}_nme", float(h[split]["full"]["nme"]), now, int(h["epoch"]))
                    for h in results["history"] for split in ("test", "val") if split in h]
        metrics += [Metric(k, float(v), now, summary["last_epoch"]) for k, v in final_metrics(results).items()]
        return finish_run(uri, run_id, metrics, artifacts)
    except Exception as exc:  # noqa: BLE001 - a tracking outage must not lose the results on disk
        log.warning("MLflow logging of the landmark results failed (results are in %s): %s", run_dir, exc)
        return None


def landmark_metrics_from_results(path) -> tuple[dict[str, float], str, str]:
    """Read a landmark ``results.json``: (``landmarks_*`` metrics, protocol, dataset fingerprint) for the registry.

    The metrics are the headline (``landmarks_nme_last``, ``landmarks_nme_mean_last_k``,
    ``landmarks_fr_last``, ``landmarks_auc_last``; NME and FR: lower is better), the same under the
    protocol's further normalisers (AFLW-19: ``landmarks_nme_box_last`` ...) and the per-subset NME
    of the last epoch (``landmarks_nme.<subset>``). The protocol string is
    ``landmarks:<loss>:<normalizer>/<dataset>/<test split>``, so runs are only compared like for like.
    """
    from fra import storage as st
    from fra.errors import FraError

    try:
        res = st.read_json(path)
    except (OSError, ValueError) as exc:
        raise FraError(f"cannot read landmark results {path}: {exc}") from exc
    head = res.get("headline") or {}
    extra = ((res.get("resolved") or {}).get("protocol") or {}).get("extra_normalizers") or ()
    keys = ("nme_last", "nme_mean_last_k", "fr_last", "auc_last",
            *(f"{m}_{n}_{w}" for n in extra for m, w in (("nme", "last"), ("nme", "mean_last_k"), ("fr", "last"),
                                                         ("auc", "last"))))
    metrics = {f"landmarks_{k}": float(head[k]) for k in keys if isinstance(head.get(k), (int, float))}
    for subset, rep in (res.get("subsets_last") or {}).items():
        if subset != "full" and isinstance(rep.get("nme"), (int, float)) and np.isfinite(rep["nme"]):
            metrics[f"landmarks_nme.{subset}"] = float(rep["nme"])
    dataset = res.get("dataset") or {}
    split = (res.get("resolved") or {}).get("test_split", "")
    protocol = f"landmarks:{res.get('loss', '')}:{head.get('normalizer', '')}/{dataset.get('name', '')}/{split}"
    return metrics, protocol, str(dataset.get("fingerprint", ""))
