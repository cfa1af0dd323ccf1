"""Tiny two-worker Ray Train jobs under Ray worker options: is there a cheaper Ray job for the tests?

Starts the tests' local Ray (``tests.conftest.init_local_ray``), then runs 4 Ray Train jobs in a row: two
workers (gloo) that each read their split of a 64-row ``ray.data.range`` and report once; prints each
job's wall time. The argument is ``none`` or a comma-separated module list for
``RAY_preload_python_modules`` (Ray imports those in every new worker process before it takes work).
Set ``RAY_TRAIN_V2_ENABLED=0`` in the environment to time Ray Train V1 instead. Results: RESULTS.md,
2026-12-07 ("the Ray-free pytest worker at nice 19").

    flock /tmp/fra-ray.lock .venv/bin/python benchmarks/ray_worker_options.py none
    flock /tmp/fra-ray.lock .venv/bin/python benchmarks/ray_worker_options.py torch,ray.train.torch,ray.data
    RAY_TRAIN_V2_ENABLED=0 flock /tmp/fra-ray.lock .venv/bin/python benchmarks/ray_worker_options.py none
"""
from __future__ import annotations

import os
import sys
import tempfile
import time
from pathlib import Path


def _loop(config: dict) -> None:
    import ray.train
    import torch  # noqa: F401  (what a training worker imports)

    shard = ray.train.get_dataset_shard("train")
    ray.train.report({"n": sum(len(b["id"]) for b in shard.iter_batches(batch_size=8))})


def main() -> None:
    mode = sys.argv[1] if len(sys.argv) > 1 else "none"
    if mode != "none":
        os.environ["RAY_preload_python_modules"] = mode
    os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.25")  # as in the tests
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    import ray
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    from tests.conftest import init_local_ray, shutdown_ray

    t0 = time.time()
    init_local_ray()
    print("Ray started in", round(time.time() - t0, 1), "s", flush=True)
    times = []
    for i in range(4):
        t = time.time()
        TorchTrainer(_loop, torch_config=TorchConfig(backend="gloo"), datasets={"train": ray.data.range(64)},
                     scaling_config=ScalingConfig(num_workers=2, resources_per_worker={"CPU": 1}),
                     run_config=RunConfig(name=f"j{i}", storage_path=tempfile.mkdtemp())).fit()
        times.append(round(time.time() - t, 1))
        print("job", i, times[-1], "s", flush=True)
    shutdown_ray()
    print(mode, "V1" if os.environ.get("RAY_TRAIN_V2_ENABLED") == "0" else "V2", times)


if __name__ == "__main__":
    main()
