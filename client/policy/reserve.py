"""``reserve``: Peter Zijlstra's memory reserves for swap over network (2006-2009, SLES 11).

A tree of ``mem_reserve`` nodes (``mm/reserve.c``)::

    total reserve
    ├── network reserve
    │   ├── network TX reserve ── one node per memalloc socket (TX_RESERVE_PAGES = 32)
    │   └── network RX reserve ── SKB data reserve (a limit, "only added once")
    └── block reserve

* The root's pages are added to min (``adjust_memalloc_reserve`` → ``var_free_kbytes``), so
  growing the reserve raises every ordinary allocator's watermark.
* Bean counting happens only on the slow path: ``kmalloc_reserve`` first tries a normal
  allocation, and only an allocation that dips below min (``ALLOC_NO_WATERMARKS``) charges
  its node.  ``__mem_reserve_charge`` succeeds iff ``usage + charge <= limit``; at the limit a
  caller that may sleep waits on the node's wait queue, one that may not fails.
* ``kfree_reserve`` frees first, then uncharges and wakes the waiters.
* RX allocations use the reserve only while memalloc sockets exist (``rx_emergency_get``);
  an emergency skb for a socket without ``SOCK_MEMALLOC`` is dropped at ``sk_filter``.
"""

from __future__ import annotations

import math
from typing import Any

import attrs
import trio

from client.mm import GFP, GFP_ATOMIC, GFP_NOIO
from client.mm.waits import WaitFor
from client.net.socket import ModelledSocket
from client.net.stack import SWAP
from client.policy.base import Policy, ReserveChargeFailed
from testbed.config import ReserveConfig


@attrs.define(eq=False)
class MemReserve:
    """``struct mem_reserve``: pages and limit propagate up; usage is charged on one node."""

    name: str
    pages: int = 0
    limit: int = 0  # pages that may be charged at once (the kernel counts bytes)
    usage: int = 0
    peak: int = 0
    charge_failed: int = 0
    waits: int = 0
    waker: str = "kswapd"  # who uncharges: the role the watchdog follows
    parent: MemReserve | None = None
    children: list[MemReserve] = attrs.field(factory=list)
    lot: trio.lowlevel.ParkingLot = attrs.field(factory=trio.lowlevel.ParkingLot)

    def connect(self, child: MemReserve) -> None:
        """``mem_reserve_connect``: the child's pages and limit count in every ancestor."""
        child.parent = self
        self.children.append(child)
        node: MemReserve | None = self
        while node is not None:
            node.pages += child.pages
            node.limit += child.limit
            node = node.parent

    def disconnect(self, child: MemReserve) -> None:
        self.children.remove(child)
        child.parent = None
        node: MemReserve | None = self
        while node is not None:
            node.pages -= child.pages
            node.limit -= child.limit
            node = node.parent

    def charge(self, n: int = 1) -> bool:
        """``__mem_reserve_charge``: "succeeds iff charge < 0 || usage + charge < limit"
        (bytes there; in pages the last page up to the limit fits)."""
        if self.usage + n > self.limit:
            self.charge_failed += 1
            return False
        self.usage += n
        self.peak = max(self.peak, self.usage)
        return True

    def uncharge(self, n: int = 1) -> None:
        self.usage = max(0, self.usage - n)  # "usage is clamped at >= 0"
        self.lot.unpark_all()  # wake_up_all(&res->waitqueue)

    def rows(self, depth: int = 0) -> list[dict[str, Any]]:
        """The ``/proc/reserve_info`` table, depth-first."""
        row = {
            "reserve": "  " * depth + self.name,
            "pages": self.pages,
            "limit": self.limit,
            "usage": self.usage,
            "peak": self.peak,
            "charge_failed": self.charge_failed,
        }
        out = [row]
        for child in self.children:
            out.extend(child.rows(depth + 1))
        return out


class ReservePolicyZ(Policy):
    name = "reserve"
    models = "Zijlstra 2007: mem_reserve tree, bean counting once in the reserve, drop at demux"

    def __init__(self, config: ReserveConfig | None = None) -> None:
        super().__init__()
        self.config = config or ReserveConfig()
        self.root = MemReserve("total reserve")
        self.network = MemReserve("network reserve")
        self.tx = MemReserve("network TX reserve")
        self.rx = MemReserve("network RX reserve")
        self.skb = MemReserve(
            "SKB data reserve",
            pages=self.config.rx_pages,
            limit=self.config.rx_pages,
            waker="socket consumers",
        )
        self.block = MemReserve(
            "block reserve", pages=self.config.block_pages, limit=self.config.block_pages
        )
        self._sockets: dict[str, MemReserve] = {}
        self._closed: list[MemReserve] = []  # reserves of sockets closed during the run
        self._in_use = 0  # pages charged anywhere in the tree now
        self._peak = 0  # the most charged at one moment
        self.root.connect(self.block)
        self.network.connect(self.tx)
        self.network.connect(self.rx)
        self._rx_connected = False

    def extra_min_pages(self) -> int:
        return self.root.pages

    def _resize(self) -> None:
        if self.memory is not None:
            self.memory.setup_watermarks()

    # -- bean counting --------------------------------------------------------------------
    async def charge_emergency(self, gfp: GFP, reserve: object | None) -> bool:
        if not isinstance(reserve, MemReserve):
            return True  # the VM's own PF_MEMALLOC work is not bean counted
        first = True
        while not reserve.charge(1):
            may_wait = bool(gfp & GFP.DIRECT_RECLAIM)
            assert self.memory is not None
            if first:
                self.memory.observer(
                    ReserveChargeFailed(reserve.name, reserve.usage, reserve.limit, may_wait)
                )
                first = False
            if not may_wait:
                return False  # "return NULL when !__GFP_WAIT"
            reserve.waits += 1
            what = WaitFor("reserve", reserve.name, waker=reserve.waker)
            # wait_event(res->waitqueue, charge succeeds)
            await self.memory.waits.park(reserve.lot, what, math.inf)
        self._in_use += 1
        self._peak = max(self._peak, self._in_use)
        return True

    def uncharge_emergency(self, reserve: object | None) -> None:
        if isinstance(reserve, MemReserve):
            reserve.uncharge(1)
            self._in_use -= 1

    # -- the network ----------------------------------------------------------------------
    def socket_created(self, sock: ModelledSocket, kind: str) -> None:
        if kind != SWAP:
            sock.allocation = GFP_NOIO
            return
        # sk_set_memalloc: SOCK_MEMALLOC and sk_allocation |= __GFP_MEMALLOC; then
        # sk_adjust_memalloc: a TX reserve for this socket, and the network subtree joins
        # the root when the first memalloc socket appears ("the RX reserve is a limit, and
        # only added once, not for each socket").
        sock.memalloc = True
        sock.allocation = GFP_NOIO | GFP.MEMALLOC
        node = MemReserve(
            f"{sock.name} TX",
            pages=self.config.tx_pages,
            limit=self.config.tx_pages,
            waker=sock.rx_task_name,
        )
        self.tx.connect(node)
        self._sockets[sock.name] = node
        sock.tx_reserve = node
        if not self._rx_connected:
            self.rx.connect(self.skb)
            self.root.connect(self.network)
            self._rx_connected = True
        self._resize()

    def socket_closed(self, sock: ModelledSocket) -> None:
        node = self._sockets.pop(sock.name, None)
        if node is not None:
            self.tx.disconnect(node)
            self._closed.append(node)
            self._resize()

    def rx_gfp(self, memalloc_socks: int) -> GFP:
        # RX skbs may come from the reserve only while memalloc sockets exist.
        return GFP_ATOMIC | GFP.MEMALLOC if memalloc_socks else GFP_ATOMIC

    def rx_reserve(self) -> object | None:
        return self.skb

    def report(self) -> dict[str, Any]:
        """The ``/proc/reserve_info`` table (closed sockets' reserves after it, marked) and
        the most pages charged at one moment."""
        closed = [{**row, "reserve": f"{row['reserve']} (closed)"} for n in self._closed
                  for row in n.rows()]  # fmt: skip
        return {"reserve_info": self.root.rows() + closed, "reserve_peak": self._peak}

    def reserve_in_use(self) -> int:
        return self._in_use

    def peak(self) -> int:
        return self._peak
