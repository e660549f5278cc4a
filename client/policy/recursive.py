"""``recursive``: Christoph Lameter's recursive reclaim (RFC, 14 Aug 2007).

"When the reserves are exhausted in the writeout path, reclaim recursively but only drop
clean pages" (lkml:20070814142103.204771292@sgi.com).  When a ``PF_MEMALLOC`` allocation
finds nothing even below min, this policy runs reclaim again from inside it, with a gfp
without ``__GFP_IO`` so that no swap I/O can start (shrink_page_list: ``if (!(sc->gfp_mask &
__GFP_IO)) goto keep_locked``), frees what is clean, and retries.  Anonymous memory under
swap-out leaves it little that is clean; his argument rests on dirty limits keeping most
memory clean, which holds for file pages (``configs/clean-pages.toml``).

The hook fires for every allocation of a ``PF_MEMALLOC`` task that fails, ``__GFP_NOMEMALLOC``
ones included (kswapd's bio mempool refills): in 2.6.23's ``__alloc_pages`` both reach the
same ``goto nopage`` from the ``PF_MEMALLOC`` branch, which is where the recursion hooks in.
"""

from __future__ import annotations

from typing import Any

from client.mm import GFP_NOIO, SWAP_CLUSTER_MAX, gfp_t
from client.policy.base import Policy


class RecursivePolicy(Policy):
    name = "recursive"
    models = "Lameter 2007: on PF_MEMALLOC failure, reclaim clean pages (no I/O) and retry"

    def __init__(self) -> None:
        super().__init__()
        self.recursions = 0
        self.recursive_freed = 0
        self.recursive_failed = 0

    async def memalloc_failed(self, gfp: gfp_t) -> bool:
        assert self.memory is not None
        self.recursions += 1
        sc = await self.memory.reclaimer.shrink(GFP_NOIO, SWAP_CLUSTER_MAX)
        self.recursive_freed += sc.nr_reclaimed
        if sc.nr_reclaimed == 0:
            self.recursive_failed += 1
            return False
        return True

    def report(self) -> dict[str, Any]:
        return {
            "recursive_reclaims": self.recursions,
            "recursive_freed": self.recursive_freed,
            "recursive_failed": self.recursive_failed,
        }
