"""An end-to-end sweep on synthetic faces under the session's local Ray (4 logical CPUs on 2 cores).

Each trial pretrains a tiny ResNet-18 (64 px, 36 images, 2 epochs) and is chained into a 1-epoch
linear FER probe on 32 px synthetic FER shards, one trial at a time (a trial needs 0.5 + 1 + 1
logical CPUs). One sweep covers everything, to stay within the suite's time budget:

* ASHA, constructed case: a grid over ``loss_w_cluster`` = [8, 0.05, 16] with ASHA on the total
  loss (grace period 1 epoch). The third trial's loss at epoch 1 is far above the second's, so it
  is stopped before its evaluation, deterministically.
* kill and resume: the driver runs in a subprocess attached to the same Ray cluster; once the
  first trial has finished and the second has checkpointed its first epoch, it gets SIGINT. The
  sweep is resumed in this process: the finished trial is not started again
  (``trials/<id>/starts.json``) and the interrupted trial continues its pretraining from its
  checkpoint (no epoch is reported twice).
* outputs: the table (CSV), the plot, the best config and the best pipeline (`fra run` loads it;
  both reproduce the best trial's settings), the exported backbone, and the MLflow parent run with
  one nested run per trial.
"""
from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

pytestmark = [pytest.mark.ray, pytest.mark.slow]

TINY = [
    "pretrain.data.synthetic.num_identities=8", "pretrain.data.synthetic.images_per_identity=6",
    "fer.optim.epochs=1", "fer.data.image_size=32", "objective.proxy_max_rows=128",
    "synthetic_fer.num_identities=20", "synthetic_fer.images_per_identity=6", "synthetic_fer.size=32",
]


@pytest.fixture(scope="module")
def storage(tmp_path_factory):
    from tests.conftest import seed_mlflow_db

    root = tmp_path_factory.mktemp("sweeps")
    seed_mlflow_db(root / "mlflow.db")  # the driver and the trials run in other processes: no migration there
    return root


def _write_config(storage: Path, name: str, extra: list[str]) -> Path:
    from fra.config import to_dict
    from fra.tuning.config import load_sweep_config

    cfg = load_sweep_config(None, [*TINY, f"run.name={name}", f"run.storage_path={storage}",
                                   f"tracking.mlflow_uri=sqlite:///{storage}/mlflow.db", *extra])
    path = storage / f"{name}.yaml"
    path.write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))
    return path


def _starts(exp: Path) -> list[str]:
    """Trial ids in order of their trainable's starts (each trial records its own in trials/<id>/starts.json)."""
    entries = []
    for path in exp.glob("trials/*/starts.json"):
        try:
            entries += json.loads(path.read_text())
        except ValueError:  # written atomically, but read while a trial may be replacing it
            continue
    return [e["trial_id"] for e in sorted(entries, key=lambda e: e["time"])]


def _epochs(exp: Path, tid: str) -> list[int]:
    path = exp / "trials" / tid / "epochs.json"
    return [int(r["epoch"]) for r in json.loads(path.read_text())] if path.is_file() else []


def _live_placement_groups(ray) -> list[str]:
    return [pid for pid, pg in ray.util.placement_group_table().items() if pg["state"] != "REMOVED"]


def _wait(cond, proc, timeout_s: float, what: str) -> None:
    t0 = time.time()
    while not cond():
        if proc is not None and proc.poll() is not None:
            raise AssertionError(f"driver exited ({proc.returncode}) before {what}")
        if time.time() - t0 > timeout_s:
            if proc is not None:
                proc.kill()
            raise AssertionError(f"timed out after {timeout_s:.0f} s waiting for {what}")
        time.sleep(1.0)


def test_sweep_asha_kill_and_resume_end_to_end(ray_local, storage):
    from fra.config import PretrainConfig, load_config
    from fra.tuning.config import load_sweep_config
    from fra.tuning.sweep import run_sweep

    path = _write_config(storage, "sweep", [
        "space={loss_w_cluster: {grid: [8.0, 0.05, 16.0]}}", "num_samples=1", "scheduler.metric=loss",
        "scheduler.mode=min", "scheduler.grace_period=1"])
    exp = storage / "sweep"
    address = ray_local.get_runtime_context().gcs_address
    log = (storage / "driver.log").open("w")
    t0 = time.time()
    proc = subprocess.Popen([sys.executable, "-m", "fra.cli.main", "tune", str(path), "--set",
                             f"run.ray_address={address}"], stdout=log, stderr=subprocess.STDOUT,
                            env={**os.environ, "RAY_AUTH_MODE": "disabled"})
    try:
        # the first trial finished (so the second started) and the second checkpointed an epoch
        _wait(lambda: len(set(_starts(exp))) >= 2, proc, 900, "the second trial to start")
        second = _starts(exp)[-1]
        _wait(lambda: len(_epochs(exp, second)) >= 1, proc, 600, "the second trial's first epoch")
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=180) != 0  # interrupted: unfinished trials remain
    finally:
        if proc.poll() is None:
            proc.kill()
        log.close()
    interrupted_at = time.time() - t0
    done_before = {p.parent.name for p in (exp / "trials").glob("*/result.json")}
    assert done_before and second not in done_before, (done_before, second)

    result = run_sweep(load_sweep_config(path), resume=True)
    print(f"driver interrupted after {interrupted_at:.0f} s; resume took {time.time() - t0 - interrupted_at:.0f} s")

    starts = _starts(exp)
    for tid in done_before:
        assert starts.count(tid) == 1, f"completed trial {tid} was started again: {starts}"
    assert starts.count(second) == 2
    assert _epochs(exp, second) == [1, 2], "the interrupted trial restarted its pretraining instead of resuming"

    rows = {r["loss_w_cluster"]: r for r in result.rows}
    assert [rows[w]["status"] for w in (8.0, 0.05, 16.0)] == ["completed", "completed", "stopped_early"]
    assert rows[16.0]["epochs"] == 1 and rows[16.0]["objective"] is None
    assert not (exp / "trials" / rows[16.0]["trial_id"] / "result.json").exists()
    assert all(rows[w]["epochs"] == 2 and rows[w]["proxy_top1"] is not None for w in (8.0, 0.05))
    # The stopped trial's Train run released its workers' CPUs (Ray Train's cleaner, via the State API):
    # a placement group left behind would starve every later trial.
    _wait(lambda: not _live_placement_groups(ray_local), None, 120, "the stopped trial's placement group to go")

    # local storage: the result's paths are plain local paths (strings, as URIs would be)
    table = list(csv.DictReader(Path(result.table_path).open()))
    assert len(table) == 3 and {"loss_w_cluster", "proxy_top1", "objective", "test_top1_last", "seconds"} <= set(table[0])
    assert Path(result.plot_path).read_bytes()[:4] == b"\x89PNG"
    assert Path(result.best_backbone).is_file() and (Path(result.best_export_dir) / "model_card.json").is_file()

    # the best config reproduces the best trial's settings
    best = max((r for r in result.rows if r["status"] == "completed"), key=lambda r: r["objective"])
    assert result.best_trial_id == best["trial_id"] and result.best_objective == best["objective"]
    cfg = load_config(PretrainConfig, result.best_config_path)
    trial_cfg = load_config(PretrainConfig, exp / "trials" / best["trial_id"] / "pretrain.yaml")
    assert cfg.model == trial_cfg.model and cfg.optim == trial_cfg.optim and cfg.data == trial_cfg.data
    assert cfg.model.loss_w_cluster == best["loss_w_cluster"] == result.best_params["model.loss_w_cluster"]
    assert cfg.run.name == "sweep-best" and cfg.tracking.enabled
    # best_pipeline.yaml is a `fra run` pipeline that pretrains with the best trial's settings
    from fra.pipeline import load_pipeline, stage_config

    pipeline = load_pipeline(result.best_pipeline_path)
    assert pipeline.stages == ["pretrain", "evaluate", "register", "promote"]
    pre = stage_config(pipeline, "pretrain")
    assert pre.model == trial_cfg.model and pre.optim == trial_cfg.optim and pre.data == trial_cfg.data
    assert pre.model.loss_w_cluster == result.best_params["model.loss_w_cluster"]
    fer = stage_config(pipeline, "evaluate")
    assert fer.backbone.source == "auto" and fer.protocol == "linear" and fer.data.val_fraction == 0.2

    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{storage}/mlflow.db")
    exp_id = client.get_experiment_by_name("fra-tune").experiment_id
    parent = client.get_run(result.mlflow_run_id)
    assert parent.info.status == "FINISHED" and parent.data.tags["fra.best_trial"] == best["trial_id"]
    children = client.search_runs([exp_id], f"tags.`mlflow.parentRunId` = '{result.mlflow_run_id}'")
    assert sorted(c.data.tags["fra.trial_id"] for c in children) == sorted(r["trial_id"] for r in result.rows)
    done = [c for c in children if c.data.tags.get("fra.status") == "completed"]
    assert len(done) == 2 and all("objective" in c.data.metrics for c in done)
