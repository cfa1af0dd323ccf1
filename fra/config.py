"""Typed configuration: frozen dataclasses loaded from YAML, with ``--set a.b=c`` overrides.

Unknown keys are rejected with a suggestion; every field's type comes from its annotation and its
allowed values are declared next to it (``bounded``, ``one_of``, ``path_component``, ``location``:
:mod:`fra.typed_config`), checked on construction. Derived values (per-worker batch, effective
learning rate) come from named functions, never from mutation.
Only the core sections live here (model, optimisation); other layers define their own
sections with the same machinery and nest them in their top-level configs.
"""
from __future__ import annotations

from dataclasses import field
from typing import Any

from fra.errors import ConfigError
from fra.typed_config import (apply_overrides, bounded, check_path_component, config, dump_yaml, flatten, from_dict,
                              load_config, load_yaml, location, one_of, path_component, replace, to_dict,
                              to_record)


# --------------------------------------------------------------------------------------
# Core sections
# --------------------------------------------------------------------------------------
@config("model.swav")
class SwAVConfig:
    """SwAV / FRL hyper-parameters (defaults = FRL's ``scripts/run.sh``, FRL_SPEC §1.2).

    The multi-crop fields describe the data side (:class:`fra.data.multicrop.MultiCropTransform`);
    the model only needs the total number of crops at run time.
    """

    num_prototypes: int = bounded(3000, ge=1)
    proj_hidden: int = bounded(2048, ge=1)
    proj_dim: int = bounded(128, ge=1)
    temperature: float = bounded(0.1, gt=0)
    epsilon: float = bounded(0.05, gt=0)
    sinkhorn_iters: int = bounded(3, ge=1)
    freeze_prototypes_iters: int = bounded(313, ge=0)
    queue_length: int = bounded(0, ge=0)  # global length; 0 = no queue (run.sh)
    epoch_queue_starts: int = bounded(15, ge=0)
    crops_for_assign: tuple[int, ...] = bounded((0, 1), ge=0)
    nmb_crops: tuple[int, ...] = bounded((2, 6), ge=0)
    size_crops: tuple[int, ...] = bounded((224, 96), ge=16)
    min_scale_crops: tuple[float, ...] = bounded((0.14, 0.05), gt=0, le=1)
    max_scale_crops: tuple[float, ...] = bounded((1.0, 0.14), gt=0, le=1)

    def __post_init__(self) -> None:
        # Field types and ranges are checked by @config (lists from YAML became tuples there).
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


@config("model")
class ModelConfig:
    """The FRA model and its losses (defaults = the reference README recipe, FRA_SPEC §0)."""

    method: str = one_of("fra", "byol", "swav")  # fra | byol (FRA's instance branch alone) | swav (FRL's recipe)
    backbone: str = "resnet50"
    proj_dim: int = bounded(256, ge=1)
    hidden_dim: int = bounded(4096, ge=1)
    num_proto: int = bounded(8, ge=1)  # K, the number of facial regions / queries
    teacher_temp: float = bounded(0.04, gt=0)
    student_temp: float = bounded(0.1, gt=0)
    loss_weight: float = bounded(0.5, ge=0, le=1)  # w: instance vs region loss
    loss_w_cluster: float = bounded(0.1, ge=0)  # lambda_c
    loss_w_obj_neg: float = bounded(0.02, ge=0)  # region decorrelation term
    me_max_weight: float = bounded(1.0, ge=0)  # mean-entropy maximisation inside the cluster loss
    heatmap_scale: float = bounded(1.0, gt=0)  # softmax temperature over queries
    sinkhorn_iters: int = bounded(3, ge=1)
    proto_momentum: float = bounded(0.9, ge=0, le=1)
    decoder_layers: int = bounded(2, ge=1)
    decoder_heads: int = bounded(8, ge=1)
    decoder_ffn: int = bounded(256, ge=1)
    dropout: float = bounded(0.1, ge=0, le=1)
    ema: str = one_of("frab", "eman")  # frab: parameters only, target in train mode | eman: whole state dict
    base_momentum: float = bounded(0.996, ge=0, le=1)
    norm: str = one_of("bn", "syncbn")  # bn | syncbn (syncbn only takes effect under DDP on GPUs)
    swav: SwAVConfig = field(default_factory=SwAVConfig)  # used by method=swav only

    def __post_init__(self) -> None:
        if self.proj_dim % self.decoder_heads:
            raise ConfigError(
                f"model.decoder_heads={self.decoder_heads} must divide model.proj_dim={self.proj_dim}"
            )


@config("optim")
class OptimConfig:
    """Pretraining optimisation.

    Defaults are FRA's (FRA_SPEC §7): LARS, warm-up per step, cosine per epoch. FRL's SwAV
    recipe (FRL_SPEC §1.4) is ``optimizer: larc`` (SGD wrapped in LARC, trust ``lars_eta``,
    no clipping) with ``schedule: swav`` (per-step warm-up from ``start_warmup``, then cosine
    per step down to ``final_lr``).
    """

    optimizer: str = one_of("lars", "larc", "sgd", "adamw")  # lars | larc | sgd | adamw
    schedule: str = one_of("fra", "swav")  # fra (FRA_SPEC §7) | swav (FRL run.sh)
    start_warmup: float = bounded(0.0, ge=0)  # schedule=swav: lr at step 0 of the warm-up
    final_lr: float = bounded(0.0, ge=0)  # schedule=swav: lr at the last step
    lr: float = bounded(0.9, gt=0)  # for the global batch, not scaled (reference behaviour)
    lr_scaling: str = one_of("none", "linear")  # none | linear (lr * global_batch / 256)
    weight_decay: float = bounded(1e-6, ge=0)
    momentum: float = bounded(0.9, ge=0, le=1)
    lars_eta: float = bounded(0.001, gt=0)
    epochs: int = bounded(50, ge=1)
    warmup_epochs: int = bounded(10, ge=0)
    cosine_per_step: bool = False  # reference: cosine stepped once per epoch
    batch_size: int = bounded(512, ge=1)  # global batch, split across workers
    grad_clip: float = bounded(0.0, ge=0)

    def __post_init__(self) -> None:
        if not 0 <= self.warmup_epochs <= self.epochs:
            raise ConfigError(
                f"optim.warmup_epochs must be in [0, epochs={self.epochs}], got {self.warmup_epochs}"
            )


@config("data.synthetic")
class SyntheticConfig:
    """Synthetic faces rendered on the fly (the embedded default dataset)."""

    num_identities: int = bounded(200, ge=1)
    images_per_identity: int = bounded(10, ge=1)
    size: int = bounded(112, ge=16)
    seed: int = bounded(0, ge=0)
    intensity: tuple[float, float] = bounded((0.6, 1.1), ge=0)
    jitter: float = bounded(0.08, ge=0)
    align: bool = False  # similarity-align faces on their 5 landmarks (fra.data.synthetic.align_face)


@config("data")
class DataConfig:
    """Where pretraining images come from and how views are made."""

    source: str = one_of("shards", "synthetic")  # shards (Parquet via Ray Data) | synthetic (rendered, in process)
    shards: str = location("")  # directory or URI holding manifest.json + Parquet shards
    split: str = "train"
    # ResNet down-samples 32x: a smaller view leaves no feature map for the region heads
    image_size: int = bounded(224, ge=32, why="ResNet down-samples 32x")
    synthetic: SyntheticConfig = field(default_factory=SyntheticConfig)
    shuffle_buffer: int = bounded(1000, ge=0)
    seed: int = bounded(0, ge=0)
    # Input normalisation of the views (recorded in the exported model card): auto = FRL's
    # (ImageNet mean, std 0.228/0.224/0.225) for method=swav, VGGFace2's otherwise.
    normalization: str = one_of("auto", "vggface2", "frl", "imagenet")  # auto | vggface2 | frl | imagenet
    # Where the per-pixel ops of the two views (colour jitter, greyscale, blur, solarise) run:
    # workers (the Ray Data tasks, with the crop) | device (batched on the trainer's device; the
    # workers only decode, crop, resize and flip) | auto = device when scaling.use_gpu, else
    # workers (on a CPU the batched ops cost the trainer more than the workers' fused path).
    # SwAV's multi-crop always augments on the workers; the plain loop (`fra pretrain --plain`) augments
    # in process. See augment_placement() and benchmarks/RESULTS.md (augmentation split).
    augment_on: str = one_of("auto", "workers", "device")  # auto | workers | device


@config("scaling.ddp")
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


@config("scaling")
class ScalingConfig:
    """Ray Train scaling: workers, devices, precision, fault tolerance."""

    num_workers: int | list[int] = bounded(1, ge=1)  # fixed count, or [min, max] for elastic training
    use_gpu: bool = False
    cpus_per_worker: float = bounded(1.0, gt=0)
    gpus_per_worker: float = bounded(1.0, gt=0)
    amp: str = one_of("off", "fp16", "bf16")  # off | fp16 (CUDA, GradScaler) | bf16
    max_failures: int = bounded(3, ge=-1, why="-1 retries forever")
    # Stop with a clear message instead of waiting forever. 30 min: an autoscaled node that has to
    # be started cold (EC2 boot, image pull, and with Ray's stock image or a bare AMI the ~6 GB torch
    # install: 15-20 min, docs/cloud.md §2) must still be in time, with margin for a spot retry.
    placement_timeout_s: float = bounded(1800.0, gt=0)
    ddp: DDPConfig = field(default_factory=DDPConfig)

    def __post_init__(self) -> None:
        if self.ddp.bf16_compress and not self.use_gpu:
            raise ConfigError("scaling.ddp.bf16_compress needs scaling.use_gpu: true (a NCCL communication hook)")
        counts = self.num_workers if isinstance(self.num_workers, list) else [self.num_workers]
        if len(counts) not in (1, 2) or counts != sorted(counts):
            raise ConfigError(f"scaling.num_workers must be N >= 1 or [min, max], got {self.num_workers!r}")


@config("run")
class RunSettings:
    """Naming, outputs, logging and checkpoint cadence of one run."""

    name: str = path_component("fra")
    storage_path: str = location("runs", required=True)
    seed: int = bounded(0, ge=0)
    log_every: int = bounded(10, ge=0)
    # steps between non-finite loss checks; 0 = at log steps (checkpoints always check)
    finite_check_every: int = bounded(0, ge=0)
    checkpoint_every: int = bounded(0, ge=0)  # steps; 0 = at epoch end only
    checkpoint_every_minutes: float = bounded(0.0, ge=0)  # wall clock, checked at log steps; 0 = off
    # async: training goes on while Ray uploads (local copy deleted after) | sync
    checkpoint_upload: str = one_of("async", "sync")
    keep_checkpoints: int = bounded(2, ge=1, why="the newest checkpoint is what a resume needs")
    max_steps: int = bounded(0, ge=0)  # 0 = the full schedule; >0 truncates (smoke tests)
    heatmaps_every_epoch: bool = True
    # Consecutive logs with the cluster CE (SwAV: its loss) at ln K or near-uniform heat maps before
    # collapse_action; 0 = off. A model's first logs can sit near ln K while its regions form, so
    # the window must outlast the start of a healthy run: 20 is the reference recipes' value
    # (pretrain_vggface2 / pretrain_frl_swav: 1,000 steps at log_every 50, a sixth of a VGGFace2
    # epoch at batch 512 and past FRL's 313-step prototype freeze); at the default log_every 10 it is 200 steps.
    collapse_patience: int = bounded(20, ge=0)
    # warn | stop (stop: checkpoints are held back while logs look collapsed, so the run's latest
    # checkpoint is the last one written before the window began)
    collapse_action: str = one_of("warn", "stop")


@config("tracking")
class TrackingConfig:
    """MLflow tracking; an empty URI means a local sqlite file under the storage path."""

    mlflow_uri: str = location("")
    experiment: str = "fra-pretrain"
    enabled: bool = True


@config()
class PretrainConfig:
    """Everything `fra pretrain` needs."""

    model: ModelConfig = field(default_factory=ModelConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    data: DataConfig = field(default_factory=DataConfig)
    scaling: ScalingConfig = field(default_factory=ScalingConfig)
    run: RunSettings = field(default_factory=RunSettings)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)

    def __post_init__(self) -> None:
        if self.data.augment_on == "device" and self.model.method == "swav":
            raise ConfigError("data.augment_on=device is not available with model.method=swav (its multi-crop "
                              "augments on the workers); use auto or workers")


def augment_placement(cfg: "PretrainConfig") -> str:
    """Where the two views' per-pixel ops run, ``workers`` or ``device`` (``data.augment_on``;
    ``auto``: ``device`` when ``scaling.use_gpu`` and the method makes two views, else ``workers``)."""
    choice = cfg.data.augment_on
    if choice == "auto":
        return "device" if cfg.scaling.use_gpu and cfg.model.method != "swav" else "workers"
    return choice


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
# Validation helpers (field rules are declared on the fields; these serve cross-field checks)
# --------------------------------------------------------------------------------------
def _check_choice(name: str, value: Any, choices: tuple) -> None:
    if value not in choices:
        raise ConfigError(f"{name} must be one of {list(choices)}, got {value!r}")


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
    "augment_placement",
    "per_worker_batch",
    "from_dict",
    "to_dict",
    "to_record",
    "flatten",
    "apply_overrides",
    "load_yaml",
    "load_config",
    "dump_yaml",
    "replace",
    "field",
    "config",
    "bounded",
    "one_of",
    "path_component",
    "location",
    "check_path_component",
]
