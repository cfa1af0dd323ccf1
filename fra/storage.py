"""Storage locations: local paths and URIs (``s3://``, ``gs://``, ``file://``) behind one API.

A storage location is a string until the one place that opens it. Nothing here builds a
``pathlib.Path`` from a location that may be a URI (``Path("s3://b/x").parent`` is ``s3:/b``).
All I/O goes through pyarrow filesystems; S3 endpoint and credentials come from the standard
environment (``AWS_ENDPOINT_URL``, ``AWS_ACCESS_KEY_ID``, ... or an instance profile), never from
keys written into a URI.

Reading a remote file or folder as a local one (:func:`local_copy`) downloads it once into a
cache keyed by the URI and the object's size and modification time; writing a folder to a remote
location (:func:`publish_dir`) uploads a local staging folder.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import posixpath
import shutil
import tempfile
import uuid
from pathlib import Path
from typing import Any

import pyarrow.fs as pafs

from fra.errors import DataError
from fra.redaction import redact as redact_obj
from fra.redaction import redact_text

log = logging.getLogger(__name__)

CACHE_ENV = "FRA_CACHE_DIR"


def is_uri(location: str | os.PathLike) -> bool:
    """True for ``scheme://...`` (``file://`` included), False for a plain path."""
    return "://" in str(location)


def absolute(location: str | os.PathLike) -> str:
    """A URI unchanged (without a trailing ``/``); a local path made absolute (``~`` expanded)."""
    text = str(location)
    if is_uri(text):
        return text.rstrip("/")
    return os.path.abspath(os.path.expanduser(text))


def resolve(uri: str | os.PathLike) -> tuple[pafs.FileSystem, str]:
    """(filesystem, path) for a local path or a URI (``s3://``, ``gs://``, ``file://``)."""
    uri = str(uri)
    if not is_uri(uri):
        return pafs.LocalFileSystem(), os.path.abspath(os.path.expanduser(uri))
    try:
        return pafs.FileSystem.from_uri(uri)
    except Exception as exc:  # pyarrow raises ArrowInvalid / OSError with a useful message
        raise DataError(f"cannot open filesystem for {redact(uri)!r}: {exc}") from exc


def redact(uri: str) -> str:
    """``uri`` without credentials (``user:secret@``, secret query parameters, the environment's
    secret values), for logs and files: :func:`fra.redaction.redact_text`."""
    return redact_text(uri)


def join(uri: str | os.PathLike, *parts: str) -> str:
    """Join URI / path components with ``/`` (a ``?query`` on the URI stays at the end)."""
    base, sep, query = str(uri).partition("?")
    out = base.rstrip("/")
    for p in parts:
        out = f"{out}/{str(p).strip('/')}"
    return f"{out}{sep}{query}"


def dirname(uri: str | os.PathLike) -> str:
    """Parent of a path or URI (query-aware): ``dirname("s3://b/x/y.pt") == "s3://b/x"``."""
    base, sep, query = str(uri).partition("?")
    scheme, colon, rest = base.partition("://")
    if not colon:
        return f"{posixpath.dirname(base.rstrip('/'))}{sep}{query}"
    head = posixpath.dirname(rest.rstrip("/"))
    return f"{scheme}://{head or rest}{sep}{query}"


def basename(uri: str | os.PathLike) -> str:
    return posixpath.basename(str(uri).partition("?")[0].rstrip("/"))


def relative(path: str, base: str) -> str:
    """``path`` relative to ``base`` for filesystem paths of one pyarrow filesystem.

    Unlike ``posixpath.relpath`` it never consults the process's working directory (object-store
    paths such as ``bucket/x`` are not absolute, and a job's working directory may be gone).
    """
    base = base.rstrip("/")
    if path == base:
        return "."
    if not path.startswith(base + "/"):
        raise ValueError(f"{path!r} is not under {base!r}")
    return path[len(base) + 1:]


def read_bytes_fs(fs: pafs.FileSystem, path: str) -> bytes:
    with fs.open_input_stream(path) as fh:
        return fh.readall()


def put_atomic(fs: pafs.FileSystem, path: str, data: bytes) -> None:
    """Write ``data`` so that ``path`` is either absent/old or complete: temp name, then rename.

    Locally the rename is atomic (and the file is fsync'ed first); on object stores the final key
    is created by one server-side copy of a fully uploaded temp object.
    """
    if isinstance(fs, pafs.LocalFileSystem):
        from fra.utils.io import atomic_write_bytes

        atomic_write_bytes(path, data)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(path, 0o666 & ~umask)  # mkstemp creates 0600; outputs are meant to be shared
        return
    parent, name = posixpath.split(path)
    tmp = posixpath.join(parent, f".{name}.{uuid.uuid4().hex}.tmp")
    fs.create_dir(parent, recursive=True)
    try:
        with fs.open_output_stream(tmp) as fh:
            fh.write(data)
        fs.move(tmp, path)
    except BaseException:
        try:
            fs.delete_file(tmp)
        except Exception:  # noqa: BLE001 - best effort cleanup; the original error matters
            pass
        raise


def file_size(fs: pafs.FileSystem, path: str) -> int:
    """Size in bytes, or -1 if ``path`` is not a file."""
    info = fs.get_file_info(path)
    return int(info.size) if info.type == pafs.FileType.File else -1


# ---- whole-location operations ---------------------------------------------------------------
def _info(location: str) -> pafs.FileInfo:
    fs, path = resolve(location)
    return fs.get_file_info(path)


def exists(location: str | os.PathLike) -> bool:
    return _info(str(location)).type != pafs.FileType.NotFound


def is_file(location: str | os.PathLike) -> bool:
    return _info(str(location)).type == pafs.FileType.File


def is_dir(location: str | os.PathLike) -> bool:
    """A folder; on object stores, any prefix that holds objects."""
    return _info(str(location)).type == pafs.FileType.Directory


def read_bytes(location: str | os.PathLike) -> bytes:
    fs, path = resolve(location)
    try:
        return read_bytes_fs(fs, path)
    except FileNotFoundError as exc:
        raise FileNotFoundError(f"{redact(str(location))} not found") from exc


def read_text(location: str | os.PathLike) -> str:
    return read_bytes(location).decode()


def read_json(location: str | os.PathLike) -> Any:
    return json.loads(read_text(location))


def write_bytes(location: str | os.PathLike, data: bytes) -> str:
    """Write atomically (a reader sees the old or the complete file); returns the location."""
    fs, path = resolve(location)
    put_atomic(fs, path, data)
    return str(location)


def write_text(location: str | os.PathLike, text: str) -> str:
    """Write ``text`` redacted (:func:`fra.redaction.redact_text`): no secret leaves in a file."""
    return write_bytes(location, redact_text(text).encode())


def write_json(location: str | os.PathLike, obj: Any) -> str:
    """Write ``obj`` as JSON, redacted (:func:`fra.redaction.redact`, secret-named keys included)."""
    return write_text(location, json.dumps(redact_obj(obj), indent=2, sort_keys=True, default=str) + "\n")


def list_files(location: str | os.PathLike, recursive: bool = False) -> list[str]:
    """Locations of the files directly in (or, ``recursive``, under) a folder; [] if it does not exist."""
    location = str(location)
    fs, path = resolve(location)
    if fs.get_file_info(path).type != pafs.FileType.Directory:
        return []
    infos = fs.get_file_info(pafs.FileSelector(path, recursive=recursive))
    return sorted(join(location, relative(i.path, path)) for i in infos if i.type == pafs.FileType.File)


def delete(location: str | os.PathLike) -> None:
    """Delete a file or a folder (recursively); absent is fine."""
    fs, path = resolve(location)
    info = fs.get_file_info(path)
    if info.type == pafs.FileType.Directory:
        fs.delete_dir(path)
    elif info.type == pafs.FileType.File:
        fs.delete_file(path)


def publish(local: str | os.PathLike, location: str | os.PathLike) -> str:
    """Copy a local file or folder to ``location`` (local or URI); returns the location.

    A folder's files are copied one by one, each atomically, so a reader never sees a
    half-written file; files already at the destination are overwritten.
    """
    local, location = Path(local), str(location)
    if local.is_file():
        fs, path = resolve(location)
        if isinstance(fs, pafs.LocalFileSystem):
            Path(path).parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(local, path)
        else:
            put_atomic(fs, path, local.read_bytes())
        return location
    if not local.is_dir():
        raise FileNotFoundError(f"{local} does not exist")
    fs, path = resolve(location)
    if isinstance(fs, pafs.LocalFileSystem):
        shutil.copytree(local, path, dirs_exist_ok=True)
        return location
    for f in sorted(p for p in local.rglob("*") if p.is_file()):
        put_atomic(fs, posixpath.join(path, f.relative_to(local).as_posix()), f.read_bytes())
    return location


def cache_root() -> Path:
    """Where remote files are cached (``$FRA_CACHE_DIR``, else ``~/.cache/fra/storage``)."""
    root = os.environ.get(CACHE_ENV) or os.path.join(os.path.expanduser("~"), ".cache", "fra", "storage")
    return Path(root)


def local_copy(location: str | os.PathLike, siblings: tuple[str, ...] = ()) -> Path:
    """A local path holding ``location``'s content: a local path as is, a remote file or folder
    downloaded into the cache (again only when its size or modification time changed).

    Args:
        location: a file or folder, local or remote.
        siblings: for a remote file, names of files beside it to fetch too when they exist (e.g.
            ``model_card.json`` next to ``backbone.pt``), so that the local copy keeps its neighbours.
    """
    location = str(location)
    if not is_uri(location):
        return Path(os.path.abspath(os.path.expanduser(location)))
    fs, path = resolve(location)
    info = fs.get_file_info(path)
    if info.type == pafs.FileType.NotFound:
        raise FileNotFoundError(f"{redact(location)} not found")
    if info.type == pafs.FileType.File:
        base = posixpath.dirname(path)
        near = fs.get_file_info([posixpath.join(base, n) for n in siblings]) if siblings else []
        files = [info, *(i for i in near if i.type == pafs.FileType.File)]
    else:
        files = [i for i in fs.get_file_info(pafs.FileSelector(path, recursive=True)) if i.type == pafs.FileType.File]
        base = path
    stamp = json.dumps(sorted((i.path, i.size, str(i.mtime)) for i in files))
    key = hashlib.sha256(f"{redact(location)}\n{stamp}".encode()).hexdigest()[:24]
    dest = cache_root() / key
    target = dest / posixpath.basename(path.rstrip("/"))
    if (dest / ".complete").is_file():
        return target
    staging = Path(tempfile.mkdtemp(prefix=f".{key}.", dir=_ensure(cache_root())))
    try:
        for i in files:
            rel = relative(i.path, base)
            out = staging / posixpath.basename(path.rstrip("/")) / rel if info.type != pafs.FileType.File \
                else staging / rel
            out.parent.mkdir(parents=True, exist_ok=True)
            with fs.open_input_stream(i.path) as src, open(out, "wb") as dst:
                shutil.copyfileobj(src, dst, 1 << 20)
        (staging / ".complete").write_text(redact(location) + "\n")
        try:
            os.replace(staging, dest)
        except OSError:  # another process finished the same download first
            shutil.rmtree(staging, ignore_errors=True)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    log.debug("downloaded %s to %s", redact(location), target)
    return target


def _ensure(p: Path) -> Path:
    p.mkdir(parents=True, exist_ok=True)
    return p


__all__ = ["is_uri", "absolute", "resolve", "redact", "join", "dirname", "basename", "relative", "read_bytes_fs",
           "put_atomic", "file_size", "exists", "is_file", "is_dir", "read_bytes", "read_text", "read_json",
           "write_bytes", "write_text", "write_json", "list_files", "delete", "publish", "cache_root",
           "local_copy"]
