"""Schedules as pure functions of the step (FRA_SPEC §4, §7, §9)."""
from __future__ import annotations

import math


def pretrain_lr(step: int, iters_per_epoch: int, base_lr: float, epochs: int, warmup_epochs: int,
                cosine_per_step: bool = False) -> float:
    """Reference pretraining LR: linear warm-up per step, then cosine.

    Warm-up (epoch < warmup): ``lr·(step + 1)/(warmup·I)``. Afterwards
    ``lr·½(1 + cos(π(e − warmup)/(epochs − warmup)))`` with e the integer epoch.

    NOTE: the reference steps the cosine once per *epoch* (never reaching 0);
    ``cosine_per_step`` uses the fractional epoch instead.
    """
    epoch, i = divmod(step, iters_per_epoch)
    if epoch < warmup_epochs:
        return base_lr * (epoch * iters_per_epoch + i + 1) / (warmup_epochs * iters_per_epoch)
    if epochs <= warmup_epochs:
        return base_lr
    e = step / iters_per_epoch if cosine_per_step else epoch
    return base_lr * 0.5 * (1 + math.cos(math.pi * (e - warmup_epochs) / (epochs - warmup_epochs)))


def swav_lr(step: int, iters_per_epoch: int, base_lr: float, epochs: int, warmup_epochs: int,
            start_warmup: float = 0.0, final_lr: float = 0.0) -> float:
    """FRL / SwAV pretraining LR (FRL_SPEC §1.4), per iteration.

    Warm-up: ``linspace(start_warmup, base_lr, W)[step]`` with ``W = warmup·I`` steps; then
    ``final + ½(base − final)(1 + cos(π·t/(T − W)))`` with ``t = step − W`` and ``T = epochs·I``.
    """
    warm = warmup_epochs * iters_per_epoch
    if step < warm:
        return start_warmup + (base_lr - start_warmup) * (step / (warm - 1) if warm > 1 else 1.0)
    rest = epochs * iters_per_epoch - warm
    if rest <= 0:
        return base_lr
    t = min(step - warm, rest)
    return final_lr + 0.5 * (base_lr - final_lr) * (1 + math.cos(math.pi * t / rest))


def warmup_cosine_lr(step: int, iters_per_epoch: int, base_lr: float, epochs: int, warmup_epochs: float,
                     min_lr: float = 1e-6) -> float:
    """FER schedule (main_fer, §9): per-iteration linear warm-up from 0, then cosine to min_lr."""
    e = step / iters_per_epoch
    if e < warmup_epochs:
        return base_lr * e / warmup_epochs
    if epochs <= warmup_epochs:
        return base_lr
    return min_lr + (base_lr - min_lr) * 0.5 * (1 + math.cos(math.pi * (e - warmup_epochs) / (epochs - warmup_epochs)))


def ema_momentum(step: int, max_steps: int, base: float = 0.996) -> float:
    """``1 − (1 − m0)·(cos(π·step/max) + 1)/2``: m0 at step 0, → 1 at the end."""
    if max_steps <= 0:
        return base
    return 1 - (1 - base) * (math.cos(math.pi * step / max_steps) + 1) / 2
