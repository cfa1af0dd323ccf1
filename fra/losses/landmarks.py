"""Face-alignment losses (pure PyTorch): STAR (STARLoss_v2), Adaptive Wing, heat-map L2.

STAR loss (Zhou et al., CVPR 2023; ZhenglinZhou/STAR ``lib/loss/starLoss_v2.py``, DOWNSTREAM_SPEC
§2): each fused map is normalised to a distribution p; its mean mu and (unbiased, weighted)
covariance Sigma are taken on the [-1, 1] grid; Sigma = V diag(lambda) V^T (ascending); the error
e = y - mu is measured along each eigenvector and divided by sqrt(lambda), with STAR's smooth-L1,
plus w (|lambda0| + |lambda1|).

NOTE: the reference takes ``evectors[:, :, 0]`` (a row); the eigenvectors are taken as columns here
(DOWNSTREAM_SPEC §2, "ours"). The eigen-decomposition runs on the CPU in float64, like the
reference's CPU ``eigh``.
"""
from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from fra.models.landmarks import heatmap_grid


def star_smooth_l1(delta: torch.Tensor, scale: float = 0.01) -> torch.Tensor:
    """STAR's smooth-L1 of |delta|: 0.5 d^2 / s below s, d - s / 2 above."""
    d = delta.abs()
    return torch.where(d < scale, 0.5 * d * d / scale, d - 0.5 * scale)


class STARLoss(nn.Module):
    """STARLoss_v2 on fused maps (B, L, H, W) against targets (B, L, 2) in [-1, 1].

    Args:
        w: weight of the eigenvalue penalty (``star_w``, 1).
        scale: smooth-L1 scale (0.01 in [-1, 1] units).
    """

    def __init__(self, w: float = 1.0, scale: float = 0.01):
        super().__init__()
        self.w, self.scale = w, scale

    def forward(self, maps: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        b, n, h, w = maps.shape
        p = maps / maps.sum(dim=(2, 3), keepdim=True).clamp_min(1e-6)
        gy, gx = torch.meshgrid(heatmap_grid(h, maps.device, maps.dtype), heatmap_grid(w, maps.device, maps.dtype),
                                indexing="ij")
        grid = torch.stack([gx, gy], dim=-1).view(1, 1, h * w, 2)
        pf = p.view(b, n, h * w, 1)
        mu = (pf * grid).sum(dim=2)  # (B, L, 2)
        centred = grid - mu.unsqueeze(2)  # (B, L, HW, 2)
        v1 = pf.sum(dim=2) + 1e-5  # (B, L, 1)
        v2 = (pf * pf).sum(dim=2) + 1e-5
        cov = torch.einsum("blk,blki,blkj->blij", pf.squeeze(-1), centred, centred) / (v1 - v2 / v1).unsqueeze(-1)
        evals, evecs = torch.linalg.eigh(cov.double().cpu())  # ascending; columns are eigenvectors
        evals, evecs = evals.to(maps.device, maps.dtype), evecs.to(maps.device, maps.dtype)
        err = target - mu  # (B, L, 2)
        proj = torch.einsum("blij,bli->blj", evecs, err)  # (B, L, 2): e along v0 and v1
        loss = (star_smooth_l1(proj, self.scale) / torch.sqrt(evals + 1e-5)).sum(dim=-1)
        loss = loss + self.w * evals.abs().sum(dim=-1)
        return loss.mean()


class AWingLoss(nn.Module):
    """Adaptive Wing loss (Wang et al., ICCV 2019) with STAR's settings and weight map
    ``1 + 10 [maxpool3x3(target) >= 0.2]``."""

    def __init__(self, omega: float = 14.0, theta: float = 0.5, epsilon: float = 1.0, alpha: float = 2.1,
                 weighted: bool = True):
        super().__init__()
        self.omega, self.theta, self.epsilon, self.alpha, self.weighted = omega, theta, epsilon, alpha, weighted

    def forward(self, pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        delta = (target - pred).abs()
        power = self.alpha - target
        ratio = self.theta / self.epsilon
        a = (self.omega * (1.0 / (1.0 + ratio ** power)) * power * (ratio ** (power - 1.0)) / self.epsilon)
        c = self.theta * a - self.omega * torch.log1p(ratio ** power)
        loss = torch.where(delta < self.theta, self.omega * torch.log1p((delta / self.epsilon) ** power),
                           a * delta - c)
        if self.weighted:
            mask = (F.max_pool2d(target, 3, stride=1, padding=1) >= 0.2).to(loss.dtype)
            loss = loss * (1.0 + 10.0 * mask)
        return loss.mean()


def gaussian_maps(points: torch.Tensor, size: int, sigma: float) -> torch.Tensor:
    """Unnormalised Gaussians (peak 1) at ``points`` (B, L, 2) in [-1, 1] on a ``size`` grid -> (B, L, size, size).

    ``sigma`` is in map pixels. NOTE: STAR draws sigma 1.5 on the 256 canvas and resizes to 64; here
    the map is drawn directly at its resolution with sigma scaled by map / input size.
    """
    px = (points[..., 0:1] + 1.0) * (size - 1) / 2.0  # to map pixels
    py = (points[..., 1:2] + 1.0) * (size - 1) / 2.0
    k = torch.arange(size, device=points.device, dtype=points.dtype)
    gx = torch.exp(-((k - px) ** 2) / (2 * sigma * sigma))  # (B, L, W)
    gy = torch.exp(-((k - py) ** 2) / (2 * sigma * sigma))  # (B, L, H)
    return gy.unsqueeze(-1) * gx.unsqueeze(-2)


LOSSES = ("star", "awing", "l2")


class LandmarkLoss(nn.Module):
    """The training loss of one kind, on the model's output dict; returns ``{"loss": total, ...}``.

    * ``star``: STAR(fused, y) + ``aux_weight`` x AWing(point maps, Gaussians) (STAR's recipe without
      the edge term); decoded by soft-argmax of the fused maps.
    * ``awing``: AWing(point maps, Gaussians) alone; decoded by arg-max + quarter pixel.
    * ``l2``: mean squared error of the point maps to the Gaussians; decoded like ``awing``.

    Args:
        kind: one of :data:`LOSSES`.
        input_size: crop side S (the Gaussians' sigma is 1.5 px at S, scaled to the map).
    """

    def __init__(self, kind: str = "star", input_size: int = 256, aux_weight: float = 10.0, star_w: float = 1.0):
        super().__init__()
        if kind not in LOSSES:
            raise ValueError(f"unknown landmark loss {kind!r}; valid: {', '.join(LOSSES)}")
        self.kind, self.input_size, self.aux_weight = kind, input_size, aux_weight
        self.star, self.awing = STARLoss(star_w), AWingLoss()

    def forward(self, out: dict[str, torch.Tensor], target: torch.Tensor) -> dict[str, torch.Tensor]:
        size = out["point"].shape[-1]
        gauss = gaussian_maps(target.clamp(-1.0, 1.0), size, 1.5 * size / self.input_size)
        if self.kind == "l2":
            loss = F.mse_loss(out["point"], gauss)
            return {"loss": loss, "loss/l2": loss.detach()}
        aux = self.awing(out["point"], gauss)
        if self.kind == "awing":
            return {"loss": aux, "loss/awing": aux.detach()}
        # STAR's GT is clamped to [-1, 1] (alignmentDataset.py); the evaluation uses the raw points.
        star = self.star(out["fused"], target.clamp(-1.0, 1.0))
        return {"loss": star + self.aux_weight * aux, "loss/star": star.detach(), "loss/awing": aux.detach()}


def decode(out: dict[str, torch.Tensor], kind: str) -> torch.Tensor:
    """(B, L, 2) in [-1, 1]: soft-argmax of the fused maps for ``star``, arg-max of the point maps otherwise."""
    from fra.models.landmarks import argmax_subpixel, soft_argmax

    return soft_argmax(out["fused"]) if kind == "star" else argmax_subpixel(out["point"])


__all__ = ["STARLoss", "AWingLoss", "LandmarkLoss", "gaussian_maps", "star_smooth_l1", "decode", "LOSSES"]
