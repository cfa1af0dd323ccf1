"""The sweep driver: run or resume Ray Tune over :func:`fra.tuning.trial.fra_trial`, then report.

Layout of ``<run.storage_path>/<run.name>/``: Tune's experiment state and per-trial dirs,
``train_runs/train_<trial>/`` (each trial's pretraining run: checkpoints, ``final/``,
``export/backbone.pt``), ``fer_runs/fer_<trial>/`` or ``landmark_runs/landmarks_<trial>/`` (the chained
evaluation, ``objective.task``), ``trials/<trial>/``
(``pretrain.yaml``, ``result.json``, ``epochs.json``, ``starts.json``), ``sweep.yaml`` (the resolved sweep)
and the outputs ``results.csv``, ``objective.png``, ``best_pretrain.yaml``, ``best_pipeline.yaml``,
``best.json``. MLflow gets one parent run per sweep and one nested run per trial.

Trust: ``Tuner.restore`` unpickles Tune's experiment files when a sweep resumes, so a sweep folder
must be as trusted as the code; fra's own files in it (JSON, YAML, ``weights_only`` tensors) are not.
"""
from __future__ import annotations

import hashlib
import json
import logging
import math
from dataclasses import dataclass, field
from typing import Any

import yaml
from ray.tune.schedulers import ASHAScheduler

from fra import storage as st
from fra.config import to_dict, to_record
from fra.errors import ConfigError, FraError
from fra.tuning import report
from fra.tuning.config import Resolved, SchedulerSettings, SweepConfig, check_resources, objective_mode, resolve
from fra.tuning.mlflow_runs import MLflowTrials, log_sweep_summary, open_parent_run
from fra.tuning.space import with_values
from fra.ray_runtime import check_shared_location, cluster_capacity, init_ray

log = logging.getLogger(__name__)

# Sections that define which trials a sweep has: they must not change between a run and its resume.
IDENTITY_KEYS = ("pretrain", "fer", "landmarks", "space", "num_samples", "seed", "scheduler", "objective",
                 "synthetic_fer", "synthetic_landmarks")


@dataclass
class SweepResult:
    """What :func:`run_sweep` produced (paths are absolute)."""

    experiment_dir: str  # a local path or a URI, as run.storage_path
    best_trial_id: str | None
    best_params: dict[str, Any]
    best_objective: float | None  # the best trial's objective (highest, or lowest with objective_mode min)
    best_metrics: dict[str, Any]
    best_config_path: str | None  # ready-to-run PretrainConfig YAML
    best_pipeline_path: str | None  # a `fra run` pipeline: pretrain -> evaluate -> register -> promote
    best_export_dir: str | None  # the best trial's exported backbone + model card (for registration)
    best_backbone: str | None
    table_path: str
    plot_path: str | None
    mlflow_run_id: str | None
    rows: list[dict] = field(default_factory=list, repr=False)
    table_text: str = field(default="", repr=False)  # the table as fixed-width text
    objective_metric: str = "val_top1"  # objective.metric
    objective_mode: str = "max"  # max (FER accuracy / F1) | min (landmark NME): how the best trial was chosen


class SweepInterrupted(FraError):
    """The sweep stopped before every trial finished; running it again resumes it."""


def run_sweep(cfg: SweepConfig, resume: bool = True) -> SweepResult:
    """Run (or resume) a sweep; every trial = pretrain -> chained evaluation (FER, or landmarks).

    Args:
        cfg: the sweep.
        resume: continue the sweep already in ``run.storage_path/run.name`` (finished trials are
            kept, unfinished ones continue); False refuses to reuse an existing sweep directory.

    Raises:
        ConfigError: invalid config or a trial larger than the cluster (before any trial runs).
        SweepInterrupted: the driver was interrupted; the outputs cover the finished trials.
    """
    from ray import tune
    from ray.tune.search.basic_variant import BasicVariantGenerator

    from fra.tuning.space import to_tune
    from fra.tuning.trial import TrialSetup, fra_trial

    res = resolve(cfg)
    storage = st.absolute(cfg.run.storage_path)
    exp_dir = st.join(storage, cfg.run.name)
    check_snapshot(cfg, exp_dir, resume)
    # The dashboard serves the State API that check_state_api needs.
    init_ray(address=cfg.run.ray_address, num_cpus=cfg.run.num_cpus, dashboard=True)
    check_shared_location("run.storage_path", storage)
    concurrency = check_resources(cfg, res, cluster_capacity())
    check_state_api(cfg)
    task = cfg.objective.task
    fer, landmarks = res.fer, None
    if task == "fer" or cfg.objective.proxy == "linear_probe":
        fer = with_values(res.fer, {"data.shards": fer_shards(cfg, res, exp_dir), "protocol": cfg.objective.protocol})
    if task == "landmarks":
        landmarks = with_values(res.landmarks, {"data.shards": landmark_shards(cfg, res, exp_dir)})
    if res.base.data.source == "synthetic":  # render once here, not in every trial at the same time
        from fra.train.ray_trainer import prepare_data

        prepare_data(res.base, st.join(exp_dir, "train_runs"))
    st.write_text(st.join(exp_dir, "sweep.yaml"), yaml.safe_dump(to_record(cfg), sort_keys=False))
    uri, parent = open_parent_run(cfg, exp_dir)
    setup = TrialSetup(base=res.base, fer=fer, objective=cfg.objective, sweep_dir=exp_dir,
                       scheduler_metric=cfg.scheduler.metric if cfg.scheduler.name != "none" else "",
                       landmarks=landmarks)
    trainable = tune.with_resources(tune.with_parameters(fra_trial, setup=setup), {"CPU": cfg.resources.cpus})
    if resume and tune.Tuner.can_restore(exp_dir):
        log.info("resuming sweep %s (finished trials are kept)", exp_dir)
        tuner = tune.Tuner.restore(exp_dir, trainable, resume_unfinished=True, resume_errored=True)
    else:
        callbacks = [MLflowTrials(uri, cfg.tracking.experiment, parent, exp_dir)] if parent else []
        tuner = tune.Tuner(
            trainable, param_space=to_tune(res.params),
            tune_config=tune.TuneConfig(
                num_samples=cfg.num_samples,  # concurrency: the search algorithm's max_concurrent
                search_alg=BasicVariantGenerator(max_concurrent=concurrency, random_state=cfg.seed),
                scheduler=build_scheduler(cfg.scheduler, res.max_t, exp_dir)),
            run_config=tune.RunConfig(name=cfg.run.name, storage_path=storage, callbacks=callbacks))
    grid = tuner.fit()
    out = write_outputs(cfg, res, grid, exp_dir, landmarks if task == "landmarks" else fer, uri, parent)
    unfinished = [r["trial_id"] for r in out.rows if r["status"] == "unfinished"]
    missing = expected_trials(cfg, res) - len(out.rows)
    if unfinished or missing > 0:
        raise SweepInterrupted(f"sweep {exp_dir} was interrupted: {len(unfinished)} trial(s) unfinished, "
                               f"{max(missing, 0)} not started; run the same command again to resume "
                               f"(table so far: {out.table_path})")
    return out


def check_state_api(cfg: SweepConfig, timeout_s: float = 30.0) -> None:
    """Refuse early stopping where Ray Train could not free a stopped trial's placement group.

    A trial the scheduler stops is killed, and its Train controller with it. Ray Train V2 frees
    that run's placement group from a detached cleaner actor that asks the State API (served by
    the dashboard, found from inside the cluster without an address) whether the controller is
    still alive. Where that question fails (no dashboard, or several Ray instances on one
    machine, which makes the address ambiguous), every stopped trial keeps its workers' CPUs
    reserved and later trials wait for CPUs forever. So ask it the same way, from an actor.
    """
    if cfg.scheduler.name == "none":
        return
    import ray

    probe = ray.remote(num_cpus=0)(_state_api_probe).remote(timeout_s)
    error = ray.get(probe, timeout=timeout_s + 30)
    if error:
        raise ConfigError(
            f"scheduler.name={cfg.scheduler.name} stops trials early, but the Ray State API is unreachable "
            f"from inside this cluster ({error}). Ray Train frees a stopped trial's placement group only "
            "through it, so later trials would wait for CPUs forever. Run one Ray instance per machine "
            "with the dashboard (ray start --head --include-dashboard=true, or let fra tune start Ray), "
            "or use scheduler.name=none")


def _state_api_probe(timeout_s: float) -> str:
    """Runs in a worker: "" when the State API answers as Ray Train's cleaner will ask it, else why not."""
    from ray.util.state import list_actors

    try:
        list_actors(limit=1, timeout=int(timeout_s), raise_on_missing_output=False)
    except Exception as exc:  # RayStateApiException, ConnectionError ("multiple active Ray instances")
        return f"{type(exc).__name__}: {(str(exc).splitlines() or [''])[0][:200]}"
    return ""


def expected_trials(cfg: SweepConfig, res: Resolved) -> int:
    """num_samples x the size of every grid."""
    n = cfg.num_samples
    for p in res.params:
        n *= len(p.args) if p.kind == "grid" else 1
    return n


def build_scheduler(s: SchedulerSettings, max_t: int, exp_dir: str):
    """ASHA on a per-epoch metric, or None (FIFO: every trial runs to its evaluation)."""
    if s.name == "none":
        return None
    # stop_last_trials=False and RecordingASHA: a trial reaching max_t must still run its chained evaluation.
    return RecordingASHA(exp_dir, time_attr=s.time_attr, metric=s.metric, mode=s.mode, max_t=max_t,
                         grace_period=s.grace_period, reduction_factor=s.reduction_factor, stop_last_trials=False)


class RecordingASHA(ASHAScheduler):
    """ASHA that records its early stops and keeps its rungs across an interrupted sweep.

    Tune marks trials TERMINATED both when a scheduler stops them and when the driver is
    interrupted, so each stop is written to ``trials/<id>/stopped_early.json`` for the table.
    Tune does not save scheduler state either: a restored sweep would start with empty rungs and
    compare the remaining trials with fewer results. The rungs are therefore saved to
    ``scheduler_state.json`` after every decision and loaded back once by a resumed sweep.
    The file is plain JSON (numbers and trial ids), never a pickle: a sweep folder on shared storage
    can be written by others, and reading fra's own state must not run their code.
    """

    STATE_FILE = "scheduler_state.json"
    LEGACY_STATE_FILE = "scheduler_state.pkl"  # what earlier fra wrote (a pickle): refused, never loaded
    FORMAT = "fra-asha-state/1"

    def __init__(self, exp_dir: str, **kwargs):
        super().__init__(**kwargs)
        self.exp_dir = exp_dir
        self._loaded = False

    def on_trial_add(self, tune_controller, trial) -> None:
        self._load_once()
        super().on_trial_add(tune_controller, trial)

    def on_trial_result(self, tune_controller, trial, result: dict) -> str:
        self._load_once()
        # NOTE: Ray's ASHA has a rung at max_t and stops there even with stop_last_trials=False; a
        # trial whose pretraining is complete is judged by its chained evaluation, not the proxy.
        if result.get(self._time_attr, 0) >= self._max_t:
            return self.CONTINUE
        action = super().on_trial_result(tune_controller, trial, result)
        if action == self.STOP:
            st.write_json(st.join(self.exp_dir, "trials", trial.trial_id, report.STOPPED_FILE),
                          {"at": result.get(self._time_attr), "metric": self._metric,
                               "value": result.get(self._metric)})
        self._save()
        return action

    def _load_once(self) -> None:
        if self._loaded:
            return
        self._loaded = True
        refuse_legacy_scheduler_state(self.exp_dir)
        path = st.join(self.exp_dir, self.STATE_FILE)
        if not st.is_file(path):
            return
        self.load_state(path)
        log.info("ASHA: restored rungs of %d trial(s) from %s", len(self._trial_info), path)

    def state(self) -> dict:
        """The rungs as JSON-safe data: recorded rewards per milestone, each trial's bracket index."""
        def reward(v):  # numpy floats -> float; NaN (a missing metric) -> None
            v = float(v)
            return None if math.isnan(v) else v

        return {"format": self.FORMAT, "num_stopped": int(self._num_stopped),
                "brackets": [[[float(m), {str(t): reward(v) for t, v in rec.items()}] for m, rec in b._rungs]
                             for b in self._brackets],
                "trial_info": {str(t): self._brackets.index(b) for t, b in self._trial_info.items()}}

    def load_state(self, path: str) -> None:
        """Fill the rungs from :meth:`state`'s JSON; refuses a file of another shape or scheduler."""
        try:
            state = st.read_json(path)
            if state.get("format") != self.FORMAT:
                raise ValueError(f"format {state.get('format')!r}, expected {self.FORMAT!r}")
            brackets = state["brackets"]
            if [[float(m) for m, _ in b] for b in brackets] != [[float(m) for m, _ in b._rungs]
                                                                 for b in self._brackets]:
                raise ValueError("its rung milestones differ from this scheduler's (scheduler settings changed)")
            for saved, bracket in zip(brackets, self._brackets):
                for (_, rec), (_, mine) in zip(saved, bracket._rungs):
                    mine.update({str(t): float("nan") if v is None else float(v) for t, v in rec.items()})
            self._trial_info.update({str(t): self._brackets[int(i)] for t, i in state["trial_info"].items()})
            self._num_stopped = int(state["num_stopped"])
        except (OSError, ValueError, TypeError, KeyError, IndexError, AttributeError) as exc:
            raise ConfigError(f"{path}: not a readable ASHA state ({exc}); delete it to resume the sweep with "
                              "empty rungs, or start a new sweep under another run.name") from exc

    def _save(self) -> None:
        st.write_json(st.join(self.exp_dir, self.STATE_FILE), self.state())


def refuse_legacy_scheduler_state(exp_dir: str) -> None:
    """A ``scheduler_state.pkl`` (older fra) is refused, never unpickled: loading it would run its writer's code."""
    legacy = st.join(exp_dir, RecordingASHA.LEGACY_STATE_FILE)
    if st.is_file(legacy):
        raise ConfigError(
            f"{legacy}: ASHA state saved as a pickle by an older fra; fra no longer unpickles files it finds in a "
            "sweep folder. Delete it to resume with empty rungs (trials already stopped stay stopped), or start "
            "a new sweep under another run.name")


def check_snapshot(cfg: SweepConfig, exp_dir: str, resume: bool) -> None:
    """Refuse to resume a sweep whose trial-defining settings changed (or to reuse one on --fresh)."""
    refuse_legacy_scheduler_state(exp_dir)
    snap = st.join(exp_dir, "sweep.yaml")
    if not st.is_file(snap):
        return
    if not resume:
        raise ConfigError(f"{exp_dir} already holds a sweep: resume it, or choose another run.name")
    old, new = yaml.safe_load(st.read_text(snap)) or {}, to_record(cfg)  # the snapshot was written redacted
    # A section or key this fra added since the snapshot was written counts at its default.
    defaults = to_record(SweepConfig())
    old = {k: ({**defaults[k], **old[k]} if isinstance(defaults.get(k), dict) and isinstance(old.get(k), dict)
               else old.get(k, defaults.get(k))) for k in IDENTITY_KEYS}
    changed = [k for k in IDENTITY_KEYS if old.get(k) != new.get(k)]
    if changed:
        raise ConfigError(f"cannot resume {exp_dir}: {', '.join(changed)} changed since it started "
                          "(use another run.name for a new sweep)")


def fer_shards(cfg: SweepConfig, res: Resolved, exp_dir: str) -> str:
    """The FER shard root; renders synthetic FER shards first when asked (resumable, cached)."""
    if res.fer.data.shards:
        return res.fer.data.shards
    return _synthetic_shards("synthetic_faces", "fer_synthetic", to_dict(cfg.synthetic_fer), exp_dir)


def landmark_shards(cfg: SweepConfig, res: Resolved, exp_dir: str) -> str:
    """The landmark shard root; renders synthetic 68-point faces first when asked (resumable, cached)."""
    if res.landmarks.data.shards:
        return res.landmarks.data.shards
    return _synthetic_shards("synthetic_landmarks", "landmarks_synthetic", to_dict(cfg.synthetic_landmarks), exp_dir)


def _synthetic_shards(source: str, prefix: str, settings: dict, exp_dir: str) -> str:
    """Render ``source`` with ``settings`` (minus ``enabled``) under ``<storage>/_shards``, keyed by the settings."""
    from fra.data.shards import write_shards

    key = hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:12]
    out = st.join(st.dirname(exp_dir), "_shards", f"{prefix}_{key}")
    options = {k: v for k, v in settings.items() if k != "enabled"}
    # options=, not **: the settings' `seed` is the generator's (other faces than pretraining's), not the
    # shards' shuffle seed
    write_shards(source, "", str(out), images_per_shard=256, row_group_size=32, options=options)
    return str(out)


def write_outputs(cfg: SweepConfig, res: Resolved, grid, exp_dir: str, evaluation, uri: str,
                  parent: str | None) -> SweepResult:
    """Table (CSV + console), plot, best config files, and the parent MLflow run's summary.

    ``evaluation`` is the chained evaluation's config (FER or landmarks, data filled in); the best
    trial is the highest objective, or the lowest for a ``min`` objective (landmark NME).
    """
    task, mode = cfg.objective.task, objective_mode(cfg.objective)
    rows = report.collect_rows(grid, res.params, exp_dir, task)
    table = report.write_table(rows, res.params, st.join(exp_dir, "results.csv"), task)
    text = report.format_table(rows, res.params, task)
    log.info("sweep %s: %d trial(s)\n%s", st.basename(exp_dir), len(rows), text)
    plot = report.plot_objective(rows, res.params, st.join(exp_dir, "objective.png"), cfg.objective)
    best = report.best_row(rows, mode)
    files: dict[str, str] = {}
    done: dict = {}
    if best is not None:
        # The best pipeline's evaluation section: the trials' evaluation config, written as a mapping.
        files = report.write_best(best, exp_dir, cfg, to_dict(with_values(evaluation, {"tracking.enabled": True})),
                                  uri)
        done = st.read_json(st.join(exp_dir, "trials", best["trial_id"], "result.json"))
        log.info("best trial %s: %s = %.4g (%s is best) -> %s", best["trial_id"], cfg.objective.metric,
                 best["objective"], "lowest" if mode == "min" else "highest", files["config"])
    else:
        log.warning("no trial completed its chained %s evaluation; no best config written", task)
    if parent:
        log_sweep_summary(uri, parent, rows, best, [table, plot, *files.values(), st.join(exp_dir, "sweep.yaml")])
    export = done["pretrain"]["export_dir"] if done.get("pretrain") else None
    return SweepResult(
        experiment_dir=exp_dir, best_trial_id=best["trial_id"] if best else None,
        best_params=dict(done.get("params", {})), best_objective=best["objective"] if best else None,
        best_metrics=dict(done.get("report", {})), best_config_path=files.get("config"),
        best_pipeline_path=files.get("pipeline"), best_export_dir=export,
        best_backbone=st.join(export, "backbone.pt") if export else None, table_path=table, plot_path=plot,
        mlflow_run_id=parent, rows=rows, table_text=text, objective_metric=cfg.objective.metric, objective_mode=mode)


__all__ = ["SweepResult", "SweepInterrupted", "run_sweep", "expected_trials", "build_scheduler", "RecordingASHA",
           "refuse_legacy_scheduler_state", "check_snapshot", "fer_shards", "landmark_shards", "write_outputs"]
