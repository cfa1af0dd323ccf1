"""What runs inside each Ray Train worker: ``train_loop_per_worker`` and its hooks.

The loop only wires things: config → factories → ``prepare_model`` → dataset shard → the plain
epoch loop of :mod:`fra.engine` → checkpoints and reports. Everything here runs on every rank
in lock-step: checkpoints, reports and metric reductions happen at steps that all ranks agree
on, and stop decisions (non-finite loss, collapse) are taken identically on all ranks, so no
worker is ever left waiting in a collective.
"""
from __future__ import annotations

import logging
import os
import shutil
import signal
import tempfile
import time
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np
import torch

from fra import dist
from fra.console import report_progress
from fra.config import PretrainConfig, dump_yaml, from_dict, per_worker_batch, view_normalization
from fra.engine import Normalizer, Schedule, TrainState, train_one_epoch
from fra.errors import DataError
from fra.losses import build_loss
from fra.losses.swav import swav_collapse_check
from fra.models import build_model, online_view
from fra.nonfinite import FiniteCheck, NonFiniteLossError
from fra.optim import build_optimizer
from fra.tracking import RunLogger
from fra.train import ddp
from fra.train.checkpointing import CHECKPOINT_FILE, load_checkpoint, restore, save_checkpoint
from fra.train.guards import CollapseDetector, CollapseError, heatmap_uniformity

log = logging.getLogger("fra.train.worker")


def train_loop_per_worker(config: dict) -> dict:
    """Ray Train entry point. ``config``: {"cfg", "record", "plan", "mlflow", "probe", "inject"} (see
    ray_trainer); "record" is the config as written into checkpoints, redacted by the driver (which
    knows the secrets of its own environment)."""
    import ray.train
    import ray.train.torch

    from fra.data.device_augment import augment_batches
    from fra.data.stream import check_stream_epoch, iter_batches

    from fra.ray_runtime import check_worker_code

    check_worker_code(config.get("code"), "pretraining worker")
    cfg = from_dict(PretrainConfig, config["cfg"])
    plan = config["plan"]
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    device = ray.train.torch.get_device()
    model, loss_fn, optimizer, scaler = build_training_objects(cfg, device, rank)
    state = resume(ray.train.get_checkpoint(), model, optimizer, scaler, cfg, rank, config)
    online = ddp.prepare(online_view(model), cfg)  # prepare_model with scaling.ddp's options
    hooks = WorkerHooks(cfg, plan, model, optimizer, scaler, rank, world, config, device)
    schedule = Schedule.from_config(cfg.optim, cfg.model, plan["iters_per_epoch"])
    shard = ray.train.get_dataset_shard("train")
    if rank == 0:
        check_stream_epoch(shard, state.epoch)
    batch = per_worker_batch(plan["global_batch"], world)
    try:
        while state.step < plan["total_steps"]:
            stream = iter_batches(shard, batch, epoch=state.epoch, seed=cfg.data.seed, drop_last=True)
            batches = seeded_steps(epoch_batches(stream, state, plan["iters_per_epoch"]), state, cfg.run.seed, rank)
            if hooks.inject.get("trace_to"):
                batches = _trace(batches, state, rank, Path(hooks.inject["trace_to"]))
            batches = augment_batches(batches, device)  # data.augment_on=device: the views' per-pixel ops
            stats = train_one_epoch(
                model, loss_fn, optimizer, batches, schedule,
                state, hooks.normalizer, online=online, scaler=scaler, amp=cfg.scaling.amp,
                grad_clip=cfg.optim.grad_clip, log_every=cfg.run.log_every, max_steps=plan["total_steps"],
                finite=hooks.finite, on_log=hooks.on_log, on_step=hooks.on_step)
            hooks.end_epoch(state, {**stats, "skipped_corrupt": stream.skipped_corrupt})
    except (NonFiniteLossError, CollapseError) as exc:
        return hooks.stopped(state, exc)
    return hooks.finished(state)


# ---- setup -----------------------------------------------------------------------------------
def build_training_objects(cfg: PretrainConfig, device: torch.device, rank: int):
    """Model (identical init on every rank), loss, optimizer and the fp16 scaler."""
    _console()
    torch.manual_seed(cfg.run.seed)  # same init everywhere; DDP also broadcasts rank 0's weights
    model = build_model(cfg.model)
    if cfg.scaling.use_gpu and cfg.model.norm == "syncbn":
        # NOTE: before DDP and for the whole model, as the reference (target BNs included).
        model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
    elif cfg.model.norm == "syncbn" and rank == 0:
        log.info("model.norm=syncbn ignored on CPU (torch has no CPU SyncBatchNorm): plain BatchNorm per worker")
    model.to(device)
    torch.manual_seed(cfg.run.seed + 7919 * rank)  # per-rank draws until the first step (then seeded_steps)
    loss_fn = build_loss(cfg.model)
    optimizer = build_optimizer(model, cfg.optim)
    scaler = torch.amp.GradScaler("cuda") if cfg.scaling.amp == "fp16" and device.type == "cuda" else None
    return model, loss_fn, optimizer, scaler


def resume(checkpoint, model, optimizer, scaler, cfg: PretrainConfig, rank: int, config: dict) -> TrainState:
    """Restore everything from Ray's latest checkpoint (or start at step 0)."""
    if checkpoint is None:
        return TrainState()
    with checkpoint.as_directory() as d:
        ck = load_checkpoint(Path(d) / CHECKPOINT_FILE)
    # torch's RNG is re-seeded before every step (seeded_steps); rank 0 also gets numpy's and Python's back.
    state = restore(ck, model, optimizer, scaler, restore_rng=rank == 0)
    iters = ck.get("extra", {}).get("iters_per_epoch")
    if rank == 0 and iters not in (None, config["plan"]["iters_per_epoch"]):
        log.warning("the checkpoint was written with %s iterations/epoch, this run has %d (batch size or data "
                    "changed): the position within the epoch is approximate", iters, config["plan"]["iters_per_epoch"])
    if rank == 0:
        log.info("resumed from checkpoint at step %d (epoch %d); skipping %d consumed batches of this epoch",
                 state.step, state.epoch, state.step - state.epoch * config["plan"]["iters_per_epoch"])
        dump = (config.get("inject") or {}).get("dump_restored_to")
        if dump:  # test hook: what was restored, to compare tensor by tensor with the file
            torch.save({"step": state.step, "model": model.state_dict(), "optimizer": optimizer.state_dict()},
                       Path(dump) / f"restored_step{state.step}.pt")
    return state


def epoch_batches(batches: Iterable[dict], state: TrainState, iters: int) -> Iterator[dict]:
    """This epoch's batches, minus those a resumed run already consumed (mid-epoch resume).

    Every rank takes exactly ``iters`` batches (the same count whatever the world size, since
    the per-worker batch is global / W) and drains the rest of its shard. A stream that runs
    short (corrupt images were dropped) repeats its last batch for the missing steps, so that
    all ranks still take the same number of steps.

    Args:
        batches: the whole epoch's batches of this worker, from its first one.
        state: the loop position; ``step - epoch * iters`` batches are skipped.
        iters: steps per epoch.
    """
    return _take(iter(batches), state.step - state.epoch * iters, iters)


def _take(it: Iterator[dict], skip: int, stop: int) -> Iterator[dict]:
    position, last = 0, None
    for last in it:
        position += 1
        if position == stop:
            # Finish the epoch's stream before its last step (also in a run's final epoch): Ray's
            # streaming split completes and the corrupt-image count covers the whole epoch.
            for _ in it:
                pass
        if position > skip:
            yield last
    if position < stop:
        if last is None:
            raise DataError("this worker's data stream delivered no batch this epoch")
        log.warning("the data stream gave %d of %d batches this epoch (corrupt images dropped): repeating its "
                    "last batch for %d step(s) to keep the workers in step", position, stop,
                    stop - max(position, skip))
        for _ in range(max(position, skip), stop):
            yield last


def step_seed(seed: int, rank: int, step: int) -> int:
    """The torch seed of one rank's training step: a pure function of (run.seed, rank, step)."""
    return int(np.random.SeedSequence([seed, rank, step]).generate_state(1, np.uint64)[0])


def seeded_steps(batches: Iterable[dict], state: TrainState, seed: int, rank: int) -> Iterator[dict]:
    """``batches``, seeding torch's global RNG with :func:`step_seed` just before each step takes its batch.

    Dropout and any other draw a step makes from torch's RNG (the CPU and every CUDA generator)
    thus depend on the step alone, not on how many steps ran in this process: a run resumed or
    restarted at any step, on any rank, continues with the draws of the uninterrupted run (a
    checkpoint holds rank 0's CPU RNG only, and no CUDA RNG at all).
    """
    for batch in batches:
        torch.manual_seed(step_seed(seed, rank, state.step))
        yield batch


def _trace(batches: Iterable[dict], state: TrainState, rank: int, path: Path) -> Iterator[dict]:
    """Test hook (inject.trace_to): a JSON line per step and rank with digests of its batch and of
    torch's RNG state as the step takes the batch."""
    import hashlib
    import json

    for batch in batches:
        digest = hashlib.sha1()
        for k in sorted(batch):
            digest.update(k.encode())
            digest.update(batch[k].cpu().numpy().tobytes())
        rng = hashlib.sha1(torch.get_rng_state().numpy().tobytes()).hexdigest()[:12]
        with path.open("a") as f:
            f.write(json.dumps({"rank": rank, "step": state.step, "epoch": state.epoch,
                                "batch": digest.hexdigest()[:12], "rng": rng}) + "\n")
        yield batch


def _console() -> None:
    """Worker log lines on stderr, which Ray forwards to the driver: they go to the run's log file (on the
    console only with `-v`); the live progress display comes from :func:`fra.console.report_progress`."""
    if not log.handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(asctime)s fra: %(message)s", "%H:%M:%S"))
        log.addHandler(handler)
        log.setLevel(logging.INFO)
        log.propagate = False


# ---- hooks -----------------------------------------------------------------------------------
class WorkerHooks:
    """Checkpoint/report/log hooks shared by every rank (rank 0 writes)."""

    def __init__(self, cfg, plan, model, optimizer, scaler, rank, world, config, device):
        self.cfg, self.plan, self.model, self.optimizer, self.scaler = cfg, plan, model, optimizer, scaler
        self.rank, self.world, self.inject = rank, world, config.get("inject") or {}
        self.record = config.get("record") or cfg  # what checkpoints and config.yaml hold
        self.mean, self.std = view_normalization(cfg)
        self._normalize = Normalizer(self.mean, self.std, device)
        self._poison = False
        ml = config.get("mlflow") or {}
        self.tracker = RunLogger(ml.get("uri", ""), ml.get("run_id", ""), enabled=rank == 0)
        if cfg.model.method == "swav":
            self.detector = CollapseDetector(cfg.model.swav.num_prototypes, cfg.run.collapse_patience,
                                             cfg.run.collapse_action, keys=("loss/swav",),
                                             label="SwAV swapped-prediction loss")
        else:
            self.detector = CollapseDetector(cfg.model.num_proto, cfg.run.collapse_patience, cfg.run.collapse_action)
        self.probe_images = config.get("probe") or []
        self.probe = None
        if self.probe_images and cfg.model.method == "fra":
            self.probe = self._normalize(torch.from_numpy(np.stack(self.probe_images)).permute(0, 3, 1, 2))
        self.last_metrics: dict = {}
        # Non-finite losses: flagged on the device every step, agreed over ranks at each check.
        self.finite = FiniteCheck(cfg.run.finite_check_every)
        self._last_checkpoint_t, self._checkpoint_due = time.monotonic(), False
        self._pending: TrainState | None = None  # a checkpoint due at a log step, written once the log is judged

    def normalizer(self, x: torch.Tensor) -> torch.Tensor:
        x = self._normalize(x)
        if self._poison:  # test hook (inject.nan_at_step): one non-finite input pixel
            x[0, 0, 0, 0] = float("nan")
            self._poison = False
        return x

    def on_step(self, state: TrainState) -> None:
        self._maybe_inject(state)
        every, iters = self.cfg.run.checkpoint_every, self.plan["iters_per_epoch"]
        due = (every and state.step % every == 0) or self._checkpoint_due
        if not (due and state.step % iters and state.step < self.plan["total_steps"]):
            return
        log_every = self.cfg.run.log_every
        if log_every and state.step % log_every == 0:
            # on_log follows at this step: its losses come from weights this checkpoint has moved
            # past, so the checkpoint waits for the collapse detector's verdict on them.
            self._pending = state
        else:
            self._mid_epoch_checkpoint(state)

    def holding_checkpoints(self) -> bool:
        """``collapse_action: stop`` and the logs look collapsed: no checkpoint is written until they
        recover, so that when the detector stops the run its latest checkpoint is the last one
        written before the window's first suspicious log (Ray's ``num_to_keep`` cannot push it
        out either). Same answer on every rank (the detector sees worker-averaged metrics)."""
        return self.cfg.run.collapse_action == "stop" and self.detector.enabled and self.detector.count > 0

    def _mid_epoch_checkpoint(self, state: TrainState) -> None:
        if self.holding_checkpoints():
            self._checkpoint_due = True  # written at the first step after the logs recover
            return
        self._checkpoint_due = False
        self.checkpoint(state, {"step": state.step, "epoch": state.epoch, **self.last_metrics})

    def on_log(self, metrics: dict) -> None:
        """Average over workers, feed the collapse detector, print progress, log to MLflow."""
        if self.detector.enabled and self.probe is not None:
            metrics["heatmap_uniformity"] = heatmap_uniformity(self.model, self.probe)
        minutes = self.cfg.run.checkpoint_every_minutes
        if minutes:  # averaged over ranks below, so every rank takes the same decision
            metrics["since_checkpoint_s"] = time.monotonic() - self._last_checkpoint_t
        metrics = _all_reduce_metrics(metrics)
        if minutes and metrics.pop("since_checkpoint_s") >= 60 * minutes:
            self._checkpoint_due = True
        if "collapse_from_step" in self.inject and metrics["step"] >= self.inject["collapse_from_step"]:
            # test hook: from this step on, the detector's input reads as collapsed (loss at ln K)
            metrics.update(dict.fromkeys(self.detector.keys, self.detector.ln_k))
        self.last_metrics = {k: v for k, v in metrics.items() if k.startswith("loss")}
        self.detector.update(metrics)  # identical input on every rank -> identical decision
        if self._pending is not None:
            pending, self._pending = self._pending, None
            self._mid_epoch_checkpoint(pending)
        if self.rank != 0:
            return
        self.tracker.log_metrics(metrics, metrics["step"])
        parts = " ".join(f"{k.split('/')[-1]}={metrics[k]:.4f}" for k in
                         ("loss", "loss/inst", "loss/region", "loss/cluster", "loss/swav") if k in metrics)
        log.info("step %d/%d epoch %d %s lr=%.4g ema=%.5f %.1f img/s data-wait %.0f%%", metrics["step"],
                 self.plan["total_steps"], metrics["epoch"] + 1, parts, metrics["lr"], metrics["momentum"],
                 metrics["images_per_s"], 100 * metrics["data_wait_frac"])
        report_progress("pretrain", metrics["step"], self.plan["total_steps"], "step", epoch=metrics["epoch"] + 1,
                        epochs=self.cfg.optim.epochs, loss=metrics.get("loss", float("nan")),
                        images_per_s=metrics["images_per_s"])

    def end_epoch(self, state: TrainState, stats: dict) -> None:
        """Epoch metrics to the history, console and MLflow, then a checkpoint.

        ``skipped_corrupt`` (corrupt images this epoch, summed over workers) covers the whole
        epoch, except in one that ``run.max_steps`` cut short (only what was read).
        """
        state.end_epoch(self.plan["iters_per_epoch"])
        stats = _all_reduce_metrics(dict(stats))
        if "skipped_corrupt" in stats:
            stats["skipped_corrupt"] = int(round(stats["skipped_corrupt"]))
        swav = self.cfg.model.swav
        if self.cfg.model.method == "swav" and state.step > swav.freeze_prototypes_iters and "loss/swav" in stats:
            # FRL_SPEC §1.2: a SwAV loss sitting at ln K once the prototypes are released means
            # collapse; rank 0 warns (the stats are worker averages, so every rank agrees).
            stats["swav_collapse"] = float(swav_collapse_check(stats["loss/swav"], swav.num_prototypes,
                                                               warn=self.rank == 0))
        state.history.append({k: v for k, v in stats.items() if isinstance(v, (int, float))})
        if self.rank == 0:
            log.info("epoch %d done at step %d: loss %.4f, %d images, %d corrupt image(s) skipped",
                     stats["epoch"] + 1, state.step, stats.get("loss", float("nan")), stats.get("images", 0),
                     stats.get("skipped_corrupt", 0))
            self.tracker.log_metrics({f"epoch/{k}": v for k, v in stats.items()}, state.step)
            self._heatmaps(state)
        metrics = {"step": state.step, "epoch": state.epoch, **{k: v for k, v in stats.items() if k.startswith("loss")}}
        if self.holding_checkpoints() and state.step < self.plan["total_steps"]:
            import ray.train

            self._checkpoint_due = True
            ray.train.report(metrics)  # the epoch's report (Tune's cadence), without a checkpoint
            return
        self._checkpoint_due = False
        self.checkpoint(state, metrics)

    def checkpoint(self, state: TrainState, metrics: dict) -> None:
        """Rank 0 writes a full checkpoint atomically; every rank reports (Ray's barrier)."""
        import ray.train

        self.finite.check()  # first: weights a non-finite step has touched are never saved
        tmp, ck = None, None
        if self.rank == 0:
            tmp = Path(tempfile.mkdtemp(prefix="fra-ckpt-"))
            extra = {"data_seed": self.cfg.data.seed, "world_size": self.world, **self.plan,
                     "step_in_epoch": state.step - state.epoch * self.plan["iters_per_epoch"]}
            save_checkpoint(tmp / CHECKPOINT_FILE, self.model, self.optimizer, state, self.record, self.scaler, extra)
            dump_yaml(self.record, tmp / "config.yaml")
            ck = ray.train.Checkpoint.from_directory(str(tmp))
        self._last_checkpoint_t = time.monotonic()
        if self.cfg.run.checkpoint_upload == "async":
            # Ray uploads in the background while every rank trains on, and deletes the local copy
            # once it is in storage; a node lost mid-upload leaves a folder Ray never registered
            # (set aside after the fit: ray_trainer.set_aside_unregistered_checkpoints).
            from ray.train import CheckpointUploadMode

            ray.train.report(metrics, checkpoint=ck, checkpoint_upload_mode=CheckpointUploadMode.ASYNC)
            return
        ray.train.report(metrics, checkpoint=ck)
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)

    def stopped(self, state: TrainState, exc: Exception) -> dict:
        """A guard fired on every rank: end cleanly (no retry) and tell the driver why."""
        if self.rank == 0:
            log.error("stopping: %s", exc)
        self.tracker.close()
        kind = "nonfinite" if isinstance(exc, NonFiniteLossError) else "collapse"
        return {"status": kind, "message": str(exc), "step": state.step, "planned": self.plan["total_steps"],
                "world_size": self.world}

    def finished(self, state: TrainState) -> dict:
        self.tracker.close()
        return {"status": "finished", "step": state.step, "epoch": state.epoch,
                "planned": self.plan["total_steps"], "world_size": self.world, "history": state.history,
                "skipped_corrupt_per_epoch": [int(h.get("skipped_corrupt", 0)) for h in state.history]}

    def _heatmaps(self, state: TrainState) -> None:
        if self.probe is None or not self.cfg.run.heatmaps_every_epoch or not self.tracker.enabled:
            return
        from PIL import Image

        from fra.heatmaps import write_overlays

        tmp = Path(tempfile.mkdtemp(prefix="fra-probe-"))
        paths = []
        for i, img in enumerate(self.probe_images):
            paths.append(tmp / f"probe_{i:02d}.png")
            Image.fromarray(img).save(paths[-1])
        out = tmp / f"epoch_{state.epoch:03d}"
        # "proto" heat maps need no collective, so rank 0 can draw them alone.
        write_overlays(self.model, paths, out, self.cfg.data.image_size, self.mean, self.std, mode="proto")
        self.tracker.log_artifact(out, f"heatmaps/{out.name}", cleanup=tmp)

    def _maybe_inject(self, state: TrainState) -> None:
        """Test hooks: kill this worker process once, raise, or poison the next input (and, in
        :meth:`on_log`, ``collapse_from_step``)."""
        from fra.ray_runtime import wait_until_reports_registered

        inj = self.inject
        if inj.get("kill_at_step") == state.step and inj.get("kill_rank", 0) == self.rank:
            marker = Path(inj["marker"])
            if not marker.exists():
                marker.write_text(str(state.step))
                wait_until_reports_registered()  # the latest checkpoint is the one the test expects
                os.kill(os.getpid(), signal.SIGKILL)
        if inj.get("raise_at_step") == state.step and self.rank == 0:
            wait_until_reports_registered()
            raise RuntimeError(f"injected failure at step {state.step}")
        if inj.get("nan_at_step") == state.step and self.rank == inj.get("nan_rank", 0):
            self._poison = True


def _all_reduce_metrics(metrics: dict) -> dict:
    """Mean of the numeric metrics over workers; counts and images/s (a global throughput) are summed."""
    if not dist.is_distributed():
        return metrics
    keys = sorted(k for k, v in metrics.items() if isinstance(v, (int, float)) and k not in ("step", "epoch"))
    vec = torch.tensor([float(metrics[k]) for k in keys], dtype=torch.float64, device=dist.collective_device())
    vec = dist.all_reduce_mean(vec).cpu()
    out = dict(metrics)
    for k, v in zip(keys, vec.tolist()):
        out[k] = v * dist.world_size() if k in ("images_per_s", "images", "skipped_corrupt") else v
    return out
