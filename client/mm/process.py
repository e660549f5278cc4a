"""A workload process as memory sees it: an address space of anonymous pages."""

from __future__ import annotations

import attrs

from client.mm.page import Page


@attrs.define(eq=False)
class Process:
    """An ``mm_struct`` reduced to its anonymous page table.

    A virtual page is either present (``present[vpage]`` is its ``Page``), swapped out
    (``swapped[vpage]`` is its swap slot: a swap pte), or never touched.
    """

    pid: int
    name: str
    present: dict[int, Page] = attrs.field(factory=dict, repr=False)
    swapped: dict[int, int] = attrs.field(factory=dict, repr=False)
    killed: bool = False
    #: vm_area_struct.swap_readahead_info of its one mapping (VMA swap readahead):
    #: (last faulting page, window, readahead hits), None until the first swap-in.
    swap_ra: tuple[int, int, int] | None = attrs.field(default=None, repr=False)

    @property
    def rss(self) -> int:
        """``get_mm_rss()``: resident anonymous pages."""
        return len(self.present)

    @property
    def swapents(self) -> int:
        """``MM_SWAPENTS``: pages swapped out."""
        return len(self.swapped)

    def oom_badness(self) -> int:
        """mm/oom_kill.c oom_badness (4.x), without page tables and oom_score_adj."""
        return self.rss + self.swapents
