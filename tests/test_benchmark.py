"""The method benchmark (``kind: benchmark`` pipelines): config checks, aggregation, per-part
resume (jobs replaced by counters, no Ray), and a micro end-to-end run (random init vs FRA,
2 seeds, linear probe) that resumes without work."""
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
LANDMARKS = {"data": {"shards": "${storage}/shards/lm", "image_size": 32}, "model": {"deconv_channels": 8},
             "optim": {"epochs": 1, "batch_size": 8}, "scaling": {"num_workers": 0}}
ATTRIBUTES = {"protocol": "linear", "data": {"shards": "${storage}/shards/attr", "image_size": 32},
              "optim": {"epochs": 1, "warmup_epochs": 0, "batch_size": 8}, "scaling": {"num_workers": 0}}


def _write(tmp_path: Path, data: dict) -> Path:
    path = tmp_path / "bench.yaml"
    path.write_text(yaml.safe_dump({**data, "storage_path": str(tmp_path / "out")}))
    return path


def test_shipped_benchmark_is_valid_and_fair():
    cfg = load_benchmark(PIPELINES / "benchmark_synthetic.yaml")
    assert [m.method for m in cfg.methods] == ["random", "byol", "swav", "fra"] and len(cfg.seeds) >= 3
    assert set(cfg.evaluate) == {"linear", "finetune"}
    assert set(cfg.landmarks) == {"finetune"} and set(cfg.attributes) == {"linear"}
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
    # Every evaluation reads shards of identities disjoint from pretraining (other generator seeds),
    # the same shards and budget for every method.
    from fra.experiments.benchmark import eval_config, evaluations

    pre_seed = cfg.pretrain["data"]["synthetic"]["seed"]
    jobs = {j.out: j for j in cfg.shards}
    for task, label in evaluations(cfg):
        evs = [eval_config(cfg, m, 0, task, label) for m in cfg.methods]
        assert len({(e.data.shards, repr(e.optim), repr(e.data)) for e in evs}) == 1, (task, label)
        assert jobs[evs[0].data.shards].options["seed"] != pre_seed, (task, label)


@pytest.mark.parametrize("change, match", [
    ({"methods": [{"name": "x", "method": "simclr"}]}, "method must be one of"),
    ({"methods": [{"name": "x", "method": "fra"}, {"name": "x", "method": "byol"}]}, "unique names"),
    ({"seeds": []}, "seeds"),
    ({"evaluate": {"linear": {"protocol": "knn"}}}, "protocol"),
    ({"pretrain": {"optim": {"epoks": 1}}}, "did you mean"),
    ({"landmarks": {"ft": {"model": {"loss": "mse"}}}}, "landmarks.ft.model.loss"),
    ({"attributes": {"lin": {"protocol": "knn"}}}, "attributes.lin.protocol"),
    ({"evaluate": {"landmarks": {"protocol": "linear"}}}, "clash"),
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


def test_aggregate_landmarks_attributes_and_normalised_region():
    cfg = from_dict(BenchmarkConfig, {**MICRO, "storage_path": "/tmp/x", "landmarks": {"ft": LANDMARKS},
                                      "attributes": {"lin": ATTRIBUTES}})
    fer = {"top1_mean_last5": 20.0, "top1_last": 20, "mean_class_acc": 20, "macro_f1": 10}
    cells = {
        "random init/s0": {"seed": 0, "linear": fer, "landmarks": {"ft": {"nme_mean_last_k": 9.0}},
                           "attributes": {"lin": {"mean_acc_mean_last_k": 80.0, "mean_balanced_acc_last": 50.0,
                                                  "majority_acc": 79.0}}},
        "FRA/s0": {"seed": 0, "linear": fer, "landmarks": {"ft": {"nme_mean_last_k": 5.0}},
                   "attributes": {"lin": {"mean_acc_mean_last_k": 84.0, "mean_balanced_acc_last": 60.0,
                                          "majority_acc": 79.0}},
                   "region": {"miou": 0.3, "nmi": 0.2, "norm_nmi": 0.5},
                   "region_init": {"miou": 0.1, "nmi": 0.04, "norm_nmi": 0.1},
                   "region_anchors": {"floor_nmi": 0.0, "oracle_nmi": 0.4}},
        "FRA/s1": {"seed": 1, "linear": fer, "landmarks": {"ft": {"nme_mean_last_k": 7.0}},
                   "attributes": {"lin": {"mean_acc_mean_last_k": 86.0, "mean_balanced_acc_last": 70.0,
                                          "majority_acc": 79.0}},
                   "region": {"miou": 0.3, "nmi": 0.24, "norm_nmi": 0.6}},
    }
    rows = aggregate(cfg, cells)
    # hand-computed: NME (5, 7) -> 6 ± sqrt(2); norm NMI (0.5, 0.6) -> 0.55 ± 0.0707
    assert rows["FRA"]["landmarks"]["ft"]["nme_mean_last_k"] == pytest.approx({"mean": 6.0, "std": 1.4142136, "n": 2})
    assert rows["FRA"]["region"]["norm_nmi"] == pytest.approx({"mean": 0.55, "std": 0.0707107, "n": 2})
    assert rows["random init"]["region"]["norm_nmi"]["mean"] == 0.1  # FRA at step 0
    table = table_markdown(cfg, rows)
    head = table.splitlines()[0]
    assert "landmarks ft NME (%, lower is better)" in head and "attributes lin mean acc (%)" in head
    assert "region norm. NMI" in head
    assert "| FRA | 20.0 ± 0.0 | 10.0 ± 0.0 | 6.00 ± 1.41 | 85.0 ± 1.4 | 65.0 ± 7.1 | 0.300 ± 0.000 | 0.220 ± 0.028 " \
           "| 0.550 ± 0.071 |" in table
    assert "| random init | 20.0 ± 0.0 | 10.0 ± 0.0 | 9.00 ± 0.00 | 80.0 ± 0.0 | 50.0 ± 0.0 | 0.100 ± 0.000 " in table
    assert "majority value scores 79.0 %" in table and "Oracle NMI 0.400" in table


def test_resume_per_part_runs_only_new_or_changed_parts(tmp_path, monkeypatch):
    """The jobs are replaced by counters (no Ray): a new evaluation runs alone on the stored
    backbone, an interrupted run resumes inside a cell, a changed pretraining re-runs its cells."""
    import fra.experiments.benchmark as bench

    calls = []

    def pretrain(pre):
        calls.append(("pretrain", pre.run.name))
        return {"backbone": f"/store/{pre.run.name}/export", "pretrain_steps": 3, "pretrain_loss_first": 2.0,
                "pretrain_loss_last": 1.0, "region": {"miou": 0.2, "nmi": 0.1, "norm_nmi": 0.3}}

    fail_at = []

    def evaluate(task, ev):
        if (task, ev.run.name) in fail_at:
            raise RuntimeError("interrupted")
        calls.append((task, ev.run.name, ev.backbone.source))
        return {"evaluate": {"top1_mean_last5": 30.0, "top1_last": 30.0, "mean_class_acc": 30.0, "macro_f1": 20.0},
                "landmarks": {"nme_mean_last_k": 8.0}, "attributes": {"mean_acc_mean_last_k": 81.0}}[task]

    monkeypatch.setattr(bench, "run_pretraining", pretrain)
    monkeypatch.setattr(bench, "run_evaluation", evaluate)
    for name in ("_start_ray", "_write_shards", "_log_mlflow"):
        monkeypatch.setattr(bench, name, lambda *a, **k: None)
    quiet = lambda line: None  # noqa: E731

    def run(data):
        calls.clear()
        return run_benchmark(load_benchmark(_write(tmp_path, data)), echo=quiet)

    run(MICRO)  # 2 FRA pretrainings, 4 FER evaluations
    assert sorted(c[0] for c in calls) == ["evaluate"] * 4 + ["pretrain"] * 2
    # A landmark evaluation (and its shard job) added: only it runs, on the stored backbones; FER untouched.
    lm_shards = {"source": "synthetic_landmarks", "out": "${storage}/shards/lm", "options": {"seed": 2}}
    more = {**MICRO, "shards": MICRO["shards"] + [lm_shards], "landmarks": {"ft": LANDMARKS}}
    rows = run(more)
    assert sorted(calls) == [("landmarks", "FRA-s0-ft", "/store/FRA-s0/export"),
                             ("landmarks", "FRA-s1-ft", "/store/FRA-s1/export"),
                             ("landmarks", "random init-s0-ft", "random:resnet18"),
                             ("landmarks", "random init-s1-ft", "random:resnet18")]
    assert rows["FRA"]["landmarks"]["ft"]["nme_mean_last_k"]["n"] == 2
    # Interrupted inside FRA/s0 (its attribute evaluation fails after random init's two ran) ...
    more = {**more, "attributes": {"lin": ATTRIBUTES}}
    fail_at.append(("attributes", "FRA-s0-lin"))
    with pytest.raises(RuntimeError, match="interrupted"):
        run(more)
    assert [c[1] for c in calls] == ["random init-s0-lin", "random init-s1-lin"]
    # ... and resumed: only the two attribute evaluations left.
    fail_at.clear()
    run(more)
    assert [c[1] for c in calls] == ["FRA-s0-lin", "FRA-s1-lin"]
    # A changed pretraining re-runs FRA's cells whole; random init's are untouched.
    changed = {**more, "pretrain": {**MICRO["pretrain"], "optim": {**MICRO["pretrain"]["optim"], "lr": 0.4}}}
    run(changed)
    assert sorted(c[1] for c in calls) == sorted(["FRA-s0", "FRA-s1"] + [f"FRA-s{s}-{p}" for s in (0, 1)
                                                                          for p in ("linear", "ft", "lin")])
    run(changed)
    assert calls == []
    state = json.loads((tmp_path / "out" / "benchmark_state.json").read_text())
    assert set(state["cells"]["FRA/s1"]["evals"]) == {"evaluate/linear", "landmarks/ft", "attributes/lin"}
    assert state["cells"]["FRA/s1"]["pretrain"]["result"]["backbone"] == "/store/FRA-s1/export"


@pytest.mark.ray
@pytest.mark.slow
def test_micro_benchmark_end_to_end_and_resume(ray_local, tmp_path, capsys, monkeypatch):
    """`fra run` of a benchmark: every cell and the table; the console stays quiet (Ray Data's
    plans and progress lines go to the run's log file, as for a pipeline); a re-run skips every cell."""
    from fra.cli.main import main

    # the session's Ray prints no plans (conftest); a user's does, from this process (local-mode evaluations)
    monkeypatch.setattr(ray_local.data.DataContext.get_current(), "print_on_execution_start", True)
    path = _write(tmp_path, MICRO)
    cfg = load_benchmark(path)
    assert main(["run", str(path)]) == 0
    console_out = capsys.readouterr()
    out = Path(cfg.storage_path)
    results = json.loads((out / "results.json").read_text())
    rows = results["rows"]
    shown = console_out.out + console_out.err
    assert shown.startswith("log: ") and "fra -v shows it here too" in shown
    # fra's own lines stay on the console: each cell's progress and the table
    assert "[4/4] FRA/s1: " in shown and "| method | FER linear top-1 (%)" in shown
    logs = list((out / "logs").glob("benchmark-micro-*.log"))
    assert len(logs) == 1
    for ray_line in ("Execution plan of Dataset", "streaming_executor", "TrainingReport("):
        assert ray_line not in shown, ray_line
    assert "Execution plan of Dataset" in logs[0].read_text()
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


def test_shard_jobs_seed_reaches_the_generator(tmp_path, monkeypatch):
    """A shard job's ``seed`` option is the synthetic generator's (identities disjoint from
    pretraining's seed 0), not write_shards' shuffle seed; checked against the generator itself."""
    from collections import Counter

    from fra.data.shards import write_shards
    from fra.data.synthetic import SyntheticFaces

    opts = {"num_identities": 10, "images_per_identity": 3, "size": 32}
    counts = {}
    for seed in (0, 3):
        m = write_shards("synthetic_faces", "", str(tmp_path / f"s{seed}"), images_per_shard=64, row_group_size=32,
                         parallel=False, options={**opts, "seed": seed})
        counts[seed] = {k: v for k, v in m.counts["test"]["classes"].items() if v}
    for seed in (0, 3):
        gen = SyntheticFaces(**opts, seed=seed)
        names = ["neutral", "happy", "sad", "surprise", "fear", "disgust", "anger"]
        expected = Counter(names[gen.label(i, j)] for i in range(8, 10) for j in range(3))  # test = last 20 %
        assert counts[seed] == dict(expected), seed
    assert counts[0] != counts[3]
    # The pipeline's shard stage passes a job's options as the reader's.
    import fra.data.shards as shards_mod
    from fra.pipeline import ShardJob
    from fra.pipeline_stages import StageContext, run_shards

    seen = {}

    class Manifest:
        fingerprint, counts = "f", {}

    monkeypatch.setattr(shards_mod, "write_shards", lambda *a, **k: seen.update(k) or Manifest())
    job = from_dict(ShardJob, {"source": "synthetic_faces", "out": str(tmp_path / "x"), "options": {"seed": 3}})
    run_shards(StageContext(str(tmp_path), ""), [job], {})
    assert seen["options"] == {"seed": 3} and "seed" not in seen
