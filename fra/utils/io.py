"""Atomic file writes: a temp file in the same directory, fsync, then rename.

A reader never sees a half-written file, and a crash mid-write leaves the old file intact.
"""
from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any, Callable


def _atomic(path: str | Path, write: Callable[[Any], None], mode: str) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, mode) as fh:
            write(fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return path


def atomic_write_text(path: str | Path, text: str) -> Path:
    """Write ``text`` redacted (:func:`fra.redaction.redact_text`): no secret leaves in a file."""
    from fra.redaction import redact_text

    text = redact_text(text)
    return _atomic(path, lambda fh: fh.write(text), "w")


def atomic_write_bytes(path: str | Path, data: bytes) -> Path:
    return _atomic(path, lambda fh: fh.write(data), "wb")


def atomic_write_json(path: str | Path, obj: Any) -> Path:
    """Write ``obj`` as JSON, redacted (:func:`fra.redaction.redact`, secret-named keys included)."""
    from fra.redaction import redact

    return atomic_write_text(path, json.dumps(redact(obj), indent=2, sort_keys=True, default=str) + "\n")


def atomic_torch_save(obj: Any, path: str | Path) -> Path:
    import torch

    return _atomic(path, lambda fh: torch.save(obj, fh), "wb")


def sha256_file(path: str | Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            h.update(block)
    return h.hexdigest()
