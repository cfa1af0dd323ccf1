"""Starting or joining Ray, and the checks that only make sense once we know which.

fra joins an existing cluster whenever there is one to join, and only then starts its own:

- inside a Ray job (the job manager sets ``RAY_ADDRESS``), with ``RAY_ADDRESS`` set by the user,
  on a node where ``ray start`` ran (Ray records the address in its temp dir), or with an
  explicit ``address``: join it, *without* resource arguments (Ray refuses ``num_cpus`` when
  connecting to a cluster);
- otherwise start a local Ray with the logical CPUs and dashboard setting asked for.

It also records which copy of fra this process imported (:func:`code_origin`): a job sent with
``ray job submit --working-dir .`` must run the shipped copy in the driver and in every worker,
never a mix of it and an installed package.

Last, what every Ray Train job of fra shares about its training stream: the epoch a new worker
group's stream starts at, read from the Train controller's snapshot (:class:`EpochAlignedDataset`),
and the stream's block order kept through Ray Train's split (:func:`ingest_options`).
"""
from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import socket
import sys
from pathlib import Path

from fra.errors import ConfigError, FraError

log = logging.getLogger(__name__)

# Ray Data's Parquet datasource packs row groups into 128 MiB read tasks: small shard sets would
# become one task (RAY_NOTES §2). fra's shards are small-row-group files; read them in parallel.
PARQUET_BIN_PACKING_ENV = "RAY_DATA_PARQUET_BIN_PACKING_BYTES"


def cluster_address(address: str = "") -> str | None:
    """The address of the cluster to join, or None when fra should start a local Ray.

    ``address``: "" = auto-detect (``RAY_ADDRESS``, then a ``ray start`` on this node); "auto" =
    a running cluster must exist; "local" = always start a local Ray; anything else = that address.
    """
    if address == "local":
        return None
    from ray._private.services import canonicalize_bootstrap_address

    try:
        return canonicalize_bootstrap_address(address or None)
    except ConnectionError as exc:
        raise FraError(f"ray.address={address!r}: no running Ray cluster found ({exc}). Start one with "
                       "`ray start --head`, set RAY_ADDRESS, or leave ray.address empty to start a local Ray") from exc


def init_ray(*, address: str = "", num_cpus: int = 0, dashboard: bool = True, **local_kwargs) -> str:
    """Join a running cluster or start a local Ray (module docstring).

    Call it before anything touches Ray Data: reading Parquet into a ``Dataset`` or materializing one
    starts a default local Ray by itself when none runs, with ``os.cpu_count()`` logical CPUs (no
    spare CPU for the data path beside the workers), without ``RAY_API_SERVER_ADDRESS``, and unknown
    to the console, which then cannot shut it down inside its capture (Ray's deduplicated last lines
    reached the terminal at exit).

    Args:
        address: see :func:`cluster_address`.
        num_cpus: logical CPUs of a *local* Ray (0 = max(4, cores): the data path needs CPUs beside
            the training workers, RAY_NOTES §2); ignored when joining.
        dashboard: start the dashboard with a local Ray (on by default: Ray Train's placement-group
            cleaner asks its State API whether a run's controller is alive, and without it prints
            "Failed to query Ray Train Controller actor state" over and over and cannot free the
            placement groups of stopped trials); a cluster has its own.
        local_kwargs: further ``ray.init`` arguments for a local Ray only.

    Returns:
        "initialized" (Ray was already up in this process), "joined" or "local".
    """
    import ray

    from fra import console

    os.environ.setdefault(PARQUET_BIN_PACKING_ENV, str(8 << 20))
    if ray.is_initialized():
        console.on_ray_init("initialized")
        return "initialized"
    found = cluster_address(address)
    if found:
        ctx = ray.init(address=found)
        log.info("joined the Ray cluster at %s (%d node(s))", found, alive_nodes())
        _check_state_api(ctx)
        console.on_ray_init("joined")
        return "joined"
    kwargs = {"num_cpus": num_cpus or max(4, os.cpu_count() or 1), "include_dashboard": dashboard, **local_kwargs}
    if dashboard:
        kwargs.setdefault("dashboard_port", _free_port())
        # The State API of *this* Ray for every process it starts: Ray Train's placement-group cleaner
        # (a detached actor) otherwise looks the cluster up on the machine and fails (or finds another
        # cluster's dashboard) where more than one Ray runs. Its processes inherit the variable at start.
        with _environ({API_SERVER_ENV: f"http://127.0.0.1:{kwargs['dashboard_port']}"}):
            ctx = ray.init(**kwargs)
    else:
        ctx = ray.init(**kwargs)
    _check_state_api(ctx)
    console.on_ray_init("local")
    return "local"


API_SERVER_ENV = "RAY_API_SERVER_ADDRESS"


@contextlib.contextmanager
def _environ(values: dict[str, str]):
    saved = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _check_state_api(ctx) -> None:
    """Say once, up front, why Ray Train will complain: a Ray without a dashboard has no State API."""
    if not getattr(ctx, "dashboard_url", None):
        log.warning("this Ray has no dashboard, so no State API: Ray Train's placement-group cleaner will log "
                    "'Failed to query Ray Train Controller actor state' and cannot free the workers of a run "
                    "that dies; start Ray with the dashboard (ray start --head --include-dashboard=true)")


def alive_nodes() -> int:
    import ray

    return sum(1 for n in ray.nodes() if n.get("Alive"))


def cluster_capacity() -> dict[str, float]:
    """What the cluster has or may grow to: per resource, the larger of the live total and the
    autoscaler's maximum (an autoscaling cluster with ``min_workers: 0`` starts with no GPU)."""
    import ray
    from ray._private.state import state as ray_state

    now = ray.cluster_resources()
    try:
        grow = ray_state.get_max_resources_from_cluster_config() or {}
    except Exception:  # noqa: BLE001 - no autoscaler: what is there is all there will be
        grow = {}
    return {k: max(float(now.get(k, 0.0)), float(grow.get(k, 0.0))) for k in set(now) | set(grow)}


def is_multinode() -> bool:
    """True when Ray is up and the cluster has (or may grow to) more than one node."""
    import ray

    if not ray.is_initialized():
        return False
    if alive_nodes() > 1:
        return True
    from ray._private.state import state as ray_state

    try:
        return bool(ray_state.get_max_resources_from_cluster_config())  # an autoscaling cluster
    except Exception:  # noqa: BLE001 - no autoscaler config: a fixed local cluster
        return False


# Set to 1 where every node mounts the same filesystem at the same paths (NFS, EFS, or several
# raylets on one machine): local storage paths are then shared storage.
SHARED_FILESYSTEM_ENV = "FRA_SHARED_FILESYSTEM"


def check_shared_location(what: str, location: str) -> None:
    """Refuse a node-local path for something every node must reach, on a multi-node cluster."""
    if "://" in location or os.environ.get(SHARED_FILESYSTEM_ENV) == "1" or not is_multinode():
        return
    raise ConfigError(f"{what}={location!r} is a local path, but this Ray cluster has several nodes: each "
                      "node would see its own disk (a job's working directory is also deleted when it ends). "
                      "Use shared storage, e.g. s3://<bucket>/fra/... ($FRA_STORAGE_PATH on the cluster), or set "
                      f"{SHARED_FILESYSTEM_ENV}=1 if every node mounts this path (NFS, EFS)")


def check_tracking_uri(uri: str) -> None:
    """Refuse an MLflow store on a node-local file when workers on other nodes log to it."""
    node_local = uri.startswith(("sqlite:", "file:")) or "://" not in uri
    if not uri or not node_local or not is_multinode():
        return
    raise ConfigError(f"MLflow tracking URI {uri!r} is a file on this node, but Train workers on other nodes "
                      "log to it too (their metrics would be lost). Set MLFLOW_TRACKING_URI (or "
                      "tracking.mlflow_uri) to the cluster's MLflow server, e.g. http://<head>:5000")


# ---- the Train workers' process environment --------------------------------------------------
MALLOC_ARENA_ENV = "MALLOC_ARENA_MAX"


def train_worker_runtime_env() -> dict:
    """The ``worker_runtime_env`` of fra's Ray Train jobs: glibc's malloc limited to one arena.

    Ray Train runs the training loop on a thread of the worker process, not on its main thread, and
    glibc gives such a thread its own malloc arena. That arena's heaps are handed back to the kernel
    when a step's activations are freed and faulted in again by the next step: a ResNet-50 FER
    worker took 51 k minor page faults per image against 25 k for the same loop on a main thread,
    and 2.5x the kernel time (benchmarks/RESULTS.md, FER at RAF-DB's size). One arena (the main
    one, which trims only above its trim threshold) brings the faults back to the main-thread
    level. glibc reads the variable when the process starts, so it must be in the environment Ray
    starts the worker with, which a runtime env's ``env_vars`` are. A ``MALLOC_ARENA_MAX`` set in
    the driver's environment is passed on instead of ``1``.
    """
    return {"env_vars": {MALLOC_ARENA_ENV: os.environ.get(MALLOC_ARENA_ENV) or "1"}}


# ---- which copy of fra is running ------------------------------------------------------------
def code_origin() -> dict:
    """Where this process's fra comes from: ``{"path", "fingerprint"}``.

    The fingerprint hashes every ``.py`` file of the package (relative name and bytes), so two
    nodes running the same shipped code agree even though their paths differ.

    Raises:
        FraError: fra modules of this process come from more than one directory.
    """
    import fra

    root = Path(fra.__file__).resolve().parent
    mixed = sorted({str(Path(m.__file__).resolve()) for name, m in list(sys.modules.items())
                    if (name == "fra" or name.startswith("fra.")) and getattr(m, "__file__", None)
                    and not Path(m.__file__).resolve().is_relative_to(root)})
    if mixed:
        raise FraError(f"two copies of fra are mixed in this process: the package is {root} but "
                       f"{mixed[:3]} come from elsewhere. Install fra on the nodes from the same checkout "
                       "you submit, or let the job's --working-dir copy be the only one on sys.path")
    h = hashlib.sha256()
    for f in sorted(root.rglob("*.py")):
        h.update(f.relative_to(root).as_posix().encode() + b"\0" + f.read_bytes() + b"\0")
    origin = {"path": str(root), "fingerprint": h.hexdigest()[:16]}
    import ray

    if ray.is_initialized():
        origin["node"] = ray.get_runtime_context().get_node_id()
    return origin


def check_worker_code(expected: dict | None, where: str) -> dict:
    """In a worker: this process's :func:`code_origin`, checked against the driver's (``expected``).

    Files edited on disk after the driver started (same path, same node) are only logged: the
    worker runs the edited code, as any process started after an edit would.

    Raises:
        FraError: the worker imports different fra code than the driver (e.g. a node's installed
            package instead of the job's working directory, or another node's older copy), or a mix of
            copies.
    """
    mine = code_origin()
    if expected and mine["fingerprint"] != expected.get("fingerprint"):
        if mine["path"] == expected.get("path") and mine.get("node") and mine.get("node") == expected.get("node"):
            # Same files on the same node: they were edited after the driver started (a developer's
            # tree). This worker runs the edited code; say so instead of failing a long run.
            log.warning("%s: fra's code under %s changed on disk after the driver started (code %s, driver %s); "
                        "this worker runs the edited code", where, mine["path"], mine["fingerprint"],
                        expected.get("fingerprint"))
            return mine
        raise FraError(f"{where}: this worker runs fra from {mine['path']} (code {mine['fingerprint']}) but the "
                       f"driver runs {expected.get('path')} (code {expected.get('fingerprint')}): the node's "
                       "installed fra and the submitted working directory disagree, or the node has another version "
                       "of fra at the same path")
    return mine


# ---- the epoch a new Train worker group streams -------------------------------------------------
SNAPSHOT_FILE = "checkpoint_manager_snapshot.json"  # Ray Train V2's record of registered checkpoints


def resume_epoch(run_dir: str) -> int:
    """Epoch the workers resume in: that of the latest checkpoint the Train controller has
    registered for ``run_dir`` (the one Ray gives the workers), from the ``epoch`` in the metrics
    reported with it (pretraining and the evaluations both report the number of finished epochs);
    0 for a run without a checkpoint."""
    from fra import storage as st

    snapshot = st.join(run_dir, SNAPSHOT_FILE)
    if not st.exists(snapshot):
        return 0
    try:
        latest = st.read_json(snapshot).get("latest_checkpoint_result") or {}
        return int(latest["metrics"]["epoch"]) if latest else 0
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
        log.warning("cannot read the resume epoch from %s (%s): the data stream starts at epoch 0, the order and "
                    "augmentations of the resumed epoch will not be those of an uninterrupted run",
                    st.redact(snapshot), exc)
        return 0


class EpochAlignedDataset:
    """A training dataset as Ray Train takes it: a callable it calls at every worker-group start.

    Each epoch is one execution of the dataset, and the execution index seeds its file order,
    row permutation, augmentations and class-balanced draws (:mod:`fra.data.stream`,
    :mod:`fra.evaluation.data`). Ray's split coordinator, created anew with every worker group (a
    new run, or a restart after a failure), counts executions from the index the dataset carries.
    Left at 0, a run resumed in epoch e drew epoch 0's data again; here the index is set to the
    epoch of the checkpoint the new group resumes from (:func:`resume_epoch`, read in the Train
    controller just before it hands that checkpoint to the workers), so that epoch e always draws
    epoch e's data. Pretraining and every downstream evaluation job take their training stream
    through this class.
    """

    def __init__(self, ds, run_dir: str):
        self.ds, self.run_dir = ds, run_dir

    def __call__(self):
        self.ds.context._execution_idx = resume_epoch(self.run_dir)
        return self.ds


def ingest_options(ds):
    """Ray Train's ingest options for ``ds`` (the driver's, as Ray Train's default) with the dataset's
    own ``preserve_order``: Ray Train replaces a dataset's execution options with these when it
    splits it, and its default takes ``preserve_order`` from the global context, not the dataset's
    (fra.data.stream, "Order": without it blocks reach the worker in task-completion order)."""
    from ray.train import DataConfig

    options = DataConfig.default_ingest_options()
    options.preserve_order = bool(ds.context.execution_options.preserve_order)
    return options


def wait_until_reports_registered(timeout_s: float = 60.0) -> None:
    """In a Ray Train worker: return once the Train controller has processed every ``ray.train.report``
    this worker made (registered its checkpoint and written its snapshot file), or after ``timeout_s``.
    The fault-injection hooks call it before they kill or fail a worker, so the run's latest
    checkpoint is known, without a fixed sleep."""
    import ray.train

    ray.train.get_all_reported_checkpoints(consistency_mode=ray.train.CheckpointConsistencyMode.COMMITTED,
                                           timeout_s=timeout_s)


__all__ = ["cluster_address", "init_ray", "alive_nodes", "cluster_capacity", "is_multinode", "check_shared_location",
           "check_tracking_uri", "SHARED_FILESYSTEM_ENV", "API_SERVER_ENV", "code_origin", "check_worker_code", "PARQUET_BIN_PACKING_ENV",
           "SNAPSHOT_FILE", "resume_epoch", "EpochAlignedDataset", "ingest_options",
           "wait_until_reports_registered"]
