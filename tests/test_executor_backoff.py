"""The idle back-off of Ray Data's scheduling loop (fra.data.executor_backoff).

Expectations come from the behaviour the module promises (doubling sleeps from 1 ms, capped at
50 ms, only for steps that neither waited nor changed anything), derived by hand below, and
from Ray 2.60's real executor for the fingerprint. The CPU it saves is measured in
benchmarks/fer_scale.py, not here.
"""
from __future__ import annotations

from types import SimpleNamespace

import pytest

from fra.data import executor_backoff as eb


class Clock:
    """perf_counter / thread_time / sleep under the test's control."""

    def __init__(self):
        self.wall, self.cpu, self.slept = 0.0, 0.0, []

    def perf_counter(self):
        return self.wall

    def thread_time(self):
        return self.cpu

    def sleep(self, s):
        self.slept.append(round(s, 6))
        self.wall += s

    def spin(self, s=0.001):  # a step that burns CPU
        self.wall += s
        self.cpu += s

    def wait(self, s=0.1):  # a step blocked in ray.wait
        self.wall += s


class Op:
    def __init__(self):
        self.metrics = SimpleNamespace(num_tasks_submitted=0, num_tasks_finished=0, num_task_outputs_generated=0,
                                       num_outputs_taken=0, num_inputs_received=0)
        self.active = 0

    def num_active_tasks(self):
        return self.active


def _executor():
    op = Op()
    state = SimpleNamespace(num_completed_tasks=0, output_queue=[])
    return SimpleNamespace(_topology={op: state}, _shutdown=False), op, state


@pytest.fixture
def clock(monkeypatch):
    c = Clock()
    monkeypatch.setattr(eb, "time", c)
    return c


def test_idle_spinning_steps_back_off_doubling_to_50_ms(clock):
    ex, op, state = _executor()
    cb = eb.IdleBackoff()
    cb.before_execution_starts(ex)
    for _ in range(9):
        clock.spin()
        cb.on_execution_step(ex)
    # first step only records the fingerprint; then 1, 2, 4, 8, 16, 32 ms and the 50 ms cap
    assert clock.slept == [0.001, 0.002, 0.004, 0.008, 0.016, 0.032, 0.05, 0.05]
    assert cb.idle_steps == 8 and cb.slept_s == pytest.approx(0.163)


@pytest.mark.parametrize("change", [
    lambda op, st: setattr(op.metrics, "num_outputs_taken", 1),   # the consumer pulled a block
    lambda op, st: setattr(op.metrics, "num_tasks_submitted", 1),  # a task was dispatched
    lambda op, st: st.output_queue.append("bundle"),               # an output arrived
    lambda op, st: setattr(op, "active", 1),                       # a task started
    lambda op, st: setattr(st, "num_completed_tasks", 1),
])
def test_any_progress_resets_the_back_off(clock, change):
    ex, op, state = _executor()
    cb = eb.IdleBackoff()
    for _ in range(4):
        clock.spin()
        cb.on_execution_step(ex)
    assert clock.slept == [0.001, 0.002, 0.004]
    change(op, state)
    clock.spin()
    cb.on_execution_step(ex)
    assert clock.slept == [0.001, 0.002, 0.004]  # a step that changed something does not sleep
    clock.spin()
    cb.on_execution_step(ex)
    assert clock.slept[-1] == 0.001  # and the next idle step starts again from 1 ms


def test_a_step_that_waited_in_ray_wait_does_not_sleep(clock):
    ex, _, _ = _executor()
    cb = eb.IdleBackoff()
    clock.spin()
    cb.on_execution_step(ex)
    for _ in range(3):
        clock.wait(0.1)  # ray.wait timed out: the loop is not spinning, nothing to save
        cb.on_execution_step(ex)
    assert clock.slept == []


def test_shutdown_and_unknown_internals_never_sleep(clock):
    ex, _, _ = _executor()
    cb = eb.IdleBackoff()
    ex._shutdown = True
    for _ in range(3):
        clock.spin()
        cb.on_execution_step(ex)
    other = SimpleNamespace()  # another Ray version's executor: Ray's own behaviour
    assert eb.progress_fingerprint(other) is None
    for _ in range(3):
        clock.spin()
        cb.on_execution_step(other)
    assert clock.slept == []
