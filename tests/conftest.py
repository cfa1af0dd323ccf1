"""Shared pytest fixtures.

``ray_local``: one local Ray runtime per test session (4 logical CPUs on this 2-core machine,
a small object store, the dashboard (its State API lets Ray Train free the
placement groups of trials a Tune scheduler stops), Ray Data progress bars off, small Parquet read tasks).
Tests that use it are marked ``@pytest.mark.ray``.
"""
from __future__ import annotations

import atexit
import os
import shutil
import tempfile

import pytest


# Ray Train's controller polls its workers every RAY_TRAIN_HEALTH_CHECK_INTERVAL_S (2 s by default),
# and a worker's ``ray.train.report`` goes into a queue of one that only a poll empties: a second report
# before the next poll waits for it, and a run's end is seen at the next poll. Runs of real size report
# minutes apart; the tests' tiny epochs report every few seconds. Set before any Ray starts, so the
# processes the tests start inherit it (the session's Ray, CLI children, the cluster tests' `ray start`).
os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.25")

# The session's local Ray; tests that replace it with their own cluster restart it with these.
LOCAL_RAY = {"num_cpus": 4, "include_dashboard": True, "object_store_memory": 400 * 1024 * 1024,
             "log_to_driver": False, "configure_logging": False}


def init_local_ray() -> None:
    """``ray.init`` of the session's local Ray as fra's ``init_ray`` starts one: the processes it
    starts get ``RAY_API_SERVER_ADDRESS`` (this Ray's dashboard), so the State API (Tune's early-stop
    probe, Ray Train's placement-group cleaner) never looks the cluster up on the machine, where it
    found the GCS of a Ray that had just been shut down and timed out after 30 s."""
    import ray

    from fra.ray_runtime import API_SERVER_ENV, _environ, _free_port

    port = _free_port()
    with _environ({API_SERVER_ENV: f"http://127.0.0.1:{port}"}):
        ray.init(address="local", dashboard_port=port, **LOCAL_RAY)


def shutdown_ray() -> None:
    """``ray.shutdown()`` after a garbage collection. A Ray Data iterator that a test left mid-stream
    is an unreachable generator until the collector runs; finalised after the shutdown it reports
    to a Ray that is gone: a "Ray is not initialized" traceback per iterator after the session's
    summary, and once (2026-12-06, `make test-fast`) an abort of the pytest process from a thread
    still running at exit. Collected first, it closes while Ray is up."""
    import gc

    import ray

    gc.collect()
    ray.shutdown()


# ---- Two processes on two cores: the Ray tests in one, everything else beside them ------------------
# `make test` runs pytest-xdist with two workers (``-n 2``). The modules below start Ray (a test marked
# ``ray`` or ``cluster``, or one using ``ray_local``); the scheduler makes them one unit of work, which one
# worker runs in collection order: one Ray runtime at a time on the machine, as the tests assume (Ray's
# State API refuses a machine with two). A Ray Train job keeps about 1.3 of the 2 cores busy
# (benchmarks/ray_job_overhead.py); the other worker runs the Ray-free modules beside it, one module per
# unit so that a module's fixtures are built once. xdist's own ``--dist loadgroup`` cannot do this with
# pytest 9.2: it renames ``item._nodeid``, which pytest 9.2 no longer reads, so nothing is grouped
# (pytest-dev/pytest-xdist#1386, open); hence the scheduler here.
RAY_MODULES = frozenset(f"tests/test_{name}.py" for name in (
    "attributes_e2e", "backbone_sources", "benchmark", "cluster_e2e", "console", "ddp_options", "fer_eval",
    "landmarks_e2e", "pipeline", "pipeline_targets", "pretrain_export", "pretrain_faults", "pretrain_ray",
    "s3", "shards", "stream", "swav_train", "tune_landmarks", "tune_sweep", "worker_malloc"))
RAY_UNIT = "ray"
RAY_WORKER = "gw0"
# The other workers run at the lowest priority, nice 19: the Ray unit is the suite's critical path
# (about 30 of its minutes), and measured with equal priority (2026-12-07) the Ray-free modules beside
# it slowed it by as much as they saved. Niced, they take the CPU the Ray unit leaves idle. Not nice 10:
# the raylet starts Ray's workers (training workers, Ray Train's and Ray Data's actors) at nice 15
# (Ray's `worker_niceness`), so at 10 the Ray-free worker took the CPU from them; a tiny Ray Train job
# beside a two-thread loop at nice 10 took 70-77 s, at nice 19 30-44 s, alone 27-38 s (2026-12-07,
# benchmarks/ray_job_overhead.py --jobs 3).
if os.environ.get("PYTEST_XDIST_WORKER", RAY_WORKER) != RAY_WORKER:
    os.setpriority(os.PRIO_PROCESS, 0, 19)  # (imported twice)


def _starts_ray(item) -> bool:
    return bool(item.get_closest_marker("ray") or item.get_closest_marker("cluster")
                or "ray_local" in getattr(item, "fixturenames", ()))


_OUT_OF_DATE = pytest.StashKey[str]()


def pytest_collection_modifyitems(config, items):
    """Under xdist, every test of a module that starts Ray but is not in ``RAY_MODULES`` (or the reverse)
    fails before its fixtures are set up: run beside the Ray unit, it would start a second Ray."""
    if not os.environ.get("PYTEST_XDIST_WORKER"):
        return
    modules: dict[str, bool] = {}
    for item in items:
        module = item.nodeid.split("::", 1)[0]
        modules[module] = modules.get(module, False) or _starts_ray(item)
    for item in items:
        module = item.nodeid.split("::", 1)[0]
        if modules[module] != (module in RAY_MODULES):
            item.stash[_OUT_OF_DATE] = (
                f"tests/conftest.py RAY_MODULES is out of date for {module}: a module that starts Ray (a test "
                "marked ray or cluster, or using ray_local) must be in it, and only such a module")


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_setup(item):
    if _OUT_OF_DATE in item.stash:
        pytest.fail(item.stash[_OUT_OF_DATE], pytrace=False)


def pytest_xdist_make_scheduler(config, log):
    from xdist.scheduler import LoadScopeScheduling

    class RayModulesInOneUnit(LoadScopeScheduling):
        def _split_scope(self, nodeid: str) -> str:
            module = nodeid.split("::", 1)[0]
            return RAY_UNIT if module in RAY_MODULES else module

        def _assign_work_unit(self, node) -> None:
            # the Ray unit, the longest, goes to RAY_WORKER (the one not niced, above) and starts first
            if RAY_UNIT in self.workqueue:
                self.workqueue.move_to_end(RAY_UNIT, last=node.gateway.id != RAY_WORKER)
            super()._assign_work_unit(node)

    return RayModulesInOneUnit(config, log)


@pytest.fixture(scope="session")
def ray_local():
    os.environ.setdefault("RAY_DATA_PARQUET_BIN_PACKING_BYTES", "1048576")
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    os.environ.setdefault("RAY_DEDUP_LOGS", "0")
    import ray

    started = False
    if not ray.is_initialized():
        init_local_ray()
        started = True
    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False
    ctx.print_on_execution_start = False
    yield ray
    if started:
        shutdown_ray()


# Runs that tests in more than one module share (issue 15 §4).
from tests.shared_runs import method_runs, sweep_run  # noqa: E402,F401


# ---- S3: a local S3-compatible server (moto), reached like AWS or MinIO --------------------------
# The endpoint and credentials are the standard AWS environment variables, set here at import so
# that every process this session starts (a local Ray's raylet and workers, an MLflow server)
# inherits them; no key is ever written into a URI. The server itself starts on first use.
def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# setdefault: test modules import this file again as ``tests.conftest``; both copies must agree. One
# server per pytest process: under xdist each worker has its own (the variable is named after it, so
# a worker does not take over the port its parent process picked).
S3_PORT = int(os.environ.setdefault("FRA_TEST_S3_PORT_" + os.environ.get("PYTEST_XDIST_WORKER", "main"),
                                    str(_free_port())))
S3_BUCKET = "fra-test"
S3_ENV = {"AWS_ENDPOINT_URL": f"http://127.0.0.1:{S3_PORT}", "MLFLOW_S3_ENDPOINT_URL": f"http://127.0.0.1:{S3_PORT}",
          "AWS_ACCESS_KEY_ID": "fra-test-key", "AWS_SECRET_ACCESS_KEY": "fra-test-secret",
          "AWS_DEFAULT_REGION": "us-east-1", "AWS_REGION": "us-east-1", "AWS_EC2_METADATA_DISABLED": "true"}
os.environ.update(S3_ENV)


@pytest.fixture(scope="session")
def s3_server():
    """A moto S3 server on ``S3_ENV``'s endpoint with the bucket ``fra-test``; yields ``uri(path)``."""
    import subprocess
    import sys
    import time
    import urllib.request

    pytest.importorskip("moto")
    proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(S3_PORT)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 60
        while True:
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{S3_PORT}/moto-api/", timeout=1)
                break
            except OSError:
                if time.time() > deadline or proc.poll() is not None:
                    pytest.fail("moto S3 server did not start")
                time.sleep(0.2)
        if proc.poll() is not None:
            pytest.fail(f"moto S3 server exited (port {S3_PORT} taken?)")
        import boto3

        boto3.client("s3").create_bucket(Bucket=S3_BUCKET)
        _S3_STARTED.append(True)
        yield lambda path="": f"s3://{S3_BUCKET}/{path}".rstrip("/")
    finally:
        _S3_STARTED.clear()
        proc.terminate()
        proc.wait(10)


@pytest.fixture(scope="module", autouse=True)
def _mlflow_tracking_uri_stays_in_its_module():
    """A module that points MLflow's fluent API somewhere (``mlflow.set_tracking_uri`` also sets
    ``$MLFLOW_TRACKING_URI`` for good) must not send later modules' runs there: fra honours that
    variable wherever no URI is given, as on a cluster. Restored when the module ends."""
    import mlflow.tracking._tracking_service.utils as tracking_utils

    previous, env = tracking_utils._tracking_uri, os.environ.get("MLFLOW_TRACKING_URI")
    yield
    tracking_utils._tracking_uri = previous
    if env is None:
        os.environ.pop("MLFLOW_TRACKING_URI", None)
    else:
        os.environ["MLFLOW_TRACKING_URI"] = env


# ---- Disk: what a module wrote is removed when it ends --------------------------------------------
# CI's disk is finite (a run once filled it): a passing test's tmp_path goes at its end
# (pyproject's tmp_path_retention_policy), and here, when a module ends with no failure, the
# folders its module fixtures made with tmp_path_factory and the objects it left in the test S3
# bucket (moto spools every object over 5 MB to an unlinked file in /tmp until the server stops).
_S3_STARTED: list[bool] = []
# A session fixture's folder (its name starts with this) is shared by modules and removed by that fixture.
SESSION_DIR_PREFIX = "session-"


@pytest.fixture(scope="module", autouse=True)
def _module_leaves_no_files(request, tmp_path_factory):
    root = tmp_path_factory.getbasetemp()
    before, failed = set(root.iterdir()), request.session.testsfailed
    yield
    if request.session.testsfailed != failed:
        return  # kept for reading
    import shutil

    for path in set(root.iterdir()) - before:
        if path.name.startswith(SESSION_DIR_PREFIX):
            continue
        shutil.rmtree(path, ignore_errors=True)
    if _S3_STARTED:
        import boto3

        bucket = boto3.resource("s3").Bucket(S3_BUCKET)
        bucket.objects.all().delete()


@pytest.fixture(scope="module")
def one_thread_per_module():
    """Tiny models on a shared 2-core machine: one intra-op thread is 2-5x cheaper than two (OpenMP
    threads spin and wait for each other when the cores are oversubscribed). A module takes it with
    ``pytestmark = pytest.mark.usefixtures("one_thread_per_module")``."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


SYSTEM_TEMPDIR = tempfile.gettempdir()


@pytest.fixture
def private_tempdir(tmp_path, monkeypatch):
    """``tempfile``'s folder for this test (in-process code only); returns it."""
    d = tmp_path / "tempdir"
    d.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(d))
    return d


def bytes_under(path) -> int:
    from pathlib import Path

    return sum(f.stat().st_size for f in Path(path).rglob("*") if f.is_file())


# ---- MLflow: a new sqlite database starts from a migrated template ---------------------------------
# MLflow builds a new sqlite database by running every schema migration, about 3-10 s on 2 cores;
# the suite makes dozens (every pipeline, sweep, registry and evaluation test has its own). In this
# process, a database MLflow finds empty gets the schema copied from one migrated template (the
# same MLflow version's own migrations, run once per session) instead; the store then adds its
# default experiment with its own artifact root as usual. Processes the tests start (MLflow
# servers, Ray workers, CLI subprocesses) migrate as before.
def _template_state() -> dict:
    """Kept on MLflow's module: test modules import this file again as ``tests.conftest``."""
    import mlflow.store.db.utils as db_utils

    if not hasattr(db_utils, "_fra_test_template"):
        import threading

        db_utils._fra_test_template = {"lock": threading.Lock()}
    return db_utils._fra_test_template


def _sqlite_path(engine) -> str | None:
    url = engine.url
    if url.get_backend_name() != "sqlite" or not url.database or url.database == ":memory:":
        return None
    return url.database


def mlflow_db_template() -> str:
    """Path of the migrated, empty sqlite template (made on first use)."""
    _patch_mlflow_sqlite_init()
    state = _template_state()
    with state["lock"]:
        if "path" not in state:
            import sqlalchemy

            # the system's temp folder even while a test patches tempfile's (private_tempdir)
            folder = tempfile.mkdtemp(prefix="fra-mlflow-template-", dir=SYSTEM_TEMPDIR)
            atexit.register(shutil.rmtree, folder, True)  # each session left its 1 MB template behind
            path = os.path.join(folder, "mlflow.db")
            engine = sqlalchemy.create_engine(f"sqlite:///{path}")
            try:
                state["original"](engine)
            finally:
                engine.dispose()
            state["path"] = path
    return state["path"]


def seed_mlflow_db(path) -> str:
    """Copy the migrated template to ``path`` (for a process this session does not patch, such as
    an ``mlflow server``); returns its ``sqlite:///`` URI."""
    import shutil

    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    shutil.copyfile(mlflow_db_template(), path)
    return f"sqlite:///{path}"


def _patch_mlflow_sqlite_init() -> None:
    import sqlite3

    import mlflow.store.db.utils as db_utils
    import mlflow.store.model_registry.sqlalchemy_store as registry_store

    state = _template_state()
    with state["lock"]:
        if "original" in state:
            return
        original = state["original"] = db_utils._initialize_tables

    def initialize_from_template(engine):
        path = _sqlite_path(engine)
        if path is None:
            return original(engine)
        template = mlflow_db_template()
        engine.dispose()  # no pooled connection holds the empty database while it is filled
        src, dst = sqlite3.connect(template), sqlite3.connect(path)
        try:
            src.backup(dst)
        finally:
            src.close()
            dst.close()

    db_utils._initialize_tables = initialize_from_template
    registry_store._initialize_tables = initialize_from_template


@pytest.fixture(autouse=True)
def _mlflow_sqlite_from_template():
    import sys

    if "mlflow" in sys.modules:
        _patch_mlflow_sqlite_init()
    yield
