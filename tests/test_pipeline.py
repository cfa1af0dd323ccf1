"""`fra run`: the shipped pipelines validate, and the demo chain runs end to end (shortened),
resumes at the stage that was interrupted, skips finished stages and promotes a champion that
loads by name."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from fra.errors import ConfigError
from fra.pipeline import load_pipeline, run_pipeline, stage_config

PIPELINES = Path(__file__).resolve().parents[1] / "pipelines"
SHORT = ["pretrain.optim.epochs=1", "pretrain.data.synthetic.num_identities=10", "pretrain.run.checkpoint_every=0",
         "evaluate.optim.epochs=2", "evaluate.optim.warmup_epochs=0", "evaluate.run.last_k=1"]


@pytest.mark.parametrize("name", ["demo.yaml", "pretrain_vggface2.yaml", "sweep_then_promote.yaml"])
def test_shipped_pipelines_validate(name):
    cfg = load_pipeline(PIPELINES / name)
    assert cfg.stages and all(stage_config(cfg, s) is not None for s in cfg.stages)


def test_vggface2_pipeline_is_the_reference_recipe():
    pre = stage_config(load_pipeline(PIPELINES / "pretrain_vggface2.yaml"), "pretrain")
    m, o = pre.model, pre.optim
    assert (m.backbone, m.num_proto, m.teacher_temp, m.loss_w_cluster, m.base_momentum, m.norm) == \
        ("resnet50", 8, 0.04, 0.1, 0.996, "syncbn")
    assert (o.optimizer, o.lr, o.lr_scaling, o.weight_decay, o.epochs, o.warmup_epochs, o.batch_size) == \
        ("lars", 0.9, "none", 1e-6, 50, 10, 512)
    assert pre.data.image_size == 224 and pre.scaling.use_gpu and pre.scaling.amp == "fp16"


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
