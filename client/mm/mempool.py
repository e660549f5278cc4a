"""Memory pools with the kernel's ``mempool_alloc``/``mempool_free`` semantics (mm/mempool.c)."""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Iterable
from typing import Generic, TypeVar

from client.mm.gfp import GFP, gfp_t
from client.mm.waits import WaitFor, WaitQueue, WaitRegistry

T = TypeVar("T")

# mm/mempool.c mempool_alloc: io_schedule_timeout(5*HZ) while waiting for an element.
MEMPOOL_WAIT_TIMEOUT = 5.0


class Mempool(Generic[T]):
    """A pool that keeps ``min_nr`` elements in reserve for when its backing allocator fails.

    ``backing_alloc(gfp)`` returns an element or None; it must not block when ``gfp`` lacks
    ``__GFP_DIRECT_RECLAIM``. ``mempool_create`` fills the pool: call ``fill`` (async) or
    pass ``elements``.
    """

    def __init__(
        self,
        min_nr: int,
        backing_alloc: Callable[[gfp_t], Awaitable[T | None]],
        backing_free: Callable[[T], None],
        *,
        name: str = "mempool",
        waits: WaitRegistry | None = None,
        elements: Iterable[T] = (),
    ) -> None:
        if min_nr < 0:
            raise ValueError("min_nr must be >= 0")
        self.min_nr = min_nr
        self.name = name
        self._alloc = backing_alloc
        self._free = backing_free
        self._elements: list[T] = list(elements)
        self._wait = WaitQueue()  # pool->wait
        self._waits = WaitRegistry() if waits is None else waits
        self._what = WaitFor("mempool", name, waker="mempool_free")

    @property
    def curr_nr(self) -> int:
        """Elements held in reserve now."""
        return len(self._elements)

    @property
    def nr_waiting(self) -> int:
        return len(self._wait)

    async def fill(self, gfp: gfp_t) -> None:
        """``mempool_create``: preallocate up to ``min_nr`` elements; raise if it cannot."""
        while len(self._elements) < self.min_nr:
            element = await self._alloc(gfp)
            if element is None:
                raise MemoryError(f"mempool {self.name}: cannot preallocate")
            self._elements.append(element)

    async def alloc(self, gfp: gfp_t) -> T | None:
        """``mempool_alloc``: never fails when ``gfp`` may sleep.

        1. try the backing allocator without __GFP_DIRECT_RECLAIM|__GFP_IO;
        2. else take a reserved element;
        3. else retry the backing allocator once with the full gfp;
        4. else, if the caller may sleep, wait on the pool (5 s at most) and loop with the
           full gfp; if it may not, return None.
        The backing allocator always gets __GFP_NOMEMALLOC|__GFP_NORETRY|__GFP_NOWARN.
        """
        # "don't allocate emergency reserves", "don't loop in __alloc_pages", "failures are OK"
        gfp_mask = gfp | GFP.NOMEMALLOC | GFP.NORETRY | GFP.NOWARN
        gfp_temp = gfp_mask & ~(GFP.DIRECT_RECLAIM | GFP.IO)
        while True:
            element = await self._alloc(gfp_temp)  # repeat_alloc:
            if element is not None:
                return element
            if self._elements:  # if (likely(pool->curr_nr)) remove_element(pool)
                return self._elements.pop()
            if gfp_temp != gfp_mask:  # "retry immediately" with the full mask
                gfp_temp = gfp_mask
                continue
            if not gfp_mask & GFP.DIRECT_RECLAIM:  # "We must not sleep if !__GFP_DIRECT_RECLAIM"
                return None
            # "Let's wait for someone else to return an element to @pool"
            await self._waits.park(self._wait, self._what, timeout=MEMPOOL_WAIT_TIMEOUT)

    def free(self, element: T) -> None:
        """``mempool_free``: refill the reserve first if it is below ``min_nr``, and wake."""
        if len(self._elements) < self.min_nr:
            self._elements.append(element)
            self._wait.unpark_all()  # wake_up(&pool->wait)
            return
        self._free(element)
