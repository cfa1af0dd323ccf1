"""Every shipped recipe that uses GPUs fits the shipped ``cluster.yaml`` at its largest.

A node's capacity is its node type's ``resources:`` where given, else what Ray detects on the
instance type (vCPUs and GPUs, table below). A recipe's worker asks what fra asks Ray for
(``resources_per_worker`` for pretraining, one GPU + ``cpus_per_worker`` for FER, the sweep's
``resources``), and every GPU worker leaves ``DATA_CPUS_PER_GPU`` vCPUs of its node to Ray Data's
decode + augment tasks (benchmarks/RESULTS.md: ~1.2 vCPUs of Ray Data per A10G, 2 with headroom).
GPU memory is not modelled; the recipes' comments say what per-GPU batch they assume.
"""
from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from fra.config import PretrainConfig, load_config, load_yaml, per_worker_batch

ROOT = Path(__file__).resolve().parents[1]
CLUSTER_YAML = ROOT / "cluster.yaml"
# What Ray detects on the EC2 instance types cluster.yaml may use (vCPUs, GPUs).
INSTANCE_TYPES = {
    "m5.2xlarge": {"CPU": 8},
    "m5.4xlarge": {"CPU": 16},
    "g5.xlarge": {"CPU": 4, "GPU": 1},
    "g5.2xlarge": {"CPU": 8, "GPU": 1},
    "g5.12xlarge": {"CPU": 48, "GPU": 4},
    "g6.2xlarge": {"CPU": 8, "GPU": 1},
    "p4d.24xlarge": {"CPU": 96, "GPU": 8},
}
DATA_CPUS_PER_GPU = 2
COLD_NODE_START_S = 20 * 60  # EC2 boot + image pull, or the torch install without the prebuilt image
RECIPES = sorted(p for d in ("pipelines", "tune_configs") for p in (ROOT / d).glob("*.yaml"))
MUST_FIT = {"pretrain_vggface2.yaml", "pretrain_frl_swav.yaml", "fer_rafdb.yaml", "fer_rafdb_finetune.yaml",
            "fra_space.yaml"}


def cluster_nodes(cluster: dict) -> list[dict[str, float]]:
    """Resources of every node the cluster can have at once (head + each type at its max)."""
    nodes, budget = [], cluster["max_workers"]
    for name, node_type in cluster["available_node_types"].items():
        resources = {**INSTANCE_TYPES[node_type["node_config"]["InstanceType"]], **(node_type.get("resources") or {})}
        count = 1 if name == cluster["head_node_type"] else min(node_type.get("max_workers", 0), budget)
        budget -= 0 if name == cluster["head_node_type"] else count
        nodes += [resources] * count
    return nodes


def placeable(need: dict[str, float], nodes: list[dict[str, float]]) -> int:
    """How many workers asking ``need`` the nodes hold, with Ray Data's vCPUs left on GPU nodes."""
    cost = {**need, "CPU": need.get("CPU", 0) + DATA_CPUS_PER_GPU * need.get("GPU", 0)}
    return sum(min(int(node.get(k, 0) // v) for k, v in cost.items() if v > 0) for node in nodes)


def gpu_jobs(path: Path) -> list[tuple[str, int, dict, object]]:
    """(what, workers, per-worker resources, config) of every GPU worker group a recipe starts."""
    from fra.evaluation.fer import FERConfig
    from fra.pipeline import load_pipeline, stage_config
    from fra.train.ray_trainer import resources_per_worker, worker_range
    from fra.tuning.config import load_sweep_config

    raw = load_yaml(path)
    configs = []
    if "stages" in raw:
        pipeline = load_pipeline(path)
        configs = [stage_config(pipeline, s) for s in pipeline.stages if s in ("pretrain", "evaluate", "sweep")]
    elif "space" in raw:
        configs = [load_sweep_config(path)]
    elif "protocol" in raw:
        configs = [load_config(FERConfig, path)]
    elif "model" in raw:
        from fra.cli.pretrain import load_pretrain_config

        configs = [load_pretrain_config(str(path))]
    else:  # e.g. the synthetic benchmark: CPU only
        assert "use_gpu: true" not in path.read_text() and "gpus_per_worker" not in path.read_text(), path
    jobs = []
    for cfg in configs:
        if isinstance(cfg, PretrainConfig) and cfg.scaling.use_gpu:
            jobs.append(("pretrain", worker_range(cfg)[1], resources_per_worker(cfg), cfg))
        elif isinstance(cfg, FERConfig) and cfg.scaling.use_gpu and cfg.scaling.num_workers:
            # fra.evaluation.fer: ScalingConfig(use_gpu=True, resources_per_worker={"CPU": ...}): 1 GPU each
            jobs.append(("fer", cfg.scaling.num_workers, {"CPU": cfg.scaling.cpus_per_worker, "GPU": 1.0}, cfg))
        elif hasattr(cfg, "resources") and cfg.resources.gpus_per_worker > 0:
            r = cfg.resources
            jobs.append(("sweep", r.workers, {"CPU": r.cpus_per_worker, "GPU": r.gpus_per_worker}, cfg))
    return jobs


@pytest.fixture(scope="module")
def nodes() -> list[dict[str, float]]:
    return cluster_nodes(yaml.safe_load(CLUSTER_YAML.read_text()))


def test_the_cluster_as_the_tests_see_it(nodes):
    gpu_nodes = [n for n in nodes if n.get("GPU")]
    assert len(gpu_nodes) == 4 and all(n == {"CPU": 8, "GPU": 1} for n in gpu_nodes)  # 4 x g5.2xlarge
    assert [n for n in nodes if not n.get("GPU")] == [{"CPU": 0}]  # the head trains nothing


def test_every_gpu_recipe_is_checked():
    checked = {p.name for p in RECIPES if gpu_jobs(p)}
    assert MUST_FIT <= checked, f"not recognised as GPU recipes: {MUST_FIT - checked}"


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: f"{p.parent.name}/{p.name}")
def test_recipe_fits_the_shipped_cluster(path, nodes):
    for what, workers, need, cfg in gpu_jobs(path):
        assert placeable(need, nodes) >= workers, (
            f"{path.name} {what}: {workers} workers x {need} (+{DATA_CPUS_PER_GPU} vCPUs of Ray Data per GPU) "
            f"do not fit cluster.yaml's nodes {nodes}")
        if what == "pretrain":
            per_worker_batch(cfg.optim.batch_size, workers)
            assert cfg.scaling.placement_timeout_s >= COLD_NODE_START_S, f"{path.name}: a cold node start is longer"
        if what == "sweep":
            from fra.tuning.config import resolve, trial_need

            trial = trial_need(cfg, resolve(cfg))
            total = {k: sum(n.get(k, 0) for n in nodes) for k in trial}
            assert all(cfg.max_concurrent_trials * v <= total[k] for k, v in trial.items()), (
                f"{path.name}: max_concurrent_trials={cfg.max_concurrent_trials} x {trial} > cluster {total}")
            default = PretrainConfig().scaling.placement_timeout_s
            assert (cfg.pretrain.get("scaling") or {}).get("placement_timeout_s", default) >= COLD_NODE_START_S


def test_the_check_rejects_what_did_not_fit(nodes):
    """The recipes as they were before issue 13: 8 GPU workers (pretraining), 8 vCPUs per GPU worker (sweep)."""
    assert placeable({"CPU": 6, "GPU": 1}, nodes) == 4 < 8  # pretrain_vggface2's 8 x (6 vCPUs, 1 GPU)
    assert placeable({"CPU": 1, "GPU": 1}, nodes) == 4
    assert placeable({"CPU": 8, "GPU": 1}, nodes) == 0  # fra_space's workers: no vCPU left for Ray Data
    assert placeable({"CPU": 7, "GPU": 1}, nodes) == 0
    big = {"max_workers": 2, "head_node_type": "head", "available_node_types": {
        "head": {"resources": {"CPU": 0}, "node_config": {"InstanceType": "m5.2xlarge"}},
        "gpu": {"max_workers": 2, "resources": {}, "node_config": {"InstanceType": "p4d.24xlarge"}}}}
    assert placeable({"CPU": 6, "GPU": 1}, cluster_nodes(big)) == 16
