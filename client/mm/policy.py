"""The allocator's decision points a reserve policy can hook (DESIGN.md §4.3).

The policies themselves (none, recursive, reserve, pfmemalloc) live in ``client/policy``;
the model only calls these hooks, never looks at a policy's name. A hook called for an
allocation whose gfp lacks ``__GFP_DIRECT_RECLAIM`` must not block.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Protocol

from client.mm.gfp import gfp_t

if TYPE_CHECKING:
    from client.mm.memory import Memory


class PolicyHooks(Protocol):
    """Hooks at the page allocator's and reclaim's decision points."""

    def attach(self, memory: Memory) -> None:
        """Called once by ``Memory.set_policy`` before any other hook."""
        ...

    def extra_min_pages(self) -> int:
        """Pages added to ``pages_min`` before watermarks are shared out (a reserve's size).

        Read by ``Memory.setup_watermarks()``; call that again when the answer changes.
        """
        ...

    async def charge_emergency(self, gfp: gfp_t, reserve: object | None) -> bool:
        """An allocation entitled to ALLOC_NO_WATERMARKS is about to dip below min.

        Return False to refuse (the allocation goes on as if it had no reserve access);
        True once charged (may wait first, if ``gfp`` may sleep). ``reserve`` is what the
        caller passed to ``alloc_page`` (e.g. the socket's reserve), None for plain
        PF_MEMALLOC work.
        """
        ...

    def uncharge_emergency(self, reserve: object | None) -> None:
        """Undo one ``charge_emergency``: the charged page was freed (after it was back on
        the free list), or the charged allocation was served above min or not at all."""
        ...

    async def memalloc_failed(self, gfp: gfp_t) -> bool:
        """A PF_MEMALLOC allocation found nothing, even below min. Return True to retry
        (e.g. after reclaiming clean pages without I/O), False to fail it."""
        ...

    async def throttle_direct_reclaim(self, gfp: gfp_t) -> bool:
        """Called before each direct reclaim (``throttle_direct_reclaim`` site); may wait.

        True: a fatal signal is pending after the wait, so the caller skips this reclaim
        and counts it as progress (``try_to_free_pages`` returns 1).
        """
        ...

    def kswapd_pass(self) -> None:
        """kswapd finished a reclaim pass (wake throttled tasks here if they may go on)."""
        ...

    def prepare_kswapd_sleep(self) -> None:
        """kswapd is about to sleep (``prepare_kswapd_sleep``): wake every throttled task."""
        ...


class NullPolicy:
    """No reserve accounting at all: the hooks change nothing."""

    def attach(self, memory: Memory) -> None:
        pass

    def extra_min_pages(self) -> int:
        return 0

    async def charge_emergency(self, gfp: gfp_t, reserve: object | None) -> bool:
        return True

    def uncharge_emergency(self, reserve: object | None) -> None:
        pass

    async def memalloc_failed(self, gfp: gfp_t) -> bool:
        return False

    async def throttle_direct_reclaim(self, gfp: gfp_t) -> bool:
        return False

    def kswapd_pass(self) -> None:
        pass

    def prepare_kswapd_sleep(self) -> None:
        pass
