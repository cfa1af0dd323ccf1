"""`fra run`: the shipped pipelines validate; the demo chain runs end to end (shortened), resumes at
the stage that was interrupted, skips finished stages and promotes a champion that loads by name;
the RAF-DB pipeline runs from the official layout; the sweep chain registers the best trial's
backbone without retraining it."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from fra.errors import ConfigError
from fra.pipeline import load_pipeline, run_pipeline, stage_config

PIPELINES = Path(__file__).resolve().parents[1] / "pipelines"
SHORT = ["pretrain.optim.epochs=1", "pretrain.data.synthetic.num_identities=10", "pretrain.run.checkpoint_every=0",
         "evaluate.optim.epochs=1", "evaluate.optim.warmup_epochs=0", "evaluate.run.last_k=1"]


@pytest.mark.parametrize("name", ["demo.yaml", "pretrain_vggface2.yaml", "fer_rafdb.yaml", "sweep_then_promote.yaml"])
def test_shipped_pipelines_validate(name):
    cfg = load_pipeline(PIPELINES / name)
    assert cfg.stages and all(stage_config(cfg, s) is not None for s in cfg.stages)


def test_loading_a_pipeline_writes_nothing_only_a_run_creates_its_folder(tmp_path, monkeypatch):
    """Reading a pipeline and its stage configs (what `fra run` does before it starts, and what a
    user's script may do to inspect one) leaves the working directory as it was; the default
    sqlite store's folder (``runs/<name>``, relative to it) appears only once a run needs it."""
    from fra.pipeline import tracking_uri

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.chdir(tmp_path)
    for name in ("demo.yaml", "pretrain_vggface2.yaml", "fer_rafdb.yaml", "sweep_then_promote.yaml"):
        cfg = load_pipeline(PIPELINES / name)
        for stage in cfg.stages:
            stage_config(cfg, stage)
        assert tracking_uri(cfg) == f"sqlite:///{tmp_path.resolve()}/runs/{cfg.name}/mlflow.db"
    assert list(tmp_path.iterdir()) == []
    tracking_uri(cfg, create=True)
    assert [p.relative_to(tmp_path).as_posix() for p in tmp_path.rglob("*")] == ["runs", f"runs/{cfg.name}"]


@pytest.mark.parametrize("name, lr", [("pretrain_vggface2.yaml", 0.9), ("sweep_then_promote.yaml", 0.9),
                                      ("demo.yaml", 0.3)])  # demo: the exception its YAML comment explains
def test_shipped_lars_recipes_use_the_reference_lr_unscaled(name, lr):
    """FRA_SPEC §7: LARS at lr 0.9 for whatever global batch (the reference's linear-scaling line
    is commented out). A batch-scaled lr (0.9 x 16/512 = 0.03) leaves the LARS-adapted weights
    almost where they started."""
    from fra.config import effective_lr

    pre = stage_config(load_pipeline(PIPELINES / name), "pretrain")
    assert pre.optim.optimizer == "lars" and effective_lr(pre.optim) == lr, (name, pre.optim)


def test_vggface2_pipeline_is_the_reference_recipe():
    pre = stage_config(load_pipeline(PIPELINES / "pretrain_vggface2.yaml"), "pretrain")
    m, o = pre.model, pre.optim
    assert (m.backbone, m.num_proto, m.teacher_temp, m.loss_w_cluster, m.base_momentum, m.norm) == \
        ("resnet50", 8, 0.04, 0.1, 0.996, "syncbn")
    assert (o.optimizer, o.lr, o.lr_scaling, o.weight_decay, o.epochs, o.warmup_epochs, o.batch_size) == \
        ("lars", 0.9, "none", 1e-6, 50, 10, 512)
    assert pre.data.image_size == 224 and pre.scaling.use_gpu and pre.scaling.amp == "fp16"


def test_rafdb_pipeline_is_the_reference_protocol_from_the_official_layout():
    from fra.config import load_config, to_dict
    from fra.evaluation.fer import FERConfig

    cfg = load_pipeline(PIPELINES / "fer_rafdb.yaml", ["vars.rafdb_root=/mnt/raf/basic"])
    assert cfg.stages == ["shards", "evaluate", "register", "promote"]
    (job,) = stage_config(cfg, "shards")
    assert (job.source, job.root, job.out) == ("rafdb", "/mnt/raf/basic", f"{cfg.storage_path}/shards/rafdb")
    fer = to_dict(stage_config(cfg, "evaluate"))
    recipe = to_dict(load_config(FERConfig, PIPELINES / "fer_rafdb_finetune.yaml"))  # `fra evaluate fer` config
    assert fer["data"] == {**recipe["data"], "shards": job.out}
    for key in ("protocol", "optim", "scaling", "backbone"):
        assert fer[key] == recipe[key], key
    assert (fer["run"]["eval_every"], fer["run"]["last_k"]) == (recipe["run"]["eval_every"], recipe["run"]["last_k"])
    assert (recipe["run"]["eval_every"], recipe["run"]["last_k"]) == (5, 5)  # README: --eval-freq 5; last 5 epochs


@pytest.mark.parametrize("override, match", [
    ("shards=[{source: rafdb, root: '${raf_root}', out: x}]", r"undefined \$\{\.\.\.\} name\(s\) \['raf_root'\]"),
    ("evaluate.backbone.source=models:/fra-r50-vggface2@champion", "drop register/promote"),
    ("evaluate.backbone.source=random:resnet18", "register stage registers the evaluated backbone"),
])
def test_rafdb_pipeline_refuses_what_it_cannot_run(override, match):
    with pytest.raises(ConfigError, match=match):
        load_pipeline(PIPELINES / "fer_rafdb.yaml", [override])


def test_rafdb_pipeline_evaluates_a_registered_model_without_the_registry_stages():
    source = "models:/fra-r50-vggface2@champion"
    cfg = load_pipeline(PIPELINES / "fer_rafdb.yaml", ["stages=[shards,evaluate]", f"evaluate.backbone.source={source}"])
    assert stage_config(cfg, "evaluate").backbone.source == source


@pytest.mark.parametrize("override, match", [
    ("stages=[evaluate,pretrain]", "order"), ("stages=[pretrain,promote]", "needs the register"),
    ("pretrain.optim.lr=-1", "optim.lr"), ("evaluate.protocol=knn", "protocol"), ("pretrain.modle.x=1", "did you mean"),
])
def test_bad_pipeline_values_fail_before_anything_runs(override, match):
    with pytest.raises(ConfigError, match=match):
        load_pipeline(PIPELINES / "demo.yaml", [override])


@pytest.mark.ray
@pytest.mark.slow
def test_demo_chain_interrupted_resumed_skipped_and_champion_loads(ray_local, tmp_path, monkeypatch, capsys):
    from fra import pipeline_stages
    from fra.cli.main import main

    cfg = load_pipeline(PIPELINES / "demo.yaml", [f"storage_path={tmp_path}", *SHORT])

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt("operator pressed Ctrl-C")

    real = pipeline_stages.STAGE_RUNNERS["evaluate"]
    monkeypatch.setitem(pipeline_stages.STAGE_RUNNERS, "evaluate", interrupted)
    with pytest.raises(KeyboardInterrupt):
        run_pipeline(cfg)
    state = json.loads((tmp_path / "pipeline_state.json").read_text())["stages"]
    assert set(state) == {"shards", "pretrain"} and all(s["status"] == "done" for s in state.values())
    pretrain_finished = state["pretrain"]["finished"]

    monkeypatch.setitem(pipeline_stages.STAGE_RUNNERS, "evaluate", real)
    capsys.readouterr()
    argv = ["run", str(PIPELINES / "demo.yaml"), "--set", f"storage_path={tmp_path}"]
    for o in SHORT:
        argv += ["--set", o]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "[shards] already done" in out and "[pretrain] already done" in out  # resumed at evaluate
    assert "[evaluate] running" in out and "promotion: promoted" in out and "models:/fra-demo@champion" in out
    grid = next(line for line in out.splitlines() if "heat maps per epoch:" in line).split(": ", 1)[1]
    assert Path(grid.removeprefix("file://").replace("epoch_NNN", "epoch_001")).read_bytes()[:4] == b"\x89PNG"
    state = json.loads((tmp_path / "pipeline_state.json").read_text())["stages"]
    assert state["pretrain"]["finished"] == pretrain_finished and state["register"]["outputs"]["version"] == 1
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["promote"]["champion"] == 1

    assert main(argv) == 0  # nothing changed: every stage is skipped
    assert capsys.readouterr().out.count("already done, skipping") == 5

    from fra.evaluation.backbones import resolve_backbone

    champion = resolve_backbone("models:/fra-demo@champion", tracking_uri=f"sqlite:///{tmp_path}/mlflow.db")
    exported = resolve_backbone(summary["pretrain"]["export_dir"])
    assert champion.fingerprint == exported.fingerprint  # the promoted model is the pretrained backbone


def _argv(pipeline: str, sets: list[str]) -> list[str]:
    return ["run", str(PIPELINES / pipeline), *[x for o in sets for x in ("--set", o)]]


@pytest.mark.ray
@pytest.mark.slow
def test_rafdb_pipeline_runs_from_the_official_layout_and_promotes(ray_local, tmp_path, capsys):
    import torch

    from fra.cli.main import main
    from fra.config import ModelConfig, PretrainConfig
    from fra.models import build_model
    from fra.registry import DATASET_TAG, METRIC_TAG_PREFIX, PROTOCOL_TAG, client, show
    from fra.train.checkpointing import export_backbone
    from tests.data_layouts import build_rafdb

    root, storage = tmp_path / "RAF-DB" / "basic", tmp_path / "fer_rafdb"
    expected = build_rafdb(root)
    model = ModelConfig(backbone="resnet18", hidden_dim=64, proj_dim=32, num_proto=4, decoder_heads=4, decoder_ffn=64)
    torch.manual_seed(0)
    export_backbone(build_model(model), tmp_path / "export", PretrainConfig(model=model), 64)
    sets = [f"storage_path={storage}", f"vars.rafdb_root={root}", "ray.address=", "register.name=fra-rafdb-test",
            f"evaluate.backbone.source={tmp_path / 'export'}", "evaluate.backbone.arch=resnet18",
            "evaluate.data.image_size=32", "evaluate.optim.epochs=1", "evaluate.optim.warmup_epochs=0",
            "evaluate.optim.batch_size=8", "evaluate.run.last_k=1", "evaluate.run.checkpoint_every=0",
            "evaluate.scaling.num_workers=0", "evaluate.scaling.use_gpu=false", "evaluate.scaling.amp=auto"]
    assert main(_argv("fer_rafdb.yaml", sets)) == 0
    assert "promotion: promoted" in capsys.readouterr().out

    out = json.loads((storage / "summary.json").read_text())
    shards = out["shards"][str(storage / "shards" / "rafdb")]
    assert {s: c["total"] for s, c in shards["counts"].items()} == {s: len(v) for s, v in expected.good.items()}
    results = json.loads(Path(out["evaluate"]["results_path"]).read_text())
    assert results["protocol"] == "finetune" and results["dataset"]["name"] == "rafdb"
    assert results["resolved"]["test_split"] == "test" and results["dataset"]["rows"]["test"] == len(expected.good["test"])
    reg = out["register"]
    assert (reg["version"], reg["protocol"], reg["dataset_fingerprint"]) == (1, "finetune/rafdb/test", shards["fingerprint"])
    uri = f"sqlite:///{storage}/mlflow.db"
    tags = client(uri).get_model_version("fra-rafdb-test", "1").tags  # the RAF-DB metrics are on the version
    assert float(tags[METRIC_TAG_PREFIX + "fer_top1_mean_last5"]) == pytest.approx(out["evaluate"]["top1_mean_last5"])
    assert (tags[PROTOCOL_TAG], tags[DATASET_TAG]) == ("finetune/rafdb/test", shards["fingerprint"])
    assert out["promote"]["decision"] == "promoted" and show("fra-rafdb-test", uri)["aliases"] == {"champion": 1}


@pytest.mark.ray
@pytest.mark.slow
def test_sweep_chain_registers_the_best_trial_without_retraining(ray_local, sweep_run):
    from fra.evaluation.backbones import resolve_backbone
    from fra.registry import show

    # The suite's shared sweep (tests/shared_runs.py): `fra run` of the whole pipeline after the sweep
    # was run by `fra tune`, interrupted and resumed. tests/test_tune_sweep.py asserts on the sweep
    # itself; here, what the chain did with it. The evaluate stage ran in the driver (num_workers=0).
    storage, out, printed = sweep_run.storage, sweep_run.summary, sweep_run.printed
    assert "[shards] already done" in printed and "promotion: promoted" in printed and "sweep best pipeline:" in printed

    # no pretrain stage (summary.json is written with sorted keys, so compare the sets)
    assert set(out) == {"shards", "sweep", "evaluate", "register", "promote"}
    sweep = out["sweep"]
    train_runs = Path(sweep["experiment_dir"]) / "train_runs"
    trial_runs = sorted(p.name for p in train_runs.glob("train_*"))
    # one pretraining run per trial, the interrupted one resumed in its own: nothing was retrained
    assert trial_runs == sorted(f"train_{r['trial_id']}" for r in sweep["rows"]) and len(trial_runs) == 3
    # the evaluation and the registry got the best trial's own export, not a new training run
    assert out["evaluate"]["backbone"] == sweep["best_backbone"]
    assert Path(sweep["best_backbone"]).is_relative_to(train_runs / f"train_{sweep['best_trial_id']}")
    uri = f"sqlite:///{storage}/mlflow.db"
    champion = resolve_backbone("models:/fra-sweep@champion", tracking_uri=uri)
    assert champion.fingerprint == resolve_backbone(sweep["best_backbone"]).fingerprint
    assert out["register"]["metrics"]["fer_top1_mean_last5"] == pytest.approx(out["evaluate"]["top1_mean_last5"])
    assert out["promote"]["champion"] == 1 and show("fra-sweep", uri)["aliases"] == {"champion": 1}

    # the sweep's best_pipeline.yaml is a `fra run` pipeline with the best trial's settings
    best = load_pipeline(sweep["best_pipeline_path"])
    pre = stage_config(best, "pretrain")
    for path, value in sweep["best_params"].items():
        section, key = path.split(".")
        assert getattr(getattr(pre, section), key) == value, path
    assert stage_config(best, "evaluate").data.shards == str(storage / "shards" / "fer_faces")
