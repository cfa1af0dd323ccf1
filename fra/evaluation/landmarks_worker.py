"""The face-alignment training loop: pure-torch steps plus the Ray Train wiring (as :mod:`fra.evaluation.worker`).

:func:`fit` runs the schedule over any iterables of landmark batches (``image``, ``points``,
``matrix``, ``gt``, ``box``, ``attributes``; :mod:`fra.evaluation.landmarks_data`) and imports no
Ray. :func:`landmark_train_loop` is the ``train_loop_per_worker``; checkpoints, resume and the
corrupt-image counts are FER's (:func:`fra.evaluation.worker.save_state` / ``resume_state`` /
``skipped_corrupt``). Evaluation computes each test image's NME in source pixels; the per-image
values of every worker are gathered, so a sharded test set gives the single-process numbers.
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Callable, Iterable

import numpy as np
import torch
from torch import nn

from fra import dist
from fra.engine import Normalizer, autocast_context
from fra.evaluation.landmark_metrics import is_evaluated_epoch, landmark_report, nme_per_image, normalizing_distance
from fra.evaluation.worker import (backward_step, dataset_shards, end_epoch, report_epoch, resume_state, save_state,
                                   start_worker)
from fra.losses.landmarks import LandmarkLoss, decode
from fra.models.landmarks import LandmarkNet, to_pixels, to_unit

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class LandmarkSpec:
    """Everything a worker needs, as resolved plain values."""

    arch: str
    num_points: int
    loss: str  # star | awing | l2
    optimizer: str  # adam | adamw
    lr: float
    weight_decay: float
    epochs: int
    milestones: tuple[float, ...]  # fractions of the epochs where the lr drops by gamma
    gamma: float
    batch_size: int  # global
    image_size: int
    normalizer: str
    normalizer_points: tuple = ()
    fr_threshold: float = 0.10
    attributes: tuple[str, ...] = ()
    deconv_channels: int = 256
    amp: str = "off"
    eval_every: int = 1
    last_k: int = 1
    seed: int = 0
    mean: tuple[float, float, float] = (0.5231, 0.4044, 0.3489)
    std: tuple[float, float, float] = (0.2536, 0.2194, 0.2070)
    checkpoint_every: int = 0
    has_val: bool = False
    examples: int = 8  # test faces kept (rank 0, last epoch) for the picture
    extra_normalizers: tuple[str, ...] = ()  # box / diag, reported next to ``normalizer`` (AFLW-19: box)


def build_model(spec: LandmarkSpec, backbone_sd: dict | None) -> nn.Module:
    return LandmarkNet(spec.arch, spec.num_points, backbone_sd, channels=spec.deconv_channels)


def make_optimizer(model: nn.Module, spec: LandmarkSpec) -> torch.optim.Optimizer:
    """STAR's Adam (no weight decay by default), or AdamW; one group, every tensor."""
    cls = torch.optim.Adam if spec.optimizer == "adam" else torch.optim.AdamW
    return cls(model.parameters(), lr=spec.lr, weight_decay=spec.weight_decay)


def epoch_lr(epoch: int, spec: LandmarkSpec) -> float:
    """Step schedule: ``lr x gamma^k`` after k of the milestones (fractions of ``epochs``; STAR: 200, 350,
    450 of 500 = 0.4, 0.7, 0.9)."""
    passed = sum(1 for m in spec.milestones if epoch >= round(m * spec.epochs))
    return spec.lr * spec.gamma ** passed


def train_epoch(model, batches: Iterable[dict], optimizer, criterion, spec: LandmarkSpec, normalizer: Normalizer,
                scaler=None) -> dict:
    model.train()
    loss_sum, steps, images, t0 = torch.zeros(()), 0, 0, time.perf_counter()
    for batch in batches:
        x = normalizer(batch["image"])
        if x.shape[0] < 2:
            continue  # train-mode BN cannot take one sample; equal shards make every rank skip it
        target = to_unit(batch["points"].to(x.device, torch.float32), spec.image_size)
        with autocast_context(x.device.type, spec.amp):
            out = model(x)
        loss = criterion({k: v.float() for k, v in out.items()}, target)["loss"]
        backward_step(loss, optimizer, scaler)
        loss_sum += loss.detach().float().cpu()
        steps, images = steps + 1, images + x.shape[0]
    return {"train_loss": float(loss_sum) / max(steps, 1), "steps": steps, "images": images,
            "train_images_per_s": images / max(time.perf_counter() - t0, 1e-9)}


@torch.no_grad()
def predict(model, batches: Iterable[dict], spec: LandmarkSpec, normalizer: Normalizer, keep: int = 0):
    """Per-image NME (N, 1 + E) (column 0 under ``spec.normalizer``, then ``spec.extra_normalizers``) and
    attributes (N, A) of this process's batches, plus up to ``keep`` examples ``{"image", "pred", "gt"}``
    in crop pixels for the picture."""
    from fra.data.landmark_augment import invert_points

    model = dist.unwrap_model(model)
    was_training = model.training
    model.eval()
    nmes, flags, examples = [], [], []
    for batch in batches:
        x = normalizer(batch["image"])
        with autocast_context(x.device.type, spec.amp):
            out = model(x)
        crop = to_pixels(decode({k: v.float() for k, v in out.items()}, spec.loss), spec.image_size).cpu().numpy()
        matrix, gt = batch["matrix"].numpy(), batch["gt"].numpy().astype(np.float64)
        pred = invert_points(crop, matrix)
        boxes = batch["box"].numpy()
        norms = [normalizing_distance(gt, spec.normalizer, spec.normalizer_points, boxes)]
        norms += [normalizing_distance(gt, kind, boxes=boxes) for kind in spec.extra_normalizers]
        nmes.append(np.stack([nme_per_image(pred, gt, norm) for norm in norms], axis=1))
        flags.append(batch["attributes"].numpy().reshape(len(gt), -1))
        for i in range(min(keep - len(examples), len(gt))):
            examples.append({"image": batch["image"][i].numpy(), "pred": crop[i],
                             "gt": batch["points"][i].numpy()})
    model.train(was_training)
    if not nmes:
        return np.zeros((0, 1 + len(spec.extra_normalizers))), np.zeros((0, len(spec.attributes))), examples
    return np.concatenate(nmes), np.concatenate(flags), examples


def gather(values: np.ndarray) -> np.ndarray:
    """Concatenate every rank's rows (a no-op in one process)."""
    if not dist.is_distributed():
        return values
    parts = [None] * dist.world_size()
    torch.distributed.all_gather_object(parts, values)
    return np.concatenate(parts)


def fit(model: nn.Module, spec: LandmarkSpec, train_batches: Callable[[int], Iterable[dict]],
        test_batches: Callable[[int], Iterable[dict]], val_batches: Callable[[int], Iterable[dict]] | None = None,
        device: torch.device | str = "cpu", start_epoch: int = 0, history: list | None = None, optimizer=None,
        on_epoch: Callable[[dict, int, list], None] | None = None) -> dict:
    """Run the schedule; ``*_batches(epoch)`` return this worker's batches for that epoch.

    Returns:
        ``{"history": [...], "examples": [...]}``: per epoch the train loss, lr, corrupt images
        skipped per split and, on evaluated epochs, ``test`` (and ``val``) landmark reports
        (:func:`fra.evaluation.landmark_metrics.landmark_report`); ``examples`` are test faces
        of the last evaluation with predicted and true points (this rank's).
    """
    normalizer = Normalizer(spec.mean, spec.std, device=device)
    optimizer = optimizer or make_optimizer(model, spec)
    criterion = LandmarkLoss(spec.loss, spec.image_size)
    scaler = torch.amp.GradScaler("cuda") if spec.amp == "fp16" else None
    history, examples = list(history or []), []
    for epoch in range(start_epoch, spec.epochs):
        for group in optimizer.param_groups:
            group["lr"] = epoch_lr(epoch, spec)
        batches = {"train": train_batches(epoch)}
        stats = train_epoch(model, batches["train"], optimizer, criterion, spec, normalizer, scaler)
        totals = dist.all_reduce_sum_host(torch.tensor(
            [stats["train_loss"] * stats["steps"], stats["steps"], stats["images"]], dtype=torch.float64))
        entry = {"epoch": epoch + 1, "train_loss": float(totals[0] / max(totals[1], 1)), "images": int(totals[2]),
                 "lr": optimizer.param_groups[0]["lr"], "train_images_per_s": stats["train_images_per_s"]}
        if is_evaluated_epoch(epoch + 1, spec.epochs, spec.eval_every, spec.last_k):
            t0 = time.perf_counter()
            for split, make in (("test", test_batches), ("val", val_batches)):
                if make is None:
                    continue
                batches[split] = make(epoch)
                keep = spec.examples if split == "test" else 0
                nme, flags, found = predict(model, batches[split], spec, normalizer, keep)
                nme, flags = gather(nme), gather(flags)
                extra = {k: nme[:, 1 + i] for i, k in enumerate(spec.extra_normalizers)}
                entry[split] = landmark_report(nme[:, 0], spec.fr_threshold, flags, spec.attributes, extra)
                if split == "test":
                    examples = found
            entry["eval_seconds"] = time.perf_counter() - t0
        end_epoch(entry, batches, epoch, history, on_epoch, "landmark")
    return {"history": history, "examples": examples}


def landmark_train_loop(config: dict) -> dict:
    """Ray Train per-worker function; returns (on rank 0) the history, examples and final weights."""
    import ray
    import ray.train
    import ray.train.torch

    from fra.data.stream import iter_batches

    spec = LandmarkSpec(**config["spec"])
    rank, world, backbone = start_worker(config, "landmark worker", spec.seed)
    model = build_model(spec, backbone)
    optimizer = make_optimizer(model, spec)
    # The baselines train the point maps only, so DDP must not wait for the heat-map head's gradients.
    ddp = {"find_unused_parameters": True} if spec.loss != "star" else None
    model = ray.train.torch.prepare_model(model, parallel_strategy_kwargs=ddp)
    start_epoch, history = resume_state(ray.train.get_checkpoint(), model, optimizer)
    per_worker = max(1, spec.batch_size // world)
    shard, stream_epoch = dataset_shards(spec.has_val, rank, start_epoch)
    _record_stream_epoch(config.get("inject") or {}, start_epoch, stream_epoch)

    def batches(name: str):
        return lambda epoch: iter_batches(shard[name], per_worker, epoch=epoch, seed=spec.seed, drop_last=False)

    def on_epoch(entry: dict, epoch: int, hist: list) -> None:
        metrics = {k: v for k, v in entry.items() if k not in ("test", "val")}
        for split in ("test", "val"):
            if split in entry:
                metrics[f"{split}_nme"] = entry[split]["full"]["nme"]
        ckpt = None
        if spec.checkpoint_every and (epoch + 1) % spec.checkpoint_every == 0:
            ckpt = save_state(model, optimizer, epoch + 1, hist, rank)
        report_epoch(metrics, ckpt)
        _maybe_kill(config.get("inject") or {}, epoch + 1, rank)

    result = fit(model, spec, batches("train"), batches("test"), batches("val") if spec.has_val else None,
                 device=ray.train.torch.get_device(), start_epoch=start_epoch, history=history,
                 optimizer=optimizer, on_epoch=on_epoch)
    if rank == 0:
        # Ray refuses torch tensors in a return value: ship numpy, the driver converts back.
        result["state_dict"] = {k: v.detach().cpu().numpy() for k, v in dist.unwrap_model(model).state_dict().items()}
    else:
        result["examples"] = []
    return result


def _record_stream_epoch(inject: dict, start_epoch: int, stream_epoch: int | None) -> None:
    """Test hook (``inject.stream_epochs_to``): rank 0 appends "<epoch it resumes in> <epoch its training
    stream starts at>" to that file at every worker-group start."""
    from pathlib import Path

    if inject.get("stream_epochs_to") and stream_epoch is not None:
        with Path(inject["stream_epochs_to"]).open("a") as f:
            f.write(f"{start_epoch} {stream_epoch}\n")


def _maybe_kill(inject: dict, epoch: int, rank: int) -> None:
    """Test hook (``inject.kill_after_epoch``, ``kill_rank``, ``marker``): once (the marker file records it),
    SIGKILL this worker after the report of that epoch, as a lost node would; Ray Train restarts the group
    from the latest checkpoint when ``scaling.max_failures`` allows it."""
    import os
    import signal
    from pathlib import Path

    from fra.ray_runtime import wait_until_reports_registered

    if inject.get("kill_after_epoch") != epoch or inject.get("kill_rank", 0) != rank:
        return
    marker = Path(inject["marker"])
    if not marker.exists():
        marker.write_text(str(epoch))
        wait_until_reports_registered()  # the epoch's checkpoint is the one the restarted group resumes from
        os.kill(os.getpid(), signal.SIGKILL)


__all__ = ["LandmarkSpec", "build_model", "fit", "predict", "landmark_train_loop", "epoch_lr"]
