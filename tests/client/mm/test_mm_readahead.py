"""Swap readahead (mm/swap_state.c swapin_readahead, swapin_nr_pages; vm.page-cluster)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import pytest
import trio
import trio.testing

from client.mm import Memory, MemoryConfig, Process, SwapReadpage
from client.mm.swap import SwapArea, vma_readahead_window
from client.mm.testing import MemorySwapDevice, pattern_content

if TYPE_CHECKING:
    from conftest import Machine, MakeMachine


def test_swapin_nr_pages_worked_numbers() -> None:
    area = SwapArea(1 << 16)
    # No hits and not next to the previous fault: just the page.
    assert area.swapin_nr_pages(100, 3) == 1
    # No hits, but adjacent to the previous offset (100): two pages.
    assert area.swapin_nr_pages(101, 3) == 2
    # Three hits: 3 + 2 = 5, rounded up to a power of two: 8 = 1 << page_cluster.
    area.ra_hits = 3
    assert area.swapin_nr_pages(300, 3) == 8
    assert area.ra_hits == 0  # atomic_xchg(&swapin_readahead_hits, 0)
    # One hit: 3 -> 4 (the roundup starts at 4).
    area.ra_hits = 1
    assert area.swapin_nr_pages(310, 3) == 4
    # No hits, not adjacent: 1, but "don't shrink readahead too fast": 4 / 2 = 2.
    assert area.swapin_nr_pages(900, 3) == 2
    assert area.swapin_nr_pages(2000, 3) == 1  # then 2 / 2 = 1
    # Many hits: capped at 1 << page_cluster.
    area.ra_hits = 40
    assert area.swapin_nr_pages(50, 2) == 4
    # page_cluster 0: readahead off, whatever the hits.
    area.ra_hits = 40
    assert area.swapin_nr_pages(51, 0) == 1


def test_readahead_window_is_aligned_and_skips_the_header() -> None:
    area = SwapArea(64)
    area.ra_hits = 6  # -> 8 pages
    assert area.readahead_window(13, 3) == range(8, 16)
    area.ra_hits = 6
    assert area.readahead_window(3, 3) == range(1, 8)  # slot 0 is the swap header
    area.ra_hits = 6
    assert area.readahead_window(61, 3) == range(56, 64)
    small = SwapArea(60)
    small.ra_hits = 6
    assert small.readahead_window(57, 3) == range(56, 60)  # not past the device's end
    assert area.readahead_window(30, 0) == range(30, 31)


def _swapping(
    make_machine: MakeMachine, **config: Any
) -> tuple[Machine, MemorySwapDevice, SwapArea]:
    """A 1024-page machine with 4x its size of swap: the machine, its device, its swap."""
    machine = make_machine(1024, swap_pages=4096 + 64, **config)
    assert machine.device is not None and machine.memory.swap is not None
    return machine, machine.device, machine.memory.swap


async def _write(memory: Memory, process: Process, nr: int) -> None:
    for v in range(nr):
        await memory.touch(process, v, write=True, content_fn=pattern_content)


async def _write_then_read(memory: Memory, process: Process, nr: int) -> None:
    await _write(memory, process, nr)
    for v in range(nr):  # raises IntegrityError on a wrong page
        await memory.touch(process, v, write=False, content_fn=pattern_content)


@pytest.mark.parametrize("page_cluster", [0, 3])
async def test_sequential_read_back_reads_ahead_in_few_requests(
    make_machine: MakeMachine, autojump_clock: trio.testing.MockClock, page_cluster: int
) -> None:
    machine, device, swap = _swapping(make_machine, page_cluster=page_cluster)
    memory = machine.memory

    def check(slot: int) -> bool:  # asked for each slot of a read, before it completes
        # __read_swap_cache_async reads only slots a swap pte points at, into the swap cache.
        assert swap.map.pte_refs(slot) > 0 and slot in swap.cache
        return False

    device.fail_read = check
    async with memory.running():
        process = memory.new_process("hog")
        await _write_then_read(memory, process, 3 * 1024)
    stats = memory.vmstat()
    reads = device.reads()
    assert stats["pswpin"] == sum(r.nr_pages for r in reads) == memory.progress.swapins_completed
    if page_cluster == 0:
        assert all(r.nr_pages == 1 for r in reads)
        assert stats["pgmajfault"] == len(reads)
        assert stats["swap_ra"] == stats["swap_ra_hit"] == 0
    else:
        # A sequential reader: the window grows to 8 and most pages are found, not read.
        assert max(r.nr_pages for r in reads) == 8
        assert stats["swap_ra_hit"] > 0.8 * stats["swap_ra"] > 0
        assert len(reads) < stats["pswpin"] / 4
        assert stats["pgmajfault"] < stats["pswpin"] / 4
    assert sum(f.readahead for f in machine.facts_of(SwapReadpage)) == stats["swap_ra"]


async def test_an_untouched_readahead_page_is_dropped_clean_and_its_slot_kept(
    make_machine: MakeMachine, autojump_clock: trio.testing.MockClock
) -> None:
    machine, device, swap = _swapping(make_machine)
    memory = machine.memory
    async with memory.running():
        process = memory.new_process("hog")
        await _write(memory, process, 2048)
        vpage = 16
        slot = process.swapped[vpage]
        neighbours = {s: v for v, s in process.swapped.items() if s // 8 == slot // 8}
        assert len(neighbours) == 8  # written in order: one aligned block of 8 slots
        swap.ra_hits = 6  # as if the reader were sequential: a window of 8
        await memory.touch(process, vpage, write=False, content_fn=pattern_content)
        ahead = [swap.cache[s] for s in neighbours if s != slot]
        assert all(p.readahead and not p.referenced and p.mapping is None for p in ahead)
        assert memory.stat.swap_ra == 7
        writes_before = len(device.writes())
        # Pressure: another process fills memory; reclaim finds the readahead pages clean.
        other = memory.new_process("other")
        for v in range(2048):
            await memory.touch(other, v, write=True, content_fn=pattern_content)
        assert all(s not in swap.cache for s in neighbours if s != slot)
        written = {
            s for w in device.writes()[writes_before:] for s in range(w.slot, w.slot + w.nr_pages)
        }
        assert not written & (set(neighbours) - {slot}), "a clean page was written again"
        # Their data is still in the slots: reading them back verifies.
        for s, v in neighbours.items():
            await memory.touch(process, v, write=False, content_fn=pattern_content)
            assert process.present[v] is not None, s


def test_page_cluster_is_validated() -> None:
    with pytest.raises(ValueError, match="page_cluster"):
        MemoryConfig(total_bytes=1 << 20, page_cluster=11)


async def read(memory: Memory, process: Process, vpage: int) -> None:
    await memory.touch(process, vpage, write=False, content_fn=pattern_content)


def _accounted(memory: Memory) -> int:
    """Every frame is free, on the LRU, or a slab page (the bio mempool's and bios')."""
    return memory.nr_free_pages + len(memory.lru) + memory.stat.nr_slab_unreclaimable


async def test_a_fault_cancelled_between_two_runs_leaves_nothing_behind(
    make_machine: MakeMachine, autojump_clock: trio.testing.MockClock
) -> None:
    """The window holds two runs (a slot in the middle is already in the swap cache) and
    the queue one tag: the first run's read is held by the device, the second run waits
    for the tag. A fault on a page of the second run waits for the faulting task, not for
    "the swap device" (nothing was submitted). Cancelling the fault then undoes the second
    run: its pages, its bio, and its waiter looks again and reads the page itself."""
    machine, device, swap = _swapping(make_machine, swap_queue_depth=1)
    memory = machine.memory
    async with memory.running():
        process = memory.new_process("hog")
        await _write(memory, process, 2048)
        await trio.testing.wait_all_tasks_blocked()
        slot = process.swapped[16]
        by_slot = {s: v for v, s in process.swapped.items()}
        window = range(slot & ~7, (slot & ~7) + 8)
        assert all(s in by_slot for s in window)
        await memory.touch(process, by_slot[window[3]], write=False, content_fn=pattern_content)
        assert window[3] in swap.cache  # the gap: the window is two runs
        device.gate = trio.Event()
        swap.ra_hits = 6
        faulting = by_slot[window[0]]
        second_run = by_slot[window[5]]
        async with trio.open_nursery() as nursery:
            fault = trio.CancelScope()

            async def fault_in(vpage: int) -> None:
                with fault:
                    await memory.touch(process, vpage, write=False, content_fn=pattern_content)

            nursery.start_soon(fault_in, faulting, name="faulter")
            await trio.testing.wait_all_tasks_blocked()
            assert memory.waits.snapshot()["faulter"].kind == "request_tag"
            nursery.start_soon(read, memory, process, second_run, name="waiter")
            await trio.testing.wait_all_tasks_blocked()
            waiting = memory.waits.snapshot()["waiter"]
            assert (waiting.kind, waiting.waker) == ("swapin", "faulter")
            fault.cancel()
            await trio.testing.wait_all_tasks_blocked()
            device.gate.set()
        # The waiter read its page itself, once: not a read error, no retry.
        assert second_run in process.present
        assert memory.stat.swap_read_errors == memory.stat.swap_read_retries == 0
        assert not memory.page_io.swapin
        assert all(swap.cache[s].mapping is None for s in window if s in swap.cache
                   and s != window[3] and by_slot[s] not in process.present)  # fmt: skip
        assert _accounted(memory) == 1024


async def test_a_failed_merged_read_drops_every_page_and_the_fault_reads_again(
    make_machine: MakeMachine, autojump_clock: trio.testing.MockClock
) -> None:
    machine, device, swap = _swapping(make_machine)
    memory = machine.memory
    async with memory.running():
        process = memory.new_process("hog")
        await _write(memory, process, 2048)
        slot = process.swapped[16]
        window = set(range(slot & ~7, (slot & ~7) + 8))
        failures = iter([True])
        device.fail_read = lambda s: s == slot and next(failures, False)
        swap.ra_hits = 6
        await memory.touch(process, 16, write=False, content_fn=pattern_content)
        reads = device.reads()
        assert reads[0].failed and reads[0].nr_pages == 8  # the whole window, merged
        assert memory.stat.swap_read_errors == memory.stat.swap_read_retries == 1
        # The retry's window is sized afresh: no hits, but "don't shrink readahead too
        # fast", half of 8. It verified; of the failed window only its 4 are cached.
        retry = set(range(slot & ~3, (slot & ~3) + 4))
        assert not reads[-1].failed and reads[-1].nr_pages == 4 and 16 in process.present
        assert {s for s in window if s in swap.cache} == retry
        assert not memory.page_io.swapin


async def test_a_fault_that_waits_for_a_readahead_page_counts_one_hit(
    make_machine: MakeMachine, autojump_clock: trio.testing.MockClock
) -> None:
    machine, device, swap = _swapping(make_machine)
    memory = machine.memory
    async with memory.running():
        process = memory.new_process("hog")
        await _write(memory, process, 2048)
        by_slot = {s: v for v, s in process.swapped.items()}
        slot = process.swapped[16]
        neighbour = by_slot[slot + 1]
        device.gate = trio.Event()
        swap.ra_hits = 6
        async with trio.open_nursery() as nursery:
            for vpage in (16, neighbour):
                nursery.start_soon(read, memory, process, vpage, name=f"t{vpage}")
                await trio.testing.wait_all_tasks_blocked()
            waiting = memory.waits.snapshot()[f"t{neighbour}"]
            assert waiting.waker == "swap device"  # submitted: the device has it
            device.gate.set()
        assert memory.stat.swap_ra_hit == 1 and neighbour in process.present
        assert memory.stat.pgmajfault == 1


# -- VMA readahead (swap_vma_readahead, 4.14+) -------------------------------------------


def test_vma_readahead_window_worked_numbers() -> None:
    # First swap-in of the mapping: "initial readahead hits is 4": 4 + 2 -> 8, centred.
    window, info = vma_readahead_window(None, 100, 3)
    assert (window, info) == (range(97, 105), (100, 8, 0))
    # The next fault just after it: no hits, adjacent -> 2, but never below 8 / 2: forward.
    window, info = vma_readahead_window(info, 101, 3)
    assert (window, info) == (range(101, 105), (101, 4, 0))
    # Just before the last one: 2 (adjacent), 4 / 2 = 2: backward.
    window, info = vma_readahead_window(info, 100, 3)
    assert (window, info) == (range(99, 101), (100, 2, 0))
    # Hits grow it, up to 1 << min(page_cluster, SWAP_RA_ORDER_CEILING) = 32.
    window, info = vma_readahead_window((300, 2, 30), 400, 6)
    assert len(window) == 32 and info == (400, 32, 0)
    # It stays inside the page table (512 pages) and the mapping.
    assert vma_readahead_window(None, 510, 3)[0] == range(507, 512)
    assert vma_readahead_window(None, 2, 3)[0] == range(0, 7)  # centred, from page 0
    assert vma_readahead_window(None, 1, 3)[0] == range(1, 9)  # "after" page 0: forward
    # page_cluster 0: no readahead, and the VMA's info is left alone.
    assert vma_readahead_window((7, 4, 1), 50, 0) == (range(50, 51), (7, 4, 1))


@pytest.mark.parametrize("mode", ["cluster", "vma"])
async def test_vma_readahead_reads_the_faulting_process_pages_only(
    make_machine: MakeMachine, autojump_clock: trio.testing.MockClock, mode: str
) -> None:
    """Two processes write in turns, so their pages alternate in the swap slots. A fault
    of one reads ahead by slot (cluster: the other's pages too, in one request) or by
    address (vma: only its own neighbours, whose slots are not contiguous)."""
    machine, device, swap = _swapping(make_machine, swap_readahead=mode)
    memory = machine.memory
    async with memory.running():
        a, b = memory.new_process("a"), memory.new_process("b")
        for v in range(1024):
            for process in (a, b):
                await memory.touch(process, v, write=True, content_fn=pattern_content)
        assert a.swapped[100] + 2 in b.swapped.values() or a.swapped[100] + 1 in b.swapped.values()
        reads_before = len(device.reads())
        swap.ra_hits = 6  # cluster: a window of 8 (a VMA starts with hits of 4: 8 too)
        await memory.touch(a, 100, write=False, content_fn=pattern_content)
        ahead = [p for p in swap.cache.values() if p.readahead]
        owners = {"a" if p.private in a.swapped.values() else "b" for p in ahead}
        reads = device.reads()[reads_before:]
        assert len(ahead) == memory.stat.swap_ra == 7
    if mode == "cluster":
        assert owners == {"a", "b"} and len(reads) == 1  # 8 slots in a row
    else:
        assert owners == {"a"} and len(reads) > 1  # a's slots alternate with b's
        assert a.swap_ra == (100, 8, 0) and b.swap_ra is None


async def test_vma_readahead_of_a_sequential_reader_hits(
    make_machine: MakeMachine, autojump_clock: trio.testing.MockClock
) -> None:
    machine, _, _ = _swapping(make_machine, swap_readahead="vma")
    memory = machine.memory
    async with memory.running():
        process = memory.new_process("hog")
        await _write_then_read(memory, process, 3 * 1024)
    stats = memory.vmstat()
    assert stats["swap_ra_hit"] > 0.8 * stats["swap_ra"] > 0
    assert stats["pgmajfault"] < stats["pswpin"] / 4
    assert memory.swap is not None and memory.swap.ra_hits == 0  # the VMA counts them


def test_swap_readahead_is_validated() -> None:
    with pytest.raises(ValueError, match="swap_readahead"):
        MemoryConfig(total_bytes=1 << 20, swap_readahead="vmm")
