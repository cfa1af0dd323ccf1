"""How the trainable model is wrapped in DistributedDataParallel (``scaling.ddp``).

``prepare`` is what every Ray Train worker calls instead of a bare ``prepare_model``: the DDP
options come from the config, and the optional bf16 gradient compression is registered as a
communication hook on the wrapped model.
"""
from __future__ import annotations

import logging

from torch import nn

from fra.config import PretrainConfig

log = logging.getLogger(__name__)


def syncbn_active(cfg: PretrainConfig) -> bool:
    """SyncBatchNorm is used only on GPUs (torch has none on CPU; see ``build_training_objects``)."""
    return cfg.scaling.use_gpu and cfg.model.norm == "syncbn"


def ddp_options(cfg: PretrainConfig) -> dict:
    """Keyword arguments for ``DistributedDataParallel`` from ``scaling.ddp``."""
    ddp = cfg.scaling.ddp
    broadcast = not syncbn_active(cfg) if ddp.broadcast_buffers == "auto" else bool(ddp.broadcast_buffers)
    return {"broadcast_buffers": broadcast, "gradient_as_bucket_view": ddp.gradient_as_bucket_view}


def attach_hooks(model: nn.Module, cfg: PretrainConfig) -> nn.Module:
    """Register the bf16 gradient compression hook on a DDP-wrapped model if configured.

    Gradients are cast to bfloat16 for the all-reduce and back afterwards: half the bytes on the
    wire, 8 bits of mantissa. The config allows it only with GPUs (NCCL); a model that was not
    wrapped (one worker) is returned unchanged.
    """
    from torch.nn.parallel import DistributedDataParallel

    if cfg.scaling.ddp.bf16_compress and isinstance(model, DistributedDataParallel):
        from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import bf16_compress_hook

        model.register_comm_hook(state=None, hook=bf16_compress_hook)
        log.info("DDP gradients are all-reduced in bfloat16 (scaling.ddp.bf16_compress)")
    return model


def prepare(module: nn.Module, cfg: PretrainConfig) -> nn.Module:
    """``ray.train.torch.prepare_model`` with fra's DDP options (the module is already on its device)."""
    import ray.train.torch

    wrapped = ray.train.torch.prepare_model(module, move_to_device=False, parallel_strategy_kwargs=ddp_options(cfg))
    return attach_hooks(wrapped, cfg)
