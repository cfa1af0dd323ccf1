"""Shards written to and streamed from ``s3://`` against a real S3-compatible server (moto, 127.0.0.1).

The client is pyarrow's S3 filesystem; endpoint and credentials come from the standard AWS
environment variables (tests/conftest.py), as on a cluster node; URIs carry no keys.
"""
from __future__ import annotations

from pathlib import Path

import pytest

pytest.importorskip("moto")
pafs = pytest.importorskip("pyarrow.fs")

from fra.data.manifest import read_manifest  # noqa: E402
from fra.storage import resolve  # noqa: E402
from fra.data.shards import write_shards  # noqa: E402
from fra.data.stream import iter_batches, pretrain_dataset, row_key  # noqa: E402
from tests.data_layouts import build_rafdb  # noqa: E402

BUCKET = "fra-test"


def _upload(local: Path, location: str) -> None:
    from fra.storage import publish

    publish(local, location)


@pytest.mark.ray
def test_write_and_stream_shards_on_s3(ray_local, s3_server, tmp_path):
    uri = s3_server
    fs = resolve(uri())[0]
    expected = build_rafdb(tmp_path / "raf", n_train=24, n_test=6)
    _upload(tmp_path / "raf", uri("raw/rafdb"))
    m = write_shards("rafdb", uri("raw/rafdb"), uri("shards/rafdb"), images_per_shard=10, row_group_size=5, parallel=True)
    assert m.counts["train"]["total"] == 24 and m.counts["test"]["total"] == 6
    assert {s["path"]: s["reason"] for s in m.skipped} == expected.skipped
    names = {i.path for i in fs.get_file_info(pafs.FileSelector(f"{BUCKET}/shards/rafdb", recursive=True))}
    assert f"{BUCKET}/shards/rafdb/manifest.json" in names and not [n for n in names if n.endswith(".tmp")]
    for shard in m.shards:
        assert fs.get_file_info(f"{BUCKET}/shards/rafdb/{shard.path}").size == shard.bytes
    # resume against the object store: everything verifies, nothing is rewritten
    again = write_shards("rafdb", uri("raw/rafdb"), uri("shards/rafdb"), images_per_shard=10, row_group_size=5,
                         parallel=False)
    assert [s.sha256 for s in again.shards] == [s.sha256 for s in m.shards]
    # stream back through Ray Data: every good image exactly once, right label
    ds = pretrain_dataset(read_manifest(uri("shards/rafdb")).uri, image_size=24, with_keys=True)
    seen: dict[int, int] = {}
    for b in iter_batches(ds, 8, drop_last=False):
        for key, label in zip(b["key"].tolist(), b["label"].tolist()):
            assert key not in seen
            seen[key] = label
    assert seen == {row_key(p): lab for p, lab in expected.good["train"].items()}
