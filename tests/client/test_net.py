"""The network as memory sees it: ``ModelledSocket`` and ``NetStack`` (DESIGN.md §4.2).

Each test drives one socket end of ``trio.testing.memory_stream_pair()`` and plays the peer
on the other end itself.  Memory is put in a given state by taking pages straight off the
free list (``hold_until``), relative to the zone's watermarks.  Time is trio's virtual
clock (``autojump_clock``): ``trio.sleep`` moves it, ``wait_all_tasks_blocked`` lets every
task run at the current instant.

The small machine is ``tests/client/netrig.py``'s; ``make_net`` (tests/client/conftest.py)
builds one.  TCP's own rules (sysctls, buffer sizing, tcp_mem, ACKs) are tested in
test_tcp.py.
"""

from __future__ import annotations

import pytest
import trio
import trio.testing
from trio.testing import wait_all_tasks_blocked

from client.mm import (
    GFP,
    GFP_ATOMIC,
    GFP_KERNEL,
    GFP_NOIO,
    PAGE_SIZE,
    PF,
    memalloc_noreclaim,
)
from client.mm.slab import SKBUFF_FCLONE_CACHE, SKBUFF_HEAD_CACHE
from client.net.device import E1000_RX_BUFFER_WRITE, RefillFailed
from client.net.skbuff import SKB_HEAD_TRUESIZE
from client.net.socket import ModelledSocket
from client.net.stack import NOISE, SWAP
from client.policy import NonePolicy, PfmemallocPolicy, Policy
from tests.client.netrig import (
    MSS,
    NR_PAGES,
    RING,
    RING_PAGES,
    MakeNet,
    Net,
    record_allocations,
    wait_of,
)

# -- TX -----------------------------------------------------------------------------------


@pytest.mark.patches_model
async def test_tx_pages_charged_in_senders_context_and_held_until_ack(
    make_net: MakeNet, autojump_clock: trio.testing.MockClock
) -> None:
    """DESIGN §4.2 TX: sending allocates TX skb memory in the sender's context with the
    socket's gfp; freed when the peer's ACK has been received, ``latency`` after the send
    (kernel-mm §2 NBD: sock_xmit under PF_MEMALLOC with sk_allocation).

    tcp_sendmsg_locked: one skb -- its head from skbuff_fclone_cache and a kmalloc-1k linear
    area (a new slab page each) -- and 8193 bytes copied into the socket's page frag: three
    pages (4096 + 4096 + 1).  Its truesize is 1280 (SKB_TRUESIZE of the 704 bytes kmalloc
    left past the shared info) + 8193; three pages charged to tcp_memory_allocated."""
    net = make_net()
    latency = 0.5
    free0 = await net.opened()
    sock, peer = net.socket("nbd0", SWAP, latency=latency)
    calls = record_allocations(net.memory)
    sent_at = trio.current_time()
    with memalloc_noreclaim():  # as nbd's sock_xmit does
        await sock.send_all(b"x" * (2 * PAGE_SIZE + 1))
    me = trio.lowlevel.current_task()
    tx = [c for c in calls if c["task"] is me]
    assert len(tx) == 3  # 8193 bytes -> 3 frag pages
    assert all(c["gfp"] == sock.allocation == GFP_NOIO for c in tx)
    assert all(c["flags"] & PF.MEMALLOC and not c["flags"] & PF.SOFTIRQ for c in tx)
    slab = net.memory.slab
    assert slab[SKBUFF_FCLONE_CACHE].active_objs == 1 and slab["kmalloc-1k"].active_objs == 1
    assert sock.tx_pages == 3 and net.memory.nr_free_pages == free0 - 3 - 2
    assert sock.tcp.wmem_queued == 1280 + 2 * PAGE_SIZE + 1
    assert net.stack.tcp.charged == 3 and sock.tcp.forward_alloc == 3 * PAGE_SIZE - 9473
    assert await peer.receive_some() == b"x" * (2 * PAGE_SIZE + 1)  # the bytes are real

    await trio.sleep(latency - 0.01)
    assert sock.tx_pages == 3 and sock.stats.acks == 0  # not acknowledged yet
    await trio.sleep(0.02)
    # The skb is freed: its head and linear area back to their slabs (which keep their
    # pages), its first two pages freed; the third is the socket's frag page (sk->sk_frag),
    # kept for the next send.
    assert sock.tx_pages == 1 and sock.stats.acks == 1
    assert slab[SKBUFF_FCLONE_CACHE].active_objs == 0 and slab["kmalloc-1k"].active_objs == 0
    assert net.memory.nr_free_pages == free0 - 1 - 2
    assert sock.tcp.wmem_queued == 0 and net.stack.tcp.charged == 0
    # The ACK was received into a buffer posted at open, exactly L after the send: the
    # receive itself allocated nothing (one buffer used, no refill before 16).
    assert net.device.stats.rx_packets == 1 and len(net.device.ring) == RING - 1
    assert not [c for c in calls if c["task"] is not me]
    assert sock.stats.acks == 1 and trio.current_time() >= sent_at + latency


async def test_send_beyond_sndbuf_waits_for_an_ack(
    make_net: MakeNet, autojump_clock: trio.testing.MockClock
) -> None:
    """sk_stream_wait_memory: a sender finds sk_wmem_queued (truesize: 1280 of skb head and
    the data) at sk_sndbuf and waits (named wait "sndbuf") until an ACK frees space.  The
    first skb is charged whatever sndbuf says (tcp_stream_alloc_skb forces the first skb
    of an empty queue) and fills the queue past the 8192 of SO_SNDBUF."""
    net = make_net()
    latency = 1.0
    sock, _peer = net.socket("nbd0", SWAP, latency=latency, sndbuf=2 * PAGE_SIZE)
    assert sock.sndbuf == 2 * PAGE_SIZE and sock.tcp.sndbuf_locked
    t0 = trio.current_time()
    await sock.send_all(bytes(2 * PAGE_SIZE))  # fills sndbuf, does not wait
    assert trio.current_time() == t0
    assert sock.tcp.wmem_queued == 1280 + 2 * PAGE_SIZE > sock.sndbuf
    done: list[float] = []

    async def sender() -> None:
        await sock.send_all(bytes(PAGE_SIZE))
        done.append(trio.current_time())

    async with trio.open_nursery() as nursery:
        nursery.start_soon(sender, name="sender")
        await wait_all_tasks_blocked()
        assert wait_of(net.memory, "sender") == "sndbuf"
        assert sock.tx_pages == 2 and not done
    assert done == [pytest.approx(t0 + latency)]  # released by the ACK of the first skb
    assert sock.stats.acks == 1 and sock.tx_pages == 1
    assert sock.sndbuf == 2 * PAGE_SIZE  # SOCK_SNDBUF_LOCK: never moved


# -- the ring -----------------------------------------------------------------------------


@pytest.mark.patches_model
async def test_ring_posted_at_open_in_page_frags_with_gfp_kernel(
    make_net: MakeNet, autojump_clock: trio.testing.MockClock
) -> None:
    """virtnet_open / e1000_open fill the ring in process context (GFP_KERNEL); the frag
    allocator carves two 2048-byte buffers from each page (page_frag_alloc)."""
    net = make_net()
    calls = record_allocations(net.memory)
    free_before = net.memory.nr_free_pages
    await net.opened()
    assert len(net.device.ring) == RING and net.device.pages == RING_PAGES
    assert len(calls) == RING_PAGES
    assert all(c["gfp"] == GFP_KERNEL and not c["flags"] & PF.SOFTIRQ for c in calls)
    # A netdev_alloc_skb driver posts whole skbs: build_skb took a head for each buffer
    # from skbuff_head_cache, 16 a page.
    heads = net.memory.slab[SKBUFF_HEAD_CACHE]
    assert heads.active_objs == RING and heads.nr_pages == RING // 16
    assert all(b.head is not None for b in net.device.ring)
    assert net.memory.nr_free_pages == free_before - RING_PAGES - RING // 16


async def test_packets_use_posted_buffers_held_until_read(
    make_net: MakeNet, autojump_clock: trio.testing.MockClock
) -> None:
    """DESIGN §4.2 RX: a packet (one MSS) is received into a buffer posted before it came —
    receiving allocates nothing — and the buffer stays with the socket until its consumer
    reads; a page goes back when both its buffers are freed."""
    net = make_net()
    free0 = await net.opened()
    sock, peer = net.socket("noise0", NOISE, latency=0.2)
    await peer.send_all(b"a" * MSS + b"b" * MSS + b"c" * 100)
    await trio.sleep(0.1)
    assert sock.rx_pages == 0  # still on the wire: not yet due
    await trio.sleep(0.2)
    assert sock.rx_pages == 3 and len(net.device.ring) == RING - 3
    # The ring's pages were already allocated.  The connection's first data puts it in
    # quickack mode: each packet is acknowledged at once, the first ACK's head and linear
    # area from two new slab pages, which their caches keep for the next ones.
    assert sock.stats.acks_sent == 3
    acked = free0 - 2
    assert net.memory.nr_free_pages == acked
    await trio.sleep(5)
    assert sock.rx_pages == 3  # nobody read: still held

    assert await sock.receive_some(MSS) == b"a" * MSS
    assert net.memory.nr_free_pages == acked  # the page's other buffer is still held
    assert await sock.receive_some(MSS) == b"b" * MSS
    assert net.memory.nr_free_pages == acked + 1  # both buffers of the first page freed
    assert await sock.receive_some() == b"c" * 100
    assert sock.rx_pages == 0 and net.memory.nr_free_pages == acked + 1


@pytest.mark.patches_model
@pytest.mark.parametrize(
    ("policy", "gfp"),
    [(NonePolicy, GFP_ATOMIC), (PfmemallocPolicy, GFP_ATOMIC | GFP.MEMALLOC)],
)
async def test_netdev_refill_after_16_buffers_with_the_policys_gfp_in_softirq(
    make_net: MakeNet, autojump_clock: trio.testing.MockClock, policy: type[Policy], gfp: GFP
) -> None:
    """e1000_clean_rx_irq refills once E1000_RX_BUFFER_WRITE (16) buffers were cleaned, in
    softirq; __netdev_alloc_skb adds __GFP_MEMALLOC while a memalloc socket exists (3.6)."""
    net = make_net(policy())
    await net.opened()
    _sock, peer = net.socket("nbd0", SWAP)
    calls = record_allocations(net.memory)
    await peer.send_all(bytes(15 * MSS))
    await wait_all_tasks_blocked()
    assert len(net.device.ring) == RING - 15 and not calls
    await peer.send_all(bytes(MSS))
    await wait_all_tasks_blocked()
    assert len(net.device.ring) == RING
    assert len(calls) == E1000_RX_BUFFER_WRITE // 2  # 16 buffers, 8 pages
    assert all(c["gfp"] == gfp and c["flags"] & PF.SOFTIRQ for c in calls)


async def test_the_window_offered_follows_free_rcvbuf_in_truesize(
    make_net: MakeNet, autojump_clock: trio.testing.MockClock
) -> None:
    """sk_rmem_alloc counts each skb's truesize (its 2048-byte buffer and 256 of sk_buff),
    and the window each ACK offers is half the free receive buffer (tcp_select_window ->
    tcp_space), zero below 1/16 of it; the peer sends no further, so its bytes wait at the
    peer, using no buffer, until the reader frees room and tcp_cleanup_rbuf offers it.

    SO_RCVBUF 4609: the first window is one segment (tcp_select_initial_window rounds half
    the buffer, 2305, down to a segment); the delayed ACK offers (4609 - 2304) / 2 = 1153
    more, then nothing (1 byte free of half a buffer)."""
    net = make_net()
    await net.opened()
    truesize = 2048 + SKB_HEAD_TRUESIZE
    sock, peer = net.socket("noise0", NOISE, rcvbuf=2 * truesize + 1)
    assert sock.tcp.rcv_wnd == MSS
    await peer.send_all(bytes(5 * MSS))
    await trio.sleep(1)
    assert sock.rx_pages == 2 and sock.stats.rx_bytes == MSS + 1153
    assert sock.tcp.rmem_alloc == 2 * truesize <= sock.rcvbuf
    assert sock.tcp.receive_window() == 0 and sock.stats.acks_sent == 2
    assert len(net.device.ring) == RING - 2
    assert wait_of(net.memory, net.device.napi_task_name) == "packet"

    assert len(await sock.receive_some(MSS)) == MSS  # a window update goes out
    assert sock.stats.acks_sent == 3
    await trio.sleep(1)
    assert sock.rx_pages == 2 and sock.stats.rx_bytes == MSS + 2 * 1153


async def test_ack_not_received_while_the_ring_is_empty_and_refill_fails(
    make_net: MakeNet, autojump_clock: trio.testing.MockClock
) -> None:
    """kernel-mm §0: the reply to a swap write must be *received*.  Under ``none`` the
    refill is plain GFP_ATOMIC, which stops at 3/8·min (§3): once a flood has taken every
    posted buffer the ACK finds none, the TX pages stay allocated; when memory comes back
    the next poll refills and the ACK gets through."""
    net = make_net()
    await net.opened()
    swap, _ = net.socket("nbd0", SWAP, latency=0.5)
    noise, noise_peer = net.socket("noise0", NOISE, rcvbuf=1 << 20)
    await swap.send_all(bytes(2 * PAGE_SIZE))
    net.hold_until(net.atomic_floor)
    await noise_peer.send_all(bytes(RING * MSS))  # nobody reads: every buffer is taken
    await trio.sleep(1.0)
    assert noise.rx_pages == RING and not net.device.ring
    assert swap.tx_pages == 2 and swap.stats.acks == 0
    assert net.stack.totals()["rx_alloc_fail"] >= 2  # the ACK found no buffer, again
    assert [f.context for f in net.facts if isinstance(f, RefillFailed)][:2] == ["napi"] * 2
    assert wait_of(net.memory, net.device.napi_task_name) == "rx_buffer"

    net.release()
    await trio.sleep(0.25)  # the back-off is at most 0.2 s
    assert swap.tx_pages == 1 and swap.stats.acks == 1  # only the socket's frag page left


# -- sk_filter ----------------------------------------------------------------------------


async def _reserve_buffers(net: Net, sock: ModelledSocket, peer: trio.abc.Stream) -> None:
    """Below the atomic floor, let a memalloc socket use up the ring twice over, so that
    every posted buffer is one refilled from the reserves.  It reads each packet as it
    comes: build_skb's GFP_ATOMIC head allocation cannot dip below the floor, so a refill
    needs the heads of skbs already freed, back in skbuff_head_cache -- which a ring's worth
    of unread packets, while memory is plentiful, grows."""
    await peer.send_all(bytes(RING * MSS))
    received = 0
    while received < RING * MSS:
        received += len(await sock.receive_some())
    for _ in range(2 * RING):
        net.hold_until(net.atomic_floor - 4)  # what the reader freed is taken again
        await peer.send_all(bytes(MSS))
        assert len(await sock.receive_some()) == MSS
    await wait_all_tasks_blocked()
    assert len(net.device.ring) == RING
    assert all(b.pfmemalloc for b in net.device.ring)


async def test_pfmemalloc_buffer_dropped_for_normal_socket_accepted_for_memalloc(
    make_net: MakeNet, autojump_clock: trio.testing.MockClock
) -> None:
    """kernel-mm §2 Drop decision: with a memalloc socket present the refill is
    __GFP_MEMALLOC and below min its pages come from the reserve (pfmemalloc);
    ``sk_filter_trim_cap``: "if (skb_pfmemalloc(skb) && !sock_flag(sk, SOCK_MEMALLOC))
    return -ENOMEM" (PFMemallocDrop).  §6: non-memalloc sockets never hold emergency
    buffers."""
    net = make_net(PfmemallocPolicy())
    await net.opened()
    swap, swap_peer = net.socket("nbd0", SWAP)
    noise, noise_peer = net.socket("noise0", NOISE)
    await _reserve_buffers(net, swap, swap_peer)
    emergency = swap.stats.emergency_rx

    await noise_peer.send_all(b"n" * 100)
    await wait_all_tasks_blocked()
    assert noise.stats.pfmemalloc_drop == 1
    assert noise.rx_pages == 0 and noise.emergency_rx_held() == 0
    assert noise._wire_bytes == 100  # the bytes stay on the wire (retransmitted later)
    assert net.drops("noise0", "pfmemalloc")[0].what == "data"
    await trio.sleep(1.0)  # several retransmissions, each dropped again
    assert noise.stats.pfmemalloc_drop > 1 and noise.emergency_rx_held() == 0

    await swap_peer.send_all(b"s" * 100)
    await wait_all_tasks_blocked()
    assert swap.stats.emergency_rx == emergency + 1 and swap.stats.pfmemalloc_drop == 0
    assert swap.rx_pages == 1 and swap.emergency_rx_held() == 1
    assert await swap.receive_some() == b"s" * 100

    net.release()
    for _ in range(RING):  # use up the reserve buffers; the refill is ordinary again
        await swap_peer.send_all(bytes(MSS))
        await wait_all_tasks_blocked()
        await swap.receive_some()
    assert await noise.receive_some() == b"n" * 100  # delivered once memory is back
    assert noise.stats.emergency_rx == 0 and noise.emergency_rx_held() == 0


async def test_pfmemalloc_ack_for_normal_socket_is_dropped(
    make_net: MakeNet, autojump_clock: trio.testing.MockClock
) -> None:
    """sk_filter applies to every segment, pure ACKs included: an ordinary socket's ACK in
    a pfmemalloc buffer is dropped, so its TX stays allocated, while the memalloc socket's
    ACK is accepted and frees its TX."""
    net = make_net(PfmemallocPolicy())
    await net.opened()
    swap, _ = net.socket("nbd0", SWAP, latency=1.0)
    noise, _ = net.socket("noise0", NOISE, latency=1.0)
    await swap.send_all(bytes(PAGE_SIZE))
    await noise.send_all(bytes(PAGE_SIZE))
    await _reserve_buffers(net, *net.socket("nbd1", SWAP))  # before the ACKs are due
    assert swap.stats.acks == 0
    await trio.sleep(2.0)
    # The skb freed; the socket keeps only its frag page.
    assert swap.tcp.wmem_queued == 0 and swap.stats.acks == 1 and swap.tx_pages == 1
    assert noise.tcp.wmem_queued == 1280 + PAGE_SIZE and noise.stats.acks == 0
    assert noise.stats.pfmemalloc_drop >= 1
    assert net.drops("noise0", "pfmemalloc")[0].what == "ack"


async def test_none_policy_buffers_are_never_pfmemalloc(
    make_net: MakeNet, autojump_clock: trio.testing.MockClock
) -> None:
    """socket.py: "a policy under which no RX page is ever pfmemalloc simply never
    triggers [the drop rule]".  Under ``none`` the refill is plain GFP_ATOMIC (no
    __GFP_MEMALLOC, softirq without PF_MEMALLOC: §2 __gfp_pfmemalloc_flags gives 0), so
    below 3/8·min it fails instead (§3), whoever opened the socket (kernel/softirq.c
    __do_softirq: "Mask out PF_MEMALLOC as the current task context is borrowed")."""
    net = make_net(NonePolicy())
    await net.opened()
    with memalloc_noreclaim():  # e.g. a reconnect started from a swap write's request task
        swap, swap_peer = net.socket("nbd0", SWAP)
    net.hold_until(net.atomic_floor)
    await swap_peer.send_all(bytes((RING + 4) * MSS))
    await trio.sleep(1.0)
    assert swap.rx_pages == RING and not net.device.ring
    assert net.memory.stat.alloc_emergency == 0
    assert swap.emergency_rx_held() == 0 and net.stack.totals()["PFMemallocDrop"] == 0
    assert net.stack.totals()["rx_alloc_fail"] >= 1


# -- virtio_net ---------------------------------------------------------------------------


@pytest.mark.patches_model
async def test_virtio_refill_ignores_memalloc_sockets_and_queues_refill_work(
    make_net: MakeNet, autojump_clock: trio.testing.MockClock
) -> None:
    """virtnet_receive: try_fill_recv(vi, rq, GFP_ATOMIC) once more than half the ring is
    free, the gfp passed to skb_page_frag_refill unchanged — no __GFP_MEMALLOC whatever
    sockets exist; when it fails, refill_work disables NAPI and refills with GFP_KERNEL
    from a kernel worker, entering the allocator's slow path like any process."""
    net = make_net(PfmemallocPolicy(), driver="virtio")
    await net.opened()
    swap, swap_peer = net.socket("nbd0", SWAP)
    # virtio_net builds each skb's head in the poll with GFP_ATOMIC: below the floor only
    # heads freed before and kept by skbuff_head_cache can be had.  Warm the cache.
    for _ in range(RING // 2 + 1):
        await swap_peer.send_all(bytes(MSS))
        await swap.receive_some()
    await wait_all_tasks_blocked()
    assert len(net.device.ring) == RING and net.device.stats.rx_dropped == 0
    calls = record_allocations(net.memory)
    net.hold_until(net.atomic_floor)
    await swap_peer.send_all(bytes((RING // 2 + 1) * MSS))
    await wait_all_tasks_blocked()
    napi = [c for c in calls if c["flags"] & PF.SOFTIRQ]
    assert napi and all(c["gfp"] == GFP_ATOMIC and c["page"] is None for c in napi)
    assert net.memory.stat.alloc_emergency == 0
    work = [c for c in calls if not c["flags"] & PF.SOFTIRQ]
    assert work and work[0]["gfp"] == GFP_KERNEL and work[0]["flags"] & PF.KTHREAD
    failed = [f.context for f in net.facts if isinstance(f, RefillFailed)]
    assert failed == ["napi", "refill_work"]
    # Nothing to reclaim here, so the worker's allocation failed: "if (still_empty)
    # schedule_delayed_work(&vi->refill, HZ/2)" -- it tries again every half second.
    assert wait_of(net.memory, net.device.refill_task_name) == "refill_retry"
    await trio.sleep(1.2)
    assert net.device.stats.refill_work == 3

    net.release()
    await trio.sleep(1.0)
    assert len(net.device.ring) == RING
    await swap_peer.send_all(bytes(MSS))
    await wait_all_tasks_blocked()
    assert swap.rx_pages == RING // 2 + 2


# -- time ---------------------------------------------------------------------------------


async def test_link_bandwidth_and_softirq_cost_take_virtual_time(
    make_net: MakeNet, autojump_clock: trio.testing.MockClock
) -> None:
    """No buffer fills in zero time: the link carries ``bandwidth`` bytes a second after
    the latency, and each packet costs the softirq ``softirq_cost``."""
    net = make_net(bandwidth=MSS * 10, softirq_cost=0.01)
    await net.opened()
    sock, peer = net.socket("noise0", NOISE, latency=0.5)
    t0 = trio.current_time()
    await peer.send_all(bytes(10 * MSS))
    await sock.receive_some()
    assert trio.current_time() - t0 >= 1.0  # the link took 1 s for 10 MSS
    while sock.stats.rx_bytes < 10 * MSS:
        await sock.receive_some()
    assert trio.current_time() - t0 >= 0.5 + 1.0  # the latency on top
    acked = net.device.tx_acked(PAGE_SIZE, 0.5)
    assert acked == pytest.approx(trio.current_time() + PAGE_SIZE / (MSS * 10) + 0.5)


# -- close --------------------------------------------------------------------------------


async def test_aclose_frees_every_tx_page_and_rx_buffer(
    make_net: MakeNet, autojump_clock: trio.testing.MockClock
) -> None:
    """Closing a socket frees its unacknowledged TX skbs and its unread RX buffers: network
    memory is "used", never "consumed" (kernel-mm §1, §6); closing the device frees the
    ring.  Slab caches keep their empty slabs (min_partial), so the pages not free at the
    end are exactly the caches' pages, every object returned."""
    net = make_net()
    free0 = await net.opened()
    slab = net.memory.slab
    slab0 = slab.nr_pages  # the ring's skb heads

    def free_besides_slab() -> int:
        return net.memory.nr_free_pages + slab.nr_pages - slab0

    sock, peer = net.socket("noise0", NOISE, latency=5.0)
    await peer.send_all(bytes(4 * MSS))
    await trio.sleep(4.9)
    await sock.send_all(bytes(2 * PAGE_SIZE))  # its ACK is due at ~9.9
    await trio.sleep(0.2)  # the RX data became due at 5.0; nobody reads it
    assert sock.tx_pages == 2 and sock.rx_pages == 4
    assert free_besides_slab() == free0 - 2
    assert net.stack.tcp.charged > 0
    # vm.sample's view of the same state: the ring, what sockets hold, tcp_prot's pages.
    assert net.stack.memory_now() == {
        "ring_posted": RING - 4,
        "ring_pages": net.device.pages,
        "rx_queued": 4,
        "tx_pages": 2,
        "tcp_memory_allocated": net.stack.tcp.allocated,
        "tcp_memory_pressure": False,
    }
    await sock.aclose()
    assert sock.tx_pages == 0 and sock.rx_pages == 0
    now = net.stack.memory_now()  # a closed socket holds nothing
    assert (now["rx_queued"], now["tx_pages"], now["tcp_memory_allocated"]) == (0, 0, 0)
    assert free_besides_slab() == free0 + 2  # two pages' buffers all freed
    assert net.stack.tcp.charged == 0 and net.stack.tcp.sockets_allocated == 0
    assert "noise0" not in net.stack.sockets and net.stack.closed == [sock]
    await trio.sleep(10)  # nothing runs on after the close
    assert free_besides_slab() == free0 + 2
    net.stack.close()
    assert net.device.pages == 0
    assert sum(cache.active_objs for cache in slab) == 0
    assert net.memory.nr_free_pages + slab.nr_pages == NR_PAGES
