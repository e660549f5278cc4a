"""The anonymous LRU lists: active and inactive, O(1) add, remove, rotate and isolate.

Each list is an ``OrderedDict`` used as an ordered set (C-level linked list, so taking from
either end is O(1)). Iteration order is scan order: the first entry is the kernel's list
*tail*, the next page reclaim looks at; ``add`` puts a page at the kernel's *head* (our end).
"""

from __future__ import annotations

from collections import OrderedDict

from client.mm.page import PAGE_SHIFT, Page
from client.mm.zone import int_sqrt


def inactive_ratio(total_pages: int) -> int:
    """Target active:inactive ratio for anon pages of ``total_pages`` on the LRU.

    mm/vmscan.c inactive_list_is_low (4.10+): ``gb = pages >> (30 - PAGE_SHIFT)``;
    ``inactive_ratio = gb ? int_sqrt(10 * gb) : 1`` (1 GB -> 3, 10 GB -> 10).
    """
    gb = total_pages >> (30 - PAGE_SHIFT)
    return int_sqrt(10 * gb) if gb else 1


class Lru:
    """The node's anon LRU (4.8+ LRUs are per node; the model has one node)."""

    __slots__ = ("_active", "_inactive")

    def __init__(self) -> None:
        self._active: OrderedDict[Page, None] = OrderedDict()
        self._inactive: OrderedDict[Page, None] = OrderedDict()

    @property
    def nr_active(self) -> int:
        return len(self._active)

    @property
    def nr_inactive(self) -> int:
        return len(self._inactive)

    def __len__(self) -> int:
        return len(self._active) + len(self._inactive)

    def __contains__(self, page: Page) -> bool:
        return page in self._active or page in self._inactive

    def add(self, page: Page) -> None:
        """``lru_cache_add``: to the head of the list ``page.active`` selects."""
        (self._active if page.active else self._inactive)[page] = None
        page.lru = True

    def remove(self, page: Page) -> None:
        """``del_page_from_lru_list``."""
        del (self._active if page.active else self._inactive)[page]
        page.lru = False

    def isolate(self, nr: int, *, active: bool) -> list[Page]:
        """``isolate_lru_pages``: take up to ``nr`` pages from the tail of a list."""
        lst = self._active if active else self._inactive
        taken = []
        for _ in range(min(nr, len(lst))):
            page, _none = lst.popitem(last=False)
            page.lru = False
            taken.append(page)
        return taken

    def rotate_to_tail(self, page: Page) -> None:
        """``rotate_reclaimable_page``: an inactive page goes to the tail, to be freed next.

        mm/swap.c: only if the page is on the LRU, not active and not dirty.
        """
        if page.lru and not page.active and not page.dirty:
            self._inactive.move_to_end(page, last=False)

    def inactive_is_low(self) -> bool:
        """mm/vmscan.c inactive_list_is_low: ``inactive * inactive_ratio < active``."""
        inactive, active = len(self._inactive), len(self._active)
        return inactive * inactive_ratio(inactive + active) < active

    def pages(self, *, active: bool) -> list[Page]:
        """A snapshot of one list in scan order (tests and reports)."""
        return list(self._active if active else self._inactive)
