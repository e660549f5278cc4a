"""Swap I/O: the block I/O of swap-out (mm/page_io.c).

Reclaim hands ``flush_plug`` the pages whose writeback ``shrink_page_list`` started: pages
with contiguous slots go to the swap device's block queue as one request (the plug merges
them, up to ``max_io_pages``), and PSWPOUT is counted at submit. The block layer calls back
at completion (``end_swap_bio_write``), as the kernel's interrupt handler does.

``PageIO`` holds what swap I/O works on: the swap area and the block queue in front of
its device (``Memory.swapon`` sets both).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from client.mm.facts import SwapWritebackDone, SwapWritepage
from client.mm.gfp import GFP_NOIO
from client.mm.waits import WaitQueue

if TYPE_CHECKING:
    from client.mm.alloc import Allocator
    from client.mm.block import Bio, BlockQueue
    from client.mm.lru import Lru
    from client.mm.page import Page
    from client.mm.swap import SwapArea


class PageIO:
    """Swap I/O for one machine: writeout for reclaim."""

    def __init__(self, allocator: Allocator, lru: Lru, *, max_io_pages: int = 32) -> None:
        if max_io_pages < 1:
            raise ValueError("max_io_pages must be >= 1")
        self.allocator = allocator
        self.lru = lru
        self.max_io_pages = max_io_pages
        self.stat = allocator.stat
        self.swap: SwapArea | None = None
        self.block: BlockQueue | None = None
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
