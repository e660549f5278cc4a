"""Named waits: every blocking wait in the model says what it waits for and who can provide it.

A watchdog reads ``WaitRegistry.snapshot()`` to print wait-for chains such as
``kswapd -> mempool(bio) -> writeback(req 812)``. The wait itself is a trio ``ParkingLot``
(the kernel's wait queue) or ``Event``.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager

import attrs
import trio

# Kinds used by the memory model. "idle" is a task with nothing to do (kswapd asleep): not a
# dependency.
IDLE = "idle"


@attrs.frozen
class WaitFor:
    """What a blocked task waits for (``kind(resource)``) and who can provide it (``waker``)."""

    kind: str
    resource: str
    waker: str

    def __str__(self) -> str:
        return f"{self.kind}({self.resource})"


@attrs.define
class WaitRegistry:
    """Which task waits for what, right now (the machine-wide ``machine_waits``)."""

    _waits: dict[trio.lowlevel.Task, WaitFor] = attrs.field(factory=dict)
    #: Role (a ``WaitFor.waker``) -> names of the trio tasks that play it.
    roles: dict[str, list[str]] = attrs.field(factory=dict)

    def provide(self, role: str, task_name: str) -> None:
        """Record that the task named ``task_name`` can provide ``role`` (idempotent)."""
        tasks = self.roles.setdefault(role, [])
        if task_name not in tasks:
            tasks.append(task_name)

    def retire(self, role: str, task_name: str) -> None:
        """The task named ``task_name`` no longer provides ``role`` (no error if it did not)."""
        tasks = self.roles.get(role)
        if tasks is not None and task_name in tasks:
            tasks.remove(task_name)
            if not tasks:
                del self.roles[role]

    def snapshot(self) -> dict[str, WaitFor]:
        """Task name -> what it waits for (names are trio task names)."""
        return {task.name: what for task, what in self._waits.items()}

    def items(self) -> list[tuple[trio.lowlevel.Task, WaitFor]]:
        return list(self._waits.items())

    def get(self, task: trio.lowlevel.Task) -> WaitFor | None:
        return self._waits.get(task)

    def __len__(self) -> int:
        return len(self._waits)

    @contextmanager
    def waiting(self, what: WaitFor) -> Iterator[None]:
        """Record that the current task waits for ``what`` for the duration of the block."""
        task = trio.lowlevel.current_task()
        previous = self._waits.get(task)
        self._waits[task] = what
        try:
            yield
        finally:
            if previous is None:
                del self._waits[task]
            else:
                self._waits[task] = previous

    async def park(
        self, lot: trio.lowlevel.ParkingLot, what: WaitFor, timeout: float = math.inf
    ) -> bool:
        """Sleep on ``lot`` until unparked (True) or ``timeout`` seconds pass (False)."""
        with self.waiting(what), trio.move_on_after(timeout) as scope:
            await lot.park()
        return not scope.cancelled_caught

    async def wait_event(self, event: trio.Event, what: WaitFor) -> None:
        """Wait until ``event`` is set."""
        if event.is_set():
            await trio.lowlevel.checkpoint()
            return
        with self.waiting(what):
            await event.wait()
