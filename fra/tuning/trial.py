"""One Tune trial = the project's pretraining, then the project's FER or landmark evaluation (chained).

:func:`fra_trial` is a Tune function trainable. It builds the trial's
:class:`~fra.config.PretrainConfig` (base + sampled values), runs
:func:`fra.train.ray_trainer.pretrain_ray` (the same code as ``fra pretrain``) with
:class:`ProxyReport` in the Train run config, then, per ``objective.task``,
:func:`fra.evaluation.fer.evaluate_fer` (``fra evaluate fer``) or
:func:`fra.evaluation.landmarks.evaluate_landmarks` (``fra evaluate landmarks``) on the pretrained
backbone, and reports the objective: a validation number (FER top-1 / macro-F1, or the landmark
NME of the validation carve), never a test one; test numbers are reported next to it.

* Per epoch, :class:`ProxyReport` (a Train ``UserCallback`` running in the Train controller)
  scores the epoch's checkpoint with the frozen-feature linear probe on a holdout carved from the
  FER *train* split, and forwards rank 0's metrics plus ``proxy_top1`` to Tune for ASHA.
* The inner Train run is named ``train_<trial_id>``: a trial restored after an interruption
  continues its pretraining from the last checkpoint (Train V2 resumes by name).
* ``result.json`` in ``trials/<trial_id>/`` records the finished trial; a restarted trial that
  finds it (or a finished export) does not redo that work.
* Every file a trial writes goes to the sweep's storage location (local or a URI such as
  ``s3://...``), never to the node-local disk: the trial runs on whichever node Tune placed it,
  and the driver that reads the results may be on another.
"""
from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass
from typing import Any

import yaml

from ray.tune.integration.ray_train import TuneReportCallback

from fra import storage as st
from fra.config import PretrainConfig, to_record
from fra.errors import FraError
from fra.evaluation.fer import FERConfig
from fra.tuning.config import ObjectiveSettings
from fra.tuning.space import plain, with_values

log = logging.getLogger(__name__)

STARTS_FILE = "starts.json"  # per trial: one entry per start of its trainable
EPOCHS_FILE = "epochs.json"  # per trial: the results forwarded to Tune during pretraining


@dataclass(frozen=True)
class TrialSetup:
    """What every trial shares (typed configs; shipped once through the object store)."""

    base: PretrainConfig  # the resolved pretraining config (resources forced in)
    fer: FERConfig  # the resolved FER config (shards and protocol filled in; task landmarks: the proxy's data)
    objective: ObjectiveSettings
    sweep_dir: str
    scheduler_metric: str = ""  # must appear in every result Tune receives (its strict metric check)
    landmarks: Any = None  # the resolved LandmarkConfig (objective.task=landmarks; shards filled in)


class ProxyReport(TuneReportCallback):
    """Forward each checkpointed report to Tune, adding the frozen-feature probe accuracy.

    Runs in the Ray Train controller. The probe is computed once per completed epoch (a
    mid-epoch checkpoint repeats the epoch's value) on rows of the FER train split held out by
    path hash; the test split is never read. Every forwarded result is also appended to
    ``record`` (JSON list), from which the trial's final report repeats the last epoch's values.
    """

    def __init__(self, probe: dict | None, record: str):
        super().__init__()
        self.probe = probe  # linear_probe_features kwargs; None = forward metrics only
        self.record = record
        self._epoch, self._value = -1, float("nan")

    def after_report(self, run_context, metrics: list[dict], checkpoint) -> None:
        out = dict(metrics[0])
        if checkpoint is not None:
            out["checkpoint_path"] = checkpoint.path
            epoch = int(out.get("epoch", 0))
            if self.probe is not None and epoch > self._epoch:
                self._epoch, self._value = epoch, self._score(checkpoint)
        if self.probe is not None:
            out["proxy_top1"] = self._value
        self._training_actor_item_queue.put(out)
        try:
            history = read_record(self.record)
            history.append({k: v for k, v in out.items() if isinstance(v, (int, float))})
            st.write_json(self.record, history)
        except OSError as exc:
            log.warning("could not record epoch metrics in %s: %s", self.record, exc)

    def _score(self, checkpoint) -> float:
        from fra.evaluation.probe import linear_probe_features

        try:
            with checkpoint.as_directory() as d:
                return float(linear_probe_features(d, **self.probe).top1)
        except Exception as exc:  # noqa: BLE001 - a failed proxy must not kill the trial
            log.warning("proxy probe failed on %s: %s", checkpoint.path, exc)
            return float("nan")


def trial_pretrain_config(setup: TrialSetup, params: dict[str, Any], trial_id: str):
    """Base + sampled values, with the deterministic inner run name ``train_<trial_id>``."""
    fixed = {"run.name": f"train_{trial_id}", "run.storage_path": st.join(setup.sweep_dir, "train_runs")}
    return with_values(setup.base, {**params, **fixed})


def trial_fer_config(setup: TrialSetup):
    """The chained evaluation's config: protocol and validation carve from the objective."""
    obj, fer = setup.objective, setup.fer
    values = {"protocol": obj.protocol, "tracking.enabled": False, "run.save_model": False,
              "run.storage_path": st.join(setup.sweep_dir, "fer_runs"),
              # NOTE: >= 1 worker: Train's local mode (0) would call ray.train APIs inside the Tune session.
              "scaling.num_workers": max(1, fer.scaling.num_workers)}
    if not fer.data.val_split:
        values["data.val_fraction"] = obj.val_fraction
    return with_values(fer, values)


def trial_landmark_config(setup: TrialSetup):
    """The chained landmark evaluation's config: the validation carve from the objective, no model file."""
    obj, lm = setup.objective, setup.landmarks
    values = {"tracking.enabled": False, "run.save_model": False,
              "run.storage_path": st.join(setup.sweep_dir, "landmark_runs"),
              # NOTE: >= 1 worker: Train's local mode (0) would call ray.train APIs inside the Tune session.
              "scaling.num_workers": max(1, lm.scaling.num_workers)}
    if not lm.data.val_fraction:
        values["data.val_fraction"] = obj.val_fraction
    return with_values(lm, values)


def proxy_kwargs(setup: TrialSetup, fer_cfg) -> dict | None:
    """Arguments of the per-epoch probe (None when the proxy is off)."""
    obj = setup.objective
    if obj.proxy == "none":
        return None
    return {"shards": fer_cfg.data.shards, "train_split": fer_cfg.data.train_split,
            "holdout": obj.val_fraction or 0.2, "image_size": fer_cfg.data.image_size,
            "max_rows": obj.proxy_max_rows}


def fer_metrics(result, metric: str) -> dict[str, float]:
    """Validation metrics (selection) and test metrics (reporting only) of one FER run."""
    s = result.summary
    val = s.get("val_last") or {}
    out = {"val_top1": val.get("top1"), "val_macro_f1": val.get("macro_f1"), "val_top1_best": s.get("val_top1_best"),
           "test_top1_last": result.top1_last, "test_top1_mean_last5": result.top1_mean_last5,
           "test_macro_f1": result.macro_f1, "test_mean_class_acc": result.mean_class_acc}
    out = {k: float("nan") if v is None else float(v) for k, v in out.items()}
    out["objective"] = out[metric]
    return out


def landmark_metrics(result, metric: str) -> dict[str, float]:
    """Validation NME (selection: the validation carve of the landmark train split) and test numbers
    (reporting only) of one landmark run; NME and FR in %, lower is better.

    ``val_nme`` is the last evaluated epoch's validation NME, ``val_nme_best`` the lowest over the
    evaluated epochs (:func:`fra.evaluation.landmark_metrics.summarise_landmarks`).
    """
    with_val = [h for h in result.history if h.get("val") is not None]
    if not with_val:
        raise FraError("the landmark evaluation reported no validation NME: the objective needs a validation carve")
    s = result.summary
    out = {"val_nme": with_val[-1]["val"]["full"]["nme"], "val_nme_best": s.get("val_nme_best"),
           "test_nme_last": result.nme_last, "test_nme_mean_last_k": result.nme_mean_last_k,
           "test_fr_last": result.fr_last, "test_auc_last": result.auc_last}
    out = {k: float("nan") if v is None else float(v) for k, v in out.items()}
    out["objective"] = out[metric]
    return out


def read_record(path: str) -> list[dict]:
    return st.read_json(path) if st.is_file(path) else []


def last_epoch_metrics(path: str, scheduler_metric: str) -> dict:
    """The last forwarded per-epoch result (the scheduler metric is always present, NaN if unknown)."""
    history = read_record(path)
    last = {k: v for k, v in (history[-1] if history else {}).items() if k not in ("step",)}
    if scheduler_metric:
        last.setdefault(scheduler_metric, float("nan"))
    return last


def record_start(trial_dir: str, trial_id: str, params: dict) -> None:
    """One entry per start of this trial's trainable in ``<trial_dir>/starts.json`` (resume audits
    count these). A trial's starts never overlap, so read-modify-write is safe on object stores."""
    path = st.join(trial_dir, STARTS_FILE)
    starts = st.read_json(path) if st.is_file(path) else []
    starts.append({"trial_id": trial_id, "params": params, "time": time.time(), "pid": os.getpid()})
    st.write_json(path, starts)


def fra_trial(config: dict, setup: TrialSetup) -> None:
    """The Tune function trainable (see the module docstring)."""
    from ray import tune

    trial_id = tune.get_context().get_trial_id()
    params = {k: plain(v) for k, v in config.items()}
    tdir = st.join(setup.sweep_dir, "trials", trial_id)
    record_start(tdir, trial_id, params)
    done, epochs = st.join(tdir, "result.json"), st.join(tdir, EPOCHS_FILE)
    if st.is_file(done):  # finished before an interruption, but Tune never recorded it
        tune.report(st.read_json(done)["report"])
        return
    cfg = trial_pretrain_config(setup, params, trial_id)
    fer_cfg = trial_fer_config(setup)  # task landmarks: only the proxy's data
    st.write_text(st.join(tdir, "pretrain.yaml"), yaml.safe_dump(to_record(cfg), sort_keys=False))
    t0 = time.time()
    try:
        pre = pretrain_or_reuse(cfg, [ProxyReport(proxy_kwargs(setup, fer_cfg), epochs)])
    except FraError as exc:
        if getattr(exc, "status", None) not in ("nonfinite", "collapse"):
            raise  # infrastructure or config trouble: the trial errors (and is retried on resume)
        # diverged / collapsed: a legitimate, final outcome of these settings
        log.warning("trial %s: pretraining stopped: %s", trial_id, exc)
        report = {**last_epoch_metrics(epochs, setup.scheduler_metric),
                  "objective": float("nan"), "failure": str(exc)[:500]}
        st.write_json(done, {"trial_id": trial_id, "params": params, "report": report})
        tune.report(report)
        return
    t1 = time.time()
    task = setup.objective.task
    metrics, evaluation = chained_evaluation(setup, fer_cfg, pre["backbone"], trial_id)
    report = {**last_epoch_metrics(epochs, setup.scheduler_metric), **metrics, "epoch": pre["epoch"],
              "pretrain_seconds": t1 - t0, f"{task}_seconds": time.time() - t1}
    st.write_json(done, {"trial_id": trial_id, "params": params, "report": report, "pretrain": pre,
                         task: evaluation, "config": st.join(tdir, "pretrain.yaml")})
    tune.report(report)


def chained_evaluation(setup: TrialSetup, fer_cfg, backbone: str, trial_id: str) -> tuple[dict, dict]:
    """Run the objective's evaluation on the trial's backbone: (metrics with ``objective``, its files)."""
    if setup.objective.task == "landmarks":
        from fra.evaluation.landmarks import evaluate_landmarks

        res = evaluate_landmarks(trial_landmark_config(setup), backbone, run_name=f"landmarks_{trial_id}")
        metrics = landmark_metrics(res, setup.objective.metric)
    else:
        from fra.evaluation.fer import evaluate_fer

        res = evaluate_fer(fer_cfg, backbone, run_name=f"fer_{trial_id}")
        metrics = fer_metrics(res, setup.objective.metric)
    return metrics, {"results": str(res.results_path), "run_dir": str(res.run_dir)}


def pretrain_or_reuse(cfg, callbacks: list) -> dict:
    """Run :func:`~fra.train.ray_trainer.pretrain_ray`, unless this run already exported its backbone."""
    from fra.train import ray_trainer

    run_dir = st.join(st.absolute(cfg.run.storage_path), cfg.run.name)
    export = st.join(run_dir, "export")
    if st.is_file(st.join(export, "backbone.pt")) and st.is_file(st.join(export, "model_card.json")):
        log.info("%s: pretraining already finished; reusing %s", cfg.run.name, export)
        return {"run_dir": run_dir, "export_dir": export, "backbone": st.join(export, "backbone.pt"),
                "epoch": cfg.optim.epochs, "reused": True}
    out = ray_trainer.pretrain_ray(cfg, callbacks=callbacks)
    rv = out.return_value or {}
    return {"run_dir": str(out.run_dir), "export_dir": st.dirname(out.backbone), "backbone": out.backbone,
            "checkpoint": out.checkpoint, "epoch": int(rv.get("epoch", cfg.optim.epochs)),
            "steps": rv.get("step"), "reused": False}


__all__ = ["TrialSetup", "ProxyReport", "fra_trial", "trial_pretrain_config", "trial_fer_config", "fer_metrics",
           "trial_landmark_config", "landmark_metrics", "chained_evaluation", "proxy_kwargs", "record_start",
           "read_record", "last_epoch_metrics", "pretrain_or_reuse", "STARTS_FILE", "EPOCHS_FILE"]
