"""Typed configuration: frozen dataclasses loaded from YAML, with ``--set a.b=c`` overrides.

Unknown keys are rejected with a suggestion, values are type-checked, and derived values
(per-worker batch, effective learning rate) come from named functions, never from mutation.
Only the core sections live here (model, optimisation); other layers define their own
sections with the same machinery and nest them in their top-level configs.
"""
from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import yaml

from fra.errors import ConfigError

T = TypeVar("T")


# --------------------------------------------------------------------------------------
# Core sections
# --------------------------------------------------------------------------------------
@dataclass(frozen=True)
class SwAVConfig:
    """SwAV / FRL hyper-parameters (defaults = FRL's ``scripts/run.sh``, FRL_SPEC §1.2).

    The multi-crop fields describe the data side (:class:`fra.data.multicrop.MultiCropTransform`);
    the model only needs the total number of crops at run time.
    """

    num_prototypes: int = 3000
    proj_hidden: int = 2048
    proj_dim: int = 128
    temperature: float = 0.1
    epsilon: float = 0.05
    sinkhorn_iters: int = 3
    freeze_prototypes_iters: int = 313
    queue_length: int = 0  # global length; 0 = no queue (run.sh)
    epoch_queue_starts: int = 15
    crops_for_assign: tuple[int, ...] = (0, 1)
    nmb_crops: tuple[int, ...] = (2, 6)
    size_crops: tuple[int, ...] = (224, 96)
    min_scale_crops: tuple[float, ...] = (0.14, 0.05)
    max_scale_crops: tuple[float, ...] = (1.0, 0.14)

    def __post_init__(self) -> None:
        # Lists from YAML or callers become tuples: the config stays hashable and comparable.
        for name, kind in (("crops_for_assign", int), ("nmb_crops", int), ("size_crops", int),
                           ("min_scale_crops", float), ("max_scale_crops", float)):
            object.__setattr__(self, name, tuple(kind(v) for v in getattr(self, name)))
        for name in ("num_prototypes", "proj_hidden", "proj_dim", "sinkhorn_iters"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"model.swav.{name} must be > 0, got {getattr(self, name)!r}")
        for name in ("temperature", "epsilon"):
            if not getattr(self, name) > 0:
                raise ConfigError(f"model.swav.{name} must be > 0, got {getattr(self, name)!r}")
        if self.queue_length < 0 or self.freeze_prototypes_iters < 0 or self.epoch_queue_starts < 0:
            raise ConfigError("model.swav.queue_length, freeze_prototypes_iters and epoch_queue_starts must be >= 0")
        groups = (self.nmb_crops, self.size_crops, self.min_scale_crops, self.max_scale_crops)
        if len({len(g) for g in groups}) != 1 or not self.nmb_crops:
            raise ConfigError("model.swav.nmb_crops, size_crops, min_scale_crops and max_scale_crops "
                              f"must have the same (non-zero) length, got {[list(g) for g in groups]}")
        if any(n < 0 for n in self.nmb_crops) or self.total_crops < 2:
            raise ConfigError(f"model.swav.nmb_crops must give >= 2 crops in total, got {list(self.nmb_crops)}")
        if any(not 0 < lo <= hi <= 1 for lo, hi in zip(self.min_scale_crops, self.max_scale_crops)):
            raise ConfigError("model.swav scales must satisfy 0 < min_scale_crops <= max_scale_crops <= 1")
        if not self.crops_for_assign or any(not 0 <= c < self.total_crops for c in self.crops_for_assign):
            raise ConfigError(f"model.swav.crops_for_assign must index the {self.total_crops} crops, "
                              f"got {list(self.crops_for_assign)}")

    @property
    def total_crops(self) -> int:
        return sum(self.nmb_crops)


@dataclass(frozen=True)
class ModelConfig:
    """The FRA model and its losses (defaults = the reference README recipe, FRA_SPEC §0)."""

    method: str = "fra"  # fra | byol (FRA's instance branch alone) | swav (FRL's recipe)
    backbone: str = "resnet50"
    proj_dim: int = 256
    hidden_dim: int = 4096
    num_proto: int = 8  # K, the number of facial regions / queries
    teacher_temp: float = 0.04
    student_temp: float = 0.1
    loss_weight: float = 0.5  # w: instance vs region loss
    loss_w_cluster: float = 0.1  # lambda_c
    loss_w_obj_neg: float = 0.02  # region decorrelation term
    me_max_weight: float = 1.0  # mean-entropy maximisation inside the cluster loss
    heatmap_scale: float = 1.0  # softmax temperature over queries
    sinkhorn_iters: int = 3
    proto_momentum: float = 0.9
    decoder_layers: int = 2
    decoder_heads: int = 8
    decoder_ffn: int = 256
    dropout: float = 0.1
    ema: str = "frab"  # frab: parameters only, target in train mode | eman: whole state dict
    base_momentum: float = 0.996
    norm: str = "bn"  # bn | syncbn (syncbn only takes effect under DDP on GPUs)
    swav: SwAVConfig = field(default_factory=SwAVConfig)  # used by method=swav only

    def __post_init__(self) -> None:
        _check_choice("model.method", self.method, ("fra", "byol", "swav"))
        _check_choice("model.ema", self.ema, ("frab", "eman"))
        _check_choice("model.norm", self.norm, ("bn", "syncbn"))
        _check_positive("model.num_proto", self.num_proto)
        _check_positive("model.hidden_dim", self.hidden_dim)
        _check_positive("model.proj_dim", self.proj_dim)
        _check_positive("model.teacher_temp", self.teacher_temp)
        _check_positive("model.student_temp", self.student_temp)
        _check_range("model.loss_weight", self.loss_weight, 0.0, 1.0)
        _check_range("model.base_momentum", self.base_momentum, 0.0, 1.0)
        _check_range("model.dropout", self.dropout, 0.0, 1.0)
        if self.loss_w_cluster < 0:
            raise ConfigError(f"model.loss_w_cluster must be >= 0, got {self.loss_w_cluster}")
        if self.decoder_heads <= 0 or self.proj_dim % self.decoder_heads:
            raise ConfigError(
                f"model.decoder_heads={self.decoder_heads} must divide model.proj_dim={self.proj_dim}"
            )


@dataclass(frozen=True)
class OptimConfig:
    """Pretraining optimisation.

    Defaults are FRA's (FRA_SPEC §7): LARS, warm-up per step, cosine per epoch. FRL's SwAV
    recipe (FRL_SPEC §1.4) is ``optimizer: larc`` (SGD wrapped in LARC, trust ``lars_eta``,
    no clipping) with ``schedule: swav`` (per-step warm-up from ``start_warmup``, then cosine
    per step down to ``final_lr``).
    """

    optimizer: str = "lars"  # lars | larc | sgd | adamw
    schedule: str = "fra"  # fra (FRA_SPEC §7) | swav (FRL run.sh)
    start_warmup: float = 0.0  # schedule=swav: lr at step 0 of the warm-up
    final_lr: float = 0.0  # schedule=swav: lr at the last step
    lr: float = 0.9  # for the global batch, not scaled (reference behaviour)
    lr_scaling: str = "none"  # none | linear (lr * global_batch / 256)
    weight_decay: float = 1e-6
    momentum: float = 0.9
    lars_eta: float = 0.001
    epochs: int = 50
    warmup_epochs: int = 10
    cosine_per_step: bool = False  # reference: cosine stepped once per epoch
    batch_size: int = 512  # global batch, split across workers
    grad_clip: float = 0.0

    def __post_init__(self) -> None:
        _check_choice("optim.optimizer", self.optimizer, ("lars", "larc", "sgd", "adamw"))
        _check_choice("optim.schedule", self.schedule, ("fra", "swav"))
        if self.start_warmup < 0 or self.final_lr < 0:
            raise ConfigError(f"optim.start_warmup and optim.final_lr must be >= 0, got "
                              f"{self.start_warmup} / {self.final_lr}")
        _check_choice("optim.lr_scaling", self.lr_scaling, ("none", "linear"))
        _check_positive("optim.lr", self.lr)
        _check_positive("optim.epochs", self.epochs)
        _check_positive("optim.batch_size", self.batch_size)
        if not 0 <= self.warmup_epochs <= self.epochs:
            raise ConfigError(
                f"optim.warmup_epochs must be in [0, epochs={self.epochs}], got {self.warmup_epochs}"
            )
        if self.weight_decay < 0:
            raise ConfigError(f"optim.weight_decay must be >= 0, got {self.weight_decay}")


@dataclass(frozen=True)
class SyntheticConfig:
    """Synthetic faces rendered on the fly (the embedded default dataset)."""

    num_identities: int = 200
    images_per_identity: int = 10
    size: int = 112
    seed: int = 0
    intensity: tuple[float, float] = (0.6, 1.1)
    jitter: float = 0.08
    align: bool = False  # similarity-align faces on their 5 landmarks (fra.data.synthetic.align_face)


@dataclass(frozen=True)
class DataConfig:
    """Where pretraining images come from and how views are made."""

    source: str = "shards"  # shards (Parquet via Ray Data) | synthetic (rendered, in process)
    shards: str = ""  # directory or URI holding manifest.json + Parquet shards
    split: str = "train"
    image_size: int = 224
    synthetic: SyntheticConfig = field(default_factory=SyntheticConfig)
    shuffle_buffer: int = 1000
    seed: int = 0
    # Input normalisation of the views (recorded in the exported model card): auto = FRL's
    # (ImageNet mean, std 0.228/0.224/0.225) for method=swav, VGGFace2's otherwise.
    normalization: str = "auto"  # auto | vggface2 | frl | imagenet

    def __post_init__(self) -> None:
        _check_choice("data.source", self.source, ("shards", "synthetic"))
        _check_choice("data.normalization", self.normalization, ("auto", "vggface2", "frl", "imagenet"))
        _check_positive("data.image_size", self.image_size)


@dataclass(frozen=True)
class DDPConfig:
    """Options of the DistributedDataParallel wrapper of the trainable model (``scaling.ddp``)."""

    # auto = False when SyncBN is active (GPU + model.norm=syncbn): its running statistics are
    # already identical on every rank, so DDP's broadcast of rank 0's buffers before each forward
    # is a wasted collective; True otherwise (per-rank BatchNorm keeps rank 0's statistics).
    broadcast_buffers: bool | str = "auto"  # auto | true | false
    gradient_as_bucket_view: bool = True  # gradients live in DDP's buckets: one copy less, less memory
    bf16_compress: bool = False  # all-reduce gradients in bfloat16 (NCCL only): half the traffic, less precision

    def __post_init__(self) -> None:
        if isinstance(self.broadcast_buffers, str) and self.broadcast_buffers != "auto":
            raise ConfigError(f"scaling.ddp.broadcast_buffers must be auto, true or false, got {self.broadcast_buffers!r}")


@dataclass(frozen=True)
class ScalingConfig:
    """Ray Train scaling: workers, devices, precision, fault tolerance."""

    num_workers: int | list[int] = 1  # fixed count, or [min, max] for elastic training
    use_gpu: bool = False
    cpus_per_worker: float = 1.0
    gpus_per_worker: float = 1.0
    amp: str = "off"  # off | fp16 (CUDA, GradScaler) | bf16
    max_failures: int = 3
    # Stop with a clear message instead of waiting forever. 30 min: an autoscaled node that has to
    # be started cold (EC2 boot, image pull, and with Ray's stock image or a bare AMI the ~6 GB torch
    # install: 15-20 min, docs/cloud.md §2) must still be in time, with margin for a spot retry.
    placement_timeout_s: float = 1800.0
    ddp: DDPConfig = field(default_factory=DDPConfig)

    def __post_init__(self) -> None:
        _check_choice("scaling.amp", self.amp, ("off", "fp16", "bf16"))
        if self.ddp.bf16_compress and not self.use_gpu:
            raise ConfigError("scaling.ddp.bf16_compress needs scaling.use_gpu: true (a NCCL communication hook)")
        counts = self.num_workers if isinstance(self.num_workers, list) else [self.num_workers]
        if len(counts) not in (1, 2) or any(c < 1 for c in counts) or counts != sorted(counts):
            raise ConfigError(f"scaling.num_workers must be N >= 1 or [min, max], got {self.num_workers!r}")


@dataclass(frozen=True)
class RunSettings:
    """Naming, outputs, logging and checkpoint cadence of one run."""

    name: str = "fra"
    storage_path: str = "runs"
    seed: int = 0
    log_every: int = 10
    finite_check_every: int = 0  # steps between non-finite loss checks; 0 = at log steps (checkpoints always check)
    checkpoint_every: int = 0  # steps; 0 = at epoch end only
    keep_checkpoints: int = 2
    max_steps: int = 0  # 0 = the full schedule; >0 truncates (smoke tests)
    heatmaps_every_epoch: bool = True
    collapse_patience: int = 0  # logs with cluster CE at ln K before warning; 0 = off
    collapse_action: str = "warn"  # warn | stop

    def __post_init__(self) -> None:
        _check_choice("run.collapse_action", self.collapse_action, ("warn", "stop"))


@dataclass(frozen=True)
class TrackingConfig:
    """MLflow tracking; an empty URI means a local sqlite file under the storage path."""

    mlflow_uri: str = ""
    experiment: str = "fra-pretrain"
    enabled: bool = True


@dataclass(frozen=True)
class PretrainConfig:
    """Everything `fra pretrain` needs."""

    model: ModelConfig = field(default_factory=ModelConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    data: DataConfig = field(default_factory=DataConfig)
    scaling: ScalingConfig = field(default_factory=ScalingConfig)
    run: RunSettings = field(default_factory=RunSettings)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)


def effective_lr(optim: OptimConfig) -> float:
    """The base learning rate actually used for the global batch."""
    if optim.lr_scaling == "linear":
        return optim.lr * optim.batch_size / 256
    return optim.lr


NORMALIZATIONS = {
    "vggface2": ((0.5231, 0.4044, 0.3489), (0.2536, 0.2194, 0.2070)),  # FRA_SPEC §8
    "frl": ((0.485, 0.456, 0.406), (0.228, 0.224, 0.225)),  # FRL_SPEC §1.3 (0.228 sic)
    "imagenet": ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
}


def view_normalization(cfg: "PretrainConfig") -> tuple[tuple[float, ...], tuple[float, ...]]:
    """(mean, std) the pretraining views are normalised with (``data.normalization``)."""
    name = cfg.data.normalization
    if name == "auto":
        name = "frl" if cfg.model.method == "swav" else "vggface2"
    return NORMALIZATIONS[name]


def per_worker_batch(global_batch: int, world_size: int) -> int:
    """Split the global batch across workers; it must divide evenly."""
    if world_size <= 0:
        raise ConfigError(f"world size must be positive, got {world_size}")
    if global_batch % world_size:
        raise ConfigError(
            f"global batch {global_batch} is not divisible by {world_size} workers; "
            "choose a batch size that is a multiple of the worker count"
        )
    return global_batch // world_size


# --------------------------------------------------------------------------------------
# Validation helpers
# --------------------------------------------------------------------------------------
def _check_choice(name: str, value: Any, choices: tuple) -> None:
    if value not in choices:
        raise ConfigError(f"{name} must be one of {list(choices)}, got {value!r}")


def _check_positive(name: str, value: float) -> None:
    if not value > 0:
        raise ConfigError(f"{name} must be > 0, got {value!r}")


def _check_range(name: str, value: float, lo: float, hi: float) -> None:
    if not lo <= value <= hi:
        raise ConfigError(f"{name} must be in [{lo}, {hi}], got {value!r}")


# --------------------------------------------------------------------------------------
# Generic dataclass <-> dict machinery
# --------------------------------------------------------------------------------------
def from_dict(cls: type[T], data: dict | None, path: str = "") -> T:
    """Build a (nested) frozen dataclass from a plain dict, rejecting unknown keys.

    Args:
        cls: the dataclass type.
        data: mapping of field name to value (nested dataclasses as nested mappings).
        path: dotted prefix used in error messages.
    """
    data = {} if data is None else data
    if not isinstance(data, dict):
        raise ConfigError(f"{path or 'config'} must be a mapping, got {type(data).__name__}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for key, value in data.items():
        dotted = f"{path}.{key}" if path else str(key)
        if key not in fields:
            close = difflib.get_close_matches(str(key), fields, n=1)
            hint = f"; did you mean {path + '.' if path else ''}{close[0]}?" if close else ""
            raise ConfigError(f"unknown config key {dotted!r}{hint} (valid: {sorted(fields)})")
        kwargs[key] = _coerce(hints[key], value, dotted)
    try:
        return cls(**kwargs)
    except TypeError as exc:  # e.g. a required field without default
        raise ConfigError(f"{path or cls.__name__}: {exc}") from exc


def _coerce(tp: Any, value: Any, path: str) -> Any:
    """Check/convert one value against a type annotation."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if dataclasses.is_dataclass(tp):
        return from_dict(tp, value, path)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(arg, value, path)
            except ConfigError as exc:
                errors.append(str(exc))
        raise ConfigError(f"{path}: {value!r} matches none of {tp}: {'; '.join(errors)}")
    if tp is Any:
        return value
    if origin in (tuple, list):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{path} must be a list, got {value!r}")
        if origin is tuple and args and args[-1] is not Ellipsis:
            if len(args) != len(value):
                raise ConfigError(f"{path} must have {len(args)} items, got {len(value)}")
            return tuple(_coerce(a, v, f"{path}[{i}]") for i, (a, v) in enumerate(zip(args, value)))
        item = args[0] if args else Any
        out = [_coerce(item, v, f"{path}[{i}]") for i, v in enumerate(value)]
        return tuple(out) if origin is tuple else out
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{path} must be a mapping, got {value!r}")
        return dict(value)
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{path} must be true or false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            if isinstance(value, float) and value.is_integer():
                return int(value)
            raise ConfigError(f"{path} must be an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{path} must be a number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{path} must be a string, got {value!r}")
        return value
    return value


def to_dict(obj: Any) -> Any:
    """Plain-python (YAML-safe) view of a config dataclass."""
    if dataclasses.is_dataclass(obj):
        return {f.name: to_dict(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, (list, tuple)):
        return [to_dict(v) for v in obj]
    if isinstance(obj, dict):
        return {k: to_dict(v) for k, v in obj.items()}
    return obj


def flatten(d: dict, prefix: str = "") -> dict[str, Any]:
    """``{"a": {"b": 1}}`` -> ``{"a.b": 1}`` (for MLflow params)."""
    out: dict[str, Any] = {}
    for key, value in d.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(flatten(value, name + "."))
        else:
            out[name] = value
    return out


def apply_overrides(data: dict, overrides: list[str] | tuple[str, ...]) -> dict:
    """Apply ``key.sub=value`` overrides (values parsed as YAML) to a nested dict copy."""
    import copy

    out = copy.deepcopy(data)
    for item in overrides or ():
        if "=" not in item:
            raise ConfigError(f"override {item!r} must look like key.sub=value")
        key, raw = item.split("=", 1)
        try:
            value = yaml.safe_load(raw) if raw != "" else ""
        except yaml.YAMLError as exc:
            raise ConfigError(f"override {item!r}: cannot parse value: {exc}") from exc
        node = out
        parts = key.strip().split(".")
        for part in parts[:-1]:
            nxt = node.setdefault(part, {})
            if not isinstance(nxt, dict):
                raise ConfigError(f"override {item!r}: {part!r} is not a section")
            node = nxt
        node[parts[-1]] = value
    return out


def load_yaml(path: str | Path) -> dict:
    """Read a YAML mapping with a clear error for a missing or malformed file."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"config file not found: {p}")
    try:
        data = yaml.safe_load(p.read_text())
    except yaml.YAMLError as exc:
        raise ConfigError(f"{p}: invalid YAML: {exc}") from exc
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{p}: top level must be a mapping, got {type(data).__name__}")
    return data


def load_config(cls: type[T], path: str | Path | None = None, overrides=(), data: dict | None = None) -> T:
    """Load ``cls`` from a YAML file (or dict) plus ``--set`` overrides."""
    raw = load_yaml(path) if path is not None else dict(data or {})
    return from_dict(cls, apply_overrides(raw, list(overrides)))


def dump_yaml(obj: Any, path: str | Path) -> None:
    """Write a config (dataclass or dict) to YAML atomically."""
    from fra.utils.io import atomic_write_text

    atomic_write_text(path, yaml.safe_dump(to_dict(obj), sort_keys=False))


def replace(obj: T, **changes: Any) -> T:
    """``dataclasses.replace`` that re-runs validation."""
    return dataclasses.replace(obj, **changes)


__all__ = [
    "SwAVConfig",
    "ModelConfig",
    "OptimConfig",
    "SyntheticConfig",
    "DataConfig",
    "ScalingConfig",
    "RunSettings",
    "TrackingConfig",
    "PretrainConfig",
    "effective_lr",
    "per_worker_batch",
    "from_dict",
    "to_dict",
    "flatten",
    "apply_overrides",
    "load_yaml",
    "load_config",
    "dump_yaml",
    "replace",
    "field",
]
