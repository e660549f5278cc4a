"""The network as memory sees it: ``ModelledSocket`` and ``NetStack`` (DESIGN.md §4.2).

Each test drives one socket end of ``trio.testing.memory_stream_pair()`` and plays the peer
on the other end itself.  Memory is put in a given state by taking pages straight off the
free list (``hold_until``), relative to the zone's watermarks.  Time is trio's virtual
clock (``autojump_clock``): ``trio.sleep`` moves it, ``wait_all_tasks_blocked`` lets every
task run at the current instant.

The small machine: 1024 pages, min_free_kbytes 256 -> min 64, low 80, high 96; GFP_ATOMIC
reaches 3/8·min = 24 (``free > 24``).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import attrs
import pytest
import trio
import trio.testing
from trio.testing import wait_all_tasks_blocked

from client.mm import (
    GFP,
    GFP_ATOMIC,
    GFP_NOIO,
    PAGE_SIZE,
    PF,
    Memory,
    MemoryConfig,
    Page,
    Zone,
    current_task_flags,
    memalloc_noreclaim,
)
from client.net.socket import ModelledSocket, SkbDropped
from client.net.stack import NOISE, SWAP, NetStack
from client.policy import NonePolicy, PfmemallocPolicy, Policy

NR_PAGES = 1024


# -- helpers ------------------------------------------------------------------------------


@attrs.define
class Net:
    memory: Memory
    stack: NetStack
    policy: Policy
    facts: list[object]
    held: list[Page] = attrs.field(factory=list)

    @property
    def wmark_min(self) -> int:
        return self.memory.zones[0].watermarks.min

    @property
    def atomic_floor(self) -> int:
        """3/8·min: a GFP_ATOMIC allocation needs ``free > atomic_floor``
        (__zone_watermark_ok: ALLOC_HIGH halves min, ALLOC_HARDER takes a further quarter)."""
        wmin = self.wmark_min
        wmin -= wmin // 2
        wmin -= wmin // 4
        return wmin

    def hold_until(self, target: int) -> None:
        """Take pages off the free list (fast path while it allows, then directly) until
        ``nr_free_pages == target``; give held pages back if free is below ``target``."""
        memory = self.memory
        while memory.nr_free_pages > target:
            page = memory.allocator.try_alloc() or _fullest(memory).take()
            self.held.append(page)
        while memory.nr_free_pages < target:
            memory.free_page(self.held.pop())

    def release(self) -> None:
        while self.held:
            self.memory.free_page(self.held.pop())

    def drops(self, sock: str, reason: str) -> list[SkbDropped]:
        return [
            f
            for f in self.facts
            if isinstance(f, SkbDropped) and f.sock == sock and f.reason == reason
        ]

    def socket(self, name: str, kind: str, **kw: Any) -> tuple[ModelledSocket, trio.abc.Stream]:
        """A modelled socket on one end of an in-memory pair; the other end is the peer."""
        ours, peer = trio.testing.memory_stream_pair()
        return self.stack.socket(ours, name, kind, **kw), peer


def _fullest(memory: Memory) -> Zone:
    return max(memory.zones, key=lambda z: z.nr_free)


MakeNet = Callable[..., Net]


@pytest.fixture
def make_net(nursery: trio.Nursery) -> MakeNet:
    def make(policy: Policy | None = None) -> Net:
        policy = NonePolicy() if policy is None else policy
        facts: list[object] = []
        memory = Memory.from_config(MemoryConfig(total_bytes=NR_PAGES * PAGE_SIZE), policy=policy)
        stack = NetStack(memory, policy, nursery, observer=facts.append)
        return Net(memory, stack, policy, facts)

    return make


def record_allocations(memory: Memory) -> list[dict[str, Any]]:
    """Wrap ``memory.alloc_page`` (what the socket calls) to record every request."""
    calls: list[dict[str, Any]] = []
    real = memory.alloc_page

    async def alloc_page(gfp: GFP = GFP_NOIO, *, reserve: object | None = None) -> Page | None:
        call = {
            "gfp": gfp,
            "flags": current_task_flags(),
            "task": trio.lowlevel.current_task(),
            "time": trio.current_time(),
            "reserve": reserve,
        }
        calls.append(call)
        page = await real(gfp, reserve=reserve)
        call["page"] = page
        return page

    memory.alloc_page = alloc_page  # type: ignore[method-assign]
    return calls


def wait_of(memory: Memory, task_name: str) -> str | None:
    what = memory.waits.snapshot().get(task_name)
    return None if what is None else what.kind


# -- TX -----------------------------------------------------------------------------------


async def test_tx_pages_charged_in_senders_context_and_held_until_ack(
    make_net: MakeNet, autojump_clock: trio.testing.MockClock
) -> None:
    """DESIGN §4.2 TX: "sending N bytes allocates TX skb memory (pages, rounded up) in the
    sender's context with the socket's gfp"; freed when the peer's ACK has been received,
    ``latency`` after the send (kernel-mm §2 NBD: sock_xmit under PF_MEMALLOC with
    sk_allocation)."""
    net = make_net()
    latency = 0.5
    sock, peer = net.socket("nbd0", SWAP, latency=latency)
    calls = record_allocations(net.memory)
    free0 = net.memory.nr_free_pages
    sent_at = trio.current_time()
    with memalloc_noreclaim():  # as nbd's sock_xmit does
        await sock.send_all(b"x" * (2 * PAGE_SIZE + 1))
    me = trio.lowlevel.current_task()
    tx = [c for c in calls if c["task"] is me]
    assert len(tx) == 3  # 8193 bytes -> 3 pages
    assert all(c["gfp"] == sock.allocation == GFP_NOIO for c in tx)
    assert all(c["flags"] & PF.MEMALLOC and not c["flags"] & PF.SOFTIRQ for c in tx)
    assert sock.tx_pages == 3 and net.memory.nr_free_pages == free0 - 3
    assert await peer.receive_some() == b"x" * (2 * PAGE_SIZE + 1)  # the bytes are real

    await trio.sleep(latency - 0.01)
    assert sock.tx_pages == 3 and sock.stats.acks == 0  # not acknowledged yet
    await trio.sleep(0.02)
    assert sock.tx_pages == 0 and sock.stats.acks == 1
    assert net.memory.nr_free_pages == free0
    # The ACK was received through an RX skb allocated in softirq, exactly L after the send.
    [ack] = [c for c in calls if c["task"] is not me]
    assert ack["flags"] & PF.SOFTIRQ and ack["gfp"] == GFP_ATOMIC
    assert ack["time"] == pytest.approx(sent_at + latency)


async def test_ack_needs_an_rx_skb_and_is_dropped_below_the_atomic_floor(
    make_net: MakeNet, autojump_clock: trio.testing.MockClock
) -> None:
    """kernel-mm §0: the reply to a swap write must be *received*; below 3/8·min a
    GFP_ATOMIC RX skb fails (§3 __zone_watermark_ok), so the ACK is lost and the TX pages
    stay allocated; the retransmitted ACK gets through once memory is freed."""
    net = make_net()
    latency = 0.1
    sock, _peer = net.socket("nbd0", SWAP, latency=latency)
    free0 = net.memory.nr_free_pages
    await sock.send_all(bytes(2 * PAGE_SIZE))
    assert sock.tx_pages == 2
    net.hold_until(net.atomic_floor)

    await trio.sleep(latency + 1.0)
    assert sock.stats.rx_alloc_fail >= 2  # dropped and retried
    assert sock.tx_pages == 2 and sock.stats.acks == 0
    assert net.memory.nr_free_pages == net.atomic_floor
    assert net.drops("nbd0", "no_memory")[0].what == "ack"
    assert not net.drops("nbd0", "pfmemalloc")

    net.release()
    await trio.sleep(0.25)  # the back-off is at most 0.2 s
    assert sock.tx_pages == 0 and sock.stats.acks == 1
    assert net.memory.nr_free_pages == free0


async def test_send_beyond_sndbuf_waits_for_an_ack(
    make_net: MakeNet, autojump_clock: trio.testing.MockClock
) -> None:
    """sk_stream_wait_memory: a sender whose unacknowledged bytes would exceed sndbuf waits
    (named wait "sndbuf") until an ACK frees space."""
    net = make_net()
    latency = 1.0
    sock, _peer = net.socket("nbd0", SWAP, latency=latency, sndbuf=2 * PAGE_SIZE)
    t0 = trio.current_time()
    await sock.send_all(bytes(2 * PAGE_SIZE))  # fills sndbuf, does not wait
    assert trio.current_time() == t0
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


# -- RX -----------------------------------------------------------------------------------


async def test_rx_data_stays_charged_until_the_consumer_reads_it(
    make_net: MakeNet, autojump_clock: trio.testing.MockClock
) -> None:
    """DESIGN §4.2 RX: "Received data stays charged until its consumer takes it" — one
    page per packet of up to a page, allocated when the packet is due (``latency``)."""
    net = make_net()
    sock, peer = net.socket("noise0", NOISE, latency=0.2)
    free0 = net.memory.nr_free_pages
    await peer.send_all(b"a" * PAGE_SIZE + b"b" * PAGE_SIZE + b"c" * 100)
    await trio.sleep(0.1)
    assert sock.rx_pages == 0  # still in the NIC ring: not yet due
    await trio.sleep(0.2)
    assert sock.rx_pages == 3 and net.memory.nr_free_pages == free0 - 3
    await trio.sleep(5)
    assert sock.rx_pages == 3  # nobody read: still charged

    assert await sock.receive_some(PAGE_SIZE) == b"a" * PAGE_SIZE
    assert sock.rx_pages == 2 and net.memory.nr_free_pages == free0 - 2
    assert await sock.receive_some() == b"b" * PAGE_SIZE + b"c" * 100
    assert sock.rx_pages == 0 and net.memory.nr_free_pages == free0


async def test_rcvbuf_stops_the_softirq_until_the_consumer_reads(
    make_net: MakeNet, autojump_clock: trio.testing.MockClock
) -> None:
    """sk_rcvbuf: the softirq takes no more once a socket holds rcvbuf bytes (named wait
    "rcvbuf", woken by the consumer); the rest waits in the NIC ring, uncharged."""
    net = make_net()
    sock, peer = net.socket("noise0", NOISE, rcvbuf=2 * PAGE_SIZE)
    free0 = net.memory.nr_free_pages
    await peer.send_all(bytes(5 * PAGE_SIZE))
    await trio.sleep(1)
    assert sock.rx_pages == 2 and net.memory.nr_free_pages == free0 - 2
    assert wait_of(net.memory, sock.rx_task_name) == "rcvbuf"

    assert len(await sock.receive_some(PAGE_SIZE)) == PAGE_SIZE
    await wait_all_tasks_blocked()
    assert sock.rx_pages == 2  # took exactly one more page, then stopped again
    assert sock.stats.rx_bytes == 3 * PAGE_SIZE
    assert wait_of(net.memory, sock.rx_task_name) == "rcvbuf"


# -- sk_filter ----------------------------------------------------------------------------


async def test_pfmemalloc_rx_page_dropped_for_normal_socket_accepted_for_memalloc(
    make_net: MakeNet, autojump_clock: trio.testing.MockClock
) -> None:
    """kernel-mm §2 Drop decision: with a memalloc socket present every RX skb is
    __GFP_MEMALLOC and below min comes from the reserve (pfmemalloc);
    ``sk_filter_trim_cap``: "if (skb_pfmemalloc(skb) && !sock_flag(sk, SOCK_MEMALLOC))
    return -ENOMEM" (PFMemallocDrop).  §6: non-memalloc sockets never hold emergency
    buffers."""
    net = make_net(PfmemallocPolicy())
    swap, swap_peer = net.socket("nbd0", SWAP)
    noise, noise_peer = net.socket("noise0", NOISE)
    assert net.stack.rx_gfp() & GFP.MEMALLOC
    below = net.atomic_floor - 4
    net.hold_until(below)

    await noise_peer.send_all(b"n" * 100)
    await wait_all_tasks_blocked()
    assert noise.stats.pfmemalloc_drop == 1
    assert noise.rx_pages == 0 and noise.emergency_rx_held() == 0
    assert noise.stats.emergency_rx == 0
    assert net.memory.nr_free_pages == below  # the page went back at once
    assert noise._ring_bytes == 100  # the bytes stay in the ring (retransmitted later)
    assert net.drops("noise0", "pfmemalloc")[0].what == "data"
    await trio.sleep(1.0)  # several retransmissions, each dropped again
    assert noise.stats.pfmemalloc_drop > 1 and noise.emergency_rx_held() == 0
    assert noise.rx_pages == 0 and net.memory.nr_free_pages == below

    await swap_peer.send_all(b"s" * 100)
    await wait_all_tasks_blocked()
    assert swap.stats.emergency_rx == 1 and swap.stats.pfmemalloc_drop == 0
    assert swap.rx_pages == 1 and swap.emergency_rx_held() == 1
    assert net.memory.nr_free_pages == below - 1
    assert await swap.receive_some() == b"s" * 100
    assert net.memory.nr_free_pages == below

    net.release()
    assert await noise.receive_some() == b"n" * 100  # delivered once memory is back
    assert noise.stats.emergency_rx == 0 and noise.emergency_rx_held() == 0


async def test_pfmemalloc_ack_for_normal_socket_is_dropped(
    make_net: MakeNet, autojump_clock: trio.testing.MockClock
) -> None:
    """sk_filter applies to every segment, pure ACKs included: below the atomic floor an
    ordinary socket's ACK arrives in a pfmemalloc skb and is dropped, so its TX stays
    allocated, while the memalloc socket's ACK is accepted and frees its TX."""
    net = make_net(PfmemallocPolicy())
    swap, _ = net.socket("nbd0", SWAP, latency=0.1)
    noise, _ = net.socket("noise0", NOISE, latency=0.1)
    await swap.send_all(bytes(PAGE_SIZE))
    await noise.send_all(bytes(PAGE_SIZE))
    net.hold_until(net.atomic_floor - 4)
    await trio.sleep(1.0)
    assert swap.tx_pages == 0 and swap.stats.acks == 1 and swap.stats.emergency_rx == 1
    assert noise.tx_pages == 1 and noise.stats.acks == 0
    assert noise.stats.pfmemalloc_drop >= 1
    assert net.drops("noise0", "pfmemalloc")[0].what == "ack"


async def test_none_policy_rx_is_never_pfmemalloc_and_fails_below_atomic_floor(
    make_net: MakeNet, autojump_clock: trio.testing.MockClock
) -> None:
    """socket.py: "a policy under which no RX page is ever pfmemalloc simply never
    triggers [the drop rule]".  Under ``none`` RX is plain GFP_ATOMIC (no __GFP_MEMALLOC,
    softirq without PF_MEMALLOC: §2 __gfp_pfmemalloc_flags gives 0), so below 3/8·min it
    fails instead (§3)."""
    net = make_net(NonePolicy())
    swap, swap_peer = net.socket("nbd0", SWAP)
    noise, noise_peer = net.socket("noise0", NOISE)
    net.hold_until(net.atomic_floor)
    await swap_peer.send_all(b"s" * 100)
    await noise_peer.send_all(b"n" * 100)
    await trio.sleep(1.0)
    for sock in (swap, noise):
        assert sock.stats.rx_alloc_fail >= 2
        assert sock.stats.pfmemalloc_drop == 0 and sock.stats.emergency_rx == 0
        assert sock.rx_pages == 0
    assert net.memory.nr_free_pages == net.atomic_floor
    assert net.memory.stat.alloc_emergency == 0

    net.hold_until(net.atomic_floor + 2)  # room for exactly two GFP_ATOMIC pages
    await trio.sleep(0.25)
    for sock in (swap, noise):
        assert sock.rx_pages == 1 and sock.emergency_rx_held() == 0
    assert net.memory.nr_free_pages == net.atomic_floor
    assert net.stack.totals()["PFMemallocDrop"] == 0


async def test_socket_created_by_pf_memalloc_task_gets_plain_softirq_rx(
    make_net: MakeNet, autojump_clock: trio.testing.MockClock
) -> None:
    """The softirq borrows no task's PF_MEMALLOC (kernel/softirq.c __do_softirq: "Mask out
    PF_MEMALLOC as the current task context is borrowed for the softirq"): RX under
    ``none`` stays GFP_ATOMIC whoever opened the socket."""
    net = make_net(NonePolicy())
    with memalloc_noreclaim():  # e.g. a reconnect started from a swap write's request task
        sock, peer = net.socket("nbd1", SWAP)
    net.hold_until(net.atomic_floor - 4)
    await peer.send_all(b"s" * 100)
    await trio.sleep(1.0)
    assert net.memory.stat.alloc_emergency == 0
    assert sock.stats.pfmemalloc_drop == 0
    assert sock.stats.rx_alloc_fail >= 1


# -- close --------------------------------------------------------------------------------


async def test_aclose_frees_every_tx_and_rx_page(
    make_net: MakeNet, autojump_clock: trio.testing.MockClock
) -> None:
    """Closing a socket frees its unacknowledged TX skbs and its unread RX data: network
    memory is "used", never "consumed" (kernel-mm §1, §6)."""
    net = make_net()
    sock, peer = net.socket("noise0", NOISE, latency=5.0)
    free0 = net.memory.nr_free_pages
    await peer.send_all(bytes(3 * PAGE_SIZE))
    await trio.sleep(4.9)
    await sock.send_all(bytes(2 * PAGE_SIZE))  # its ACK is due at ~9.9
    await trio.sleep(0.2)  # the RX data became due at 5.0; nobody reads it
    assert sock.tx_pages == 2 and sock.rx_pages == 3
    assert net.memory.nr_free_pages == free0 - 5
    await sock.aclose()
    assert sock.tx_pages == 0 and sock.rx_pages == 0
    assert net.memory.nr_free_pages == free0
    assert "noise0" not in net.stack.sockets and net.stack.closed == [sock]
    await trio.sleep(10)  # nothing runs on after the close
    assert net.memory.nr_free_pages == free0
