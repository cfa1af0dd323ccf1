"""SwAV swapped-prediction loss with distributed Sinkhorn-Knopp codes (FRL_SPEC §1.2).

"We predict the code of a view from the representation of another view": for each assigned
crop s (the two global crops), codes q_s = Sinkhorn(exp(scores_s / ε)) over the global batch
(and the queue, if any); the loss is the cross-entropy between q_s and
softmax(scores_t / τ) of every other crop t, averaged over the other crops and over s.
"""
from __future__ import annotations

import logging
import math
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from fra import dist

log = logging.getLogger(__name__)


def _replace_infs(x: torch.Tensor) -> torch.Tensor:
    """Replace infinities by the largest finite value (the reference's ``shoot_infs``).

    Always computed, never tested with ``inf.any()`` first: that read would stall the step.
    """
    inf = torch.isinf(x)
    return torch.where(inf, x.masked_fill(inf, 0).max(), x)


@torch.no_grad()
def swav_sinkhorn(scores: torch.Tensor, epsilon: float = 0.05, iters: int = 3) -> torch.Tensor:
    """Equipartitioned soft codes from prototype scores, over the global batch.

    Q = exp(scores / ε)ᵀ (K × R) is scaled to total mass 1, then ``iters`` times: rows
    (prototypes) to 1/K each — row sums all-reduced over workers — and columns (samples)
    to 1/R_g each, R_g = R · world size. Finally the columns are scaled to sum to 1.

    NOTE: FRL's optional max-subtraction (``--improve_numerical_stability``, off in run.sh)
    is not offered: scores of unit vectors are in [-1, 1], exp(1/0.05) is far from the
    float32 limit, and we always compute in at least float32 (also under AMP).

    Args:
        scores: (R, K) local rows (this worker's samples, queue rows first if any).
        epsilon: ε, the entropic regularisation (0.05).
        iters: Sinkhorn iterations (3).
    Returns:
        (R, K) codes; every row sums to 1.
    """
    s = scores if scores.dtype in (torch.float32, torch.float64) else scores.float()
    q = _replace_infs(torch.exp(s / epsilon)).t()  # (K, R); |scores| <= 1 for unit vectors
    k, r = q.shape
    r_global = r * dist.world_size()
    q /= dist.all_reduce_sum_(q.sum())
    for _ in range(iters):
        # A prototype whose mass underflowed to 0 would get an infinite scale: as the reference,
        # replace it by the largest finite scale (the row stays 0 instead of turning into NaN).
        q *= _replace_infs(1.0 / (k * dist.all_reduce_sum_(q.sum(dim=1, keepdim=True))))
        q /= q.sum(dim=0, keepdim=True)
        q /= r_global
    q *= r_global
    return q.t()


class SwAVLoss(nn.Module):
    """Swapped prediction over multi-crop outputs.

    Args:
        temperature: τ of the predicted distribution (0.1).
        epsilon: ε of the Sinkhorn codes (0.05).
        sinkhorn_iters: Sinkhorn iterations (3).
        crops_for_assign: indices of the crops whose codes are computed ((0, 1): global crops).
    """

    def __init__(self, temperature: float = 0.1, epsilon: float = 0.05, sinkhorn_iters: int = 3,
                 crops_for_assign: Sequence[int] = (0, 1)):
        super().__init__()
        self.temperature = temperature
        self.epsilon = epsilon
        self.sinkhorn_iters = sinkhorn_iters
        self.crops_for_assign = tuple(int(c) for c in crops_for_assign)

    @classmethod
    def from_config(cls, cfg) -> SwAVLoss:
        """From a :class:`fra.models.swav.SwAVConfig` or a model config carrying one as ``swav``."""
        s = getattr(cfg, "swav", cfg)
        return cls(s.temperature, s.epsilon, s.sinkhorn_iters, s.crops_for_assign)

    def forward(self, out) -> dict[str, torch.Tensor]:
        """out: :class:`fra.models.swav.SwAVOutput` -> {"loss", "loss/swav", "loss/swav_crop<i>"}.

        ``out.scores`` is a list of (B, K) prototype scores, one per crop; ``out.queue_scores``
        (A, L, K) or None are the queued rows, prepended to assigned crop i's batch for Sinkhorn.
        """
        scores = [s.float() if s.dtype in (torch.float16, torch.bfloat16) else s for s in out.scores]
        n = len(scores)
        if n < 2 or any(not 0 <= c < n for c in self.crops_for_assign):
            raise ValueError(f"crops_for_assign {self.crops_for_assign} does not fit {n} crops")
        b = scores[0].shape[0]
        logs: dict[str, torch.Tensor] = {}
        total = 0.0
        for i, crop in enumerate(self.crops_for_assign):
            with torch.no_grad():
                rows = scores[crop].detach()
                if out.queue_scores is not None:
                    rows = torch.cat([out.queue_scores[i].to(rows.dtype), rows])
                codes = swav_sinkhorn(rows, self.epsilon, self.sinkhorn_iters)[-b:]  # (B, K)
            sub = 0.0
            for v in range(n):
                if v != crop:
                    sub = sub - (codes * F.log_softmax(scores[v] / self.temperature, dim=1)).sum(dim=1).mean()
            sub = sub / (n - 1)
            logs[f"loss/swav_crop{crop}"] = sub
            total = total + sub
        total = total / len(self.crops_for_assign)
        logs["loss/swav"] = total
        logs["loss"] = total
        return logs


def swav_collapse_check(loss_value: float, num_prototypes: int, tolerance: float = 0.02, *,
                        warn: bool = True) -> bool:
    """True (and a warning logged) if the SwAV loss sits at ln K.

    With equipartitioned codes, a prediction that ignores the input costs
    ``−(1/K) Σ_k log p_k ≥ ln K``, with equality for the uniform prediction; so a loss within
    ``tolerance`` (relative) of ln K means the embeddings carry no information about the
    codes — collapse, or prototypes/embeddings that have not started to learn.

    Args:
        loss_value: the (worker-averaged) ``loss/swav`` value.
        num_prototypes: K.
        tolerance: relative distance to ln K that counts as "at ln K".
        warn: log the warning (one rank of many passes False).
    """
    ln_k = math.log(num_prototypes)
    if ln_k <= 0 or not math.isfinite(loss_value):
        return False
    collapsed = abs(loss_value - ln_k) <= tolerance * ln_k
    if collapsed and warn:
        log.warning("SwAV loss %.4f is at ln K = %.4f (K = %d): representations may have collapsed",
                    loss_value, ln_k, num_prototypes)
    return collapsed
