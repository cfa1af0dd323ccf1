"""An end-to-end sweep on synthetic faces under the session's local Ray (4 logical CPUs on 2 cores).

The sweep is the one the suite shares (tests/shared_runs.py, its docstring has the steps): the sweep stage
of ``pipelines/sweep_then_promote.yaml``, each trial pretraining a tiny ResNet-18 (48 px, 48 images,
2 epochs) chained into a 1-epoch linear FER probe on 32 px synthetic FER shards, one trial at a time:

* ASHA, constructed case: a grid over ``loss_w_cluster`` = [8, 0.05, 16] with ASHA on the total
  loss (grace period 1 epoch). The third trial's loss at epoch 1 is far above the second's, so it
  is stopped before its evaluation, deterministically.
* kill and resume: ``fra tune`` runs in a subprocess attached to the same Ray cluster; once the
  first trial has finished and the second has checkpointed its first epoch, it gets SIGINT. The
  sweep is resumed in the test process: the finished trial is not started again
  (``trials/<id>/starts.json``) and the interrupted trial continues its pretraining from its
  checkpoint (no epoch is reported twice); ``fra run``'s sweep stage then resumes the finished sweep
  and starts no trial.
* outputs: the table (CSV), the plot, the best config and the best pipeline (`fra run` loads it;
  both reproduce the best trial's settings), the exported backbone, and the MLflow parent run with
  one nested run per trial.
"""
from __future__ import annotations

import csv
from pathlib import Path

import pytest

from tests.shared_runs import epochs, starts, wait

pytestmark = [pytest.mark.ray, pytest.mark.slow]


def _live_placement_groups(ray) -> list[str]:
    return [pid for pid, pg in ray.util.placement_group_table().items() if pg["state"] != "REMOVED"]


def test_sweep_asha_kill_and_resume_end_to_end(ray_local, sweep_run):
    from fra.config import PretrainConfig, load_config

    exp, second, done_before, result = sweep_run.experiment, sweep_run.second, sweep_run.done_before, sweep_run.result
    assert done_before and second not in done_before, (done_before, second)

    started = starts(exp)  # after the resume and after `fra run` resumed the finished sweep
    for tid in done_before:
        assert started.count(tid) == 1, f"completed trial {tid} was started again: {started}"
    assert started.count(second) == 2 and len(started) == 4, started
    assert epochs(exp, second) == [1, 2], "the interrupted trial restarted its pretraining instead of resuming"

    rows = {r["loss_w_cluster"]: r for r in result.rows}
    assert [rows[w]["status"] for w in (8.0, 0.05, 16.0)] == ["completed", "completed", "stopped_early"]
    assert rows[16.0]["epochs"] == 1 and rows[16.0]["objective"] is None
    assert not (exp / "trials" / rows[16.0]["trial_id"] / "result.json").exists()
    assert all(rows[w]["epochs"] == 2 and rows[w]["proxy_top1"] is not None for w in (8.0, 0.05))
    # The stopped trial's Train run released its workers' CPUs (Ray Train's cleaner, via the State API):
    # a placement group left behind would starve every later trial.
    wait(lambda: not _live_placement_groups(ray_local), None, 120, "the stopped trial's placement group to go")

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
    assert cfg.run.name == "sweep_then_promote-sweep-best" and cfg.tracking.enabled
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

    client = MlflowClient(tracking_uri=f"sqlite:///{sweep_run.storage}/mlflow.db")
    exp_id = client.get_experiment_by_name("fra-tune").experiment_id
    parent = client.get_run(result.mlflow_run_id)
    assert parent.info.status == "FINISHED" and parent.data.tags["fra.best_trial"] == best["trial_id"]
    children = client.search_runs([exp_id], f"tags.`mlflow.parentRunId` = '{result.mlflow_run_id}'")
    assert sorted(c.data.tags["fra.trial_id"] for c in children) == sorted(r["trial_id"] for r in result.rows)
    done = [c for c in children if c.data.tags.get("fra.status") == "completed"]
    assert len(done) == 2 and all("objective" in c.data.metrics for c in done)
