"""A real `mlflow server` process: register, promote and load a backbone over HTTP, then stop it.

Start-up alone takes about 12 s on an idle 2-core machine (RAY_NOTES §5), so the end-to-end test
is marked slow.
"""
import socket

import pytest
import torch

from fra.config import ModelConfig, PretrainConfig
from fra.errors import FraError
from fra.mlflow_server import MlflowServer, local_server
from fra.models import build_model
from fra.registry import load_registered, promote, register_backbone, show
from fra.train.checkpointing import export_backbone

MODEL = ModelConfig(backbone="resnet18", hidden_dim=64, proj_dim=32, num_proto=4, decoder_heads=4, decoder_ffn=64)


def _port_open(host: str, port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(1)
        return s.connect_ex((host, port)) == 0


def test_refuses_to_bind_all_interfaces(tmp_path):
    server = MlflowServer(f"sqlite:///{tmp_path}/mlflow.db", str(tmp_path / "artifacts"), host="0.0.0.0")
    with pytest.raises(FraError, match="all interfaces"):
        server.start()
    assert server.process is None


@pytest.mark.slow
def test_register_promote_load_through_a_real_server(tmp_path):
    torch.set_num_threads(1)
    torch.manual_seed(0)
    export_backbone(build_model(MODEL), tmp_path / "export", PretrainConfig(model=MODEL), 64)
    server = local_server(tmp_path / "server")
    with server:
        assert server.host == "127.0.0.1" and _port_open("127.0.0.1", server.port)
        uri = server.url
        v = register_backbone(tmp_path / "export", "fra-http", tracking_uri=uri,
                              fer_metrics={"fer_top1_mean_last5": 50.0}, eval_protocol="linear/x/test",
                              dataset_fingerprint="fp")
        decision = promote("fra-http", v.version, tracking_uri=uri)
        assert decision.promoted
        assert show("fra-http", uri)["aliases"] == {"champion": 1}  # '1' (str) over HTTP, normalised to int
        model = load_registered("models:/fra-http@champion", tracking_uri=uri, num_classes=3)
        with torch.no_grad():
            assert model(torch.randn(5, 3, 64, 64)).shape == (5, 3)
        # artifacts were proxied into the server's own artifact root, not written by the client elsewhere
        assert any((tmp_path / "server" / "artifacts").rglob("backbone.pt"))
        pid, port = server.process.pid, server.port
    assert server.process is None and not _port_open("127.0.0.1", port)
    with pytest.raises(ProcessLookupError):
        import os

        os.kill(pid, 0)
