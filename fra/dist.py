"""Distributed helpers in one place; every function is a no-op in a single process.

Ray Train (or torchrun) sets up the process group; fra only calls plain ``torch.distributed``.
"""
from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn


def is_distributed() -> bool:
    """True when a process group is initialised and has more than one member.

    Mirrors the reference's gate (classy_vision's ``is_distributed_training_run``).
    """
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def is_main_process() -> bool:
    return rank() == 0


def all_reduce_sum_(tensor: torch.Tensor) -> torch.Tensor:
    """In-place SUM all-reduce. Not differentiable: autograd sees the identity.

    NOTE: this reproduces the reference (FRA_SPEC §6): gradients flow only into the local
    contribution, so a mean computed as ``all_reduce_sum_(x) / W`` back-propagates 1/W of
    the full-batch gradient. Do not replace it with a differentiable all-reduce.
    """
    if is_distributed():
        # Autograd must treat the collective as identity; do it on the data of a view.
        dist.all_reduce(tensor.data if tensor.requires_grad else tensor)
    return tensor


def collective_device() -> torch.device:
    """Where a collective's tensors must live: CUDA under NCCL (it refuses CPU tensors), else CPU."""
    if is_distributed() and dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def all_reduce_sum_host(tensor: torch.Tensor) -> torch.Tensor:
    """SUM over workers of a host-side tensor (counters, metrics) on any backend; returns it on the CPU."""
    if not is_distributed():
        return tensor
    out = tensor.to(collective_device())
    dist.all_reduce(out)
    return out.cpu()


def all_reduce_mean(tensor: torch.Tensor) -> torch.Tensor:
    """Mean over workers with the reference's gradient semantics.

    The SUM is the non-differentiable in-place all-reduce above, the division by W is an
    ordinary (differentiable) op, so the local contribution receives 1/W of the gradient
    (FRA_SPEC §6: the mean-entropy term and the mask-embedding path).
    """
    if is_distributed():
        return all_reduce_sum_(tensor) / world_size()
    return tensor


def barrier() -> None:
    if is_distributed():
        dist.barrier()


def unwrap_model(model: nn.Module) -> nn.Module:
    """The bare module inside DDP / FSDP-like wrappers."""
    while hasattr(model, "module") and isinstance(model.module, nn.Module):
        model = model.module
    return model
