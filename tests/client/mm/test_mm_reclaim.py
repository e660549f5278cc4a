"""Reclaim: shrink_page_list branch by branch, pageout and writeback, kswapd, named waits."""

from __future__ import annotations

from typing import TYPE_CHECKING

import pytest
import trio
import trio.testing

from client.mm import (
    GFP_KERNEL,
    GFP_NOIO,
    SWAP_CLUSTER_MAX,
    DirectReclaim,
    KswapdSleep,
    KswapdWoken,
    Memory,
    Page,
    Process,
    ScanControl,
    SwapWritebackDone,
    SwapWritepage,
    WaitFor,
    Watermarks,
    memalloc_noio,
)
from client.mm.slab import FS_BIO_SLAB
from client.mm.testing import pattern_content
from client.workload import file_content

if TYPE_CHECKING:
    from conftest import Machine, MakeMachine


async def populate(memory: Memory, n: int, name: str = "hog") -> tuple[Process, list[Page]]:
    """A process with ``n`` dirty anon pages."""
    process = memory.new_process(name)
    for v in range(n):
        await memory.touch(process, v, write=True, content_fn=pattern_content)
    return process, [process.present[v] for v in range(n)]


def isolate_as_inactive(memory: Memory, pages: list[Page], *, referenced: bool = False) -> None:
    """Take ``pages`` off the LRU as shrink_inactive_list would, unreferenced by default."""
    for page in pages:
        memory.lru.remove(page)
        page.active = False
        page.referenced = referenced


@pytest.fixture
def m(make_machine: MakeMachine) -> Machine:
    return make_machine(1024, swap_pages=4096, latency=0.01)


# -- shrink_page_list, one branch at a time -----------------------------------------------


async def test_dirty_anon_page_gets_a_slot_is_unmapped_and_written(m: Machine) -> None:
    memory = m.memory
    process, [page] = await populate(memory, 1)
    isolate_as_inactive(memory, [page])
    sc = ScanControl(GFP_KERNEL)
    plug = memory.reclaimer.shrink_page_list([page], sc)
    assert plug == [page] and sc.nr_pageout == 1 and sc.nr_reclaimed == 0
    assert page.swapcache and page.writeback and page.reclaim and not page.dirty
    assert process.swapped == {0: page.private} and 0 not in process.present  # try_to_unmap
    assert page.lru and not page.active  # kept on the inactive list until the I/O is done
    assert memory.stat.nr_writeback == 1 and memory.stat.nr_anon_pages == 0


async def test_noio_reclaim_keeps_dirty_pages_without_a_slot(m: Machine) -> None:
    memory = m.memory
    process, [page] = await populate(memory, 1)
    isolate_as_inactive(memory, [page])
    plug = memory.reclaimer.shrink_page_list([page], ScanControl(GFP_NOIO))
    assert plug == [] and not page.swapcache and process.present == {0: page}
    assert page.lru and memory.swap is not None and memory.swap.map.nr_free == 4095


async def test_noio_reclaim_keeps_a_dirty_swapcache_page(m: Machine) -> None:
    memory = m.memory
    process, [page] = await populate(memory, 1)
    assert memory.swap is not None and memory.swap.add_to_swap(page)  # e.g. a failed write
    isolate_as_inactive(memory, [page])
    plug = memory.reclaimer.shrink_page_list([page], ScanControl(GFP_NOIO))
    assert plug == [] and page.dirty and not page.writeback
    assert 0 in process.swapped  # try_to_unmap comes before the dirty check


async def test_referenced_page_is_activated(m: Machine) -> None:
    memory = m.memory
    _, [page] = await populate(memory, 1)
    isolate_as_inactive(memory, [page], referenced=True)
    sc = ScanControl(GFP_KERNEL)
    assert memory.reclaimer.shrink_page_list([page], sc) == []
    assert page.active and not page.referenced and sc.nr_activated == 1
    assert memory.lru.pages(active=True) == [page] and memory.stat.pgactivate == 1


async def test_page_under_writeback_is_skipped_and_counted_pending(m: Machine) -> None:
    memory = m.memory
    _, [page] = await populate(memory, 1)
    isolate_as_inactive(memory, [page])
    page.writeback = True
    sc = ScanControl(GFP_KERNEL)
    assert memory.reclaimer.shrink_page_list([page], sc) == []
    assert sc.nr_writeback == 1 and sc.pending == 1 and page.reclaim
    assert memory.lru.pages(active=False) == [page]


async def test_no_swap_space_activates(make_machine: MakeMachine) -> None:
    machine = make_machine(1024, swap_pages=2)  # one usable slot
    memory = machine.memory
    _, pages = await populate(memory, 2)
    isolate_as_inactive(memory, pages)
    sc = ScanControl(GFP_KERNEL)
    plug = memory.reclaimer.shrink_page_list(pages, sc)
    assert plug == [pages[0]]
    assert pages[1].active and not pages[1].swapcache and sc.nr_activated == 1


async def test_clean_swapcache_page_is_freed_and_its_slot_kept_by_the_pte(m: Machine) -> None:
    memory = m.memory
    process, [page] = await populate(memory, 1)
    assert memory.swap is not None and memory.swap.add_to_swap(page)
    slot = page.private
    page.dirty = False  # as after a completed write
    isolate_as_inactive(memory, [page])
    free = memory.nr_free_pages
    sc = ScanControl(GFP_NOIO)  # freeing a clean page needs no I/O
    assert memory.reclaimer.shrink_page_list([page], sc) == []
    assert sc.nr_reclaimed == 1 and memory.nr_free_pages == free + 1
    assert process.swapped == {0: slot} and memory.swap.map.pte_refs(slot) == 1
    assert slot not in memory.swap.cache


async def test_orphan_page_is_freed(m: Machine) -> None:
    memory = m.memory
    process, [page] = await populate(memory, 1)
    isolate_as_inactive(memory, [page])  # isolated when its process exits
    memory.exit_process(process)
    # not freed yet: every frame is the page, a slab page (the bio mempool's) or free
    assert page.mapping is None
    assert memory.nr_free_pages == 1024 - 1 - memory.stat.nr_slab_unreclaimable
    sc = ScanControl(GFP_NOIO)
    memory.reclaimer.shrink_page_list([page], sc)
    assert sc.nr_reclaimed == 1 and not page.dirty


async def test_second_chance_for_a_page_referenced_while_inactive(m: Machine) -> None:
    memory = m.memory
    _, pages = await populate(memory, 4)
    sc = ScanControl(GFP_KERNEL)
    memory.reclaimer.shrink_active_list(4, sc)  # deactivation clears the young bits
    assert memory.lru.pages(active=False) == pages and not any(p.referenced for p in pages)
    pages[2].referenced = True  # touched again while inactive
    isolated = memory.lru.isolate(4, active=False)
    plug = memory.reclaimer.shrink_page_list(isolated, sc)
    assert plug == [pages[0], pages[1], pages[3]]
    assert memory.lru.pages(active=True) == [pages[2]]


# -- pageout, writeback completion --------------------------------------------------------


async def test_freed_memory_lags_writeback_completion(
    m: Machine, autojump_clock: trio.testing.MockClock
) -> None:
    memory, device = m.memory, m.device
    assert device is not None
    async with memory.running():
        _, pages = await populate(memory, 64)
        isolate_as_inactive(memory, pages)
        device.gate = trio.Event()
        free = memory.nr_free_pages
        plug = memory.reclaimer.shrink_page_list(pages, ScanControl(GFP_KERNEL))
        await memory.page_io.flush_plug(plug)
        await trio.sleep(1)
        assert memory.stat.nr_writeback == 64
        # two bios, bio-200 objects from the slab page that holds the mempool's reserve:
        # no page taken, none given back
        assert memory.block is not None
        assert memory.slab[FS_BIO_SLAB].active_objs == memory.block.bio_pool.min_nr + 2
        assert memory.nr_free_pages == free
        device.gate.set()
        await trio.sleep(1)
        # written and clean, rotated to the inactive tail, but not free until a scan
        assert memory.stat.nr_writeback == 0 and memory.stat.pgrotated == 64
        assert memory.nr_free_pages == free
        assert set(memory.lru.pages(active=False)[:64]) == set(pages)  # next to reclaim
        sc = ScanControl(GFP_KERNEL)
        memory.reclaimer.shrink_page_list(memory.lru.isolate(64, active=False), sc)
        assert sc.nr_reclaimed == 64 and memory.nr_free_pages == free + 64
        assert memory.progress.writebacks_completed == 2


async def test_failed_write_redirties_the_page(
    m: Machine, autojump_clock: trio.testing.MockClock
) -> None:
    memory, device = m.memory, m.device
    assert device is not None
    device.fail_write = lambda slot, n: True
    async with memory.running():
        _, [page] = await populate(memory, 1)
        isolate_as_inactive(memory, [page])
        free = memory.nr_free_pages
        await memory.page_io.flush_plug(
            memory.reclaimer.shrink_page_list([page], ScanControl(GFP_KERNEL))
        )
        await trio.sleep(1)
        assert page.dirty and not page.writeback and not page.reclaim and page.swapcache
        [done] = m.facts_of(SwapWritebackDone)
        assert done.error is not None and memory.stat.swap_write_errors == 1
        assert memory.progress.writebacks_completed == 0
        # the next scan writes it again instead of freeing it
        isolate_as_inactive(memory, [page])
        plug = memory.reclaimer.shrink_page_list([page], ScanControl(GFP_KERNEL))
        assert plug == [page] and memory.nr_free_pages == free


@pytest.mark.parametrize(("max_io_pages", "requests"), [(32, 2), (8, 8), (64, 1)])
async def test_neighbours_are_written_in_one_request(
    make_machine: MakeMachine,
    autojump_clock: trio.testing.MockClock,
    max_io_pages: int,
    requests: int,
) -> None:
    machine = make_machine(1024, swap_pages=4096, max_io_pages=max_io_pages)
    memory, device = machine.memory, machine.device
    assert device is not None
    async with memory.running():
        _, pages = await populate(memory, 64)
        isolate_as_inactive(memory, pages)
        plug = memory.reclaimer.shrink_page_list(pages, ScanControl(GFP_KERNEL))
        await memory.page_io.flush_plug(plug)
        await trio.sleep(1)
    writes = sorted(device.writes(), key=lambda w: w.slot)  # trio starts tasks in any order
    assert [w.nr_pages for w in writes] == [64 // requests] * requests
    assert [w.slot for w in writes] == [1 + i * 64 // requests for i in range(requests)]
    assert [f.slot for f in machine.facts_of(SwapWritepage)] == [w.slot for w in writes]
    assert [f.nr_pages for f in machine.facts_of(SwapWritepage)] == [64 // requests] * requests
    assert memory.stat.pswpout == 64


async def test_noio_reclaim_never_starts_swap_io(
    m: Machine, autojump_clock: trio.testing.MockClock
) -> None:
    memory, device = m.memory, m.device
    assert device is not None
    process, _ = await populate(memory, 900)
    sc = await memory.reclaimer.shrink(GFP_NOIO, 64)
    assert sc.nr_reclaimed == 0 and sc.nr_scanned > 0
    with memalloc_noio(), trio.move_on_after(5):  # every allocation is GFP_NOIO
        while True:
            await memory.touch(process, 10_000 + memory.stat.pgfault, write=True,
                               content_fn=pattern_content)  # fmt: skip
    assert memory.stat.allocstall > 0
    assert device.log == [] and memory.stat.pswpout == 0 and memory.stat.nr_writeback == 0
    assert memory.swap is not None and memory.swap.map.nr_free == memory.swap.map.nr_slots


# -- kswapd and direct reclaim ------------------------------------------------------------


async def test_kswapd_wakes_below_low_and_stops_at_high(
    m: Machine, autojump_clock: trio.testing.MockClock
) -> None:
    memory = m.memory
    wm = memory.zones[0].watermarks
    assert (wm.min, wm.low, wm.high) == (64, 80, 96)
    async with memory.running():
        process = memory.new_process("hog")
        v = 0
        while memory.nr_free_pages > wm.low:
            await memory.touch(process, v, write=True, content_fn=pattern_content)
            v += 1
        await trio.sleep(1)
        assert not m.facts_of(KswapdWoken)  # at low, not below it
        await memory.touch(process, v, write=True, content_fn=pattern_content)
        [woken] = m.facts_of(KswapdWoken)
        assert (woken.zone, woken.nr_free) == ("Normal", wm.low)
        await trio.sleep(1)
        [sleep] = m.facts_of(KswapdSleep)
        assert sleep.balanced and sleep.nr_reclaimed > 0
        assert wm.high < memory.nr_free_pages <= wm.high + 2 * SWAP_CLUSTER_MAX
        assert memory.stat.pgscan_kswapd > 0 and memory.stat.pgsteal_kswapd > 0
        assert memory.stat.allocstall == 0 and memory.stat.pageoutrun == 1
        assert memory.reclaimer.kswapd_awake is False
        assert memory.waits.snapshot()["kswapd0"].kind == "idle"


async def test_allocators_wait_for_writeback_with_named_waits(
    make_machine: MakeMachine, autojump_clock: trio.testing.MockClock
) -> None:
    machine = make_machine(1024, swap_pages=8192, swap_queue_depth=2)
    memory, device = machine.memory, machine.device
    assert device is not None
    device.gate = trio.Event()
    async with memory.running(), trio.open_nursery() as nursery:
        process = memory.new_process("hog")

        async def hog() -> None:
            for v in range(2048):
                await memory.touch(process, v, write=True, content_fn=pattern_content)

        nursery.start_soon(hog, name="hog")
        await trio.sleep(30)
        # stuck: every request is held by the device, nothing can be freed
        waits = memory.waits.snapshot()
        assert waits["hog"].kind in {"writeback", "request_tag", "mempool"}
        assert waits["kswapd0"].kind in {"writeback", "request_tag", "mempool"}
        assert waits["hog"].waker in {"swap device", "mempool_free"}
        assert str(WaitFor("writeback", "swap0 req 1", "swap device")) == "writeback(swap0 req 1)"
        assert device.max_in_flight == 2 and len(memory.block.inflight) == 2  # type: ignore[union-attr]
        assert memory.stat.oom_kill == 0 and memory.stat.allocstall > 0
        assert machine.facts_of(DirectReclaim)
        assert memory.pressure().some.total > 0
        device.gate.set()
    assert process.rss + process.swapents == 2048
    assert memory.stat.nr_writeback == 0


async def test_kswapd_gives_up_when_nothing_is_reclaimable(
    make_machine: MakeMachine, autojump_clock: trio.testing.MockClock
) -> None:
    machine = make_machine(1024)  # no swap: the anon lists are not even scanned
    memory = machine.memory
    async with memory.running():
        process = memory.new_process("hog")
        for v in range(1024 - 80 + 1):
            await memory.touch(process, v, write=True, content_fn=pattern_content)
        await trio.sleep(1)
        [sleep] = machine.facts_of(KswapdSleep)
        assert not sleep.balanced and sleep.nr_reclaimed == 0
        assert memory.reclaimer.kswapd_failures == 1 and memory.stat.pgscan_kswapd == 0


async def test_kswapd_failures_count_only_passes_that_reclaim_nothing(
    make_machine: MakeMachine, autojump_clock: trio.testing.MockClock
) -> None:
    """balance_pgdat: "if (!sc.nr_reclaimed) pgdat->kswapd_failures++" for the whole pass;
    shrink_node: "if (reclaimable) pgdat->kswapd_failures = 0", kswapd's or direct reclaim's.

    1024 pages (min 64, low 80, high 96), no swap: only 8 clean page cache pages are
    reclaimable. Free held at min = 64: a pass frees the 8 (72 < high, not balanced) and
    is no failure; the next finds nothing and is one; direct reclaim progress resets it.
    """
    machine = make_machine(1024, readahead_pages=8)
    memory = machine.memory
    reclaimer = memory.reclaimer
    reader = memory.new_process("reader")
    file = memory.open_file("data", 8)
    for index in range(8):
        await memory.read_file(reader, file, index, file_content)
    assert memory.lru.nr_file == 8
    zone = memory.zones[0]
    assert zone.watermarks == Watermarks(min=64, low=80, high=96)
    held = [zone.take() for _ in range(zone.nr_free - 64)]
    reclaimer.kswapd_failures = 3

    assert await reclaimer.balance_pgdat() == (False, 8)  # progress, not balanced
    assert reclaimer.kswapd_failures == 0 and memory.nr_free_pages == 72
    assert await reclaimer.balance_pgdat() == (False, 0)  # nothing left to reclaim
    assert reclaimer.kswapd_failures == 1
    assert await reclaimer.balance_pgdat() == (False, 0)
    assert reclaimer.kswapd_failures == 2

    await memory.read_file(reader, file, 0, file_content)  # readahead: 8 clean pages again
    sc = await reclaimer.try_to_free_pages(GFP_KERNEL)
    assert sc.nr_reclaimed == 8 and reclaimer.kswapd_failures == 0
    for page in held:
        memory.free_page(page)
