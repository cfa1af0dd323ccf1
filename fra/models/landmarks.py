"""Face-alignment network: a ResNet trunk under a deconvolution heat-map head (pure PyTorch).

DOWNSTREAM_SPEC §7.1 (ours): ResNet C5 (stride 32) -> three deconvolutions (4x4, stride 2, BN,
ReLU; SimpleBaseline-style) -> maps at 1/4 of the input (64x64 for a 256 crop), then two 1x1 heads
as STAR's: heat maps H (instance-norm + ReLU) and point maps P (sigmoid), one channel per point.
The fused map ``F = H * P`` is decoded by STAR's soft-argmax (no softmax) to coordinates in [-1, 1].

NOTE: STAR also multiplies in edge maps (E2H of 9 edge groups) and stacks 4 hourglasses; the single
stage here has no edge maps (departure from §7.1), so its loss is STAR(F) + 10 AWing(P).
"""
from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from fra.checkpoint import build_torchvision_resnet, load_backbone_into

TRUNK_CHANNELS = {"resnet18": 512, "resnet34": 512, "resnet50": 2048, "resnet101": 2048, "resnet152": 2048}


class LandmarkNet(nn.Module):
    """ResNet trunk + deconvolution head.

    Args:
        arch: torchvision ResNet name.
        num_points: L, one map per point.
        backbone: torchvision-named trunk tensors to load (None: random init).
        channels: width of the deconvolution layers.
        num_deconv: deconvolutions (each doubles the side): 3 takes stride 32 to stride 4.
    """

    def __init__(self, arch: str, num_points: int, backbone: dict | None = None, channels: int = 256,
                 num_deconv: int = 3):
        super().__init__()
        trunk = build_torchvision_resnet(arch)
        if backbone is not None:
            load_backbone_into(trunk, backbone, f"{arch} backbone")
        trunk.fc = nn.Identity()
        self.backbone = trunk
        layers, width = [], TRUNK_CHANNELS.get(arch, trunk.layer4[-1].conv1.in_channels)
        for _ in range(num_deconv):
            layers += [nn.ConvTranspose2d(width, channels, 4, stride=2, padding=1, bias=False),
                       nn.BatchNorm2d(channels), nn.ReLU(inplace=True)]
            width = channels
        self.deconv = nn.Sequential(*layers)
        self.heat = nn.Conv2d(channels, num_points, 1)
        self.heat_norm = nn.InstanceNorm2d(num_points)
        self.point = nn.Conv2d(channels, num_points, 1)
        for m in self.deconv.modules():  # SimpleBaseline's head init
            if isinstance(m, nn.ConvTranspose2d):
                nn.init.normal_(m.weight, std=0.001)
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
        for conv in (self.heat, self.point):
            nn.init.normal_(conv.weight, std=0.001)
            nn.init.zeros_(conv.bias)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """C5 feature map (B, C, S/32, S/32)."""
        b = self.backbone
        x = b.maxpool(b.relu(b.bn1(b.conv1(x))))
        return b.layer4(b.layer3(b.layer2(b.layer1(x))))

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """``{"fused": F, "heat": H, "point": P}``, each (B, L, S/4, S/4) for a (B, 3, S, S) input."""
        y = self.deconv(self.features(x))
        heat = F.relu(self.heat_norm(self.heat(y)))
        point = torch.sigmoid(self.point(y))
        return {"fused": heat * point, "heat": heat, "point": point}


def heatmap_grid(size: int, device=None, dtype=torch.float32) -> torch.Tensor:
    """Pixel k of a ``size`` map -> k / (size - 1) * 2 - 1 (STAR's decoder grid, [-1, 1])."""
    return torch.linspace(-1.0, 1.0, size, device=device, dtype=dtype)


def soft_argmax(maps: torch.Tensor) -> torch.Tensor:
    """STAR's decoder: each map divided by its sum (clamped at 1e-6), expected (x, y) on the grid.

    Args:
        maps: non-negative (B, L, H, W).
    Returns:
        (B, L, 2) in [-1, 1].
    """
    b, n, h, w = maps.shape
    p = maps / maps.sum(dim=(2, 3), keepdim=True).clamp_min(1e-6)
    x = (p.sum(dim=2) * heatmap_grid(w, maps.device, maps.dtype)).sum(dim=-1)
    y = (p.sum(dim=3) * heatmap_grid(h, maps.device, maps.dtype)).sum(dim=-1)
    return torch.stack([x, y], dim=-1)


def argmax_subpixel(maps: torch.Tensor) -> torch.Tensor:
    """HRNet's decoder: the arg-max pixel moved 0.25 px towards the larger neighbour, as [-1, 1] coordinates
    on the same grid as :func:`soft_argmax`.

    Args:
        maps: (B, L, H, W).
    Returns:
        (B, L, 2).
    """
    b, n, h, w = maps.shape
    flat = maps.reshape(b, n, -1).argmax(dim=-1)
    ys, xs = (flat // w).to(maps.dtype), (flat % w).to(maps.dtype)
    padded = F.pad(maps, (1, 1, 1, 1), mode="replicate")
    iy, ix = (flat // w) + 1, (flat % w) + 1
    flatp = padded.reshape(b, n, -1)
    wp = w + 2

    def at(dy, dx):
        return flatp.gather(-1, ((iy + dy) * wp + ix + dx).unsqueeze(-1)).squeeze(-1)

    xs = xs + 0.25 * torch.sign(at(0, 1) - at(0, -1))
    ys = ys + 0.25 * torch.sign(at(1, 0) - at(-1, 0))
    return torch.stack([xs / (w - 1) * 2 - 1, ys / (h - 1) * 2 - 1], dim=-1)


def to_pixels(coords: torch.Tensor, size: int) -> torch.Tensor:
    """[-1, 1] decoder coordinates -> input-crop pixels (pixel centres at integers): the inverse of
    STAR's target mapping ``(2p + 1) / S - 1``."""
    return ((coords + 1.0) * size - 1.0) / 2.0


def to_unit(points: torch.Tensor, size: int) -> torch.Tensor:
    """Input-crop pixels -> [-1, 1] (STAR: ``(2p + 1) / S - 1``), not clamped."""
    return (2.0 * points + 1.0) / size - 1.0


__all__ = ["LandmarkNet", "soft_argmax", "argmax_subpixel", "heatmap_grid", "to_pixels", "to_unit"]
