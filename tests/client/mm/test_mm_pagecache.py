"""The page cache (clean file pages) and how reclaim balances it against anon memory."""

from __future__ import annotations

from typing import TYPE_CHECKING

import pytest
import trio

from client.mm import GFP_KERNEL, GFP_NOIO, SWAP_CLUSTER_MAX, IntegrityError, Memory, ScanControl
from client.mm.pagecache import CachedFile
from client.mm.testing import pattern_content
from client.workload import file_content

if TYPE_CHECKING:
    from conftest import MakeMachine


async def read_all(memory: Memory, file: CachedFile, times: int = 1) -> None:
    reader = memory.new_process("reader")
    for _ in range(times):
        for index in range(file.nr_pages):
            await memory.read_file(reader, file, index, file_content)


async def test_a_miss_reads_the_readahead_window_onto_the_inactive_file_list(
    make_machine: MakeMachine, autojump_clock: trio.abc.Clock
) -> None:
    memory = make_machine(1024, readahead_pages=8, disk_read_latency=0.005).memory
    file = memory.open_file("data", 20)
    reader = memory.new_process("reader")
    start = trio.current_time()
    await memory.read_file(reader, file, 0, file_content)
    assert sorted(file.cache) == list(range(8))  # one window: pages 0..7
    assert trio.current_time() - start == pytest.approx(0.005)  # one disk request
    assert memory.lru.nr_inactive_file == 8 and memory.lru.nr_active_file == 0
    assert memory.vmstat()["nr_file_pages"] == 8 and memory.stat.pgpgin == 8 * 4  # KiB
    await memory.read_file(reader, file, 7, file_content)  # a hit: no disk time
    assert trio.current_time() - start == pytest.approx(0.005)
    await memory.read_file(reader, file, 19, file_content)  # the window stops at EOF
    assert sorted(file.cache) == [*range(8), *range(19, 20)]


async def test_mark_page_accessed_promotes_on_the_second_touch(make_machine: MakeMachine) -> None:
    memory = make_machine(1024).memory
    file = memory.open_file("data", 1)
    await read_all(memory, file)  # the read itself is the first touch: referenced
    page = file.cache[0]
    assert page.referenced and not page.active
    await read_all(memory, file)  # second: activate_page, counted as rotated for get_scan_count
    assert page.active and not page.referenced and memory.lru.nr_active_file == 1
    assert memory.lru.reclaim_stat.recent_rotated[1] == 1


async def test_clean_file_pages_are_freed_without_io_even_under_gfp_noio(
    make_machine: MakeMachine,
) -> None:
    m = make_machine(1024, swap_pages=4096)
    memory = m.memory
    file = memory.open_file("data", 64)
    await read_all(memory, file, times=2)  # all referenced; some active
    free = memory.nr_free_pages
    sc = await memory.reclaimer.shrink(GFP_NOIO, SWAP_CLUSTER_MAX)
    assert sc.nr_reclaimed >= SWAP_CLUSTER_MAX and sc.nr_pageout == 0
    assert memory.nr_free_pages == free + sc.nr_reclaimed
    assert m.device is not None and m.device.writes() == []  # no I/O at all
    assert len(file.cache) == 64 - sc.nr_reclaimed  # __remove_mapping took them out
    await read_all(memory, file)  # what was dropped is read back from the disk, intact
    assert len(file.cache) == 64


async def test_a_corrupted_page_cache_page_is_reported(make_machine: MakeMachine) -> None:
    memory = make_machine(1024).memory
    file = memory.open_file("data", 1)
    await read_all(memory, file)
    memory.frames.fill(file.cache[0].pfn, bytes(4096))
    with pytest.raises(IntegrityError):
        await read_all(memory, file)


# -- get_scan_count ---------------------------------------------------------------------------


async def test_without_swap_only_file_pages_are_scanned(make_machine: MakeMachine) -> None:
    memory = make_machine(1024).memory  # no swapon
    assert memory.reclaimer.get_scan_count() == (0, 0)
    await read_all(memory, memory.open_file("data", 40))
    assert memory.reclaimer.get_scan_count() == (0, SWAP_CLUSTER_MAX)


async def test_without_page_cache_only_anon_is_scanned(make_machine: MakeMachine) -> None:
    memory = make_machine(1024, swap_pages=4096).memory
    assert memory.reclaimer.get_scan_count() == (SWAP_CLUSTER_MAX, 0)


async def test_enough_inactive_page_cache_spares_the_anon_working_set(
    make_machine: MakeMachine,
) -> None:
    memory = make_machine(1024, swap_pages=4096).memory
    hog = memory.new_process("hog")
    for v in range(100):
        await memory.touch(hog, v, write=True, content_fn=pattern_content)
    await read_all(memory, memory.open_file("data", 64))  # read once: all inactive
    assert memory.reclaimer.get_scan_count() == (0, SWAP_CLUSTER_MAX)  # SCAN_FILE
    sc = ScanControl(GFP_KERNEL)
    await memory.reclaimer.shrink_node(sc)
    assert sc.nr_reclaimed == SWAP_CLUSTER_MAX and sc.nr_pageout == 0
    assert len(hog.present) == 100


async def test_scan_fract_follows_swappiness_and_the_rotation_feedback(
    make_machine: MakeMachine,
) -> None:
    memory = make_machine(4096, swap_pages=4096, swappiness=60).memory
    file = memory.open_file("data", 256)
    await read_all(memory, file, times=2)  # every file page active: inactive file is low
    reclaimer = memory.reclaimer
    stat = memory.lru.reclaim_stat
    stat.recent_scanned[:] = [0, 0]
    stat.recent_rotated[:] = [0, 0]
    # ap = 60 * 1/1, fp = 140 * 1/1: 32 * 60/201 and 32 * 140/201, rounded up.
    assert reclaimer.get_scan_count() == (10, 23)
    # File pages that keep coming back (256 of 256 scanned were rotated) are scanned less:
    # fp = 140 * 257 / 257 = 140 vs ap = 60 * 257 / 1.
    stat.recent_scanned[:] = [256, 256]
    stat.recent_rotated[:] = [0, 256]
    nr_anon, nr_file = reclaimer.get_scan_count()
    assert nr_anon == 32 and nr_file == 1
    memory.reclaimer.swappiness = 0  # anon_prio 0: anon only when there is no file left
    stat.recent_scanned[:] = [0, 0]
    stat.recent_rotated[:] = [0, 0]
    assert reclaimer.get_scan_count() == (0, 32)
