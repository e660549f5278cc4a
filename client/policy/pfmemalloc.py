"""``pfmemalloc``: Mel Gorman's swap over NBD, merged for Linux 3.6 (commits of 31 Jul 2012).

"Uses throttling instead of dynamically resized memory reserves": no tree, no bean counting;
the min watermark itself is the reserve, "the responsibility of the admin to adjust
min_free_kbytes" (``sk_set_memalloc`` kernel-doc).

* ``sk_set_memalloc`` on the swap socket: ``SOCK_MEMALLOC``, ``sk_allocation |=
  __GFP_MEMALLOC`` (nbd: ``GFP_NOIO | __GFP_MEMALLOC``).
* ``__alloc_skb``: "if (sk_memalloc_socks() && (flags & SKB_ALLOC_RX)) gfp_mask |=
  __GFP_MEMALLOC" — any RX skb may come from the reserve while a memalloc socket exists;
  pages taken below min are pfmemalloc and are dropped at ``sk_filter`` unless the socket
  has SOCK_MEMALLOC (``PFMemallocDrop``).
* ``throttle_direct_reclaim`` (commit 5515061d22f0): at the start of direct reclaim, if
  ``allow_direct_reclaim`` fails — free pages at most half of the summed min watermarks —
  wake kswapd and wait on ``pfmemalloc_wait``; kernel threads are never throttled; a caller
  without ``__GFP_FS`` waits at most HZ.  kswapd wakes the throttled when the check passes
  and before it sleeps.  Later fixes: a task with a fatal signal pending (an OOM victim)
  is not throttled and a kill ends the wait (Sep 2012); the check passes once kswapd has
  given up on the node, ``kswapd_failures >= MAX_RECLAIM_RETRIES`` (2017).
"""

from __future__ import annotations

import math
from typing import Any

import trio

from client.mm import GFP, GFP_ATOMIC, GFP_NOIO, MAX_RECLAIM_RETRIES, PF
from client.mm.gfp import current_task_flags, gfp_t
from client.mm.process import fatal_signal_pending, killable
from client.mm.waits import WaitFor, WaitQueue
from client.net.socket import ModelledSocket
from client.net.stack import SWAP
from client.policy.base import Policy, ReclaimThrottled

HZ_SECONDS = 1.0


class PfmemallocPolicy(Policy):
    name = "pfmemalloc"
    models = "Gorman, Linux 3.6: __GFP_MEMALLOC sockets, pfmemalloc drops, reclaim throttling"

    def __init__(self, *, throttle: bool = True) -> None:
        super().__init__()
        self.throttle = throttle
        self._pfmemalloc_wait = WaitQueue()
        self.throttled = 0
        self.throttle_wakeups = 0

    # -- throttling -----------------------------------------------------------------------
    def allow_direct_reclaim(self) -> bool:
        """mm/vmscan.c allow_direct_reclaim (pfmemalloc_watermark_ok before 2017): the free
        pages of the node's zones against half their summed min watermarks."""
        assert self.memory is not None
        # allow_direct_reclaim: "if (pgdat->kswapd_failures >= MAX_RECLAIM_RETRIES) return
        # true" (Shakeel Butt, "mm: fix condition for throttle_direct_reclaim", 2017): kswapd
        # has given up on the node and sleeps, so nobody would wake the throttled.
        if self.memory.reclaimer.kswapd_failures >= MAX_RECLAIM_RETRIES:
            return True
        reserve = sum(z.watermarks.min for z in self.memory.zones)
        free = sum(z.nr_free for z in self.memory.zones)
        return free > reserve // 2

    async def throttle_direct_reclaim(self, gfp: gfp_t) -> bool:
        """mm/vmscan.c throttle_direct_reclaim. True if a fatal signal is pending after the
        wait (the caller then skips reclaim, "so the OOM killer is not triggered")."""
        if not self.throttle:
            return False
        flags = current_task_flags()
        if flags & (PF.KTHREAD | PF.KSWAPD):  # "Kernel threads should not be throttled"
            return False
        # throttle_direct_reclaim (Mel Gorman, Sep 2012): "If a fatal signal is pending, this
        # process should not throttle. It should return quickly so it can exit and free its
        # memory" -- an OOM victim looping in the throttle would "effectively deadlock".
        if fatal_signal_pending():
            return False
        if self.allow_direct_reclaim():
            return False
        assert self.memory is not None
        self.memory.stat.pgscan_direct_throttle += 1
        self.throttled += 1
        self._wake_kswapd()
        what = WaitFor("pfmemalloc_wait", self.memory.zones[0].name, waker="kswapd")
        # "If the caller cannot enter the filesystem ... throttle for at most HZ";
        # everyone else waits (killably) until kswapd wakes them.
        # wait_event_interruptible_timeout(..., HZ) bounds the whole wait, not each sleep.
        timeout = HZ_SECONDS if not gfp & GFP.FS else math.inf
        self.memory.observer(
            ReclaimThrottled(
                self.memory.nr_free_pages,
                sum(z.watermarks.min for z in self.memory.zones) // 2,
                None if math.isinf(timeout) else timeout,
            )
        )
        # wait_event_killable / wait_event_interruptible_timeout: SIGKILL ends either wait.
        with killable():
            await self._wait_until_allowed(what, timeout)
        # "if (fatal_signal_pending(current)) return true;"
        return fatal_signal_pending()

    async def _wait_until_allowed(self, what: WaitFor, timeout: float) -> None:
        """Sleep on pfmemalloc_wait until allow_direct_reclaim passes or ``timeout`` ends."""
        assert self.memory is not None
        deadline = trio.current_time() + timeout
        while True:
            remaining = deadline - trio.current_time()
            if remaining <= 0 or not await self.memory.waits.park(
                self._pfmemalloc_wait, what, remaining
            ):
                return
            if self.allow_direct_reclaim():
                return
            # Woken too early (kswapd going to sleep, prepare_kswapd_sleep): "processes will
            # wake kswapd and get throttled again" -- the wait_event condition,
            # allow_direct_reclaim, wakes kswapd_wait whenever it fails.
            self._wake_kswapd()

    def _wake_kswapd(self) -> None:
        """allow_direct_reclaim: "kswapd must be awake if processes are being throttled"."""
        assert self.memory is not None
        for zone in self.memory.zones:
            self.memory.reclaimer.wakeup_kswapd(zone)

    def kswapd_pass(self) -> None:
        # balance_pgdat: "if (waitqueue_active(&pgdat->pfmemalloc_wait) &&
        # allow_direct_reclaim(pgdat)) wake_up_all(&pgdat->pfmemalloc_wait)"
        if self.allow_direct_reclaim() and self._pfmemalloc_wait:
            self.throttle_wakeups += 1
            self._pfmemalloc_wait.unpark_all()

    def prepare_kswapd_sleep(self) -> None:
        # prepare_kswapd_sleep: "if (waitqueue_active(&pgdat->pfmemalloc_wait))
        # wake_up_all(&pgdat->pfmemalloc_wait)" -- whether or not the check passes.
        if self._pfmemalloc_wait:
            self._pfmemalloc_wait.unpark_all()

    # -- the network ----------------------------------------------------------------------
    def socket_created(self, sock: ModelledSocket, kind: str) -> None:
        if kind == SWAP:
            sock.memalloc = True  # sk_set_memalloc
            sock.allocation = GFP_NOIO | GFP.MEMALLOC
        else:
            sock.allocation = GFP_NOIO

    def rx_gfp(self, memalloc_socks: int) -> gfp_t:
        return GFP_ATOMIC | GFP.MEMALLOC if memalloc_socks else GFP_ATOMIC

    def report(self) -> dict[str, Any]:
        return {"throttled": self.throttled, "throttle_wakeups": self.throttle_wakeups}
