"""Single-process pretraining with the plain loop (no Ray): the quickest way to try FRA.

Synthetic faces are rendered in process, two views are built with the same augmentation as
the Ray Data path, and the loop of :mod:`fra.engine` trains. The run ends as a Ray run does
(:func:`fra.train.export.finalize_run`: ``final/`` and ``export/``); the resume checkpoint and
heat-map overlays land beside them in ``<storage_path>/<name>/``.
"""
from __future__ import annotations

import logging
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from fra.config import PretrainConfig, dump_yaml, effective_lr, view_normalization
from fra.engine import Normalizer, Schedule, TrainState, train_one_epoch
from fra.errors import ConfigError
from fra.losses import build_loss
from fra.models import build_model
from fra.nonfinite import FiniteCheck
from fra.optim import build_optimizer
from fra.train.checkpointing import CHECKPOINT_FILE, load_checkpoint, restore, save_checkpoint
from fra.train.export import finalize_run

log = logging.getLogger(__name__)


@dataclass
class PlainResult:
    run_dir: Path
    checkpoint: Path  # <run>/final/checkpoint.pt (the resume checkpoint stays at <run>/checkpoint.pt)
    backbone: Path
    model_card: Path
    heatmaps: list[Path]
    history: list[dict]
    region_score: dict | None = None


def _progress(metrics: dict, total: int) -> None:
    """A one-line console progress bar with the loss components."""
    done = metrics["step"]
    width = 24
    bar = "#" * int(width * done / max(total, 1))
    parts = " ".join(f"{k.split('/')[-1]}={metrics[k]:.4f}" for k in
                     ("loss", "loss/inst", "loss/region", "loss/cluster") if k in metrics)
    sys.stderr.write(f"\r[{bar:<{width}}] step {done}/{total} {parts} lr={metrics['lr']:.4f} "
                     f"{metrics['images_per_s']:.1f} img/s")
    sys.stderr.flush()


def synthetic_probe_images(cfg: PretrainConfig, out_dir: Path, n: int = 8) -> list[Path]:
    """Write a few held-out synthetic faces (test identities) to use as the heat-map probe."""
    from fra.data.synthetic import SyntheticFaces
    from PIL import Image

    s = cfg.data.synthetic
    spec = SyntheticFaces(num_identities=s.num_identities, images_per_identity=s.images_per_identity,
                          size=cfg.data.image_size, seed=s.seed + 1)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, sample in enumerate(spec.iter_split("test")):
        if i >= n:
            break
        p = out_dir / f"probe_{i:02d}.png"
        Image.fromarray(sample["image"]).save(p)
        paths.append(p)
    return paths


def pretrain_plain(cfg: PretrainConfig, progress: bool = True) -> PlainResult:
    """Pretrain in this process on rendered synthetic faces (``data.source: synthetic``)."""
    from fra.data.local import LocalTwoViewLoader
    from fra.data.synthetic import SyntheticFaces
    from fra.heatmaps import write_overlays

    if cfg.data.source != "synthetic":
        raise ConfigError("the plain runner renders synthetic faces: set data.source=synthetic "
                          "(Parquet shards stream through Ray: run without --plain)")
    if cfg.model.method == "swav" and cfg.model.swav.total_crops != 2:
        raise ConfigError(f"the plain runner makes two views; model.swav.nmb_crops={list(cfg.model.swav.nmb_crops)} "
                          "needs the multi-crop stream: run without --plain (or use one group of 2 crops)")
    if "://" in cfg.run.storage_path:
        raise ConfigError(f"run.storage_path={cfg.run.storage_path!r}: the plain runner (one process, no Ray) writes "
                          "to a local folder; run without --plain to train on Ray with storage on a URI")
    torch.manual_seed(cfg.run.seed)
    np.random.seed(cfg.run.seed)
    run_dir = Path(cfg.run.storage_path) / cfg.run.name
    run_dir.mkdir(parents=True, exist_ok=True)
    dump_yaml(cfg, run_dir / "config.yaml")

    s = cfg.data.synthetic
    spec = SyntheticFaces(num_identities=s.num_identities, images_per_identity=s.images_per_identity,
                          size=s.size, seed=s.seed, intensity=tuple(s.intensity), jitter=s.jitter, align=s.align)
    loader = LocalTwoViewLoader(spec, batch_size=cfg.optim.batch_size, image_size=cfg.data.image_size,
                                seed=cfg.data.seed)
    iters = len(loader)
    if iters == 0:
        raise ConfigError(f"batch size {cfg.optim.batch_size} is larger than the training split")
    model = build_model(cfg.model)
    loss_fn = build_loss(cfg.model)
    optimizer = build_optimizer(model, cfg.optim)
    schedule = Schedule.from_config(cfg.optim, cfg.model, iters)
    total = min(schedule.total_steps, cfg.run.max_steps or schedule.total_steps)
    log.info("plain pretraining: %d steps (%d/epoch), global batch %d, lr %.4g (effective)",
             total, iters, cfg.optim.batch_size, effective_lr(cfg.optim))

    ckpt_path = run_dir / CHECKPOINT_FILE
    state = TrainState()
    if ckpt_path.exists():
        state = restore(load_checkpoint(ckpt_path), model, optimizer)
        log.info("resumed from %s at step %d (epoch %d)", ckpt_path, state.step, state.epoch)
    mean, std = view_normalization(cfg)
    normalizer = Normalizer(mean, std)
    on_log = (lambda m: _progress(m, total)) if progress else None
    finite = FiniteCheck(cfg.run.finite_check_every)  # also checks at each epoch's end, before the save below
    t0 = time.perf_counter()
    while state.step < total:
        loader.set_epoch(state.epoch)
        # Skip the batches of this epoch that a resumed run already consumed.
        start_in_epoch = state.step - state.epoch * iters
        batches = (b for i, b in enumerate(loader) if i >= start_in_epoch)
        stats = train_one_epoch(model, loss_fn, optimizer, batches, schedule, state, normalizer,
                                log_every=cfg.run.log_every or 1, max_steps=total, finite=finite, on_log=on_log)
        state.end_epoch(iters)
        state.history.append({k: v for k, v in stats.items() if isinstance(v, (int, float))})
        save_checkpoint(ckpt_path, model, optimizer, state, cfg)
    if progress:
        sys.stderr.write("\n")
    log.info("trained %d steps in %.1f s", state.step, time.perf_counter() - t0)
    out = finalize_run(cfg, ckpt_path, str(run_dir))
    heatmaps: list[Path] = []
    if cfg.model.method == "fra" and cfg.run.heatmaps_every_epoch:
        probes = synthetic_probe_images(cfg, run_dir / "probe")
        heatmaps = write_overlays(model, probes, run_dir / "heatmaps", cfg.data.image_size,
                                  mean, std, mode="batch")
    return PlainResult(run_dir, Path(out.checkpoint), Path(out.backbone), Path(out.model_card), heatmaps,
                       state.history, out.region_score)
