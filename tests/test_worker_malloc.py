"""What an evaluation's Ray Train worker gets from ``fit_evaluation``: glibc's malloc limited to one
arena, and its training stream in the dataset's block order.

Ray Train runs the training loop on a thread that is not the worker's main thread; glibc would give
it an arena of its own, whose heaps go back to the kernel and are faulted in again every step
(benchmarks/RESULTS.md, FER at RAF-DB's size). ``malloc_info`` lists one ``<heap nr=...>`` per
arena, so the count is read from glibc itself, on the training thread of a real Train worker.

Order (fra.data.stream, "Order"): without it, blocks reach the worker in the order their tasks
finish, and two runs of the same FER config saw different batches at the same step (their
training losses differed). The stream here makes the first blocks the slowest to finish.
"""
from __future__ import annotations

import ctypes
import os
import re
import sys
import tempfile
import threading
import types
from pathlib import Path

import pytest


def _arenas() -> int:
    """How many malloc arenas this process has, from glibc's ``malloc_info`` XML."""
    libc = ctypes.CDLL("libc.so.6")
    libc.fopen.restype = ctypes.c_void_p
    libc.fopen.argtypes = [ctypes.c_char_p, ctypes.c_char_p]
    libc.fclose.argtypes = [ctypes.c_void_p]
    libc.malloc_info.argtypes = [ctypes.c_int, ctypes.c_void_p]
    with tempfile.NamedTemporaryFile(suffix=".xml") as f:
        fp = libc.fopen(f.name.encode(), b"w")
        assert libc.malloc_info(0, fp) == 0
        libc.fclose(fp)
        return len(re.findall(r'<heap nr="\d+">', Path(f.name).read_text()))


def _allocate() -> None:
    import torch

    for _ in range(20):  # a few MB per step, freed again, as a training step does
        (torch.randn(256, 1024) @ torch.randn(1024, 256)).sum()


def _loop(config: dict) -> dict:
    import ray.train

    _allocate()
    arenas = _arenas()
    ids = [int(i) for batch in ray.train.get_dataset_shard("train").iter_batches(batch_format="numpy")
           for i in batch["id"]]
    return {"history": [], "arenas": arenas, "env": os.environ.get("MALLOC_ARENA_MAX"),
            "main_thread": threading.current_thread() is threading.main_thread(), "ids": ids}


BLOCKS = 6


def _slow_first(batch: dict) -> dict:
    """A block's task takes longer the earlier the block: task-completion order is the reverse."""
    import time

    time.sleep(0.2 * (BLOCKS - int(batch["id"][0])))
    return batch


class _Plain:
    """A Ray worker started without fra's runtime env, allocating on a second thread."""

    def arenas(self) -> int:
        t = threading.Thread(target=_allocate)
        t.start()
        t.join()
        return _arenas()


@pytest.mark.ray
@pytest.mark.slow
def test_evaluation_train_worker_has_one_malloc_arena_and_its_stream_in_order(ray_local, tmp_path, monkeypatch):
    import ray
    from ray import cloudpickle

    from fra.evaluation.job import fit_evaluation

    monkeypatch.delenv("MALLOC_ARENA_MAX", raising=False)
    cloudpickle.register_pickle_by_value(sys.modules[__name__])  # the workers cannot import this test module
    try:
        # the probe can tell: a Ray worker with a second allocating thread has more than one arena
        assert ray.get(ray.remote(num_cpus=0)(_Plain).remote().arenas.remote()) > 1
        scaling = types.SimpleNamespace(num_workers=1, use_gpu=False, cpus_per_worker=1, max_failures=0)
        train = ray.data.range(BLOCKS, override_num_blocks=BLOCKS).map_batches(_slow_first, batch_size=None)
        out = fit_evaluation(_loop, {}, {}, scaling, {"train": train}, "arena", str(tmp_path / "ray"), "arena probe")
    finally:
        cloudpickle.unregister_pickle_by_value(sys.modules[__name__])
    assert out["main_thread"] is False  # the loop runs on Train's own thread, as in every fra job
    assert out["env"] == "1"
    assert out["arenas"] == 1
    assert out["ids"] == list(range(BLOCKS))
