"""CLI smoke tests of the core commands on synthetic data (no Ray)."""
import json

import pytest
import torch

from fra.cli.main import main
from fra.config import ModelConfig, PretrainConfig, from_dict
from fra.data.synthetic import SyntheticFaces, write_image_folder
from fra.models import build_model
from fra.optim import build_optimizer
from fra.engine import TrainState
from fra.train.checkpointing import save_checkpoint

CFG = ModelConfig(backbone="resnet18", hidden_dim=32, num_proto=4)


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory):
    d = tmp_path_factory.mktemp("ckpt")
    torch.manual_seed(0)
    model = build_model(CFG)
    cfg = from_dict(PretrainConfig, {"model": {"backbone": "resnet18", "hidden_dim": 32, "num_proto": 4},
                                     "data": {"image_size": 64}})
    save_checkpoint(d / "checkpoint.pt", model, build_optimizer(model, cfg.optim), TrainState(step=3), cfg)
    return d / "checkpoint.pt", model


def test_heatmaps_command_writes_overlays(tmp_path, tiny_checkpoint):
    images = tmp_path / "faces"
    write_image_folder(images, SyntheticFaces(num_identities=10, images_per_identity=1, size=64), "train")
    out = tmp_path / "hm"
    assert main(["heatmaps", "--checkpoint", str(tiny_checkpoint[0]), "--images", str(images),
                 "--out", str(out), "--limit", "3"]) == 0
    pngs = sorted(p.name for p in out.glob("*.png"))
    assert len(pngs) == 4 and "grid.png" in pngs
    from PIL import Image

    with Image.open(out / "grid.png") as im:  # 3 rows; image + blend + K query panels per row
        assert im.size == (64 * (2 + CFG.num_proto), 64 * 3)


def test_heatmaps_command_errors_are_clear(tmp_path, tiny_checkpoint, capsys):
    assert main(["heatmaps", "--checkpoint", str(tmp_path / "missing.pt"), "--images", str(tmp_path),
                 "--out", str(tmp_path / "o")]) == 1
    assert "checkpoint not found" in capsys.readouterr().err
    assert main(["heatmaps", "--checkpoint", str(tiny_checkpoint[0]), "--images", str(tmp_path / "none"),
                 "--out", str(tmp_path / "o")]) == 1
    assert "image folder not found" in capsys.readouterr().err


@pytest.mark.slow
def test_convert_official_checkpoint(tmp_path, tiny_checkpoint):
    model = tiny_checkpoint[1]
    sd = {f"module.{k}": v for k, v in model.state_dict().items()}
    sd.update({f"module.encoder_q.{k}": v for k, v in model.online_net.backbone.state_dict().items()})
    torch.save({"epoch": 50, "state_dict": sd}, tmp_path / "official.pth.tar")
    assert main(["convert", str(tmp_path / "official.pth.tar"), str(tmp_path / "full"), "--what", "model"]) == 0
    converted = torch.load(tmp_path / "full" / "model.pt", weights_only=True)
    assert converted["config"]["model"]["num_proto"] == 4 and converted["arch"] == "resnet18"
    assert torch.equal(converted["model"]["target_net.neck.proto"], model.target_net.neck.proto)
    assert main(["convert", str(tmp_path / "official.pth.tar"), str(tmp_path / "bb")]) == 0
    card = json.loads((tmp_path / "bb" / "model_card.json").read_text())
    assert card["architecture"] == "resnet18" and card["source_layout"] == "fra-official"
    assert torch.load(tmp_path / "bb" / "backbone.pt", weights_only=True)["epoch"] == 50
    # heat maps straight from the official checkpoint
    images = tmp_path / "faces"
    write_image_folder(images, SyntheticFaces(num_identities=5, images_per_identity=1, size=64), "train")
    assert main(["heatmaps", "--checkpoint", str(tmp_path / "official.pth.tar"), "--images", str(images),
                 "--out", str(tmp_path / "hm"), "--image-size", "64", "--limit", "2"]) == 0


def test_unknown_command_and_help(capsys):
    with pytest.raises(SystemExit):
        main(["no-such-command"])
    assert main([]) == 2


def test_registry_commands_refuse_a_missing_sqlite_store_and_create_nothing(tmp_path, monkeypatch, capsys):
    """In a folder without runs/mlflow.db, reading the registry must say so, not create an empty
    store and answer "no registered models" (MLflow creates any sqlite file it is pointed at)."""
    from fra.registry import RegistryError, load_registered

    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    for argv in (["list"], ["show", "fra"], ["promote", "fra", "1"], ["rollback", "fra"],
                 ["list", "--tracking-uri", f"sqlite:///{tmp_path}/elsewhere.db"]):
        assert main(["registry", *argv]) == 1, argv
    err = capsys.readouterr().err
    assert err.count(f"no MLflow store at {tmp_path}/runs/mlflow.db") == 4
    assert f"no MLflow store at {tmp_path}/elsewhere.db" in err
    with pytest.raises(RegistryError, match="no MLflow store at"):
        load_registered("models:/fra@champion")
    assert list(tmp_path.iterdir()) == []  # not even the runs/ folder
