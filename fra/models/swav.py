"""SwAV, the method behind FRL's released face checkpoints (FRL_SPEC §1.2).

"We compute a code from an augmented version of the image and predict this code from other
augmented versions of the same image" (Caron et al., 2020). Backbone → projector (Linear,
BN, ReLU, Linear) → L2-normalised embedding z (D = 128) → scores against K = 3000
unit-norm prototypes. The swapped-prediction loss lives in :mod:`fra.losses.swav`.

Attribute names are FRL's (``base_net``, ``projection_net.net.{0,1,3}``, ``prototypes``), so
``model.state_dict()`` under DDP's ``module.`` prefix is FRL's release layout (§1.6) and
:func:`fra.checkpoint.load_backbone` reads it as ``frl``.

State changes are explicit calls from the loop: :meth:`SwAV.after_forward` (queue push),
:meth:`SwAV.after_backward` (prototype freezing), :meth:`SwAV.after_step` (prototype
re-normalisation), :meth:`SwAV.set_epoch` (queue start).
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

from fra import dist
from fra.config import SwAVConfig  # noqa: F401  (re-exported)
from fra.models.backbones import build_backbone

if TYPE_CHECKING:  # fra.config will nest SwAVConfig: no runtime import back into it
    from fra.config import ModelConfig

log = logging.getLogger(__name__)


@dataclass
class SwAVOutput:
    """Outputs of one training forward on all crops.

    Attributes:
        embeddings: per crop, the L2-normalised projection (B, D).
        scores: per crop, the prototype scores ``z · c_k`` (B, K).
        queue_scores: (A, L, K) prototype scores of the queued embeddings of each of the A
            assigned crops, without gradient; None while no full queue is in use.
    """

    embeddings: list[torch.Tensor]
    scores: list[torch.Tensor]
    queue_scores: torch.Tensor | None = None


class ProjectionHead(nn.Module):
    """FRL's ``projection_net``: Linear → BatchNorm1d → ReLU → Linear (names ``net.{0,1,3}``)."""

    def __init__(self, in_dim: int, hidden_dim: int, out_dim: int):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(in_dim, hidden_dim), nn.BatchNorm1d(hidden_dim), nn.ReLU(inplace=True),
                                 nn.Linear(hidden_dim, out_dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(N, in_dim) -> (N, out_dim), not normalised."""
        return self.net(x)


def _same_size_runs(views: tuple[torch.Tensor, ...]) -> list[list[torch.Tensor]]:
    """Group consecutive views of equal spatial size (the reference's ``unique_consecutive``)."""
    runs: list[list[torch.Tensor]] = []
    for v in views:
        if runs and runs[-1][0].shape[-2:] == v.shape[-2:]:
            runs[-1].append(v)
        else:
            runs.append([v])
    return runs


class SwAV(nn.Module):
    """Backbone + projector + prototypes; the whole model is trained (no target network).

    Args:
        cfg: the model configuration (``backbone`` is used; ``method`` is ``swav``).
        swav: SwAV hyper-parameters; defaults to ``cfg.swav``.
    """

    def __init__(self, cfg: ModelConfig, swav: SwAVConfig | None = None):
        super().__init__()
        self.cfg = cfg
        self.swav = swav if swav is not None else cfg.swav
        s = self.swav
        self.base_net = build_backbone(cfg.backbone)
        self.projection_net = ProjectionHead(self.base_net.out_channels, s.proj_hidden, s.proj_dim)
        self.prototypes = nn.Linear(s.proj_dim, s.num_prototypes, bias=False)
        # NOTE: the reference re-normalises the prototypes at the *start* of every iteration; we do it
        # at construction and after every step (after_step), so every forward sees the same weights.
        self.normalize_prototypes()
        # Per-rank queue of past embeddings (A, L_local, D). A non-persistent buffer outside the
        # DDP-wrapped SwAVOnlineView, so DDP never broadcasts rank 0's queue over the others.
        # NOTE: the reference saves it to queue<rank>.pth; ours restarts empty after a resume and
        # refills within queue_length / global_batch steps.
        self.register_buffer("queue", torch.zeros(0), persistent=False)
        self.queue_filled = 0  # embeddings pushed since the queue was allocated (capped at its length)
        self.queue_active = False

    @property
    def backbone(self) -> nn.Module:
        """The trunk that gets exported and evaluated downstream."""
        return self.base_net

    def forward_online(self, *views: torch.Tensor) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """All crops -> (embeddings, scores), one (B, D) / (B, K) tensor per crop.

        Consecutive crops of equal size go through the backbone together (BN statistics over
        that run of crops) and the projector sees all crops at once, as in the reference.
        """
        feats = [self.base_net(torch.cat(run)).mean(dim=(2, 3)) for run in _same_size_runs(views)]
        z = F.normalize(self.projection_net(torch.cat(feats)), dim=1)
        scores = self.prototypes(z)
        b = views[0].shape[0]
        return list(z.split(b)), list(scores.split(b))

    def forward(self, *views: torch.Tensor, online: nn.Module | None = None) -> SwAVOutput:
        """Crops (B, 3, H_i, W_i), global crops first -> :class:`SwAVOutput`.

        Args:
            online: a (DDP-wrapped) :class:`SwAVOnlineView` of this model to run through.
        """
        if len(views) < 2:
            raise ValueError(f"SwAV needs at least 2 crops, got {len(views)}")
        embeddings, scores = (online or self.forward_online)(*views)
        queue_scores = None
        if self.queue_in_use:
            with torch.no_grad():
                queue_scores = self.prototypes(self.queue)
        return SwAVOutput(embeddings, scores, queue_scores)

    # ------------------------------------------------------------------ explicit state hooks
    @property
    def queue_in_use(self) -> bool:
        """The queue joins the Sinkhorn batch once it is full (reference: last row non-zero)."""
        return self.queue.numel() > 0 and self.queue_filled >= self.queue.shape[1]

    def set_epoch(self, epoch: int) -> None:
        """Start the queue from ``epoch_queue_starts`` on (it is then never stopped)."""
        if self.swav.queue_length > 0 and epoch >= self.swav.epoch_queue_starts:
            self.queue_active = True

    def after_forward(self, out: SwAVOutput) -> None:
        """Push the assigned crops' embeddings into the queue (after the loss has read it)."""
        if self.queue_active and self.training:
            self.push_queue(out)

    def after_backward(self, step: int) -> None:
        """Drop the prototype gradients for the first ``freeze_prototypes_iters`` steps.

        The gradient is set to None (as the reference), not zeroed: the optimiser then skips the
        tensor entirely, so weight decay and momentum do not move it either.
        """
        if step < self.swav.freeze_prototypes_iters:
            self.prototypes.weight.grad = None

    def after_step(self, step: int, momentum: float) -> None:
        """Project the prototypes back onto the unit sphere (no EMA: ``momentum`` is unused)."""
        self.normalize_prototypes()

    @torch.no_grad()
    def normalize_prototypes(self) -> None:
        w = self.prototypes.weight
        w.copy_(F.normalize(w, dim=1))

    @torch.no_grad()
    def push_queue(self, out: SwAVOutput) -> None:
        """queue[i] <- [embeddings of crop crops_for_assign[i]; queue[i] minus its oldest rows]."""
        b = out.embeddings[0].shape[0]
        if self.queue.numel() == 0:
            self._allocate_queue(b, out.embeddings[0])
            if self.queue.numel() == 0:
                return
        for i, crop in enumerate(self.swav.crops_for_assign):
            self.queue[i, b:] = self.queue[i, :-b].clone()
            self.queue[i, :b] = out.embeddings[crop].detach().to(self.queue.dtype)
        self.queue_filled = min(self.queue_filled + b, self.queue.shape[1])

    def _allocate_queue(self, batch: int, like: torch.Tensor) -> None:
        world = dist.world_size()
        length = self.swav.queue_length - self.swav.queue_length % (batch * world)
        if length == 0:
            log.warning("SwAV queue_length %d is shorter than the global batch %d: no queue",
                        self.swav.queue_length, batch * world)
            self.queue_active = False
            return
        # Rows are kept in the parameter dtype even when AMP hands us half-precision embeddings.
        self.queue = torch.zeros(len(self.swav.crops_for_assign), length // world, self.swav.proj_dim,
                                 dtype=self.prototypes.weight.dtype, device=like.device)
        self.queue_filled = 0


class SwAVOnlineView(nn.Module):
    """The trainable part of a :class:`SwAV` model as one module, for DDP.

    Everything but the queue: the submodules are the *same* objects as in the model, and the
    per-rank queue buffer stays outside DDP's buffer broadcast.
    """

    def __init__(self, model: SwAV):
        super().__init__()
        self.base_net = model.base_net
        self.projection_net = model.projection_net
        self.prototypes = model.prototypes
        self._forward = SwAV.forward_online

    def forward(self, *views: torch.Tensor) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        return self._forward(self, *views)


def frl_checkpoint(model: SwAV, epoch: int, optimizer: torch.optim.Optimizer | None = None) -> dict:
    """A checkpoint dict in FRL's layout (§1.6): ``epoch``, ``state_dict`` with ``module.`` keys, ``optimizer``."""
    sd = {f"module.{k}": v.detach().cpu() for k, v in model.state_dict().items()}
    out = {"epoch": int(epoch), "state_dict": sd}
    if optimizer is not None:
        out["optimizer"] = optimizer.state_dict()
    return out
