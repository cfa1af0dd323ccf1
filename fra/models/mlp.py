"""Projection / prediction MLP (the reference's ``MLP1D``, FRA_SPEC §2)."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class MLP1D(nn.Module):
    """Linear(no bias) -> BatchNorm -> ReLU -> Linear(no bias), applied per token.

    Weights are stored as ``Conv1d(k=1)`` tensors ``[out, in, 1]`` under the names
    ``mlp.0`` / ``mlp.1`` (BN) / ``mlp.3`` so checkpoints match the reference, but the
    forward uses plain matmuls on a channels-last ``(N, L, C)`` tensor: the BN statistics
    are over the N·L rows, exactly as BatchNorm1d on ``(N, C, L)``.

    Args:
        in_dim: input channels C.
        hidden_dim: hidden width (4096 in the reference).
        out_dim: output channels (256).
    """

    def __init__(self, in_dim: int, hidden_dim: int, out_dim: int, norm_layer: type[nn.Module] = nn.BatchNorm1d):
        super().__init__()
        self.mlp = nn.Sequential(
            nn.Conv1d(in_dim, hidden_dim, 1, bias=False),
            norm_layer(hidden_dim),
            nn.ReLU(inplace=True),
            nn.Conv1d(hidden_dim, out_dim, 1, bias=False),
        )
        for m in self.modules():
            if isinstance(m, nn.Conv1d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.modules.batchnorm._BatchNorm):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(N, L, C) or (N, C) -> (N, L, out) or (N, out)."""
        lead = x.shape[:-1]
        h = F.linear(x.reshape(-1, x.shape[-1]), self.mlp[0].weight.squeeze(-1))
        h = F.relu(self.mlp[1](h))
        out = F.linear(h, self.mlp[3].weight.squeeze(-1))
        return out.reshape(*lead, out.shape[-1])
