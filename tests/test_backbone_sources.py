"""Every FER backbone source resolves to the same torchvision weights, and `fra evaluate fer`
runs from each of them; wrong sources fail clearly.

The writers below produce each source in its real key layout (fra training checkpoint and
exported backbone through fra's own writers, official FRA ``module.online_net.*`` +
``module.encoder_q.*``, FRL ``module.base_net.*`` + projector/prototypes, a torchvision state
dict, an MLflow registered model and run artifact).
"""
import json

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
from tests.conftest import bytes_under

CFG = ModelConfig(backbone="resnet18", hidden_dim=32, num_proto=4)


@pytest.fixture(scope="module")
def fra_model():
    torch.manual_seed(0)
    model = build_model(CFG)
    # NOTE: a seeded build equals `random:resnet18` with the same seed, and BN buffers start at
    # 0 / 1 whatever the init; perturb every trunk tensor so only a real load reproduces them.
    with torch.no_grad():
        for t in model.backbone.state_dict().values():
            if t.is_floating_point():
                t.add_(0.01 * torch.randn_like(t))
            else:
                t.fill_(7)  # num_batches_tracked
    return model


@pytest.fixture(scope="module")
def reference(fra_model):
    """The backbone tensors every source below must reproduce, and their fingerprint."""
    sd = {k: v.clone() for k, v in fra_model.backbone.state_dict().items()}
    return sd, state_dict_fingerprint(sd)


def write_fra_run(root, model):
    """A fra pretraining checkpoint and the exported backbone of the same model."""
    cfg = PretrainConfig(model=CFG)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    ckpt = save_checkpoint(root / "run" / "checkpoint.pt", model, opt, TrainState(step=3), cfg)
    weights, _ = export_backbone(model, root / "run" / "export", cfg, 64, mean=(0.1, 0.2, 0.3), std=(0.4, 0.5, 0.6))
    return ckpt, weights


def write_official_fra(path, model, ref_sd):
    official = {f"module.{k}": v for k, v in model.state_dict().items()}
    official.update({f"module.encoder_q.{k}": v for k, v in ref_sd.items()})
    torch.save({"epoch": 50, "arch": "FRAB", "state_dict": official}, path)
    return path


def write_frl(path, ref_sd):
    frl = {f"module.base_net.{k}": v for k, v in ref_sd.items()}
    frl.update({"module.projection_net.net.0.weight": torch.randn(512, 512),
                "module.prototypes.weight": torch.randn(30, 128)})
    torch.save({"epoch": 200, "state_dict": frl}, path)
    return path


def write_torchvision(path, ref_sd):
    tv = tvm.resnet18(num_classes=1000)
    tv.load_state_dict(ref_sd, strict=False)
    torch.save(tv.state_dict(), path)
    return path


@pytest.fixture(scope="module")
def mlflow_sources(tmp_path_factory, fra_model, reference):
    """(tracking URI, registered-model alias URI, run-artifact URI) holding the reference trunk."""
    mlflow = pytest.importorskip("mlflow")
    from mlflow import MlflowClient

    root = tmp_path_factory.mktemp("mlflow")
    uri = f"sqlite:///{root}/mlflow.db"
    mlflow.set_tracking_uri(uri)
    exp = mlflow.create_experiment("backbones", artifact_location=f"file://{root}/artifacts")
    torch.save({"format": "fra-backbone/1", "arch": "resnet18", "state_dict": reference[0]}, root / "backbone.pt")
    with mlflow.start_run(experiment_id=exp) as run:
        mlflow.log_artifact(str(root / "backbone.pt"), artifact_path="export")
        # pip_requirements given: MLflow would otherwise infer them by loading the model in a subprocess
        info = mlflow.pytorch.log_model(fra_model.backbone, name="encoder", serialization_format="pickle",
                                        pip_requirements=["torch", "torchvision"])
    version = mlflow.register_model(info.model_uri, "fra-encoder")
    MlflowClient(uri).set_registered_model_alias("fra-encoder", "champion", version.version)
    return uri, "models:/fra-encoder@champion", f"runs:/{run.info.run_id}/export/backbone.pt"


def _same(src, ref_sd):
    return set(src.state_dict) == set(ref_sd) and all(torch.equal(src.state_dict[k], v) for k, v in ref_sd.items())


@pytest.mark.slow
def test_fra_checkpoint_export_and_directory(tmp_path, fra_model, reference):
    ref_sd, ref_fp = reference
    ckpt, weights = write_fra_run(tmp_path, fra_model)
    for spec, layout in ((ckpt, "fra"), (weights, "fra-backbone"), (tmp_path / "run" / "export", "fra-backbone"),
                         (tmp_path / "run", "fra-backbone")):
        src = resolve_backbone(str(spec))
        assert (src.kind, src.layout, src.arch) == ("file", layout, "resnet18"), spec
        assert _same(src, ref_sd) and src.fingerprint == ref_fp  # same weights -> same fingerprint
    assert resolve_backbone(str(weights)).normalization == {"mean": [0.1, 0.2, 0.3], "std": [0.4, 0.5, 0.6]}


@pytest.mark.slow
def test_official_fra_frl_torchvision_module(tmp_path, fra_model, reference):
    ref_sd, ref_fp = reference
    write_official_fra(tmp_path / "fra_official.pth.tar", fra_model, ref_sd)
    write_frl(tmp_path / "flr_r18.pth", ref_sd)
    write_torchvision(tmp_path / "tv.pth", ref_sd)
    for name, layout in (("fra_official.pth.tar", "fra-official"), ("flr_r18.pth", "frl"), ("tv.pth", "torchvision")):
        src = resolve_backbone(str(tmp_path / name))
        assert src.layout == layout and src.arch == "resnet18" and _same(src, ref_sd) and src.fingerprint == ref_fp
    assert resolve_backbone(fra_model).fingerprint == ref_fp  # an in-memory module (Python API)
    model = build_classifier("resnet18", 7, resolve_backbone(str(tmp_path / "flr_r18.pth")).state_dict)
    assert model.fc.out_features == 7 and torch.equal(model.layer4[1].conv2.weight, ref_sd["layer4.1.conv2.weight"])


def test_random_init_is_seeded(reference):
    a, b, c = (resolve_backbone("random:resnet18", seed=s) for s in (1, 1, 2))
    assert a.kind == "random" and a.arch == "resnet18" and a.fingerprint == b.fingerprint != c.fingerprint
    assert resolve_backbone(None, arch="resnet34").arch == "resnet34"
    assert resolve_backbone("").arch == "resnet50"
    assert resolve_backbone("random:resnet18", seed=0).fingerprint != reference[1]  # the fixture is no seeded init


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


@pytest.mark.slow
def test_mlflow_model_alias_and_run_artifact(mlflow_sources, reference, private_tempdir):
    """The run artifact is fra's backbone.pt; the alias is a pickled model (no backbone.pt), which
    loads only on the explicit trust_pickle opt-in. The downloads are not left in /tmp."""
    uri, alias, artifact = mlflow_sources
    with pytest.raises(CheckpointError, match="no backbone.pt.*refuses.*trust_pickle"):
        resolve_backbone(alias, tracking_uri=uri)
    for spec, trust in ((alias, True), (artifact, False)):
        src = resolve_backbone(spec, tracking_uri=uri, trust_pickle=trust)
        assert src.kind == "mlflow" and src.arch == "resnet18" and src.fingerprint == reference[1], spec
        assert ("UNPICKLED" in src.detail) is trust
    with pytest.raises(CheckpointError, match="cannot fetch from MLflow"):
        resolve_backbone("models:/no-such-model@champion", tracking_uri=uri)
    assert bytes_under(private_tempdir) < 2**20  # each download held a 45 MB ResNet-18


@pytest.mark.slow
def test_an_mlflow_source_leaves_the_process_tracking_uri_alone(mlflow_sources, tmp_path):
    """Loading from a given tracking URI must not re-point later MLflow use in the process: MLflow's
    set_tracking_uri also sets $MLFLOW_TRACKING_URI, which fra's pipelines and registry honour."""
    import os

    import mlflow

    uri, _, artifact = mlflow_sources
    other = f"sqlite:///{tmp_path}/other.db"
    mlflow.set_tracking_uri(other)
    try:
        assert resolve_backbone(artifact, tracking_uri=uri).kind == "mlflow"
        assert os.environ.get("MLFLOW_TRACKING_URI") == other and mlflow.get_tracking_uri() == other
        with pytest.raises(CheckpointError, match=f"cannot fetch from MLflow at {uri}"):
            resolve_backbone("models:/no-such-model@champion", tracking_uri=uri)
        assert os.environ.get("MLFLOW_TRACKING_URI") == other and mlflow.get_tracking_uri() == other
    finally:
        mlflow.set_tracking_uri(uri)  # as the module's fixture left it


# ---- `fra evaluate fer` from every source --------------------------------------------------------
@pytest.fixture(scope="module")
def fer_shards(tmp_path_factory):
    """Synthetic-face FER shards: 16 train / 4 test rows at 40 px, 7 expressions."""
    from fra.data.shards import write_shards

    out = tmp_path_factory.mktemp("synthetic_fer")
    return write_shards("synthetic_faces", "", str(out), images_per_shard=16, row_group_size=8, num_identities=5,
                        images_per_identity=4, size=40, seed=0, parallel=False).uri


@pytest.fixture(scope="module")
def eval_sources(tmp_path_factory, fra_model, reference, mlflow_sources):
    """source id -> (spec, kind, layout); every one holds the reference trunk."""
    root = tmp_path_factory.mktemp("sources")
    ckpt, weights = write_fra_run(root, fra_model)
    return {"fra-checkpoint": (str(ckpt), "file", "fra"), "fra-export": (str(weights), "file", "fra-backbone"),
            # the logged (pickled) module's own state dict, through the trust_pickle opt-in
            "mlflow-alias": (mlflow_sources[1], "mlflow", "torchvision"),
            "fra-official": (str(write_official_fra(root / "fra_official.pth.tar", fra_model, reference[0])),
                             "file", "fra-official"),
            "frl": (str(write_frl(root / "flr_r18.pth", reference[0])), "file", "frl"),
            "torchvision": (str(write_torchvision(root / "tv.pth", reference[0])), "file", "torchvision")}


@pytest.mark.slow
@pytest.mark.ray
@pytest.mark.parametrize("source_id", ["fra-checkpoint", "fra-export", "mlflow-alias", "fra-official", "frl",
                                       "torchvision"])
def test_evaluate_fer_linear_from_each_source(ray_local, fer_shards, eval_sources, mlflow_sources, reference,
                                              tmp_path, source_id):
    """The real entry point (resolve -> Ray Train local mode -> results.json / MLflow); the probed
    trunk must be the file's tensors, bit for bit."""
    import mlflow

    from fra.config import load_config
    from fra.evaluation.fer import FERConfig, evaluate_fer

    ref_sd, ref_fp = reference
    spec, kind, layout = eval_sources[source_id]
    uri = mlflow_sources[0]
    cfg = load_config(FERConfig, data={
        "protocol": "linear", "data": {"shards": fer_shards, "image_size": 32},
        "optim": {"epochs": 1, "warmup_epochs": 0, "batch_size": 16, "lr": 0.5},
        "scaling": {"num_workers": 0}, "backbone": {"source": spec, "trust_pickle": source_id == "mlflow-alias"},
        "tracking": {"mlflow_uri": uri, "experiment": "fer-sources"}, "run": {"storage_path": str(tmp_path)}})
    before = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny model on 2 shared cores (see tests/test_fer_eval.py)
    try:
        res = evaluate_fer(cfg, run_name=source_id)
    finally:
        torch.set_num_threads(before)
    out = json.loads(res.results_path.read_text())
    assert res.results_path == tmp_path / source_id / "results.json"
    assert {k: out["backbone"][f"backbone.{k}"] for k in ("source", "kind", "layout", "arch", "fingerprint")} == \
        {"source": spec, "kind": kind, "layout": layout, "arch": "resnet18", "fingerprint": ref_fp}
    assert out["trunk_fingerprint"] == {"before": ref_fp, "after": ref_fp} and out["backbone_unchanged"] is True
    params = mlflow.MlflowClient(uri).get_run(res.mlflow_run_id).data.params
    assert (params["backbone.source"], params["backbone.fingerprint"]) == (spec, ref_fp)
    trunk = {k: v for k, v in torch.load(res.model_path, weights_only=True)["state_dict"].items()
             if not k.startswith("fc.")}
    assert set(trunk) == set(ref_sd) and all(torch.equal(trunk[k], v) for k, v in ref_sd.items())
