"""Page frames: the bytes of physical memory and the per-frame state (``struct page``)."""

from __future__ import annotations

import mmap
from typing import TYPE_CHECKING

import attrs

if TYPE_CHECKING:
    from client.mm.pagecache import CachedFile
    from client.mm.process import Process
    from client.mm.zone import Zone

PAGE_SHIFT = 12
PAGE_SIZE = 1 << PAGE_SHIFT
ZERO_PAGE = bytes(PAGE_SIZE)


@attrs.define(eq=False, repr=False)
class Page:
    """State of one frame (``struct page``); identity semantics, slotted, created lazily.

    ``mapping``/``index`` name the owner while the page is mapped (the kernel's anon_vma and
    ``page->index``); ``private`` holds the swap slot while ``swapcache`` is set (the kernel
    keeps the ``swp_entry_t`` there). ``file`` names the file of a page cache page (then
    ``index`` is its offset in pages). ``lru`` is ``PageLRU``: on an LRU list, not isolated.
    ``reserve`` is the opaque reserve an emergency (pfmemalloc) page was charged to.
    """

    pfn: int
    zone: Zone
    mapping: Process | None = None
    index: int = 0
    private: int = 0
    referenced: bool = False
    active: bool = False
    dirty: bool = False
    writeback: bool = False
    reclaim: bool = False  # PG_reclaim: rotate to the inactive tail when writeback ends
    swapcache: bool = False
    readahead: bool = False  # PG_readahead: read by swap readahead, no fault found it yet
    pfmemalloc: bool = False
    lru: bool = False
    slab: bool = False  # PG_slab: the page holds a slab (client/mm/slab.py)
    reserve: object | None = None
    file: CachedFile | None = None  # page cache page of this file (not PageSwapBacked)

    def reset(self) -> None:
        """Return to the state of a free frame (``free_pages_check`` expects it clean)."""
        self.mapping = None
        self.index = 0
        self.private = 0
        self.referenced = self.active = self.dirty = self.writeback = False
        self.reclaim = self.swapcache = self.readahead = self.pfmemalloc = self.lru = False
        self.slab = False
        self.reserve = None
        self.file = None

    def __repr__(self) -> str:
        names = ("referenced", "active", "dirty", "writeback", "reclaim", "swapcache",
                 "readahead", "pfmemalloc", "lru", "slab")  # fmt: skip
        flags = ",".join(n for n in names if getattr(self, n))
        owner = "" if self.mapping is None else f" owner={self.mapping.pid}:{self.index}"
        if self.file is not None:
            owner = f" file={self.file.name}:{self.index}"
        slot = f" slot={self.private}" if self.swapcache else ""
        return f"<Page {self.pfn} {self.zone.name}{owner}{slot} [{flags}]>"


@attrs.define(eq=False)
class Frames:
    """The contents of physical memory: one arena, a frame is a ``memoryview`` slice.

    The arena is an anonymous ``mmap`` rather than a ``bytearray``: it has the same buffer
    interface, but the host only backs the frames the model touches, so 4 GiB of modelled RAM
    costs nothing until used (``bytearray(n)`` would zero-fill, i.e. touch, all of it).
    """

    nr_pages: int = attrs.field(validator=attrs.validators.gt(0))
    _arena: mmap.mmap = attrs.field(init=False, repr=False)
    _view: memoryview = attrs.field(init=False, repr=False)

    def __attrs_post_init__(self) -> None:
        self._arena = mmap.mmap(-1, self.nr_pages * PAGE_SIZE)
        self._view = memoryview(self._arena)

    def view(self, pfn: int) -> memoryview:
        """A writable view of frame ``pfn`` (no copy)."""
        start = pfn << PAGE_SHIFT
        return self._view[start : start + PAGE_SIZE]

    def read(self, pfn: int) -> bytes:
        """A copy of frame ``pfn`` (comparisons on ``bytes`` are a single memcmp)."""
        start = pfn << PAGE_SHIFT
        return self._arena[start : start + PAGE_SIZE]

    def fill(self, pfn: int, data: bytes | memoryview) -> None:
        """Overwrite frame ``pfn`` with exactly ``PAGE_SIZE`` bytes."""
        start = pfn << PAGE_SHIFT
        self._view[start : start + PAGE_SIZE] = data
