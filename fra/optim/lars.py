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


class LARS(Optimizer):
    """Layer-wise adaptive rate scaling, as in the reference.

    Per tensor: ``local_lr = η‖w‖ / (‖g‖ + λ‖w‖ + 1e-8)`` (1 for excluded tensors),
    ``Δ = lr · local_lr · (g + λw)``, ``buf = Δ`` at the first step then ``μ·buf + Δ``,
    ``w ← w − buf``. The lr is folded in before the momentum buffer (unlike torch SGD).

    Unlike the reference, the norms come from one fused ``_foreach_norm`` per group (no
    per-tensor ``.item()`` sync) and the update is accumulated in place in the momentum buffer.
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
            if group["lars_exclude"]:
                scales = [lr] * len(params)
            else:
                # One fused norm per group, read back once (the reference syncs twice per tensor).
                w_norm = torch.stack(torch._foreach_norm(params)).tolist()
                g_norm = torch.stack(torch._foreach_norm(grads)).tolist()
                scales = [lr * group["eta"] * w / (g + wd * w + 1e-8) for w, g in zip(w_norm, g_norm)]
            for p, g, s in zip(params, grads, scales):
                # buf = mu*buf + s*(g + wd*w), built in place in the momentum buffer.
                state = self.state[p]
                buf = state.get("momentum_buffer")
                if buf is None:
                    state["momentum_buffer"] = buf = torch.mul(g, s)
                else:
                    buf.mul_(mu).add_(g, alpha=s)
                if wd:
                    buf.add_(p, alpha=s * wd)
                p.sub_(buf)
        return loss


class LARC(torch.optim.SGD):
    """SGD wrapped in LARC without clipping: FRL's SwAV optimiser (FRL_SPEC §1.4, apex ``LARC``).

    Per tensor with non-zero weight and gradient norms, before the SGD step:
    ``g ← trust·‖w‖ / (‖g‖ + λ‖w‖ + 1e-8) · (g + λw)``; then plain torch SGD (momentum,
    no further weight decay: ``w ← w − lr·buf``, ``buf = μ·buf + g``). Every tensor is
    adapted (biases and BatchNorm included), as apex does. A tensor whose weight or gradient
    norm is zero is stepped with its raw gradient and no weight decay, again as apex.
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
            w_norm = torch.stack(torch._foreach_norm(params)).tolist()
            g_norm = torch.stack(torch._foreach_norm(grads)).tolist()
            for p, g, w, gn in zip(params, grads, w_norm, g_norm):
                if w == 0 or gn == 0:
                    continue
                if wd:
                    g.add_(p, alpha=wd)
                g.mul_(trust * w / (gn + w * wd + eps))
        return super().step(closure)
