"""The assembled memory: workloads end to end, swap-in, integrity, exit, config, cost."""

from __future__ import annotations

import functools
import tracemalloc
from typing import TYPE_CHECKING

import pytest
import trio
import trio.testing

from client.mm import (
    GFP_KERNEL,
    GFP_NOIO,
    PAGE_SIZE,
    IntegrityError,
    IntegrityFailure,
    KswapdSleep,
    Memory,
    MemoryConfig,
    Process,
    SwapReadDone,
    SwapReadError,
    SwapReadpage,
    WaitFor,
)
from client.mm.testing import MemorySwapDevice, pattern_content, versioned_content

if TYPE_CHECKING:
    from conftest import Machine, MakeMachine


async def hog(memory: Memory, process: Process, nr_pages: int, *, write: bool) -> None:
    for v in range(nr_pages):
        await memory.touch(process, v, write=write, content_fn=pattern_content)


async def test_one_process_touching_4x_ram_twice_verifies_every_page(
    make_machine: MakeMachine, autojump_clock: trio.testing.MockClock
) -> None:
    machine = make_machine(1024, swap_pages=4 * 1024 + 64, latency=0.002)
    memory, device = machine.memory, machine.device
    assert device is not None
    nr = 4 * memory.config.nr_pages
    async with memory.running():
        process = memory.new_process("hog")
        await hog(memory, process, nr, write=True)  # write pass
        await hog(memory, process, nr, write=False)  # read-verify pass: raises on a mismatch
        assert memory.block is not None
        while memory.block.inflight:  # kswapd may still be writing pages out: let it finish
            await next(iter(memory.block.inflight.values())).done.wait()
        stats = memory.vmstat()
        assert process.rss + process.swapents == nr
        assert stats["pswpout"] >= 3 * 1024 and stats["pswpin"] >= 3 * 1024
        assert stats["oom_kill"] == 0 and stats["nr_writeback"] == 0
        assert memory.progress.swapins_completed == stats["pswpin"]
        assert all(s.balanced for s in machine.facts_of(KswapdSleep))
        assert max(w.nr_pages for w in device.writes()) == memory.config.max_io_pages
        memory.exit_process(process)
        await trio.sleep(1)
    assert memory.swap is not None and memory.swap.map.nr_free == memory.swap.map.nr_slots
    # every other frame is a slab page, held by a cache: at least the page of the bio
    # mempool's reserved bios (bio-200 objects, 16 to a page), and the partial slabs SLUB
    # keeps (min_partial) once the bios in flight are freed
    slab_pages = sum(info.num_slabs for info in memory.slab.slabinfo())
    assert memory.stat.nr_slab_unreclaimable == slab_pages >= 1
    assert memory.nr_free_pages + len(memory.lru) == 1024 - memory.stat.nr_slab_unreclaimable


async def test_corrupted_swap_slot_is_an_integrity_error(
    m: Machine, autojump_clock: trio.testing.MockClock
) -> None:
    memory, device = m.memory, m.device
    assert device is not None
    async with memory.running():
        process = memory.new_process("hog")
        await hog(memory, process, 2048, write=True)
        vpage, slot = next(iter(process.swapped.items()))
        device.slots[slot] = b"\xff" * PAGE_SIZE
        with pytest.raises(IntegrityError) as info:
            await memory.touch(process, vpage, write=False, content_fn=pattern_content)
    assert (info.value.pid, info.value.vpage) == (process.pid, vpage)
    assert m.facts_of(IntegrityFailure) == [IntegrityFailure(process.pid, vpage)]


async def test_swap_read_error_fails_the_fault_and_keeps_the_slot(
    m: Machine, autojump_clock: trio.testing.MockClock
) -> None:
    memory, device = m.memory, m.device
    assert device is not None and memory.swap is not None
    async with memory.running():
        process = memory.new_process("hog")
        await hog(memory, process, 2048, write=True)
        vpage, slot = next(iter(process.swapped.items()))
        device.fail_read = lambda s: s == slot
        free = memory.nr_free_pages
        with pytest.raises(SwapReadError):
            await memory.touch(process, vpage, write=False, content_fn=pattern_content)
        assert process.swapped[vpage] == slot and slot not in memory.swap.cache
        retries = memory.config.swap_read_retries
        assert memory.nr_free_pages >= free - 1
        assert memory.stat.swap_read_errors == 1 + retries == len(m.facts_of(SwapReadDone))
        assert memory.stat.swap_read_retries == retries
        assert all(d.slot == slot and d.error is not None for d in m.facts_of(SwapReadDone))
        device.fail_read = lambda s: False  # a later fault reads it again
        await memory.touch(process, vpage, write=False, content_fn=pattern_content)


async def test_a_transient_swap_read_error_is_retried_and_the_page_survives(
    m: Machine, autojump_clock: trio.testing.MockClock
) -> None:
    memory, device = m.memory, m.device
    assert device is not None
    async with memory.running():
        process = memory.new_process("hog")
        await hog(memory, process, 2048, write=True)
        vpage, slot = next(iter(process.swapped.items()))
        failures = iter([True, True])
        device.fail_read = lambda s: s == slot and next(failures, False)
        start = trio.current_time()
        await memory.touch(process, vpage, write=False, content_fn=pattern_content)
        assert memory.stat.swap_read_errors == 2 and memory.stat.swap_read_retries == 2
        delay = memory.config.swap_read_retry_delay
        assert trio.current_time() - start >= delay + 2 * delay  # backoff: 1x, then 2x


async def test_concurrent_faults_on_one_slot_share_the_read(
    m: Machine, autojump_clock: trio.testing.MockClock
) -> None:
    memory, device = m.memory, m.device
    assert device is not None
    async with memory.running():
        process = memory.new_process("hog")
        await hog(memory, process, 2048, write=True)
        vpage, slot = next(iter(process.swapped.items()))
        device.gate = trio.Event()
        async with trio.open_nursery() as nursery:
            read = functools.partial(memory.touch, write=False, content_fn=pattern_content)
            for name in ("t1", "t2"):
                nursery.start_soon(read, process, vpage, name=name)
            await trio.testing.wait_all_tasks_blocked()
            waits = memory.waits.snapshot()
            [read] = m.facts_of(SwapReadpage)  # one read for both faults
            expected = WaitFor("swapin", f"slot {slot} req {read.req}", "swap device")
            assert waits["t1"] == waits["t2"] == expected
            assert str(expected) == f"swapin(slot {slot} req {read.req})"
            device.gate.set()
    assert [f.slot for f in m.facts_of(SwapReadpage)] == [slot]
    assert vpage in process.present


async def test_rewriting_a_swapped_in_page_frees_its_slot(
    m: Machine, autojump_clock: trio.testing.MockClock
) -> None:
    memory = m.memory
    assert memory.swap is not None
    async with memory.running():
        process = memory.new_process("hog")
        await hog(memory, process, 2048, write=True)
        vpage, slot = next(iter(process.swapped.items()))
        await memory.touch(process, vpage, write=False, content_fn=pattern_content)
        page = process.present[vpage]
        assert page.swapcache and page.private == slot and not page.dirty  # clean copy
        await memory.touch(process, vpage, write=True, content_fn=versioned_content(2))
        assert not page.swapcache and page.dirty  # reuse_swap_page
        assert memory.swap.map.count(slot) == 0
        await memory.touch(process, vpage, write=False, content_fn=versioned_content(2))


async def test_exit_frees_pages_and_slots(
    m: Machine, autojump_clock: trio.testing.MockClock
) -> None:
    memory, device = m.memory, m.device
    assert memory.swap is not None and device is not None
    async with memory.running():
        process = memory.new_process("hog")
        await hog(memory, process, 2048, write=True)
        device.gate = trio.Event()
        await memory.reclaimer.shrink(GFP_KERNEL, 64)
        memory.exit_process(process)
        in_writeback = memory.stat.nr_writeback
        assert in_writeback > 0  # these pages outlive the process until the I/O is done
        assert len(memory.lru) == in_writeback
        device.gate.set()
        await trio.sleep(1)
        sc = await memory.reclaimer.shrink(GFP_NOIO, 4096)
        assert sc.nr_reclaimed >= in_writeback and len(memory.lru) == 0
    assert memory.swap.map.nr_free == memory.swap.map.nr_slots
    assert memory.stat.nr_anon_pages == 0 and process.pid not in memory.processes
    assert memory.nr_free_pages == 1024 - memory.stat.nr_slab_unreclaimable


async def test_running_propagates_exceptions_unwrapped() -> None:
    memory = Memory(MemoryConfig(total_bytes=1 << 20))
    with pytest.raises(KeyError):
        async with memory.running():
            raise KeyError("from the body")


def test_config_zones_by_fraction_and_bytes() -> None:
    config = MemoryConfig(total_bytes=64 << 20, zones=(("DMA32", 16 << 20), ("Normal", 1.0)))
    assert config.zone_pages() == [("DMA32", 4096), ("Normal", 16384 - 4096)]
    thirds = MemoryConfig(total_bytes=3 * PAGE_SIZE + 0, zones=(("A", 0.5), ("B", 0.5)))
    assert thirds.zone_pages() == [("A", 1), ("B", 2)]  # rounding to the last fraction
    with pytest.raises(ValueError):
        MemoryConfig(total_bytes=1 << 20, zones=(("A", 2 << 20),)).zone_pages()
    with pytest.raises(ValueError):
        MemoryConfig(total_bytes=1 << 20, max_io_pages=0)


def test_default_min_free_kbytes_follows_memory_size() -> None:
    memory = Memory(MemoryConfig(total_bytes=1 << 30))
    assert memory.min_free_kbytes == 4096
    assert memory.zones[0].watermarks.min == 1024


def test_vmstat_names() -> None:
    memory = Memory(MemoryConfig(total_bytes=1 << 20))
    stats = memory.vmstat()
    for name in (
        "nr_free_pages", "nr_writeback", "nr_anon_pages", "nr_swapcached", "nr_active_anon",
        "nr_inactive_anon", "pgscan_kswapd", "pgscan_direct", "pgsteal_kswapd",
        "pgsteal_direct", "pswpout", "pswpin", "allocstall", "oom_kill",
        "pgscan_direct_throttle", "pgalloc", "pgfree", "alloc_fail", "nr_slab_unreclaimable",
    ):  # fmt: skip
        assert name in stats
    assert stats["nr_free_pages"] == 256


def test_a_4_gib_machine_costs_nothing_per_frame_until_used() -> None:
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        memory = Memory(MemoryConfig(total_bytes=4 << 30))
        built = tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()
    assert memory.config.nr_pages == 1 << 20
    assert built < 256 * 1024  # no per-frame structure is built up front


async def _bytes_per_page(nr_ram_pages: int, touched: int) -> float:
    memory = Memory(MemoryConfig(total_bytes=nr_ram_pages * PAGE_SIZE))
    process = memory.new_process("hog")
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        await hog(memory, process, touched, write=True)
        used = tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()
    return used / touched


async def test_cost_per_page_is_flat_as_memory_grows() -> None:
    small = await _bytes_per_page(8192, 4096)  # 32 MiB
    large = await _bytes_per_page(1 << 18, 4096)  # 1 GiB, same number of pages touched
    assert large < small * 1.25
    assert small < 1024  # a Page, its LRU entry and its page table entry


@pytest.fixture
def m(make_machine: MakeMachine) -> Machine:
    return make_machine(1024, swap_pages=4096, latency=0.01)


def test_a_machine_with_a_device_sized_swap(make_machine: MakeMachine) -> None:
    machine = make_machine(256, swap_pages=100)
    assert machine.memory.swap is not None and machine.memory.swap.map.nr_slots == 99
    with pytest.raises(RuntimeError):
        machine.memory.swapon(MemorySwapDevice(10))
