"""Backbone / model loaders on state dicts with the exact real key layouts."""
import os
import pickle

import pytest
import torch
from torchvision import models as tvm

from fra.checkpoint import load_backbone, load_fra_model, official_to_fra_state_dict, safe_load
from fra.config import ModelConfig
from fra.errors import CheckpointError
from fra.models import build_model

CFG = ModelConfig(backbone="resnet18", hidden_dim=32, num_proto=4)


@pytest.fixture(scope="module")
def fra_model():
    torch.manual_seed(0)
    return build_model(CFG)


def _official_checkpoint(model):
    """The official FRA layout: DDP `module.` prefix plus the `encoder_q.` backbone alias."""
    sd = {f"module.{k}": v for k, v in model.state_dict().items()}
    sd.update({f"module.encoder_q.{k}": v for k, v in model.online_net.backbone.state_dict().items()})
    return {"epoch": 50, "arch": "FRAB", "state_dict": sd, "best_acc1": 0.0, "optimizer": {}, "scaler": None}


def _frl_checkpoint(seed=3):
    torch.manual_seed(seed)
    r = tvm.resnet18()
    sd = {f"module.base_net.{k}": v for k, v in r.state_dict().items() if not k.startswith("fc.")}
    sd["module.projection_net.net.0.weight"] = torch.randn(512, 512)
    sd["module.projection_net.net.3.weight"] = torch.randn(128, 512)
    sd["module.prototypes.weight"] = torch.randn(3000, 128)
    return {"epoch": 200, "state_dict": sd, "optimizer": {}}, r


def _same_backbone(net, ref_sd):
    own = net.state_dict()
    return all(torch.equal(own[k], v) for k, v in ref_sd.items() if not k.startswith("fc."))


def test_official_fra_checkpoint_backbone(tmp_path, fra_model):
    path = tmp_path / "checkpoint_0049.pth.tar"
    torch.save(_official_checkpoint(fra_model), path)
    net, report = load_backbone(path, num_classes=7)
    assert report.source.endswith("(fra-official)")
    assert set(report.missing) == {"fc.weight", "fc.bias"}
    assert net.fc.out_features == 7
    assert _same_backbone(net, fra_model.online_net.backbone.state_dict())


@pytest.mark.slow
def test_official_checkpoint_converts_to_full_model(fra_model):
    sd = official_to_fra_state_dict(_official_checkpoint(fra_model))
    assert not any(k.startswith("encoder_q.") for k in sd)
    torch.manual_seed(1)
    other = build_model(CFG)
    load_fra_model(_official_checkpoint(fra_model), other)
    for (k, a), b in zip(fra_model.state_dict().items(), other.state_dict().values()):
        assert torch.equal(a, b), k
    # target proto differs from online proto and both survive the round trip
    assert not torch.equal(other.online_net.neck.proto, other.target_net.neck.proto)
    with pytest.raises(CheckpointError, match="mismatch"):
        load_fra_model(_official_checkpoint(fra_model), build_model(ModelConfig(backbone="resnet18", hidden_dim=32, num_proto=8)))


def test_frl_release_layout(tmp_path):
    ckpt, ref = _frl_checkpoint()
    path = tmp_path / "flr_r18.pth"
    torch.save(ckpt, path)
    net, report = load_backbone(path)
    assert report.source.endswith("(frl)")
    assert any("prototypes" in k for k in report.unexpected)
    assert _same_backbone(net, ref.state_dict())
    # a raw dict without the 'state_dict' wrapper also loads
    torch.save(ckpt["state_dict"], path)
    assert _same_backbone(load_backbone(path)[0], ref.state_dict())


@pytest.mark.slow
def test_torchvision_state_dict_and_fra_export(tmp_path, fra_model):
    ref = tvm.resnet50()
    path = tmp_path / "tv.pth"
    torch.save(ref.state_dict(), path)
    net, report = load_backbone(path, num_classes=8)
    assert net.fc.out_features == 8 and _same_backbone(net, ref.state_dict())
    from fra.train.checkpointing import export_backbone

    weights, card = export_backbone(fra_model, tmp_path / "exp", CFG, 64)
    net, report = load_backbone(weights)
    assert report.source.endswith("(fra-backbone)")
    assert _same_backbone(net, fra_model.online_net.backbone.state_dict())
    # the export is a plain torchvision state dict too
    plain = tvm.resnet18()
    missing = plain.load_state_dict(torch.load(weights, weights_only=True)["state_dict"], strict=False).missing_keys
    assert set(missing) == {"fc.weight", "fc.bias"}


def _load_like_the_reference_fer_script(path, arch: str, num_classes: int, model_prefix: str) -> tuple:
    """FRA_SPEC §9 "Loading", step by step, as the reference's ``main_fer.py --finetune --pretrained
    PATH --model-prefix PREFIX`` does it: torchvision ResNet with a fresh ``num_classes`` head; the
    file's ``state_dict`` entry if it has one, else the file; every ``module.`` and every
    ``PREFIX.`` removed from the keys; non-strict load asserting that only ``fc`` is missing; then
    the checkpoint's ``epoch`` is read (printed)."""
    model = getattr(tvm, arch)(num_classes=num_classes)
    ckpt = torch.load(path, map_location="cpu")
    sd = ckpt["state_dict"] if "state_dict" in ckpt else ckpt
    sd = {k.replace("module.", ""): v for k, v in sd.items()}
    sd = {k.replace(model_prefix + ".", ""): v for k, v in sd.items()}
    msg = model.load_state_dict(sd, strict=False)
    assert set(msg.missing_keys) == {"fc.weight", "fc.bias"}, msg.missing_keys
    return model, f"loaded pre-trained model '{path}' (epoch {ckpt['epoch']})"


@pytest.mark.parametrize("prefix", ["online_net.backbone", "encoder_q"])  # the README's; the default
def test_fra_export_loads_in_the_reference_fer_script(tmp_path, fra_model, prefix):
    from fra.train.checkpointing import export_backbone

    weights, _ = export_backbone(fra_model, tmp_path / "export", CFG, 64, epoch=7)
    net, line = _load_like_the_reference_fer_script(weights, "resnet18", 7, prefix)
    assert line.endswith("(epoch 7)")
    assert _same_backbone(net, fra_model.online_net.backbone.state_dict()) and net.fc.out_features == 7
    net.eval()
    with torch.no_grad():
        assert net(torch.randn(2, 3, 64, 64)).shape == (2, 7)
    # and the official checkpoint layout itself, as a control of the restated procedure
    torch.save(_official_checkpoint(fra_model), tmp_path / "official.pth.tar")
    net, line = _load_like_the_reference_fer_script(tmp_path / "official.pth.tar", "resnet18", 7, prefix)
    assert line.endswith("(epoch 50)") and _same_backbone(net, fra_model.online_net.backbone.state_dict())


def test_missing_backbone_keys_and_shape_mismatch_fail_loudly(tmp_path):
    ckpt, _ = _frl_checkpoint()
    sd = ckpt["state_dict"]
    del sd["module.base_net.layer4.1.conv2.weight"]
    torch.save(ckpt, tmp_path / "broken.pth")
    with pytest.raises(CheckpointError, match="missing.*layer4.1.conv2.weight"):
        load_backbone(tmp_path / "broken.pth")
    ckpt, _ = _frl_checkpoint()
    with pytest.raises(CheckpointError, match="shape mismatch"):
        load_backbone(ckpt, arch="resnet50")
    with pytest.raises(CheckpointError, match="unrecognised checkpoint layout"):
        load_backbone({"state_dict": {"foo.weight": torch.zeros(1)}})
    with pytest.raises(CheckpointError, match="not found"):
        load_backbone(tmp_path / "nope.pth")
    (tmp_path / "garbage.pth").write_bytes(b"not a checkpoint at all")
    with pytest.raises(CheckpointError):
        load_backbone(tmp_path / "garbage.pth")


class _Evil:
    def __reduce__(self):
        return (os.system, ("echo pwned > /tmp/fra_pwned",))


def test_malicious_pickle_is_refused(tmp_path):
    path = tmp_path / "evil.pth"
    torch.save({"state_dict": {"conv1.weight": torch.zeros(1)}, "payload": _Evil()}, path, pickle_protocol=pickle.DEFAULT_PROTOCOL)
    if os.path.exists("/tmp/fra_pwned"):
        os.unlink("/tmp/fra_pwned")
    with pytest.raises(CheckpointError, match="refused"):
        safe_load(path)
    with pytest.raises(CheckpointError, match="refused"):
        load_backbone(path)
    assert not os.path.exists("/tmp/fra_pwned")
