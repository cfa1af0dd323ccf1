"""Training guards: the collapse detector (non-finite losses: :mod:`fra.nonfinite`).

A guard must reach the *same* decision on every worker, otherwise one rank stops while the
others block in the next collective. Non-finite flags are agreed over workers by
:class:`fra.nonfinite.FiniteCheck` at its checks; collapse is judged on metrics that were
already averaged over workers.
"""
from __future__ import annotations

import logging
import math

import torch

from fra.errors import FraError

log = logging.getLogger(__name__)


class CollapseError(FraError):
    """Representations collapsed (``run.collapse_action: stop``)."""


@torch.no_grad()
def heatmap_uniformity(model, probe: torch.Tensor) -> float:
    """Mean per-pixel entropy of the heat maps on a fixed probe batch, divided by ln K.

    1.0 means every pixel is spread evenly over the K regions (no region structure). Uses
    the ``proto`` heat maps, which need no collective, so any subset of ranks may call it.

    Args:
        probe: normalised images (B, 3, H, W).
    """
    from fra.heatmaps import compute_heatmaps

    heat = compute_heatmaps(model, probe, mode="proto").float()  # (B, K, H, W)
    k = heat.shape[1]
    p = heat / heat.sum(dim=1, keepdim=True)
    ent = -(p * p.clamp_min(1e-12).log()).sum(dim=1).mean()
    return float(ent / math.log(k)) if k > 1 else 0.0


class CollapseDetector:
    """Flags collapse after ``patience`` consecutive suspicious logs.

    Suspicious: the cluster cross-entropy (FRA; for SwAV the swapped-prediction loss) is within
    ``tol`` (relative) of ln K — the student predicts the uniform distribution whatever the
    Sinkhorn targets are — or the probe heat maps are near uniform (normalised entropy ≥ 1 − tol).

    Args:
        num_proto: K (FRA's regions, or SwAV's prototypes).
        patience: consecutive logs before acting; 0 disables the detector.
        action: "warn" (log once per episode) or "stop" (raise :class:`CollapseError`).
        keys: the cross-entropy metrics compared with ln K (their mean).
        label: what they are called in the message.
    """

    def __init__(self, num_proto: int, patience: int, action: str = "warn", tol: float = 0.02,
                 keys: tuple[str, ...] = ("loss/cluster_ce_v1", "loss/cluster_ce_v2"),
                 label: str = "cluster cross-entropy"):
        self.keys, self.label = keys, label
        self.ln_k = math.log(num_proto)
        self.patience, self.action, self.tol = patience, action, tol
        self.count = 0  # consecutive suspicious logs: > 0 while a window is open
        self.since = -1  # step of the window's first suspicious log
        self.warned = False

    @property
    def enabled(self) -> bool:
        return self.patience > 0 and self.ln_k > 0

    def suspicious(self, metrics: dict[str, float]) -> str:
        """A reason string if these metrics look collapsed, else ""."""
        ce = [metrics[k] for k in self.keys if k in metrics]
        if ce and abs(sum(ce) / len(ce) - self.ln_k) <= self.tol * self.ln_k:
            return f"{self.label} {sum(ce) / len(ce):.4f} ≈ ln K = {self.ln_k:.4f}"
        uni = metrics.get("heatmap_uniformity")
        if uni is not None and uni >= 1 - self.tol:
            return f"heat maps near uniform (normalised entropy {uni:.3f})"
        return ""

    def update(self, metrics: dict[str, float]) -> str:
        """Feed one log's (worker-averaged) metrics; returns the warning issued, if any."""
        if not self.enabled:
            return ""
        reason = self.suspicious(metrics)
        if not reason:
            self.count, self.warned = 0, False
            return ""
        self.count += 1
        if self.count == 1:
            self.since = int(metrics.get("step", -1))
        if self.count < self.patience:
            return ""
        msg = (f"representation collapse suspected at step {int(metrics.get('step', -1))}: {reason} "
               f"for {self.count} consecutive logs (since step {self.since})")
        if self.action == "stop":
            raise CollapseError(msg + " (run.collapse_action=stop); the last checkpoint written before "
                                "that first suspicious log is kept")
        if not self.warned:
            log.warning("%s", msg)
            self.warned = True
        return msg
