"""FRA's region neck ("ObjectNeck" in attn mode, FRA_SPEC §3.2).

Per view: a global projection (BYOL branch); per-pixel projections; K mask embeddings from
the transformer; heat maps = softmax over K of the cosine similarity between the mask
embeddings and each pixel projection; region features = backbone features pooled under
each heat map, then projected.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from fra import dist
from fra.models.mlp import MLP1D
from fra.models.transformer import MaskEmbedPredictor

HEATMAP_EPS = 1e-7


@dataclass
class NeckOutput:
    """What one network returns for one view.

    Attributes:
        z_g: (B, D) global projection.
        obj_val: (B, K, D) projected region features (None without the region branch).
        dots: (B, K, h, w) heat-map logits: cosine similarity of mask embeddings and pixels.
        obj_attn: (B, K, h, w) heat maps, softmax over K (+1e-7).
        mask_embed_mean: (K, D) batch mean of the per-image mask embeddings (for ``proto``).
    """

    z_g: torch.Tensor
    obj_val: torch.Tensor | None = None
    dots: torch.Tensor | None = None
    obj_attn: torch.Tensor | None = None
    mask_embed_mean: torch.Tensor | None = None


class RegionNeck(nn.Module):
    """Global + region projections on top of a backbone map.

    Args:
        in_channels: backbone channels C.
        hidden_dim: MLP hidden width Hd.
        out_dim: projection dim D (also the transformer width).
        num_proto: K, the number of facial regions.
        region: build the region branch (False = BYOL: global projection only).
        scale: temperature of the softmax over queries (reference 1.0).
        proto_momentum: EMA momentum of the ``proto`` buffer (reference 0.9).
    """

    def __init__(self, in_channels: int, hidden_dim: int, out_dim: int, num_proto: int,
                 region: bool = True, scale: float = 1.0, proto_momentum: float = 0.9,
                 nhead: int = 8, num_layers: int = 2, dim_feedforward: int = 256,
                 dropout: float = 0.1, norm_layer: type[nn.Module] = nn.BatchNorm1d):
        super().__init__()
        self.region = region
        self.scale = scale
        self.proto_momentum = proto_momentum
        self.proj = MLP1D(in_channels, hidden_dim, out_dim, norm_layer)
        if region:
            self.proj_pixel = MLP1D(in_channels, hidden_dim, out_dim, norm_layer)
            self.proj_obj = MLP1D(in_channels, hidden_dim, out_dim, norm_layer)
            self.proj_attn = MaskEmbedPredictor(in_channels, out_dim, num_proto, nhead, num_layers,
                                                dim_feedforward, dropout)
            # Running mean of the mask embeddings, used for inference heat maps only.
            self.register_buffer("proto", torch.randn(num_proto, out_dim))

    def forward(self, x: torch.Tensor, use_proto: bool = False) -> NeckOutput:
        """x (B, C, h, w) backbone map -> :class:`NeckOutput`.

        Args:
            use_proto: build the heat maps from the ``proto`` buffer instead of the batch's
                mask embeddings (inference on single images).
        """
        b, c, h, w = x.shape
        z_g = self.proj(x.mean(dim=(2, 3)))
        if not self.region:
            return NeckOutput(z_g=z_g)
        tokens = x.flatten(2).transpose(1, 2)  # (B, h·w, C)
        feat = self.proj_pixel(tokens)  # (B, h·w, D)
        mask_embed = self.proj_attn(tokens, h, w)  # (B, K, D)
        if use_proto:
            m = self.proto.to(feat.dtype)
        else:
            # NOTE: the reference averages the mask embeddings over the *global* batch and
            # uses the same K embeddings for every image (FRA_SPEC §3.2 step 4, §10 item 2);
            # the paper describes per-image look-up. The all-reduce is non-differentiable.
            m = dist.all_reduce_mean(mask_embed.mean(dim=0))
        # dots[b, k, p] = cos(m_k, feat[b, p]); legend: b batch, k query, p pixel, d channel
        dots = torch.einsum("kd,bpd->bkp", F.normalize(m, dim=-1), F.normalize(feat, dim=-1))
        obj_attn = F.softmax(dots / self.scale, dim=1) + HEATMAP_EPS
        # Region pooling over the raw backbone features: per query normalise over space.
        weights = obj_attn / obj_attn.sum(dim=2, keepdim=True)
        slots = torch.bmm(weights, tokens)  # (B, K, C)
        obj_val = self.proj_obj(slots)
        return NeckOutput(
            z_g=z_g,
            obj_val=obj_val,
            dots=dots.reshape(b, -1, h, w),
            obj_attn=obj_attn.reshape(b, -1, h, w),
            mask_embed_mean=mask_embed.detach().mean(dim=0),
        )

    @torch.no_grad()
    def update_proto(self, mask_embed_mean: torch.Tensor) -> None:
        """proto <- m·proto + (1-m)·(global batch mean of the per-image mask embeddings)."""
        mean = dist.all_reduce_mean(mask_embed_mean.clone())
        self.proto.mul_(self.proto_momentum).add_(mean.to(self.proto.dtype), alpha=1 - self.proto_momentum)
