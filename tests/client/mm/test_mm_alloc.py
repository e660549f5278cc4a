"""The page allocator: fast path, slow path, reserves, policy hooks, OOM."""

from __future__ import annotations

from typing import TYPE_CHECKING

import pytest
import trio
import trio.testing

from client.mm import (
    GFP,
    GFP_ATOMIC,
    GFP_KERNEL,
    GFP_NOFS,
    GFP_NOIO,
    GFP_NOWAIT,
    MAX_RECLAIM_RETRIES,
    OOM_REAPER_DELAY,
    PF,
    AllocEmergency,
    AllocFailed,
    DirectReclaim,
    Memory,
    OomKill,
    OomReaped,
    Page,
    Process,
    ProcessKilled,
    memalloc_noreclaim,
    serving_softirq,
    task_flags,
)
from client.mm.alloc import CONGESTION_WAIT
from client.mm.testing import drain, pattern_content

if TYPE_CHECKING:
    from conftest import Machine, MakeMachine

# 16 MiB, min_free_kbytes 3200: min 800, gap max(200, 4) = 200 -> low 1000, high 1200
PAGES = 4096
MIN, LOW, HIGH = 800, 1000, 1200


@pytest.fixture
def m(make_machine: MakeMachine) -> Machine:
    machine = make_machine(PAGES, min_free_kbytes=3200)
    wm = machine.memory.zones[0].watermarks
    assert (wm.min, wm.low, wm.high) == (MIN, LOW, HIGH)
    return machine


def test_fast_path_stops_at_low(m: Machine) -> None:
    allocator = m.memory.allocator
    taken = 0
    while allocator.try_alloc() is not None:
        taken += 1
    assert taken == PAGES - LOW and m.memory.nr_free_pages == LOW
    assert m.memory.stat.pgalloc == taken


def test_fast_path_prefers_the_highest_zone(make_machine: MakeMachine) -> None:
    machine = make_machine(4096, zones=(("DMA32", 0.75), ("Normal", 0.25)), min_free_kbytes=512)
    dma32, normal = machine.memory.zones
    assert (dma32.nr_pages, normal.nr_pages, dma32.start_pfn, normal.start_pfn) == (
        3072, 1024, 0, 3072
    )  # fmt: skip
    first = machine.memory.allocator.try_alloc()
    assert first is not None and first.zone is normal
    while normal.nr_free > normal.watermarks.low:
        machine.memory.allocator.try_alloc()
    fallback = machine.memory.allocator.try_alloc()
    assert fallback is not None and fallback.zone is dma32


async def test_nonsleeping_allocation_fails_at_min_and_is_counted(
    m: Machine, autojump_clock: trio.testing.MockClock
) -> None:
    pages = await drain(m.memory, GFP_NOWAIT)
    assert m.memory.nr_free_pages == MIN and len(pages) == PAGES - MIN
    assert trio.current_time() == 0  # never slept
    assert m.memory.stat.alloc_fail == 1 and m.memory.stat.allocstall == 0
    [fact] = m.facts_of(AllocFailed)
    assert fact.gfp == GFP_NOWAIT and fact.task_flags == 0


@pytest.mark.parametrize(
    ("gfp", "floor"),
    [
        (GFP_NOWAIT | GFP.HIGH, MIN // 2),  # ALLOC_HIGH: half of min
        (GFP_ATOMIC, MIN * 3 // 8),  # ALLOC_HIGH|ALLOC_HARDER: 3/8 of min
        (GFP_ATOMIC | GFP.MEMALLOC, 0),  # __GFP_MEMALLOC: the whole reserve
    ],
)
async def test_atomic_allocations_dip_below_min(m: Machine, gfp: GFP, floor: int) -> None:
    await drain(m.memory, gfp)
    assert m.memory.nr_free_pages == floor


async def test_pf_memalloc_dips_to_zero_marks_pfmemalloc_and_never_reclaims(m: Machine) -> None:
    with memalloc_noreclaim():
        pages = await drain(m.memory, GFP_KERNEL)
    assert m.memory.nr_free_pages == 0
    emergency = [p for p in pages if p.pfmemalloc]
    assert len(emergency) == MIN  # only pages the reserve was needed for
    assert all(p.reserve is None for p in emergency)
    assert len(m.facts_of(AllocEmergency)) == MIN and m.memory.stat.alloc_emergency == MIN
    # "Avoid recursion of direct reclaim": a PF_MEMALLOC allocation fails instead
    assert m.memory.stat.allocstall == 0 and not m.facts_of(DirectReclaim)
    [failed] = m.facts_of(AllocFailed)
    assert failed.task_flags == PF.MEMALLOC


async def test_nomemalloc_denies_the_reserve_to_pf_memalloc(m: Machine) -> None:
    with memalloc_noreclaim():
        await drain(m.memory, GFP_NOIO | GFP.NOMEMALLOC)
    assert m.memory.nr_free_pages == MIN
    assert m.memory.stat.allocstall == 0 and m.memory.stat.alloc_emergency == 0


async def test_softirq_needs_pf_memalloc_or_gfp_memalloc(m: Machine) -> None:
    with serving_softirq():
        await drain(m.memory, GFP_ATOMIC)
        assert m.memory.nr_free_pages == MIN * 3 // 8
        with task_flags(PF.MEMALLOC):  # in_serving_softirq() && PF_MEMALLOC
            await drain(m.memory, GFP_ATOMIC)
    assert m.memory.nr_free_pages == 0


async def test_hardirq_never_gets_the_reserve(m: Machine) -> None:
    with task_flags(PF.HARDIRQ | PF.MEMALLOC):
        await drain(m.memory, GFP_ATOMIC)
    assert m.memory.nr_free_pages == MIN * 3 // 8


class RecordingPolicy:
    """A policy that records every hook call and does what it is told."""

    def __init__(self, *, extra: int = 0, charge: bool = True) -> None:
        self.extra = extra
        self.charge = charge
        self.calls: list[tuple[str, object]] = []
        self.on_memalloc_failed: list[Page] = []
        self.memory: Memory | None = None
        self.free_at_uncharge: list[int] = []

    def attach(self, memory: Memory) -> None:
        self.memory = memory

    def extra_min_pages(self) -> int:
        return self.extra

    async def charge_emergency(self, gfp: GFP, reserve: object | None) -> bool:
        self.calls.append(("charge", reserve))
        return self.charge

    def uncharge_emergency(self, reserve: object | None) -> None:
        assert self.memory is not None
        self.free_at_uncharge.append(self.memory.nr_free_pages)
        self.calls.append(("uncharge", reserve))

    async def memalloc_failed(self, gfp: GFP) -> bool:
        self.calls.append(("memalloc_failed", gfp))
        if self.on_memalloc_failed and self.memory is not None:
            self.memory.free_page(self.on_memalloc_failed.pop())  # "reclaim" a clean page
            return True
        return False

    async def throttle_direct_reclaim(self, gfp: GFP) -> bool:
        self.calls.append(("throttle", gfp))
        return False

    def kswapd_pass(self) -> None:
        self.calls.append(("kswapd_pass", None))

    def prepare_kswapd_sleep(self) -> None:
        self.calls.append(("prepare_kswapd_sleep", None))


async def test_emergency_pages_are_charged_and_uncharged_after_free(m: Machine) -> None:
    policy = RecordingPolicy()
    m.memory.set_policy(policy)
    await drain(m.memory, GFP_ATOMIC)  # down to 3/8 min: no charge needed
    assert policy.calls == []
    page = await m.memory.alloc_page(GFP_ATOMIC | GFP.MEMALLOC, reserve="rx")
    assert page is not None and page.pfmemalloc and page.reserve == "rx"
    assert policy.calls == [("charge", "rx")]
    free_before = m.memory.nr_free_pages
    m.memory.free_page(page)
    assert policy.calls[-1] == ("uncharge", "rx")
    assert policy.free_at_uncharge == [free_before + 1]  # freed first, then uncharged
    assert not page.pfmemalloc and page.reserve is None


async def test_refused_charge_fails_the_emergency_allocation(m: Machine) -> None:
    m.memory.set_policy(RecordingPolicy(charge=False))
    await drain(m.memory, GFP_ATOMIC | GFP.MEMALLOC)
    assert m.memory.nr_free_pages == MIN * 3 // 8
    assert m.memory.stat.alloc_emergency == 0 and m.memory.stat.alloc_fail == 1


async def test_memalloc_failed_hook_may_retry(m: Machine) -> None:
    policy = RecordingPolicy()
    m.memory.set_policy(policy)
    with memalloc_noreclaim():
        policy.on_memalloc_failed = await drain(m.memory, GFP_NOIO)
        policy.calls.clear()
        policy.on_memalloc_failed = policy.on_memalloc_failed[:1]
        page = await m.memory.alloc_page(GFP_NOIO)
    assert page is not None
    assert [c[0] for c in policy.calls] == ["memalloc_failed", "charge"]


async def test_throttle_hook_runs_before_each_direct_reclaim(
    m: Machine, autojump_clock: trio.testing.MockClock
) -> None:
    policy = RecordingPolicy()
    m.memory.set_policy(policy)
    await drain(m.memory, GFP_NOWAIT)
    assert await m.memory.alloc_page(GFP_KERNEL) is None  # no swap, nothing to kill
    throttles = [c for c in policy.calls if c[0] == "throttle"]
    assert throttles and throttles[0] == ("throttle", GFP_KERNEL)
    assert m.memory.stat.allocstall == len(throttles) == len(m.facts_of(DirectReclaim))


class KilledInThrottle(RecordingPolicy):
    """The first throttle ends with a fatal signal pending (returns True)."""

    async def throttle_direct_reclaim(self, gfp: GFP) -> bool:
        await super().throttle_direct_reclaim(gfp)
        return sum(c[0] == "throttle" for c in self.calls) == 1


async def test_a_throttle_ended_by_a_fatal_signal_skips_that_reclaim(
    m: Machine, autojump_clock: trio.testing.MockClock
) -> None:
    """try_to_free_pages: "if (throttle_direct_reclaim(...)) return 1" — no reclaim, and
    the pretended progress restarts the retry count. No swap, nothing to kill: 1 skipped
    + (1 + MAX_RECLAIM_RETRIES) fruitless reclaims, each after a throttle, then failure."""
    policy = KilledInThrottle()
    m.memory.set_policy(policy)
    await drain(m.memory, GFP_NOWAIT)
    assert await m.memory.alloc_page(GFP_KERNEL) is None
    throttles = [c for c in policy.calls if c[0] == "throttle"]
    assert len(throttles) == MAX_RECLAIM_RETRIES + 2
    assert m.memory.stat.allocstall == MAX_RECLAIM_RETRIES + 1 == len(m.facts_of(DirectReclaim))


def test_extra_min_pages_raise_the_watermarks(m: Machine) -> None:
    m.memory.set_policy(RecordingPolicy(extra=100))
    wm = m.memory.zones[0].watermarks
    assert (wm.min, wm.low, wm.high) == (900, 900 + 225, 900 + 450)


async def test_oom_kills_the_biggest_process_when_nothing_is_reclaimable(
    make_machine: MakeMachine, autojump_clock: trio.testing.MockClock
) -> None:
    """No swap: "big" (2500 pages) is chosen when "small" no longer fits. big has no task
    here to exit with, so its memory comes back OOM_REAPER_DELAY = 2 s later, from the
    oom_reaper; small's fault waits for it and goes on."""
    killed: list[Process] = []
    machine = make_machine(PAGES, oom_hook=killed.append)  # no swap at all
    memory = machine.memory
    big, small = memory.new_process("big"), memory.new_process("small")
    async with memory.running():
        for v in range(2500):
            await memory.touch(big, v, write=True, content_fn=pattern_content)
        for v in range(2000):  # does not fit next to big: big is killed, small goes on
            await memory.touch(small, v, write=True, content_fn=pattern_content)
        assert trio.current_time() == OOM_REAPER_DELAY
    assert killed == [big] and big.killed and big.oom_victim and not small.killed
    assert memory.stat.oom_kill == 1
    [fact] = machine.facts_of(OomKill)
    assert (fact.pid, fact.name, fact.rss, fact.swapents) == (big.pid, "big", 2500, 0)
    [reaped] = machine.facts_of(OomReaped)
    assert (reaped.pid, reaped.unmapped, reaped.freed, reaped.swapents) == (big.pid, 2500, 2500, 0)
    assert reaped.since_kill == OOM_REAPER_DELAY and big.oom_skip
    assert big.rss == 0 and small.rss == 2000
    with pytest.raises(ProcessKilled):
        await memory.touch(big, 0, write=False, content_fn=pattern_content)
    for v in range(2000):
        await memory.touch(small, v, write=False, content_fn=pattern_content)


async def test_writeback_that_never_completes_delays_the_oom_killer_but_does_not_stop_it(
    make_machine: MakeMachine, autojump_clock: trio.testing.MockClock
) -> None:
    """should_reclaim_retry counts a loop without progress before it looks at writeback:
    with a write in flight that never completes (a swap device that stopped answering)
    the allocation waits HZ/10 for it MAX_RECLAIM_RETRIES times, then goes to the OOM
    killer, which chooses "big"; its memory comes back OOM_REAPER_DELAY later."""
    killed: list[Process] = []
    machine = make_machine(PAGES, oom_hook=killed.append)  # no swap: nothing reclaimable
    memory = machine.memory
    big, small = memory.new_process("big"), memory.new_process("small")
    async with memory.running():
        for v in range(2500):
            await memory.touch(big, v, write=True, content_fn=pattern_content)
        memory.stat.nr_writeback = 1  # a page under writeback whose end_io never comes
        for v in range(2000):
            await memory.touch(small, v, write=True, content_fn=pattern_content)
        assert trio.current_time() == pytest.approx(
            MAX_RECLAIM_RETRIES * CONGESTION_WAIT + OOM_REAPER_DELAY
        )
    assert killed == [big] and memory.stat.oom_kill == 1 and small.rss == 2000


async def test_oom_with_nothing_to_kill_fails(
    m: Machine, autojump_clock: trio.testing.MockClock
) -> None:
    await drain(m.memory, GFP_NOWAIT)
    assert await m.memory.alloc_page(GFP_KERNEL) is None
    assert m.memory.stat.oom_kill == 0 and m.memory.stat.alloc_fail == 2


async def test_nofs_allocations_never_invoke_the_oom_killer(
    m: Machine, autojump_clock: trio.testing.MockClock
) -> None:
    victim = m.memory.new_process("victim")
    await drain(m.memory, GFP_NOWAIT)
    with trio.move_on_after(10) as scope:
        await m.memory.alloc_page(GFP_NOFS)  # "too small to fail": loops
    assert scope.cancelled_caught
    assert m.memory.stat.oom_kill == 0 and not victim.killed
    assert m.memory.stat.alloc_fail == 1  # only the GFP_NOWAIT one
