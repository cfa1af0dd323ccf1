"""The shard manifest: ``<out>/manifest.json``, written last and atomically by the shard writer.

It is the table of contents of a shard set: schema version, dataset card, class names, counts
per split and class, the shard files with sizes and SHA-256 checksums, the source fingerprint,
and every skipped source file with the reason. Readers of shards go through the manifest, never
through a directory listing, so stray or half-written files are never read.
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field

from fra.data.readers.base import dirname, join, put_atomic, read_bytes, resolve
from fra.errors import DataError

SCHEMA_VERSION = 1
MANIFEST_NAME = "manifest.json"


@dataclass(frozen=True)
class ShardInfo:
    """One Parquet shard.

    Attributes:
        path: path relative to the shard root (``<split>/part-00000.parquet``).
        split: the split all its rows belong to.
        rows: number of rows.
        bytes: file size.
        sha256: hex digest of the file.
        counts: rows per label (``str(label)`` -> n).
    """

    path: str
    split: str
    rows: int
    bytes: int
    sha256: str
    counts: dict = field(default_factory=dict)


@dataclass(frozen=True)
class Manifest:
    """A shard set's manifest (see module docstring).

    Attributes:
        schema_version: :data:`SCHEMA_VERSION` of the writer.
        dataset: card name.
        source_root: the dataset root that was converted.
        fingerprint: SHA-256 over the reader identity and every source record (path, size,
            label, split) and label file: equal fingerprints mean the same input.
        classes: class names in label order (empty for identity-only data).
        counts: ``{split: {"total": n, "classes": {class name or label: n}}}``.
        shards: the shard files.
        skipped: ``[{"split", "path", "reason", "detail"}]`` for every source left out.
        excluded: ``{split: {reason: n}}`` entries left out by the dataset's protocol.
        normalization: ``{"mean": [...], "std": [...]}`` from the card.
        parquet: writer settings (row group size, compression, ...).
        created: ISO time of writing.
        attributes: names of the binary attribute flags in the ``attributes`` column (CelebA).
        targets: names of the continuous values in the ``targets`` column (valence, arousal).
        uri: where the manifest was read from (not stored).
    """

    schema_version: int
    dataset: str
    source_root: str
    fingerprint: str
    classes: tuple[str, ...]
    counts: dict
    shards: tuple[ShardInfo, ...]
    skipped: tuple[dict, ...] = ()
    excluded: dict = field(default_factory=dict)
    normalization: dict = field(default_factory=dict)
    parquet: dict = field(default_factory=dict)
    created: str = ""
    attributes: tuple[str, ...] = ()
    targets: tuple[str, ...] = ()
    uri: str = ""

    @property
    def root(self) -> str:
        """The shard root directory (URI or path)."""
        return dirname(self.uri) if self.uri.partition("?")[0].endswith(".json") else self.uri

    @property
    def splits(self) -> tuple[str, ...]:
        return tuple(self.counts)

    def shard_uris(self, split: str | None = None, non_empty: bool = True) -> list[str]:
        """Full URIs / paths of the shards of ``split`` (all splits if None)."""
        return [
            join(self.root, s.path)
            for s in self.shards
            if (split is None or s.split == split) and (s.rows > 0 or not non_empty)
        ]

    def num_rows(self, split: str | None = None) -> int:
        return sum(s.rows for s in self.shards if split is None or s.split == split)

    def to_dict(self) -> dict:
        out = asdict(self)
        out.pop("uri")
        return out


def manifest_uri(uri: str) -> str:
    """``<root>/manifest.json`` for a root, unchanged for a manifest path."""
    uri = str(uri)
    return uri if uri.partition("?")[0].endswith(".json") else join(uri, MANIFEST_NAME)


def read_manifest(uri: str) -> Manifest:
    """Read a manifest from a shard root or a ``manifest.json`` path (local or URI).

    Raises:
        DataError: missing, unreadable, or written by a newer schema.
    """
    target = manifest_uri(uri)
    fs, path = resolve(target)
    try:
        data = json.loads(read_bytes(fs, path))
    except FileNotFoundError as exc:
        raise DataError(f"no shard manifest at {target} (run `fra shards` first)") from exc
    except (OSError, ValueError) as exc:
        raise DataError(f"cannot read shard manifest {target}: {exc}") from exc
    version = data.get("schema_version")
    if not isinstance(version, int) or version > SCHEMA_VERSION:
        raise DataError(f"{target}: manifest schema {version!r} is newer than this fra ({SCHEMA_VERSION})")
    data["shards"] = tuple(ShardInfo(**s) for s in data.get("shards", ()))
    data["classes"] = tuple(data.get("classes", ()))
    data["skipped"] = tuple(data.get("skipped", ()))
    for key in ("attributes", "targets"):
        data[key] = tuple(data.get(key, ()))
    try:
        return Manifest(**data, uri=target if "://" in target else path)
    except TypeError as exc:
        raise DataError(f"{target}: malformed manifest: {exc}") from exc


def write_manifest(manifest: Manifest, root: str) -> str:
    """Write ``manifest`` atomically to ``<root>/manifest.json`` (redacted: source roots and reader
    options may name credentials); returns its URI."""
    from fra.redaction import redact

    target = manifest_uri(root)
    fs, path = resolve(target)
    put_atomic(fs, path, (json.dumps(redact(manifest.to_dict()), indent=1, sort_keys=True) + "\n").encode())
    return target


__all__ = ["SCHEMA_VERSION", "Manifest", "ShardInfo", "read_manifest", "write_manifest", "manifest_uri"]
