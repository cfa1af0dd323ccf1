"""When the Ray Train worker checkpoints mid-epoch: every ``run.checkpoint_every`` steps and, with
``run.checkpoint_every_minutes``, at the first step after a log step that found that much wall-clock
time since the last checkpoint (decided on the rank-averaged clock, so every rank agrees)."""
from __future__ import annotations

import pytest
import torch

from fra.config import PretrainConfig, from_dict
from fra.engine import Schedule, TrainState, train_one_epoch
from fra.losses import build_loss
from fra.models import online_view
from tests.test_host_syncs import BATCH, MODEL, SIZE, _batches, _setup


@pytest.mark.slow
@pytest.mark.parametrize("every, minutes, expected", [
    (0, 0.0, []),             # epoch ends only
    (0, 1.0, [4, 8]),         # 25 s steps: 75 s seen at the log of step 3 -> checkpoint at step 4, then 8
    (5, 1.0, [4, 5, 9, 10]),  # both rules; a step checkpoint also restarts the clock
])
def test_mid_epoch_checkpoints_by_steps_and_wall_clock(monkeypatch, tmp_path, every, minutes, expected):
    import fra.train.worker as worker

    n = 12
    cfg = from_dict(PretrainConfig, {"model": MODEL, "optim": {"lr": 0.5, "epochs": 1, "warmup_epochs": 0,
                                                               "batch_size": BATCH},
                                     "data": {"image_size": SIZE},
                                     "run": {"log_every": 1, "checkpoint_every": every,
                                             "checkpoint_every_minutes": minutes, "storage_path": str(tmp_path)}})
    clock = {"t": 0.0}
    monkeypatch.setattr(worker.time, "monotonic", lambda: clock["t"])
    saved = []
    monkeypatch.setattr(worker.WorkerHooks, "checkpoint",
                        lambda self, state, metrics: (saved.append(state.step),
                                                      setattr(self, "_last_checkpoint_t", clock["t"])))
    model, _, opt = _setup()
    hooks = worker.WorkerHooks(cfg, {"iters_per_epoch": n, "total_steps": n, "global_batch": BATCH}, model, opt,
                               None, 0, 1, {}, torch.device("cpu"))

    def timed(batches):  # step s runs at t = 25 s * s
        for i, b in enumerate(batches, start=1):
            clock["t"] = 25.0 * i
            yield b

    torch.set_num_threads(1)
    train_one_epoch(model, build_loss(cfg.model), opt, timed(_batches(n)), Schedule.from_config(cfg.optim, cfg.model, n),
                    TrainState(), hooks.normalizer, online=online_view(model), log_every=1, finite=hooks.finite,
                    on_log=hooks.on_log, on_step=hooks.on_step)
    assert saved == expected


@pytest.mark.slow
@pytest.mark.parametrize("action, suspicious_logs, expected, stops", [
    # log every 2 steps, checkpoint every 2, patience 3; a window of 2 suspicious logs (steps 4, 6)
    ("warn", {4, 6}, [2, 4, 6, 8, 10], False),  # warn: checkpoints as usual
    ("stop", {4, 6}, [2, 8, 10], False),        # held at 4, 5, 6, 7; the healthy log at 8 releases it
    ("stop", {4, 6, 8, 10}, [2], True),          # third suspicious log (step 8): stop, step 2 is the last
])
def test_stop_action_holds_checkpoints_back_while_logs_look_collapsed(monkeypatch, tmp_path, action,
                                                                     suspicious_logs, expected, stops):
    """collapse_action=stop: a checkpoint due at or after the window's first suspicious log is not
    written while the window is open, so the run's latest checkpoint is the last one before it."""
    import fra.train.worker as worker
    from fra.train.guards import CollapseError

    n = 12
    cfg = from_dict(PretrainConfig, {"model": MODEL, "optim": {"lr": 0.5, "epochs": 1, "warmup_epochs": 0,
                                                               "batch_size": BATCH},
                                     "data": {"image_size": SIZE},
                                     "run": {"log_every": 2, "checkpoint_every": 2, "collapse_patience": 3,
                                             "collapse_action": action, "storage_path": str(tmp_path)}})
    saved = []
    monkeypatch.setattr(worker.WorkerHooks, "checkpoint", lambda self, state, metrics: saved.append(state.step))
    model, _, opt = _setup()
    hooks = worker.WorkerHooks(cfg, {"iters_per_epoch": n, "total_steps": n, "global_batch": BATCH}, model, opt,
                               None, 0, 1, {}, torch.device("cpu"))
    monkeypatch.setattr(hooks.detector, "suspicious",
                        lambda metrics: "forced" if metrics["step"] in suspicious_logs else "")
    torch.set_num_threads(1)
    run = lambda: train_one_epoch(  # noqa: E731
        model, build_loss(cfg.model), opt, _batches(n), Schedule.from_config(cfg.optim, cfg.model, n), TrainState(),
        hooks.normalizer, online=online_view(model), log_every=2, finite=hooks.finite, on_log=hooks.on_log,
        on_step=hooks.on_step)
    if stops:
        with pytest.raises(CollapseError, match=r"step 8: forced for 3 consecutive logs \(since step 4\)"):
            run()
    else:
        run()
    assert saved == expected


@pytest.mark.slow
def test_collapse_detection_is_on_by_default_and_warns_once_per_window(monkeypatch, tmp_path, caplog):
    """Default run settings: 20 suspicious logs in a row warn once (at the 20th) and the run goes on."""
    import fra.train.worker as worker

    n = 24
    cfg = from_dict(PretrainConfig, {"model": MODEL, "optim": {"lr": 0.5, "epochs": 1, "warmup_epochs": 0,
                                                               "batch_size": BATCH},
                                     "data": {"image_size": SIZE}, "run": {"log_every": 1, "storage_path": str(tmp_path)}})
    assert (cfg.run.collapse_patience, cfg.run.collapse_action) == (20, "warn")
    monkeypatch.setattr(worker.WorkerHooks, "checkpoint", lambda self, state, metrics: None)
    model, _, opt = _setup()
    hooks = worker.WorkerHooks(cfg, {"iters_per_epoch": n, "total_steps": n, "global_batch": BATCH}, model, opt,
                               None, 0, 1, {}, torch.device("cpu"))
    monkeypatch.setattr(hooks.detector, "suspicious", lambda metrics: "" if metrics["step"] == 3 else "forced")
    torch.set_num_threads(1)
    with caplog.at_level("WARNING", logger="fra.train.guards"):
        stats = train_one_epoch(model, build_loss(cfg.model), opt, _batches(n), Schedule.from_config(cfg.optim, cfg.model, n),
                                TrainState(), hooks.normalizer, online=online_view(model), log_every=1,
                                finite=hooks.finite, on_log=hooks.on_log, on_step=hooks.on_step)
    # healthy log at step 3: the window restarts at step 4 and reaches 20 logs at step 23
    assert [r.getMessage().split(":")[0] for r in caplog.records] == ["representation collapse suspected at step 23"]
    assert "since step 4" in caplog.records[0].getMessage() and stats["steps"] == n
