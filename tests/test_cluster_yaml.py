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
    assert mounts["~/fra/fra"] == "./fra" and "~/fra/pyproject.toml" in mounts
    root = CLUSTER_YAML.parent
    missing = [src for src in mounts.values() if not src.startswith("~") and not (root / src).exists()]
    assert not missing, f"file_mounts sources missing from the checkout: {missing}"
    assert not any(src in (".", "./") for src in mounts.values()), "mounting the whole checkout hashes .venv"
    assert "s3://" in setup and "FRA_STORAGE_PATH" in setup and "FRA_SHARDS_URI" in setup


def _ray_starts(cfg: dict, key: str) -> list[list[str]]:
    """The words of each `ray start` in a start-command list, with the env assignments before it."""
    out = []
    for cmd in cfg[key]:
        for part in re.split(r";|&&|\|\|", cmd):
            words = shlex.split(part)
            if "ray" in words and words[words.index("ray") + 1:words.index("ray") + 2] == ["start"]:
                out.append(words)
    return out


def test_every_node_joins_with_the_token(cfg):
    """Ray 2.60: a worker's `ray start --address` without RAY_AUTH_MODE=token is refused by a head
    with token auth (AuthenticationError ... InvalidAuthToken; seen on a two-raylet cluster here)."""
    heads, workers = _ray_starts(cfg, "head_start_ray_commands"), _ray_starts(cfg, "worker_start_ray_commands")
    assert len(heads) == 1 and "--head" in heads[0] and len(workers) == 1 and "--address=$RAY_HEAD_IP:6379" in workers[0]
    for words in heads + workers:
        env = words[:words.index("ray")]
        assert "RAY_AUTH_MODE=token" in env, f"`ray start` without RAY_AUTH_MODE=token: {words}"
    # the one token, made once with `ray get-auth-token --generate`, is copied to every node
    assert cfg["file_mounts"]["~/.ray/auth_token"] == "~/.ray/auth_token"
    assert not any("RAY_AUTH_TOKEN=" in c for c in cfg["setup_commands"] + cfg["head_start_ray_commands"])
    # jobs and shells on the nodes see the mode too (ray job submit on the head, ray.init in jobs)
    fra_env = cfg["metadata"]["fra_env"]
    assert "'export RAY_AUTH_MODE=token'" in fra_env and "> ~/fra.env" in fra_env
    assert cfg["setup_commands"][0] == fra_env


def test_token_check_catches_a_worker_without_the_mode(cfg):
    broken = copy.deepcopy(cfg)
    broken["worker_start_ray_commands"] = [c.replace("RAY_AUTH_MODE=token ", "") for c in cfg["worker_start_ray_commands"]]
    with pytest.raises(AssertionError, match="without RAY_AUTH_MODE=token"):
        test_every_node_joins_with_the_token(broken)


def test_site_values_are_in_one_place(cfg):
    """Region, zones, image, instance profile and the bucket are written once, in `metadata`."""
    text = CLUSTER_YAML.read_text()
    meta = cfg["metadata"]
    assert cfg["provider"]["region"] == meta["region"] and cfg["provider"]["availability_zone"] == meta["zones"]
    assert cfg["docker"]["image"] == meta["image"]
    assert cfg["available_node_types"]["gpu_worker"]["node_config"]["IamInstanceProfile"]["Name"] == \
        meta["worker_instance_profile"]
    assert text.count(meta["region"]) == 1 + meta["image"].count(meta["region"]) + meta["zones"].count(meta["region"])
    assert text.count("s3://") == 1 and "s3://" in meta["fra_env"]
    for key in ("setup_commands", "head_setup_commands", "worker_setup_commands", "head_start_ray_commands"):
        assert "s3://" not in " ".join(cfg[key][1:] if key == "setup_commands" else cfg[key])


def test_mlflow_database_is_restored_and_backed_up_by_the_head(cfg):
    start = " ".join(cfg["head_start_ray_commands"])
    restore, server = start.index("fra mlflow-db restore"), start.index("mlflow server")
    watch = start.index("fra mlflow-db watch")
    assert restore < server < watch, "restore before the server starts, back up while it runs"
    assert '--from "$FRA_MLFLOW_DB_BACKUP"' in start and '--to "$FRA_MLFLOW_DB_BACKUP"' in start
    between = start[restore:server]
    assert "&&" in between and ";" not in between, "a failed restore must not start an empty server"
    assert "sqlite:///$HOME/mlflow/mlflow.db" in start and "--db ~/mlflow/mlflow.db" in start


def test_dockerfile_matches_the_pins():
    dockerfile = (CLUSTER_YAML.parent / "docker" / "Dockerfile").read_text()
    pyproject = (CLUSTER_YAML.parent / "pyproject.toml").read_text()
    base = re.search(r"^FROM rayproject/ray:(\S+)-py(\d)(\d+)-gpu$", dockerfile, re.M)
    assert base, "the image builds on Ray's official GPU image"
    assert f'"ray[default,train,tune,data]=={base.group(1)}"' in pyproject
    torch_max = re.search(r'"torch>=[^,]+,<=([^"]+)"', pyproject).group(1)
    assert f'"torch=={torch_max}"' in dockerfile


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
