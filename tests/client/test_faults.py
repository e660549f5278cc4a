"""Client faults (client/faults.py): fail_page_alloc as the kernel defines it, the swap
connection's latency, and a cut swap connection.

``FailPageAlloc`` is checked rule by rule against lib/fault-inject.c ``should_fail_ex`` and
mm/fail_page_alloc.c; then against the memory model with the in-memory swap device of
``client.mm.testing``; then on whole machines over the in-memory transport, on trio's
virtual clock.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import trio
import trio.testing

from client.config import GFP_FILTER_NAMES, AllocFaultConfig, ReserveConfig
from client.faults import GFP_FILTERS, ClientFaults, FailPageAlloc, FaultFired, FaultsCleared
from client.machine import ClientMachine
from client.mm import (
    GFP,
    GFP_ATOMIC,
    GFP_HIGHUSER_MOVABLE,
    GFP_KERNEL,
    GFP_NOIO,
    GFP_NOWAIT,
    PAGE_SIZE,
    AllocFailed,
    Memory,
    MemoryConfig,
)
from client.mm.testing import MemorySwapDevice
from client.net.socket import ModelledSocket
from client.net.stack import SWAP
from client.policy import MemReservePolicy
from client.summary import RunSummary
from nbdproto.config import ConfigError
from testbed.config import load_scenario
from testbed.scenario import embedded_server, watchdog_supervisor

CONFIGS = Path(__file__).resolve().parents[2] / "configs"


def fail_page_alloc(
    task: str = "hog/0", seed: int = 0, **config: Any
) -> tuple[FailPageAlloc, list[tuple[GFP, str]]]:
    """A FailPageAlloc in a task named ``task``, and the failures it reported."""
    failures: list[tuple[GFP, str]] = []
    fault = FailPageAlloc(
        AllocFaultConfig(**config),
        random.Random(seed),
        on_fail=lambda gfp, name: failures.append((gfp, name)),
        task_name=lambda: task,
    )
    return fault, failures


def pattern(fault: Callable[[GFP], bool], calls: int, gfp: GFP = GFP_KERNEL) -> list[bool]:
    return [fault(gfp) for _ in range(calls)]


# -- should_fail, rule by rule -------------------------------------------------------------
def test_probability_one_fails_every_allocation_and_zero_none() -> None:
    always, failures = fail_page_alloc(probability=1.0)
    assert pattern(always, 5) == [True] * 5
    assert failures == [(GFP_KERNEL, "hog/0")] * 5
    never, failures = fail_page_alloc(probability=0.0)
    assert pattern(never, 5) == [False] * 5
    assert failures == [] and never.fired == 0


def test_times_bounds_the_failures_and_minus_one_does_not() -> None:
    twice, _ = fail_page_alloc(probability=1.0, times=2)
    assert pattern(twice, 5) == [True, True, False, False, False]
    assert twice.times == 0
    unlimited, _ = fail_page_alloc(probability=1.0, times=-1)
    assert all(pattern(unlimited, 100))
    assert unlimited.times == -1


def test_interval_fails_every_nth_call() -> None:
    fault, _ = fail_page_alloc(probability=1.0, interval=3)
    assert pattern(fault, 9) == [False, False, True] * 3


def test_space_spares_a_budget_of_bytes_first() -> None:
    # should_fail_ex: "if (atomic_read(&attr->space) > size) { atomic_sub(size, ...); return
    # false; }": a budget of 3 pages spares two page allocations, then failures begin.
    fault, _ = fail_page_alloc(probability=1.0, space=3 * PAGE_SIZE)
    assert pattern(fault, 4) == [False, False, True, True]


def test_probability_draws_from_the_seeded_generator() -> None:
    a, _ = fail_page_alloc(probability=0.25, seed=7)
    b, _ = fail_page_alloc(probability=0.25, seed=7)
    c, _ = fail_page_alloc(probability=0.25, seed=8)
    first, second, other = pattern(a, 400), pattern(b, 400), pattern(c, 400)
    assert first == second  # same seed, same failures
    assert first != other
    assert 60 < sum(first) < 140  # about a quarter


@pytest.mark.parametrize(
    ("name", "fails", "spares"),
    [
        ("any", [GFP_ATOMIC, GFP_KERNEL, GFP_HIGHUSER_MOVABLE], []),
        ("atomic", [GFP_ATOMIC, GFP_ATOMIC | GFP.MEMALLOC], [GFP_NOWAIT, GFP_NOIO, GFP_KERNEL]),
        ("nowait", [GFP_ATOMIC, GFP_NOWAIT], [GFP_NOIO, GFP_KERNEL, GFP_HIGHUSER_MOVABLE]),
        ("wait", [GFP_NOIO, GFP_KERNEL, GFP_HIGHUSER_MOVABLE], [GFP_ATOMIC, GFP_NOWAIT]),
        ("highmem", [GFP_HIGHUSER_MOVABLE], [GFP_ATOMIC, GFP_NOIO, GFP_KERNEL]),
        ("nohighmem", [GFP_ATOMIC, GFP_NOIO, GFP_KERNEL], [GFP_HIGHUSER_MOVABLE]),
    ],
)
def test_gfp_filter_picks_the_allocations_that_may_fail(
    name: str, fails: list[GFP], spares: list[GFP]
) -> None:
    fault, _ = fail_page_alloc(probability=1.0, gfp=name)
    assert [fault(gfp) for gfp in fails] == [True] * len(fails)
    assert [fault(gfp) for gfp in spares] == [False] * len(spares)


def test_every_filter_name_has_a_meaning() -> None:
    assert tuple(GFP_FILTERS) == GFP_FILTER_NAMES


def test_nofail_allocations_never_fail() -> None:
    fault, _ = fail_page_alloc(probability=1.0)
    assert fault(GFP_KERNEL | GFP.NOFAIL) is False


def test_task_filter_fails_only_matching_tasks_and_they_alone_count() -> None:
    name = "nbd0.rx"
    failures: list[tuple[GFP, str]] = []
    fault = FailPageAlloc(
        AllocFaultConfig(probability=1.0, interval=2, task="nbd0"),
        random.Random(0),
        on_fail=lambda gfp, task: failures.append((gfp, task)),
        task_name=lambda: name,
    )
    seen = []
    for task in ["nbd0.rx", "hog/0", "nbd0.rx", "kswapd0", "nbd0.rx", "nbd0.rx"]:
        name = task
        seen.append(fault(GFP_ATOMIC))
    # Calls from other tasks neither fail nor advance the interval count.
    assert seen == [False, False, True, False, False, True]
    assert failures == [(GFP_ATOMIC, "nbd0.rx")] * 2


@pytest.mark.parametrize(
    ("config", "needle"),
    [
        ({"probability": 1.5}, "probability 1.5"),
        ({"probability": -0.1}, "probability -0.1"),
        ({"probability": float("nan")}, "probability nan"),
        ({"probability": 1, "interval": 0}, "interval 0"),
        ({"probability": 1, "times": -2}, "times -2"),
        ({"probability": 1, "space": -1}, "space -1"),
        ({"probability": 1, "gfp": "sometimes"}, "'sometimes'"),
        ({"probability": 1, "task": ""}, "task must not be empty"),
    ],
)
def test_bad_alloc_fault_settings_are_one_line_errors(config: dict[str, Any], needle: str) -> None:
    with pytest.raises(ConfigError, match="alloc fault") as info:
        AllocFaultConfig(**config)
    assert needle in str(info.value) and "\n" not in str(info.value)


def test_faults_table_is_strict() -> None:
    with pytest.raises(ConfigError, match="latecny_ms"):
        load_scenario(None, {"faults.latecny_ms": 3})
    with pytest.raises(ConfigError, match="probability"):
        load_scenario(None, {"faults.alloc.gfp": "atomic"})
    scenario = load_scenario(CONFIGS / "faults.toml")
    assert scenario.faults.latency_ms is not None and scenario.faults.latency_ms > 0
    assert scenario.faults.alloc is not None and scenario.faults.alloc.gfp == "atomic"


# -- against the memory model --------------------------------------------------------------
def model(nr_pages: int = 1024) -> tuple[Memory, ClientFaults, list[object]]:
    facts: list[object] = []
    memory = Memory(MemoryConfig(total_bytes=nr_pages * PAGE_SIZE), observer=facts.append)
    memory.swapon(MemorySwapDevice(nr_pages=4 * nr_pages))
    return memory, ClientFaults(memory, seed=3, observer=facts.append), facts


async def test_injected_failure_is_counted_and_reported_like_a_real_one(
    autojump_clock: trio.abc.Clock,
) -> None:
    memory, faults, facts = model()
    assert memory.allocator.fail_page_alloc is None  # no fault: nothing but one check
    faults.set_alloc(AllocFaultConfig(probability=1.0, times=2, gfp="atomic"))
    async with memory.running():
        assert await memory.alloc_page(GFP_ATOMIC) is None
        assert await memory.alloc_page(GFP_KERNEL) is not None  # not atomic: spared
        assert await memory.alloc_page(GFP_ATOMIC) is None
        assert await memory.alloc_page(GFP_ATOMIC) is not None  # times spent
    assert memory.stat.alloc_fail == 2
    failed = [f for f in facts if isinstance(f, AllocFailed)]
    assert [f.gfp for f in failed] == [GFP_ATOMIC, GFP_ATOMIC]
    fired = [f for f in facts if isinstance(f, FaultFired)]
    assert [(f.kind, f.detail["gfp"], f.detail["nth"]) for f in fired] == [
        ("alloc", GFP_ATOMIC, 1),
        ("alloc", GFP_ATOMIC, 2),
    ]
    assert faults.report()["fired"] == {"alloc": 2, "latency": 0, "reset": 0}
    faults.clear()
    assert memory.allocator.fail_page_alloc is None
    assert facts[-1] == FaultsCleared(alloc_fired=2)


async def test_task_filter_against_the_model(autojump_clock: trio.abc.Clock) -> None:
    memory, faults, facts = model()
    faults.set_alloc(AllocFaultConfig(probability=1.0, task="victim"))
    got: dict[str, list[bool]] = {"victim/0": [], "bystander/0": []}

    async def allocate(name: str) -> None:
        for _ in range(3):
            got[name].append(await memory.alloc_page(GFP_KERNEL) is not None)

    async with memory.running(), trio.open_nursery() as nursery:
        for name in got:
            nursery.start_soon(allocate, name, name=name)
    assert got == {"victim/0": [False] * 3, "bystander/0": [True] * 3}
    assert {f.detail["task"] for f in facts if isinstance(f, FaultFired)} == {"victim/0"}


async def test_the_same_seed_fails_the_same_allocations(autojump_clock: trio.abc.Clock) -> None:
    async def run(seed: int) -> list[bool]:
        memory = Memory(MemoryConfig(total_bytes=256 * PAGE_SIZE))
        faults = ClientFaults(memory, seed=seed, observer=lambda fact: None)
        faults.set_alloc(AllocFaultConfig(probability=0.5))
        async with memory.running():
            return [await memory.alloc_page(GFP_ATOMIC) is None for _ in range(64)]

    assert await run(11) == await run(11)
    assert await run(11) != await run(12)


# -- whole machines -------------------------------------------------------------------------
async def run_machine(
    overrides: dict[str, Any],
    *,
    during: Callable[[ClientMachine], Any] | None = None,
    facts: list[object] | None = None,
    prepare: Callable[[ClientMachine], None] | None = None,
) -> RunSummary:
    """The small scenario (16 MiB, hogs at 2x RAM, 1 ms to the server) over the in-memory
    transport, watched by the watchdog; ``prepare(machine)`` is called before it runs and
    ``during(machine)`` runs beside it once it runs."""
    small = {"machine.memory": "16M", "workloads.0.total": "2x", "swap.latency": 0.001}
    scenario = load_scenario(CONFIGS / "small.toml", {**small, **overrides})
    server = embedded_server(scenario)
    observer = facts.append if facts is not None else (lambda fact: None)
    async with trio.open_nursery() as nursery:

        async def connect() -> trio.abc.Stream:
            client_end, server_end = trio.testing.memory_stream_pair()
            nursery.start_soon(server.handle_stream, server_end)
            return client_end

        machine = ClientMachine(scenario, connect, observer=observer)
        if prepare is not None:
            prepare(machine)
        if during is not None:

            async def beside() -> None:
                await machine.ready.wait()
                await during(machine)

            nursery.start_soon(beside)
        with trio.fail_after(300):  # virtual seconds: a regression fails, never hangs
            summary = await machine.run(supervisor=watchdog_supervisor(2.0, _quiet_log()))
        nursery.cancel_scope.cancel()
    return summary


def _quiet_log() -> Any:
    class Quiet:
        def warning(self, *args: Any, **kwargs: Any) -> None:
            pass

    return Quiet()


def assert_clean(summary: RunSummary) -> None:
    assert summary.outcome == "completed", summary.reason
    integrity = summary.integrity
    assert integrity.corrupt == 0
    assert integrity.pages_verified == integrity.pages_written > 0


async def test_latency_fault_slows_the_swap_connection(autojump_clock: trio.abc.Clock) -> None:
    plain = await run_machine({})
    slow = await run_machine({"faults.latency_ms": 5.0})
    assert_clean(plain)
    assert_clean(slow)
    assert slow.duration > plain.duration * 2  # 5 ms instead of 1 ms to the server
    assert slow.faults["fired"]["latency"] == 1
    assert slow.faults["active"] == {"latency_ms": 5.0}
    assert plain.faults == {"fired": {"alloc": 0, "latency": 0, "reset": 0}, "active": {}}


async def test_latency_fault_at_runtime_changes_the_socket(autojump_clock: trio.abc.Clock) -> None:
    facts: list[object] = []
    seen: dict[str, float] = {}

    async def slow_down(machine: ClientMachine) -> None:
        assert machine.swap_socket is not None
        seen["before"] = machine.swap_socket.latency
        machine.set_swap_latency(20.0)
        seen["after"] = machine.swap_socket.latency
        machine.clear_faults()
        seen["cleared"] = machine.swap_socket.latency

    summary = await run_machine({}, during=slow_down, facts=facts)
    assert_clean(summary)
    assert seen == {"before": 0.001, "after": 0.02, "cleared": 0.001}
    assert FaultFired("latency", {"ms": 20.0, "sock": "nbd0"}) in facts
    assert any(isinstance(f, FaultsCleared) for f in facts)


async def test_reset_fault_reconnects_and_loses_no_page(autojump_clock: trio.abc.Clock) -> None:
    async def cut_twice(machine: ClientMachine) -> None:
        for threshold in (1000, 3000):
            while machine.memory.stat.pswpout < threshold or not machine.device.connected:
                await trio.sleep(0.01)
            await machine.reset_swap()

    summary = await run_machine({"workloads.0.rounds": 2}, during=cut_twice)
    assert_clean(summary)
    assert summary.faults["fired"]["reset"] == 2
    assert summary.swap_device["reconnects"] == 2
    assert summary.swap_device["connects"] == 3
    assert summary.vmstat["pswpin"] > 0


@pytest.mark.parametrize("tx_accounting", ["posted", "bean-counted"])
async def test_reserve_reconnects_give_back_the_reserve_and_min_of_each_swap_socket(
    autojump_clock: trio.abc.Clock, tx_accounting: str
) -> None:
    """Under ``reserve``, a cut swap connection's socket is closed and the reconnect opens
    another: right after each close the tree and min are those of no swap socket, and right
    after each open exactly those of the first socket (the policy's own socket_created and
    socket_closed, watched as the machine calls them)."""
    seen: list[tuple[str, int, list[tuple[str, int, int]]]] = []

    def watch(machine: ClientMachine) -> None:
        policy = machine.policy
        assert isinstance(policy, MemReservePolicy)

        def state(what: str, sock: ModelledSocket) -> None:
            rows = [
                (r["reserve"].replace(sock.name, "<swap socket>"), r["pages"], r["limit"])
                for r in policy.root.rows()
            ]
            seen.append((what, machine.memory.zones[0].watermarks.min, rows))

        def created(sock: ModelledSocket, kind: str) -> None:
            type(policy).socket_created(policy, sock, kind)
            if kind == SWAP:
                state("open", sock)

        def closed(sock: ModelledSocket) -> None:
            type(policy).socket_closed(policy, sock)
            state("closed", sock)

        policy.socket_created = created  # type: ignore[method-assign]
        policy.socket_closed = closed  # type: ignore[method-assign]

    async def cut_twice(machine: ClientMachine) -> None:
        for threshold in (1000, 3000):
            while machine.memory.stat.pswpout < threshold or not machine.device.connected:
                await trio.sleep(0.01)
            await machine.reset_swap()

    summary = await run_machine(
        {"policy": "reserve", "reserve.tx_accounting": tx_accounting},
        during=cut_twice,
        prepare=watch,
    )
    assert_clean(summary)
    assert summary.swap_device["reconnects"] == 2
    opened = [(wmin, rows) for what, wmin, rows in seen if what == "open"]
    closed = [(wmin, rows) for what, wmin, rows in seen if what == "closed"]
    assert [what for what, _, _ in seen][:5] == ["open", "closed"] * 2 + ["open"]
    assert len(opened) == 3 and len(closed) >= 2
    assert all(state == opened[0] for state in opened)
    assert all(state == closed[0] for state in closed)
    cfg = ReserveConfig()
    (open_min, open_rows), (closed_min, closed_rows) = opened[0], closed[0]
    assert open_min - closed_min == cfg.tx_pages
    assert open_rows[0] == ("total reserve", *(2 * [cfg.tx_pages + cfg.rx_pages + cfg.block_pages]))
    assert closed_rows[0] == ("total reserve", *(2 * [cfg.rx_pages + cfg.block_pages]))


async def test_alloc_faults_on_user_pages_are_retried_not_fatal(
    autojump_clock: trio.abc.Clock,
) -> None:
    """An injected failure of a page fault's allocation is the model's VM_FAULT_OOM; the
    fault is retried, as the kernel retries it, and the run completes clean."""
    summary = await run_machine(
        {"faults.alloc": {"probability": 0.05, "gfp": "highmem", "times": 100}}
    )
    assert_clean(summary)
    assert summary.faults["fired"]["alloc"] == 100
    assert summary.vmstat["alloc_fail"] >= 100


async def test_alloc_faults_on_rx_refills_fail_refills_and_the_run_completes(
    autojump_clock: trio.abc.Clock,
) -> None:
    facts: list[object] = []
    summary = await run_machine(
        {"faults.alloc": {"probability": 0.2, "gfp": "atomic", "task": "eth0"}}, facts=facts
    )
    assert_clean(summary)
    fired = summary.faults["fired"]["alloc"]
    assert fired > 0
    # Each failure ends a ring refill early (the next poll tries again).
    assert summary.net["nic"]["refill_failed"] == fired
    assert {f.detail["task"] for f in facts if isinstance(f, FaultFired)} == {"eth0.rx"}
