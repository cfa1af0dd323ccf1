"""Tests for the procedural synthetic face generator (fra.data.synthetic) and `fra synth`."""
from __future__ import annotations

import subprocess
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from fra.data.synthetic import (
    EXPRESSIONS, LANDMARKS, PARTS, SyntheticFaces, contact_sheet, identity, render, write_image_folder,
)
from fra.errors import DataError

SKIN, BROWS, EYES, NOSE, MOUTH = (PARTS.index(p) for p in ("skin", "brows", "eyes", "nose", "mouth"))


def test_public_constants():
    assert EXPRESSIONS == ("neutral", "happy", "sad", "surprise", "fear", "disgust", "anger")
    assert PARTS == ("background", "skin", "brows", "eyes", "nose", "mouth", "hair")
    assert LANDMARKS == ("left_eye", "right_eye", "nose_tip", "mouth_left", "mouth_right")


def test_same_seed_same_bytes_and_different_seed_differs():
    a = SyntheticFaces(num_identities=10, images_per_identity=5, seed=0).sample(3, 4)
    b = SyntheticFaces(num_identities=10, images_per_identity=5, seed=0).sample(3, 4)
    for key in ("image", "mask", "landmarks"):
        assert a[key].tobytes() == b[key].tobytes()
    assert (a["label"], a["identity"], a["index"]) == (b["label"], 3, 4)
    other_seed = SyntheticFaces(num_identities=10, images_per_identity=5, seed=1).sample(3, 4)
    other_index = SyntheticFaces(num_identities=10, images_per_identity=5, seed=0).sample(3, 3)
    assert other_seed["image"].tobytes() != a["image"].tobytes()
    assert other_index["image"].tobytes() != a["image"].tobytes()
    assert identity(7) == identity(7) and identity(7) != identity(8)


@pytest.mark.parametrize("size", [64, 112, 160])
def test_shapes_dtypes_and_parts(size):
    spec = SyntheticFaces(num_identities=4, images_per_identity=7, size=size)
    for identity_id in range(4):
        s = spec.sample(identity_id, identity_id)
        assert s["image"].shape == (size, size, 3) and s["image"].dtype == np.uint8
        assert s["mask"].shape == (size, size) and s["mask"].dtype == np.uint8
        assert s["landmarks"].shape == (5, 2) and s["landmarks"].dtype == np.float32
        assert s["mask"].max() < len(PARTS)
        assert 0 <= s["label"] < len(EXPRESSIONS)
        present = set(np.unique(s["mask"]).tolist())
        assert {0, SKIN, BROWS, EYES, NOSE, MOUTH} <= present, f"missing parts in {present}"


def test_render_without_supersampling_and_clutter():
    image, mask, landmarks = render(identity(0), 1, np.random.default_rng(0), size=48, ss=1, clutter=False)
    assert image.shape == (48, 48, 3) and mask.shape == (48, 48) and landmarks.shape == (5, 2)


def _near(mask: np.ndarray, x: float, y: float, part: int, radius: int) -> bool:
    xi, yi = int(round(x)), int(round(y))
    window = mask[max(0, yi - radius):yi + radius + 1, max(0, xi - radius):xi + radius + 1]
    return bool((window == part).any())


def test_landmarks_inside_image_and_on_their_parts():
    spec = SyntheticFaces(num_identities=20, images_per_identity=7, size=112)
    for identity_id in range(20):
        s = spec.sample(identity_id, identity_id % 7)
        lm, mask = s["landmarks"], s["mask"]
        assert np.all((lm >= 0) & (lm < 112))
        assert lm[0, 0] < lm[1, 0] and lm[3, 0] < lm[4, 0]  # image-left first; roll stays within 25 deg
        for (x, y), part, radius in zip(lm, (EYES, EYES, NOSE, MOUTH, MOUTH), (1, 1, 2, 2, 2)):
            assert _near(mask, x, y, part, radius), (identity_id, x, y, PARTS[part])


def test_identity_disjoint_splits_with_right_sizes():
    spec = SyntheticFaces(num_identities=50, images_per_identity=3, split_fractions=(0.6, 0.2, 0.2))
    train, val, test = (set(spec.identities(s)) for s in ("train", "val", "test"))
    assert (len(train), len(val), len(test)) == (30, 10, 10)
    assert not (train & val or train & test or val & test)
    assert train | val | test == set(range(50))
    assert [spec.split_size(s) for s in ("train", "val", "test")] == [90, 30, 30]
    assert len(spec) == 150
    assert spec.identities("train") == spec.identities("train")
    default = SyntheticFaces(num_identities=10, images_per_identity=2)
    assert default.identities("val") == [] and default.split_size("test") == 4
    assert [s["identity"] for s in default.iter_split("test")] == [8, 8, 9, 9]


def test_classes_are_balanced():
    spec = SyntheticFaces(num_identities=30, images_per_identity=14)
    counts = Counter(spec.label(i, j) for i in range(30) for j in range(14))
    assert counts == {label: 60 for label in range(len(EXPRESSIONS))}
    uneven = SyntheticFaces(num_identities=700, images_per_identity=20)
    counts = Counter(uneven.label(i, j) for i in range(700) for j in range(20))
    assert max(counts.values()) / min(counts.values()) < 1.15
    assert spec.sample(2, 5)["label"] == spec.label(2, 5)


def test_expressions_change_the_mouth_and_nothing_away_from_the_features():
    ident = identity(11)
    renders = [render(ident, e, np.random.default_rng(5), clutter=False) for e in range(len(EXPRESSIONS))]
    neutral_image, neutral_mask, lm = renders[0]
    x0, y0 = np.floor(lm[3:].min(0)).astype(int) - 6
    x1, y1 = np.ceil(lm[3:].max(0)).astype(int) + 7
    for e, (image, mask, _) in enumerate(renders[1:], start=1):
        diff = np.abs(image.astype(np.int16) - neutral_image.astype(np.int16)).max(-1)
        # Sad and anger move the mouth least (their signal is mostly in the brows), by design.
        least = 4.0 if EXPRESSIONS[e] in ("happy", "surprise", "fear", "disgust") else 1.0
        assert diff[y0:y1, x0:x1].mean() > least, f"{EXPRESSIONS[e]} barely changes the mouth"
        assert ((mask == MOUTH) != (neutral_mask == MOUTH)).sum() >= 15
        # Same rng seed, so pose, light and background match; only the features (plus a blur
        # margin) may differ.
        features = (BROWS, EYES, NOSE, MOUTH)
        ys, xs = np.nonzero(np.isin(neutral_mask, features) | np.isin(mask, features))
        away = np.ones_like(diff, dtype=bool)
        away[max(0, ys.min() - 4):ys.max() + 5, max(0, xs.min() - 4):xs.max() + 5] = False
        assert diff[away].max() == 0, f"{EXPRESSIONS[e]} changed pixels away from the face features"


@pytest.mark.parametrize(
    "make, needle",
    [
        (lambda: SyntheticFaces(size=8), "8"),
        (lambda: SyntheticFaces(num_identities=-3), "-3"),
        (lambda: SyntheticFaces(images_per_identity=0), "0"),
        (lambda: SyntheticFaces(split_fractions=(0.5, 0.2, 0.2)), "0.5, 0.2, 0.2"),
        (lambda: SyntheticFaces(seed=-1), "-1"),
        (lambda: SyntheticFaces(jitter=-0.1), "-0.1"),
        (lambda: render(identity(0), 7, np.random.default_rng(0)), "7"),
        (lambda: render(identity(0), -1, np.random.default_rng(0)), "-1"),
        (lambda: render(identity(0), 0, np.random.default_rng(0), size=15), "15"),
        (lambda: identity(-5), "-5"),
        (lambda: SyntheticFaces(num_identities=3).sample(3, 0), "3"),
        (lambda: SyntheticFaces().identities("holdout"), "holdout"),
        (lambda: contact_sheet("/tmp/never.png", n=0), "0"),
    ],
)
def test_bad_parameters_raise_data_error(make, needle):
    with pytest.raises(DataError, match=needle.replace("(", r"\(").replace(".", r"\.")):
        make()


def test_contact_sheet_is_a_png_of_the_expected_size(tmp_path):
    path = contact_sheet(tmp_path / "sub" / "sheet.png", n=10, size=48, seed=2)
    with Image.open(path) as im:
        assert im.format == "PNG" and im.mode == "RGB" and im.size == (8 * 96, 2 * 48)
    plain = contact_sheet(tmp_path / "plain.png", n=3, size=32, with_masks=False)
    with Image.open(plain) as im:
        assert im.size == (3 * 32, 32)


def test_write_image_folder_writes_readable_jpegs_per_class(tmp_path):
    spec = SyntheticFaces(num_identities=10, images_per_identity=4, size=40)
    assert write_image_folder(tmp_path, spec, "test") == spec.split_size("test") == 8
    files = sorted(tmp_path.rglob("*.jpg"))
    assert len(files) == 8 and not list(tmp_path.rglob("*.tmp"))
    assert {p.name for p in tmp_path.iterdir()} == set(EXPRESSIONS)
    for p in files:
        identity_id, index = (int(v) for v in p.stem.split("_"))
        assert identity_id in spec.identities("test")
        assert p.parent.name == EXPRESSIONS[spec.label(identity_id, index)]
        with Image.open(p) as im:
            assert im.format == "JPEG" and im.size == (40, 40)
            im.load()
    with pytest.raises(DataError, match="bmp"):
        write_image_folder(tmp_path, spec, "test", fmt="bmp")


def test_cli_sheet_and_folder(tmp_path):
    from fra.cli.main import main

    sheet = tmp_path / "sheet.png"
    assert main(["synth", "sheet", str(sheet), "--n", "4", "--size", "32"]) == 0
    with Image.open(sheet) as im:
        assert im.size == (4 * 64, 32)
    out = tmp_path / "folder"
    assert main(["synth", "folder", str(out), "--split", "test", "--identities", "5",
                 "--per-identity", "2", "--size", "32"]) == 0
    assert len(list(out.rglob("*.jpg"))) == 2
    assert main(["synth", "sheet", str(sheet), "--size", "8"]) == 1


def test_dataset_card_matches_the_generator():
    import yaml

    card = yaml.safe_load((Path(__file__).parents[1] / "datasets" / "synthetic_faces.yaml").read_text())
    assert tuple(card["classes"]) == EXPRESSIONS and card["num_classes"] == len(EXPRESSIONS)
    assert tuple(card["parts"]) == PARTS and tuple(card["landmarks"]) == LANDMARKS
    assert len(card["normalization"]["mean"]) == len(card["normalization"]["std"]) == 3


def test_module_does_not_import_torch():
    code = "import sys, fra.data.synthetic; sys.exit('torch' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], check=False).returncode == 0


def test_aligned_faces_sit_on_the_template_with_their_masks():
    from fra.data.synthetic import ALIGN_TEMPLATE, PARTS, SyntheticFaces

    raw = SyntheticFaces(num_identities=6, images_per_identity=7, size=64, seed=5)
    aligned = SyntheticFaces(num_identities=6, images_per_identity=7, size=64, seed=5, align=True)
    eyes = PARTS.index("eyes")
    spread_raw, spread_aligned = [], []
    for i in range(6):
        a, r = aligned.sample(i, 2), raw.sample(i, 2)
        assert a["label"] == r["label"] and a["image"].shape == r["image"].shape
        assert np.abs(a["landmarks"] - ALIGN_TEMPLATE * 64).max() < 3.0  # a similarity fit of 5 points
        for x, y in a["landmarks"][:2].round().astype(int):  # the mask moved with the image
            assert (a["mask"][y - 1:y + 2, x - 1:x + 2] == eyes).any()
        spread_raw.append(r["landmarks"][0])
        spread_aligned.append(a["landmarks"][0])
    assert np.std(spread_aligned, axis=0).max() < 0.25 * np.std(spread_raw, axis=0).max()
    assert not np.array_equal(aligned.sample(0, 0)["image"], raw.sample(0, 0)["image"])
