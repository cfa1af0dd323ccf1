"""Downstream evaluation: FER fine-tune / linear probe on Ray Train, and a cheap feature probe.

Heavy modules (Ray, MLflow) load lazily; see :mod:`fra.evaluation.fer` for the stable API.
"""
from __future__ import annotations

__all__ = ["FERConfig", "FERResult", "evaluate_fer", "linear_probe_features", "ProbeResult", "resolve_backbone"]


def __getattr__(name: str):
    if name in ("FERConfig", "FERResult", "evaluate_fer"):
        from fra.evaluation import fer

        return getattr(fer, name)
    if name in ("linear_probe_features", "ProbeResult"):
        from fra.evaluation import probe

        return getattr(probe, name)
    if name == "resolve_backbone":
        from fra.evaluation.backbones import resolve_backbone

        return resolve_backbone
    raise AttributeError(f"module 'fra.evaluation' has no attribute {name!r}")
