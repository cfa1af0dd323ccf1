"""Model core: shapes, gradients, EMA, buffers, registry (pure torch, fast)."""
import math
import subprocess
import sys

import pytest
import torch

from fra.config import ModelConfig
from fra.errors import ConfigError
from fra.losses import FRALoss
from fra.models import BACKBONES, build_backbone, build_model

TINY = dict(hidden_dim=64, dropout=0.0)


def _forward(cfg, batch=4, size=64, seed=0):
    torch.manual_seed(seed)
    model = build_model(cfg).train()
    v1, v2 = torch.randn(batch, 3, size, size), torch.randn(batch, 3, size, size)
    out = model(v1, v2)
    return model, out, FRALoss.from_config(cfg)(out)


@pytest.mark.parametrize("batch,k,size", [(2, 2, 32), (4, 8, 64), (3, 5, 96)])
def test_shapes_and_all_trainable_tensors_get_gradients(batch, k, size):
    cfg = ModelConfig(backbone="resnet18", num_proto=k, **TINY)
    model, out, losses = _forward(cfg, batch, size)
    h = math.ceil(size / 32)
    assert out.online[0].dots.shape == (batch, k, h, h)
    assert out.online[0].obj_val.shape == (batch, k, 256)
    assert out.pred[0].shape == (batch, 256)
    assert torch.allclose(out.online[0].obj_attn.sum(1), torch.ones(batch, h, h) + k * 1e-7, atol=1e-5)
    assert {"loss", "loss/inst", "loss/region", "loss/cluster"} <= set(losses)
    losses["loss"].backward()
    trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    missing = [n for n, p in trainable if p.grad is None]
    assert not missing
    assert all(p.grad is None for p in model.target_net.parameters())
    assert not any(p.requires_grad for p in model.target_net.parameters())


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(BACKBONES))
def test_every_registered_backbone_forward_backward(name):
    cfg = ModelConfig(backbone=name, num_proto=4, **TINY)
    model, out, losses = _forward(cfg, batch=2, size=32)
    losses["loss"].backward()
    assert torch.isfinite(losses["loss"])
    assert model.backbone.conv1.weight.grad is not None


def test_custom_backbone_module_and_unknown_name():
    class Tiny(torch.nn.Module):
        out_channels = 16

        def __init__(self):
            super().__init__()
            self.conv = torch.nn.Conv2d(3, 16, 3, stride=8, padding=1)

        def forward(self, x):
            return self.conv(x)

    assert build_backbone(Tiny()).out_channels == 16
    with pytest.raises(ConfigError, match="valid names"):
        build_backbone("resnet7")
    with pytest.raises(ConfigError, match="out_channels"):
        build_backbone(torch.nn.ReLU())


def test_initial_loss_near_reference_regime():
    # At init the cluster CE sits near ln K (FRA_SPEC §5.7: clu ≈ 2.0774 for K=8).
    cfg = ModelConfig(backbone="resnet18", num_proto=8, **TINY)
    _, _, losses = _forward(cfg, batch=8, size=96)
    assert abs(float(losses["loss/cluster"]) - math.log(8)) < 0.05
    assert 1.5 < float(losses["loss/inst"]) < 2.5
    total = losses["loss/inst"] + losses["loss/region"] + 0.1 * losses["loss/cluster"]
    assert torch.allclose(total, losses["loss"])


def test_first_self_attention_in_proj_gets_exactly_zero_gradient():
    cfg = ModelConfig(backbone="resnet18", num_proto=4, **TINY)
    model, _, losses = _forward(cfg)
    losses["loss"].backward()
    g = model.online_net.neck.proj_attn.transformer.decoder.layers[0].self_attn.in_proj_weight.grad
    assert torch.count_nonzero(g) == 0


def test_frab_ema_updates_parameters_only():
    cfg = ModelConfig(backbone="resnet18", num_proto=4, **TINY)
    model, out, losses = _forward(cfg)
    with torch.no_grad():
        for p in model.online_net.parameters():
            p.add_(1.0)
    t_before = [p.clone() for p in model.target_net.parameters()]
    o = [p.clone() for p in model.online_net.parameters()]
    bn_before = model.target_net.backbone.bn1.running_mean.clone()
    model.momentum_update(0.9)
    for tb, ob, ta in zip(t_before, o, model.target_net.parameters()):
        torch.testing.assert_close(ta, 0.9 * tb + 0.1 * ob)
    assert torch.equal(model.target_net.backbone.bn1.running_mean, bn_before)


def test_eman_ema_covers_buffers_and_target_in_eval():
    cfg = ModelConfig(backbone="resnet18", num_proto=4, ema="eman", **TINY)
    model = build_model(cfg).train()
    assert not model.target_net.training and model.online_net.training
    model.online_net.backbone.bn1.running_mean.fill_(1.0)
    model.target_net.backbone.bn1.running_mean.fill_(0.0)
    model.momentum_update(0.75)
    assert torch.allclose(model.target_net.backbone.bn1.running_mean, torch.full((64,), 0.25))


def test_proto_ema_per_view_order():
    # proto = 0.81·p0 + 0.09·c(v1) + 0.1·c(v2) per network (FRA_SPEC §13.4 item 4)
    cfg = ModelConfig(backbone="resnet18", num_proto=4, **TINY)
    model, out, _ = _forward(cfg)
    p0_on = model.online_net.neck.proto.clone()
    p0_tg = model.target_net.neck.proto.clone()
    assert not torch.equal(p0_on, p0_tg)  # independent init, as the reference
    model.update_prototypes(out)
    c1, c2 = out.online[0].mask_embed_mean, out.online[1].mask_embed_mean
    torch.testing.assert_close(model.online_net.neck.proto, 0.81 * p0_on + 0.09 * c1 + 0.1 * c2)
    t1, t2 = out.target[0].mask_embed_mean, out.target[1].mask_embed_mean
    torch.testing.assert_close(model.target_net.neck.proto, 0.81 * p0_tg + 0.09 * t1 + 0.1 * t2)


def test_byol_method_has_instance_loss_only():
    cfg = ModelConfig(backbone="resnet18", method="byol", **TINY)
    model, out, losses = _forward(cfg)
    assert set(k for k in losses if not k.startswith("loss/inst_")) == {"loss", "loss/inst"}
    assert not hasattr(model.online_net.neck, "proj_pixel")
    losses["loss"].backward()


def test_float64_and_bf16_autocast():
    cfg = ModelConfig(backbone="resnet18", num_proto=4, **TINY)
    torch.manual_seed(0)
    model = build_model(cfg).double().train()
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    losses = FRALoss.from_config(cfg)(model(x, x.flip(-1)))
    assert losses["loss"].dtype == torch.float64
    model = build_model(cfg).train()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        losses = FRALoss.from_config(cfg)(model(x.float(), x.float().flip(-1)))
    assert torch.isfinite(losses["loss"])
    losses["loss"].backward()


def test_bad_model_config_values_rejected():
    with pytest.raises(ConfigError, match="num_proto"):
        ModelConfig(num_proto=0)
    with pytest.raises(ConfigError, match="loss_weight"):
        ModelConfig(loss_weight=1.5)
    with pytest.raises(ConfigError, match="ema"):
        ModelConfig(ema="ema")


@pytest.mark.slow
def test_core_imports_no_ray_or_mlflow():
    code = (
        "import sys; import fra.models, fra.losses, fra.optim, fra.config, fra.engine, fra.checkpoint, "
        "fra.dist, fra.heatmaps, fra.train.checkpointing, fra.train.plain; "
        "bad = sorted(m for m in sys.modules if m.split('.')[0] in ('ray', 'mlflow')); "
        "print(','.join(bad)); sys.exit(1 if bad else 0)"
    )
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert res.returncode == 0, f"core imported: {res.stdout} {res.stderr[-500:]}"
