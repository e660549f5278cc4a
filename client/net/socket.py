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
an skb is due to be acknowledged once the link has carried it and ``latency`` has passed
(``NetDevice.tx_acked``), and that ACK is a packet the device must receive like any other —
into a posted ring buffer — and that passes the socket filter.  No RX buffer, no ACK, no
freed TX.

**RX** (``client/net/device.py``): bytes the peer sent travel on the wire (not modelled
memory) until the link has carried them and ``latency`` has passed; at most
``WINDOW_BYTES`` are in flight (the peer's window).  The device's softirq receives each
packet (one MSS of data, or an ACK) into a buffer from its ring — posted before anyone knew
which socket the packet was for — and hands it to the socket: an emergency (pfmemalloc)
buffer for a socket without ``SOCK_MEMALLOC`` is dropped at ``sk_filter`` (freed,
``PFMemallocDrop``) and the peer retransmits after a back-off.  Data keeps its buffer until
the consumer reads it; while ``rcvbuf`` bytes wait, the window is closed and the peer sends
no more data.

The drop rule is the kernel's and the same under every policy: a policy under which no RX
page is ever pfmemalloc simply never triggers it.
"""

from __future__ import annotations

import math
from collections import deque
from typing import TYPE_CHECKING, Any

import attrs
import trio

from client.mm import GFP_NOIO, PAGE_SIZE, Memory, Page, gfp_t
from client.mm.waits import WaitFor, WaitQueue, sleep
from client.net.device import BACKOFF_MAX, BACKOFF_MIN, RxBuffer

if TYPE_CHECKING:
    from client.net.stack import NetStack

SKB_MAX = 64 * 1024  # the largest TX skb (GSO/TSO): "max packet size is 64k"
XMIT_QUEUE_MAX = 1024 * 1024  # queued for the real stream beyond this: the sender waits
WINDOW_BYTES = 64 * 1024  # in flight toward us: what the peer sends before TCP's window closes
# build_skb: skb->truesize = SKB_TRUESIZE(frag_size) less the shared info already in the frag:
# the buffer plus SKB_DATA_ALIGN(sizeof(struct sk_buff)) (232 bytes in 6.1, aligned to 256).
SKB_HEAD_TRUESIZE = 256


@attrs.frozen
class SkbDropped:
    """A received packet dropped before its socket took it (a fact for the log)."""

    event = "skb.dropped"
    sock: str
    reason: str  # "pfmemalloc" (sk_filter)
    what: str  # "data" or "ack"


@attrs.define
class SocketStats:
    tx_bytes: int = 0
    rx_bytes: int = 0
    tx_pages_peak: int = 0
    rx_bufs_peak: int = 0
    acks: int = 0
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
        allocation: gfp_t = GFP_NOIO,
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
        self._rx: deque[tuple[bytearray, RxBuffer]] = deque()  # received, not yet consumed
        self._rx_bytes = 0
        self._rx_bufs = 0
        # sk_rmem_alloc is _rx_bufs * _truesize: what the held skbs cost, against rcvbuf
        self._truesize = stack.device.settings.rx_buffer + SKB_HEAD_TRUESIZE
        self._wire: deque[tuple[float, bytearray]] = deque()  # (at the NIC at, bytes)
        self._wire_bytes = 0
        self._wire_space = WaitQueue()
        self._retry_at = 0.0  # after a drop, the peer retransmits no earlier than this
        self._retry_delay = BACKOFF_MIN
        self._rx_ready = WaitQueue()
        self._space = WaitQueue()  # TX space (ACKs) and consumer reads
        self._rx_eof = False
        self._rx_error: BaseException | None = None
        self._closed = False
        # The socket lock (lock_sock) of send_all: a FIFO mutex that, unlike trio.Lock,
        # costs no scheduling round when it is free (handed over to the next waiter).
        self._send_busy = False
        self._send_waiters = WaitQueue()
        # Queued for the real stream (skbs allocated, bytes not yet written): the device.
        self._xmit: deque[bytes | memoryview] = deque()
        self._xmit_bytes = 0  # queued + being written
        self._xmit_busy = False  # a write to the real stream is in progress
        self._xmit_wake = WaitQueue()
        self._xmit_drained = WaitQueue()
        self._tx_error: BaseException | None = None
        self._nic_scope = trio.CancelScope()
        self._xmit_scope = trio.CancelScope()
        self.rx_task_name = stack.device.napi_task_name  # who receives for this socket
        self.consumer_role = f"{name} consumer"
        # What this socket's tasks wait for (constant: built once, not per wait).
        resource = f"sock {name}"
        self._wait_sndbuf = WaitFor("sndbuf", resource, waker=self.rx_task_name)
        self._wait_tx_buffer = WaitFor("tx_buffer", resource, waker="kswapd")
        self._wait_rx_data = WaitFor("rx_data", resource, waker=self.rx_task_name)

    # -- lifecycle ------------------------------------------------------------------------
    def start(self, nursery: trio.Nursery) -> None:
        nursery.start_soon(self._nic, name=f"{self.name}.nic")
        nursery.start_soon(self._xmit_loop, name=f"{self.name}.xmit")

    @property
    def tx_pages(self) -> int:
        return self._tx_pages

    @property
    def rx_pages(self) -> int:
        """Receive buffers (ring buffers holding data) this socket holds."""
        return self._rx_bufs

    def emergency_rx_held(self) -> int:
        """RX buffers from the reserves this socket holds right now."""
        return sum(1 for _data, buf in self._rx if buf.pfmemalloc)

    async def aclose(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._nic_scope.cancel()
        for skb in self._tx:
            for page in skb.pages:
                self.memory.free_page(page)
        self._tx.clear()
        self._tx_bytes = self._tx_pages = 0
        device = self.stack.device
        while self._rx:
            device.release(self._rx.popleft()[1])
        self._rx_bytes = self._rx_bufs = 0
        self._wire.clear()
        self._wire_bytes = 0
        for lot in (self._rx_ready, self._space, self._wire_space):
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
        self._tx.append(_TxSkb(size, pages, self.stack.device.tx_acked(size, self.latency)))
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
        self.stack.device.kick()  # an ACK is now expected
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
        for lot in (self._xmit_drained, self._space, self._rx_ready):
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
                await sleep(delay)
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
            if (self._rx_eof and not self._wire) or self._closed:
                return b""
            await self._park(self._rx_ready, self._wait_rx_data)
        limit = max_bytes or math.inf
        device = self.stack.device
        data, buf = rx[0]
        if len(data) == limit or (len(rx) == 1 and len(data) < limit):
            # Exactly one whole packet: the usual case.
            rx.popleft()
            device.release(buf)
            self._rx_bufs -= 1
            self._rx_bytes -= len(data)
            device.kick()  # room under rcvbuf again: the window may open
            return bytes(data)
        out = bytearray()
        while rx and len(out) < limit:
            data, buf = rx[0]
            take = int(min(len(data), limit - len(out)))
            out += data[:take]
            if take == len(data):
                rx.popleft()
                device.release(buf)
                self._rx_bufs -= 1
            else:
                del data[:take]
            self._rx_bytes -= take
        device.kick()  # room under rcvbuf again: the window may open
        return bytes(out)

    # -- RX: the wire, and packets the device hands over ---------------------------------
    async def _nic(self) -> None:
        """Bytes arrive from the real stream onto the wire toward the NIC (no modelled
        memory yet): at most ``WINDOW_BYTES`` in flight, each chunk due when the link has
        carried it and ``latency`` has passed."""
        device = self.stack.device
        with self._nic_scope:
            try:
                while True:
                    while self._wire_bytes >= WINDOW_BYTES:
                        await self._wire_space.park()
                    chunk = await self.inner.receive_some(WINDOW_BYTES - self._wire_bytes)
                    if not chunk:
                        self._rx_eof = True
                        if not self._wire:
                            self._rx_ready.unpark_all()
                        return
                    due = device.rx_arrival(len(chunk), self.latency)
                    self._wire.append((due, bytearray(chunk)))
                    self._wire_bytes += len(chunk)
                    device.kick()
            except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
                self._rx_error = exc
                self._rx_ready.unpark_all()

    def next_packet_due(self) -> float:
        """When this socket's next packet (an ACK, or data while the receive window is
        open) is at the NIC; ``inf`` if none is coming."""
        due = self._tx[0].due if self._tx else math.inf
        # tcp_data_queue -> tcp_try_rmem_schedule: "atomic_read(&sk->sk_rmem_alloc) >
        # sk->sk_rcvbuf" prunes and drops; the peer's window (tcp_select_window) closes first.
        if self._wire and self._rx_bufs * self._truesize < self.rcvbuf:
            wire = self._wire[0][0]
            if wire < due:
                due = wire
        if due == math.inf:
            return due
        return due if due > self._retry_at else self._retry_at

    def receive_packet(self, now: float, buf: RxBuffer) -> None:
        """The device received this socket's next packet into ``buf`` (softirq)."""
        device = self.stack.device
        ack = bool(self._tx) and self._tx[0].due <= now
        what_kind = "ack" if ack else "data"
        if buf.pfmemalloc and not self.memalloc:
            # sk_filter: "if (skb_pfmemalloc(skb) && !sock_flag(sk, SOCK_MEMALLOC))
            # return -ENOMEM" -- LINUX_MIB_PFMEMALLOCDROP.  The peer retransmits.
            device.release(buf, progress=False)
            self.stats.pfmemalloc_drop += 1
            self.stack.observe(SkbDropped(self.name, "pfmemalloc", what_kind))
            self._retry_at = now + self._retry_delay
            self._retry_delay = min(self._retry_delay * 2, BACKOFF_MAX)
            return
        self._retry_delay = BACKOFF_MIN
        if buf.pfmemalloc:
            self.stats.emergency_rx += 1
        if ack:
            device.release(buf, progress=False)  # a pure ACK is consumed at once
            self._acknowledge(now)
            return
        self._take_packet(buf)
        self._acknowledge(now)  # data segments carry ACKs too

    async def _park(self, lot: WaitQueue, what: WaitFor, timeout: float = math.inf) -> None:
        """``memory.waits.park``, without a cancel scope when there is no timeout."""
        if timeout == math.inf:
            with self.memory.waits.waiting(what):
                await lot.park()
        else:
            await self.memory.waits.park(lot, what, timeout)

    def _take_packet(self, buf: RxBuffer) -> None:
        """One MSS of the wire's first chunk goes into ``buf``, queued for the consumer."""
        _due, chunk = self._wire[0]
        n = min(len(chunk), self.stack.device.settings.mss)
        data = chunk[:n]
        if n == len(chunk):
            self._wire.popleft()
        else:
            del chunk[:n]
        self._wire_bytes -= n
        self._wire_space.unpark_all()
        self._rx.append((data, buf))
        self._rx_bytes += n
        self._rx_bufs += 1
        stats = self.stats
        if self._rx_bufs > stats.rx_bufs_peak:
            stats.rx_bufs_peak = self._rx_bufs
        stats.rx_bytes += n
        self._rx_ready.unpark_all()

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
            "rx_bufs": self._rx_bufs,
            "emergency_rx_held": self.emergency_rx_held(),
            **attrs.asdict(self.stats),
        }
