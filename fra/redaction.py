"""Secrets never leave the process: one redaction for everything fra writes or logs.

A config or a location may carry a secret in three ways: credentials inside a URI
(``s3://KEY:SECRET@bucket/x``, ``?X-Amz-Security-Token=...``), a value under a key that names one
(``password``, ``secret``, ``token``, ``access_key``, ...), or a credential the process was given
through its environment (``AWS_SECRET_ACCESS_KEY``, ``AWS_SESSION_TOKEN``,
``MLFLOW_TRACKING_PASSWORD``, the Ray auth token, ...) that turns up as a string anywhere.
:func:`redact` returns a copy with each of them replaced by ``***``. fra applies it where a config,
a location or a result leaves the process: YAML and JSON files, checkpoints, MLflow params and
tags, the model card, and (:func:`install_log_redaction`, done on ``import fra``) every log line of
the ``fra.*`` loggers. The live config a run uses is never redacted; credentials belong in the
standard environment or the instance profile, not in URIs.

Pure Python (``re``, ``os``, ``logging``): the core layer may import it.
"""
from __future__ import annotations

import logging
import os
import re
from pathlib import Path
from typing import Any

MASK = "***"

# Key names (config keys, MLflow param names, query parameters) whose values are secrets.
SECRET_NAME = re.compile(r"(?i)(password|passwd|secret|token|access_?key|api_?key|private_?key|credential|"
                         r"signature)")
# Environment variables that hold secrets: a secret-sounding name, but not one that names a file,
# a place or a switch (``AWS_WEB_IDENTITY_TOKEN_FILE``, ``RAY_AUTH_TOKEN_PATH``).
_ENV_NAME_EXCLUDED = re.compile(r"(?i)(_PATH|_FILE|_DIR|_MODE|_URL|_URI|_ENDPOINT|_ENABLED|_TYPE)$")
# Shorter values would blot out ordinary words wherever they occur.
MIN_SECRET_CHARS = 8
# ``scheme://userinfo@``: RFC userinfo (no '/'), or ``user:secret@`` whose secret holds an
# unescaped '/' (an AWS secret key pasted as is) - but not ``host:port/path@...``.
_URI_USERINFO = re.compile(r"(?i)\b([a-z][a-z0-9+.-]*://)(?:[^/@\s]*|[^/@\s:]*:(?!\d*(?:/|$))[^@\s]*?)@")
_QUERY_SECRET = re.compile(r"(?i)([?&;][^=&\s#]*(?:password|passwd|secret|token|access_?key|api_?key|"
                           r"credential|signature)[^=&\s#]*=)[^&\s#'\"]*")
_RAY_TOKEN_FILE = "~/.ray/auth_token"
_token_file_cache: dict[tuple[str, int], str] = {}


def _ray_token_from_file() -> str:
    """The Ray auth token Ray itself would read (``RAY_AUTH_TOKEN_PATH``, else ``~/.ray/auth_token``)."""
    path = Path(os.environ.get("RAY_AUTH_TOKEN_PATH") or _RAY_TOKEN_FILE).expanduser()
    try:
        key = (str(path), path.stat().st_mtime_ns)
    except OSError:
        return ""
    if key not in _token_file_cache:
        try:
            _token_file_cache.clear()
            _token_file_cache[key] = path.read_text().strip()
        except OSError:
            return ""
    return _token_file_cache[key]


def secret_values() -> list[str]:
    """Secret values of this process's environment, longest first (re-read on every call, so a
    credential set after start-up is covered too)."""
    found = {v for k, v in os.environ.items()
             if SECRET_NAME.search(k) and not _ENV_NAME_EXCLUDED.search(k) and len(v) >= MIN_SECRET_CHARS}
    token = _ray_token_from_file()
    if len(token) >= MIN_SECRET_CHARS:
        found.add(token)
    return sorted(found, key=len, reverse=True)


def redact_text(text: str, secrets: list[str] | None = None) -> str:
    """``text`` without URI credentials, secret query parameters and environment secret values."""
    text = _URI_USERINFO.sub(rf"\1{MASK}@", str(text))
    text = _QUERY_SECRET.sub(rf"\1{MASK}", text)
    for value in secret_values() if secrets is None else secrets:
        if value in text:
            text = text.replace(value, MASK)
    return text


def redact(obj: Any) -> Any:
    """A copy of ``obj`` (dicts, lists, tuples, strings; other values as they are) safe to write:
    :func:`redact_text` on every string (dict keys included), and every string under a key that
    names a secret replaced whole."""
    return _walk(obj, secret_values(), False)


def _walk(obj: Any, secrets: list[str], under_secret: bool) -> Any:
    if isinstance(obj, str):
        return MASK if under_secret and obj else redact_text(obj, secrets)
    if isinstance(obj, dict):
        return {(redact_text(k, secrets) if isinstance(k, str) else k):
                _walk(v, secrets, under_secret or (isinstance(k, str) and bool(SECRET_NAME.search(k))))
                for k, v in obj.items()}
    if isinstance(obj, list):
        return [_walk(v, secrets, under_secret) for v in obj]
    if isinstance(obj, tuple):  # a named tuple becomes a plain one
        return tuple(_walk(v, secrets, under_secret) for v in obj)
    return obj


# ---- log lines -------------------------------------------------------------------------------
def _redact_record(record: logging.LogRecord) -> None:
    secrets = secret_values()
    try:
        message = record.getMessage()
    except Exception:  # noqa: BLE001 - a malformed call: logging reports it when formatting
        return
    clean = redact_text(message, secrets)
    if clean != message:
        record.msg, record.args = clean, None
    if record.exc_info and record.exc_info[0] is not None:
        text = logging.Formatter().formatException(record.exc_info)
        clean = redact_text(text, secrets)
        if clean != text:  # the formatter prints exc_text instead of formatting the exception again
            record.exc_text = clean


def install_log_redaction(prefix: str = "fra") -> None:
    """Redact every record of the ``prefix`` logger and its children when it is created, so every
    handler (console, files, Ray's worker logs, pytest's caplog) sees the redacted line.

    A record factory rather than a ``logging.Filter``: a filter on the ``fra`` logger would not see
    the records of ``fra.train.worker`` and the others, and handlers belong to the application.
    Installed once per process (``import fra``); other loggers' records are left as they are.
    """
    previous = logging.getLogRecordFactory()
    if getattr(previous, "fra_redacting", False):
        return

    def factory(*args: Any, **kwargs: Any) -> logging.LogRecord:
        record = previous(*args, **kwargs)
        if record.name == prefix or record.name.startswith(prefix + "."):
            _redact_record(record)
        return record

    factory.fra_redacting = True  # type: ignore[attr-defined]
    logging.setLogRecordFactory(factory)


__all__ = ["MASK", "SECRET_NAME", "secret_values", "redact_text", "redact", "install_log_redaction"]
