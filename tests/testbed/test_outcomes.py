"""Outcomes emerge from the mechanics (DESIGN.md §4.3): the same scenario, different rules.

Every run here is the real model, server and watchdog, joined in memory on trio's virtual
clock (the model's own CPU time costs no simulated time, as a kernel's is negligible beside
a network round trip).  The machine is the swap-over-NBD scenario scaled to 16 MiB so that
each run takes seconds.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import attrs
import pytest
import structlog
import trio
import trio.testing

from client.machine import ClientMachine
from client.mm import PAGE_SIZE
from client.summary import RunSummary
from testbed.config import load_scenario
from testbed.scenario import embedded_server, run_scenario, watchdog_supervisor

SCENARIO = Path(__file__).resolve().parents[2] / "configs" / "swap-over-nbd.toml"
# Scaled down 4x: RAM, processes and the receive ring (256 descriptors at 64M).
SMALL = {"machine.memory": "16M", "workloads.0.processes": 8, "nic.ring_size": 64}


async def run(policy: str, **overrides: Any) -> RunSummary:
    scenario = load_scenario(SCENARIO, {**SMALL, **overrides})
    return await run_scenario(scenario, policy=policy, transport="memory")


def completed_clean(summary: RunSummary) -> bool:
    integrity = summary.integrity
    return (
        summary.outcome == "completed"
        and integrity.corrupt == 0
        and integrity.pages_verified == integrity.pages_written > 0
    )


@pytest.mark.parametrize("policy", ["none", "recursive"])
async def test_without_reserves_swap_over_nbd_deadlocks_on_rx(
    autojump_clock: trio.abc.Clock, policy: str
) -> None:
    summary = await run(policy)
    assert summary.outcome == "deadlock"
    cycle = summary.deadlock.cycle
    assert cycle[0] == cycle[-1] == "kswapd0"
    assert "rx_buffer(eth0 ring)" in cycle  # the reply (or ACK) that cannot be received
    assert summary.net["rx_alloc_fail"] > 0
    # Free pages reached GFP_ATOMIC's floor, 3/8 of min (ALLOC_HIGH halves it, ALLOC_HARDER
    # takes a quarter more): __zone_watermark_ok fails "if (free_pages <= min + ...)", so no
    # ring refill can succeed there.
    assert summary.min_free_pages <= summary.memory.zones[0].min * 3 // 8


@pytest.mark.parametrize("policy", ["reserve", "pfmemalloc"])
async def test_with_reserves_swap_over_nbd_completes(
    autojump_clock: trio.abc.Clock, policy: str
) -> None:
    summary = await run(policy)
    assert completed_clean(summary), summary.reason
    # Lameter's fileserver never ends up holding an emergency buffer: each one it would
    # have received was dropped at the socket filter.
    for sock in summary.net["sockets"]:
        if not sock["memalloc"]:
            assert sock["emergency_rx"] == 0 and sock["emergency_rx_held"] == 0


async def test_none_completes_without_memory_pressure(autojump_clock: trio.abc.Clock) -> None:
    summary = await run("none", **{"workloads.0.total": "0.5x"})
    assert completed_clean(summary)
    assert summary.vmstat["pswpout"] == 0


async def test_plenty_of_clean_pages_lets_recursive_complete(
    autojump_clock: trio.abc.Clock,
) -> None:
    """Lameter's argument, on his terms: with a hot page cache beside the hogs there are
    clean pages to give, and `recursive` completes with every page verified.  Since bios
    are 6.1's bio-200 slab objects, nothing on reclaim's writeout path fails an allocation
    in this scenario: free pages stay close to min and kswapd's ordinary reclaim of clean file
    pages is enough, so `none` completes the same way and the recursion need not fire
    (docs/policies.md).  The recursion itself is tested in tests/client/test_policies.py."""
    scenario = load_scenario(SCENARIO.with_name("clean-pages.toml"))
    recursive = await run_scenario(scenario, policy="recursive", transport="memory")
    assert completed_clean(recursive), recursive.reason
    assert recursive.integrity.file_pages_verified > 0
    # Whenever the recursion fires here it finds clean pages to free.
    assert recursive.policy_report["recursive_failed"] == 0


#: How a run with no fault injected may end (DESIGN.md §5).  Which of the two a policy gets
#: is the model's to decide; ``integrity_error`` (a page lost or corrupted) or ``error`` (a
#: crash, the run's time limit) would be a bug of the testbed, not an outcome.
FAULT_FREE_OUTCOMES = ("completed", "deadlock")


@pytest.mark.slow
@pytest.mark.timeout(900)  # wall seconds: a completing run takes 1-2 minutes on 2 busy cores
@pytest.mark.parametrize("policy", ["none", "recursive", "reserve", "pfmemalloc"])
async def test_the_shipped_scenario_as_shipped(autojump_clock: trio.abc.Clock, policy: str) -> None:
    """configs/swap-over-nbd.toml with nothing scaled down (64 MiB, 32 hogs at 4x RAM, the
    fileserver beside them) ends in a verdict under every policy: completed with every page
    written read back and verified, or a deadlock the watchdog explains.  Which policy gets
    which is left to the model (its header says what to expect, the scaled-down tests above
    pin it): a change to the model may move an outcome, but never make a run hang, run out
    of time, lose a page or count one verified that was not."""
    summary = await run_scenario(load_scenario(SCENARIO), policy=policy, transport="memory")
    assert summary.memory.total_pages == 16384  # as shipped: 64 MiB
    assert summary.policy == policy
    assert summary.outcome in FAULT_FREE_OUTCOMES, summary.reason
    integrity = summary.integrity
    assert integrity.corrupt == 0
    assert integrity.pages_written > 0
    if summary.outcome == "completed":
        assert completed_clean(summary), summary.reason
        assert all(w["finished"] == w["processes"] for w in summary.workloads)
    else:
        assert summary.deadlock.waiting  # no progress while tasks wait on something
        assert integrity.pages_verified <= integrity.pages_written


@pytest.mark.parametrize("path", sorted(SCENARIO.parent.glob("*.toml")), ids=lambda p: p.name)
def test_every_shipped_scenario_loads(path: Path) -> None:
    if path.name == "server.toml":
        return  # a server config, not a scenario (tests/server covers it)
    scenario = load_scenario(path)
    assert scenario.description


@pytest.mark.parametrize("policy", ["none", "recursive", "reserve", "pfmemalloc"])
async def test_the_no_pressure_control_completes_without_swapping(
    autojump_clock: trio.abc.Clock, policy: str
) -> None:
    scenario = load_scenario(SCENARIO.with_name("no-pressure.toml"))
    summary = await run_scenario(scenario, policy=policy, transport="memory")
    assert completed_clean(summary), summary.reason
    assert summary.vmstat["pswpout"] == 0 and summary.duration > 4


def reserve_row(summary: RunSummary, name: str) -> dict[str, Any]:
    rows = summary.policy_report["reserve_info"]
    [row] = [r for r in rows if r["reserve"].strip() == name]
    return row


async def test_reserve_sized_far_too_small_deadlocks_on_its_rx_reserve(
    autojump_clock: trio.abc.Clock,
) -> None:
    """Zijlstra's reserve as posted, sized far too small (2 TX pages, a 1-page SKB data
    reserve): TX is bounded, not bean-counted, so nobody waits on a reserve; what bites is
    RX.  No emergency skb can be charged ("usage + charge < limit" with a limit of one), so
    once reclaim's TX has taken memory under GFP_ATOMIC's floor the swap socket's replies
    and ACKs are dropped at the NIC and reclaim waits on itself."""
    summary = await run("reserve", **{"reserve.tx_pages": 2, "reserve.rx_pages": 1})
    assert summary.outcome == "deadlock"
    assert "rx_buffer(eth0 ring)" in summary.deadlock.cycle
    skb = reserve_row(summary, "SKB data reserve")
    assert skb["limit"] == 1 and skb["peak"] == 0 and skb["charge_failed"] > 0
    waits = " ".join(summary.deadlock.waiting.values())
    assert "reserve(" not in waits
    assert reserve_row(summary, "protocol TX pages")["charge_failed"] == 0


@pytest.mark.parametrize(("rx_pages", "outcome"), [(1, "deadlock"), (8, "completed")])
async def test_reserve_the_rx_reserve_alone_decides(
    autojump_clock: trio.abc.Clock, rx_pages: int, outcome: str
) -> None:
    """With no TX pages in the tree (only the SKB data reserve and the block reserve raise
    min), a 1-page RX reserve deadlocks on the swap socket's RX and an 8-page one
    completes: the RX bean counting is what carries reclaim's replies over the floor."""
    summary = await run("reserve", **{"reserve.tx_pages": 0, "reserve.rx_pages": rx_pages})
    assert summary.outcome == outcome, summary.reason
    skb = reserve_row(summary, "SKB data reserve")
    if outcome == "deadlock":
        assert "rx_buffer(eth0 ring)" in summary.deadlock.cycle
        assert skb["peak"] == 0 and skb["charge_failed"] > 0
    else:
        assert completed_clean(summary)


async def test_reserve_bean_counted_tx_variant_with_a_tiny_tx_reserve_deadlocks(
    autojump_clock: trio.abc.Clock,
) -> None:
    """Our bean-counted TX variant (not the series'): with a 2-page TX node a 64 KiB skb
    can never be charged and the sender waits on the reserve for ever."""
    summary = await run(
        "reserve", **{"reserve.tx_accounting": "bean-counted", "reserve.tx_pages": 2}
    )
    assert summary.outcome == "deadlock"
    waits = " ".join(summary.deadlock.waiting.values())
    assert "reserve(" in waits  # someone waits on a reserve charge that never comes


async def test_pfmemalloc_with_a_tiny_min_free_kbytes_deadlocks(
    autojump_clock: trio.abc.Clock,
) -> None:
    """Gorman's reserve is min itself: at 32 KiB (8 pages) it cannot cover reclaim's TX
    and the ring's refills.  (At 64 KiB it completes, its free pages touching 0 on the
    way: the autotuned send buffer holds at most about 31 pages at 16 MiB, and the 64
    receive buffers posted when the device opened are a standing RX reserve of 32 pages,
    on top of min.)"""
    summary = await run("pfmemalloc", **{"machine.min_free_kbytes": 32})
    assert summary.outcome == "deadlock"
    assert summary.min_free_pages == 0  # the whole reserve (min itself) was used up


async def test_fairness_the_flood_cannot_eat_the_swap_sockets_reserve(
    autojump_clock: trio.abc.Clock,
) -> None:
    """Lameter's fileserver floods eight ordinary sockets beside the swap socket: under
    pfmemalloc its reserve-backed packets are dropped (counted), it never holds one, and
    swap-out completes."""
    scenario = load_scenario(SCENARIO.with_name("fairness.toml"))
    summary = await run_scenario(scenario, transport="memory")
    assert summary.policy == "pfmemalloc"
    assert completed_clean(summary), summary.reason
    assert summary.net["PFMemallocDrop"] > 0
    noise = [s for s in summary.net["sockets"] if not s["memalloc"]]
    assert len(noise) == 8
    assert all(s["emergency_rx"] == 0 and s["emergency_rx_held"] == 0 for s in noise)
    assert sum(s["pfmemalloc_drop"] for s in noise) == summary.net["PFMemallocDrop"]


async def test_virtio_refill_work_deadlocks_in_reclaim_with_napi_disabled(
    autojump_clock: trio.abc.Clock,
) -> None:
    """Linux 6.1's hang (reference/kernel-6.1-nbd-swap-hang.txt): a NAPI refill with
    GFP_ATOMIC fails at its floor, refill_work disables NAPI and refills with GFP_KERNEL,
    enters direct reclaim and waits for a bio that only a reply NAPI would receive can
    free; kswapd0 waits for a bio too.  Seeds 0-9 all deadlock this way; seed 0 here."""
    scenario = load_scenario(SCENARIO.with_name("virtio-refill.toml"))
    summary = await run_scenario(scenario, transport="memory")
    assert summary.policy == "pfmemalloc"
    assert summary.outcome == "deadlock", summary.reason
    deadlock = summary.deadlock
    assert deadlock.cycle == [
        "eth0.refill",
        "mempool(bio)",
        "eth0.rx",
        "napi_disabled(eth0)",
        "eth0.refill",
    ]
    assert deadlock.waiting["kswapd0"] == "mempool(bio)"
    nic = summary.net["nic"]
    assert nic["driver"] == "virtio"
    assert nic["refill_work"] >= 1 and nic["refill_failed"] >= 1
    assert summary.vmstat["allocstall"] > 0  # refill_work's GFP_KERNEL reclaimed directly
    # The NAPI refill failed at GFP_ATOMIC's floor, 3/8 of min: not below it.
    assert summary.min_free_pages == summary.memory.zones[0].min * 3 // 8


async def test_virtio_refill_scenario_with_a_netdev_driver_completes(
    autojump_clock: trio.abc.Clock,
) -> None:
    """The same machine whose driver refills as netdev_alloc_skb does (__GFP_MEMALLOC while
    the swap socket exists): no refill_work, and swap-out completes.  The deadlock above is
    the driver's, not the scenario's."""
    scenario = load_scenario(SCENARIO.with_name("virtio-refill.toml"), {"nic.driver": "netdev"})
    summary = await run_scenario(scenario, transport="memory")
    assert completed_clean(summary), summary.reason
    assert summary.net["nic"]["refill_work"] == 0


async def test_a_permanently_dead_server_ends_the_run_as_an_error_not_a_hang(
    autojump_clock: trio.abc.Clock,
) -> None:
    """The server vanishes mid-run and never comes back: the run ends within the
    watchdog's stall time as an error naming the unreachable server, with no page
    reported corrupt."""
    scenario = load_scenario(
        SCENARIO.with_name("small.toml"),
        {"machine.memory": "16M", "swap.latency": 0.002, "swap.io_timeout": 1.0},
    )
    server = embedded_server(scenario)
    gone = False
    async with trio.open_nursery() as nursery:

        async def connect() -> trio.abc.Stream:
            if gone:
                raise ConnectionRefusedError(111, "Connection refused")
            client_end, server_end = trio.testing.memory_stream_pair()
            nursery.start_soon(server.handle_stream, server_end)
            return client_end

        machine = ClientMachine(scenario, connect)

        async def kill_the_server() -> None:
            nonlocal gone
            while machine.memory.stat.pswpout < 2000:
                await trio.sleep(0.01)
            gone = True
            server.drop_connections()

        nursery.start_soon(kill_the_server)
        summary = await machine.run(
            supervisor=watchdog_supervisor(scenario.run.stall_seconds, structlog.get_logger())
        )
        nursery.cancel_scope.cancel()
    assert summary.outcome == "error"
    assert "swap server is unreachable" in summary.reason
    assert summary.swap_device["reconnect_failures"] > 0
    assert summary.integrity.corrupt == 0
    assert summary.duration < 10  # ended by the watchdog, promptly


async def test_a_page_corrupted_on_the_server_is_an_integrity_error(
    autojump_clock: trio.abc.Clock,
) -> None:
    """End to end: one byte of one swapped-out page is changed in the server's store while
    its process has still to read it back; the swap-in brings the bad page over NBD and the
    read pass must count it corrupt, never verified: the run is an integrity_error."""
    scenario = load_scenario(
        SCENARIO.with_name("small.toml"),
        {"machine.memory": "16M", "workloads.0.total": "2x", "swap.latency": 0.001},
    )
    server = embedded_server(scenario)
    store = server.exports[scenario.swap.export].store
    corrupted: list[tuple[int, int, int]] = []
    async with trio.open_nursery() as nursery:

        async def connect() -> trio.abc.Stream:
            client_end, server_end = trio.testing.memory_stream_pair()
            nursery.start_soon(server.handle_stream, server_end)
            return client_end

        machine = ClientMachine(scenario, connect)

        async def corrupt_one_slot() -> None:
            await machine.ready.wait()
            memory = machine.memory
            while not corrupted:
                await trio.sleep(0.01)
                swap = memory.swap
                assert swap is not None
                for process in memory.processes.values():
                    # A slot only its pte holds: written, out of the swap cache, so the
                    # process's read pass must fetch it from the server.
                    out = [(v, s) for v, s in process.swapped.items() if s not in swap.cache]
                    if out:
                        vpage, slot = out[0]
                        page = bytearray(store.pread(slot * PAGE_SIZE, PAGE_SIZE))
                        page[PAGE_SIZE // 2] ^= 0x01
                        store.pwrite(slot * PAGE_SIZE, bytes(page))
                        corrupted.append((process.pid, vpage, slot))
                        break

        nursery.start_soon(corrupt_one_slot)
        summary = await machine.run(
            supervisor=watchdog_supervisor(scenario.run.stall_seconds, structlog.get_logger())
        )
        nursery.cancel_scope.cancel()
    assert corrupted
    assert summary.swap_device["remapped_slots"] == 0  # the slot lived at its home block
    assert summary.outcome == "integrity_error", summary.reason
    integrity = summary.integrity
    assert integrity.corrupt >= 1
    assert integrity.pages_verified + integrity.corrupt == integrity.pages_written


def test_a_virtual_clock_run_is_a_function_of_its_seed() -> None:
    """trio's scheduler is seeded from run.seed (testbed/determinism.py): the same seed
    gives the same run, counter for counter, whatever ran before in the process.

    Each run is its own ``trio.run`` on a fresh virtual clock, as ``netswap run`` is: the
    model's deadlines are absolute clock readings, so the same run started at another
    virtual time rounds them differently and can break a near tie another way."""

    def once(policy: str, seed: int) -> RunSummary:
        clock = trio.testing.MockClock(autojump_threshold=0)
        summary = trio.run(lambda: run(policy, **{"run.seed": seed}), clock=clock)
        return attrs.evolve(summary, wall_seconds=None)

    first = once("pfmemalloc", 7)
    once("none", 3)  # something else in between
    again = once("pfmemalloc", 7)
    assert first == again


async def test_a_run_whose_embedded_server_hit_a_bug_is_an_error_not_a_result(
    autojump_clock: trio.abc.Clock, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A bug in the server closes the swap connection (``server.connection_failed``); what
    the machine then did is no result of the policy's, so the run raises."""
    from server.stores import MemoryStore
    from testbed.scenario import EmbeddedServerError

    def broken_pwrite(self: MemoryStore, offset: int, data: bytes) -> None:
        raise ZeroDivisionError("a bug")

    monkeypatch.setattr(MemoryStore, "pwrite", broken_pwrite)
    with pytest.raises(EmbeddedServerError, match=r"failed \d+ connection"):
        await run("pfmemalloc")


def test_the_embedded_server_populates_nothing_ahead_of_the_model() -> None:
    """The embedded server's memory exports start no populating thread: the model writes
    slower than page faults limit a server, and the thread's CPU is a sweep's loss."""
    server = embedded_server(load_scenario(SCENARIO))
    stores = [export.store for export in server.exports.values()]
    assert stores and all(getattr(s, "populate", None) is False for s in stores)
    for s in stores:
        s.close()
