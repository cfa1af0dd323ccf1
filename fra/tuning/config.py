"""Sweep configuration: what a sweep YAML holds, how it is loaded, and every check run before Ray.

A sweep YAML (``tune_configs/*.yaml``, or the ``sweep:`` section of a pipeline YAML) holds the
base pretrain config (inline or a path), the config of the chained evaluation (``fer:`` or, with
``objective.task: landmarks``, ``landmarks:``; inline or a path), the search space
(:mod:`fra.tuning.space`), the scheduler, the objective, per-trial resources, the storage
location and MLflow settings.

The objective is a validation number of the chained evaluation, never a test one: FER's
validation top-1 / macro-F1 (higher is better) or the landmark job's validation NME (lower is
better; :data:`OBJECTIVE_METRICS` gives each metric's task and direction, :func:`objective_mode`
the direction of a sweep). :func:`load_sweep_config` reads it,
:func:`resolve` checks all of it before Ray starts, and :func:`check_resources` compares one
trial with the cluster.
"""
from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fra.config import (PretrainConfig, apply_overrides, bounded, config, from_dict, load_yaml, location, one_of,
                        path_component)
from fra.errors import ConfigError
from fra.tuning.space import Param, parse_space, set_paths

log = logging.getLogger(__name__)

DEFAULT_SWEEP = Path(__file__).resolve().parents[2] / "tune_configs" / "demo_sweep.yaml"
# metric -> (task of the chained evaluation, direction). NME: the landmark job's validation NME (%),
# of the last epoch (val_nme) or the lowest over its evaluated epochs (val_nme_best).
OBJECTIVE_METRICS = {"val_top1": ("fer", "max"), "val_top1_best": ("fer", "max"), "val_macro_f1": ("fer", "max"),
                     "val_nme": ("landmarks", "min"), "val_nme_best": ("landmarks", "min")}
OBJECTIVE_TASKS = ("fer", "landmarks")


@config("scheduler")
class SchedulerSettings:
    """Early stopping on per-epoch results (``name: none`` runs every trial to the end)."""

    name: str = one_of("asha", "none")  # asha | none
    metric: str = "proxy_top1"  # a per-epoch metric: proxy_top1 (max) or loss (min)
    mode: str = one_of("max", "min")
    time_attr: str = "epoch"  # completed pretraining epochs: survives restores, unlike training_iteration
    grace_period: int = bounded(1, ge=1)
    max_t: int = bounded(0, ge=0)  # 0 = the pretraining epochs
    reduction_factor: float = bounded(2.0, gt=1)


@config("objective")
class ObjectiveSettings:
    """The chained evaluation's objective and the cheap per-epoch proxy (both honest: no test labels)."""

    task: str = one_of(*OBJECTIVE_TASKS)  # fer | landmarks: the evaluation chained after each pretraining
    protocol: str = one_of("linear", "finetune")  # linear | finetune (evaluate_fer protocol; task fer only)
    # fer: val_top1 (last epoch) | val_top1_best | val_macro_f1 (max); landmarks: val_nme (last) | val_nme_best (min)
    metric: str = one_of(*OBJECTIVE_METRICS)
    # carved from the evaluation's train split by path hash (unless fer.data.val_split / landmarks.data.val_fraction)
    val_fraction: float = bounded(0.2, ge=0, lt=1)
    proxy: str = one_of("linear_probe", "none")  # linear_probe (frozen features, each epoch) | none
    proxy_max_rows: int = bounded(512, ge=1)  # rows of the FER train split the proxy embeds


@config("resources")
class TrialResources:
    """What one trial uses; pretraining and the chained evaluation run one after the other."""

    cpus: float = bounded(1.0, ge=0)  # the trial process (Tune function trainable)
    workers: int = bounded(1, ge=1)  # Ray Train workers of the pretraining (scaling.num_workers)
    cpus_per_worker: float = bounded(1.0, gt=0)
    gpus_per_worker: float = bounded(0.0, ge=0)  # > 0 trains on GPUs
    data_cpus: float = bounded(1.0, ge=0)  # kept free for Ray Data (its file listing task takes a whole CPU)


@config("synthetic_fer")
class SyntheticFER:
    """Render a synthetic FER shard set when ``fer.data.shards`` is empty (demo, CI)."""

    enabled: bool = False
    num_identities: int = bounded(24, ge=1)
    images_per_identity: int = bounded(8, ge=1)
    size: int = bounded(48, ge=16)
    seed: int = bounded(1, ge=0)  # not the pretraining seed: other faces than the pretraining images


@config("synthetic_landmarks")
class SyntheticLandmarks:
    """Render synthetic 68-point landmark shards when ``landmarks.data.shards`` is empty (demo, CI)."""

    enabled: bool = False
    num_identities: int = bounded(6, ge=1)
    images_per_identity: int = bounded(6, ge=1)
    size: int = bounded(64, ge=16)
    seed: int = bounded(2, ge=0)  # not the pretraining seed: other faces than the pretraining images


@config("run")
class SweepRun:
    name: str = path_component("fra-sweep")
    storage_path: str = location("runs/sweeps", required=True)
    ray_address: str = ""  # "" = join a running local Ray or start one
    num_cpus: int = bounded(0, ge=0)  # logical CPUs of a Ray started here (0 = Ray's default)


@config("tracking")
class SweepTracking:
    enabled: bool = True
    mlflow_uri: str = location("")  # "" = sqlite under run.storage_path
    experiment: str = "fra-tune"


@config()
class SweepConfig:
    """Everything ``fra tune`` needs (see the module docstring)."""

    pretrain: dict = field(default_factory=dict)  # PretrainConfig mapping (a path in YAML is inlined)
    fer: dict = field(default_factory=dict)  # FERConfig mapping (a path in YAML is inlined)
    landmarks: dict = field(default_factory=dict)  # LandmarkConfig mapping (objective.task=landmarks; path inlined)
    space: dict = field(default_factory=dict)
    num_samples: int = bounded(4, ge=1)
    max_concurrent_trials: int = bounded(1, ge=1)
    seed: int = bounded(0, ge=0)  # sampling seed of the search
    scheduler: SchedulerSettings = field(default_factory=SchedulerSettings)
    objective: ObjectiveSettings = field(default_factory=ObjectiveSettings)
    resources: TrialResources = field(default_factory=TrialResources)
    synthetic_fer: SyntheticFER = field(default_factory=SyntheticFER)
    synthetic_landmarks: SyntheticLandmarks = field(default_factory=SyntheticLandmarks)
    run: SweepRun = field(default_factory=SweepRun)
    tracking: SweepTracking = field(default_factory=SweepTracking)


@dataclass(frozen=True)
class Resolved:
    """A checked sweep: the base pretrain config, the evaluation configs and the parameters."""

    base: PretrainConfig
    fer: Any  # FERConfig (task fer; with task landmarks only the proxy's data)
    params: list[Param]
    max_t: int
    landmarks: Any = None  # LandmarkConfig (task landmarks)

    def evaluation(self, task: str):
        """The chained evaluation's config of ``task``."""
        return self.landmarks if task == "landmarks" else self.fer


def objective_mode(objective: ObjectiveSettings) -> str:
    """``max`` (FER accuracy / F1) or ``min`` (landmark NME): how trials are ranked."""
    return OBJECTIVE_METRICS[objective.metric][1]


def load_sweep_config(path: str | Path | None = None, overrides=()) -> SweepConfig:
    """Read a sweep YAML (default: ``tune_configs/demo_sweep.yaml``) or a pipeline YAML with a
    ``sweep:`` section, apply ``--set`` overrides (``sweep.`` prefix optional) and build the config."""
    path = Path(path) if path else DEFAULT_SWEEP
    raw = load_yaml(path)
    overrides = [o.removeprefix("sweep.") for o in overrides]
    if "sweep" in raw:  # a pipeline YAML
        if not isinstance(raw["sweep"], dict):
            raise ConfigError(f"{path}: the 'sweep' section must be a mapping")
        # objective.* first: objective.task decides whether the pipeline's landmarks section is taken
        sweep = apply_overrides(raw["sweep"], [o for o in overrides if o.startswith("objective.")])
        raw = sweep_section(sweep, raw.get("pretrain"), raw.get("fer", raw.get("evaluate")), path.parent,
                            landmarks=raw.get("landmarks"))
    else:
        raw = sweep_section(raw, base_dir=path.parent)
    return from_dict(SweepConfig, apply_overrides(raw, overrides))


def sweep_section(sweep: dict, pretrain: dict | str | None = None, fer: dict | str | None = None,
                  base_dir: Path | None = None, landmarks: dict | str | None = None) -> dict:
    """A sweep mapping ready for ``from_dict(SweepConfig, ...)``.

    ``pretrain`` / ``fer`` / ``landmarks`` missing from ``sweep`` come from the given pipeline
    sections (the pipeline's ``pretrain:``, ``evaluate:`` and ``landmarks:``; ``landmarks`` only for
    a sweep whose ``objective.task`` is ``landmarks``, so that a FER sweep does not depend on it); a
    string is a YAML path (relative to ``base_dir``), either a plain config or a pipeline file
    holding that section.
    """
    out = dict(sweep)
    objective = out.get("objective")
    if not isinstance(objective, dict) or objective.get("task") != "landmarks":
        landmarks = None
    for key, fallback, section in (("pretrain", pretrain, "pretrain"), ("fer", fer, "evaluate"),
                                   ("landmarks", landmarks, "landmarks")):
        value = out.get(key, fallback)
        if isinstance(value, str):
            value = _inline(value, base_dir or Path.cwd(), key, section)
        if value is not None:
            out[key] = dict(value)
    return out


def _inline(ref: str, base_dir: Path, key: str, pipeline_key: str) -> dict:
    p = Path(ref).expanduser()
    p = p if p.is_absolute() or p.exists() else base_dir / p
    data = load_yaml(p)
    for name in (key, pipeline_key):
        if isinstance(data.get(name), dict):  # a pipeline YAML holding the section
            return data[name]
    return data


def resolve(cfg: SweepConfig) -> Resolved:
    """Check the whole sweep before anything runs; every problem is a :class:`ConfigError`."""
    from fra.evaluation.fer import FERConfig
    from fra.train.ray_trainer import check_config

    base = from_dict(PretrainConfig, trial_overrides(cfg, cfg.pretrain), "pretrain")
    check_config(base)
    fer = from_dict(FERConfig, cfg.fer, "fer")
    params = parse_space(cfg.space, base)
    obj = cfg.objective
    if OBJECTIVE_METRICS[obj.metric][0] != obj.task:
        fitting = " | ".join(m for m, (t, _) in OBJECTIVE_METRICS.items() if t == obj.task)
        raise ConfigError(f"objective.metric={obj.metric} is a {OBJECTIVE_METRICS[obj.metric][0]} metric, but "
                          f"objective.task={obj.task}: use one of {fitting}")
    landmarks = _resolve_landmarks(cfg) if obj.task == "landmarks" else None
    needs_fer = obj.task == "fer" or obj.proxy == "linear_probe"  # the proxy embeds FER train rows
    if needs_fer and not fer.data.shards and not cfg.synthetic_fer.enabled:
        why = "" if obj.task == "fer" else " (objective.proxy=linear_probe embeds FER rows; or objective.proxy=none)"
        raise ConfigError("fer.data.shards is empty: point it at FER shards (fra shards ...) "
                          f"or set synthetic_fer.enabled=true{why}")
    if obj.task == "fer":
        if fer.data.val_split and obj.val_fraction:
            raise ConfigError("set objective.val_fraction or fer.data.val_split for model selection, not both")
        if not fer.data.val_split and not obj.val_fraction:
            raise ConfigError("the objective needs a validation split (objective.val_fraction > 0 or "
                              "fer.data.val_split): the test set is never used to select trials")
    s = cfg.scheduler
    if s.name == "asha" and s.metric == "proxy_top1" and obj.proxy == "none":
        raise ConfigError("scheduler.metric=proxy_top1 needs objective.proxy=linear_probe (or use metric: loss)")
    epochs = base.optim.epochs
    max_t = s.max_t or epochs
    if s.name == "asha" and max_t < epochs:
        raise ConfigError(f"scheduler.max_t={max_t} < optim.epochs={epochs} would stop every trial before "
                          "its chained evaluation; lower optim.epochs instead")
    if s.name == "asha" and not s.grace_period <= epochs >= max_t:
        raise ConfigError(f"scheduler: grace_period ({s.grace_period}) and max_t ({max_t}) must not exceed "
                          f"the pretraining epochs ({epochs})")
    return Resolved(base, fer, params, max_t, landmarks)


def _resolve_landmarks(cfg: SweepConfig):
    """The chained landmark evaluation's config, checked: data, and a validation carve to select on.

    The landmark job holds out validation rows by path hash from its train split
    (``data.val_fraction``, :func:`fra.evaluation.landmarks_data.landmark_datasets`); the objective
    is that carve's NME. Without one there is nothing honest to select on.
    """
    from fra.evaluation.landmarks import LandmarkConfig

    lm = from_dict(LandmarkConfig, cfg.landmarks, "landmarks")
    if not lm.data.shards and not cfg.synthetic_landmarks.enabled:
        raise ConfigError("objective.task=landmarks but landmarks.data.shards is empty: point it at landmark "
                          "shards (fra shards wflw|300w|aflw19 ...) or set synthetic_landmarks.enabled=true")
    if lm.data.val_fraction and cfg.objective.val_fraction:
        raise ConfigError("set objective.val_fraction or landmarks.data.val_fraction for model selection, not both")
    if not lm.data.val_fraction and not cfg.objective.val_fraction:
        raise ConfigError("the landmark objective needs a validation split (objective.val_fraction > 0 or "
                          "landmarks.data.val_fraction > 0, carved from the landmark train split): the test set "
                          "is never used to select trials")
    return lm


def trial_overrides(cfg: SweepConfig, pretrain: dict) -> dict:
    """The pretrain mapping with the sweep's resources and tracking forced in."""
    r = cfg.resources
    values = {"scaling.num_workers": r.workers, "scaling.cpus_per_worker": r.cpus_per_worker,
              "scaling.use_gpu": r.gpus_per_worker > 0,
              # NOTE: trials log to the sweep's MLflow runs (one nested run each), not to their own.
              "tracking.enabled": False}
    if r.gpus_per_worker:
        values["scaling.gpus_per_worker"] = r.gpus_per_worker
    return set_paths(pretrain, values)


def trial_need(cfg: SweepConfig, res: Resolved) -> dict[str, float]:
    """Peak resources of one trial: its process, the larger worker group of its two phases, data."""
    r = cfg.resources
    scaling = res.evaluation(cfg.objective.task).scaling
    eval_workers = max(1, scaling.num_workers) * scaling.cpus_per_worker
    need = {"CPU": r.cpus + max(r.workers * r.cpus_per_worker, eval_workers) + r.data_cpus}
    if r.gpus_per_worker:
        need["GPU"] = r.workers * r.gpus_per_worker
    return need


def check_resources(cfg: SweepConfig, res: Resolved, cluster: dict[str, float]) -> int:
    """Fail fast when one trial can never fit; returns the concurrency the cluster allows."""
    need = trial_need(cfg, res)
    short = {k: (v, cluster.get(k, 0.0)) for k, v in need.items() if v > cluster.get(k, 0.0) + 1e-9}
    if short:
        detail = ", ".join(f"{k}: needs {v:g}, cluster has {have:g}" for k, (v, have) in short.items())
        raise ConfigError(
            f"one trial needs more than the cluster has ({detail}); a trial = resources.cpus "
            f"({cfg.resources.cpus:g}) + max(pretrain workers, evaluation workers) + resources.data_cpus "
            f"({cfg.resources.data_cpus:g}). Lower resources.* or add nodes")
    fits = min(int(cluster.get(k, 0.0) // v) for k, v in need.items() if v > 0)
    if fits < cfg.max_concurrent_trials:
        log.warning("max_concurrent_trials=%d but the cluster (%s) fits %d trial(s) of %s at once; running %d",
                    cfg.max_concurrent_trials, cluster, fits, need, fits)
    return max(1, min(cfg.max_concurrent_trials, fits))


def finite(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


__all__ = ["SweepConfig", "SchedulerSettings", "ObjectiveSettings", "TrialResources", "SyntheticFER",
           "SyntheticLandmarks", "SweepRun", "SweepTracking", "Resolved", "load_sweep_config", "sweep_section",
           "resolve", "check_resources", "trial_need", "trial_overrides", "finite", "objective_mode", "DEFAULT_SWEEP",
           "OBJECTIVE_METRICS", "OBJECTIVE_TASKS"]
