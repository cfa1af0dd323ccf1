"""Mid-epoch resume position of the pretraining worker's loop (no Ray).

``train_loop_per_worker`` runs :func:`fra.engine.train_one_epoch` over
:func:`fra.train.worker.epoch_batches` of each epoch's stream. Here the stream is deterministic
(batch ids ``100 * epoch + i``) and the model records the id of every batch it trains on, so an
interrupted run plus its resumption must see exactly the batches of an uninterrupted run, and
(:func:`fra.train.worker.seeded_steps`) the same draws from torch's RNG, whatever state the
resuming process's RNG was in.
"""
from __future__ import annotations

import pytest
import torch
from torch import nn

from fra.engine import Normalizer, Schedule, TrainState, train_one_epoch
from fra.train.worker import epoch_batches, seeded_steps, step_seed

ITERS, EPOCHS = 5, 2


class Recorder(nn.Module):
    """A one-parameter method with the engine's hooks that records which batch it trained on."""

    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.ones(()))
        self.seen: list[int] = []
        self.draws: list[float] = []  # what dropout would draw from torch's global RNG

    def forward(self, *views, online=None):
        self.seen.append(int(views[0][0, 0, 0, 0]))
        self.draws.append(float(torch.rand(())))
        return self.w * views[0].mean()

    def set_epoch(self, epoch): ...

    def after_forward(self, out): ...

    def after_backward(self, step): ...

    def after_step(self, step, momentum): ...


class Stream:
    """One epoch of batches; ``pulled`` counts what the loop took (the rest must be drained)."""

    def __init__(self, epoch: int, n: int = ITERS + 2):
        self.epoch, self.n, self.pulled = epoch, n, 0

    def __iter__(self):
        for i in range(self.n):
            self.pulled += 1
            x = torch.full((2, 3, 2, 2), float(100 * self.epoch + i))
            yield {"view1": x, "view2": x}


def run(state: TrainState, stop_at: int, n: int = ITERS + 2, rank: int = 0, model: Recorder | None = None):
    """The worker's epoch loop until ``stop_at`` steps (a crash right after that step's checkpoint)."""
    model, streams = model or Recorder(), []
    optimizer = torch.optim.SGD(model.parameters(), lr=0.0)
    schedule = Schedule(base_lr=0.0, iters_per_epoch=ITERS, epochs=EPOCHS, warmup_epochs=0)
    while state.step < stop_at:
        streams.append(Stream(state.epoch, n))
        batches = seeded_steps(epoch_batches(streams[-1], state, ITERS), state, seed=3, rank=rank)
        train_one_epoch(model, lambda out: {"loss": out}, optimizer, batches, schedule, state, Normalizer(),
                        log_every=0, max_steps=stop_at)
        state.end_epoch(ITERS)
    return model.seen, streams


UNINTERRUPTED = [0, 1, 2, 3, 4, 100, 101, 102, 103, 104]


@pytest.mark.parametrize("stop_at", [1, 3, 5, 7, 9])  # mid-epoch 0, the epoch boundary, mid-epoch 1
def test_resume_continues_with_the_batch_after_the_last_consumed_one(stop_at):
    full, streams = run(TrainState(), ITERS * EPOCHS)
    assert full == UNINTERRUPTED and all(s.pulled == s.n for s in streams)  # each epoch drained
    state = TrainState()
    first, _ = run(state, stop_at)
    checkpoint = TrainState(step=state.step, epoch=state.epoch)  # what restore() returns
    assert (checkpoint.step, checkpoint.epoch) == (stop_at, stop_at // ITERS)
    rest, streams = run(checkpoint, ITERS * EPOCHS)
    assert rest[0] == UNINTERRUPTED[stop_at] and first + rest == UNINTERRUPTED
    assert all(s.pulled == s.n for s in streams)


def test_a_short_epoch_repeats_its_last_batch_to_keep_the_step_count():
    """Corrupt images dropped from a worker's stream: it still takes ``iters`` steps (all ranks
    must), also when resumed past the end of what the stream delivers."""
    seen, _ = run(TrainState(), ITERS * EPOCHS, n=3)
    assert seen == [0, 1, 2, 2, 2, 100, 101, 102, 102, 102]
    seen, _ = run(TrainState(step=ITERS + 4, epoch=1), ITERS * EPOCHS, n=3)
    assert seen == [102]


@pytest.mark.parametrize("stop_at", [3, 5, 7])
def test_resumed_steps_draw_what_the_uninterrupted_run_drew_from_torchs_rng(stop_at):
    """A resumed process starts with whatever RNG state (here: a different seed); each step still
    draws what it drew in the uninterrupted run, because it is seeded from (seed, rank, step).
    Reference: the uninterrupted run's draws, and torch.manual_seed(step_seed(...)) for one step."""
    full = Recorder()
    run(TrainState(), ITERS * EPOCHS, model=full)
    first, rest = Recorder(), Recorder()
    state = TrainState()
    run(state, stop_at, model=first)
    torch.manual_seed(12345)  # the new process's RNG: anything
    run(TrainState(step=state.step, epoch=state.epoch), ITERS * EPOCHS, model=rest)
    assert first.draws + rest.draws == full.draws
    torch.manual_seed(step_seed(3, 0, stop_at))
    assert rest.draws[0] == float(torch.rand(()))
    other = Recorder()
    run(TrainState(), ITERS * EPOCHS, rank=1, model=other)
    assert not set(other.draws) & set(full.draws)  # another rank: other dropout masks


def test_step_seeds_do_not_repeat_across_ranks_and_steps():
    """The former per-rank scheme ``seed + 7919 * rank + step`` gave rank 1's step 0 the seed of
    rank 0's step 7919; seeds from (seed, rank, step) do not collide there (or anywhere nearby)."""
    seeds = {step_seed(0, rank, step) for rank in range(4) for step in range(8000)}
    assert len(seeds) == 4 * 8000
    assert step_seed(0, 1, 0) != step_seed(0, 0, 7919)
