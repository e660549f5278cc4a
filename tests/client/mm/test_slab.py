"""Slab caches (mm/slub.c, 6.1): sizes, when a page is taken and given back, pfmemalloc slabs,
and the bio mempool built on one."""

from __future__ import annotations

from typing import TYPE_CHECKING

import pytest
import trio
import trio.testing

from client.mm import (
    GFP,
    GFP_ATOMIC,
    GFP_KERNEL,
    GFP_NOIO,
    GFP_NOWAIT,
    PF,
    AllocFailed,
    Memory,
    Page,
    task_flags,
)
from client.mm.slab import (
    FS_BIO_SLAB,
    SKBUFF_FCLONE_CACHE,
    SKBUFF_HEAD_CACHE,
    SLAB,
    SlabCache,
    SlabInfo,
    SlabObject,
    calculate_alignment,
    calculate_size,
    kmalloc_size_class,
    min_partial_for,
)

if TYPE_CHECKING:
    from conftest import Machine, MakeMachine

# 16 MiB, min_free_kbytes 3200: min 800, low 1000, high 1200 (as in test_mm_alloc.py).
# GFP_ATOMIC reaches 3/8 of min: 800 - 400 (ALLOC_HIGH) - 100 (ALLOC_HARDER) = 300.
PAGES = 4096
MIN, LOW = 800, 1000
ATOMIC_FLOOR = 300


@pytest.fixture
def m(make_machine: MakeMachine) -> Machine:
    return make_machine(PAGES, min_free_kbytes=3200)


def cache_256(memory: Memory, *, min_partial: int | None = 0) -> SlabCache:
    """A cache of 256-byte objects, 16 to a page; by default it frees a page as soon as its
    slab is empty (min_partial 0) so that tests can count pages."""
    return memory.slab.kmem_cache_create("test-256", 256, min_partial=min_partial)


async def drain(memory: Memory, gfp: GFP) -> list[Page]:
    """Allocate pages with ``gfp`` until it fails; the pages taken."""
    pages = []
    while (page := await memory.alloc_page(gfp)) is not None:
        pages.append(page)
    return pages


async def alloc_n(cache: SlabCache, n: int, gfp: GFP = GFP_KERNEL) -> list[SlabObject]:
    objs = []
    for _ in range(n):
        obj = await cache.alloc(gfp)
        assert obj is not None
        objs.append(obj)
    return objs


# -- sizes ------------------------------------------------------------------------------------


def test_object_sizes_and_objects_per_slab_page(m: Machine) -> None:
    slab = m.memory.slab
    # name: (object_size, size in the slab, objects per order-0 slab, min_partial)
    expected = {
        # fs_bio_set: sizeof(struct bio) ~136 + 4 inline bio_vecs of 16 = 200, + a free
        # pointer (SLAB_TYPESAFE_BY_RCU) = 208, cache-line aligned: 256
        FS_BIO_SLAB: (200, 256, 16, 5),
        SKBUFF_HEAD_CACHE: (232, 256, 16, 5),  # sizeof(struct sk_buff), HWCACHE_ALIGN
        SKBUFF_FCLONE_CACHE: (468, 512, 8, 5),  # two sk_buffs and a refcount
        "kmalloc-8": (8, 8, 512, 5),
        "kmalloc-96": (96, 96, 42, 5),  # 4096 // 96
        "kmalloc-192": (192, 192, 21, 5),
        "kmalloc-1k": (1024, 1024, 4, 5),
        "kmalloc-4k": (4096, 4096, 1, 6),  # ilog2(4096) / 2 = 6
    }
    for name, numbers in expected.items():
        cache = slab[name]
        assert (cache.object_size, cache.size, cache.objects, cache.min_partial) == numbers
    assert FS_BIO_SLAB == "bio-200"
    # no cache holds a page until something is allocated from it
    assert m.memory.stat.nr_slab_unreclaimable == 0 and m.memory.nr_free_pages == PAGES


def test_alignment_and_min_partial_rules() -> None:
    # calculate_alignment: a 24-byte object fits in half a line (32), not a quarter
    assert calculate_alignment(SLAB.HWCACHE_ALIGN, 0, 24) == 32
    assert calculate_alignment(SLAB.HWCACHE_ALIGN, 0, 200) == 64
    assert calculate_alignment(0, 0, 3) == 8  # ARCH_SLAB_MINALIGN
    assert calculate_size(24, 32, SLAB.HWCACHE_ALIGN) == 32
    assert calculate_size(200, 64, SLAB.HWCACHE_ALIGN) == 256
    # the RCU free pointer after the object: 248 + 8 still fits 256, 252 -> 256 + 8 does not
    assert calculate_size(248, 64, SLAB.HWCACHE_ALIGN | SLAB.TYPESAFE_BY_RCU) == 256
    assert calculate_size(252, 64, SLAB.HWCACHE_ALIGN | SLAB.TYPESAFE_BY_RCU) == 320
    # kmem_cache_open: ilog2(size) / 2 clamped to [MIN_PARTIAL 5, MAX_PARTIAL 10]
    assert [min_partial_for(s) for s in (8, 256, 2048, 4096)] == [5, 5, 5, 6]
    # kmalloc_index: the smallest class that fits, 96 and 192 included
    assert [kmalloc_size_class(s) for s in (1, 8, 9, 65, 97, 193, 640, 4096)] == [
        8, 8, 16, 96, 128, 256, 1024, 4096,
    ]  # fmt: skip
    with pytest.raises(ValueError, match="above order 0"):
        kmalloc_size_class(4097)


def test_cache_names_are_unique(m: Machine) -> None:
    with pytest.raises(ValueError, match="exists"):
        m.memory.slab.kmem_cache_create(SKBUFF_HEAD_CACHE, 232)
    assert m.memory.kmem_cache(SKBUFF_HEAD_CACHE) is m.memory.slab[SKBUFF_HEAD_CACHE]


# -- a page only when no slab has a free object; back only when the slab empties ---------------


async def test_a_new_page_only_when_no_slab_has_a_free_object(m: Machine) -> None:
    memory = m.memory
    cache = cache_256(memory)
    objs = await alloc_n(cache, 16)
    # 16 objects: one page, from the page allocator's fast path
    assert cache.nr_slabs == 1 and memory.stat.pgalloc == 1
    assert memory.nr_free_pages == PAGES - 1 and memory.stat.nr_slab_unreclaimable == 1
    assert {o.slab for o in objs} == {objs[0].slab} and sorted(o.index for o in objs) == [
        *range(16)
    ]
    assert objs[0].slab.page.slab and cache.nr_partial == 0  # full: off the partial list
    # the 17th needs a second slab
    seventeenth = await alloc_n(cache, 1)
    assert cache.nr_slabs == 2 and memory.stat.pgalloc == 2 and cache.nr_partial == 1
    assert memory.stat.nr_slab_unreclaimable == 2 and seventeenth[0].slab is not objs[0].slab
    # a freed object is reused before any new page is taken
    cache.free(objs[3])
    again = await alloc_n(cache, 16)
    assert memory.stat.pgalloc == 2 and cache.active_objs == cache.num_objs == 32
    assert objs[3] in again


async def test_a_page_goes_back_only_when_its_slab_is_empty(m: Machine) -> None:
    memory = m.memory
    cache = cache_256(memory)  # min_partial 0: an empty slab is freed at once
    first, second = (await alloc_n(cache, 16)), (await alloc_n(cache, 16))
    assert memory.nr_free_pages == PAGES - 2
    for obj in first[:15]:
        cache.free(obj)
    # one object still in use: the slab, and its page, stay (at the partial list's tail)
    assert memory.nr_free_pages == PAGES - 2 and cache.nr_slabs == 2 and cache.active_objs == 17
    assert cache.partial == [first[0].slab]
    cache.free(first[15])  # __slab_free: empty, nr_partial 1 >= min_partial 0: discard_slab
    assert memory.nr_free_pages == PAGES - 1 and memory.stat.pgfree == 1
    assert cache.nr_slabs == 1 and memory.stat.nr_slab_unreclaimable == 1
    assert not first[0].slab.page.slab  # PG_slab cleared, the page is free
    for obj in second:
        cache.free(obj)
    assert memory.nr_free_pages == PAGES and memory.stat.nr_slab_unreclaimable == 0
    with pytest.raises(RuntimeError, match="double free"):
        cache.free(second[0])


async def test_min_partial_keeps_empty_slabs_until_the_node_has_enough(m: Machine) -> None:
    memory = m.memory
    cache = cache_256(memory, min_partial=None)
    assert cache.min_partial == 5
    slabs = [await alloc_n(cache, 16) for _ in range(7)]
    assert memory.nr_free_pages == PAGES - 7
    for objs in slabs:  # empty them one slab after the other
        for obj in objs:
            cache.free(obj)
    # "if (!new.inuse && n->nr_partial >= s->min_partial) goto slab_empty": nr_partial
    # counts the slab being emptied, so the first four empty slabs are kept (1..4 < 5) and
    # the fifth, sixth and seventh are discarded (5 >= 5 each time)
    assert cache.nr_slabs == 4 and cache.nr_partial == 4 and cache.active_objs == 0
    assert memory.nr_free_pages == PAGES - 4 and memory.stat.nr_slab_unreclaimable == 4
    # kept empty slabs serve the next allocations without the page allocator
    pgalloc = memory.stat.pgalloc
    await alloc_n(cache, 64)
    assert memory.stat.pgalloc == pgalloc
    assert cache.nr_partial == 0  # all four full again


async def test_shrink_frees_every_empty_slab(m: Machine) -> None:
    memory = m.memory
    cache = cache_256(memory, min_partial=None)
    objs = await alloc_n(cache, 33)  # three slabs, the last with one object
    for obj in objs[:32]:
        cache.free(obj)
    assert cache.nr_slabs == 3
    assert cache.shrink() == 2 and cache.nr_slabs == 1
    assert memory.nr_free_pages == PAGES - 1


def test_a_slab_page_is_not_freed_as_a_page(m: Machine) -> None:
    cache = cache_256(m.memory)
    obj = cache.try_alloc()
    assert obj is not None
    with pytest.raises(RuntimeError, match="still in use"):
        m.memory.free_page(obj.slab.page)
    other = m.memory.slab.kmem_cache_create("other", 64)
    with pytest.raises(RuntimeError, match="to cache other"):
        other.free(obj)
    m.memory.slab.kfree(obj)  # kfree finds the object's own cache
    assert cache.active_objs == 0


async def test_kmalloc_serves_sizes_from_the_kmalloc_caches(m: Machine) -> None:
    slab = m.memory.slab
    # a TCP ACK's data (MAX_TCP_HEADER + skb_shared_info, about 640 bytes) is a kmalloc-1k
    data = await slab.kmalloc(640, GFP_ATOMIC)
    assert data is not None and data.cache is slab["kmalloc-1k"]
    head = await slab[SKBUFF_HEAD_CACHE].alloc(GFP_ATOMIC)
    assert head is not None and not head.pfmemalloc
    assert m.memory.stat.nr_slab_unreclaimable == 2
    slab.kfree(data)
    slab[SKBUFF_HEAD_CACHE].free(head)
    # both slabs are empty but kept: min_partial 5
    assert m.memory.stat.nr_slab_unreclaimable == 2 and slab["kmalloc-1k"].active_objs == 0


def test_try_alloc_never_goes_below_low(m: Machine) -> None:
    memory = m.memory
    cache = cache_256(memory)
    while memory.allocator.try_alloc() is not None:
        pass
    assert memory.nr_free_pages == LOW
    assert cache.try_alloc() is None  # no slab and the fast path gives no page
    assert memory.nr_free_pages == LOW and memory.stat.alloc_fail == 0  # nothing counted


# -- pfmemalloc slabs ---------------------------------------------------------------------------


async def test_gfp_atomic_fails_and_gfp_memalloc_succeeds_below_min(m: Machine) -> None:
    memory = m.memory
    await drain(memory, GFP_ATOMIC)
    assert memory.nr_free_pages == ATOMIC_FLOOR
    slab = memory.slab
    failed = len(m.facts_of(AllocFailed))
    # the kmalloc-1k cache has no slab: a new one needs a page GFP_ATOMIC cannot have
    assert await slab.kmalloc(640, GFP_ATOMIC) is None
    assert len(m.facts_of(AllocFailed)) == failed + 1 and slab["kmalloc-1k"].nr_slabs == 0
    # __GFP_MEMALLOC (an RX buffer while a memalloc socket exists) may take a reserve page:
    # the slab is pfmemalloc, and so is its object
    data = await slab.kmalloc(640, GFP_ATOMIC | GFP.MEMALLOC)
    assert data is not None and data.pfmemalloc and data.slab.page.pfmemalloc
    assert memory.nr_free_pages == ATOMIC_FLOOR - 1
    assert memory.stat.nr_emergency == 1 and memory.stat.alloc_emergency == 1


async def test_a_pfmemalloc_slab_serves_only_callers_entitled_to_the_reserves(m: Machine) -> None:
    memory = m.memory
    cache = cache_256(memory)
    pages = await drain(memory, GFP_ATOMIC)
    reserve_obj = await cache.alloc(GFP_ATOMIC | GFP.MEMALLOC)
    assert reserve_obj is not None and reserve_obj.pfmemalloc
    pfmemalloc_slab = reserve_obj.slab
    assert cache.partial == [pfmemalloc_slab] and pfmemalloc_slab.inuse == 1
    # pfmemalloc_match: 15 free objects, but not for GFP_ATOMIC; a new slab cannot be had
    assert await cache.alloc(GFP_ATOMIC) is None
    # __GFP_NOMEMALLOC overrides PF_MEMALLOC: no reserve slab either
    with task_flags(PF.MEMALLOC):
        assert await cache.alloc(GFP_ATOMIC | GFP.NOMEMALLOC) is None
    assert pfmemalloc_slab.inuse == 1 and cache.nr_slabs == 1
    # a PF_MEMALLOC task (reclaim, the swap socket's sender) is entitled: it gets one
    with task_flags(PF.MEMALLOC):
        obj = await cache.alloc(GFP_NOIO)
    assert obj is not None and obj.slab is pfmemalloc_slab and obj.pfmemalloc
    # memory comes back: a GFP_ATOMIC caller gets a new, ordinary slab, not the reserve one
    for page in pages:
        memory.free_page(page)
    ordinary = await alloc_n(cache, 16, GFP_ATOMIC)
    assert all(not o.pfmemalloc for o in ordinary) and pfmemalloc_slab.inuse == 2
    assert cache.nr_slabs == 2 and cache.partial == [pfmemalloc_slab]
    another = await alloc_n(cache, 1, GFP_ATOMIC)  # the 17th: a third slab, still not it
    assert another[0].slab is not pfmemalloc_slab and cache.nr_slabs == 3
    # the reserve page goes back when its slab empties (__free_slab clears pfmemalloc)
    cache.free(obj)
    cache.free(reserve_obj)
    assert cache.nr_slabs == 2 and memory.stat.nr_emergency == 0
    assert not pfmemalloc_slab.page.pfmemalloc


# -- /proc/slabinfo, vmstat ----------------------------------------------------------------------


async def test_slabinfo_and_vmstat_count_slab_pages(m: Machine) -> None:
    memory = m.memory
    head = memory.slab[SKBUFF_HEAD_CACHE]
    await alloc_n(head, 20, GFP_ATOMIC)
    info = {i.name: i for i in memory.slab.slabinfo()}
    assert info[SKBUFF_HEAD_CACHE] == SlabInfo(
        name=SKBUFF_HEAD_CACHE,
        active_objs=20,
        num_objs=32,
        objsize=256,
        objperslab=16,
        pagesperslab=1,
        num_slabs=2,
    )
    assert info[FS_BIO_SLAB].num_slabs == 0 and len(info) == len(list(memory.slab))
    assert memory.vmstat()["nr_slab_unreclaimable"] == 2 == memory.slab.nr_pages


# -- the bio mempool over the bio slab -----------------------------------------------------------


def test_the_bio_mempool_reserves_two_slab_objects_in_one_page(make_machine: MakeMachine) -> None:
    machine = make_machine(1024, swap_pages=256, bio_cache="kernel")
    memory = machine.memory
    assert memory.block is not None
    pool = memory.block.bio_pool
    bio_slab = memory.slab[FS_BIO_SLAB]
    assert pool.curr_nr == pool.min_nr == 2  # BIO_POOL_SIZE
    assert bio_slab.active_objs == 2 and bio_slab.nr_slabs == 1
    assert memory.stat.nr_slab_unreclaimable == 1 and memory.nr_free_pages == 1023


async def test_the_bio_mempool_takes_slab_objects_then_its_reserve_then_waits(
    make_machine: MakeMachine, autojump_clock: trio.testing.MockClock
) -> None:
    machine = make_machine(PAGES, swap_pages=256, min_free_kbytes=3200, bio_cache="kernel")
    memory = machine.memory
    assert memory.block is not None
    pool, bio_slab = memory.block.bio_pool, memory.slab[FS_BIO_SLAB]
    await drain(memory, GFP_NOWAIT)  # down to min: the mempool's backing allocator fails there
    assert memory.nr_free_pages == MIN
    # mempool_alloc step 1: the backing allocator, kmem_cache_alloc(bio-200, gfp_temp):
    # the slab that holds the two reserved elements has 14 free objects, no page needed
    bios = [await pool.alloc(GFP_NOIO) for _ in range(14)]
    assert pool.curr_nr == 2 and bio_slab.nr_slabs == 1 and memory.nr_free_pages == MIN
    # the slab is full and a new slab needs a page below low without __GFP_DIRECT_RECLAIM,
    # with __GFP_NOMEMALLOC: step 2, the reserved elements
    bios += [await pool.alloc(GFP_NOIO) for _ in range(2)]
    assert pool.curr_nr == 0 and bio_slab.nr_slabs == 1 and bio_slab.active_objs == 16
    # step 4: a caller that may not sleep gets nothing (GFP_NOWAIT has no __GFP_IO to drop:
    # no step 3)
    assert await pool.alloc(GFP_NOWAIT) is None
    assert all(b is not None and not b.pfmemalloc for b in bios)
    got: list[SlabObject | None] = []

    async def writer() -> None:
        got.append(await pool.alloc(GFP_NOIO))

    async with trio.open_nursery() as nursery:
        nursery.start_soon(writer, name="kswapd0")
        await trio.testing.wait_all_tasks_blocked()
        assert pool.nr_waiting == 1
        done = bios.pop()
        assert done is not None
        pool.free(done)  # mempool_free: below min_nr, refill the pool and wake the waiter
    assert got == [done] and pool.curr_nr == 0
    for bio in bios:
        assert bio is not None
        pool.free(bio)  # two refill the pool, the rest go back to the slab
    assert pool.curr_nr == 2 and bio_slab.active_objs == 3  # two reserved, one held


async def test_page_sized_bios_cost_a_page_each_as_before(make_machine: MakeMachine) -> None:
    """``bio_cache`` "page": one bio per slab page, the page allocated with the bio and freed
    with it (min_partial 0), as the bio mempool over whole pages did."""
    machine = make_machine(1024, swap_pages=256, bio_cache="page")
    memory = machine.memory
    assert memory.block is not None
    pool = memory.block.bio_pool
    bio_slab = memory.slab["bio-4096"]
    assert (bio_slab.size, bio_slab.objects, bio_slab.min_partial) == (4096, 1, 0)
    assert pool.curr_nr == 2 and bio_slab.nr_slabs == 2 and memory.nr_free_pages == 1022
    bio = await pool.alloc(GFP_NOIO)  # step 1: the backing allocator gives a new page
    assert bio is not None and bio.cache is bio_slab and pool.curr_nr == 2
    assert memory.nr_free_pages == 1021 and memory.stat.nr_slab_unreclaimable == 3
    pool.free(bio)  # the pool is full: back to the slab, whose page is freed at once
    assert memory.nr_free_pages == 1022 and memory.stat.nr_slab_unreclaimable == 2
    assert memory.slab[FS_BIO_SLAB].nr_slabs == 0  # the kernel's bio cache is unused
