"""``reserve``: Peter Zijlstra's memory reserves for swap over network (2006-2009, SLES 11).

A tree of ``mem_reserve`` nodes (``mm/reserve.c``; ``netvm: network reserve infrastructure``,
lkml 20071030160913.811204000@chello.nl, the same in the 2008 postings up to -v20)::

    total reserve
    ├── block reserve            (ours: see below)
    └── network reserve          ("total network reserve")
        ├── network TX reserve ── protocol TX pages (TX_RESERVE_PAGES = 32 per memalloc socket)
        └── network RX reserve ── SKB data reserve (a limit, "only added once")

As posted:

* The root's pages are added to min (``__mem_reserve_add`` → ``adjust_memalloc_reserve``),
  so growing the reserve raises every ordinary allocator's watermark.
* **TX is bounded, not bean-counted.**  ``sk_adjust_memalloc(socks, tx_reserve_pages)`` adds
  the socket's TX pages to "protocol TX pages" (``mem_reserve_pages_add``: pages and limit
  up the tree, so min rises), and its kernel-doc says "@tx_reserve_pages is an upper-bound
  of memory used for TX hence we need not account the pages like we do for RX pages".  No
  TX allocation charges that node: ``sk_set_memalloc`` sets ``sk_allocation |=
  __GFP_MEMALLOC`` and TX skbs are plain ``alloc_skb(sk_allocation)`` — only ``__alloc_skb``
  with ``SKB_ALLOC_RX`` takes the emergency path.  So a swap socket's TX below min is served
  from the reserve without a limit, and its sender never waits on a reserve.
* **RX is bean-counted** on the SKB data reserve, and only on the slow path: ``__alloc_skb``
  first tries with ``__GFP_NOMEMALLOC`` and, if that fails while memalloc sockets exist,
  ``rx_emergency_get`` (``mem_reserve_kmalloc_charge(&net_skb_reserve, ...)``) must succeed
  before the emergency allocation; ``__mem_reserve_charge`` succeeds iff ``usage + charge <
  limit``.  RX runs in softirq and cannot wait: at the limit the packet is dropped (TCP
  retransmits).  ``kfree_reserve``/``rx_emergency_put`` free first, then uncharge and wake.
* An emergency skb for a socket without ``SOCK_MEMALLOC`` is dropped at ``sk_filter``
  ("netvm: filter emergency skbs"; client/net/socket.py applies it for every policy).

Ours, not his:

* ``[reserve] tx_accounting = "bean-counted"`` gives each memalloc socket its own TX node
  with a limit of ``tx_pages``; a TX allocation below min charges it and a sender that may
  sleep waits at the limit (``kmalloc_reserve``'s wait, applied to TX).  The series never
  did this; it is kept as a named variant to show what that rule would do.
* The "block reserve" node only raises min by ``block_pages``: the posted tree has no such
  node (the seed mail's "the block layer reserves B pages" are the block layer's mempools,
  which the model has as the bio mempool), and nothing charges it.
* The network subtree stays connected after the last memalloc socket closes (the series
  disconnects it, ``sk_adjust_memalloc`` with ``!nr_socks``): the swap device reconnects,
  as sunrpc's ``xs_swapper`` keeps "one extra sock reference so the reserve won't dip when
  the socket gets reconnected".
"""

from __future__ import annotations

import math
from typing import Any

import attrs

from client.config import ReserveConfig
from client.mm import GFP, GFP_ATOMIC, GFP_NOIO, gfp_t
from client.mm.waits import WaitFor, WaitQueue
from client.net.socket import ModelledSocket
from client.net.stack import SWAP
from client.policy.base import Policy, ReserveChargeFailed

#: ``[reserve] tx_accounting``: Zijlstra's rule, and our variant (see the module docstring).
TX_POSTED = "posted"
TX_BEAN_COUNTED = "bean-counted"


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
    lot: WaitQueue = attrs.field(factory=WaitQueue)

    def add(self, pages: int, limit: int) -> None:
        """``__calc_reserve``: pages and limit change here and in every ancestor."""
        node: MemReserve | None = self
        while node is not None:
            node.pages += pages
            node.limit += limit
            node = node.parent

    def connect(self, child: MemReserve) -> None:
        """``mem_reserve_connect``: the child's pages and limit count in every ancestor."""
        child.parent = self
        self.children.append(child)
        self.add(child.pages, child.limit)

    def disconnect(self, child: MemReserve) -> None:
        """``mem_reserve_disconnect``: the reverse."""
        self.children.remove(child)
        child.parent = None
        self.add(-child.pages, -child.limit)

    def charge(self, n: int = 1) -> bool:
        """``__mem_reserve_charge``: "if (charge < 0 || res->usage + charge < res->limit)"
        — strictly below the limit, so a node of limit L holds at most L-1 charges (the
        kernel counts bytes; the model's unit is one page)."""
        if self.usage + n >= self.limit:
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


class MemReservePolicy(Policy):
    name = "reserve"
    models = "Zijlstra 2007-09: mem_reserve tree raising min, RX bean-counted, drop at demux"

    def __init__(self, config: ReserveConfig | None = None) -> None:
        super().__init__()
        self.config = config or ReserveConfig()
        self.root = MemReserve("total reserve")
        self.network = MemReserve("network reserve")
        self.tx = MemReserve("network TX reserve")
        # sk_init: mem_reserve_init(&net_tx_pages, "protocol TX pages", &net_tx_reserve).
        self.tx_pages = MemReserve("protocol TX pages")
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
        self.bean_counted_tx = self.config.tx_accounting == TX_BEAN_COUNTED
        self._sockets: dict[str, MemReserve] = {}  # bean-counted: each socket's TX node
        self._posted: set[str] = set()  # posted: sockets whose TX pages are in the tree
        self._closed: list[MemReserve] = []  # reserves of sockets closed during the run
        self._in_use = 0  # pages charged anywhere in the tree now
        self._peak = 0  # the most charged at one moment
        self.root.connect(self.block)
        self.network.connect(self.tx)
        self.tx.connect(self.tx_pages)
        self.network.connect(self.rx)
        self._rx_connected = False

    def extra_min_pages(self) -> int:
        return self.root.pages

    def _resize(self) -> None:
        if self.memory is not None:
            self.memory.setup_watermarks()

    # -- bean counting --------------------------------------------------------------------
    async def charge_emergency(self, gfp: gfp_t, reserve: object | None) -> bool:
        if not isinstance(reserve, MemReserve):
            # Only callers that name a reserve are bean counted (kmalloc_reserve's "if
            # (res && ...)"): the VM's own PF_MEMALLOC work, and TX as posted, are not.
            return True
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
        # sk_set_memalloc: "sock_set_flag(sk, SOCK_MEMALLOC); sk->sk_allocation |=
        # __GFP_MEMALLOC" (nbd's sk_allocation is GFP_NOIO, set at NBD_SET_SOCK in his
        # "nbd: deadlock prevention for NBD", Aug 2006).
        sock.memalloc = True
        sock.allocation = GFP_NOIO | GFP.MEMALLOC
        if self.bean_counted_tx:
            # Ours, not the series': a TX node per socket, charged and waited on.
            node = MemReserve(
                f"{sock.name} TX",
                pages=self.config.tx_pages,
                limit=self.config.tx_pages,
                waker=sock.rx_task_name,
            )
            self.tx.connect(node)
            self._sockets[sock.name] = node
            sock.tx_reserve = node
        else:
            # sk_adjust_memalloc: "mem_reserve_pages_add(&net_tx_pages, tx_reserve_pages)"
            # raises min by the TX bound; "we need not account the pages like we do for RX
            # pages", so sock.tx_reserve stays None: TX below min is never charged.
            self.tx_pages.add(self.config.tx_pages, self.config.tx_pages)
            self._posted.add(sock.name)
        # sk_adjust_memalloc: "if (!nr_socks && socks > 0) mem_reserve_connect(&net_reserve,
        # &mem_reserve_root)" -- "the RX reserve is a limit, and only added once".
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
        elif sock.name in self._posted:
            # sk_clear_memalloc / xs_swapper(0): sk_adjust_memalloc(-1, -tx_reserve_pages).
            self._posted.discard(sock.name)
            self.tx_pages.add(-self.config.tx_pages, -self.config.tx_pages)
            self._resize()

    def rx_gfp(self, memalloc_socks: int) -> gfp_t:
        # __alloc_skb: "Attempt emergency allocation when RX skb" only if sk_memalloc_socks().
        return GFP_ATOMIC | GFP.MEMALLOC if memalloc_socks else GFP_ATOMIC

    def rx_reserve(self) -> object | None:
        # rx_emergency_get(bytes) = mem_reserve_kmalloc_charge(&net_skb_reserve, bytes).
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
