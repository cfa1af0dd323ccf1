"""Region loss: matched region embeddings across views plus decorrelation (FRA_SPEC §5.2)."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class RegionLoss(nn.Module):
    """``pos + w_neg · neg`` between region k of view a and region k of view b.

    pos = 2 − 2·mean_{b,k} ⟨P̂_bk, T̂_bk⟩; neg = mean_{b,k} (1/K) Σ_{k'≠k} ⟨P̂_bk, T̂_bk'⟩².

    Args:
        neg_weight: weight of the decorrelation term (reference constant 0.02).
    """

    def __init__(self, neg_weight: float = 0.02):
        super().__init__()
        self.neg_weight = neg_weight

    def forward(self, pred: torch.Tensor, target: torch.Tensor) -> dict[str, torch.Tensor]:
        """pred, target (B, K, D) -> {"loss", "pos", "neg"}."""
        p = F.normalize(pred, dim=-1)
        t = F.normalize(target.detach(), dim=-1)
        k = p.shape[1]
        # sim[b, k, j] = <p_bk, t_bj>; legend: b batch, k/j regions, d channel
        sim = torch.einsum("bkd,bjd->bkj", p, t)
        diag = torch.diagonal(sim, dim1=1, dim2=2)  # (B, K)
        pos = 2 - 2 * diag.mean()
        off = sim.pow(2).sum(dim=2) - diag.pow(2)  # Σ_{j≠k} sim²
        neg = (off / k).mean()
        return {"loss": pos + self.neg_weight * neg, "pos": pos, "neg": neg}
