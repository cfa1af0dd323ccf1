"""FER evaluation (FRA_SPEC §9): fine-tune or linear probe on Ray Train, honest metrics.

Python API (stable; the tuning and pipeline layers call it):

* ``FERConfig`` — frozen dataclasses (:mod:`fra.config` machinery): ``protocol``
  (``finetune`` | ``linear``) and sections ``data``, ``optim``, ``scaling``, ``backbone``,
  ``tracking``, ``run``. Load with ``load_config(FERConfig, path, overrides)``. Optimiser fields
  left ``null`` take the reference value of the protocol (:func:`resolve_optim`).
* ``evaluate_fer(cfg, backbone_source=None, *, run_name=None) -> FERResult`` — runs the job and
  writes ``<storage_path>/<run>/{results.json, confusion.png, config.yaml, model.pt}``; logs to
  MLflow when ``tracking.enabled``. ``backbone_source`` overrides ``cfg.backbone.source`` and may
  be any source of :func:`fra.evaluation.backbones.resolve_backbone` (path, ``models:/name@alias``,
  ``runs:/...``, ``random:resnet18``, an ``nn.Module``).
* ``linear_probe_features`` (:mod:`fra.evaluation.probe`) — the cheap in-process proxy.

``scaling.num_workers: 0`` runs the loop in this process (Ray Train local mode), still reading
the shards through Ray Data; ``>= 1`` starts that many Ray Train workers (DDP; SyncBN and fp16
AMP only with GPUs). Accuracies are in percent.

Metrics (``results.json``, MLflow): the headline is the last-epoch top-1 and the mean over the
last ``run.last_k`` epochs, with mean per-class accuracy and macro-F1 of the last epoch; epochs are
evaluated every ``run.eval_every`` and each of the last ``run.last_k``;
``best_epoch_selected_on_test`` is the reference's number (max of test top-1 over the epochs
that are multiples of ``run.eval_every``, its ``--eval-freq``), labelled as such; with
``data.val_fraction`` / ``data.val_split`` the epoch picked on validation (among the same epochs)
and its test top-1 are added (``summary.top1_at_val_best``).
"""
from __future__ import annotations

import dataclasses
import logging
import time
import uuid
from dataclasses import field
from typing import Any

from fra.config import bounded, config, location, one_of, path_component, to_dict
from fra.errors import ConfigError
from fra.evaluation.report import FERResult  # defined beside the code that builds it; re-exported here

log = logging.getLogger(__name__)

PROTOCOL_DEFAULTS = {  # main_fer.py: README fine-tune recipe / linear-probe defaults
    "finetune": {"optimizer": "adamw", "lr": 2e-4, "lr_head": 2e-4, "weight_decay": 0.05},
    "linear": {"optimizer": "sgd", "lr": 30.0, "lr_head": None, "weight_decay": 0.0},
}
NORMALIZATIONS = {"vggface2": ((0.5231, 0.4044, 0.3489), (0.2536, 0.2194, 0.2070)),
                  "imagenet": ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))}


@config("data")
class FERData:
    shards: str = location("")  # shard root (manifest.json + Parquet), local or s3://
    train_split: str = "train"
    test_split: str = ""  # "" = the dataset card's evaluation split
    val_split: str = ""  # an existing split used for model selection (e.g. FER2013 PublicTest)
    val_fraction: float = bounded(0.0, ge=0, lt=1)  # or: carve this fraction of train (by path hash) to select on
    image_size: int = bounded(224, ge=16)
    normalization: str = one_of("vggface2", "imagenet", "dataset", "backbone")  # vggface2: the reference --data_norm
    num_cpus: float = bounded(1.0, gt=0)  # per Ray Data decode/augment task
    # materialise test/val once (object store) when their decoded size fits (0 = never); 1024 covers the
    # evaluation splits of RAF-DB (441 MiB), FER2013 PrivateTest (515 MiB) and AffectNet val (574 MiB) at 224 px
    cache_eval_mb: int = bounded(1024, ge=0)
    augment: dict = field(default_factory=dict)  # FERTransform overrides, e.g. {erase_p: 0.0}; {} = reference


@config("optim")
class FEROptim:
    optimizer: str | None = one_of("adamw", "sgd", default=None)  # adamw | sgd; null = protocol default
    lr: float | None = bounded(None, gt=0)  # trunk lr (fine-tune) or head lr (linear); null = protocol default
    lr_head: float | None = bounded(None, gt=0)  # null = protocol default (linear: = lr)
    weight_decay: float | None = bounded(None, ge=0)
    momentum: float = bounded(0.9, ge=0, le=1)  # SGD only
    epochs: int = bounded(100, ge=1)
    warmup_epochs: float = bounded(5.0, ge=0)
    min_lr: float = bounded(1e-6, ge=0)
    batch_size: int = bounded(256, ge=1)  # global
    balanced_sampling: bool | None = None  # class-balanced, with replacement; null = the card's option (AffectNet)
    label_smoothing: float = bounded(0.0, ge=0, lt=1)

    def __post_init__(self) -> None:
        if not 0 <= self.warmup_epochs <= self.epochs:
            raise ConfigError(f"optim.warmup_epochs must be in [0, {self.epochs}], got {self.warmup_epochs}")


@config("scaling")
class FERScaling:
    num_workers: int = bounded(1, ge=0)  # 0 = in this process (Ray Train local mode)
    use_gpu: bool = False
    cpus_per_worker: float = bounded(1.0, gt=0)
    amp: str = one_of("auto", "off", "fp16", "bf16")  # auto (fp16 on GPU, off on CPU) | off | fp16 | bf16
    sync_bn: bool = True  # fine-tune with > 1 GPU worker (the reference's SyncBN)
    max_failures: int = bounded(0, ge=-1, why="-1 retries forever")


@config("backbone")
class FERBackbone:
    source: str = location("random")  # see fra.evaluation.backbones
    arch: str = ""  # torchvision ResNet name; "" = from the checkpoint (resnet50 for random)
    # Unpickle an MLflow model that has no backbone.pt (not registered by fra): runs its writer's
    # code here, so only for a registry whose every writer you trust (--trust-pickle)
    trust_pickle: bool = False


@config("tracking")
class FERTracking:
    enabled: bool = True
    mlflow_uri: str = location("")  # "" = sqlite under run.storage_path
    experiment: str = "fra-fer"


@config("run")
class FERRun:
    name: str = path_component("fer")
    storage_path: str = location("runs", required=True)
    seed: int = bounded(0, ge=0)
    eval_every: int = bounded(1, ge=1)  # epochs (reference default 1, its README 5); the last last_k are evaluated too
    last_k: int = bounded(5, ge=1)  # the headline mean covers the last last_k epochs
    checkpoint_every: int = bounded(0, ge=0)  # epochs; Ray checkpoints for worker-failure retries
    save_model: bool = True


@config()
class FERConfig:
    """Everything ``fra evaluate fer`` needs (see the module docstring)."""

    protocol: str = one_of("finetune", "linear")  # finetune | linear
    data: FERData = field(default_factory=FERData)
    optim: FEROptim = field(default_factory=FEROptim)
    scaling: FERScaling = field(default_factory=FERScaling)
    backbone: FERBackbone = field(default_factory=FERBackbone)
    tracking: FERTracking = field(default_factory=FERTracking)
    run: FERRun = field(default_factory=FERRun)


def resolve_optim(cfg: FERConfig) -> dict[str, Any]:
    """The optimiser values actually used: explicit config values over the protocol's defaults."""
    out = dict(PROTOCOL_DEFAULTS[cfg.protocol])
    for key in ("optimizer", "lr", "lr_head", "weight_decay"):
        if getattr(cfg.optim, key) is not None:
            out[key] = getattr(cfg.optim, key)
    if out["lr_head"] is None:
        out["lr_head"] = out["lr"]
    return out


def resolve_amp(scaling: FERScaling) -> str:
    return ("fp16" if scaling.use_gpu else "off") if scaling.amp == "auto" else scaling.amp


def resolve_normalization(cfg: FERConfig, manifest, backbone) -> tuple[tuple, tuple]:
    """(mean, std) for ``data.normalization``; ``backbone`` falls back to VGGFace2 stats."""
    choice = cfg.data.normalization
    norm = {"dataset": manifest.normalization, "backbone": backbone.normalization}.get(choice)
    if choice in NORMALIZATIONS or not norm:
        if choice == "dataset":
            raise ConfigError(f"data.normalization=dataset but {manifest.uri} has no normalisation")
        return NORMALIZATIONS.get(choice, NORMALIZATIONS["vggface2"])
    return tuple(norm["mean"]), tuple(norm["std"])


def iters_per_epoch(n_train: int, batch_size: int, workers: int) -> int:
    """Batches per epoch on each worker: rows are split equally (remainder dropped), the last
    batch may be partial."""
    per_worker_rows = n_train // max(workers, 1)
    return max(1, -(-per_worker_rows // max(1, batch_size // max(workers, 1))))


def evaluate_fer(cfg: FERConfig, backbone_source: Any = None, *, run_name: str | None = None) -> FERResult:
    """Fine-tune or linear-probe a backbone on FER shards and write the results (module docstring)."""
    from fra.evaluation.backbones import resolve_backbone
    from fra.evaluation.data import fer_datasets
    from fra.evaluation.report import write_outputs
    from fra.data.manifest import read_manifest
    from fra.evaluation.worker import LoopSpec
    from fra import storage as st
    from fra.ray_runtime import check_shared_location, init_ray

    t0 = time.perf_counter()
    if not cfg.data.shards:
        raise ConfigError("data.shards is empty: point it at a shard root written by `fra shards`")
    manifest = read_manifest(cfg.data.shards)
    if not manifest.classes:
        raise ConfigError(f"{manifest.uri}: dataset {manifest.dataset!r} has no classes; not a FER dataset")
    source = cfg.backbone.source if backbone_source is None else backbone_source
    backbone = resolve_backbone(source, cfg.backbone.arch, cfg.run.seed, cfg.tracking.mlflow_uri,
                                trust_pickle=cfg.backbone.trust_pickle)
    card = _card(manifest)
    test_split = cfg.data.test_split or (card.evaluation_split if card else "test")
    if test_split not in manifest.counts:
        raise ConfigError(f"{manifest.uri} has no split {test_split!r} (splits: {list(manifest.counts)})")
    balanced = cfg.optim.balanced_sampling
    balanced = bool(card and card.options.get("balanced_sampling", False)) if balanced is None else balanced
    workers = cfg.scaling.num_workers
    storage = st.absolute(cfg.run.storage_path)
    init_ray()  # before the datasets: Ray Data would start a default Ray itself (init_ray's docstring)
    check_shared_location("run.storage_path", storage)
    datasets, sizes = fer_datasets(manifest, image_size=cfg.data.image_size, train_split=cfg.data.train_split,
                                   test_split=test_split, val_split=cfg.data.val_split,
                                   val_fraction=cfg.data.val_fraction, balanced=balanced,
                                   seed=cfg.run.seed, num_cpus=cfg.data.num_cpus,
                                   cache_eval_mb=cfg.data.cache_eval_mb, augment=cfg.data.augment)
    opt = resolve_optim(cfg)
    mean, std = resolve_normalization(cfg, manifest, backbone)
    spec = LoopSpec(protocol=cfg.protocol, arch=backbone.arch, num_classes=len(manifest.classes), **opt,
                    momentum=cfg.optim.momentum, epochs=cfg.optim.epochs, warmup_epochs=cfg.optim.warmup_epochs,
                    min_lr=cfg.optim.min_lr, batch_size=cfg.optim.batch_size,
                    iters_per_epoch=iters_per_epoch(sizes["train"], cfg.optim.batch_size, max(workers, 1)),
                    label_smoothing=cfg.optim.label_smoothing, amp=resolve_amp(cfg.scaling),
                    sync_bn=cfg.scaling.sync_bn and cfg.scaling.use_gpu, eval_every=cfg.run.eval_every,
                    last_k=cfg.run.last_k, seed=cfg.run.seed, mean=tuple(mean), std=tuple(std),
                    checkpoint_every=cfg.run.checkpoint_every, has_val="val" in datasets)
    run_id = run_name or f"{cfg.run.name}-{time.strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:4]}"
    log.info("FER %s: %s on %s (%s, %d classes), %d train / %d test rows, %d worker(s)", cfg.protocol,
             backbone.spec, manifest.dataset, test_split, spec.num_classes, sizes["train"], sizes["test"], workers)
    out = _fit(cfg, spec, backbone.state_dict, datasets, run_id, storage)
    resolved = {"optim": opt, "test_split": test_split, "amp": spec.amp, "balanced_sampling": balanced,
                "normalization": {"mean": list(mean), "std": list(std)}, "iters_per_epoch": spec.iters_per_epoch}
    context = {"config": to_dict(cfg), "resolved": resolved,
               "backbone": {**backbone.params(), "detail": backbone.detail},
               "dataset": {"name": manifest.dataset, "uri": manifest.uri, "fingerprint": manifest.fingerprint,
                           "classes": list(manifest.classes), "rows": sizes}}
    return write_outputs(cfg, out, context, st.join(storage, run_id), list(manifest.classes),
                         time.perf_counter() - t0)


def _card(manifest):
    """The manifest's dataset card, or None when it is not installed."""
    from fra.data.cards import load_card

    try:
        return load_card(manifest.dataset)
    except ConfigError:
        return None


def _fit(cfg: FERConfig, spec, backbone_sd: dict, datasets: dict, run_id: str, storage: str) -> dict:
    """Run the Ray Train job; returns rank 0's loop output."""
    from fra.evaluation.job import fit_evaluation
    from fra.evaluation.worker import fer_train_loop

    return fit_evaluation(fer_train_loop, {"spec": dataclasses.asdict(spec)}, backbone_sd, cfg.scaling, datasets,
                          run_id, storage, "FER")


__all__ = ["FERConfig", "FERData", "FEROptim", "FERScaling", "FERBackbone", "FERTracking", "FERRun", "FERResult",
           "evaluate_fer", "resolve_optim", "resolve_normalization", "iters_per_epoch"]
