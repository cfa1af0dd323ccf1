"""The product's main path, cluster-shaped: `ray job submit --working-dir .` onto a real multi-node
Ray cluster, every storage location on S3, a real MLflow server with its artifacts on S3.

The cluster (tests/cluster.py) is the shape of cluster.yaml: a head started with
``ray start --head --num-cpus=0`` (drivers only) and a worker node started with
``ray start --address=...`` as a separate raylet, in its own mount namespace with a private
``/tmp`` where the machine allows; token authentication on, as cluster.yaml sets it. S3 is a
local moto server reached through the standard ``AWS_*`` variables; MLflow a real ``mlflow
server`` with ``--artifacts-destination s3://...``, exported as ``MLFLOW_TRACKING_URI`` like
``~/fra.env`` does on the cluster. Pipelines are submitted exactly as docs/cloud.md shows.

The tests run in order and share the cluster: the demo pipeline, its re-submission from a changed
working directory, a RAF-DB fine-tune of the demo's pretrained backbone on an official-layout
tree uploaded to S3, and a small sweep_then_promote.
"""
from __future__ import annotations

import json
import re
import shlex
import time

import pytest

from fra import storage as st
from tests.cluster import RayCluster, job_workdir, private_tmp_supported
from tests.conftest import S3_ENV, init_local_ray, shutdown_ray

pytestmark = [pytest.mark.cluster, pytest.mark.slow]


@pytest.fixture(scope="module")
def cluster(s3_server, tmp_path_factory):
    """(cluster, s3 uri helper, MLflow URL, job working dir); the suite's local Ray is paused meanwhile."""
    import ray

    from fra.mlflow_server import MlflowServer

    had_local = ray.is_initialized()
    if had_local:  # never two Ray runtimes at once (the State API refuses a machine with two)
        shutdown_ray()
    root = tmp_path_factory.mktemp("cluster")
    server = MlflowServer(f"sqlite:///{root}/mlflow.db", s3_server("cluster/mlflow-artifacts"),
                          log_path=root / "mlflow.log").start()
    # What ~/fra.env gives every node of cluster.yaml: S3 through the standard variables (an
    # instance profile on AWS), the storage root, and the head's MLflow server.
    fra_env = {"FRA_STORAGE_PATH": s3_server("cluster"), "MLFLOW_TRACKING_URI": server.url}
    rc = RayCluster(root, S3_ENV, fra_env, private_tmp=private_tmp_supported())
    try:
        rc.start()
        yield rc, s3_server, server.url, job_workdir(root / "checkout")
    finally:
        rc.stop()
        server.stop()
        assert rc.processes() == [], "cluster processes left behind"
        if had_local:
            init_local_ray()


def _submit(rc, workdir, pipeline: str, name: str, *sets: str, timeout_s: float = 900.0) -> str:
    """docs/cloud.md §3: ``-- bash -lc 'fra run pipelines/<x>.yaml --set storage_path=$FRA_STORAGE_PATH/<x>'``
    (the variable expands on the head, where the job's driver runs)."""
    args = [f"pipelines/{pipeline}", "--set", f"storage_path=$FRA_STORAGE_PATH/{name}",
            *(f"--set {shlex.quote(s)}" for s in sets)]
    t0 = time.time()
    code, out = rc.submit(workdir, ["bash", "-lc", " ".join(["fra", "run", *args])], timeout_s=timeout_s)
    print(f"job {pipeline}: {time.time() - t0:.0f} s, exit {code}")
    assert code == 0, f"job failed ({code}):\n{out[-6000:]}\n{rc.logs()}"
    return out


def _client(url):
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=url)


def _state(uri):
    return st.read_json(st.join(uri, "pipeline_state.json"))


def test_demo_pipeline_runs_on_the_cluster(cluster):
    rc, s3, mlflow_url, workdir = cluster
    storage = s3("cluster/demo")
    _submit(rc, workdir, "demo.yaml", "demo")

    state = _state(storage)
    assert sorted(state["stages"]) == ["evaluate", "pretrain", "promote", "register", "shards"]
    assert all(s["status"] == "done" for s in state["stages"].values())
    # the driver ran the shipped copy of fra (the job's working directory), and so did every
    # Train worker (they refuse to start with other code: fra.ray_runtime.check_worker_code)
    assert "_ray_pkg_" in state["code"]["path"]
    pre = state["stages"]["pretrain"]["outputs"]
    run_dir = st.join(storage, "pretrain", "demo-pretrain")
    assert pre["export_dir"] == st.join(run_dir, "export") and pre["backbone"].startswith("s3://")
    files = st.list_files(run_dir, recursive=True)
    assert any(re.search(r"/checkpoint_[^/]+/checkpoint\.pt$", f) for f in files), files
    for name in ("export/backbone.pt", "export/model_card.json", "final/checkpoint.pt"):
        assert st.join(run_dir, name) in files
    ev = state["stages"]["evaluate"]["outputs"]
    assert ev["backbone"] == pre["export_dir"]  # the S3 hand-over from pretrain to evaluate
    assert ev["results_path"].startswith(storage + "/fer/") and st.read_json(ev["results_path"])["headline"]

    client = _client(mlflow_url)
    champion = client.get_model_version_by_alias("fra-demo", "champion")
    assert int(champion.version) == state["stages"]["register"]["outputs"]["version"] == 1
    # rank 0 ran on the worker node (the head has no CPU); its metrics reached the server
    history = client.get_metric_history(pre["mlflow_run_id"], "loss")
    assert len(history) >= 2 and all(m.value == m.value for m in history)
    # MLflow's artifacts (the registered backbone among them) went to S3 through the server
    assert any(f.endswith("backbone.pt") for f in st.list_files(s3("cluster/mlflow-artifacts"), recursive=True))


def test_resubmitting_from_a_changed_working_directory_skips_everything(cluster):
    rc, s3, mlflow_url, workdir = cluster
    storage = s3("cluster/demo")
    before = _state(storage)
    (workdir / "CHANGED.txt").write_text("a user edited their checkout\n")  # a new package hash
    out = _submit(rc, workdir, "demo.yaml", "demo")
    for stage in ("shards", "pretrain", "evaluate", "register", "promote"):
        assert f"[{stage}] already done, skipping" in out
    after = _state(storage)
    assert after["stages"] == before["stages"]
    assert after["code"]["path"] != before["code"]["path"]  # it really was a new working directory
    versions = _client(mlflow_url).search_model_versions("name='fra-demo'")
    assert [int(v.version) for v in versions] == [1]  # registered nothing twice


def test_rafdb_finetune_from_an_official_layout_on_s3(cluster, tmp_path):
    from tests.data_layouts import build_rafdb

    rc, s3, mlflow_url, workdir = cluster
    expected = build_rafdb(tmp_path / "raf", n_train=28, n_test=14)
    st.publish(tmp_path / "raf", s3("cluster/raw/rafdb"))
    storage = s3("cluster/fer_rafdb")
    export = st.join(s3("cluster/demo"), "pretrain", "demo-pretrain", "export")
    _submit(rc, workdir, "fer_rafdb.yaml", "fer_rafdb", f"vars.rafdb_root={s3('cluster/raw/rafdb')}",
            "register.name=fra-rafdb-cluster", f"evaluate.backbone.source={export}",
            "evaluate.backbone.arch=resnet18", "evaluate.data.image_size=48", "evaluate.optim.epochs=2",
            "evaluate.optim.warmup_epochs=0", "evaluate.optim.batch_size=8", "evaluate.run.last_k=1",
            "evaluate.run.eval_every=1", "evaluate.run.checkpoint_every=0", "evaluate.scaling.num_workers=1",
            "evaluate.scaling.use_gpu=false", "evaluate.scaling.amp=off", "evaluate.scaling.sync_bn=false")
    state = _state(storage)
    shards = next(iter(state["stages"]["shards"]["outputs"].values()))
    assert shards["counts"]["train"]["total"] == len(expected.good["train"])
    manifest = st.read_json(st.join(storage, "shards", "rafdb", "manifest.json"))
    assert {s["path"]: s["reason"] for s in manifest["skipped"]} == expected.skipped
    results = st.read_json(state["stages"]["evaluate"]["outputs"]["results_path"])
    assert results["dataset"]["rows"]["test"] == len(expected.good["test"])
    assert results["backbone"]["backbone.source"] == export
    assert int(_client(mlflow_url).get_model_version_by_alias("fra-rafdb-cluster", "champion").version) == 1


def test_sweep_then_promote_on_the_cluster(cluster):
    rc, s3, mlflow_url, workdir = cluster
    storage = s3("cluster/sweep")
    _submit(rc, workdir, "sweep_then_promote.yaml", "sweep", "sweep.num_samples=2", "pretrain.optim.epochs=1",
            "sweep.scheduler.name=none", "evaluate.optim.epochs=1", "evaluate.run.last_k=1", timeout_s=1200)
    state = _state(storage)
    sweep = state["stages"]["sweep"]["outputs"]
    exp = sweep["experiment_dir"]
    assert exp.startswith(storage + "/") and st.is_file(st.join(exp, "results.csv"))
    done = [f for f in st.list_files(st.join(exp, "trials"), recursive=True) if f.endswith("/result.json")]
    assert len(done) == 2  # written by trials on the worker node, read by the driver on the head
    best = st.read_json(st.join(exp, "best.json"))
    assert best["pretrain"]["export_dir"].startswith(storage + "/")
    # the best trial's backbone, on S3, is what the evaluation and the registry received
    assert state["stages"]["evaluate"]["outputs"]["backbone"] == sweep["best_backbone"] == \
        st.join(sweep["best_export_dir"], "backbone.pt")
    assert int(_client(mlflow_url).get_model_version_by_alias("fra-sweep", "champion").version) == 1
    assert json.loads(json.dumps(sweep))  # outputs are plain JSON (no Path objects)
