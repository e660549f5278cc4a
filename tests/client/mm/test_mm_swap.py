"""Swap slot map: header slot, cluster allocation, reference counts; the swap cache."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from client.mm import SwapArea, SwapMap, Zone
from client.mm.swap import SWAP_HAS_CACHE, SWAPFILE_CLUSTER, SwapFull


def test_slot_zero_is_the_swap_header() -> None:
    smap = SwapMap(8)
    assert smap.nr_slots == 7
    assert [smap.alloc() for _ in range(7)] == [1, 2, 3, 4, 5, 6, 7]
    with pytest.raises(SwapFull):
        smap.alloc()


def test_no_device_no_slots() -> None:
    smap = SwapMap(0)
    assert smap.nr_free == 0
    with pytest.raises(SwapFull):
        smap.alloc()


def test_slots_come_from_a_wholly_free_cluster() -> None:
    smap = SwapMap(4 * SWAPFILE_CLUSTER)
    first = [smap.alloc() for _ in range(SWAPFILE_CLUSTER - 1)]  # all of cluster 0
    # leave holes in cluster 0, then ask for a run: it comes from cluster 1, contiguous
    for slot in first[::2]:
        smap.clear_cache(slot)
    run = [smap.alloc() for _ in range(40)]
    assert run == list(range(SWAPFILE_CLUSTER, SWAPFILE_CLUSTER + 40))


def test_linear_scan_when_no_cluster_is_free() -> None:
    smap = SwapMap(2 * SWAPFILE_CLUSTER)
    slots = [smap.alloc() for _ in range(smap.nr_slots)]
    smap.clear_cache(slots[10])
    smap.clear_cache(slots[300])
    assert sorted([smap.alloc(), smap.alloc()]) == sorted([slots[10], slots[300]])
    assert smap.nr_free == 0


def test_a_cluster_freed_entirely_is_reused_as_a_run() -> None:
    smap = SwapMap(3 * SWAPFILE_CLUSTER)
    slots = [smap.alloc() for _ in range(smap.nr_slots)]
    for slot in slots[SWAPFILE_CLUSTER - 1 : 2 * SWAPFILE_CLUSTER - 1]:  # cluster 1
        smap.clear_cache(slot)
    assert [smap.alloc() for _ in range(5)] == list(range(256, 261))


def test_counts_follow_ptes_and_the_swap_cache() -> None:
    smap = SwapMap(16)
    slot = smap.alloc()  # add_to_swap: in the swap cache
    assert smap.count(slot) == SWAP_HAS_CACHE and smap.pte_refs(slot) == 0
    smap.dup(slot)  # try_to_unmap: a swap pte
    smap.clear_cache(slot)  # reclaim freed the page; the pte still holds the slot
    assert smap.pte_refs(slot) == 1 and smap.nr_free == 14
    smap.set_cache(slot)  # swap-in: back in the swap cache
    smap.put_ref(slot)  # do_swap_page: swap_free
    assert smap.count(slot) == SWAP_HAS_CACHE
    smap.clear_cache(slot)  # re-dirtied: delete_from_swap_cache frees the slot
    assert smap.count(slot) == 0 and smap.nr_free == 15


def test_vm_swap_full_past_half() -> None:
    smap = SwapMap(11)  # 10 slots
    for _ in range(5):
        smap.alloc()
    assert not smap.vm_swap_full()
    smap.alloc()
    assert smap.vm_swap_full()


def test_swap_cache_add_and_delete() -> None:
    area = SwapArea(4)
    page = Zone("Normal", 0, 1).take()
    assert area.add_to_swap(page)
    assert page.swapcache and page.dirty and area.cache[page.private] is page
    slot = page.private
    area.delete_from_swap_cache(page)
    assert not page.swapcache and slot not in area.cache and area.map.count(slot) == 0


def test_add_to_swap_fails_when_full() -> None:
    area = SwapArea(2)
    zone = Zone("Normal", 0, 2)
    assert area.add_to_swap(zone.take())
    page = zone.take()
    assert not area.add_to_swap(page)
    assert not page.swapcache


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(st.sampled_from(["alloc", "dup", "put", "uncache"]), st.integers(0, 99))))
def test_swap_map_matches_a_reference_count_model(ops: list[tuple[str, int]]) -> None:
    smap = SwapMap(3 * SWAPFILE_CLUSTER // 2)
    ptes: dict[int, int] = {}  # slot -> swap ptes
    cached: set[int] = set()
    for op, pick in ops:
        used = sorted(set(ptes) | cached)
        if op == "alloc":
            if smap.nr_free == 0:
                continue
            slot = smap.alloc()
            assert slot != 0 and slot not in used
            cached.add(slot)
        elif not used:
            continue
        else:
            slot = used[pick % len(used)]
            if op == "dup":
                smap.dup(slot)
                ptes[slot] = ptes.get(slot, 0) + 1
            elif op == "put" and ptes.get(slot):
                smap.put_ref(slot)
                ptes[slot] -= 1
                if not ptes[slot]:
                    del ptes[slot]
            elif op == "uncache" and slot in cached:
                smap.clear_cache(slot)
                cached.discard(slot)
        in_use = set(ptes) | cached
        assert smap.nr_free == smap.nr_slots - len(in_use)
        for slot in in_use:
            assert smap.pte_refs(slot) == ptes.get(slot, 0)
