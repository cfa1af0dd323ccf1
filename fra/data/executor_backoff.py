"""Stop Ray Data's scheduling loop from spinning while the consumer is behind.

Ray 2.60's ``StreamingExecutor`` runs ``_scheduling_loop_step`` in a loop. The loop blocks only in
``ray.wait(active tasks, timeout=0.1)``; when the decode tasks are ahead of the trainer, their
streaming outputs are ready but held back by backpressure, so ``ray.wait`` returns at once, nothing
is read or dispatched, and the loop goes round again. py-spy showed the split coordinator spending
0.15-0.17 CPU-s per image there in the RAF-DB-sized FER benchmark, about 0.7 of a core taken from a
2-thread trainer on a 2-core node (benchmarks/RESULTS.md, "FER at RAF-DB's size").

:class:`IdleBackoff` is an ``ExecutionCallback`` (Ray Data calls ``on_execution_step`` once per loop
step, on the loop's thread). It takes a cheap fingerprint of the executor's progress: per operator the
tasks submitted and finished, outputs generated and taken, inputs received and queued bundles. When a
step did not wait in ``ray.wait`` (its wall time is its thread's CPU time) and changed nothing, it sleeps, doubling from 1 ms up
to :data:`MAX_SLEEP_S`; any change resets it. So a loop with work to do runs as before, an idle loop
wakes every 50 ms, and the executor notices a consumer's pull at most 50 ms late. That delays only the
dispatch of new decode tasks, which are blocks ahead of the consumer when the loop idles; the consumer
takes its blocks from the coordinator's output queue without the loop. Measured with a consumer taking a
32-image batch every 3.5 s (a 2-thread ResNet-18 fine-tune on this machine), the split coordinator
used 0.96 of a core without the back-off, 0.19 with a 10 ms cap and 0.06 with 50 ms. Anything unexpected about the executor's internals
(another Ray version) turns the callback into a no-op: Ray's own behaviour, never an error.

Installed by :func:`fra.data.stream._read` in the ``DataContext`` each fra dataset snapshots, so it
travels with the dataset to the split coordinator of a Ray Train job.
"""
from __future__ import annotations

import time

from ray.data._internal.execution.execution_callback import ExecutionCallback

MIN_SLEEP_S = 0.001
MAX_SLEEP_S = 0.050
# A step whose wall time exceeds its thread's CPU time by this much waited in ray.wait: not a spin.
WAITED_S = 0.020

_METRICS = ("num_tasks_submitted", "num_tasks_finished", "num_task_outputs_generated",
            "num_outputs_taken", "num_inputs_received")


def progress_fingerprint(executor) -> tuple | None:
    """What changes when the executor makes progress, or None if its internals are not as expected."""
    try:
        sig = []
        for op, state in executor._topology.items():
            m = op.metrics
            sig.append(tuple(getattr(m, name, None) for name in _METRICS))
            sig.append((state.num_completed_tasks, len(state.output_queue), op.num_active_tasks()))
        return tuple(sig)
    except Exception:  # noqa: BLE001 - a different Ray: behave exactly like Ray without us
        return None


class IdleBackoff(ExecutionCallback):
    """Sleep between scheduling-loop steps that neither waited nor changed anything."""

    def __init__(self):
        self._last: tuple | None = None
        self._sleep = 0.0
        self._t, self._cpu = time.perf_counter(), time.thread_time()
        self.slept_s = 0.0  # total, for tests and profiles
        self.idle_steps = 0

    def before_execution_starts(self, executor) -> None:
        self._last, self._sleep = None, 0.0
        self._t, self._cpu = time.perf_counter(), time.thread_time()

    def on_execution_step(self, executor) -> None:
        now, cpu = time.perf_counter(), time.thread_time()
        waited = (now - self._t) - (cpu - self._cpu) >= WAITED_S
        self._t, self._cpu = now, cpu
        sig = progress_fingerprint(executor)
        if sig is None or sig != self._last or waited or getattr(executor, "_shutdown", False):
            self._last, self._sleep = sig, 0.0
            return
        self._sleep = min(MAX_SLEEP_S, max(MIN_SLEEP_S, 2 * self._sleep))
        self.idle_steps += 1
        self.slept_s += self._sleep
        time.sleep(self._sleep)
        self._t = time.perf_counter()  # the sleep is not a wait of the next step
