"""Task heads put on a ResNet trunk's pooled features for the downstream evaluations.

:class:`AttributeMLP` is the head of FRA's attribute recognition (DOWNSTREAM_SPEC §1: the
"AttNeck" it takes from d-li14/face-attribute-prediction): two hidden layers of 512 and 256, each
followed by batch norm, dropout 0.2 and then ReLU (dropout before the activation, as there), and
PyTorch's default initialisation. :func:`ccc_loss` is the concordance loss used for valence /
arousal regression.
"""
from __future__ import annotations

import torch
from torch import nn


class AttributeMLP(nn.Sequential):
    """``in -> 512 -> 256 -> out`` with BatchNorm1d, Dropout(p) and ReLU after each hidden Linear."""

    def __init__(self, in_dim: int, out_dim: int, hidden: tuple[int, int] = (512, 256), dropout: float = 0.2):
        layers: list[nn.Module] = []
        width = in_dim
        for h in hidden:
            layers += [nn.Linear(width, h), nn.BatchNorm1d(h), nn.Dropout(dropout), nn.ReLU(inplace=True)]
            width = h
        layers.append(nn.Linear(width, out_dim))
        super().__init__(*layers)


def ccc_loss(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean over columns of 1 - CCC, with population moments over the batch (rows)."""
    pm, tm = pred.mean(0), target.mean(0)
    pv, tv = pred.var(0, unbiased=False), target.var(0, unbiased=False)
    cov = ((pred - pm) * (target - tm)).mean(0)
    return (1.0 - 2.0 * cov / (pv + tv + (pm - tm) ** 2 + 1e-8)).mean()


__all__ = ["AttributeMLP", "ccc_loss"]
