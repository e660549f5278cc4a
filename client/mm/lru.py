"""The LRU lists: active and inactive, anon and file; O(1) add, remove, rotate and isolate.

Each list is an ``OrderedDict`` used as an ordered set (C-level linked list, so taking from
either end is O(1)). Iteration order is scan order: the first entry is the kernel's list
*tail*, the next page reclaim looks at; ``add`` puts a page at the kernel's *head* (our end).
A page goes on the file lists when it is a page cache page (``page.file`` set: the kernel's
``!PageSwapBacked``), on the anon lists otherwise (``page_lru()``).
"""

from __future__ import annotations

from collections import OrderedDict

from client.mm.page import PAGE_SHIFT, Page
from client.mm.zone import int_sqrt


def inactive_ratio(total_pages: int) -> int:
    """Target active:inactive ratio for one LRU type with ``total_pages`` on it.

    mm/vmscan.c inactive_list_is_low (4.10+, anon and file alike): ``gb = pages >> (30 -
    PAGE_SHIFT)``; ``inactive_ratio = gb ? int_sqrt(10 * gb) : 1`` (1 GB -> 3, 10 GB -> 10).
    """
    gb = total_pages >> (30 - PAGE_SHIFT)
    return int_sqrt(10 * gb) if gb else 1


class ReclaimStat:
    """``struct zone_reclaim_stat``: pages scanned and rotated (found in use and kept) per
    LRU type, index 0 anon and 1 file, as get_scan_count weighs them."""

    __slots__ = ("recent_rotated", "recent_scanned")

    def __init__(self) -> None:
        self.recent_scanned = [0, 0]
        self.recent_rotated = [0, 0]

    def update(self, file: bool, rotated: bool) -> None:
        """mm/swap.c update_page_reclaim_stat (activate_page and putback call it)."""
        self.recent_scanned[file] += 1
        if rotated:
            self.recent_rotated[file] += 1

    def age(self, nr_anon: int, nr_file: int) -> None:
        """get_scan_count: "if (unlikely(reclaim_stat->recent_scanned[0] > anon / 4))"
        halve both figures of that type, so old behaviour fades."""
        for i, size in ((0, nr_anon), (1, nr_file)):
            if self.recent_scanned[i] > size // 4:
                self.recent_scanned[i] //= 2
                self.recent_rotated[i] //= 2


class Lru:
    """The node's LRU lists (4.8+ LRUs are per node; the model has one node)."""

    __slots__ = ("_active", "_active_file", "_inactive", "_inactive_file", "reclaim_stat")

    def __init__(self) -> None:
        self.reclaim_stat = ReclaimStat()
        self._active: OrderedDict[Page, None] = OrderedDict()
        self._inactive: OrderedDict[Page, None] = OrderedDict()
        self._active_file: OrderedDict[Page, None] = OrderedDict()
        self._inactive_file: OrderedDict[Page, None] = OrderedDict()

    def _list(self, page: Page) -> OrderedDict[Page, None]:
        if page.file is None:
            return self._active if page.active else self._inactive
        return self._active_file if page.active else self._inactive_file

    @property
    def nr_active(self) -> int:
        return len(self._active)

    @property
    def nr_inactive(self) -> int:
        return len(self._inactive)

    @property
    def nr_active_file(self) -> int:
        return len(self._active_file)

    @property
    def nr_inactive_file(self) -> int:
        return len(self._inactive_file)

    @property
    def nr_anon(self) -> int:
        return len(self._active) + len(self._inactive)

    @property
    def nr_file(self) -> int:
        return len(self._active_file) + len(self._inactive_file)

    def __len__(self) -> int:
        return self.nr_anon + self.nr_file

    def __contains__(self, page: Page) -> bool:
        return page in self._list(page)

    def add(self, page: Page) -> None:
        """``lru_cache_add``: to the head of the list ``page.active`` and ``page.file`` select."""
        self._list(page)[page] = None
        page.lru = True

    def remove(self, page: Page) -> None:
        """``del_page_from_lru_list``."""
        del self._list(page)[page]
        page.lru = False

    def isolate(self, nr: int, *, active: bool, file: bool = False) -> list[Page]:
        """``isolate_lru_pages``: take up to ``nr`` pages from the tail of a list."""
        if file:
            lst = self._active_file if active else self._inactive_file
        else:
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
            self._list(page).move_to_end(page, last=False)

    def inactive_is_low(self, *, file: bool = False) -> bool:
        """mm/vmscan.c inactive_list_is_low: ``inactive * inactive_ratio < active``."""
        if file:
            inactive, active = len(self._inactive_file), len(self._active_file)
        else:
            inactive, active = len(self._inactive), len(self._active)
        return inactive * inactive_ratio(inactive + active) < active

    def pages(self, *, active: bool, file: bool = False) -> list[Page]:
        """A snapshot of one list in scan order (tests and reports)."""
        if file:
            return list(self._active_file if active else self._inactive_file)
        return list(self._active if active else self._inactive)
