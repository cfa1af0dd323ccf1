"""SwAV (FRL's recipe) and BYOL through the same Ray pipeline as FRA.

Pure pieces first (LARC step, SwAV schedule, normalisation), then the multi-crop stream, a tiny
SwAV run of ``fra pretrain`` on the session's local Ray, and the BYOL run on Ray that the session
shares with tests/test_pretrain_export.py (``method_runs``, tests/shared_runs.py).
"""
from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from fra.cli.pretrain import load_pretrain_config
from fra.config import NORMALIZATIONS, OptimConfig, PretrainConfig, from_dict, view_normalization
from fra.errors import ConfigError
from fra.optim import LARC, build_optimizer, swav_lr

SWAV = {
    "model": {"method": "swav", "backbone": "resnet18",
              "swav": {"num_prototypes": 30, "proj_hidden": 64, "proj_dim": 32, "freeze_prototypes_iters": 3,
                       "nmb_crops": [2, 2], "size_crops": [64, 32], "min_scale_crops": [0.14, 0.05],
                       "max_scale_crops": [1.0, 0.14]}},
    "optim": {"optimizer": "larc", "schedule": "swav", "lr": 0.6, "start_warmup": 0.1, "final_lr": 0.0006,
              "epochs": 2, "warmup_epochs": 1, "batch_size": 8},
    "data": {"source": "synthetic", "image_size": 64,
             "synthetic": {"num_identities": 10, "images_per_identity": 8, "size": 64}},
    "scaling": {"num_workers": 1, "max_failures": 0},
    "run": {"log_every": 2, "heatmaps_every_epoch": False},
    "tracking": {"enabled": False},
}


def _config(tmp_path: Path, name: str, data: dict, *overrides: str) -> PretrainConfig:
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(data))
    return load_pretrain_config(str(path), [f"run.storage_path={tmp_path}", *overrides], name)


@pytest.fixture
def one_thread():
    """Tiny models on a shared 2-core machine: one intra-op thread (see tests/test_fer_eval.py)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


# ---- no Ray ------------------------------------------------------------------------------------
def test_larc_step_is_apex_larc_without_clipping():
    """One step by hand: g' = trust·‖w‖/(‖g‖ + λ‖w‖ + eps)·(g + λw); buf = g'; w -= lr·buf."""
    w = torch.nn.Parameter(torch.tensor([3.0, 4.0]))  # ‖w‖ = 5
    zero = torch.nn.Parameter(torch.zeros(2))  # ‖w‖ = 0: raw gradient, no weight decay (apex)
    opt = LARC([w, zero], lr=0.5, momentum=0.9, weight_decay=0.1, trust_coefficient=0.01)
    g = torch.tensor([0.6, 0.8])  # ‖g‖ = 1
    w.grad, zero.grad = g.clone(), g.clone()
    opt.step()
    scale = 0.01 * 5 / (1 + 0.1 * 5 + 1e-8)
    step1 = scale * (g + 0.1 * torch.tensor([3.0, 4.0]))
    assert torch.allclose(w.detach(), torch.tensor([3.0, 4.0]) - 0.5 * step1, atol=1e-7)
    assert torch.allclose(zero.detach(), -0.5 * g, atol=1e-7)
    # Second step: torch SGD momentum on the adapted gradient.
    w0 = w.detach().clone()
    w.grad = g.clone()
    opt.step()
    wn = float(w0.norm())
    step2 = 0.01 * wn / (1 + 0.1 * wn + 1e-8) * (g + 0.1 * w0)
    assert torch.allclose(w.detach(), w0 - 0.5 * (0.9 * step1 + step2), atol=1e-6)


def test_swav_schedule_matches_frl_run_sh():
    iters, epochs, warm = 10, 5, 2
    lrs = [swav_lr(s, iters, 4.8, epochs, warm, 0.3, 0.0048) for s in range(iters * epochs)]
    assert lrs[0] == pytest.approx(0.3) and lrs[warm * iters - 1] == pytest.approx(4.8)
    assert np.allclose(lrs[:warm * iters], np.linspace(0.3, 4.8, warm * iters))  # FRL: np.linspace
    assert lrs[warm * iters] == pytest.approx(4.8) and lrs[-1] > 0.0048
    t = np.arange(iters * (epochs - warm))
    cos = 0.0048 + 0.5 * (4.8 - 0.0048) * (1 + np.cos(np.pi * t / len(t)))
    assert np.allclose(lrs[warm * iters:], cos)
    assert all(a >= b for a, b in zip(lrs[warm * iters:], lrs[warm * iters + 1:]))


def test_swav_config_optimizer_and_normalisation():
    cfg = from_dict(PretrainConfig, SWAV)
    assert view_normalization(cfg) == NORMALIZATIONS["frl"]
    assert view_normalization(from_dict(PretrainConfig, {})) == NORMALIZATIONS["vggface2"]
    from fra.models import build_model

    opt = build_optimizer(build_model(cfg.model), cfg.optim)
    assert isinstance(opt, LARC) and opt.param_groups[0]["larc_weight_decay"] == cfg.optim.weight_decay
    with pytest.raises(ConfigError, match="optim.schedule"):
        from_dict(OptimConfig, {"schedule": "step"})
    with pytest.raises(ConfigError, match="optim.optimizer"):
        from_dict(OptimConfig, {"optimizer": "larcs"})


def test_plain_runner_refuses_multicrop_with_a_clear_message(tmp_path):
    from fra.train.plain import pretrain_plain

    with pytest.raises(ConfigError, match="multi-crop stream"):
        pretrain_plain(_config(tmp_path, "plain", SWAV), progress=False)


def _collapsed_swav_epoch(tmp_path, monkeypatch, rank=0, *overrides):
    """One epoch of the worker's loop (WorkerHooks + train_one_epoch, no Ray) on a SwAV model
    whose prototypes are zero: every prediction is uniform, so the loss is ln P. The epoch is
    the one in which the prototypes are released (its last step is the first that moves them).

    Returns (cfg, hooks, state, epoch stats, the metrics the hooks would report to Ray).
    """
    from fra.engine import Schedule, TrainState, train_one_epoch
    from fra.losses import build_loss
    from fra.models import build_model, online_view
    from fra.train.worker import WorkerHooks

    cfg = _config(tmp_path, "collapse", SWAV, "model.swav.size_crops=[32,16]", *overrides)
    plan = {"iters_per_epoch": 2, "total_steps": 4, "global_batch": 4}
    torch.manual_seed(0)
    model = build_model(cfg.model)
    with torch.no_grad():
        model.prototypes.weight.zero_()
    reports = []
    monkeypatch.setattr(WorkerHooks, "checkpoint", lambda self, state, metrics: reports.append(metrics))
    hooks = WorkerHooks(cfg, plan, model, build_optimizer(model, cfg.optim), None, rank, 1, {}, torch.device("cpu"))
    g = torch.Generator().manual_seed(0)
    crops = {"view1": 32, "view2": 32, "crop1": 16, "crop2": 16}
    batches = [{k: torch.randint(0, 256, (2, 3, s, s), dtype=torch.uint8, generator=g) for k, s in crops.items()}
               for _ in range(plan["iters_per_epoch"])]
    first = cfg.model.swav.freeze_prototypes_iters - 1  # steps first, first + 1 (frozen, then released)
    state = TrainState(step=first, epoch=first // plan["iters_per_epoch"])
    schedule = Schedule.from_config(cfg.optim, cfg.model, plan["iters_per_epoch"])
    stats = train_one_epoch(model, build_loss(cfg.model), hooks.optimizer, batches, schedule, state,
                            hooks.normalizer, online=online_view(model), log_every=1, on_log=hooks.on_log)
    return cfg, hooks, state, stats, reports


def _collapse_warnings(caplog) -> list:
    return [r for r in caplog.records if r.name == "fra.losses.swav" and "may have collapsed" in r.getMessage()]


@pytest.mark.parametrize("rank", [0, 1])
def test_swav_collapse_warning_at_the_end_of_epoch(tmp_path, monkeypatch, caplog, one_thread, rank):
    """Issue 8: the worker's end-of-epoch check flags a loss at ln P once the prototypes are
    released (rank 0 warns, every rank records it); a loss below ln P, or the frozen phase, is not."""
    from fra.engine import TrainState

    cfg, hooks, state, stats, reports = _collapsed_swav_epoch(tmp_path, monkeypatch, rank)
    ln_p = math.log(cfg.model.swav.num_prototypes)
    assert stats["loss/swav"] == pytest.approx(ln_p, rel=1e-5)  # the loop's own epoch mean
    with caplog.at_level("WARNING", logger="fra.losses.swav"):
        hooks.end_epoch(state, stats)
    assert state.history[-1]["swav_collapse"] == 1.0 and len(_collapse_warnings(caplog)) == (rank == 0)
    assert reports[-1]["loss/swav"] == pytest.approx(ln_p, rel=1e-5)
    caplog.clear()
    frozen = cfg.model.swav.freeze_prototypes_iters
    for step, loss, expected in ((state.step + 2, 0.8 * ln_p, 0.0),  # healthy: clearly below ln P
                                 (frozen, ln_p, None)):  # prototypes still frozen: not judged
        later = TrainState(step=step, epoch=state.epoch)
        with caplog.at_level("WARNING", logger="fra.losses.swav"):
            hooks.end_epoch(later, {**stats, "loss/swav": loss, "loss": loss})
        assert later.history[-1].get("swav_collapse") == expected, (step, loss)
    assert not _collapse_warnings(caplog)


def test_swav_collapse_detector_in_the_log_hook_can_stop_the_run(tmp_path, monkeypatch, one_thread):
    """run.collapse_patience: the per-log detector sees the same ln P loss and stops the run."""
    from fra.train.guards import CollapseError

    with pytest.raises(CollapseError, match="SwAV swapped-prediction loss .* ln K"):
        _collapsed_swav_epoch(tmp_path, monkeypatch, 0, "run.collapse_patience=2", "run.collapse_action=stop")


# ---- Ray ---------------------------------------------------------------------------------------
@pytest.mark.ray
def test_multicrop_shapes_through_the_stream(ray_local, tmp_path):
    from fra.data.shards import write_shards
    from fra.data.stream import iter_batches, pretrain_dataset
    from fra.engine import Normalizer, batch_views

    write_shards("synthetic_faces", "", str(tmp_path / "sh"), split="train", images_per_shard=16,
                 row_group_size=8, num_identities=4, images_per_identity=6, size=48, seed=0)
    mc = {"size_crops": [40, 24], "nmb_crops": [2, 3], "min_scale": [0.3, 0.05], "max_scale": [1.0, 0.3]}
    ds = pretrain_dataset(str(tmp_path / "sh"), seed=3, multicrop=mc, with_keys=True)
    batches = list(iter_batches(ds, 6, epoch=0, drop_last=False))
    b = batches[0]
    assert b["view1"].shape == b["view2"].shape == (6, 3, 40, 40) and b["view1"].dtype == torch.uint8
    assert [b[f"crop{i}"].shape for i in (1, 2, 3)] == [(6, 3, 24, 24)] * 3 and "crop4" not in b
    from fra.data.manifest import read_manifest

    assert sum(len(x["label"]) for x in batches) == read_manifest(str(tmp_path / "sh")).num_rows("train")
    views = batch_views(b, Normalizer())
    assert [v.shape[-1] for v in views] == [40, 40, 24, 24, 24]
    assert not torch.equal(b["view1"], b["view2"])
    again = next(iter(iter_batches(pretrain_dataset(str(tmp_path / "sh"), seed=3, multicrop=mc, with_keys=True),
                                   6, epoch=0, drop_last=False)))
    same = {int(k): i for i, k in enumerate(again["key"])}
    for i, k in enumerate(b["key"].tolist()):  # each image's crops are a function of (seed, epoch, image)
        if k in same:
            assert torch.equal(b["crop2"][i], again["crop2"][same[k]])
    with pytest.raises(ValueError, match="same length"):
        pretrain_dataset(str(tmp_path / "sh"), multicrop={**mc, "nmb_crops": [2]})


@pytest.mark.ray
@pytest.mark.slow
def test_swav_trains_on_ray_and_exports_an_frl_checkpoint(ray_local, tmp_path):
    from fra.checkpoint import load_backbone
    from fra.train.export import FRL_EXPORT
    from fra.train.ray_trainer import pretrain_ray

    out = pretrain_ray(_config(tmp_path, "swav", SWAV))
    rv = out.return_value
    assert rv["status"] == "finished" and rv["step"] == 2 * (64 // 8)
    hist = rv["history"]
    assert all(math.isfinite(h["loss/swav"]) for h in hist) and "loss/inst" not in hist[0]
    assert hist[-1]["swav_collapse"] in (0.0, 1.0)  # judged once the prototypes were released
    card = json.loads(Path(out.model_card).read_text())
    assert card["method"] == "swav" and card["normalization"]["std"] == [0.228, 0.224, 0.225]
    frl_path = Path(out.backbone).parent / FRL_EXPORT
    ours = torch.load(out.backbone, weights_only=True)["state_dict"]
    frl_model = _load_like_the_frl_release(frl_path)
    model, report = load_backbone(str(frl_path))  # fra's own loader agrees
    assert "(frl)" in report.source and sorted(report.missing) == ["fc.bias", "fc.weight"]
    for loaded in (frl_model.state_dict(), model.state_dict()):
        for k, v in ours.items():
            assert torch.equal(loaded[k], v), k


PROJECTOR_KEYS = ("module.projection_net.", "module.prototypes.")


def _load_like_the_frl_release(path: Path) -> torch.nn.Module:
    """FRL_SPEC §1.7 step by step, with its asserts, on an exported ``frl_checkpoint.pth``."""
    from torchvision.models import resnet18

    raw = torch.load(path, map_location="cpu", weights_only=True)
    sd = raw["state_dict"] if "state_dict" in raw else raw
    assert {k.split(".")[1] for k in sd} == {"base_net", "projection_net", "prototypes"}  # §1.6 layout
    net = resnet18()
    # Unfiltered, the README's prefix strip leaves only the projector and prototypes over.
    stripped = {k.removeprefix("module.base_net."): v for k, v in sd.items()}
    res = net.load_state_dict(stripped, strict=False)
    assert sorted(res.missing_keys) == ["fc.bias", "fc.weight"]
    assert res.unexpected_keys and all(k.startswith(PROJECTOR_KEYS) for k in res.unexpected_keys)
    # Filtered to torchvision's names and shapes: only fc is missing, nothing is unexpected.
    own = net.state_dict()
    kept = {k: v for k, v in stripped.items() if k in own and own[k].shape == v.shape}
    dropped = set(sd) - {f"module.base_net.{k}" for k in kept}
    assert dropped and all(k.startswith(PROJECTOR_KEYS) for k in dropped), sorted(dropped)[:5]
    net = resnet18()
    res = net.load_state_dict(kept, strict=False)
    assert sorted(res.missing_keys) == ["fc.bias", "fc.weight"] and res.unexpected_keys == []
    return net


@pytest.mark.ray
@pytest.mark.slow
def test_byol_trains_through_the_same_pipeline(method_runs):
    out = method_runs.ray["byol"]  # the BYOL run on Ray Train that tests/test_pretrain_export.py also reads
    h = out.return_value["history"][0]
    assert out.return_value["status"] == "finished" and math.isfinite(h["loss/inst"])
    assert h["loss"] == pytest.approx(h["loss/inst"], rel=1e-5)  # the instance branch alone
    card = json.loads(Path(out.model_card).read_text())
    assert card["method"] == "byol" and card["normalization"]["std"] == list(NORMALIZATIONS["vggface2"][1])


def test_frl_recipe_file_is_run_sh():
    from fra.train.ray_trainer import multicrop_args

    path = Path(__file__).resolve().parents[1] / "pipelines" / "pretrain_frl_swav.yaml"
    cfg = load_pretrain_config(str(path), [], None)
    s, o = cfg.model.swav, cfg.optim
    assert (cfg.model.method, cfg.model.backbone, s.num_prototypes, s.freeze_prototypes_iters, s.queue_length) == \
        ("swav", "resnet50", 3000, 313, 0)
    assert (o.optimizer, o.schedule, o.lr, o.start_warmup, o.final_lr, o.epochs, o.warmup_epochs, o.weight_decay) == \
        ("larc", "swav", 4.8, 0.3, 0.0048, 400, 10, 1e-6)
    assert multicrop_args(cfg) == {"size_crops": [224, 96], "nmb_crops": [2, 6], "min_scale": [0.14, 0.05],
                                   "max_scale": [1.0, 0.14]}
    assert view_normalization(cfg) == NORMALIZATIONS["frl"]
