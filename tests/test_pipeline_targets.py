"""Pipeline stages 'attributes' and 'affect': the registry stores their metrics next to FER's and
promotion gates on them (accuracy / CCC / PCC / SAGR higher is better, RMSE lower).

The end-to-end test runs shards -> attributes -> register -> promote on synthetic faces with an
existing ResNet-18 export (no pretraining), twice, and checks the gate's decisions against the
values in the two results.json files.
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from fra.errors import ConfigError
from fra.pipeline import load_pipeline, run_pipeline, stage_config


def _results(tmp_path: Path, kind: str, **extra) -> Path:
    path = tmp_path / f"{kind}.json"
    path.write_text(json.dumps({"kind": kind, "protocol": "linear", "dataset": {"name": "celeba", "fingerprint": "fp"},
                                "resolved": {"test_split": "test"}, **extra}))
    return path


def test_registry_metrics_of_attribute_and_affect_results(tmp_path):
    """Hand-written results.json files: which metrics are registered, under which names and protocol."""
    from fra.registry.registration import target_metrics_from_results

    attrs = _results(tmp_path, "attributes", metric="mean_acc",
                     headline={"mean_acc_last": 88.5, "mean_acc_mean_last_k": 88.0, "last_k": 2,
                               "mean_acc_at_val_best": 87.0, "val_best_epoch": 3},
                     last_epoch={"epoch": 4, "mean_acc": 88.5, "mean_balanced_acc": 75.25,
                                 "per_attribute_acc": {"Smiling": 90.0}})
    metrics, protocol, fingerprint = target_metrics_from_results(str(attrs))
    assert metrics == {"attributes_mean_acc_last": 88.5, "attributes_mean_acc_mean_last_k": 88.0,
                       "attributes_mean_acc_at_val_best": 87.0, "attributes_mean_balanced_acc_last": 75.25}
    assert (protocol, fingerprint) == ("attributes:linear/celeba/test", "fp")

    affect = _results(tmp_path, "affect", metric="mean_ccc",
                      headline={"mean_ccc_last": 0.5, "mean_ccc_mean_last_k": 0.4},
                      last_epoch={"ccc": {"valence": 0.6, "arousal": 0.4}, "pcc": {"valence": 0.7, "arousal": None},
                                  "rmse": {"valence": 0.3, "arousal": 0.35}, "sagr": {"valence": 0.8, "arousal": 0.75},
                                  "mean_ccc": 0.5, "num_samples": 10})
    metrics, protocol, _ = target_metrics_from_results(str(affect))
    assert metrics == {"affect_mean_ccc_last": 0.5, "affect_mean_ccc_mean_last_k": 0.4, "affect_ccc_valence": 0.6,
                       "affect_ccc_arousal": 0.4, "affect_pcc_valence": 0.7, "affect_rmse_valence": 0.3,
                       "affect_rmse_arousal": 0.35, "affect_sagr_valence": 0.8, "affect_sagr_arousal": 0.75}
    assert protocol == "affect:linear/celeba/test"

    from fra.registry import RegistryError

    with pytest.raises(RegistryError, match="not an attribute or affect"):
        target_metrics_from_results(str(_results(tmp_path, "fer", metric="top1")))


def test_auto_gate_direction_of_attribute_and_affect_metrics():
    """Accuracy, CCC, PCC and SAGR: higher is better; RMSE: lower."""
    from fra.registry.connection import DATASET_TAG, PROTOCOL_TAG, READY, STATUS_TAG, ModelVersionInfo
    from fra.registry_promotion import _judge, gate_mode

    higher = ["attributes_mean_acc_last", "attributes_mean_balanced_acc_last", "affect_mean_ccc_mean_last_k",
              "affect_ccc_valence", "affect_pcc_arousal", "affect_sagr_valence"]
    assert [gate_mode(m) for m in higher] == ["max"] * len(higher)
    assert gate_mode("affect_rmse_arousal") == "min"

    tags = {STATUS_TAG: READY, PROTOCOL_TAG: "affect:linear/celeba/test", DATASET_TAG: "fp"}
    champ, cand = (ModelVersionInfo("m", v, "run", "model", READY, tags) for v in (1, 2))
    def judge(cand_value: float, champ_value: float, metric: str) -> str:
        return _judge(cand, champ, cand_value, champ_value, metric, 0.0, gate_mode(metric))[0]

    assert judge(0.30, 0.35, "affect_rmse_valence") == "promoted"
    assert judge(0.40, 0.35, "affect_rmse_valence") == "refused"
    assert judge(0.40, 0.35, "affect_ccc_valence") == "promoted"


def _pipeline(tmp_path: Path, export: Path) -> Path:
    path = tmp_path / "attributes_pipeline.yaml"
    path.write_text(yaml.safe_dump({
        "name": "attrs", "storage_path": str(tmp_path / "run"),
        "stages": ["shards", "attributes", "register", "promote"],
        "shards": [{"source": "synthetic_faces", "out": "${storage}/shards/faces", "images_per_shard": 64,
                    "options": {"num_identities": 10, "images_per_identity": 4, "size": 64, "with_attributes": True,
                                "glasses": 0.3, "parallel": False}}],
        "attributes": {"protocol": "linear", "data": {"shards": "${storage}/shards/faces", "image_size": 64},
                       "optim": {"epochs": 1, "warmup_epochs": 0, "batch_size": 8, "lr": 0.05},
                       "scaling": {"num_workers": 0, "use_gpu": False},
                       "backbone": {"source": str(export), "arch": "resnet18"},
                       "run": {"last_k": 1, "checkpoint_every": 0}},
        "register": {"name": "fra-attrs-test"},
        "promote": {"gate_metric": "attributes_mean_acc_last", "margin": 0.0, "mode": "auto"}}))
    return path


def test_attribute_stage_config_and_refusals(tmp_path):
    path = _pipeline(tmp_path, tmp_path / "export")
    cfg = load_pipeline(path, ["attributes.backbone.source=auto", "stages=[shards,attributes]"])
    attrs = stage_config(cfg, "attributes")
    assert (attrs.run.name, attrs.run.storage_path) == ("attrs-attributes", str(tmp_path / "run" / "attributes"))
    with pytest.raises(ConfigError, match="attributes.backbone.source"):
        load_pipeline(path, ["attributes.backbone.source=random:resnet18"])
    with pytest.raises(ConfigError, match="order"):
        load_pipeline(path, ["stages=[affect,attributes]"])


@pytest.mark.ray
def test_attributes_stage_registers_its_metric_and_promotion_gates_on_it(ray_local, tmp_path):
    import torch

    from fra.config import ModelConfig, PretrainConfig
    from fra.models import build_model
    from fra.registry import METRIC_TAG_PREFIX, PROTOCOL_TAG, client, show
    from fra.train.checkpointing import export_backbone

    model = ModelConfig(backbone="resnet18", hidden_dim=64, proj_dim=32, num_proto=4, decoder_heads=4, decoder_ffn=64)
    torch.manual_seed(0)
    export_backbone(build_model(model), tmp_path / "export", PretrainConfig(model=model), 64)
    path, uri, name = _pipeline(tmp_path, tmp_path / "export"), f"sqlite:///{tmp_path}/run/mlflow.db", "fra-attrs-test"

    first = run_pipeline(load_pipeline(path), echo=lambda _: None)
    v1 = json.loads(Path(first["attributes"]["results_path"]).read_text())["headline"]["mean_acc_last"]
    assert first["register"]["version"] == 1 and first["register"]["metrics"]["attributes_mean_acc_last"] == v1
    tags = client(uri).get_model_version(name, "1").tags
    assert float(tags[METRIC_TAG_PREFIX + "attributes_mean_acc_last"]) == pytest.approx(v1)
    assert tags[PROTOCOL_TAG] == "attributes:linear/synthetic_faces/test"
    assert first["promote"]["decision"] == "promoted"  # no champion yet

    # Another probe (other lr): registered as v2; a margin of 100 accuracy points cannot be beaten.
    second = run_pipeline(load_pipeline(path, ["attributes.optim.lr=0.2", "promote.margin=100"]), echo=lambda _: None)
    v2 = json.loads(Path(second["attributes"]["results_path"]).read_text())["headline"]["mean_acc_last"]
    assert second["register"]["version"] == 2 and second["promote"]["decision"] == "refused"
    assert show(name, uri)["aliases"] == {"champion": 1}

    # Margin 0, same probe (attributes and register skipped): promoted exactly when v2's accuracy is higher.
    third = run_pipeline(load_pipeline(path, ["attributes.optim.lr=0.2"]), echo=lambda _: None)
    assert third["attributes"]["results_path"] == second["attributes"]["results_path"]
    assert third["register"]["version"] == 2
    assert third["promote"]["decision"] == ("promoted" if v2 > v1 else "refused")
    assert show(name, uri)["aliases"] == {"champion": 2 if v2 > v1 else 1}
