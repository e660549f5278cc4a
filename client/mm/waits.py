"""Named waits: every blocking wait in the model says what it waits for and who can provide it.

A watchdog reads ``WaitRegistry.snapshot()`` to print wait-for chains such as
``kswapd -> mempool(bio) -> writeback(req 812)``. The wait itself is a ``WaitQueue`` (the
kernel's wait queue) or a trio ``Event``.
"""

from __future__ import annotations

import math
from types import TracebackType

import attrs
import outcome
import trio
from trio.lowlevel import Abort, RaiseCancelT, Task, current_task, reschedule, wait_task_rescheduled

# Kinds used by the memory model. "idle" is a task with nothing to do (kswapd asleep): not a
# dependency.
IDLE = "idle"


class WaitQueue:
    """``wait_queue_head_t``: tasks sleep on it until woken, first come first woken.

    What trio's ``ParkingLot`` does, for the model's hot paths: waking an empty queue costs
    one test, and a sleep with a timeout (``park_until``) ends without raising and catching
    ``Cancelled``.  It wakes the same tasks at the same moments as ``ParkingLot`` under
    ``move_on_at``: a timeout is a cancel scope's deadline, expired by trio's run loop, so a
    virtual-clock run schedules exactly as before.
    """

    __slots__ = ("_parked",)

    def __init__(self) -> None:
        self._parked: dict[Task, None] = {}

    def __len__(self) -> int:
        return len(self._parked)

    def __bool__(self) -> bool:
        return bool(self._parked)

    async def park(self) -> None:
        """Sleep until woken (``wait_event``); a cancellation ends the wait as usual."""
        task = current_task()
        parked = self._parked
        parked[task] = None

        def abort(_raise_cancel: RaiseCancelT) -> Abort:
            del parked[task]
            return Abort.SUCCEEDED

        await wait_task_rescheduled(abort)

    async def park_until(self, deadline: float) -> bool:
        """Sleep until woken (True) or until ``deadline`` on trio's clock (False):
        ``wait_event_timeout``."""
        if deadline == math.inf:
            await self.park()
            return True
        task = current_task()
        parked = self._parked
        parked[task] = None
        with trio.CancelScope(deadline=deadline) as scope:

            def abort(_raise_cancel: RaiseCancelT) -> Abort:
                del parked[task]
                if scope.cancel_called:  # our own deadline: wake with "timed out"
                    reschedule(task, outcome.Value(False))
                    return Abort.FAILED
                return Abort.SUCCEEDED

            woken: bool | None = await wait_task_rescheduled(abort)
        return woken is None

    def unpark(self) -> None:
        """Wake the task that has slept longest, if any (``wake_up`` of one exclusive waiter)."""
        parked = self._parked
        if parked:
            task = next(iter(parked))
            del parked[task]
            reschedule(task)

    def unpark_all(self) -> None:
        """Wake every sleeping task (``wake_up_all``)."""
        parked = self._parked
        if parked:
            tasks = list(parked)
            parked.clear()
            for task in tasks:
                reschedule(task)


async def sleep_until(deadline: float) -> None:
    """``trio.sleep_until`` without raising and catching ``Cancelled`` at the deadline: the
    task wakes at the same moment of trio's run loop (its cancel scope's deadline expires),
    so the schedule is the same; only the cost differs."""
    task = current_task()
    with trio.CancelScope(deadline=deadline) as scope:

        def abort(_raise_cancel: RaiseCancelT) -> Abort:
            if scope.cancel_called:  # our own deadline: a plain wake-up
                reschedule(task)
                return Abort.FAILED
            return Abort.SUCCEEDED

        await wait_task_rescheduled(abort)


async def sleep(seconds: float) -> None:
    """``trio.sleep``, as ``sleep_until`` (the deadline is taken now)."""
    await sleep_until(trio.current_time() + seconds)


class _Waiting:
    """``WaitRegistry.waiting``'s context manager (a class: it is entered on every wait)."""

    __slots__ = ("_previous", "_task", "_waits", "_what")

    def __init__(self, waits: dict[Task, WaitFor], what: WaitFor) -> None:
        self._waits = waits
        self._what = what

    def __enter__(self) -> None:
        self._task = task = current_task()
        self._previous = self._waits.get(task)
        self._waits[task] = self._what

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self._previous is None:
            del self._waits[self._task]
        else:
            self._waits[self._task] = self._previous


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

    _waits: dict[Task, WaitFor] = attrs.field(factory=dict)
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

    def items(self) -> list[tuple[Task, WaitFor]]:
        return list(self._waits.items())

    def get(self, task: Task) -> WaitFor | None:
        return self._waits.get(task)

    def __len__(self) -> int:
        return len(self._waits)

    def waiting(self, what: WaitFor) -> _Waiting:
        """Record that the current task waits for ``what`` for the duration of the block."""
        return _Waiting(self._waits, what)

    async def park(
        self,
        lot: WaitQueue,
        what: WaitFor,
        timeout: float = math.inf,
    ) -> bool:
        """Sleep on ``lot`` until unparked (True) or ``timeout`` seconds pass (False)."""
        with _Waiting(self._waits, what):
            return await lot.park_until(trio.current_time() + timeout)

    async def wait_event(self, event: trio.Event, what: WaitFor) -> None:
        """Wait until ``event`` is set."""
        if event.is_set():
            await trio.lowlevel.checkpoint()
            return
        with self.waiting(what):
            await event.wait()
