"""The stage functions of :mod:`fra.pipeline`: each calls one library entry point.

A stage receives the pipeline's :class:`StageContext`, its own typed config and the outputs of
the stages before it, and returns a JSON-able dict of its outputs (paths, metrics, versions).
This module knows nothing of :mod:`fra.pipeline`, which calls it.
"""
from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass
from pathlib import Path

from fra import storage as st
from fra.errors import ConfigError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class StageContext:
    """What every stage may need from the pipeline around it."""

    storage_path: str  # the pipeline's storage (absolute path or URI)
    tracking_uri: str  # the resolved MLflow tracking URI


def run_shards(ctx: StageContext, jobs, outputs: dict) -> dict:
    from fra.data.shards import write_shards

    done = {}
    for job in jobs:
        manifest = write_shards(job.source, job.root, job.out, split=job.split,
                                images_per_shard=job.images_per_shard, row_group_size=job.row_group_size,
                                options=job.options)  # a `seed` option is the generator's, not the shuffle's
        done[job.out] = {"source": job.source, "fingerprint": manifest.fingerprint,
                         "counts": getattr(manifest, "counts", {})}
    return done


def run_pretrain(ctx: StageContext, pre, outputs: dict) -> dict:
    from fra.train.ray_trainer import pretrain_ray

    res = pretrain_ray(pre)
    return {"run_dir": res.run_dir, "checkpoint": res.checkpoint, "backbone": res.backbone,
            "export_dir": st.dirname(res.backbone), "model_card": res.model_card,
            "mlflow_run_id": res.mlflow_run_id, "manifest_fingerprint": res.manifest_fingerprint}


def run_sweep(ctx: StageContext, sweep, outputs: dict) -> dict:
    from fra.tuning import run_sweep as sweep_fn

    res = sweep_fn(sweep, resume=True)
    out = dataclasses.asdict(res) if dataclasses.is_dataclass(res) else dict(res)
    return {k: (str(v) if isinstance(v, Path) else v) for k, v in out.items()}


def _backbone_for_evaluation(fer, outputs: dict) -> str:
    """The evaluation's backbone: explicit source, else the sweep's best, else the pretraining export."""
    if fer.backbone.source not in ("", "auto"):
        return fer.backbone.source
    if "sweep" in outputs:
        best = outputs["sweep"].get("best_backbone") or outputs["sweep"].get("best_export_dir")
        if best:
            return str(best)
    if "pretrain" in outputs:
        return outputs["pretrain"]["export_dir"]
    raise ConfigError("evaluate.backbone.source is 'auto' but no pretrain or sweep stage ran before it")


def run_evaluate(ctx: StageContext, fer, outputs: dict) -> dict:
    from fra.evaluation.fer import evaluate_fer

    source = _backbone_for_evaluation(fer, outputs)
    res = evaluate_fer(fer, source)
    return {"backbone": source, "results_path": str(res.results_path), "run_dir": str(res.run_dir),
            "top1_last": res.top1_last, "top1_mean_last5": res.top1_mean_last5, "top1_best": res.top1_best,
            "best_epoch": res.best_epoch, "mean_class_acc": res.mean_class_acc, "macro_f1": res.macro_f1,
            "mlflow_run_id": res.mlflow_run_id}


def run_landmarks(ctx: StageContext, cfg, outputs: dict) -> dict:
    from fra.evaluation.landmarks import evaluate_landmarks

    source = _backbone_for_evaluation(cfg, outputs)
    res = evaluate_landmarks(cfg, source)
    return {"backbone": source, "results_path": str(res.results_path), "run_dir": str(res.run_dir),
            "nme_last": res.nme_last, "nme_mean_last_k": res.nme_mean_last_k, "fr_last": res.fr_last,
            "auc_last": res.auc_last, "nme_best": res.nme_best, "best_epoch": res.best_epoch,
            "mlflow_run_id": res.mlflow_run_id}


def _run_targets(cfg, outputs: dict, evaluate) -> dict:
    source = _backbone_for_evaluation(cfg, outputs)
    res = evaluate(cfg, source)
    m = res.metric
    return {"backbone": source, "results_path": str(res.results_path), "run_dir": str(res.run_dir), "metric": m,
            f"{m}_last": res.last, f"{m}_mean_last_k": res.mean_last_k, f"{m}_best_on_test": res.best_on_test,
            "best_epoch": res.best_epoch, "mlflow_run_id": res.mlflow_run_id}


def run_attributes(ctx: StageContext, cfg, outputs: dict) -> dict:
    from fra.evaluation.attributes import evaluate_attributes

    return _run_targets(cfg, outputs, evaluate_attributes)


def run_affect(ctx: StageContext, cfg, outputs: dict) -> dict:
    from fra.evaluation.affect import evaluate_affect

    return _run_targets(cfg, outputs, evaluate_affect)


EVALUATION_STAGES = ("evaluate", "landmarks", "attributes", "affect")


def run_register(ctx: StageContext, reg, outputs: dict) -> dict:
    """Register the evaluated backbone with the metrics of every evaluation stage that ran (FER's
    ``fer_*``, ``landmarks_*``, ``attributes_*``, ``affect_*``; protocols and fingerprints joined with
    '+'), else the pretraining export without metrics."""
    from fra.registry import fer_metrics_from_results, register_backbone
    from fra.registry.registration import target_metrics_from_results

    ran = [s for s in EVALUATION_STAGES if s in outputs]
    if ran:
        sources = {outputs[s]["backbone"] for s in ran}
        if len(sources) > 1:
            raise ConfigError(f"the register stage stores the metrics of one backbone, but the evaluation stages "
                              f"{ran} evaluated different ones: {sorted(sources)}")
        source, metrics, protocol, fingerprint = sources.pop(), {}, "", ""
        readers = {"evaluate": fer_metrics_from_results, "landmarks": _landmark_metrics,
                   "attributes": target_metrics_from_results, "affect": target_metrics_from_results}
        for stage in ran:  # each stage's metrics sit next to FER's, all protocols are compared
            more, p, f = readers[stage](outputs[stage]["results_path"])
            metrics, protocol, fingerprint = {**metrics, **more}, _join(protocol, p), _join(fingerprint, f)
    elif "pretrain" in outputs:
        source, metrics, protocol, fingerprint = outputs["pretrain"]["export_dir"], {}, "", ""
    else:
        raise ConfigError("the register stage needs a pretrain or evaluation stage before it")
    info = register_backbone(source, reg.name, tracking_uri=ctx.tracking_uri, fer_metrics=metrics,
                             eval_protocol=protocol, dataset_fingerprint=fingerprint)
    return {"name": reg.name, "version": int(info.version), "metrics": metrics, "protocol": protocol,
            "dataset_fingerprint": fingerprint}


def _landmark_metrics(path) -> tuple[dict, str, str]:
    from fra.evaluation.landmarks_report import landmark_metrics_from_results

    return landmark_metrics_from_results(path)


def _join(a: str, b: str) -> str:
    return "+".join(p for p in (a, b) if p)


def _with_landmarks(landmarks: dict, metrics: dict, protocol: str, fingerprint: str) -> tuple[dict, str, str]:
    """Add the ``landmarks_*`` metrics of a landmark results.json; protocols and fingerprints are joined with '+'."""
    more, lm_protocol, lm_fingerprint = _landmark_metrics(landmarks["results_path"])
    return {**metrics, **more}, _join(protocol, lm_protocol), _join(fingerprint, lm_fingerprint)


def run_promote(ctx: StageContext, prom, outputs: dict) -> dict:
    from fra.registry_promotion import promote

    reg = outputs["register"]
    decision = promote(reg["name"], reg["version"], gate_metric=prom.gate_metric, margin=prom.margin,
                       mode=prom.mode, tracking_uri=ctx.tracking_uri)
    return decision.to_dict()


STAGE_RUNNERS = {
    "shards": run_shards,
    "pretrain": run_pretrain,
    "sweep": run_sweep,
    "evaluate": run_evaluate,
    "landmarks": run_landmarks,
    "attributes": run_attributes,
    "affect": run_affect,
    "register": run_register,
    "promote": run_promote,
}
