"""Face alignment on Ray Train (issue 14 §2-3): a backbone under a heat-map head, honest NME.

Python API (the pipeline and CLI call it):

* ``LandmarkConfig`` — sections ``data``, ``model``, ``optim``, ``scaling``, ``backbone``,
  ``tracking``, ``run`` (``scaling`` and ``backbone`` are FER's). Load with
  ``load_config(LandmarkConfig, path, overrides)``.
* ``evaluate_landmarks(cfg, backbone_source=None, *, run_name=None) -> LandmarkResult`` — trains
  and writes ``<storage_path>/<run>/{results.json, points.png, config.yaml, model.pt}``; logs to
  MLflow when ``tracking.enabled``. ``backbone_source`` is any source of
  :func:`fra.evaluation.backbones.resolve_backbone` (fra, official FRA, FRL, torchvision, MLflow URI).

The protocol (points, flip pairs, normaliser, FR threshold, subsets) comes from the dataset card
(:func:`fra.evaluation.landmarks_data.landmark_protocol`). Metrics: per-image NME in source pixels
(%), FR (%) and AUC at the card's threshold, on the full test set and per subset. The headline is
the last epoch's NME and the mean of the last ``run.last_k`` epochs; ``best_epoch_selected_on_test``
is the references' number (minimum over the evaluations every ``run.eval_every`` epochs), labelled
as such; with ``data.val_fraction`` the epoch picked on validation is added.

NOTE (DOWNSTREAM_SPEC §7.1, ours): single-stage SimpleBaseline head, STAR loss + 10 AWing on the
point maps (no edge maps), Adam 1e-3 without weight decay and STAR's step schedule (as fractions of
the epochs), RGB input with VGGFace2 normalisation; no EMA of the weights (STAR keeps one).
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
from fra.evaluation.fer import FERBackbone, FERScaling, resolve_amp, resolve_normalization
from fra.evaluation.landmarks_report import LandmarkResult

log = logging.getLogger(__name__)


@config("data")
class LandmarkData:
    shards: str = location("")  # landmark shard root (fra shards wflw|300w|aflw19|synthetic_landmarks ...)
    train_split: str = "train"
    test_split: str = ""  # "" = the card's evaluation split
    val_fraction: float = bounded(0.0, ge=0, lt=1)  # carve this fraction of train (by path hash) to select on
    image_size: int = bounded(256, ge=32)  # crop side; the maps are a quarter of it
    normalization: str = one_of("vggface2", "imagenet", "dataset", "backbone")
    num_cpus: float = bounded(1.0, gt=0)  # per Ray Data decode/augment task
    augment: dict = field(default_factory=dict)  # LandmarkTransform overrides, e.g. {rotation: 0.0}
    protocol: dict = field(default_factory=dict)  # card protocol overrides, e.g. {fr_threshold: 0.08}


@config("model")
class LandmarkModel:
    loss: str = one_of("star", "awing", "l2")  # star: STAR + 10 AWing; awing / l2: heat-map baselines
    deconv_channels: int = bounded(256, ge=8)


@config("optim")
class LandmarkOptim:
    optimizer: str = one_of("adam", "adamw")
    lr: float = bounded(1e-3, gt=0)
    weight_decay: float = bounded(0.0, ge=0)
    epochs: int = bounded(60, ge=1)
    milestones: tuple[float, ...] = bounded((0.4, 0.7, 0.9), gt=0, le=1)  # STAR: 200, 350, 450 of 500
    gamma: float = bounded(0.1, gt=0, le=1)
    batch_size: int = bounded(32, ge=2)  # global


@config("run")
class LandmarkRun:
    name: str = path_component("landmarks")
    storage_path: str = location("runs", required=True)
    seed: int = bounded(0, ge=0)
    eval_every: int = bounded(1, ge=1)
    last_k: int = bounded(5, ge=1)
    checkpoint_every: int = bounded(0, ge=0)  # epochs; Ray checkpoints for worker-failure retries
    save_model: bool = True
    examples: int = bounded(8, ge=0)  # test faces in points.png


@config("tracking")
class LandmarkTracking:
    enabled: bool = True
    mlflow_uri: str = location("")  # "" = sqlite under run.storage_path
    experiment: str = "fra-landmarks"


@config()
class LandmarkConfig:
    """Everything ``fra evaluate landmarks`` needs (see the module docstring)."""

    data: LandmarkData = field(default_factory=LandmarkData)
    model: LandmarkModel = field(default_factory=LandmarkModel)
    optim: LandmarkOptim = field(default_factory=LandmarkOptim)
    scaling: FERScaling = field(default_factory=FERScaling)
    backbone: FERBackbone = field(default_factory=FERBackbone)
    tracking: LandmarkTracking = field(default_factory=LandmarkTracking)
    run: LandmarkRun = field(default_factory=LandmarkRun)


def evaluate_landmarks(cfg: LandmarkConfig, backbone_source: Any = None, *, run_name: str | None = None,
                       inject: dict | None = None) -> LandmarkResult:
    """Train a heat-map head on a backbone over landmark shards and write the results (module docstring).

    ``inject`` is a test-only fault hook (``kill_after_epoch``: see ``landmarks_worker._maybe_kill``).
    """
    from fra import storage as st
    from fra.data.manifest import read_manifest
    from fra.evaluation.backbones import resolve_backbone
    from fra.evaluation.fer import _card, iters_per_epoch
    from fra.evaluation.landmarks_data import landmark_datasets, landmark_protocol
    from fra.evaluation.landmarks_report import write_outputs
    from fra.evaluation.landmarks_worker import LandmarkSpec
    from fra.ray_runtime import check_shared_location, init_ray

    t0 = time.perf_counter()
    if not cfg.data.shards:
        raise ConfigError("data.shards is empty: point it at landmark shards written by `fra shards`")
    manifest = read_manifest(cfg.data.shards)
    protocol = landmark_protocol(manifest, cfg.data.protocol)
    card = _card(manifest)
    test_split = cfg.data.test_split or (card.evaluation_split if card else "test")
    source = cfg.backbone.source if backbone_source is None else backbone_source
    backbone = resolve_backbone(source, cfg.backbone.arch, cfg.run.seed, cfg.tracking.mlflow_uri,
                                trust_pickle=cfg.backbone.trust_pickle)
    storage = st.absolute(cfg.run.storage_path)
    init_ray()  # before the datasets: Ray Data would start a default Ray itself (init_ray's docstring)
    check_shared_location("run.storage_path", storage)
    datasets, sizes = landmark_datasets(manifest, protocol, image_size=cfg.data.image_size,
                                        train_split=cfg.data.train_split, test_split=test_split,
                                        val_fraction=cfg.data.val_fraction, seed=cfg.run.seed,
                                        num_cpus=cfg.data.num_cpus, augment=cfg.data.augment)
    mean, std = resolve_normalization(cfg, manifest, backbone)
    workers = cfg.scaling.num_workers
    spec = LandmarkSpec(
        arch=backbone.arch, num_points=protocol.num_points, loss=cfg.model.loss, optimizer=cfg.optim.optimizer,
        lr=cfg.optim.lr, weight_decay=cfg.optim.weight_decay, epochs=cfg.optim.epochs,
        milestones=tuple(cfg.optim.milestones), gamma=cfg.optim.gamma, batch_size=cfg.optim.batch_size,
        image_size=cfg.data.image_size, normalizer=protocol.normalizer, normalizer_points=protocol.normalizer_points,
        fr_threshold=protocol.fr_threshold, attributes=protocol.attributes, deconv_channels=cfg.model.deconv_channels,
        amp=resolve_amp(cfg.scaling), eval_every=cfg.run.eval_every, last_k=cfg.run.last_k, seed=cfg.run.seed,
        mean=tuple(mean), std=tuple(std), checkpoint_every=cfg.run.checkpoint_every, has_val="val" in datasets,
        examples=cfg.run.examples, extra_normalizers=protocol.extra_normalizers)
    run_id = run_name or f"{cfg.run.name}-{time.strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:4]}"
    log.info("landmarks (%s loss): %s on %s (%s, %d points), %d train / %d test rows, %d worker(s)", cfg.model.loss,
             backbone.spec, manifest.dataset, test_split, protocol.num_points, sizes["train"], sizes["test"], workers)
    out = _fit(cfg, spec, backbone.state_dict, datasets, run_id, storage, inject)
    resolved = {"test_split": test_split, "amp": spec.amp, "protocol": protocol.to_dict(),
                "normalization": {"mean": list(mean), "std": list(std)},
                "iters_per_epoch": iters_per_epoch(sizes["train"], cfg.optim.batch_size, max(workers, 1))}
    context = {"config": to_dict(cfg), "resolved": resolved,
               "backbone": {**backbone.params(), "detail": backbone.detail},
               "dataset": {"name": manifest.dataset, "uri": manifest.uri, "fingerprint": manifest.fingerprint,
                           "attributes": list(manifest.attributes), "rows": sizes}}
    return write_outputs(cfg, out, context, st.join(storage, run_id), time.perf_counter() - t0)


def _fit(cfg: LandmarkConfig, spec, backbone_sd: dict, datasets: dict, run_id: str, storage: str,
         inject: dict | None = None) -> dict:
    """Run the Ray Train job (the FER job's settings); returns rank 0's loop output."""
    from fra.evaluation.job import fit_evaluation
    from fra.evaluation.landmarks_worker import landmark_train_loop

    return fit_evaluation(landmark_train_loop, {"spec": dataclasses.asdict(spec), "inject": inject or {}}, backbone_sd,
                          cfg.scaling, datasets, run_id, storage, "landmark")


__all__ = ["LandmarkConfig", "LandmarkData", "LandmarkModel", "LandmarkOptim", "LandmarkRun", "LandmarkResult",
           "evaluate_landmarks"]
