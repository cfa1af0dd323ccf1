"""`fra pretrain` on Ray Train (CPU, gloo) with the session's local Ray (``ray_local``).

Multi-node and node-loss tests need their own ``ray.cluster_utils.Cluster`` and live in
tests/test_pretrain_faults.py. Everything is tiny: resnet18 at 64 px, hidden_dim 64, K=4,
64 synthetic faces, batch 8. One MLflow sqlite file is shared by the module (creating one
costs ~5–10 s).
"""
from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
import yaml

from fra.cli.pretrain import load_pretrain_config
from fra.errors import ConfigError, FraError

TINY = {
    "model": {"backbone": "resnet18", "hidden_dim": 64, "proj_dim": 32, "num_proto": 4, "decoder_heads": 4,
              "decoder_ffn": 64, "dropout": 0.0},
    "optim": {"lr": 1.0, "epochs": 2, "warmup_epochs": 1, "batch_size": 8},
    "data": {"source": "synthetic", "image_size": 64,
             "synthetic": {"num_identities": 10, "images_per_identity": 8, "size": 64}},  # 64 train images
    "scaling": {"num_workers": 1, "max_failures": 0},
    "run": {"log_every": 2, "keep_checkpoints": 10, "heatmaps_every_epoch": False},
    "tracking": {"enabled": False},
}


def tiny_config(tmp_path: Path, name: str, *overrides: str, storage: Path | None = None):
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(TINY))
    return load_pretrain_config(str(path), [f"run.storage_path={storage or tmp_path}", *overrides], name)


def checkpoint_steps(run_dir: Path) -> dict[int, Path]:
    """Ray checkpoints of a run by training step: the folders directly under the run (a finished run
    has set aside any that the controller never registered)."""
    out = {}
    for d in sorted(p for p in Path(run_dir).glob("checkpoint_*") if p.is_dir()):
        ck = torch.load(d / "checkpoint.pt", weights_only=True)
        out[ck["state"]["step"]] = d / "checkpoint.pt"
    return out


def registered_checkpoints(run_dir: Path) -> dict[int, dict]:
    """Checkpoints the Train controller has registered (its snapshot file): step -> metrics."""
    try:
        snap = json.loads((Path(run_dir) / "checkpoint_manager_snapshot.json").read_text())
        return {c["metrics"]["step"]: c["metrics"] for c in snap["checkpoint_results"]}
    except (OSError, ValueError, KeyError):
        return {}


def assert_restored_exactly(dump_dir: Path, run_dir: Path, step: int) -> None:
    """The tensors a resumed worker restored equal those of the checkpoint it resumed from."""
    restored = torch.load(dump_dir / f"restored_step{step}.pt", weights_only=True)
    saved = torch.load(checkpoint_steps(run_dir)[step], weights_only=True)
    for name, t in saved["model"].items():
        assert torch.equal(t, restored["model"][name]), name
    for pid, buf in saved["optimizer"]["state"].items():
        for k, v in buf.items():
            assert torch.equal(torch.as_tensor(v), torch.as_tensor(restored["optimizer"]["state"][pid][k])), (pid, k)


@pytest.fixture(scope="module")
def mlflow_uri(tmp_path_factory):
    return f"sqlite:///{tmp_path_factory.mktemp('mlflow')}/mlflow.db"


# ---- no Ray needed -----------------------------------------------------------------------------
def test_config_errors_are_clear(tmp_path):
    with pytest.raises(ConfigError, match="did you mean optim.epochs"):
        tiny_config(tmp_path, "a", "optim.epoks=3")
    with pytest.raises(ConfigError, match="optim.batch_size must be an integer"):
        tiny_config(tmp_path, "b", "optim.batch_size=eight")
    from fra.train.ray_trainer import check_config

    with pytest.raises(ConfigError, match="not divisible by 3 workers"):
        check_config(tiny_config(tmp_path, "c", "scaling.num_workers=3"))
    with pytest.raises(ConfigError, match="fp16 needs GPUs"):
        check_config(tiny_config(tmp_path, "d", "scaling.amp=fp16"))


def test_pipeline_yaml_and_cli_error_exit(tmp_path, capsys):
    from fra.cli.main import main

    pipe = tmp_path / "pipe.yaml"
    pipe.write_text(yaml.safe_dump({"pretrain": TINY}))
    cfg = load_pretrain_config(str(pipe), ["pretrain.optim.epochs=5"], "x")
    assert cfg.optim.epochs == 5 and cfg.run.name == "x"
    assert main(["pretrain", str(pipe), "--set", "model.backbone_typo=1"]) == 1
    assert "unknown config key 'model.backbone_typo'" in capsys.readouterr().err


def test_guards_and_placement_callback_units():
    from fra.train.guards import CollapseDetector, CollapseError
    from fra.train.ray_trainer import PlacementTimeout, PlacementTimeoutError

    ln4 = math.log(4)
    det = CollapseDetector(4, patience=2, action="stop")
    det.update({"loss/cluster_ce_v1": 0.5, "loss/cluster_ce_v2": 0.6, "step": 1})
    det.update({"loss/cluster_ce_v1": ln4, "loss/cluster_ce_v2": ln4, "step": 2})
    with pytest.raises(CollapseError, match="step 3: cluster cross-entropy"):
        det.update({"loss/cluster_ce_v1": ln4, "loss/cluster_ce_v2": ln4 + 0.001, "step": 3})
    warn = CollapseDetector(4, patience=1, action="warn")
    assert "heat maps near uniform" in warn.update({"heatmap_uniformity": 0.999, "step": 1})
    assert not CollapseDetector(4, patience=0).update({"loss/cluster_ce_v1": ln4})

    cb = PlacementTimeout(0.05, "2 workers")
    scheduling, running = type("SchedulingState", (), {})(), type("RunningState", (), {})()
    cb.after_controller_state_update(running, scheduling)
    cb.after_controller_state_update(scheduling, running)  # placed in time: the clock resets
    cb.after_controller_state_update(running, scheduling)
    import time

    time.sleep(0.1)
    with pytest.raises(PlacementTimeoutError, match="placement_timeout_s=0.05"):
        cb.after_controller_state_update(scheduling, scheduling)


def test_checkpoint_copies_cut_short_by_a_lost_node_are_set_aside(tmp_path, caplog):
    """A node lost while Ray copied its checkpoint leaves a truncated, never-registered folder."""
    from fra.train.ray_trainer import SNAPSHOT_FILE, UNREGISTERED_DIR, set_aside_unregistered_checkpoints

    run = tmp_path / "run"
    for name, data in (("checkpoint_a", b"whole"), ("checkpoint_b", b"cut"), ("checkpoint_c", b"whole")):
        (run / name).mkdir(parents=True)
        (run / name / "checkpoint.pt").write_bytes(data)
    snap = {"checkpoint_results": [{"checkpoint_dir_name": "checkpoint_a", "metrics": {"step": 4}},
                                   {"checkpoint_dir_name": "checkpoint_c", "metrics": {"step": 8}}],
            "latest_checkpoint_result": {"checkpoint_dir_name": "checkpoint_c", "metrics": {"step": 8}}}
    (run / SNAPSHOT_FILE).write_text(json.dumps(snap))
    with caplog.at_level("WARNING"):
        moved = set_aside_unregistered_checkpoints(run)
    assert moved == [str(run / UNREGISTERED_DIR / "checkpoint_b")]
    assert (Path(moved[0]) / "checkpoint.pt").read_bytes() == b"cut"  # kept, not deleted
    assert sorted(p.name for p in run.glob("checkpoint_*") if p.is_dir()) == ["checkpoint_a", "checkpoint_c"]
    assert "never registered" in caplog.text and "checkpoint_b" in caplog.text
    assert set_aside_unregistered_checkpoints(run) == []  # idempotent
    (run / SNAPSHOT_FILE).write_text("{not json")
    assert set_aside_unregistered_checkpoints(run) == [] and (run / "checkpoint_a").is_dir()


def test_a_new_worker_group_streams_from_the_epoch_of_the_checkpoint_it_resumes_from(tmp_path, caplog):
    """EpochAlignedDataset, called by the Train controller at each worker-group start, sets the
    dataset's execution index (which seeds each epoch's order and augmentations) to the epoch in
    the metrics of the latest checkpoint the controller registered (its snapshot file)."""
    from types import SimpleNamespace

    from fra.ray_runtime import SNAPSHOT_FILE, EpochAlignedDataset

    run = tmp_path / "run"
    ds = SimpleNamespace(context=SimpleNamespace(_execution_idx=7))
    aligned = EpochAlignedDataset(ds, str(run))
    assert aligned() is ds and ds.context._execution_idx == 0  # no checkpoint yet: epoch 0
    run.mkdir()
    latest = {"checkpoint_dir_name": "checkpoint_b", "metrics": {"step": 12, "epoch": 1}}
    (run / SNAPSHOT_FILE).write_text(json.dumps({"checkpoint_results": [
        {"checkpoint_dir_name": "checkpoint_a", "metrics": {"step": 8, "epoch": 1}}, latest],
        "latest_checkpoint_result": latest}))
    assert aligned().context._execution_idx == 1
    (run / SNAPSHOT_FILE).write_text("{not json")
    with caplog.at_level("WARNING"):
        assert aligned().context._execution_idx == 0
    assert "cannot read the resume epoch" in caplog.text


# ---- Ray Train ---------------------------------------------------------------------------------
# One uninterrupted one-worker run serves two tests (issue 15 §4, one Ray Train job fewer): what it logs
# and exports, and as the reference the interrupted-and-resumed run must reproduce. Dropout on (torch's
# RNG matters for the resume), checkpoints every 4 steps, tracked, heat maps every epoch. lr 32 with the
# linear rule is the same 1.0 for batch 8 as the other tests, but a raw lr logged in place of the
# derived one would show.
STRAIGHT = ("model.dropout=0.1", "run.checkpoint_every=4", "run.checkpoint_upload=sync", "tracking.enabled=true",
            "run.heatmaps_every_epoch=true", "optim.lr=32", "optim.lr_scaling=linear")


@pytest.fixture(scope="module")
def straight(ray_local, tmp_path_factory, mlflow_uri):
    """(config, result, folder) of the uninterrupted run; its trace (inject.trace_to) is ``folder/a.jsonl``."""
    from fra.train.ray_trainer import pretrain_ray

    root = tmp_path_factory.mktemp("straight")
    cfg = tiny_config(root, "straight", *STRAIGHT, f"tracking.mlflow_uri={mlflow_uri}")
    return cfg, pretrain_ray(cfg, inject={"trace_to": str(root / "a.jsonl")}), root


@pytest.mark.ray
@pytest.mark.slow
def test_one_worker_trains_logs_to_mlflow_and_exports(straight, mlflow_uri):
    from mlflow.tracking import MlflowClient

    from fra.config import effective_lr

    cfg, out, _ = straight
    assert effective_lr(cfg.optim) == 1.0 != cfg.optim.lr
    rv = out.return_value
    assert rv["status"] == "finished" and rv["step"] == rv["planned"] == 2 * (64 // 8)
    losses = [h["loss"] for h in rv["history"]]
    assert losses[-1] < losses[0], losses
    card = json.loads(Path(out.model_card).read_text())
    assert card["architecture"] == "resnet18" and card["data_manifest_fingerprint"] == out.manifest_fingerprint
    assert torch.load(out.checkpoint, weights_only=True)["state"]["step"] == rv["step"]

    client = MlflowClient(mlflow_uri)
    run = client.get_run(out.mlflow_run_id)
    assert run.info.status == "FINISHED"
    assert run.data.params["derived.global_batch"] == "8" and run.data.params["model.backbone"] == "resnet18"
    assert float(run.data.params["derived.effective_lr"]) == effective_lr(cfg.optim)
    assert {"loss", "loss.cluster", "lr", "momentum", "images_per_s", "data_wait_frac"} <= set(run.data.metrics)
    assert len(client.get_metric_history(run.info.run_id, "loss")) == rv["step"] // 2
    region = card["region_awareness"]  # synthetic faces carry part masks: the score is logged
    assert 0 <= region["miou"] <= 1 and 0 <= region["random_miou"] <= 1 and region["n_images"] > 0
    assert run.data.metrics["region.miou"] == pytest.approx(region["miou"])
    assert "region.init_miou" in run.data.metrics and "region.random_nmi" in run.data.metrics
    arts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"config.yaml", "heatmaps", "final"} <= arts
    epochs = {a.path for a in client.list_artifacts(run.info.run_id, "heatmaps")}
    assert epochs == {"heatmaps/epoch_001", "heatmaps/epoch_002"}


@pytest.mark.ray
@pytest.mark.slow
def test_corrupt_images_met_while_streaming_are_skipped_and_counted_per_epoch(ray_local, tmp_path, mlflow_uri):
    """Issue 3: shards holding 2 corrupt JPEGs (first in the shard, so the heat-map probe meets them
    too). 12 rows make 3 steps per epoch; the 10 decodable ones fill 2 batches and the third
    step repeats one, so the run still finishes its plan. The count reaches the history, the
    result, the model card and MLflow."""
    from mlflow.tracking import MlflowClient

    from fra.train.ray_trainer import pretrain_ray
    from tests.corrupt_shards import corrupt_images, faces, write_shard_set

    shards = write_shard_set(tmp_path / "shards", {"train": corrupt_images(2) + faces(0, 10)})
    cfg = tiny_config(tmp_path, "corrupt", "data.source=shards", f"data.shards={shards}", "optim.batch_size=4",
                      "tracking.enabled=true", f"tracking.mlflow_uri={mlflow_uri}")
    out = pretrain_ray(cfg)
    rv = out.return_value
    assert rv["status"] == "finished" and rv["step"] == rv["planned"] == 6
    assert [h["skipped_corrupt"] for h in rv["history"]] == rv["skipped_corrupt_per_epoch"] == [2, 2]
    assert json.loads(Path(out.model_card).read_text())["skipped_corrupt_images_per_epoch"] == [2, 2]
    logged = MlflowClient(mlflow_uri).get_metric_history(out.mlflow_run_id, "epoch.skipped_corrupt")
    assert [(m.step, m.value) for m in logged] == [(3, 2.0), (6, 2.0)]


@pytest.mark.ray
@pytest.mark.slow
def test_two_workers_survive_a_killed_worker_and_an_interrupted_run_continues(ray_local, tmp_path):
    """Attempt 1: rank 1's process is SIGKILLed at step 5 -> Ray restarts both workers from the
    step-4 checkpoint. Attempt 2 crashes at step 9 with no retry left -> the run fails. Running
    again with the same name resumes from step 8 and finishes the planned 16 steps."""
    from fra.train.ray_trainer import pretrain_ray

    # NOTE: synchronous upload: the test pins the exact resume points, and an asynchronous upload still
    # in flight when a worker dies is dropped (the run then resumes from the checkpoint before).
    cfg = tiny_config(tmp_path, "two", "scaling.num_workers=2", "scaling.max_failures=1", "run.checkpoint_every=4",
                      "optim.epochs=1", "data.synthetic.num_identities=20",  # 1 epoch x 128 faces = 16 steps
                      "run.checkpoint_upload=sync")
    marker, run_dir = tmp_path / "killed", tmp_path / "two"
    with pytest.raises(FraError, match="re-run with the same run.name"):
        pretrain_ray(cfg, inject={"kill_at_step": 5, "kill_rank": 1, "marker": str(marker), "raise_at_step": 9,
                                  "dump_restored_to": str(tmp_path)})
    assert marker.read_text() == "5" and max(checkpoint_steps(run_dir)) == 8
    out = pretrain_ray(cfg, inject={"dump_restored_to": str(tmp_path)})
    rv = out.return_value
    assert rv["status"] == "finished" and rv["world_size"] == 2
    assert rv["step"] == rv["planned"] == 16
    assert sorted(p.name for p in tmp_path.glob("restored_step*.pt")) == ["restored_step4.pt", "restored_step8.pt"]
    assert_restored_exactly(tmp_path, run_dir, 4)
    assert_restored_exactly(tmp_path, run_dir, 8)
    losses = registered_checkpoints(run_dir)
    assert losses[16]["loss"] < losses[4]["loss"], losses


@pytest.mark.ray
@pytest.mark.slow
def test_nan_on_one_worker_stops_all_with_clear_message(ray_local, tmp_path):
    from fra.train.ray_trainer import pretrain_ray

    cfg = tiny_config(tmp_path, "nan", "scaling.num_workers=2", "scaling.max_failures=3",
                      "run.checkpoint_every=2", "optim.epochs=1")
    with pytest.raises(FraError, match=r"non-finite loss at step 3: .*loss.*last good checkpoint: .*checkpoint_") as exc:
        pretrain_ray(cfg, inject={"nan_at_step": 3, "nan_rank": 1})
    assert exc.value.status == "nonfinite"  # what a Tune trial reads to record a diverged setting
    assert max(checkpoint_steps(tmp_path / "nan")) == 2  # kept; no retry burnt on a NaN


@pytest.mark.ray
@pytest.mark.slow
def test_collapse_stop_on_two_workers_keeps_the_last_checkpoint_before_the_window(ray_local, tmp_path):
    """run.collapse_action=stop on 2 workers: the detector's input reads collapsed from step 6 on
    (test hook; BYOL has no cluster loss or heat maps, so nothing else can look collapsed).
    8 steps/epoch, log and checkpoint every 2, patience 3. Hand schedule: checkpoints at 2 and 4;
    log 6 opens the window (its checkpoint held), 7 held, 8 is the epoch end (reported without a
    checkpoint), log 10 is the third suspicious one -> stop. The last good checkpoint is step 4,
    and with keep_checkpoints=2 nothing written in the window could have pushed it out."""
    from fra.train.ray_trainer import TrainingStopped, pretrain_ray

    cfg = tiny_config(tmp_path, "collapse", "model.method=byol", "scaling.num_workers=2", "run.checkpoint_every=2",
                      "run.collapse_patience=3", "run.collapse_action=stop", "run.keep_checkpoints=2",
                      "run.checkpoint_upload=sync", "scaling.max_failures=2")
    with pytest.raises(TrainingStopped, match=r"collapse suspected at step 10: .* 3 consecutive logs "
                                              r"\(since step 6\).*last good checkpoint: .*checkpoint_") as exc:
        pretrain_ray(cfg, inject={"collapse_from_step": 6})
    assert exc.value.status == "collapse"
    assert torch.load(Path(exc.value.checkpoint) / "checkpoint.pt", weights_only=True)["state"]["step"] == 4
    assert sorted(registered_checkpoints(tmp_path / "collapse")) == [2, 4]
    assert sorted(checkpoint_steps(tmp_path / "collapse")) == [2, 4]  # none written in the window


def weight_differences(a: Path, b: Path) -> list[str]:
    """Model and optimizer tensors of two checkpoint files that differ beyond float tolerance."""
    sa, sb = torch.load(a, weights_only=True), torch.load(b, weights_only=True)
    assert sa["state"]["step"] == sb["state"]["step"]
    close = lambda x, y: torch.allclose(torch.as_tensor(x).double(), torch.as_tensor(y).double(),  # noqa: E731
                                        rtol=1e-5, atol=1e-7)
    out = [name for name, t in sa["model"].items() if not close(t, sb["model"][name])]
    return out + [f"optimizer {pid} {k}" for pid, buf in sa["optimizer"]["state"].items() for k, v in buf.items()
                  if not close(v, sb["optimizer"]["state"][pid][k])]


def read_trace(path: Path) -> dict[tuple[int, int], list[dict]]:
    """inject.trace_to's lines by (rank, step): every time a step took a batch (a restart repeats steps)."""
    out: dict[tuple[int, int], list[dict]] = {}
    for line in path.read_text().splitlines():
        rec = json.loads(line)
        out.setdefault((rec["rank"], rec["step"]), []).append(rec)
    return out


@pytest.mark.ray
@pytest.mark.slow
def test_interrupted_and_resumed_run_ends_with_the_weights_of_an_uninterrupted_one(straight, tmp_path, mlflow_uri):
    """One worker, dropout on (torch's RNG matters), 2 epochs x 8 steps, checkpoints every 4 steps
    and at epoch ends. The interrupted run: its worker is SIGKILLed at step 10 and Ray Train
    restarts it from the epoch-end checkpoint of step 8 (a new worker group, hence a new data
    stream, inside the same fit); it then crashes at step 14 with no retry left, and a re-run of
    the same name (a new fit) resumes from step 12, mid-epoch 2. Both resumes must draw epoch 2's
    data order and augmentations (before the fix both drew epoch 1's, and blocks came out in
    task-completion order, so even epoch 1 differed between runs) and the dropout draws of the
    uninterrupted run. Reference: the uninterrupted run itself (the module's ``straight`` run: the
    same config but for the name and the retry). Every step of the interrupted run, each time it was
    taken, trains on the same batch with the same RNG state, and the weights and optimizer state at
    steps 4, 8, 12 and 16 are equal to float tolerance."""
    from fra.train.ray_trainer import pretrain_ray

    _, reference, ref_dir = straight
    assert reference.return_value["step"] == 16
    cfg = tiny_config(tmp_path, "resumed", *STRAIGHT, f"tracking.mlflow_uri={mlflow_uri}", "scaling.max_failures=1")
    trace = {"trace_to": str(tmp_path / "b.jsonl"), "dump_restored_to": str(tmp_path)}
    with pytest.raises(FraError, match="re-run with the same run.name"):
        pretrain_ray(cfg, inject={"kill_at_step": 10, "marker": str(tmp_path / "killed"), "raise_at_step": 14,
                                  **trace})
    assert (tmp_path / "killed").read_text() == "10" and max(checkpoint_steps(tmp_path / "resumed")) == 12
    out = pretrain_ray(cfg, inject=trace)
    assert out.return_value["step"] == 16
    assert sorted(p.name for p in tmp_path.glob("restored_step*.pt")) == ["restored_step12.pt", "restored_step8.pt"]

    a, b = read_trace(ref_dir / "a.jsonl"), read_trace(tmp_path / "b.jsonl")
    assert sorted(a) == sorted(b) == [(0, s) for s in range(16)]
    assert all(len(v) == 1 for v in a.values())
    assert {k: len(v) for k, v in b.items() if len(v) > 1} == {(0, 8): 2, (0, 9): 2, (0, 12): 2, (0, 13): 2}  # taken again
    # (the kill comes after step 10, i.e. after the batches of steps 0-9; the crash after step 14)
    differ = [(key, rec["epoch"], field) for key in sorted(a) for rec in b[key] for field in ("epoch", "batch", "rng")
              if rec[field] != a[key][0][field]]
    assert not differ, f"steps of the resumed run that took another batch / RNG state than the uninterrupted one: {differ}"
    ca, cb = checkpoint_steps(ref_dir / "straight"), checkpoint_steps(tmp_path / "resumed")
    assert sorted(ca) == sorted(cb) == [4, 8, 12, 16]
    assert {step: weight_differences(ca[step], cb[step])[:3] for step in ca} == {4: [], 8: [], 12: [], 16: []}


@pytest.mark.ray
def test_unplaceable_workers_fail_fast_or_after_placement_timeout(ray_local, tmp_path):
    import ray

    from fra.train.ray_trainer import PlacementTimeoutError, pretrain_ray

    with pytest.raises(ConfigError, match="can place only"):
        pretrain_ray(tiny_config(tmp_path, "big", "scaling.num_workers=8"))

    @ray.remote(num_cpus=3)
    class Hog:
        def ready(self):
            return True

    hog = Hog.remote()
    ray.get(hog.ready.remote())
    try:
        cfg = tiny_config(tmp_path, "busy", "scaling.num_workers=2", "scaling.placement_timeout_s=5")
        with pytest.raises(PlacementTimeoutError, match="placement_timeout_s=5"):
            pretrain_ray(cfg)
    finally:
        ray.kill(hog)
