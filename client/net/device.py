"""The client's network device: one receive ring every socket shares, refilled as its driver does.

A NIC receives into buffers the driver posted ahead of time.  The packet is in memory
before anyone knows which socket it is for: the buffer becomes the skb, the stack
demultiplexes it, and the driver posts a new buffer, from softirq, with ``GFP_ATOMIC``.  So
every socket of the device draws on the same ring, a flood competes with swap replies for
it, and whether a refill may dip into the reserves is the driver's decision, made without
knowing who the next packet is for.

* **The ring** holds ``ring_size`` buffers of ``rx_buffer`` bytes, carved from pages as the
  kernel's page-frag allocator does (``page_frag_alloc``; ``PAGE_SIZE // rx_buffer`` buffers
  a page, the page freed when its last buffer is).  A buffer from a page taken below min is
  pfmemalloc (``page_frag_alloc``: ``nc->pfmemalloc = page_is_pfmemalloc(page)``;
  ``build_skb`` marks the skb).  The ring is filled when the device opens, in process
  context (``virtnet_open``: ``try_fill_recv(GFP_KERNEL)``).
* **A packet** (at most one MTU of data, or an ACK) is received only into a posted buffer.
  It becomes an skb around the buffer (``build_skb``: a head from ``skbuff_head_cache``,
  ``GFP_ATOMIC``, built with the buffer by a ``netdev`` driver and in the poll by
  virtio_net, whose packet is dropped if the head cannot be had).  Then the socket's
  ``sk_filter`` may drop it (a pfmemalloc skb for a socket without SOCK_MEMALLOC); an
  ACK's skb is freed at once; data keeps its skb until the consumer reads it.  Each
  packet costs ``softirq_cost`` of the virtual clock.
* **Two driver styles** (``[nic] driver``):

  - ``netdev`` — a driver that allocates its buffers with ``netdev_alloc_skb`` (e1000 as
    Gorman's series found it: ``e1000_alloc_rx_buffers`` → ``netdev_alloc_skb_ip_align``).
    ``__netdev_alloc_skb`` (3.6): "if (sk_memalloc_socks()) gfp_mask |= __GFP_MEMALLOC" —
    the policy's ``rx_gfp`` is that decision.  ``e1000_clean_rx_irq`` refills once
    ``E1000_RX_BUFFER_WRITE`` buffers were cleaned; a failed refill is retried at the next
    poll (the NIC's next interrupt: a later packet, or ``e1000_watchdog``'s forced RX
    interrupt).
  - ``virtio`` — virtio_net's own page frags: ``virtnet_receive`` refills when more than
    half the ring is free with ``try_fill_recv(vi, rq, GFP_ATOMIC)``, and
    ``add_recvbuf_mergeable`` passes that gfp to ``skb_page_frag_refill`` unchanged: no
    ``__GFP_MEMALLOC``, whatever sockets exist.  A failed refill ("if
    (!try_fill_recv(vi, rq, GFP_ATOMIC)) schedule_delayed_work(&vi->refill, 0)") queues
    ``refill_work``, a kernel worker that disables NAPI, refills with ``GFP_KERNEL`` — which
    may enter direct reclaim and wait there like any other allocator — and re-enables NAPI;
    "if (still_empty) schedule_delayed_work(&vi->refill, HZ/2)".  While it is in reclaim,
    nothing is received (Linux 6.1's hang, reference/kernel-6.1-nbd-swap-hang.txt).

* **The link** carries ``bandwidth`` bytes a second each way: a chunk read from a real
  stream arrives when the link has carried it, plus the socket's latency; an skb sent is
  acknowledged once the link carried it and the ACK came back.
"""

from __future__ import annotations

import math
from collections import deque
from typing import TYPE_CHECKING, Literal

import attrs
import trio

from client.mm import GFP, GFP_ATOMIC, GFP_KERNEL, PAGE_SIZE, PF, Memory, Page
from client.mm.gfp import gfp_t, serving_softirq, task_flags
from client.mm.slab import SKBUFF_HEAD_CACHE, SlabCache, SlabObject
from client.mm.waits import WaitFor, WaitQueue, sleep
from client.net.facts import RefillFailed
from client.net.skbuff import SKB_HEAD_TRUESIZE

if TYPE_CHECKING:
    from client.net.socket import ModelledSocket
    from client.net.stack import NetStack

Driver = Literal["netdev", "virtio"]
DRIVERS: tuple[Driver, ...] = ("netdev", "virtio")

E1000_RX_BUFFER_WRITE = 16  # e1000.h: "Must be power of 2" -- refill after this many cleaned
E1000_WATCHDOG = 2.0  # e1000_watchdog: runs every 2 s and forces an RX interrupt (RXDMT0)
NAPI_POLL_WEIGHT = 64  # netdevice.h: packets one poll may take before the softirq moves on
VIRTNET_REFILL_RETRY = 0.5  # refill_work: "schedule_delayed_work(&vi->refill, HZ/2)"
BACKOFF_MIN = 0.005  # a packet the device could not take comes again (retransmission)
BACKOFF_MAX = 0.2


@attrs.frozen
class NicSettings:
    """The device's shape: what ``[nic]`` in a scenario sets."""

    driver: Driver = "netdev"
    #: Receive descriptors: e1000's E1000_DEFAULT_RXD and qemu's virtio-net rx_queue_size
    #: are both 256.
    ring_size: int = 256
    #: Bytes a receive buffer takes: e1000's rx_buffer_len for a 1500-byte MTU is
    #: E1000_RXBUFFER_2048; virtio_net's mergeable buffers are at least GOOD_PACKET_LEN
    #: (1518) rounded to cache lines, about 1536.
    rx_buffer: int = 2048
    #: Data bytes one packet carries (an Ethernet MTU of 1500 less 52 of IP and TCP with
    #: timestamps: the MSS).
    mss: int = 1448
    #: Link bytes a second each way: 1 Gbit/s.
    bandwidth: float = 125e6
    #: Virtual seconds the receive softirq spends on one packet: about a million packets
    #: a second per core, the usual figure for Linux's stack.
    softirq_cost: float = 1e-6

    def __attrs_post_init__(self) -> None:
        if self.driver not in DRIVERS:
            raise ValueError(f"nic.driver {self.driver!r}: one of {', '.join(DRIVERS)}")
        if self.ring_size < 1 or not 0 < self.rx_buffer <= PAGE_SIZE or self.mss < 1:
            raise ValueError("nic: ring_size >= 1, 0 < rx_buffer <= 4096, mss >= 1")
        if not self.bandwidth > 0 or not self.softirq_cost >= 0:
            raise ValueError("nic: bandwidth > 0 and softirq_cost >= 0")

    @property
    def rx_truesize(self) -> int:
        """An RX skb's truesize: build_skb's "skb->truesize = SKB_TRUESIZE(size)" with
        ``size`` the buffer less its shared info, so the buffer and
        SKB_DATA_ALIGN(sizeof(struct sk_buff))."""
        return self.rx_buffer + SKB_HEAD_TRUESIZE


class FragPage:
    """A page a frag allocator carves buffers from (``page_frag_alloc``, and a socket's
    ``sk_page_frag``): ``refs`` counts the buffers and skbs using it; it is freed when the
    last one goes and its allocator has moved on to another page."""

    __slots__ = ("page", "refs")

    def __init__(self, page: Page) -> None:
        self.page = page
        self.refs = 0


class RxBuffer:
    """One posted receive buffer (a frag of a page); after a packet, the skb's data.
    ``head``: its ``struct sk_buff`` from ``skbuff_head_cache``, once built."""

    __slots__ = ("_frag", "head")

    def __init__(self, frag: FragPage) -> None:
        self._frag = frag
        self.head: SlabObject | None = None
        frag.refs += 1

    @property
    def pfmemalloc(self) -> bool:
        return self._frag.page.pfmemalloc

    @property
    def page(self) -> Page:
        return self._frag.page


@attrs.define
class DeviceStats:
    rx_packets: int = 0
    rx_no_buffer: int = 0  # a packet found the ring empty (e1000's rx_no_buffer_count)
    rx_dropped: int = 0  # the skb head could not be allocated: the packet is lost
    refill_failed: int = 0  # refills that got fewer buffers than wanted
    refill_work: int = 0  # refill_work runs (virtio)
    ring_pages_peak: int = 0


class NetDevice:
    """One NIC (``eth0``) with its receive ring and the softirq that serves it."""

    def __init__(
        self, memory: Memory, stack: NetStack, settings: NicSettings, *, name: str = "eth0"
    ) -> None:
        self.memory = memory
        self.stack = stack
        self.settings = settings
        self.name = name
        self.ring: deque[RxBuffer] = deque()
        self.per_page = max(1, PAGE_SIZE // settings.rx_buffer)
        self._head_cache: SlabCache = memory.slab[SKBUFF_HEAD_CACHE]
        self._frag: FragPage | None = None  # page_frag_cache: the page being carved
        self._frag_left = 0
        self.pages = 0  # pages the ring's buffers (posted or held by skbs) occupy
        self.stats = DeviceStats()
        self.napi_task_name = f"{name}.rx"
        self.refill_task_name = f"{name}.refill"
        self._wake = WaitQueue()  # NAPI: a packet may be due
        self._refill_wake = WaitQueue()
        self._refill_queued = False
        self._napi_disabled = False
        self._rx_link_free = 0.0  # when the link toward us has carried what it carries
        self._tx_link_free = 0.0
        resource = f"{name} ring"
        self._wait_buffer = WaitFor("rx_buffer", resource, waker="kswapd")
        if settings.driver == "virtio":
            self._wait_buffer = WaitFor("rx_buffer", resource, waker=self.refill_task_name)
        self._wait_napi = WaitFor("napi_disabled", name, waker=self.refill_task_name)
        self._wait_packet = WaitFor("packet", name, waker="peer")
        self._wait_refill = WaitFor("refill_work", name, waker=self.napi_task_name)
        self._wait_retry = WaitFor("refill_retry", resource, waker="kswapd")
        self._napi_scope = trio.CancelScope()
        self._refill_scope = trio.CancelScope()

    # -- lifecycle ------------------------------------------------------------------------
    def start(self, nursery: trio.Nursery) -> None:
        self.memory.waits.provide("rx ring", self.napi_task_name)
        nursery.start_soon(self._napi, name=self.napi_task_name)
        if self.settings.driver == "virtio":
            nursery.start_soon(self._refill_work, name=self.refill_task_name)

    def kick(self) -> None:
        """Something may now be due (a packet arrived, an ACK is expected, a window opened)."""
        self._wake.unpark_all()

    # -- the link -------------------------------------------------------------------------
    def rx_arrival(self, size: int, latency: float) -> float:
        """When ``size`` bytes the peer sends now are at the NIC: the link carries them
        one after another, then they take ``latency`` to get here."""
        start = max(trio.current_time(), self._rx_link_free)
        self._rx_link_free = start + size / self.settings.bandwidth
        return self._rx_link_free + latency

    def tx_acked(self, size: int, latency: float) -> float:
        """When an skb of ``size`` bytes queued now is acknowledged: the link carries it
        after what is queued before it, the ACK takes ``latency`` to come back."""
        start = max(trio.current_time(), self._tx_link_free)
        self._tx_link_free = start + size / self.settings.bandwidth
        return self._tx_link_free + latency

    # -- buffers --------------------------------------------------------------------------
    def release(self, buf: RxBuffer, *, progress: bool = True) -> None:
        """The skb that used ``buf`` is freed (``kfree_skb``): its head goes back to
        ``skbuff_head_cache`` and the page's reference is put.  ``progress`` is False for a
        buffer that only churned (a dropped packet, a pure ACK): a ring that takes and drops
        packets while nothing else moves is not progress."""
        head = buf.head
        if head is not None:
            buf.head = None
            self._head_cache.free(head)
        frag = buf._frag
        frag.refs -= 1
        if frag.refs == 0 and frag is not self._frag:
            self._free_frag(frag, progress=progress)

    def _free_frag(self, frag: FragPage, *, progress: bool = True) -> None:
        self.memory.free_page(frag.page, progress=progress)
        self.pages -= 1

    async def _new_buffer(self, gfp: gfp_t, reserve: object | None) -> RxBuffer | None:
        """``page_frag_alloc``: the next ``rx_buffer`` bytes of the cached page, or a new
        page (``__page_frag_cache_refill``) with ``gfp``.  A ``netdev`` driver's buffer is
        a whole skb: ``__netdev_alloc_skb`` builds it at once, "data =
        __netdev_alloc_frag(fragsz, gfp_mask); if (likely(data)) { skb = build_skb(data,
        fragsz); if (unlikely(!skb)) put_page(virt_to_head_page(data)); }"."""
        if self._frag is None or self._frag_left == 0:
            page = await self.memory.alloc_page(gfp, reserve=reserve)
            if page is None:
                return None
            old = self._frag
            self._frag = FragPage(page)
            self._frag_left = self.per_page
            self.pages += 1
            if self.pages > self.stats.ring_pages_peak:
                self.stats.ring_pages_peak = self.pages
            if old is not None and old.refs == 0:
                self._free_frag(old)
        self._frag_left -= 1
        buf = RxBuffer(self._frag)
        if self.settings.driver == "netdev":
            buf.head = await self._build_skb()
            if buf.head is None:
                self.release(buf)  # put_page: the frag goes back
                return None
        return buf

    async def _build_skb(self) -> SlabObject | None:
        """build_skb: "skb = kmem_cache_alloc(skbuff_head_cache, GFP_ATOMIC);" -- whatever
        gfp the buffer was allocated with (napi_build_skb's per-CPU cache refills with
        ``kmem_cache_alloc_bulk(skbuff_head_cache, GFP_ATOMIC, ...)``)."""
        return await self._head_cache.alloc(GFP_ATOMIC)

    async def _fill(self, gfp: gfp_t, reserve: object | None = None) -> bool:
        """Post buffers until the ring is full; False if an allocation failed
        (``try_fill_recv``'s ``oom``)."""
        want = self.settings.ring_size
        while len(self.ring) < want:
            buf = await self._new_buffer(gfp, reserve)
            if buf is None:
                return False
            self.ring.append(buf)
        return True

    def _refill_failed(self, context: str) -> None:
        self.stats.refill_failed += 1
        self.stack.observe(
            RefillFailed(self.name, context, len(self.ring), self.settings.ring_size)
        )

    def _refill_wanted(self, force: bool = False) -> bool:
        """Does the driver refill at the end of this poll?  ``force``: the ring is empty."""
        s = self.settings
        missing = s.ring_size - len(self.ring)
        if s.driver == "netdev":
            # e1000_clean_rx_irq: "if (cleaned_count >= E1000_RX_BUFFER_WRITE)
            # adapter->alloc_rx_buf(...)"
            return missing >= E1000_RX_BUFFER_WRITE or (force and missing > 0)
        # virtnet_receive: "if (rq->vq->num_free > virtqueue_get_vring_size(rq->vq) / 2)"
        return missing > s.ring_size // 2 or (force and missing > 0)

    async def _napi_refill(self, *, force: bool = False) -> None:
        """The driver's refill at the end of a poll, in softirq (``GFP_ATOMIC``)."""
        if not self._refill_wanted(force):
            return
        if self.settings.driver == "netdev":
            # __netdev_alloc_skb decides the gfp (the policy: __GFP_MEMALLOC while
            # sk_memalloc_socks()), GFP_ATOMIC never sleeps.
            gfp = self.stack.rx_gfp() & ~GFP.DIRECT_RECLAIM
            if not await self._fill(gfp, self.stack.rx_reserve()):
                self._refill_failed("napi")
            return
        if not await self._fill(GFP_ATOMIC):
            self._refill_failed("napi")
            self._queue_refill_work()

    def _queue_refill_work(self) -> None:
        if not self._refill_queued:
            self._refill_queued = True
            self._refill_wake.unpark_all()

    # -- virtio_net's refill_work ---------------------------------------------------------
    async def _refill_work(self) -> None:
        """``refill_work``: a workqueue item (a kernel thread), process context."""
        waits = self.memory.waits
        with self._refill_scope, task_flags(PF.KTHREAD):
            while True:
                while not self._refill_queued:
                    with waits.waiting(self._wait_refill):
                        await self._refill_wake.park()
                self._refill_queued = False
                self.stats.refill_work += 1
                # "napi_disable(&rq->napi); still_empty = !try_fill_recv(vi, rq, GFP_KERNEL);
                # virtnet_napi_enable(rq->vq, &rq->napi);"
                self._napi_disabled = True
                try:
                    still_empty = not await self._fill(GFP_KERNEL)
                finally:
                    self._napi_disabled = False
                    self.kick()
                if still_empty:
                    self._refill_failed("refill_work")
                    # "In theory, this can happen: if we don't get any buffers in we will
                    # *never* try to fill again."  schedule_delayed_work(..., HZ/2)
                    with waits.waiting(self._wait_retry):
                        await trio.sleep(VIRTNET_REFILL_RETRY)
                    self._queue_refill_work()

    # -- NAPI: the receive softirq --------------------------------------------------------
    async def _napi(self) -> None:
        waits = self.memory.waits
        with self._napi_scope:
            # virtnet_open / e1000_open: the first fill, in process context.
            if not await self._fill(GFP_KERNEL):
                self._refill_failed("open")
            with serving_softirq():
                delay = BACKOFF_MIN
                polled = 0  # packets taken in this poll, not yet paid for in time
                while True:
                    now = trio.current_time()
                    sock, due = self._next_due(now)
                    if polled and (sock is None or polled >= NAPI_POLL_WEIGHT):
                        # The poll's CPU time: its packets were received during it.
                        await sleep(polled * self.settings.softirq_cost)
                        polled = 0
                        continue
                    if sock is None:
                        with waits.waiting(self._wait_packet):
                            await self._wake.park_until(due)
                        continue
                    if self._napi_disabled:
                        with waits.waiting(self._wait_napi):
                            await self._wake.park()
                        continue
                    if not self.ring:
                        await self._napi_refill(force=True)
                    if not self.ring:
                        # No posted buffer: the packet cannot be received.  e1000 counts
                        # it (rx_no_buffer_count) and the peer retransmits; virtio leaves
                        # it with the host until a buffer is posted.
                        self.stats.rx_no_buffer += 1
                        with waits.waiting(self._wait_buffer):
                            await self._wake.park_until(trio.current_time() + delay)
                        delay = min(delay * 2, BACKOFF_MAX)
                        continue
                    delay = BACKOFF_MIN
                    buf = self.ring.popleft()
                    self.stats.rx_packets += 1
                    if self.settings.softirq_cost:
                        polled += 1
                    if buf.head is None:
                        # virtio_net builds the skb in the poll (receive_mergeable ->
                        # page_to_skb -> build_skb / napi_build_skb); "if (unlikely(!skb))
                        # goto err_skb;" -- the buffer is freed, "dev->stats.rx_dropped++".
                        buf.head = await self._build_skb()
                        if buf.head is None:
                            self.stats.rx_dropped += 1
                            self.release(buf, progress=False)
                            sock.packet_lost(now)
                            if self._refill_wanted():  # (a coroutine only when there is work)
                                await self._napi_refill()
                            continue
                    await sock.receive_packet(now, buf)
                    if self._refill_wanted():
                        await self._napi_refill()

    def _next_due(self, now: float) -> tuple[ModelledSocket | None, float]:
        """The socket whose packet reached the NIC first, if one has by now (the wire is
        FIFO: the earliest arrival is received first, whichever socket it is for), or None
        and when the next one will."""
        earliest = math.inf
        first: ModelledSocket | None = None
        for sock in self.stack.sockets.values():
            due = sock.next_packet_due()
            if due < earliest:
                earliest, first = due, sock
        if earliest <= now:
            return first, earliest
        return None, earliest

    # -- teardown and reporting -----------------------------------------------------------
    def close(self) -> None:
        """The device goes down: its posted buffers are freed."""
        self._napi_scope.cancel()
        self._refill_scope.cancel()
        while self.ring:
            self.release(self.ring.popleft())
        frag, self._frag = self._frag, None
        if frag is not None and frag.refs == 0:
            self._free_frag(frag)

    def snapshot(self) -> dict[str, object]:
        return {
            "name": self.name,
            "driver": self.settings.driver,
            "posted": len(self.ring),
            "ring_pages": self.pages,
            "pfmemalloc_posted": sum(1 for b in self.ring if b.pfmemalloc),
            **attrs.asdict(self.stats),
        }
