"""The mask-embedding transformer of FRA's region neck (FRA_SPEC §3.1).

K learnable queries pass through a small post-norm DETR decoder that cross-attends to the
1×1-projected backbone map (plus a sine positional encoding), then a 3-layer MLP turns the
decoded queries into the facial *mask embeddings*. Module names follow the reference
(``input_proj``, ``query_embed``, ``transformer.decoder.layers.L.*``,
``transformer.decoder.norm``, ``mask_embed.layers.*``) so its checkpoints load 1:1.
"""
from __future__ import annotations

import copy
import math

import torch
import torch.nn.functional as F
from torch import nn


def sine_position_encoding(h: int, w: int, dim: int, device, dtype) -> torch.Tensor:
    """DETR sine encoding of an h×w grid, normalised to (0, 2π], as ``(h·w, dim)``.

    Channels ``[0, dim/2)`` encode y, ``[dim/2, dim)`` encode x; within each half even
    channels are sin and odd channels cos of frequency ``10000^(2⌊j/2⌋/(dim/2))``.

    NOTE: computed in float32 and then cast, as the reference does; this matters only
    for bit-parity of float64 runs.
    """
    n = dim // 2
    eps, scale = 1e-6, 2 * math.pi
    y = torch.arange(1, h + 1, dtype=torch.float32, device=device) / (h + eps) * scale
    x = torch.arange(1, w + 1, dtype=torch.float32, device=device) / (w + eps) * scale
    dim_t = torch.arange(n, dtype=torch.float32, device=device)
    dim_t = 10000 ** (2 * torch.div(dim_t, 2, rounding_mode="floor") / n)

    def enc(v: torch.Tensor) -> torch.Tensor:  # (L,) -> (L, n), interleaved sin/cos
        p = v[:, None] / dim_t
        return torch.stack((p[:, 0::2].sin(), p[:, 1::2].cos()), dim=2).flatten(1)

    pos_y = enc(y)[:, None, :].expand(h, w, n)
    pos_x = enc(x)[None, :, :].expand(h, w, n)
    return torch.cat((pos_y, pos_x), dim=2).reshape(h * w, dim).to(dtype)


class DecoderLayer(nn.Module):
    """Post-norm DETR decoder layer: self-attention, cross-attention, FFN (batch-first)."""

    def __init__(self, d_model: int, nhead: int, dim_feedforward: int, dropout: float):
        super().__init__()
        self.self_attn = nn.MultiheadAttention(d_model, nhead, dropout=dropout, batch_first=True)
        self.multihead_attn = nn.MultiheadAttention(d_model, nhead, dropout=dropout, batch_first=True)
        self.linear1 = nn.Linear(d_model, dim_feedforward)
        self.linear2 = nn.Linear(dim_feedforward, d_model)
        self.norm1 = nn.LayerNorm(d_model)
        self.norm2 = nn.LayerNorm(d_model)
        self.norm3 = nn.LayerNorm(d_model)
        self.dropout = nn.Dropout(dropout)
        self.dropout1 = nn.Dropout(dropout)
        self.dropout2 = nn.Dropout(dropout)
        self.dropout3 = nn.Dropout(dropout)

    def forward(self, tgt, memory, pos, query_pos):
        """tgt (B, K, D), memory (B, L, D), pos (1, L, D), query_pos (1|B, K, D)."""
        q = k = tgt + query_pos
        tgt = self.norm1(tgt + self.dropout1(self.self_attn(q, k, tgt, need_weights=False)[0]))
        attn = self.multihead_attn(tgt + query_pos, memory + pos, memory, need_weights=False)[0]
        tgt = self.norm2(tgt + self.dropout2(attn))
        ffn = self.linear2(self.dropout(F.relu(self.linear1(tgt))))
        return self.norm3(tgt + self.dropout3(ffn))


class Decoder(nn.Module):
    def __init__(self, layer: DecoderLayer, num_layers: int, d_model: int):
        super().__init__()
        # NOTE: deep copies, as the reference: the layers' 1-D tensors start identical.
        self.layers = nn.ModuleList(copy.deepcopy(layer) for _ in range(num_layers))
        self.norm = nn.LayerNorm(d_model)

    def forward(self, tgt, memory, pos, query_pos):
        for layer in self.layers:
            tgt = layer(tgt, memory, pos, query_pos)
        return self.norm(tgt)


class Transformer(nn.Module):
    """Decoder-only transformer (the reference has 0 encoder layers: memory = input)."""

    def __init__(self, d_model: int, nhead: int, num_layers: int, dim_feedforward: int, dropout: float):
        super().__init__()
        self.decoder = Decoder(DecoderLayer(d_model, nhead, dim_feedforward, dropout), num_layers, d_model)
        for p in self.parameters():
            if p.dim() > 1:
                nn.init.xavier_uniform_(p)

    def forward(self, memory, pos, query_pos):
        tgt = torch.zeros_like(query_pos).expand(memory.shape[0], -1, -1)
        return self.decoder(tgt, memory, pos, query_pos)


class MaskEmbedMLP(nn.Module):
    """3 Linear layers with ReLU between (no norm), named ``layers.{0,1,2}``."""

    def __init__(self, dim: int, num_layers: int = 3):
        super().__init__()
        self.layers = nn.ModuleList(nn.Linear(dim, dim) for _ in range(num_layers))

    def forward(self, x):
        for i, layer in enumerate(self.layers):
            x = layer(x)
            if i < len(self.layers) - 1:
                x = F.relu(x)
        return x


class MaskEmbedPredictor(nn.Module):
    """Backbone map -> K mask embeddings (the reference's ``proj_attn``).

    Args:
        in_channels: backbone channels C.
        dim: transformer width (= projection dim, 256).
        num_queries: K.
    """

    def __init__(self, in_channels: int, dim: int, num_queries: int, nhead: int = 8,
                 num_layers: int = 2, dim_feedforward: int = 256, dropout: float = 0.1):
        super().__init__()
        self.dim = dim
        self.query_embed = nn.Embedding(num_queries, dim)
        self.transformer = Transformer(dim, nhead, num_layers, dim_feedforward, dropout)
        if in_channels != dim:
            self.input_proj = nn.Conv2d(in_channels, dim, kernel_size=1)
            # c2_xavier_fill: kaiming_uniform with a=1, zero bias
            nn.init.kaiming_uniform_(self.input_proj.weight, a=1)
            nn.init.zeros_(self.input_proj.bias)
        else:
            self.input_proj = None
        self.mask_embed = MaskEmbedMLP(dim)
        self._pos_cache: dict = {}

    def position_encoding(self, h: int, w: int, like: torch.Tensor) -> torch.Tensor:
        key = (h, w, like.device, like.dtype)
        if key not in self._pos_cache:
            self._pos_cache[key] = sine_position_encoding(h, w, self.dim, like.device, like.dtype)[None]
        return self._pos_cache[key]

    def forward(self, x_tokens: torch.Tensor, h: int, w: int) -> torch.Tensor:
        """x_tokens (B, h·w, C) channels-last backbone features -> (B, K, dim) mask embeddings."""
        if self.input_proj is not None:
            memory = F.linear(x_tokens, self.input_proj.weight.flatten(1), self.input_proj.bias)
        else:
            memory = x_tokens
        pos = self.position_encoding(h, w, memory)
        query_pos = self.query_embed.weight[None]
        hs = self.transformer(memory, pos, query_pos)
        return self.mask_embed(hs)
