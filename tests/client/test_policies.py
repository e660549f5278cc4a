"""The four reserve policies at their decision points (DESIGN.md §4.3, kernel-mm §1-§3, §6).

Small machines (1024 pages, min_free_kbytes 256 -> pages_min 64; ``none``: min 64, low 80;
GFP_ATOMIC reaches 3/8·min = 24) driven on trio's virtual clock.  Sockets wrap one end of
``trio.testing.memory_stream_pair()``; the test plays the peer on the other end.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import attrs
import pytest
import trio
import trio.testing
from trio.testing import wait_all_tasks_blocked

from client.config import ReserveConfig
from client.mm import (
    GFP,
    GFP_ATOMIC,
    GFP_KERNEL,
    GFP_NOIO,
    MAX_RECLAIM_RETRIES,
    PAGE_SIZE,
    PF,
    Memory,
    MemoryConfig,
    Page,
    Process,
    ProcessKilled,
    Watermarks,
    Zone,
    calculate_watermarks,
    memalloc_noreclaim,
    task_flags,
)
from client.mm.process import as_current
from client.mm.testing import MemorySwapDevice, pattern_content
from client.net.device import NicSettings
from client.net.socket import ModelledSocket
from client.net.stack import NOISE, SWAP, NetStack
from client.policy import (
    MemReserve,
    MemReservePolicy,
    NonePolicy,
    PfmemallocPolicy,
    Policy,
    RecursivePolicy,
)

NR_PAGES = 1024
RING = 32  # receive buffers the rig's NIC posts (16 pages)
MSS = 1448
MIN_FREE_KBYTES = 256  # the kernel's default for 4 MiB: int_sqrt(4096 * 16)
BASE_MIN = MIN_FREE_KBYTES // 4  # pages_min without any reserve


# -- helpers ------------------------------------------------------------------------------


@attrs.define
class Rig:
    memory: Memory
    policy: Policy
    stack: NetStack | None = None
    device: MemorySwapDevice | None = None
    held: list[Page] = attrs.field(factory=list)

    @property
    def wmarks(self) -> Watermarks:
        return self.memory.zones[0].watermarks

    def atomic_floor(self) -> int:
        """3/8·min (§3: ALLOC_HIGH halves min, ALLOC_HARDER takes another quarter)."""
        wmin = self.wmarks.min
        wmin -= wmin // 2
        wmin -= wmin // 4
        return wmin

    def hold_until(self, target: int) -> None:
        """Take pages off the free list until ``nr_free_pages == target`` (the fast path
        while it allows, then straight from the zone), or give held ones back."""
        memory = self.memory
        while memory.nr_free_pages > target:
            self.held.append(memory.allocator.try_alloc() or _fullest(memory).take())
        while memory.nr_free_pages < target:
            memory.free_page(self.held.pop())

    def socket(self, name: str, kind: str, **kw: Any) -> tuple[ModelledSocket, trio.abc.Stream]:
        assert self.stack is not None
        ours, peer = trio.testing.memory_stream_pair()
        return self.stack.socket(ours, name, kind, **kw), peer


def _fullest(memory: Memory) -> Zone:
    return max(memory.zones, key=lambda z: z.nr_free)


MakeRig = Callable[..., Rig]


@pytest.fixture
def make_rig(nursery: trio.Nursery) -> MakeRig:
    def make(policy: Policy, *, swap_pages: int | None = None, **config: Any) -> Rig:
        memory = Memory(MemoryConfig(total_bytes=NR_PAGES * PAGE_SIZE, **config), policy=policy)
        device = None
        if swap_pages is not None:
            device = MemorySwapDevice(nr_pages=swap_pages, latency=0.01)
            memory.swapon(device)
        nic = NicSettings(ring_size=RING, bandwidth=math.inf, softirq_cost=0.0)
        return Rig(memory, policy, NetStack(memory, policy, nursery, nic=nic), device)

    return make


def wait_of(memory: Memory, task_name: str) -> str | None:
    what = memory.waits.snapshot().get(task_name)
    return None if what is None else what.kind


# -- none ---------------------------------------------------------------------------------


async def test_none_swap_socket_is_plain_gfp_noio(make_rig: MakeRig) -> None:
    """kernel-mm §2 NBD before 3.6: sock_xmit sets sk_allocation = GFP_NOIO, nothing else;
    no SOCK_MEMALLOC, so sk_memalloc_socks() is 0 and RX stays GFP_ATOMIC."""
    rig = make_rig(NonePolicy())
    sock, _ = rig.socket("nbd0", SWAP)
    assert sock.allocation == GFP_NOIO and not sock.memalloc
    assert sock.tx_reserve is None
    assert rig.stack is not None
    assert rig.stack.memalloc_socks == 0
    assert rig.stack.rx_gfp() == GFP_ATOMIC and rig.stack.rx_reserve() is None
    assert rig.memory.zones[0].watermarks.min == BASE_MIN  # no reserve raises min


async def test_none_tx_from_pf_memalloc_task_goes_below_min(
    make_rig: MakeRig, autojump_clock: trio.testing.MockClock
) -> None:
    """§2 __gfp_pfmemalloc_flags: "!in_interrupt() && PF_MEMALLOC -> ALLOC_NO_WATERMARKS":
    reclaim's own TX (kswapd, direct reclaim) dips below min, even below the atomic floor:
    the skb's head (a new skbuff_fclone_cache slab), its linear area (kmalloc_reserve's
    second try, a new kmalloc-1k slab) and its two pages of data."""
    rig = make_rig(NonePolicy())
    sock, _ = rig.socket("nbd0", SWAP)
    floor = rig.atomic_floor()
    rig.hold_until(floor)
    with memalloc_noreclaim():
        await sock.send_all(bytes(2 * PAGE_SIZE))
    assert sock.tx_pages == 2
    assert rig.memory.nr_free_pages == floor - 4
    assert rig.memory.stat.alloc_emergency == 4  # ALLOC_NO_WATERMARKS, page->pfmemalloc


async def test_none_rx_cannot_go_below_three_eighths_of_min(
    make_rig: MakeRig, autojump_clock: trio.testing.MockClock
) -> None:
    """§3: GFP_ATOMIC (ALLOC_HIGH|ALLOC_HARDER) reaches 3/8·min and no further; nothing
    under ``none`` lets the reply to a swap write use the reserve below it."""
    rig = make_rig(NonePolicy())
    sock, peer = rig.socket("nbd0", SWAP)
    await wait_all_tasks_blocked()  # the device posted its ring
    floor = rig.atomic_floor()
    assert floor == 3 * rig.wmarks.min // 8
    rig.hold_until(floor + 1)
    await peer.send_all(bytes((RING + 16 + 1) * MSS))
    await trio.sleep(1.0)
    # The ring's 32 buffers.  The one page above the floor went to the first ACK's head (a
    # new skbuff_head_cache slab); its linear area could not be had, nor could any ACK's
    # after it, nor the refill's pages: the packet after the 32 finds no buffer.
    assert sock.rx_pages == RING and sock.stats.ack_failed == RING
    assert rig.memory.nr_free_pages == floor
    assert rig.memory.slab["skbuff_head_cache"].nr_slabs == RING // 16 + 1
    assert rig.stack is not None and rig.stack.totals()["rx_alloc_fail"] >= 2
    assert sock.stats.pfmemalloc_drop == 0 and sock.emergency_rx_held() == 0
    assert rig.memory.stat.alloc_emergency == 0


# -- pfmemalloc ---------------------------------------------------------------------------


async def test_pfmemalloc_sk_set_memalloc_on_swap_socket_only(make_rig: MakeRig) -> None:
    """§2 sk_set_memalloc: SOCK_MEMALLOC and sk_allocation |= __GFP_MEMALLOC; nbd:
    GFP_NOIO | __GFP_MEMALLOC.  Other sockets are untouched."""
    rig = make_rig(PfmemallocPolicy())
    swap, _ = rig.socket("nbd0", SWAP)
    noise, _ = rig.socket("noise0", NOISE)
    assert swap.memalloc and swap.allocation == GFP_NOIO | GFP.MEMALLOC
    assert not noise.memalloc and noise.allocation == GFP_NOIO
    # "the min watermark itself is the PFMEMALLOC reserve": no extra pages.
    assert rig.memory.zones[0].watermarks.min == BASE_MIN


async def test_pfmemalloc_rx_gfp_has_memalloc_only_while_a_memalloc_socket_exists(
    make_rig: MakeRig,
) -> None:
    """§2 __alloc_skb: "if (sk_memalloc_socks() && (flags & SKB_ALLOC_RX)) gfp_mask |=
    __GFP_MEMALLOC"."""
    policy = PfmemallocPolicy()
    assert policy.rx_gfp(0) == GFP_ATOMIC
    assert policy.rx_gfp(1) == GFP_ATOMIC | GFP.MEMALLOC
    rig = make_rig(policy)
    assert rig.stack is not None
    rig.socket("noise0", NOISE)
    assert rig.stack.memalloc_socks == 0 and rig.stack.rx_gfp() == GFP_ATOMIC
    swap, _ = rig.socket("nbd0", SWAP)
    assert rig.stack.memalloc_socks == 1
    assert rig.stack.rx_gfp() == GFP_ATOMIC | GFP.MEMALLOC
    await swap.aclose()
    assert rig.stack.memalloc_socks == 0 and rig.stack.rx_gfp() == GFP_ATOMIC


async def test_pfmemalloc_throttles_user_direct_reclaim_at_half_sum_of_min(
    make_rig: MakeRig, autojump_clock: trio.testing.MockClock
) -> None:
    """§2 throttle_direct_reclaim at the start of try_to_free_pages: allow_direct_reclaim
    fails when free <= Σmin/2; count PGSCAN_DIRECT_THROTTLE, wake kswapd, wait on
    pfmemalloc_wait — a __GFP_FS caller "killably until woken" by kswapd once the check
    passes."""
    policy = PfmemallocPolicy()
    rig = make_rig(policy, zones=(("DMA32", 0.25), ("Normal", 0.75)))
    memory = rig.memory
    half = sum(z.watermarks.min for z in memory.zones) // 2
    assert half == BASE_MIN // 2
    rig.hold_until(half)
    assert not policy.allow_direct_reclaim()
    got: list[Page | None] = []

    async def user() -> None:
        got.append(await memory.alloc_page(GFP_KERNEL))

    async with trio.open_nursery() as nursery:
        nursery.start_soon(user, name="user")
        await wait_all_tasks_blocked()
        assert wait_of(memory, "user") == "pfmemalloc_wait"
        assert memory.stat.pgscan_direct_throttle == 1 and policy.throttled == 1
        assert memory.stat.allocstall == 0  # throttled before reclaiming
        await trio.sleep(30)  # a __GFP_FS caller has no timeout
        assert wait_of(memory, "user") == "pfmemalloc_wait" and not got
        policy.kswapd_pass()  # still not above half: nobody is woken
        await wait_all_tasks_blocked()
        assert not got and policy.throttle_wakeups == 0
        rig.hold_until(3 * BASE_MIN)  # kswapd freed memory ...
        assert policy.allow_direct_reclaim()
        policy.kswapd_pass()  # ... and wakes the throttled
    assert got and got[0] is not None
    assert policy.throttle_wakeups == 1 and memory.stat.pgscan_direct_throttle == 1


async def test_pfmemalloc_does_not_throttle_above_half_sum_of_min(make_rig: MakeRig) -> None:
    """§2: ``ok = free > reserve/2`` — one page above half passes."""
    policy = PfmemallocPolicy()
    rig = make_rig(policy)
    rig.hold_until(BASE_MIN // 2 + 1)
    assert policy.allow_direct_reclaim()
    with trio.move_on_after(0) as scope:  # it must not even reach a checkpoint that waits
        await policy.throttle_direct_reclaim(GFP_KERNEL)
    assert not scope.cancelled_caught
    assert rig.memory.stat.pgscan_direct_throttle == 0


@pytest.mark.parametrize("flags", [PF.KTHREAD, PF.KSWAPD | PF.MEMALLOC], ids=["kthread", "kswapd"])
async def test_pfmemalloc_never_throttles_kernel_threads(
    make_rig: MakeRig, autojump_clock: trio.testing.MockClock, flags: PF
) -> None:
    """§2 throttle_direct_reclaim: "Kernel threads should not be throttled"."""
    policy = PfmemallocPolicy()
    rig = make_rig(policy)
    rig.hold_until(0)
    t0 = trio.current_time()
    with task_flags(flags):
        await policy.throttle_direct_reclaim(GFP_KERNEL)
    assert trio.current_time() == t0
    assert rig.memory.stat.pgscan_direct_throttle == 0 and policy.throttled == 0


async def test_pfmemalloc_nofs_caller_waits_at_most_one_second(
    make_rig: MakeRig, autojump_clock: trio.testing.MockClock
) -> None:
    """§2: "A !__GFP_FS caller waits at most HZ (1 s) on pgdat->pfmemalloc_wait"."""
    policy = PfmemallocPolicy()
    rig = make_rig(policy)
    rig.hold_until(BASE_MIN // 2)
    t0 = trio.current_time()
    await policy.throttle_direct_reclaim(GFP_NOIO)
    assert trio.current_time() - t0 == pytest.approx(1.0)
    assert rig.memory.stat.pgscan_direct_throttle == 1


async def test_pfmemalloc_nofs_caller_waits_at_most_one_second_across_wakeups(
    make_rig: MakeRig, autojump_clock: trio.testing.MockClock
) -> None:
    """§2: a !__GFP_FS caller is throttled for at most HZ in total, even if kswapd wakes it
    and the free pages are gone again before it runs."""
    policy = PfmemallocPolicy()
    rig = make_rig(policy)
    low = BASE_MIN // 2
    rig.hold_until(low)
    done: list[float] = []
    t0 = trio.current_time()

    async def reclaimer() -> None:
        await policy.throttle_direct_reclaim(GFP_NOIO)
        done.append(trio.current_time() - t0)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(reclaimer, name="nofs reclaimer")
        for _ in range(3):
            await trio.sleep(0.6)
            rig.hold_until(low + 10)
            policy.kswapd_pass()  # the check passes: kswapd wakes the waiter ...
            rig.hold_until(low)  # ... but others take the pages before it runs
    assert done and done[0] <= 1.0 + 1e-9


async def test_pfmemalloc_allows_direct_reclaim_once_kswapd_has_given_up(
    make_rig: MakeRig, autojump_clock: trio.testing.MockClock
) -> None:
    """§7, §5 item 4 allow_direct_reclaim: "if (pgdat->kswapd_failures >=
    MAX_RECLAIM_RETRIES) return true" — kswapd has given up, nobody would wake the
    throttled. Free 32 = Σmin/2 fails the watermark check; 15 failures still throttle,
    16 let even a __GFP_FS caller (no timeout) through at once, uncounted."""
    policy = PfmemallocPolicy()
    rig = make_rig(policy)
    rig.hold_until(BASE_MIN // 2)
    reclaimer = rig.memory.reclaimer
    reclaimer.kswapd_failures = MAX_RECLAIM_RETRIES - 1
    assert MAX_RECLAIM_RETRIES == 16 and not policy.allow_direct_reclaim()
    reclaimer.kswapd_failures = MAX_RECLAIM_RETRIES
    assert policy.allow_direct_reclaim()
    t0 = trio.current_time()
    await policy.throttle_direct_reclaim(GFP_KERNEL)
    assert trio.current_time() == t0
    assert rig.memory.stat.pgscan_direct_throttle == 0 and policy.throttled == 0


async def test_pfmemalloc_kswapd_wakes_the_throttled_before_it_sleeps(
    make_rig: MakeRig, autojump_clock: trio.testing.MockClock
) -> None:
    """§7 prepare_kswapd_sleep: "if (waitqueue_active(&pgdat->pfmemalloc_wait))
    wake_up_all(...)" — unlike balance_pgdat's wake-up, whether or not the check passes
    when kswapd looks. Free 32 = Σmin/2: kswapd_pass leaves the __GFP_FS caller asleep;
    prepare_kswapd_sleep wakes it, it re-checks and is throttled again (the same throttle,
    counted once). The race it closes: kswapd goes to sleep with the check failing, then
    "a large process exits" (free 192) before the woken task re-checks — it goes on."""
    policy = PfmemallocPolicy()
    rig = make_rig(policy)
    memory = rig.memory
    rig.hold_until(BASE_MIN // 2)
    passed: list[float] = []

    async def user() -> None:
        await policy.throttle_direct_reclaim(GFP_KERNEL)
        passed.append(trio.current_time())

    async with trio.open_nursery() as nursery:
        nursery.start_soon(user, name="user")
        await wait_all_tasks_blocked()
        assert wait_of(memory, "user") == "pfmemalloc_wait"
        policy.kswapd_pass()  # balance_pgdat's wake-up needs the check to pass
        await wait_all_tasks_blocked()
        assert wait_of(memory, "user") == "pfmemalloc_wait" and not passed
        policy.prepare_kswapd_sleep()  # premature: woken, re-checks, throttled again
        await wait_all_tasks_blocked()
        assert wait_of(memory, "user") == "pfmemalloc_wait" and not passed
        assert memory.stat.pgscan_direct_throttle == 1 and policy.throttle_wakeups == 0
        assert not policy.allow_direct_reclaim()
        policy.prepare_kswapd_sleep()  # kswapd goes to sleep with the check failing ...
        rig.hold_until(3 * BASE_MIN)  # ... a large process exits before the task runs
    assert passed == [0.0]
    assert memory.stat.pgscan_direct_throttle == 1 and policy.throttle_wakeups == 0


async def test_pfmemalloc_throttled_task_gets_through_after_kswapd_gives_up(
    make_rig: MakeRig, autojump_clock: trio.testing.MockClock
) -> None:
    """§5 item 4 (Shakeel Butt, 2017): kswapd and a throttled reclaimer must not ping-pong
    forever. No swap and no LRU pages: nothing is reclaimable. Free 32 = Σmin/2 throttles
    a GFP_KERNEL allocation; each fruitless balance_pgdat pass counts a kswapd failure,
    and prepare_kswapd_sleep wakes the task, which wakes kswapd again (allow_direct_reclaim
    fails) — 16 passes, then allow_direct_reclaim passes, wakeup_kswapd gives up on the
    hopeless node, and the task goes on to direct reclaim (17 fruitless tries: 1 +
    MAX_RECLAIM_RETRIES) and the OOM killer, which finds nothing to kill: it fails."""
    policy = PfmemallocPolicy()
    rig = make_rig(policy)
    memory = rig.memory
    rig.hold_until(BASE_MIN // 2)
    with trio.fail_after(60):
        async with memory.running():
            page = await memory.alloc_page(GFP_KERNEL)
    assert page is None and trio.current_time() == 0.0
    assert memory.stat.pgscan_direct_throttle == 1 and policy.throttled == 1
    assert memory.stat.pageoutrun == MAX_RECLAIM_RETRIES == memory.reclaimer.kswapd_failures
    assert memory.stat.pgscan_kswapd == 0 and memory.stat.allocstall == MAX_RECLAIM_RETRIES + 1
    assert memory.stat.oom_kill == 0 and memory.stat.alloc_fail == 1


async def test_pfmemalloc_never_throttles_a_task_with_a_fatal_signal_pending(
    make_rig: MakeRig, autojump_clock: trio.testing.MockClock
) -> None:
    """§5 item 6 throttle_direct_reclaim: "If a fatal signal is pending, this process
    should not throttle. It should return quickly so it can exit and free its memory".
    Free 32 = Σmin/2 would throttle a __GFP_FS caller for good; a killed process's task
    returns at once, uncounted, and does not skip reclaim (False)."""
    policy = PfmemallocPolicy()
    rig = make_rig(policy)
    rig.hold_until(BASE_MIN // 2)
    victim = rig.memory.new_process("victim")
    victim.kill()
    with as_current(victim), trio.move_on_after(10) as scope:
        assert await policy.throttle_direct_reclaim(GFP_KERNEL) is False
    assert not scope.cancelled_caught and trio.current_time() == 0.0
    assert rig.memory.stat.pgscan_direct_throttle == 0 and policy.throttled == 0


async def test_pfmemalloc_kill_ends_a_nofs_throttle_and_reports_the_signal(
    make_rig: MakeRig, autojump_clock: trio.testing.MockClock
) -> None:
    """§2: SIGKILL ends wait_event_interruptible_timeout too, and then "if
    (fatal_signal_pending(current)) return true". A GFP_NOIO caller at free 32 would wait
    HZ = 1 s; killed at t=0.5 it returns True at t=0.5."""
    policy = PfmemallocPolicy()
    rig = make_rig(policy)
    rig.hold_until(BASE_MIN // 2)
    victim = rig.memory.new_process("victim")
    results: list[tuple[bool, float]] = []

    async def reclaimer() -> None:
        with as_current(victim):
            results.append((await policy.throttle_direct_reclaim(GFP_NOIO), trio.current_time()))

    async with trio.open_nursery() as nursery:
        nursery.start_soon(reclaimer, name="victim")
        await trio.sleep(0.5)
        assert wait_of(rig.memory, "victim") == "pfmemalloc_wait"
        victim.kill()
    assert results == [(True, 0.5)]
    assert rig.memory.stat.pgscan_direct_throttle == 1


async def test_pfmemalloc_oom_kill_ends_the_throttle_of_its_victim(
    make_rig: MakeRig, autojump_clock: trio.testing.MockClock
) -> None:
    """§2, §5 item 6: the __GFP_FS caller waits killably (wait_event_killable), and
    "if (fatal_signal_pending(current)) return true": try_to_free_pages returns 1 without
    reclaiming. A fault of "victim" at free 32 = Σmin/2 is throttled with no timeout; at
    t=5 the OOM killer (another task's) picks it. Its fault ends at t=5: the throttle
    returns, the retry is not throttled again (pgscan_direct_throttle stays 1), ALLOC_OOM's
    half of min is no lower than the 32 free, reclaim finds nothing (no swap) 1 + 16 times,
    and the victim's allocation fails rather than loop (6.1 __alloc_pages_slowpath: "Avoid
    allocations with no watermarks from looping endlessly"): the fault gives up with
    ProcessKilled."""
    policy = PfmemallocPolicy()
    rig = make_rig(policy)
    memory = rig.memory
    rig.hold_until(BASE_MIN // 2)
    victim = memory.new_process("victim")
    ended: list[tuple[str, float]] = []

    async def fault() -> None:
        try:
            await memory.touch(victim, 0, write=True, content_fn=pattern_content)
        except ProcessKilled:
            ended.append(("killed", trio.current_time()))

    with trio.fail_after(60):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(fault, name="victim")
            await trio.sleep(5)
            assert wait_of(memory, "victim") == "pfmemalloc_wait" and not ended
            assert memory.stat.allocstall == 0
            assert memory.oom.out_of_memory(GFP_KERNEL)
    assert ended == [("killed", 5.0)] and victim.killed
    assert memory.stat.pgscan_direct_throttle == 1 and policy.throttled == 1
    assert memory.stat.oom_kill == 1 and memory.stat.allocstall == MAX_RECLAIM_RETRIES + 1


# -- reserve (Zijlstra) -------------------------------------------------------------------

BEAN_COUNTED = "bean-counted"  # [reserve] tx_accounting: our variant, not the series'


async def test_reserve_tree_propagates_to_root_and_raises_min(make_rig: MakeRig) -> None:
    """§1 mem_reserve_connect: a child's pages and limit count in every ancestor;
    sk_adjust_memalloc adds TX_RESERVE_PAGES (32) per memalloc socket to "protocol TX pages"
    (mem_reserve_pages_add) and connects the network subtree when the first memalloc
    socket appears (the RX reserve "only added once"); adjust_memalloc_reserve adds the
    root's pages to min_free_kbytes (setup_watermarks)."""
    policy = MemReservePolicy()
    cfg = policy.config
    assert (cfg.tx_pages, cfg.rx_pages, cfg.block_pages) == (32, 128, 16)
    assert cfg.tx_accounting == "posted"
    rig = make_rig(policy)
    assert policy.root.pages == policy.root.limit == cfg.block_pages
    assert policy.extra_min_pages() == cfg.block_pages
    assert rig.wmarks.min == BASE_MIN + cfg.block_pages

    rig.socket("noise0", NOISE)  # not a memalloc socket: the tree does not change
    assert policy.root.pages == cfg.block_pages

    swap, _ = rig.socket("nbd0", SWAP)
    total = cfg.tx_pages + cfg.rx_pages + cfg.block_pages
    assert swap.memalloc and swap.allocation == GFP_NOIO | GFP.MEMALLOC
    # "@tx_reserve_pages is an upper-bound of memory used for TX hence we need not account
    # the pages like we do for RX pages": the pages are in the tree, no node is charged.
    assert swap.tx_reserve is None
    assert policy.tx_pages.pages == policy.tx_pages.limit == cfg.tx_pages
    assert policy.tx.pages == policy.tx.limit == cfg.tx_pages
    assert policy.rx.pages == policy.rx.limit == cfg.rx_pages
    assert policy.network.pages == cfg.tx_pages + cfg.rx_pages
    assert policy.root.pages == policy.root.limit == total
    assert policy.extra_min_pages() == policy.root.pages
    expected = calculate_watermarks([NR_PAGES], MIN_FREE_KBYTES, 10, total)[0]
    assert rig.wmarks == expected and rig.wmarks.min == BASE_MIN + total

    rig.socket("nbd1", SWAP)  # a second socket adds its TX pages, not the RX reserve again
    assert policy.tx_pages.pages == 2 * cfg.tx_pages
    assert policy.root.pages == total + cfg.tx_pages
    assert rig.wmarks.min == BASE_MIN + total + cfg.tx_pages


async def test_reserve_charge_succeeds_below_limit_then_nonsleeping_fails(
    make_rig: MakeRig,
) -> None:
    """§1 __mem_reserve_charge: "if (charge < 0 || res->usage + charge < res->limit)" —
    strictly below the limit, so a node of limit 4 takes 3 charges; at the limit
    kmalloc_reserve "return NULL when !__GFP_WAIT"."""
    policy = MemReservePolicy()
    make_rig(policy)
    node = MemReserve("test", pages=4, limit=4)
    for _ in range(3):
        assert await policy.charge_emergency(GFP_ATOMIC, node)
    assert node.usage == node.peak == 3 and node.charge_failed == 0
    assert not await policy.charge_emergency(GFP_ATOMIC, node)
    assert node.usage == 3 and node.charge_failed == 1
    policy.uncharge_emergency(node)
    assert node.usage == 2
    assert await policy.charge_emergency(GFP_ATOMIC, node)
    # A node of limit 1 can never be charged (one object's worth of bytes fails "<").
    assert not await policy.charge_emergency(GFP_ATOMIC, MemReserve("one", pages=1, limit=1))
    # Plain PF_MEMALLOC work (no reserve given) is not bean counted.
    assert await policy.charge_emergency(GFP_ATOMIC, None)


async def test_reserve_sleeping_charge_waits_for_an_uncharge(
    make_rig: MakeRig, autojump_clock: trio.testing.MockClock
) -> None:
    """§1 kmalloc_reserve step 3: a __GFP_WAIT caller at the limit does
    ``wait_event(res->waitqueue, charge succeeds)``; any uncharge wakes it
    (``wake_up_all``)."""
    policy = MemReservePolicy()
    rig = make_rig(policy)
    node = MemReserve("test TX", pages=2, limit=2, waker="acks")
    assert await policy.charge_emergency(GFP_NOIO, node)
    results: list[tuple[bool, float]] = []
    t0 = trio.current_time()

    async def charger() -> None:
        ok = await policy.charge_emergency(GFP_NOIO, node)
        results.append((ok, trio.current_time() - t0))

    async with trio.open_nursery() as nursery:
        nursery.start_soon(charger, name="charger")
        await wait_all_tasks_blocked()
        what = rig.memory.waits.snapshot()["charger"]
        assert (what.kind, what.resource, what.waker) == ("reserve", "test TX", "acks")
        await trio.sleep(5)
        assert not results and node.waits == 1
        policy.uncharge_emergency(node)
    [(ok, waited)] = results
    assert ok and waited == pytest.approx(5.0)
    assert node.usage == 1


async def test_reserve_tx_as_posted_goes_below_min_uncharged_and_never_waits(
    make_rig: MakeRig, autojump_clock: trio.testing.MockClock
) -> None:
    """sk_set_memalloc: ``sk_allocation |= __GFP_MEMALLOC``, and TX skbs are not
    SKB_ALLOC_RX, so ``__alloc_skb`` never calls rx_emergency_get for them: a swap socket's
    TX below min comes from the reserve without a charge — past tx_pages, and past min,
    with no node to wait on."""
    policy = MemReservePolicy(ReserveConfig(tx_pages=2, rx_pages=8, block_pages=2))
    rig = make_rig(policy)
    swap, _ = rig.socket("nbd0", SWAP)
    memory = rig.memory
    rig.hold_until(rig.atomic_floor() - 4)  # even GFP_ATOMIC would need the reserve
    pages = [await memory.alloc_page(swap.allocation, reserve=swap.tx_reserve) for _ in range(6)]
    assert all(p is not None and p.pfmemalloc and p.reserve is None for p in pages)
    assert memory.stat.alloc_emergency == 6 and policy.reserve_in_use() == 0
    assert policy.tx_pages.usage == 0 and policy.tx_pages.charge_failed == 0
    assert all(row["charge_failed"] == 0 for row in policy.root.rows())


async def test_reserve_rx_is_bean_counted_on_the_skb_reserve_and_fails_at_its_limit(
    make_rig: MakeRig,
) -> None:
    """rx_emergency_get = mem_reserve_kmalloc_charge(&net_skb_reserve, ...): an RX skb that
    needs the reserve (GFP_ATOMIC failed) charges the SKB data reserve; at its limit the
    softirq cannot wait, the allocation fails (the packet is dropped); freeing an emergency
    skb (rx_emergency_put) uncharges."""
    policy = MemReservePolicy(ReserveConfig(tx_pages=2, rx_pages=3, block_pages=2))
    rig = make_rig(policy)
    rig.socket("nbd0", SWAP)
    assert rig.stack is not None
    memory, skb = rig.memory, policy.skb
    gfp = rig.stack.rx_gfp() & ~GFP.DIRECT_RECLAIM
    assert gfp == GFP_ATOMIC | GFP.MEMALLOC and rig.stack.rx_reserve() is skb
    rig.hold_until(rig.atomic_floor())  # GFP_ATOMIC fails: only the reserve can serve
    pages = [await memory.alloc_page(gfp, reserve=skb) for _ in range(2)]
    assert all(p is not None and p.pfmemalloc and p.reserve is skb for p in pages)
    assert skb.usage == 2 and policy.reserve_in_use() == 2
    assert await memory.alloc_page(gfp, reserve=skb) is None  # "usage + charge < limit"
    assert skb.charge_failed == 1 and memory.stat.alloc_fail == 1
    first = pages[0]
    assert first is not None
    memory.free_page(first)
    assert skb.usage == 1 and skb.peak == 2


async def test_reserve_bean_counted_tx_charges_only_emergency_allocations(
    make_rig: MakeRig, autojump_clock: trio.testing.MockClock
) -> None:
    """The bean-counted TX variant (ours): "the bean counting is only done once we hit the
    reserves, the normal mode of operation is not penalised" — an allocation served at or
    above min does not charge; one below min (ALLOC_NO_WATERMARKS) charges the socket's
    node, and kfree_reserve uncharges."""
    policy = MemReservePolicy(
        ReserveConfig(tx_pages=4, rx_pages=8, block_pages=2, tx_accounting=BEAN_COUNTED)
    )
    rig = make_rig(policy)
    swap, _ = rig.socket("nbd0", SWAP)
    node = swap.tx_reserve
    assert isinstance(node, MemReserve) and node.limit == 4
    assert policy.tx_pages.pages == 0 and policy.tx.pages == 4
    memory = rig.memory

    rig.hold_until(rig.wmarks.min + 2)  # below low: the slow path, served at min
    page = await memory.alloc_page(swap.allocation, reserve=node)
    assert page is not None and not page.pfmemalloc
    assert node.usage == node.peak == 0 and memory.stat.alloc_emergency == 0

    rig.hold_until(rig.wmarks.min)  # at min: only the reserve can serve it
    emergency = await memory.alloc_page(swap.allocation, reserve=node)
    assert emergency is not None and emergency.pfmemalloc and emergency.reserve is node
    assert node.usage == 1 and memory.stat.alloc_emergency == 1
    memory.free_page(emergency)
    assert node.usage == 0 and node.peak == 1
    memory.free_page(page)
    assert node.usage == 0


async def test_reserve_bean_counted_tx_at_limit_fails_for_atomic_and_waits_for_noio(
    make_rig: MakeRig, autojump_clock: trio.testing.MockClock
) -> None:
    """The bean-counted TX variant (ours) through the allocator: emergency allocations
    stop at the node's limit; a non-sleeping one fails (charge_failed counted), a sleeping
    one waits until a charged page is freed (kfree_reserve: free, then uncharge and
    wake)."""
    policy = MemReservePolicy(
        ReserveConfig(tx_pages=3, rx_pages=8, block_pages=2, tx_accounting=BEAN_COUNTED)
    )
    rig = make_rig(policy)
    swap, _ = rig.socket("nbd0", SWAP)
    node = swap.tx_reserve
    assert isinstance(node, MemReserve)
    memory = rig.memory
    rig.hold_until(rig.atomic_floor() - 4)  # even GFP_ATOMIC needs the reserve
    pages = [await memory.alloc_page(swap.allocation, reserve=node) for _ in range(2)]
    assert all(p is not None and p.pfmemalloc for p in pages) and node.usage == 2

    atomic = GFP_ATOMIC | GFP.MEMALLOC
    assert await memory.alloc_page(atomic, reserve=node) is None
    assert node.charge_failed == 1 and node.usage == 2

    got: list[Page | None] = []

    async def sender() -> None:
        got.append(await memory.alloc_page(swap.allocation, reserve=node))

    async with trio.open_nursery() as nursery:
        nursery.start_soon(sender, name="sender")
        await wait_all_tasks_blocked()
        assert wait_of(memory, "sender") == "reserve" and not got
        first = pages[0]
        assert first is not None
        memory.free_page(first)  # e.g. an ACK freed a TX skb
    assert got and got[0] is not None and got[0].pfmemalloc
    assert node.usage == 2


async def test_reserve_rows_give_the_reserve_info_table(make_rig: MakeRig) -> None:
    """§1 /proc/reserve_info: the tree depth-first, each node's pages, limit and usage —
    as posted, TX is one "protocol TX pages" node that is never charged."""
    policy = MemReservePolicy()
    rig = make_rig(policy)
    rig.socket("nbd0", SWAP)
    skb = policy.skb
    for _ in range(3):  # bean counting through the policy, as the allocator does
        assert await policy.charge_emergency(GFP_ATOMIC, skb)
    policy.uncharge_emergency(skb)
    rows = policy.root.rows()
    assert [r["reserve"] for r in rows] == [
        "total reserve",
        "  block reserve",
        "  network reserve",
        "    network TX reserve",
        "      protocol TX pages",
        "    network RX reserve",
        "      SKB data reserve",
    ]
    by_name = {r["reserve"].strip(): r for r in rows}
    assert by_name["total reserve"]["pages"] == 32 + 128 + 16
    assert by_name["protocol TX pages"] == {
        "reserve": "      protocol TX pages",
        "pages": 32,
        "limit": 32,
        "usage": 0,
        "peak": 0,
        "charge_failed": 0,
    }
    assert by_name["SKB data reserve"] == {
        "reserve": "      SKB data reserve",
        "pages": 128,
        "limit": 128,
        "usage": 2,
        "peak": 3,
        "charge_failed": 0,
    }
    report = policy.report()
    assert report["reserve_info"] == rows and report["reserve_peak"] == 3
    assert policy.reserve_in_use() == 2


async def test_reserve_bean_counted_rows_keep_a_closed_sockets_node(make_rig: MakeRig) -> None:
    """The bean-counted variant's table: a node per socket under the TX reserve; a closed
    socket's node leaves the tree but not the table (its peak is history)."""
    policy = MemReservePolicy(ReserveConfig(tx_accounting=BEAN_COUNTED))
    rig = make_rig(policy)
    swap, _ = rig.socket("nbd0", SWAP)
    node = swap.tx_reserve
    assert isinstance(node, MemReserve)
    for _ in range(3):
        assert await policy.charge_emergency(GFP_ATOMIC, node)
    policy.uncharge_emergency(node)
    names = [r["reserve"].strip() for r in policy.root.rows()]
    assert names[3:6] == ["network TX reserve", "protocol TX pages", "nbd0 TX"]
    by_name = {r["reserve"].strip(): r for r in policy.root.rows()}
    assert (by_name["nbd0 TX"]["limit"], by_name["nbd0 TX"]["usage"]) == (32, 2)
    policy.socket_closed(swap)
    rows = policy.report()["reserve_info"]
    assert rows[-1]["reserve"] == "nbd0 TX (closed)" and rows[-1]["peak"] == 3
    assert policy.report()["reserve_peak"] == 3


def reserve_state(rig: Rig, policy: MemReservePolicy, sock: str) -> tuple[Watermarks, list[Any]]:
    """The zone's watermarks and the live ``/proc/reserve_info`` rows, ``sock``'s own node
    (bean-counted) under a name of its place rather than of its socket."""
    rows = [
        {**r, "reserve": r["reserve"].replace(sock, "<swap socket>")} for r in policy.root.rows()
    ]
    return rig.wmarks, rows


@pytest.mark.parametrize("tx_accounting", ["posted", BEAN_COUNTED])
async def test_reserve_close_and_reconnect_give_back_exactly_the_sockets_reserve_and_min(
    make_rig: MakeRig, autojump_clock: trio.testing.MockClock, tx_accounting: str
) -> None:
    """Closing a memalloc socket undoes what opening it did (sk_adjust_memalloc with
    -tx_reserve_pages; the bean-counted variant's node disconnected): its TX pages leave
    the root and every ancestor, and the watermarks are recomputed at once without them
    (min falls back).  Each socket a reconnect opens then puts back exactly the tree and
    min the first one had, and each close takes them away again: reconnects neither leak
    reserve (min creeping up) nor leave min raised for a socket that is gone."""
    policy = MemReservePolicy(ReserveConfig(tx_accounting=tx_accounting))
    cfg = policy.config
    rig = make_rig(policy)
    rx_and_block = cfg.rx_pages + cfg.block_pages
    swap, _ = rig.socket("nbd0", SWAP)
    first_node = swap.tx_reserve
    open_state = reserve_state(rig, policy, "nbd0")
    assert rig.wmarks.min == BASE_MIN + cfg.tx_pages + rx_and_block

    await swap.aclose()
    closed_state = reserve_state(rig, policy, "nbd0")
    assert policy.tx.pages == policy.tx.limit == policy.tx_pages.pages == 0
    assert policy.tx.children == [policy.tx_pages]  # no node of the closed socket left
    assert first_node is None or first_node.parent is None
    # The RX reserve stays connected once added ("only added once"), the TX pages are gone.
    assert policy.root.pages == policy.root.limit == rx_and_block
    assert policy.extra_min_pages() == rx_and_block
    expected = calculate_watermarks([NR_PAGES], MIN_FREE_KBYTES, 10, rx_and_block)[0]
    assert rig.wmarks == expected and rig.wmarks.min == BASE_MIN + rx_and_block

    for n in range(1, 4):  # the swap device reconnects, again and again
        again, _ = rig.socket(f"nbd{n}", SWAP)
        if first_node is None:
            assert again.tx_reserve is None  # as posted: TX is bounded, never charged
        else:
            assert isinstance(again.tx_reserve, MemReserve) and again.tx_reserve is not first_node
        assert reserve_state(rig, policy, f"nbd{n}") == open_state
        await again.aclose()
        assert reserve_state(rig, policy, f"nbd{n}") == closed_state


# -- recursive (Lameter) ------------------------------------------------------------------


async def populate(memory: Memory, n: int) -> Process:
    process = memory.new_process("hog")
    for vpage in range(n):
        await memory.touch(process, vpage, write=True, content_fn=pattern_content)
    return process


async def make_clean_swapcache(rig: Rig, n: int) -> Process:
    """``n`` anon pages written to swap by ordinary reclaim; once writeback has completed
    they are clean, unmapped swap-cache pages on the inactive list (§3 anon swap-out path,
    step 4)."""
    memory = rig.memory
    process = await populate(memory, n)
    sc = await memory.reclaimer.shrink(GFP_KERNEL, n)
    assert sc.nr_pageout == n
    await trio.sleep(1)  # the device answers; end_page_writeback
    assert memory.stat.nr_writeback == 0
    assert memory.swap is not None and len(memory.swap.cache) == n
    assert all(not p.dirty and not p.writeback for p in memory.swap.cache.values())
    return process


async def test_recursive_reclaim_frees_clean_pages_without_io(
    make_rig: MakeRig, autojump_clock: trio.testing.MockClock
) -> None:
    """§1 Lameter: "reclaim recursively but only drop clean pages" — a no-I/O reclaim
    (gfp without __GFP_IO) frees clean swap-cache pages and the allocation is retried."""
    policy = RecursivePolicy()
    rig = make_rig(policy, swap_pages=1024)
    assert rig.device is not None
    async with rig.memory.running():
        await make_clean_swapcache(rig, 32)
        writes = len(rig.device.writes())
        free = rig.memory.nr_free_pages
        assert await policy.memalloc_failed(GFP_NOIO)
        assert policy.recursions == 1 and policy.recursive_freed > 0
        assert rig.memory.nr_free_pages == free + policy.recursive_freed
        assert len(rig.device.writes()) == writes  # no swap I/O started


async def test_recursive_reclaim_serves_a_failed_pf_memalloc_allocation(
    make_rig: MakeRig, autojump_clock: trio.testing.MockClock
) -> None:
    """The allocator's slow path: a PF_MEMALLOC allocation that finds nothing even below
    min asks the policy (memalloc_failed) instead of failing, and retries."""
    policy = RecursivePolicy()
    rig = make_rig(policy, swap_pages=1024)
    async with rig.memory.running():
        await make_clean_swapcache(rig, 32)
        rig.hold_until(0)
        with memalloc_noreclaim():
            page = await rig.memory.alloc_page(GFP_NOIO)
        assert page is not None
        assert policy.recursions == 1 and policy.recursive_failed == 0
        assert rig.memory.stat.alloc_fail == 0


async def test_recursive_reclaim_with_only_dirty_anon_fails_and_starts_no_io(
    make_rig: MakeRig, autojump_clock: trio.testing.MockClock
) -> None:
    """§3: "Reclaim only swaps anon pages if __GFP_IO is set" (shrink_page_list: ``if
    (!(sc->gfp_mask & __GFP_IO)) goto keep_locked``); §6: NOIO reclaim never starts swap
    I/O.  With only dirty anon pages the recursion finds nothing and the allocation
    fails."""
    policy = RecursivePolicy()
    rig = make_rig(policy, swap_pages=1024)
    assert rig.device is not None and rig.memory.swap is not None
    async with rig.memory.running():
        process = await populate(rig.memory, 200)
        slots_free = rig.memory.swap.map.nr_free
        free = rig.memory.nr_free_pages
        assert not await policy.memalloc_failed(GFP_NOIO)
        assert policy.recursive_failed == 1 and policy.recursive_freed == 0
        await trio.sleep(1)
        assert rig.device.writes() == [] and rig.memory.stat.pswpout == 0
        assert rig.memory.stat.nr_writeback == 0
        assert rig.memory.swap.map.nr_free == slots_free  # no page even got a slot
        assert len(process.present) == 200 and rig.memory.nr_free_pages == free

        rig.hold_until(0)  # through the allocator: the PF_MEMALLOC allocation fails
        with memalloc_noreclaim():
            assert await rig.memory.alloc_page(GFP_NOIO) is None
        assert policy.recursive_failed == 2 and rig.memory.stat.alloc_fail == 1
        assert rig.device.writes() == []


async def test_other_policies_do_not_recurse(make_rig: MakeRig) -> None:
    """Only ``recursive`` changes memalloc_failed; the others fail a PF_MEMALLOC allocation
    that found nothing ("Avoid recursion of direct reclaim", §2)."""
    for policy in (NonePolicy(), PfmemallocPolicy(), MemReservePolicy()):
        make_rig(policy)
        assert await policy.memalloc_failed(GFP_NOIO) is False
