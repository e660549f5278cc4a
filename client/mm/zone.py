"""Zones, their free lists and watermarks, and the watermark check.

The watermark rules are pure functions of numbers so that they can be tested line by line
against the kernel's (reference/kernel-mm.md §3); ``Zone`` only holds the state.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import attrs

from client.mm.gfp import (
    ALLOC_HARDER,
    ALLOC_HIGH,
    ALLOC_NO_WATERMARKS,
    ALLOC_OOM,
    ALLOC_WMARK_MASK,
)
from client.mm.page import PAGE_SHIFT, Page

# mm/page_alloc.c calculate_min_free_kbytes: clamp (6.x upper bound; 4.x used 65536).
MIN_FREE_KBYTES_FLOOR = 128
MIN_FREE_KBYTES_CEILING = 262144


def int_sqrt(x: int) -> int:
    """``int_sqrt()`` (lib/int_sqrt.c): floor of the square root."""
    return math.isqrt(x)


def default_min_free_kbytes(lowmem_kbytes: int) -> int:
    """``min_free_kbytes`` the kernel picks at boot for ``lowmem_kbytes`` of low memory.

    mm/page_alloc.c calculate_min_free_kbytes: ``int_sqrt(lowmem_kbytes * 16)`` clamped to
    [128, 262144] (6.x; 4.x clamped at 65536, which the same examples never reach).
    """
    kbytes = int_sqrt(lowmem_kbytes * 16)
    return max(MIN_FREE_KBYTES_FLOOR, min(kbytes, MIN_FREE_KBYTES_CEILING))


def _validate_order(instance: Watermarks, _attribute: object, high: int) -> None:
    if not 0 <= instance.min <= instance.low <= high:
        raise ValueError(f"watermarks must satisfy 0 <= min <= low <= high: {instance!r}")


@attrs.frozen
class Watermarks:
    """A zone's ``watermark[WMARK_MIN..WMARK_HIGH]``, in pages."""

    min: int
    low: int
    high: int = attrs.field(validator=_validate_order)

    def mark(self, alloc_flags: int) -> int:
        """The watermark ``alloc_flags & ALLOC_WMARK_MASK`` selects (mm/internal.h)."""
        return (self.min, self.low, self.high)[alloc_flags & ALLOC_WMARK_MASK]


def mult_frac(x: int, numer: int, denom: int) -> int:
    """``mult_frac()`` (include/linux/kernel.h): ``x * numer / denom`` without overflow."""
    quot, rem = divmod(x, denom)
    return quot * numer + rem * numer // denom


def calculate_watermarks(
    managed_pages: Sequence[int],
    min_free_kbytes: int,
    watermark_scale_factor: int = 10,
    extra_min_pages: int = 0,
) -> list[Watermarks]:
    """Per-zone watermarks for zones of ``managed_pages`` (all lowmem, no highmem).

    mm/page_alloc.c __setup_per_zone_wmarks (4.6+): ``min = pages_min * managed /
    lowmem_pages``; ``gap = max(min/4, mult_frac(managed, watermark_scale_factor, 10000))``;
    ``low = min + gap``; ``high = min + 2*gap``. ``extra_min_pages`` is added to ``pages_min``
    before it is shared out, as Zijlstra's ``var_free_kbytes`` was added to
    ``min_free_kbytes`` (reference §1, ``adjust_memalloc_reserve``): that is how a reserve
    raises every ordinary allocator's watermark.
    """
    pages_min = (min_free_kbytes >> (PAGE_SHIFT - 10)) + extra_min_pages
    lowmem_pages = sum(managed_pages)
    result = []
    for managed in managed_pages:
        wmin = pages_min * managed // lowmem_pages if lowmem_pages else 0
        gap = max(wmin >> 2, mult_frac(managed, watermark_scale_factor, 10000))
        result.append(Watermarks(min=wmin, low=wmin + gap, high=wmin + 2 * gap))
    return result


def zone_watermark_ok(
    free_pages: int, mark: int, alloc_flags: int, lowmem_reserve: int = 0
) -> bool:
    """May an order-0 allocation with ``alloc_flags`` take a page from a zone?

    mm/page_alloc.c __zone_watermark_ok (4.16-6.2), order 0, no highatomic/CMA pages:
    ALLOC_HIGH gives ``min -= min/2``; then, for ``alloc_harder = alloc_flags &
    (ALLOC_HARDER|ALLOC_OOM)``, ALLOC_OOM ``min -= min/2`` ("OOM victims can try even harder
    than normal ALLOC_HARDER users") or else ALLOC_HARDER ``min -= min/4`` (so GFP_ATOMIC
    reaches 3/8 of min, an OOM victim's GFP_KERNEL 1/2); fail if ``free <= min +
    lowmem_reserve``. ALLOC_NO_WATERMARKS skips the check (get_page_from_freelist: ``goto
    try_this_zone``), down to an empty free list.
    """
    if alloc_flags & ALLOC_NO_WATERMARKS:
        return True
    wmin = mark
    if alloc_flags & ALLOC_HIGH:  # __zone_watermark_ok: ALLOC_HIGH halves min
        wmin -= wmin // 2
    if alloc_flags & ALLOC_OOM:
        # __zone_watermark_ok (4.16-6.2): "if (alloc_flags & ALLOC_OOM) min -= min / 2"
        wmin -= wmin // 2
    elif alloc_flags & ALLOC_HARDER:  # __zone_watermark_ok: "else min -= min / 4"
        wmin -= wmin // 4
    return free_pages > wmin + lowmem_reserve


# on_setattr NO_OP: validators run at construction only; otherwise attrs generates a
# validating __setattr__ that runs on every nr_free update of the allocator's fast path.
@attrs.define(eq=False, on_setattr=attrs.setters.NO_OP)
class Zone:
    """One zone: a contiguous range of frames, its free list and its watermarks.

    The free list is a stack of freed pages plus a cursor over frames never handed out yet,
    so ``Page`` objects are created on first allocation and the cost per frame stays flat
    (nothing per frame is built for memory the model never touches). ``nr_free`` and
    ``watermarks`` are read directly by the allocator's fast path; only ``take``/``give``
    change ``nr_free``.
    """

    name: str
    start_pfn: int
    nr_pages: int = attrs.field(validator=attrs.validators.ge(0))
    watermarks: Watermarks = attrs.field(factory=lambda: Watermarks(0, 0, 0))
    lowmem_reserve: int = 0
    nr_free: int = attrs.field(init=False)
    _free: list[Page] = attrs.field(init=False, factory=list, repr=False)
    _next_pfn: int = attrs.field(init=False, repr=False)

    def __attrs_post_init__(self) -> None:
        self.nr_free = self.nr_pages
        self._next_pfn = self.start_pfn

    @property
    def managed(self) -> int:
        """``zone->managed_pages`` (the model reserves nothing at boot: all of them)."""
        return self.nr_pages

    @property
    def end_pfn(self) -> int:
        return self.start_pfn + self.nr_pages

    def watermark_ok(self, alloc_flags: int) -> bool:
        """``zone_watermark_ok(zone, 0, mark, ...)`` against this zone's current numbers."""
        mark = self.watermarks.mark(alloc_flags)
        return zone_watermark_ok(self.nr_free, mark, alloc_flags, self.lowmem_reserve)

    def take(self) -> Page:
        """Remove one page from the free list (``rmqueue``); the caller checked watermarks."""
        free = self._free
        if free:
            page = free.pop()
        elif self._next_pfn < self.start_pfn + self.nr_pages:
            page = Page(self._next_pfn, self)
            self._next_pfn += 1
        else:
            raise RuntimeError(f"zone {self.name} has no free page")
        self.nr_free -= 1
        return page

    def give(self, page: Page) -> None:
        """Put a clean page back on the free list (``__free_one_page``)."""
        self._free.append(page)
        self.nr_free += 1


def setup_watermarks(
    zones: Sequence[Zone],
    min_free_kbytes: int,
    watermark_scale_factor: int = 10,
    extra_min_pages: int = 0,
) -> None:
    """Set every zone's watermarks (``setup_per_zone_wmarks``); see ``calculate_watermarks``."""
    marks = calculate_watermarks(
        [z.managed for z in zones], min_free_kbytes, watermark_scale_factor, extra_min_pages
    )
    for zone, wm in zip(zones, marks, strict=True):
        zone.watermarks = wm
