"""Declarative pipelines: shards → pretrain → (sweep) → evaluations → register → promote.

The evaluation stages: ``evaluate`` (FER), ``landmarks``, ``attributes`` and ``affect``.

``fra run pipelines/<name>.yaml`` runs the stages listed in the file. Each finished stage is
recorded in ``<storage_path>/pipeline_state.json`` with a hash of its configuration and its
outputs, so a re-run skips completed stages, an interrupted run resumes at the stage that
did not finish (and inside it: Ray Train resumes from the last checkpoint), and changing a
stage's configuration re-runs it and everything after it.

Strings may use ``${storage}`` (the pipeline's absolute storage path or URI), ``${name}`` and
the entries of the ``vars:`` mapping (``${rafdb_root}``; override with ``--set vars.rafdb_root=...``).

``storage_path`` may be a local path or a URI (``s3://bucket/fra/runs/demo``): on a cluster it
must be shared storage, since the job's working directory is temporary and every node has its
own disk. The state file, stage outputs and the hand-over between stages are all locations in it.
"""
from __future__ import annotations

import hashlib
import json
import logging
import re
import time
from dataclasses import field
from pathlib import Path
from typing import Any, Callable

from fra import storage as st
from fra.config import (PretrainConfig, apply_overrides, bounded, config, from_dict, load_yaml, location, one_of,
                        path_component, to_record)
from fra.errors import ConfigError

log = logging.getLogger(__name__)

STAGES = ("shards", "pretrain", "sweep", "evaluate", "landmarks", "attributes", "affect", "register", "promote")


@config("shards[]")
class ShardJob:
    """One ``fra shards`` conversion."""

    source: str
    out: str = location("", required=True)  # the shard root written
    root: str = location("")
    split: str | None = None
    images_per_shard: int = bounded(5000, ge=1)
    row_group_size: int = bounded(1000, ge=1)
    options: dict = field(default_factory=dict)


@config("register")
class RegisterStage:
    name: str = "fra-backbone"


@config("promote")
class PromoteStage:
    gate_metric: str = "fer_top1_mean_last5"
    margin: float = bounded(0.0, ge=0)
    mode: str = one_of("max", "min", "auto")  # auto: min for error metrics (NME, FR, RMSE), else max (acc, CCC, ...)


@config("ray")
class RayRuntime:
    address: str = ""  # "" = join the cluster this runs on if any (a job, RAY_ADDRESS, `ray start`), else start one
    # logical CPUs of a Ray that fra starts (0 = max(4, cores): the data path needs spare CPUs)
    num_cpus: int = bounded(0, ge=0)
    dashboard: bool = True  # a local Ray's State API (Ray Train's placement-group cleaner needs it)


@config("tracking")
class PipelineTracking:
    mlflow_uri: str = location("")  # "" = $MLFLOW_TRACKING_URI, else sqlite:///<storage>/mlflow.db


@config()
class PipelineConfig:
    """A pipeline file. ``pretrain``/``sweep``/``evaluate`` hold the stage configs as written."""

    name: str = path_component("pipeline")
    storage_path: str = location("runs/pipeline", required=True)
    vars: dict = field(default_factory=dict)  # ${key} substitutions, e.g. dataset roots
    stages: list[str] = field(default_factory=lambda: ["pretrain", "evaluate", "register", "promote"])
    ray: RayRuntime = field(default_factory=RayRuntime)
    tracking: PipelineTracking = field(default_factory=PipelineTracking)
    shards: list[ShardJob] = field(default_factory=list)
    pretrain: dict = field(default_factory=dict)
    sweep: dict = field(default_factory=dict)
    evaluate: dict = field(default_factory=dict)
    landmarks: dict = field(default_factory=dict)  # fra.evaluation.landmarks.LandmarkConfig as written
    attributes: dict = field(default_factory=dict)  # fra.evaluation.attributes.AttributesConfig as written
    affect: dict = field(default_factory=dict)  # fra.evaluation.affect.AffectConfig as written
    register: RegisterStage = field(default_factory=RegisterStage)
    promote: PromoteStage = field(default_factory=PromoteStage)

    def __post_init__(self) -> None:
        unknown = [s for s in self.stages if s not in STAGES]
        if unknown:
            raise ConfigError(f"unknown pipeline stage(s) {unknown}; valid stages in order: {list(STAGES)}")
        order = [STAGES.index(s) for s in self.stages]
        if order != sorted(order) or len(set(order)) != len(order):
            raise ConfigError(f"stages must be unique and in the order {list(STAGES)}, got {self.stages}")
        if "promote" in self.stages and "register" not in self.stages:
            raise ConfigError("the promote stage needs the register stage")


def _substitute(obj: Any, values: dict[str, str]) -> Any:
    if isinstance(obj, str):
        for k, v in values.items():
            obj = obj.replace("${" + k + "}", v)
        return obj
    if isinstance(obj, list):
        return [_substitute(v, values) for v in obj]
    if isinstance(obj, dict):
        return {k: _substitute(v, values) for k, v in obj.items()}
    return obj


def load_pipeline(path: str | Path, overrides=()) -> PipelineConfig:
    """Read, override, substitute and validate a pipeline file (every stage config included)."""
    raw = apply_overrides(load_yaml(path), list(overrides))
    name = str(raw.get("name", Path(path).stem))
    storage = st.absolute(raw.get("storage_path", f"runs/{name}"))
    variables = raw.get("vars") or {}
    if not isinstance(variables, dict):
        raise ConfigError(f"{path}: 'vars' must be a mapping of names to values")
    values = {**{str(k): str(v) for k, v in variables.items()}, "storage": storage, "name": name}
    raw = _substitute(raw, values)
    raw["storage_path"], raw["name"] = storage, name
    left = sorted(set(re.findall(r"\$\{([^}]*)\}", json.dumps(raw, default=str))))
    if left:
        raise ConfigError(f"{path}: undefined ${{...}} name(s) {left}; defined: {sorted(values)} "
                          "(add them under vars:)")
    cfg = from_dict(PipelineConfig, raw)
    # Validate every stage's config before anything runs.
    for stage in cfg.stages:
        stage_config(cfg, stage)
    _check_registered_source(cfg)
    return cfg


def _check_registered_source(cfg: PipelineConfig) -> None:
    """The register stage needs a local export: refuse, before anything runs, to register what it cannot."""
    evaluations = [s for s in ("evaluate", "landmarks", "attributes", "affect") if s in cfg.stages]
    if "register" not in cfg.stages or not evaluations:
        return
    from fra.evaluation.backbones import MLFLOW_SCHEMES

    stage = evaluations[0]
    source = stage_config(cfg, stage).backbone.source
    if source == "random" or source.startswith(("random:", *MLFLOW_SCHEMES)):
        raise ConfigError(f"the register stage registers the evaluated backbone, but {stage}.backbone.source is "
                          f"{source!r}: point it at an export directory or checkpoint, or drop register/promote "
                          "from stages (e.g. --set stages=[shards,evaluate]) to only evaluate it")


def tracking_uri(cfg: PipelineConfig, create: bool = False) -> str:
    """The pipeline's MLflow URI. Only a run creates its folder (``create``): loading a pipeline
    or reading a stage's config leaves the working directory alone."""
    from fra.tracking import resolve_tracking_uri

    return resolve_tracking_uri(cfg.tracking.mlflow_uri, cfg.storage_path, create=create)


def _with_defaults(section: dict, defaults: dict) -> dict:
    """Fill nested keys the user left out (user values win)."""
    out = dict(defaults)
    for k, v in section.items():
        out[k] = _with_defaults(v, out[k]) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def stage_config(cfg: PipelineConfig, stage: str):
    """The typed config of one stage, with pipeline-wide storage and tracking filled in."""
    uri, storage = tracking_uri(cfg), cfg.storage_path
    if stage == "pretrain":
        data = _with_defaults(cfg.pretrain, {"run": {"name": f"{cfg.name}-pretrain", "storage_path": f"{storage}/pretrain"},
                                             "tracking": {"mlflow_uri": uri}})
        return from_dict(PretrainConfig, data)
    if stage == "evaluate":
        from fra.evaluation.fer import FERConfig

        data = _with_defaults(cfg.evaluate, {"run": {"name": f"{cfg.name}-fer", "storage_path": f"{storage}/fer"},
                                             "tracking": {"mlflow_uri": uri}})
        return from_dict(FERConfig, data)
    if stage == "landmarks":
        from fra.evaluation.landmarks import LandmarkConfig

        data = _with_defaults(cfg.landmarks, {"run": {"name": f"{cfg.name}-landmarks",
                                                      "storage_path": f"{storage}/landmarks"},
                                              "tracking": {"mlflow_uri": uri}})
        return from_dict(LandmarkConfig, data)
    if stage in ("attributes", "affect"):
        from fra.evaluation.affect import AffectConfig
        from fra.evaluation.attributes import AttributesConfig

        data = _with_defaults(getattr(cfg, stage), {"run": {"name": f"{cfg.name}-{stage}",
                                                            "storage_path": f"{storage}/{stage}"},
                                                    "tracking": {"mlflow_uri": uri}})
        return from_dict(AttributesConfig if stage == "attributes" else AffectConfig, data)
    if stage == "sweep":
        from fra.tuning import SweepConfig
        from fra.tuning.config import sweep_section

        # The sweep trains the pipeline's pretrain config and scores with its evaluate (or, with
        # objective.task=landmarks, its landmarks) config unless the sweep section carries its own copies.
        section = sweep_section(cfg.sweep, cfg.pretrain or None, cfg.evaluate or None,
                                landmarks=cfg.landmarks or None)
        data = _with_defaults(section, {"run": {"name": f"{cfg.name}-sweep", "storage_path": f"{storage}/sweep"},
                                          "tracking": {"mlflow_uri": uri}})
        return from_dict(SweepConfig, data)
    return {"shards": cfg.shards, "register": cfg.register, "promote": cfg.promote}[stage]


def config_hash(obj: Any) -> str:
    """Hash of ``obj`` as recorded (redacted): outputs read back from ``pipeline_state.json`` hash the
    same as the live ones did, and no secret decides whether a stage re-runs."""
    return hashlib.sha256(json.dumps(to_record(obj), sort_keys=True, default=str).encode()).hexdigest()[:16]


class PipelineState:
    """``pipeline_state.json`` (local or on object storage): per stage its status, config hash and outputs."""

    def __init__(self, path: str):
        self.path = str(path)
        self.data = st.read_json(self.path) if st.exists(self.path) else {"stages": {}}

    def done(self, stage: str, digest: str) -> dict | None:
        entry = self.data["stages"].get(stage)
        if entry and entry.get("status") == "done" and entry.get("config_hash") == digest:
            return entry["outputs"]
        return None

    def record(self, stage: str, digest: str, outputs: dict, seconds: float) -> None:
        self.data["stages"][stage] = {"status": "done", "config_hash": digest, "outputs": outputs,
                                      "seconds": round(seconds, 1), "finished": time.strftime("%Y-%m-%dT%H:%M:%S")}
        st.write_json(self.path, self.data)

    def invalidate_from(self, stage: str) -> None:
        for s in STAGES[STAGES.index(stage):]:
            self.data["stages"].pop(s, None)
        st.write_json(self.path, self.data)

    def note_code(self, origin: dict) -> None:
        """Record which fra code ran (not part of any stage's identity: a re-submission of the
        same pipeline from a changed working directory still skips finished stages)."""
        self.data["code"] = {**origin, "at": time.strftime("%Y-%m-%dT%H:%M:%S")}
        st.write_json(self.path, self.data)


def _ensure_ray(cfg: PipelineConfig) -> None:
    from fra.ray_runtime import check_shared_location, check_tracking_uri, init_ray

    # A sweep's early stopping needs the State API, which the dashboard serves (check_state_api).
    init_ray(address=cfg.ray.address, num_cpus=cfg.ray.num_cpus, dashboard=cfg.ray.dashboard or "sweep" in cfg.stages)
    check_shared_location("storage_path", cfg.storage_path)
    check_tracking_uri(tracking_uri(cfg))


def run_pipeline(cfg: PipelineConfig, echo: Callable[[str], None] = print, timings: dict | None = None) -> dict:
    """Run (or resume) every stage; returns the outputs per stage.

    ``echo`` gets one line as each stage starts and ends; ``timings``, if given, gets
    ``{stage: (status, seconds)}`` with status "ran" or "skipped" (the summary table).
    """
    from fra.pipeline_stages import STAGE_RUNNERS, StageContext
    from fra.ray_runtime import code_origin

    storage = cfg.storage_path
    _ensure_ray(cfg)
    state = PipelineState(st.join(storage, "pipeline_state.json"))
    state.note_code(code_origin())
    ctx = StageContext(storage, tracking_uri(cfg, create=True))
    outputs: dict[str, dict] = {}
    timings = {} if timings is None else timings
    for stage in cfg.stages:
        stage_cfg = stage_config(cfg, stage)
        # A stage's identity includes what it consumed from earlier stages.
        digest = config_hash({"config": stage_cfg, "inputs": outputs})
        previous = state.done(stage, digest)
        if previous is not None:
            echo(f"[{stage}] already done, skipping (outputs in {st.redact(storage)})")
            outputs[stage] = previous
            timings[stage] = ("skipped", 0.0)
            continue
        state.invalidate_from(stage)
        echo(f"[{stage}] running ...")
        t0 = time.perf_counter()
        outputs[stage] = STAGE_RUNNERS[stage](ctx, stage_cfg, outputs)
        state.record(stage, digest, outputs[stage], time.perf_counter() - t0)
        timings[stage] = ("ran", time.perf_counter() - t0)
        echo(f"[{stage}] done in {time.perf_counter() - t0:.0f} s")
    return outputs
