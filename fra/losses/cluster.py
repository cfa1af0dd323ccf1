"""Cluster self-distillation loss with Sinkhorn targets and mean-entropy maximisation.

FRA_SPEC §5.4: per view, online vs target heat-map logits of the *same* view, rows =
pixels. The teacher's softmax (τt) is balanced by Sinkhorn-Knopp over the global batch;
the student (τs = 0.1) is trained with cross-entropy to it, plus ``log K − H(p̄)``.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from fra import dist


@torch.no_grad()
def sinkhorn(probs: torch.Tensor, iters: int = 3) -> torch.Tensor:
    """Balance teacher probabilities over the global batch (equipartition over K).

    NOTE: the reference runs Sinkhorn on the temperature-softmax *probabilities* (its
    ``epsilon`` argument is unused), so we do the same.

    Args:
        probs: (R, K) local rows of teacher probabilities.
    Returns:
        (R, K) assignments whose rows sum to 1 and whose columns (summed over all workers)
        carry equal mass R_g/K.
    """
    q = probs.t().clone()  # (K, R)
    k, r = q.shape
    r_global = r * dist.world_size()
    q /= dist.all_reduce_sum_(q.sum())
    for _ in range(iters):
        q /= dist.all_reduce_sum_(q.sum(dim=1, keepdim=True))
        q /= k
        q /= q.sum(dim=0, keepdim=True)
        q /= r_global
    q *= r_global
    return q.t()


def _rows(dots: torch.Tensor) -> torch.Tensor:
    """(B, K, h, w) -> (B·h·w, K); half precision is promoted for the loss math."""
    x = dots.permute(0, 2, 3, 1).reshape(-1, dots.shape[1])
    return x.float() if x.dtype in (torch.float16, torch.bfloat16) else x


class ClusterLoss(nn.Module):
    """Self-distillation of heat-map logits (one view).

    Args:
        num_proto: K.
        teacher_temp: τt (0.04).
        student_temp: τs (0.1).
        me_max_weight: weight of the mean-entropy maximisation term (1.0).
        sinkhorn_iters: Sinkhorn iterations (3).
    """

    def __init__(self, num_proto: int, teacher_temp: float = 0.04, student_temp: float = 0.1,
                 me_max_weight: float = 1.0, sinkhorn_iters: int = 3):
        super().__init__()
        self.num_proto = num_proto
        self.teacher_temp = teacher_temp
        self.student_temp = student_temp
        self.me_max_weight = me_max_weight
        self.sinkhorn_iters = sinkhorn_iters

    def forward(self, student_dots: torch.Tensor, teacher_dots: torch.Tensor) -> dict[str, torch.Tensor]:
        """student_dots, teacher_dots (B, K, h, w) -> {"loss", "ce", "me_max"}."""
        q = _rows(student_dots) / self.student_temp
        log_p = F.log_softmax(q, dim=1)
        # NOTE: the reference subtracts a `center` that is never updated (always 0): omitted.
        t = F.softmax(_rows(teacher_dots.detach()) / self.teacher_temp, dim=1)
        t = sinkhorn(t, self.sinkhorn_iters)
        ce = -(t * log_p).sum(dim=1).mean()
        p_mean = dist.all_reduce_mean(F.softmax(q, dim=1).mean(dim=0))
        me_max = (p_mean * p_mean.log()).sum() + math.log(self.num_proto)
        return {"loss": ce + self.me_max_weight * me_max, "ce": ce, "me_max": me_max}
