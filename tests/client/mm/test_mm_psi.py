"""PSI memory pressure arithmetic (kernel/sched/psi.c) against a fake clock."""

from __future__ import annotations

import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from client.mm import Psi
from client.mm.vmstat import FIXED_1, EXP_10s, EXP_60s, EXP_300s, calc_load, load_to_percent


class FakeClock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_exp_constants_are_the_kernels() -> None:
    for exp, window in ((EXP_10s, 10), (EXP_60s, 60), (EXP_300s, 300)):
        assert exp == round(FIXED_1 * math.exp(-2 / window))
    assert (EXP_10s, EXP_60s, EXP_300s) == (1677, 1981, 2034)


def test_one_sample_of_fifty_percent() -> None:
    # pct 50 -> 50 * 2048 = 102400; calc_load(0, 1677, 102400) = 18550 -> "9.05"
    assert calc_load(0, EXP_10s, 50 * FIXED_1) == 18550
    assert load_to_percent(18550) == 9.05


def stall_pattern(clock: FakeClock, psi: Psi, periods: int) -> None:
    """One task, busy throughout, stalled for the first second of every 2 s period."""
    for _ in range(periods):
        with psi.memstall(task="A"):
            clock.now += 1.0
        clock.now += 1.0


def test_half_stalled_task_some_and_full() -> None:
    clock = FakeClock()
    psi = Psi(clock)
    with psi.nonidle(task="A"):
        stall_pattern(clock, psi, periods=5)
        snap = psi.snapshot()
    # 5 s stalled out of 10; the only non-idle task, so full == some
    assert snap.some.total == 5_000_000 and snap.full.total == 5_000_000
    avg = 0
    for _ in range(5):
        avg = calc_load(avg, EXP_10s, 50 * FIXED_1)
    assert snap.some.avg10 == load_to_percent(avg) == snap.full.avg10
    # close to the continuous decay 50 * (1 - e^-1)
    assert snap.some.avg10 == pytest.approx(50 * (1 - math.exp(-1)), abs=0.2)
    assert 0 < snap.some.avg300 < snap.some.avg60 < snap.some.avg10


def test_full_needs_every_nonidle_task_stalled() -> None:
    clock = FakeClock()
    psi = Psi(clock)
    with psi.nonidle(task="B"):  # B keeps running throughout
        with psi.nonidle(task="A"), psi.memstall(task="A"):
            clock.now += 1.5
        with psi.memstall(task="A"), psi.memstall(task="B"):  # both stalled
            clock.now += 0.5
        clock.now += 2.0
        snap = psi.snapshot()
    assert snap.some.total == 2_000_000
    assert snap.full.total == 500_000
    # first period: some 100%, full 25%; second period: nothing stalled
    full = calc_load(calc_load(0, EXP_10s, 25 * FIXED_1), EXP_10s, 0)
    assert snap.full.avg10 == load_to_percent(full) == 3.7


def test_idle_time_is_not_pressure_and_averages_decay() -> None:
    clock = FakeClock()
    psi = Psi(clock)
    with psi.memstall(task="A"):
        clock.now += 2.0
    first = psi.snapshot().some.avg10
    assert first == load_to_percent(calc_load(0, EXP_10s, 100 * FIXED_1))
    clock.now += 60
    snap = psi.snapshot()
    assert snap.some.total == 2_000_000
    assert snap.some.avg10 < 0.1 < snap.some.avg60 < first


def test_nesting_counts_a_task_once() -> None:
    clock = FakeClock()
    psi = Psi(clock)
    with psi.nonidle(task="A"), psi.memstall(task="A"), psi.memstall(task="A"):
        assert (psi.nr_nonidle, psi.nr_memstall) == (1, 1)
    assert (psi.nr_nonidle, psi.nr_memstall) == (0, 0)


@settings(max_examples=200, deadline=None)
@given(
    st.lists(
        st.tuples(st.sampled_from("ABC"), st.booleans(), st.floats(0, 3), st.floats(0, 3)),
        max_size=40,
    )
)
def test_nonidle_scopes_that_skip_the_clock_change_nothing(
    steps: list[tuple[str, bool, float, float]],
) -> None:
    """A non-idle scope reads the clock only while some task is stalled. The reference
    brings PSI up to date before every change; both must agree to the nanosecond."""
    clocks = FakeClock(), FakeClock()
    fast, reference = Psi(clocks[0]), Psi(clocks[1])
    for psi in (fast, reference):
        psi.start()
    # Nested scopes: each step enters one (a stall or not) for its task, advances the
    # clock, and leaves the scopes entered so far in reverse order at the end.
    for psi, clock, always in ((fast, clocks[0], False), (reference, clocks[1], True)):
        scopes = []
        for task, stall, inside, after in steps:
            scope = psi.memstall(task) if stall else psi.nonidle(task)
            if always:
                psi.update()
            scope.__enter__()
            scopes.append(scope)
            clock.now += inside
            if len(scopes) > 2:  # leave the oldest-but-one, out of order with the others
                if always:
                    psi.update()
                scopes.pop(-2).__exit__(None, None, None)
            clock.now += after
        while scopes:
            if always:
                psi.update()
            scopes.pop().__exit__(None, None, None)
        clock.now += 5
    assert fast.snapshot() == reference.snapshot()
