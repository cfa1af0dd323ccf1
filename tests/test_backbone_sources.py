"""Every FER backbone source resolves to the same torchvision weights; wrong ones fail clearly."""
import pytest
import torch
from torchvision import models as tvm

from fra.config import ModelConfig, PretrainConfig
from fra.errors import CheckpointError
from fra.evaluation.backbones import resolve_backbone, state_dict_fingerprint
from fra.evaluation.worker import build_classifier
from fra.models import build_model
from fra.train.checkpointing import export_backbone, save_checkpoint
from fra.engine import TrainState

CFG = ModelConfig(backbone="resnet18", hidden_dim=32, num_proto=4)


@pytest.fixture(scope="module")
def fra_model():
    torch.manual_seed(0)
    return build_model(CFG)


@pytest.fixture(scope="module")
def reference(fra_model):
    """The backbone tensors every source below must reproduce, and their fingerprint."""
    sd = {k: v.clone() for k, v in fra_model.backbone.state_dict().items()}
    return sd, state_dict_fingerprint(sd)


def _same(src, ref_sd):
    return set(src.state_dict) == set(ref_sd) and all(torch.equal(src.state_dict[k], v) for k, v in ref_sd.items())


def test_fra_checkpoint_export_and_directory(tmp_path, fra_model, reference):
    ref_sd, ref_fp = reference
    cfg = PretrainConfig(model=CFG)
    opt = torch.optim.SGD(fra_model.parameters(), lr=0.1)
    ckpt = save_checkpoint(tmp_path / "run" / "checkpoint.pt", fra_model, opt, TrainState(step=3), cfg)
    weights, _ = export_backbone(fra_model, tmp_path / "run" / "export", cfg, 64, mean=(0.1, 0.2, 0.3),
                                 std=(0.4, 0.5, 0.6))
    for spec, layout in ((ckpt, "fra"), (weights, "fra-backbone"), (tmp_path / "run" / "export", "fra-backbone"),
                         (tmp_path / "run", "fra-backbone")):
        src = resolve_backbone(str(spec))
        assert (src.kind, src.layout, src.arch) == ("file", layout, "resnet18"), spec
        assert _same(src, ref_sd) and src.fingerprint == ref_fp  # same weights -> same fingerprint
    assert resolve_backbone(str(weights)).normalization == {"mean": [0.1, 0.2, 0.3], "std": [0.4, 0.5, 0.6]}


def test_official_fra_frl_torchvision_module(tmp_path, fra_model, reference):
    ref_sd, ref_fp = reference
    official = {f"module.{k}": v for k, v in fra_model.state_dict().items()}
    official.update({f"module.encoder_q.{k}": v for k, v in ref_sd.items()})
    torch.save({"epoch": 50, "arch": "FRAB", "state_dict": official}, tmp_path / "fra_official.pth.tar")
    frl = {f"module.base_net.{k}": v for k, v in ref_sd.items()}
    frl.update({"module.projection_net.net.0.weight": torch.randn(512, 512),
                "module.prototypes.weight": torch.randn(30, 128)})
    torch.save({"epoch": 200, "state_dict": frl}, tmp_path / "flr_r18.pth")
    tv = tvm.resnet18(num_classes=1000)
    tv.load_state_dict(ref_sd, strict=False)
    torch.save(tv.state_dict(), tmp_path / "tv.pth")
    for name, layout in (("fra_official.pth.tar", "fra-official"), ("flr_r18.pth", "frl"), ("tv.pth", "torchvision")):
        src = resolve_backbone(str(tmp_path / name))
        assert src.layout == layout and src.arch == "resnet18" and _same(src, ref_sd) and src.fingerprint == ref_fp
    assert resolve_backbone(fra_model).fingerprint == ref_fp  # an in-memory module (Python API)
    model = build_classifier("resnet18", 7, resolve_backbone(str(tmp_path / "flr_r18.pth")).state_dict)
    assert model.fc.out_features == 7 and torch.equal(model.layer4[1].conv2.weight, ref_sd["layer4.1.conv2.weight"])


def test_random_init_is_seeded():
    a, b, c = (resolve_backbone("random:resnet18", seed=s) for s in (1, 1, 2))
    assert a.kind == "random" and a.arch == "resnet18" and a.fingerprint == b.fingerprint != c.fingerprint
    assert resolve_backbone(None, arch="resnet34").arch == "resnet34"
    assert resolve_backbone("").arch == "resnet50"


def _junk(p):
    (p / "junk.pt").write_bytes(b"not a checkpoint")
    return str(p / "junk.pt")


def _saved(obj, name):
    def make(p):
        torch.save(obj, p / name)
        return str(p / name)

    return make


@pytest.mark.parametrize("make, match", [
    (lambda p: str(p / "nope.pt"), "not found"),
    # NOTE: safe_load words random bytes as "refused to load ... objects other than tensors"
    (_junk, "not a readable torch checkpoint|refused to load"),
    (_saved({"state_dict": {"encoder.w": torch.zeros(2)}}, "odd.pt"), "unrecognised checkpoint layout"),
    (_saved({"state_dict": {"m": object()}}, "pickle.pt"), "refused to load"),
    (lambda p: (p / "empty").mkdir() or str(p / "empty"), "directory holds none"),
])
def test_wrong_sources_fail_clearly(tmp_path, make, match):
    with pytest.raises(CheckpointError, match=match):
        resolve_backbone(make(tmp_path))


def test_wrong_architecture_fails_clearly(tmp_path, reference):
    torch.save(reference[0], tmp_path / "r18.pth")
    with pytest.raises(CheckpointError, match="shape mismatch|missing"):
        resolve_backbone(str(tmp_path / "r18.pth"), arch="resnet50")


def test_mlflow_model_alias_and_run_artifact(tmp_path, fra_model, reference):
    mlflow = pytest.importorskip("mlflow")
    from mlflow import MlflowClient

    ref_sd, ref_fp = reference
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    mlflow.set_tracking_uri(uri)
    exp = mlflow.create_experiment("backbones", artifact_location=f"file://{tmp_path}/artifacts")
    torch.save({"format": "fra-backbone/1", "arch": "resnet18", "state_dict": ref_sd}, tmp_path / "backbone.pt")
    with mlflow.start_run(experiment_id=exp) as run:
        mlflow.log_artifact(str(tmp_path / "backbone.pt"), artifact_path="export")
        info = mlflow.pytorch.log_model(fra_model.backbone, name="encoder", serialization_format="pickle")
    version = mlflow.register_model(info.model_uri, "fra-encoder")
    MlflowClient(uri).set_registered_model_alias("fra-encoder", "champion", version.version)
    for spec in ("models:/fra-encoder@champion", f"runs:/{run.info.run_id}/export/backbone.pt"):
        src = resolve_backbone(spec, tracking_uri=uri)
        assert src.kind == "mlflow" and src.arch == "resnet18" and src.fingerprint == ref_fp, spec
    with pytest.raises(CheckpointError, match="cannot fetch from MLflow"):
        resolve_backbone("models:/no-such-model@champion", tracking_uri=uri)
