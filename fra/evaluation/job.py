"""Running a downstream evaluation's per-worker loop as a Ray Train job.

FER, face alignment, attributes and affect train a head on a backbone the same way: the backbone's
weights go through the object store once, each worker runs the task's loop function with its
plain-data config, and rank 0 returns the history. Only the loop function and its config differ.
"""
from __future__ import annotations

from typing import Callable


def fit_evaluation(loop: Callable[[dict], dict], loop_config: dict, backbone_sd: dict, scaling, datasets: dict,
                   run_id: str, storage: str, what: str) -> dict:
    """Run ``loop`` on ``scaling.num_workers`` Train workers (a FER-style scaling section:
    ``num_workers``, ``use_gpu``, ``cpus_per_worker``, ``max_failures``); returns rank 0's loop output.

    ``loop_config`` gains ``backbone`` (an object reference when there are workers) and ``code``
    (the driver's :func:`fra.ray_runtime.code_origin`, checked by every worker). ``datasets["train"]``
    is handed to Ray Train as pretraining's is (:class:`fra.ray_runtime.EpochAlignedDataset`): a run
    restarted or resumed from its epoch-e checkpoint streams epoch e's order, augmentations and
    class-balanced draws, not epoch 0's again.

    Raises:
        RuntimeError: the run ended without a history (``what`` names the job in the message).
    """
    import ray
    from ray.train import FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    from fra.data.stream import ordered
    from fra.evaluation.data import eval_data_config
    from fra import storage as st
    from fra.ray_runtime import EpochAlignedDataset, code_origin, ingest_options, init_ray, train_worker_runtime_env

    init_ray()
    workers = scaling.num_workers
    backbone = ray.put(backbone_sd) if workers > 0 else backbone_sd
    train_options = None
    if "train" in datasets:
        train = ordered(datasets["train"])
        train_options = ingest_options(train)
        datasets = {**datasets, "train": EpochAlignedDataset(train, st.join(storage, run_id))}
    trainer = TorchTrainer(
        loop, train_loop_config={**loop_config, "backbone": backbone, "code": code_origin()},
        torch_config=TorchConfig(backend=None if scaling.use_gpu else "gloo"),
        scaling_config=ScalingConfig(num_workers=workers, use_gpu=scaling.use_gpu and workers > 0,
                                     resources_per_worker={"CPU": scaling.cpus_per_worker} if workers else None),
        run_config=RunConfig(name=run_id, storage_path=storage, failure_config=FailureConfig(max_failures=scaling.max_failures),
                             worker_runtime_env=train_worker_runtime_env()),
        datasets=datasets, dataset_config=eval_data_config(train_options))
    result = trainer.fit()
    if not isinstance(result.return_value, dict) or "history" not in result.return_value:
        raise RuntimeError(f"{what} run {run_id} returned no history (result: {result})")
    return result.return_value


__all__ = ["fit_evaluation"]
