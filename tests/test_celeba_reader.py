"""CelebA's official layout (with bad rows) through the reader and the shard writer; no Ray."""
from __future__ import annotations

import pyarrow.parquet as pq
import pytest

from fra.data.readers import get_reader
from fra.data.shards import write_shards
from fra.errors import DataError
from tests.data_layouts import CELEBA_ATTRIBUTES, build_celeba


def test_celeba_shards_carry_the_flags_and_count_bad_rows(tmp_path):
    root = tmp_path / "celeba"
    exp = build_celeba(root)
    manifest = write_shards("celeba", str(root), str(tmp_path / "out"), images_per_shard=5, row_group_size=4,
                            parallel=False)
    assert manifest.attributes == tuple(CELEBA_ATTRIBUTES) and len(manifest.attributes) == 40
    assert manifest.classes == ()
    rows = {}
    for uri in manifest.shard_uris():
        for r in pq.read_table(uri, columns=["path", "split", "label", "attributes", "image"]).to_pylist():
            assert r["path"] not in rows
            rows[r["path"]] = r
    good = {p: s for s, d in exp.good.items() for p in d}
    assert {p: r["split"] for p, r in rows.items()} == good
    assert {p: r["attributes"] for p, r in rows.items()} == exp.attributes  # (v + 1) / 2, header order
    assert all(r["label"] == -1 for r in rows.values())
    assert all(r["image"] == (root / p).read_bytes() for p, r in rows.items())  # the JPEG untouched
    assert {s["path"]: s["reason"] for s in manifest.skipped} == exp.skipped
    by_split = {}
    for s in manifest.skipped:
        by_split[s["split"]] = by_split.get(s["split"], 0) + 1
    # 900007 (no partition line) and 900008 (code 5) have no split; the rest are in theirs
    assert by_split == {"unassigned": 2, "train": 5, "val": 1, "test": 2}
    assert {s: manifest.counts[s]["total"] for s in ("train", "val", "test")} == {"train": 8, "val": 3, "test": 4}


def _write(root, attr: str, part: str):
    (root / "img_align_celeba").mkdir(parents=True, exist_ok=True)
    (root / "list_attr_celeba.txt").write_text(attr)
    (root / "list_eval_partition.txt").write_text(part)


@pytest.mark.parametrize("attr, message", [
    ("not-a-count\nA B\nx.jpg 1 1\n", "line 1 must be the number of images"),
    ("1\nA A\nx.jpg 1 1\n", "line 2 must name the attributes"),
    ("1\n", "expected an image count and a header line"),
])
def test_bad_header_is_a_clear_error(tmp_path, attr, message):
    _write(tmp_path, attr, "x.jpg 0\n")
    with pytest.raises(DataError, match=message):
        get_reader("celeba", str(tmp_path)).scan("train")


def test_release_split_sizes_are_checked_only_for_the_full_list(tmp_path):
    names = [f"{i:06d}.jpg" for i in range(1, 7)]
    attr = "6\nA B\n" + "".join(f"{n} 1 -1\n" for n in names)
    _write(tmp_path, attr, "".join(f"{n} {c}\n" for n, c in zip(names, (0, 0, 0, 1, 2, 2))))
    ok = get_reader("celeba", str(tmp_path), expected_split_sizes={"train": 3, "val": 1, "test": 2})
    assert ok.scan("train").skipped[0].reason == "missing"  # no images written: sizes agree, rows go on
    wrong = get_reader("celeba", str(tmp_path), expected_split_sizes={"train": 4, "val": 1, "test": 1})
    with pytest.raises(DataError, match="expected"):
        wrong.scan("train")
    subset = get_reader("celeba", str(tmp_path), expected_split_sizes={"train": 40, "val": 1, "test": 1})
    assert len(subset.scan("test").skipped) == 2  # a subset of the release is taken as it is
