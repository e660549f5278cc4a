"""A workload process as memory sees it: an address space of anonymous pages, and the
task-side state the allocator reads through ``current`` (is it being killed? is it an OOM
victim?)."""

from __future__ import annotations

import contextvars
from collections.abc import Iterator
from contextlib import contextmanager

import attrs
import trio

from client.mm.page import Page


@attrs.define(eq=False)
class Process:
    """An ``mm_struct`` reduced to its anonymous page table.

    A virtual page is either present (``present[vpage]`` is its ``Page``), swapped out
    (``swapped[vpage]`` is its swap slot: a swap pte), or never touched.
    """

    pid: int
    name: str
    present: dict[int, Page] = attrs.field(factory=dict, repr=False)
    swapped: dict[int, int] = attrs.field(factory=dict, repr=False)
    killed: bool = False
    #: ``tsk_is_oom_victim``: ``mark_oom_victim`` set ``signal->oom_mm`` (mm/oom_kill.c):
    #: its tasks allocate with ALLOC_OOM, and no other process is chosen while it is pending.
    oom_victim: bool = False
    #: When (run clock) it became one.
    oom_victim_since: float | None = attrs.field(default=None, repr=False)
    #: ``MMF_OOM_SKIP`` on its mm: its memory is gone (exit_mmap) or the oom_reaper is done
    #: with it; the OOM killer passes over it (oom_evaluate_task, oom_badness).
    oom_skip: bool = False
    #: ``MMF_OOM_REAP_QUEUED``: queue_oom_reaper armed its timer once.
    oom_reap_queued: bool = False
    #: exit_mmap ran: its address space is gone (a task of it can no longer fault).
    exited: bool = False
    #: vm_area_struct.swap_readahead_info of its one mapping (VMA swap readahead):
    #: (last faulting page, window, readahead hits), None until the first swap-in.
    swap_ra: tuple[int, int, int] | None = attrs.field(default=None, repr=False)
    #: The killable sleeps its tasks are in right now (see ``killable``).
    _killable: set[trio.CancelScope] = attrs.field(factory=set, init=False, repr=False)

    @property
    def rss(self) -> int:
        """``get_mm_rss()``: resident anonymous pages."""
        return len(self.present)

    @property
    def swapents(self) -> int:
        """``MM_SWAPENTS``: pages swapped out."""
        return len(self.swapped)

    def oom_badness(self) -> int:
        """mm/oom_kill.c oom_badness (4.x), without page tables and oom_score_adj."""
        return self.rss + self.swapents

    def kill(self) -> None:
        """SIGKILL, as the OOM killer sends it (mm/oom_kill.c ``__oom_kill_process``):
        ``fatal_signal_pending`` from now on, and ``signal_wake_up`` ends the sleeps its
        tasks are in killably (TASK_KILLABLE, TASK_INTERRUPTIBLE)."""
        self.killed = True
        for scope in self._killable:
            scope.cancel()


_current: contextvars.ContextVar[Process | None] = contextvars.ContextVar(
    "netswap_current_process", default=None
)


class as_current:
    """Run the block as one of ``process``'s tasks (what ``current`` is in a page fault).

    A class, not a ``@contextmanager``: every page fault enters one."""

    __slots__ = ("_process", "_token")

    def __init__(self, process: Process) -> None:
        self._process = process

    def __enter__(self) -> Process:
        self._token = _current.set(self._process)
        return self._process

    def __exit__(self, *exc_info: object) -> None:
        _current.reset(self._token)


def current_process() -> Process | None:
    """``current``'s process: the process whose task is running (None for kernel tasks)."""
    return _current.get()


def current_is_oom_victim() -> bool:
    """``tsk_is_oom_victim(current)`` (include/linux/oom.h): ``current->signal->oom_mm``."""
    process = _current.get()
    return process is not None and process.oom_victim


def fatal_signal_pending() -> bool:
    """``fatal_signal_pending(current)``: the current task's process has been killed."""
    process = _current.get()
    return process is not None and process.killed


@contextmanager
def killable() -> Iterator[None]:
    """Sleep killably for the block (``wait_event_killable``): a kill of the current
    process ends the block's sleep at once (the block is left, nothing raised); a task
    whose process is already killed does not sleep at all. Check ``fatal_signal_pending``
    after the block, as the kernel does."""
    process = _current.get()
    if process is None:
        yield
        return
    with trio.CancelScope() as scope:
        if process.killed:
            scope.cancel()
        process._killable.add(scope)
        try:
            yield
        finally:
            process._killable.discard(scope)
