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

@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny models on a shared 2-core machine: one intra-op thread is 2-5x cheaper than two
    (OpenMP threads spin and wait for each other when the cores are oversubscribed)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


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


@pytest.fixture(scope="session")
def tiny_fra_backbone(tmp_path_factory):
    """A briefly pretrained FRA ResNet-18 (30 steps on 160 rendered faces, in process)."""
    from fra.config import PretrainConfig
    from fra.train.plain import pretrain_plain

    cfg = load_config(PretrainConfig, data={
        "model": {"backbone": "resnet18", "hidden_dim": 64, "proj_dim": 32, "num_proto": 4, "decoder_heads": 4,
                  "decoder_ffn": 64},
        "optim": {"lr": 0.2, "epochs": 100, "warmup_epochs": 1, "batch_size": 16},
        "data": {"source": "synthetic", "image_size": 48,
                 "synthetic": {"num_identities": 20, "images_per_identity": 8, "size": 48}},
        "run": {"name": "fra_tiny", "storage_path": str(tmp_path_factory.mktemp("pretrain")), "max_steps": 30,
                "heatmaps_every_epoch": False}})
    before = torch.get_num_threads()
    torch.set_num_threads(1)  # session fixture: set up before the module's one_thread fixture
    try:
        return pretrain_plain(cfg, progress=False).backbone
    finally:
        torch.set_num_threads(before)


ARCFACE_5 = np.array([[38.29, 51.70], [73.53, 51.50], [56.03, 71.74], [41.55, 92.37], [70.73, 92.20]]) / 112


def _align(image: np.ndarray, landmarks: np.ndarray, size: int) -> np.ndarray:
    """Similarity-align a face on its 5 landmarks (ArcFace template), like RAF-DB's aligned crops."""
    from PIL import Image

    rows, rhs = [], []
    for (x, y), (u, v) in zip(ARCFACE_5 * size, landmarks):
        rows += [[x, -y, 1, 0], [y, x, 0, 1]]
        rhs += [u, v]
    a, b, tx, ty = np.linalg.lstsq(np.array(rows), np.array(rhs), rcond=None)[0]
    return np.asarray(Image.fromarray(image).transform((size, size), Image.AFFINE, (a, -b, tx, b, a, ty),
                                                       Image.BILINEAR))


@pytest.fixture(scope="module")
def aligned_faces():
    """300 aligned synthetic faces (7 expressions), identity-disjoint 240 train / 60 test."""
    from fra.data.synthetic import SyntheticFaces

    spec = SyntheticFaces(num_identities=50, images_per_identity=6, size=48, seed=3, intensity=(1.0, 1.1),
                          jitter=0.0, clutter=False)
    out = {}
    for split in ("train", "test"):
        samples = list(spec.iter_split(split))
        out[split] = ([_align(s["image"], s["landmarks"], 48) for s in samples], [s["label"] for s in samples])
    return out


@pytest.mark.slow
def test_probe_on_pretrained_fra_beats_chance(tiny_fra_backbone, aligned_faces):
    from fra.evaluation.probe import linear_probe_features

    res = linear_probe_features(str(tiny_fra_backbone), train_data=aligned_faces["train"],
                                test_data=aligned_faces["test"], holdout=0, image_size=48, num_classes=7)
    assert (res.num_train, res.num_eval, res.eval_on) == (240, 60, "test")
    assert res.top1 >= 25.0, res  # chance is 14.3 %
    held = linear_probe_features(str(tiny_fra_backbone), train_data=aligned_faces["train"], holdout=0.25,
                                 image_size=48, num_classes=7)
    assert held.eval_on == "holdout" and held.num_train + held.num_eval == 240


@pytest.mark.slow
def test_finetune_from_pretrained_fra_reaches_high_accuracy(tiny_fra_backbone, aligned_faces):
    """The fine-tune protocol's loop (trunk + head, AdamW, warm-up + cosine) in process."""
    from fra.data.augment import FERTransform
    from fra.data.local import LocalFERLoader
    from fra.evaluation.backbones import resolve_backbone
    from fra.evaluation.metrics import top1
    from fra.evaluation.worker import LoopSpec, build_classifier, fit

    torch.manual_seed(0)
    train = LocalFERLoader(aligned_faces["train"][0], 16, 48, labels=aligned_faces["train"][1],
                           transform=FERTransform(48, jitter_p=0, translate_p=0, rotate_p=0, erase_p=0))
    test = LocalFERLoader(aligned_faces["test"][0], 64, 48, train=False, labels=aligned_faces["test"][1])
    spec = LoopSpec(protocol="finetune", arch="resnet18", num_classes=7, optimizer="adamw", lr=2e-3, lr_head=2e-3,
                    weight_decay=0.05, momentum=0.9, epochs=6, warmup_epochs=0.5, min_lr=1e-6, batch_size=16,
                    iters_per_epoch=len(train), eval_every=3, last_k=2)
    model = build_classifier("resnet18", 7, resolve_backbone(str(tiny_fra_backbone)).state_dict)
    out = fit(model, spec, lambda e: (train.set_epoch(e), train)[1], lambda e: test)
    assert not out["backbone_unchanged"]
    # every 3rd epoch (the reference's --eval-freq) and each of the last 2 (the headline's)
    assert [h["epoch"] for h in out["history"] if "test_confusion" in h] == [3, 5, 6]
    assert top1(out["history"][-1]["test_confusion"]) >= 60.0, out["history"]  # chance is 14.3 %


class _Stream:
    """An epoch's batches as fra.data.stream.BatchStream delivers them: a ``skipped_corrupt``
    count, batches produced on demand; records which thread asked for the first batch."""

    def __init__(self, epoch: int, log: list, fail: bool = False):
        self.epoch, self.log, self.fail, self.skipped_corrupt = epoch, log, fail, epoch + 1

    def __iter__(self):
        import threading

        self.log.append(("first batch", self.epoch, threading.current_thread().name))
        if self.fail:
            raise OSError(f"shard of epoch {self.epoch} unreadable")
        for i in range(3):
            yield {"label": torch.tensor([10 * self.epoch + i])}


def test_next_epoch_prefetch_starts_the_next_epoch_during_evaluation():
    """Issue 16 §3: epoch e + 1's stream is started (first batch requested, in a background
    thread) when epoch e's batches run out, i.e. before evaluation; the batches, their order and
    the corrupt counts are those of the per-epoch streams; nothing starts past the last epoch."""
    from fra.evaluation.worker import NextEpochPrefetch

    log, made = [], []

    def make(epoch):
        made.append(epoch)
        return _Stream(epoch, log)

    batches = NextEpochPrefetch(make, epochs=3)
    seen = []
    for epoch in range(3):
        stream = batches(epoch)
        seen.append([int(b["label"]) for b in stream])
        assert stream.skipped_corrupt == epoch + 1
        if epoch < 2:  # "evaluation": the next epoch is already under way, in another thread
            ahead = batches._ready[epoch + 1]
            ahead._thread.join(timeout=10)
            assert log[-1] == ("first batch", epoch + 1, "fer-next-epoch")
    assert seen == [[0, 1, 2], [10, 11, 12], [20, 21, 22]]
    assert made == [0, 1, 2] and not batches._ready  # no stream for epoch 3
    assert log[0] == ("first batch", 0, "MainThread")


def test_next_epoch_prefetch_errors_surface_in_the_loop_and_early_stops_do_not_prefetch():
    from fra.evaluation.worker import NextEpochPrefetch

    log = []
    batches = NextEpochPrefetch(lambda e: _Stream(e, log, fail=e == 1), epochs=3)
    assert len(list(batches(0))) == 3
    with pytest.raises(OSError, match="epoch 1 unreadable"):
        list(batches(1))  # raised where the loop iterates, not lost in the thread
    stopped = NextEpochPrefetch(lambda e: _Stream(e, log), epochs=3)
    next(iter(stopped(0)))  # a consumer that stops early does not start the next epoch
    assert not stopped._ready
