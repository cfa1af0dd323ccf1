"""Nothing fra did not write itself is unpickled (issue 17, Deliver §1).

Each file below carries a pickle payload that creates a marker file when unpickled: a training
checkpoint, a registered MLflow model without ``backbone.pt`` and the sweep's scheduler state.
fra must refuse each one and the marker must not appear. A positive control shows the payload is
live: with the explicit ``trust_pickle`` opt-in the registered model *is* unpickled and the
marker appears.
"""
import json
import pickle

import pytest
import torch

from fra.errors import CheckpointError, ConfigError

# Unpickling runs this expression: it writes the marker and returns a real ResNet-18 trunk, so the
# same payload also works as an MLflow model when the user opts in.
PAYLOAD = "(open({marker!r}, 'w').write('pwned'), __import__('torchvision').models.resnet18())[1]"


class _Payload:
    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (eval, (PAYLOAD.format(marker=self.marker),))


class _PayloadModule(torch.nn.Module):
    """An nn.Module (so MLflow logs it) whose pickle is the payload."""

    def __init__(self, marker):
        super().__init__()
        self.marker = str(marker)
        self.fc = torch.nn.Linear(1, 1)

    def __reduce_ex__(self, protocol):
        return _Payload(self.marker).__reduce__()


def test_payload_is_live(tmp_path):
    """The control: plain pickle runs the payload (so the refusals below mean something)."""
    marker = tmp_path / "pwned"
    obj = pickle.loads(pickle.dumps(_Payload(marker)))
    assert marker.read_text() == "pwned" and isinstance(obj, torch.nn.Module)


def test_checkpoint_with_payload_is_refused(tmp_path):
    from fra.checkpoint import load_backbone, safe_load
    from fra.evaluation.backbones import resolve_backbone
    from fra.train.checkpointing import load_checkpoint

    marker = tmp_path / "pwned"
    path = tmp_path / "checkpoint.pt"
    torch.save({"format": "fra-checkpoint/1", "state_dict": {"conv1.weight": torch.zeros(1)},
                "extra": _Payload(marker)}, path)
    for load in (safe_load, load_checkpoint, load_backbone, resolve_backbone):
        with pytest.raises(CheckpointError, match="refused"):
            load(str(path))
    assert not marker.exists()


@pytest.fixture()
def pickled_registered_model(tmp_path):
    """(tracking URI, models:/ URI, marker): a registered pickle-format PyTorch model, no backbone.pt."""
    mlflow = pytest.importorskip("mlflow")
    from mlflow import MlflowClient

    marker = tmp_path / "pwned"
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    mlflow.set_tracking_uri(uri)
    exp = mlflow.create_experiment("evil", artifact_location=f"file://{tmp_path}/artifacts")
    with mlflow.start_run(experiment_id=exp):
        # pip_requirements given: MLflow would otherwise load the model to infer them
        info = mlflow.pytorch.log_model(_PayloadModule(marker), name="model", serialization_format="pickle",
                                        pip_requirements=["torch"])
    version = mlflow.register_model(info.model_uri, "not-from-fra")
    MlflowClient(uri).set_registered_model_alias("not-from-fra", "champion", version.version)
    assert not marker.exists(), "logging the model ran the payload; the test would prove nothing"
    return uri, "models:/not-from-fra@champion", marker


@pytest.mark.slow
def test_registered_model_without_backbone_pt_is_refused(pickled_registered_model):
    from fra.evaluation.backbones import resolve_backbone
    from fra.registry import load_registered

    uri, model_uri, marker = pickled_registered_model
    with pytest.raises(CheckpointError, match=r"no backbone\.pt.*fra registry register.*--trust-pickle"):
        resolve_backbone(model_uri, tracking_uri=uri)
    with pytest.raises(CheckpointError, match=r"no backbone\.pt.*trust_pickle=True"):
        load_registered(model_uri, tracking_uri=uri)
    assert not marker.exists()


@pytest.mark.slow
def test_registered_model_loads_only_on_explicit_opt_in(pickled_registered_model, caplog):
    """The opt-in path really unpickles (the marker appears) and says so in the log and the provenance."""
    from fra.evaluation.backbones import resolve_backbone
    from fra.registry import load_registered

    uri, model_uri, marker = pickled_registered_model
    with caplog.at_level("WARNING", logger="fra.evaluation.backbones"):
        src = resolve_backbone(model_uri, tracking_uri=uri, trust_pickle=True)
    assert marker.read_text() == "pwned"
    assert src.arch == "resnet18" and "UNPICKLED" in src.detail
    assert any("trust_pickle" in r.getMessage() and model_uri in r.getMessage() for r in caplog.records)
    marker.unlink()
    model = load_registered(model_uri, tracking_uri=uri, num_classes=3, trust_pickle=True)
    assert marker.exists() and model.fc.out_features == 3


def test_fer_config_and_cli_carry_the_opt_in(tmp_path):
    """``--trust-pickle`` and ``backbone.trust_pickle`` are the same switch, off by default."""
    import argparse

    from fra.cli import evaluate as cli
    from fra.config import load_config
    from fra.evaluation.fer import FERConfig

    assert load_config(FERConfig).backbone.trust_pickle is False
    parser = argparse.ArgumentParser()
    cli.add_arguments(parser)
    cfg_file = tmp_path / "fer.yaml"
    cfg_file.write_text("protocol: linear\n")
    args = parser.parse_args(["fer", str(cfg_file), "--trust-pickle", "--print-config"])
    assert cli.run(args) == 0
    args = parser.parse_args(["fer", str(cfg_file), "--print-config"])
    assert cli.run(args) == 0
    with pytest.raises(ConfigError, match="backbone.trust_pickle"):
        load_config(FERConfig, data={"backbone": {"trust_pickle": "yes please"}})


def test_scheduler_state_is_json_and_a_pickled_one_is_refused(tmp_path):
    from types import SimpleNamespace

    from fra.tuning.config import SchedulerSettings
    from fra.tuning.sweep import RecordingASHA, build_scheduler, check_snapshot

    settings = SchedulerSettings(grace_period=1, reduction_factor=2)
    asha = build_scheduler(settings, 4, tmp_path)
    trials = [SimpleNamespace(trial_id=t) for t in ("a", "b")]
    for t, value in zip(trials, (5.0, 10.0)):
        asha.on_trial_add(None, t)
        assert asha.on_trial_result(None, t, {"epoch": 1, settings.metric: value}) == asha.CONTINUE
    state = json.loads((tmp_path / RecordingASHA.STATE_FILE).read_text())  # plain JSON, nothing to unpickle
    assert state["trial_info"] == {"a": 0, "b": 0} and state["brackets"][0][-1] == [1.0, {"a": 5.0, "b": 10.0}]

    late = SimpleNamespace(trial_id="late")
    fresh = build_scheduler(settings, 4, tmp_path / "elsewhere")  # empty rungs: nothing to compare with
    fresh.on_trial_add(None, late)
    assert fresh.on_trial_result(None, late, {"epoch": 1, settings.metric: 1.0}) == fresh.CONTINUE
    resumed = build_scheduler(settings, 4, tmp_path)  # a resumed sweep reads the rungs back: 1.0 < 7.5
    resumed.on_trial_add(None, late)
    assert resumed.on_trial_result(None, late, {"epoch": 1, settings.metric: 1.0}) == resumed.STOP

    marker = tmp_path / "pwned"
    (tmp_path / RecordingASHA.LEGACY_STATE_FILE).write_bytes(pickle.dumps(_Payload(marker)))
    with pytest.raises(ConfigError, match=r"scheduler_state\.pkl.*no longer unpickles.*Delete it"):
        check_snapshot(SimpleNamespace(), tmp_path, resume=True)  # before any trial starts
    with pytest.raises(ConfigError, match=r"scheduler_state\.pkl"):
        build_scheduler(settings, 4, tmp_path).on_trial_add(None, late)
    assert not marker.exists()


def test_no_unsafe_loader_in_the_package():
    """Every torch.load in fra is weights_only=True; no pickle/cloudpickle/joblib/marshal loads at all."""
    import re
    from pathlib import Path

    import fra

    root = Path(fra.__file__).parent
    offenders = []
    for path in sorted(root.rglob("*.py")):
        text = path.read_text()
        for m in re.finditer(r"torch\.load\(([^)]*)\)", text):
            if "weights_only=True" not in m.group(1):
                offenders.append(f"{path.relative_to(root)}: {m.group(0)}")
        for m in re.finditer(r"\b(pickle|cloudpickle|joblib|marshal|dill)\.loads?\(|allow_pickle=True", text):
            offenders.append(f"{path.relative_to(root)}: {m.group(0)}")
        calls = re.findall(r"mlflow\.pytorch\.load_model\(", text)
        if calls and path.name != "backbones.py":  # the one guarded call: load_pickled_model
            offenders.append(f"{path.relative_to(root)}: mlflow.pytorch.load_model")
    assert offenders == []
