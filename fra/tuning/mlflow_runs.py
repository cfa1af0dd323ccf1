"""MLflow for sweeps: one parent run per sweep, one nested run per trial, a summary at the end.

Runs are keyed (``fra.tracking.start_run``) by the sweep directory and the trial id, so an
interrupted sweep re-opens the same runs when it resumes. Tracking failures are logged and never
stop a sweep.
"""
from __future__ import annotations

import logging

from ray.tune import Callback

from fra import storage as st
from fra import tracking
from fra.config import flatten, to_dict
from fra.tuning.config import SweepConfig, finite, objective_mode
from fra.tuning.report import STOPPED_FILE

log = logging.getLogger(__name__)


def open_parent_run(cfg: SweepConfig, exp_dir: str) -> tuple[str, str | None]:
    """The sweep's MLflow run (re-opened on resume); ("", None) when tracking is off or down."""
    if not cfg.tracking.enabled:
        return "", None
    uri = tracking.resolve_tracking_uri(cfg.tracking.mlflow_uri, cfg.run.storage_path)
    try:
        run_id, resumed = tracking.start_run(uri, cfg.tracking.experiment, f"sweep:{exp_dir}", cfg.run.name,
                                             flatten(to_dict(cfg)), tags=sweep_tags(cfg))
    except Exception as exc:  # noqa: BLE001 - tracking must not stop the sweep
        log.warning("MLflow unavailable (%s); the sweep runs without tracking", exc)
        return uri, None
    log.info("MLflow %s: sweep run %s (%s)", uri, run_id, "continued" if resumed else "new")
    return uri, run_id


def sweep_tags(cfg: SweepConfig) -> dict[str, str]:
    """The sweep run's tags: what the trials are ranked on and in which direction (NME: min)."""
    return {"fra.kind": "tune-sweep", "fra.objective_task": cfg.objective.task,
            "fra.objective_metric": cfg.objective.metric, "fra.objective_mode": objective_mode(cfg.objective)}


class MLflowTrials(Callback):
    """One nested MLflow run per trial (tag ``mlflow.parentRunId``), metrics of every result.

    Runs on the driver. Runs are keyed by experiment dir + trial id, so a resumed sweep
    continues the same runs; logging is asynchronous and failures never stop the sweep.
    """

    SKIP = ("timestamp", "pid", "done", "time_this_iter_s", "time_since_restore", "iterations_since_restore")

    def __init__(self, uri: str, experiment: str, parent_run_id: str, key: str):
        self.uri, self.experiment, self.parent, self.key = uri, experiment, parent_run_id, key
        self._loggers: dict = {}

    def __getstate__(self) -> dict:  # pickled into Tune's experiment state; loggers hold threads
        return {**self.__dict__, "_loggers": {}}

    def _logger(self, trial):
        if trial.trial_id not in self._loggers:
            run_id, _ = tracking.start_run(
                self.uri, self.experiment, f"{self.key}/{trial.trial_id}", trial.trial_id, dict(trial.config),
                tags={"mlflow.parentRunId": self.parent, "fra.kind": "tune-trial", "fra.trial_id": trial.trial_id})
            self._loggers[trial.trial_id] = tracking.RunLogger(self.uri, run_id)
        return self._loggers[trial.trial_id]

    def on_trial_start(self, iteration, trials, trial, **info):
        self._safe(lambda: self._logger(trial))

    def on_trial_result(self, iteration, trials, trial, result, **info):
        metrics = {k: v for k, v in result.items() if finite(v) and k not in self.SKIP}
        step = int(result.get("epoch") or result.get("training_iteration") or 0)
        self._safe(lambda: self._logger(trial).log_metrics(metrics, step))

    def on_trial_complete(self, iteration, trials, trial, **info):
        if finite((trial.last_result or {}).get("objective")):
            state = "completed"
        elif st.is_file(st.join(self.key, "trials", trial.trial_id, STOPPED_FILE)):
            state = "stopped_early"
        else:
            state = "interrupted"  # a resumed sweep re-opens this run
        self._safe(lambda: self._close(trial, "FINISHED" if state != "interrupted" else "KILLED", state))

    def on_trial_error(self, iteration, trials, trial, **info):
        self._safe(lambda: self._close(trial, "FAILED", "failed"))

    def _close(self, trial, status: str, fra_status: str) -> None:
        logger = self._logger(trial)
        self._loggers.pop(trial.trial_id, None)
        for path in st.list_files(st.join(self.key, "trials", trial.trial_id)):
            logger.log_artifact(st.local_copy(path))  # pretrain.yaml, epochs.json, result.json, starts.json
        logger.close()
        _client(self.uri).set_tag(logger.run_id, "fra.status", fra_status)
        tracking.end_run(self.uri, logger.run_id, status)

    @staticmethod
    def _safe(fn) -> None:
        try:
            fn()
        except Exception as exc:  # noqa: BLE001
            log.warning("MLflow trial logging failed: %s", exc)


def _client(uri: str):
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=uri)


def log_sweep_summary(uri: str, run_id: str, rows: list[dict], best: dict | None, artifacts: list) -> None:
    counts = {s: sum(r["status"] == s for r in rows) for s in ("completed", "stopped_early", "failed", "unfinished")}
    try:
        logger = tracking.RunLogger(uri, run_id)
        logger.log_metrics({f"trials_{k}": v for k, v in counts.items()}
                           | ({"best_objective": best["objective"]} if best else {}), step=0)
        for path in artifacts:
            if path is not None and st.exists(path):
                logger.log_artifact(st.local_copy(path))
        logger.close()
        if best is not None:
            _client(uri).set_tag(run_id, "fra.best_trial", best["trial_id"])
        tracking.end_run(uri, run_id, "KILLED" if counts["unfinished"] else "FINISHED")
    except Exception as exc:  # noqa: BLE001
        log.warning("MLflow sweep summary not logged: %s", exc)


__all__ = ["open_parent_run", "MLflowTrials", "log_sweep_summary", "sweep_tags"]
