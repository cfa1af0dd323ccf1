"""Non-finite losses: flagged on the device every step, read back only every few steps.

Reading a device value (``bool``, ``float``, ``.item()``, ``.tolist()``) makes the host wait
until the accelerator has finished everything queued, so a check at every step stalls a GPU.
:class:`FiniteCheck` instead records, with device ops only, the first step at which each loss
component went NaN/inf and its value there; :meth:`FiniteCheck.check` reads that back (one
all-reduce and one host read) every ``every`` steps, at log steps, at epoch ends and *before
every checkpoint*. The weights of the steps in between may go non-finite, but a checkpoint is
written only after a check that covers every step before it, so no checkpoint ever holds
them: a failed check stops the run, and the last checkpoint is the state to roll back to.
"""
from __future__ import annotations

import math

import torch
import torch.distributed as tdist

from fra import dist
from fra.errors import FraError


class NonFiniteLossError(FraError, FloatingPointError):
    """A loss component became NaN/inf (on any worker); the run stops at the next check.

    Attributes:
        step: the first step whose loss was non-finite.
        ranks: the workers on which it was (``[0]`` in one process).
    """

    def __init__(self, message: str, step: int = -1, ranks: tuple[int, ...] = ()):
        super().__init__(message)
        self.step, self.ranks = step, ranks


def check_finite(losses: dict[str, torch.Tensor], step: int) -> None:
    """Raise :class:`NonFiniteLossError` now, naming the step and the bad components (one host read)."""
    values = torch.stack([v.detach().float() for v in losses.values()])
    if bool(torch.isfinite(values).all()):
        return
    bad = [k for k, v in losses.items() if not math.isfinite(float(v.detach()))]
    raise NonFiniteLossError(f"non-finite loss at step {step}: {', '.join(bad)} "
                             f"({ {k: float(losses[k].detach()) for k in bad} }); weights left untouched",
                             step, (dist.rank(),))


class FiniteCheck:
    """Deferred, worker-agreed detection of non-finite loss components.

    Every worker must call :meth:`record` for the same steps and :meth:`check` at the same
    steps (the loop's step counter is identical on all ranks), since the check is a collective.

    Args:
        every: steps between checks; 0 = only where the loop also reads values back (log steps),
            before checkpoints and at epoch ends.
    """

    def __init__(self, every: int = 0):
        self.every = every
        self.keys: tuple[str, ...] = ()
        self._first: torch.Tensor | None = None  # (C,) float64: first bad step per component, -1 = none
        self._value: torch.Tensor | None = None  # (C,) float64: the component's value at that step
        self.pending = 0  # steps recorded since the last check
        self.last_step = -1  # the last step recorded
        self.good_until = 0  # every step before this one passed a check

    def record(self, keys: tuple[str, ...], values: torch.Tensor, step: int) -> None:
        """Note which loss components of ``step`` are non-finite, with device ops only.

        Args:
            keys: the components' names, the same at every step.
            values: (C,) the detached components, on the training device.
        """
        if self._first is None:
            self.keys = tuple(keys)
            self._first = torch.full(values.shape, -1.0, dtype=torch.float64, device=values.device)
            self._value = torch.zeros(values.shape, dtype=torch.float64, device=values.device)
        elif tuple(keys) != self.keys:
            raise ValueError(f"loss components changed from {self.keys} to {tuple(keys)}")
        new = ~torch.isfinite(values) & (self._first < 0)
        self._first = torch.where(new, float(step), self._first)
        self._value = torch.where(new, values.double(), self._value)
        self.pending += 1
        self.last_step = step

    def due(self, steps_done: int) -> bool:
        """Whether the every-``every``-steps check falls after ``steps_done`` steps."""
        return bool(self.every) and steps_done % self.every == 0

    def check(self) -> None:
        """Raise :class:`NonFiniteLossError` if any step recorded so far was non-finite on any worker.

        A no-op when nothing was recorded since the last check (so a checkpoint right after a
        log step costs nothing). The same decision is reached on every worker.
        """
        if not self.pending:
            return
        self.pending = 0
        local = torch.cat([self._first, self._value])
        if dist.is_distributed():
            # Row r = worker r's (first bad step, value) per component; a SUM assembles the table.
            table = torch.zeros(dist.world_size(), local.numel(), dtype=torch.float64,
                                device=dist.collective_device())
            table[dist.rank()] = local.to(table.device)
            tdist.all_reduce(table)
            rows = table.tolist()
        else:
            rows = [local.tolist()]
        c = len(self.keys)
        bad = [(r, i) for r, row in enumerate(rows) for i in range(c) if row[i] >= 0]
        if not bad:
            self.good_until = self.last_step + 1
            return
        step = int(min(rows[r][i] for r, i in bad))
        at_step = [(r, i) for r, i in bad if rows[r][i] == step]
        ranks = tuple(sorted({r for r, _ in at_step}))
        names = sorted({i for _, i in at_step})
        values = {self.keys[i]: next(rows[r][c + i] for r, j in at_step if j == i) for i in names}
        where = f" on worker(s) {', '.join(map(str, ranks))}" if len(rows) > 1 else ""
        raise NonFiniteLossError(
            f"non-finite loss at step {step}: {', '.join(self.keys[i] for i in names)} ({values}){where}; "
            f"found by the check after step {self.last_step}: the weights from step {step} on are discarded "
            f"(checkpoints are written only after a passing check, so none holds them)", step, ranks)
