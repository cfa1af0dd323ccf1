"""Back up the MLflow server's sqlite database to S3 (or any location) and restore it.

On a cluster the database lives on the head's disk, which ``ray down`` deletes. ``cluster.yaml``'s
head start command therefore restores the last backup on a fresh head before the server starts
(:func:`restore`, which never overwrites an existing database) and runs :func:`watch` next to the
server: it uploads a consistent snapshot (sqlite's online backup API, safe while the server
writes) within ``every_s`` of each change, and once more when it is stopped.

Locations are URIs (``s3://bucket/key``, ``gs://...``) or local paths, opened with pyarrow's
filesystems. S3 endpoints and credentials come from the standard environment (instance profile,
``AWS_ACCESS_KEY_ID`` / ``AWS_SECRET_ACCESS_KEY``, ``AWS_ENDPOINT_URL`` for S3-compatible
servers), never from the URI.
"""
from __future__ import annotations

import hashlib
import logging
import os
import signal
import sqlite3
import tempfile
import threading
from pathlib import Path

from fra.errors import FraError

log = logging.getLogger(__name__)


def _open(location: str):
    """(pyarrow filesystem, path inside it) for a URI or a local path."""
    from pyarrow import fs as pafs

    if "://" in location:
        return pafs.FileSystem.from_uri(location)
    return pafs.LocalFileSystem(), str(Path(location).expanduser().resolve())


def snapshot(db: str | Path, out: str | Path) -> str:
    """Copy a consistent snapshot of a live sqlite database to ``out``; returns its sha256."""
    src = sqlite3.connect(f"file:{Path(db).expanduser()}?mode=ro", uri=True)
    dst = sqlite3.connect(str(out))
    try:
        src.backup(dst)
    finally:
        dst.close()
        src.close()
    return hashlib.sha256(Path(out).read_bytes()).hexdigest()


def backup(db: str | Path, location: str, unless_digest: str = "") -> str:
    """Upload a snapshot of ``db`` to ``location``; returns the snapshot's sha256.

    Nothing is uploaded when the snapshot's sha256 equals ``unless_digest``. The snapshot is written next to the destination and moved into place, so a reader never sees
    a partial file (on S3 the move is a server-side copy, which replaces the object atomically).
    """
    db = Path(db).expanduser()
    if not db.is_file():
        raise FraError(f"no MLflow database at {db}")
    fs, path = _open(location)
    with tempfile.TemporaryDirectory() as tmp:
        local = Path(tmp) / "mlflow.db"
        digest = snapshot(db, local)
        if digest == unless_digest:
            return digest
        parent = path.rsplit("/", 1)[0]
        if parent and parent != path:
            fs.create_dir(parent, recursive=True)
        with open(local, "rb") as src, fs.open_output_stream(path + ".partial") as dst:
            while chunk := src.read(1 << 20):
                dst.write(chunk)
        fs.move(path + ".partial", path)
    log.info("MLflow database %s backed up to %s (sha256 %s)", db, location, digest[:12])
    return digest


def restore(location: str, db: str | Path) -> bool:
    """Download the backup at ``location`` to ``db`` unless ``db`` already exists.

    Returns:
        True if the database was restored; False if a local database already existed (it is
        kept) or there is no backup yet (a first cluster).

    Raises:
        FraError: the backup exists but is not a readable sqlite database.
    """
    from pyarrow import fs as pafs

    db = Path(db).expanduser()
    if db.exists():
        log.info("MLflow database %s exists; not restoring over it", db)
        return False
    fs, path = _open(location)
    if fs.get_file_info(path).type == pafs.FileType.NotFound:
        log.info("no MLflow database backup at %s; the server starts a new one", location)
        return False
    db.parent.mkdir(parents=True, exist_ok=True)
    partial = db.with_name(db.name + ".partial")
    with fs.open_input_stream(path) as src, open(partial, "wb") as dst:
        while chunk := src.read(1 << 20):
            dst.write(chunk)
    try:
        con = sqlite3.connect(str(partial))
        try:
            ok = con.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
        finally:
            con.close()
    except sqlite3.DatabaseError as exc:
        ok, reason = False, str(exc)
    else:
        reason = "integrity check failed"
    if not ok:
        partial.unlink()
        raise FraError(f"MLflow database backup {location} is not a usable sqlite database ({reason})")
    os.replace(partial, db)
    log.info("MLflow database restored from %s to %s", location, db)
    return True


def _stored_digest(location: str) -> str:
    """sha256 of the backup at ``location``; "" if there is none yet."""
    from pyarrow import fs as pafs

    fs, path = _open(location)
    if fs.get_file_info(path).type == pafs.FileType.NotFound:
        return ""
    digest = hashlib.sha256()
    with fs.open_input_stream(path) as src:
        while chunk := src.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def _signature(db: Path) -> tuple:
    """Changes whenever sqlite writes the database (main file or write-ahead log)."""
    out = []
    for p in (db, db.with_name(db.name + "-wal")):
        try:
            st = p.stat()
            out.append((st.st_mtime_ns, st.st_size))
        except FileNotFoundError:
            out.append(None)
    return tuple(out)


def watch(db: str | Path, location: str, every_s: float = 60.0, stop: threading.Event | None = None) -> None:
    """Back ``db`` up to ``location`` within ``every_s`` of every change, until stopped.

    Stops on ``stop`` being set or on SIGTERM / SIGINT (when run in the main thread), after a
    last backup if the database changed since the previous one. The first round compares the
    database's content with the backup's, not with the database as it was when the watch began:
    a database just restored and unchanged is not uploaded again, while a change made before the
    watcher started (the server starts first and may already be serving) is. Upload errors are
    logged and retried at the next round.
    """
    db = Path(db).expanduser()
    stop = stop or threading.Event()
    if threading.current_thread() is threading.main_thread():
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, lambda *_: stop.set())
    try:
        last_digest = _stored_digest(location)
    except OSError as exc:  # the first round then uploads whatever the database holds
        log.warning("could not read the MLflow database backup at %s (%s); uploading at the first round", location, exc)
        last_digest = ""
    last_sig = None
    log.info("backing up %s to %s every %g s after a change", db, location, every_s)
    while True:
        stopping = stop.wait(every_s)
        sig = _signature(db)
        if db.is_file() and sig != last_sig:
            try:
                last_digest = backup(db, location, unless_digest=last_digest)
                last_sig = sig
            except (OSError, sqlite3.Error, FraError) as exc:
                log.warning("MLflow database backup to %s failed (retrying in %g s): %s", location, every_s, exc)
        if stopping:
            return
