"""The plain training loop: one step, one epoch, over any iterable of two-view batches.

No Ray here: the Ray Train layer, the demo and the tests all call these functions. Step
order per iteration is the reference's (FRA_SPEC §7): set lr → forward → loss → zero_grad →
backward → optimizer step → target EMA with the momentum of the current step.
"""
from __future__ import annotations

import contextlib
import logging
import time
from dataclasses import dataclass, field
from typing import Callable, Iterable

import torch
from torch import nn

from fra.config import ModelConfig, OptimConfig, effective_lr
from fra.nonfinite import FiniteCheck, NonFiniteLossError, check_finite  # noqa: F401 (re-exported)
from fra.optim.schedules import ema_momentum, pretrain_lr, swav_lr

log = logging.getLogger(__name__)

VGGFACE2_MEAN = (0.5231, 0.4044, 0.3489)
VGGFACE2_STD = (0.2536, 0.2194, 0.2070)


class Normalizer:
    """uint8 (B, 3, H, W) views -> normalised float on the training device.

    Views travel as uint8 (4× less traffic); normalisation runs on the trainer, on the GPU
    when there is one.
    """

    def __init__(self, mean=VGGFACE2_MEAN, std=VGGFACE2_STD, device: str | torch.device = "cpu",
                 dtype: torch.dtype = torch.float32):
        self.device, self.dtype = torch.device(device), dtype
        self.scale = (1.0 / (255.0 * torch.tensor(std, dtype=dtype, device=self.device))).view(1, 3, 1, 1)
        self.shift = (torch.tensor(mean, dtype=dtype, device=self.device) / torch.tensor(std, dtype=dtype, device=self.device)).view(1, 3, 1, 1)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        x = x.to(self.device, non_blocking=True)
        if x.dtype == torch.uint8:
            return x.to(self.dtype) * self.scale - self.shift
        return x.to(self.dtype)


@dataclass
class Schedule:
    """LR and EMA momentum as pure functions of the global step."""

    base_lr: float
    iters_per_epoch: int
    epochs: int
    warmup_epochs: int
    base_momentum: float = 0.996
    cosine_per_step: bool = False
    kind: str = "fra"  # fra | swav (OptimConfig.schedule)
    start_warmup: float = 0.0
    final_lr: float = 0.0

    @classmethod
    def from_config(cls, optim: OptimConfig, model: ModelConfig, iters_per_epoch: int) -> Schedule:
        return cls(effective_lr(optim), max(1, iters_per_epoch), optim.epochs, optim.warmup_epochs,
                   model.base_momentum, optim.cosine_per_step, optim.schedule, optim.start_warmup, optim.final_lr)

    @property
    def total_steps(self) -> int:
        return self.iters_per_epoch * self.epochs

    def lr(self, step: int) -> float:
        if self.kind == "swav":
            return swav_lr(step, self.iters_per_epoch, self.base_lr, self.epochs, self.warmup_epochs,
                           self.start_warmup, self.final_lr)
        return pretrain_lr(step, self.iters_per_epoch, self.base_lr, self.epochs, self.warmup_epochs,
                           self.cosine_per_step)

    def momentum(self, step: int) -> float:
        return ema_momentum(step, self.total_steps, self.base_momentum)


@dataclass
class TrainState:
    """Where the loop is; saved in checkpoints so a resume continues exactly."""

    step: int = 0
    epoch: int = 0
    history: list[dict] = field(default_factory=list)

    def end_epoch(self, iters_per_epoch: int) -> None:
        """Move to the next epoch once this one's steps are done (a run stopped mid-epoch stays in it)."""
        if self.step >= (self.epoch + 1) * iters_per_epoch:
            self.epoch += 1


def autocast_context(device_type: str, amp: str):
    """``amp`` in {off, fp16, bf16} -> an autocast context (fp16 only makes sense on CUDA)."""
    if amp == "off":
        return contextlib.nullcontext()
    dtype = torch.float16 if amp == "fp16" else torch.bfloat16
    return torch.autocast(device_type=device_type, dtype=dtype)


def train_step(model, loss_fn: nn.Module, optimizer: torch.optim.Optimizer, *views: torch.Tensor,
               step: int, lr: float, momentum: float, online: nn.Module | None = None,
               scaler: torch.amp.GradScaler | None = None, amp: str = "off", grad_clip: float = 0.0,
               check: bool = True) -> dict[str, torch.Tensor]:
    """One optimisation step on a batch of (normalised) views.

    The model is any method (FRA, BYOL, SwAV) with ``forward(*views, online=None)`` and the
    explicit state hooks ``after_forward(out)`` (buffer EMAs), ``after_backward(step)``
    (e.g. freezing prototypes) and ``after_step(step, momentum)`` (target EMA,
    re-normalisation).

    Args:
        model: the bare model (never DDP-wrapped).
        views: two or more view batches (B, 3, H, W).
        online: optional DDP-wrapped view of the model's trainable part.
        scaler: a GradScaler for fp16 AMP (None otherwise).
        check: raise :class:`NonFiniteLossError` before the weights are touched if a loss is
            non-finite (a host read); the epoch loop passes False and checks with a
            :class:`~fra.nonfinite.FiniteCheck` every few steps instead.
    Returns:
        detached loss components.
    """
    for group in optimizer.param_groups:
        group["lr"] = lr
    with autocast_context(views[0].device.type, amp):
        out = model(*views, online=online)
        losses = loss_fn(out)
    if check:
        check_finite(losses, step)
    model.after_forward(out)
    optimizer.zero_grad(set_to_none=True)
    params = [p for g in optimizer.param_groups for p in g["params"]]
    if scaler is not None:
        scaler.scale(losses["loss"]).backward()
        scaler.unscale_(optimizer)
    else:
        losses["loss"].backward()
    model.after_backward(step)
    if grad_clip > 0:
        torch.nn.utils.clip_grad_norm_(params, grad_clip)
    if scaler is not None:
        scaler.step(optimizer)
        scaler.update()
    else:
        optimizer.step()
    # NOTE: the reference runs the EMA every iteration, even when AMP skipped the step.
    model.after_step(step, momentum)
    return {k: v.detach() for k, v in losses.items()}


def batch_views(batch: dict, normalizer: Normalizer) -> list[torch.Tensor]:
    """``view1``, ``view2`` and any extra multi-crop views of a batch, normalised.

    Extra views come from a ``crops`` list, or from columns ``crop1`` ... ``cropN`` (the
    multi-crop stream of :func:`fra.data.stream.pretrain_dataset`), in order.
    """
    views = [normalizer(batch["view1"]), normalizer(batch["view2"])]
    views += [normalizer(c) for c in batch.get("crops", ())]
    i = 1
    while f"crop{i}" in batch:
        views.append(normalizer(batch[f"crop{i}"]))
        i += 1
    return views


def train_one_epoch(model, loss_fn: nn.Module, optimizer: torch.optim.Optimizer, batches: Iterable[dict],
                    schedule: Schedule, state: TrainState, normalizer: Normalizer, *,
                    online: nn.Module | None = None, scaler=None, amp: str = "off", grad_clip: float = 0.0,
                    log_every: int = 10, max_steps: int = 0, finite: FiniteCheck | None = None,
                    on_log: Callable[[dict], None] | None = None,
                    on_step: Callable[[TrainState], None] | None = None) -> dict[str, float]:
    """Run one epoch (or until ``max_steps`` global steps) and return its mean metrics.

    Every ``log_every`` steps ``on_log`` receives the loss components, lr, EMA momentum,
    images/s and the fraction of time spent waiting for data. ``on_step`` runs after every
    step (checkpointing hooks).

    The step never reads a device value back: the losses are summed on the device and read
    at log steps and at the epoch's end, and non-finite losses are flagged on the device and
    checked by ``finite`` (:class:`~fra.nonfinite.FiniteCheck`: every ``finite.every`` steps,
    at log steps and at the epoch's end; a checkpoint hook must call ``finite.check()`` before
    it writes). Without ``finite`` a fresh one checks at log steps and the epoch's end.
    """
    model.train()
    model.set_epoch(state.epoch)
    finite = finite if finite is not None else FiniteCheck()
    keys: tuple[str, ...] = ()
    sums: torch.Tensor | None = None  # (C,) float64 on the device
    n = 0
    images = 0
    wait = 0.0
    t_start = t_last = time.perf_counter()
    win_images, win_wait = 0, 0.0
    it = iter(batches)
    while True:
        if max_steps and state.step >= max_steps:
            break
        t0 = time.perf_counter()
        try:
            batch = next(it)
        except StopIteration:
            break
        dt = time.perf_counter() - t0
        wait += dt
        win_wait += dt
        views = batch_views(batch, normalizer)
        lr, m = schedule.lr(state.step), schedule.momentum(state.step)
        losses = train_step(model, loss_fn, optimizer, *views, step=state.step, lr=lr, momentum=m,
                            online=online, scaler=scaler, amp=amp, grad_clip=grad_clip, check=False)
        keys = tuple(losses)
        values = torch.stack([v.float() for v in losses.values()])
        finite.record(keys, values, state.step)
        sums = values.double() if sums is None else sums.add_(values)
        state.step += 1
        n += 1
        images += views[0].shape[0]
        win_images += views[0].shape[0]
        logging_step = bool(log_every) and state.step % log_every == 0
        if logging_step or finite.due(state.step):
            finite.check()
        if on_step is not None:
            on_step(state)
        if logging_step:
            now = time.perf_counter()
            metrics = dict(zip(keys, values.tolist()))
            metrics.update(step=state.step, epoch=state.epoch, lr=lr, momentum=m,
                           images_per_s=win_images / max(now - t_last, 1e-9),
                           data_wait_frac=win_wait / max(now - t_last, 1e-9))
            t_last, win_images, win_wait = now, 0, 0.0
            if on_log is not None:
                on_log(metrics)
    finite.check()
    elapsed = time.perf_counter() - t_start
    out = {k: v / max(n, 1) for k, v in zip(keys, sums.tolist() if sums is not None else [])}
    out.update(steps=n, images=images, images_per_s=images / max(elapsed, 1e-9),
               data_wait_frac=wait / max(elapsed, 1e-9), epoch=state.epoch)
    if "diag/cluster_over_lnk" in out:  # FRA: where the cluster self-distillation stands (issue 18)
        log.info("epoch %d region diagnostics: cluster loss / ln K %.4f, dots spread over K %.5f, "
                 "mask-embedding cosine %.4f", state.epoch + 1, out["diag/cluster_over_lnk"],
                 out["diag/dots_spread"], out["diag/mask_cos"])
    return out
