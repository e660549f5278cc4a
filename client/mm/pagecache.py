"""The page cache for read-only files on a local disk: clean pages reclaim can drop.

Christoph Lameter's case for recursive reclaim rests on memory being mostly clean file
pages ("recursive reclaim can reclaim 90% of memory before failing", reference §1): a clean
page cache page is freed without any I/O, so even an allocation that may not start I/O
(``GFP_NOIO``) can reclaim it.  The files here are read-only and live on a local disk that
is not the network swap device: a miss costs ``read_latency`` of the run's clock and no
memory beyond the page itself.

Rules (mm/filemap.c, mm/readahead.c, mm/swap.c, 4.x):
- ``generic_file_buffered_read``: ``find_get_page``; on a miss, ``page_cache_sync_readahead``
  reads a window of up to ``readahead`` missing pages (``__do_page_cache_readahead``: one
  ``__page_cache_alloc(mapping_gfp_mask)`` per page, then one read for the window);
- ``add_to_page_cache_lru``: a new page goes to the inactive file list;
- ``mark_page_accessed`` on every read: an inactive referenced page is activated, an
  unreferenced one becomes referenced (the two-touch promotion);
- reclaim frees a clean unmapped page cache page whatever its referenced bit
  (``page_check_references``: "Reclaim if clean, defer dirty pages to writeback") and
  ``__remove_mapping`` takes it out of the file's cache.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Protocol

import attrs
import trio

from client.mm.gfp import GFP_HIGHUSER_MOVABLE, gfp_t
from client.mm.page import PAGE_SIZE, Page

if TYPE_CHECKING:
    from client.mm.lru import Lru
    from client.mm.page import Frames
    from client.mm.vmstat import VmStat

FileContentFn = Callable[["CachedFile", int], bytes]
"""What page ``index`` of a file holds on disk."""


class PageAllocator(Protocol):
    """The page cache's view of the page allocator (``Allocator`` in client/mm/alloc.py):
    ``__page_cache_alloc`` and its undo.  The allocator imports struct page, which refers
    back to the page cache, so the page cache names only what it calls."""

    async def alloc_page(self, gfp: gfp_t) -> Page | None: ...

    def free_page(self, page: Page) -> None: ...


@attrs.define(eq=False)
class CachedFile:
    """One read-only file (``struct address_space``): its size and its cached pages."""

    name: str
    nr_pages: int
    cache: dict[int, Page] = attrs.field(factory=dict, repr=False)  # the page cache xarray
    ident: int = 0  # a number that names the file in its on-disk content


class PageCache:
    """Read path and eviction of the page cache of one machine."""

    def __init__(
        self,
        allocator: PageAllocator,
        lru: Lru,
        frames: Frames,
        stat: VmStat,
        *,
        read_latency: float = 0.0001,
        readahead: int = 32,
    ) -> None:
        if readahead < 1:
            raise ValueError("readahead must be >= 1 page")
        self.allocator = allocator
        self.lru = lru
        self.frames = frames
        self.stat = stat
        self.read_latency = read_latency
        self.readahead = readahead  # VM_READAHEAD_PAGES: 128 KiB
        self.nr_pages = 0  # NR_FILE_PAGES

    async def read(
        self, file: CachedFile, index: int, content_fn: FileContentFn
    ) -> memoryview | None:
        """The contents of page ``index`` of ``file`` (a view valid until the next
        scheduling point), reading it (and its readahead window) from disk on a miss.

        None when no page could be allocated (the caller's process was killed, or the
        allocation failed): the read returns an error to user space.
        """
        if not 0 <= index < file.nr_pages:
            raise IndexError(f"page {index} beyond {file.name} ({file.nr_pages} pages)")
        while True:
            page = file.cache.get(index)
            if page is not None:
                self.mark_page_accessed(page)
                return self.frames.view(page.pfn)
            if not await self._readahead(file, index, content_fn):
                return None

    def mark_page_accessed(self, page: Page) -> None:
        """mm/swap.c mark_page_accessed: inactive,referenced -> active; else referenced."""
        if not page.active and page.referenced and page.lru:
            self.lru.remove(page)
            page.active = True
            page.referenced = False
            self.lru.add(page)
            self.lru.reclaim_stat.update(file=True, rotated=True)  # __activate_page
            self.stat.pgactivate += 1
        elif not page.referenced:
            page.referenced = True

    async def _readahead(self, file: CachedFile, index: int, content_fn: FileContentFn) -> bool:
        """__do_page_cache_readahead: allocate the missing pages of the window, read them
        with one disk request, add them to the cache and the inactive file list."""
        end = min(file.nr_pages, index + self.readahead)
        window = [i for i in range(index, end) if i not in file.cache]
        pages: list[tuple[int, Page]] = []
        for i in window:
            page = await self.allocator.alloc_page(GFP_HIGHUSER_MOVABLE)
            if page is None:
                break  # readahead stops at the first failure; the page itself is retried
            pages.append((i, page))
        if not pages:
            return False
        await trio.sleep(self.read_latency)  # the local disk: time, not memory
        for i, page in pages:
            if i in file.cache:  # another reader brought it in meanwhile
                self.allocator.free_page(page)
                continue
            self.frames.fill(page.pfn, content_fn(file, i))
            page.file = file
            page.index = i
            file.cache[i] = page
            self.lru.add(page)  # add_to_page_cache_lru: inactive file list
            self.nr_pages += 1
            self.stat.pgpgin += PAGE_SIZE // 1024  # pgpgin counts KiB read
        return True

    def remove(self, page: Page) -> None:
        """__remove_mapping -> __delete_from_page_cache: the file no longer holds it."""
        file = page.file
        assert file is not None and file.cache.get(page.index) is page, page
        del file.cache[page.index]
        page.file = None
        self.nr_pages -= 1
