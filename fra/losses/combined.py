"""The FRA objective: symmetrised instance + region losses plus the cluster loss (§5.5)."""
from __future__ import annotations

import torch
from torch import nn

from fra.config import ModelConfig
from fra.losses.cluster import ClusterLoss
from fra.losses.diagnostics import region_diagnostics
from fra.losses.instance import InstanceLoss
from fra.losses.region import RegionLoss


class FRALoss(nn.Module):
    """``L = Σ_{a→b} [w·L_inst + (1−w)·L_region] + λc · ½(SD_v1 + SD_v2)``.

    The two directions are *summed* (no ½) while the cluster loss averages the two views,
    as in the reference. Returns a dict with the total under ``"loss"`` and the logged pack
    ``loss/inst`` = w·ΣL_inst, ``loss/region`` = (1−w)·ΣL_region, ``loss/cluster`` (unweighted),
    plus the per-direction / per-view parts and the ``diag/*`` numbers of
    :func:`fra.losses.diagnostics.region_diagnostics` (FRA only; logged, not optimised).

    Args:
        loss_weight: w, instance vs region (0.5).
        loss_w_cluster: λc (0.1).
        region: False for BYOL (instance loss only).
    """

    def __init__(self, num_proto: int = 8, loss_weight: float = 0.5, loss_w_cluster: float = 0.1,
                 teacher_temp: float = 0.04, student_temp: float = 0.1, neg_weight: float = 0.02,
                 me_max_weight: float = 1.0, sinkhorn_iters: int = 3, region: bool = True):
        super().__init__()
        self.loss_weight = loss_weight if region else 1.0
        self.loss_w_cluster = loss_w_cluster if region else 0.0
        self.region = region
        self.instance = InstanceLoss()
        self.region_loss = RegionLoss(neg_weight)
        self.cluster = ClusterLoss(num_proto, teacher_temp, student_temp, me_max_weight, sinkhorn_iters)

    @classmethod
    def from_config(cls, cfg: ModelConfig) -> FRALoss:
        return cls(cfg.num_proto, cfg.loss_weight, cfg.loss_w_cluster, cfg.teacher_temp, cfg.student_temp,
                   cfg.loss_w_obj_neg, cfg.me_max_weight, cfg.sinkhorn_iters, region=cfg.method == "fra")

    def forward(self, out) -> dict[str, torch.Tensor]:
        """out: :class:`fra.models.FRAOutput` -> dict of scalar tensors."""
        w = self.loss_weight
        logs: dict[str, torch.Tensor] = {}
        inst_sum = 0.0
        region_sum = 0.0
        for a, b in ((0, 1), (1, 0)):
            tag = f"{a + 1}{b + 1}"
            inst = self.instance(out.pred[a], out.target[b].z_g)
            logs[f"loss/inst_{tag}"] = inst
            inst_sum = inst_sum + inst
            if self.region:
                reg = self.region_loss(out.pred_obj[a], out.target[b].obj_val)
                logs[f"loss/region_{tag}"] = reg["loss"]
                logs[f"loss/region_pos_{tag}"] = reg["pos"]
                logs[f"loss/region_neg_{tag}"] = reg["neg"]
                region_sum = region_sum + reg["loss"]
        total = w * inst_sum
        logs["loss/inst"] = w * inst_sum
        if self.region:
            total = total + (1 - w) * region_sum
            logs["loss/region"] = (1 - w) * region_sum
            clu = 0.0
            for v in (0, 1):
                sd = self.cluster(out.online[v].dots, out.target[v].dots)
                logs[f"loss/cluster_ce_v{v + 1}"] = sd["ce"]
                logs[f"loss/cluster_me_max_v{v + 1}"] = sd["me_max"]
                clu = clu + sd["loss"]
            clu = clu / 2
            logs["loss/cluster"] = clu
            logs["loss/base"] = total
            # logged only (no gradient): where the cluster self-distillation stands
            logs.update(region_diagnostics(out.online, clu, self.cluster.num_proto))
            total = total + self.loss_w_cluster * clu
        logs["loss"] = total
        return logs


def build_loss(cfg: ModelConfig) -> nn.Module:
    """The objective of ``cfg.method``: FRA (also BYOL) or SwAV."""
    if cfg.method == "swav":
        from fra.losses.swav import SwAVLoss

        return SwAVLoss.from_config(cfg)
    return FRALoss.from_config(cfg)
