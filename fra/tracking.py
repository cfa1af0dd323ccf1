"""MLflow helpers: tracking URI resolution, run start/resume, params, metrics and artifacts.

The driver opens (or re-opens) the MLflow run before training and logs the resolved config as
params; inside Ray Train workers only rank 0 gets a live :class:`RunLogger` (the others get a
no-op one). Metrics go through a background thread so a slow backend (sqlite commits take
0.5–1 s here) never stalls a training step. Every call is retried on transient errors; a
tracking outage is logged and never kills a training run.
"""
from __future__ import annotations

import logging
import os
import queue
import shutil
import threading
import time
from pathlib import Path
from typing import Any, Callable

log = logging.getLogger(__name__)

RUN_KEY_TAG = "fra.run_key"
TRACKING_URI_ENV = "MLFLOW_TRACKING_URI"
MAX_PARAM_CHARS = 6000  # MLflow's limit on a param value


def resolve_tracking_uri(uri: str, storage_path: str | Path, create: bool = True) -> str:
    """The MLflow tracking URI to use.

    An explicit URI as is; else ``MLFLOW_TRACKING_URI`` (cluster.yaml exports the head's server
    there); else a local sqlite file ``<abs storage_path>/mlflow.db`` (``./runs/mlflow.db`` when the
    storage is a URI). A file-based store on a multi-node cluster is refused later, once Ray is up
    (:func:`fra.ray_runtime.check_tracking_uri`).

    ``create``: make the sqlite file's folder (sqlite cannot create it). Callers that only read a
    config (loading a pipeline, printing where a run logs) pass False, so that nothing appears
    in the working directory until something is run.
    """
    if uri:
        return uri
    if os.environ.get(TRACKING_URI_ENV):
        return os.environ[TRACKING_URI_ENV]
    root = Path("runs" if "://" in str(storage_path) else storage_path).expanduser().resolve()
    if create:
        root.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{root}/mlflow.db"


def artifact_location(uri: str) -> str | None:
    """Artifacts next to a local sqlite file (``<dir>/mlartifacts``), not in the process's cwd."""
    if uri.startswith("sqlite:///"):
        return (Path(uri.removeprefix("sqlite:///")).resolve().parent / "mlartifacts").as_uri()
    return None  # a server decides (proxied artifacts)


def with_retries(fn: Callable[[], Any], what: str, attempts: int = 3, delay_s: float = 1.0) -> Any:
    """Call ``fn``; retry transient failures with exponential back-off, then re-raise."""
    for attempt in range(1, attempts + 1):
        try:
            return fn()
        except Exception as exc:  # noqa: BLE001 - MLflow raises many types (HTTP, sqlite, OS)
            if attempt == attempts:
                raise
            log.debug("mlflow %s failed (%s), retry %d/%d", what, exc, attempt, attempts - 1)
            time.sleep(delay_s * 2 ** (attempt - 1))


def _client(uri: str):
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=uri)


def start_run(uri: str, experiment: str, run_key: str, run_name: str, params: dict[str, Any],
              tags: dict[str, str] | None = None) -> tuple[str, bool]:
    """Open the MLflow run of ``run_key`` (storage path + name), creating it if needed.

    Re-running an interrupted training run continues the same MLflow run. Params are logged
    once, when the run is created (MLflow refuses to change a logged param). The key, name,
    params and tags are redacted (:func:`fra.redaction.redact`) before they reach MLflow.

    Returns:
        (run_id, resumed)
    """
    from fra.redaction import redact, redact_text

    run_key, run_name, tags = redact_text(run_key), redact_text(run_name), redact(dict(tags or {}))
    client = _client(uri)
    exp = with_retries(lambda: client.get_experiment_by_name(experiment), "get experiment")
    exp_id = exp.experiment_id if exp else with_retries(
        lambda: client.create_experiment(experiment, artifact_location=artifact_location(uri)), "create experiment")
    found = with_retries(lambda: client.search_runs([exp_id], f"tags.`{RUN_KEY_TAG}` = '{run_key}'",
                                                    max_results=1), "search runs")
    if found:
        run_id = found[0].info.run_id
        with_retries(lambda: client.update_run(run_id, status="RUNNING"), "update run")
        return run_id, True
    all_tags = {RUN_KEY_TAG: run_key, **(tags or {})}
    run = with_retries(lambda: client.create_run(exp_id, run_name=run_name, tags=all_tags), "create run")
    run_id = run.info.run_id
    log_params(uri, run_id, params)
    return run_id, False


def log_params(uri: str, run_id: str, params: dict[str, Any]) -> None:
    """Log params, redacted: a param named like a secret is masked, credentials and secret values
    are cut out of every value (:func:`fra.redaction.redact`)."""
    from mlflow.entities import Param

    from fra.redaction import redact

    params = redact({str(k): str(v) for k, v in params.items()})
    items = [Param(k, v[:MAX_PARAM_CHARS]) for k, v in sorted(params.items())]
    client = _client(uri)
    for i in range(0, len(items), 100):  # MLflow caps a batch at 100 params
        chunk = items[i:i + 100]
        with_retries(lambda: client.log_batch(run_id, params=chunk), "log params")


def end_run(uri: str, run_id: str, status: str = "FINISHED") -> None:
    try:
        with_retries(lambda: _client(uri).set_terminated(run_id, status=status), "end run")
    except Exception as exc:  # noqa: BLE001
        log.warning("could not close MLflow run %s: %s", run_id, exc)


def log_artifacts(uri: str, run_id: str, path: str | Path, artifact_path: str | None = None) -> None:
    """Log a file or a directory; failures are warnings."""
    p = Path(path)
    client = _client(uri)
    fn = client.log_artifacts if p.is_dir() else client.log_artifact
    try:
        with_retries(lambda: fn(run_id, str(p), artifact_path), f"log artifact {p.name}")
    except Exception as exc:  # noqa: BLE001
        log.warning("MLflow artifact %s not logged: %s", p, exc)


class RunLogger:
    """Asynchronous metric/artifact logger bound to one MLflow run.

    ``enabled=False`` (other ranks, tracking off) makes every method a no-op.
    """

    def __init__(self, uri: str = "", run_id: str = "", enabled: bool = True):
        self.uri, self.run_id = uri, run_id
        self.enabled = bool(enabled and uri and run_id)
        self._queue: queue.Queue = queue.Queue()
        self._thread: threading.Thread | None = None
        self._warned = False

    def _ensure_thread(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._drain, name="mlflow-logger", daemon=True)
            self._thread.start()

    def _drain(self) -> None:
        client = _client(self.uri)
        while True:
            item = self._queue.get()
            try:
                if item is None:
                    return
                kind, payload = item
                if kind == "metrics":
                    with_retries(lambda: client.log_batch(self.run_id, metrics=payload), "log metrics")
                else:
                    path, artifact_path, cleanup = payload
                    fn = client.log_artifacts if Path(path).is_dir() else client.log_artifact
                    try:
                        with_retries(lambda: fn(self.run_id, path, artifact_path), "log artifact")
                    finally:
                        if cleanup:
                            shutil.rmtree(cleanup, ignore_errors=True)
            except Exception as exc:  # noqa: BLE001 - tracking must never kill training
                if not self._warned:
                    log.warning("MLflow logging failed (further failures are silent): %s", exc)
                    self._warned = True
            finally:
                self._queue.task_done()

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        if not self.enabled:
            return
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        batch = [Metric(k.replace("/", "."), float(v), now, int(step)) for k, v in metrics.items()
                 if isinstance(v, (int, float))]
        self._ensure_thread()
        self._queue.put(("metrics", batch))

    def log_artifact(self, path: str | Path, artifact_path: str | None = None, cleanup: str | Path | None = None
                     ) -> None:
        """Upload a file, or a directory's contents under ``artifact_path``; then delete ``cleanup``."""
        if not self.enabled:
            return
        self._ensure_thread()
        self._queue.put(("artifact", (str(path), artifact_path, cleanup)))

    def close(self, timeout_s: float = 60.0) -> None:
        """Flush what is queued (bounded wait) and stop the thread."""
        if self._thread is None:
            return
        self._queue.put(None)
        self._thread.join(timeout_s)
        if self._thread.is_alive():
            log.warning("MLflow logger did not flush within %.0f s", timeout_s)
        self._thread = None
