"""Swap I/O: the block I/O of swap-out and of swap-in (mm/page_io.c).

Reclaim hands ``flush_plug`` the pages whose writeback ``shrink_page_list`` started; a fault
hands ``swap_readpage`` the pages swap readahead added to the swap cache. Either way,
pages with contiguous slots go to the swap device's block queue as one request (the plug
merges them, up to ``max_io_pages``), and PSWPOUT or PSWPIN is counted at submit. The
block layer calls back at completion (``end_swap_bio_write``, ``end_swap_bio_read``), as
the kernel's interrupt handler does.

``PageIO`` holds what swap I/O works on: the swap area and the block queue in front of
its device (``Memory.swapon`` sets both), and the swap-in reads in flight.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import attrs
import trio

from client.mm.facts import SwapReadDone, SwapReadpage, SwapWritebackDone, SwapWritepage
from client.mm.gfp import GFP_KERNEL, GFP_NOIO
from client.mm.page import Page  # at run time too: a field of an attrs class below
from client.mm.waits import WaitQueue

if TYPE_CHECKING:
    from client.mm.alloc import Allocator
    from client.mm.block import Bio, BlockQueue
    from client.mm.lru import Lru
    from client.mm.swap import SwapArea


@attrs.define(eq=False)
class SwapIn:
    """A swap-in read in flight for one slot (stands in for the locked swap-cache page)."""

    page: Page
    owner: str  # the faulting task that allocates and submits the read
    readahead: bool = False  # read for a neighbour's fault, not its own
    done: trio.Event = attrs.field(factory=trio.Event)
    bio: Bio | None = None  # None until the read is submitted
    error: bool = False  # the read failed (the slot still holds the data)
    waiters: int = 0  # faults waiting for it (each holds the page, as lookup_swap_cache)


class PageIO:
    """Swap I/O for one machine: writeout for reclaim, reads for the fault path."""

    def __init__(self, allocator: Allocator, lru: Lru, *, max_io_pages: int = 32) -> None:
        self.allocator = allocator
        self.lru = lru
        self.max_io_pages = max_io_pages
        self.stat = allocator.stat
        self.swap: SwapArea | None = None
        self.block: BlockQueue | None = None
        #: The swap-in reads in flight, by slot: each from when swap readahead adds its
        #: page to the swap cache until ``end_swap_bio_read`` (or readahead's undo) takes
        #: it out.
        self.swapin: dict[int, SwapIn] = {}
        #: Woken whenever a swap write completes (``Reclaimer.wait_for_writeback`` sleeps
        #: on it).
        self.writeback_wait = WaitQueue()

    # -- swap-out ----------------------------------------------------------------------------

    async def flush_plug(self, plug: list[Page]) -> None:
        """``blk_finish_plug``: merge pages with contiguous slots into requests of at most
        ``max_io_pages`` and submit each (``swap_writepage`` allocates bios with GFP_NOIO)."""
        plug.sort(key=lambda p: p.private)
        run: list[Page] = []
        for page in plug:
            if run and (page.private != run[-1].private + 1 or len(run) >= self.max_io_pages):
                await self._swap_writepage(run)
                run = []
            run.append(page)
        if run:
            await self._swap_writepage(run)

    async def _swap_writepage(self, pages: list[Page]) -> None:
        """mm/page_io.c __swap_writepage: one bio for the run; PSWPOUT counted at submit."""
        assert self.block is not None
        slot = pages[0].private
        bio = await self.block.submit(
            write=True, slot=slot, pages=pages, gfp=GFP_NOIO, end_io=self.end_swap_bio_write
        )
        self.stat.pswpout += len(pages)
        self.allocator.observer(SwapWritepage(bio.id, slot, len(pages)))

    def end_swap_bio_write(self, bio: Bio) -> None:
        """mm/page_io.c end_swap_bio_write, then end_page_writeback for each page."""
        error = bio.error
        for page in bio.pages:
            if error is not None:
                # "Re-dirty the page in order to avoid it being reclaimed." + ClearPageReclaim
                page.dirty = True
                page.reclaim = False
            self.end_page_writeback(page)
        if error is None:
            self.allocator.progress.writebacks_completed += 1
        else:
            self.stat.swap_write_errors += len(bio.pages)
        err = None if error is None else str(error) or type(error).__name__
        self.allocator.observer(SwapWritebackDone(bio.id, bio.slot, len(bio.pages), err))
        self.writeback_wait.unpark_all()

    # mm/filemap.c, not mm/page_io.c: kept here, next to its only caller, because the
    # model's only writeback is swap writeback.
    def end_page_writeback(self, page: Page) -> None:
        """mm/filemap.c end_page_writeback: rotate a PG_reclaim page to the inactive tail
        (``rotate_reclaimable_page``) so the next scan frees it, then clear writeback."""
        if page.reclaim:
            page.reclaim = False
            if page.lru and not page.active and not page.dirty:
                self.lru.rotate_to_tail(page)
                self.stat.pgrotated += 1
        page.writeback = False
        self.stat.nr_writeback -= 1

    # -- swap-in -----------------------------------------------------------------------------

    async def swap_readpage(self, reads: list[tuple[int, SwapIn]]) -> None:
        """mm/page_io.c swap_readpage for ``reads`` (sorted by slot), under one plug: each
        run of consecutive slots goes out as one request, up to ``max_io_pages``; PSWPIN
        counted at submit. A run leaves ``reads`` once submitted, so what is left there if
        this raises (cancelled, or killed) was never submitted: the caller undoes it.
        Bookkeeping at completion is done by ``end_swap_bio_read``."""
        block = self.block
        assert block is not None
        while reads:
            run = self._next_read_run(reads)
            bio = await block.submit(
                write=False,
                slot=run[0][0],
                pages=[r.page for _, r in run],
                gfp=GFP_KERNEL,
                end_io=self.end_swap_bio_read,
            )
            del reads[: len(run)]
            nr_ra = 0
            for _, r in run:
                r.bio = bio
                nr_ra += r.readahead
            self.stat.pswpin += len(run)  # swap_readpage: count_vm_event(PSWPIN), a page
            self.stat.swap_ra += nr_ra
            self.allocator.observer(SwapReadpage(bio.id, bio.slot, len(run), nr_ra))

    def _next_read_run(self, reads: list[tuple[int, SwapIn]]) -> list[tuple[int, SwapIn]]:
        """The first run of consecutive slots in ``reads`` (sorted), up to max_io_pages."""
        n = 1
        limit = min(len(reads), self.max_io_pages)
        while n < limit and reads[n][0] == reads[0][0] + n:
            n += 1
        return reads[:n]

    def end_swap_bio_read(self, bio: Bio) -> None:
        """mm/page_io.c end_swap_bio_read, for each page of the request: uptodate (LRU,
        inactive) or, on error, dropped from the swap cache and freed."""
        swap = self.swap
        assert swap is not None
        ok = bio.error is None
        done = []
        for i, page in enumerate(bio.pages):
            pending = self.swapin.pop(bio.slot + i)
            done.append(pending)
            if ok:
                self.allocator.progress.swapins_completed += 1
                # The faulting task maps its page next; referenced stands in for the page
                # lock and the reference it holds, so a scan in between activates rather
                # than frees it. A readahead page is PG_readahead and unreferenced, unless
                # a fault already waits for it (it holds the page as the faulting one does).
                page.referenced = not pending.readahead or pending.waiters > 0
                page.readahead = pending.readahead
                page.active = False
                self.lru.add(page)  # lru_cache_add_anon
            else:
                pending.error = True
                swap.delete_from_swap_cache(page)
                self.allocator.free_page(page)
        if not ok:
            self.stat.swap_read_errors += 1
        err = None if ok else str(bio.error) or type(bio.error).__name__
        self.allocator.observer(SwapReadDone(bio.id, bio.slot, len(bio.pages), err))
        for pending in done:
            pending.done.set()
