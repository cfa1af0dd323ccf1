"""Mutual exclusion between promoters of one registered model, on MLflow alone.

MLflow has no conditional update: tags and aliases are last-writer-wins. Creating a registered
model, though, is atomic in every MLflow store (a unique name: a database constraint behind the
server or in sqlite), so the lock for ``<name>`` is a registered model named
``<name>.fra-promotion-lock``: whoever creates it holds the lock, deleting it releases it. Its
tags say who holds it, since when, and a random token.

A promoter that cannot create the lock waits with jittered back-off and tries again, up to
``timeout_s``. A lock older than ``stale_s`` was left by a process that died mid-promotion and is
broken (logged). Breaking is the one non-atomic step, so the holder re-checks its token before
it writes (:func:`check_held`) and gives up with a conflict when the lock is no longer its own.
"""
from __future__ import annotations

import logging
import random
import time
import uuid
from contextlib import contextmanager
from typing import Iterator

from fra.registry.connection import RegistryError, call

log = logging.getLogger(__name__)

LOCK_SUFFIX = ".fra-promotion-lock"
TOKEN_TAG, OWNER_TAG, SINCE_TAG = "fra.lock.token", "fra.lock.owner", "fra.lock.since"
TIMEOUT_S = 120.0  # how long a promoter waits for another one
STALE_S = 600.0  # a promotion takes seconds; a lock this old belongs to a dead process


class LockConflict(RegistryError):
    """The lock was taken over (broken as stale) while this promoter held it."""


def lock_name(name: str) -> str:
    return name + LOCK_SUFFIX


def is_lock(registered_name: str) -> bool:
    return registered_name.endswith(LOCK_SUFFIX)


@contextmanager
def promotion_lock(mlc, name: str, who: str, timeout_s: float | None = None,
                   stale_s: float | None = None) -> Iterator[str]:
    """Hold the promotion lock of ``name`` for the block; yields this holder's token.

    Args:
        timeout_s: how long to wait for another holder (None = ``TIMEOUT_S``).
        stale_s: age at which a lock is broken as left by a dead process (None = ``STALE_S``).

    Raises:
        RegistryError: another promoter held the lock for all of ``timeout_s``; the message names
            the holder and the lock to delete if that holder is dead.
    """
    from mlflow.exceptions import MlflowException

    timeout_s = TIMEOUT_S if timeout_s is None else timeout_s
    stale_s = STALE_S if stale_s is None else stale_s
    lock, token = lock_name(name), uuid.uuid4().hex
    deadline, wait = time.monotonic() + timeout_s, 0.05
    while True:
        try:
            call("take promotion lock", lambda: mlc.create_registered_model(
                lock, tags={TOKEN_TAG: token, OWNER_TAG: who, SINCE_TAG: f"{time.time():.3f}"},
                description=f"held by fra while it promotes {name}; deleted when done"))
            break
        except MlflowException as exc:
            if getattr(exc, "error_code", "") != "RESOURCE_ALREADY_EXISTS":
                raise RegistryError(f"{name}: cannot take the promotion lock {lock!r}: "
                                    f"{str(exc).splitlines()[0][:200]}") from exc
        holder = _holder(mlc, lock)
        if not holder:  # released between our attempt and this read: try again at once
            continue
        if holder.get(TOKEN_TAG) == token:  # our create went through but its answer was lost and retried
            break
        age = time.time() - float(holder.get(SINCE_TAG, time.time()))
        if age > stale_s:
            log.warning("%s: breaking the promotion lock held by %s for %.0f s (> %.0f s: a dead promoter)",
                        name, holder.get(OWNER_TAG, "?"), age, stale_s)
            _delete_if(mlc, lock, holder.get(TOKEN_TAG))
            continue
        if time.monotonic() > deadline:
            raise RegistryError(
                f"{name}: another promotion has held the lock {lock!r} for {age:.0f} s "
                f"({holder.get(OWNER_TAG, 'unknown holder')}); try again later, or if that process died, "
                f"delete the registered model {lock!r} (it is also broken after {stale_s:.0f} s)")
        time.sleep(wait * (1 + random.random()))
        wait = min(2 * wait, 1.0)
    try:
        yield token
    finally:
        _delete_if(mlc, lock, token)


def check_held(mlc, name: str, token: str) -> None:
    """Raise :class:`LockConflict` unless the promotion lock of ``name`` is still ``token``'s."""
    held = _holder(mlc, lock_name(name)).get(TOKEN_TAG)
    if held != token:
        raise LockConflict(f"{name}: the promotion lock was taken over ({held or 'released'}) while deciding")


def _holder(mlc, lock: str) -> dict:
    """The lock's tags, or {} when nobody holds it."""
    from mlflow.exceptions import MlflowException

    try:
        return dict(call("read promotion lock", lambda: mlc.get_registered_model(lock)).tags or {})
    except MlflowException as exc:
        if getattr(exc, "error_code", "") == "RESOURCE_DOES_NOT_EXIST":
            return {}
        raise


def _delete_if(mlc, lock: str, token: str | None) -> None:
    """Delete the lock if it still carries ``token`` (a lock taken over since is left alone)."""
    from mlflow.exceptions import MlflowException

    if token is None or _holder(mlc, lock).get(TOKEN_TAG) != token:
        return
    try:
        call("release promotion lock", lambda: mlc.delete_registered_model(lock))
    except MlflowException as exc:
        if getattr(exc, "error_code", "") != "RESOURCE_DOES_NOT_EXIST":
            raise
