"""Shared pytest fixtures.

``ray_local``: one local Ray runtime per test session (4 logical CPUs on this 2-core machine,
a small object store, the dashboard (its State API lets Ray Train free the
placement groups of trials a Tune scheduler stops), Ray Data progress bars off, small Parquet read tasks).
Tests that use it are marked ``@pytest.mark.ray``.
"""
from __future__ import annotations

import os

import pytest


# The session's local Ray; tests that replace it with their own cluster restart it with these.
LOCAL_RAY = {"num_cpus": 4, "include_dashboard": True, "object_store_memory": 400 * 1024 * 1024,
             "log_to_driver": False, "configure_logging": False}


@pytest.fixture(scope="session")
def ray_local():
    os.environ.setdefault("RAY_DATA_PARQUET_BIN_PACKING_BYTES", "1048576")
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    os.environ.setdefault("RAY_DEDUP_LOGS", "0")
    import ray

    started = False
    if not ray.is_initialized():
        ray.init(address="local", **LOCAL_RAY)
        started = True
    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False
    ctx.print_on_execution_start = False
    yield ray
    if started:
        ray.shutdown()
