"""The block layer between reclaim and the swap device: bios from a mempool over a slab
cache, a bounded queue.

The device is abstract (``SwapDevice``): the real one is the NBD client, tests use
``client.mm.testing.MemorySwapDevice``. Every request runs in a task of the block layer's
own nursery, so a request is never cancelled because the task that submitted it was, and
completion calls back into the model (``end_io``), as an interrupt handler would.

**Whose context a request runs in.**  ``submit_bio`` hands the request to the driver in the
submitter's task: a request_fn driver (nbd before its kernel thread) or blk-mq's
``queue_rq`` issued from the submitter's plug runs with the submitter's ``current->flags``.
So the request's task starts with exactly the flags its submitter had at ``submit``
(``Bio.submitter_flags``: kswapd's ``PF_MEMALLOC|PF_KSWAPD``, a direct reclaimer's
``PF_MEMALLOC``, nothing for a faulting process's swap-in), set explicitly rather than
left to trio's copy of the spawning task's context.  A driver that sends from a task of
its own, or changes the flags around its send, says so itself (client/swapdev.py, nbd's
``sock_xmit`` by kernel era).
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Sequence
from typing import Protocol

import attrs
import trio

from client.mm.gfp import as_task, current_task_flags, gfp_t
from client.mm.mempool import Mempool
from client.mm.page import Frames, Page
from client.mm.slab import SlabObject
from client.mm.waits import WaitFor, WaitQueue, WaitRegistry

_NO_FLAGS = 0


class SwapIOError(Exception):
    """A swap device request failed (the device's EIO). Any other exception is a bug."""


class SwapDevice(Protocol):
    """What the model needs from a swap device. Slot ``n`` is bytes ``n*4096 ..``."""

    @property
    def size_bytes(self) -> int:
        """Device size; slot 0 is the swap header."""
        ...

    async def write(self, slot_start: int, pages: Sequence[memoryview]) -> None:
        """Write ``pages`` to consecutive slots from ``slot_start``; raise SwapIOError."""
        ...

    async def read(self, slot_start: int, into: Sequence[memoryview]) -> None:
        """Read consecutive slots from ``slot_start`` into ``into``; raise SwapIOError."""
        ...


@attrs.define(eq=False)
class Bio:
    """One request: a bio and its block request in one (the model never splits them)."""

    id: int
    write: bool
    slot: int
    pages: list[Page]
    # The memory this bio costs: a bio-200 slab object from the bio mempool (block/bio.c
    # bio_alloc_bioset: mempool_alloc(&bs->bio_pool, gfp) over bs->bio_slab).
    mem: SlabObject = attrs.field(repr=False)
    end_io: Callable[[Bio], None] = attrs.field(repr=False)
    error: SwapIOError | None = None
    #: ``current->flags`` of the task that called ``submit`` (see the module docstring).
    submitter_flags: int = _NO_FLAGS
    completed: bool = attrs.field(default=False, init=False, repr=False)
    _done: trio.Event | None = attrs.field(default=None, init=False, repr=False)

    @property
    def name(self) -> str:
        return f"req {self.id}"

    @property
    def done(self) -> trio.Event:
        """Set once the request completed (made on first use: rarely anyone waits)."""
        if self._done is None:
            self._done = trio.Event()
            if self.completed:
                self._done.set()
        return self._done

    def _set_done(self) -> None:
        self.completed = True
        if self._done is not None:
            self._done.set()


class BlockQueue:
    """The swap device's request queue: bio allocation, tags (queue depth), submission."""

    def __init__(
        self,
        device: SwapDevice,
        frames: Frames,
        bio_pool: Mempool[SlabObject],
        *,
        queue_depth: int,
        waits: WaitRegistry,
        name: str = "swap0",
    ) -> None:
        if queue_depth < 1:
            raise ValueError("queue_depth must be >= 1")
        self.device = device
        self.name = name
        self.queue_depth = queue_depth
        self.bio_pool = bio_pool
        self.inflight: dict[int, Bio] = {}
        self._frames = frames
        self._waits = waits
        self._ids = itertools.count(1)
        self._tags_free = queue_depth
        self._tag_wait = WaitQueue()
        self._nursery: trio.Nursery | None = None

    def attach(self, nursery: trio.Nursery) -> None:
        """Requests run as tasks in ``nursery`` (the machine's)."""
        self._nursery = nursery

    def oldest(self) -> Bio | None:
        """The oldest request in flight (what a writeback waiter really waits for)."""
        return next(iter(self.inflight.values()), None)

    def inflight_name(self) -> str:
        bio = self.oldest()
        return f"{self.name} {bio.name}" if bio is not None else self.name

    async def submit(
        self,
        *,
        write: bool,
        slot: int,
        pages: list[Page],
        gfp: gfp_t,
        end_io: Callable[[Bio], None],
    ) -> Bio:
        """``submit_bio``: allocate a bio (mempool, may wait), get a tag (may wait), start.

        ``end_io`` runs in the request's task when the device answers.
        """
        if self._nursery is None:
            raise RuntimeError("block queue is not running (use Memory.running())")
        mem = await self.bio_pool.alloc(gfp)  # bio_alloc(gfp) from the bio_set mempool
        if mem is None:
            raise RuntimeError(f"bio allocation with {gfp!r} cannot fail unless it may not sleep")
        try:
            while self._tags_free == 0:  # blk_mq_get_tag: sleep until a request completes
                what = WaitFor("request_tag", self.inflight_name(), waker="swap device")
                await self._waits.park(self._tag_wait, what)
        except BaseException:
            self.bio_pool.free(mem)  # cancelled while waiting: the bio goes back (bio_put)
            raise
        self._tags_free -= 1
        flags = current_task_flags()
        bio = Bio(next(self._ids), write, slot, pages, mem, end_io, submitter_flags=flags)
        self.inflight[bio.id] = bio
        self._nursery.start_soon(self._run, bio, name=f"{self.name} {bio.name}")
        return bio

    async def _run(self, bio: Bio) -> None:
        views = [self._frames.view(p.pfn) for p in bio.pages]
        # The driver is entered in the submitter's context (submit_bio -> request_fn /
        # queue_rq from the submitter's plug): its task flags, no more, no fewer.
        with as_task(bio.submitter_flags):
            try:
                if bio.write:
                    await self.device.write(bio.slot, views)
                else:
                    await self.device.read(bio.slot, views)
            except SwapIOError as exc:
                bio.error = exc
        self._complete(bio)

    def _complete(self, bio: Bio) -> None:
        """bio_endio: the end_io callback, then free the tag and the bio (bio_put)."""
        del self.inflight[bio.id]
        bio.end_io(bio)
        self._tags_free += 1
        self._tag_wait.unpark()
        self.bio_pool.free(bio.mem)
        bio._set_done()
