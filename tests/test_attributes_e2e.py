"""Attribute and affect evaluations end to end: shards -> Ray Train -> results.json / MLflow / model.pt.

Tiny on purpose (ResNet-18 at 64 px, a few dozen faces, one or two epochs). Each job's numbers
are checked against an independent in-process pass of the saved model over the test images
(decode, resize, normalise, score with the metric formulas), so the sharded, all-reduced
evaluation must give exactly what one process gives.
"""
from __future__ import annotations

import hashlib
import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from fra.config import load_config
from fra.data.shards import parquet_options, write_shards
from tests.data_layouts import CORRUPT, build_celeba, truncated_jpeg

pytestmark = [pytest.mark.ray, pytest.mark.slow]


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _corrupt_first_rows(root, split: str, n: int) -> None:
    """Replace the first ``n`` images of the split's first shard by undecodable bytes (as a damaged
    copy would) and fix the manifest's size and checksum."""
    manifest_path = root / "manifest.json"
    manifest = json.loads(manifest_path.read_text())
    shard = next(s for s in manifest["shards"] if s["split"] == split and s["rows"] >= n)
    table = pq.read_table(root / shard["path"])
    images = table.column("image").to_pylist()
    images[:n] = [CORRUPT if i % 2 == 0 else truncated_jpeg(i) for i in range(n)]
    table = table.set_column(table.schema.get_field_index("image"), "image", pa.array(images, pa.binary()))
    pq.write_table(table, root / shard["path"], **parquet_options(8))
    data = (root / shard["path"]).read_bytes()
    shard["bytes"], shard["sha256"] = len(data), hashlib.sha256(data).hexdigest()
    manifest_path.write_text(json.dumps(manifest))


@pytest.fixture(scope="module")
def synthetic_shards(tmp_path_factory):
    """40 synthetic faces (32 train / 8 test) with attributes, glasses and valence/arousal; 2 train
    images and 1 test image corrupted after writing."""
    root = tmp_path_factory.mktemp("synthetic_attr_shards")
    write_shards("synthetic_faces", "", str(root), images_per_shard=64, parallel=False, num_identities=10,
                 images_per_identity=4, size=64, with_attributes=True, glasses=0.3)
    _corrupt_first_rows(root, "train", 2)
    _corrupt_first_rows(root, "test", 1)
    return root


def _recompute(results: dict, model_path, shards_root, column: str):
    """(stats of the saved model on the readable test images, number of those images), in process."""
    from fra.data.augment import FERTransform
    from fra.data.decode import CorruptImageError, decode_pil
    from fra.data.manifest import read_manifest
    from fra.evaluation.target_loop import TargetTask, batch_stats, build_model

    saved = torch.load(model_path, map_location="cpu", weights_only=True)
    task = TargetTask(**saved["task"])
    model = build_model(saved["arch"], task, None)
    model.load_state_dict(saved["state_dict"])
    model.eval()
    norm = results["resolved"]["normalization"]
    mean, std = (torch.tensor(norm[k]).view(1, 3, 1, 1) for k in ("mean", "std"))
    manifest = read_manifest(str(shards_root))
    transform = FERTransform(results["config"]["data"]["image_size"], train=False)
    images, targets = [], []
    for uri in manifest.shard_uris(results["resolved"]["test_split"]):
        for row in pq.read_table(uri, columns=["image", column]).to_pylist():
            try:
                images.append(transform(decode_pil(row["image"])))
            except CorruptImageError:
                continue
            targets.append(row[column])
    x = (torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).float() / 255.0 - mean) / std
    with torch.no_grad():
        out = model(x)
    return batch_stats(task, out, torch.tensor(targets, dtype=torch.float32)), len(images)


def test_attributes_synthetic_finetune_end_to_end(ray_local, synthetic_shards, tmp_path):
    """Fine-tune through Ray Train with checkpoints: headline, per-attribute accuracy equal to an
    in-process pass of the saved model, corrupt images counted per split in results and MLflow."""
    import mlflow

    from fra.evaluation.attributes import AttributesConfig, evaluate_attributes
    from fra.evaluation.target_metrics import attribute_report

    cfg = load_config(AttributesConfig, data={
        "protocol": "finetune", "data": {"shards": str(synthetic_shards), "image_size": 64},
        "optim": {"epochs": 2, "warmup_epochs": 0, "batch_size": 8}, "scaling": {"num_workers": 1},
        "backbone": {"source": "random:resnet18"}, "run": {"storage_path": str(tmp_path), "checkpoint_every": 1,
                                                           "last_k": 2}})
    r = evaluate_attributes(cfg, run_name="synthetic")
    out = json.loads((tmp_path / "synthetic" / "results.json").read_text())
    names = out["dataset"]["attributes"]
    assert names[-1] == "Eyeglasses" and len(names) == 17 and r.names == names
    assert out["skipped_corrupt_images"] == {"train": 2, "test": 1}
    assert [h["images"] for h in out["history"]] == [30, 30]  # 32 train rows, 2 corrupt
    stats, n = _recompute(out, tmp_path / "synthetic" / "model.pt", synthetic_shards, "attributes")
    expected = attribute_report(stats, names)
    assert n == 7 and out["last_epoch"]["num_samples"] == 7
    assert out["last_epoch"]["per_attribute_acc"] == pytest.approx(expected["per_attribute_acc"])
    assert out["headline"]["mean_acc_last"] == pytest.approx(expected["mean_acc"])
    curve = [p["value"] for p in out["curve"]]
    assert out["headline"]["mean_acc_mean_last_k"] == pytest.approx(np.mean(curve))
    assert out["best_epoch_selected_on_test"]["mean_acc"] == pytest.approx(max(curve))
    assert (tmp_path / "synthetic" / "attributes.png").stat().st_size > 1000
    client = mlflow.MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    run = client.get_run(r.mlflow_run_id)
    assert run.data.metrics["mean_acc_last"] == pytest.approx(expected["mean_acc"])
    assert run.data.metrics["last.per_attribute_acc.Smiling"] == pytest.approx(expected["per_attribute_acc"]["Smiling"])
    assert [m.value for m in client.get_metric_history(r.mlflow_run_id, "skipped_corrupt_train")] == [2.0, 2.0]
    assert run.data.tags["fra.kind"] == "attributes-eval"


def test_celeba_layout_linear_probe_through_the_cli(ray_local, tmp_path, capsys):
    """CelebA's official layout with bad rows -> shards -> `fra evaluate attributes` (linear probe,
    val split for selection): 40 attributes, the trunk untouched, validation-selected number reported."""
    from fra.cli.main import main

    build_celeba(tmp_path / "celeba", counts=(("train", 0, 16), ("val", 1, 4), ("test", 2, 6)))
    shards = write_shards("celeba", str(tmp_path / "celeba"), str(tmp_path / "shards"), parallel=False)
    config = tmp_path / "attr.yaml"
    config.write_text(f"""
protocol: linear
data: {{shards: {shards.uri}, image_size: 64, val_split: val}}
optim: {{epochs: 2, warmup_epochs: 0, batch_size: 8}}
scaling: {{num_workers: 1}}
backbone: {{source: "random:resnet18"}}
tracking: {{enabled: false}}
run: {{storage_path: {tmp_path}/runs, last_k: 2}}
""")
    assert main(["evaluate", "attributes", str(config), "--name", "celeba"]) == 0
    printed = capsys.readouterr().out
    out = json.loads((tmp_path / "runs/celeba/results.json").read_text())
    assert len(out["dataset"]["attributes"]) == 40 and out["dataset"]["rows"] == {"train": 16, "test": 6, "val": 4}
    assert out["backbone_unchanged"] is True
    assert out["headline"]["val_best_epoch"] in (1, 2) and "mean_acc_at_val_best" in out["headline"]
    assert out["resolved"]["optim"]["optimizer"] == "sgd" and out["resolved"]["task"]["head"] == "mlp"
    assert f"mean_acc last {out['headline']['mean_acc_last']:.4g}%" in printed


def test_affect_synthetic_end_to_end(ray_local, synthetic_shards, tmp_path):
    """Valence/arousal: CCC, PCC, RMSE, SAGR per target equal to an in-process pass of the saved model."""
    from fra.evaluation.affect import AffectConfig, evaluate_affect
    from fra.evaluation.target_metrics import affect_report

    cfg = load_config(AffectConfig, data={
        "protocol": "finetune", "data": {"shards": str(synthetic_shards), "image_size": 64},
        "optim": {"epochs": 1, "warmup_epochs": 0, "batch_size": 8}, "scaling": {"num_workers": 1},
        "backbone": {"source": "random:resnet18"}, "tracking": {"enabled": False},
        "run": {"storage_path": str(tmp_path), "last_k": 1}})
    r = evaluate_affect(cfg, run_name="affect")
    out = json.loads((tmp_path / "affect" / "results.json").read_text())
    assert out["dataset"]["targets"] == ["valence", "arousal"] and out["metric"] == "mean_ccc"
    stats, n = _recompute(out, tmp_path / "affect" / "model.pt", synthetic_shards, "targets")
    expected = affect_report(stats, ["valence", "arousal"])
    assert n == 7
    for metric in ("ccc", "pcc", "rmse", "sagr"):
        for name in ("valence", "arousal"):
            assert out["last_epoch"][metric][name] == pytest.approx(expected[metric][name], abs=1e-5), (metric, name)
    assert r.last == pytest.approx(expected["mean_ccc"], abs=1e-5)
    assert out["skipped_corrupt_images"] == {"train": 2, "test": 1}
