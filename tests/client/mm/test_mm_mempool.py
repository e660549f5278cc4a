"""mempool_alloc / mempool_free, step by step (mm/mempool.c, reference §3)."""

from __future__ import annotations

import pytest
import trio
import trio.testing

from client.mm import GFP, GFP_ATOMIC, GFP_KERNEL, GFP_NOIO, Mempool, WaitFor, WaitRegistry


class Backing:
    """A backing allocator that records its calls and succeeds when told to."""

    def __init__(self, succeed: bool = False) -> None:
        self.succeed = succeed
        self.calls: list[GFP] = []
        self.freed: list[str] = []
        self._n = 0

    async def alloc(self, gfp: GFP) -> str | None:
        self.calls.append(gfp)
        if not self.succeed:
            return None
        self._n += 1
        return f"new{self._n}"

    def free(self, element: str) -> None:
        self.freed.append(element)


def pool(backing: Backing, min_nr: int = 2, waits: WaitRegistry | None = None) -> Mempool[str]:
    reserved = [f"reserved{i}" for i in range(min_nr)]
    return Mempool(min_nr, backing.alloc, backing.free, name="bio", waits=waits, elements=reserved)


async def test_step1_backing_first_without_reclaim_or_io() -> None:
    backing = Backing(succeed=True)
    p = pool(backing)
    assert await p.alloc(GFP_NOIO) == "new1"
    [gfp] = backing.calls
    assert not gfp & (GFP.DIRECT_RECLAIM | GFP.IO)
    assert gfp & GFP.NOMEMALLOC and gfp & GFP.NORETRY and gfp & GFP.NOWARN
    assert p.curr_nr == 2


async def test_step2_reserved_element_when_backing_fails() -> None:
    backing = Backing()
    p = pool(backing)
    assert await p.alloc(GFP_KERNEL) == "reserved1"
    assert len(backing.calls) == 1 and p.curr_nr == 1


async def test_step3_full_gfp_retry_when_the_pool_is_empty() -> None:
    calls: list[GFP] = []

    async def alloc(gfp: GFP) -> str | None:
        calls.append(gfp)
        return "reclaimed" if gfp & GFP.DIRECT_RECLAIM else None

    p: Mempool[str] = Mempool(0, alloc, lambda element: None)
    assert await p.alloc(GFP_KERNEL) == "reclaimed"
    first, second = calls
    assert not first & GFP.DIRECT_RECLAIM
    assert second == GFP_KERNEL | GFP.NOMEMALLOC | GFP.NORETRY | GFP.NOWARN


async def test_step4_no_sleep_means_none(autojump_clock: trio.testing.MockClock) -> None:
    backing = Backing()
    p = pool(backing, min_nr=0)
    start = trio.current_time()
    assert await p.alloc(GFP_ATOMIC) is None
    # GFP_ATOMIC has neither __GFP_DIRECT_RECLAIM nor __GFP_IO: gfp_temp == gfp_mask, so
    # there is no "retry immediately" round.
    assert len(backing.calls) == 1
    assert await p.alloc(GFP_ATOMIC | GFP.IO) is None
    assert len(backing.calls) == 3  # first without __GFP_IO, then with it
    assert trio.current_time() == start


async def test_step4_sleeper_waits_for_mempool_free(autojump_clock: trio.testing.MockClock) -> None:
    waits = WaitRegistry()
    backing = Backing()
    p = pool(backing, min_nr=1, waits=waits)
    held = await p.alloc(GFP_NOIO)
    assert held == "reserved0"
    got: list[str | None] = []

    async def waiter() -> None:
        got.append(await p.alloc(GFP_NOIO))

    async with trio.open_nursery() as nursery:
        nursery.start_soon(waiter, name="kswapd0")
        await trio.testing.wait_all_tasks_blocked()
        assert waits.snapshot() == {"kswapd0": WaitFor("mempool", "bio", "mempool_free")}
        assert p.nr_waiting == 1
        await trio.sleep(1)
        p.free(held)  # below min_nr: refills the pool and wakes the waiter
    assert got == [held]
    assert trio.current_time() == pytest.approx(1)
    assert len(waits) == 0


async def test_step4_wait_times_out_after_5s_and_retries_backing(
    autojump_clock: trio.testing.MockClock,
) -> None:
    backing = Backing()
    p = pool(backing, min_nr=0)

    async def heal() -> None:
        await trio.sleep(3)
        backing.succeed = True

    async with trio.open_nursery() as nursery:
        nursery.start_soon(heal)
        assert await p.alloc(GFP_KERNEL) == "new1"
    assert trio.current_time() == pytest.approx(5.0)  # io_schedule_timeout(5*HZ)


async def test_free_refills_below_min_then_frees_to_backing() -> None:
    backing = Backing()
    p = pool(backing, min_nr=1)
    a = await p.alloc(GFP_KERNEL)
    assert a is not None and p.curr_nr == 0
    p.free("extra")  # below min_nr: kept
    p.free(a)  # full: back to the backing allocator
    assert p.curr_nr == 1 and backing.freed == ["reserved0"]


async def test_fill_preallocates_min_nr() -> None:
    backing = Backing(succeed=True)
    p: Mempool[str] = Mempool(3, backing.alloc, backing.free)
    await p.fill(GFP_KERNEL)
    assert p.curr_nr == 3
    backing.succeed = False
    empty: Mempool[str] = Mempool(1, backing.alloc, backing.free)
    with pytest.raises(MemoryError):
        await empty.fill(GFP_KERNEL)
