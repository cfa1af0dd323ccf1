"""The attribute (multi-label) and affect (regression) fine-tune / probe loop, and its Ray Train wiring.

It shares FER's pieces (:mod:`fra.evaluation.worker`): the loop spec, the two-group optimiser and
its per-iteration warm-up + cosine, checkpoint save / resume, the corrupt-image count, the trunk
fingerprint that proves a linear probe left the backbone alone. What differs is the
:class:`TargetTask`: the head on the pooled features, the loss, the target column of the batches,
and the evaluation statistics (:mod:`fra.evaluation.target_metrics`, additive, all-reduce-summed,
so a sharded test set gives the single-process numbers).

:func:`fit` runs over any iterables of ``{"image": uint8 (B, 3, S, S), column: float32 (B, K)}``
batches and imports no Ray; :func:`target_train_loop` is the ``train_loop_per_worker``.
"""
from __future__ import annotations

import logging
import time
from dataclasses import asdict, dataclass
from typing import Callable, Iterable

import numpy as np
import torch
from torch import nn

from fra import dist
from fra.checkpoint import build_torchvision_resnet, load_backbone_into
from fra.engine import Normalizer, autocast_context
from fra.evaluation.backbones import state_dict_fingerprint
from fra.evaluation.metrics import is_evaluated_epoch
from fra.evaluation.target_metrics import affect_stats, attribute_stats
from fra.evaluation.worker import (LoopSpec, backward_step, dataset_shards, end_epoch, make_optimizer, report_epoch,
                                   resume_state, save_state, set_lr, start_worker, trunk_state)
from fra.models.heads import AttributeMLP, ccc_loss

log = logging.getLogger(__name__)

KINDS = ("attributes", "affect")
HEADS = ("mlp", "linear")
LOSSES = {"attributes": ("bce",), "affect": ("mse+ccc", "mse", "ccc")}


@dataclass(frozen=True)
class TargetTask:
    """What a target evaluation predicts and how it is trained and scored.

    Attributes:
        kind: ``attributes`` (0/1 flags, BCE, accuracy) or ``affect`` (continuous, regression).
        column: the batch / shard column holding the targets (``attributes`` or ``targets``).
        outputs: number of targets K.
        head: ``mlp`` (:class:`~fra.models.heads.AttributeMLP`, FRA's attribute head) or ``linear``.
        loss: ``bce`` (attributes), ``mse+ccc`` / ``mse`` / ``ccc`` (affect).
        clip: clip regression predictions to [-1, 1] before scoring (emonet does).
    """

    kind: str
    column: str
    outputs: int
    head: str = "mlp"
    loss: str = "bce"
    clip: bool = True

    def __post_init__(self) -> None:
        if self.kind not in KINDS or self.head not in HEADS or self.loss not in LOSSES.get(self.kind, ()):
            raise ValueError(f"bad task {self}: kind in {KINDS}, head in {HEADS}, loss in {LOSSES.get(self.kind)}")
        if self.outputs < 1:
            raise ValueError(f"task needs at least one target, got {self.outputs}")


def build_model(arch: str, task: TargetTask, backbone_sd: dict[str, torch.Tensor] | None) -> nn.Module:
    """torchvision ResNet with the given trunk and the task's head as ``fc`` (so the optimiser's
    trunk / head groups and the trunk fingerprint work as for FER)."""
    model = build_torchvision_resnet(arch, task.outputs)
    if backbone_sd is not None:
        load_backbone_into(model, backbone_sd, f"{arch} backbone")
    features = model.fc.in_features
    if task.head == "mlp":
        model.fc = AttributeMLP(features, task.outputs)  # PyTorch default init, as the reference
    else:
        nn.init.normal_(model.fc.weight, mean=0.0, std=0.01)
        nn.init.zeros_(model.fc.bias)
    return model


def task_loss(task: TargetTask, out: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    out = out.float()
    if task.kind == "attributes":
        return nn.functional.binary_cross_entropy_with_logits(out, target)  # mean over B x A, no pos_weight
    # NOTE: FRL's valence/arousal loss is not published (DOWNSTREAM_SPEC §5); ours: MSE + (1 - CCC).
    mse = nn.functional.mse_loss(out, target)
    if task.loss == "mse":
        return mse
    return ccc_loss(out, target) + (mse if task.loss == "mse+ccc" else 0.0)


def batch_stats(task: TargetTask, out: torch.Tensor, target: torch.Tensor) -> np.ndarray:
    out, target = out.float().cpu().numpy(), target.float().cpu().numpy()
    if task.kind == "attributes":
        return attribute_stats(out, target)
    return affect_stats(np.clip(out, -1.0, 1.0) if task.clip else out, target)


def _set_mode(model: nn.Module, spec: LoopSpec, training: bool) -> None:
    """Fine-tune: everything trains. Linear probe: the trunk stays in eval mode (frozen BN
    statistics), the head trains (an MLP head has its own batch norm)."""
    model = dist.unwrap_model(model)
    if not training:
        model.eval()
    elif spec.protocol == "finetune":
        model.train()
    else:
        model.eval()
        model.fc.train()


def train_epoch(model: nn.Module, batches: Iterable[dict], optimizer, spec: LoopSpec, task: TargetTask,
                normalizer: Normalizer, step: int, scaler=None) -> tuple[dict, int]:
    """One epoch; returns (mean loss / steps / images / throughput, the next global step)."""
    _set_mode(model, spec, True)
    loss_sum, steps, images, t0 = torch.zeros(()), 0, 0, time.perf_counter()
    for batch in batches:
        x = normalizer(batch["image"])
        y = batch[task.column].to(x.device, torch.float32)
        if x.shape[0] < 2:
            continue  # train-mode BN cannot take one sample; equal shards make every rank skip it
        set_lr(optimizer, step, spec)
        with autocast_context(x.device.type, spec.amp):
            out = model(x)
        loss = task_loss(task, out, y)
        backward_step(loss, optimizer, scaler)
        loss_sum += loss.detach().float().cpu()
        steps, images, step = steps + 1, images + x.shape[0], step + 1
    elapsed = time.perf_counter() - t0
    return {"train_loss": float(loss_sum) / max(steps, 1), "steps": steps, "images": images,
            "train_images_per_s": images / max(elapsed, 1e-9)}, step


@torch.no_grad()
def evaluate(model: nn.Module, batches: Iterable[dict], task: TargetTask, normalizer: Normalizer,
             amp: str = "off") -> np.ndarray | None:
    """Summed statistics of this process's batches (None if it got no rows)."""
    net = dist.unwrap_model(model)
    was_training = net.training
    net.eval()
    total = None
    for batch in batches:
        x = normalizer(batch["image"])
        with autocast_context(x.device.type, amp):
            out = net(x)
        s = batch_stats(task, out, batch[task.column])
        total = s if total is None else total + s
    net.train(was_training)
    return total


def _empty_stats(task: TargetTask) -> np.ndarray:
    rows = 5 if task.kind == "attributes" else 8
    return np.zeros((rows, task.outputs), np.int64 if task.kind == "attributes" else np.float64)


def fit(model: nn.Module, spec: LoopSpec, task: TargetTask, train_batches: Callable[[int], Iterable[dict]],
        test_batches: Callable[[int], Iterable[dict]], val_batches: Callable[[int], Iterable[dict]] | None = None,
        device: torch.device | str = "cpu", start_epoch: int = 0, history: list | None = None, optimizer=None,
        on_epoch: Callable[[dict, int, list], None] | None = None) -> dict:
    """Run the schedule (as FER's :func:`fra.evaluation.worker.fit`); history entries hold
    ``test_stats`` / ``val_stats`` (lists, summed over workers) on evaluated epochs."""
    normalizer = Normalizer(spec.mean, spec.std, device=device)
    optimizer = optimizer or make_optimizer(model, spec)
    scaler = torch.amp.GradScaler("cuda") if spec.amp == "fp16" else None
    history = list(history or [])
    before = state_dict_fingerprint(trunk_state(model))
    step = start_epoch * spec.iters_per_epoch
    for epoch in range(start_epoch, spec.epochs):
        batches = {"train": train_batches(epoch)}
        stats, step = train_epoch(model, batches["train"], optimizer, spec, task, normalizer, step, scaler)
        totals = dist.all_reduce_sum_host(torch.tensor(
            [stats["train_loss"] * stats["steps"], stats["steps"], stats["images"]], dtype=torch.float64))
        entry = {"epoch": epoch + 1, "train_loss": float(totals[0] / max(totals[1], 1)), "images": int(totals[2]),
                 "lr": optimizer.param_groups[0]["lr"], "train_images_per_s": stats["train_images_per_s"]}
        if is_evaluated_epoch(epoch + 1, spec.epochs, spec.eval_every, spec.last_k):
            t0 = time.perf_counter()
            for split, make in (("test", test_batches), ("val", val_batches)):
                if make is not None:
                    batches[split] = make(epoch)
                    local = evaluate(model, batches[split], task, normalizer, spec.amp)
                    local = _empty_stats(task) if local is None else local
                    entry[f"{split}_stats"] = dist.all_reduce_sum_host(torch.from_numpy(np.ascontiguousarray(local))).tolist()
            entry["eval_seconds"] = time.perf_counter() - t0
        end_epoch(entry, batches, epoch, history, on_epoch, task.kind)
    after = state_dict_fingerprint(trunk_state(model))
    unchanged = before == after
    if spec.protocol == "linear" and not unchanged:
        raise RuntimeError("linear probe changed the backbone (parameters or BN statistics)")
    return {"history": history, "backbone_unchanged": unchanged,
            "trunk_fingerprint": {"before": before, "after": after}}


def target_train_loop(config: dict) -> dict:
    """Ray Train per-worker function; returns (on rank 0) the history and the final weights."""
    import ray
    import ray.train
    import ray.train.torch

    from fra.data.stream import iter_batches

    spec, task = LoopSpec(**config["spec"]), TargetTask(**config["task"])
    rank, world, backbone = start_worker(config, "target-evaluation worker", spec.seed)
    model = build_model(spec.arch, task, backbone)
    if spec.sync_bn and spec.protocol == "finetune" and world > 1:
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    optimizer = make_optimizer(model, spec)
    model = ray.train.torch.prepare_model(model)
    start_epoch, history = resume_state(ray.train.get_checkpoint(), model, optimizer)
    per_worker = max(1, spec.batch_size // world)
    shard, _ = dataset_shards(spec.has_val, rank, start_epoch)
    score = config["score"]  # (module, function) giving the per-epoch metric reported to Ray

    def batches(name: str):
        buffer = 256 if name == "train" else 0
        return lambda epoch: iter_batches(shard[name], per_worker, epoch=epoch, seed=spec.seed, drop_last=False,
                                          local_shuffle_buffer=buffer)

    def on_epoch(entry: dict, epoch: int, hist: list) -> None:
        import importlib

        metrics = {k: v for k, v in entry.items() if not k.endswith("_stats")}
        for split in ("test", "val"):
            if f"{split}_stats" in entry:
                metrics[f"{split}_{score[1]}"] = getattr(importlib.import_module(score[0]), score[1])(entry[f"{split}_stats"])
        ckpt = None
        if spec.checkpoint_every and (epoch + 1) % spec.checkpoint_every == 0:
            ckpt = save_state(model, optimizer, epoch + 1, hist, rank)
        report_epoch(metrics, ckpt)

    result = fit(model, spec, task, batches("train"), batches("test"), batches("val") if spec.has_val else None,
                 device=ray.train.torch.get_device(), start_epoch=start_epoch, history=history, optimizer=optimizer,
                 on_epoch=on_epoch)
    if rank == 0:
        result["state_dict"] = {k: v.detach().cpu().numpy() for k, v in dist.unwrap_model(model).state_dict().items()}
    return result


def task_dict(task: TargetTask) -> dict:
    return asdict(task)


__all__ = ["TargetTask", "build_model", "task_loss", "batch_stats", "train_epoch", "evaluate", "fit",
           "target_train_loop", "task_dict"]
