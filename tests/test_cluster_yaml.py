"""`cluster.yaml` passes Ray's own offline validation, broken copies fail, MLflow stays private.

``prepare_config`` + ``validate_config`` is what ``ray up`` runs before it talks to AWS; both are
private Ray functions, so this also guards the pinned Ray version (RAY_NOTES §7). No boto3 needed.
"""
import copy
import ipaddress
import re
import shlex
from pathlib import Path

import pytest
import yaml

CLUSTER_YAML = Path(__file__).resolve().parents[1] / "cluster.yaml"
MLFLOW_PORT = 5000


def _validate(cfg: dict) -> dict:
    from ray.autoscaler._private.util import prepare_config, validate_config

    prepared = prepare_config(copy.deepcopy(cfg))
    validate_config(prepared)
    return prepared


@pytest.fixture(scope="module")
def cfg() -> dict:
    return yaml.safe_load(CLUSTER_YAML.read_text())


def test_cluster_yaml_is_valid(cfg):
    prepared = _validate(cfg)
    head = prepared["available_node_types"][prepared["head_node_type"]]
    assert head["resources"] == {"CPU": 0}  # nothing trains on the head
    worker = prepared["available_node_types"]["gpu_worker"]
    assert worker["node_config"]["InstanceType"] == "g5.2xlarge"
    assert worker["node_config"]["InstanceMarketOptions"]["MarketType"] == "spot"
    assert 0 <= worker["min_workers"] <= worker["max_workers"] <= prepared["max_workers"]
    setup = " ".join(prepared["setup_commands"])
    assert '"ray[default,train,tune,data]==2.60.0"' in setup and "-e ~/fra" in setup
    mounts = prepared["file_mounts"]
    assert mounts["/home/ubuntu/fra/fra"] == "./fra" and "/home/ubuntu/fra/pyproject.toml" in mounts
    root = CLUSTER_YAML.parent
    missing = [src for src in mounts.values() if not (root / src).exists()]
    assert not missing, f"file_mounts sources missing from the checkout: {missing}"
    assert not any(src in (".", "./") for src in mounts.values()), "mounting the whole checkout hashes .venv"
    assert "s3://" in setup and "FRA_STORAGE_PATH" in setup and "FRA_SHARDS_URI" in setup


@pytest.mark.parametrize("breakage, error", [
    (lambda c: c.__setitem__("availble_node_types", c.pop("available_node_types")), "availble_node_types"),
    (lambda c: c.__setitem__("max_workers", "four"), "four"),
    (lambda c: c["available_node_types"]["gpu_worker"].__setitem__("gpus", 1), "gpus"),
    (lambda c: c.__setitem__("head_node_type", "no_such_type"), "head_node_type"),
])
def test_broken_copies_are_rejected(cfg, breakage, error):
    broken = copy.deepcopy(cfg)
    breakage(broken)
    with pytest.raises(Exception, match=error):
        _validate(broken)


def _mlflow_commands(cfg: dict) -> list[list[str]]:
    cmds = []
    for cmd in cfg["head_start_ray_commands"] + cfg.get("setup_commands", []) + cfg.get("head_setup_commands", []):
        for part in re.split(r";|&&|\|\|", cmd):
            words = shlex.split(part.replace("&", " ").replace(">", " > ")) if "mlflow" in part else []
            if "server" in words and any(w.endswith("mlflow") for w in words):
                cmds.append(words)
    return cmds


def _option(words: list[str], name: str) -> str | None:
    return words[words.index(name) + 1] if name in words else None


def test_mlflow_server_binds_the_private_address_only(cfg):
    servers = _mlflow_commands(cfg)
    assert len(servers) == 1, servers
    words = servers[0]
    host = _option(words, "--host") or _option(words, "-h")
    assert host is not None, "the MLflow server must name its bind address"
    assert host not in ("0.0.0.0", "::", "[::]", "*", "")
    assert host == "$FRA_HEAD_IP"  # the head's private IPv4, from the instance metadata service
    assert _option(words, "--allowed-hosts"), "restrict Host headers to the private network"
    head_setup = " ".join(cfg["head_setup_commands"])
    assert "meta-data/local-ipv4" in head_setup and "FRA_HEAD_IP" in head_setup


def test_no_public_ingress_to_the_mlflow_port(cfg):
    rules = cfg["provider"].get("security_group", {}).get("IpPermissions", [])
    for rule in rules:
        lo, hi = rule.get("FromPort", -1), rule.get("ToPort", -1)
        covers = rule.get("IpProtocol") == "-1" or lo == -1 or lo <= MLFLOW_PORT <= hi
        public = [r for r in rule.get("IpRanges", []) if ipaddress.ip_network(r["CidrIp"]).num_addresses > 2 ** 24]
        public += [r for r in rule.get("Ipv6Ranges", []) if ipaddress.ip_network(r["CidrIpv6"]).prefixlen == 0]
        assert not (covers and public), f"security group rule opens port {MLFLOW_PORT} publicly: {rule}"
    for node_type in cfg["available_node_types"].values():
        assert "SecurityGroupIds" not in node_type["node_config"], "use the cluster's own security group"


def test_ingress_check_catches_an_open_rule(cfg):
    opened = copy.deepcopy(cfg)
    opened["provider"]["security_group"]["IpPermissions"] = [
        {"FromPort": 5000, "ToPort": 5000, "IpProtocol": "tcp", "IpRanges": [{"CidrIp": "0.0.0.0/0"}]}]
    with pytest.raises(AssertionError, match="publicly"):
        test_no_public_ingress_to_the_mlflow_port(opened)
