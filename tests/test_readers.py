"""Every layout reader on a tiny tree in its official layout (with defects), through the shard writer."""
from __future__ import annotations

import pyarrow.parquet as pq
import pytest

from fra.data.cards import list_cards, load_card
from fra.data.readers import READERS, get_reader
from fra.data.readers.ferplus import majority_label
from fra.data.shards import write_shards
from fra.errors import ConfigError
from tests.data_layouts import BUILDERS


def _rows(manifest) -> dict:
    out = {}
    for uri in manifest.shard_uris():
        t = pq.read_table(uri, columns=["path", "label", "split", "image", "format"]).to_pylist()
        for r in t:
            assert r["path"] not in out, f"{r['path']} written twice"
            out[r["path"]] = r
    return out


@pytest.mark.parametrize("source", sorted(BUILDERS))
def test_layout_round_trip(source, tmp_path):
    root = tmp_path / "src"
    expected = BUILDERS[source](root)
    manifest = write_shards(source, str(root), str(tmp_path / "out"), images_per_shard=7, row_group_size=4,
                            parallel=False)
    rows = _rows(manifest)
    good = {p: (s, lab) for s, d in expected.good.items() for p, lab in d.items()}
    assert {p: (r["split"], r["label"]) for p, r in rows.items()} == good
    assert {s["path"]: s["reason"] for s in manifest.skipped} == expected.skipped
    assert {s: sum(v.values()) for s, v in manifest.excluded.items()} == expected.excluded
    for split, paths in expected.good.items():
        assert manifest.counts[split]["total"] == len(paths)
    # original JPEG bytes, never re-encoded
    for path, r in rows.items():
        if r["format"] == "jpeg":
            assert r["image"] == (root / path).read_bytes()


def test_every_card_loads_and_has_a_reader():
    names = list_cards()
    assert {"vggface2", "rafdb", "affectnet7", "affectnet8", "ferplus", "fer2013", "image_folder"} <= set(names)
    for name in names:
        card = load_card(name)
        assert card.reader_name in READERS, name
        assert len(card.normalization.mean) == 3 and card.obtain, name


def test_rafdb_class_order_and_label_offset(tmp_path):
    card = load_card("rafdb")
    assert card.classes == ("Surprise", "Fear", "Disgust", "Happiness", "Sadness", "Anger", "Neutral")
    (tmp_path / "EmoLabel").mkdir()
    (tmp_path / "EmoLabel/list_patition_label.txt").write_text("train_00001.jpg 1\ntest_00001.jpg 7\n")
    (tmp_path / "Image/aligned").mkdir(parents=True)
    for n in ("train_00001", "test_00001"):
        (tmp_path / f"Image/aligned/{n}_aligned.jpg").write_bytes(b"x")
    reader = get_reader("rafdb", str(tmp_path))
    assert [r.label for r in reader.scan("train").records] == [0]
    assert [r.label for r in reader.scan("test").records] == [6]


def test_ferplus_majority_protocol():
    assert majority_label([8, 1, 1, 0, 0, 0, 0, 0, 0, 0]) == 0  # single votes are dropped first
    assert majority_label([4, 4, 2, 0, 0, 0, 0, 0, 0, 0]) == -1  # no majority -> unknown
    assert majority_label([0, 0, 0, 0, 0, 0, 0, 0, 9, 1]) == -1  # unknown wins -> excluded
    assert majority_label([1, 1, 1, 1, 1, 1, 1, 1, 1, 1]) == -1
    assert majority_label([0, 0, 0, 0, 2, 0, 0, 6, 1, 1]) == 7


def test_vggface2_boxes_and_identity_labels(tmp_path):
    BUILDERS["vggface2"](tmp_path)
    scan = get_reader("vggface2", str(tmp_path)).scan("train")
    by_path = {r.path: r for r in scan.records}
    r = by_path["train/n000002/0003_01.jpg"]
    assert (r.identity, r.label, r.box) == ("n000002", 1, (7.0, 5.0, 47.0, 55.0))


def test_unknown_card_lists_valid_names():
    with pytest.raises(ConfigError, match="rafdb"):
        get_reader("no_such_dataset", "/tmp")
