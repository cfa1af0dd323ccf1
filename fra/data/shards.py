"""Shard writer: a dataset in its official layout -> Parquet shards + manifest.

The driver scans the source through its layout reader (label files and listings only), splits
each split's records into fixed shards, and runs one Ray task per shard that is not already done.
A task reads and fully decodes every image (bad ones are skipped and listed, the task goes on),
builds the Parquet file in memory, and publishes it atomically (temp name + rename), followed by
a small state file ``_state/<split>/part-NNNNN.json`` with its checksum. On a re-run, a shard
whose state file matches the plan and whose file matches the recorded size (and SHA-256) is
skipped, so a killed writer resumes where it stopped and never leaves a half-written shard.
The manifest is written last.
"""
from __future__ import annotations

import datetime as _dt
import hashlib
import json
import logging
import posixpath
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from fra.data.decode import CorruptImageError, image_info
from fra.data.manifest import SCHEMA_VERSION, Manifest, ShardInfo, read_manifest, write_manifest
from fra.data.readers import Reader, Record, Skip, get_reader, reader_classes
from fra.data.readers.base import join, put_atomic, read_bytes, redact, resolve
from fra.storage import relative
from fra.errors import DataError

logger = logging.getLogger(__name__)

SHARD_SCHEMA = pa.schema(
    [
        ("image", pa.binary()),  # original encoded bytes (JPEG untouched)
        ("label", pa.int64()),  # index into the manifest's classes; -1 = none
        ("identity", pa.string()),
        ("split", pa.string()),
        ("path", pa.string()),  # source path relative to the dataset root
        ("format", pa.string()),  # jpeg | png | other
        ("width", pa.int32()),
        ("height", pa.int32()),
        ("box", pa.list_(pa.float32())),  # [x0, y0, x1, y1] in source pixels, nullable
        ("landmarks", pa.list_(pa.float32())),  # flat x, y, ... in source pixels, nullable
        ("mask", pa.binary()),  # PNG part mask aligned with the image, nullable
        ("attributes", pa.list_(pa.float32())),  # per-image flags / values (card options.attributes), nullable
        ("targets", pa.list_(pa.float32())),  # continuous targets (manifest targets: valence, arousal), nullable
    ]
)
_SMALL_COLUMNS = ["label", "identity", "split", "path", "format", "width", "height"]


@dataclass(frozen=True)
class ShardPlan:
    """What one task writes: the records of one shard and a key identifying them."""

    split: str
    index: int
    records: tuple[Record, ...]
    key: str

    @property
    def path(self) -> str:
        return f"{self.split}/part-{self.index:05d}.parquet"

    @property
    def state_path(self) -> str:
        return f"_state/{self.split}/part-{self.index:05d}.json"


def parquet_options(row_group_size: int) -> dict:
    """Parquet settings chosen for speed: no compression or dictionary on the image bytes."""
    return {
        "row_group_size": int(row_group_size),
        "compression": {c: ("none" if c in ("image", "mask") else "snappy") for c in SHARD_SCHEMA.names},
        "use_dictionary": ["identity", "split", "format"],
        "write_statistics": ["label", "split", "width", "height"],
    }


def write_shard(reader: Reader, plan: ShardPlan, out: str, row_group_size: int) -> dict:
    """Read, validate and write one shard; returns its state (also stored next to it).

    Unreadable, corrupt and truncated images are skipped and listed; nothing here raises for a
    bad image. Runs as a Ray task in :func:`write_shards` (or in-process).
    """
    cols: dict[str, list] = {name: [] for name in SHARD_SCHEMA.names}
    skipped: list[Skip] = []
    for rec in plan.records:
        try:
            data = reader.load(rec)
            fmt, width, height = image_info(data["image"])
        except FileNotFoundError as exc:
            skipped.append(Skip(rec.split, rec.path, "missing", str(exc)[:200]))
            continue
        except CorruptImageError as exc:
            text = str(exc)
            reason = "truncated" if ("Premature end" in text or "truncated" in text) else "corrupt"
            skipped.append(Skip(rec.split, rec.path, reason, text[:200]))
            continue
        except (OSError, ValueError) as exc:
            skipped.append(Skip(rec.split, rec.path, "unreadable", f"{type(exc).__name__}: {exc}"[:200]))
            continue
        if (bad := reader.check(rec, width, height)) is not None:
            skipped.append(bad)
            continue
        marks = data.get("landmarks", rec.landmarks)
        for name, value in (
            ("image", data["image"]), ("label", rec.label), ("identity", rec.identity), ("split", rec.split),
            ("path", rec.path), ("format", fmt), ("width", width), ("height", height),
            ("box", list(rec.box) if rec.box is not None else None),
            ("landmarks", list(marks) if marks is not None else None), ("mask", data.get("mask")),
            ("attributes", list(rec.attributes) if rec.attributes is not None else None),
            ("targets", list(rec.targets) if rec.targets is not None else None),
        ):
            cols[name].append(value)
    table = pa.Table.from_pydict(cols, schema=SHARD_SCHEMA)
    sink = pa.BufferOutputStream()
    pq.write_table(table, sink, **parquet_options(row_group_size))
    payload = sink.getvalue().to_pybytes()
    labels, counts = np.unique(np.asarray(cols["label"], dtype=np.int64), return_counts=True)
    state = {
        "key": plan.key,
        "path": plan.path,
        "split": plan.split,
        "rows": table.num_rows,
        "bytes": len(payload),
        "sha256": hashlib.sha256(payload).hexdigest(),
        "counts": {str(int(k)): int(v) for k, v in zip(labels, counts)},
        "skipped": [s.to_dict() for s in skipped],
    }
    fs, base = resolve(out)
    put_atomic(fs, join(base, plan.path), payload)
    put_atomic(fs, join(base, plan.state_path), json.dumps(state, sort_keys=True).encode())
    return state


def write_shards(
    source: str,
    root: str,
    out: str,
    *,
    split: str | None = None,
    images_per_shard: int = 5000,
    row_group_size: int = 1000,
    resume: bool = True,
    verify: str = "sha256",
    shuffle: bool = True,
    seed: int = 0,
    parallel: bool = True,
    num_cpus: float = 1.0,
    max_in_flight: int | None = None,
    options: dict | None = None,
    **reader_options,
) -> Manifest:
    """Convert a dataset to Parquet shards plus ``<out>/manifest.json``.

    Args:
        source: dataset card name (``rafdb``, ``vggface2``, ``synthetic_faces``, ...) or card path.
        root: dataset root in its official layout (local path or URI; ignored by synthetic data).
        out: output directory (local path or ``s3://`` / ``gs://`` URI).
        split: convert only this split (default: every split of the card).
        images_per_shard: records per shard file.
        row_group_size: rows per Parquet row group (the smallest unit a reader fetches).
        resume: keep finished shards that verify; False rewrites everything.
        verify: ``sha256`` (re-hash finished shards) or ``size`` (cheaper, for object stores).
        shuffle: shuffle each split's records (seeded) before cutting shards, so shards and row
            groups mix identities and classes.
        seed: shuffle seed.
        parallel: one Ray task per shard (False: in this process, in order).
        num_cpus: CPUs per Ray task.
        max_in_flight: bound on concurrent tasks (default: twice the cluster CPUs).
        options: reader options as a mapping (what pipelines and the CLI pass): the only way
            to give a reader a ``seed`` (the generator seed of ``synthetic_faces``), since the
            keyword ``seed`` is the shuffle seed above.
        **reader_options: layout options overriding the card's ``options`` (e.g. for
            ``synthetic_faces``: ``num_identities``, ``images_per_identity``, ``size``).

    Returns:
        The manifest that was written.
    """
    if images_per_shard <= 0 or row_group_size <= 0:
        raise DataError("images_per_shard and row_group_size must be positive")
    if verify not in ("sha256", "size"):
        raise DataError(f"verify must be 'sha256' or 'size', got {verify!r}")
    reader = get_reader(source, root, **{**(options or {}), **reader_options})
    splits = [split] if split else reader.splits()
    unknown = [s for s in splits if s not in reader.card.split_names and s not in reader.splits()]
    if unknown:
        raise DataError(f"{reader.card.name} has no split {unknown[0]!r}; splits: {list(reader.card.split_names)}")
    plans, listing_skips, excluded, fingerprint = _plan(reader, splits, images_per_shard, shuffle, seed)
    fs, base = resolve(out)
    _clean_temp(fs, base, splits)
    states = {}
    for plan in plans if resume else ():
        if (state := _finished(fs, base, plan, verify)) is not None:
            states[(plan.split, plan.index)] = state
    todo = [p for p in plans if (p.split, p.index) not in states]
    logger.info("%s: %d shards planned, %d already done, %d to write", reader.card.name, len(plans),
                len(plans) - len(todo), len(todo))
    for plan, state in _run(reader, todo, out, row_group_size, parallel, num_cpus, max_in_flight):
        states[(plan.split, plan.index)] = state
    _remove_orphans(fs, base, splits, plans)
    manifest = _manifest(reader, splits, plans, states, listing_skips, excluded, fingerprint, row_group_size)
    uri = write_manifest(manifest, out)
    logger.info("wrote %s: %d rows in %d shards, %d skipped", redact(uri), manifest.num_rows(), len(manifest.shards),
                len(manifest.skipped))
    return read_manifest(uri)


def _plan(reader: Reader, splits: list[str], per_shard: int, shuffle: bool, seed: int):
    digest = hashlib.sha256(json.dumps(reader.describe(), sort_keys=True).encode())
    plans: list[ShardPlan] = []
    listing_skips: list[Skip] = []
    excluded: dict[str, dict] = {}
    for split in splits:
        scan = reader.scan(split)
        listing_skips += scan.skipped
        if scan.excluded:
            excluded[split] = dict(scan.excluded)
        digest.update(f"\x00{split}\x00{scan.digest}".encode())
        for r in scan.records:
            digest.update(f"{r.path}\x01{r.label}\x01{r.size}\x01{r.identity}\x01{r.box}\n".encode())
        records = list(scan.records)
        if shuffle:
            order = np.random.default_rng([seed, int.from_bytes(split.encode()[:8].ljust(8, b"\0"), "little")])
            records = [records[i] for i in order.permutation(len(records))]
        for start in range(0, len(records), per_shard):
            chunk = tuple(records[start : start + per_shard])
            # Annotations enter the key only where a record has attributes (the landmark layouts),
            # so the keys of shard sets written before them stay valid.
            key = hashlib.sha256(repr([(r.path, r.label, r.size, r.identity, r.box)
                                       + ((r.landmarks, r.attributes) if r.attributes is not None else ())
                                       + ((r.targets,) if r.targets is not None else ())
                                       for r in chunk]).encode())
            key.update(json.dumps(reader.describe(), sort_keys=True).encode())
            plans.append(ShardPlan(split, start // per_shard, chunk, key.hexdigest()))
    return plans, listing_skips, excluded, digest.hexdigest()


def _finished(fs: pafs.FileSystem, base: str, plan: ShardPlan, verify: str) -> dict | None:
    """The stored state of ``plan`` if its shard is complete and verifies, else None."""
    try:
        state = json.loads(read_bytes(fs, join(base, plan.state_path)))
    except (FileNotFoundError, OSError, ValueError):
        return None
    info = fs.get_file_info(join(base, plan.path))
    if state.get("key") != plan.key or info.type != pafs.FileType.File or info.size != state.get("bytes"):
        return None
    if verify == "sha256" and hashlib.sha256(read_bytes(fs, join(base, plan.path))).hexdigest() != state["sha256"]:
        logger.warning("shard %s fails its checksum; rewriting it", plan.path)
        return None
    return state


def _run(reader, todo, out, row_group_size, parallel, num_cpus, max_in_flight):
    """Yield (plan, state) of each written shard, as tasks finish."""
    if not todo:
        return
    if not parallel:
        for plan in todo:
            yield plan, write_shard(reader, plan, out, row_group_size)
        return
    import ray

    if not ray.is_initialized():
        from fra.ray_runtime import init_ray

        init_ray()
    task = ray.remote(num_cpus=num_cpus, max_retries=2)(write_shard)
    limit = max_in_flight or max(2, 2 * int(ray.cluster_resources().get("CPU", 1)))
    reader_ref = ray.put(reader)
    pending: dict = {}
    queue, finished = list(todo), 0
    while queue or pending:
        while queue and len(pending) < limit:
            plan = queue.pop(0)
            pending[task.remote(reader_ref, plan, out, row_group_size)] = plan
        ready, _ = ray.wait(list(pending), num_returns=1)
        plan = pending.pop(ready[0])
        state = ray.get(ready[0])
        finished += 1
        logger.info("shard %s: %d rows, %d skipped (%d/%d)", state["path"], state["rows"], len(state["skipped"]),
                    finished, len(todo))
        yield plan, state


def _clean_temp(fs: pafs.FileSystem, base: str, splits: list[str]) -> None:
    """Delete temp files left by a killed writer (never a finished shard)."""
    for rel in [*splits, *(f"_state/{s}" for s in splits)]:
        for info in _files(fs, join(base, rel)):
            name = posixpath.basename(info.path)
            if name.startswith(".") and name.endswith(".tmp"):
                fs.delete_file(info.path)


def _remove_orphans(fs: pafs.FileSystem, base: str, splits: list[str], plans: list[ShardPlan]) -> None:
    """Delete shards (and states) of these splits that the current plan does not contain."""
    keep = {p.path for p in plans} | {p.state_path for p in plans}
    for rel in [*splits, *(f"_state/{s}" for s in splits)]:
        for info in _files(fs, join(base, rel)):
            relpath = relative(info.path, base)
            if relpath not in keep and posixpath.basename(relpath).startswith("part-"):
                logger.info("removing stale %s", relpath)
                fs.delete_file(info.path)


def _files(fs: pafs.FileSystem, path: str) -> list[pafs.FileInfo]:
    if fs.get_file_info(path).type != pafs.FileType.Directory:
        return []
    return [i for i in fs.get_file_info(pafs.FileSelector(path)) if i.type == pafs.FileType.File]


def _manifest(reader, splits, plans, states, listing_skips, excluded, fingerprint, row_group_size) -> Manifest:
    classes = reader_classes(reader)
    shards, counts, skipped = [], {}, [s.to_dict() for s in listing_skips]
    for plan in plans:
        state = states[(plan.split, plan.index)]
        shards.append(ShardInfo(plan.path, plan.split, state["rows"], state["bytes"], state["sha256"], state["counts"]))
        skipped += state["skipped"]
        per_class = counts.setdefault(plan.split, {"total": 0, "classes": {}})
        per_class["total"] += state["rows"]
        for label, n in state["counts"].items():
            name = classes[int(label)] if classes and 0 <= int(label) < len(classes) else label
            per_class["classes"][name] = per_class["classes"].get(name, 0) + n
    for split in splits:
        counts.setdefault(split, {"total": 0, "classes": {}})
    card = reader.card
    return Manifest(
        schema_version=SCHEMA_VERSION,
        dataset=card.name,
        source_root=redact(reader.root),
        fingerprint=fingerprint,
        classes=classes,
        counts=counts,
        shards=tuple(shards),
        skipped=tuple(sorted(skipped, key=lambda s: (s["split"], s["path"]))),
        excluded=excluded,
        normalization={"mean": list(card.normalization.mean), "std": list(card.normalization.std)},
        parquet={"row_group_size": row_group_size, "compression": "none (image, mask) / snappy",
                 "schema": SHARD_SCHEMA.to_string(show_schema_metadata=False)},
        created=_dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        attributes=tuple(reader.attribute_names()),
        targets=tuple(reader.target_names()),
    )


__all__ = ["SHARD_SCHEMA", "ShardPlan", "parquet_options", "write_shard", "write_shards"]
