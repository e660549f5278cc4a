"""The OOM killer as 6.1 has it (mm/oom_kill.c, mm/page_alloc.c): the victim gets ALLOC_OOM
and frees its memory when it exits; the oom_reaper frees it OOM_REAPER_DELAY later if it
has not; no second victim is chosen while one is pending, unless it is MMF_OOM_SKIP."""

from __future__ import annotations

from typing import TYPE_CHECKING

import pytest
import trio
import trio.testing

from client.mm import (
    GFP_ATOMIC,
    GFP_KERNEL,
    GFP_NOWAIT,
    OOM_REAPER_DELAY,
    OomKill,
    OomReaped,
    OomVictimExited,
    Page,
    Process,
    ProcessKilled,
    WaitFor,
)
from client.mm.process import as_current
from client.mm.testing import drain, pattern_content

if TYPE_CHECKING:
    from conftest import Machine, MakeMachine

# 16 MiB, min_free_kbytes 3200: min 800, gap max(200, 4) = 200 -> low 1000, high 1200
PAGES = 4096
MIN, LOW = 800, 1000


@pytest.fixture
def m(make_machine: MakeMachine) -> Machine:
    machine = make_machine(PAGES, min_free_kbytes=3200)  # no swap: anon is not reclaimable
    wm = machine.memory.zones[0].watermarks
    assert (wm.min, wm.low) == (MIN, LOW)
    return machine


async def test_a_victim_allocates_below_min_down_to_half_of_min(
    m: Machine, autojump_clock: trio.testing.MockClock
) -> None:
    """__zone_watermark_ok (4.16-6.2): ALLOC_OOM "min -= min / 2". Kernel allocations leave
    free at min = 800; the victim's GFP_KERNEL takes 400 more, down to 400 = min/2, and
    then fails at once ("Avoid allocations with no watermarks from looping endlessly")
    instead of asking the OOM killer again."""
    memory = m.memory
    await drain(memory, GFP_NOWAIT)
    assert memory.nr_free_pages == MIN
    victim = memory.new_process("victim")
    assert memory.oom.out_of_memory(GFP_KERNEL)  # the only process: chosen
    assert victim.killed and victim.oom_victim and memory.stat.oom_kill == 1
    with as_current(victim):
        pages = await drain(memory, GFP_KERNEL)
    assert len(pages) == MIN - MIN // 2 == 400
    assert memory.nr_free_pages == MIN // 2
    assert memory.stat.oom_kill == 1 and memory.stat.alloc_fail == 2
    assert trio.current_time() == 0.0


async def test_a_victims_atomic_allocation_keeps_its_three_eighths(
    m: Machine, autojump_clock: trio.testing.MockClock
) -> None:
    """6.1 __alloc_pages_slowpath tries once at gfp_to_alloc_flags' own flags before
    "retry:" replaces them with ALLOC_OOM: a victim's GFP_ATOMIC still reaches 3/8 of min
    (300), not only min/2."""
    memory = m.memory
    await drain(memory, GFP_NOWAIT)
    victim = memory.new_process("victim")
    assert memory.oom.out_of_memory(GFP_KERNEL)
    with as_current(victim):
        pages = await drain(memory, GFP_ATOMIC)
    assert len(pages) == MIN - MIN * 3 // 8 == 500
    assert memory.nr_free_pages == 300


async def test_no_second_victim_while_one_is_pending(
    m: Machine, autojump_clock: trio.testing.MockClock
) -> None:
    """oom_evaluate_task: a victim without MMF_OOM_SKIP aborts the selection. "other" is
    no victim: its GFP_KERNEL cannot go below min (800), and its retries kill nobody; it
    waits for the victim's memory. Nothing runs the reaper here (memory not started) and
    the victim has no task to exit with: after 1 s it still waits."""
    memory = m.memory
    await drain(memory, GFP_NOWAIT)
    victim = memory.new_process("victim")
    assert memory.oom.out_of_memory(GFP_KERNEL) and victim.oom_victim
    other = memory.new_process("other")
    got: list[Page | None] = []

    async def allocate() -> None:
        with as_current(other):
            got.append(await memory.alloc_page(GFP_KERNEL))

    async with trio.open_nursery() as nursery:
        nursery.start_soon(allocate, name="other")
        await trio.sleep(1)
        assert memory.waits.snapshot()["other"] == WaitFor("oom_victim", "victim", "victim")
        assert memory.oom.out_of_memory(GFP_KERNEL)  # aborted: True, and nobody killed
        nursery.cancel_scope.cancel()
    assert got == [] and memory.nr_free_pages == MIN
    assert memory.stat.oom_kill == 1 and len(m.facts_of(OomKill)) == 1 and not other.killed


async def test_a_victim_frees_its_memory_at_exit_before_the_reaper(
    m: Machine, autojump_clock: trio.testing.MockClock
) -> None:
    """The process "big" faults until nothing is left: 4096 - min 800 - small's 100 = 3196 pages. Its
    next fault calls the OOM killer, which chooses big itself; the retry (at ALLOC_OOM)
    finds it killed, and its task exits: exit_mmap frees all 3196 at t=0. At t=2 the
    reaper's timer finds the mm MMF_OOM_SKIP and does nothing."""
    memory = m.memory
    small, big = memory.new_process("small"), memory.new_process("big")

    async def run_big() -> None:
        try:
            for v in range(PAGES):
                await memory.touch(big, v, write=True, content_fn=pattern_content)
        except ProcessKilled:
            memory.exit_process(big)  # do_exit: as the workloads do

    async with memory.running():
        for v in range(100):
            await memory.touch(small, v, write=True, content_fn=pattern_content)
        await run_big()
        assert trio.current_time() == 0.0 and memory.nr_free_pages == PAGES - 100
        await trio.sleep(3 * OOM_REAPER_DELAY)
    [kill] = m.facts_of(OomKill)
    assert (kill.name, kill.rss) == ("big", PAGES - MIN - 100)
    [exited] = m.facts_of(OomVictimExited)
    assert (exited.pid, exited.unmapped, exited.freed, exited.swapents) == (
        big.pid, 3196, 3196, 0
    )  # fmt: skip
    assert exited.since_kill == 0.0
    assert m.facts_of(OomReaped) == [] and big.oom_skip and big.exited
    assert not small.killed and small.rss == 100 and memory.stat.oom_kill == 1


async def test_the_reaper_frees_a_stuck_victim_after_two_seconds(
    make_machine: MakeMachine, autojump_clock: trio.testing.MockClock
) -> None:
    """A victim whose task waits for a swap-in read that SIGKILL does not end (the device
    holds every request) cannot exit. The oom_reaper reaps its anonymous memory
    OOM_REAPER_DELAY = 2 s after the kill, not before, and sets MMF_OOM_SKIP; when the read
    completes its task finds itself killed and exits with nothing left to free."""
    machine = make_machine(1024, swap_pages=4096)
    memory, device = machine.memory, machine.device
    assert device is not None
    stuck = memory.new_process("stuck")
    async with memory.running():
        for v in range(2048):
            await memory.touch(stuck, v, write=True, content_fn=pattern_content)
        await trio.sleep(1)  # kswapd done, writeback done
        assert memory.stat.nr_writeback == 0
        vpage = next(iter(stuck.swapped))
        device.gate = trio.Event()
        ended: list[float] = []

        async def fault() -> None:
            try:
                await memory.touch(stuck, vpage, write=False, content_fn=pattern_content)
            except ProcessKilled:
                ended.append(trio.current_time())
                memory.exit_process(stuck)

        async with trio.open_nursery() as nursery:
            nursery.start_soon(fault, name="stuck")
            await trio.testing.wait_all_tasks_blocked()
            assert memory.waits.snapshot()["stuck"].kind == "swapin"
            killed_at = trio.current_time()
            rss, swapents, free = stuck.rss, stuck.swapents, memory.nr_free_pages
            assert memory.oom.out_of_memory(GFP_KERNEL) and stuck.killed
            await trio.sleep_until(killed_at + OOM_REAPER_DELAY - 0.01)
            assert machine.facts_of(OomReaped) == [] and stuck.rss == rss and not ended
            await trio.sleep_until(killed_at + OOM_REAPER_DELAY)
            await trio.testing.wait_all_tasks_blocked()
            [reaped] = machine.facts_of(OomReaped)
            assert (reaped.unmapped, reaped.freed, reaped.swapents) == (rss, rss, swapents)
            assert reaped.since_kill == pytest.approx(OOM_REAPER_DELAY)
            assert stuck.oom_skip and stuck.rss == stuck.swapents == 0 and not ended
            assert memory.nr_free_pages == free + rss
            # MMF_OOM_SKIP: the victim no longer blocks a selection; nobody else is left.
            assert not memory.oom.out_of_memory(GFP_KERNEL)
            device.gate.set()
        # the read finishes after the device's latency; then the task exits
        assert ended == [pytest.approx(killed_at + OOM_REAPER_DELAY + device.latency)]
    [exited] = machine.facts_of(OomVictimExited)
    assert (exited.unmapped, exited.freed, exited.swapents) == (0, 0, 0)
    assert memory.stat.oom_kill == 1


async def test_selection_proceeds_once_the_victim_is_mmf_oom_skip(
    m: Machine, autojump_clock: trio.testing.MockClock
) -> None:
    """Two processes with nothing to free and no task to exit with (nothing maps a page):
    the first is chosen at t=0 and blocks every selection until the reaper, at t=2, finds
    nothing to reap and sets MMF_OOM_SKIP; then the second is chosen, reaped at t=4, and
    the allocation that has waited all along fails: nothing is left to kill."""
    kills: list[tuple[str, float]] = []
    memory = m.memory
    memory.oom.hook = lambda victim: kills.append((victim.name, trio.current_time()))
    ghosts = [memory.new_process("ghost0"), memory.new_process("ghost1")]
    async with memory.running():
        await drain(memory, GFP_NOWAIT)
        page = await memory.alloc_page(GFP_KERNEL)
        failed_at = trio.current_time()
    assert page is None
    [(first, t0), (second, t1)] = kills
    assert (first, t0) == ("ghost0", 0.0) and second == "ghost1"
    assert OOM_REAPER_DELAY <= t1 < OOM_REAPER_DELAY + 0.2
    assert t1 + OOM_REAPER_DELAY <= failed_at < t1 + OOM_REAPER_DELAY + 0.2
    reaped = m.facts_of(OomReaped)
    assert [(r.name, r.unmapped, r.freed, r.swapents) for r in reaped] == [
        ("ghost0", 0, 0, 0), ("ghost1", 0, 0, 0)
    ]  # fmt: skip
    assert all(g.oom_skip for g in ghosts) and memory.stat.oom_kill == 2


def test_process_fields_start_clear() -> None:
    p = Process(1, "p")
    assert not (p.oom_victim or p.oom_skip or p.oom_reap_queued or p.exited)
