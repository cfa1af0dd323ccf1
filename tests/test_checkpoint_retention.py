"""Keep the last K checkpoints (issue 4.2), without a cluster.

fra hands Ray Train a ``CheckpointConfig`` (:func:`fra.train.ray_trainer.checkpoint_config`) and
Ray's checkpoint manager prunes. These tests drive that manager, the object the Train controller
runs, with fra's config: the newest K survive, and the checkpoint a re-run resumes from is the
newest and is not deleted before K newer ones exist. Losses grow with the step, so a config
that ranked checkpoints by a score would keep the oldest ones and fail here.
"""
from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from fra.config import PretrainConfig, RunSettings
from fra.errors import ConfigError
from fra.train.ray_trainer import check_config, checkpoint_config, set_aside_unregistered_checkpoints


def _manager(storage: Path, keep: int):
    """A fresh Ray Train checkpoint manager over ``storage/run``, as a (re-)started run builds one."""
    from ray.train.v2._internal.execution.checkpoint.checkpoint_manager import CheckpointManager
    from ray.train.v2._internal.execution.storage import StorageContext

    cfg = PretrainConfig(run=RunSettings(name="run", keep_checkpoints=keep))
    return CheckpointManager(checkpoint_config(cfg), StorageContext(str(storage), "run"))


def _report(manager, run_dir: Path, step: int) -> None:
    """What rank 0's ``ray.train.report(metrics, checkpoint=...)`` leads to once Ray copied the folder."""
    from ray.train import Checkpoint
    from ray.train.v2._internal.execution.training_report import _TrainingReport

    folder = run_dir / f"checkpoint_{step:03d}"
    folder.mkdir()
    (folder / "checkpoint.pt").write_text(str(step))
    manager.register_checkpoint(_TrainingReport(Checkpoint(str(folder)), {"step": step, "loss": float(step)}, False))


def _on_disk(run_dir: Path) -> list[int]:
    return sorted(int(p.read_text()) for p in run_dir.glob("checkpoint_*/checkpoint.pt"))


def _resume_from(manager) -> int:
    """The step of the checkpoint the workers get from ``ray.train.get_checkpoint()``."""
    checkpoint = manager.before_init_train_context([None])["checkpoint"][0]
    return int((Path(checkpoint.path) / "checkpoint.pt").read_text())


@pytest.mark.parametrize("keep", [1, 2, 3])
def test_keeps_the_newest_k_and_never_the_resumed_one_too_early(tmp_path, keep):
    run_dir = tmp_path / "run"

    async def scenario():  # the manager notifies listeners through the controller's event loop
        first = _manager(tmp_path, keep)
        for step in range(1, 6):
            _report(first, run_dir, step)
            assert _on_disk(run_dir) == list(range(max(1, step - keep + 1), step + 1))
        resumed = _manager(tmp_path, keep)  # re-running with the same storage path and name
        assert _resume_from(resumed) == 5 and _on_disk(run_dir) == list(range(6 - keep, 6))
        for step in range(6, 6 + keep):
            _report(resumed, run_dir, step)
            # the newest K: step 5 (resumed from) stays until K newer ones exist
            assert _on_disk(run_dir) == list(range(step - keep + 1, step + 1))
        assert _resume_from(resumed) == 5 + keep

    asyncio.run(scenario())
    assert set_aside_unregistered_checkpoints(run_dir) == []  # every folder left is registered


def test_keep_checkpoints_below_one_is_a_config_error():
    with pytest.raises(ConfigError, match="run.keep_checkpoints must be >= 1"):
        check_config(PretrainConfig(run=RunSettings(keep_checkpoints=0)))
