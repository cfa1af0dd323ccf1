"""LARS with the reference's parameter groups (FRA_SPEC §7)."""
from __future__ import annotations

import torch
from torch import nn
from torch.optim import Optimizer

EXCLUDE_SUBSTRINGS = ("bn", "downsample.1", "bias")


def lars_param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Split trainable parameters into the adapted and the excluded group.

    NOTE: reference behaviour, by name substring: a parameter is excluded (no weight decay,
    no LARS adaptation) iff its name contains ``bn``, ``downsample.1`` or ``bias``. So MLP
    BatchNorm weights (``mlp.1.weight``), LayerNorm weights and ``query_embed`` *are*
    adapted and decayed.
    """
    adapted, excluded = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (excluded if any(s in name for s in EXCLUDE_SUBSTRINGS) else adapted).append(p)
    return [
        {"params": adapted, "weight_decay": weight_decay, "lars_exclude": False},
        {"params": excluded, "weight_decay": 0.0, "lars_exclude": True},
    ]


def _trust_ratios(params: list[torch.Tensor], grads: list[torch.Tensor], coef: float, wd: float,
                  eps: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-tensor ``coef·‖w‖ / (‖g‖ + wd·‖w‖ + eps)``, computed on the parameters' device.

    The arithmetic is float64 in the order the reference's Python floats use, so rounding the
    result to the parameter dtype gives the scalar a Python ``alpha`` would have been.

    Returns:
        (ratios, ‖w‖, ‖g‖), each (N,) float64 for the N tensors.
    """
    w = torch.stack(torch._foreach_norm(params)).double()
    g = torch.stack(torch._foreach_norm(grads)).double()
    return w * coef / (g + w * wd + eps), w, g


def _trust_scales(params, grads, coef: float, wd: float, eps: float):
    """LARS's per-tensor step sizes ``s = lr·local_lr`` and ``s·wd``, as 0-dim tensors (no host read)."""
    s = _trust_ratios(params, grads, coef, wd, eps)[0]
    dtype = params[0].dtype
    return s.to(dtype).unbind(), (s * wd).to(dtype).unbind()


class LARS(Optimizer):
    """Layer-wise adaptive rate scaling, as in the reference.

    Per tensor: ``local_lr = η‖w‖ / (‖g‖ + λ‖w‖ + 1e-8)`` (1 for excluded tensors),
    ``Δ = lr · local_lr · (g + λw)``, ``buf = Δ`` at the first step then ``μ·buf + Δ``,
    ``w ← w − buf``. The lr is folded in before the momentum buffer (unlike torch SGD).

    Unlike the reference, the norms come from one fused ``_foreach_norm`` per group, the trust
    ratios stay on the device (no ``.item()``/``.tolist()``: the step never waits for the GPU)
    and the update is accumulated in place in the momentum buffers with ``_foreach`` ops.
    """

    def __init__(self, params, lr: float, momentum: float = 0.9, weight_decay: float = 0.0,
                 eta: float = 0.001, lars_exclude: bool = False):
        defaults = dict(lr=lr, momentum=momentum, weight_decay=weight_decay, eta=eta,
                        lars_exclude=lars_exclude)
        super().__init__(params, defaults)

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            if not params:
                continue
            grads = [p.grad for p in params]
            lr, mu, wd = group["lr"], group["momentum"], group["weight_decay"]
            bufs = []
            for p in params:
                state = self.state[p]
                if "momentum_buffer" not in state:  # mu·0 + Δ = Δ: the first step sets buf = Δ
                    state["momentum_buffer"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                bufs.append(state["momentum_buffer"])
            torch._foreach_mul_(bufs, mu)
            if group["lars_exclude"]:
                torch._foreach_add_(bufs, grads, alpha=lr)
                if wd:
                    torch._foreach_add_(bufs, params, alpha=lr * wd)
            else:
                scale, scale_wd = _trust_scales(params, grads, lr * group["eta"], wd, 1e-8)
                # buf = mu*buf + s*g + s*wd*w, with s = lr·local_lr a 0-dim tensor per parameter.
                torch._foreach_addcmul_(bufs, grads, scale)
                if wd:
                    torch._foreach_addcmul_(bufs, params, scale_wd)
            torch._foreach_sub_(params, bufs)
        return loss


class LARC(torch.optim.SGD):
    """SGD wrapped in LARC without clipping: FRL's SwAV optimiser (FRL_SPEC §1.4, apex ``LARC``).

    Per tensor with non-zero weight and gradient norms, before the SGD step:
    ``g ← trust·‖w‖ / (‖g‖ + λ‖w‖ + 1e-8) · (g + λw)``; then plain torch SGD (momentum,
    no further weight decay: ``w ← w − lr·buf``, ``buf = μ·buf + g``). Every tensor is
    adapted (biases and BatchNorm included), as apex does. A tensor whose weight or gradient
    norm is zero is stepped with its raw gradient and no weight decay, again as apex. The
    trust ratios stay on the device, as in :class:`LARS`.
    """

    def __init__(self, params, lr: float, momentum: float = 0.9, weight_decay: float = 0.0,
                 trust_coefficient: float = 0.001, eps: float = 1e-8):
        super().__init__(params, lr=lr, momentum=momentum, weight_decay=0.0)
        for group in self.param_groups:
            group.setdefault("larc_weight_decay", weight_decay)
            group.setdefault("trust_coefficient", trust_coefficient)
            group.setdefault("larc_eps", eps)

    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            if not params:
                continue
            grads = [p.grad for p in params]
            wd, trust, eps = group["larc_weight_decay"], group["trust_coefficient"], group["larc_eps"]
            ratio, w, g = _trust_ratios(params, grads, trust, wd, eps)
            # apex leaves a tensor with a zero weight or gradient norm alone: factor 1, no decay.
            adapted = (w != 0) & (g != 0)
            dtype = params[0].dtype
            if wd:
                torch._foreach_addcmul_(grads, params, (adapted.double() * wd).to(dtype).unbind())
            torch._foreach_mul_(grads, torch.where(adapted, ratio, 1.0).to(dtype).unbind())
        return super().step(closure)
