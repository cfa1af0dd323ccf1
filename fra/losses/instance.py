"""Instance (global, BYOL) loss (FRA_SPEC §5.1)."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def cosine_loss(p: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """``2 - 2 · mean_n <p̂_n, t̂_n>`` over the rows of (N, D) tensors."""
    return 2 - 2 * (F.normalize(p, dim=-1) * F.normalize(t, dim=-1)).sum(dim=-1).mean()


class InstanceLoss(nn.Module):
    """BYOL regression of the online prediction of view a onto the target projection of view b."""

    def forward(self, pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """pred (B, D) online prediction, target (B, D) target projection -> scalar."""
        return cosine_loss(pred, target.detach())
