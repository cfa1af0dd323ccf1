"""Connection to the MLflow registry: the URI, retries with back-off, reachability, shared types.

Every registry module (registration, loading, listing, promotion, locks) imports from here and
this module imports none of them.
"""
from __future__ import annotations

import functools
import logging
import os
import time
import urllib.error
import urllib.request
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator

from fra.errors import FraError

log = logging.getLogger("fra.registry")

REGISTRY_EXPERIMENT = "fra-registry"
MODEL_NAME_IN_RUN = "backbone"
CHAMPION = "champion"
STATUS_TAG, READY, PENDING, FAILED = "fra.status", "ready", "pending", "failed"
PROTOCOL_TAG = "fra.eval_protocol"
DATASET_TAG = "fra.dataset_fingerprint"
METRIC_TAG_PREFIX = "fra.metric."
CARD_TAG_PREFIX = "fra.card."
REGISTRATION_TAG = "fra.registration_id"
CARD_FIELDS = ("architecture", "input_size", "normalization", "config_hash", "data_manifest_fingerprint",
               "fra_version")
EXPORT_CANDIDATES = ("backbone.pt", "export/backbone.pt", "checkpoint.pt")
EXAMPLE_SIDE = 64  # input-example height/width; any H, W >= 33 works (see module docstring)


class RegistryError(FraError):
    """The registry is unreachable, or a registry operation was refused or failed."""


@dataclass(frozen=True)
class ModelVersionInfo:
    """One registered backbone version."""

    name: str
    version: int
    run_id: str
    model_id: str
    status: str
    tags: dict[str, str] = field(default_factory=dict)

    @property
    def uri(self) -> str:
        return f"models:/{self.name}/{self.version}"



# --------------------------------------------------------------------------------------
# Connection: URI, retries, reachability
# --------------------------------------------------------------------------------------
def resolve_uri(uri: str | None = None, create: bool = False) -> str:
    """``uri``, else ``$MLFLOW_TRACKING_URI``, else ``sqlite:///<abs>/runs/mlflow.db``; ``create``
    makes that default's folder (registration only: the other commands read an existing store)."""
    from fra.tracking import resolve_tracking_uri

    return resolve_tracking_uri(uri or "", "runs", create=create)


def is_transient(exc: BaseException) -> bool:
    """Worth another try: connection errors, HTTP 5xx/429, a locked sqlite file.

    An MLflow "Max retries exceeded" error is *not* retried again: MLflow's HTTP client already
    retried it with back-off (``MLFLOW_HTTP_REQUEST_MAX_RETRIES``, default 7, factor 2).
    """
    from mlflow.exceptions import RestException

    if isinstance(exc, urllib.error.HTTPError):
        return exc.code >= 500 or exc.code == 429
    if isinstance(exc, (ConnectionError, TimeoutError, urllib.error.URLError)):
        return True
    # Only a real HTTP answer counts: a local MlflowException maps INTERNAL_ERROR to "500" too.
    if isinstance(exc, RestException) and (exc.get_http_status_code() >= 500 or exc.get_http_status_code() == 429):
        return True
    if getattr(exc, "error_code", "") in ("TEMPORARILY_UNAVAILABLE", "REQUEST_LIMIT_EXCEEDED"):
        return True
    return "database is locked" in str(exc)


def call(what: str, fn: Callable[[], Any], attempts: int = 4, delay_s: float = 0.5) -> Any:
    """Run ``fn``, retrying transient failures with exponential back-off (0.5, 1, 2 s)."""
    for attempt in range(1, attempts + 1):
        try:
            return fn()
        except Exception as exc:  # noqa: BLE001 - MLflow raises HTTP, sqlite and OS errors
            if attempt == attempts or not is_transient(exc):
                raise
            log.warning("MLflow %s failed (%s); retry %d/%d", what, str(exc).splitlines()[0][:200],
                        attempt, attempts - 1)
            time.sleep(delay_s * 2 ** (attempt - 1))


def _healthy(uri: str, timeout_s: float = 3.0) -> bool:
    """One quick probe; non-HTTP backends count as healthy."""
    if not uri.startswith(("http://", "https://")):
        return True
    try:
        with urllib.request.urlopen(uri.rstrip("/") + "/health", timeout=timeout_s) as resp:  # noqa: S310
            return resp.status == 200
    except (OSError, urllib.error.URLError):
        return False


def check_reachable(uri: str, attempts: int = 3, timeout_s: float = 3.0, *, create: bool = False) -> None:
    """Fail fast, naming the URI, when the tracking backend does not answer.

    HTTP servers are probed at ``/health`` with a short timeout (MLflow's own client would
    retry a dead server for minutes); every backend then answers one cheap registry query.
    A sqlite file that does not exist is refused unless ``create`` (registering a first
    version): MLflow would create an empty store, so ``fra registry list`` in the wrong folder
    answered "no registered models" and left a new ``runs/mlflow.db`` behind.
    """
    path = sqlite_path(uri)
    if path is not None and not create and not os.path.exists(path):
        raise RegistryError(f"no MLflow store at {path} (tracking URI {uri}): nothing is registered there. Run a "
                            "pipeline first (`make demo` writes runs/mlflow.db under the folder it runs in) or point "
                            "--tracking-uri / MLFLOW_TRACKING_URI at your store. Nothing was created.")
    if uri.startswith(("http://", "https://")):
        url = uri.rstrip("/") + "/health"

        def probe() -> None:
            with urllib.request.urlopen(url, timeout=timeout_s) as resp:  # noqa: S310 - http(s) only
                resp.read()

        try:
            call(f"health check {url}", probe, attempts=attempts)
        except urllib.error.HTTPError as exc:
            if exc.code >= 500 or exc.code == 429:
                raise RegistryError(f"MLflow tracking server {uri} is unhealthy (HTTP {exc.code} on /health)") from exc
            # A proxy without /health: the registry query below decides.
        except (OSError, urllib.error.URLError) as exc:
            raise RegistryError(
                f"MLflow tracking server {uri} is not reachable ({getattr(exc, 'reason', exc)}). Start it "
                "(fra.mlflow_server or `mlflow server ...`) or point --tracking-uri / MLFLOW_TRACKING_URI at a "
                "running one. Nothing was changed in the registry.") from exc
    try:
        call("registry query", lambda: client(uri).search_registered_models(max_results=1), attempts=attempts)
    except Exception as exc:  # noqa: BLE001
        raise RegistryError(f"MLflow registry at {uri} does not answer: {str(exc).splitlines()[0][:300]}") from exc


def sqlite_path(uri: str) -> str | None:
    """The file of a ``sqlite:///`` URI (SQLAlchemy's form: three slashes and a relative path, or
    four and an absolute one), or None for any other URI or an in-memory database."""
    if not uri.startswith("sqlite:///"):
        return None
    path = uri[len("sqlite:///"):].split("?", 1)[0]
    return path if path and path != ":memory:" else None


@functools.lru_cache(maxsize=8)
def client(uri: str):
    """One MlflowClient per URI (creating one opens and checks the store, about 1 s on sqlite)."""
    from mlflow import MlflowClient

    return MlflowClient(tracking_uri=uri, registry_uri=uri)


@contextmanager
def _fluent_uri(uri: str) -> Iterator[None]:
    """Point MLflow's fluent API (needed by ``log_model``) at ``uri`` for the block, then restore.

    Restores ``$MLFLOW_TRACKING_URI`` too: MLflow's own ``_use_tracking_uri`` unsets it on exit
    when no URI had been set in code, which would silently re-point later stages at the default.
    """
    import mlflow
    from mlflow.tracking._tracking_service import utils as tracking_utils

    previous, env = tracking_utils._tracking_uri, os.environ.get("MLFLOW_TRACKING_URI")
    mlflow.set_tracking_uri(uri)
    try:
        yield
    finally:
        mlflow.set_tracking_uri(previous)
        if env is not None:
            os.environ["MLFLOW_TRACKING_URI"] = env


def get_version(mlc, name: str, version: int | str) -> ModelVersionInfo:
    mv = call("get model version", lambda: mlc.get_model_version(name, str(version)))
    return _info(mv)


def _info(mv) -> ModelVersionInfo:
    tags = dict(mv.tags or {})
    model_id = getattr(mv, "model_id", None) or (mv.source or "").removeprefix("models:/")
    return ModelVersionInfo(mv.name, int(mv.version), mv.run_id or "", model_id if model_id.startswith("m-") else "",
                            tags.get(STATUS_TAG, ""), tags)


def champion_version(mlc, name: str) -> int | None:
    """The version holding the ``champion`` alias (int on every backend), or None."""
    aliases = call("get registered model", lambda: mlc.get_registered_model(name)).aliases or {}
    return int(aliases[CHAMPION]) if CHAMPION in aliases else None
