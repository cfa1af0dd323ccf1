"""FER evaluation end to end: official layouts -> shards -> Ray Train -> results.json / MLflow."""
from __future__ import annotations

import csv
import io
import json

import numpy as np
import pytest
import torch

from fra.config import load_config
from fra.evaluation.fer import FERConfig, evaluate_fer
from tests.conftest import bytes_under
from tests.data_layouts import CORRUPT, face_jpeg, face_rgb

pytestmark = pytest.mark.usefixtures("one_thread_per_module")


RAFDB = ["Surprise", "Fear", "Disgust", "Happiness", "Sadness", "Anger", "Neutral"]
FER2013 = ["Angry", "Disgust", "Fear", "Happy", "Sad", "Surprise", "Neutral"]


def _cfg(shards, storage, **sections):
    data = {"protocol": "linear", "data": {"shards": str(shards), "image_size": 32},
            "optim": {"epochs": 1, "warmup_epochs": 0, "batch_size": 16, "lr": 0.5},
            "scaling": {"num_workers": 0}, "backbone": {"source": "random:resnet18"},
            "tracking": {"enabled": False}, "run": {"storage_path": str(storage)}}
    for name, values in sections.items():
        data[name] = {**data.get(name, {}), **values} if isinstance(values, dict) else values
    return load_config(FERConfig, data=data)


@pytest.fixture(scope="module")
def rafdb_shards(tmp_path_factory):
    """RAF-DB layout; in test, label-file value v occurs v times, so support reveals the mapping."""
    from fra.data.shards import write_shards

    root = tmp_path_factory.mktemp("rafdb")
    lines, k = [], 0
    for split, counts in (("train", [6] * 7), ("test", range(1, 8))):
        for value, n in zip(range(1, 8), counts):
            for _ in range(n):
                k += 1
                name = f"{split}_{k:05d}"
                lines.append(f"{name}.jpg {value}")
                path = root / "Image/aligned" / f"{name}_aligned.jpg"
                path.parent.mkdir(parents=True, exist_ok=True)
                path.write_bytes(face_jpeg(k, 40))
    lines.append("train_09999.jpg 3")  # a corrupt image must be skipped, not break the run
    (root / "Image/aligned/train_09999_aligned.jpg").write_bytes(CORRUPT)
    (root / "EmoLabel").mkdir()
    (root / "EmoLabel/list_patition_label.txt").write_text("\n".join(lines) + "\n")
    return write_shards("rafdb", str(root), str(tmp_path_factory.mktemp("rafdb_shards")), parallel=False).uri


@pytest.fixture(scope="module")
def fer2013_shards(tmp_path_factory):
    """FER2013 CSV; 40 Training rows, 7 PublicTest, PrivateTest label e occurs e + 1 times."""
    from fra.data.shards import write_shards

    root = tmp_path_factory.mktemp("fer2013")
    rows = [(i % 7, "Training") for i in range(40)] + [(i, "PublicTest") for i in range(7)]
    rows += [(e, "PrivateTest") for e in range(7) for _ in range(e + 1)]
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(["emotion", "pixels", "Usage"])
    for i, (label, usage) in enumerate(rows):
        w.writerow([label, " ".join(map(str, face_rgb(i, 48)[..., 0].ravel())), usage])
    (root / "fer2013.csv").write_text(buf.getvalue())
    return write_shards("fer2013", str(root), str(tmp_path_factory.mktemp("fer2013_shards")), parallel=False).uri


@pytest.mark.ray
def test_rafdb_layout_end_to_end_cli(ray_local, rafdb_shards, tmp_path, capsys, private_tempdir):
    """`fra evaluate fer`: fine-tune in Train's local mode with a validation carve, class-balanced
    sampling, a checkpoint per epoch (none left behind in /tmp) and MLflow tracking."""
    import mlflow
    import yaml

    from fra.cli.main import main

    config = tmp_path / "fer.yaml"
    config.write_text(yaml.safe_dump({"protocol": "finetune", "data": {"shards": rafdb_shards, "image_size": 32},
                                      "scaling": {"num_workers": 0}, "run": {"storage_path": str(tmp_path)}}))
    sets = ["optim.epochs=2", "optim.warmup_epochs=0", "optim.batch_size=16", "optim.lr=0.001",
            "optim.balanced_sampling=true", "data.val_fraction=0.25", "backbone.source=random:resnet18",
            "run.checkpoint_every=1"]
    assert main(["evaluate", "fer", str(config), "--name", "rafdb"] + [a for s in sets for a in ("--set", s)]) == 0
    assert "top-1 last" in capsys.readouterr().out
    assert bytes_under(private_tempdir) < 2**20  # a checkpoint's state.pt is ~130 MB
    run_dir = tmp_path / "rafdb"
    out = json.loads((run_dir / "results.json").read_text())
    # label file value 1 = Surprise ... 7 = Neutral, through shards, Ray Data and the loop
    assert out["dataset"]["classes"] == RAFDB
    assert out["summary"]["last"]["support"] == {c: i + 1 for i, c in enumerate(RAFDB)}
    rows = out["dataset"]["rows"]
    assert rows["train"] + rows["val"] == 42 and rows["val"] > 0  # the corrupt image is skipped
    assert [h["images"] for h in out["history"]] == [rows["train"]] * 2  # balanced draws: len = N per epoch
    assert out["summary"]["val_best_epoch"] in (1, 2) and "top1_mean_last5" in out["headline"]
    assert out["best_epoch_selected_on_test"]["best_epoch"] in (1, 2)
    for name in ("results.json", "confusion.png", "config.yaml", "model.pt"):
        assert (run_dir / name).is_file(), name
    run = mlflow.MlflowClient(f"sqlite:///{tmp_path}/mlflow.db").search_runs(
        [mlflow.MlflowClient(f"sqlite:///{tmp_path}/mlflow.db").get_experiment_by_name("fra-fer").experiment_id])[0]
    assert run.data.params["protocol"] == "finetune"
    assert run.data.params["backbone.fingerprint"] == out["backbone"]["backbone.fingerprint"]
    assert run.data.params["dataset.fingerprint"] == out["dataset"]["fingerprint"]
    assert run.data.metrics["top1_last"] == pytest.approx(out["headline"]["top1_last"])


@pytest.mark.ray
def test_corrupt_images_met_while_streaming_are_counted_in_results_and_mlflow(ray_local, tmp_path):
    """Issue 3: shards holding corrupt JPEGs (the writer never makes them, a damaged copy can):
    skipped, counted per split and epoch, in results.json and MLflow; the test set (cached after
    one decode) reports its count on every evaluation."""
    import mlflow

    from tests.corrupt_shards import corrupt_images, faces, write_shard_set

    shards = write_shard_set(tmp_path / "shards", {"train": faces(0, 6) + corrupt_images(2) + faces(6, 6),
                                                    "test": faces(20, 5) + corrupt_images(1)})
    cfg = _cfg(shards, tmp_path, data={"test_split": "test"}, optim={"epochs": 2, "batch_size": 4},
               tracking={"enabled": True})
    result = evaluate_fer(cfg, run_name="corrupt")
    out = json.loads(result.results_path.read_text())
    assert out["skipped_corrupt_images"] == {"train": 2, "test": 1}
    assert [(h["skipped_corrupt_train"], h["skipped_corrupt_test"]) for h in out["history"]] == [(2, 1), (2, 1)]
    assert [h["images"] for h in out["history"]] == [12, 12] and sum(out["summary"]["last"]["support"].values()) == 5
    client = mlflow.MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    for key, value in (("skipped_corrupt_train", 2.0), ("skipped_corrupt_test", 1.0)):
        logged = client.get_metric_history(result.mlflow_run_id, key)
        assert [(m.step, m.value) for m in logged] == [(1, value), (2, value)]


@pytest.mark.ray
@pytest.mark.slow  # two Ray Train jobs (~40 s): kept out of `make test-fast`
def test_fer2013_two_workers_equal_one_worker(ray_local, fer2013_shards, tmp_path):
    """Linear probe, full batch: DDP over 2 workers must reproduce 1 worker (same rows, same
    per-row augmentation draws); the sharded test set is scored exactly once; backbone untouched."""
    from fra.evaluation.backbones import resolve_backbone

    results = {}
    for workers in (1, 2):
        cfg = _cfg(fer2013_shards, tmp_path, optim={"epochs": 2, "batch_size": 40},
                   data={"val_split": "val"}, scaling={"num_workers": workers})
        results[workers] = evaluate_fer(cfg, run_name=f"w{workers}")
    one, two = results[1], results[2]
    assert one.classes == FER2013
    support = json.loads(one.results_path.read_text())["summary"]["last"]["support"]
    assert support == {c: i + 1 for i, c in enumerate(FER2013)}  # emotion 0 = Angry ... 6 = Neutral
    assert [np.sum(h["test_confusion"]) for h in two.history] == [28, 28]
    assert [np.sum(h["val_confusion"]) for h in two.history] == [7, 7]
    assert [h["train_loss"] for h in one.history] == pytest.approx([h["train_loss"] for h in two.history], rel=1e-4)
    w1, w2 = (torch.load(r.model_path, weights_only=True)["state_dict"] for r in (one, two))
    assert torch.allclose(w1["fc.weight"], w2["fc.weight"], atol=1e-5)
    assert one.confusion == two.confusion
    src = resolve_backbone("random:resnet18", seed=0).state_dict
    assert one.backbone_unchanged and two.backbone_unchanged
    assert all(torch.equal(w2[k], v) for k, v in src.items())  # bit-identical trunk after the probe
