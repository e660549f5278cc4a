"""Counters with the kernel's names, progress for the watchdog, and PSI memory pressure."""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractContextManager

import attrs
import trio


@attrs.define
class VmStat:
    """``/proc/vmstat`` counters the model maintains (events and a few gauges).

    Gauges computed from state (``nr_free_pages``, ``nr_active_anon``, ...) are added by
    ``Memory.vmstat()``. Names not in the kernel are marked so below.
    """

    # gauges
    nr_anon_pages: int = 0
    nr_writeback: int = 0
    nr_slab_unreclaimable: int = 0  # pages held by slab caches (/proc/vmstat prints pages)
    nr_emergency: int = 0  # not in the kernel: pfmemalloc pages (served below min) in use
    # events
    pgalloc: int = 0  # the kernel splits it per zone: pgalloc_normal, ...
    pgfree: int = 0
    pgfault: int = 0
    pgmajfault: int = 0
    pgactivate: int = 0
    pgdeactivate: int = 0
    pgrotated: int = 0
    pgrefill: int = 0
    pgscan_kswapd: int = 0
    pgscan_direct: int = 0
    pgscan_direct_throttle: int = 0
    pgsteal_kswapd: int = 0
    pgsteal_direct: int = 0
    pageoutrun: int = 0
    pgpgin: int = 0  # KiB read from block devices (here: the page cache's local disk)
    pswpin: int = 0
    pswpout: int = 0
    swap_ra: int = 0  # 4.14+: pages read by swap readahead (also in pswpin)
    swap_ra_hit: int = 0  # 4.14+: faults that found a readahead page in the swap cache
    allocstall: int = 0  # 4.8+ splits it per zone: allocstall_normal, ...
    oom_kill: int = 0
    alloc_fail: int = 0  # not in the kernel: allocations that returned no page
    alloc_emergency: int = 0  # not in the kernel: pages served at ALLOC_NO_WATERMARKS
    swap_write_errors: int = 0  # not in the kernel: failed swap writes (pages)
    swap_read_errors: int = 0  # not in the kernel: failed swap reads
    swap_read_retries: int = 0  # not in the kernel: faults retried after a failed read

    def as_dict(self) -> dict[str, int]:
        return attrs.asdict(self)


@attrs.define
class Progress:
    """Forward progress the watchdog measures (never retries or drops: those are activity)."""

    pages_freed: int = 0
    writebacks_completed: int = 0
    swapins_completed: int = 0

    def total(self) -> int:
        return self.pages_freed + self.writebacks_completed + self.swapins_completed


# kernel/sched/psi.c and include/linux/sched/loadavg.h: fixed-point load averages.
FSHIFT = 11
FIXED_1 = 1 << FSHIFT
# 1/exp(2s/10s), 1/exp(2s/60s), 1/exp(2s/300s) in fixed point: round(2048 * exp(-2/T)).
EXP_10s = 1677
EXP_60s = 1981
EXP_300s = 2034
# kernel/sched/psi.c: PSI_FREQ = 2*HZ+1 (2 s plus one tick); the model uses exactly 2 s.
PSI_PERIOD_NS = 2_000_000_000
NSEC_PER_USEC = 1000


def calc_load(load: int, exp: int, active: int) -> int:
    """include/linux/sched/loadavg.h calc_load: one step of the exponential decay."""
    newload = load * exp + active * (FIXED_1 - exp)
    if active >= load:
        newload += FIXED_1 - 1
    return newload // FIXED_1


def load_to_percent(avg: int) -> float:
    """``LOAD_INT(avg).LOAD_FRAC(avg)`` as /proc/pressure prints it (two decimals)."""
    integer = avg >> FSHIFT
    frac = ((avg & (FIXED_1 - 1)) * 100) >> FSHIFT
    return integer + frac / 100


@attrs.frozen
class PsiLine:
    """One line of ``/proc/pressure/memory``: averages in percent, total in microseconds."""

    avg10: float
    avg60: float
    avg300: float
    total: int


@attrs.frozen
class PsiMemory:
    """``/proc/pressure/memory``."""

    some: PsiLine
    full: PsiLine


@attrs.define
class _PsiState:
    total_ns: int = 0  # group->total[PSI_AVGS][s]
    avg_total_ns: int = 0  # group->avg_total[s]
    avg: list[int] = attrs.field(factory=lambda: [0, 0, 0])


class Psi:
    """Memory pressure stall information, computed as kernel/sched/psi.c does.

    ``some``: at least one non-idle task is stalled on memory. ``full``: all non-idle tasks
    are stalled (5.x ``test_state``: ``tasks[NR_MEMSTALL] && !tasks[NR_RUNNING]``, with
    running meaning productively running). Totals are exact; averages take one sample per
    2 s period, ``pct = stall_ns * 100 / period`` (integer), decayed with EXP_10s/60s/300s.

    A task is non-idle inside ``nonidle()`` (a workload step) and stalled inside
    ``memstall()`` (direct reclaim, waiting for a page). The model keeps the aggregator
    running every period (the kernel stops it on idle CPUs; averages agree as long as some
    task is non-idle). ``clock`` returns seconds (``trio.current_time``); time starts at the
    first use, or at ``start()``.
    """

    def __init__(self, clock: Callable[[], float]) -> None:
        self._clock = clock
        self._nonidle: dict[object, int] = {}  # task -> nesting depth (nonidle or memstall)
        self._stalled: dict[object, int] = {}  # task -> memstall nesting depth
        self._started = False  # the clock is read from the first use on (inside trio.run)
        self._since = self._avg_last_update = self._avg_next_update = 0
        self._some = _PsiState()
        self._full = _PsiState()

    def _now(self) -> int:
        return round(self._clock() * 1e9)

    @property
    def nr_nonidle(self) -> int:
        return len(self._nonidle)

    @property
    def nr_memstall(self) -> int:
        return len(self._stalled)

    def _states(self) -> tuple[bool, bool]:
        stalled = len(self._stalled)
        some = stalled > 0
        return some, some and stalled == len(self._nonidle)

    def _accumulate(self, until: int) -> None:
        delta = until - self._since
        if delta > 0:
            some, full = self._states()
            if some:
                self._some.total_ns += delta
            if full:
                self._full.total_ns += delta
            self._since = until

    def _update_averages(self, now: int) -> None:
        """kernel/sched/psi.c update_averages + calc_avgs, for one elapsed period."""
        period = now - self._avg_last_update
        self._avg_last_update = now
        for state in (self._some, self._full):
            sample = state.total_ns - state.avg_total_ns
            sample = min(sample, period)  # "punt any overage into the future"
            state.avg_total_ns += sample
            pct = sample * 100 // period * FIXED_1
            state.avg[0] = calc_load(state.avg[0], EXP_10s, pct)
            state.avg[1] = calc_load(state.avg[1], EXP_60s, pct)
            state.avg[2] = calc_load(state.avg[2], EXP_300s, pct)

    def start(self) -> None:
        """Start the clock now (otherwise the first use starts it)."""
        self.update()

    def update(self) -> None:
        """Bring totals and averages up to the clock's now."""
        now = self._now()
        if not self._started:
            self._started = True
            self._since = self._avg_last_update = now
            self._avg_next_update = now + PSI_PERIOD_NS
        while now >= self._avg_next_update:
            boundary = self._avg_next_update
            self._accumulate(boundary)
            self._update_averages(boundary)
            self._avg_next_update = boundary + PSI_PERIOD_NS
        self._accumulate(now)

    def snapshot(self) -> PsiMemory:
        """``/proc/pressure/memory`` now."""
        self.update()
        lines = []
        for state in (self._some, self._full):
            avg10, avg60, avg300 = (load_to_percent(a) for a in state.avg)
            total = state.total_ns // NSEC_PER_USEC
            lines.append(PsiLine(avg10=avg10, avg60=avg60, avg300=avg300, total=total))
        return PsiMemory(some=lines[0], full=lines[1])

    @staticmethod
    def _inc(table: dict[object, int], key: object) -> None:
        table[key] = table.get(key, 0) + 1

    @staticmethod
    def _dec(table: dict[object, int], key: object) -> None:
        if table[key] == 1:
            del table[key]
        else:
            table[key] -= 1

    def nonidle(self, task: object | None = None) -> AbstractContextManager[None]:
        """The task (default: the current trio task) is running, not idle, in the block."""
        return _PsiScope(self, trio.lowlevel.current_task() if task is None else task, False)

    def memstall(self, task: object | None = None) -> AbstractContextManager[None]:
        """The task is stalled on memory in the block (``psi_memstall_enter/leave``)."""
        return _PsiScope(self, trio.lowlevel.current_task() if task is None else task, True)


class _PsiScope:
    """``Psi.nonidle``/``Psi.memstall``: a plain context manager, not a generator one (every
    workload step enters one: a ``@contextmanager`` costs about three times as much)."""

    __slots__ = ("_key", "_psi", "_stall")

    def __init__(self, psi: Psi, key: object, stall: bool) -> None:
        self._psi = psi
        self._key = key
        self._stall = stall

    def __enter__(self) -> None:
        psi, key = self._psi, self._key
        # While no task is stalled, neither ``some`` nor ``full`` holds, before or after a
        # task becomes non-idle: nothing to accumulate, and the next update() still sees
        # every period boundary. So only a stall (or one in progress) needs the clock.
        if self._stall or psi._stalled or not psi._started:
            psi.update()
        psi._inc(psi._nonidle, key)  # a stalled task is not idle
        if self._stall:
            psi._inc(psi._stalled, key)

    def __exit__(self, *exc_info: object) -> None:
        psi, key = self._psi, self._key
        if self._stall or psi._stalled:
            psi.update()
        if self._stall:
            psi._dec(psi._stalled, key)
        psi._dec(psi._nonidle, key)
