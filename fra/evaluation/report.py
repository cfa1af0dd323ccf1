"""Turn a finished FER run into files and an MLflow run: results.json, confusion.png, model.pt.

``results.json`` holds the headline (last-epoch top-1 and the mean of the last k evaluations),
the reference-style best epoch (labelled as selected on the test set), the validation-selected
number when a validation split exists, per-class accuracy / F1, the confusion matrix, the
per-epoch curve, the corrupt images skipped while streaming (per split; per epoch in the
history), and the provenance: backbone source + fingerprint, dataset manifest fingerprint,
resolved config.
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path

from fra.config import dump_yaml, flatten
from fra.evaluation.metrics import plot_confusion, summarise
from fra.utils.io import atomic_torch_save, atomic_write_json

log = logging.getLogger(__name__)


@dataclass
class FERResult:
    """What one evaluation produced (accuracies in %)."""

    top1_last: float
    top1_mean_last5: float  # mean over the last ``run.last_k`` evaluations (headline)
    top1_best: float  # best epoch, selected on the test set (reference; optimistic)
    best_epoch: int
    mean_class_acc: float
    per_class_acc: dict[str, float | None]
    macro_f1: float
    confusion: list[list[int]]
    classes: list[str]
    results_path: str | Path  # a local path or a URI, as run.storage_path
    run_dir: str | Path
    model_path: str | Path | None = None
    top1_at_val_best: float | None = None  # test top-1 at the epoch chosen on validation
    val_best_epoch: int | None = None
    backbone: dict = field(default_factory=dict)
    backbone_unchanged: bool | None = None
    mlflow_run_id: str | None = None
    seconds: float = 0.0
    summary: dict = field(default_factory=dict, repr=False)
    history: list[dict] = field(default_factory=list, repr=False)


def write_outputs(cfg, out: dict, context: dict, location: str, classes: list[str], seconds: float):
    """Write the run's files to ``location`` (a local folder or a URI), log them to MLflow, and
    build the :class:`FERResult` (whose paths are locations under ``location``).

    The files are written to a local folder first (the location itself when it is local) and
    published to object storage after.
    """
    import tempfile

    from fra import storage as st

    staging = None if st.is_uri(location) else Path(location)
    if staging is None:
        staging = Path(tempfile.mkdtemp(prefix="fra-fer-"))
    run_dir = staging
    run_dir.mkdir(parents=True, exist_ok=True)
    summary = summarise(out["history"], classes, last_k=cfg.run.last_k, eval_every=cfg.run.eval_every)
    last = summary["last"]
    images = sum(h.get("images", 0) for h in out["history"])
    skipped = skipped_per_pass(out["history"])
    if any(skipped.values()):
        log.warning("FER %s: corrupt images skipped while streaming (one pass over each split): %s",
                    cfg.protocol, skipped)
    results = {
        "protocol": cfg.protocol,
        # NOTE: the key keeps the name "top1_mean_last5" whatever run.last_k is (summary.last_k says
        # how many epochs it covers): the registry, promotion gate and Tune report read it.
        "headline": {"top1_last": summary["top1_last"], "top1_mean_last5": summary["top1_mean_last_k"],
                     "mean_class_acc": last["mean_class_acc"], "macro_f1": last["macro_f1"]},
        "best_epoch_selected_on_test": {"top1_best": summary["top1_best"], "best_epoch": summary["best_epoch"],
                                        "candidates": summary["best_candidates"], "eval_every": cfg.run.eval_every,
                                        "note": "reference protocol (max of test top-1 over the evaluations every "
                                                "eval_every epochs); optimistic"},
        "summary": summary,
        "history": [{k: v for k, v in h.items() if not k.endswith("_confusion")} for h in out["history"]],
        "skipped_corrupt_images": skipped,
        "backbone_unchanged": out.get("backbone_unchanged"),
        "trunk_fingerprint": out.get("trunk_fingerprint"),
        "seconds": seconds,
        "train_images_per_s_total": images / max(seconds, 1e-9),
        **context,
    }
    results_path = atomic_write_json(run_dir / "results.json", results)
    png = plot_confusion(last["confusion"], classes, run_dir / "confusion.png",
                         title=f"{cfg.protocol} · last epoch {summary['last_epoch']} · top-1 {last['top1']:.2f}%")
    dump_yaml(cfg, run_dir / "config.yaml")
    model_path = None
    if cfg.run.save_model and out.get("state_dict") is not None:
        import numpy as np
        import torch

        sd = {k: torch.from_numpy(np.array(v)) for k, v in out["state_dict"].items()}
        model_path = atomic_torch_save({"format": "fra-fer-classifier/1", "arch": context["backbone"]["backbone.arch"],
                                        "classes": classes, "state_dict": sd}, run_dir / "model.pt")
    mlflow_id = _log_mlflow(cfg, summary, results, [results_path, png, run_dir / "config.yaml"], location)
    if st.is_uri(location):
        import shutil

        st.publish(run_dir, location)
        shutil.rmtree(run_dir, ignore_errors=True)
        results_path = st.join(location, results_path.name)
        model_path = st.join(location, model_path.name) if model_path else None
    log.info("FER %s: top-1 last %.2f%%, mean of last %d %.2f%%, best (on test) %.2f%% @%d; results in %s",
             cfg.protocol, summary["top1_last"], summary["last_k"], summary["top1_mean_last_k"],
             summary["top1_best"], summary["best_epoch"], results_path)
    return FERResult(
        top1_last=summary["top1_last"], top1_mean_last5=summary["top1_mean_last_k"],
        top1_best=summary["top1_best"], best_epoch=summary["best_epoch"], mean_class_acc=last["mean_class_acc"],
        per_class_acc=last["per_class_acc"], macro_f1=last["macro_f1"], confusion=last["confusion"],
        classes=list(classes), results_path=results_path, run_dir=location, model_path=model_path,
        top1_at_val_best=summary.get("top1_at_val_best"), val_best_epoch=summary.get("val_best_epoch"),
        backbone=context["backbone"], backbone_unchanged=out.get("backbone_unchanged"), mlflow_run_id=mlflow_id,
        seconds=seconds, summary=summary, history=out["history"])


def skipped_per_pass(history: list[dict]) -> dict[str, int]:
    """Corrupt images skipped in the last pass over each split (``skipped_corrupt_<split>`` of the
    last epoch that read it); the history keeps every epoch's count."""
    out: dict[str, int] = {}
    for h in history:
        out.update({k.removeprefix("skipped_corrupt_"): int(v) for k, v in h.items()
                    if k.startswith("skipped_corrupt_")})
    return out


def run_params(results: dict, **extra) -> dict:
    """An evaluation run's MLflow params: its config, backbone source + fingerprint, dataset
    manifest and resolved settings (``extra`` added)."""
    return {**flatten(results["config"]), **{k: v for k, v in results["backbone"].items() if k != "detail"},
            "dataset.name": results["dataset"]["name"], "dataset.uri": results["dataset"]["uri"],
            "dataset.fingerprint": results["dataset"]["fingerprint"], **extra,
            **{f"resolved.{k}": v for k, v in flatten(results["resolved"]).items()}}


def epoch_metrics(history: list[dict], now: int) -> list:
    """Per-epoch ``train_loss``, ``lr`` and ``skipped_corrupt_*`` as MLflow metrics (step = epoch)."""
    from mlflow.entities import Metric

    return [Metric(key, float(h[key]), now, int(h["epoch"])) for h in history
            for key in ("train_loss", "lr", *(k for k in h if k.startswith("skipped_corrupt_")))]


def finish_run(uri: str, run_id: str, metrics: list, artifacts) -> str:
    """Log ``metrics`` (in batches MLflow accepts) and ``artifacts``, then end the run."""
    from fra import tracking

    client = tracking._client(uri)
    for i in range(0, len(metrics), 1000):
        chunk = metrics[i:i + 1000]
        tracking.with_retries(lambda: client.log_batch(run_id, metrics=chunk), "log metrics")
    for path in artifacts:
        tracking.log_artifacts(uri, run_id, path)
    tracking.end_run(uri, run_id)
    return run_id


def _log_mlflow(cfg, summary: dict, results: dict, artifacts: list[Path], run_dir: str) -> str | None:
    """Params (config, backbone source + fingerprint, dataset manifest), per-epoch and final
    metrics, and the artifacts. Tracking failures are logged, never raised."""
    if not cfg.tracking.enabled:
        return None
    try:
        from mlflow.entities import Metric

        from fra import storage as st
        from fra import tracking

        uri = tracking.resolve_tracking_uri(cfg.tracking.mlflow_uri, cfg.run.storage_path)
        params = run_params(results, **{"dataset.classes": ",".join(results["dataset"]["classes"])})
        run_id, _ = tracking.start_run(uri, cfg.tracking.experiment, f"fer:{run_dir}", st.basename(run_dir), params,
                                       tags={"fra.protocol": cfg.protocol, "fra.kind": "fer-eval"})
        now = int(time.time() * 1000)
        metrics = epoch_metrics(results["history"], now)
        for point in summary["top1_curve"]:
            metrics.append(Metric("test_top1", float(point["top1"]), now, int(point["epoch"])))
        final = {**results["headline"], "top1_best_on_test": summary["top1_best"],
                 "best_epoch_on_test": summary["best_epoch"]}
        if "top1_at_val_best" in summary:
            final.update(top1_at_val_best=summary["top1_at_val_best"], val_best_epoch=summary["val_best_epoch"])
        for name, acc in summary["last"]["per_class_acc"].items():
            if acc is not None:
                final[f"class_acc.{name}"] = acc
        metrics += [Metric(k, float(v), now, summary["last_epoch"]) for k, v in final.items() if v is not None]
        return finish_run(uri, run_id, metrics, artifacts)
    except Exception as exc:  # noqa: BLE001 - a tracking outage must not lose the results on disk
        log.warning("MLflow logging of the FER results failed (results are in %s): %s", run_dir, exc)
        return None
