"""Hyper-parameter sweeps: Ray Tune around the project's pretraining, chained into a FER or landmark evaluation.

``fra.tuning.run_sweep(cfg, resume=True) -> SweepResult`` runs a sweep described by a
:class:`SweepConfig` (``load_sweep_config(path, overrides)``); :mod:`fra.tuning.space` turns the
search space written as data into Ray Tune domains. Heavy modules (Ray, MLflow) load lazily.
"""
from __future__ import annotations

__all__ = ["SweepConfig", "SweepResult", "SweepInterrupted", "load_sweep_config", "resolve", "run_sweep",
           "parse_space", "to_tune"]

_WHERE = {"SweepConfig": "config", "load_sweep_config": "config", "resolve": "config",
          "SweepResult": "sweep", "SweepInterrupted": "sweep", "run_sweep": "sweep",
          "parse_space": "space", "to_tune": "space"}


def __getattr__(name: str):
    if name in _WHERE:
        import importlib

        return getattr(importlib.import_module(f"fra.tuning.{_WHERE[name]}"), name)
    raise AttributeError(f"module 'fra.tuning' has no attribute {name!r}")
