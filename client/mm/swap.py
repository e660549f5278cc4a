"""Swap space: the slot map with cluster allocation, and the swap cache.

A slot's count follows ``swap_map[]`` (mm/swapfile.c): the number of swap ptes that point at
it, plus ``SWAP_HAS_CACHE`` while a page for it is in the swap cache. A slot is free when
its count drops to zero.
"""

from __future__ import annotations

from collections import deque

from client.mm.page import Page

SWAPFILE_CLUSTER = 256  # mm/swapfile.c: slots handed out sequentially within a cluster
SWAP_HAS_CACHE = 0x40  # include/linux/swap.h: the slot has a page in the swap cache
SWAP_MAP_MAX = 0x3E
SWAP_MAP_BAD = 0x3F  # include/linux/swap.h: slot 0 holds the swap header


SWAP_RA_ORDER_CEILING = 5  # mm/swap_state.c (64-bit): VMA readahead of 32 pages at most
SWAP_RA_HITS_MAX = (1 << 6) - 1  # SWAP_RA_HITS_MASK: (1 << (PAGE_SHIFT / 2)) - 1
PTRS_PER_PMD = 512  # pages one page table maps: VMA readahead stays within it


def swapin_nr_pages(prev_offset: int, offset: int, hits: int, max_pages: int, prev_win: int) -> int:
    """mm/swap_state.c __swapin_nr_pages (4.14+): how many pages to read around ``offset``.

    "pages = hits + 2": with no hits to judge by, two pages if ``offset`` is next to
    ``prev_offset``, else one; with hits, that count rounded up to a power of two (at
    least 4). At most ``max_pages``, and "don't shrink readahead too fast": never below
    half the previous window.
    """
    pages = hits + 2
    if pages == 2:
        if offset not in (prev_offset + 1, prev_offset - 1):
            pages = 1
    else:
        roundup = 4
        while roundup < pages:
            roundup <<= 1
        pages = roundup
    return max(min(pages, max_pages), prev_win // 2)


def vma_readahead_window(
    prev: tuple[int, int, int] | None, vpage: int, page_cluster: int
) -> tuple[range, tuple[int, int, int]]:
    """mm/swap_state.c swap_ra_info: the virtual pages VMA readahead reads around the
    faulting ``vpage``, and the VMA's new ``swap_readahead_info`` (address, window, hits).

    ``prev`` is the VMA's info: None at first ("initial readahead hits is 4 to start up
    with a small window"). The window extends forward after a fault just before this one,
    backward after one just after it, and is centred otherwise; it stays inside the page
    table (``PTRS_PER_PMD`` pages) and the mapping (from page 0; the model's mappings have
    no other start).
    """
    max_win = 1 << min(page_cluster, SWAP_RA_ORDER_CEILING)
    if max_win == 1:
        return range(vpage, vpage + 1), prev or (0, 0, 4)
    addr, prev_win, hits = prev or (0, 0, 4)
    win = swapin_nr_pages(addr, vpage, hits, max_win, prev_win)
    info = (vpage, win, 0)
    if win == 1:
        return range(vpage, vpage + 1), info
    if vpage == addr + 1:
        lo, hi = vpage, vpage + win
    elif addr == vpage + 1:
        lo, hi = vpage - win + 1, vpage + 1
    else:
        left = (win - 1) // 2
        lo, hi = vpage - left, vpage + win - left
    pmd = vpage - vpage % PTRS_PER_PMD
    return range(max(lo, pmd, 0), min(hi, pmd + PTRS_PER_PMD)), info


class SwapFull(Exception):
    """No free slot."""


class SwapMap:
    """Slot allocator over a device of ``nr_pages`` pages (``swap_info_struct.swap_map``).

    Slot 0 is the swap header (``mkswap``) and never handed out. Slots are allocated in
    clusters of ``SWAPFILE_CLUSTER``: sequentially from the current cluster, then from the
    next wholly free cluster, and only when none is left by a linear next-fit scan
    (mm/swapfile.c scan_swap_map_slots). So pages that reclaim adds to swap one after the
    other get contiguous slots, which the block layer merges into one request.
    """

    def __init__(self, nr_pages: int) -> None:
        self.nr_pages = max(nr_pages, 0)
        self._map = bytearray(self.nr_pages)
        self.nr_slots = max(self.nr_pages - 1, 0)  # usable slots
        self.nr_free = self.nr_slots
        nr_clusters = -(-self.nr_pages // SWAPFILE_CLUSTER)
        self._cluster_used = [0] * nr_clusters
        self._queued = bytearray(nr_clusters)
        self._free_clusters: deque[int] = deque()
        self._cur = self._cur_end = 0
        self._cur_cluster = 0
        self._scan = 1
        if self.nr_pages:
            self._map[0] = SWAP_MAP_BAD
            self._cluster_used[0] = 1
            self._cur, self._cur_end = 1, self._cluster_size(0)
            for c in range(1, nr_clusters):
                self._free_clusters.append(c)
                self._queued[c] = 1

    def _cluster_size(self, c: int) -> int:
        return min(SWAPFILE_CLUSTER, self.nr_pages - c * SWAPFILE_CLUSTER)

    def count(self, slot: int) -> int:
        """The raw ``swap_map`` entry."""
        return self._map[slot]

    def pte_refs(self, slot: int) -> int:
        """Swap ptes pointing at ``slot`` (``swap_count()``)."""
        return self._map[slot] & ~SWAP_HAS_CACHE

    def vm_swap_full(self) -> bool:
        """include/linux/swap.h vm_swap_full: more than half of swap is in use."""
        return self.nr_free * 2 < self.nr_slots

    def alloc(self) -> int:
        """``get_swap_page``: a free slot, with ``SWAP_HAS_CACHE`` set; raise ``SwapFull``."""
        if self.nr_free == 0:
            raise SwapFull
        m = self._map
        while True:
            while self._cur < self._cur_end:
                slot = self._cur
                self._cur += 1
                if m[slot] == 0:
                    return self._take(slot)
            if not self._next_cluster():
                break
        # No wholly free cluster: next-fit linear scan (scan_swap_map_slots' fallback).
        n = self.nr_pages
        for i in range(n):
            slot = (self._scan + i) % n
            if m[slot] == 0:
                self._scan = slot + 1
                return self._take(slot)
        raise AssertionError("nr_free > 0 but no free slot")  # pragma: no cover

    def _next_cluster(self) -> bool:
        old = self._cur_cluster
        while self._free_clusters:
            c = self._free_clusters.popleft()
            self._queued[c] = 0
            if self._cluster_used[c] == 0:
                self._cur_cluster = c
                self._cur = c * SWAPFILE_CLUSTER
                self._cur_end = self._cur + self._cluster_size(c)
                self._maybe_queue(old)
                return True
        if self.nr_pages and self._cluster_used[old] == 0:  # the current one emptied meanwhile
            self._cur = old * SWAPFILE_CLUSTER
            self._cur_end = self._cur + self._cluster_size(old)
            return True
        return False

    def _maybe_queue(self, c: int) -> None:
        """Put cluster ``c`` on the free-cluster list if it is wholly free and not current."""
        if self._cluster_used[c] == 0 and not self._queued[c] and c != self._cur_cluster:
            self._free_clusters.append(c)
            self._queued[c] = 1

    def _take(self, slot: int) -> int:
        self._map[slot] = SWAP_HAS_CACHE
        self._cluster_used[slot // SWAPFILE_CLUSTER] += 1
        self.nr_free -= 1
        return slot

    def _release(self, slot: int) -> None:
        self.nr_free += 1
        c = slot // SWAPFILE_CLUSTER
        self._cluster_used[c] -= 1
        self._maybe_queue(c)

    def dup(self, slot: int) -> None:
        """``swap_duplicate``: one more swap pte points at ``slot``."""
        if self.pte_refs(slot) >= SWAP_MAP_MAX:
            raise RuntimeError(f"swap slot {slot} count overflow")
        self._map[slot] += 1

    def put_ref(self, slot: int) -> None:
        """``swap_free``: one swap pte fewer; free the slot when nothing references it."""
        if self.pte_refs(slot) == 0:
            raise RuntimeError(f"swap slot {slot} has no pte reference")
        self._map[slot] -= 1
        if self._map[slot] == 0:
            self._release(slot)

    def clear_cache(self, slot: int) -> None:
        """``swapcache_free``: the swap cache dropped its page; free the slot if unused."""
        if not self._map[slot] & SWAP_HAS_CACHE:
            raise RuntimeError(f"swap slot {slot} is not in the swap cache")
        self._map[slot] &= ~SWAP_HAS_CACHE
        if self._map[slot] == 0:
            self._release(slot)

    def set_cache(self, slot: int) -> None:
        """``swapcache_prepare``: a page for a swapped-out slot enters the swap cache."""
        if self._map[slot] & SWAP_HAS_CACHE or self.pte_refs(slot) == 0:
            raise RuntimeError(f"swap slot {slot} cannot enter the swap cache")
        self._map[slot] |= SWAP_HAS_CACHE


class SwapArea:
    """One active swap area: its slot map, its swap cache (slot -> page), and the state of
    swap readahead (``swapin_nr_pages``' statics, one set per machine)."""

    def __init__(self, nr_pages: int) -> None:
        self.map = SwapMap(nr_pages)
        self.cache: dict[int, Page] = {}
        self.ra_hits = 0  # swapin_readahead_hits: readahead pages faults found since last sized
        self._prev_offset = 0
        self._last_ra = 0  # last_readahead_pages

    def swapin_nr_pages(self, offset: int, page_cluster: int) -> int:
        """mm/swap_state.c swapin_nr_pages: the cluster readahead window for ``offset``,
        from the hits faults found since the last one (``swapin_readahead_hits``, taken
        and cleared), the previous offset (updated only without hits) and window."""
        max_pages = 1 << page_cluster
        if max_pages <= 1:
            return 1
        hits, self.ra_hits = self.ra_hits, 0
        pages = swapin_nr_pages(self._prev_offset, offset, hits, max_pages, self._last_ra)
        if not hits:
            self._prev_offset = offset
        self._last_ra = pages
        return pages

    def readahead_window(self, offset: int, page_cluster: int) -> range:
        """swapin_readahead: the aligned window of ``swapin_nr_pages`` slots around
        ``offset`` ("if (!start_offset) start_offset++": slot 0 is the swap header)."""
        mask = self.swapin_nr_pages(offset, page_cluster) - 1
        start = (offset & ~mask) or 1
        end = min(offset | mask, self.map.nr_pages - 1)
        return range(start, end + 1)

    def readahead_candidate(self, slot: int) -> bool:
        """__read_swap_cache_async would read ``slot``: a swap pte points at it and no page
        is in the swap cache for it (not even one being read)."""
        return slot not in self.cache and self.map.pte_refs(slot) > 0

    def add_to_swap(self, page: Page) -> bool:
        """mm/swap_state.c add_to_swap: allocate a slot and add ``page`` to the swap cache.

        Also ``set_page_dirty``: the page must be written before its frame can be reused.
        """
        try:
            slot = self.map.alloc()
        except SwapFull:
            return False
        self._insert(page, slot)
        page.dirty = True
        return True

    def add_to_swap_cache(self, page: Page, slot: int) -> None:
        """A page read back for swapped-out ``slot`` enters the swap cache (swap-in)."""
        self.map.set_cache(slot)
        self._insert(page, slot)

    def _insert(self, page: Page, slot: int) -> None:
        page.swapcache = True
        page.private = slot
        self.cache[slot] = page

    def delete_from_swap_cache(self, page: Page) -> None:
        """mm/swap_state.c delete_from_swap_cache: drop the page and its cache reference."""
        slot = page.private
        del self.cache[slot]
        page.swapcache = False
        page.private = 0
        self.map.clear_cache(slot)
