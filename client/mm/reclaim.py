"""Page reclaim: shrink_page_list, pageout to swap, kswapd (mm/vmscan.c).

Anonymous pages and clean page cache pages. A clean file page is freed by the scan that
finds it, with no I/O. A dirty anonymous page is freed in two scans: the first adds it to swap, unmaps
it and starts writeback; the I/O completes later (``end_page_writeback`` rotates it to the
inactive tail); the next scan finds it clean and frees it. Freed memory therefore lags the
swap device's round trip, and that lag is what the reserves have to cover.

The swap writeout itself, from the plug to the completion, is page_io.py's (mm/page_io.c).
"""

from __future__ import annotations

import attrs
import trio

from client.mm.alloc import MAX_RECLAIM_RETRIES, Allocator
from client.mm.facts import DirectReclaim, KswapdSleep, KswapdWoken
from client.mm.gfp import (
    ALLOC_WMARK_HIGH,
    ALLOC_WMARK_LOW,
    GFP,
    GFP_KERNEL,
    PF,
    gfp_t,
    task_flags,
)
from client.mm.lru import Lru
from client.mm.page import Page
from client.mm.page_io import PageIO
from client.mm.pagecache import PageCache
from client.mm.swap import SwapArea
from client.mm.waits import IDLE, WaitFor, WaitQueue
from client.mm.zone import Zone

SWAP_CLUSTER_MAX = 32  # include/linux/swap.h
DEFAULT_SWAPPINESS = 60  # mm/vmscan.c: int vm_swappiness = 60
# kswapd waits this long for writeback before it looks again (congestion_wait(.., HZ/10)).
KSWAPD_WRITEBACK_WAIT = 0.1


@attrs.define
class ScanControl:
    """``struct scan_control``: what one reclaim invocation may do and what it did."""

    gfp: gfp_t
    nr_to_reclaim: int = SWAP_CLUSTER_MAX
    is_kswapd: bool = False
    nr_scanned: int = 0  # inactive pages isolated and looked at (pgscan)
    nr_reclaimed: int = 0  # pages freed (pgsteal)
    nr_refill: int = 0  # active pages looked at (pgrefill)
    nr_writeback: int = 0  # pages found under writeback: progress pending
    nr_pageout: int = 0  # pages whose writeback this invocation started
    nr_activated: int = 0

    @property
    def pending(self) -> int:
        """Pages on their way to being freeable (the writeback this scan saw or started)."""
        return self.nr_writeback + self.nr_pageout


class Reclaimer:
    """Reclaim for one node: the LRU scan, pageout to swap (through ``page_io``), kswapd."""

    def __init__(
        self,
        allocator: Allocator,
        lru: Lru,
        page_io: PageIO,
        *,
        swappiness: int = DEFAULT_SWAPPINESS,
        pagecache: PageCache | None = None,
    ) -> None:
        self.allocator = allocator
        self.lru = lru
        self.page_io = page_io  # swap writeout (pageout's swap_writepage) and its completion
        self.swappiness = swappiness  # vm.swappiness
        self.pagecache = pagecache
        self.stat = allocator.stat
        self.kswapd_failures = 0  # pgdat->kswapd_failures
        self.kswapd_awake = False
        self._kswapd_pending = False
        self._kswapd_wait = WaitQueue()  # pgdat->kswapd_wait

    # -- the LRU scan ------------------------------------------------------------------------

    def shrink_active_list(self, nr_to_scan: int, sc: ScanControl, *, file: bool = False) -> None:
        """mm/vmscan.c shrink_active_list: move pages from the active to the inactive list.

        ``page_referenced()`` clears the young bits; anon pages are deactivated whether or
        not they were referenced (only executable file pages stay active, and the model's
        files are data), so their second chance is to be referenced again while inactive.
        """
        pages = self.lru.isolate(nr_to_scan, active=True, file=file)
        sc.nr_refill += len(pages)
        self.stat.pgrefill += len(pages)
        for page in pages:
            page.referenced = False
            page.active = False
            self.lru.add(page)
        self.stat.pgdeactivate += len(pages)

    def shrink_page_list(self, pages: list[Page], sc: ScanControl) -> list[Page]:
        """mm/vmscan.c shrink_page_list for isolated inactive pages.

        Each page is freed, or put back (kept or activated). Returns the pages whose
        writeback was started (``pageout``); the caller submits them (``blk_finish_plug``).
        """
        swap = self.page_io.swap
        may_io = bool(sc.gfp & GFP.IO)
        plug: list[Page] = []
        for page in pages:
            if page.file is not None:
                # page_check_references on an unmapped page cache page: "Reclaim if clean,
                # defer dirty pages to writeback" (PAGEREF_RECLAIM_CLEAN even if referenced;
                # mark_page_accessed already promoted the hot ones). Clean: no I/O, so a
                # GFP_NOIO reclaimer frees it too. __remove_mapping, then free.
                assert self.pagecache is not None
                self.pagecache.remove(page)
                self._free(page, sc)
                continue
            if page.writeback:
                # PageWriteback: SetPageReclaim, nr_writeback++; keep it for a later scan.
                # DESIGN.md §4.1 says "skip": the page stays inactive, and completion rotates
                # it to the tail. 4.x (from memory, unverified) goes to activate_locked here
                # instead, which delays the free until the page is deactivated again.
                page.reclaim = True
                sc.nr_writeback += 1
                self._keep(page)
                continue
            if page.referenced:
                # page_check_references: a referenced swap-backed page -> PAGEREF_ACTIVATE.
                page.referenced = False
                self._activate(page, sc)
                continue
            if page.mapping is None and self._orphan(page):
                # The last reference went away while the page was on the LRU (its process
                # exited): nothing can fault it back, free it whatever its state.
                if page.swapcache:
                    assert swap is not None
                    swap.delete_from_swap_cache(page)
                self._free(page, sc)
                continue
            if not page.swapcache:
                if not may_io:  # "if (!(sc->gfp_mask & __GFP_IO)) goto keep_locked"
                    self._keep(page)
                    continue
                if swap is None or not swap.add_to_swap(page):  # swap full: activate_locked
                    self._activate(page, sc)
                    continue
            assert swap is not None
            if page.mapping is not None:
                self._try_to_unmap(page, swap)
            if page.dirty:
                # may_enter_fs = PageSwapCache(page) && (gfp_mask & __GFP_IO)
                if not may_io:
                    self._keep(page)
                    continue
                # pageout(): clear_page_dirty_for_io, SetPageReclaim, swap_writepage sets
                # PageWriteback; the page stays on the LRU until the I/O completes.
                page.dirty = False
                page.reclaim = True
                page.writeback = True
                self.stat.nr_writeback += 1
                sc.nr_pageout += 1
                plug.append(page)
                self._keep(page)
                continue
            # Clean, unmapped, not under writeback: __remove_mapping -> delete_from_swap_cache.
            swap.delete_from_swap_cache(page)
            self._free(page, sc)
        return plug

    def _orphan(self, page: Page) -> bool:
        """An unmapped page no swap pte points at (an exited process's)."""
        if not page.swapcache:
            return True
        swap = self.page_io.swap
        assert swap is not None
        return swap.map.pte_refs(page.private) == 0

    def _keep(self, page: Page) -> None:
        self.lru.add(page)  # putback_inactive_pages: back to the head of its list

    def _activate(self, page: Page, sc: ScanControl) -> None:
        page.active = True  # activate_locked: SetPageActive
        self.lru.reclaim_stat.recent_rotated[page.file is not None] += 1  # putback
        sc.nr_activated += 1
        self.stat.pgactivate += 1
        self.lru.add(page)

    def _free(self, page: Page, sc: ScanControl) -> None:
        page.dirty = False
        self.allocator.free_page(page)
        sc.nr_reclaimed += 1

    def _try_to_unmap(self, page: Page, swap: SwapArea) -> None:
        """mm/rmap.c try_to_unmap: the pte becomes a swap entry (``swap_duplicate``)."""
        process = page.mapping
        assert process is not None
        del process.present[page.index]
        process.swapped[page.index] = page.private
        swap.map.dup(page.private)
        page.mapping = None
        page.referenced = False
        self.stat.nr_anon_pages -= 1

    def get_scan_count(self) -> tuple[int, int]:
        """mm/vmscan.c get_scan_count (4.x): how many (anon, file) pages one pass scans.

        - "If we have no swap space, do not bother scanning anon pages": SCAN_FILE.
        - No page cache: everything from anon (SCAN_ANON in effect).
        - "If there is enough inactive page cache, i.e. if the size of the inactive file
          list is greater than that of the active list *and* the inactive list actually
          has some pages to scan on this priority, we do not reclaim anything from the
          anonymous working set right now": SCAN_FILE.  The model has no scan priority;
          "some pages to scan" is taken as at least SWAP_CLUSTER_MAX inactive file pages.
        - Otherwise SCAN_FRACT: ``anon_prio = swappiness``, ``file_prio = 200 -
          swappiness``, each weighed by "the fraction of recently scanned pages on each
          list that were recently referenced" (``ap = anon_prio * (recent_scanned[0] + 1)
          / (recent_rotated[0] + 1)``, ``fp`` alike): a type whose pages keep coming back
          into use is scanned less. One pass shares SWAP_CLUSTER_MAX pages in the ratio
          ``ap : fp`` (the kernel scales ``lru_size >> priority`` by it).
        """
        lru = self.lru
        nr_file = lru.nr_file
        swap = self.page_io.swap
        if swap is None or swap.map.nr_free == 0:
            return 0, SWAP_CLUSTER_MAX if nr_file else 0
        if nr_file == 0:
            return SWAP_CLUSTER_MAX, 0
        if not lru.inactive_is_low(file=True) and lru.nr_inactive_file >= SWAP_CLUSTER_MAX:
            return 0, SWAP_CLUSTER_MAX
        stat = lru.reclaim_stat
        stat.age(lru.nr_anon, nr_file)
        anon_prio = self.swappiness
        ap = anon_prio * (stat.recent_scanned[0] + 1) // (stat.recent_rotated[0] + 1)
        fp = (200 - anon_prio) * (stat.recent_scanned[1] + 1) // (stat.recent_rotated[1] + 1)
        denominator = ap + fp + 1
        return (
            -(-SWAP_CLUSTER_MAX * ap // denominator),  # rounded up: each type gets a look
            -(-SWAP_CLUSTER_MAX * fp // denominator),
        )

    async def shrink_node(self, sc: ScanControl) -> int:
        """One pass of mm/vmscan.c shrink_node: for each LRU type get_scan_count picks,
        refill its inactive list while it is low, shrink that many inactive pages; submit
        the anon pages' writeback.

        Returns the number of pages looked at (inactive and active).
        """
        nr_anon, nr_file = self.get_scan_count()
        if not nr_anon and not nr_file:
            return 0
        before = sc.nr_scanned + sc.nr_refill
        reclaimed_before = sc.nr_reclaimed
        if nr_file:
            if self.lru.inactive_is_low(file=True):
                self.shrink_active_list(nr_file, sc, file=True)
            pages = self.lru.isolate(nr_file, active=False, file=True)
            sc.nr_scanned += len(pages)
            self.lru.reclaim_stat.recent_scanned[1] += len(pages)
            self.shrink_page_list(pages, sc)
        if nr_anon:
            if self.lru.inactive_is_low():
                self.shrink_active_list(nr_anon, sc)
            pages = self.lru.isolate(nr_anon, active=False)
            sc.nr_scanned += len(pages)
            self.lru.reclaim_stat.recent_scanned[0] += len(pages)
            plug = self.shrink_page_list(pages, sc)
            if plug:
                await self.page_io.flush_plug(plug)
        if sc.nr_reclaimed > reclaimed_before:
            # shrink_node (4.12+, "mm: fix 100% CPU kswapd busyloop on unreclaimable nodes"):
            # "On reclaim progress, reset the failure counter. A successful direct reclaim
            # run will revive a dormant kswapd." -- kswapd's reclaim or direct reclaim.
            self.kswapd_failures = 0
        return sc.nr_scanned + sc.nr_refill - before

    async def shrink(self, gfp: gfp_t, nr_to_reclaim: int = SWAP_CLUSTER_MAX) -> ScanControl:
        """Scan until ``nr_to_reclaim`` pages are freed, or as much is pending in writeback,
        or about two sweeps of the LRU found nothing (do_try_to_free_pages' priority loop)."""
        sc = ScanControl(gfp, nr_to_reclaim)
        budget = 2 * len(self.lru) + SWAP_CLUSTER_MAX
        while sc.nr_reclaimed < nr_to_reclaim and sc.pending < nr_to_reclaim:
            if await self.shrink_node(sc) == 0 or sc.nr_scanned + sc.nr_refill >= budget:
                break
        return sc

    async def try_to_free_pages(self, gfp: gfp_t) -> ScanControl:
        """mm/vmscan.c try_to_free_pages: direct reclaim of SWAP_CLUSTER_MAX pages.

        The caller (the allocator's __perform_reclaim) runs it under PF_MEMALLOC.
        """
        self.stat.allocstall += 1
        sc = await self.shrink(gfp, SWAP_CLUSTER_MAX)
        self.stat.pgscan_direct += sc.nr_scanned
        self.stat.pgsteal_direct += sc.nr_reclaimed
        self.allocator.observer(DirectReclaim(gfp, sc.nr_scanned, sc.nr_reclaimed))
        return sc

    # -- waiting for writeback ---------------------------------------------------------------

    def writeback_wait_for(self) -> WaitFor:
        block = self.page_io.block
        name = block.inflight_name() if block is not None else "swap"
        return WaitFor("writeback", name, waker="swap device")

    async def wait_for_writeback(self, timeout: float) -> bool:
        """Sleep until a swap write completes (True) or ``timeout`` passes (False)."""
        what = self.writeback_wait_for()
        return await self.allocator.waits.park(self.page_io.writeback_wait, what, timeout)

    # -- kswapd ------------------------------------------------------------------------------

    def wakeup_kswapd(self, zone: Zone) -> None:
        """mm/vmscan.c wakeup_kswapd."""
        if self.kswapd_awake or self._kswapd_pending:  # "if (!waitqueue_active(..)) return"
            return
        # "Hopeless node, leave it to direct reclaim"
        if self.kswapd_failures >= MAX_RECLAIM_RETRIES:
            return
        if zone.watermark_ok(ALLOC_WMARK_LOW):  # the zone is above low: nothing to do
            return
        self._kswapd_pending = True
        self._kswapd_wait.unpark_all()
        self.allocator.observer(KswapdWoken(zone.name, zone.nr_free))

    def pgdat_balanced(self) -> bool:
        """Every zone is above its high watermark (balance_pgdat's goal, reference §3)."""
        return all(zone.watermark_ok(ALLOC_WMARK_HIGH) for zone in self.allocator.zones)

    def _shortfall(self) -> int:
        """Pages still to free for every zone to be above high."""
        return sum(max(0, z.watermarks.high + 1 - z.nr_free) for z in self.allocator.zones)

    async def kswapd(
        self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
    ) -> None:
        """The kswapd thread: sleep until woken below low, then balance up to high.

        Runs as PF_MEMALLOC|PF_SWAPWRITE|PF_KSWAPD (and a kernel thread).
        """
        with task_flags(PF.MEMALLOC | PF.SWAPWRITE | PF.KSWAPD | PF.KTHREAD):
            task_status.started()
            idle = WaitFor(IDLE, "kswapd", waker="allocator")
            while True:
                self.kswapd_awake = False
                while not self._kswapd_pending:
                    await self.allocator.waits.park(self._kswapd_wait, idle)
                self._kswapd_pending = False
                self.kswapd_awake = True
                balanced, nr_reclaimed = await self.balance_pgdat()
                self.prepare_kswapd_sleep()
                self.allocator.observer(KswapdSleep(balanced, nr_reclaimed))

    def prepare_kswapd_sleep(self) -> None:
        """mm/vmscan.c prepare_kswapd_sleep, called before every sleep of kswapd: "If kswapd
        is going to sleep, no process should be sleeping on pfmemalloc_wait, so wake them
        now if necessary. If the wake up is premature, processes will wake kswapd and get
        throttled again." The wait queue is the policy's (only a throttling policy has
        one). Unlike the kernel's, the model's kswapd sleeps after every balance_pgdat
        pass, balanced or not, until an allocator wakes it again."""
        self.allocator.policy.prepare_kswapd_sleep()

    async def balance_pgdat(self) -> tuple[bool, int]:
        """mm/vmscan.c balance_pgdat: reclaim until every zone is above high.

        Waits for writeback when as much as is missing is already in flight, or when the
        scan finds nothing else to do; gives up when nothing is reclaimable and nothing is
        in flight, and counts a failure (``kswapd_failures++``) only if the whole pass
        reclaimed nothing. A balanced node is left as it is: only reclaim progress resets
        the count (``shrink_node``). Returns (balanced, pages reclaimed).
        """
        self.stat.pageoutrun += 1
        total = 0
        fruitless = 0
        while True:
            if self.pgdat_balanced():  # balance_pgdat: "goto out", failures untouched
                return True, total
            sc = ScanControl(GFP_KERNEL, SWAP_CLUSTER_MAX, is_kswapd=True)
            looked = await self.shrink_node(sc)
            self.stat.pgscan_kswapd += sc.nr_scanned
            self.stat.pgsteal_kswapd += sc.nr_reclaimed
            total += sc.nr_reclaimed
            self.allocator.policy.kswapd_pass()
            if self.pgdat_balanced():
                continue
            fruitless = 0 if sc.nr_reclaimed else fruitless + looked
            stuck = looked == 0 or fruitless > 2 * len(self.lru) + SWAP_CLUSTER_MAX
            if stuck or self.stat.nr_writeback >= self._shortfall():
                if self.stat.nr_writeback == 0:
                    # balance_pgdat: "if (!sc.nr_reclaimed) pgdat->kswapd_failures++" --
                    # sc.nr_reclaimed of the whole pass: a pass that freed some pages but
                    # could not balance the node is not a failure.
                    if total == 0:
                        self.kswapd_failures += 1
                    return False, total
                await self.wait_for_writeback(KSWAPD_WRITEBACK_WAIT)
                fruitless = 0
                continue
            await trio.lowlevel.checkpoint()  # cond_resched()
