"""Shard writer: manifest, Parquet settings, atomic writes, resume (also after a kill), Ray tasks, CLI."""
from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from fra.data.manifest import SCHEMA_VERSION, read_manifest
from fra.data.shards import write_shards
from fra.errors import DataError
from tests.data_layouts import build_rafdb

SYNTH = {"num_identities": 10, "images_per_identity": 12, "size": 48}


def _mtimes(out: Path) -> dict:
    return {p.relative_to(out).as_posix(): p.stat().st_mtime_ns for p in out.rglob("part-*.parquet")}


def test_manifest_and_parquet_settings(tmp_path):
    root, out = tmp_path / "raf", tmp_path / "out"
    expected = build_rafdb(root, n_train=30, n_test=8)
    m = write_shards("rafdb", str(root), str(out), images_per_shard=12, row_group_size=5, parallel=False)
    assert m.schema_version == SCHEMA_VERSION and m.dataset == "rafdb" and len(m.fingerprint) == 64
    assert m.classes[0] == "Surprise" and m.counts["train"]["total"] == 30 and m.counts["test"]["total"] == 8
    assert sum(m.counts["train"]["classes"].values()) == 30
    assert {s["reason"] for s in m.skipped} == {"corrupt", "truncated", "unknown_label", "missing"}
    assert [s.path for s in m.shards] == [f"train/part-{i:05d}.parquet" for i in range(3)] + ["test/part-00000.parquet"]
    for shard in m.shards:
        data = (out / shard.path).read_bytes()
        assert len(data) == shard.bytes and hashlib.sha256(data).hexdigest() == shard.sha256
        meta = pq.ParquetFile(out / shard.path).metadata
        assert meta.num_rows == shard.rows and meta.row_group(0).num_rows == min(5, shard.rows)
        image = meta.row_group(0).column(0)
        assert image.path_in_schema == "image" and image.compression == "UNCOMPRESSED"
        assert not image.has_dictionary_page and not image.is_stats_set
    assert read_manifest(str(out)).to_dict() == m.to_dict()
    assert sum(len(v) for v in expected.good.values()) == m.num_rows()
    assert not list(out.rglob("*.tmp"))


def test_fingerprint_tracks_the_source(tmp_path):
    root = tmp_path / "raf"
    build_rafdb(root, n_train=6, n_test=2)
    a = write_shards("rafdb", str(root), str(tmp_path / "a"), parallel=False)
    b = write_shards("rafdb", str(root), str(tmp_path / "b"), parallel=False)
    assert a.fingerprint == b.fingerprint and [s.sha256 for s in a.shards] == [s.sha256 for s in b.shards]
    labels = root / "EmoLabel/list_patition_label.txt"
    labels.write_text(labels.read_text().replace("train_00001.jpg 1", "train_00001.jpg 2"))
    c = write_shards("rafdb", str(root), str(tmp_path / "c"), parallel=False)
    assert c.fingerprint != a.fingerprint


def test_resume_skips_verified_shards_and_rewrites_damaged_ones(tmp_path):
    out = tmp_path / "out"
    first = write_shards("synthetic_faces", "", str(out), images_per_shard=25, row_group_size=10, parallel=False, **SYNTH)
    before = _mtimes(out)
    again = write_shards("synthetic_faces", "", str(out), images_per_shard=25, row_group_size=10, parallel=False, **SYNTH)
    assert _mtimes(out) == before and again.fingerprint == first.fingerprint
    victim = out / first.shards[1].path
    victim.write_bytes(victim.read_bytes()[:-7] + b"garbage")  # same size, wrong bytes
    fixed = write_shards("synthetic_faces", "", str(out), images_per_shard=25, row_group_size=10, parallel=False, **SYNTH)
    after = _mtimes(out)
    assert after[first.shards[1].path] != before[first.shards[1].path]
    assert all(after[p] == t for p, t in before.items() if p != first.shards[1].path)
    assert [s.sha256 for s in fixed.shards] == [s.sha256 for s in first.shards]


_KILLABLE = textwrap.dedent("""
    import sys, time
    from fra.data.readers.synthetic_faces import SyntheticFacesReader
    from fra.data.shards import write_shards
    load = SyntheticFacesReader.load
    def slow(self, record):
        time.sleep(0.03)
        return load(self, record)
    SyntheticFacesReader.load = slow
    write_shards("synthetic_faces", "", sys.argv[1], images_per_shard=20, row_group_size=10, parallel=False,
                 shuffle=False, num_identities=10, images_per_identity=12, size=48)
""")


@pytest.mark.slow
def test_writer_killed_mid_way_leaves_no_partial_shard_and_resumes(tmp_path):
    out = tmp_path / "out"
    proc = subprocess.Popen([sys.executable, "-c", _KILLABLE, str(out)], cwd=Path(__file__).parents[1])
    try:
        deadline = time.time() + 60
        while time.time() < deadline and len(list(out.glob("train/part-*.parquet"))) < 2:
            time.sleep(0.05)
        time.sleep(0.25)  # now in the middle of a later shard
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    done = sorted(p.relative_to(out).as_posix() for p in out.rglob("part-*.parquet"))
    assert 2 <= len(done) < 7 and not (out / "manifest.json").exists()
    for rel in done:  # every visible shard is complete (a partial file has no Parquet footer)
        assert pq.ParquetFile(out / rel).metadata.num_rows == (16 if rel.endswith("00004.parquet") else 20)
    before = _mtimes(out)
    m = write_shards("synthetic_faces", "", str(out), images_per_shard=20, row_group_size=10, parallel=False,
                     shuffle=False, **SYNTH)
    assert m.num_rows() == 120 and len(m.shards) == 7  # train 96 = 4 x 20 + 16, test 24 = 20 + 4
    after = _mtimes(out)
    kept = [p for p in before if after.get(p) == before[p]]
    assert len(kept) >= len(before) - 1  # at most the shard whose state file was not yet written
    assert not list(out.rglob("*.tmp"))


@pytest.mark.ray
def test_ray_tasks_write_the_same_shards(ray_local, tmp_path):
    local = write_shards("synthetic_faces", "", str(tmp_path / "a"), images_per_shard=30, row_group_size=10,
                         parallel=False, **SYNTH)
    remote = write_shards("synthetic_faces", "", str(tmp_path / "b"), images_per_shard=30, row_group_size=10,
                          parallel=True, **SYNTH)
    assert remote.fingerprint == local.fingerprint
    assert [(s.path, s.sha256) for s in remote.shards] == [(s.path, s.sha256) for s in local.shards]


def test_cli_writes_shards(tmp_path, capsys):
    from fra.cli.main import main

    out = tmp_path / "cli"
    rc = main(["shards", "synthetic_faces", str(out), "--local", "--num-identities", "5", "--images-per-identity", "4",
               "--size", "32", "--images-per-shard", "8", "--split", "train"])
    assert rc == 0 and capsys.readouterr().out.strip().endswith("manifest.json")
    m = json.loads((out / "manifest.json").read_text())
    assert m["counts"]["train"]["total"] == 16 and list(m["counts"]) == ["train"]
    assert main(["shards", "rafdb", str(tmp_path / "nope"), str(out), "--local"]) == 1


def test_bad_arguments_are_data_errors(tmp_path):
    with pytest.raises(DataError, match="no split"):
        write_shards("synthetic_faces", "", str(tmp_path), split="nope", parallel=False)
    with pytest.raises(DataError):
        read_manifest(str(tmp_path / "missing"))
    assert os.listdir(tmp_path) == []


def test_sweep_synthetic_shards_render_the_generator_seed_they_name(tmp_path, monkeypatch):
    """A sweep's chained evaluation reads faces of other identities than pretraining's: its
    ``synthetic_fer.seed`` is the face generator's seed (it was once taken as the shuffle seed,
    so every sweep evaluated on generator seed 0, the pretraining faces)."""
    import fra.data.shards as shards_mod
    from fra.tuning.sweep import _synthetic_shards

    real = shards_mod.write_shards
    monkeypatch.setattr(shards_mod, "write_shards", lambda *a, **k: real(*a, **{**k, "parallel": False}))

    def images(root) -> list[str]:
        return sorted(hashlib.sha256(b).hexdigest() for f in Path(root).rglob("part-*.parquet")
                      for b in pq.read_table(f, columns=["image"]).column("image").to_pylist())

    faces = {"num_identities": 2, "images_per_identity": 2, "size": 32}
    sweep = _synthetic_shards("synthetic_faces", "fer", {"enabled": True, **faces, "seed": 3}, str(tmp_path / "s" / "x"))
    for seed in (3, 0):
        real("synthetic_faces", "", str(tmp_path / f"g{seed}"), parallel=False, options={**faces, "seed": seed})
    assert images(sweep) == images(tmp_path / "g3") != images(tmp_path / "g0")
