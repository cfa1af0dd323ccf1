"""Storage locations: local paths and s3:// URIs behind one API (fra.storage), the hand-over
helpers built on it, and the cluster checks of fra.ray_runtime."""
from __future__ import annotations

import json
import os
import sys
import types
from pathlib import Path

import pytest

from fra import storage as st
from fra.errors import ConfigError, FraError


@pytest.mark.parametrize("loc, parent, name", [
    ("s3://bucket/fra/runs/x/export/backbone.pt", "s3://bucket/fra/runs/x/export", "backbone.pt"),
    ("s3://bucket/x/", "s3://bucket", "x"),
    ("gs://b/a", "gs://b", "a"),
    ("/tmp/a/b.pt", "/tmp/a", "b.pt"),
])
def test_dirname_and_basename_keep_the_scheme(loc, parent, name):
    # pathlib would give 's3:/bucket/...' (the bug behind the lost pretrain -> evaluate hand-over)
    assert st.dirname(loc) == parent and st.basename(loc) == name
    assert st.join(parent, name) == loc.rstrip("/")


def test_relative_never_reads_the_working_directory(tmp_path, monkeypatch):
    gone = tmp_path / "gone"
    gone.mkdir()
    monkeypatch.chdir(gone)
    gone.rmdir()  # a Ray job's working directory can disappear under it
    with pytest.raises(FileNotFoundError):
        os.getcwd()
    assert st.relative("bucket/a/b/c.parquet", "bucket/a") == "b/c.parquet"
    with pytest.raises(ValueError, match="not under"):
        st.relative("bucket/ab/c", "bucket/a")


def _roundtrip(base: str, tmp_path: Path) -> None:
    st.write_json(st.join(base, "state.json"), {"a": 1})
    assert st.read_json(st.join(base, "state.json")) == {"a": 1} and st.is_file(st.join(base, "state.json"))
    local = tmp_path / "folder"
    (local / "sub").mkdir(parents=True)
    (local / "x.txt").write_text("x")
    (local / "sub" / "y.bin").write_bytes(b"\0y")
    st.publish(local, st.join(base, "out"))
    assert st.list_files(st.join(base, "out"), recursive=True) == [st.join(base, "out", "sub/y.bin"),
                                                                   st.join(base, "out", "x.txt")]
    copy = st.local_copy(st.join(base, "out"))
    assert (copy / "x.txt").read_text() == "x" and (copy / "sub" / "y.bin").read_bytes() == b"\0y"
    st.delete(st.join(base, "out"))
    assert not st.exists(st.join(base, "out"))


def test_local_roundtrip(tmp_path):
    _roundtrip(str(tmp_path / "store"), tmp_path)


def test_s3_roundtrip_and_cache(s3_server, tmp_path, monkeypatch):
    monkeypatch.setenv(st.CACHE_ENV, str(tmp_path / "cache"))
    base = s3_server("storage-test")
    _roundtrip(base, tmp_path)
    # a remote file is fetched with its model card, once, and again only when it changed
    st.write_bytes(st.join(base, "export/backbone.pt"), b"weights-1")
    st.write_json(st.join(base, "export/model_card.json"), {"arch": "resnet18"})
    first = st.local_copy(st.join(base, "export/backbone.pt"), siblings=("model_card.json", "absent.json"))
    assert first.read_bytes() == b"weights-1" and json.loads((first.parent / "model_card.json").read_text())
    assert st.local_copy(st.join(base, "export/backbone.pt"), siblings=("model_card.json",)) == first
    st.write_bytes(st.join(base, "export/backbone.pt"), b"weights-22")
    assert st.local_copy(st.join(base, "export/backbone.pt")).read_bytes() == b"weights-22"
    with pytest.raises(FileNotFoundError, match="not found"):
        st.local_copy(st.join(base, "nothing-here"))


def test_unregistered_checkpoints_are_set_aside_on_object_storage(s3_server):
    """The truncated-checkpoint guard also covers remote run folders (no folder rename on S3)."""
    from fra.train.ray_trainer import SNAPSHOT_FILE, UNREGISTERED_DIR, set_aside_unregistered_checkpoints

    run = s3_server("guard/run")
    for name in ("checkpoint_a", "checkpoint_b"):
        st.write_bytes(st.join(run, name, "checkpoint.pt"), name.encode())
    st.write_json(st.join(run, SNAPSHOT_FILE), {"checkpoint_results": [{"checkpoint_dir_name": "checkpoint_a"}],
                                               "latest_checkpoint_result": {"checkpoint_dir_name": "checkpoint_a"}})
    assert set_aside_unregistered_checkpoints(run) == [st.join(run, UNREGISTERED_DIR, "checkpoint_b")]
    assert st.read_bytes(st.join(run, UNREGISTERED_DIR, "checkpoint_b", "checkpoint.pt")) == b"checkpoint_b"
    assert not st.exists(st.join(run, "checkpoint_b")) and st.is_file(st.join(run, "checkpoint_a", "checkpoint.pt"))


def test_pipeline_storage_may_be_a_uri(s3_server):
    from fra.pipeline import PipelineState, load_pipeline, stage_config

    root = Path(__file__).resolve().parents[1]
    cfg = load_pipeline(root / "pipelines" / "demo.yaml", [f"storage_path={s3_server('pipelines/demo')}"])
    assert cfg.storage_path == s3_server("pipelines/demo")
    assert stage_config(cfg, "pretrain").run.storage_path == s3_server("pipelines/demo/pretrain")
    assert cfg.shards[0].out == s3_server("pipelines/demo/shards/fer_faces")
    state = PipelineState(st.join(cfg.storage_path, "pipeline_state.json"))
    state.record("shards", "abc", {"out": 1}, 1.0)
    assert PipelineState(state.path).done("shards", "abc") == {"out": 1}


def test_tracking_uri_comes_from_the_environment(monkeypatch, tmp_path):
    from fra.tracking import resolve_tracking_uri

    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://10.0.0.5:5000")
    assert resolve_tracking_uri("", tmp_path) == "http://10.0.0.5:5000"
    assert resolve_tracking_uri("http://explicit:1", tmp_path) == "http://explicit:1"
    monkeypatch.delenv("MLFLOW_TRACKING_URI")
    assert resolve_tracking_uri("", tmp_path) == f"sqlite:///{tmp_path.resolve()}/mlflow.db"


def test_node_local_tracking_and_storage_refused_on_a_multinode_cluster(monkeypatch):
    from fra import ray_runtime

    monkeypatch.setattr(ray_runtime, "is_multinode", lambda: True)
    for uri in ("sqlite:////tmp/x/mlflow.db", "file:///tmp/mlruns", "runs/mlruns"):
        with pytest.raises(ConfigError, match="MLFLOW_TRACKING_URI"):
            ray_runtime.check_tracking_uri(uri)
    ray_runtime.check_tracking_uri("http://head:5000")
    with pytest.raises(ConfigError, match="s3://"):
        ray_runtime.check_shared_location("storage_path", "/home/me/runs")
    ray_runtime.check_shared_location("storage_path", "s3://b/runs")
    monkeypatch.setenv("FRA_SHARED_FILESYSTEM", "1")  # every node mounts it (NFS, one machine)
    ray_runtime.check_shared_location("storage_path", "/mnt/efs/runs")
    monkeypatch.delenv("FRA_SHARED_FILESYSTEM")
    monkeypatch.setattr(ray_runtime, "is_multinode", lambda: False)
    ray_runtime.check_tracking_uri("sqlite:////tmp/x/mlflow.db")  # one node: a local file is fine


def test_cluster_address_joins_without_resource_arguments(monkeypatch):
    from fra.ray_runtime import cluster_address

    monkeypatch.setenv("RAY_ADDRESS", "10.1.2.3:6553")  # set by `ray job submit` for the driver (parsed, not contacted)
    assert cluster_address("") == "10.1.2.3:6553"
    assert cluster_address("local") is None


def test_code_origin_refuses_two_copies(monkeypatch, tmp_path):
    from fra.ray_runtime import check_worker_code, code_origin

    mine = code_origin()
    assert mine["path"] == str(Path(__file__).resolve().parents[1] / "fra") and len(mine["fingerprint"]) == 16
    assert check_worker_code(mine, "test") == mine
    with pytest.raises(FraError, match="driver runs"):
        check_worker_code({"path": "/elsewhere/fra", "fingerprint": "0" * 16}, "test worker")
    # the same files on the same node, edited after the driver started: logged, not refused
    import ray

    monkeypatch.setattr(ray, "is_initialized", lambda: True)
    monkeypatch.setattr(ray, "get_runtime_context", lambda: types.SimpleNamespace(get_node_id=lambda: "node-a"))
    edited = {"path": mine["path"], "fingerprint": "0" * 16, "node": "node-a"}
    assert check_worker_code(edited, "test worker")["fingerprint"] == mine["fingerprint"]
    with pytest.raises(FraError, match="another version"):  # same path on another node: an out-of-date copy
        check_worker_code({**edited, "node": "node-b"}, "test worker")
    monkeypatch.undo()
    stray = types.ModuleType("fra.stray_copy")
    stray.__file__ = str(tmp_path / "site-packages" / "fra" / "stray_copy.py")
    monkeypatch.setitem(sys.modules, "fra.stray_copy", stray)
    with pytest.raises(FraError, match="two copies of fra"):
        code_origin()


def test_cluster_capacity_counts_what_the_autoscaler_may_add(monkeypatch):
    """An autoscaling cluster with min_workers: 0 starts with no GPU; a sweep must not be refused."""
    import ray
    from ray._private.state import state as ray_state

    from fra.ray_runtime import cluster_capacity

    monkeypatch.setattr(ray, "cluster_resources", lambda: {"CPU": 8.0, "memory": 1e9})
    monkeypatch.setattr(ray_state, "get_max_resources_from_cluster_config", lambda: {"CPU": 32.0, "GPU": 4.0})
    assert cluster_capacity() == {"CPU": 32.0, "GPU": 4.0, "memory": 1e9}
    monkeypatch.setattr(ray_state, "get_max_resources_from_cluster_config", lambda: None)
    assert cluster_capacity() == {"CPU": 8.0, "memory": 1e9}
