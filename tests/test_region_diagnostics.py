"""The region-branch diagnostics logged next to FRA's losses (issue 18): hand-computed values."""
from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch

from fra.losses.diagnostics import dots_spread, mean_pairwise_cosine, region_diagnostics


def test_mean_pairwise_cosine_by_hand():
    # cos((1,0),(0,1)) = 0, cos((1,0),(1,1)) = cos((0,1),(1,1)) = 1/sqrt(2): mean sqrt(2)/3
    e = torch.tensor([[1.0, 0.0], [0.0, 1.0], [2.0, 2.0]])
    assert mean_pairwise_cosine(e).item() == pytest.approx(math.sqrt(2) / 3, abs=1e-6)
    assert mean_pairwise_cosine(torch.tensor([[1.0, 2.0], [3.0, 6.0]])).item() == pytest.approx(1.0, abs=1e-6)
    with pytest.raises(ValueError, match="at least 2"):
        mean_pairwise_cosine(torch.ones(1, 3))


def test_dots_spread_by_hand():
    # (B=1, K=2, h=1, w=2): pixel 1 logits (0.2, -0.2) -> std 0.2; pixel 2 (1, 0) -> std 0.5; mean 0.35
    dots = torch.tensor([[[[0.2, 1.0]], [[-0.2, 0.0]]]])
    assert dots_spread(dots).item() == pytest.approx(0.35, abs=1e-6)


def test_region_diagnostics_keys_and_values():
    view = SimpleNamespace(dots=torch.tensor([[[[0.2, 1.0]], [[-0.2, 0.0]]]]),
                           mask_embed_mean=torch.tensor([[1.0, 0.0], [0.0, 1.0]]))
    out = region_diagnostics([view, view], torch.tensor(math.log(2) / 2), num_proto=2)
    assert out["diag/cluster_over_lnk"].item() == pytest.approx(0.5, abs=1e-6)
    assert out["diag/dots_spread"].item() == pytest.approx(0.35, abs=1e-6)
    assert out["diag/mask_cos"].item() == pytest.approx(0.0, abs=1e-6)
    single = SimpleNamespace(dots=torch.zeros(1, 1, 2, 2), mask_embed_mean=torch.ones(1, 3))
    assert set(region_diagnostics([single], torch.tensor(0.0), num_proto=1)) == {"diag/dots_spread"}


def test_fra_loss_logs_the_diagnostics_without_changing_the_loss():
    from fra.config import ModelConfig
    from fra.losses import FRALoss
    from fra.models import build_model

    torch.manual_seed(0)
    cfg = ModelConfig(backbone="resnet18", hidden_dim=32, proj_dim=16, num_proto=4, decoder_heads=2,
                      decoder_ffn=16, dropout=0.0)
    model = build_model(cfg).train()
    logs = FRALoss.from_config(cfg)(model(torch.randn(4, 3, 64, 64), torch.randn(4, 3, 64, 64)))
    assert logs["diag/cluster_over_lnk"].item() == pytest.approx(logs["loss/cluster"].item() / math.log(4), rel=1e-6)
    assert 0 < logs["diag/dots_spread"].item() < 2 and -1 <= logs["diag/mask_cos"].item() <= 1
    expected = logs["loss/base"] + cfg.loss_w_cluster * logs["loss/cluster"]
    assert logs["loss"].item() == pytest.approx(expected.item(), rel=1e-6)
    assert not any(v.requires_grad for k, v in logs.items() if k.startswith("diag/"))
