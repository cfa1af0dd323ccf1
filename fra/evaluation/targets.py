"""The driver side shared by the attribute and affect evaluations (:mod:`fra.evaluation.attributes`,
:mod:`fra.evaluation.affect`): config sections, datasets, the Ray Train job, results and MLflow.

The sections are FER's (:mod:`fra.evaluation.fer`: ``data``, ``optim``, ``scaling``,
``backbone``, ``run``) so the backbone sources, scaling, checkpointing (``run.checkpoint_every``
with worker-failure retries, ``scaling.max_failures``), evaluation schedule (``run.eval_every`` and
each of the last ``run.last_k`` epochs) and storage behave the same; a ``task`` section holds what
differs. Not supported here (clear errors): ``data.val_fraction`` and ``optim.balanced_sampling``
(use an existing split, ``data.val_split``) and ``optim.label_smoothing``.

Outputs under ``<run.storage_path>/<run>/``: ``results.json`` (headline = last epoch and mean
of the last k evaluations; the best epoch selected on the test set, labelled as such; the
validation-selected epoch when ``data.val_split`` is set; the full report of the last epoch; the
per-epoch curve; corrupt images skipped per split; provenance), ``config.yaml``, a plot and
``model.pt`` (tensors only).
"""
from __future__ import annotations

import dataclasses
import logging
import time
import uuid
from pathlib import Path
from typing import Any, Callable

from fra.config import flatten, to_dict
from fra.errors import ConfigError

log = logging.getLogger(__name__)


@dataclasses.dataclass
class TargetResult:
    """What one attribute / affect evaluation produced (see ``results.json`` for everything)."""

    kind: str
    metric: str  # the headline metric: mean_acc (attributes, %) or mean_ccc (affect)
    last: float
    mean_last_k: float
    best_on_test: float  # selected on the test set (reference style; optimistic)
    best_epoch: int
    report: dict  # the last epoch's full report (per attribute / per target)
    names: list[str]
    results_path: str | Path
    run_dir: str | Path
    model_path: str | Path | None = None
    at_val_best: float | None = None
    val_best_epoch: int | None = None
    backbone: dict = dataclasses.field(default_factory=dict)
    backbone_unchanged: bool | None = None
    mlflow_run_id: str | None = None
    seconds: float = 0.0
    summary: dict = dataclasses.field(default_factory=dict, repr=False)
    history: list[dict] = dataclasses.field(default_factory=list, repr=False)


@dataclasses.dataclass(frozen=True)
class JobKind:
    """How a task plugs into the shared driver."""

    kind: str  # attributes | affect
    column: str  # shard / batch column
    manifest_field: str  # Manifest field naming the targets
    metric: str  # headline metric key of the report
    report: Callable[[Any, list[str]], dict]  # stats -> report
    defaults: dict  # optimiser defaults per protocol
    plot: Callable[[dict, list[str], Path, str], Path] | None = None


def resolve_optim(cfg, defaults: dict) -> dict[str, Any]:
    """Explicit ``optim`` values over the protocol's defaults (as FER's ``resolve_optim``)."""
    out = dict(defaults[cfg.protocol])
    for key in ("optimizer", "lr", "lr_head", "weight_decay"):
        if getattr(cfg.optim, key) is not None:
            out[key] = getattr(cfg.optim, key)
    if out["lr_head"] is None:
        out["lr_head"] = out["lr"]
    return out


def check_supported(cfg) -> None:
    if cfg.data.val_fraction:
        raise ConfigError("data.val_fraction is not supported by the attribute / affect evaluations; "
                          "select epochs on an existing split with data.val_split")
    if cfg.optim.balanced_sampling:
        raise ConfigError("optim.balanced_sampling is a FER option (class-balanced); not for attributes / affect")
    if cfg.optim.label_smoothing:
        raise ConfigError("optim.label_smoothing is a FER option; not for attributes / affect")


def datasets(manifest, job: JobKind, cfg, test_split: str) -> tuple[dict, dict]:
    """Ray datasets ``train`` / ``test`` (/ ``val``) with the target column, and their row counts."""
    from fra.data.stream import fer_dataset

    d = cfg.data
    augment = {k: tuple(v) if isinstance(v, list) else v for k, v in d.augment.items()}
    # NOTE: the reference's CelebA transform is FER's without RandomErasing (DOWNSTREAM_SPEC §1);
    # data.augment can still set erase_p.
    augment = {"erase_p": 0.0, **augment}
    common = {"seed": cfg.run.seed, "num_cpus": d.num_cpus, "extra_columns": (job.column,)}
    out = {"train": fer_dataset(manifest.uri, d.image_size, d.train_split, train=True, augment=augment, **common),
           "test": fer_dataset(manifest.uri, d.image_size, test_split, train=False, **common)}
    sizes = {"train": manifest.num_rows(d.train_split), "test": manifest.num_rows(test_split)}
    if d.val_split:
        if d.val_split in (test_split, d.train_split):
            raise ConfigError(f"data.val_split={d.val_split!r} must differ from the train and test splits")
        out["val"] = fer_dataset(manifest.uri, d.image_size, d.val_split, train=False, **common)
        sizes["val"] = manifest.num_rows(d.val_split)
    for name in ("test", "val"):
        if name in out and sizes[name] * 3 * d.image_size ** 2 <= d.cache_eval_mb * 2**20:
            out[name] = out[name].materialize()
    for name, n in sizes.items():
        if n == 0:
            raise ConfigError(f"{manifest.uri}: split {name!r} ({getattr(d, name + '_split', '') or test_split}) is empty")
    return out, sizes


def run_job(cfg, job: JobKind, task_fields: dict, backbone_source: Any = None, *, run_name: str | None = None,
            score: tuple[str, str]) -> TargetResult:
    """Resolve backbone and data, train on Ray Train, write and log the results (module docstring)."""
    from fra import storage as st
    from fra.data.manifest import read_manifest
    from fra.evaluation.backbones import resolve_backbone
    from fra.evaluation.fer import _card, iters_per_epoch, resolve_amp, resolve_normalization
    from fra.evaluation.target_loop import TargetTask
    from fra.evaluation.worker import LoopSpec
    from fra.ray_runtime import check_shared_location, init_ray

    t0 = time.perf_counter()
    check_supported(cfg)
    if not cfg.data.shards:
        raise ConfigError("data.shards is empty: point it at a shard root written by `fra shards`")
    manifest = read_manifest(cfg.data.shards)
    names = list(getattr(manifest, job.manifest_field))
    if not names:
        raise ConfigError(f"{manifest.uri}: dataset {manifest.dataset!r} has no {job.manifest_field} "
                          f"(the {job.kind} evaluation needs shards with a {job.column!r} column: e.g. celeba, "
                          "affectnet, or synthetic_faces with with_attributes=true)")
    card = _card(manifest)
    test_split = cfg.data.test_split or (card.evaluation_split if card else "test")
    if test_split not in manifest.counts:
        raise ConfigError(f"{manifest.uri} has no split {test_split!r} (splits: {list(manifest.counts)})")
    source = cfg.backbone.source if backbone_source is None else backbone_source
    backbone = resolve_backbone(source, cfg.backbone.arch, cfg.run.seed, cfg.tracking.mlflow_uri,
                                trust_pickle=cfg.backbone.trust_pickle)
    storage = st.absolute(cfg.run.storage_path)
    init_ray()  # before the datasets: Ray Data would start a default Ray itself (init_ray's docstring)
    check_shared_location("run.storage_path", storage)
    data, sizes = datasets(manifest, job, cfg, test_split)
    workers = cfg.scaling.num_workers
    task = TargetTask(kind=job.kind, column=job.column, outputs=len(names), **task_fields)
    opt = resolve_optim(cfg, job.defaults)
    mean, std = resolve_normalization(cfg, manifest, backbone)
    spec = LoopSpec(protocol=cfg.protocol, arch=backbone.arch, num_classes=len(names), **opt,
                    momentum=cfg.optim.momentum, epochs=cfg.optim.epochs, warmup_epochs=cfg.optim.warmup_epochs,
                    min_lr=cfg.optim.min_lr, batch_size=cfg.optim.batch_size,
                    iters_per_epoch=iters_per_epoch(sizes["train"], cfg.optim.batch_size, max(workers, 1)),
                    amp=resolve_amp(cfg.scaling), sync_bn=cfg.scaling.sync_bn and cfg.scaling.use_gpu,
                    eval_every=cfg.run.eval_every, last_k=cfg.run.last_k, seed=cfg.run.seed, mean=tuple(mean),
                    std=tuple(std), checkpoint_every=cfg.run.checkpoint_every, has_val="val" in data)
    run_id = run_name or f"{cfg.run.name}-{time.strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:4]}"
    log.info("%s %s: %s on %s (%s, %d targets), %d train / %d test rows, %d worker(s)", job.kind, cfg.protocol,
             backbone.spec, manifest.dataset, test_split, len(names), sizes["train"], sizes["test"], workers)
    out = _fit(cfg, spec, task, backbone.state_dict, data, run_id, storage, score)
    resolved = {"optim": opt, "test_split": test_split, "amp": spec.amp, "task": dataclasses.asdict(task),
                "normalization": {"mean": list(mean), "std": list(std)}, "iters_per_epoch": spec.iters_per_epoch}
    context = {"config": to_dict(cfg), "resolved": resolved, "backbone": {**backbone.params(), "detail": backbone.detail},
               "dataset": {"name": manifest.dataset, "uri": manifest.uri, "fingerprint": manifest.fingerprint,
                           job.manifest_field: names, "rows": sizes}}
    return write_outputs(cfg, job, out, context, st.join(storage, run_id), names, time.perf_counter() - t0)


def _fit(cfg, spec, task, backbone_sd: dict, data: dict, run_id: str, storage: str, score: tuple[str, str]) -> dict:
    from fra.evaluation.job import fit_evaluation
    from fra.evaluation.target_loop import target_train_loop

    return fit_evaluation(target_train_loop, {"spec": dataclasses.asdict(spec), "task": dataclasses.asdict(task),
                                              "score": list(score)},
                          backbone_sd, cfg.scaling, data, run_id, storage, task.kind)


def write_outputs(cfg, job: JobKind, out: dict, context: dict, location: str, names: list[str],
                  seconds: float) -> TargetResult:
    """results.json, config.yaml, the plot and model.pt to ``location``; MLflow; the result."""
    import shutil
    import tempfile

    from fra import storage as st
    from fra.config import dump_yaml
    from fra.evaluation.report import skipped_per_pass
    from fra.evaluation.target_metrics import summarise_scalar
    from fra.utils.io import atomic_torch_save, atomic_write_json

    run_dir = Path(tempfile.mkdtemp(prefix=f"fra-{job.kind}-")) if st.is_uri(location) else Path(location)
    run_dir.mkdir(parents=True, exist_ok=True)
    history = out["history"]

    def score(stats):
        return job.report(stats, names)[job.metric]

    summary = summarise_scalar(history, score, key="test_stats", last_k=cfg.run.last_k, eval_every=cfg.run.eval_every)
    last_stats = [h for h in history if h.get("test_stats") is not None][-1]["test_stats"]
    last = job.report(last_stats, names)
    skipped = skipped_per_pass(history)
    if any(skipped.values()):
        log.warning("%s: corrupt images skipped while streaming (one pass over each split): %s", job.kind, skipped)
    m = job.metric
    headline = {f"{m}_last": summary["last"], f"{m}_mean_last_k": summary["mean_last_k"], "last_k": summary["last_k"]}
    if "at_val_best" in summary:
        headline.update({f"{m}_at_val_best": summary["at_val_best"], "val_best_epoch": summary["val_best_epoch"]})
    results = {
        "kind": job.kind, "protocol": cfg.protocol, "metric": m, "headline": headline,
        "best_epoch_selected_on_test": {m: summary["best"], "best_epoch": summary["best_epoch"],
                                        "candidates": summary["best_candidates"], "eval_every": cfg.run.eval_every,
                                        "note": "max over the evaluations every eval_every epochs, selected on the "
                                                "test set (the references' way); optimistic"},
        "last_epoch": {"epoch": summary["last_epoch"], **last},
        "summary": {k: v for k, v in summary.items() if k != "curve"}, "curve": summary["curve"],
        "history": [{k: v for k, v in h.items() if not k.endswith("_stats")} for h in history],
        "skipped_corrupt_images": skipped, "backbone_unchanged": out.get("backbone_unchanged"),
        "trunk_fingerprint": out.get("trunk_fingerprint"), "seconds": seconds, **context,
    }
    results_path = atomic_write_json(run_dir / "results.json", results)
    dump_yaml(cfg, run_dir / "config.yaml")
    artifacts = [results_path, run_dir / "config.yaml"]
    if job.plot is not None:
        try:
            artifacts.append(job.plot(last, names, run_dir / f"{job.kind}.png",
                                      f"{cfg.protocol} · epoch {summary['last_epoch']} · {m} {summary['last']:.3f}"))
        except Exception as exc:  # noqa: BLE001 - a plot must not lose the numbers
            log.warning("%s plot failed: %s", job.kind, exc)
    model_path = None
    if cfg.run.save_model and out.get("state_dict") is not None:
        import numpy as np
        import torch

        sd = {k: torch.from_numpy(np.array(v)) for k, v in out["state_dict"].items()}
        model_path = atomic_torch_save({"format": f"fra-{job.kind}-head/1", "arch": context["backbone"]["backbone.arch"],
                                        "task": context["resolved"]["task"], job.manifest_field: names,
                                        "state_dict": sd}, run_dir / "model.pt")
    mlflow_id = _log_mlflow(cfg, job, summary, results, last, names, artifacts, location)
    if st.is_uri(location):
        st.publish(run_dir, location)
        shutil.rmtree(run_dir, ignore_errors=True)
        results_path = st.join(location, "results.json")
        model_path = st.join(location, "model.pt") if model_path else None
    log.info("%s %s: %s last %.4f, mean of last %d %.4f, best (on test) %.4f @%d; results in %s", job.kind,
             cfg.protocol, m, summary["last"], summary["last_k"], summary["mean_last_k"], summary["best"],
             summary["best_epoch"], results_path)
    return TargetResult(kind=job.kind, metric=m, last=summary["last"], mean_last_k=summary["mean_last_k"],
                        best_on_test=summary["best"], best_epoch=summary["best_epoch"], report=last, names=names,
                        results_path=results_path, run_dir=location, model_path=model_path,
                        at_val_best=summary.get("at_val_best"), val_best_epoch=summary.get("val_best_epoch"),
                        backbone=context["backbone"], backbone_unchanged=out.get("backbone_unchanged"),
                        mlflow_run_id=mlflow_id, seconds=seconds, summary=summary, history=history)


def flat_report(report: dict) -> dict[str, float]:
    """Numeric leaves of a report as ``a.b`` keys (per-attribute / per-target values included)."""
    return {k: float(v) for k, v in flatten(report).items() if isinstance(v, (int, float)) and not isinstance(v, bool)}


def _log_mlflow(cfg, job: JobKind, summary: dict, results: dict, last: dict, names: list[str], artifacts: list,
                location: str) -> str | None:
    """Params (config, backbone, dataset), per-epoch and final metrics, artifacts; failures are
    logged, never raised (the results are on disk)."""
    if not cfg.tracking.enabled:
        return None
    try:
        from mlflow.entities import Metric

        from fra import storage as st
        from fra import tracking
        from fra.evaluation.report import epoch_metrics, finish_run, run_params

        uri = tracking.resolve_tracking_uri(cfg.tracking.mlflow_uri, cfg.run.storage_path)
        params = run_params(results)
        run_id, _ = tracking.start_run(uri, cfg.tracking.experiment, f"{job.kind}:{location}", st.basename(location),
                                       params, tags={"fra.protocol": cfg.protocol, "fra.kind": f"{job.kind}-eval"})
        now = int(time.time() * 1000)
        metrics = epoch_metrics(results["history"], now)
        for point in summary["curve"]:
            metrics.append(Metric(f"test_{job.metric}", float(point["value"]), now, int(point["epoch"])))
        final = {**{k: v for k, v in results["headline"].items() if isinstance(v, (int, float))},
                 f"{job.metric}_best_on_test": summary["best"], "best_epoch_on_test": summary["best_epoch"],
                 **{f"last.{k}": v for k, v in flat_report(last).items()}}
        metrics += [Metric(_mlflow_key(k), float(v), now, summary["last_epoch"]) for k, v in final.items()
                    if v is not None and v == v]
        return finish_run(uri, run_id, metrics, artifacts)
    except Exception as exc:  # noqa: BLE001 - a tracking outage must not lose the results on disk
        log.warning("MLflow logging of the %s results failed (results are in %s): %s", job.kind, location, exc)
        return None


def _mlflow_key(key: str) -> str:
    """MLflow metric names allow alphanumerics, _ - . / and spaces."""
    return "".join(c if c.isalnum() or c in "_-./ " else "_" for c in key)


__all__ = ["TargetResult", "JobKind", "resolve_optim", "check_supported", "datasets", "run_job", "write_outputs",
           "flat_report"]
