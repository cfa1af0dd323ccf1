"""One way to end a pretraining run: ``fra pretrain --plain`` and the Ray path write the same files.

Both runners call :func:`fra.train.export.finalize_run`; these tests run each method (FRA, BYOL,
SwAV) both ways on the same tiny config and compare what lands in ``final/`` and ``export/``.
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from fra.config import PretrainConfig, from_dict
from fra.train.checkpointing import load_checkpoint

SIZE = 32
BASE = {
    "model": {"backbone": "resnet18", "hidden_dim": 32, "proj_dim": 16, "num_proto": 4, "decoder_heads": 4,
              "decoder_ffn": 32,
              "swav": {"num_prototypes": 10, "proj_hidden": 32, "proj_dim": 16, "freeze_prototypes_iters": 1,
                       "nmb_crops": [2], "size_crops": [SIZE], "min_scale_crops": [0.14],
                       "max_scale_crops": [1.0]}},
    "optim": {"lr": 0.1, "epochs": 1, "warmup_epochs": 0, "batch_size": 8},
    "data": {"source": "synthetic", "image_size": SIZE,
             "synthetic": {"num_identities": 8, "images_per_identity": 6, "size": SIZE}},
    "scaling": {"num_workers": 1, "max_failures": 0},
    "run": {"max_steps": 2, "log_every": 1, "heatmaps_every_epoch": False},
    "tracking": {"enabled": False},
}
SWAV_OPTIM = {"optimizer": "larc", "schedule": "swav", "start_warmup": 0.01, "final_lr": 0.001}


def _config(method: str, storage: Path, name: str) -> PretrainConfig:
    raw = json.loads(json.dumps(BASE))
    raw["model"]["method"] = method
    if method == "swav":
        raw["optim"].update(SWAV_OPTIM)
    raw["run"].update(name=name, storage_path=str(storage))
    return from_dict(PretrainConfig, raw)


def _files(run_dir: Path) -> set[str]:
    return {p.relative_to(run_dir).as_posix() for sub in ("final", "export") for p in (run_dir / sub).rglob("*")
            if p.is_file()}


def test_plain_run_ends_with_the_shared_final_and_export_folders(tmp_path):
    from fra.train.plain import pretrain_plain

    torch.set_num_threads(1)
    res = pretrain_plain(_config("swav", tmp_path, "swav"), progress=False)
    run = tmp_path / "swav"
    assert _files(run) == {"final/checkpoint.pt", "final/config.yaml", "export/backbone.pt",
                           "export/model_card.json", "export/frl_checkpoint.pth"}
    assert res.checkpoint == run / "final" / "checkpoint.pt" and res.backbone == run / "export" / "backbone.pt"
    ck = load_checkpoint(res.checkpoint)
    assert ck["state"]["step"] == 2
    card = json.loads(res.model_card.read_text())
    assert card["method"] == "swav" and card["steps"] == 2
    frl = torch.load(run / "export" / "frl_checkpoint.pth", weights_only=True)
    ours = torch.load(res.backbone, weights_only=True)["state_dict"]
    sd = frl["state_dict"] if "state_dict" in frl else frl
    assert torch.equal(sd["module.base_net.conv1.weight"], ours["conv1.weight"])


@pytest.mark.ray
@pytest.mark.slow
def test_plain_and_ray_runs_write_the_same_files(ray_local, tmp_path):
    from fra.train.plain import pretrain_plain
    from fra.train.ray_trainer import pretrain_ray

    torch.set_num_threads(1)
    for method in ("fra", "byol", "swav"):
        plain = pretrain_plain(_config(method, tmp_path / "plain", method), progress=False)
        ray = pretrain_ray(_config(method, tmp_path / "ray", method))
        plain_files, ray_files = _files(tmp_path / "plain" / method), _files(tmp_path / "ray" / method)
        assert plain_files == ray_files, method
        assert ("export/frl_checkpoint.pth" in plain_files) == (method == "swav"), method
        plain_card = json.loads(plain.model_card.read_text())
        ray_card = json.loads(Path(ray.model_card).read_text())
        assert set(ray_card) - set(plain_card) == {"ray_checkpoint", "skipped_corrupt_images_per_epoch"}, method
        assert plain_card["steps"] == ray_card["steps"] == 2, method
        assert ("region_awareness" in plain_card) == (method == "fra"), method
        for card in (plain_card, ray_card):
            card["config"]["run"].pop("storage_path")
        assert plain_card["config"] == ray_card["config"], method
