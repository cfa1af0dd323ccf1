"""Runs that tests in more than one module assert on, built once per session (issue 15 §4: a Ray Train
job costs ~25 s of Ray's own start-up on 2 cores, benchmarks/RESULTS.md, so checks share jobs where they
can). Registered in tests/conftest.py; their folders start with ``SESSION_DIR_PREFIX`` so that the
module that built them does not remove them.

``sweep_run``: one sweep, ``pipelines/sweep_then_promote.yaml``, started by ``fra tune``, interrupted,
resumed, then finished by ``fra run``. tests/test_tune_sweep.py asserts on the sweep (ASHA, the kill and
the resume, its outputs, MLflow), tests/test_pipeline.py on the chain after it (evaluate the best
trial's export, register, promote). Before, each test ran a sweep of its own.

The sweep is the pipeline's own sweep stage (``fra.pipeline.stage_config``), with a grid over
``loss_w_cluster`` = [8, 0.05, 16] and ASHA on the total loss (grace period 1 epoch), one trial at a
time. The third trial's loss at epoch 1 is far above the second's, so it is stopped before its
evaluation, deterministically. The steps, in the order a user could take them:

1. ``fra run ... stages=[shards]`` (in this process): the FER shards the trials evaluate on.
2. ``fra tune <the stage's config>`` in a subprocess attached to the session's Ray; once the first
   trial has finished and the second has checkpointed its first epoch, it gets SIGINT.
3. ``run_sweep(..., resume=True)`` in this process: the finished trial is not started again
   (``trials/<id>/starts.json``) and the interrupted one continues from its checkpoint.
4. ``fra run`` of the whole pipeline in a subprocess: its sweep stage resumes the finished sweep
   (nothing trains), then evaluates the best trial's export, registers it and promotes it.

``method_runs``: FRA, BYOL and SwAV each pretrained twice on one tiny config, with ``fra pretrain
--plain``'s runner and on Ray Train. tests/test_pretrain_export.py compares the files the two write;
tests/test_swav_train.py checks the BYOL run's losses and model card.
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

PIPELINE = Path(__file__).resolve().parents[1] / "pipelines" / "sweep_then_promote.yaml"
SETS = [
    "sweep.space={loss_w_cluster: {grid: [8.0, 0.05, 16.0]}}", "sweep.num_samples=1", "sweep.scheduler.metric=loss",
    "sweep.scheduler.mode=min", "sweep.scheduler.grace_period=1",
    "pretrain.data.synthetic.num_identities=8", "pretrain.data.synthetic.images_per_identity=6",
    # the trials' chained evaluation defaults to the evaluate section (with the sweep's own resources);
    # the evaluate stage itself runs in the driver (num_workers=0)
    "evaluate.data.image_size=32", "evaluate.optim.epochs=1", "evaluate.optim.warmup_epochs=0",
    "evaluate.run.last_k=1", "evaluate.scaling.num_workers=0",
]


@dataclass
class SweepRun:
    storage: Path  # the pipeline's storage_path
    experiment: Path  # the sweep's experiment folder
    sweep_yaml: Path  # the sweep stage's config, as `fra tune` ran it
    second: str  # the trial interrupted in step 2
    done_before: set  # trials with a result when the driver was interrupted
    result: object  # step 3's SweepResult
    summary: dict  # step 4's summary.json
    printed: str  # step 4's console output


def starts(exp: Path) -> list[str]:
    """Trial ids in order of their trainable's starts (each trial records its own in trials/<id>/starts.json)."""
    entries = []
    for path in exp.glob("trials/*/starts.json"):
        try:
            entries += json.loads(path.read_text())
        except ValueError:  # written atomically, but read while a trial may be replacing it
            continue
    return [e["trial_id"] for e in sorted(entries, key=lambda e: e["time"])]


def epochs(exp: Path, tid: str) -> list[int]:
    path = exp / "trials" / tid / "epochs.json"
    return [int(r["epoch"]) for r in json.loads(path.read_text())] if path.is_file() else []


def wait(cond, proc, timeout_s: float, what: str) -> None:
    t0 = time.time()
    while not cond():
        if proc is not None and proc.poll() is not None:
            raise AssertionError(f"driver exited ({proc.returncode}) before {what}")
        if time.time() - t0 > timeout_s:
            if proc is not None:
                proc.kill()
            raise AssertionError(f"timed out after {timeout_s:.0f} s waiting for {what}")
        time.sleep(1.0)


def _run_argv(storage: Path, *extra: str) -> list[str]:
    return ["run", str(PIPELINE), *[x for o in [f"storage_path={storage}", *SETS, *extra] for x in ("--set", o)]]


@pytest.fixture(scope="session")
def sweep_run(request, ray_local, tmp_path_factory) -> SweepRun:
    from fra.cli.main import main
    from fra.config import to_dict
    from fra.pipeline import load_pipeline, stage_config
    from fra.tuning.config import load_sweep_config
    from fra.tuning.sweep import run_sweep
    from tests.conftest import SESSION_DIR_PREFIX, seed_mlflow_db

    storage = tmp_path_factory.mktemp(SESSION_DIR_PREFIX + "sweep_then_promote")  # kept past its module's end
    seed_mlflow_db(storage / "mlflow.db")  # the drivers and the trials run in other processes: no migration there
    env = {**os.environ, "RAY_AUTH_MODE": "disabled"}
    address = ray_local.get_runtime_context().gcs_address

    t = [time.time()]
    assert main(_run_argv(storage, "stages=[shards]")) == 0  # 1.
    t.append(time.time())
    sweep = stage_config(load_pipeline(PIPELINE, [f"storage_path={storage}", *SETS]), "sweep")
    sweep_yaml = storage / "sweep.yaml"
    sweep_yaml.write_text(yaml.safe_dump(to_dict(sweep), sort_keys=False))
    exp = Path(sweep.run.storage_path) / sweep.run.name

    with (storage / "tune.log").open("w") as log:  # 2.
        proc = subprocess.Popen([sys.executable, "-m", "fra.cli.main", "tune", str(sweep_yaml), "--set",
                                 f"run.ray_address={address}"], stdout=log, stderr=subprocess.STDOUT, env=env)
        try:
            # the first trial finished (so the second started) and the second checkpointed an epoch
            wait(lambda: len(set(starts(exp))) >= 2, proc, 900, "the second trial to start")
            second = starts(exp)[-1]
            wait(lambda: len(epochs(exp, second)) >= 1, proc, 600, "the second trial's first epoch")
            proc.send_signal(signal.SIGINT)
            assert proc.wait(timeout=180) != 0  # interrupted: unfinished trials remain
        finally:
            if proc.poll() is None:
                proc.kill()
    done_before = {p.parent.name for p in (exp / "trials").glob("*/result.json")}

    t.append(time.time())
    result = run_sweep(load_sweep_config(sweep_yaml), resume=True)  # 3.
    t.append(time.time())

    run = subprocess.run([sys.executable, "-m", "fra.cli.main", *_run_argv(storage, f"ray.address={address}")],
                         stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env, timeout=900)  # 4.
    t.append(time.time())
    (storage / "run.log").write_text(run.stdout)
    print("sweep_run: shards {:.0f} s, fra tune until interrupted {:.0f} s, resume {:.0f} s, fra run {:.0f} s".format(
        *(b - a for a, b in zip(t, t[1:]))))
    assert run.returncode == 0, run.stdout[-4000:]
    summary = json.loads((storage / "summary.json").read_text())
    yield SweepRun(storage, exp, sweep_yaml, second, done_before, result, summary, run.stdout)
    if not request.session.testsfailed:
        shutil.rmtree(storage, ignore_errors=True)


# ---- method_runs ----------------------------------------------------------------------------------
METHOD_SIZE = 32
METHOD_BASE = {
    "model": {"backbone": "resnet18", "hidden_dim": 32, "proj_dim": 16, "num_proto": 4, "decoder_heads": 4,
              "decoder_ffn": 32,
              "swav": {"num_prototypes": 10, "proj_hidden": 32, "proj_dim": 16, "freeze_prototypes_iters": 1,
                       "nmb_crops": [2], "size_crops": [METHOD_SIZE], "min_scale_crops": [0.14],
                       "max_scale_crops": [1.0]}},
    "optim": {"lr": 0.1, "epochs": 1, "warmup_epochs": 0, "batch_size": 8},
    "data": {"source": "synthetic", "image_size": METHOD_SIZE,
             "synthetic": {"num_identities": 8, "images_per_identity": 6, "size": METHOD_SIZE}},
    "scaling": {"num_workers": 1, "max_failures": 0},
    "run": {"max_steps": 2, "log_every": 1, "heatmaps_every_epoch": False},
    "tracking": {"enabled": False},
}
SWAV_OPTIM = {"optimizer": "larc", "schedule": "swav", "start_warmup": 0.01, "final_lr": 0.001}
METHODS = ("fra", "byol", "swav")


def method_config(method: str, storage: Path, name: str):
    from fra.config import PretrainConfig, from_dict

    raw = json.loads(json.dumps(METHOD_BASE))
    raw["model"]["method"] = method
    if method == "swav":
        raw["optim"].update(SWAV_OPTIM)
    raw["run"].update(name=name, storage_path=str(storage))
    return from_dict(PretrainConfig, raw)


@dataclass
class MethodRuns:
    root: Path  # <root>/plain/<method> and <root>/ray/<method> are the runs' folders
    plain: dict  # method -> fra.train.plain's result
    ray: dict  # method -> fra.train.ray_trainer's result


@pytest.fixture(scope="session")
def method_runs(request, ray_local, tmp_path_factory) -> MethodRuns:
    import torch

    from fra.train.plain import pretrain_plain
    from fra.train.ray_trainer import pretrain_ray
    from tests.conftest import SESSION_DIR_PREFIX

    root = tmp_path_factory.mktemp(SESSION_DIR_PREFIX + "methods")
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        plain = {m: pretrain_plain(method_config(m, root / "plain", m), progress=False) for m in METHODS}
    finally:
        torch.set_num_threads(before)
    yield MethodRuns(root, plain, {m: pretrain_ray(method_config(m, root / "ray", m)) for m in METHODS})
    if not request.session.testsfailed:
        shutil.rmtree(root, ignore_errors=True)
