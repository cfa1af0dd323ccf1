"""Shards written to and streamed from ``s3://`` against a real S3-compatible server (moto, 127.0.0.1).

The client is pyarrow's S3 filesystem; endpoint and credentials travel in the URI
(``s3://key:secret@bucket/path?endpoint_override=...&scheme=http``), so Ray workers need no
environment of their own.
"""
from __future__ import annotations

import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

pytest.importorskip("moto")
pafs = pytest.importorskip("pyarrow.fs")

from fra.data.manifest import read_manifest  # noqa: E402
from fra.data.shards import write_shards  # noqa: E402
from fra.data.stream import iter_batches, pretrain_dataset, row_key  # noqa: E402
from tests.data_layouts import build_rafdb  # noqa: E402

BUCKET = "fra-test"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def s3_server():
    port = _free_port()
    proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 60
        while True:
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/moto-api/", timeout=1)
                break
            except OSError:
                if time.time() > deadline or proc.poll() is not None:
                    pytest.fail("moto server did not start")
                time.sleep(0.2)
        query = f"endpoint_override=127.0.0.1:{port}&scheme=http&region=us-east-1"
        fs, _ = pafs.FileSystem.from_uri(f"s3://testing:testing@{BUCKET}?{query}&allow_bucket_creation=true")
        fs.create_dir(BUCKET)
        yield fs, (lambda path: f"s3://testing:testing@{BUCKET}/{path}?{query}")
    finally:
        proc.terminate()
        proc.wait(10)


def _upload(fs, local: Path, prefix: str) -> None:
    for p in local.rglob("*"):
        if p.is_file():
            with fs.open_output_stream(f"{BUCKET}/{prefix}/{p.relative_to(local).as_posix()}") as fh:
                fh.write(p.read_bytes())


@pytest.mark.ray
def test_write_and_stream_shards_on_s3(ray_local, s3_server, tmp_path):
    fs, uri = s3_server
    expected = build_rafdb(tmp_path / "raf", n_train=24, n_test=6)
    _upload(fs, tmp_path / "raf", "raw/rafdb")
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
