"""The deadlock watchdog: no *progress* for ``stall_seconds`` while tasks wait ends the run.

Progress is a tuple of counters that only move forward when real work is done (pages freed,
writebacks completed, swap-ins completed, workload steps); retries and drops are activity and
must not be part of it.  When the tuple has not changed for ``stall_seconds`` (trio clock, so
the virtual clock works) and at least one task is in a non-idle wait, :meth:`Watchdog.run`
returns a :class:`Verdict`.  The caller cancels the run, logs ``watchdog.deadlock`` and puts
``deadlock.cycle`` into the summary; the watchdog itself never logs.

The wait-for graph comes from a :class:`~client.mm.waits.WaitRegistry`: a task waiting for
``WaitFor(kind, resource, waker)`` depends on every task that plays the role ``waker``
(``WaitRegistry.roles``).  A role nobody plays is a dead end, unless the role name is itself
the name of a task in the snapshot.  Paths are rendered alternating task names and wait
descriptions, e.g. ``["kswapd0", "writeback(swap0 req 812)", "nbd0.rx",
"rx_buffer(sock nbd0)", "kswapd0"]``.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Callable, Mapping, Sequence

import attrs
import trio

from client.mm.waits import IDLE, WaitFor, WaitRegistry

__all__ = ["Verdict", "Watchdog", "find_cycle", "longest_chain", "render"]

#: Tasks whose names start with this are preferred when picking a cycle or a chain.
PREFERRED_PREFIX = "kswapd"


def _providers(
    what: WaitFor, waits: Mapping[str, WaitFor], roles: Mapping[str, Sequence[str]]
) -> list[str]:
    """The tasks that can end ``what``: the role's tasks, else the task named like the role."""
    tasks = roles.get(what.waker)
    if tasks:
        return sorted(set(tasks))
    if what.waker in waits:
        return [what.waker]
    return []


def _graph(
    waits: Mapping[str, WaitFor], roles: Mapping[str, Sequence[str]]
) -> dict[str, list[str]]:
    """Waiting task -> the tasks it waits on (sorted); idle waits are not dependencies."""
    return {
        name: _providers(what, waits, roles)
        for name, what in sorted(waits.items())
        if what.kind != IDLE
    }


def _preferred_order(names: Sequence[str]) -> list[str]:
    """Sorted, with ``kswapd*`` tasks first."""
    return sorted(names, key=lambda name: (not name.startswith(PREFERRED_PREFIX), name))


def _shortest_cycle_through(start: str, graph: Mapping[str, Sequence[str]]) -> list[str] | None:
    """Tasks of the shortest cycle ``start -> ... -> start`` (BFS, sorted successors)."""
    parent: dict[str, str] = {}
    queue: deque[str] = deque([start])
    seen = {start}
    while queue:
        node = queue.popleft()
        for succ in graph.get(node, ()):
            if succ == start:
                path = [node]
                while path[-1] != start:
                    path.append(parent[path[-1]])
                path.reverse()
                return path
            if succ not in seen and succ in graph:
                seen.add(succ)
                parent[succ] = node
                queue.append(succ)
    return None


def find_cycle(
    waits: Mapping[str, WaitFor], roles: Mapping[str, Sequence[str]]
) -> list[str] | None:
    """A wait-for cycle, rendered and closed on its first task, or None if there is none.

    A cycle through a ``kswapd*`` task is preferred; otherwise the first task in sorted order
    that lies on a cycle starts it.  The cycle is the shortest one through that task.
    """
    graph = _graph(waits, roles)
    for start in _preferred_order(list(graph)):
        tasks = _shortest_cycle_through(start, graph)
        if tasks is not None:
            rendered: list[str] = []
            for name in tasks:
                rendered += [name, str(waits[name])]
            rendered.append(tasks[0])
            return rendered
    return None


def longest_chain(waits: Mapping[str, WaitFor], roles: Mapping[str, Sequence[str]]) -> list[str]:
    """The longest wait-for chain, rendered; ``[]`` when no task is in a non-idle wait.

    The chain ends on a task that does not wait (or idles), or, after the last task's wait, on
    the role name nobody plays (a dead end: e.g. everything waits on a dead server).  Exact
    when there is no cycle (the case it is meant for); with cycles it is a long simple path.
    Ties prefer a ``kswapd*`` start, then sorted order.
    """
    graph = _graph(waits, roles)
    best: dict[str, list[str]] = {}  # waiting task -> task path starting with it
    on_stack: set[str] = set()

    def weight(tasks: list[str]) -> int:
        return len(render(tasks, waits))

    def visit(node: str) -> list[str]:
        if node in best:
            return best[node]
        on_stack.add(node)
        tail: list[str] = []
        for succ in graph[node]:
            if succ in on_stack:
                continue
            candidate = visit(succ) if succ in graph else [succ]
            if weight(candidate) > weight(tail):
                tail = candidate
        on_stack.discard(node)
        best[node] = [node, *tail]
        return best[node]

    path: list[str] = []
    for start in _preferred_order(list(graph)):
        candidate = visit(start)
        if weight(candidate) > weight(path):
            path = candidate
    # On cyclic graphs a memoised tail may revisit a task: cut the path before the repeat.
    seen: set[str] = set()
    for i, name in enumerate(path):
        if name in seen:
            path = path[:i]
            break
        seen.add(name)
    return render(path, waits)


def render(tasks: Sequence[str], waits: Mapping[str, WaitFor]) -> list[str]:
    """``[t0, str(wait0), t1, ...]``; a last task still waiting adds its wait and waker role."""
    rendered: list[str] = []
    for i, name in enumerate(tasks):
        rendered.append(name)
        what = waits.get(name)
        if what is None or what.kind == IDLE:
            continue
        rendered.append(str(what))
        if i == len(tasks) - 1:
            rendered.append(what.waker)
    return rendered


@attrs.frozen
class Verdict:
    """Why the watchdog ended the run."""

    #: Seconds (trio clock) since the progress tuple last changed.
    stalled_for: float
    #: The wait-for cycle (see :func:`find_cycle`), None if the waits form no cycle.
    cycle: list[str] | None
    #: The longest wait-for chain (see :func:`longest_chain`): what to report without a cycle.
    chain: list[str]
    #: Task -> ``str(wait)`` for every task in a non-idle wait.
    waiting: dict[str, str]
    #: The progress tuple, unchanged for ``stalled_for`` seconds.
    progress: tuple[int, ...]
    #: trio time of the verdict.
    at: float = 0.0

    @property
    def path(self) -> list[str]:
        """The cycle if there is one, else the longest chain."""
        return self.cycle if self.cycle is not None else self.chain

    def describe(self) -> str:
        """``kswapd0 -> writeback(swap0 req 812) -> ... -> kswapd0``."""
        return " -> ".join(self.path)


class Watchdog:
    """Ends a run whose progress tuple stalls for ``stall_seconds`` while tasks wait.

    ``progress`` must return only progress counters (never retries or drops). The stall is
    judged at each poll: a stall while nothing waits (everything runnable, or only idle
    waits) is not a deadlock, but once some task waits the stall already accrued counts.
    """

    def __init__(
        self,
        progress: Callable[[], tuple[int, ...]],
        waits: WaitRegistry,
        *,
        stall_seconds: float = 2.0,
        interval: float = 0.05,
    ) -> None:
        if not (stall_seconds > 0 and math.isfinite(stall_seconds)):
            raise ValueError(f"stall_seconds: {stall_seconds!r} is not a positive number")
        if not (interval > 0 and math.isfinite(interval)):
            raise ValueError(f"interval: {interval!r} is not a positive number")
        self._progress = progress
        self._waits = waits
        self.stall_seconds = stall_seconds
        self.interval = interval
        #: trio time the progress tuple last changed (or was first seen); None before.
        self.last_progress_at: float | None = None
        self._last: tuple[int, ...] | None = None

    def check(self, now: float) -> Verdict | None:
        """One poll at trio time ``now``: a Verdict if the run is deadlocked, else None."""
        current = tuple(self._progress())
        if self._last is None or self.last_progress_at is None or current != self._last:
            self._last = current
            self.last_progress_at = now
            return None
        stalled_for = now - self.last_progress_at
        if stalled_for < self.stall_seconds:
            return None
        snapshot = self._waits.snapshot()
        waiting = {name: str(what) for name, what in sorted(snapshot.items()) if what.kind != IDLE}
        if not waiting:
            return None
        roles = self._waits.roles
        return Verdict(
            stalled_for=stalled_for,
            cycle=find_cycle(snapshot, roles),
            chain=longest_chain(snapshot, roles),
            waiting=waiting,
            progress=current,
            at=now,
        )

    async def run(
        self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
    ) -> Verdict:
        """Poll every ``interval`` seconds until a deadlock; return its Verdict.

        ``started()`` is reported after the first poll (the baseline), so
        ``await nursery.start(watchdog.run)`` measures the stall from that moment.
        """
        self.check(trio.current_time())
        task_status.started()
        while True:
            await trio.sleep(self.interval)
            verdict = self.check(trio.current_time())
            if verdict is not None:
                return verdict
