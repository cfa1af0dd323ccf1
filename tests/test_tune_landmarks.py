"""A Tune sweep whose chained objective is a landmark evaluation (issue 14 §6): validation NME, lower is better.

Non-Ray tests: config checks before anything runs, the direction (best = lowest NME) in the best-trial
choice, the table, the plot, the best pipeline and the MLflow tags, the objective read from a landmark
run's validation carve. One Ray test: a 2-trial sweep through Ray Tune on synthetic faces.
"""
from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import pytest
import yaml

from fra.errors import ConfigError
from fra.tuning.config import load_sweep_config, objective_mode, resolve

ROOT = Path(__file__).resolve().parents[1]
LANDMARK_SWEEP = ROOT / "tune_configs" / "landmarks_sweep.yaml"


def _landmark_sweep(tmp_path, *sets):
    return load_sweep_config(LANDMARK_SWEEP, [f"run.storage_path={tmp_path}", *sets])


def test_landmark_objective_resolves_with_its_direction(tmp_path):
    cfg = _landmark_sweep(tmp_path)
    res = resolve(cfg)
    assert cfg.objective.task == "landmarks" and cfg.objective.metric == "val_nme"
    assert objective_mode(cfg.objective) == "min"  # NME: an error, lower is better
    assert res.landmarks.model.loss == "star" and res.evaluation("landmarks") is res.landmarks
    assert objective_mode(load_sweep_config(None, [f"run.storage_path={tmp_path}"]).objective) == "max"  # FER
    assert resolve(_landmark_sweep(tmp_path, "objective.metric=val_nme_best")).landmarks is not None


@pytest.mark.parametrize("sets, match", [
    (["objective.metric=val_top1"], "objective.metric=val_top1 is a fer metric, but objective.task=landmarks: "
                                    "use one of val_nme | val_nme_best"),
    (["objective.task=fer", "synthetic_fer.enabled=true"], "val_nme is a landmarks metric"),
    (["synthetic_landmarks.enabled=false"], "landmarks.data.shards is empty"),
    (["objective.val_fraction=0"], "landmark objective needs a validation split"),
    (["landmarks.data.val_fraction=0.3"], "not both"),
    (["objective.proxy=linear_probe", "scheduler.metric=proxy_top1", "scheduler.mode=max"],
     "fer.data.shards is empty.*objective.proxy=none"),
    (["objective.task=pose"], "objective.task"),
    (["landmarks.model.loss=wing"], "landmarks.model.loss"),
    (["landmarks.optim.epochs=0"], "landmarks.optim.epochs"),
])
def test_landmark_sweep_errors_before_anything_runs(tmp_path, sets, match):
    with pytest.raises(ConfigError, match=match):
        resolve(_landmark_sweep(tmp_path, *sets))


def test_validation_carve_of_the_landmark_job_is_the_selection_split(tmp_path):
    """The trial's landmark run carves objective.val_fraction from its train split, unless the landmark
    config carves its own; it never saves a model file and always runs on Ray Train workers."""
    from fra.tuning.trial import TrialSetup, trial_landmark_config

    cfg = _landmark_sweep(tmp_path)
    res = resolve(cfg)
    setup = TrialSetup(base=res.base, fer=res.fer, objective=cfg.objective, sweep_dir=str(tmp_path),
                       landmarks=res.landmarks)
    lm = trial_landmark_config(setup)
    assert lm.data.val_fraction == 0.2 and not lm.run.save_model and not lm.tracking.enabled
    assert lm.scaling.num_workers == 1 and lm.run.storage_path == str(tmp_path / "landmark_runs")
    own = _landmark_sweep(tmp_path, "objective.val_fraction=0", "landmarks.data.val_fraction=0.3",
                          "landmarks.scaling.num_workers=0")
    res = resolve(own)
    lm = trial_landmark_config(TrialSetup(base=res.base, fer=res.fer, objective=own.objective,
                                          sweep_dir=str(tmp_path), landmarks=res.landmarks))
    assert lm.data.val_fraction == 0.3 and lm.scaling.num_workers == 1


def _result(history):
    from fra.evaluation.landmark_metrics import summarise_landmarks
    from fra.evaluation.landmarks_report import LandmarkResult

    s = summarise_landmarks(history, last_k=2)
    last = s["last"]["full"]
    return LandmarkResult(nme_last=s["nme_last"], nme_mean_last_k=s["nme_mean_last_k"], fr_last=last["fr"],
                          auc_last=last["auc"], nme_best=s["nme_best"], best_epoch=s["best_epoch"], subsets=s["last"],
                          results_path="r.json", run_dir=".", summary=s, history=history)


def _epoch(epoch, test, val=None):
    rep = lambda nme: {"full": {"nme": nme, "fr": 10.0, "auc": 0.5, "count": 4}}  # noqa: E731
    return {"epoch": epoch, "test": rep(test), **({"val": rep(val)} if val is not None else {})}


def test_objective_is_the_validation_nme_never_the_test_nme():
    from fra.errors import FraError
    from fra.tuning.trial import landmark_metrics

    # val NME 9.0 then 7.5 then 8.0; test NME lower and picked otherwise, so a test leak would show
    result = _result([_epoch(1, 5.0, 9.0), _epoch(2, 4.0, 7.5), _epoch(3, 3.0, 8.0)])
    out = landmark_metrics(result, "val_nme")
    assert out["objective"] == out["val_nme"] == 8.0  # the last epoch's validation NME
    assert out["val_nme_best"] == 7.5 and out["test_nme_last"] == 3.0 and out["test_nme_mean_last_k"] == 3.5
    assert landmark_metrics(result, "val_nme_best")["objective"] == 7.5
    with pytest.raises(FraError, match="no validation NME"):
        landmark_metrics(_result([_epoch(1, 5.0)]), "val_nme")


ROWS = [
    {"trial_id": "a", "status": "completed", "num_proto": 2, "objective": 12.5, "val_nme": 12.5, "test_nme_last": 11.0},
    {"trial_id": "b", "status": "completed", "num_proto": 4, "objective": 9.25, "val_nme": 9.25, "test_nme_last": 13.0},
    {"trial_id": "c", "status": "stopped_early", "num_proto": 8, "objective": None, "proxy_top1": 50.0},
    {"trial_id": "d", "status": "completed", "num_proto": 8, "objective": 9.25, "val_nme": 9.25, "test_nme_last": 8.0},
    {"trial_id": "e", "status": "failed", "num_proto": 2, "objective": 1.0},  # never a candidate
]


def test_best_trial_with_min_is_the_lowest_completed_objective(tmp_path):
    from fra.tuning import report

    assert report.best_row(ROWS, "min")["trial_id"] == "b"  # lowest NME; tie with d: the earlier trial
    assert report.best_row(ROWS, "max")["trial_id"] == "a"  # the FER direction on the same numbers
    assert report.best_row(ROWS)["trial_id"] == "a"  # default: FER's max
    assert report.best_row([ROWS[2]], "min") is None
    with pytest.raises(ValueError, match="'max' or 'min'"):
        report.best_row(ROWS, "lowest")


def test_table_and_plot_follow_the_landmark_objective(tmp_path):
    from fra.tuning import report
    from fra.tuning.space import parse_space

    params = parse_space({"num_proto": {"choice": [2, 4, 8]}})
    table = report.write_table(ROWS, params, tmp_path / "results.csv", "landmarks")
    got = list(csv.DictReader(Path(table).open()))
    assert {"val_nme", "val_nme_best", "test_nme_last", "test_fr_last"} <= set(got[0])
    assert "val_top1" not in got[0] and got[1]["val_nme"] == "9.25"
    assert "val_nme" in report.format_table(ROWS, params, "landmarks").splitlines()[0]
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    captured = {}
    close = plt.close
    plt.close = lambda fig=None: captured.setdefault("fig", fig) and close(fig)  # keep the labels to read
    try:
        png = report.plot_objective(ROWS, params, tmp_path / "objective.png", _landmark_sweep(tmp_path).objective)
    finally:
        plt.close = close
    assert Path(png).read_bytes()[:4] == b"\x89PNG"
    fig = captured["fig"]
    ax = fig.axes[0]
    assert ax.get_ylabel() == "objective (landmark val NME, %; lower is better)"
    assert "star: best (lowest)" in fig._suptitle.get_text()
    star = [c for c in ax.collections if c.get_offsets().shape[0] == 1 and c.get_sizes()[0] == 180]
    assert [tuple(star[0].get_offsets()[0])] == [(4.0, 9.25)]  # the best marker sits on trial b
    # the stopped trial's proxy (an accuracy) is not drawn on the NME axis
    assert all(50.0 not in c.get_offsets()[:, 1] for c in ax.collections)
    plt.close(fig)


def test_best_pipeline_of_a_landmark_sweep_evaluates_landmarks_and_promotes_on_lowest_nme(tmp_path, capsys):
    from fra.cli.main import main
    from fra.config import dump_yaml, load_config, to_dict
    from fra.evaluation.landmarks import LandmarkConfig
    from fra.pipeline import load_pipeline, stage_config
    from fra.tuning import report
    from fra.tuning.space import set_paths
    from fra.tuning.trial import TrialSetup, trial_pretrain_config

    cfg = _landmark_sweep(tmp_path)
    res = resolve(cfg)
    exp, tid = tmp_path / cfg.run.name, "fra_trial_00001"
    params = {"model.num_proto": 4, "model.teacher_temp": 0.05, "model.loss_weight": 0.5,
              "model.loss_w_cluster": 0.1}
    setup = TrialSetup(base=res.base, fer=res.fer, objective=cfg.objective, sweep_dir=str(exp),
                       landmarks=res.landmarks)
    dump_yaml(trial_pretrain_config(setup, params, tid), exp / "trials" / tid / "pretrain.yaml")
    (exp / "trials" / tid / "result.json").write_text(json.dumps(
        {"trial_id": tid, "params": params, "report": {"objective": 9.25},
         "landmarks": {"results": "x/results.json", "run_dir": "x"}}))
    lm = set_paths(to_dict(res.landmarks), {"data.shards": str(tmp_path / "lm_shards")})
    files = report.write_best({"trial_id": tid, "objective": 9.25, "test_nme_last": 8.5}, exp, cfg, lm, "")
    text = Path(files["pipeline"]).read_text()
    assert "val_nme = 9.25 (lowest; landmark validation carve; test NME last = 8.5)" in text
    best = load_pipeline(files["pipeline"])
    assert best.stages == ["pretrain", "landmarks", "register", "promote"]
    assert (best.promote.gate_metric, best.promote.mode) == ("landmarks_nme_mean_last_k", "min")
    ev = stage_config(best, "landmarks")
    assert isinstance(ev, LandmarkConfig) and ev.backbone.source == "auto" and ev.tracking.enabled
    assert (ev.data.shards, ev.data.val_fraction) == (str(tmp_path / "lm_shards"), 0.2)
    assert ev.model == res.landmarks.model and ev.optim == res.landmarks.optim
    assert json.loads(Path(files["json"]).read_text())["landmarks"]["run_dir"] == "x"
    assert main(["run", str(files["pipeline"]), "--dry-run"]) == 0
    assert "is valid" in capsys.readouterr().out


def test_pipeline_landmarks_section_feeds_only_a_landmark_sweep(tmp_path):
    from fra.pipeline import load_pipeline, stage_config

    pipeline = {
        "name": "p", "storage_path": str(tmp_path), "stages": ["pretrain", "sweep", "landmarks"],
        "pretrain": {"model": {"backbone": "resnet18"}, "optim": {"epochs": 2, "warmup_epochs": 0},
                     "data": {"source": "synthetic"}},
        "landmarks": {"data": {"shards": "lm/shards", "image_size": 64}, "backbone": {"source": "auto"}},
        "sweep": {"space": {"num_proto": {"choice": [2, 4]}}, "num_samples": 2,
                  "objective": {"task": "landmarks", "metric": "val_nme", "proxy": "none"},
                  "scheduler": {"name": "none"}}}
    (tmp_path / "p.yaml").write_text(yaml.safe_dump(pipeline))
    sweep = stage_config(load_pipeline(tmp_path / "p.yaml"), "sweep")
    res = resolve(sweep)
    assert res.landmarks.data.shards == "lm/shards" and objective_mode(sweep.objective) == "min"
    assert resolve(load_sweep_config(tmp_path / "p.yaml")).landmarks.data.shards == "lm/shards"
    # a FER sweep does not take the landmarks section (its resume identity must not depend on it)
    pipeline["sweep"]["objective"] = {"task": "fer"}
    pipeline["evaluate"] = {"data": {"shards": "fer/shards"}}
    (tmp_path / "p.yaml").write_text(yaml.safe_dump(pipeline))
    assert stage_config(load_pipeline(tmp_path / "p.yaml"), "sweep").landmarks == {}
    with_task = load_sweep_config(tmp_path / "p.yaml", ["objective.task=landmarks", "objective.metric=val_nme",
                                                        "objective.proxy=none", "scheduler.name=none"])
    assert resolve(with_task).landmarks.data.shards == "lm/shards"  # --set objective.task takes it


def test_mlflow_sweep_run_records_the_direction(tmp_path):
    from fra.tuning.mlflow_runs import sweep_tags

    assert sweep_tags(_landmark_sweep(tmp_path)) == {
        "fra.kind": "tune-sweep", "fra.objective_task": "landmarks", "fra.objective_metric": "val_nme",
        "fra.objective_mode": "min"}
    assert sweep_tags(load_sweep_config(None, [f"run.storage_path={tmp_path}"]))["fra.objective_mode"] == "max"


def test_a_sweep_started_before_the_objective_task_existed_still_resumes(tmp_path):
    from fra.config import to_record
    from fra.tuning.sweep import check_snapshot

    cfg = load_sweep_config(None, [f"run.storage_path={tmp_path}"])
    old = to_record(cfg)
    del old["objective"]["task"], old["landmarks"], old["synthetic_landmarks"]  # what older fra wrote
    exp = tmp_path / cfg.run.name
    exp.mkdir()
    (exp / "sweep.yaml").write_text(yaml.safe_dump(old))
    check_snapshot(cfg, exp, resume=True)
    with pytest.raises(ConfigError, match="landmarks, .*objective.* changed"):
        check_snapshot(_landmark_sweep(tmp_path, f"run.name={cfg.run.name}"), exp, resume=True)


@pytest.mark.ray
@pytest.mark.slow
def test_landmark_objective_sweep_through_ray_tune(ray_local, tmp_path):
    """Two trials (a grid over loss_w_cluster) at once, each a 1-epoch pretraining of a tiny ResNet-18 at 32 px
    chained into a 1-epoch landmark evaluation on synthetic 68-point faces at 32 px (half-CPU workers, so
    that both fit the session's 4 logical CPUs: the trials mostly wait on Ray's start-ups). Each trial's
    objective is the validation NME its landmark run recorded in its own results.json, and the sweep's
    best trial, best pipeline's backbone and MLflow run are those of the lowest."""
    from mlflow.tracking import MlflowClient

    from fra.tuning.sweep import run_sweep
    from tests.conftest import seed_mlflow_db

    uri = seed_mlflow_db(tmp_path / "mlflow.db")  # trials log from other processes: no migration there
    cfg = _landmark_sweep(
        tmp_path, "run.name=lm", f"tracking.mlflow_uri={uri}", "space={loss_w_cluster: {grid: [8.0, 0.05]}}",
        "num_samples=1", "scheduler.name=none", "pretrain.optim.epochs=1", "pretrain.optim.warmup_epochs=0",
        "pretrain.optim.batch_size=8", "pretrain.data.image_size=32",
        "pretrain.data.synthetic={num_identities: 4, images_per_identity: 4, size: 32, seed: 0}",
        "landmarks.data.image_size=32", "landmarks.optim.epochs=1", "landmarks.optim.batch_size=8",
        "landmarks.model.deconv_channels=16", "landmarks.run.examples=0", "objective.val_fraction=0.25",
        "synthetic_landmarks={enabled: true, num_identities: 5, images_per_identity: 4, size: 32, seed: 2}",
        "max_concurrent_trials=2", "resources={cpus: 0.25, workers: 1, cpus_per_worker: 0.5, data_cpus: 0.5}",
        "landmarks.scaling.cpus_per_worker=0.5", "landmarks.data.num_cpus=0.5")
    result = run_sweep(cfg, resume=False)

    exp = tmp_path / "lm"
    assert len(result.rows) == 2 and all(r["status"] == "completed" for r in result.rows)
    for row in result.rows:
        run = json.loads((exp / "landmark_runs" / f"landmarks_{row['trial_id']}" / "results.json").read_text())
        recorded = run["history"][-1]["val"]["full"]["nme"]  # the landmark job's own record of its val carve
        assert run["dataset"]["rows"]["val"] > 0 and run["history"][-1]["val"]["full"]["count"] > 0
        assert row["objective"] == row["val_nme"] == pytest.approx(recorded) and math.isfinite(recorded)
        assert row["test_nme_last"] == pytest.approx(run["headline"]["nme_last"])
    lowest = min(result.rows, key=lambda r: r["objective"])
    assert result.objective_mode == "min" and result.best_trial_id == lowest["trial_id"]
    assert result.best_objective == lowest["objective"] < max(r["objective"] for r in result.rows)
    done = json.loads((exp / "trials" / lowest["trial_id"] / "result.json").read_text())
    assert result.best_export_dir == done["pretrain"]["export_dir"] and Path(result.best_backbone).is_file()
    table = list(csv.DictReader(Path(result.table_path).open()))
    assert {"val_nme", "test_nme_last"} <= set(table[0])
    parent = MlflowClient(tracking_uri=uri).get_run(result.mlflow_run_id)
    assert parent.data.tags["fra.objective_mode"] == "min" and parent.data.tags["fra.best_trial"] == lowest["trial_id"]
    assert parent.data.metrics["best_objective"] == pytest.approx(lowest["objective"])
