"""The FER fine-tune / linear-probe loop (FRA_SPEC §9): pure-torch steps plus the Ray Train wiring.

:func:`fit` runs the whole schedule over any iterables of ``{"image": uint8 (B, 3, S, S),
"label": int64 (B,)}`` batches and imports no Ray, so tests and benchmarks drive it directly.
:func:`fer_train_loop` is the Ray Train ``train_loop_per_worker``: it only wires config →
model → ``prepare_model`` → dataset shards → :func:`fit` → ``report``.

Evaluation produces a confusion matrix per worker; the matrices are summed over workers, so a
sharded test set gives exactly the single-process numbers.

Epoch starts. Every epoch of a Ray Data stream is one execution (read tasks, decode + augment
tasks, a pipeline that must fill before the first batch arrives). :class:`NextEpochPrefetch`
requests the next epoch's first batch in a background thread as soon as an epoch's training
batches are exhausted, so that start-up overlaps the evaluation instead of stalling the first
step of the next epoch. The batches and their order are those of the plain per-epoch stream.
"""
from __future__ import annotations

import logging
import math
import os
import threading
import time
from dataclasses import dataclass
from typing import Callable, Iterable, Iterator

import torch
from torch import nn

from fra import dist
from fra.checkpoint import build_torchvision_resnet, load_backbone_into
from fra.engine import Normalizer, autocast_context
from fra.evaluation.backbones import state_dict_fingerprint
from fra.evaluation.metrics import is_evaluated_epoch
from fra.optim.schedules import warmup_cosine_lr

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class LoopSpec:
    """Everything a worker needs, as resolved plain values (see ``fer.loop_spec``)."""

    protocol: str  # finetune | linear
    arch: str
    num_classes: int
    optimizer: str  # adamw | sgd
    lr: float  # trunk (fine-tune) or head (linear) base lr
    lr_head: float
    weight_decay: float
    momentum: float
    epochs: int
    warmup_epochs: float
    min_lr: float
    batch_size: int  # global
    iters_per_epoch: int
    label_smoothing: float = 0.0
    amp: str = "off"
    sync_bn: bool = False
    eval_every: int = 1
    last_k: int = 1  # the last last_k epochs are evaluated too (the headline mean)
    seed: int = 0
    mean: tuple[float, float, float] = (0.5231, 0.4044, 0.3489)
    std: tuple[float, float, float] = (0.2536, 0.2194, 0.2070)
    checkpoint_every: int = 0
    has_val: bool = False


def build_classifier(arch: str, num_classes: int, backbone_sd: dict[str, torch.Tensor] | None) -> nn.Module:
    """torchvision ResNet with the given trunk weights and a fresh head, N(0, 0.01) / 0 (main_fer)."""
    model = build_torchvision_resnet(arch, num_classes)
    if backbone_sd is not None:
        load_backbone_into(model, backbone_sd, f"{arch} backbone")
    nn.init.normal_(model.fc.weight, mean=0.0, std=0.01)
    nn.init.zeros_(model.fc.bias)
    return model


def trunk_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """All backbone tensors (parameters and BN buffers), i.e. the state dict minus ``fc``."""
    return {k: v for k, v in dist.unwrap_model(model).state_dict().items() if not k.startswith("fc.")}


def make_optimizer(model: nn.Module, spec: LoopSpec) -> torch.optim.Optimizer:
    """Fine-tune: trunk and head groups, weight decay on every tensor (BN and biases too, like the
    reference). Linear: the trunk is frozen and only ``fc`` is optimised."""
    head = [p for n, p in model.named_parameters() if n.startswith("fc.")]
    trunk = [p for n, p in model.named_parameters() if not n.startswith("fc.")]
    if spec.protocol == "linear":
        for p in trunk:
            p.requires_grad_(False)
        groups = [{"params": head, "base_lr": spec.lr_head}]
    else:
        groups = [{"params": trunk, "base_lr": spec.lr}, {"params": head, "base_lr": spec.lr_head}]
    if spec.optimizer == "adamw":
        return torch.optim.AdamW(groups, lr=spec.lr, betas=(0.9, 0.999), eps=1e-8, weight_decay=spec.weight_decay)
    return torch.optim.SGD(groups, lr=spec.lr, momentum=spec.momentum, weight_decay=spec.weight_decay)


def set_lr(optimizer: torch.optim.Optimizer, step: int, spec: LoopSpec) -> float:
    """Per-iteration warm-up + cosine for every group from its own base lr; returns the trunk lr."""
    step = min(step, spec.epochs * spec.iters_per_epoch)  # never past the end of the cosine
    for group in optimizer.param_groups:
        group["lr"] = warmup_cosine_lr(step, spec.iters_per_epoch, group["base_lr"], spec.epochs,
                                       spec.warmup_epochs, spec.min_lr)
    return optimizer.param_groups[0]["lr"]


def train_epoch(model: nn.Module, batches: Iterable[dict], optimizer, spec: LoopSpec, normalizer: Normalizer,
                step: int, scaler=None) -> tuple[dict, int]:
    """One epoch; returns (mean loss / steps / images, the next global step)."""
    model.train(spec.protocol == "finetune")  # linear probe: BN statistics stay frozen
    criterion = nn.CrossEntropyLoss(label_smoothing=spec.label_smoothing)
    loss_sum, steps, images, t0 = torch.zeros(()), 0, 0, time.perf_counter()
    for batch in batches:
        x = normalizer(batch["image"])
        y = batch["label"].to(x.device, torch.int64)
        if spec.protocol == "finetune" and x.shape[0] < 2:
            continue  # train-mode BN cannot take one sample; equal shards make every rank skip it
        set_lr(optimizer, step, spec)
        with autocast_context(x.device.type, spec.amp):
            loss = criterion(model(x), y)
        backward_step(loss, optimizer, scaler)
        loss_sum += loss.detach().float().cpu()
        steps, images, step = steps + 1, images + x.shape[0], step + 1
    elapsed = time.perf_counter() - t0
    return {"train_loss": float(loss_sum) / max(steps, 1), "steps": steps, "images": images,
            "train_images_per_s": images / max(elapsed, 1e-9)}, step


def end_epoch(entry: dict, batches: dict, epoch: int, history: list, on_epoch, what: str) -> None:
    """Close an epoch of a downstream loop: the corrupt images every split's stream skipped, summed
    over ranks (every rank read the same splits this epoch, so the collective stays in step), a
    diverged loss refused, the entry appended and handed to ``on_epoch``."""
    skipped = dist.all_reduce_sum_host(torch.tensor([skipped_corrupt(b) for b in batches.values()], dtype=torch.int64))
    entry.update({f"skipped_corrupt_{split}": int(n) for split, n in zip(batches, skipped.tolist())})
    if not math.isfinite(entry["train_loss"]):
        raise FloatingPointError(f"{what} training diverged: loss {entry['train_loss']} at epoch {epoch + 1}")
    history.append(entry)
    if on_epoch is not None:
        on_epoch(entry, epoch, history)


def backward_step(loss: torch.Tensor, optimizer, scaler) -> None:
    """One optimiser step on ``loss`` (through the fp16 grad scaler when there is one)."""
    optimizer.zero_grad(set_to_none=True)
    if scaler is not None:
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
    else:
        loss.backward()
        optimizer.step()


@torch.no_grad()
def evaluate(model: nn.Module, batches: Iterable[dict], num_classes: int, normalizer: Normalizer,
             amp: str = "off") -> torch.Tensor:
    """Confusion matrix (C, C) int64 of this process's batches (rows true, columns predicted)."""
    model = dist.unwrap_model(model)
    was_training = model.training
    model.eval()
    conf = torch.zeros(num_classes * num_classes, dtype=torch.int64)
    for batch in batches:
        x = normalizer(batch["image"])
        with autocast_context(x.device.type, amp):
            pred = model(x).argmax(dim=1).cpu()
        conf += torch.bincount(batch["label"].to(torch.int64) * num_classes + pred, minlength=num_classes ** 2)
    model.train(was_training)
    return conf.view(num_classes, num_classes)


def skipped_corrupt(batches: Iterable[dict]) -> int:
    """Corrupt images dropped from a pass over ``batches`` (a :class:`fra.data.stream.BatchStream`
    counts them; other iterables drop none)."""
    return int(getattr(batches, "skipped_corrupt", 0))


class _EpochStream:
    """One epoch's batches, optionally with the first batch requested ahead in a thread.

    Iterate it once. ``skipped_corrupt`` is the wrapped stream's count (0 for plain iterables);
    ``on_end`` runs when the batches are exhausted (not when the consumer stops early).
    """

    def __init__(self, stream: Iterable[dict], on_end: Callable[[], None] | None = None, ahead: bool = False):
        self.stream, self.on_end = stream, on_end
        self._iter: Iterator[dict] = iter(stream)
        self._head: list[dict] = []
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._pull, daemon=True, name="fer-next-epoch") if ahead else None
        if self._thread is not None:
            self._thread.start()

    def _pull(self) -> None:
        try:
            self._head.append(next(self._iter))
        except StopIteration:
            pass
        except BaseException as exc:  # re-raised in the consumer's thread
            self._error = exc

    @property
    def skipped_corrupt(self) -> int:
        return int(getattr(self.stream, "skipped_corrupt", 0))

    def __iter__(self) -> Iterator[dict]:
        if self._thread is not None:
            self._thread.join()
            if self._error is not None:
                raise self._error
        yield from self._head
        self._head = []
        yield from self._iter
        if self.on_end is not None:
            self.on_end()


class NextEpochPrefetch:
    """``epoch -> batches`` for :func:`fit` that starts epoch ``e + 1``'s stream (its first batch,
    in a daemon thread) when epoch ``e``'s batches run out: the data pipeline's start-up then
    overlaps the evaluation (module docstring). ``make(epoch)`` builds an epoch's stream; it is
    called once per epoch, in epoch order, with the same arguments as without prefetching, so
    the batches are the same. No epoch at or beyond ``epochs`` is started.
    """

    def __init__(self, make: Callable[[int], Iterable[dict]], epochs: int):
        self.make, self.epochs = make, int(epochs)
        self._ready: dict[int, _EpochStream] = {}
        self._lock = threading.Lock()

    def _start(self, epoch: int) -> None:
        if epoch < self.epochs:
            with self._lock:
                if epoch not in self._ready:
                    self._ready[epoch] = self._stream(epoch, ahead=True)

    def _stream(self, epoch: int, ahead: bool) -> _EpochStream:
        return _EpochStream(self.make(epoch), on_end=lambda: self._start(epoch + 1), ahead=ahead)

    def __call__(self, epoch: int) -> _EpochStream:
        with self._lock:
            stream = self._ready.pop(epoch, None)
            for stale in [e for e in self._ready if e < epoch]:  # never consumed (cannot happen in fit)
                del self._ready[stale]
        return stream if stream is not None else self._stream(epoch, ahead=False)


def fit(model: nn.Module, spec: LoopSpec, train_batches: Callable[[int], Iterable[dict]],
        test_batches: Callable[[int], Iterable[dict]], val_batches: Callable[[int], Iterable[dict]] | None = None,
        device: torch.device | str = "cpu", start_epoch: int = 0, history: list | None = None,
        optimizer=None, on_epoch: Callable[[dict, int, list], None] | None = None) -> dict:
    """Run the schedule; ``*_batches(epoch)`` return this worker's batches for that epoch.

    Returns:
        ``{"history": [...], "backbone_unchanged": bool | None, "trunk_fingerprint": {...}}``.
        Each history entry holds epoch, train_loss, lr, ``skipped_corrupt_train`` and, on
        evaluated epochs, ``test_confusion`` (and ``val_confusion``) and
        ``skipped_corrupt_test`` (``_val``), all summed over workers.
    """
    normalizer = Normalizer(spec.mean, spec.std, device=device)
    optimizer = optimizer or make_optimizer(model, spec)
    scaler = torch.amp.GradScaler("cuda") if spec.amp == "fp16" else None
    history = list(history or [])
    before = state_dict_fingerprint(trunk_state(model))
    step = start_epoch * spec.iters_per_epoch
    for epoch in range(start_epoch, spec.epochs):
        batches = {"train": train_batches(epoch)}
        stats, step = train_epoch(model, batches["train"], optimizer, spec, normalizer, step, scaler)
        totals = dist.all_reduce_sum_host(torch.tensor(
            [stats["train_loss"] * stats["steps"], stats["steps"], stats["images"]], dtype=torch.float64))
        entry = {"epoch": epoch + 1, "train_loss": float(totals[0] / max(totals[1], 1)), "images": int(totals[2]),
                 "lr": optimizer.param_groups[0]["lr"], "train_images_per_s": stats["train_images_per_s"]}
        if is_evaluated_epoch(epoch + 1, spec.epochs, spec.eval_every, spec.last_k):
            t0 = time.perf_counter()
            for split, make in (("test", test_batches), ("val", val_batches)):
                if make is not None:
                    batches[split] = make(epoch)
                    conf = evaluate(model, batches[split], spec.num_classes, normalizer, spec.amp)
                    entry[f"{split}_confusion"] = dist.all_reduce_sum_host(conf).tolist()
            entry["eval_seconds"] = time.perf_counter() - t0
        end_epoch(entry, batches, epoch, history, on_epoch, "FER")
    after = state_dict_fingerprint(trunk_state(model))
    unchanged = before == after
    if spec.protocol == "linear" and not unchanged:
        # The reference's sanity_check: a linear probe must not touch the backbone (incl. BN stats).
        raise RuntimeError("linear probe changed the backbone (parameters or BN statistics)")
    return {"history": history, "backbone_unchanged": unchanged,
            "trunk_fingerprint": {"before": before, "after": after}}


CKPT_PREFIX = "fer_ckpt_"


def remove_orphaned_checkpoint_dirs() -> list[str]:
    """Remove the local checkpoint folders (``fer_ckpt_<pid>_*`` in the temp folder) of worker
    processes that are gone. :func:`report_epoch` removes a folder once it is reported; a worker
    killed in between (a lost node's sibling, a failure injection, a stopped job) left it behind,
    ~130 MB for ResNet-50 per kill. Folders of live processes are kept. Returns the removed paths."""
    import glob
    import shutil
    import tempfile

    removed = []
    for path in glob.glob(os.path.join(tempfile.gettempdir(), f"{CKPT_PREFIX}*_*")):
        pid = os.path.basename(path)[len(CKPT_PREFIX):].split("_", 1)[0]
        if not pid.isdigit() or int(pid) == os.getpid():
            continue
        try:
            os.kill(int(pid), 0)  # alive: keep
        except ProcessLookupError:
            shutil.rmtree(path, ignore_errors=True)
            removed.append(path)
        except PermissionError:  # alive, another user's: keep
            pass
    if removed:
        log.info("removed %d checkpoint folder(s) left by ended workers: %s", len(removed), removed[:3])
    return removed


def save_state(model: nn.Module, optimizer, epoch: int, history: list, rank: int):
    """A Ray checkpoint of the loop (rank 0 writes, the others return None)."""
    import tempfile

    from ray.train import Checkpoint

    if rank != 0:
        return None
    remove_orphaned_checkpoint_dirs()
    tmp = tempfile.mkdtemp(prefix=f"{CKPT_PREFIX}{os.getpid()}_")
    torch.save({"model": dist.unwrap_model(model).state_dict(), "optimizer": optimizer.state_dict(),
                "epoch": epoch, "history": history}, f"{tmp}/state.pt")
    return Checkpoint.from_directory(tmp)


def report_epoch(metrics: dict, checkpoint) -> None:
    """``ray.train.report`` an epoch, then remove the checkpoint's local folder: a synchronous report
    has copied it to storage, and Train's local mode (``num_workers: 0``) only keeps the object,
    which nothing resumes from. Without this every epoch left its ~130 MB ``state.pt`` in /tmp."""
    import shutil

    import ray.train

    try:
        ray.train.report(metrics, checkpoint=checkpoint)
    finally:
        if checkpoint is not None:
            shutil.rmtree(checkpoint.path, ignore_errors=True)


def resume_state(checkpoint, model: nn.Module, optimizer) -> tuple[int, list]:
    """Restore model/optimizer from a Ray checkpoint; returns (start epoch, history)."""
    if checkpoint is None:
        return 0, []
    with checkpoint.as_directory() as d:
        state = torch.load(f"{d}/state.pt", map_location="cpu", weights_only=True)
    dist.unwrap_model(model).load_state_dict(state["model"])
    optimizer.load_state_dict(state["optimizer"])
    log.info("resuming the evaluation run at epoch %d", state["epoch"])
    return int(state["epoch"]), list(state["history"])


def dataset_shards(has_val: bool, rank: int, start_epoch: int) -> tuple[dict, int | None]:
    """This worker's Ray Train shards of ``train``, ``test`` (and ``val``), and the epoch the training
    stream starts at (rank 0 reads it, :func:`fra.data.stream.check_stream_epoch`, which warns unless it
    is ``start_epoch``, the epoch the loop resumes in; ``None`` on other ranks)."""
    import ray.train

    from fra.data.stream import check_stream_epoch

    shard = {n: ray.train.get_dataset_shard(n) for n in ["train", "test"] + (["val"] if has_val else [])}
    return shard, check_stream_epoch(shard["train"], start_epoch) if rank == 0 else None


def start_worker(config: dict, where: str, seed: int) -> tuple[int, int, dict]:
    """A Train worker's first steps: check it runs the driver's code, seed torch so every rank
    builds the same head (DDP also broadcasts rank 0's), fetch the backbone weights.

    Returns:
        ``(rank, world size, backbone state dict)``.
    """
    import ray
    import ray.train

    from fra.ray_runtime import check_worker_code

    check_worker_code(config.get("code"), where)
    ctx = ray.train.get_context()
    torch.manual_seed(seed)
    backbone = config["backbone"]
    backbone = ray.get(backbone) if isinstance(backbone, ray.ObjectRef) else backbone
    return ctx.get_world_rank(), ctx.get_world_size(), backbone


def fer_train_loop(config: dict) -> dict:
    """Ray Train per-worker function; returns (on rank 0) history + the final classifier weights."""
    import ray
    import ray.train
    import ray.train.torch

    from fra.data.stream import iter_batches

    from fra.console import report_progress

    spec = LoopSpec(**config["spec"])
    rank, world, backbone = start_worker(config, "FER worker", spec.seed)
    model = build_classifier(spec.arch, spec.num_classes, backbone)
    if spec.sync_bn and spec.protocol == "finetune" and world > 1:
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)  # before DDP; GPU only (RAY_NOTES §3)
    optimizer = make_optimizer(model, spec)
    model = ray.train.torch.prepare_model(model)
    start_epoch, history = resume_state(ray.train.get_checkpoint(), model, optimizer)
    per_worker = max(1, spec.batch_size // world)
    shard, _ = dataset_shards(spec.has_val, rank, start_epoch)

    def batches(name: str):
        buffer = 256 if name == "train" else 0  # evaluation order does not matter: no shuffle buffer
        make = lambda epoch: iter_batches(shard[name], per_worker, epoch=epoch, seed=spec.seed,  # noqa: E731
                                          drop_last=False, local_shuffle_buffer=buffer)
        # the next training epoch's execution starts while this one is evaluated (module docstring)
        return NextEpochPrefetch(make, spec.epochs) if name == "train" else make

    def on_epoch(entry: dict, epoch: int, hist: list) -> None:
        metrics = {k: v for k, v in entry.items() if not k.endswith("_confusion")}
        for split in ("test", "val"):
            if f"{split}_confusion" in entry:
                conf = torch.tensor(entry[f"{split}_confusion"])
                metrics[f"{split}_top1"] = float(100.0 * conf.trace() / max(int(conf.sum()), 1))
        ckpt = None
        if spec.checkpoint_every and (epoch + 1) % spec.checkpoint_every == 0:
            ckpt = save_state(model, optimizer, epoch + 1, hist, rank)
        report_epoch(metrics, ckpt)
        if rank == 0:
            report_progress("evaluate", int(entry.get("epoch", epoch + 1)), spec.epochs, "epoch",
                            loss=metrics.get("train_loss", float("nan")), top1=metrics.get("test_top1", float("nan")),
                            images_per_s=metrics.get("train_images_per_s", float("nan")))

    result = fit(model, spec, batches("train"), batches("test"), batches("val") if spec.has_val else None,
                 device=ray.train.torch.get_device(), start_epoch=start_epoch, history=history,
                 optimizer=optimizer, on_epoch=on_epoch)
    if rank == 0:
        # Ray refuses torch tensors in a return value: ship numpy, the driver converts back.
        result["state_dict"] = {k: v.detach().cpu().numpy() for k, v in dist.unwrap_model(model).state_dict().items()}
    return result
