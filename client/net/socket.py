"""Sockets as memory sees them: every byte sent or received costs modelled pages.

A ``ModelledSocket`` is a trio stream wrapped around a real one (TCP, or an in-memory pair in
outcome tests).  The bytes are real; the memory they need is charged to the client machine.

**TX** (``send_all``, in the sender's task, so with the sender's task flags — kswapd's
``PF_MEMALLOC`` for swap writes): data leaves in skbs of at most 64 KiB (TSO).  For each skb
the sender waits while the socket's unacknowledged bytes exceed ``sndbuf``
(``sk_stream_wait_memory``), allocates its pages with the socket's ``sk_allocation`` gfp,
then sends it.  The pages stay allocated until the skb is acknowledged.

**ACKs must be received.**  TCP ACKs are invisible from user space, so the model makes them:
an skb is due to be acknowledged ``latency`` seconds after it was sent, and that ACK is a
packet the receive side must take in like any other — it needs an skb allocation at device
level and passes the socket filter.  No RX memory, no ACK, no freed TX.

**RX** (a NIC task fills the ring; a softirq task per socket does the rest): bytes that
arrived wait in the NIC ring (device memory, not modelled) until ``latency`` has passed.  For
each packet (up to one page) the softirq task allocates an skb page at *device level*,
before the socket is known: the policy's ``rx_gfp`` (``GFP_ATOMIC``, plus ``__GFP_MEMALLOC``
while memalloc sockets exist) — it never sleeps.  Only then does it demux: an emergency
(pfmemalloc) page for a socket without ``SOCK_MEMALLOC`` is dropped at ``sk_filter`` (freed,
``PFMemallocDrop``).  A failed allocation or a drop leaves the packet in the ring and
retries after a back-off — the memory effect of a drop and a retransmit.  Data stays
charged until the consumer reads it; ``rcvbuf`` bounds what a socket may hold.

The drop rule is the kernel's and the same under every policy: a policy under which no RX
page is ever pfmemalloc simply never triggers it.
"""

from __future__ import annotations

import math
from collections import deque
from typing import TYPE_CHECKING, Any

import attrs
import trio

from client.mm import GFP, GFP_NOIO, PAGE_SIZE, Memory, Page
from client.mm.gfp import serving_softirq
from client.mm.waits import WaitFor

if TYPE_CHECKING:
    from client.net.stack import NetStack

SKB_MAX = 64 * 1024  # the largest TX skb (GSO/TSO): "max packet size is 64k"
RING_BYTES = 64 * 1024  # what the NIC holds for one socket before TCP's window closes
BACKOFF_MIN = 0.005  # retransmission back-off after a drop or a failed skb allocation
BACKOFF_MAX = 0.2


@attrs.frozen
class SkbDropped:
    """A received packet dropped before its socket took it (a fact for the log)."""

    event = "skb.dropped"
    sock: str
    reason: str  # "pfmemalloc" (sk_filter) or "no_memory" (skb allocation failed)
    what: str  # "data" or "ack"


@attrs.define
class SocketStats:
    tx_bytes: int = 0
    rx_bytes: int = 0
    tx_pages_peak: int = 0
    rx_pages_peak: int = 0
    acks: int = 0
    rx_alloc_fail: int = 0  # skb allocations that failed (packet dropped at the NIC)
    pfmemalloc_drop: int = 0  # netstat PFMemallocDrop: emergency skb for a normal socket
    emergency_rx: int = 0  # pfmemalloc skbs this socket accepted (SOCK_MEMALLOC only)
    tx_alloc_wait: int = 0


@attrs.define(eq=False)
class _TxSkb:
    size: int
    pages: list[Page]
    due: float  # when its ACK arrives at the NIC


class ModelledSocket(trio.abc.Stream):
    """A real stream whose buffers are charged to a modelled machine's memory."""

    def __init__(
        self,
        stack: NetStack,
        inner: trio.abc.Stream,
        name: str,
        *,
        sndbuf: int = 256 * 1024,
        rcvbuf: int = 256 * 1024,
        latency: float = 0.0,
        allocation: GFP = GFP_NOIO,
    ) -> None:
        self.stack = stack
        self.memory: Memory = stack.memory
        self.inner = inner
        self.name = name
        self.sndbuf = sndbuf
        self.rcvbuf = rcvbuf
        self.latency = latency
        self.allocation = allocation  # sk->sk_allocation
        self.memalloc = False  # SOCK_MEMALLOC
        self.tx_reserve: object | None = None  # the policy's reserve for this socket's TX
        self.stats = SocketStats()
        self._tx: deque[_TxSkb] = deque()  # sent, awaiting ACK, oldest first
        self._tx_bytes = 0
        self._tx_pages = 0
        self._rx: deque[tuple[bytearray, Page]] = deque()  # received, not yet consumed
        self._rx_bytes = 0
        self._rx_pages = 0
        self._ring: deque[tuple[float, bytearray]] = deque()  # (visible at, bytes): the NIC
        self._ring_bytes = 0
        self._softirq = trio.lowlevel.ParkingLot()  # packets or ACKs may be due
        self._ring_space = trio.lowlevel.ParkingLot()
        self._rx_ready = trio.lowlevel.ParkingLot()
        self._space = trio.lowlevel.ParkingLot()  # TX space (ACKs) and consumer reads
        self._rx_eof = False
        self._rx_error: BaseException | None = None
        self._closed = False
        self._send_lock = trio.Lock()
        self._nic_scope = trio.CancelScope()
        self._softirq_scope = trio.CancelScope()
        self.rx_task_name = f"{name}.rx"
        self.consumer_role = f"{name} consumer"

    # -- lifecycle ------------------------------------------------------------------------
    def start(self, nursery: trio.Nursery) -> None:
        nursery.start_soon(self._nic, name=f"{self.name}.nic")
        nursery.start_soon(self._softirq_loop, name=self.rx_task_name)

    @property
    def tx_pages(self) -> int:
        return self._tx_pages

    @property
    def rx_pages(self) -> int:
        return self._rx_pages

    def emergency_rx_held(self) -> int:
        """RX pages from the reserves this socket holds right now."""
        return sum(1 for _data, page in self._rx if page.pfmemalloc)

    async def aclose(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._nic_scope.cancel()
        self._softirq_scope.cancel()
        for skb in self._tx:
            for page in skb.pages:
                self.memory.free_page(page)
        self._tx.clear()
        self._tx_bytes = self._tx_pages = 0
        while self._rx:
            self.memory.free_page(self._rx.popleft()[1])
        self._rx_bytes = self._rx_pages = 0
        for lot in (self._rx_ready, self._space, self._softirq, self._ring_space):
            lot.unpark_all()
        self.stack.socket_closed(self)
        await trio.aclose_forcefully(self.inner)

    # -- TX -------------------------------------------------------------------------------
    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        view = memoryview(data)
        async with self._send_lock:
            for start in range(0, max(len(view), 1), SKB_MAX):
                await self._send_skb(view[start : start + SKB_MAX])

    async def _send_skb(self, seg: memoryview) -> None:
        size = len(seg)
        # sk_stream_wait_memory: wait for ACKs while the send buffer is full.
        while self._tx_bytes and self._tx_bytes + size > self.sndbuf:
            self._check_open()
            what = WaitFor("sndbuf", f"sock {self.name}", waker=self.rx_task_name)
            await self.memory.waits.park(self._space, what)
        pages: list[Page] = []
        try:
            for _ in range(max(1, math.ceil(size / PAGE_SIZE))):
                pages.append(await self._alloc_tx())
        except BaseException:
            for page in pages:
                self.memory.free_page(page)
            raise
        self._tx.append(_TxSkb(size, pages, trio.current_time() + self.latency))
        self._tx_bytes += size
        self._tx_pages += len(pages)
        self.stats.tx_pages_peak = max(self.stats.tx_pages_peak, self._tx_pages)
        self.stats.tx_bytes += size
        await self.inner.send_all(seg)
        self._softirq.unpark_all()  # an ACK is now expected

    async def _alloc_tx(self) -> Page:
        """One TX page with ``sk_allocation``; on failure wait for memory and retry
        (sock_sendmsg → sk_stream_wait_memory): never give up while the socket is open."""
        delay = BACKOFF_MIN
        while True:
            self._check_open()
            page = await self.memory.alloc_page(self.allocation, reserve=self.tx_reserve)
            if page is not None:
                return page
            self.stats.tx_alloc_wait += 1
            what = WaitFor("tx_buffer", f"sock {self.name}", waker="kswapd")
            with self.memory.waits.waiting(what):
                await trio.sleep(delay)
            delay = min(delay * 2, BACKOFF_MAX)

    def _acknowledge(self, now: float) -> None:
        """A received ACK covers every skb whose ACK was due by now (cumulative)."""
        freed = False
        while self._tx and self._tx[0].due <= now:
            skb = self._tx.popleft()
            for page in skb.pages:
                self.memory.free_page(page)
            self._tx_bytes -= skb.size
            self._tx_pages -= len(skb.pages)
            freed = True
        if freed:
            self.stats.acks += 1
            self._space.unpark_all()

    async def wait_send_all_might_not_block(self) -> None:
        await self.inner.wait_send_all_might_not_block()

    async def send_eof(self) -> None:
        if isinstance(self.inner, trio.abc.HalfCloseableStream):
            await self.inner.send_eof()

    # -- RX: the consumer -----------------------------------------------------------------
    async def receive_some(self, max_bytes: int | None = None) -> bytes:
        """The consumer takes received data; its pages are freed as it does."""
        while not self._rx:
            if self._rx_error is not None:
                raise trio.BrokenResourceError(str(self._rx_error)) from self._rx_error
            if self._rx_eof or self._closed:
                return b""
            what = WaitFor("rx_data", f"sock {self.name}", waker=self.rx_task_name)
            await self.memory.waits.park(self._rx_ready, what)
        out = bytearray()
        limit = max_bytes or math.inf
        while self._rx and len(out) < limit:
            data, page = self._rx[0]
            take = int(min(len(data), limit - len(out)))
            out += data[:take]
            if take == len(data):
                self._rx.popleft()
                self.memory.free_page(page)
                self._rx_pages -= 1
            else:
                del data[:take]
            self._rx_bytes -= take
        self._space.unpark_all()  # room under rcvbuf again
        await trio.lowlevel.checkpoint()
        return bytes(out)

    # -- RX: the NIC and the softirq ------------------------------------------------------
    async def _nic(self) -> None:
        """Bytes arrive from the real stream into the ring (no modelled memory yet)."""
        with self._nic_scope:
            try:
                while True:
                    while self._ring_bytes >= RING_BYTES:
                        await self._ring_space.park()
                    chunk = await self.inner.receive_some(RING_BYTES - self._ring_bytes)
                    if not chunk:
                        self._rx_eof = True
                        self._softirq.unpark_all()
                        return
                    self._ring.append((trio.current_time() + self.latency, bytearray(chunk)))
                    self._ring_bytes += len(chunk)
                    self._softirq.unpark_all()
            except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
                self._rx_error = exc
                self._softirq.unpark_all()
                self._rx_ready.unpark_all()

    async def _softirq_loop(self) -> None:
        delay = BACKOFF_MIN
        with self._softirq_scope:
            while True:
                now = trio.current_time()
                ack_due = bool(self._tx) and self._tx[0].due <= now
                packet = bool(self._ring) and self._ring[0][0] <= now
                if not ack_due and not packet:
                    if (self._rx_eof or self._rx_error) and not self._ring:
                        self._rx_ready.unpark_all()
                        return
                    await self._wait_for_packets(now)
                    continue
                if packet and not ack_due and self._rx_bytes >= self.rcvbuf:
                    # sk_rcvbuf: the receive window is closed until the consumer reads.
                    what = WaitFor("rcvbuf", f"sock {self.name}", waker=self.consumer_role)
                    ack_in = self._tx[0].due - now if self._tx else math.inf
                    await self.memory.waits.park(self._space, what, max(ack_in, 0.0))
                    continue
                what_kind = "ack" if ack_due else "data"
                page = await self._alloc_skb()
                if page is not None and page.pfmemalloc and not self.memalloc:
                    # sk_filter: "if (skb_pfmemalloc(skb) && !sock_flag(sk, SOCK_MEMALLOC))
                    # return -ENOMEM" — LINUX_MIB_PFMEMALLOCDROP.
                    self.memory.free_page(page)
                    self.stats.pfmemalloc_drop += 1
                    self.stack.observe(SkbDropped(self.name, "pfmemalloc", what_kind))
                    page = None
                elif page is None:
                    self.stats.rx_alloc_fail += 1
                    self.stack.observe(SkbDropped(self.name, "no_memory", what_kind))
                if page is None:
                    # Dropped: the packet stays in the ring, the peer retransmits.
                    what = WaitFor("rx_buffer", f"sock {self.name}", waker="kswapd")
                    with self.memory.waits.waiting(what):
                        await trio.sleep(delay)
                    delay = min(delay * 2, BACKOFF_MAX)
                    continue
                delay = BACKOFF_MIN
                if page.pfmemalloc:
                    self.stats.emergency_rx += 1
                if ack_due:
                    self.memory.free_page(page)  # a pure ACK is consumed by the stack at once
                    self._acknowledge(now)
                    continue
                self._take_packet(page)
                self._acknowledge(now)  # data segments carry ACKs too

    async def _wait_for_packets(self, now: float) -> None:
        """Sleep until a packet arrives or the next one (or ACK) becomes due."""
        due = [
            t
            for t in (
                self._tx[0].due if self._tx else None,
                self._ring[0][0] if self._ring else None,
            )
            if t is not None
        ]
        timeout = max(0.0, min(due) - now) if due else math.inf
        what = WaitFor("packet", f"sock {self.name}", waker="peer")
        await self.memory.waits.park(self._softirq, what, timeout)

    def _take_packet(self, page: Page) -> None:
        _visible, buf = self._ring[0]
        n = min(len(buf), PAGE_SIZE)
        data = buf[:n]
        if n == len(buf):
            self._ring.popleft()
        else:
            del buf[:n]
        self._ring_bytes -= n
        self._ring_space.unpark_all()
        self._rx.append((data, page))
        self._rx_bytes += n
        self._rx_pages += 1
        self.stats.rx_pages_peak = max(self.stats.rx_pages_peak, self._rx_pages)
        self.stats.rx_bytes += n
        self._rx_ready.unpark_all()

    async def _alloc_skb(self) -> Page | None:
        """``__netdev_alloc_skb``: device-level gfp, softirq context, never sleeps."""
        gfp = self.stack.rx_gfp() & ~GFP.DIRECT_RECLAIM  # a policy must not make RX sleep
        with serving_softirq():
            return await self.memory.alloc_page(gfp, reserve=self.stack.rx_reserve())

    def _check_open(self) -> None:
        if self._closed:
            raise trio.ClosedResourceError(f"socket {self.name} is closed")
        if self._rx_error is not None:
            raise trio.BrokenResourceError(str(self._rx_error))

    def snapshot(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "memalloc": self.memalloc,
            "tx_pages": self._tx_pages,
            "rx_pages": self._rx_pages,
            "emergency_rx_held": self.emergency_rx_held(),
            **attrs.asdict(self.stats),
        }
