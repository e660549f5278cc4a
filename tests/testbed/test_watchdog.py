"""The deadlock watchdog: wait-for cycles and chains, and stall detection on the virtual clock.

Everything runs under trio's autojump clock: seconds below are virtual, and no test sleeps in
real time to synchronise.
"""

from __future__ import annotations

import math

import attrs
import pytest
import trio
import trio.testing

from client.mm.waits import IDLE, WaitFor, WaitQueue, WaitRegistry
from testbed.watchdog import Verdict, Watchdog, find_cycle, longest_chain

STALL = 2.0
INTERVAL = 0.05
EPS = 1e-6

WRITEBACK = WaitFor("writeback", "swap0 req 812", "swap device")
RX_BUFFER = WaitFor("rx_buffer", "sock nbd0", "kswapd")
FREE_PAGES = WaitFor("free_pages", "Normal", "kswapd")
RX_DATA = WaitFor("rx_data", "sock nbd0", "nbd server")
KSWAPD_IDLE = WaitFor(IDLE, "kswapd", "allocator")
ROLES = {"kswapd": ["kswapd0"], "swap device": ["nbd0.rx"]}
EXAMPLE_CYCLE = [
    "kswapd0",
    "writeback(swap0 req 812)",
    "nbd0.rx",
    "rx_buffer(sock nbd0)",
    "kswapd0",
]


# -- find_cycle / longest_chain on hand-built snapshots -------------------------------------


def test_the_example_cycle_is_found_and_rendered() -> None:
    waits = {"kswapd0": WRITEBACK, "nbd0.rx": RX_BUFFER}
    assert find_cycle(waits, ROLES) == EXAMPLE_CYCLE


def test_the_cycle_starts_at_kswapd_whatever_else_waits_on_it() -> None:
    waits = {
        "hog0": FREE_PAGES,
        "hog1": FREE_PAGES,
        "nbd0.rx": RX_BUFFER,
        "kswapd0": WRITEBACK,
    }
    assert find_cycle(waits, ROLES) == EXAMPLE_CYCLE


def test_a_cycle_through_kswapd_is_preferred_to_an_earlier_one() -> None:
    waits = {
        "a": WaitFor("lock", "x", "b"),
        "b": WaitFor("lock", "y", "a"),
        "kswapd0": WRITEBACK,
        "nbd0.rx": RX_BUFFER,
    }
    assert find_cycle(waits, ROLES) == EXAMPLE_CYCLE
    del waits["kswapd0"]
    assert find_cycle(waits, ROLES) == ["a", "lock(x)", "b", "lock(y)", "a"]


def test_without_kswapd_the_first_task_on_a_cycle_in_sorted_order_starts_it() -> None:
    waits = {
        "a": WaitFor("w", "to c", "c"),
        "d": WaitFor("w", "to c", "c"),
        "c": WaitFor("w", "to b", "b"),
        "b": WaitFor("w", "to d", "d"),
    }
    assert find_cycle(waits, {}) == ["b", "w(to d)", "d", "w(to c)", "c", "w(to b)", "b"]


def test_the_shortest_cycle_through_the_start_is_reported() -> None:
    roles = {"kswapd": ["kswapd0"], "swap device": ["nbd0.rx", "nbd1.rx"]}
    waits = {
        "kswapd0": WRITEBACK,
        "nbd0.rx": WaitFor("mempool", "skb", "nbd1.rx"),
        "nbd1.rx": RX_BUFFER,
    }
    assert find_cycle(waits, roles) == [
        "kswapd0",
        "writeback(swap0 req 812)",
        "nbd1.rx",
        "rx_buffer(sock nbd0)",
        "kswapd0",
    ]


def test_a_task_waiting_on_a_role_it_plays_is_a_cycle_of_one() -> None:
    waits = {"kswapd0": FREE_PAGES}
    assert find_cycle(waits, ROLES) == ["kswapd0", "free_pages(Normal)", "kswapd0"]


def test_a_chain_without_a_cycle_is_no_cycle_and_is_the_longest_chain() -> None:
    # everything waits on a dead server: nobody plays "nbd server"
    waits = {
        "hog0": FREE_PAGES,
        "kswapd0": WRITEBACK,
        "nbd0.rx": RX_DATA,
        "zz": WaitFor("swapin", "slot 3", "swap device"),
    }
    assert find_cycle(waits, ROLES) is None
    assert longest_chain(waits, ROLES) == [
        "hog0",
        "free_pages(Normal)",
        "kswapd0",
        "writeback(swap0 req 812)",
        "nbd0.rx",
        "rx_data(sock nbd0)",
        "nbd server",
    ]


def test_a_chain_ends_on_a_provider_that_does_not_wait() -> None:
    waits = {"hog0": FREE_PAGES}
    assert find_cycle(waits, ROLES) is None
    assert longest_chain(waits, ROLES) == ["hog0", "free_pages(Normal)", "kswapd0"]


def test_ties_prefer_a_kswapd_start() -> None:
    waits = {"a": RX_DATA, "kswapd1": RX_DATA}
    assert longest_chain(waits, {}) == ["kswapd1", "rx_data(sock nbd0)", "nbd server"]


def test_idle_waits_are_not_dependencies() -> None:
    # kswapd asleep: nbd0.rx waits on kswapd, and kswapd "waits" for the allocator (nbd0.rx)
    roles = {**ROLES, "allocator": ["nbd0.rx"]}
    waits = {"kswapd0": KSWAPD_IDLE, "nbd0.rx": RX_BUFFER}
    assert find_cycle(waits, roles) is None
    assert longest_chain(waits, roles) == ["nbd0.rx", "rx_buffer(sock nbd0)", "kswapd0"]
    assert longest_chain({"kswapd0": KSWAPD_IDLE}, roles) == []
    assert find_cycle({}, roles) is None
    assert longest_chain({}, roles) == []


def test_a_role_with_several_tasks_links_to_each_of_them() -> None:
    roles = {"kswapd": ["kswapd0"], "mempool_free": ["worker2", "worker1", "worker2"]}
    waits = {
        "kswapd0": WaitFor("mempool", "bio", "mempool_free"),
        "worker2": WaitFor("free_pages", "DMA32", "kswapd"),
    }
    # worker1 is runnable (a way out) but worker2 closes a cycle: it is reported
    assert find_cycle(waits, roles) == [
        "kswapd0",
        "mempool(bio)",
        "worker2",
        "free_pages(DMA32)",
        "kswapd0",
    ]
    del waits["worker2"]
    assert find_cycle(waits, roles) is None
    assert longest_chain(waits, roles) == ["kswapd0", "mempool(bio)", "worker1"]


def test_a_role_named_like_a_waiting_task_is_that_task() -> None:
    waits = {
        "kswapd0": WaitFor("sndbuf", "sock nbd0", "nbd0.rx"),
        "nbd0.rx": RX_BUFFER,
    }
    assert find_cycle(waits, {"kswapd": ["kswapd0"]}) == [
        "kswapd0",
        "sndbuf(sock nbd0)",
        "nbd0.rx",
        "rx_buffer(sock nbd0)",
        "kswapd0",
    ]
    # a role nobody plays and no task is called: a dead end
    assert find_cycle(waits, {}) is None
    assert longest_chain(waits, {}) == [
        "kswapd0",
        "sndbuf(sock nbd0)",
        "nbd0.rx",
        "rx_buffer(sock nbd0)",
        "kswapd",
    ]


def test_longest_chain_on_a_cyclic_graph_is_a_simple_path() -> None:
    waits = {"hog0": FREE_PAGES, "kswapd0": WRITEBACK, "nbd0.rx": RX_BUFFER}
    chain = longest_chain(waits, ROLES)
    tasks = chain[0::2]
    assert len(set(tasks)) == len(tasks)
    assert chain[:3] == ["hog0", "free_pages(Normal)", "kswapd0"]


def test_registry_provide_and_retire() -> None:
    registry = WaitRegistry()
    registry.provide("swap device", "nbd0.rx")
    registry.provide("swap device", "nbd1.rx")
    registry.provide("swap device", "nbd0.rx")
    assert registry.roles == {"swap device": ["nbd0.rx", "nbd1.rx"]}
    registry.retire("swap device", "nbd0.rx")
    registry.retire("swap device", "nbd9.rx")
    registry.retire("kswapd", "kswapd0")
    assert registry.roles == {"swap device": ["nbd1.rx"]}
    registry.retire("swap device", "nbd1.rx")
    assert registry.roles == {}


# -- Watchdog.check: one step, by hand --------------------------------------------------------


@attrs.define
class Counters:
    """Progress (what the watchdog reads) and activity (what it must ignore)."""

    pages_freed: int = 0
    writebacks_completed: int = 0
    swapins_completed: int = 0
    steps: int = 0
    retries: int = 0  # activity
    drops: int = 0  # activity

    def progress(self) -> tuple[int, ...]:
        return (self.pages_freed, self.writebacks_completed, self.swapins_completed, self.steps)


def test_bad_parameters_are_refused() -> None:
    for kwargs in ({"stall_seconds": 0.0}, {"stall_seconds": math.inf}, {"interval": -1.0}):
        with pytest.raises(ValueError):
            Watchdog(Counters().progress, WaitRegistry(), **kwargs)


async def test_check_step_by_step() -> None:
    counters, registry = Counters(), WaitRegistry()
    dog = Watchdog(counters.progress, registry, stall_seconds=STALL)
    assert dog.last_progress_at is None
    with registry.waiting(RX_DATA):
        assert dog.check(10.0) is None  # the baseline
        assert dog.last_progress_at == 10.0
        assert dog.check(11.9) is None
        verdict = dog.check(12.0)
        assert isinstance(verdict, Verdict)
        assert verdict.stalled_for == STALL and verdict.at == 12.0
        assert verdict.progress == (0, 0, 0, 0)
        [me] = verdict.waiting
        assert verdict.waiting == {me: "rx_data(sock nbd0)"}
        assert verdict.cycle is None
        assert verdict.chain == [me, "rx_data(sock nbd0)", "nbd server"]
        assert verdict.path == verdict.chain
        assert verdict.describe() == f"{me} -> rx_data(sock nbd0) -> nbd server"
        # activity is not progress
        counters.retries += 5
        counters.drops += 5
        assert dog.check(12.5) is not None
        # progress is
        counters.steps += 1
        assert dog.check(13.0) is None
        assert dog.last_progress_at == 13.0
        assert dog.check(14.9) is None
        assert dog.check(15.0) is not None
    # no task waits: a stall is not a deadlock
    assert dog.check(100.0) is None
    with registry.waiting(KSWAPD_IDLE):
        assert dog.check(101.0) is None  # idle is not a wait
    with registry.waiting(RX_DATA):
        assert dog.check(101.0) is not None  # but the stall accrued meanwhile counts


# -- Watchdog.run on real trio tasks --------------------------------------------------------


async def park_forever(registry: WaitRegistry, what: WaitFor) -> None:
    await registry.park(WaitQueue(), what)  # nobody unparks
    raise AssertionError("unparked")


async def retry_forever(counters: Counters) -> None:
    """Activity: a retry loop that never achieves anything."""
    while True:
        counters.retries += 1
        counters.drops += 1
        await trio.sleep(0.01)


async def test_a_hand_built_deadlock_is_reported_with_its_cycle(
    autojump_clock: trio.testing.MockClock,
) -> None:
    counters, registry = Counters(), WaitRegistry()
    registry.provide("kswapd", "kswapd0")
    registry.provide("swap device", "nbd0.rx")

    async def kswapd() -> None:
        for _ in range(10):  # some real work first, then stuck on writeback
            counters.pages_freed += 1
            await trio.sleep(0.1)
        await park_forever(registry, WRITEBACK)

    dog = Watchdog(counters.progress, registry, stall_seconds=STALL, interval=INTERVAL)
    with trio.fail_after(60):
        async with trio.open_nursery() as nursery:
            start = trio.current_time()
            nursery.start_soon(kswapd, name="kswapd0")
            nursery.start_soon(park_forever, registry, RX_BUFFER, name="nbd0.rx")
            nursery.start_soon(park_forever, registry, FREE_PAGES, name="hog0")
            nursery.start_soon(park_forever, registry, FREE_PAGES, name="hog1")
            nursery.start_soon(retry_forever, counters, name="retry")
            verdict = await dog.run()
            nursery.cancel_scope.cancel()
    now = trio.current_time()
    assert counters.pages_freed == 10 and counters.retries > 200  # busy, but stuck
    assert dog.last_progress_at is not None
    assert start + 0.9 - EPS <= dog.last_progress_at <= start + 1.0 + EPS
    assert STALL <= verdict.stalled_for <= STALL + INTERVAL + EPS
    assert verdict.at == now
    assert verdict.at == pytest.approx(dog.last_progress_at + verdict.stalled_for)
    assert verdict.progress == (10, 0, 0, 0)
    assert verdict.cycle == EXAMPLE_CYCLE
    assert verdict.path == EXAMPLE_CYCLE
    assert verdict.describe() == (
        "kswapd0 -> writeback(swap0 req 812) -> nbd0.rx -> rx_buffer(sock nbd0) -> kswapd0"
    )
    assert verdict.waiting == {
        "hog0": "free_pages(Normal)",
        "hog1": "free_pages(Normal)",
        "kswapd0": "writeback(swap0 req 812)",
        "nbd0.rx": "rx_buffer(sock nbd0)",
    }
    assert verdict.chain[:3] == ["hog0", "free_pages(Normal)", "kswapd0"]
    assert len(registry) == 0  # the cancelled tasks left their waits


async def test_a_stall_on_a_dead_server_reports_the_chain(
    autojump_clock: trio.testing.MockClock,
) -> None:
    counters, registry = Counters(), WaitRegistry()
    registry.provide("kswapd", "kswapd0")
    registry.provide("swap device", "nbd0.rx")
    dog = Watchdog(counters.progress, registry, stall_seconds=5.0, interval=0.5)
    async with trio.open_nursery() as nursery:
        start = trio.current_time()
        nursery.start_soon(park_forever, registry, WRITEBACK, name="kswapd0")
        nursery.start_soon(park_forever, registry, RX_DATA, name="nbd0.rx")
        nursery.start_soon(retry_forever, counters, name="reconnect")
        with trio.fail_after(60):
            verdict = await dog.run()
        nursery.cancel_scope.cancel()
    assert trio.current_time() - start == pytest.approx(5.0, abs=0.5 + EPS)
    assert verdict.cycle is None
    assert verdict.path == verdict.chain
    assert verdict.chain == [
        "kswapd0",
        "writeback(swap0 req 812)",
        "nbd0.rx",
        "rx_data(sock nbd0)",
        "nbd server",
    ]


async def test_a_slow_but_progressing_run_is_not_a_deadlock(
    autojump_clock: trio.testing.MockClock,
) -> None:
    counters, registry = Counters(), WaitRegistry()
    registry.provide("kswapd", "kswapd0")
    registry.provide("swap device", "nbd0.rx")
    slow = STALL * 0.8
    verdicts: list[Verdict] = []
    waiting_samples: list[int] = []

    async def kswapd() -> None:
        # waits most of the time, in what momentarily looks like a cycle, yet completes a
        # writeback every `slow` seconds
        while True:
            await registry.park(WaitQueue(), WRITEBACK, timeout=slow)
            counters.writebacks_completed += 1

    async def watch(task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        verdicts.append(await dog.run(task_status=task_status))

    async def sample() -> None:
        while True:
            await trio.sleep(0.1)
            waiting_samples.append(len(registry))

    dog = Watchdog(counters.progress, registry, stall_seconds=STALL, interval=INTERVAL)
    async with trio.open_nursery() as nursery:
        await nursery.start(watch)
        nursery.start_soon(kswapd, name="kswapd0")
        nursery.start_soon(park_forever, registry, RX_BUFFER, name="nbd0.rx")
        nursery.start_soon(park_forever, registry, FREE_PAGES, name="hog0")
        nursery.start_soon(retry_forever, counters, name="retry")
        nursery.start_soon(sample, name="sample")
        await trio.sleep(20)
        assert verdicts == []
        # the waits do form a cycle right now: only the lack of progress would make it a deadlock
        assert find_cycle(registry.snapshot(), registry.roles) == EXAMPLE_CYCLE
        nursery.cancel_scope.cancel()
    assert verdicts == []
    assert counters.writebacks_completed == int(20 / slow)
    assert min(waiting_samples) >= 2  # tasks waited throughout


async def test_a_stall_with_no_waiting_task_is_not_a_deadlock(
    autojump_clock: trio.testing.MockClock,
) -> None:
    counters, registry = Counters(), WaitRegistry()
    registry.provide("allocator", "hog0")
    registry.provide("kswapd", "kswapd0")
    verdicts: list[Verdict] = []
    dog = Watchdog(counters.progress, registry, stall_seconds=STALL, interval=INTERVAL)

    async def watch(task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        verdicts.append(await dog.run(task_status=task_status))

    async def kswapd_asleep() -> None:
        await park_forever(registry, KSWAPD_IDLE)

    async with trio.open_nursery() as nursery:
        await nursery.start(watch)
        start = trio.current_time()
        nursery.start_soon(kswapd_asleep, name="kswapd0")  # idle: nothing to do
        nursery.start_soon(retry_forever, counters, name="busy")  # runnable, not waiting
        await trio.sleep(10 * STALL)
        assert verdicts == []
        # once a task does wait, the stall already accrued counts at the next poll
        with registry.waiting(FREE_PAGES):
            await trio.sleep(INTERVAL + EPS)
        assert len(verdicts) == 1
        nursery.cancel_scope.cancel()
    [verdict] = verdicts
    assert verdict.stalled_for >= 10 * STALL
    assert dog.last_progress_at == start
    assert verdict.cycle is None
    assert list(verdict.waiting.values()) == ["free_pages(Normal)"]
    assert verdict.chain[-2:] == ["free_pages(Normal)", "kswapd0"]
