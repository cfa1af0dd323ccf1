"""The synthetic faces' attributes, glasses and valence/arousal (fra.data.synthetic_attributes)."""
from __future__ import annotations

import math

import numpy as np
import pyarrow.parquet as pq
from PIL import ImageFilter

from fra.data import synthetic_attributes as sa
from fra.data.shards import write_shards
from fra.data.synthetic import SyntheticFaces
from fra.data.synthetic_render import EXPRESSION_TABLE, identity


def test_scene_replay_matches_the_renderer(monkeypatch):
    """Roll read from the rendered eye line and the blur call agree with the replayed draws."""
    blurred = []
    real = ImageFilter.GaussianBlur
    monkeypatch.setattr(ImageFilter, "GaussianBlur", lambda radius: blurred.append(True) or real(radius))
    spec = SyntheticFaces(num_identities=6, images_per_identity=5, size=48)
    flags = []
    for i in range(6):
        for k in range(5):
            n = len(blurred)
            eyes = spec.sample(i, k)["landmarks"][:2].astype(np.float64)
            scene = sa.scene_draws(spec.label(i, k), np.random.default_rng([0, i, k]), spec.intensity, spec.jitter)
            # both eyes sit at the same face-unit height: the eye line's angle is the roll
            roll = math.atan2(eyes[1, 1] - eyes[0, 1], eyes[1, 0] - eyes[0, 0])
            assert abs(roll - scene["roll"]) < 1e-3
            assert (len(blurred) > n) == scene["blur"]
            flags.append(scene["blur"])
    assert 0 < sum(flags) < len(flags)  # both cases were exercised


def test_expression_strength_is_the_first_draw():
    rng = np.random.default_rng(7)
    scene = sa.scene_draws(3, rng, (0.25, 1.0), 0.0)
    assert np.allclose(scene["params"], EXPRESSION_TABLE[3] * scene["u"])  # jitter 0: table x strength
    assert 0.25 <= scene["u"] <= 1.0


def test_hair_colour_class_is_the_palette_entry_drawn():
    for seed in range(300):
        r = np.random.default_rng(seed)  # identity()'s draws up to the hair colour
        r.uniform(), r.uniform(), r.uniform(), r.normal(0, 6, 3)
        assert sa.hair_index(identity(seed)["hair_color"]) == int(r.integers(6)), seed


def test_valence_arousal_are_the_prototype_scaled_by_strength():
    spec = SyntheticFaces(num_identities=3, images_per_identity=7, intensity=(1.0, 1.0), jitter=0.0)
    for k in range(7):
        _, va = spec.annotations(0, k)
        assert np.allclose(va, sa.AFFECT_PROTOTYPES[spec.label(0, k)])  # strength 1 = the prototype
    weak = SyntheticFaces(num_identities=3, images_per_identity=7, intensity=(0.5, 0.5), jitter=0.0)
    happy = [k for k in range(7) if weak.label(0, k) == 1][0]
    assert np.allclose(weak.annotations(0, happy)[1], 0.5 * np.array([0.8, 0.4]) / 0.5 * 1.0)


def test_glasses_change_only_the_images_that_wear_them():
    plain = SyntheticFaces(num_identities=4, images_per_identity=4, size=64)
    some = SyntheticFaces(num_identities=4, images_per_identity=4, size=64, glasses=0.5)
    worn = 0
    for i in range(4):
        for k in range(4):
            a, b = plain.sample(i, k), some.sample(i, k)
            flags_plain, _ = plain.annotations(i, k)
            flags, _ = some.annotations(i, k)
            assert len(flags_plain) == len(sa.ATTRIBUTES) and flags[:-1] == flags_plain
            assert np.array_equal(a["mask"], b["mask"]) and np.array_equal(a["landmarks"], b["landmarks"])
            if flags[-1]:
                worn += 1
                eyes = a["landmarks"][:2].astype(np.float64)
                ys, xs = np.nonzero(np.abs(a["image"].astype(int) - b["image"].astype(int)).sum(2))
                assert len(xs) > 20
                # rims, bridge and temples reach at most 1.1 + 0.5 eye distances from the eyes' midpoint
                far = np.hypot(xs - eyes[:, 0].mean(), ys - eyes[:, 1].mean())
                assert far.max() <= 1.6 * np.hypot(*(eyes[1] - eyes[0])) + 2
            else:
                assert np.array_equal(a["image"], b["image"])
    assert 0 < worn < 16


def test_reader_writes_attributes_and_targets(tmp_path):
    manifest = write_shards("synthetic_faces", "", str(tmp_path / "s"), images_per_shard=50, parallel=False,
                            num_identities=5, images_per_identity=3, size=32, with_attributes=True, glasses=0.3)
    assert manifest.attributes == sa.ATTRIBUTES + ("Eyeglasses",) and manifest.targets == ("valence", "arousal")
    spec = SyntheticFaces(num_identities=5, images_per_identity=3, size=32, glasses=0.3)
    for uri in manifest.shard_uris():
        for row in pq.read_table(uri, columns=["path", "attributes", "targets"]).to_pylist():
            i, k = (int(v) for v in row["path"].rsplit("/", 1)[1].split("_"))
            flags, va = spec.annotations(i, k)
            assert row["attributes"] == list(flags)
            assert np.allclose(row["targets"], va, atol=1e-6)
    bare = write_shards("synthetic_faces", "", str(tmp_path / "b"), parallel=False, num_identities=2,
                        images_per_identity=1, size=32)
    assert bare.attributes == () and bare.targets == ()
    column = pq.read_table(bare.shard_uris()[0], columns=["attributes"]).column(0)
    assert column.null_count == len(column) > 0
