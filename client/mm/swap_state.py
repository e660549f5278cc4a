"""Swap-in readahead: what a major fault reads back besides its page (mm/swap_state.c).

The swap cache itself and the arithmetic of the readahead windows (``swapin_nr_pages``,
``swap_ra_info``) are swap.py's; the reads go out through page_io.py (``swap_readpage``);
the fault that asks for them and waits for its page is memory.py's (``do_swap_page``).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import trio

from client.mm.errors import ProcessKilled
from client.mm.gfp import GFP_HIGHUSER_MOVABLE
from client.mm.page_io import SwapIn
from client.mm.swap import vma_readahead_window

if TYPE_CHECKING:
    from collections.abc import Iterator

    from client.mm.alloc import Allocator
    from client.mm.page import Page
    from client.mm.page_io import PageIO
    from client.mm.process import Process
    from client.mm.swap import SwapArea


class SwapReadahead:
    """Swap readahead for one machine: ``mode`` is ``MemoryConfig.swap_readahead``,
    ``page_cluster`` vm.page-cluster."""

    def __init__(
        self, allocator: Allocator, page_io: PageIO, *, mode: str, page_cluster: int
    ) -> None:
        self.allocator = allocator
        self.page_io = page_io
        self.stat = allocator.stat
        self.mode = mode
        self.page_cluster = page_cluster

    async def swapin_readahead(
        self, process: Process, vpage: int, slot: int, swap: SwapArea, page: Page
    ) -> SwapIn | None:
        """mm/swap_state.c swapin_readahead, for a fault on ``vpage`` whose pte names
        ``slot``, with ``page`` to read it into.

        ``swap_readahead`` "cluster" (swap_cluster_readahead, the only kind before 4.14 and
        after it the one for rotational devices) reads neighbouring *slots*, whoever's
        pages they hold: a window of ``swapin_nr_pages`` slots around ``slot``, aligned.
        "vma" (swap_vma_readahead, 4.14+ for other devices: NBD sets QUEUE_FLAG_NONROT)
        reads the slots that the swap ptes of neighbouring *addresses* of the faulting
        process name, a window from its mapping's ``swap_readahead_info``.

        Each slot to read that a swap pte points at and that has no swap-cache page gets a page
        (``__read_swap_cache_async``: allocated with the fault's gfp, added to the swap
        cache), and reads of neighbouring slots go out as one request (the plug merges
        them, up to ``max_io_pages``). Only the faulting page is waited for, by the fault.
        Unlike the kernel, which walks the window in order, the faulting page is allocated
        first (``page``, by the fault), so that a concurrent fault on it waits for this
        read instead of starting another.
        The reads go out with ``PageIO.swap_readpage``; bookkeeping at completion is done
        by ``PageIO.end_swap_bio_read``.

        Returns the faulting page's read, for the fault to wait for; None, with ``page``
        freed, when the page table changed while the fault allocated it.
        """
        if process.swapped.get(vpage) != slot or slot in swap.cache:
            self.allocator.free_page(page)
            return None
        swap.add_to_swap_cache(page, slot)
        owner = trio.lowlevel.current_task().name
        pending = SwapIn(page, owner)
        self.page_io.swapin[slot] = pending
        reads = [(slot, pending)]
        self.stat.pgmajfault += 1
        try:
            for offset, pte in self.readahead_slots(process, vpage, slot, swap):
                ra_page = await self.allocator.alloc_page(GFP_HIGHUSER_MOVABLE)
                if process.killed:  # meanwhile: no reads for it, undone below
                    if ra_page is not None:
                        self.allocator.free_page(ra_page)
                    raise ProcessKilled(process.pid)
                if ra_page is None:
                    continue  # "if (!page) continue": no memory for this one
                if not swap.readahead_candidate(offset) or (  # it changed while we allocated
                    pte is not None and process.swapped.get(pte) != offset
                ):
                    self.allocator.free_page(ra_page)
                    continue
                swap.add_to_swap_cache(ra_page, offset)
                self.page_io.swapin[offset] = ra = SwapIn(ra_page, owner, readahead=True)
                reads.append((offset, ra))
            reads.sort(key=lambda read: read[0])
            await self.page_io.swap_readpage(reads)
        except BaseException:
            # Cancelled (or killed) before these reads started: undo; a fault waiting for
            # one of them looks again (and reads it itself), as for a page truncated while
            # it waited. Not a read error: nothing was read.
            for offset, r in reads:
                del self.page_io.swapin[offset]
                swap.delete_from_swap_cache(r.page)
                self.allocator.free_page(r.page)
                r.done.set()
            raise
        return pending

    def readahead_slots(
        self, process: Process, vpage: int, slot: int, swap: SwapArea
    ) -> Iterator[tuple[int, int | None]]:
        """The slots swap readahead reads besides ``slot``, one at a time as the caller
        allocates (a slot is looked at when its turn comes): (slot, the virtual page whose
        swap pte names it, for VMA readahead; None for cluster readahead)."""
        if self.mode == "vma":
            window, process.swap_ra = vma_readahead_window(
                process.swap_ra, vpage, self.page_cluster
            )
            for v in window:
                s = process.swapped.get(v)  # a swap pte, not present, not none
                if v != vpage and s is not None and swap.readahead_candidate(s):
                    yield s, v
            return
        for s in swap.readahead_window(slot, self.page_cluster):
            if s != slot and swap.readahead_candidate(s):
                yield s, None
