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
