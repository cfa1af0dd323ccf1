"""Losses, Sinkhorn, LARS groups and schedules."""
import math

import pytest
import torch

from fra.config import ModelConfig
from fra.losses import ClusterLoss, RegionLoss, cosine_loss, sinkhorn
from fra.models import build_model
from fra.optim import LARS, ema_momentum, lars_param_groups, pretrain_lr, warmup_cosine_lr


@pytest.mark.parametrize("rows,k", [(16, 4), (50, 8), (7, 3)])
def test_sinkhorn_marginals(rows, k):
    torch.manual_seed(0)
    probs = torch.softmax(torch.randn(rows, k, dtype=torch.float64) / 0.04, dim=1)
    q = sinkhorn(probs, iters=200)
    torch.testing.assert_close(q.sum(1), torch.ones(rows, dtype=torch.float64))
    torch.testing.assert_close(q.sum(0), torch.full((k,), rows / k, dtype=torch.float64), rtol=1e-6, atol=1e-6)
    q3 = sinkhorn(probs, iters=3)  # rows always exactly normalised, columns approximately
    torch.testing.assert_close(q3.sum(1), torch.ones(rows, dtype=torch.float64))


def test_cosine_and_region_loss_hand_values():
    p = torch.tensor([[1.0, 0.0], [0.0, 2.0]])
    assert float(cosine_loss(p, p)) == pytest.approx(0.0, abs=1e-7)
    assert float(cosine_loss(p, -p)) == pytest.approx(4.0)
    # 1 sample, K=2 regions in 2-D: region 0 matches, region 1 is orthogonal to its target
    pred = torch.tensor([[[1.0, 0.0], [0.0, 1.0]]])
    tgt = torch.tensor([[[1.0, 0.0], [1.0, 0.0]]])
    out = RegionLoss(0.02)(pred, tgt)
    assert float(out["pos"]) == pytest.approx(2 - 2 * 0.5)
    # neg: region 0 vs target 1: <(1,0),(1,0)>²=1; region 1 vs target 0: 0 -> mean (1/2)(1, 0) = 0.25
    assert float(out["neg"]) == pytest.approx(0.25)
    assert float(out["loss"]) == pytest.approx(1.0 + 0.02 * 0.25)


def test_cluster_loss_uniform_logits_is_ln_k():
    k = 8
    dots = torch.zeros(2, k, 3, 3)
    out = ClusterLoss(k)(dots, dots)
    assert float(out["ce"]) == pytest.approx(math.log(k), rel=1e-6)
    assert float(out["me_max"]) == pytest.approx(0.0, abs=1e-6)


def test_lars_groups_resnet18_match_reference_counts():
    model = build_model(ModelConfig(backbone="resnet18", hidden_dim=64))
    adapted, excluded = lars_param_groups(model, 1e-6)
    assert (len(excluded["params"]), len(adapted["params"])) == (68, 59)  # FRA_SPEC §7
    names = {id(p): n for n, p in model.named_parameters()}
    adapted_names = {names[id(p)] for p in adapted["params"]}
    assert "online_net.neck.proj.mlp.1.weight" in adapted_names  # MLP BN weight: adapted (reference quirk)
    assert "online_net.neck.proj_attn.query_embed.weight" in adapted_names


def test_lars_step_matches_formula_and_zero_grad_trust_ratio():
    w = torch.tensor([3.0, 4.0], dtype=torch.float64, requires_grad=True)
    b = torch.tensor([1.0], dtype=torch.float64, requires_grad=True)
    opt = LARS([{"params": [w], "weight_decay": 0.1, "lars_exclude": False},
                {"params": [b], "weight_decay": 0.0, "lars_exclude": True}], lr=0.5, momentum=0.9, eta=0.001)
    w.grad = torch.tensor([0.0, 0.0], dtype=torch.float64)
    b.grad = torch.tensor([2.0], dtype=torch.float64)
    w0 = w.detach().clone()
    opt.step()
    local = 0.001 * 5.0 / (0.0 + 0.1 * 5.0 + 1e-8)  # ≈ η/λ for a zero gradient
    torch.testing.assert_close(w.detach(), w0 - 0.5 * local * 0.1 * w0)
    torch.testing.assert_close(b.detach(), torch.tensor([1.0 - 0.5 * 2.0], dtype=torch.float64))
    b.grad = torch.tensor([2.0], dtype=torch.float64)
    opt.step()  # momentum: buf = 0.9·1.0 + 1.0
    torch.testing.assert_close(b.detach(), torch.tensor([0.0 - 1.9], dtype=torch.float64))


def test_schedules():
    # EMA momentum: FRA_SPEC §13.4 item 5
    assert [round(ema_momentum(i, 10), 8) for i in range(3)] == [0.996, 0.99609789, 0.99638197]
    assert ema_momentum(10, 10) == pytest.approx(1.0)
    # pretraining lr: warm-up per step, cosine per epoch, never 0 at the last epoch
    assert pretrain_lr(0, 100, 0.9, 50, 10) == pytest.approx(0.9 / 1000)
    assert pretrain_lr(999, 100, 0.9, 50, 10) == pytest.approx(0.9)
    assert pretrain_lr(1000, 100, 0.9, 50, 10) == pytest.approx(0.9)
    assert pretrain_lr(1050, 100, 0.9, 50, 10) == pytest.approx(0.9)  # per-epoch cosine: constant in epoch
    assert pretrain_lr(4999, 100, 0.9, 50, 10) == pytest.approx(0.00139, abs=1e-5)
    # FER: warm-up from 0 over 5 epochs then cosine to min_lr
    assert warmup_cosine_lr(0, 10, 2e-4, 100, 5) == 0.0
    assert warmup_cosine_lr(50, 10, 2e-4, 100, 5) == pytest.approx(2e-4)
    assert warmup_cosine_lr(1000, 10, 2e-4, 100, 5) == pytest.approx(1e-6)
