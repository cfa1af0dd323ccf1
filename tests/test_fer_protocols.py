"""The FER protocols' loops in process, without Ray: a linear probe and a fine-tune of a briefly
pretrained FRA backbone on aligned synthetic faces, and the evaluation loop's next-epoch prefetch.
(The Ray Train jobs are in tests/test_fer_eval.py; these tests used to sit there, in the suite's Ray
unit, where their ~55 s waited for its Ray jobs instead of running beside them.)"""
from __future__ import annotations

import numpy as np
import pytest
import torch

from fra.config import load_config


pytestmark = pytest.mark.usefixtures("one_thread_per_module")


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
    torch.set_num_threads(1)  # session fixture: set up before the module's one_thread_per_module
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
