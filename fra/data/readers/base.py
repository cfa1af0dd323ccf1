"""What every layout reader shares: records, skips, the reader base class, filesystem helpers.

A reader turns a dataset in its official layout into :class:`Record` s (cheap: label files and
directory listings only) and loads one record's bytes on demand (in the shard-writing task).
Paths may be local or URIs (``s3://bucket/x``, ``gs://...``); all I/O goes through pyarrow
filesystems.
"""
from __future__ import annotations

import hashlib
import posixpath
from dataclasses import dataclass
from typing import Any

import pyarrow.fs as pafs

from fra.data.cards import DatasetCard
from fra.errors import DataError

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")


@dataclass(frozen=True)
class Record:
    """One image to shard.

    Attributes:
        split: split name.
        path: source path relative to the dataset root (or a pseudo path such as
            ``fer2013.csv#17`` for images stored inside a file).
        label: class index into the card's ``classes``; -1 if the data has no classes.
        identity: subject identity, if known.
        box: face box (x0, y0, x1, y1) in source pixels, if the layout has one.
        landmarks: flat (x, y, x, y, ...) landmarks in source pixels, if any.
        attributes: per-image numbers (0/1 flags such as WFLW's pose ... blur, or values), in
            the order the card's ``options.attributes`` names them, if the layout has any.
        payload: inline data for :meth:`Reader.load` (e.g. a FER2013 pixel string).
        size: file size in bytes when the listing knows it (part of the fingerprint).
        targets: continuous targets in the order of :meth:`Reader.target_names` (AffectNet's
            valence, arousal), if any.
    """

    split: str
    path: str
    label: int = -1
    identity: str | None = None
    box: tuple[float, float, float, float] | None = None
    landmarks: tuple[float, ...] | None = None
    attributes: tuple[float, ...] | None = None
    payload: Any = None
    size: int = -1
    targets: tuple[float, ...] | None = None


@dataclass(frozen=True)
class Skip:
    """A file that was left out, and why (``missing``, ``corrupt``, ``truncated``, ``unknown_label`` ...)."""

    split: str
    path: str
    reason: str
    detail: str = ""

    def to_dict(self) -> dict:
        return {"split": self.split, "path": self.path, "reason": self.reason, "detail": self.detail}


@dataclass
class Scan:
    """The result of scanning one split.

    Attributes:
        records: images to shard, in a deterministic order.
        skipped: entries that cannot be used (listed in the manifest).
        excluded: counts of entries left out by the dataset's protocol (e.g. AffectNet's
            "None"/"Uncertain" codes), by reason; counted, not listed.
        digest: hash of the label files read, for the fingerprint.
    """

    records: list[Record]
    skipped: list[Skip]
    excluded: dict[str, int]
    digest: str = ""


class Reader:
    """Base class of a layout reader. Subclasses implement :meth:`scan` (and maybe :meth:`load`).

    Args:
        card: the dataset card.
        root: dataset root, local path or URI.
        options: overrides of ``card.options``.
    """

    def __init__(self, card: DatasetCard, root: str, **options: Any):
        self.card = card
        self.root = str(root).rstrip("/") if str(root) not in ("/", "") else str(root)
        self.options = {**card.options, **options}
        self._fs: pafs.FileSystem | None = None
        self._base = ""

    def __getstate__(self) -> dict:  # filesystems are re-created in the worker
        state = dict(self.__dict__)
        state["_fs"] = None
        return state

    @property
    def fs(self) -> pafs.FileSystem:
        if self._fs is None:
            self._fs, self._base = resolve(self.root)
        return self._fs

    def full(self, rel: str) -> str:
        """Filesystem path of ``rel`` under the root."""
        _ = self.fs
        return posixpath.join(self._base, rel) if rel else self._base

    def splits(self) -> list[str]:
        """Splits this reader can produce (default: the card's)."""
        return list(self.card.split_names)

    def scan(self, split: str) -> Scan:
        """List the records of ``split``."""
        raise NotImplementedError

    def attribute_names(self) -> tuple[str, ...]:
        """Names of the ``attributes`` records carry, in order (default: the card's
        ``options.attributes``; CelebA's reader reads them from its label file)."""
        return tuple(self.options.get("attributes", ()))

    def target_names(self) -> tuple[str, ...]:
        """Names of the continuous ``targets`` records carry, in order (default: the card's
        ``options.targets``)."""
        return tuple(self.options.get("targets", ()))

    def load(self, record: Record) -> dict:
        """Bytes of one record: ``{"image": bytes}`` plus optional ``"mask"`` (PNG bytes).

        Raises:
            FileNotFoundError: the file is missing.
            OSError: it cannot be read.
        """
        with self.fs.open_input_stream(self.full(record.path)) as fh:
            return {"image": fh.readall()}

    def check(self, record: Record, width: int, height: int) -> Skip | None:
        """A reason to skip ``record`` once its image size is known (default: none), e.g. a face
        box outside the image; called by the shard writer after decoding the header."""
        return None

    def describe(self) -> dict:
        """JSON-able identity of this reader (part of the fingerprint)."""
        return {"reader": type(self).__name__, "card": self.card.name, "options": _jsonable(self.options)}

    # ---- helpers for subclasses ------------------------------------------------------------
    def list_files(self, rel_dir: str) -> list[pafs.FileInfo]:
        """Recursive listing of regular files under ``rel_dir`` (empty if it does not exist)."""
        base = self.full(rel_dir)
        info = self.fs.get_file_info(base)
        if info.type != pafs.FileType.Directory:
            return []
        infos = self.fs.get_file_info(pafs.FileSelector(base, recursive=True))
        return sorted((i for i in infos if i.type == pafs.FileType.File), key=lambda i: i.path)

    def rel(self, path: str) -> str:
        """Path relative to the root."""
        _ = self.fs
        return relative(path, self._base) if self._base else path

    def exists(self, rel: str) -> bool:
        return self.fs.get_file_info(self.full(rel)).type == pafs.FileType.File

    def read_text(self, rel: str) -> str:
        """A small text file under the root (label lists, CSVs)."""
        try:
            with self.fs.open_input_stream(self.full(rel)) as fh:
                return fh.readall().decode("utf-8-sig")
        except FileNotFoundError as exc:
            raise DataError(f"{self.card.name}: expected file {rel!r} under {self.root}") from exc


def is_image(path: str) -> bool:
    return path.lower().endswith(IMAGE_EXTENSIONS)


def text_digest(*texts: str) -> str:
    h = hashlib.sha256()
    for t in texts:
        h.update(t.encode())
    return h.hexdigest()


def _jsonable(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in sorted(obj.items())}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    return obj if isinstance(obj, (int, float, str, bool, type(None))) else str(obj)


# ---- filesystems: the generic helpers live in fra.storage (re-exported for the readers) ---------
from fra.storage import dirname, file_size, join, put_atomic, redact, relative, resolve  # noqa: E402,F401
from fra.storage import read_bytes_fs as read_bytes  # noqa: E402,F401
