"""The plain training loop and checkpoints (no Ray): resume exactness, guards, AMP, learning.

Everything is tiny (resnet18 at 64 px, hidden_dim 64, batch 8) so the module runs in about a
minute on 2 cores (one torch thread).
"""
import math

import pytest
import torch

from fra.config import ModelConfig, OptimConfig, PretrainConfig, from_dict
from fra.engine import (NonFiniteLossError, Normalizer, Schedule, TrainState, train_one_epoch,
                        train_step)
from fra.losses import FRALoss
from fra.models import OnlineView, build_model
from fra.optim import build_optimizer
from fra.train.checkpointing import export_backbone, load_checkpoint, restore, save_checkpoint

pytestmark = pytest.mark.usefixtures("one_thread_per_module")  # tests/conftest.py

MODEL = ModelConfig(backbone="resnet18", hidden_dim=64, proj_dim=32, num_proto=4, decoder_heads=4,
                    decoder_ffn=64, dropout=0.1)
OPTIM = OptimConfig(lr=0.5, epochs=2, warmup_epochs=1, batch_size=8)
SIZE = 64


def _batches(n: int, seed: int = 0, batch: int = 8) -> list[dict]:
    g = torch.Generator().manual_seed(seed)
    return [{"view1": torch.randint(0, 256, (batch, 3, SIZE, SIZE), dtype=torch.uint8, generator=g),
             "view2": torch.randint(0, 256, (batch, 3, SIZE, SIZE), dtype=torch.uint8, generator=g),
             "label": torch.zeros(batch, dtype=torch.int64)} for _ in range(n)]


def _setup(seed: int = 0, model_cfg: ModelConfig = MODEL):
    torch.manual_seed(seed)
    model = build_model(model_cfg)
    return model, FRALoss.from_config(model_cfg), build_optimizer(model, OPTIM)


def _run(model, loss_fn, opt, batches, state, schedule, **kw):
    return train_one_epoch(model, loss_fn, opt, batches, schedule, state, Normalizer(), log_every=0, **kw)


def test_schedule_matches_reference_formulas():
    s = Schedule.from_config(OptimConfig(lr=0.9, epochs=50, warmup_epochs=10), ModelConfig(), iters_per_epoch=100)
    assert s.lr(0) == pytest.approx(0.9 / 1000)
    assert s.lr(999) == pytest.approx(0.9)
    assert s.lr(1000) == pytest.approx(0.9) and s.lr(1099) == pytest.approx(0.9)  # cosine per epoch
    assert s.lr(4999) == pytest.approx(0.9 * 0.5 * (1 + math.cos(math.pi * 39 / 40)))
    assert s.momentum(0) == pytest.approx(0.996) and s.momentum(s.total_steps) == pytest.approx(1.0)


@pytest.mark.slow
def test_resume_from_checkpoint_is_exact(tmp_path):
    """k steps + save + restore into fresh objects + rest == all steps in one go (bitwise)."""
    data = _batches(4)
    schedule = Schedule.from_config(OPTIM, MODEL, iters_per_epoch=2)

    model, loss_fn, opt = _setup()
    state = TrainState()
    for epoch in range(2):
        state.epoch = epoch
        _run(model, loss_fn, opt, data[2 * epoch:2 * epoch + 2], state, schedule)
    ref_model, ref_opt = model.state_dict(), opt.state_dict()

    model, loss_fn, opt = _setup()
    state = TrainState()
    _run(model, loss_fn, opt, data[:2], state, schedule)
    state.epoch = 1
    cfg = PretrainConfig(model=MODEL, optim=OPTIM)
    save_checkpoint(tmp_path / "ck.pt", model, opt, state, cfg, extra={"data_seed": 0})
    torch.manual_seed(1234)  # disturb the RNG: restore must bring it back

    model2, loss_fn2, opt2 = _setup(seed=99)  # different init: everything must come from the file
    ck = load_checkpoint(tmp_path / "ck.pt")
    state2 = restore(ck, model2, opt2)
    assert (state2.step, state2.epoch) == (2, 1) and ck["extra"]["data_seed"] == 0
    assert from_dict(PretrainConfig, ck["config"]) == cfg
    _run(model2, loss_fn2, opt2, data[2:], state2, schedule)
    assert state2.step == 4
    for name, tensor in ref_model.items():
        assert torch.equal(tensor, model2.state_dict()[name]), name
    for pid, buf in ref_opt["state"].items():
        for key, value in buf.items():
            assert torch.equal(torch.as_tensor(value), torch.as_tensor(opt2.state_dict()["state"][pid][key]))


def test_nonfinite_loss_stops_before_touching_weights():
    model, loss_fn, opt = _setup()
    batch = _batches(1)[0]
    v1 = Normalizer()(batch["view1"])
    v1[0, 0, 0, 0] = float("nan")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(NonFiniteLossError, match=r"step 7: .*loss/inst"):
        train_step(model, loss_fn, opt, v1, Normalizer()(batch["view2"]), step=7, lr=0.1, momentum=0.99)
    after = model.state_dict()
    # Parameters and the EMA target are untouched (BN running stats saw the forward, as in any step).
    for name, p in model.named_parameters():
        assert torch.equal(before[name], after[name]), name
    assert not opt.state


def test_bf16_autocast_on_cpu_trains():
    model, loss_fn, opt = _setup()
    online = OnlineView(model)
    batch = _batches(1)[0]
    w0 = model.online_net.backbone.conv1.weight.clone()
    t0 = model.target_net.backbone.conv1.weight.clone()
    losses = train_step(model, loss_fn, opt, Normalizer()(batch["view1"]), Normalizer()(batch["view2"]),
                        step=0, lr=0.5, momentum=0.99, online=online, amp="bf16")
    assert all(torch.isfinite(v) for v in losses.values())
    assert not torch.equal(w0, model.online_net.backbone.conv1.weight)
    assert not torch.equal(t0, model.target_net.backbone.conv1.weight)  # the EMA ran
    assert model.online_net.backbone.conv1.weight.dtype == torch.float32  # master weights stay fp32


@pytest.mark.slow
def test_plain_runner_loss_goes_down_and_exports(tmp_path):
    from fra.train.plain import pretrain_plain

    cfg = from_dict(PretrainConfig, {
        "model": {**{k: getattr(MODEL, k) for k in ("backbone", "hidden_dim", "proj_dim", "num_proto",
                                                     "decoder_heads", "decoder_ffn")}, "dropout": 0.0},
        "optim": {"lr": 1.0, "epochs": 2, "warmup_epochs": 1, "batch_size": 8},
        "data": {"source": "synthetic", "image_size": SIZE,
                 "synthetic": {"num_identities": 10, "images_per_identity": 8, "size": SIZE}},
        "run": {"name": "plain", "storage_path": str(tmp_path), "log_every": 1, "heatmaps_every_epoch": False},
    })
    result = pretrain_plain(cfg, progress=False)
    losses = [h["loss"] for h in result.history]
    assert len(losses) == 2 and losses[-1] < losses[0], losses
    ck = load_checkpoint(result.checkpoint)
    assert ck["state"]["step"] == 2 * (64 // 8) and ck["state"]["epoch"] == 2
    card = (result.backbone.parent / "model_card.json").read_text()
    assert '"architecture": "resnet18"' in card
    assert torch.load(result.backbone, weights_only=True)["epoch"] == 2  # what main_fer.py prints


def test_export_backbone_is_torchvision_compatible(tmp_path):
    import torchvision

    model, _, _ = _setup()
    weights, card = export_backbone(model, tmp_path, PretrainConfig(model=MODEL), SIZE, manifest_fingerprint="abc")
    obj = torch.load(weights, weights_only=True)
    tv = torchvision.models.resnet18()
    missing, unexpected = tv.load_state_dict(obj["state_dict"], strict=False)
    assert not unexpected and set(missing) == {"fc.weight", "fc.bias"}
    assert '"data_manifest_fingerprint": "abc"' in card.read_text()
