"""Sockets as memory sees them: every byte sent or received costs modelled pages.

A ``ModelledSocket`` is a trio stream wrapped around a real one (TCP, or an in-memory pair in
outcome tests).  The bytes are real; the memory they need is charged to the client machine.

**TX** (``send_all``, in the sender's task, so with the sender's task flags — kswapd's
``PF_MEMALLOC`` for swap writes): data leaves in skbs of at most 64 KiB (TSO).  For each skb
the sender waits while the socket's unacknowledged bytes exceed ``sndbuf``
(``sk_stream_wait_memory``), allocates its pages with the socket's ``sk_allocation`` gfp,
then queues it for transmission.  The pages stay allocated until the skb is acknowledged.
As ``tcp_sendmsg`` returns once the data is in skbs, ``send_all`` returns once the skbs are
queued: the socket's transmit task (``.xmit``, the device queue) hands everything queued to
the real stream in one write (what TSO/GSO and autocorking do), so a burst of requests from
many tasks costs one write, not one write and one scheduling round each.  A sender waits
while more than ``XMIT_QUEUE_MAX`` bytes are queued (the real stream's back-pressure); a
failed real write breaks the socket for both directions, as an error on a TCP socket does.

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
XMIT_QUEUE_MAX = 1024 * 1024  # queued for the real stream beyond this: the sender waits
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
        # The socket lock (lock_sock) of send_all: a FIFO mutex that, unlike trio.Lock,
        # costs no scheduling round when it is free (handed over to the next waiter).
        self._send_busy = False
        self._send_waiters = trio.lowlevel.ParkingLot()
        # Queued for the real stream (skbs allocated, bytes not yet written): the device.
        self._xmit: deque[bytes | memoryview] = deque()
        self._xmit_bytes = 0  # queued + being written
        self._xmit_busy = False  # a write to the real stream is in progress
        self._xmit_wake = trio.lowlevel.ParkingLot()
        self._xmit_drained = trio.lowlevel.ParkingLot()
        self._tx_error: BaseException | None = None
        self._nic_scope = trio.CancelScope()
        self._softirq_scope = trio.CancelScope()
        self._xmit_scope = trio.CancelScope()
        self.rx_task_name = f"{name}.rx"
        self.consumer_role = f"{name} consumer"
        # What this socket's tasks wait for (constant: built once, not per wait).
        resource = f"sock {name}"
        self._wait_sndbuf = WaitFor("sndbuf", resource, waker=self.rx_task_name)
        self._wait_tx_buffer = WaitFor("tx_buffer", resource, waker="kswapd")
        self._wait_rx_data = WaitFor("rx_data", resource, waker=self.rx_task_name)
        self._wait_rcvbuf = WaitFor("rcvbuf", resource, waker=self.consumer_role)
        self._wait_rx_buffer = WaitFor("rx_buffer", resource, waker="kswapd")
        self._wait_packet = WaitFor("packet", resource, waker="peer")
        # rx_gfp() -> the same without __GFP_DIRECT_RECLAIM (IntFlag operators are slow)
        self._rx_gfp_masked: dict[GFP, GFP] = {}

    # -- lifecycle ------------------------------------------------------------------------
    def start(self, nursery: trio.Nursery) -> None:
        nursery.start_soon(self._nic, name=f"{self.name}.nic")
        nursery.start_soon(self._softirq_loop, name=self.rx_task_name)
        nursery.start_soon(self._xmit_loop, name=f"{self.name}.xmit")

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
        try:
            await self._flush()  # close() sends what was queued before the FIN
        finally:
            self._xmit_scope.cancel()
            self._xmit.clear()
            await trio.aclose_forcefully(self.inner)

    # -- TX -------------------------------------------------------------------------------
    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        view = memoryview(data)
        if self._send_busy:
            await self._send_waiters.park()  # the holder hands the lock over
        else:
            self._send_busy = True
        try:
            size = len(view)
            if size <= SKB_MAX:
                await self._send_skb(view)
            else:
                for start in range(0, size, SKB_MAX):
                    await self._send_skb(view[start : start + SKB_MAX])
        finally:
            if self._send_waiters:
                self._send_waiters.unpark()
            else:
                self._send_busy = False

    async def _send_skb(self, seg: memoryview) -> None:
        size = len(seg)
        # sk_stream_wait_memory: wait for ACKs while the send buffer is full.
        while self._tx_bytes and self._tx_bytes + size > self.sndbuf:
            self._check_open()
            await self.memory.waits.park(self._space, self._wait_sndbuf)
        pages: list[Page] = []
        try:
            for _ in range(max(1, -(-size // PAGE_SIZE))):
                pages.append(await self._alloc_tx())
        except BaseException:
            for page in pages:
                self.memory.free_page(page)
            raise
        self._tx.append(_TxSkb(size, pages, trio.current_time() + self.latency))
        self._tx_bytes += size
        self._tx_pages += len(pages)
        stats = self.stats
        if self._tx_pages > stats.tx_pages_peak:
            stats.tx_pages_peak = self._tx_pages
        stats.tx_bytes += size
        if size:
            # The skb owns a copy of the data unless the caller's buffer is immutable.
            self._xmit.append(seg if type(seg.obj) is bytes else bytes(seg))
            self._xmit_bytes += size
            if not self._xmit_busy:
                self._xmit_wake.unpark()
        self._softirq.unpark_all()  # an ACK is now expected
        while self._xmit_bytes > XMIT_QUEUE_MAX and self._tx_error is None:
            await self._xmit_drained.park()  # the real stream's back-pressure
        if self._tx_error is not None:
            raise trio.BrokenResourceError(str(self._tx_error)) from self._tx_error

    async def _xmit_loop(self) -> None:
        """The device: write everything queued to the real stream, in one write."""
        with self._xmit_scope:
            while True:
                while not self._xmit:
                    await self._xmit_wake.park()
                if self._xmit_busy:  # aclose is flushing: leave it to it
                    await self._xmit_drained.park()
                    continue
                if not await self._write(self._take_xmit()):
                    return

    def _take_xmit(self) -> bytes | memoryview:
        xmit = self._xmit
        if len(xmit) == 1:
            return xmit.popleft()
        chunk = b"".join(xmit)
        xmit.clear()
        return chunk

    def _tx_failed(self, exc: BaseException) -> None:
        """A write to the real stream failed: the connection is broken both ways (sk_err)."""
        self._tx_error = exc
        self._xmit.clear()
        self._xmit_bytes = 0
        if self._rx_error is None:
            self._rx_error = exc
        for lot in (self._xmit_drained, self._space, self._softirq, self._rx_ready):
            lot.unpark_all()

    async def _flush(self) -> None:
        """Write what is still queued (a close or send_eof), unless the stream is broken."""
        while self._xmit_busy and self._tx_error is None:
            await self._xmit_drained.park()
        if self._xmit and self._tx_error is None:
            await self._write(self._take_xmit())

    async def _write(self, chunk: bytes | memoryview) -> bool:
        """One write to the real stream; False if it broke (the socket is then broken)."""
        self._xmit_busy = True
        try:
            await self.inner.send_all(chunk)
        except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
            self._tx_failed(exc)  # forgets every queued byte
        finally:
            self._xmit_busy = False
            if self._tx_error is None:
                self._xmit_bytes -= len(chunk)
            self._xmit_drained.unpark_all()
        return self._tx_error is None

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
            with self.memory.waits.waiting(self._wait_tx_buffer):
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
            await self._flush()
            await self.inner.send_eof()

    # -- RX: the consumer -----------------------------------------------------------------
    async def receive_some(self, max_bytes: int | None = None) -> bytes:
        """The consumer takes received data; its pages are freed as it does."""
        rx = self._rx
        while not rx:
            if self._rx_error is not None:
                raise trio.BrokenResourceError(str(self._rx_error)) from self._rx_error
            if self._rx_eof or self._closed:
                return b""
            await self._park(self._rx_ready, self._wait_rx_data)
        limit = max_bytes or math.inf
        data, page = rx[0]
        if len(data) == limit or (len(rx) == 1 and len(data) < limit):
            # Exactly one whole packet: the usual case.
            rx.popleft()
            self.memory.free_page(page)
            self._rx_pages -= 1
            self._rx_bytes -= len(data)
            self._space.unpark_all()  # room under rcvbuf again
            return bytes(data)
        out = bytearray()
        while rx and len(out) < limit:
            data, page = rx[0]
            take = int(min(len(data), limit - len(out)))
            out += data[:take]
            if take == len(data):
                rx.popleft()
                self.memory.free_page(page)
                self._rx_pages -= 1
            else:
                del data[:take]
            self._rx_bytes -= take
        self._space.unpark_all()  # room under rcvbuf again
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
        """The softirq: ACKs and packets, in softirq context (``serving_softirq``) for its
        whole life, so that every skb it allocates is a softirq allocation."""
        delay = BACKOFF_MIN
        with self._softirq_scope, serving_softirq():
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
                    ack_in = self._tx[0].due - now if self._tx else math.inf
                    await self._park(self._space, self._wait_rcvbuf, max(ack_in, 0.0))
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
                    with self.memory.waits.waiting(self._wait_rx_buffer):
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
        due = self._tx[0].due if self._tx else math.inf
        if self._ring and self._ring[0][0] < due:
            due = self._ring[0][0]
        await self._park(self._softirq, self._wait_packet, max(0.0, due - now))

    async def _park(
        self, lot: trio.lowlevel.ParkingLot, what: WaitFor, timeout: float = math.inf
    ) -> None:
        """``memory.waits.park``, without a cancel scope when there is no timeout."""
        if timeout == math.inf:
            with self.memory.waits.waiting(what):
                await lot.park()
        else:
            await self.memory.waits.park(lot, what, timeout)

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
        stats = self.stats
        if self._rx_pages > stats.rx_pages_peak:
            stats.rx_pages_peak = self._rx_pages
        stats.rx_bytes += n
        self._rx_ready.unpark_all()

    async def _alloc_skb(self) -> Page | None:
        """``__netdev_alloc_skb``: device-level gfp, softirq context (the caller's: the
        softirq task), never sleeps."""
        stack = self.stack
        policy_gfp = stack.rx_gfp()
        gfp = self._rx_gfp_masked.get(policy_gfp)
        if gfp is None:  # a policy must not make RX sleep
            gfp = self._rx_gfp_masked[policy_gfp] = policy_gfp & ~GFP.DIRECT_RECLAIM
        return await self.memory.alloc_page(gfp, reserve=stack.rx_reserve())

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
