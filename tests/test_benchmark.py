"""The method benchmark (``kind: benchmark`` pipelines): config checks, aggregation, and a
micro end-to-end run (random init vs FRA, 2 seeds, linear probe) that resumes without work."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from fra.experiments.benchmark import BenchmarkConfig, aggregate, load_benchmark, run_benchmark, table_markdown
from fra.config import from_dict
from fra.errors import ConfigError

PIPELINES = Path(__file__).resolve().parents[1] / "pipelines"

MICRO = {
    "kind": "benchmark", "name": "micro", "seeds": [0, 1],
    "shards": [{"source": "synthetic_faces", "out": "${storage}/shards/fer", "images_per_shard": 64,
                "row_group_size": 32, "options": {"num_identities": 10, "images_per_identity": 7, "size": 32,
                                                  "seed": 1, "intensity": [1.0, 1.1], "jitter": 0.0}}],
    "pretrain": {"model": {"backbone": "resnet18", "hidden_dim": 64, "proj_dim": 32, "num_proto": 4,
                           "decoder_heads": 4, "decoder_ffn": 64},
                 "optim": {"lr": 0.5, "epochs": 1, "warmup_epochs": 0, "batch_size": 16},
                 "data": {"source": "synthetic", "image_size": 32,
                          "synthetic": {"num_identities": 10, "images_per_identity": 4, "size": 32, "seed": 0}},
                 "scaling": {"num_workers": 1}, "run": {"log_every": 1, "heatmaps_every_epoch": False}},
    "methods": [{"name": "random init", "method": "random"}, {"name": "FRA", "method": "fra"}],
    "evaluate": {"linear": {"protocol": "linear",
                            "data": {"shards": "${storage}/shards/fer", "image_size": 32, "normalization": "backbone"},
                            "optim": {"lr": 1.0, "epochs": 2, "warmup_epochs": 0, "batch_size": 16},
                            "scaling": {"num_workers": 0}, "run": {"last_k": 2, "save_model": False}}},
}


def _write(tmp_path: Path, data: dict) -> Path:
    path = tmp_path / "bench.yaml"
    path.write_text(yaml.safe_dump({**data, "storage_path": str(tmp_path / "out")}))
    return path


def test_shipped_benchmark_is_valid_and_fair():
    cfg = load_benchmark(PIPELINES / "benchmark_synthetic.yaml")
    assert [m.method for m in cfg.methods] == ["random", "byol", "swav", "fra"] and len(cfg.seeds) >= 3
    assert set(cfg.evaluate) == {"linear", "finetune"}
    from fra.experiments.benchmark import pretrain_config

    trained = [pretrain_config(cfg, m, 0) for m in cfg.methods if m.method != "random"]
    # Same backbone, data, epochs, batch and workers for every method.
    for attr in ("model.backbone", "data.synthetic", "data.image_size", "optim.epochs", "optim.batch_size",
                 "scaling.num_workers"):
        first, *rest = attr.split(".")
        values = {repr(getattr(getattr(p, first), rest[0])) for p in trained}
        assert len(values) == 1, (attr, values)
    assert [p.model.method for p in trained] == ["byol", "swav", "fra"]
    # The references' learning rates, not scaled by the batch: LARS 0.9 (FRA_SPEC §7) and FRL
    # run.sh's LARC 4.8 / warm-up from 0.3 / final 0.0048 (the trust ratio makes both batch-free).
    from fra.config import effective_lr

    for p in trained:
        o = p.optim
        if o.optimizer == "lars":
            assert effective_lr(o) == 0.9, (p.model.method, o)
        else:
            assert (o.optimizer, o.lr, o.start_warmup, o.final_lr, o.lr_scaling) == ("larc", 4.8, 0.3, 0.0048, "none")


@pytest.mark.parametrize("change, match", [
    ({"methods": [{"name": "x", "method": "simclr"}]}, "method must be one of"),
    ({"methods": [{"name": "x", "method": "fra"}, {"name": "x", "method": "byol"}]}, "unique names"),
    ({"seeds": []}, "seeds"),
    ({"evaluate": {"linear": {"protocol": "knn"}}}, "protocol"),
    ({"pretrain": {"optim": {"epoks": 1}}}, "did you mean"),
])
def test_bad_benchmark_files_fail_before_running(tmp_path, change, match):
    with pytest.raises(ConfigError, match=match):
        load_benchmark(_write(tmp_path, {**MICRO, **change}))


def test_aggregate_mean_std_and_table():
    cfg = from_dict(BenchmarkConfig, {**MICRO, "storage_path": "/tmp/x"})
    cells = {
        "random init/s0": {"seed": 0, "linear": {"top1_mean_last5": 20.0, "top1_last": 20, "mean_class_acc": 20,
                                                 "macro_f1": 10}},
        "random init/s1": {"seed": 1, "linear": {"top1_mean_last5": 30.0, "top1_last": 30, "mean_class_acc": 30,
                                                 "macro_f1": 20}},
        "FRA/s0": {"seed": 0, "linear": {"top1_mean_last5": 50.0, "top1_last": 50, "mean_class_acc": 50,
                                         "macro_f1": 40}, "region": {"miou": 0.3, "nmi": 0.2},
                   "region_init": {"miou": 0.1, "nmi": 0.05}, "region_random_maps": {"miou": 0.08, "nmi": 0.01}},
    }
    rows = aggregate(cfg, cells)
    assert rows["random init"]["linear"]["top1_mean_last5"] == pytest.approx({"mean": 25.0, "std": 7.0710678, "n": 2})
    assert rows["FRA"]["linear"]["top1_mean_last5"]["std"] == 0.0 and rows["FRA"]["region"]["miou"]["mean"] == 0.3
    assert rows["random init"]["region"]["miou"]["mean"] == 0.1  # the random-init FRA's heat maps
    table = table_markdown(cfg, rows)
    assert "| random init | 25.0 ± 7.1 |" in table and "| FRA | 50.0 ± 0.0 |" in table and "0.300 ± 0.000" in table


@pytest.mark.ray
@pytest.mark.slow
def test_micro_benchmark_end_to_end_and_resume(ray_local, tmp_path, capsys):
    cfg = load_benchmark(_write(tmp_path, MICRO))
    rows = run_benchmark(cfg)
    out = Path(cfg.storage_path)
    results = json.loads((out / "results.json").read_text())
    assert set(results["cells"]) == {"random init/s0", "random init/s1", "FRA/s0", "FRA/s1"}
    for name in ("random init", "FRA"):
        stat = rows[name]["linear"]["top1_mean_last5"]
        assert stat["n"] == 2 and 0 <= stat["mean"] <= 100
    assert rows["FRA"]["region"]["miou"]["n"] == 2 and "region" in rows["random init"]
    table = (out / "table.md").read_text()
    assert table.splitlines()[0].startswith("| method | FER linear top-1 (%)") and "| FRA |" in table
    # The two seeds are really different runs.
    fra = [results["cells"][f"FRA/s{s}"] for s in (0, 1)]
    assert fra[0]["pretrain_loss_last"] != fra[1]["pretrain_loss_last"]
    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{out / 'mlflow.db'}")
    runs = client.search_runs([client.get_experiment_by_name("micro").experiment_id],
                              filter_string="tags.mlflow.runName = 'micro-table'")
    assert runs and "FRA.linear.top1_mean_last5.mean" in runs[0].data.metrics
    capsys.readouterr()
    run_benchmark(cfg)  # everything recorded: no cell re-runs
    assert capsys.readouterr().out.count("already done, skipping") == 4
