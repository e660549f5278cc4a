"""gfp flags, per-task flags, and the allocation flags the page allocator derives from them.

Everything here is pure: the allocator asks these functions what a request may do, and the
answers can be checked line by line against the kernel's (reference/kernel-mm.md §2, §3).

The flags are plain integers, as the kernel's are (``gfp_t``, ``current->flags``,
``alloc_flags``): ``GFP``, ``PF`` and ``AllocFlags`` are namespaces of ``int`` constants,
so that a flag test on the allocation path is one integer operation.  ``gfp_names`` and
friends render a value as the bit names joined by ``|`` for logs and events.
"""

from __future__ import annotations

import contextvars
from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager
from typing import Final, TypeAlias

#: include/linux/types.h ``gfp_t``: an allocation's gfp flags (``GFP.*`` bits).
gfp_t: TypeAlias = int


class GFP:
    """``__GFP_*`` bits (include/linux/gfp.h; bit layout as in 4.14, only names matter here)."""

    DMA: Final = 0x01
    HIGHMEM: Final = 0x02
    DMA32: Final = 0x04
    MOVABLE: Final = 0x08
    HIGH: Final = 0x20  # __GFP_HIGH: may dip below min (ALLOC_HIGH)
    IO: Final = 0x40  # __GFP_IO: may start physical I/O (swap writeout)
    FS: Final = 0x80  # __GFP_FS: may call into the filesystem (and the OOM killer)
    NOWARN: Final = 0x200
    NOFAIL: Final = 0x800
    NORETRY: Final = 0x1000
    MEMALLOC: Final = 0x2000  # __GFP_MEMALLOC: may use the reserves below min (3.6+)
    ZERO: Final = 0x8000
    NOMEMALLOC: Final = 0x10000  # __GFP_NOMEMALLOC: never use the reserves; overrides the rest
    HARDWALL: Final = 0x20000
    ATOMIC: Final = 0x80000  # __GFP_ATOMIC (4.x-6.2): cannot sleep, ALLOC_HARDER
    DIRECT_RECLAIM: Final = 0x400000  # __GFP_DIRECT_RECLAIM: the caller may sleep and reclaim
    KSWAPD_RECLAIM: Final = 0x1000000  # __GFP_KSWAPD_RECLAIM: wake kswapd when low
    RECLAIM: Final = DIRECT_RECLAIM | KSWAPD_RECLAIM  # __GFP_RECLAIM


# include/linux/gfp.h composites (reference §3; GFP_ATOMIC as in <= 6.2).
GFP_ATOMIC: Final = GFP.HIGH | GFP.ATOMIC | GFP.KSWAPD_RECLAIM
GFP_KERNEL: Final = GFP.RECLAIM | GFP.IO | GFP.FS
GFP_NOWAIT: Final = GFP.KSWAPD_RECLAIM
GFP_NOIO: Final = GFP.RECLAIM
GFP_NOFS: Final = GFP.RECLAIM | GFP.IO
GFP_USER: Final = GFP_KERNEL | GFP.HARDWALL
GFP_HIGHUSER: Final = GFP_USER | GFP.HIGHMEM
GFP_HIGHUSER_MOVABLE: Final = GFP_HIGHUSER | GFP.MOVABLE


class PF:
    """Per-task flags (include/linux/sched.h ``PF_*``) plus the interrupt context.

    ``SOFTIRQ`` and ``HARDIRQ`` are not ``PF_*`` bits in the kernel but ``preempt_count()``
    state (``in_serving_softirq()``, ``in_irq()``); the model keeps them with the task flags
    because a trio task that plays the NIC is "in softirq" for its whole life.
    """

    MEMALLOC: Final = 0x00000800  # PF_MEMALLOC: allocating for reclaim, may use the reserves
    KSWAPD: Final = 0x00020000  # PF_KSWAPD
    MEMALLOC_NOIO: Final = 0x00080000  # PF_MEMALLOC_NOIO (3.9+): every allocation is GFP_NOIO
    KTHREAD: Final = 0x00200000  # PF_KTHREAD: kernel thread (never throttled)
    SWAPWRITE: Final = 0x00800000  # PF_SWAPWRITE
    SOFTIRQ: Final = 0x1_0000_0000  # in_serving_softirq()
    HARDIRQ: Final = 0x2_0000_0000  # in_irq()


class AllocFlags:
    """``ALLOC_*`` (mm/internal.h, 4.x): which watermark to check and how far below it."""

    WMARK_MIN: Final = 0x00
    WMARK_LOW: Final = 0x01
    WMARK_HIGH: Final = 0x02
    NO_WATERMARKS: Final = 0x04  # don't check watermarks at all
    OOM: Final = 0x08  # OOM victim (4.16+): min -= min/2 instead of ALLOC_HARDER's quarter
    HARDER: Final = 0x10  # try to alloc harder: min -= min/4
    HIGH: Final = 0x20  # __GFP_HIGH set: min -= min/2


def _names_of(namespace: type) -> tuple[dict[int, str], tuple[tuple[int, str], ...]]:
    """A namespace's constants: the name of each value (the first name wins), and the
    single-bit ones lowest first."""
    exact: dict[int, str] = {}
    for name, value in vars(namespace).items():
        if not name.startswith("_") and isinstance(value, int):
            exact.setdefault(value, name)
    bits = tuple(sorted((v, n) for v, n in exact.items() if v and not v & (v - 1)))
    return exact, bits


def _render(value: int, names: tuple[dict[int, str], tuple[tuple[int, str], ...]]) -> str:
    exact, bits = names
    if value in exact:
        return exact[value]
    parts = [name for bit, name in bits if value & bit]
    rest = value
    for bit, _name in bits:
        rest &= ~bit
    if not parts:
        return str(value)
    if rest:
        parts.append(str(rest))
    return "|".join(parts)


_GFP_NAMES = _names_of(GFP)
_PF_NAMES = _names_of(PF)
_ALLOC_NAMES = _names_of(AllocFlags)


def gfp_names(gfp: gfp_t) -> str:
    """``gfp`` for a log: its bits' names joined by ``|`` (``IO|FS|DIRECT_RECLAIM|...``),
    or the one name of a multi-bit constant it equals (``RECLAIM``)."""
    return _render(gfp, _GFP_NAMES)


def task_flags_names(flags: int) -> str:
    """Task flags for a log, as ``gfp_names`` renders gfp flags."""
    return _render(flags, _PF_NAMES)


def alloc_flags_names(alloc_flags: int) -> str:
    """``alloc_flags`` for a log (``WMARK_MIN`` for none), as ``gfp_names`` renders gfp."""
    return _render(alloc_flags, _ALLOC_NAMES)


_NO_FLAGS = 0
_task_flags: contextvars.ContextVar[int] = contextvars.ContextVar(
    "netswap_task_flags", default=_NO_FLAGS
)


def current_task_flags() -> int:
    """``current->flags`` of the running trio task (children inherit a copy at spawn)."""
    return _task_flags.get()


class _TaskFlags:
    """``current->flags`` set for a block, then restored: ``task_flags`` and ``as_task``.
    A class, not a ``@contextmanager``: direct reclaim and every NBD send enter one."""

    __slots__ = ("_flags", "_replace", "_token")

    def __init__(self, flags: int, replace: bool) -> None:
        self._flags = flags
        self._replace = replace

    def __enter__(self) -> int:
        flags = self._flags if self._replace else _task_flags.get() | self._flags
        self._token = _task_flags.set(flags)
        return flags

    def __exit__(self, *exc_info: object) -> None:
        _task_flags.reset(self._token)


def task_flags(flags: int) -> AbstractContextManager[int]:
    """Set ``flags`` on the current task for the block, then restore the previous flags.

    The save/restore pair of ``memalloc_noreclaim_save()``/``memalloc_noreclaim_restore()``
    (include/linux/sched/mm.h), generalised to any flag.
    """
    return _TaskFlags(flags, replace=False)


def as_task(flags: int) -> AbstractContextManager[int]:
    """Run the block as a task whose ``current->flags`` are exactly ``flags`` (not OR-ed
    into the current ones): work handed to another task, e.g. a kernel thread, which does
    not carry the flags of whoever queued it."""
    return _TaskFlags(flags, replace=True)


def memalloc_noreclaim() -> AbstractContextManager[int]:
    """``PF_MEMALLOC`` for the block (include/linux/sched/mm.h memalloc_noreclaim_save)."""
    return task_flags(PF.MEMALLOC)


def memalloc_noio() -> AbstractContextManager[int]:
    """``PF_MEMALLOC_NOIO`` for the block (include/linux/sched/mm.h memalloc_noio_save)."""
    return task_flags(PF.MEMALLOC_NOIO)


@contextmanager
def serving_softirq() -> Iterator[int]:
    """Run the block as softirq context (``in_serving_softirq()`` is true).

    kernel/softirq.c __do_softirq: "Mask out PF_MEMALLOC as the current task context is
    borrowed for the softirq. A softirq handled, such as network RX, might set PF_MEMALLOC
    again if the socket is related to swapping." — so whoever's context the softirq runs
    in, its allocations do not inherit that task's reserve access.
    """
    token = _task_flags.set((_task_flags.get() & ~PF.MEMALLOC) | PF.SOFTIRQ)
    try:
        yield _task_flags.get()
    finally:
        _task_flags.reset(token)


def in_interrupt(flags: int) -> bool:
    """``in_interrupt()``: hard or soft interrupt context."""
    return bool(flags & (PF.SOFTIRQ | PF.HARDIRQ))


def current_gfp_context(gfp: gfp_t, flags: int) -> gfp_t:
    """Apply the task's scoped constraints to ``gfp``.

    include/linux/sched/mm.h current_gfp_context: PF_MEMALLOC_NOIO clears __GFP_IO|__GFP_FS.
    """
    if flags & PF.MEMALLOC_NOIO:
        return gfp & ~(GFP.IO | GFP.FS)
    return gfp


ALLOC_WMARK_MIN = AllocFlags.WMARK_MIN
ALLOC_WMARK_LOW = AllocFlags.WMARK_LOW
ALLOC_WMARK_HIGH = AllocFlags.WMARK_HIGH
ALLOC_NO_WATERMARKS = AllocFlags.NO_WATERMARKS
# mm/internal.h (4.16+, CONFIG_MMU): ALLOC_OOM 0x08; !MMU and kernels before 4.16 gave the
# victim ALLOC_NO_WATERMARKS instead (TIF_MEMDIE), which the oom_reaper made unnecessary.
ALLOC_OOM = AllocFlags.OOM
ALLOC_HARDER = AllocFlags.HARDER
ALLOC_HIGH = AllocFlags.HIGH
# mm/internal.h: #define ALLOC_WMARK_MASK (ALLOC_NO_WATERMARKS-1)
ALLOC_WMARK_MASK = AllocFlags.WMARK_LOW | AllocFlags.WMARK_HIGH


def gfp_pfmemalloc_flags(gfp: gfp_t, flags: int, oom_victim: bool = False) -> int:
    """May this request go below min? ``__gfp_pfmemalloc_flags`` (mm/page_alloc.c, 4.16+).

    ``oom_victim`` is ``oom_reserves_allowed(current)``: the task's process is an OOM victim
    (``tsk_is_oom_victim``, ``signal->oom_mm`` set by ``mark_oom_victim``). Such a task gets
    ``ALLOC_OOM``, half of min, so that it can allocate on its way to exit; before 4.16 a
    ``TIF_MEMDIE`` task got ``ALLOC_NO_WATERMARKS``.
    """
    if gfp & GFP.NOMEMALLOC:  # __GFP_NOMEMALLOC overrides everything
        return 0
    if gfp & GFP.MEMALLOC:  # __GFP_MEMALLOC grants the reserve without PF_MEMALLOC
        return ALLOC_NO_WATERMARKS
    if flags & PF.SOFTIRQ and flags & PF.MEMALLOC:  # in_serving_softirq() && PF_MEMALLOC
        return ALLOC_NO_WATERMARKS
    if not in_interrupt(flags):
        if flags & PF.MEMALLOC:  # !in_interrupt() && PF_MEMALLOC
            return ALLOC_NO_WATERMARKS
        if oom_victim:  # "else if (oom_reserves_allowed(current)) return ALLOC_OOM"
            return ALLOC_OOM
    return 0


def gfp_pfmemalloc_allowed(gfp: gfp_t, flags: int, oom_victim: bool = False) -> bool:
    """``gfp_pfmemalloc_allowed()`` (mm/page_alloc.c): ``__gfp_pfmemalloc_flags() != 0``."""
    return bool(gfp_pfmemalloc_flags(gfp, flags, oom_victim))


def gfp_to_alloc_flags(gfp: gfp_t, flags: int, oom_victim: bool = False) -> int:
    """Slow-path allocation flags for ``gfp`` in a task with ``flags``.

    ALLOC_HIGH/ALLOC_HARDER follow 4.x ``gfp_to_alloc_flags`` (mm/page_alloc.c). As in the 3.6
    version (the one Zijlstra's ``kmalloc_reserve`` and Gorman's series reason with), the
    result also carries ``ALLOC_NO_WATERMARKS`` when ``__gfp_pfmemalloc_flags`` allows it; the
    slow path first tries ``alloc_flags & ~ALLOC_NO_WATERMARKS``. Real-time tasks (the other
    source of ALLOC_HARDER) are not modelled.

    An OOM victim's ``ALLOC_OOM`` *replaces* the flags, as 6.1 ``__alloc_pages_slowpath``
    does at ``retry:`` ("reserve_flags = __gfp_pfmemalloc_flags(gfp_mask); if (reserve_flags)
    alloc_flags = gfp_to_alloc_flags_cma(gfp_mask, reserve_flags)"): the min watermark, less
    half, whatever ``__GFP_HIGH`` the request had.
    """
    reserve_flags = gfp_pfmemalloc_flags(gfp, flags, oom_victim)
    if reserve_flags == ALLOC_OOM:
        return ALLOC_WMARK_MIN | ALLOC_OOM
    alloc = ALLOC_WMARK_MIN
    if gfp & GFP.HIGH:  # __GFP_HIGH is ALLOC_HIGH
        alloc |= ALLOC_HIGH
    if gfp & GFP.ATOMIC and not gfp & GFP.NOMEMALLOC:
        # "Not worth trying to allocate harder for __GFP_NOMEMALLOC even if it can't schedule."
        alloc |= ALLOC_HARDER
    return alloc | reserve_flags
