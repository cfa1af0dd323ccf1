"""Diagnostics of FRA's region branch (logged, never part of the loss).

Three numbers say where the cluster self-distillation stands (issue 18): FRA starts on a
symmetric plateau where the K mask embeddings are nearly parallel, every pixel's K heat-map
logits are nearly equal, the Sinkhorn-balanced teacher is uniform and the cluster loss sits
at ln K.

* ``diag/cluster_over_lnk``: the cluster loss divided by ln K (1 on the plateau);
* ``diag/dots_spread``: the standard deviation over the K queries of a pixel's heat-map
  logits (cosines), averaged over pixels and both views of the online network; to be read
  against the teacher temperature (0.04): a spread well below it gives a near-uniform teacher;
* ``diag/mask_cos``: the mean pairwise cosine of the K batch-mean mask embeddings (online,
  both views); near 1 when the queries have not separated.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F


@torch.no_grad()
def mean_pairwise_cosine(embeddings: torch.Tensor) -> torch.Tensor:
    """Mean cosine over the K·(K−1) ordered pairs of distinct rows of (K, D) ``embeddings``."""
    k = embeddings.shape[0]
    if k < 2:
        raise ValueError("the mean pairwise cosine needs at least 2 embeddings")
    e = F.normalize(embeddings.float(), dim=-1)
    sim = e @ e.t()
    return (sim.sum() - sim.diagonal().sum()) / (k * (k - 1))


@torch.no_grad()
def dots_spread(dots: torch.Tensor) -> torch.Tensor:
    """(B, K, h, w) heat-map logits -> mean over pixels of their standard deviation over K."""
    return dots.float().std(dim=1, unbiased=False).mean()


@torch.no_grad()
def region_diagnostics(online: list, cluster_loss: torch.Tensor, num_proto: int) -> dict[str, torch.Tensor]:
    """The three diagnostics from the online network's per-view outputs and the cluster loss.

    Args:
        online: per view, a :class:`fra.models.neck.NeckOutput` with ``dots`` and ``mask_embed_mean``.
        cluster_loss: the (unweighted) cluster loss, mean of the two views.
        num_proto: K.
    Returns:
        ``diag/cluster_over_lnk``, ``diag/dots_spread`` and (K ≥ 2) ``diag/mask_cos``, detached scalars.
    """
    out = {"diag/dots_spread": torch.stack([dots_spread(o.dots) for o in online]).mean()}
    if num_proto >= 2:
        out["diag/cluster_over_lnk"] = cluster_loss.detach().float() / math.log(num_proto)
        out["diag/mask_cos"] = torch.stack([mean_pairwise_cosine(o.mask_embed_mean) for o in online]).mean()
    return out
