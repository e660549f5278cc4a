"""gfp flags, per-task flags, and the allocation flags the page allocator derives from them.

Everything here is pure: the allocator asks these functions what a request may do, and the
answers can be checked line by line against the kernel's (reference/kernel-mm.md §2, §3).
"""

from __future__ import annotations

import contextvars
import enum
from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager


class GFP(enum.IntFlag):
    """``__GFP_*`` bits (include/linux/gfp.h; bit layout as in 4.14, only names matter here)."""

    DMA = 0x01
    HIGHMEM = 0x02
    DMA32 = 0x04
    MOVABLE = 0x08
    HIGH = 0x20  # __GFP_HIGH: may dip below min (ALLOC_HIGH)
    IO = 0x40  # __GFP_IO: may start physical I/O (swap writeout)
    FS = 0x80  # __GFP_FS: may call into the filesystem (and the OOM killer)
    NOWARN = 0x200
    NOFAIL = 0x800
    NORETRY = 0x1000
    MEMALLOC = 0x2000  # __GFP_MEMALLOC: may use the reserves below min (3.6+)
    ZERO = 0x8000
    NOMEMALLOC = 0x10000  # __GFP_NOMEMALLOC: never use the reserves; overrides the rest
    HARDWALL = 0x20000
    ATOMIC = 0x80000  # __GFP_ATOMIC (4.x-6.2): cannot sleep, ALLOC_HARDER
    DIRECT_RECLAIM = 0x400000  # __GFP_DIRECT_RECLAIM: the caller may sleep and reclaim
    KSWAPD_RECLAIM = 0x1000000  # __GFP_KSWAPD_RECLAIM: wake kswapd when low
    RECLAIM = DIRECT_RECLAIM | KSWAPD_RECLAIM  # __GFP_RECLAIM


# include/linux/gfp.h composites (reference §3; GFP_ATOMIC as in <= 6.2).
GFP_ATOMIC = GFP.HIGH | GFP.ATOMIC | GFP.KSWAPD_RECLAIM
GFP_KERNEL = GFP.RECLAIM | GFP.IO | GFP.FS
GFP_NOWAIT = GFP.KSWAPD_RECLAIM
GFP_NOIO = GFP.RECLAIM
GFP_NOFS = GFP.RECLAIM | GFP.IO
GFP_USER = GFP_KERNEL | GFP.HARDWALL
GFP_HIGHUSER = GFP_USER | GFP.HIGHMEM
GFP_HIGHUSER_MOVABLE = GFP_HIGHUSER | GFP.MOVABLE


class PF(enum.IntFlag):
    """Per-task flags (include/linux/sched.h ``PF_*``) plus the interrupt context.

    ``SOFTIRQ`` and ``HARDIRQ`` are not ``PF_*`` bits in the kernel but ``preempt_count()``
    state (``in_serving_softirq()``, ``in_irq()``); the model keeps them with the task flags
    because a trio task that plays the NIC is "in softirq" for its whole life.
    """

    MEMALLOC = 0x00000800  # PF_MEMALLOC: allocating for reclaim, may use the reserves
    KSWAPD = 0x00020000  # PF_KSWAPD
    MEMALLOC_NOIO = 0x00080000  # PF_MEMALLOC_NOIO (3.9+): every allocation is GFP_NOIO
    KTHREAD = 0x00200000  # PF_KTHREAD: kernel thread (never throttled)
    SWAPWRITE = 0x00800000  # PF_SWAPWRITE
    SOFTIRQ = 0x1_0000_0000  # in_serving_softirq()
    HARDIRQ = 0x2_0000_0000  # in_irq()


_NO_FLAGS = PF(0)
_task_flags: contextvars.ContextVar[PF] = contextvars.ContextVar(
    "netswap_task_flags", default=_NO_FLAGS
)


def current_task_flags() -> PF:
    """``current->flags`` of the running trio task (children inherit a copy at spawn)."""
    return _task_flags.get()


@contextmanager
def task_flags(flags: PF) -> Iterator[PF]:
    """Set ``flags`` on the current task for the block, then restore the previous flags.

    The save/restore pair of ``memalloc_noreclaim_save()``/``memalloc_noreclaim_restore()``
    (include/linux/sched/mm.h), generalised to any flag.
    """
    token = _task_flags.set(_task_flags.get() | flags)
    try:
        yield _task_flags.get()
    finally:
        _task_flags.reset(token)


@contextmanager
def as_task(flags: PF) -> Iterator[PF]:
    """Run the block as a task whose ``current->flags`` are exactly ``flags`` (not OR-ed
    into the current ones): work handed to another task, e.g. a kernel thread, which does
    not carry the flags of whoever queued it."""
    token = _task_flags.set(flags)
    try:
        yield flags
    finally:
        _task_flags.reset(token)


def memalloc_noreclaim() -> AbstractContextManager[PF]:
    """``PF_MEMALLOC`` for the block (include/linux/sched/mm.h memalloc_noreclaim_save)."""
    return task_flags(PF.MEMALLOC)


def memalloc_noio() -> AbstractContextManager[PF]:
    """``PF_MEMALLOC_NOIO`` for the block (include/linux/sched/mm.h memalloc_noio_save)."""
    return task_flags(PF.MEMALLOC_NOIO)


@contextmanager
def serving_softirq() -> Iterator[PF]:
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


def in_interrupt(flags: PF) -> bool:
    """``in_interrupt()``: hard or soft interrupt context."""
    return bool(flags & (PF.SOFTIRQ | PF.HARDIRQ))


def current_gfp_context(gfp: GFP, flags: PF) -> GFP:
    """Apply the task's scoped constraints to ``gfp``.

    include/linux/sched/mm.h current_gfp_context: PF_MEMALLOC_NOIO clears __GFP_IO|__GFP_FS.
    """
    if flags & PF.MEMALLOC_NOIO:
        return gfp & ~(GFP.IO | GFP.FS)
    return gfp


class AllocFlags(enum.IntFlag):
    """``ALLOC_*`` (mm/internal.h, 4.x): which watermark to check and how far below it."""

    WMARK_MIN = 0x00
    WMARK_LOW = 0x01
    WMARK_HIGH = 0x02
    NO_WATERMARKS = 0x04  # don't check watermarks at all
    OOM = 0x08  # OOM victim (4.16+): min -= min/2 instead of ALLOC_HARDER's quarter
    HARDER = 0x10  # try to alloc harder: min -= min/4
    HIGH = 0x20  # __GFP_HIGH set: min -= min/2


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


def gfp_pfmemalloc_flags(gfp: GFP, flags: PF, oom_victim: bool = False) -> AllocFlags:
    """May this request go below min? ``__gfp_pfmemalloc_flags`` (mm/page_alloc.c, 4.16+).

    ``oom_victim`` is ``oom_reserves_allowed(current)``: the task's process is an OOM victim
    (``tsk_is_oom_victim``, ``signal->oom_mm`` set by ``mark_oom_victim``). Such a task gets
    ``ALLOC_OOM``, half of min, so that it can allocate on its way to exit; before 4.16 a
    ``TIF_MEMDIE`` task got ``ALLOC_NO_WATERMARKS``.
    """
    if gfp & GFP.NOMEMALLOC:  # __GFP_NOMEMALLOC overrides everything
        return AllocFlags(0)
    if gfp & GFP.MEMALLOC:  # __GFP_MEMALLOC grants the reserve without PF_MEMALLOC
        return ALLOC_NO_WATERMARKS
    if flags & PF.SOFTIRQ and flags & PF.MEMALLOC:  # in_serving_softirq() && PF_MEMALLOC
        return ALLOC_NO_WATERMARKS
    if not in_interrupt(flags):
        if flags & PF.MEMALLOC:  # !in_interrupt() && PF_MEMALLOC
            return ALLOC_NO_WATERMARKS
        if oom_victim:  # "else if (oom_reserves_allowed(current)) return ALLOC_OOM"
            return ALLOC_OOM
    return AllocFlags(0)


def gfp_pfmemalloc_allowed(gfp: GFP, flags: PF, oom_victim: bool = False) -> bool:
    """``gfp_pfmemalloc_allowed()`` (mm/page_alloc.c): ``__gfp_pfmemalloc_flags() != 0``."""
    return bool(gfp_pfmemalloc_flags(gfp, flags, oom_victim))


def gfp_to_alloc_flags(gfp: GFP, flags: PF, oom_victim: bool = False) -> AllocFlags:
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
