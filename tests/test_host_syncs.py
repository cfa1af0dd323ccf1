"""The training step never waits for the device: host reads only at log steps and checks.

A host sync is any read of a tensor's value into Python (``.item()``, ``.tolist()``, ``bool``,
``float``, ``int``, ``.cpu()``, ``.numpy()``); on a GPU each one stalls the host until the
queued kernels finish. On CPU there is nothing to wait for, but the calls can be counted, so
these tests count them step by step for the plain loop and for the Ray Train worker's hooks
(without Ray), and check the deferred non-finite guard: it fires, names the first bad step,
agrees over two gloo workers, and runs before every checkpoint so none holds non-finite weights.
"""
from __future__ import annotations

import os
import tempfile

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from fra.config import ModelConfig, OptimConfig, PretrainConfig, from_dict
from fra.engine import Normalizer, Schedule, TrainState, train_one_epoch
from fra.losses import build_loss
from fra.models import build_model, online_view
from fra.nonfinite import FiniteCheck, NonFiniteLossError
from fra.optim import build_optimizer

pytestmark = pytest.mark.usefixtures("one_thread_per_module")  # tests/conftest.py

MODEL = {"backbone": "resnet18", "hidden_dim": 64, "proj_dim": 32, "num_proto": 4, "decoder_heads": 4,
         "decoder_ffn": 64, "dropout": 0.1}
SIZE, BATCH = 64, 4
READS = ("item", "tolist", "__bool__", "__float__", "__int__", "__index__", "cpu", "numpy")


class HostSyncs:
    """Counts Python-level reads of tensor values while active (``with HostSyncs() as syncs``)."""

    def __init__(self):
        self.count = 0
        self.calls: list[str] = []

    def __enter__(self):
        self._saved = {name: getattr(torch.Tensor, name) for name in READS}
        for name, fn in self._saved.items():
            setattr(torch.Tensor, name, self._counting(name, fn))
        return self

    def __exit__(self, *exc):
        for name, fn in self._saved.items():
            setattr(torch.Tensor, name, fn)

    def _counting(self, name, fn):
        def read(tensor, *args, **kwargs):
            self.count += 1
            self.calls.append(name)
            return fn(tensor, *args, **kwargs)
        return read


def _batches(n: int, nan_at: int = -1) -> list[dict]:
    """uint8 two-view batches; ``nan_at``: that batch is float with one NaN pixel."""
    g = torch.Generator().manual_seed(0)
    out = []
    for i in range(n):
        views = {k: torch.randint(0, 256, (BATCH, 3, SIZE, SIZE), dtype=torch.uint8, generator=g)
                 for k in ("view1", "view2")}
        if i == nan_at:
            views["view1"] = Normalizer()(views["view1"])
            views["view1"][0, 0, 0, 0] = float("nan")
        out.append(views)
    return out


def _marked(batches, syncs: HostSyncs, marks: list[int]):
    """The batches, noting the sync count each time the loop asks for the next one."""
    for b in batches:
        marks.append(syncs.count)
        yield b


def _per_step(marks: list[int]) -> list[int]:
    """Syncs of steps 0..n-2 (the last step's count would include the epoch-end reads)."""
    return [b - a for a, b in zip(marks, marks[1:])]


def _setup(method: str = "fra"):
    cfg = ModelConfig(**MODEL, method=method)
    torch.manual_seed(0)
    model = build_model(cfg)
    return model, build_loss(cfg), build_optimizer(model, OptimConfig(lr=0.5, epochs=1, warmup_epochs=0))


def test_counter_sees_every_kind_of_read():
    t = torch.tensor([1.5])
    with HostSyncs() as syncs:
        bool(t), float(t), int(t), t.item(), t.tolist(), t.cpu(), t.numpy(), f"{t[0]:.1f}", [0, 1][t.long()[0]]
    assert syncs.count == 9 and {"__bool__", "__float__", "__int__", "item", "tolist", "cpu", "numpy",
                                 "__index__"} <= set(syncs.calls)


@pytest.mark.slow
@pytest.mark.parametrize("method", ["fra", "byol"])
@pytest.mark.parametrize("check_every", [0, 3])
def test_plain_loop_reads_back_only_at_log_and_check_steps(method, check_every):
    model, loss_fn, opt = _setup(method)
    n, log_every = 9, 4
    schedule = Schedule.from_config(OptimConfig(lr=0.5, epochs=1, warmup_epochs=0), ModelConfig(), n)
    logs, marks = [], []
    with HostSyncs() as syncs:
        stats = train_one_epoch(model, loss_fn, opt, _marked(_batches(n), syncs, marks), schedule, TrainState(),
                                Normalizer(), online=online_view(model), log_every=log_every,
                                finite=FiniteCheck(check_every), on_log=logs.append)
    per_step = _per_step(marks)
    reading = {s for s in range(n - 1) if (s + 1) % log_every == 0 or (check_every and (s + 1) % check_every == 0)}
    assert {s for s, c in enumerate(per_step) if c} == reading, per_step
    assert max(per_step) <= 2  # one check + one read of the logged losses
    assert [m["step"] for m in logs] == [4, 8] and stats["steps"] == n
    assert all(torch.isfinite(torch.tensor(m["loss"])) for m in logs)


@pytest.mark.slow
def test_worker_step_reads_back_only_at_log_steps(tmp_path):
    """The Ray Train worker's step: its normaliser, on_step and on_log hooks (collapse detector on)."""
    from fra.train.worker import WorkerHooks

    cfg = from_dict(PretrainConfig, {"model": MODEL, "optim": {"lr": 0.5, "epochs": 1, "warmup_epochs": 0,
                                                               "batch_size": BATCH},
                                     "data": {"image_size": SIZE},
                                     "run": {"log_every": 3, "collapse_patience": 2, "storage_path": str(tmp_path)}})
    n = 8
    plan = {"iters_per_epoch": n, "total_steps": n, "global_batch": BATCH}
    model, _, opt = _setup()
    hooks = WorkerHooks(cfg, plan, model, opt, None, 0, 1, {}, torch.device("cpu"))
    schedule = Schedule.from_config(cfg.optim, cfg.model, n)
    marks = []
    with HostSyncs() as syncs:
        train_one_epoch(model, build_loss(cfg.model), opt, _marked(_batches(n), syncs, marks), schedule,
                        TrainState(), hooks.normalizer, online=online_view(model), log_every=cfg.run.log_every,
                        finite=hooks.finite, on_log=hooks.on_log, on_step=hooks.on_step)
    per_step = _per_step(marks)
    assert {s for s, c in enumerate(per_step) if c} == {2, 5}, per_step
    assert hooks.last_metrics["loss"] > 0


@pytest.mark.slow
def test_deferred_check_names_the_first_bad_step_and_guards_checkpoints():
    """NaN at step 5, checks every 4 steps: a checkpoint hook at step 6 refuses to save."""
    model, loss_fn, opt = _setup()
    schedule = Schedule.from_config(OptimConfig(lr=0.5, epochs=1, warmup_epochs=0), ModelConfig(), 10)
    finite = FiniteCheck(every=4)
    saved = {}

    def checkpoint_every_2(state):
        if state.step % 2 == 0:
            finite.check()  # the rule every checkpoint writer follows
            saved[state.step] = all(torch.isfinite(p).all() for p in model.parameters())

    state = TrainState()
    with pytest.raises(NonFiniteLossError, match=r"non-finite loss at step 5: loss.*after step 5") as exc:
        train_one_epoch(model, loss_fn, opt, _batches(10, nan_at=5), schedule, state, Normalizer(),
                        log_every=0, finite=finite, on_step=checkpoint_every_2)
    assert exc.value.step == 5 and exc.value.ranks == (0,)
    assert state.step == 6  # stopped at the checkpoint after the bad step, before the every-4 check at 8
    assert saved == {2: True, 4: True}
    assert not all(torch.isfinite(p).all() for p in model.parameters())  # what the check kept out of a file


@pytest.mark.slow
def test_epoch_end_check_catches_what_no_log_step_saw():
    model, loss_fn, opt = _setup()
    schedule = Schedule.from_config(OptimConfig(lr=0.5, epochs=1, warmup_epochs=0), ModelConfig(), 4)
    with pytest.raises(NonFiniteLossError, match="step 2"):
        train_one_epoch(model, loss_fn, opt, _batches(4, nan_at=2), schedule, TrainState(), Normalizer(), log_every=0)


@pytest.mark.slow
def test_worker_never_writes_a_checkpoint_after_a_nonfinite_step(tmp_path, monkeypatch):
    """WorkerHooks.checkpoint (Ray's report faked): NaN injected at step 3, checkpoints every 2 steps."""
    import ray.train

    import fra.train.worker as worker

    cfg = from_dict(PretrainConfig, {"model": MODEL, "optim": {"lr": 0.5, "epochs": 1, "warmup_epochs": 0,
                                                               "batch_size": BATCH},
                                     "data": {"image_size": SIZE},
                                     "run": {"log_every": 0, "checkpoint_every": 2, "storage_path": str(tmp_path)}})
    n = 8
    plan = {"iters_per_epoch": n, "total_steps": n, "global_batch": BATCH}
    model, loss_fn, opt = _setup()
    hooks = worker.WorkerHooks(cfg, plan, model, opt, None, 0, 1, {"inject": {"nan_at_step": 3}}, torch.device("cpu"))
    written = []

    def save(path, model, *args, **kwargs):
        written.append((args[1].step, all(torch.isfinite(v).all() for v in model.state_dict().values()
                                          if v.is_floating_point())))

    monkeypatch.setattr(worker, "save_checkpoint", save)
    monkeypatch.setattr(ray.train, "report", lambda *args, **kwargs: None)
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    schedule = Schedule.from_config(cfg.optim, cfg.model, n)
    state = TrainState()
    with pytest.raises(NonFiniteLossError, match="non-finite loss at step 3: loss") as exc:
        train_one_epoch(model, loss_fn, opt, _batches(n), schedule, state, hooks.normalizer,
                        log_every=0, finite=hooks.finite, on_step=hooks.on_step)
    assert exc.value.step == 3 and state.step == 4
    assert written == [(2, True)]
    assert hooks.stopped(state, exc.value)["status"] == "nonfinite"


def _agree(rank: int, world: int, store: str, out_dir: str, bad_rank: int):
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    try:
        finite = FiniteCheck(every=4)
        result = "passed"
        try:
            for step in range(8):
                value = float("nan") if (rank == bad_rank and step == 2) else 1.0
                finite.record(("loss", "loss/inst"), torch.tensor([value, 0.5]), step)
                if finite.due(step + 1):
                    finite.check()
        except NonFiniteLossError as exc:
            result = (exc.step, exc.ranks, step, str(exc))
        torch.save(result, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
@pytest.mark.parametrize("bad_rank", [1, -1])
def test_two_gloo_workers_agree_on_the_check(tmp_path, bad_rank):
    mp.start_processes(_agree, args=(2, str(tmp_path / "store"), str(tmp_path), bad_rank), nprocs=2,
                       start_method="spawn")
    results = [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(2)]
    if bad_rank < 0:
        assert results == ["passed", "passed"]
        return
    assert results[0] == results[1]  # same decision, at the same step, on both workers
    step, ranks, stopped_at, message = results[0]
    assert (step, ranks, stopped_at) == (2, (1,), 3)
    assert "non-finite loss at step 2: loss (" in message and "on worker(s) 1" in message


@pytest.mark.slow
def test_swav_multicrop_step_with_queue_reads_back_only_at_log_steps():
    """FRL's SwAV: multi-crop views, LARC, distributed Sinkhorn, prototype freezing and the queue."""
    swav = {"num_prototypes": 30, "proj_hidden": 64, "proj_dim": 32, "freeze_prototypes_iters": 2,
            "queue_length": 8, "epoch_queue_starts": 0, "nmb_crops": [2, 2], "size_crops": [32, 16],
            "min_scale_crops": [0.14, 0.05], "max_scale_crops": [1.0, 0.14]}
    cfg = from_dict(PretrainConfig, {
        "model": {"method": "swav", "backbone": "resnet18", "swav": swav},
        "optim": {"optimizer": "larc", "schedule": "swav", "lr": 0.6, "epochs": 1, "warmup_epochs": 0,
                  "batch_size": BATCH}})
    torch.manual_seed(0)
    model = build_model(cfg.model)
    opt = build_optimizer(model, cfg.optim)
    n, log_every = 7, 3
    g = torch.Generator().manual_seed(0)
    crops = {"view1": 32, "view2": 32, "crop1": 16, "crop2": 16}
    batches = [{k: torch.randint(0, 256, (BATCH, 3, s, s), dtype=torch.uint8, generator=g) for k, s in crops.items()}
               for _ in range(n)]
    marks = []
    with HostSyncs() as syncs:
        train_one_epoch(model, build_loss(cfg.model), opt, _marked(batches, syncs, marks),
                        Schedule.from_config(cfg.optim, cfg.model, n), TrainState(), Normalizer(),
                        online=online_view(model), log_every=log_every)
    assert model.queue_in_use  # the last steps ran with the queue in the Sinkhorn batch
    per_step = _per_step(marks)
    assert {s for s, c in enumerate(per_step) if c} == {2, 5}, per_step
