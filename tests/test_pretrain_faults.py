"""Multi-node pretraining and node loss on a ``ray.cluster_utils.Cluster`` (CPU, gloo).

A killed worker *process* and an interrupted-then-rerun run are tested on the session's local
Ray in tests/test_pretrain_ray.py.

These tests cannot share the session's local Ray (``ray_local``): the module fixture calls
``ray.shutdown()``, starts its own 2-node cluster (3 logical CPUs per node; a worker asks for 2,
so there is exactly one train worker per node and one CPU per node left for Ray Data), and at
the end shuts it down and, if a local Ray was running before, starts one again with the
settings of tests/conftest.py. Keep them in this module.

``RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S`` is lowered to 10 s so that a lost node is noticed
quickly. The tests wait on the run's state, never a fixed time: the controller's registered
checkpoints (its snapshot file) before a node is removed, and the controller's state changes
(:class:`StateLog`, a Train controller callback) before one is added back. Each run checks: it
finishes, the final step equals the planned count, the resume started from a checkpoint (not
from scratch) and the model/EMA/optimizer tensors restored by the worker equal those in that
checkpoint file.
"""
from __future__ import annotations

import contextlib
import os
import sys
import threading
import time
from pathlib import Path

import pytest
import ray.cloudpickle
import torch
from ray.train.v2._internal.execution.callback import ControllerCallback

from tests.conftest import init_local_ray, shutdown_ray
from tests.test_pretrain_ray import assert_restored_exactly, registered_checkpoints, tiny_config

pytestmark = [pytest.mark.ray, pytest.mark.slow]

# FRA_SHARED_FILESYSTEM: these raylets share this machine's disk, so tmp_path is shared storage.
ENV = {"RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S": "10", "OMP_NUM_THREADS": "1", "RAY_AUTH_MODE": "disabled",
       "RAY_DEDUP_LOGS": "0", "FRA_SHARED_FILESYSTEM": "1"}
NODE = {"num_cpus": 3, "object_store_memory": 200 * 1024 * 1024}
FAULT_CFG = ("scaling.num_workers=2", "scaling.cpus_per_worker=2", "scaling.max_failures=2",
             "scaling.placement_timeout_s=240", "run.checkpoint_every=4", "optim.epochs=1",
             "data.synthetic.num_identities=20",  # one epoch of 128 faces = 16 steps (one data pass less)
             "run.checkpoint_upload=sync")  # exact resume points (an async upload cut short by a lost node is dropped)


@pytest.fixture(scope="module")
def cluster():
    import ray
    from ray.cluster_utils import Cluster

    had_local = ray.is_initialized()
    shutdown_ray()
    saved = {k: os.environ.get(k) for k in ENV}
    os.environ.update(ENV)
    c = None
    try:  # whatever fails here, later modules get their environment (no FRA_SHARED_FILESYSTEM) and Ray back
        c = Cluster(initialize_head=True, head_node_args={**NODE, "include_dashboard": False})
        c.add_node(**NODE)
        ray.init(address=c.address, log_to_driver=False, configure_logging=False)
        c.wait_for_nodes()
        ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])  # StateLog, for the Train controller
        yield c
    finally:
        with contextlib.suppress(ValueError):  # not registered when the set-up failed first
            ray.cloudpickle.unregister_pickle_by_value(sys.modules[__name__])
        try:
            ray.shutdown()
            if c is not None:
                c.shutdown()
        finally:
            for k, v in saved.items():
                os.environ.pop(k, None) if v is None else os.environ.__setitem__(k, v)
            if had_local:  # hand the session its local Ray back
                init_local_ray()


@pytest.fixture
def two_nodes(cluster):
    """The cluster with exactly one live worker node besides the head; returns that node."""
    while len(cluster.worker_nodes) < 1:
        cluster.add_node(**NODE)
    cluster.wait_for_nodes()
    return next(iter(cluster.worker_nodes))


class StateLog(ControllerCallback):
    """Appends the name of every state the Train controller enters to ``path`` (a file on this machine).

    Pickled by value (see the ``cluster`` fixture): the controller cannot import this test module."""

    def __init__(self, path: Path):
        self.path = str(path)

    def after_controller_state_update(self, previous_state, current_state) -> None:
        with open(self.path, "a") as f:
            f.write(type(current_state).__name__ + "\n")

    def states(self) -> list[str]:
        try:
            return Path(self.path).read_text().split()
        except FileNotFoundError:
            return []

    def wait_for(self, state: str, after: int, what: str, timeout: float = 180) -> int:
        """Wait until the controller enters ``state`` after its first ``after`` states; returns the new count."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            seen = self.states()
            if state in seen[after:]:
                return len(seen)
            time.sleep(0.2)
        raise AssertionError(f"the Train controller did not enter {state} ({what}) within {timeout} s; "
                             f"its states since then: {self.states()[after:]}")


class Background:
    """``pretrain_ray`` in a thread: node operations must run in the main thread."""

    def __init__(self, cfg, **kw):
        from fra.train.ray_trainer import pretrain_ray

        self.result, self.error = None, None
        self.thread = threading.Thread(target=self._run, args=(pretrain_ray, cfg, kw), daemon=True)
        self.thread.start()

    def _run(self, fn, cfg, kw):
        try:
            self.result = fn(cfg, **kw)
        except BaseException as exc:  # noqa: BLE001 - re-raised in join()
            self.error = exc

    def join(self, timeout: float):
        self.thread.join(timeout)
        assert not self.thread.is_alive(), f"run did not finish within {timeout} s"
        if self.error:
            raise self.error
        return self.result


def wait_for_checkpoint(run_dir: Path, min_step: int, timeout: float = 300) -> int:
    """Step of the latest checkpoint the Train controller has *registered* (not just written)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        steps = registered_checkpoints(run_dir)
        if steps and max(steps) >= min_step:
            return max(steps)
        time.sleep(0.5)
    raise AssertionError(f"no registered checkpoint at step >= {min_step} within {timeout} s")


def check_resumed(out, dump: Path, run_dir: Path, at_least: int) -> int:
    rv = out.return_value
    assert rv["status"] == "finished" and rv["step"] == rv["planned"] == 16
    restored = sorted(int(p.stem.removeprefix("restored_step")) for p in dump.glob("restored_step*.pt"))
    assert restored and restored[-1] >= at_least, restored  # resumed from a checkpoint, not from scratch
    assert_restored_exactly(dump, run_dir, restored[-1])
    return restored[-1]


def test_lost_node_is_replaced_and_the_run_continues(cluster, two_nodes, tmp_path):
    cfg = tiny_config(tmp_path, "replace", *FAULT_CFG)
    states = StateLog(tmp_path / "controller_states.txt")
    run = Background(cfg, inject={"dump_restored_to": str(tmp_path)}, callbacks=[states])
    seen = wait_for_checkpoint(tmp_path / "replace", 4)
    before = len(states.states())
    cluster.remove_node(two_nodes, allow_graceful=False)
    # Ray notices the loss, then tries to place 2 workers on the one node left and gives up after
    # the 10 s start timeout (Scheduling -> Rescheduling): only then does the node come back.
    states.wait_for("ReschedulingState", before, "a failed attempt to place 2 workers after the node loss")
    cluster.add_node(**NODE)  # what the autoscaler would do
    out = run.join(600)
    assert out.return_value["world_size"] == 2
    check_resumed(out, tmp_path, tmp_path / "replace", at_least=seen)


def test_lost_node_in_elastic_mode_continues_with_fewer_workers(cluster, two_nodes, tmp_path):
    cfg = tiny_config(tmp_path, "elastic", *FAULT_CFG, "scaling.num_workers=[1, 2]")
    run = Background(cfg, inject={"dump_restored_to": str(tmp_path)})
    seen = wait_for_checkpoint(tmp_path / "elastic", 4)
    cluster.remove_node(two_nodes, allow_graceful=False)
    out = run.join(600)
    assert out.return_value["world_size"] == 1
    check_resumed(out, tmp_path, tmp_path / "elastic", at_least=seen)
    assert torch.load(out.checkpoint, weights_only=True)["extra"]["world_size"] == 1
