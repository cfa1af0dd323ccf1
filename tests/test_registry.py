"""The MLflow registry on a sqlite backend: register, promote, history, rollback, load, failures.

Two versions go through the real registration path (API and CLI; about 5-10 s each for the pt2
export). The other promotion candidates are cheap copies of version 1 whose tags differ (metric,
protocol, dataset fingerprint): promotion reads only tags, so this tests the same decisions in
a fraction of the time. Every test starts from "no champion, empty history".
"""
import json
import time

import pytest
import torch

from fra.cli.main import main as fra_main
from fra.config import ModelConfig, PretrainConfig
from fra.models import build_model
from fra.registry import (DATASET_TAG, METRIC_TAG_PREFIX, PROTOCOL_TAG, STATUS_TAG, RegistryError, _fluent_uri,
                          client, list_models, load_registered, promote, read_history, register_backbone, rollback,
                          show)
from fra.registry_promotion import HISTORY_PAGES_TAG, HISTORY_TAG
from fra.train.checkpointing import export_backbone

MODEL = ModelConfig(backbone="resnet18", hidden_dim=64, proj_dim=32, num_proto=4, decoder_heads=4, decoder_ffn=64)
NAME = "fra-r18-test"
PROTOCOL, FINGERPRINT = "linear/rafdb/test", "fp-rafdb-1"
GATE = "fer_top1_mean_last5"


pytestmark = pytest.mark.usefixtures("one_thread_per_module")


@pytest.fixture(scope="module")
def export_dir(tmp_path_factory):
    torch.manual_seed(0)
    out = tmp_path_factory.mktemp("export")
    export_backbone(build_model(MODEL), out, PretrainConfig(model=MODEL), 64, manifest_fingerprint="pretrain-abc")
    return out


@pytest.fixture(scope="module")
def registry(tmp_path_factory, export_dir):
    """sqlite registry with v1 (API, 60.0) and v2 (CLI from results.json, 55.0)."""
    root = tmp_path_factory.mktemp("mlflow")
    uri = f"sqlite:///{root}/mlflow.db"
    v1 = register_backbone(export_dir, NAME, tracking_uri=uri, fer_metrics={GATE: 60.0, "fer_top1_last": 61.0},
                           eval_protocol=PROTOCOL, dataset_fingerprint=FINGERPRINT)
    results = root / "results.json"
    results.write_text(json.dumps({"protocol": "linear", "headline": {"top1_mean_last5": 55.0, "top1_last": 56.0},
                                   "dataset": {"name": "rafdb", "fingerprint": FINGERPRINT},
                                   "resolved": {"test_split": "test"}}))
    assert fra_main(["registry", "register", str(export_dir), "--name", NAME, "--metrics", str(results),
                     "--tracking-uri", uri]) == 0
    return {"uri": uri, "v1": v1, "root": root}


@pytest.fixture(autouse=True)
def _no_champion(request):
    """Reset the alias and the history so each test starts from scratch."""
    if "registry" not in request.fixturenames:
        yield
        return
    reg = request.getfixturevalue("registry")
    mlc = client(reg["uri"])
    rm = mlc.get_registered_model(NAME)
    if "champion" in (rm.aliases or {}):
        mlc.delete_registered_model_alias(NAME, "champion")
    for key in rm.tags or {}:
        if key.startswith(HISTORY_TAG):
            mlc.delete_registered_model_tag(NAME, key)
    yield


def _copy_of_v1(reg, value: float, protocol: str = PROTOCOL, fingerprint: str = FINGERPRINT,
                status: str = "ready") -> int:
    """A new version with v1's model and changed tags (what promotion reads)."""
    mlc = client(reg["uri"])
    src = mlc.get_model_version(NAME, str(reg["v1"].version))
    tags = dict(src.tags, **{METRIC_TAG_PREFIX + GATE: repr(value), PROTOCOL_TAG: protocol,
                             DATASET_TAG: fingerprint, STATUS_TAG: status})
    tags.pop("fra.decisions", None)
    with _fluent_uri(reg["uri"]):  # the sqlite registry resolves the models:/m-<id> source via the fluent URI
        mv = mlc.create_model_version(NAME, source=src.source, run_id=src.run_id, tags=tags)
    return int(mv.version)


@pytest.mark.slow
def test_registered_version_carries_card_metrics_signature(registry):
    import mlflow

    v1 = registry["v1"]
    assert v1.status == "ready" and v1.version == 1
    t = v1.tags
    assert t["fra.card.architecture"] == "resnet18" and t["fra.card.input_size"] == "64"
    assert json.loads(t["fra.card.normalization"])["mean"] == pytest.approx([0.5231, 0.4044, 0.3489])
    assert t["fra.card.data_manifest_fingerprint"] == "pretrain-abc"
    assert len(t["fra.card.config_hash"]) == 16 and t["fra.code_version"]
    assert float(t[METRIC_TAG_PREFIX + GATE]) == 60.0
    assert t[PROTOCOL_TAG] == PROTOCOL and t[DATASET_TAG] == FINGERPRINT
    mlc = client(registry["uri"])
    run = mlc.get_run(v1.run_id)
    assert run.data.metrics[GATE] == 60.0 and run.info.status == "FINISHED"
    assert any(a.path == "model_card" for a in mlc.list_artifacts(v1.run_id))
    with _fluent_uri(registry["uri"]):
        info = mlflow.models.get_model_info(f"models:/{NAME}/1")
    assert info.signature.inputs.inputs[0].shape == (-1, 3, -1, -1)
    assert info.saved_input_example_info["type"] == "ndarray"
    with _fluent_uri(registry["uri"]):  # the sqlite registry resolves models:/m-<id> via the fluent URI
        local = mlflow.artifacts.download_artifacts(f"models:/{NAME}/1")
    from pathlib import Path

    files = {p.name for p in Path(local).rglob("*")}
    assert {"model.pt2", "backbone.pt", "model_card.json", "requirements.txt"} <= files
    example = json.loads((Path(local) / "input_example.json").read_text())
    assert len(example) >= 2  # batch >= 2 keeps the exported batch dimension dynamic
    assert any(r.startswith("torch==") for r in (Path(local) / "requirements.txt").read_text().split())
    # v2 came from the CLI with metrics, protocol and fingerprint read from results.json
    v2 = mlc.get_model_version(NAME, "2")
    assert v2.tags[PROTOCOL_TAG] == PROTOCOL and float(v2.tags[METRIC_TAG_PREFIX + GATE]) == 55.0


@pytest.mark.slow
def test_first_version_is_promoted_when_there_is_no_champion(registry):
    d = promote(NAME, 1, tracking_uri=registry["uri"])
    assert d.promoted and d.previous_champion is None and "no champion yet" in d.reason
    assert show(NAME, registry["uri"])["aliases"] == {"champion": 1}


@pytest.mark.slow
def test_worse_keeps_champion_better_replaces_it(registry):
    uri = registry["uri"]
    promote(NAME, 1, tracking_uri=uri)
    worse = promote(NAME, 2, tracking_uri=uri)
    assert not worse.promoted and worse.champion == 1 and "does not beat" in worse.reason
    assert show(NAME, uri)["aliases"]["champion"] == 1
    better = _copy_of_v1(registry, 62.5)
    d = promote(NAME, better, tracking_uri=uri)
    assert d.promoted and d.previous_champion == 1 and d.champion_value == 60.0 and d.candidate_value == 62.5
    assert show(NAME, uri)["aliases"]["champion"] == better


@pytest.mark.slow
@pytest.mark.parametrize("change, words", [({"protocol": "finetune/rafdb/test"}, "evaluation protocol differs"),
                                           ({"fingerprint": "fp-other"}, "dataset fingerprint differs")])
def test_different_protocol_or_data_is_refused(registry, change, words):
    uri = registry["uri"]
    promote(NAME, 1, tracking_uri=uri)
    other = _copy_of_v1(registry, 90.0, **change)
    d = promote(NAME, other, tracking_uri=uri)
    assert not d.promoted and words in d.reason and d.champion == 1
    assert show(NAME, uri)["aliases"]["champion"] == 1


@pytest.mark.slow
def test_margin_is_honoured(registry):
    uri = registry["uri"]
    promote(NAME, 1, tracking_uri=uri)
    slightly = _copy_of_v1(registry, 60.4)
    assert not promote(NAME, slightly, margin=0.5, tracking_uri=uri).promoted
    assert promote(NAME, slightly, margin=0.3, tracking_uri=uri).promoted
    # mode=min: lower is better, so v1 (60.0) now beats the champion (60.4), unless the margin is larger
    assert not promote(NAME, 1, mode="min", margin=0.5, tracking_uri=uri).promoted
    assert promote(NAME, 1, mode="min", margin=0.3, tracking_uri=uri).promoted


@pytest.mark.slow
def test_history_records_every_decision_and_rollback_restores(registry):
    uri = registry["uri"]
    better = _copy_of_v1(registry, 63.0)
    promote(NAME, 1, tracking_uri=uri)
    promote(NAME, 2, tracking_uri=uri)                      # refused
    promote(NAME, better, tracking_uri=uri)                 # v1 -> better
    hist = read_history(client(uri), NAME)
    assert [e["decision"] for e in hist] == ["promoted", "refused", "promoted"]
    last = hist[-1]
    assert (last["candidate"], last["previous_champion"]) == (better, 1)
    assert (last["candidate_value"], last["champion_value"]) == (63.0, 60.0)
    assert "@" in last["who"] and last["time"].endswith("Z") and last["metric"] == GATE
    refused = hist[1]
    assert refused["candidate"] == 2 and refused["champion"] == 1 and refused["champion_value"] == 60.0
    # the candidate version carries its own decisions as well
    assert json.loads(client(uri).get_model_version(NAME, "2").tags["fra.decisions"])[-1]["decision"] == "refused"

    back = rollback(NAME, tracking_uri=uri)
    assert back.decision == "rolled_back" and back.champion == 1 and back.previous_champion == better
    assert show(NAME, uri)["aliases"]["champion"] == 1
    assert read_history(client(uri), NAME)[-1]["decision"] == "rolled_back"
    with pytest.raises(RegistryError, match="first champion"):
        rollback(NAME, tracking_uri=uri)


@pytest.mark.slow
def test_history_pages_keep_every_entry(registry, monkeypatch):
    import fra.registry_promotion as rp

    monkeypatch.setattr(rp, "PAGE_LIMIT", 900)  # about two entries per page
    uri = registry["uri"]
    for _ in range(3):
        promote(NAME, 1, tracking_uri=uri)
        promote(NAME, 2, tracking_uri=uri)
    tags = client(uri).get_registered_model(NAME).tags
    assert int(tags[HISTORY_PAGES_TAG]) >= 2
    assert len(read_history(client(uri), NAME)) == 6


@pytest.mark.slow
def test_unready_version_is_neither_promoted_nor_loaded(registry):
    pending = _copy_of_v1(registry, 99.0, status="pending")
    d = promote(NAME, pending, tracking_uri=registry["uri"])
    assert not d.promoted and "pending" in d.reason
    with pytest.raises(RegistryError, match="pending"):
        load_registered(f"models:/{NAME}/{pending}", tracking_uri=registry["uri"])


@pytest.mark.slow
def test_champion_loads_into_torchvision_resnet_any_batch(registry, export_dir):
    import mlflow
    import torchvision

    promote(NAME, 1, tracking_uri=registry["uri"])
    model = load_registered(f"models:/{NAME}@champion", tracking_uri=registry["uri"], num_classes=7)
    assert isinstance(model, torchvision.models.ResNet) and model.fc.out_features == 7
    exported = torch.load(export_dir / "backbone.pt", weights_only=True)["state_dict"]
    assert torch.equal(model.state_dict()["layer4.1.conv2.weight"], exported["layer4.1.conv2.weight"])
    with torch.no_grad():
        for batch in (1, 5):
            assert model(torch.randn(batch, 3, 64, 64)).shape == (batch, 7)
    # the MLflow flavour itself (pt2, dynamic batch and size) for non-fra consumers
    with _fluent_uri(registry["uri"]):
        graph = mlflow.pytorch.load_model(f"models:/{NAME}@champion")
    trunk = torchvision.models.resnet18()
    trunk.fc = torch.nn.Identity()
    trunk.load_state_dict(exported, strict=False)
    trunk.eval()
    with torch.no_grad():
        for batch, side in ((1, 64), (5, 64), (3, 96)):
            x = torch.randn(batch, 3, side, side)
            assert torch.allclose(graph(x), trunk(x), atol=1e-4)


@pytest.mark.slow
def test_cli_list_show_and_refused_exit_code(registry, capsys):
    uri = registry["uri"]
    assert fra_main(["registry", "promote", NAME, "1", "--tracking-uri", uri]) == 0
    assert fra_main(["registry", "promote", NAME, "2", "--margin", "0", "--tracking-uri", uri]) == 3
    assert fra_main(["registry", "--tracking-uri", uri, "list"]) == 0
    assert fra_main(["registry", "show", NAME, "--json", "--tracking-uri", uri]) == 0
    out = capsys.readouterr().out
    assert "does not beat" in out and f"{NAME}" in out and '"champion": 1' in out
    assert [m["champion"] for m in list_models(uri) if m["name"] == NAME] == [1]


@pytest.mark.slow
def test_cli_rollback_restores_the_previous_champion_and_records_it(registry, capsys):
    uri = registry["uri"]
    better = _copy_of_v1(registry, 64.0)
    assert fra_main(["registry", "promote", NAME, "1", "--tracking-uri", uri]) == 0
    assert fra_main(["registry", "promote", NAME, str(better), "--tracking-uri", uri]) == 0
    assert show(NAME, uri)["aliases"]["champion"] == better
    capsys.readouterr()

    assert fra_main(["registry", "rollback", NAME, "--tracking-uri", uri]) == 0
    assert f"{NAME} v1: rolled_back" in capsys.readouterr().out
    assert show(NAME, uri)["aliases"]["champion"] == 1
    last = read_history(client(uri), NAME)[-1]
    assert (last["decision"], last["candidate"], last["previous_champion"]) == ("rolled_back", 1, better)
    assert (last["candidate_value"], last["champion_value"]) == (60.0, 64.0) and "@" in last["who"]
    assert fra_main(["registry", "show", NAME, "--tracking-uri", uri]) == 0
    assert f"v1 rolled_back (previous champion {better})" in capsys.readouterr().out

    # v1 was the first champion: nothing earlier to restore, a clear error and the champion stays
    assert fra_main(["registry", "rollback", NAME, "--tracking-uri", uri]) == 1
    assert "first champion" in capsys.readouterr().err
    assert show(NAME, uri)["aliases"]["champion"] == 1


@pytest.mark.slow
def test_dead_server_fails_fast_and_registers_nothing(export_dir, tmp_path, monkeypatch):
    import mlflow

    from fra.mlflow_server import free_port

    monkeypatch.chdir(tmp_path)
    logged = []
    monkeypatch.setattr(mlflow.pytorch, "log_model", lambda *a, **k: logged.append(1))
    uri = f"http://127.0.0.1:{free_port()}"
    t0 = time.monotonic()
    with pytest.raises(RegistryError, match=uri.replace(".", r"\.")) as err:
        register_backbone(export_dir, NAME, tracking_uri=uri, fer_metrics={GATE: 1.0},
                          eval_protocol=PROTOCOL, dataset_fingerprint=FINGERPRINT)
    assert time.monotonic() - t0 < 20
    assert "not reachable" in str(err.value) and not logged
    assert not any(tmp_path.iterdir())  # no stray mlruns/ or mlflow.db
    assert fra_main(["registry", "promote", NAME, "1", "--tracking-uri", uri]) == 1


@pytest.mark.slow
def test_failure_after_logging_leaves_no_ready_version(registry, export_dir, monkeypatch):
    import fra.registry.registration as reg_mod

    uri, name = registry["uri"], "fra-r18-broken"

    def broken(card, metrics):
        raise RuntimeError("simulated failure after the version was created")

    monkeypatch.setattr(reg_mod, "_description", broken)
    with pytest.raises(RegistryError, match="simulated failure"):
        register_backbone(export_dir, name, tracking_uri=uri, fer_metrics={GATE: 70.0},
                          eval_protocol=PROTOCOL, dataset_fingerprint=FINGERPRINT)
    mlc = client(uri)
    assert not mlc.search_model_versions(f"name = '{name}'")
    assert name not in [m.name for m in mlc.search_registered_models()]  # created by the call, removed again
    failed = mlc.search_runs([mlc.get_experiment_by_name("fra-registry").experiment_id],
                             "attributes.status = 'FAILED'")
    assert failed and failed[0].data.tags["fra.registration"].startswith("failed:")


def test_transient_failures_are_retried_with_backoff(monkeypatch):
    from mlflow.exceptions import MlflowException, RestException

    import fra.registry.connection as reg_mod

    sleeps = []
    monkeypatch.setattr(reg_mod.time, "sleep", sleeps.append)
    errors = [ConnectionError("Connection refused"), RestException({"error_code": "TEMPORARILY_UNAVAILABLE",
                                                                    "message": "503"})]

    def flaky():
        if errors:
            raise errors.pop(0)
        return "ok"

    assert reg_mod.call("flaky", flaky) == "ok" and sleeps == [0.5, 1.0]
    with pytest.raises(MlflowException):  # a local INTERNAL_ERROR is not transient: no retry
        reg_mod.call("broken", lambda: (_ for _ in ()).throw(MlflowException("bad")))
    assert sleeps == [0.5, 1.0]


def test_training_checkpoint_is_read_with_a_derived_card(tmp_path):
    from fra.checkpoint import FRA_CHECKPOINT_FORMAT
    from fra.config import to_dict
    from fra.registry import _read_export

    model = build_model(MODEL)
    torch.save({"format": FRA_CHECKPOINT_FORMAT, "arch": "resnet18", "model": model.state_dict(),
                "config": to_dict(PretrainConfig(model=MODEL)), "extra": {}}, tmp_path / "checkpoint.pt")
    export = _read_export(tmp_path, tmp_path / "work")
    assert export.card["architecture"] == "resnet18" and export.card["input_size"] == 224
    assert len(export.card["config_hash"]) == 16
    assert torch.load(export.weights, weights_only=True)["format"] == "fra-backbone/1"
    with torch.no_grad():
        assert export.trunk(torch.randn(2, 3, 64, 64)).shape == (2, 512)


def test_fluent_uri_restores_the_environment(monkeypatch, tmp_path):
    import mlflow
    from mlflow.tracking._tracking_service import utils as tracking_utils

    # Another test may have set a URI in code; only the environment variable is under test here.
    monkeypatch.setattr(tracking_utils, "_tracking_uri", None)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://tracking.example:5000")
    with _fluent_uri(f"sqlite:///{tmp_path}/x.db"):
        assert mlflow.get_tracking_uri().startswith("sqlite:")
    assert mlflow.get_tracking_uri() == "http://tracking.example:5000"
