"""Secrets never leave the process (fra.redaction): URI credentials, secret-named keys and the
environment's secret values are redacted in files, MLflow and log lines. The demo pipeline run with
a canary secret in its environment and in a URI of its config, which writes the canary nowhere, is
``tests/test_console.py::test_demo_pipeline_writes_no_secret`` (it shares the console test's run)."""
from __future__ import annotations

import json
import logging
import secrets
import zipfile

import pytest
import yaml

from fra.redaction import MASK, redact, redact_text


@pytest.fixture
def env_secret(monkeypatch):
    value = f"fra-canary-env-{secrets.token_hex(6)}"
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", value)
    return value


@pytest.mark.parametrize("uri, clean", [
    ("s3://AKID:abc123@bucket/x", "s3://***@bucket/x"),
    ("s3://AKID:wJalr/K7MDENG+bPx@bucket/x", "s3://***@bucket/x"),  # an AWS secret pasted unescaped
    ("http://user:pw@mlflow:5000/api", "http://***@mlflow:5000/api"),
    ("see gs://k:s@b/x and s3://b/y", "see gs://***@b/x and s3://b/y"),
    ("s3://b/x?X-Amz-Security-Token=tok&region=eu", "s3://b/x?X-Amz-Security-Token=***&region=eu"),
    ("s3://b/x?access_key=a&secret_key=b", "s3://b/x?access_key=***&secret_key=***"),
    ("http://mlflow:5000/models/a@b", "http://mlflow:5000/models/a@b"),  # a port, not a password
    ("sqlite:////tmp/runs/mlflow.db", "sqlite:////tmp/runs/mlflow.db"),
    ("s3://bucket/runs/demo", "s3://bucket/runs/demo"),
])
def test_uri_credentials_are_cut(uri, clean):
    assert redact_text(uri) == clean


def test_environment_secrets_secret_keys_and_nesting(env_secret, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", "fra-canary-pw-42")
    monkeypatch.setenv("RAY_AUTH_TOKEN_PATH", "/nonexistent/auth_token")  # a path, not a secret
    monkeypatch.setenv("FRA_SHORT_TOKEN", "x1")  # too short to be searched for
    cfg = {"data": {"shards": f"s3://bucket/{env_secret}/x", "split": "train"},
           "tracking": {"password": "hunter2", "token": "", "num_tokens": 3},
           "credentials": {"id": "AKID", "more": ["a"]},
           "notes": ("fra-canary-pw-42 in a tuple", "x1 stays"),
           f"key-{env_secret}": 1}
    out = redact(cfg)
    assert out["data"] == {"shards": f"s3://bucket/{MASK}/x", "split": "train"}
    assert out["tracking"] == {"password": MASK, "token": "", "num_tokens": 3}
    assert out["credentials"] == {"id": MASK, "more": [MASK]}
    assert out["notes"] == (f"{MASK} in a tuple", "x1 stays")
    assert f"key-{MASK}" in out
    assert cfg["tracking"]["password"] == "hunter2"  # a copy: the live config keeps its values
    assert redact_text("/nonexistent/auth_token") == "/nonexistent/auth_token"


def test_ray_auth_token_file_is_a_secret(tmp_path, monkeypatch):
    token = f"fra-canary-ray-{secrets.token_hex(8)}"
    (tmp_path / "auth_token").write_text(token + "\n")
    monkeypatch.setenv("RAY_AUTH_TOKEN_PATH", str(tmp_path / "auth_token"))
    assert redact_text(f"token {token}") == f"token {MASK}"


def test_files_written_by_fra_are_redacted(tmp_path, env_secret):
    from fra import storage as st
    from fra.config import PretrainConfig, dump_yaml, from_dict
    from fra.utils.io import atomic_write_json

    uri = f"s3://AKIDCANARY:uri-secret@bucket/{env_secret}"
    cfg = from_dict(PretrainConfig, {"data": {"shards": uri}})
    dump_yaml(cfg, tmp_path / "config.yaml")
    atomic_write_json(tmp_path / "a.json", {"uri": uri, "api_key": "k-123"})
    st.write_json(str(tmp_path / "b.json"), {"uri": uri})
    st.write_text(str(tmp_path / "c.txt"), f"root: {uri}\n")
    for f in tmp_path.iterdir():
        text = f.read_text()
        assert "uri-secret" not in text and "AKIDCANARY" not in text and env_secret not in text, f.name
    assert yaml.safe_load((tmp_path / "config.yaml").read_text())["data"]["shards"] == f"s3://***@bucket/{MASK}"
    assert json.loads((tmp_path / "a.json").read_text())["api_key"] == MASK
    assert cfg.data.shards == uri  # the live config is untouched


def test_checkpoint_and_model_card_hold_the_redacted_config(tmp_path, env_secret):
    import torch

    from fra.checkpoint import safe_load
    from fra.config import PretrainConfig, from_dict
    from fra.engine import TrainState
    from fra.models import build_model
    from fra.train.checkpointing import export_backbone, save_checkpoint

    cfg = from_dict(PretrainConfig, {"model": {"backbone": "resnet18", "hidden_dim": 32, "proj_dim": 16,
                                               "num_proto": 2, "decoder_heads": 2, "decoder_ffn": 16},
                                     "data": {"shards": f"s3://AKIDCANARY:uri-secret@bucket/{env_secret}"}})
    model = build_model(cfg.model)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    save_checkpoint(tmp_path / "checkpoint.pt", model, opt, TrainState(), cfg, extra={"root": env_secret})
    _, card = export_backbone(model, tmp_path / "export", cfg, 64)
    assert safe_load(tmp_path / "checkpoint.pt")["config"]["data"]["shards"] == f"s3://***@bucket/{MASK}"
    for f in [tmp_path / "checkpoint.pt", card]:
        assert not _found_in(f.read_bytes(), [b"uri-secret", b"AKIDCANARY", env_secret.encode()]), f


def test_log_lines_of_fra_loggers_are_redacted(caplog, env_secret):
    caplog.set_level(logging.INFO)
    log = logging.getLogger("fra.some.module")
    log.info("opening %s", f"s3://AKIDCANARY:uri-secret@bucket/{env_secret}")
    try:
        raise ValueError(f"cannot open s3://k:uri-secret@b ({env_secret})")
    except ValueError:
        log.exception("failed")
    text = caplog.text
    assert "opening s3://***@bucket/***" in text and "ValueError: cannot open s3://***@b (***)" in text
    assert "uri-secret" not in text and env_secret not in text and "AKIDCANARY" not in text


def test_cli_console_is_redacted(tmp_path, env_secret, capsys):
    from fra.cli.main import main

    assert main(["pretrain", str(tmp_path / f"{env_secret}.yaml")]) == 1
    err = capsys.readouterr().err
    assert "config file not found" in err and env_secret not in err


def test_mlflow_params_and_tags_are_redacted(tmp_path, env_secret):
    from mlflow.tracking import MlflowClient

    from fra import tracking

    uri = f"sqlite:///{tmp_path}/mlflow.db"
    run_id, _ = tracking.start_run(uri, "exp", f"s3://AKIDCANARY:uri-secret@b/{env_secret}", "run",
                                   {"data.shards": "s3://AKIDCANARY:uri-secret@b/x", "tracking.password": "pw-12345",
                                    "note": env_secret}, tags={"fra.source": "s3://k:uri-secret@b"})
    run = MlflowClient(uri).get_run(run_id)
    assert run.data.params["data.shards"] == "s3://***@b/x" and run.data.params["tracking.password"] == MASK
    assert run.data.params["note"] == MASK and run.data.tags["fra.source"] == "s3://***@b"
    shown = json.dumps([run.data.params, run.data.tags])
    assert "uri-secret" not in shown and env_secret not in shown and "pw-12345" not in shown
    again, resumed = tracking.start_run(uri, "exp", f"s3://AKIDCANARY:uri-secret@b/{env_secret}", "run", {})
    assert (again, resumed) == (run_id, True)  # the redacted run key still finds the run


# ---- end to end ------------------------------------------------------------------------------
def _found_in(data: bytes, canaries: list[bytes]) -> list[bytes]:
    """Canaries in ``data``, or in any member of it read as a zip archive (torch checkpoints)."""
    hits = [c for c in canaries if c in data]
    if data[:4] == b"PK\x03\x04":
        import io

        with zipfile.ZipFile(io.BytesIO(data)) as zf:
            for name in zf.namelist():
                hits += [c for c in canaries if c in zf.read(name) or c in name.encode()]
    return hits


def _mlflow_strings(uri: str) -> list[str]:
    """Every param, tag and metric name of every run, and every registered model's and version's
    tags and description in the MLflow store at ``uri``."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(uri)
    out: list[str] = []
    for exp in client.search_experiments():
        out += [exp.name, *exp.tags.keys(), *exp.tags.values()]
        for run in client.search_runs([exp.experiment_id]):
            out += [run.info.run_name or "", *run.data.params.keys(), *run.data.params.values(),
                    *run.data.tags.keys(), *run.data.tags.values(), *run.data.metrics.keys()]
    for model in client.search_registered_models():
        out += [model.name, model.description or "", *model.tags.keys(), *model.tags.values()]
        for mv in client.search_model_versions(f"name = '{model.name}'"):
            out += [mv.description or "", mv.source or "", *mv.tags.keys(), *mv.tags.values()]
    return out


@pytest.mark.slow
def test_tracking_credentials_are_never_recorded(tmp_path, env_secret, caplog, monkeypatch):
    """MLflow credentials in the environment (the standard way) or in a live tracking URI
    (``http://user:secret@host``, which MLflow's client opens) and a config carrying secrets: the
    server's database and artifact store, and the log, never hold them."""
    import torch

    from fra import tracking
    from fra.config import PretrainConfig, from_dict
    from fra.mlflow_server import local_server
    from fra.models import build_model
    from fra.registry import register_backbone
    from fra.train.checkpointing import export_backbone

    caplog.set_level(logging.INFO)
    uri_secret = f"fra-canary-uri-{secrets.token_hex(6)}"
    password = f"fra-canary-pw-{secrets.token_hex(6)}"
    monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", "fra-user")
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", password)  # sent as basic auth, ignored by this server
    cfg = from_dict(PretrainConfig, {"model": {"backbone": "resnet18", "hidden_dim": 32, "proj_dim": 16, "num_proto": 2,
                                               "decoder_heads": 2, "decoder_ffn": 16},
                                     "data": {"shards": f"s3://AKIDCANARY:{uri_secret}@bucket/{env_secret}"}})
    torch.manual_seed(0)
    _, card_path = export_backbone(build_model(cfg.model), tmp_path / "export", cfg, 64)
    # A card written by something else than fra's writers (an older fra, a hand-made export).
    card = json.loads(card_path.read_text())
    card["config"]["data"]["shards"] = cfg.data.shards
    card_path.write_text(json.dumps(card))
    with local_server(tmp_path / "server") as server:
        live = server.url.replace("http://", f"http://AKIDCANARY:{uri_secret}@")
        run_id, _ = tracking.start_run(live, "fra-pretrain", f"{tmp_path}/run", "run",
                                       {"tracking.mlflow_uri": live, "data.shards": cfg.data.shards})
        version = register_backbone(tmp_path / "export", "fra-secret", tracking_uri=server.url,
                                    fer_metrics={"fer_top1_mean_last5": 50.0}, eval_protocol="linear/x/test")
        assert version.version == 1
        shown = _mlflow_strings(server.url)
        assert f"http://***@127.0.0.1:{server.port}" in shown and run_id
    canaries = [uri_secret.encode(), b"AKIDCANARY", env_secret.encode(), password.encode()]
    leaks = {str(f): hits for f in (tmp_path / "server").rglob("*") if f.is_file()
             and (hits := _found_in(f.read_bytes(), canaries))}
    assert not leaks
    logged = [json.loads(f.read_text()) for f in (tmp_path / "server").rglob("model_card.json")]
    assert logged and all(c["config"]["data"]["shards"] == f"s3://***@bucket/{MASK}" for c in logged)
    assert not [s for s in shown if any(c.decode() in s for c in canaries)]
    assert not [c for c in canaries if c.decode() in caplog.text]
