"""AffectNet's valence / arousal through the shared reader (affectnet_va card); no Ray."""
from __future__ import annotations

import pyarrow.parquet as pq
import pytest

from fra.data.shards import write_shards
from tests.data_layouts import build_affectnet, build_affectnet_va


def _rows(manifest) -> dict:
    return {r["path"]: r for uri in manifest.shard_uris()
            for r in pq.read_table(uri, columns=["path", "label", "targets"]).to_pylist()}


def test_affectnet_va_carries_valence_arousal_and_skips_rows_without(tmp_path):
    exp = build_affectnet_va(tmp_path / "src")
    manifest = write_shards("affectnet_va", str(tmp_path / "src"), str(tmp_path / "out"), parallel=False)
    assert manifest.targets == ("valence", "arousal")
    rows = _rows(manifest)
    assert {p: r["label"] for p, r in rows.items()} == {p: lab for d in exp.good.values() for p, lab in d.items()}
    assert set(rows) == set(exp.targets)
    for path, r in rows.items():
        assert r["targets"] == pytest.approx(exp.targets[path]), path
    assert {s["path"]: s["reason"] for s in manifest.skipped} == exp.skipped


def test_expression_cards_keep_rows_without_valence_arousal(tmp_path):
    build_affectnet(tmp_path / "src", num_classes=7)
    manifest = write_shards("affectnet7", str(tmp_path / "src"), str(tmp_path / "out"), parallel=False)
    rows = _rows(manifest)
    assert rows and all(r["targets"] == pytest.approx([0.1, -0.2]) for r in rows.values())
