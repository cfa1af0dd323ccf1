"""``scaling.ddp`` reaches DistributedDataParallel through ``ray.train.torch.prepare_model``.

Two Ray Train workers on gloo wrap a small model with :func:`fra.train.ddp.prepare`, once per option
set (in turn, in one Ray Train job), and record what DDP did: whether rank 0's buffers were broadcast before the forward, whether the gradients are views
into DDP's buckets, and which communication hook is registered.
"""
from __future__ import annotations

import json
import types

import pytest

from fra.config import PretrainConfig, from_dict, to_dict
from fra.errors import ConfigError
from fra.train.ddp import ddp_options


def _cfg(**scaling) -> PretrainConfig:
    return from_dict(PretrainConfig, {"model": {"norm": scaling.pop("norm", "bn")}, "scaling": scaling})


def test_broadcast_buffers_auto_follows_syncbn():
    assert ddp_options(_cfg(use_gpu=True, norm="syncbn")) == {"broadcast_buffers": False, "gradient_as_bucket_view": True}
    assert ddp_options(_cfg(use_gpu=True, norm="bn"))["broadcast_buffers"] is True
    assert ddp_options(_cfg(use_gpu=False, norm="syncbn"))["broadcast_buffers"] is True  # no SyncBN on CPU
    assert ddp_options(_cfg(use_gpu=True, norm="syncbn", ddp={"broadcast_buffers": True}))["broadcast_buffers"] is True
    assert ddp_options(_cfg(ddp={"gradient_as_bucket_view": False}))["gradient_as_bucket_view"] is False
    with pytest.raises(ConfigError, match="bf16_compress needs scaling.use_gpu"):
        _cfg(ddp={"bf16_compress": True})
    with pytest.raises(ConfigError, match="auto, true or false"):
        _cfg(ddp={"broadcast_buffers": "sometimes"})


def _loop(config: dict) -> None:
    """Each variant in turn, in the same two workers (one Ray Train job for all): wrap, step, record."""
    import ray.train

    rank = ray.train.get_context().get_world_rank()
    for variant in config["variants"]:
        out = _wrap_and_step(variant, rank)
        with open(f"{variant['out']}/rank{rank}.json", "w") as fh:
            json.dump(out, fh)


def _wrap_and_step(variant: dict, rank: int) -> dict:
    import torch
    from torch.nn.parallel import DistributedDataParallel

    from fra.train import ddp

    cfg = from_dict(PretrainConfig, variant["cfg"])
    torch.manual_seed(0)
    module = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.BatchNorm1d(4, momentum=0.0))
    if variant["bf16"]:  # the config refuses bf16_compress without GPUs; gloo runs the same hook here
        cfg = types.SimpleNamespace(scaling=types.SimpleNamespace(ddp=types.SimpleNamespace(bf16_compress=True)))
        model = ddp.attach_hooks(ddp.prepare(module, from_dict(PretrainConfig, variant["cfg"])), cfg)
    else:
        model = ddp.prepare(module, cfg)
    with torch.no_grad():  # rank-specific buffer; momentum 0 keeps it through the forward
        module[1].running_mean.fill_(float(rank + 1))
    model.train()
    torch.manual_seed(rank)
    model(torch.randn(8, 4)).square().sum().backward()
    return {"ddp": isinstance(model, DistributedDataParallel),
            "running_mean": module[1].running_mean[0].item(),
            "grad_is_bucket_view": all(p.grad._base is not None for p in module.parameters()),
            "hooks": [h.__name__ for h, _ in getattr(model, "_comm_hooks", [])],
            "grad": module[0].weight.grad.flatten().tolist()}


def _run(tmp_path, variants: dict[str, tuple[dict, bool]]) -> dict[str, list[dict]]:
    """``{name: (scaling.ddp, bf16 hook)}`` -> ``{name: [rank 0's record, rank 1's]}``."""
    import sys

    from ray import cloudpickle
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    cloudpickle.register_pickle_by_value(sys.modules[__name__])  # the workers cannot import this test module
    specs = []
    for name, (ddp, bf16) in variants.items():
        (tmp_path / name).mkdir()
        specs.append({"cfg": to_dict(_cfg(ddp=ddp)), "out": str(tmp_path / name), "bf16": bf16})
    TorchTrainer(_loop, train_loop_config={"variants": specs},
                 torch_config=TorchConfig(backend="gloo"),
                 scaling_config=ScalingConfig(num_workers=2, resources_per_worker={"CPU": 1}),
                 run_config=RunConfig(name="ddp_options", storage_path=str(tmp_path / "ray"))).fit()
    return {name: [json.loads((tmp_path / name / f"rank{r}.json").read_text()) for r in range(2)] for name in variants}


@pytest.mark.ray
@pytest.mark.slow
def test_ddp_options_reach_ddp_in_ray_train(ray_local, tmp_path):
    runs = _run(tmp_path, {"off": ({"broadcast_buffers": False, "gradient_as_bucket_view": True}, False),
                           "on": ({"broadcast_buffers": True, "gradient_as_bucket_view": False}, True)})
    off, on = runs["off"], runs["on"]
    assert all(r["ddp"] for r in off)
    assert [r["running_mean"] for r in off] == [1.0, 2.0]  # each rank kept its own buffer
    assert all(r["grad_is_bucket_view"] for r in off) and off[0]["grad"] == off[1]["grad"]
    assert off[0]["hooks"] == []
    assert [r["running_mean"] for r in on] == [1.0, 1.0]  # rank 0's buffer broadcast before the forward
    assert not any(r["grad_is_bucket_view"] for r in on) and on[0]["grad"] == on[1]["grad"]
    assert on[0]["hooks"] == ["bf16_compress_hook"]
    # the hook all-reduced in bfloat16: the same gradients as in float32, rounded to bf16 values
    import torch

    g16, g32 = torch.tensor(on[0]["grad"]), torch.tensor(off[0]["grad"])
    assert torch.equal(g16, g16.bfloat16().float()) and not torch.equal(g32, g32.bfloat16().float())
    assert torch.allclose(g16, g32, rtol=1e-2, atol=1e-3)
