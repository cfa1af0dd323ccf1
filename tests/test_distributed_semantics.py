"""Two gloo processes reproduce the reference's cross-worker reductions (FRA_SPEC §6).

Loss values equal the single-process full-batch values; the cluster cross-entropy gradient
equals the full-batch gradient after DDP averaging, and the mean-entropy gradient is exactly
1/W of it (the reference's in-place, non-differentiable all-reduce).
"""
import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from fra.config import ModelConfig
from fra.losses import ClusterLoss, FRALoss
from fra.models import build_model

W = 2
CFG = ModelConfig(backbone="resnet18", hidden_dim=32, num_proto=4, dropout=0.0)


def _inputs():
    g = torch.Generator().manual_seed(1)
    images = torch.randn(2, 8, 3, 32, 32, generator=g, dtype=torch.float64)
    student = torch.randn(8, 4, 3, 3, generator=g, dtype=torch.float64)
    teacher = torch.randn(8, 4, 3, 3, generator=g, dtype=torch.float64)
    return images, student, teacher


def _compute(rows: slice):
    """Model losses (eval-mode BN so per-sample maths is batch-independent) and cluster grads."""
    images, student, teacher = _inputs()
    torch.manual_seed(0)
    model = build_model(CFG).double().eval()
    with torch.no_grad():
        losses = FRALoss.from_config(CFG)(model(images[0, rows], images[1, rows]))
    grads = {}
    for part in ("ce", "me_max"):
        s = student[rows].clone().requires_grad_(True)
        out = ClusterLoss(4)(s, teacher[rows])
        out[part].backward()
        grads[part] = s.grad
    return {k: float(v) for k, v in losses.items()}, grads


def _worker(rank: int, store: str, out_dir: str):
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=W)
    try:
        torch.set_num_threads(1)
        per = 8 // W
        losses, grads = _compute(slice(rank * per, (rank + 1) * per))
        torch.save({"losses": losses, "grads": grads}, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_two_gloo_workers_match_full_batch(tmp_path):
    mp.start_processes(_worker, args=(str(tmp_path / "store"), str(tmp_path)), nprocs=W, start_method="spawn")
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(W)]
    full_losses, full_grads = _compute(slice(0, 8))
    for key in ("loss", "loss/inst", "loss/region", "loss/cluster"):
        mean = sum(r["losses"][key] for r in ranks) / W  # what DDP's averaged objective is
        assert mean == pytest.approx(full_losses[key], rel=1e-10), key
    # me-max and mask-embedding means are global: identical on every worker
    assert ranks[0]["losses"]["loss/cluster_me_max_v1"] == pytest.approx(ranks[1]["losses"]["loss/cluster_me_max_v1"], rel=1e-12)
    per = 8 // W
    for part, factor in (("ce", 1.0), ("me_max", 1.0 / W)):
        ddp = torch.cat([r["grads"][part] for r in ranks]) / W  # DDP averages worker gradients
        torch.testing.assert_close(ddp, factor * full_grads[part], rtol=1e-9, atol=1e-14)
    assert per * W == 8


def test_host_collectives_go_to_cuda_under_nccl(monkeypatch):
    """Counters and metrics are CPU tensors; NCCL refuses those, so they travel on the GPU."""
    from fra import dist as fdist

    assert fdist.collective_device().type == "cpu" and fdist.all_reduce_sum_host(torch.ones(2)).tolist() == [1, 1]
    monkeypatch.setattr(fdist, "is_distributed", lambda: True)
    monkeypatch.setattr(fdist.dist, "get_backend", lambda *a: "nccl")
    monkeypatch.setattr(fdist.torch.cuda, "current_device", lambda: 0)
    assert fdist.collective_device() == torch.device("cuda", 0)
    monkeypatch.setattr(fdist.dist, "get_backend", lambda *a: "gloo")
    assert fdist.collective_device() == torch.device("cpu")
