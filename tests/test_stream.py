"""Ray Data streaming: shards -> decode + augment -> batches; exactly once, seeded, corrupt rows counted."""
from __future__ import annotations

import threading
from collections import Counter
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from fra.data.augment import FERTransform, TwoViewTransform
from fra.data.decode import decode_image, decode_mask, encode_jpeg
from fra.data.shards import write_shards
from fra.data.stream import BatchStream, fer_dataset, iter_batches, pretrain_dataset, row_key
from tests.corrupt_shards import corrupt_images, faces, write_shard_set
from tests.data_layouts import build_affectnet, build_image_folder, build_rafdb, build_vggface2

pytestmark = pytest.mark.ray


def _epoch(ds, epoch, batch_size=8, **kw) -> dict[int, tuple]:
    """key -> (label, view1, view2) for one epoch; fails on a duplicate."""
    out = {}
    for b in iter_batches(ds, batch_size, epoch=epoch, seed=0, drop_last=False, **kw):
        for i, key in enumerate(b["key"].tolist()):
            assert key not in out, "row streamed twice in one epoch"
            out[key] = (int(b["label"][i]), b["view1"][i].numpy(), b["view2"][i].numpy())
    return out


@pytest.fixture(scope="module")
def raf_shards(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("raf")
    expected = build_rafdb(tmp / "src", n_train=40, n_test=10)
    manifest = write_shards("rafdb", str(tmp / "src"), str(tmp / "shards"), images_per_shard=12, row_group_size=4,
                            parallel=False)
    return expected, manifest


def test_pretrain_round_trip_exactly_once_seeded(ray_local, raf_shards):
    expected, manifest = raf_shards
    want = {row_key(p): label for p, label in expected.good["train"].items()}
    ds = pretrain_dataset(manifest.uri, image_size=32, seed=7, with_keys=True, batch_size=5)
    e0 = _epoch(ds, 0)
    assert {k: v[0] for k, v in e0.items()} == want  # every good image once, right label
    v = next(iter(e0.values()))
    assert v[1].shape == (3, 32, 32) and v[1].dtype == np.uint8
    e1 = _epoch(ds, 1)
    assert set(e1) == set(want)
    assert sum(np.array_equal(e0[k][1], e1[k][1]) for k in want) < 3  # new draws each epoch
    # seeded: each view is a function of (seed, epoch, image) only, whatever the task split
    t = TwoViewTransform(32)
    for path in list(expected.good["train"])[:10]:
        img, key = decode_image((Path(manifest.source_root) / path).read_bytes()), row_key(path)
        for epoch, rows in ((0, e0), (1, e1)):
            v1, v2 = t(img, np.random.default_rng([7, epoch, 1, key]))
            assert np.array_equal(rows[key][1], v1.transpose(2, 0, 1)) and np.array_equal(rows[key][2], v2.transpose(2, 0, 1))


def test_fer_eval_stream_is_the_reference_eval_transform(ray_local, raf_shards):
    expected, manifest = raf_shards
    ds = fer_dataset(manifest.uri, image_size=24, split="test", train=False, with_keys=True)
    seen = {}
    for b in iter_batches(ds, 4, drop_last=False, local_shuffle_buffer=0):
        for i, key in enumerate(b["key"].tolist()):
            seen[key] = (int(b["label"][i]), b["image"][i].numpy())
    assert {k: v[0] for k, v in seen.items()} == {row_key(p): lab for p, lab in expected.good["test"].items()}
    path = sorted(expected.good["test"])[0]
    want = FERTransform(24, train=False)(decode_image((Path(manifest.source_root) / path).read_bytes()))
    assert np.array_equal(seen[row_key(path)][1], want.transpose(2, 0, 1))


def test_vggface2_views_are_made_from_the_loose_box_face_crop(ray_local, tmp_path):
    """The reference pretrains on face crops ("VGG-Face2-crop"): the card crops each image to its
    loose box (bb_landmark/loose_bb_train.csv) scaled by 1.3 about its centre, clipped to the image."""
    build_vggface2(tmp_path / "src")
    m = write_shards("vggface2", str(tmp_path / "src"), str(tmp_path / "out"), images_per_shard=8, parallel=False)
    path = "train/n000002/0003_01.jpg"  # loose box X=7, Y=5, W=40, H=50 on a 64 x 64 image
    crop = (1, 0, 53, 62)  # centre (27, 30), half-sizes 1.3 x (20, 25) = (26, 32.5): (1, -2.5, 53, 62.5)
    src = decode_image((tmp_path / "src" / path).read_bytes())
    key = row_key(path)
    rows = _epoch(pretrain_dataset(m.uri, image_size=32, seed=3, with_keys=True), 0)
    v1, v2 = TwoViewTransform(32)(src[crop[1]:crop[3], crop[0]:crop[2]], np.random.default_rng([3, 0, 1, key]))
    assert np.array_equal(rows[key][1], v1.transpose(2, 0, 1)) and np.array_equal(rows[key][2], v2.transpose(2, 0, 1))
    whole = _epoch(pretrain_dataset(m.uri, image_size=32, seed=3, with_keys=True, crop_to_box=False), 0)
    w1, _ = TwoViewTransform(32)(src, np.random.default_rng([3, 0, 1, key]))
    assert np.array_equal(whole[key][1], w1.transpose(2, 0, 1))


def test_affectnet_is_read_uncropped_as_the_reference_cropping_is_an_option(ray_local, tmp_path):
    build_affectnet(tmp_path / "src")
    m = write_shards("affectnet7", str(tmp_path / "src"), str(tmp_path / "out"), images_per_shard=8, parallel=False)
    path = "Manually_Annotated_Images/3/img0022.jpg"  # face box x 2, y 3, w 50, h 55 on a 64 x 64 image
    src = decode_image((tmp_path / "src" / path).read_bytes())

    def image(**kw):
        ds = fer_dataset(m.uri, image_size=24, split="val", train=False, with_keys=True, **kw)
        for b in iter_batches(ds, 4, drop_last=False, local_shuffle_buffer=0):
            for i, k in enumerate(b["key"].tolist()):
                if k == row_key(path):
                    return b["image"][i].numpy()
        raise AssertionError(f"{path} not streamed")

    assert np.array_equal(image(), FERTransform(24, train=False)(src).transpose(2, 0, 1))  # the card's default
    cropped = FERTransform(24, train=False)(np.ascontiguousarray(src[3:58, 2:52]))
    assert np.array_equal(image(crop_to_box=True), cropped.transpose(2, 0, 1))


def test_batch_stream_drops_placeholders_keeps_batch_size_and_counts():
    """No Ray: flagged rows leave, the rest is re-cut into full batches in order, and the count
    includes rows of a dropped last batch and of an all-corrupt batch."""
    flags = torch.zeros(31, dtype=torch.bool)
    flags[[0, 5, 6, 21]] = True
    flags[24:] = True  # one whole batch of placeholders

    def source():
        return [{"x": torch.arange(i, min(i + 8, 31)), "corrupt": flags[i:i + 8].clone()} for i in range(0, 31, 8)]

    good = [i for i in range(31) if not flags[i]]
    stream = BatchStream(source(), 8, drop_last=False)
    out = [b["x"].tolist() for b in stream]
    assert [len(b) for b in out] == [8, 8, 4] and sum(out, []) == good and stream.skipped_corrupt == 11
    stream = BatchStream(source(), 8, drop_last=True)
    assert [b["x"].tolist() for b in stream] == [good[:8], good[8:16]] and stream.skipped_corrupt == 11
    clean = [{"x": torch.arange(8)}]
    assert next(BatchStream(clean, 8)) is clean[0]  # nothing to drop: batches pass untouched


def test_corrupt_rows_are_dropped_and_counted_by_the_consumer(ray_local, tmp_path):
    """Corrupt images cross from the decode tasks to the consumer as flagged rows: every stream
    drops them, keeps full batches and counts them per pass."""
    images = faces(0, 5) + corrupt_images(1) + faces(5, 5) + corrupt_images(2)[1:]
    uri = write_shard_set(tmp_path / "bad", {"train": images})
    good = [row_key(f"train/img{i}.jpg") for i in range(12) if i not in (5, 11)]
    stream = iter_batches(pretrain_dataset(uri, image_size=32, with_keys=True, batch_size=4), 4, drop_last=False)
    keys = [k for b in stream for k in b["key"].tolist()]
    assert sorted(keys) == sorted(good) and len(good) == 10 and stream.skipped_corrupt == 2
    stream = iter_batches(fer_dataset(uri, 32, "train", train=True), 4, drop_last=True)
    assert [len(b["label"]) for b in stream] == [4, 4] and stream.skipped_corrupt == 2
    mc = {"size_crops": [32, 16], "nmb_crops": [2, 1], "min_scale": [0.2, 0.05], "max_scale": [1.0, 0.2]}
    stream = iter_batches(pretrain_dataset(uri, multicrop=mc), 3, drop_last=False)
    assert sum(len(b["crop1"]) for b in stream) == 10 and stream.skipped_corrupt == 2


def test_ray_train_style_shards_cover_the_split_once(ray_local, raf_shards):
    expected, manifest = raf_shards
    ds = pretrain_dataset(manifest.uri, image_size=16, with_keys=True, batch_size=4)
    iterators = ds.streaming_split(2, equal=True)  # as Ray Train's default DataConfig
    keys: list[list[int]] = [[], []]

    def consume(i):
        for b in iter_batches(iterators[i], 4, epoch=0, drop_last=False):
            keys[i] += b["key"].tolist()

    threads = [threading.Thread(target=consume, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert Counter(keys[0] + keys[1]) == Counter(row_key(p) for p in expected.good["train"])
    assert len(keys[0]) == len(keys[1]) == 20


def test_masks_and_crop_boxes_follow_each_view(ray_local, tmp_path):
    m = write_shards("synthetic_faces", "", str(tmp_path / "syn"), images_per_shard=20, row_group_size=10, parallel=False,
                     split="train", num_identities=5, images_per_identity=6, size=48)
    ds = pretrain_dataset(m.uri, image_size=32, with_params=True, with_masks=True, with_keys=True)
    b = next(iter(iter_batches(ds, 8, epoch=0)))
    table = pq.read_table(m.shard_uris("train")).to_pylist()
    masks = {row_key(r["path"]): decode_mask(r["mask"]) for r in table}
    t = TwoViewTransform(32)
    assert len({tuple(x) for x in b["box1"].tolist()}) == 8  # per-image crops
    for i, key in enumerate(b["key"].tolist()):
        for v in ("1", "2"):
            x0, y0, x1, y1 = (b[f"box{v}"][i].numpy() * 48).round().astype(int).tolist()
            params = TwoViewTransform(32).sample(48, 48, np.random.default_rng(0))[0]
            params = type(params)((x0, y0, x1, y1), bool(b[f"flip{v}"][i]), None, (), False, None, False)
            assert np.array_equal(b[f"mask{v}"][i].numpy(), t.render_mask(masks[key], params))
    assert int(b["mask1"].max()) > 0


def test_real_faces_on_the_real_decode_path(ray_local, tmp_path):
    """LFW faces and the astronaut photo as JPEG; views equal the in-process transform bit for bit."""
    from skimage.data import astronaut

    src = tmp_path / "faces"
    build_image_folder(src, classes=("face",), per_class=12, splits=("train",))
    astro = encode_jpeg(astronaut(), quality=90)
    (src / "train/face/astronaut.jpg").write_bytes(astro)
    m = write_shards("image_folder", str(src), str(tmp_path / "out"), images_per_shard=8, row_group_size=4, parallel=False)
    assert m.counts["train"]["total"] == 13 and len(m.skipped) == 2
    rows = _epoch(pretrain_dataset(m.uri, image_size=64, seed=3, with_keys=True), 0)
    key = row_key("train/face/astronaut.jpg")
    decoded = decode_image(astro)
    from PIL import Image
    import io

    assert np.abs(decoded.astype(int) - np.asarray(Image.open(io.BytesIO(astro)).convert("RGB"))).mean() < 1.0
    v1, v2 = TwoViewTransform(64)(decoded, np.random.default_rng([3, 0, 1, key]))
    assert np.array_equal(rows[key][1], v1.transpose(2, 0, 1)) and np.array_equal(rows[key][2], v2.transpose(2, 0, 1))
    assert len(rows) == 13


def test_datasets_carry_the_idle_back_off_and_it_reads_ray_s_real_executor(ray_local, raf_shards, monkeypatch):
    import ray

    from fra.data import executor_backoff
    from fra.data.executor_backoff import IdleBackoff

    expected, manifest = raf_shards
    before = list(ray.data.DataContext.get_current().custom_execution_callback_classes)
    ds = fer_dataset(manifest.uri, image_size=24, split="train", train=True, batch_size=4)
    # the dataset's snapshot has it (and so the split coordinator of a Ray Train job); the
    # process-wide context is left as it was
    assert IdleBackoff in ds.context.custom_execution_callback_classes
    assert ray.data.DataContext.get_current().custom_execution_callback_classes == before
    assert IdleBackoff in pretrain_dataset(manifest.uri, image_size=24).context.custom_execution_callback_classes
    # On Ray 2.60's executor the fingerprint exists (None would silently disable the back-off)
    # and moves as the execution progresses.
    # (A Dataset iterated in the driver runs its executor on a driver thread, so the callback's
    # calls of the module function can be recorded here.)
    seen, fingerprint = [], executor_backoff.progress_fingerprint
    monkeypatch.setattr(executor_backoff, "progress_fingerprint", lambda ex: seen.append(fingerprint(ex)) or seen[-1])
    rows = sum(len(b["label"]) for b in iter_batches(ds, 4, drop_last=False))
    assert rows == len(expected.good["train"])
    assert seen and None not in seen
    assert len(set(seen)) > 2
