"""One machine's memory: zones, allocator, LRU, swap, kswapd, and the anonymous-memory API."""

from __future__ import annotations

import itertools
from collections.abc import Callable
from types import TracebackType

import attrs
import trio

from client.mm.alloc import Allocator
from client.mm.block import BlockQueue, SwapDevice
from client.mm.errors import IntegrityError, OutOfMemory, ProcessKilled, SwapReadError
from client.mm.facts import (
    IntegrityFailure,
    Observer,
    OomVictimExited,
    drop,
)
from client.mm.gfp import GFP_HIGHUSER_MOVABLE, GFP_KERNEL, gfp_t
from client.mm.lru import Lru
from client.mm.mempool import Mempool
from client.mm.oom_kill import OomKiller
from client.mm.page import PAGE_SIZE, ZERO_PAGE, Frames, Page
from client.mm.page_io import PageIO, SwapIn
from client.mm.pagecache import CachedFile, FileContentFn, PageCache
from client.mm.policy import NullPolicy, PolicyHooks
from client.mm.process import Process, as_current
from client.mm.reclaim import DEFAULT_SWAPPINESS, Reclaimer
from client.mm.slab import FS_BIO_SLAB, FS_BIO_SLAB_SIZE, SlabCache, SlabCaches, SlabObject
from client.mm.swap import SWAP_RA_HITS_MAX, SwapArea
from client.mm.swap_state import SwapReadahead
from client.mm.vmstat import Progress, Psi, PsiMemory, VmStat
from client.mm.waits import WaitFor, WaitRegistry
from client.mm.zone import Zone, default_min_free_kbytes, setup_watermarks

ContentFn = Callable[[Process, int], bytes]
"""What a virtual page must hold: written on a write touch, checked on a read touch."""

BIO_POOL_SIZE = 2  # include/linux/bio.h
PAGE_CLUSTER = 3  # mm/swap.c page_cluster (vm.page-cluster): swap readahead of up to 2^3 pages
#: Swap readahead: by swap slot ("cluster", swap_cluster_readahead) or by address ("vma",
#: swap_vma_readahead, 4.14+; /sys/kernel/mm/swap/vma_ra_enabled).
SWAP_READAHEAD = ("cluster", "vma")
#: What a bio costs (``MemoryConfig.bio_cache``): "kernel", a 256-byte object of fs_bio_set's
#: bio-200 slab, as in 6.1; "page", a whole page per bio, the model's cost before slab caches
#: (a bio_set whose front pad fills the page: its "bio-4096" slab holds one bio).
BIO_CACHES = ("page", "kernel")


def _positive(_instance: object, attribute: attrs.Attribute[int], value: int) -> None:
    if value < 1:
        raise ValueError(f"{attribute.name} must be >= 1, got {value}")


@attrs.frozen
class MemoryConfig:
    """The memory of a client machine.

    ``zones`` lists (name, size) from the lowest zone up, as the kernel numbers them; a
    float size is a fraction of ``total_bytes``, an int a size in bytes; rounding goes to
    the last zone given as a fraction. ``min_free_kbytes`` None means the kernel's default.
    """

    total_bytes: int = attrs.field(validator=attrs.validators.ge(PAGE_SIZE))
    zones: tuple[tuple[str, float | int], ...] = (("Normal", 1.0),)
    min_free_kbytes: int | None = attrs.field(
        default=None, validator=attrs.validators.optional(attrs.validators.ge(0))
    )
    watermark_scale_factor: int = attrs.field(default=10, validator=_positive)
    max_io_pages: int = attrs.field(default=32, validator=_positive)
    swap_queue_depth: int = attrs.field(default=32, validator=_positive)
    bio_pool_size: int = attrs.field(default=BIO_POOL_SIZE, validator=attrs.validators.ge(0))
    swappiness: int = attrs.field(
        default=DEFAULT_SWAPPINESS, validator=[attrs.validators.ge(0), attrs.validators.le(200)]
    )
    disk_read_latency: float = attrs.field(default=0.0001, validator=attrs.validators.ge(0))
    readahead_pages: int = attrs.field(default=32, validator=_positive)
    page_cluster: int = attrs.field(
        default=PAGE_CLUSTER, validator=[attrs.validators.ge(0), attrs.validators.le(10)]
    )
    swap_readahead: str = attrs.field(
        default="cluster", validator=attrs.validators.in_(SWAP_READAHEAD)
    )
    swap_read_retries: int = attrs.field(default=3, validator=attrs.validators.ge(0))
    swap_read_retry_delay: float = attrs.field(default=0.05, validator=attrs.validators.ge(0))
    #: "kernel" by default: 6.1's 256-byte bio-200 objects, 16 to a slab page, so the bio
    #: mempool's backing allocation rarely asks the page allocator and writeback is bounded
    #: by swap_queue_depth and, on the wire, by the swap socket's sk_sndbuf (tcp_sendmsg ->
    #: sk_stream_memory_free). "page" keeps the model's cost before it had slab caches (a
    #: page per bio, allocated and freed with it), for comparison with older results.
    bio_cache: str = attrs.field(default="kernel", validator=attrs.validators.in_(BIO_CACHES))

    @property
    def nr_pages(self) -> int:
        return self.total_bytes // PAGE_SIZE

    def zone_pages(self) -> list[tuple[str, int]]:
        """(name, pages) for each zone, summing to ``nr_pages``."""
        total = self.nr_pages
        sized: list[tuple[str, int]] = []
        last_fraction = -1
        for i, (name, size) in enumerate(self.zones):
            if isinstance(size, float):
                if not 0 < size <= 1:
                    raise ValueError(f"zone {name}: fraction must be in (0, 1], got {size}")
                sized.append((name, int(total * size)))
                last_fraction = i
            else:
                sized.append((name, size // PAGE_SIZE))
        missing = total - sum(n for _, n in sized)
        if missing and last_fraction >= 0:
            name, n = sized[last_fraction]
            sized[last_fraction] = (name, n + missing)
        if sum(n for _, n in sized) != total or any(n <= 0 for _, n in sized):
            raise ValueError(f"zones {self.zones!r} do not divide {total} pages")
        return sized


class Memory:
    """The assembled memory manager of one client machine, with no swap yet (``swapon``)."""

    def __init__(
        self,
        config: MemoryConfig,
        *,
        policy: PolicyHooks | None = None,
        observer: Observer = drop,
        clock: Callable[[], float] = trio.current_time,
        waits: WaitRegistry | None = None,
        oom_hook: Callable[[Process], None] | None = None,
    ) -> None:
        self.config = config
        self.frames = Frames(config.nr_pages)
        self.zones: list[Zone] = []
        start = 0
        for name, pages in config.zone_pages():
            self.zones.append(Zone(name, start, pages))
            start += pages
        self.stat = VmStat()
        self.progress = Progress()
        self.waits = WaitRegistry() if waits is None else waits
        self.psi = Psi(clock)
        self.observer = observer
        self.lru = Lru()
        self.allocator = Allocator(
            self.zones,
            stat=self.stat,
            progress=self.progress,
            waits=self.waits,
            psi=self.psi,
            observer=observer,
        )
        self.pagecache = PageCache(
            self.allocator,
            self.lru,
            self.frames,
            self.stat,
            read_latency=config.disk_read_latency,
            readahead=config.readahead_pages,
        )
        #: Swap I/O (mm/page_io.c): reclaim's writeout and the fault path's reads.
        self.page_io = PageIO(self.allocator, self.lru, max_io_pages=config.max_io_pages)
        #: Swap-in readahead (mm/swap_state.c): the pages a major fault reads.
        self.swap_readahead = SwapReadahead(
            self.allocator,
            self.page_io,
            mode=config.swap_readahead,
            page_cluster=config.page_cluster,
        )
        self.reclaimer = Reclaimer(
            self.allocator,
            self.lru,
            self.page_io,
            swappiness=config.swappiness,
            pagecache=self.pagecache,
        )
        self.allocator.reclaimer = self.reclaimer
        #: The slab caches of a booted kernel (``memory.slab["skbuff_head_cache"]``).
        self.slab = SlabCaches(self.allocator, self.stat)
        self.min_free_kbytes = (
            default_min_free_kbytes(config.nr_pages * PAGE_SIZE // 1024)
            if config.min_free_kbytes is None
            else config.min_free_kbytes
        )
        self.processes: dict[int, Process] = {}
        self._pids = itertools.count(1000)
        #: The OOM killer and its reaper (mm/oom_kill.c).
        self.oom = OomKiller(
            self.processes,
            self.stat,
            self.waits,
            unmap=self._unmap_anon,
            observer=observer,
            hook=oom_hook,
        )
        self.allocator.out_of_memory = self.oom.out_of_memory
        self.allocator.oom_wait = self.oom.oom_wait
        self._files = 0
        self._nursery: trio.Nursery | None = None
        self.set_policy(NullPolicy() if policy is None else policy)

    # -- configuration -----------------------------------------------------------------------

    @property
    def policy(self) -> PolicyHooks:
        return self.allocator.policy

    def set_policy(self, policy: PolicyHooks) -> None:
        """Install a reserve policy and recompute the watermarks with its extra pages."""
        self.allocator.policy = policy
        policy.attach(self)
        self.setup_watermarks()

    def setup_watermarks(self) -> None:
        """``setup_per_zone_wmarks`` with the policy's ``extra_min_pages``; wake kswapd if
        a zone is now below low (as ``adjust_memalloc_reserve`` does)."""
        setup_watermarks(
            self.zones,
            self.min_free_kbytes,
            self.config.watermark_scale_factor,
            self.policy.extra_min_pages(),
        )
        for zone in self.zones:
            self.reclaimer.wakeup_kswapd(zone)

    @property
    def swap(self) -> SwapArea | None:
        return self.page_io.swap

    @property
    def block(self) -> BlockQueue | None:
        return self.page_io.block

    def swapon(self, device: SwapDevice, nr_pages: int | None = None) -> None:
        """Use ``device`` as swap (``sys_swapon``); its size by default.

        Swap bios come from fs_bio_set (mm/page_io.c __swap_writepage and swap_readpage:
        ``bio_alloc(..., GFP_NOIO)``), a mempool over a slab cache whose ``bio_pool_size``
        reserved elements are slab objects (block/bio.c bioset_init:
        ``mempool_init_slab_pool(&bs->bio_pool, pool_size, bs->bio_slab)``): the
        ``bio-200`` cache, or with ``bio_cache`` "page" a cache of page-sized bios. The
        kernel fills that pool at boot (init_bio); the model does it here, from free
        memory, before any workload runs.
        """
        if self.page_io.swap is not None:
            raise RuntimeError("swap is already on")
        nr = device.size_bytes // PAGE_SIZE if nr_pages is None else nr_pages
        bio_slab = (
            self.slab[FS_BIO_SLAB] if self.config.bio_cache == "kernel" else self._bio_page_slab()
        )
        elements = []
        for _ in range(self.config.bio_pool_size):
            # mempool_init_node: pool->alloc(GFP_KERNEL, pool->pool_data), here without
            # sleeping: a partial slab, or a new slab from the fast path.
            obj = bio_slab.try_alloc()
            if obj is None:
                raise MemoryError("no memory for the bio mempool")
            elements.append(obj)
        pool: Mempool[SlabObject] = Mempool(
            self.config.bio_pool_size,
            bio_slab.alloc,  # mm/mempool.c mempool_alloc_slab: kmem_cache_alloc(mem, gfp)
            bio_slab.free,  # mempool_free_slab: kmem_cache_free(mem, element)
            name="bio",
            waits=self.waits,
            elements=elements,
        )
        block = BlockQueue(
            device, self.frames, pool, queue_depth=self.config.swap_queue_depth, waits=self.waits
        )
        if self._nursery is not None:
            block.attach(self._nursery)
        self.page_io.swap = SwapArea(nr)
        self.page_io.block = block

    def _bio_page_slab(self) -> SlabCache:
        """The "page" bio cache (``MemoryConfig.bio_cache``): fs_bio_set as if its front pad
        filled a page (block/bio.c bs_bio_slab_size = front_pad + sizeof(struct bio) +
        back_pad = 4096, create_bio_slab's "bio-4096"), one bio per slab, min_partial 0 (the
        /sys/kernel/slab/<cache>/min_partial tunable) so that each bio's page is allocated
        and freed with the bio, as the model did before it had slab caches."""
        name = f"bio-{PAGE_SIZE}"
        if name in self.slab:
            return self.slab[name]
        front_pad = PAGE_SIZE - FS_BIO_SLAB_SIZE
        return self.slab.kmem_cache_create(name, front_pad + FS_BIO_SLAB_SIZE, min_partial=0)

    # -- running -----------------------------------------------------------------------------

    async def start(self, nursery: trio.Nursery) -> None:
        """Run kswapd, the oom_reaper and the block layer's requests in ``nursery``."""
        self._nursery = nursery
        if self.block is not None:
            self.block.attach(nursery)
        self.psi.start()
        await nursery.start(self.reclaimer.kswapd, name="kswapd0")
        await nursery.start(self.oom.oom_reaper, name="oom_reaper")

    def running(self) -> MemoryRunning:
        """``async with memory.running():`` kswapd and swap I/O run inside the block."""
        return MemoryRunning(self)

    # -- the allocator, for other layers ----------------------------------------------------

    async def alloc_page(
        self, gfp: gfp_t = GFP_KERNEL, *, reserve: object | None = None
    ) -> Page | None:
        """See ``Allocator.alloc_page``."""
        return await self.allocator.alloc_page(gfp, reserve=reserve)

    def free_page(self, page: Page, *, progress: bool = True) -> None:
        """See ``Allocator.free_page``."""
        self.allocator.free_page(page, progress=progress)

    def kmem_cache(self, name: str) -> SlabCache:
        """The slab cache ``name`` (``skbuff_head_cache``, ``kmalloc-1k``, ...); see
        ``client.mm.slab.SlabCaches``."""
        return self.slab[name]

    # -- processes and anonymous memory ------------------------------------------------------

    def new_process(self, name: str) -> Process:
        """A process with an empty address space, a candidate for the OOM killer."""
        process = Process(next(self._pids), name)
        self.processes[process.pid] = process
        return process

    async def touch(
        self, process: Process, vpage: int, *, write: bool, content_fn: ContentFn
    ) -> None:
        """Access one virtual page of ``process``, faulting it in (and swapping it in).

        A write fills the page with ``content_fn(process, vpage)`` and dirties it; a read
        checks the page holds exactly that (``IntegrityError`` otherwise). Either marks the
        page referenced. Raises ``ProcessKilled`` once the process was killed.
        """
        with self.psi.nonidle():
            page = process.present.get(vpage)
            if page is None:
                page = await self._fault(process, vpage)
            page.referenced = True  # the pte's young bit
            if write:
                if page.swapcache and not page.writeback:
                    # do_wp_page -> reuse_swap_page: the slot's copy is stale; free it.
                    assert self.swap is not None
                    self.swap.delete_from_swap_cache(page)
                self.frames.fill(page.pfn, content_fn(process, vpage))
                page.dirty = True
            elif self.frames.read(page.pfn) != content_fn(process, vpage):
                self.observer(IntegrityFailure(process.pid, vpage))
                raise IntegrityError(process.pid, vpage)

    def _check_alive(self, process: Process) -> None:
        if process.killed:
            raise ProcessKilled(process.pid)

    async def _fault(self, process: Process, vpage: int) -> Page:
        """handle_mm_fault for an anonymous page that is not present.

        A fault is a scheduling point (the kernel's cond_resched): without it a workload
        that never blocks would starve kswapd, which in the kernel runs on another CPU.
        """
        self.stat.pgfault += 1
        await trio.lowlevel.checkpoint()
        with as_current(process):  # the faulting task is one of the process's
            return await self._fault_loop(process, vpage)

    async def _fault_loop(self, process: Process, vpage: int) -> Page:
        """``_fault``'s retries, as a task of ``process`` (``current`` for the allocator)."""
        failed_reads = 0
        while True:
            self._check_alive(process)
            page = process.present.get(vpage)
            if page is not None:  # another task of the process mapped it meanwhile
                return page
            slot = process.swapped.get(vpage)
            if slot is None:
                page = await self._do_anonymous_page(process, vpage)
            else:
                try:
                    page = await self._do_swap_page(process, vpage, slot)
                except SwapReadError:
                    # The kernel gives up at once (VM_FAULT_SIGBUS); a network block device
                    # fails transiently, so the testbed retries the fault a few times, with
                    # backoff, before the process gets its SIGBUS. The slot still holds the
                    # data: a failed read loses nothing.
                    if failed_reads >= self.config.swap_read_retries:
                        raise
                    self.stat.swap_read_retries += 1
                    await trio.sleep(self.config.swap_read_retry_delay * 2**failed_reads)
                    failed_reads += 1
                    continue
            if page is not None:
                return page

    async def _alloc_user_page(self, process: Process) -> Page:
        page = await self.allocator.alloc_page(GFP_HIGHUSER_MOVABLE)
        if page is None:
            self._check_alive(process)
            raise OutOfMemory(f"no page for process {process.pid} and nothing to kill")
        if process.killed:
            self.allocator.free_page(page)
            raise ProcessKilled(process.pid)
        return page

    def _map(self, process: Process, vpage: int, page: Page) -> None:
        process.present[vpage] = page
        page.mapping = process
        page.index = vpage
        self.stat.nr_anon_pages += 1

    async def _do_anonymous_page(self, process: Process, vpage: int) -> Page | None:
        """mm/memory.c do_anonymous_page: a zeroed page, on the active list (4.x
        lru_cache_add_active_or_unevictable). Unlike the kernel, a read fault does not map
        the shared zero page: it allocates too."""
        page = await self._alloc_user_page(process)
        if vpage in process.present or vpage in process.swapped:
            self.allocator.free_page(page)
            return None
        self.frames.fill(page.pfn, ZERO_PAGE)
        self._map(process, vpage, page)
        page.active = True
        self.lru.add(page)
        return page

    async def _do_swap_page(self, process: Process, vpage: int, slot: int) -> Page | None:
        """mm/memory.c do_swap_page: find the page in the swap cache or read it back.

        Returns the mapped page, or None when the page table changed while waiting (retry).
        """
        swap = self.swap
        assert swap is not None
        pending = self.page_io.swapin.get(slot)
        if pending is not None:  # someone is reading it: wait_on_page_locked
            pending.waiters += 1
            await self._wait_swapin(pending, slot)
            if pending.error:
                raise SwapReadError(process.pid, vpage, slot)
            return None  # look again: mapped from the swap cache, or read anew if cancelled
        page = swap.cache.get(slot)
        if page is None:
            # Major fault: swapin_readahead, then wait for the page (lock_page_or_retry);
            # a failed read is do_swap_page's "!PageUptodate(page)", VM_FAULT_SIGBUS. The
            # faulting page is allocated first, here (see SwapReadahead.swapin_readahead).
            page = await self._alloc_user_page(process)
            pending = await self.swap_readahead.swapin_readahead(process, vpage, slot, swap, page)
            if pending is not None:
                await self._wait_swapin(pending, slot)
                if pending.error:
                    raise SwapReadError(process.pid, vpage, slot)
            return None  # look again: it is in the swap cache now (or was reclaimed)
        # Minor fault: the page is still in the swap cache.
        assert page.mapping is None, page
        # lookup_swap_cache: a readahead page found is a hit (SWAP_RA_HIT); cluster
        # readahead counts it in swapin_readahead_hits, VMA readahead in the VMA's
        # swap_readahead_info, which also remembers this fault's address.
        readahead, page.readahead = page.readahead, False
        if readahead:
            self.stat.swap_ra_hit += 1
        if self.config.swap_readahead == "vma":
            _, win, hits = process.swap_ra or (0, 0, 4)
            process.swap_ra = (vpage, win, min(hits + readahead, SWAP_RA_HITS_MAX))
        elif readahead:
            swap.ra_hits += 1
        del process.swapped[vpage]
        self._map(process, vpage, page)
        swap.map.put_ref(slot)  # swap_free(entry): the pte no longer holds the slot
        if swap.map.vm_swap_full() and not page.writeback:
            # do_swap_page: "if (vm_swap_full() ...) try_to_free_swap(page)"
            swap.delete_from_swap_cache(page)
            page.dirty = True
        return page

    async def _wait_swapin(self, pending: SwapIn, slot: int) -> None:
        if pending.bio is not None:
            what = WaitFor("swapin", f"slot {slot} {pending.bio.name}", waker="swap device")
        else:  # not submitted yet: its owner is still allocating pages or a bio
            what = WaitFor("swapin", f"slot {slot} bio", waker=pending.owner)
        await self.waits.wait_event(pending.done, what)

    # -- the page cache ----------------------------------------------------------------------

    def open_file(self, name: str, nr_pages: int) -> CachedFile:
        """A read-only file of ``nr_pages`` on the machine's local disk."""
        self._files += 1
        return CachedFile(name, nr_pages, ident=self._files)

    async def read_file(
        self, process: Process, file: CachedFile, index: int, content_fn: FileContentFn
    ) -> None:
        """``read(2)`` of one page of ``file`` through the page cache; checks the page
        holds what the disk holds (``IntegrityError`` otherwise). Raises ``ProcessKilled``
        once the process was killed, ``OutOfMemory`` if no page can be had."""
        with self.psi.nonidle():
            self._check_alive(process)
            await trio.lowlevel.checkpoint()  # cond_resched, as in _fault
            with as_current(process):
                data = await self.pagecache.read(file, index, content_fn)
            if data is None:
                self._check_alive(process)
                raise OutOfMemory(f"no page cache page for process {process.pid}")
            if data != content_fn(file, index):
                self.observer(IntegrityFailure(process.pid, index))
                raise IntegrityError(process.pid, index)

    def exit_process(self, process: Process) -> None:
        """A task of ``process`` reached exit: exit_mmap unmaps and frees every page and drops
        every swap entry (nothing is left if the oom_reaper was there first), then sets
        MMF_OOM_SKIP (6.1 exit_mmap: "Set MMF_OOM_SKIP to hide this task from the oom
        killer/reaper because the memory has been already freed"). Idempotent.
        """
        process.killed = True
        if process.exited:
            return
        unmapped, freed, swapents = self._unmap_anon(process)
        process.exited = True
        process.oom_skip = True
        self.processes.pop(process.pid, None)
        if process.oom_victim:
            since = trio.current_time() - (process.oom_victim_since or 0.0)
            self.observer(
                OomVictimExited(process.pid, process.name, unmapped, freed, swapents, since)
            )

    def _unmap_anon(self, process: Process) -> tuple[int, int, int]:
        """Zap every anonymous pte of ``process`` (unmap_page_range over its one mapping):
        free its pages and drop its swap entries. Returns (pages unmapped, pages freed, swap
        entries dropped).

        Pages under writeback (and pages reclaim has isolated) stay on the LRU, unmapped;
        reclaim frees them later.
        """
        swap = self.swap
        unmapped = freed = len(process.present)
        for page in process.present.values():
            page.mapping = None
            page.referenced = False
            self.stat.nr_anon_pages -= 1
            if page.writeback or not page.lru:
                freed -= 1
                continue
            self.lru.remove(page)
            if page.swapcache:
                assert swap is not None
                swap.delete_from_swap_cache(page)
            page.dirty = False
            self.allocator.free_page(page)
        swapents = len(process.swapped)
        for slot in process.swapped.values():
            assert swap is not None
            swap.map.put_ref(slot)  # free_swap_and_cache
            cached = swap.cache.get(slot)
            if (
                cached is not None
                and cached.mapping is None
                and cached.lru
                and not cached.writeback
                and swap.map.pte_refs(slot) == 0
            ):
                self.lru.remove(cached)
                swap.delete_from_swap_cache(cached)
                cached.dirty = False
                self.allocator.free_page(cached)
                freed += 1
        process.present.clear()
        process.swapped.clear()
        return unmapped, freed, swapents

    # -- inspection --------------------------------------------------------------------------

    @property
    def nr_free_pages(self) -> int:
        return self.allocator.nr_free_pages

    def vmstat(self) -> dict[str, int]:
        """``/proc/vmstat``: the counters plus gauges computed from the state."""
        stats = self.stat.as_dict()
        stats["nr_free_pages"] = self.nr_free_pages
        stats["nr_inactive_anon"] = self.lru.nr_inactive
        stats["nr_active_anon"] = self.lru.nr_active
        stats["nr_inactive_file"] = self.lru.nr_inactive_file
        stats["nr_active_file"] = self.lru.nr_active_file
        stats["nr_file_pages"] = self.pagecache.nr_pages
        stats["nr_swapcached"] = len(self.swap.cache) if self.swap is not None else 0
        return stats

    def pressure(self) -> PsiMemory:
        """``/proc/pressure/memory``."""
        return self.psi.snapshot()


class MemoryRunning:
    """``Memory.running()``: a nursery that runs the machine's kernel threads for as long
    as the ``async with`` block does; one error leaves it as itself, not as a group.  (A
    class rather than an ``@asynccontextmanager``: mypyc compiles no async generator.)"""

    def __init__(self, memory: Memory) -> None:
        self._memory = memory
        self._manager = trio.open_nursery()
        self._nursery: trio.Nursery | None = None

    async def __aenter__(self) -> Memory:
        nursery = await self._manager.__aenter__()
        self._nursery = nursery
        try:
            await self._memory.start(nursery)
        except BaseException as exc:
            await self._exit(exc)
            raise
        return self._memory

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> bool:
        assert self._nursery is not None
        self._nursery.cancel_scope.cancel()
        self._memory._nursery = None
        return await self._exit(exc)

    async def _exit(self, exc: BaseException | None) -> bool:
        try:
            return bool(
                await self._manager.__aexit__(
                    type(exc) if exc is not None else None,
                    exc,
                    exc.__traceback__ if exc is not None else None,
                )
            )
        except BaseExceptionGroup as group:
            if len(group.exceptions) == 1:
                raise group.exceptions[0] from None
            raise
