"""Slab caches: small kernel objects carved out of order-0 pages (SLUB, mm/slub.c, Linux 6.1).

A ``SlabCache`` is a ``struct kmem_cache``. Its objects live in *slabs*, each one page from
the page allocator. ``alloc(gfp)`` takes an object from a partial slab and asks the page
allocator for a new slab (with the caller's gfp: the same watermark, reclaim and reserve
rules as any page allocation) only when no slab has a free object; ``free(obj)`` gives the
object back, and the slab's page goes back to the page allocator only when the slab is
empty and the cache already keeps ``min_partial`` partial slabs.

What the model keeps of SLUB, and what it leaves out:

* One node, no per-cpu slabs and no per-cpu partial lists: every object comes from the
  node's partial list or from a new slab. This is the shape of 6.2's ``CONFIG_SLUB_TINY``
  (``__slab_alloc_node``: ``get_partial`` then ``alloc_single_from_new_slab``); the rules
  it implements (which slab may serve whom, when a page is taken and when it is given back)
  are 6.1's ``___slab_alloc``/``get_partial_node``/``__slab_free``.
* Order-0 slabs only (``oo == s->min``, one page each). SLUB picks a higher order for many
  caches on big machines (``calculate_order``: ``slub_min_objects = 4 * (fls(nr_cpu_ids) +
  1)``, 12 on two CPUs); 256-byte objects fit 16 to a page, which satisfies that.
* pfmemalloc slabs: a slab whose page came from below the min watermark is pfmemalloc
  (``allocate_slab``: ``if (page_is_pfmemalloc(page)) SetPageSlabPfmemalloc(page)``, 6.1
  ``slab_set_pfmemalloc``), and only a caller entitled to the reserves may take an object
  from it (``pfmemalloc_match``). Objects from such a slab are pfmemalloc: what
  ``kmalloc_reserve`` reports as ``skb->pfmemalloc``.
* Slab pages count in vmstat ``nr_slab_unreclaimable`` (``account_slab``/``unaccount_slab``:
  NR_SLAB_UNRECLAIMABLE_B, which /proc/vmstat prints in pages). No cache here has
  SLAB_RECLAIM_ACCOUNT, so nothing is ``nr_slab_reclaimable`` and no shrinker frees slabs.
* Not modelled: cache merging (``__kmem_cache_alias``), debugging, memcg accounting, RCU
  freeing (``SLAB_TYPESAFE_BY_RCU`` only moves the free pointer, see ``calculate_size``).

The caches a booted 6.1 kernel has and this model uses are built by ``SlabCaches`` (one
per ``Memory``, ``memory.slab``): the kmalloc caches, ``skbuff_head_cache``,
``skbuff_fclone_cache`` and fs_bio_set's ``bio-200``.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Final, TypeAlias

import attrs

from client.mm.alloc import Allocator
from client.mm.gfp import GFP, GFP_KERNEL, current_task_flags, gfp_pfmemalloc_allowed, gfp_t
from client.mm.page import PAGE_SIZE, Page
from client.mm.vmstat import VmStat

# mm/slub.c: "Minimum number of partial slabs. These will be left on the partial lists even
# if they are empty. kmem_cache_shrink may reclaim them." and the maximum kmem_cache_open
# sets from the object size.
MIN_PARTIAL = 5
MAX_PARTIAL = 10
# x86_64: cache_line_size() (L1_CACHE_BYTES) for SLAB_HWCACHE_ALIGN; ARCH_SLAB_MINALIGN and
# ARCH_KMALLOC_MINALIGN are __alignof__(unsigned long long); a free pointer is a void *.
CACHE_LINE_SIZE = 64
ARCH_SLAB_MINALIGN = 8
ARCH_KMALLOC_MINALIGN = 8
POINTER_SIZE = 8


#: include/linux/types.h ``slab_flags_t``: a cache's ``SLAB_*`` flags, a plain integer.
slab_flags_t: TypeAlias = int


class SLAB:
    """``SLAB_*`` cache flags (include/linux/slab.h) that change the model's numbers."""

    HWCACHE_ALIGN: Final = 0x00002000  # align objects on cache lines
    TYPESAFE_BY_RCU: Final = 0x00080000  # the free pointer may not overlay the object
    PANIC: Final = 0x00040000  # kmem_cache_create panics on failure (no effect in the model)


NO_SLAB_FLAGS: Final = 0


def calculate_alignment(flags: slab_flags_t, align: int, size: int) -> int:
    """mm/slab_common.c calculate_alignment: cache-line alignment for SLAB_HWCACHE_ALIGN,
    halved while the object fits twice ("objects smaller than the line ... are aligned to
    a fraction of it"), at least ARCH_SLAB_MINALIGN, a multiple of a pointer."""
    if flags & SLAB.HWCACHE_ALIGN:
        ralign = CACHE_LINE_SIZE
        while size <= ralign // 2:
            ralign //= 2
        align = max(align, ralign)
    align = max(align, ARCH_SLAB_MINALIGN)
    return _align_up(align, POINTER_SIZE)


def calculate_size(object_size: int, align: int, flags: slab_flags_t) -> int:
    """mm/slub.c calculate_sizes (no debugging): ``s->size``, the bytes one object takes in
    its slab. The free pointer sits inside a free object unless SLAB_TYPESAFE_BY_RCU (or a
    constructor) needs the object intact, then after it; the result is rounded to
    ``align``."""
    size = _align_up(object_size, POINTER_SIZE)
    if flags & SLAB.TYPESAFE_BY_RCU:  # "s->offset = size; size += sizeof(void *)"
        size += POINTER_SIZE
    return _align_up(size, align)


def min_partial_for(size: int) -> int:
    """mm/slub.c kmem_cache_open: ``min_partial = ilog2(s->size) / 2`` clamped to
    [MIN_PARTIAL, MAX_PARTIAL] ("The larger the object size is, the more slabs we want on
    the partial list to avoid pounding the page allocator excessively")."""
    return min(MAX_PARTIAL, max(MIN_PARTIAL, (size.bit_length() - 1) // 2))


def _align_up(n: int, align: int) -> int:
    return -(-n // align) * align


@attrs.define(eq=False, repr=False)
class SlabObject:
    """One object of a slab cache: what ``kmem_cache_alloc`` returns.

    ``pfmemalloc`` says it came from a slab whose page was taken from the reserves below
    min; the network code copies it into ``skb->pfmemalloc`` (net/core/skbuff.c
    ``kmalloc_reserve`` and ``__alloc_skb``).
    """

    slab: Slab
    index: int  # its place in the slab: the object is at page address + index * size
    allocated: bool = False

    @property
    def cache(self) -> SlabCache:
        return self.slab.cache

    @property
    def pfmemalloc(self) -> bool:
        return self.slab.pfmemalloc

    def __repr__(self) -> str:
        state = "" if self.allocated else " free"
        pfmemalloc = " pfmemalloc" if self.pfmemalloc else ""
        return f"<{self.cache.name} object {self.slab.page.pfn}:{self.index}{pfmemalloc}{state}>"


@attrs.define(eq=False, repr=False)
class Slab:
    """``struct slab`` (6.1; the fields SLUB kept in ``struct page`` before): one page of
    ``objects`` objects, ``inuse`` of them handed out, the rest on its freelist."""

    cache: SlabCache
    page: Page
    objects: int
    freelist: list[SlabObject] = attrs.field(factory=list)
    inuse: int = 0

    @property
    def pfmemalloc(self) -> bool:
        """``slab_test_pfmemalloc``: the page was allocated below min (PG_active on a slab
        page in 6.1, ``PageSlabPfmemalloc`` before 5.17)."""
        return self.page.pfmemalloc

    def __repr__(self) -> str:
        pfmemalloc = " pfmemalloc" if self.pfmemalloc else ""
        return (
            f"<slab {self.cache.name} pfn {self.page.pfn} {self.inuse}/{self.objects}{pfmemalloc}>"
        )


@attrs.frozen
class SlabInfo:
    """One line of ``/proc/slabinfo`` (SLUB: every slab is active, one page per slab here)."""

    name: str
    active_objs: int
    num_objs: int
    objsize: int  # s->size: the object's footprint in its slab, alignment included
    objperslab: int
    pagesperslab: int
    num_slabs: int


class SlabCache:
    """``struct kmem_cache`` with its one ``kmem_cache_node``. Build with
    ``SlabCaches.kmem_cache_create`` (or directly, for tests: an ``Allocator`` and the
    ``VmStat`` that counts ``nr_slab_unreclaimable``).

    ``min_partial`` None is the kernel's value for the size (``min_partial_for``); it is a
    tunable (/sys/kernel/slab/<cache>/min_partial, ``min_partial_store``), and 0 frees a
    slab's page as soon as the slab is empty.
    """

    def __init__(
        self,
        name: str,
        object_size: int,
        allocator: Allocator,
        stat: VmStat,
        *,
        align: int = 0,
        flags: slab_flags_t = NO_SLAB_FLAGS,
        min_partial: int | None = None,
    ) -> None:
        if object_size < 1:
            raise ValueError(f"slab cache {name}: object size must be >= 1, got {object_size}")
        self.name = name
        self.object_size = object_size  # s->object_size: what the caller asked for
        self.flags = flags
        self.align = calculate_alignment(flags, align, object_size)
        self.size = calculate_size(object_size, self.align, flags)  # s->size
        if self.size > PAGE_SIZE:
            raise ValueError(
                f"slab cache {name}: {self.size}-byte objects need slabs above order 0"
            )
        self.objects = PAGE_SIZE // self.size  # oo_objects(s->oo) for an order-0 slab
        self.min_partial = min_partial_for(self.size) if min_partial is None else min_partial
        if self.min_partial < 0:
            raise ValueError(f"slab cache {name}: min_partial must be >= 0")
        self._allocator = allocator
        self._stat = stat
        # kmem_cache_node: n->partial (head first: get_partial_node takes from the head),
        # the full slabs (SLUB keeps that list only for debugging; the model for counting),
        # nr_slabs and total_objects (inc_slabs_node/dec_slabs_node).
        self.partial: list[Slab] = []
        self.full: dict[Slab, None] = {}
        self.nr_slabs = 0
        self.active_objs = 0

    def __repr__(self) -> str:
        return (
            f"<SlabCache {self.name} size {self.size} {self.active_objs}/{self.num_objs}"
            f" objs in {self.nr_slabs} slabs>"
        )

    # -- allocation --------------------------------------------------------------------------

    async def alloc(
        self, gfp: gfp_t = GFP_KERNEL, *, reserve: object | None = None
    ) -> SlabObject | None:
        """``kmem_cache_alloc(s, gfp)``: an object, or None if a new slab was needed and the
        page allocator failed (``slab_out_of_memory``).

        1. ``get_partial_node``: the first partial slab this caller may use
           (``pfmemalloc_match``: a pfmemalloc slab serves only ``gfp_pfmemalloc_allowed``
           callers);
        2. else ``new_slab`` -> ``allocate_slab``: one page from the page allocator with the
           caller's gfp (so it may wake kswapd, reclaim, wait, dip below min and be marked
           pfmemalloc, or fail, exactly as ``alloc_page(gfp)`` would), and the first object
           of the new slab.

        ``reserve`` goes to the page allocation (the reserve policy's charge): a slab page
        is charged as a whole, when it is allocated below min, and uncharged when it is
        freed.
        """
        slab = self._get_partial(gfp)
        if slab is None:
            page = await self._allocator.alloc_page(self._slab_gfp(gfp), reserve=reserve)
            if page is None:
                return None
            # ___slab_alloc: the new slab's first object goes to the caller even when the
            # slab does not match the caller ("For !pfmemalloc_match() case we don't load
            # freelist so that we don't make further mismatched allocations easier": the
            # slab goes to the partial list, where get_partial_node skips it). A page marked
            # pfmemalloc was the caller's own ALLOC_NO_WATERMARKS allocation, so it matches.
            slab = self._new_slab(page)
        return self._take(slab)

    def try_alloc(self) -> SlabObject | None:
        """An object without sleeping or waking anyone, as a caller with no reserve access:
        from a partial slab, else from a new slab whose page the page allocator's fast path
        gives (``Allocator.try_alloc``, above the low watermark). For setup code that cannot
        wait (``Memory.swapon`` filling the bio mempool)."""
        slab = self._get_partial(GFP_KERNEL | GFP.NOMEMALLOC)
        if slab is None:
            page = self._allocator.try_alloc()
            if page is None:
                return None
            slab = self._new_slab(page)
        return self._take(slab)

    @staticmethod
    def _slab_gfp(gfp: gfp_t) -> gfp_t:
        """mm/slub.c new_slab/allocate_slab: the page allocation uses the caller's gfp.

        For an order-0 cache (``oo == s->min``) allocate_slab first tries
        ``gfp | __GFP_NOWARN | __GFP_NORETRY`` and, if that fails, the same order again with
        ``gfp``: the second, full attempt decides whether a slab is had, so the model makes
        only that one. (new_slab's ``GFP_RECLAIM_MASK | GFP_CONSTRAINT_MASK`` filter keeps
        every bit the model has.)
        """
        return gfp

    def _get_partial(self, gfp: gfp_t) -> Slab | None:
        """mm/slub.c get_partial_node: the first partial slab whose pfmemalloc matches."""
        partial = self.partial
        if not partial:
            return None
        head = partial[0]
        if not head.pfmemalloc:  # the common case: no pfmemalloc_match to decide
            return head
        allowed = gfp_pfmemalloc_allowed(gfp, current_task_flags())
        for slab in partial:
            if allowed or not slab.pfmemalloc:  # pfmemalloc_match(slab, gfp)
                return slab
        return None

    def _new_slab(self, page: Page) -> Slab:
        """mm/slub.c allocate_slab for ``page``: set up its objects, account it; the slab
        goes to the head of the partial list (alloc_single_from_new_slab: add_partial(n,
        slab, DEACTIVATE_TO_HEAD)) and leaves it once full."""
        page.slab = True  # __SetPageSlab; page->pfmemalloc stays as the allocator set it
        slab = Slab(self, page, self.objects)
        slab.freelist = [SlabObject(slab, i) for i in reversed(range(self.objects))]
        self.nr_slabs += 1  # inc_slabs_node
        self._stat.nr_slab_unreclaimable += 1  # account_slab: NR_SLAB_UNRECLAIMABLE_B
        self.partial.insert(0, slab)
        return slab

    def _take(self, slab: Slab) -> SlabObject:
        obj = slab.freelist.pop()
        obj.allocated = True
        slab.inuse += 1
        self.active_objs += 1
        if slab.inuse == slab.objects:  # the slab is full: off the partial list
            self.partial.remove(slab)  # remove_partial
            self.full[slab] = None  # add_full
        return obj

    # -- free --------------------------------------------------------------------------------

    def free(self, obj: SlabObject) -> None:
        """``kmem_cache_free(s, obj)`` (mm/slub.c __slab_free).

        A full slab that gets a free object back goes to the tail of the partial list
        (``add_partial(n, slab, DEACTIVATE_TO_TAIL)``). A slab left empty is freed only if
        the node already keeps ``min_partial`` partial slabs ("if (unlikely(!new.inuse &&
        n->nr_partial >= s->min_partial)) goto slab_empty"): ``discard_slab`` gives its page
        back to the page allocator (``__free_slab``: the page's pfmemalloc is cleared and an
        emergency page uncharged there).
        """
        slab = obj.slab
        if slab.cache is not self:
            raise RuntimeError(f"freeing {obj!r} to cache {self.name}")
        if not obj.allocated:
            raise RuntimeError(f"double free of {obj!r}")
        obj.allocated = False
        slab.freelist.append(obj)
        slab.inuse -= 1
        self.active_objs -= 1
        was_full = slab.inuse == slab.objects - 1
        # nr_partial counts this slab if it was partial already; one that goes from full to
        # empty in one free (one object per slab) is on no list and not counted.
        if slab.inuse == 0 and len(self.partial) >= self.min_partial:
            self._discard(slab, was_full)
        elif was_full:
            del self.full[slab]  # remove_full
            self.partial.append(slab)  # add_partial(n, slab, DEACTIVATE_TO_TAIL)

    def _discard(self, slab: Slab, was_full: bool) -> None:
        """mm/slub.c slab_empty: off its list, then discard_slab -> free_slab -> __free_slab."""
        if was_full:
            del self.full[slab]
        else:
            self.partial.remove(slab)
        self.nr_slabs -= 1  # dec_slabs_node
        self._stat.nr_slab_unreclaimable -= 1  # unaccount_slab
        page = slab.page
        page.slab = False  # __ClearPageSlab (page.reset() clears pfmemalloc)
        self._allocator.free_page(page)

    def shrink(self) -> int:
        """``kmem_cache_shrink`` (__kmem_cache_do_shrink): free every empty slab, whatever
        ``min_partial`` says. Returns the pages freed."""
        empty = [slab for slab in self.partial if slab.inuse == 0]
        for slab in empty:
            self._discard(slab, was_full=False)
        return len(empty)

    # -- inspection --------------------------------------------------------------------------

    @property
    def num_objs(self) -> int:
        """Objects in all slabs, in use or free (``total_objects``)."""
        return self.nr_slabs * self.objects

    @property
    def nr_partial(self) -> int:
        return len(self.partial)

    @property
    def nr_pages(self) -> int:
        """Pages held by the cache (one per slab: order-0)."""
        return self.nr_slabs

    def info(self) -> SlabInfo:
        """This cache's line of ``/proc/slabinfo``."""
        return SlabInfo(
            name=self.name,
            active_objs=self.active_objs,
            num_objs=self.num_objs,
            objsize=self.size,
            objperslab=self.objects,
            pagesperslab=1,
            num_slabs=self.nr_slabs,
        )


# -- the caches of a booted kernel --------------------------------------------------------------

#: mm/slab_common.c kmalloc_info / kmalloc_index: the kmalloc size classes (6.1 names), up
#: to a page here (order-0 slabs only; SLUB has kmalloc-8k too, and hands larger requests
#: to the page allocator).
KMALLOC_SIZES: tuple[int, ...] = (8, 16, 32, 64, 96, 128, 192, 256, 512, 1024, 2048, 4096)


def kmalloc_name(size: int) -> str:
    """``kmalloc-96``, ``kmalloc-1k``: 6.1's kmalloc_info names."""
    return f"kmalloc-{size // 1024}k" if size >= 1024 else f"kmalloc-{size}"


def kmalloc_size_class(size: int) -> int:
    """mm/slab_common.c kmalloc_slab/kmalloc_index: the smallest class that holds ``size``
    (96 and 192 are classes of their own)."""
    if size < 1:
        raise ValueError(f"kmalloc of {size} bytes")
    for cls in KMALLOC_SIZES:
        if size <= cls:
            return cls
    raise ValueError(f"kmalloc of {size} bytes: above a page needs slabs above order 0")


#: sizeof(struct sk_buff) on x86_64, 5.x-6.1 (pahole; approximate: it moves a few bytes with
#: the config). skb_init (net/core/skbuff.c) creates ``skbuff_head_cache`` with
#: SLAB_HWCACHE_ALIGN, so an skb head takes 256 bytes, 16 to a page, as /proc/slabinfo shows.
SKB_SIZE = 232
#: sizeof(struct sk_buff_fclones): two sk_buffs and a refcount (TCP's TX skbs,
#: alloc_skb_fclone); ``skbuff_fclone_cache``, 512 bytes after SLAB_HWCACHE_ALIGN.
SKB_FCLONES_SIZE = 2 * SKB_SIZE + 4
#: sizeof(struct bio) on x86_64 6.1 with a distribution's block config (blk-cgroup, iocost,
#: inline encryption, integrity): about 136 bytes, an approximation. The bio cache's size
#: comes out the same (256) for any struct size from 121 to 184 bytes.
BIO_SIZE = 136
#: include/linux/bio.h BIO_INLINE_VECS and sizeof(struct bio_vec) (page, len, offset).
BIO_INLINE_VECS = 4
BIO_VEC_SIZE = 16
#: block/bio.c init_bio: ``bioset_init(&fs_bio_set, BIO_POOL_SIZE, 0, BIOSET_NEED_BVECS)``:
#: front_pad 0, and BIOSET_NEED_BVECS makes ``back_pad = BIO_INLINE_VECS * sizeof(struct
#: bio_vec)``; bs_bio_slab_size = front_pad + sizeof(struct bio) + back_pad = 200, and
#: create_bio_slab names the cache after it, "bio-200", SLAB_HWCACHE_ALIGN |
#: SLAB_TYPESAFE_BY_RCU: 200 + a free pointer, aligned to 64 = 256 bytes a bio.
FS_BIO_SET_FRONT_PAD = 0
FS_BIO_SLAB_SIZE = FS_BIO_SET_FRONT_PAD + BIO_SIZE + BIO_INLINE_VECS * BIO_VEC_SIZE
FS_BIO_SLAB = f"bio-{FS_BIO_SLAB_SIZE}"
SKBUFF_HEAD_CACHE = "skbuff_head_cache"
SKBUFF_FCLONE_CACHE = "skbuff_fclone_cache"


class SlabCaches:
    """The machine's slab caches (``slab_caches``), built as a 6.1 kernel builds them at
    boot: the kmalloc caches (``create_kmalloc_caches``), ``skbuff_head_cache`` and
    ``skbuff_fclone_cache`` (``skb_init``), and fs_bio_set's bio cache (``init_bio``).

    ``slab[name]`` is a cache; ``kmalloc``/``kfree`` serve sizes from the kmalloc caches.
    """

    def __init__(self, allocator: Allocator, stat: VmStat) -> None:
        self._allocator = allocator
        self._stat = stat
        self._caches: dict[str, SlabCache] = {}
        self._kmalloc: dict[int, SlabCache] = {}
        for size in KMALLOC_SIZES:  # new_kmalloc_cache: ARCH_KMALLOC_MINALIGN, no HWCACHE
            self._kmalloc[size] = self.kmem_cache_create(
                kmalloc_name(size), size, align=ARCH_KMALLOC_MINALIGN
            )
        skb_flags = SLAB.HWCACHE_ALIGN | SLAB.PANIC
        self.kmem_cache_create(SKBUFF_HEAD_CACHE, SKB_SIZE, flags=skb_flags)
        self.kmem_cache_create(SKBUFF_FCLONE_CACHE, SKB_FCLONES_SIZE, flags=skb_flags)
        # create_bio_slab: kmem_cache_create(name, size, ARCH_KMALLOC_MINALIGN,
        # SLAB_HWCACHE_ALIGN | SLAB_TYPESAFE_BY_RCU, NULL)
        self.kmem_cache_create(
            FS_BIO_SLAB,
            FS_BIO_SLAB_SIZE,
            align=ARCH_KMALLOC_MINALIGN,
            flags=SLAB.HWCACHE_ALIGN | SLAB.TYPESAFE_BY_RCU,
        )

    def kmem_cache_create(
        self,
        name: str,
        size: int,
        *,
        align: int = 0,
        flags: slab_flags_t = NO_SLAB_FLAGS,
        min_partial: int | None = None,
    ) -> SlabCache:
        """``kmem_cache_create(name, size, align, flags, NULL)``: a new cache (names are
        unique here; the kernel allows duplicates and merges compatible caches)."""
        if name in self._caches:
            raise ValueError(f"slab cache {name} exists")
        cache = SlabCache(
            name,
            size,
            self._allocator,
            self._stat,
            align=align,
            flags=flags,
            min_partial=min_partial,
        )
        self._caches[name] = cache
        return cache

    def __getitem__(self, name: str) -> SlabCache:
        return self._caches[name]

    def __contains__(self, name: object) -> bool:
        return name in self._caches

    def __iter__(self) -> Iterator[SlabCache]:
        return iter(self._caches.values())

    def kmalloc_cache(self, size: int) -> SlabCache:
        """The kmalloc cache a ``kmalloc(size)`` is served from (``kmalloc_slab``)."""
        return self._kmalloc[kmalloc_size_class(size)]

    async def kmalloc(
        self, size: int, gfp: gfp_t = GFP_KERNEL, *, reserve: object | None = None
    ) -> SlabObject | None:
        """``kmalloc(size, gfp)``: an object of the smallest kmalloc class that fits."""
        return await self.kmalloc_cache(size).alloc(gfp, reserve=reserve)

    def kfree(self, obj: SlabObject) -> None:
        """``kfree(obj)``: back to the cache its slab belongs to (``virt_to_slab(obj)->
        slab_cache``, as kfree and, for any cache, 6.1's ``kmem_cache_free`` check find it)."""
        obj.cache.free(obj)

    @property
    def nr_pages(self) -> int:
        """Pages held by all caches: vmstat ``nr_slab_unreclaimable``."""
        return self._stat.nr_slab_unreclaimable

    def slabinfo(self) -> list[SlabInfo]:
        """``/proc/slabinfo``: one line per cache, in creation order."""
        return [cache.info() for cache in self._caches.values()]
