"""One way to end a pretraining run: ``fra pretrain --plain`` and the Ray path write the same files.

Both runners call :func:`fra.train.export.finalize_run`; each method (FRA, BYOL, SwAV) runs both ways
on the same tiny config (the session's ``method_runs``, tests/shared_runs.py) and the tests compare
what lands in ``final/`` and ``export/``.
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from fra.train.checkpointing import load_checkpoint
from tests.shared_runs import METHODS, method_config


def _files(run_dir: Path) -> set[str]:
    return {p.relative_to(run_dir).as_posix() for sub in ("final", "export") for p in (run_dir / sub).rglob("*")
            if p.is_file()}


def test_plain_run_ends_with_the_shared_final_and_export_folders(tmp_path):
    from fra.train.plain import pretrain_plain

    torch.set_num_threads(1)
    res = pretrain_plain(method_config("swav", tmp_path, "swav"), progress=False)
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
def test_plain_and_ray_runs_write_the_same_files(method_runs):
    for method in METHODS:
        plain, ray = method_runs.plain[method], method_runs.ray[method]
        plain_files, ray_files = _files(method_runs.root / "plain" / method), _files(method_runs.root / "ray" / method)
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
