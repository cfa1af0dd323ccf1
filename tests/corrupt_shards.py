"""Hand-made shard sets that hold corrupt images (the shard writer never writes one).

Real shards can still meet a corrupt image while streaming (bit rot, a copy cut short), so the
stream, pretraining and FER evaluation must skip and count it; these sets let tests check the
exact count.
"""
from __future__ import annotations

import hashlib
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from fra.data.manifest import Manifest, ShardInfo, write_manifest
from fra.data.shards import SHARD_SCHEMA, parquet_options
from tests.data_layouts import CORRUPT, face_jpeg, truncated_jpeg


def corrupt_images(n: int) -> list[bytes]:
    """``n`` undecodable images: alternately not-a-JPEG and a truncated JPEG."""
    return [CORRUPT if i % 2 == 0 else truncated_jpeg(i) for i in range(n)]


def write_shard_set(out: Path, splits: dict[str, list[bytes]], classes=("a", "b", "c"), size: int = 64,
                    row_group_size: int = 4) -> str:
    """One shard per split holding exactly ``splits[split]`` in order; row ``i`` of a split has label
    ``i % len(classes)`` and path ``<split>/img<i>.jpg``. Returns the shard root."""
    shards, counts = [], {}
    for split, images in splits.items():
        n = len(images)
        cols = {name: [None] * n for name in SHARD_SCHEMA.names}
        cols.update(image=images, label=[i % len(classes) for i in range(n)], split=[split] * n,
                    path=[f"{split}/img{i}.jpg" for i in range(n)], format=["jpeg"] * n, width=[size] * n,
                    height=[size] * n)
        rel = f"{split}/part-00000.parquet"
        (out / split).mkdir(parents=True, exist_ok=True)
        pq.write_table(pa.Table.from_pydict(cols, schema=SHARD_SCHEMA), out / rel, **parquet_options(row_group_size))
        data = (out / rel).read_bytes()
        shards.append(ShardInfo(rel, split, n, len(data), hashlib.sha256(data).hexdigest()))
        counts[split] = {"total": n, "classes": {}}
    write_manifest(Manifest(1, "image_folder", "", "corrupt-set", tuple(classes), counts, tuple(shards),
                            parquet={"row_group_size": row_group_size}), str(out))
    return str(out)


def faces(start: int, n: int, size: int = 64) -> list[bytes]:
    """``n`` good face JPEGs (LFW faces ``start`` ... ``start + n - 1``)."""
    return [face_jpeg(i, size) for i in range(start, start + n)]
