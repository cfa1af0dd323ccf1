"""Sweep configs and search spaces: parsing, rejection before anything runs, outputs (no Ray runtime)."""
from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pytest
import yaml

from fra.config import PretrainConfig
from fra.errors import ConfigError
from fra.tuning.config import SweepConfig, check_resources, load_sweep_config, resolve
from fra.tuning.space import apply_params, parse_space, resolve_name, to_tune

ROOT = Path(__file__).resolve().parents[1]
ISSUE_SPACE = {"num_proto": {"choice": [4, 8, 16]}, "teacher_temp": {"loguniform": [0.02, 0.1]},
               "loss_weight": {"uniform": [0.3, 0.7]}, "loss_w_cluster": {"loguniform": [0.03, 0.3]},
               "lr": {"loguniform": [0.1, 1.0]}, "model.hidden_dim": {"grid": [32, 64]}}


def test_issue_space_maps_onto_the_pretrain_config():
    params = parse_space(ISSUE_SPACE)
    assert [(p.name, p.path, p.kind) for p in params] == [
        ("num_proto", "model.num_proto", "choice"), ("teacher_temp", "model.teacher_temp", "loguniform"),
        ("loss_weight", "model.loss_weight", "uniform"), ("loss_w_cluster", "model.loss_w_cluster", "loguniform"),
        ("lr", "optim.lr", "loguniform"), ("model.hidden_dim", "model.hidden_dim", "grid")]


def test_tune_domains_sample_valid_configs():
    space = to_tune(parse_space(ISSUE_SPACE))
    assert set(space) == {"model.num_proto", "model.teacher_temp", "model.loss_weight", "model.loss_w_cluster",
                          "optim.lr", "model.hidden_dim"}
    rng = np.random.default_rng(0)
    for _ in range(20):
        values = {k: d.sample(random_state=rng) for k, d in space.items() if hasattr(d, "sample")}
        cfg = apply_params({}, values)  # numpy scalars from Tune must pass the typed config
        assert isinstance(cfg, PretrainConfig)
        assert cfg.model.num_proto in (4, 8, 16) and 0.02 <= cfg.model.teacher_temp <= 0.1
        assert 0.3 <= cfg.model.loss_weight <= 0.7 and 0.1 <= cfg.optim.lr <= 1.0
    assert space["model.hidden_dim"] == {"grid_search": [32, 64]}


def test_with_values_stays_typed_and_matches_the_mapping_route():
    """A trial's config is the base config with sampled values set, without a dict round trip;
    the result equals what loading base + values as a mapping gives, and is validated the same way."""
    from fra.config import from_dict, to_dict
    from fra.evaluation.fer import FERConfig
    from fra.tuning.space import set_paths, with_values

    base = from_dict(PretrainConfig, {"model": {"backbone": "resnet18", "num_proto": 4},
                                      "optim": {"epochs": 3, "warmup_epochs": 1}})
    values = {"model.num_proto": np.int64(8), "model.teacher_temp": np.float64(0.03), "optim.lr": 1,
              "run.name": "train_t1"}
    cfg = with_values(base, values)
    assert isinstance(cfg, PretrainConfig) and cfg == from_dict(PretrainConfig, set_paths(to_dict(base), values))
    assert type(cfg.model.num_proto) is int and type(cfg.optim.lr) is float  # coerced as on load
    assert base.model.num_proto == 4  # the base is untouched
    fer = with_values(from_dict(FERConfig, {}), {"data.augment.erase_p": 0.0, "protocol": "linear"})
    assert fer.data.augment == {"erase_p": 0.0} and fer.protocol == "linear"
    with pytest.raises(ConfigError, match="model.num_proto"):
        with_values(base, {"model.num_proto": 0})
    with pytest.raises(ConfigError, match="warmup_epochs"):  # a section's cross-field rule runs too
        with_values(base, {"optim.warmup_epochs": 5})
    with pytest.raises(ConfigError, match="did you mean 'num_proto'"):
        with_values(base, {"model.num_protos": 8})
    with pytest.raises(TypeError):
        with_values(to_dict(base), values)


@pytest.mark.parametrize("space, match", [
    ({"num_prot": {"choice": [4]}}, "did you mean 'num_proto'"),
    ({"hidden_dim": {"choice": [32]}}, "did you mean 'model.hidden_dim'"),
    ({"model.nope": {"choice": [1]}}, "unknown parameter 'model.nope'"),
    ({"lr": {"unifrom": [0.1, 1]}}, "did you mean 'uniform'"),
    ({"lr": [0.1, 1.0]}, "exactly one distribution"),
    ({"lr": {"uniform": [0.1]}}, "list of 2 numbers"),
    ({"lr": {"uniform": [1.0, 0.1]}}, "lower < upper"),
    ({"lr": {"loguniform": [0.0, 1.0]}}, "positive lower bound"),
    ({"lr": {"uniform": ["a", 1.0]}}, "finite numbers"),
    ({"num_proto": {"uniform": [2, 8]}}, "integer; use randint"),
    ({"num_proto": {"randint": [2.5, 8]}}, "bounds must be integers"),
    ({"num_proto": {"choice": []}}, "non-empty list"),
    ({"num_proto": {"choice": [4, 4]}}, "distinct"),
    ({"loss_weight": {"uniform": [0.3, 1.5]}}, "loss_weight=1.5 is not a valid config value"),
    ({"num_proto": {"choice": [4, 0]}}, "num_proto=0"),
    ({"model.method": {"choice": ["fra", "simclr"]}}, "model.method"),
    ({"model.method": {"uniform": [0, 1]}}, "not numeric"),
    ({"num_proto": {"choice": [4]}, "model.num_proto": {"choice": [8]}}, "both set model.num_proto"),
    ({}, "non-empty mapping"),
])
def test_bad_spaces_are_rejected_with_a_clear_error(space, match):
    with pytest.raises(ConfigError, match=match):
        parse_space(space)


def test_aliases_and_paths():
    assert resolve_name("lr") == "optim.lr"
    assert resolve_name("model.decoder_layers") == "model.decoder_layers"


@pytest.mark.parametrize("path", sorted((ROOT / "tune_configs").glob("*.yaml")), ids=lambda p: p.name)
def test_every_tune_config_loads_and_validates(path):
    res = resolve(load_sweep_config(path))
    assert res.params and res.max_t == res.base.optim.epochs


def _demo(tmp_path, **sets) -> SweepConfig:
    overrides = [f"run.storage_path={tmp_path}"] + [f"{k}={v}" for k, v in sets.items()]
    return load_sweep_config(None, overrides)


def test_demo_is_the_default_and_forces_trial_resources(tmp_path):
    cfg = _demo(tmp_path, **{"resources.workers": 2})
    res = resolve(cfg)
    assert cfg.run.name == "demo-sweep" and cfg.num_samples == 3
    assert res.base.scaling.num_workers == 2 and res.base.tracking.enabled is False
    assert res.base.model.backbone == "resnet18"


@pytest.mark.parametrize("sets, match", [
    ({"objective.val_fraction": 0.0}, "needs a validation split"),
    ({"objective.proxy": "none"}, "needs objective.proxy=linear_probe"),
    ({"scheduler.max_t": 1}, "would stop every trial before its chained evaluation"),
    ({"scheduler.grace_period": 5}, "grace_period"),
    ({"synthetic_fer.enabled": False}, "fer.data.shards is empty"),
    ({"objective.protocol": "knn"}, "objective.protocol"),
    ({"pretrain.model.num_protos": 3}, "did you mean"),
    ({"fer.protocol": "zero-shot"}, "protocol"),
    ({"resources.workers": 3}, "not divisible by 3 workers"),
])
def test_sweep_config_errors_before_anything_runs(tmp_path, sets, match):
    with pytest.raises(ConfigError, match=match):
        resolve(_demo(tmp_path, **sets))


def test_pipeline_sweep_section_and_inlined_paths(tmp_path):
    (tmp_path / "pre.yaml").write_text(yaml.safe_dump({"model": {"backbone": "resnet18", "hidden_dim": 64},
                                                       "data": {"source": "synthetic"}}))
    (tmp_path / "fer.yaml").write_text(yaml.safe_dump({"fer": {"data": {"shards": "somewhere"}}}))
    pipeline = {"pretrain": "pre.yaml", "sweep": {"fer": "fer.yaml", "space": {"lr": {"uniform": [0.1, 0.5]}},
                                                  "run": {"storage_path": str(tmp_path)}}}
    (tmp_path / "pipe.yaml").write_text(yaml.safe_dump(pipeline))
    cfg = load_sweep_config(tmp_path / "pipe.yaml", ["sweep.pretrain.optim.epochs=3", "pretrain.optim.warmup_epochs=1", "num_samples=2"])
    res = resolve(cfg)
    assert res.base.model.hidden_dim == 64 and res.base.optim.epochs == 3 and cfg.num_samples == 2
    assert res.fer.data.shards == "somewhere"


def test_a_trial_larger_than_the_cluster_fails_fast(tmp_path):
    cfg = _demo(tmp_path, **{"resources.workers": 4, "max_concurrent_trials": 4})
    res = resolve(cfg)
    with pytest.raises(ConfigError, match="one trial needs more than the cluster has.*CPU: needs 5.5, cluster has 4"):
        check_resources(cfg, res, {"CPU": 4.0})
    assert check_resources(cfg, res, {"CPU": 12.0}) == 2  # clamped to what fits
    gpu = _demo(tmp_path, **{"resources.gpus_per_worker": 1})
    with pytest.raises(ConfigError, match="GPU: needs 1"):
        check_resources(gpu, resolve(gpu), {"CPU": 64.0})


def test_early_stopping_without_the_state_api_fails_fast(tmp_path, monkeypatch):
    """No State API inside the cluster = the placement groups of stopped trials are never freed."""
    import ray.util.state

    from fra.tuning import sweep

    def unreachable(**kwargs):
        raise ConnectionError("Found multiple active Ray instances: {'10.0.0.1:6379', '10.0.0.1:6380'}.")

    monkeypatch.setattr(ray.util.state, "list_actors", unreachable)
    assert sweep._state_api_probe(1.0).startswith("ConnectionError: Found multiple active Ray instances")
    monkeypatch.setattr(ray, "remote", lambda **kw: lambda fn: type("R", (), {"remote": staticmethod(fn)}))
    monkeypatch.setattr(ray, "get", lambda ref, timeout=None: ref)  # run the probe in this process
    with pytest.raises(ConfigError, match="State API is unreachable.*multiple active Ray.*scheduler.name=none"):
        sweep.check_state_api(_demo(tmp_path))
    sweep.check_state_api(_demo(tmp_path, **{"scheduler.name": "none"}))  # nothing is stopped: nothing leaks
    monkeypatch.setattr(ray.util.state, "list_actors", lambda **kw: [])
    sweep.check_state_api(_demo(tmp_path))


def test_asha_never_stops_a_trial_that_finished_its_pretraining(tmp_path):
    """Ray's ASHA has a rung at max_t; there the chained FER evaluation decides, not the proxy."""
    from types import SimpleNamespace

    from fra.tuning.sweep import RecordingASHA, build_scheduler

    asha = build_scheduler(_demo(tmp_path).scheduler.__class__(grace_period=1, reduction_factor=2), 4, tmp_path)
    assert isinstance(asha, RecordingASHA)
    strong, weak = SimpleNamespace(trial_id="strong"), SimpleNamespace(trial_id="weak")
    for t in (weak, strong):
        asha.on_trial_add(None, t)
    decide = lambda t, epoch, value: asha.on_trial_result(None, t, {"epoch": epoch, "proxy_top1": value})
    assert [decide(weak, 1, 5.0), decide(strong, 1, 10.0), decide(weak, 2, 5.0), decide(strong, 2, 10.0),
            decide(strong, 4, 10.0), decide(weak, 4, 5.0)] == [asha.CONTINUE] * 6
    late = SimpleNamespace(trial_id="late")
    asha.on_trial_add(None, late)
    assert decide(late, 1, 1.0) == asha.STOP  # below the rung-1 cutoff: stopped early, as before
    assert (tmp_path / "trials" / "late" / "stopped_early.json").is_file()
    assert not (tmp_path / "trials" / "weak" / "stopped_early.json").exists()


def test_table_plot_and_best(tmp_path):
    from fra.tuning import report

    params = parse_space({"num_proto": {"choice": [2, 4]}, "teacher_temp": {"loguniform": [0.02, 0.1]}})
    rows = [
        {"trial_id": "a", "status": "completed", "num_proto": 2, "teacher_temp": 0.03, "objective": 40.0,
         "proxy_top1": 35.0, "epochs": 2, "seconds": 12.5, "starts": 1},
        {"trial_id": "b", "status": "stopped_early", "num_proto": 4, "teacher_temp": 0.05, "objective": None,
         "proxy_top1": 20.0, "epochs": 1, "seconds": 6.0, "starts": 1},
        {"trial_id": "c", "status": "completed", "num_proto": 4, "teacher_temp": 0.08, "objective": 55.5,
         "proxy_top1": 50.0, "epochs": 2, "seconds": 13.0, "starts": 2},
    ]
    assert report.best_row(rows)["trial_id"] == "c"
    table = report.write_table(rows, params, tmp_path / "results.csv")
    got = list(csv.DictReader(Path(table).open()))
    assert [r["trial_id"] for r in got] == ["a", "b", "c"] and got[1]["objective"] == ""
    assert "num_proto" in got[0] and "teacher_temp" in got[0]
    text = report.format_table(rows, params)
    assert "stopped_early" in text and "55.5" in text
    png = report.plot_objective(rows, params, tmp_path / "objective.png")
    assert Path(png).read_bytes()[:4] == b"\x89PNG"


def test_cli_check_and_clear_errors(tmp_path, capsys):
    from fra.cli.main import main

    assert main(["tune", "--check", "--set", f"run.storage_path={tmp_path}"]) == 0
    assert "num_proto" in capsys.readouterr().out
    assert main(["tune", "--check", "--set", "space.tau={uniform: [0, 1]}"]) == 1
    assert "unknown parameter 'tau'" in capsys.readouterr().err


def test_resume_refuses_a_changed_sweep(tmp_path):
    from fra.config import to_dict
    from fra.tuning.sweep import check_snapshot, expected_trials

    cfg = _demo(tmp_path)
    exp = tmp_path / cfg.run.name
    check_snapshot(cfg, exp, resume=True)  # nothing there yet
    exp.mkdir()
    (exp / "sweep.yaml").write_text(yaml.safe_dump(to_dict(cfg)))
    check_snapshot(_demo(tmp_path, **{"resources.cpus": 1.0}), exp, resume=True)  # resources may change
    with pytest.raises(ConfigError, match="space changed"):
        check_snapshot(_demo(tmp_path, **{"space.lr": "{uniform: [0.1, 0.5]}"}), exp, resume=True)
    with pytest.raises(ConfigError, match="already holds a sweep"):
        check_snapshot(cfg, exp, resume=False)
    grid = _demo(tmp_path, **{"space.model.hidden_dim": "{grid: [32, 64]}", "num_samples": 2})
    assert expected_trials(grid, resolve(grid)) == 4


def test_nested_sections_are_dotted_paths():
    params = parse_space({"model": {"hidden_dim": {"grid": [32, 64]}, "num_proto": {"choice": [4, 8]}},
                          "lr": {"uniform": [0.1, 0.5]}})
    assert [(p.name, p.path) for p in params] == [("model.hidden_dim", "model.hidden_dim"),
                                                  ("model.num_proto", "model.num_proto"), ("lr", "optim.lr")]


def test_pipeline_sections_fill_a_bare_sweep_section(tmp_path):
    from fra.tuning.config import sweep_section

    pipeline = {"pretrain": {"model": {"backbone": "resnet18"}, "optim": {"epochs": 2, "warmup_epochs": 0},
                             "data": {"source": "synthetic"}},
                "evaluate": {"protocol": "linear", "data": {"shards": "fer/shards"}, "backbone": {"source": "auto"}},
                "sweep": {"space": {"num_proto": {"choice": [2, 4]}}, "num_samples": 2}}
    (tmp_path / "p.yaml").write_text(yaml.safe_dump(pipeline))
    res = resolve(load_sweep_config(tmp_path / "p.yaml"))
    assert res.base.model.backbone == "resnet18" and res.fer.data.shards == "fer/shards" and res.max_t == 2
    # what the pipeline runner passes: its own (already substituted) sections
    data = sweep_section(pipeline["sweep"], pipeline["pretrain"], pipeline["evaluate"])
    assert data["fer"]["data"]["shards"] == "fer/shards" and data["pretrain"]["optim"]["epochs"] == 2


def test_best_pipeline_is_a_fra_run_pipeline_with_the_best_trial(tmp_path, capsys):
    import json

    from fra.cli.main import main
    from fra.config import dump_yaml, load_config, to_dict
    from fra.pipeline import load_pipeline, stage_config
    from fra.tuning import report
    from fra.tuning.space import set_paths
    from fra.tuning.trial import TrialSetup, trial_pretrain_config

    cfg = _demo(tmp_path, **{"fer.run.storage_path": str(tmp_path / "fer_elsewhere")})
    res = resolve(cfg)
    exp, tid = tmp_path / cfg.run.name, "fra_trial_00002"
    params = {"model.num_proto": 8, "model.teacher_temp": 0.031, "model.loss_weight": 0.42,
              "model.loss_w_cluster": 0.12}
    setup = TrialSetup(base=res.base, fer=res.fer, objective=cfg.objective, sweep_dir=str(exp))
    dump_yaml(trial_pretrain_config(setup, params, tid), exp / "trials" / tid / "pretrain.yaml")
    (exp / "trials" / tid / "result.json").write_text(json.dumps({"trial_id": tid, "params": params,
                                                                  "report": {"objective": 41.0}}))
    fer = set_paths(to_dict(res.fer), {"data.shards": str(tmp_path / "fer_shards"), "protocol": "linear"})
    uri = f"sqlite:///{tmp_path}/sweeps.db"
    files = report.write_best({"trial_id": tid, "objective": 41.0}, exp, cfg, fer, uri)

    best = load_pipeline(files["pipeline"])  # what `fra run` loads
    assert best.stages == ["pretrain", "evaluate", "register", "promote"] and best.ray.num_cpus == 4
    assert best.tracking.mlflow_uri == uri and best.register.name == cfg.run.name
    pre = stage_config(best, "pretrain")
    trial = load_config(PretrainConfig, exp / "trials" / tid / "pretrain.yaml")
    assert (pre.model, pre.optim, pre.data, pre.scaling) == (trial.model, trial.optim, trial.data, trial.scaling)
    assert (pre.model.num_proto, pre.model.teacher_temp, pre.model.loss_weight, pre.model.loss_w_cluster) == \
        (8, 0.031, 0.42, 0.12)
    assert pre.run.name == f"{best.name}-pretrain" and pre.tracking.enabled and pre.tracking.mlflow_uri == uri
    ev = stage_config(best, "evaluate")  # the trial's chained evaluation, of the pipeline's pretraining
    assert (ev.protocol, ev.data.shards, ev.data.val_fraction) == ("linear", str(tmp_path / "fer_shards"), 0.2)
    assert ev.backbone.source == "auto" and ev.optim == res.fer.optim and ev.tracking.mlflow_uri == uri
    assert ev.run.storage_path == str(tmp_path / "fer_elsewhere")  # set in the sweep, so kept
    assert main(["run", str(files["pipeline"]), "--dry-run"]) == 0
    assert "is valid" in capsys.readouterr().out
    assert load_config(PretrainConfig, files["config"]).model == trial.model  # fra pretrain's file
