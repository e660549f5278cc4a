"""Local worker processes for a sweep, each one run at a time, that notice a worker dying.

``concurrent.futures.ProcessPoolExecutor`` breaks as a whole when one worker dies and cannot
say whose run it was.  Here each worker has its own pipe and is given one item at a time, so
the pool knows which item a dead worker held: it starts a new worker and gives the item
again, once (``retries``); an item whose worker died every time comes back as a
:class:`WorkerDied`.  The other workers go on meanwhile.

Workers are spawned (a fresh interpreter, whatever the parent holds) and ignore SIGINT: a
Ctrl-C on the terminal reaches the parent only, which ends them all on leaving the ``with``
block, at once (``terminate``), and keeps whatever was already handed back.  A parent killed
outright takes its workers with it (``PR_SET_PDEATHSIG``).
"""

from __future__ import annotations

import multiprocessing
import signal
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from multiprocessing.connection import Connection, wait
from multiprocessing.process import BaseProcess
from types import TracebackType
from typing import Any, Generic, TypeVar

import attrs

T = TypeVar("T")
R = TypeVar("R")


@attrs.frozen
class WorkerDied:
    """What came back for an item whose worker died on each try."""

    description: str  # "killed by SIGKILL", "exited with status 1"
    attempts: int


@attrs.define
class _Worker:
    process: BaseProcess
    conn: Connection
    task: tuple[int, Any] | None = None  # (index, item) it is running


def _serve(conn: Connection, fn: Callable[[Any], Any]) -> None:
    """A worker's loop: an item in, its result out, until the pipe closes."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    _die_with_parent()
    while True:
        try:
            item = conn.recv()
        except EOFError:
            return
        if item is None:
            return
        conn.send(fn(item))


def _die_with_parent() -> None:
    """Linux: SIGKILL this worker when the process that started it dies, however it dies
    (``prctl(PR_SET_PDEATHSIG)``), rather than finish a run nobody will read."""
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGKILL, 0, 0, 0)  # PR_SET_PDEATHSIG = 1
    except (OSError, AttributeError):  # pragma: no cover - not Linux
        pass


def describe_exit(exitcode: int | None) -> str:
    if exitcode is not None and exitcode < 0:
        try:
            return f"killed by {signal.Signals(-exitcode).name}"
        except ValueError:
            return f"killed by signal {-exitcode}"
    return f"exited with status {exitcode}"


class LocalPool(Generic[T, R]):
    """``with LocalPool(fn, processes) as pool: for item, result in pool.run(items): ...``
    — results in the order they finish; ``fn`` must be importable by name (spawn)."""

    def __init__(
        self,
        fn: Callable[[T], R],
        processes: int,
        *,
        retries: int = 1,
        on_death: Callable[[T, str, bool], None] | None = None,
    ) -> None:
        self._fn = fn
        self._processes = processes
        self._retries = retries
        self._on_death = on_death
        self._ctx = multiprocessing.get_context("spawn")
        self._workers: list[_Worker] = []

    def __enter__(self) -> LocalPool[T, R]:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close(now=exc_type is not None)

    def close(self, *, now: bool = False) -> None:
        """Stop the workers: at once (``now``, or any still running an item), or by closing
        their pipes, which ends their loop."""
        for w in self._workers:
            if now or w.task is not None:
                w.process.terminate()
            else:
                try:
                    w.conn.send(None)
                except OSError:
                    w.process.terminate()
        for w in self._workers:
            w.process.join(timeout=10)
            if w.process.is_alive():  # pragma: no cover - a worker stuck in C code
                w.process.kill()
                w.process.join()
            w.conn.close()
        self._workers.clear()

    def _start(self) -> _Worker:
        parent, child = self._ctx.Pipe()
        process = self._ctx.Process(target=_serve, args=(child, self._fn), daemon=True)
        process.start()
        child.close()
        worker = _Worker(process, parent)
        self._workers.append(worker)
        return worker

    def _replace(self, dead: _Worker) -> _Worker:
        dead.process.join()
        dead.conn.close()
        self._workers.remove(dead)
        return self._start()

    def run(self, items: Iterable[T]) -> Iterator[tuple[T, R | WorkerDied, int]]:
        """Each item, its result (or :class:`WorkerDied`) and how many workers it took, as
        they finish."""
        pending: deque[tuple[int, T]] = deque(enumerate(items))
        attempts: dict[int, int] = {}
        for _ in range(min(self._processes, len(pending))):
            self._start()
        idle = list(self._workers)
        while pending or any(w.task is not None for w in self._workers):
            while idle and pending:
                worker = idle.pop()
                task = pending.popleft()
                try:
                    worker.conn.send(task[1])
                except OSError:  # it died while idle: a new one, the same item
                    pending.appendleft(task)
                    idle.append(self._replace(worker))
                    continue
                worker.task = task
                attempts[task[0]] = attempts.get(task[0], 0) + 1
            busy = [w for w in self._workers if w.task is not None]
            ready = set(wait([w.conn for w in busy] + [w.process.sentinel for w in busy]))
            for worker in busy:
                if worker.conn not in ready and worker.process.sentinel not in ready:
                    continue
                running = worker.task
                assert running is not None
                index, item = running
                try:
                    result: R = worker.conn.recv()
                except (EOFError, OSError):
                    description = describe_exit(_exitcode(worker))
                    worker.task = None
                    idle.append(self._replace(worker))
                    again = attempts[index] <= self._retries
                    if self._on_death is not None:
                        self._on_death(item, description, again)
                    if again:
                        pending.appendleft((index, item))
                    else:
                        yield item, WorkerDied(description, attempts[index]), attempts[index]
                    continue
                worker.task = None
                idle.append(worker)
                yield item, result, attempts[index]


def _exitcode(worker: _Worker) -> int | None:
    worker.process.join(timeout=10)
    return worker.process.exitcode
