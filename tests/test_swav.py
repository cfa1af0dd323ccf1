"""SwAV (FRL's method): Sinkhorn codes, swapped prediction, prototype hooks, queue, FRL layout."""
import dataclasses
import math
import subprocess
import sys

import pytest
import torch

from fra.checkpoint import load_backbone
from fra.config import ModelConfig, from_dict
from fra.engine import train_step
from fra.errors import ConfigError
from fra.losses.swav import SwAVLoss, swav_collapse_check, swav_sinkhorn
from fra.models.swav import SwAV, SwAVConfig, SwAVOnlineView, SwAVOutput, frl_checkpoint
from fra.optim import LARS, lars_param_groups

TINY = SwAVConfig(num_prototypes=32, proj_hidden=64, proj_dim=16, nmb_crops=(2, 2), size_crops=(64, 32),
                  min_scale_crops=(0.14, 0.05), max_scale_crops=(1.0, 0.14))


def _model(swav=TINY, seed=0):
    torch.manual_seed(seed)
    return SwAV(ModelConfig(backbone="resnet18"), swav).train()


def _crops(batch=4, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(batch, 3, s, s, generator=g) for s in (64, 64, 32, 32)]


# ----------------------------------------------------------------------------- Sinkhorn / loss
@pytest.mark.parametrize("rows,k", [(12, 4), (8, 16)])
def test_sinkhorn_marginals(rows, k):
    scores = torch.randn(rows, k, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    codes = swav_sinkhorn(scores, epsilon=0.05, iters=3)
    # every sample's code is a distribution (the last step normalises the columns of Q)
    torch.testing.assert_close(codes.sum(dim=1), torch.ones(rows, dtype=torch.float64))
    assert (codes >= 0).all()
    # run to convergence: every prototype then receives the same mass rows / K (equipartition)
    converged = swav_sinkhorn(scores, epsilon=0.5, iters=500)
    torch.testing.assert_close(converged.sum(dim=0), torch.full((k,), rows / k, dtype=torch.float64),
                               rtol=1e-6, atol=1e-6)
    # three iterations already move the prototype masses towards equipartition
    raw = torch.softmax(scores / 0.05, dim=1).sum(dim=0)
    assert (codes.sum(dim=0) - rows / k).abs().max() < (raw - rows / k).abs().max()


def test_swapped_prediction_hand_computed():
    # Two crops, B = 2, K = 2, mirror-symmetric scores: exp(s / eps) is already balanced, so the
    # codes are its row-softmax: q = [sigmoid(2a/eps), sigmoid(-2a/eps)] (and mirrored).
    a, b, eps, tau = 0.025, 0.025, 0.05, 0.1
    s0 = torch.tensor([[a, -a], [-a, a]], dtype=torch.float64)
    s1 = torch.tensor([[b, -b], [-b, b]], dtype=torch.float64)
    q_hi = 1 / (1 + math.exp(-2 * a / eps))  # sigmoid(1) = 0.7311
    p_hi = 1 / (1 + math.exp(-2 * b / tau))  # sigmoid(0.5) = 0.6225
    by_hand = -(q_hi * math.log(p_hi) + (1 - q_hi) * math.log(1 - p_hi))  # 0.6085
    assert by_hand == pytest.approx(0.6085, abs=1e-4)
    loss = SwAVLoss(temperature=tau, epsilon=eps, sinkhorn_iters=3)(SwAVOutput([], [s0, s1]))
    assert float(loss["loss"]) == pytest.approx(by_hand, rel=1e-12)
    assert float(loss["loss/swav_crop0"]) == pytest.approx(by_hand, rel=1e-12)
    assert float(loss["loss/swav_crop1"]) == pytest.approx(by_hand, rel=1e-12)


def test_loss_averages_over_other_crops_and_assigned_crops():
    g = torch.Generator().manual_seed(3)
    scores = [torch.randn(5, 7, generator=g, dtype=torch.float64) for _ in range(4)]
    loss = SwAVLoss()(SwAVOutput([], scores))
    expected = 0.0
    for crop in (0, 1):
        q = swav_sinkhorn(scores[crop])
        ce = [-(q * torch.log_softmax(scores[v] / 0.1, dim=1)).sum(1).mean() for v in range(4) if v != crop]
        expected += sum(ce) / 3
    assert float(loss["loss"]) == pytest.approx(float(expected) / 2, rel=1e-12)


def test_uniform_scores_give_ln_k_and_collapse_is_flagged():
    k = 3000
    scores = [torch.zeros(6, k) for _ in range(8)]
    loss = float(SwAVLoss()(SwAVOutput([], scores))["loss"])
    assert loss == pytest.approx(math.log(k), rel=1e-6)
    assert swav_collapse_check(loss, k)
    assert not swav_collapse_check(0.5 * math.log(k), k)
    assert not swav_collapse_check(float("nan"), k)
    # identical rows (collapsed embeddings): codes become uniform, the loss cannot go below ln K
    row = torch.rand(1, 64, generator=torch.Generator().manual_seed(0)) * 2 - 1  # cosines in [-1, 1]
    collapsed = float(SwAVLoss()(SwAVOutput([], [row.expand(6, 64)] * 4))["loss"])
    assert collapsed >= math.log(64) - 1e-5


def test_queue_rows_join_sinkhorn():
    g = torch.Generator().manual_seed(5)
    scores = [torch.randn(3, 6, generator=g, dtype=torch.float64) for _ in range(3)]
    queue = torch.randn(2, 9, 6, generator=g, dtype=torch.float64)
    loss = SwAVLoss()(SwAVOutput([], scores, queue))
    expected = 0.0
    for i, crop in enumerate((0, 1)):
        q = swav_sinkhorn(torch.cat([queue[i], scores[crop]]))[-3:]
        expected += sum(-(q * torch.log_softmax(scores[v] / 0.1, 1)).sum(1).mean() for v in range(3) if v != crop) / 2
    assert float(loss["loss"]) == pytest.approx(float(expected) / 2, rel=1e-12)


_GLOO_WORKER = """
import sys, types, torch, torch.distributed as dist
from fra.losses.swav import SwAVLoss, swav_sinkhorn
rank, store, path = int(sys.argv[1]), sys.argv[2], sys.argv[3]
torch.set_num_threads(1)
dist.init_process_group("gloo", init_method="file://" + store, rank=rank, world_size=2)
g = torch.Generator().manual_seed(11)
scores = [torch.randn(8, 5, generator=g, dtype=torch.float64)[rank * 4:(rank + 1) * 4] for _ in range(3)]
out = types.SimpleNamespace(scores=scores, queue_scores=None)  # all the loss reads of a SwAVOutput
torch.save({"codes": swav_sinkhorn(scores[0]), "loss": float(SwAVLoss()(out)["loss"])}, path)
dist.destroy_process_group()
"""


@pytest.mark.slow
def test_two_gloo_workers_equal_the_global_batch(tmp_path):
    # Plain subprocesses importing only the loss (spawn would re-import this whole test module).
    procs = [subprocess.Popen([sys.executable, "-c", _GLOO_WORKER, str(r), str(tmp_path / "store"),
                               str(tmp_path / f"rank{r}.pt")]) for r in range(2)]
    assert [p.wait(timeout=120) for p in procs] == [0, 0]
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    g = torch.Generator().manual_seed(11)
    scores = [torch.randn(8, 5, generator=g, dtype=torch.float64) for _ in range(3)]
    torch.testing.assert_close(torch.cat([r["codes"] for r in ranks]), swav_sinkhorn(scores[0]), rtol=1e-12, atol=1e-15)
    full = float(SwAVLoss()(SwAVOutput([], scores))["loss"])
    assert sum(r["loss"] for r in ranks) / 2 == pytest.approx(full, rel=1e-12)  # DDP's averaged objective


# ----------------------------------------------------------------------------- model
def test_forward_backward_multicrop_resnet18():
    model = _model()
    out = model(*_crops())
    assert [tuple(z.shape) for z in out.embeddings] == [(4, 16)] * 4
    assert [tuple(s.shape) for s in out.scores] == [(4, 32)] * 4
    torch.testing.assert_close(out.embeddings[2].norm(dim=1), torch.ones(4))
    assert out.queue_scores is None
    losses = SwAVLoss.from_config(TINY)(out)
    assert {"loss", "loss/swav", "loss/swav_crop0", "loss/swav_crop1"} == set(losses)
    losses["loss"].backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None]
    assert not missing
    # an online view runs the same computation (what DDP wraps); the queue stays outside it
    view = SwAVOnlineView(model)
    model.eval()
    x = _crops(batch=2)
    a, b = model.forward_online(*x)[1], view(*x)[1]
    assert all(torch.equal(u, v) for u, v in zip(a, b))
    assert "queue" not in dict(view.named_buffers()) and "queue" not in model.state_dict()


def test_prototypes_frozen_then_trained_and_always_unit_norm():
    model = _model(dataclasses.replace(TINY, freeze_prototypes_iters=1))
    loss_fn = SwAVLoss.from_config(TINY)
    opt = LARS(lars_param_groups(model, 1e-6), lr=0.5, momentum=0.9)
    start = model.prototypes.weight.detach().clone()
    torch.testing.assert_close(start.norm(dim=1), torch.ones(32))
    crops = _crops()
    train_step(model, loss_fn, opt, *crops, step=0, lr=0.5, momentum=0.0)
    assert model.prototypes.weight.grad is None
    torch.testing.assert_close(model.prototypes.weight, start, rtol=0, atol=1e-6)  # frozen during step 0
    assert not torch.equal(model.base_net.conv1.weight, _model().base_net.conv1.weight)  # the rest trained
    train_step(model, loss_fn, opt, *crops, step=1, lr=0.5, momentum=0.0)
    assert (model.prototypes.weight - start).abs().max() > 1e-4  # trained from step 1 on
    torch.testing.assert_close(model.prototypes.weight.norm(dim=1), torch.ones(32))


def test_queue_starts_fills_and_is_used():
    swav = dataclasses.replace(TINY, queue_length=9, epoch_queue_starts=1)
    model = _model(swav)
    crops = _crops()
    model.set_epoch(0)
    model.after_forward(model(*crops))
    assert model.queue.numel() == 0  # not started before epoch_queue_starts
    model.set_epoch(1)
    out = model(*crops)
    model.after_forward(out)
    assert tuple(model.queue.shape) == (2, 8, 16)  # 9 rounded down to a multiple of the batch 4
    torch.testing.assert_close(model.queue[1, :4], out.embeddings[1].detach())
    assert not model.queue_in_use
    model.after_forward(model(*crops))
    out = model(*crops)
    assert model.queue_in_use and tuple(out.queue_scores.shape) == (2, 8, 32)
    assert torch.isfinite(SwAVLoss.from_config(swav)(out)["loss"])


def test_frl_layout_and_export_load_as_frl(tmp_path):
    model = _model()
    keys = set(model.state_dict())
    assert {"projection_net.net.0.weight", "projection_net.net.0.bias", "projection_net.net.1.running_var",
            "projection_net.net.3.weight", "prototypes.weight", "base_net.conv1.weight"} <= keys
    assert all(k.startswith(("base_net.", "projection_net.net.", "prototypes.")) for k in keys)
    assert tuple(model.projection_net.net[0].weight.shape) == (64, 512)  # resnet18: 512 in
    path = tmp_path / "ckp-0.pth"
    torch.save(frl_checkpoint(model, epoch=1), path)
    net, report = load_backbone(path)
    assert report.source.endswith("(frl)")
    assert any("prototypes" in k for k in report.unexpected) and any("projection_net" in k for k in report.unexpected)
    own = model.backbone.state_dict()
    assert all(torch.equal(v, own[k]) for k, v in net.state_dict().items() if not k.startswith("fc."))


def test_config_validation_and_yaml_lists():
    cfg = from_dict(SwAVConfig, {"nmb_crops": [2, 4], "size_crops": [96, 48], "min_scale_crops": [0.2, 0.05],
                                 "max_scale_crops": [1.0, 0.2]})
    assert cfg.nmb_crops == (2, 4) and cfg.total_crops == 6 and hash(cfg)
    assert SwAVConfig().freeze_prototypes_iters == 313 and SwAVConfig().num_prototypes == 3000
    with pytest.raises(ConfigError, match="same"):
        SwAVConfig(nmb_crops=(2,))
    with pytest.raises(ConfigError, match="crops_for_assign"):
        SwAVConfig(crops_for_assign=(0, 8))
    with pytest.raises(ConfigError, match="epsilon"):
        SwAVConfig(epsilon=0)
