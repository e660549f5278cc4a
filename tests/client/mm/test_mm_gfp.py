"""gfp composites, task flags, gfp_to_alloc_flags and gfp_pfmemalloc_allowed (reference §2-3)."""

from __future__ import annotations

import pytest
import trio
import trio.testing

from client.mm import (
    ALLOC_HARDER,
    ALLOC_HIGH,
    ALLOC_NO_WATERMARKS,
    ALLOC_OOM,
    ALLOC_WMARK_MIN,
    GFP,
    GFP_ATOMIC,
    GFP_KERNEL,
    GFP_NOFS,
    GFP_NOIO,
    GFP_NOWAIT,
    PF,
    current_gfp_context,
    current_task_flags,
    gfp_pfmemalloc_allowed,
    gfp_to_alloc_flags,
    memalloc_noreclaim,
    serving_softirq,
    task_flags,
)

NONE = 0


def test_composites_are_the_kernels() -> None:
    assert GFP_KERNEL == GFP.DIRECT_RECLAIM | GFP.KSWAPD_RECLAIM | GFP.IO | GFP.FS
    assert GFP_NOFS == GFP.RECLAIM | GFP.IO
    assert GFP_NOIO == GFP.RECLAIM
    assert GFP_NOWAIT == GFP.KSWAPD_RECLAIM
    assert GFP_ATOMIC == GFP.HIGH | GFP.ATOMIC | GFP.KSWAPD_RECLAIM
    assert not GFP_ATOMIC & GFP.DIRECT_RECLAIM


@pytest.mark.parametrize(
    ("gfp", "expected"),
    [
        (GFP_KERNEL, ALLOC_WMARK_MIN),
        (GFP_NOIO, ALLOC_WMARK_MIN),
        (GFP_NOWAIT, ALLOC_WMARK_MIN),
        (GFP_NOWAIT | GFP.HIGH, ALLOC_HIGH),
        (GFP_ATOMIC, ALLOC_HIGH | ALLOC_HARDER),
        # "Not worth trying to allocate harder for __GFP_NOMEMALLOC even if it can't schedule"
        (GFP_ATOMIC | GFP.NOMEMALLOC, ALLOC_HIGH),
        (GFP_KERNEL | GFP.MEMALLOC, ALLOC_NO_WATERMARKS),
        (GFP_ATOMIC | GFP.MEMALLOC, ALLOC_HIGH | ALLOC_HARDER | ALLOC_NO_WATERMARKS),
    ],
)
def test_gfp_to_alloc_flags_of_an_ordinary_task(gfp: GFP, expected: int) -> None:
    assert gfp_to_alloc_flags(gfp, NONE) == expected


def test_gfp_to_alloc_flags_of_a_pf_memalloc_task_ignores_watermarks() -> None:
    assert gfp_to_alloc_flags(GFP_KERNEL, PF.MEMALLOC) == ALLOC_NO_WATERMARKS
    assert gfp_to_alloc_flags(GFP_NOIO | GFP.NOMEMALLOC, PF.MEMALLOC) == ALLOC_WMARK_MIN


@pytest.mark.parametrize(
    ("gfp", "flags", "allowed"),
    [
        (GFP_KERNEL, NONE, False),
        (GFP_ATOMIC, NONE, False),
        (GFP_KERNEL, PF.MEMALLOC, True),  # !in_interrupt() && PF_MEMALLOC
        (GFP_KERNEL, PF.MEMALLOC | PF.KSWAPD, True),
        (GFP_ATOMIC | GFP.MEMALLOC, NONE, True),  # __GFP_MEMALLOC without PF_MEMALLOC
        (GFP_KERNEL | GFP.NOMEMALLOC, PF.MEMALLOC, False),  # __GFP_NOMEMALLOC overrides
        (GFP_ATOMIC | GFP.MEMALLOC | GFP.NOMEMALLOC, NONE, False),
        (GFP_ATOMIC, PF.SOFTIRQ, False),  # RX in softirq: no reserve by itself
        (GFP_ATOMIC, PF.SOFTIRQ | PF.MEMALLOC, True),  # in_serving_softirq() && PF_MEMALLOC
        (GFP_ATOMIC | GFP.MEMALLOC, PF.SOFTIRQ, True),  # 3.6 RX: __GFP_MEMALLOC
        (GFP_ATOMIC, PF.HARDIRQ | PF.MEMALLOC, False),  # in_interrupt(), not serving softirq
    ],
)
def test_gfp_pfmemalloc_allowed(gfp: GFP, flags: PF, allowed: bool) -> None:
    assert gfp_pfmemalloc_allowed(gfp, flags) is allowed


@pytest.mark.parametrize(
    ("gfp", "flags", "expected"),
    [
        # oom_reserves_allowed(current): ALLOC_OOM, replacing the gfp's own flags (6.1
        # __alloc_pages_slowpath: "alloc_flags = gfp_to_alloc_flags_cma(gfp_mask,
        # reserve_flags)")
        (GFP_KERNEL, NONE, ALLOC_OOM),
        (GFP_ATOMIC, NONE, ALLOC_OOM),
        # PF_MEMALLOC and __GFP_MEMALLOC come first: ALLOC_NO_WATERMARKS
        (GFP_KERNEL, PF.MEMALLOC, ALLOC_NO_WATERMARKS),
        (GFP_KERNEL | GFP.MEMALLOC, NONE, ALLOC_NO_WATERMARKS),
        # __GFP_NOMEMALLOC overrides; in interrupt there is no current to be a victim
        (GFP_KERNEL | GFP.NOMEMALLOC, NONE, ALLOC_WMARK_MIN),
        (GFP_ATOMIC, PF.SOFTIRQ, ALLOC_HIGH | ALLOC_HARDER),
    ],
)
def test_gfp_to_alloc_flags_of_an_oom_victim(gfp: GFP, flags: PF, expected: int) -> None:
    assert gfp_to_alloc_flags(gfp, flags, oom_victim=True) == expected
    assert gfp_pfmemalloc_allowed(gfp, flags, oom_victim=True) is (
        expected in (ALLOC_OOM, ALLOC_NO_WATERMARKS)
    )


def test_memalloc_noio_strips_io_and_fs() -> None:
    assert current_gfp_context(GFP_KERNEL, PF.MEMALLOC_NOIO) == GFP_NOIO
    assert current_gfp_context(GFP_KERNEL, NONE) == GFP_KERNEL


def test_task_flags_nest_and_restore() -> None:
    assert current_task_flags() == NONE
    with memalloc_noreclaim() as inside:
        assert inside == PF.MEMALLOC
        with serving_softirq():  # __do_softirq masks the borrowed task's PF_MEMALLOC
            assert current_task_flags() == PF.SOFTIRQ
        assert current_task_flags() == PF.MEMALLOC
        with memalloc_noreclaim():  # memalloc_noreclaim_save when already set
            pass
        assert current_task_flags() == PF.MEMALLOC  # restore keeps the outer PF_MEMALLOC
    assert current_task_flags() == NONE


async def test_task_flags_belong_to_one_trio_task() -> None:
    seen: dict[str, PF] = {}
    child_may_look = trio.Event()

    async def child() -> None:
        seen["child at start"] = current_task_flags()
        with task_flags(PF.SOFTIRQ):
            await child_may_look.wait()
            seen["child"] = current_task_flags()

    with task_flags(PF.MEMALLOC):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(child)  # trio copies the context into the child at spawn
            await trio.testing.wait_all_tasks_blocked()
            seen["parent"] = current_task_flags()
            child_may_look.set()
    assert seen == {
        "child at start": PF.MEMALLOC,
        "child": PF.MEMALLOC | PF.SOFTIRQ,
        "parent": PF.MEMALLOC,
    }
    assert current_task_flags() == NONE
