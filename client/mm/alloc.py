"""The page allocator: order-0 pages from the zones' free lists (mm/page_alloc.c).

Fast path (``try_alloc``): the first zone in zonelist order with ``free > low`` gives up a
page: a couple of attribute reads and a list pop. Slow path (``alloc_page``), after
``__alloc_pages_slowpath``: wake kswapd; retry at min with the gfp's ALLOC_HIGH/HARDER;
then below min (ALLOC_NO_WATERMARKS) if ``gfp_pfmemalloc_allowed``, marking the page
pfmemalloc; fail if the caller may not sleep; fail a PF_MEMALLOC caller rather than recurse
into reclaim; otherwise direct reclaim, then wait for writeback or retry, and finally OOM.
A task of an OOM victim allocates at ALLOC_OOM (half of min) and fails rather than loop.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import TYPE_CHECKING, NamedTuple, Protocol

import trio

from client.mm.facts import AllocEmergency, AllocFailed, Observer, drop
from client.mm.gfp import (
    ALLOC_NO_WATERMARKS,
    ALLOC_OOM,
    GFP,
    GFP_KERNEL,
    PF,
    current_gfp_context,
    current_task_flags,
    gfp_t,
    gfp_to_alloc_flags,
    task_flags,
)
from client.mm.page import Page
from client.mm.policy import NullPolicy, PolicyHooks
from client.mm.process import current_is_oom_victim, fatal_signal_pending
from client.mm.vmstat import Progress, Psi, VmStat
from client.mm.waits import WaitFor, WaitQueue, WaitRegistry
from client.mm.zone import Zone

if TYPE_CHECKING:
    from collections.abc import Callable

# mm/internal.h: "the number of times the allocator retries reclaim without progress".
MAX_RECLAIM_RETRIES = 16
# mm/page_alloc.c should_reclaim_retry: congestion_wait(BLK_RW_ASYNC, HZ/10) when no progress
# was made and writeback is pending; the same bound for other retry sleeps.
CONGESTION_WAIT = 0.1


class _Plan(NamedTuple):
    """What the slow path needs to know about one (gfp, task flags, OOM victim) request."""

    gfp: gfp_t  # after current_gfp_context
    alloc_flags: int
    wmark_flags: int  # alloc_flags & ~ALLOC_NO_WATERMARKS
    kswapd_reclaim: bool
    no_watermarks: bool
    direct_reclaim: bool
    memalloc: bool  # PF_MEMALLOC
    oom: bool  # ALLOC_OOM: the task is an OOM victim's
    nofail: bool
    noretry: bool
    fs: bool


def _plan(gfp: gfp_t, tflags: int, oom_victim: bool = False) -> _Plan:
    """Decode (gfp, task flags, OOM victim) for the slow path: plain integer operations, a
    few per allocation that missed the fast path."""
    g = current_gfp_context(gfp, tflags)
    alloc_flags = gfp_to_alloc_flags(g, tflags, oom_victim)
    return _Plan(
        g,
        alloc_flags,
        alloc_flags & ~ALLOC_NO_WATERMARKS,
        bool(g & GFP.KSWAPD_RECLAIM),
        bool(alloc_flags & ALLOC_NO_WATERMARKS),
        bool(g & GFP.DIRECT_RECLAIM),
        bool(tflags & PF.MEMALLOC),
        bool(alloc_flags & ALLOC_OOM),
        bool(g & GFP.NOFAIL),
        bool(g & GFP.NORETRY),
        bool(g & GFP.FS),
    )


class Reclaimed(Protocol):
    """What the allocator reads of one direct reclaim (``struct scan_control``)."""

    @property
    def nr_reclaimed(self) -> int: ...


class Reclaim(Protocol):
    """The allocator's view of reclaim (mm/vmscan.c), ``Reclaimer`` in client/mm/reclaim.py:
    reclaim imports the allocator, so the allocator names only what it calls."""

    def wakeup_kswapd(self, zone: Zone) -> None: ...

    async def try_to_free_pages(self, gfp: gfp_t) -> Reclaimed: ...

    async def wait_for_writeback(self, timeout: float) -> bool: ...


class Allocator:
    """The page allocator of one node. Wire ``reclaimer`` and ``out_of_memory`` after
    construction (``Memory`` does); without them the slow path cannot reclaim."""

    def __init__(
        self,
        zones: Sequence[Zone],
        *,
        stat: VmStat | None = None,
        progress: Progress | None = None,
        waits: WaitRegistry | None = None,
        psi: Psi | None = None,
        observer: Observer = drop,
        policy: PolicyHooks | None = None,
    ) -> None:
        self.zones = list(zones)
        # build_zonelists: the highest zone first, falling back to lower ones.
        self._zonelist = list(reversed(self.zones))
        self.stat = VmStat() if stat is None else stat
        self.progress = Progress() if progress is None else progress
        self.waits = WaitRegistry() if waits is None else waits
        self.psi = Psi(trio.current_time) if psi is None else psi
        self.observer = observer
        self.policy: PolicyHooks = NullPolicy() if policy is None else policy
        self.reclaimer: Reclaim | None = None
        self.out_of_memory: Callable[[gfp_t], bool] = lambda gfp: False
        #: What a task retrying after the OOM killer made progress waits for (the victim
        #: whose memory it expects); None: any free page.
        self.oom_wait: Callable[[], WaitFor | None] = lambda: None
        #: Fault injection (client/faults.py): ``should_fail_alloc_page``; None: no fault.
        self.fail_page_alloc: Callable[[gfp_t], bool] | None = None
        self._free_wait = WaitQueue()

    # -- fast path ---------------------------------------------------------------------------

    def try_alloc(self) -> Page | None:
        """One page at ALLOC_WMARK_LOW or None; never sleeps, never wakes anyone.

        mm/page_alloc.c get_page_from_freelist with ALLOC_WMARK_LOW; zone_watermark_fast's
        order-0 check ``free > mark + lowmem_reserve``; prep_new_page clears pfmemalloc
        (free pages are kept clean, see ``free_page``).
        """
        for zone in self._zonelist:
            if zone.nr_free > zone.watermarks.low + zone.lowmem_reserve:
                self.stat.pgalloc += 1
                return zone.take()
        return None

    async def alloc_page(
        self, gfp: gfp_t = GFP_KERNEL, *, reserve: object | None = None
    ) -> Page | None:
        """``alloc_page(gfp)``: fast path, then the slow path. None means the allocation failed
        (counted ``alloc_fail``, fact ``AllocFailed``). Never blocks unless ``gfp`` has
        __GFP_DIRECT_RECLAIM. ``reserve`` is passed to the policy's charge hook."""
        # prepare_alloc_pages: "if (should_fail_alloc_page(gfp_mask, order)) return false".
        should_fail = self.fail_page_alloc
        if should_fail is not None and should_fail(gfp):
            return self._fail_injected(gfp)
        page = self.try_alloc()
        if page is not None:
            return page
        return await self._slowpath(gfp, reserve)

    # -- slow path ---------------------------------------------------------------------------

    def _get_page_from_freelist(self, alloc_flags: int) -> Page | None:
        """mm/page_alloc.c get_page_from_freelist: the first zone whose watermark allows."""
        for zone in self._zonelist:
            if zone.nr_free and zone.watermark_ok(alloc_flags):
                self.stat.pgalloc += 1
                return zone.take()
        return None

    def _wake_all_kswapds(self) -> None:
        """mm/page_alloc.c wake_all_kswapds: ``wakeup_kswapd`` for each zone of the zonelist."""
        if self.reclaimer is not None:
            for zone in self._zonelist:
                self.reclaimer.wakeup_kswapd(zone)

    async def _slowpath(self, gfp: gfp_t, reserve: object | None) -> Page | None:
        tflags = current_task_flags()
        no_progress_loops = 0
        first = True
        while True:
            # current_gfp_context, gfp_to_alloc_flags and "the slow path first retries with
            # alloc_flags & ~ALLOC_NO_WATERMARKS" (3.6+), decoded each time round, as 6.1
            # __alloc_pages_slowpath recomputes reserve_flags at "retry:": a task whose
            # process the OOM killer chose meanwhile allocates at ALLOC_OOM from then on.
            plan = _plan(gfp, tflags, current_is_oom_victim())
            g, alloc_flags, wmark_flags = plan.gfp, plan.alloc_flags, plan.wmark_flags
            if plan.kswapd_reclaim:
                self._wake_all_kswapds()
            page = self._get_page_from_freelist(wmark_flags)
            if page is None and first and plan.oom:
                # 6.1: the slow path's first attempt, before "retry:", is at
                # gfp_to_alloc_flags' own flags (3/8 of min for GFP_ATOMIC, below ALLOC_OOM's
                # half); the reserve flags replace them from "retry:" on.
                page = self._get_page_from_freelist(_plan(gfp, tflags).wmark_flags)
            first = False
            if page is not None:
                return page
            # "Allocate without watermarks if the context allows"
            if plan.no_watermarks:
                page = await self._alloc_emergency(g, tflags, wmark_flags, reserve)
                if page is not None:
                    return page
            if not plan.direct_reclaim:  # "Atomic allocations - we can't balance anything"
                return self._fail(g, alloc_flags, tflags)
            if plan.memalloc:  # "Avoid recursion of direct reclaim"
                if await self.policy.memalloc_failed(g):
                    continue
                if not plan.nofail:
                    return self._fail(g, alloc_flags, tflags)
                await self._wait_for_free_pages()
                continue
            if await self.policy.throttle_direct_reclaim(g):
                # try_to_free_pages: "if (throttle_direct_reclaim(...)) return 1" -- killed
                # while throttled: no reclaim, and the progress it pretends keeps the OOM
                # killer away; the next try is not throttled (the signal is still pending).
                nr_reclaimed = 1
            else:
                nr_reclaimed = await self._direct_reclaim(g)
            page = self._get_page_from_freelist(wmark_flags)
            if page is not None:
                return page
            if plan.noretry:  # __GFP_NORETRY: "don't loop in __alloc_pages"
                return self._fail(g, alloc_flags, tflags)
            if nr_reclaimed:  # progress, but others took the pages: retry
                no_progress_loops = 0
                await trio.lowlevel.checkpoint()
                continue
            # should_reclaim_retry: "Make sure we converge to OOM if we cannot make any
            # progress several times in the row" -- the count comes first, so writeback
            # that never completes delays the OOM killer by MAX_RECLAIM_RETRIES waits, no
            # more (4.7-5.15: "if (2 * write_pending > reclaimable) {
            # congestion_wait(BLK_RW_ASYNC, HZ/10); return true; }" after the count).
            no_progress_loops += 1
            if no_progress_loops <= MAX_RECLAIM_RETRIES:
                if self._writeback_pending():
                    await self._wait_for_writeback()
                else:
                    await trio.lowlevel.checkpoint()  # cond_resched()
                continue
            if not plan.fs and not fatal_signal_pending():
                # out_of_memory: "The OOM killer does not compensate for IO-less reclaim";
                # pretend progress and keep looping (order-0 is "too small to fail"). A
                # killed task goes on to out_of_memory, whose task_will_free_mem(current)
                # comes before this test (6.1).
                await self._wait_for_free_pages()
                continue
            progress = self.out_of_memory(g)  # __alloc_pages_may_oom
            victim = current_is_oom_victim()
            if victim and (plan.oom or g & GFP.NOMEMALLOC):
                # 6.1 __alloc_pages_slowpath, after __alloc_pages_may_oom: "Avoid allocations
                # with no watermarks from looping endlessly": the victim's task fails and
                # goes on to exit, which frees its memory.
                if plan.nofail:  # nopage: "__GFP_NOFAIL request ... we always retry"
                    await self._wait_for_free_pages()
                    continue
                return self._fail(g, alloc_flags, tflags)
            if progress:  # "Retry as long as the OOM killer is making progress"
                no_progress_loops = 0
                if not victim:
                    # The kernel goes round again at once, and the victim runs on another
                    # CPU meanwhile; on the model's clock a task that never sleeps stops
                    # time, so the retry waits for a page to be freed (the victim's exit or
                    # the oom_reaper), at most CONGESTION_WAIT. A task that has just become
                    # a victim itself (task_will_free_mem(current)) retries at ALLOC_OOM now.
                    await self._wait_for_free_pages(what=self.oom_wait())
                continue
            if plan.nofail:
                await self._wait_for_free_pages()
                continue
            return self._fail(g, alloc_flags, tflags)  # nothing left to kill

    async def _alloc_emergency(
        self, gfp: gfp_t, tflags: int, wmark_flags: int, reserve: object | None
    ) -> Page | None:
        """Serve below min (ALLOC_NO_WATERMARKS) after the policy's charge hook agrees."""
        if not any(zone.nr_free for zone in self._zonelist):
            return None
        if not await self.policy.charge_emergency(gfp, reserve):
            return None
        # The charge may have waited: "retry the normal allocation and uncharge if it works"
        # (Zijlstra's kmalloc_reserve).
        page = self._get_page_from_freelist(wmark_flags)
        if page is not None:
            self.policy.uncharge_emergency(reserve)
            return page
        page = self._get_page_from_freelist(ALLOC_NO_WATERMARKS)
        if page is None:
            self.policy.uncharge_emergency(reserve)
            return None
        # prep_new_page: "if (alloc_flags & ALLOC_NO_WATERMARKS) set_page_pfmemalloc(page)",
        # only when the reserve was actually required (V10).
        page.pfmemalloc = True
        page.reserve = reserve
        self.stat.alloc_emergency += 1
        self.stat.nr_emergency += 1
        self.observer(AllocEmergency(gfp, tflags, page.zone.name, page.zone.nr_free))
        return page

    async def _direct_reclaim(self, gfp: gfp_t) -> int:
        """mm/page_alloc.c __perform_reclaim: try_to_free_pages under PF_MEMALLOC, memstall."""
        if self.reclaimer is None:
            return 0
        with task_flags(PF.MEMALLOC), self.psi.memstall():
            sc = await self.reclaimer.try_to_free_pages(gfp)
        return sc.nr_reclaimed

    def _writeback_pending(self) -> bool:
        return self.stat.nr_writeback > 0

    async def _wait_for_writeback(self) -> None:
        if self.reclaimer is None:  # pragma: no cover - writeback needs a reclaimer
            return
        with self.psi.memstall():
            await self.reclaimer.wait_for_writeback(CONGESTION_WAIT)

    async def _wait_for_free_pages(
        self, timeout: float = CONGESTION_WAIT, what: WaitFor | None = None
    ) -> bool:
        """Wait until a page is freed (or ``timeout``); a task waiting here is stalled.
        ``what`` names the wait (default: free pages, from kswapd)."""
        if what is None:
            zone = self._zonelist[0].name if self._zonelist else "none"
            what = WaitFor("free_pages", zone, waker="kswapd")
        with self.psi.memstall():
            return await self.waits.park(self._free_wait, what, timeout)

    async def wait_for_free_pages(self, timeout: float = math.inf) -> bool:
        """Sleep until some page is freed (for policies and callers that must wait)."""
        return await self._wait_for_free_pages(timeout)

    def _fail(self, gfp: gfp_t, alloc_flags: int, tflags: int) -> Page | None:
        """Count and report a failed allocation; its result (always None) is the caller's."""
        self.stat.alloc_fail += 1
        self.observer(AllocFailed(gfp, alloc_flags, tflags))
        return None

    def _fail_injected(self, gfp: gfp_t) -> Page | None:
        """An injected failure: counted and reported exactly as a real one."""
        tflags = current_task_flags()
        plan = _plan(gfp, tflags, current_is_oom_victim())
        return self._fail(plan.gfp, plan.alloc_flags, tflags)

    # -- free --------------------------------------------------------------------------------

    def free_page(self, page: Page, *, progress: bool = True) -> None:
        """``__free_pages``: back to its zone's free list; uncharge an emergency page after.

        ``progress=False`` for a page that only churned (a dropped packet's buffer, a pure
        ACK's): the watchdog counts retries and drops as activity, never as progress.

        The page must be off the LRU, out of the swap cache, unmapped, not under writeback
        and not a slab (``free_pages_check`` would report a bad page).
        """
        if page.lru or page.swapcache or page.writeback or page.slab or page.mapping is not None:
            raise RuntimeError(f"freeing a page still in use: {page!r}")
        pfmemalloc, reserve = page.pfmemalloc, page.reserve
        page.reset()
        page.zone.give(page)
        self.stat.pgfree += 1
        if progress:
            self.progress.pages_freed += 1
        if self._free_wait:
            self._free_wait.unpark_all()
        if pfmemalloc:
            self.stat.nr_emergency -= 1
            # Zijlstra's kfree_reserve: free first, then uncharge, "ensures memory is
            # actually present when a subsequent charge succeeds".
            self.policy.uncharge_emergency(reserve)

    # -- inspection --------------------------------------------------------------------------

    @property
    def nr_free_pages(self) -> int:
        return sum(zone.nr_free for zone in self.zones)
