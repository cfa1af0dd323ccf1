"""The FRA model: online/target encoders (backbone + region neck) and the predictors.

Attribute names follow the reference (``online_net``, ``target_net``, ``predictor``,
``predictor_obj``; inside an encoder ``backbone`` and ``neck``) so that official
checkpoints load with ``strict=True`` (FRA_SPEC §13.2).

The forward only computes representations. State changes are explicit calls from the loop:
:meth:`FRA.update_prototypes` (``proto`` EMA buffers) and :meth:`FRA.momentum_update`
(target EMA).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from fra.config import ModelConfig
from fra.models.backbones import build_backbone
from fra.models.mlp import MLP1D
from fra.models.neck import NeckOutput, RegionNeck


class Encoder(nn.Module):
    """Backbone + region neck (the reference's ``EncoderObj``)."""

    def __init__(self, backbone: nn.Module, neck: RegionNeck):
        super().__init__()
        self.backbone = backbone
        self.neck = neck

    def forward(self, x: torch.Tensor, use_proto: bool = False) -> NeckOutput:
        return self.neck(self.backbone(x), use_proto=use_proto)


@dataclass
class FRAOutput:
    """Outputs of one training forward on two views.

    Attributes:
        online: per view, the online network's :class:`NeckOutput` (with gradient).
        target: per view, the target network's outputs (no gradient).
        pred: per view, ``predictor(online z_g)`` (B, D).
        pred_obj: per view, ``predictor_obj(online obj_val)`` (B, K, D), or None (BYOL).
    """

    online: list[NeckOutput]
    target: list[NeckOutput]
    pred: list[torch.Tensor]
    pred_obj: list[torch.Tensor | None]


def _build_encoder(cfg: ModelConfig) -> Encoder:
    backbone = build_backbone(cfg.backbone)
    neck = RegionNeck(
        backbone.out_channels, cfg.hidden_dim, cfg.proj_dim, cfg.num_proto,
        region=cfg.method == "fra", scale=cfg.heatmap_scale, proto_momentum=cfg.proto_momentum,
        nhead=cfg.decoder_heads, num_layers=cfg.decoder_layers, dim_feedforward=cfg.decoder_ffn,
        dropout=cfg.dropout,
    )
    return Encoder(backbone, neck)


class FRA(nn.Module):
    """Online/target networks trained BYOL-style, with FRA's region branch.

    Args:
        cfg: the model configuration (``method="byol"`` drops the region branch).
    """

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.online_net = _build_encoder(cfg)
        self.target_net = _build_encoder(cfg)
        # NOTE: as the reference, only *parameters* are copied: the target's BN running
        # stats and its `proto` buffer start from their own init (FRA_SPEC §3.2, §4).
        for p_o, p_t in zip(self.online_net.parameters(), self.target_net.parameters()):
            p_t.data.copy_(p_o.data)
            p_t.requires_grad = False
        self.predictor = MLP1D(cfg.proj_dim, cfg.hidden_dim, cfg.proj_dim)
        self.predictor_obj = MLP1D(cfg.proj_dim, cfg.hidden_dim, cfg.proj_dim) if cfg.method == "fra" else None
        # Teacher centre of the reference: kept for checkpoint compatibility, always zero.
        self.register_buffer("center", torch.zeros(1, cfg.num_proto))

    @property
    def backbone(self) -> nn.Module:
        """The online backbone: what gets exported and evaluated downstream."""
        return self.online_net.backbone

    def train(self, mode: bool = True) -> FRA:
        super().train(mode)
        if mode and self.cfg.ema == "eman":
            # EMAN: the target runs in eval mode (running-stat BN, no dropout).
            self.target_net.eval()
        return self

    def forward_online(self, im_v1: torch.Tensor, im_v2: torch.Tensor):
        """The gradient-carrying half: online encoder on both views and the predictors."""
        online = [self.online_net(im_v1), self.online_net(im_v2)]
        pred = [self.predictor(o.z_g) for o in online]
        pred_obj = [self.predictor_obj(o.obj_val) if self.predictor_obj is not None else None for o in online]
        return online, pred, pred_obj

    def forward(self, im_v1: torch.Tensor, im_v2: torch.Tensor, online: nn.Module | None = None) -> FRAOutput:
        """Two views (B, 3, H, W) each -> :class:`FRAOutput`.

        Call order online v1, online v2, target v1, target v2, as in the reference (the BN
        running statistics depend on it).

        Args:
            online: a (DDP-wrapped) :class:`OnlineView` of this model to run the online half
                through; the target is never wrapped.
        """
        online_out, pred, pred_obj = (online or self.forward_online)(im_v1, im_v2)
        with torch.no_grad():
            target = [self.target_net(im_v1), self.target_net(im_v2)]
        return FRAOutput(online=online_out, target=target, pred=pred, pred_obj=pred_obj)

    # Explicit state hooks called by the training loop (fra.engine.train_step).
    def after_forward(self, out: FRAOutput) -> None:
        self.update_prototypes(out)

    def after_backward(self, step: int) -> None:
        """Nothing to do for FRA (SwAV freezes its prototypes here)."""

    def set_epoch(self, epoch: int) -> None:
        """Nothing to do for FRA (SwAV starts its queue here)."""

    def after_step(self, step: int, momentum: float) -> None:
        self.momentum_update(momentum)

    @torch.no_grad()
    def update_prototypes(self, out: FRAOutput) -> None:
        """EMA of each network's ``proto`` buffer, once per view (FRA_SPEC §3.2 step 9)."""
        if not self.online_net.neck.region or not self.training:
            return
        for net, outs in ((self.online_net, out.online), (self.target_net, out.target)):
            if self.cfg.ema == "eman" and net is self.target_net:
                continue  # eval-mode target: the reference's proto update is train-only
            for o in outs:
                net.neck.update_proto(o.mask_embed_mean)

    @torch.no_grad()
    def momentum_update(self, momentum: float) -> None:
        """target <- m·target + (1-m)·online.

        FRAB (default): parameters only; buffers evolve on their own. EMAN: every
        state-dict entry, ``num_batches_tracked`` copied.
        """
        if self.cfg.ema == "frab":
            # t + (1-m)(o - t) = m·t + (1-m)·o, one fused pass
            torch._foreach_lerp_(list(self.target_net.parameters()),
                                 [p.detach() for p in self.online_net.parameters()], 1 - momentum)
            return
        online_sd = self.online_net.state_dict()
        for name, t in self.target_net.state_dict().items():
            o = online_sd[name]
            if t.dtype.is_floating_point:
                t.mul_(momentum).add_(o.detach(), alpha=1 - momentum)
            else:
                t.copy_(o)


class OnlineView(nn.Module):
    """The trainable parts of an :class:`FRA` model as one module, for DDP.

    DDP wraps only what receives gradients (online encoder and predictors); the target is
    updated by the EMA and never wrapped. The submodules are the *same* objects as in the
    model, so ``prepare_model(OnlineView(model))`` synchronises the model's gradients.
    """

    def __init__(self, model: FRA):
        super().__init__()
        self.online_net = model.online_net
        self.predictor = model.predictor
        self.predictor_obj = model.predictor_obj
        self._forward = model.forward_online.__func__

    def forward(self, im_v1: torch.Tensor, im_v2: torch.Tensor):
        return self._forward(self, im_v1, im_v2)


def build_model(cfg: ModelConfig) -> nn.Module:
    """Build the model of ``cfg.method`` (fra, byol or swav)."""
    from fra.models.swav import SwAV

    return {"fra": FRA, "byol": FRA, "swav": SwAV}[cfg.method](cfg)


def online_view(model: nn.Module) -> nn.Module:
    """The DDP-wrappable trainable part of any method's model."""
    from fra.models.swav import SwAV, SwAVOnlineView

    return SwAVOnlineView(model) if isinstance(model, SwAV) else OnlineView(model)
