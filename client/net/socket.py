"""Sockets as memory sees them: every byte sent or received costs modelled memory, charged as
Linux 6.1's TCP charges it (client/net/tcp.py holds the rules, client/net/skbuff.py the skbs).

A ``ModelledSocket`` is a trio stream wrapped around a real one (TCP, or an in-memory pair in
outcome tests).  The bytes are real; the memory they need is charged to the client machine.

**TX** (``send_all``: ``tcp_sendmsg_locked``, in the sender's task, so with the sender's task
flags -- kswapd's ``PF_MEMALLOC`` for swap writes).  Data goes into skbs of at most 64 KiB (the
GSO size goal).  An skb is a head from ``skbuff_fclone_cache`` with a kmalloc'd linear area
(``tcp_stream_alloc_skb`` -> ``alloc_skb_fclone(MAX_TCP_HEADER, sk_allocation)``); its data
is copied into fragments of the socket's page (``sk_page_frag_refill``: order-0 pages with
``sk_allocation``, shared by consecutive skbs, freed when the last skb using one is).
``sk_wmem_queued`` counts the skbs' truesize (head and data bytes) against ``sk_sndbuf``, and
each charge goes through ``sk_forward_alloc`` to ``tcp_memory_allocated``.  When an allocation
fails, TCP enters memory pressure and ``sk_stream_moderate_sndbuf`` cuts sndbuf to half of
what is queued; the sender waits in ``sk_stream_wait_memory`` -- for ACKs while the queue is
at sndbuf, for ``VM_WAIT`` (or a write-space wakeup) when an allocation failed below it.  As
``tcp_sendmsg`` returns once the data is in skbs, ``send_all`` returns once the skbs are
pushed: the socket's transmit task (``.xmit``, the device queue) hands everything queued to the
real stream in one write (what TSO/GSO and autocorking do).  A sender waits while more than
``XMIT_QUEUE_MAX`` bytes are queued (the real stream's back-pressure); a failed real write
breaks the socket for both directions, as an error on a TCP socket does.

**ACKs must be received.**  TCP ACKs are invisible from user space, so the model makes them:
an skb is due to be acknowledged once the link has carried it and ``latency`` has passed
(``NetDevice.tx_acked``), and that ACK is a packet the device must receive like any other --
into a posted ring buffer -- and that passes the socket filter.  No RX buffer, no ACK, no
freed TX.  An ACK frees the skbs it covers (head, linear area, page references), grows the
congestion window, and ``tcp_check_space`` grows sndbuf with it (``tcp_sndbuf_expand``)
unless SO_SNDBUF locked it.

**We acknowledge what we receive**, with skbs of our own: every second full-sized segment
(``__tcp_ack_snd_check``), else when the delayed-ACK timer fires (``TCP_ATO_MIN``) or the
reader takes data (``tcp_cleanup_rbuf``), and with every data segment we send.  A pure ACK is
``alloc_skb(MAX_TCP_HEADER, sk_gfp_mask(sk, GFP_ATOMIC))`` -- ``__GFP_MEMALLOC`` on a
``SOCK_MEMALLOC`` socket -- freed once sent.  If it cannot be allocated the ACK waits for the
timer, backing off (``TCP_DELACK_MAX << retry``).  Each ACK offers the peer a window
(``tcp_select_window``: half the free receive buffer, capped by ``rcv_ssthresh``, never
shrunk); the peer sends no further than our last ACK plus that window, so without ACKs it
stops once the window is used.

**RX** (``client/net/device.py``): bytes the peer sent travel on the wire (not modelled
memory) until the link has carried them and ``latency`` has passed.  The device's softirq
receives each packet (one MSS of data, or an ACK) into a buffer from its ring -- posted before
anyone knew which socket the packet was for -- and hands it to the socket: an emergency
(pfmemalloc) buffer for a socket without ``SOCK_MEMALLOC`` is dropped at ``sk_filter``
(freed, ``PFMemallocDrop``); a data segment is charged (``tcp_data_queue``: forced into an
empty receive queue, else ``sk_rmem_schedule``, which a pfmemalloc skb passes on a memalloc
socket whatever ``tcp_mem`` says) or dropped (``TCPRcvQDrop``); a dropped packet stays on the
wire and the peer retransmits after a back-off.  Data keeps its buffer until the consumer
reads it; the window offered shrinks as received data is held, to zero before
``sk_rmem_alloc`` reaches ``sk_rcvbuf``.  Reading grows ``sk_rcvbuf`` (DRS) unless SO_RCVBUF locked it, and sends a
window update when it opened the window "significantly".

The drop rules are the kernel's and the same under every policy: a policy under which no RX
page is ever pfmemalloc simply never triggers the first.
"""

from __future__ import annotations

import math
from collections import deque
from typing import TYPE_CHECKING, Any

import attrs
import trio

from client.mm import GFP, GFP_ATOMIC, GFP_NOIO, PAGE_SIZE, Memory, gfp_t
from client.mm.gfp import serving_softirq
from client.mm.waits import WaitFor, WaitQueue
from client.net.device import BACKOFF_MAX, BACKOFF_MIN, FragPage, RxBuffer
from client.net.facts import AckDelayed, SkbDropped
from client.net.skbuff import MAX_TCP_HEADER, SkbHead, alloc_skb
from client.net.tcp import TCP_ATO_MIN, TCP_DELACK_MAX, TCP_RTO_MAX, VM_WAIT, TcpSock
from client.sync import HandoffLock

if TYPE_CHECKING:
    from client.net.stack import NetStack

SKB_MAX = 64 * 1024  # the largest TX skb (the GSO size goal): "max packet size is 64k"
XMIT_QUEUE_MAX = 1024 * 1024  # queued for the real stream beyond this: the sender waits
#: sk_page_frag_refill: "skb_page_frag_refill(32U, pfrag, sk->sk_allocation)" -- a page with
#: fewer bytes left than this is replaced.
SK_FRAG_MIN = 32


@attrs.define
class SocketStats:
    tx_bytes: int = 0
    rx_bytes: int = 0
    tx_pages_peak: int = 0
    rx_bufs_peak: int = 0
    acks: int = 0  # ACKs received that freed TX skbs
    acks_sent: int = 0  # pure ACKs we sent (data segments carry ACKs too, uncounted)
    ack_failed: int = 0  # pure ACKs whose skb could not be allocated
    pfmemalloc_drop: int = 0  # netstat PFMemallocDrop: emergency skb for a normal socket
    rcvq_drop: int = 0  # netstat TCPRcvQDrop: tcp_data_queue could not charge the skb
    emergency_rx: int = 0  # pfmemalloc skbs this socket accepted (SOCK_MEMALLOC only)
    tx_alloc_wait: int = 0  # waits in sk_stream_wait_memory after a failed allocation


class _TxSkb:
    """A TCP transmit skb: its head and linear area, the page fragments holding its data."""

    __slots__ = ("due", "frags", "len", "segs", "skb", "start", "truesize")

    def __init__(self, skb: SkbHead, start: int) -> None:
        self.skb = skb
        self.frags: list[FragPage] = []  # one reference on each page its data is in
        self.len = 0
        self.truesize = skb.truesize
        self.start = start  # where its data begins in the send_all buffer
        self.segs = 0  # tcp_skb_pcount: MSS-sized segments on the wire
        self.due = math.inf  # when its ACK arrives at the NIC


class ModelledSocket(trio.abc.Stream):
    """A real stream whose buffers are charged to a modelled machine's memory.

    ``sndbuf``/``rcvbuf``: SO_SNDBUF/SO_RCVBUF, as the ``sk_sndbuf``/``sk_rcvbuf`` they set
    (locked); None: autotuned from ``tcp_wmem``/``tcp_rmem`` (client/net/tcp.py)."""

    def __init__(
        self,
        stack: NetStack,
        inner: trio.abc.Stream,
        name: str,
        *,
        sndbuf: int | None = None,
        rcvbuf: int | None = None,
        latency: float = 0.0,
        allocation: gfp_t = GFP_NOIO,
    ) -> None:
        self.stack = stack
        self.memory: Memory = stack.memory
        self.inner = inner
        self.name = name
        self.latency = latency
        self.allocation = allocation  # sk->sk_allocation
        self.memalloc = False  # SOCK_MEMALLOC
        self.tx_reserve: object | None = None  # the policy's reserve for this socket's TX
        settings = stack.device.settings
        self.tcp = TcpSock(
            stack.tcp, mss=settings.mss, sndbuf=sndbuf, rcvbuf=rcvbuf, now=trio.current_time()
        )
        self.stats = SocketStats()
        self._tx: deque[_TxSkb] = deque()  # sent, awaiting ACK, oldest first
        self._pfrag: FragPage | None = None  # sk->sk_frag: the page TX data is copied into
        self._pfrag_offset = 0
        self._tx_pages = 0  # pages of TX data (the socket's frag page included)
        self._rx: deque[tuple[bytearray, RxBuffer]] = deque()  # received, not yet consumed
        self._rx_bytes = 0
        self._rx_bufs = 0
        # build_skb: an skb's truesize is its buffer and SKB_DATA_ALIGN(sizeof(struct sk_buff))
        # (the shared info is inside the buffer).
        self._truesize = settings.rx_truesize
        self._wire: deque[tuple[float, bytearray]] = deque()  # (at the NIC at, bytes)
        self._wire_bytes = 0
        self._wire_space = WaitQueue()
        self._retry_at = 0.0  # after a drop, the peer retransmits no earlier than this
        self._retry_delay = BACKOFF_MIN
        # Our ACKs: scheduled (ICSK_ACK_SCHED), the delayed-ACK timer, the failure back-off.
        self._ack_pending = False
        self._ack_retry = 0  # icsk_ack.retry
        self._delack_at = math.inf
        self._delack_wake = WaitQueue()
        self._rx_ready = WaitQueue()
        self._space = WaitQueue()  # sk_stream_write_space wakes writers here
        self._rx_eof = False
        self._rx_error: BaseException | None = None
        self._closed = False
        # The socket lock (lock_sock) of send_all: a FIFO mutex that, unlike trio.Lock,
        # costs no scheduling round when it is free (handed over to the next waiter).
        self._send_lock = HandoffLock()
        # Queued for the real stream (skbs allocated, bytes not yet written): the device.
        self._xmit: deque[bytes | memoryview] = deque()
        self._xmit_bytes = 0  # queued + being written
        self._xmit_busy = False  # a write to the real stream is in progress
        self._xmit_wake = WaitQueue()
        self._xmit_drained = WaitQueue()
        self._tx_error: BaseException | None = None
        self._nic_scope = trio.CancelScope()
        self._xmit_scope = trio.CancelScope()
        self._timer_scope = trio.CancelScope()
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
        nursery.start_soon(self._delack_timer, name=f"{self.name}.delack")

    @property
    def sndbuf(self) -> int:
        """``sk_sndbuf``."""
        return self.tcp.sndbuf

    @property
    def rcvbuf(self) -> int:
        """``sk_rcvbuf``."""
        return self.tcp.rcvbuf

    @property
    def tx_pages(self) -> int:
        """Pages of TX data: page fragments held by unacknowledged skbs, and the socket's
        own frag page (``sk->sk_frag``, kept until the socket is destroyed)."""
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
        self._timer_scope.cancel()
        for skb in self._tx:
            self._free_tx_skb(skb)
        self._tx.clear()
        frag, self._pfrag = self._pfrag, None  # sk_destruct: "put_page(sk->sk_frag.page)"
        if frag is not None and frag.refs == 0:
            self._free_frag_page(frag)
        device = self.stack.device
        tcp = self.tcp
        while self._rx:
            device.release(self._rx.popleft()[1])
            tcp.rfree(self._truesize)
        self._rx_bytes = self._rx_bufs = 0
        tcp.close()
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
        await self._send_lock.acquire()
        try:
            self._check_open()
            if len(view):
                await self._sendmsg(view)
        finally:
            self._send_lock.release()

    async def _sendmsg(self, view: memoryview) -> None:
        """net/ipv4/tcp.c tcp_sendmsg_locked: fill skbs of at most ``SKB_MAX`` from the
        socket's page frag, waiting for memory (``wait_for_space``) whenever a step fails."""
        tcp = self.tcp
        size = len(view)
        copied = 0
        skb: _TxSkb | None = None  # the write queue's tail, not yet pushed
        try:
            while copied < size:
                self._check_open()
                if skb is None:
                    # new_segment: "if (!sk_stream_memory_free(sk)) goto wait_for_space;"
                    if not tcp.memory_free():
                        await self._wait_for_space()
                        continue
                    # "first_skb = tcp_rtx_and_write_queues_empty(sk); skb =
                    # tcp_stream_alloc_skb(sk, 0, sk->sk_allocation, first_skb); if (!skb)
                    # goto wait_for_space;"
                    skb = await self._stream_alloc_skb(copied, first=not self._tx)
                    if skb is None:
                        await self._wait_for_space()
                        continue
                # "if (!sk_page_frag_refill(sk, pfrag)) goto wait_for_space;"
                if not await self._page_frag_refill():
                    skb = self._push(skb, view)  # wait_for_space: "if (copied) tcp_push"
                    await self._wait_for_space()
                    continue
                copy = min(size - copied, SKB_MAX - skb.len, PAGE_SIZE - self._pfrag_offset)
                # "copy = tcp_wmem_schedule(sk, copy); if (!copy) goto wait_for_space;"
                copy = tcp.wmem_schedule_copy(copy)
                if not copy:
                    skb = self._push(skb, view)
                    await self._wait_for_space()
                    continue
                frag = self._pfrag
                assert frag is not None
                if not skb.frags or skb.frags[-1] is not frag:
                    # skb_fill_page_desc + "page_ref_inc(pfrag->page)" (else the copy merges
                    # into the skb's last frag: the same page, right after it)
                    frag.refs += 1
                    skb.frags.append(frag)
                self._pfrag_offset += copy
                tcp.charge_copy(copy)
                skb.truesize += copy
                skb.len += copy
                copied += copy
                if skb.len >= SKB_MAX:
                    skb = self._push(skb, view)
                    await self._backpressure()
            if skb is not None:
                skb = self._push(skb, view)
                await self._backpressure()
        finally:
            if skb is not None:  # an error or a cancellation left it unsent
                self._free_tx_skb(skb)

    async def _stream_alloc_skb(self, start: int, *, first: bool) -> _TxSkb | None:
        """tcp_stream_alloc_skb: "skb = alloc_skb_fclone(size + MAX_TCP_HEADER, gfp);" with
        ``sk_allocation``; "if (likely(skb)) { ... skb->truesize =
        SKB_TRUESIZE(skb_end_offset(skb)); ... if (likely(mem_scheduled)) { ... return skb; }
        __kfree_skb(skb); } else { sk->sk_prot->enter_memory_pressure(sk);
        sk_stream_moderate_sndbuf(sk); }"."""
        skb = await alloc_skb(
            self.memory.slab, MAX_TCP_HEADER, self.allocation, fclone=True, reserve=self.tx_reserve
        )
        if skb is None:
            self.stack.tcp.enter_memory_pressure()
            self.tcp.moderate_sndbuf()
            return None
        if not self.tcp.stream_skb_scheduled(skb.truesize, first=first):
            skb.free()
            return None
        return _TxSkb(skb, start)

    async def _page_frag_refill(self) -> bool:
        """net/core/sock.c sk_page_frag_refill: "if
        (likely(skb_page_frag_refill(32U, pfrag, sk->sk_allocation))) return true;
        sk_enter_memory_pressure(sk); sk_stream_moderate_sndbuf(sk); return false;".

        skb_page_frag_refill: "if (page_ref_count(pfrag->page) == 1) { pfrag->offset = 0;
        return true; } if (pfrag->offset + sz <= pfrag->size) return true;
        put_page(pfrag->page);" then a new page.  Its first attempt is an order-3 page
        without direct reclaim; the model has order-0 pages only and makes the fallback,
        "pfrag->page = alloc_page(gfp)".  (This is ``sk->sk_frag``: nbd's socket has
        ``sk_use_task_frag = false`` in 6.1; before, a socket whose gfp may sleep without
        __GFP_MEMALLOC copied into the sending task's frag instead.)"""
        frag = self._pfrag
        if frag is not None:
            if frag.refs == 0:  # only the socket holds it: start it over
                self._pfrag_offset = 0
                return True
            if self._pfrag_offset + SK_FRAG_MIN <= PAGE_SIZE:
                return True
            self._pfrag = None  # put_page: the skbs using it keep it until they are freed
        page = await self.memory.alloc_page(self.allocation, reserve=self.tx_reserve)
        if page is None:
            self.stack.tcp.enter_memory_pressure()
            self.tcp.moderate_sndbuf()
            return False
        self._pfrag = FragPage(page)
        self._pfrag_offset = 0
        self._tx_pages += 1
        if self._tx_pages > self.stats.tx_pages_peak:
            self.stats.tx_pages_peak = self._tx_pages
        return True

    def _free_frag_page(self, frag: FragPage) -> None:
        self.memory.free_page(frag.page)
        self._tx_pages -= 1

    def _free_tx_skb(self, skb: _TxSkb) -> None:
        """sk_wmem_free_skb: uncharged from ``sk_wmem_queued``, then ``__kfree_skb``: the
        linear area, the head, and a page reference per frag."""
        self.tcp.free_skb(skb.truesize)
        skb.skb.free()
        for frag in skb.frags:
            frag.refs -= 1
            if frag.refs == 0 and frag is not self._pfrag:
                self._free_frag_page(frag)

    async def _wait_for_space(self) -> None:
        """tcp_sendmsg_locked's wait_for_space: "set_bit(SOCK_NOSPACE,
        &sk->sk_socket->flags); ... err = sk_stream_wait_memory(sk, &timeo);".

        sk_stream_wait_memory: "if (sk_stream_memory_free(sk)) current_timeo = vm_wait =
        prandom_u32_max(HZ / 5) + 2;" -- under sndbuf it was an allocation that failed, and
        the sender sleeps ``VM_WAIT`` (or until sk_stream_write_space wakes it); then, or
        else, it waits until "sk_stream_memory_free(sk) && !vm_wait"."""
        tcp = self.tcp
        tcp.nospace = True
        if tcp.memory_free():
            self.stats.tx_alloc_wait += 1
            await self.memory.waits.park(self._space, self._wait_tx_buffer, VM_WAIT)
        while not tcp.memory_free():
            self._check_open()
            await self._park(self._space, self._wait_sndbuf)

    def _push(self, skb: _TxSkb, view: memoryview) -> _TxSkb | None:
        """tcp_push -> tcp_write_xmit: the skb leaves (the model's device takes it at once;
        the link and the peer decide when its ACK comes).  It carries an ACK of what we
        received (tcp_event_ack_sent).  An skb with no data yet stays queued: it is
        returned, None otherwise."""
        if not skb.len:
            return skb
        device = self.stack.device
        tcp = self.tcp
        skb.segs = -(-skb.len // tcp.mss)  # tcp_skb_pcount of a GSO skb
        skb.due = device.tx_acked(skb.len, self.latency)
        self._tx.append(skb)
        tcp.sent(skb.len, skb.segs)
        self.stats.tx_bytes += skb.len
        if self._ack_pending or tcp.rcv_wup != tcp.rcv_nxt:
            self._ack_sent(skb.segs)
        # The skb owns a copy of the data unless the caller's buffer is immutable.
        seg = view[skb.start : skb.start + skb.len]
        self._xmit.append(seg if type(seg.obj) is bytes else bytes(seg))
        self._xmit_bytes += skb.len
        if not self._xmit_busy:
            self._xmit_wake.unpark()
        device.kick()  # an ACK is now expected
        return None

    async def _backpressure(self) -> None:
        """Wait while the real stream has more than ``XMIT_QUEUE_MAX`` bytes to take."""
        while self._xmit_bytes > XMIT_QUEUE_MAX and self._tx_error is None:
            await self._xmit_drained.park()
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

    def _acknowledge(self, now: float) -> None:
        """tcp_ack: a received ACK covers every skb whose ACK was due by now (cumulative).
        tcp_clean_rtx_queue frees them, the congestion window grows (tcp_cong_control), and
        tcp_data_snd_check -> tcp_check_space expands sndbuf and wakes the writers."""
        tx = self._tx
        if not tx or tx[0].due > now:
            return
        size = segs = 0
        while tx and tx[0].due <= now:
            skb = tx.popleft()
            size += skb.len
            segs += skb.segs
            self._free_tx_skb(skb)
        tcp = self.tcp
        tcp.acked(size, segs)
        self.stats.acks += 1
        if tcp.check_space():
            self._space.unpark_all()

    async def wait_send_all_might_not_block(self) -> None:
        await self.inner.wait_send_all_might_not_block()

    async def send_eof(self) -> None:
        if isinstance(self.inner, trio.abc.HalfCloseableStream):
            await self._flush()
            await self.inner.send_eof()

    # -- our ACKs -------------------------------------------------------------------------
    async def _send_ack(self) -> bool:
        """tcp_send_ack -> __tcp_send_ack: "buff = alloc_skb(MAX_TCP_HEADER,
        sk_gfp_mask(sk, GFP_ATOMIC | __GFP_NOWARN));" (sk_gfp_mask: "gfp_mask |
        (sk->sk_allocation & __GFP_MEMALLOC)").  On failure: "delay = TCP_DELACK_MAX <<
        icsk->icsk_ack.retry; if (delay < TCP_RTO_MAX) icsk->icsk_ack.retry++;
        inet_csk_schedule_ack(sk); icsk->icsk_ack.ato = TCP_ATO_MIN;
        inet_csk_reset_xmit_timer(sk, ICSK_TIME_DACK, delay, TCP_RTO_MAX);".  Otherwise
        "__tcp_transmit_skb(...)": the ACK leaves, and the driver frees it once sent."""
        gfp = GFP_ATOMIC | GFP.NOWARN | (self.allocation & GFP.MEMALLOC)
        skb = await alloc_skb(self.memory.slab, MAX_TCP_HEADER, gfp, reserve=self.tx_reserve)
        if skb is None:
            delay = TCP_DELACK_MAX * (1 << self._ack_retry)
            if delay < TCP_RTO_MAX:
                self._ack_retry += 1
            delay = min(delay, TCP_RTO_MAX)  # inet_csk_reset_xmit_timer's max_when
            self._ack_pending = True
            self.stats.ack_failed += 1
            self._delack_at = trio.current_time() + delay
            self._delack_wake.unpark()
            tcp = self.tcp
            self.stack.observe(
                AckDelayed(self.name, self._ack_retry, delay, tcp.rcv_nxt - tcp.rcv_wup)
            )
            return False
        skb.free()
        self.stats.acks_sent += 1
        self._ack_sent()
        return True

    def _ack_sent(self, pkts: int = 1) -> None:
        """tcp_event_ack_sent: "inet_csk_clear_xmit_timer(sk, ICSK_TIME_DACK)" (no ACK
        pending, retry 0; the timer, if armed, finds nothing to do) and rcv_wup moves up:
        the peer's window opens."""
        self.tcp.ack_sent(pkts)
        self._ack_pending = False
        self._ack_retry = 0
        self._delack_at = math.inf
        self._wire_space.unpark_all()

    def _send_delayed_ack(self, now: float) -> None:
        """tcp_send_delayed_ack: the timer at ``ato`` (TCP_ATO_MIN: the model keeps no
        inter-arrival estimate), "Use new timeout only if there wasn't a older one
        earlier"."""
        self._ack_pending = True
        at = now + TCP_ATO_MIN
        if at < self._delack_at:
            self._delack_at = at
            self._delack_wake.unpark()

    async def _delack_timer(self) -> None:
        """tcp_delack_timer, in the timer softirq: "if (inet_csk_ack_scheduled(sk)) { ...
        tcp_send_ack(sk); }"."""
        with self._timer_scope, serving_softirq():
            while True:
                at = self._delack_at
                if at == math.inf:
                    await self._delack_wake.park()
                    continue
                with trio.move_on_at(at) as timer:
                    await self._delack_wake.park()
                if not timer.cancelled_caught or self._delack_at > trio.current_time():
                    continue  # re-armed or cleared meanwhile
                self._delack_at = math.inf
                if self._ack_pending:
                    await self._send_ack()

    # -- RX: the consumer -----------------------------------------------------------------
    async def receive_some(self, max_bytes: int | None = None) -> bytes:
        """The consumer takes received data (tcp_recvmsg): its skbs are freed as it does
        (sock_rfree), DRS may grow rcvbuf (tcp_rcv_space_adjust) and tcp_cleanup_rbuf sends
        the ACK the receive path held back: "Once-per-two-segments ACK was not sent by
        tcp_input.c" -- in the reader's own context."""
        rx = self._rx
        while not rx:
            if self._rx_error is not None:
                raise trio.BrokenResourceError(str(self._rx_error)) from self._rx_error
            if (self._rx_eof and not self._wire) or self._closed:
                return b""
            await self._park(self._rx_ready, self._wait_rx_data)
        limit = max_bytes or math.inf
        device = self.stack.device
        tcp = self.tcp
        truesize = self._truesize
        data, buf = rx[0]
        if len(data) == limit or (len(rx) == 1 and len(data) < limit):
            # Exactly one whole packet: the usual case.
            rx.popleft()
            device.release(buf)
            tcp.rfree(truesize)
            self._rx_bufs -= 1
            out: bytes | bytearray = data
        else:
            out = bytearray()
            while rx and len(out) < limit:
                data, buf = rx[0]
                take = int(min(len(data), limit - len(out)))
                out += data[:take]
                if take == len(data):
                    rx.popleft()
                    device.release(buf)
                    tcp.rfree(truesize)
                    self._rx_bufs -= 1
                else:
                    del data[:take]
        self._rx_bytes -= len(out)
        tcp.copied_seq += len(out)
        tcp.rcv_space_adjust(trio.current_time(), self.latency)
        # tcp_cleanup_rbuf: "Once-per-two-segments ACK was not sent by tcp_input.c", or a
        # window that opened "significantly".
        if (self._ack_pending and tcp.rcv_nxt - tcp.rcv_wup > tcp.mss) or tcp.window_update_due():
            await self._send_ack()
        return bytes(out)

    # -- RX: the wire, and packets the device hands over ---------------------------------
    async def _nic(self) -> None:
        """Bytes arrive from the real stream onto the wire toward the NIC (no modelled
        memory yet): the peer sends no further than the window our last ACK offered
        (tcp_receive_window), each chunk due when the link has carried it and ``latency``
        has passed."""
        device = self.stack.device
        tcp = self.tcp
        with self._nic_scope:
            try:
                while True:
                    while tcp.receive_window() <= self._wire_bytes:
                        await self._wire_space.park()
                    chunk = await self.inner.receive_some(tcp.receive_window() - self._wire_bytes)
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
        due = math.inf
        if self._tx:
            due = self._tx[0].due
        if self._wire:
            due = min(due, self._wire[0][0])
        return max(due, self._retry_at) if due != math.inf else due

    def _retransmitted_later(self, now: float) -> None:
        """A packet was dropped: the peer sends it again after a back-off."""
        self._retry_at = now + self._retry_delay
        self._retry_delay = min(self._retry_delay * 2, BACKOFF_MAX)

    def packet_lost(self, now: float) -> None:
        """The device dropped this socket's next packet before the stack saw it (its skb
        could not be built); the peer retransmits."""
        ack = bool(self._tx) and self._tx[0].due <= now
        self.stack.observe(SkbDropped(self.name, "no_memory", "ack" if ack else "data"))
        self._retransmitted_later(now)

    async def receive_packet(self, now: float, buf: RxBuffer) -> None:
        """The device received this socket's next packet into ``buf`` (softirq)."""
        device = self.stack.device
        ack = bool(self._tx) and self._tx[0].due <= now
        if buf.pfmemalloc and not self.memalloc:
            # sk_filter: "if (skb_pfmemalloc(skb) && !sock_flag(sk, SOCK_MEMALLOC))
            # return -ENOMEM" -- LINUX_MIB_PFMEMALLOCDROP.  The peer retransmits.
            device.release(buf, progress=False)
            self.stats.pfmemalloc_drop += 1
            self.stack.observe(SkbDropped(self.name, "pfmemalloc", "ack" if ack else "data"))
            self._retransmitted_later(now)
            return
        self._retry_delay = BACKOFF_MIN
        if buf.pfmemalloc:
            self.stats.emergency_rx += 1
        if ack:
            device.release(buf, progress=False)  # a pure ACK is consumed at once
            self._acknowledge(now)
            return
        tcp = self.tcp
        if not tcp.data_queue_scheduled(
            self._truesize, pfmemalloc=buf.pfmemalloc, queue_empty=not self._rx
        ):
            # tcp_data_queue: "NET_INC_STATS(sock_net(sk), LINUX_MIB_TCPRCVQDROP); ... goto
            # drop;" -- no ACK; the peer retransmits.
            device.release(buf, progress=False)
            self.stats.rcvq_drop += 1
            self.stack.observe(SkbDropped(self.name, "proto_mem", "data"))
            self._retransmitted_later(now)
            return
        self._take_packet(buf, now)
        self._acknowledge(now)  # data segments carry ACKs too
        if tcp.ack_now():  # __tcp_ack_snd_check
            await self._send_ack()
        else:
            self._send_delayed_ack(now)

    async def _park(self, lot: WaitQueue, what: WaitFor, timeout: float = math.inf) -> None:
        """``memory.waits.park``, without a cancel scope when there is no timeout."""
        if timeout == math.inf:
            with self.memory.waits.waiting(what):
                await lot.park()
        else:
            await self.memory.waits.park(lot, what, timeout)

    def _take_packet(self, buf: RxBuffer, now: float) -> None:
        """One MSS of the wire's first chunk goes into ``buf``, queued for the consumer
        (tcp_queue_rcv -> skb_set_owner_r), at ``now`` (the softirq's clock reading)."""
        _due, chunk = self._wire[0]
        n = min(len(chunk), self.stack.device.settings.mss)
        data = chunk[:n]
        if n == len(chunk):
            self._wire.popleft()
        else:
            del chunk[:n]
        self._wire_bytes -= n
        self._rx.append((data, buf))
        self._rx_bytes += n
        self._rx_bufs += 1
        self.tcp.set_owner_r(self._truesize, n, now)
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
            **self.tcp.snapshot(),
        }
