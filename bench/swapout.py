#!/usr/bin/env python3
"""The client machine's swap-out throughput against the limit for its server, and the cost
of the modelled allocator (DESIGN.md §8).

A benchmark, not a test: it reports numbers and ratios measured in one run and always exits
0 when the measurements themselves succeed, whatever the ratios are.  Four parts:

1. **Swap-out throughput.**  One ``netswap server --export swap:512M`` subprocess on
   127.0.0.1; the client machine of ``configs/small.toml`` (64 MiB of modelled RAM, four
   anonymous-memory hogs touching 4x RAM: a write pass, then a read-and-verify pass) runs in
   this process (``trio.run``), its swap device connected to that server over TCP.  It runs
   twice: without clustering (``machine.max_io_pages=1``: one NBD WRITE per page) and with
   the scenario's clustering (32 pages per request at most).  The throughput is
   ``vmstat.pswpout / duration`` from the machine's summary: every page written to swap over
   the whole run, including the read-back pass (swap-in with readahead, while the pages the
   write pass left resident are swapped out in turn).  Separately, the *write phase* is the time until
   every hog has finished its write pass (sampled every 5 ms) and the pages swapped out
   by then: pure swap-out, the part comparable to nbdcopy.
2. **The limit for that server.**  Against the same server process, ``nbdcopy`` writes a
   file of random data as 4 KiB requests at the swap device's queue depth (``swap.depth``):
   ``nbdcopy --request-size=4096 --requests=DEPTH --connections=1 --threads=1 --sparse=0
   --no-extents SRC nbd://127.0.0.1:PORT/swap``; pages/s = bytes / 4096 / seconds.  It runs
   before, between and after the machine runs; the limit is the median (of the runs
   during which others used < 5 % of a CPU, if any).
3. **Ratios**: swap-out pages/s over the limit, without clustering (target >= 0.7) and with
   it (target > 1.0); PASS or "below target" (the verdict is for the whole-run rate).
   Then **the model alone**: the same memory and hogs in this process over
   ``MemorySwapDevice(latency=0)``, a swap device that costs nothing; its CPU per page in
   the write phase bounds what any network path could reach on this CPU.
4. **Allocator.**  The fast path: ``page = memory.allocator.try_alloc();
   memory.free_page(page)`` pairs per second on a 256 MiB machine with plenty of free
   memory and the default ``NullPolicy``.  And the cost per page as modelled RAM grows from
   16 MiB to 4 GiB: time and Python memory (tracemalloc) to construct the ``Memory``, then
   to take every free page above the low watermark once with ``try_alloc`` (also with
   Python's cyclic GC disabled) and free them.

The CPU time other processes used during each timed run is measured as in
``bench/server_vs_nbdkit.py`` (``/proc/stat`` minus this process, its children and the
server) and printed with the results; a timed run (a machine run, an nbdcopy run, the
fast-path batches, a per-size pass) during which others used 5 % of a CPU or more is
repeated once (``--attempts``) and the quieter attempt is kept; ``--wait-quiet S`` also
waits (at most S seconds in all) before each timed run until the others are quiet.

Usage::

    .venv/bin/python bench/swapout.py [--quick] [--attempts N] [--wait-quiet S]
        [--limit-size MiB] [--json FILE] [--write-docs [--docs docs/benchmarks.md]] [-q]

Needs nbdcopy (Debian: libnbd-bin).  ``--quick`` (about 30 s) uses a 16 MiB machine with
the same hogs at 4x RAM, one 64 MiB nbdcopy run per gap and smaller allocator runs; its
numbers are for a quick look, not for the docs.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import tracemalloc
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import trio

sys.path.insert(0, str(Path(__file__).resolve().parent))
import server_vs_nbdkit as svn  # machine info and CPU accounting, shared

from client.config import HogConfig
from client.machine import ClientMachine, memory_config
from client.mm import Memory, MemoryConfig, SwapReadpage, SwapWritepage
from client.mm.testing import MemorySwapDevice
from client.workload import AnonHog, Integrity
from testbed.config import ScenarioConfig, load_scenario

REPO = Path(__file__).resolve().parent.parent
DOCS = REPO / "docs" / "benchmarks.md"
SCENARIO = REPO / "configs" / "small.toml"
SECTION = "## Client machine"
HOST = svn.HOST
KiB = 1 << 10
MiB = 1 << 20
GiB = 1 << 30
PAGE = 4096
EXPORT_SIZE = 512 * MiB
#: A run during which other processes used this much of one CPU or more is noisy.
NOISE_LIMIT = 0.05
#: How often the write-phase watcher looks at the hogs' progress (seconds).
WATCH_INTERVAL = 0.005
#: The issue's targets: swap-out pages/s over the nbdcopy limit.
TARGET_UNCLUSTERED = 0.7  # >=
TARGET_CLUSTERED = 1.0  # >
#: Runs of the model alone per clustering setting (the median counts).
FLOOR_ROUNDS = 3
SIZES_FULL = (16 * MiB, 64 * MiB, 256 * MiB, 1 * GiB, 4 * GiB)
SIZES_QUICK = (16 * MiB, 64 * MiB, 256 * MiB, 1 * GiB)


class BenchError(svn.BenchError):
    """A measurement could not be taken."""


# -- CPU accounting (the same as bench/server_vs_nbdkit.py) --------------------------------
@dataclass
class Cpu:
    """CPU seconds used during one timed run, split by who used them."""

    wall: float = 0.0
    own: float = 0.0  # this process (the client machine) and its waited-for children (nbdcopy)
    server: float = 0.0
    other: float = 0.0  # everybody else: the noise

    def share(self, seconds: float) -> float:
        return seconds / self.wall if self.wall else 0.0


class CpuMeter:
    """``with CpuMeter(server_pid) as cpu:`` fills ``cpu`` when the block ends."""

    def __init__(self, server_pid: int | None = None) -> None:
        self.pid = server_pid
        self.cpu = Cpu()

    def _sample(self) -> tuple[float, float, float]:
        srv = svn._process_seconds(self.pid) if self.pid is not None else 0.0
        return svn._busy_seconds(), svn._own_seconds(), srv

    def __enter__(self) -> Cpu:
        self._t0 = time.perf_counter()
        self._c0 = self._sample()
        return self.cpu

    def __exit__(self, *exc: object) -> None:
        c1 = self._sample()
        self.cpu.wall = time.perf_counter() - self._t0
        busy, own, srv = (b - a for a, b in zip(self._c0, c1, strict=True))
        self.cpu.own, self.cpu.server = own, srv
        self.cpu.other = max(0.0, busy - own - srv)


class Quiet:
    """Before a timed run, wait (out of a budget for the whole script) until the other
    processes use less than ``NOISE_LIMIT`` of a CPU over one second."""

    def __init__(self, budget: float = 0.0) -> None:
        self.left = budget
        self.waited = 0.0

    def wait(self, server_pid: int | None = None) -> None:
        while self.left > 0:
            with CpuMeter(server_pid) as cpu:
                time.sleep(min(1.0, self.left))
            self.left -= cpu.wall
            self.waited += cpu.wall
            if cpu.share(cpu.other) < NOISE_LIMIT:
                return


QUIET = Quiet()  # main() sets the budget from --wait-quiet


def noise_line(cpus: list[Cpu], what: str = "the timed runs") -> str:
    total = sum(c.wall for c in cpus)
    average = sum(c.other for c in cpus) / total if total else 0.0
    worst = max((c.share(c.other) for c in cpus), default=0.0)
    return (
        f"Other processes used {average:.0%} of one CPU on average during {what} "
        f"({worst:.0%} in the worst run)."
    )


# -- the server -----------------------------------------------------------------------------
class NetswapServer:
    """``netswap server --listen 127.0.0.1:0 --export NAME:SIZE``; the port comes from the
    first line of its JSON log (``server.listening``)."""

    def __init__(self, export: str, size: int, workdir: Path) -> None:
        self.export = export
        self.size = size
        self.log = workdir / "netswap-server.log"
        self.proc: subprocess.Popen[bytes] | None = None
        self.port = 0

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    @property
    def uri(self) -> str:
        return f"nbd://{HOST}:{self.port}/{self.export}"

    def start(self) -> None:
        self.log.unlink(missing_ok=True)
        cmd = [
            sys.executable, "-m", "testbed.cli", "server",
            "--listen", f"{HOST}:0",
            "--export", f"{self.export}:{self.size}",
            "--log-file", str(self.log),
        ]  # fmt: skip
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH")) if p)
        self.proc = subprocess.Popen(
            cmd, cwd=REPO, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL
        )
        deadline = time.monotonic() + svn.STARTUP_TIMEOUT
        while time.monotonic() < deadline:
            try:
                first, newline, _ = self.log.read_text().partition("\n")
            except FileNotFoundError:
                first, newline = "", ""
            if newline:
                event = json.loads(first)
                if event.get("event") != "server.listening":
                    raise BenchError(f"netswap: first log event is {event.get('event')!r}")
                self.port = int(event["port"])
                return
            if self.proc.poll() is not None:
                raise BenchError(f"netswap server exited {self.proc.returncode} at start")
            time.sleep(0.02)
        raise BenchError(f"netswap server: not listening within {svn.STARTUP_TIMEOUT} s")

    def stop(self) -> None:
        proc, self.proc = self.proc, None
        if proc is None:
            return
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
                raise BenchError("netswap server did not stop on SIGTERM") from None
        if proc.returncode != 0:
            raise BenchError(f"netswap server exited {proc.returncode} after SIGTERM")


# -- parts 1-3: swap-out against the limit --------------------------------------------------
@dataclass
class SwapRun:
    label: str
    max_io_pages: int
    outcome: str
    duration: float  # the summary's duration (trio clock, seconds)
    pswpout: int
    pswpin: int
    corrupt: int
    write_requests: int  # swap write requests submitted (SwapWritepage facts)
    read_requests: int  # swap read requests (SwapReadpage facts: a fault and its readahead)
    write_seconds: float | None  # until every hog finished its first write pass
    write_pswpout: int | None  # pswpout by then
    cpu: Cpu
    attempt: int
    attempts: int

    @property
    def rate(self) -> float:
        return self.pswpout / self.duration

    @property
    def write_rate(self) -> float | None:
        if not self.write_seconds or self.write_pswpout is None:
            return None
        return self.write_pswpout / self.write_seconds

    @property
    def pages_per_request(self) -> float:
        return self.pswpout / self.write_requests if self.write_requests else 0.0


@dataclass
class LimitRun:
    bytes: int
    seconds: float
    cpu: Cpu

    @property
    def rate(self) -> float:
        return self.bytes / PAGE / self.seconds


def run_machine(
    scenario: ScenarioConfig, server: NetswapServer
) -> tuple[dict[str, Any], dict[str, Any], dict[str, int]]:
    """One client machine run against ``server``; (summary, write-phase mark, counters)."""
    port = server.port
    counters = {"write_requests": 0, "read_requests": 0}

    def observer(fact: object) -> None:
        if type(fact) is SwapWritepage:
            counters["write_requests"] += 1
        elif type(fact) is SwapReadpage:
            counters["read_requests"] += 1

    async def main() -> tuple[dict[str, Any], dict[str, Any]]:
        async def connect() -> trio.abc.Stream:
            return await trio.open_tcp_stream(HOST, port)

        machine = ClientMachine(scenario, connect, observer=observer)
        first_pass = sum(
            h.result.processes * h.result.pages_per_process
            for h in machine.hogs
            if isinstance(h, AnonHog)
        )
        mark: dict[str, Any] = {}

        async def watch(t0: float) -> None:
            while machine.integrity.pages_written < first_pass:
                await trio.sleep(WATCH_INTERVAL)
            mark["seconds"] = trio.current_time() - t0
            mark["pswpout"] = machine.memory.stat.pswpout

        async with trio.open_nursery() as nursery:
            nursery.start_soon(watch, trio.current_time())
            summary = await machine.run()
            nursery.cancel_scope.cancel()
        return summary, mark

    summary, mark = trio.run(main)
    return summary, mark, counters


def swap_run(
    label: str,
    scenario: ScenarioConfig,
    server: NetswapServer,
    attempts: int,
    progress: bool,
) -> SwapRun:
    """Run the machine; repeat (up to ``attempts`` in all) while others used the CPU."""
    best: SwapRun | None = None
    for attempt in range(1, attempts + 1):
        gc.collect()
        QUIET.wait(server.pid)
        with CpuMeter(server.pid) as cpu:
            summary, mark, counters = run_machine(scenario, server)
        vm = summary["vmstat"]
        run = SwapRun(
            label=label,
            max_io_pages=scenario.machine.max_io_pages,
            outcome=summary["outcome"],
            duration=float(summary["duration"]),
            pswpout=int(vm["pswpout"]),
            pswpin=int(vm["pswpin"]),
            corrupt=int(summary["integrity"]["corrupt"]),
            write_requests=counters["write_requests"],
            read_requests=counters["read_requests"],
            write_seconds=mark.get("seconds"),
            write_pswpout=mark.get("pswpout"),
            cpu=cpu,
            attempt=attempt,
            attempts=attempt,
        )
        if progress:
            wr = run.write_rate
            print(
                f"  machine {label:<22} attempt {attempt}: {run.outcome}, {run.pswpout} pages "
                f"out in {run.duration:.2f} s = {run.rate:,.0f} pages/s"
                + (f" (write phase {wr:,.0f} pages/s)" if wr else "")
                + f"; client CPU {cpu.share(cpu.own):.0%}, server {cpu.share(cpu.server):.0%},"
                f" other {cpu.share(cpu.other):.0%}",
                file=sys.stderr,
                flush=True,
            )
        if run.outcome != "completed" or run.corrupt:
            raise BenchError(f"machine run {label}: {run.outcome} {summary.get('reason', '')}")
        if best is None or run.cpu.share(run.cpu.other) < best.cpu.share(best.cpu.other):
            best = run
        best.attempts = attempt
        if run.cpu.share(run.cpu.other) < NOISE_LIMIT:
            break
    assert best is not None
    return best


def limit_once(server: NetswapServer, source: Path, depth: int, progress: bool) -> LimitRun:
    cmd = [
        "nbdcopy", f"--request-size={PAGE}", f"--requests={depth}",
        "--connections=1", "--threads=1", "--sparse=0", "--no-extents",
        str(source), server.uri,
    ]  # fmt: skip
    QUIET.wait(server.pid)
    with CpuMeter(server.pid) as cpu:
        t0 = time.perf_counter()
        result = subprocess.run(cmd, capture_output=True, timeout=svn.COPY_TIMEOUT, check=False)
        seconds = time.perf_counter() - t0
    if result.returncode != 0:
        raise BenchError(
            f"{' '.join(cmd)} exited {result.returncode}: "
            f"{result.stderr.decode(errors='replace').strip()}"
        )
    run = LimitRun(source.stat().st_size, seconds, cpu)
    if progress:
        print(
            f"  nbdcopy 4 KiB qd{depth}: {run.bytes / MiB:.0f} MiB in {seconds:.3f} s = "
            f"{run.rate:,.0f} pages/s; nbdcopy CPU {cpu.share(cpu.own):.0%}, "
            f"server {cpu.share(cpu.server):.0%}, other {cpu.share(cpu.other):.0%}",
            file=sys.stderr,
            flush=True,
        )
    return run


def limit_run(
    server: NetswapServer, source: Path, depth: int, attempts: int, progress: bool
) -> LimitRun:
    """``limit_once``, repeated while others used the CPU; the quietest attempt."""
    best: LimitRun | None = None
    for _ in range(attempts):
        run = limit_once(server, source, depth, progress)
        if best is None or run.cpu.share(run.cpu.other) < best.cpu.share(best.cpu.other):
            best = run
        if run.cpu.share(run.cpu.other) < NOISE_LIMIT:
            break
    assert best is not None
    return best


@dataclass
class SwapResults:
    scenario: str
    export: str
    memory: int
    hog_bytes: int
    processes: int
    depth: int
    unclustered: SwapRun
    clustered: SwapRun
    limits: list[LimitRun]
    floor: list[FloorRun]  # the model alone: unclustered, clustered

    @property
    def limit(self) -> float:
        """Median pages/s of the nbdcopy runs, preferring those with little noise."""
        quiet = [r for r in self.limits if r.cpu.share(r.cpu.other) < NOISE_LIMIT]
        return statistics.median(r.rate for r in (quiet or self.limits))

    def ratios(self) -> list[tuple[str, float, float | None, str, bool]]:
        """(label, whole-run ratio, write-phase ratio, target text, passed)."""
        out: list[tuple[str, float, float | None, str, bool]] = []
        for run, text in (
            (self.unclustered, f"≥ {TARGET_UNCLUSTERED}"),
            (self.clustered, f"> {TARGET_CLUSTERED}"),
        ):
            ratio = run.rate / self.limit
            ok = (
                ratio >= TARGET_UNCLUSTERED if run is self.unclustered else ratio > TARGET_CLUSTERED
            )
            wr = run.write_rate
            out.append((run.label, ratio, wr / self.limit if wr else None, text, ok))
        return out


def bench_swapout(
    quick: bool, attempts: int, limit_size: int, workdir: Path, progress: bool
) -> SwapResults:
    overrides: dict[str, Any] = {}
    if quick:
        overrides["machine.memory"] = "16M"
    base = load_scenario(SCENARIO, overrides)
    unclustered = load_scenario(SCENARIO, {**overrides, "machine.max_io_pages": 1})
    depth = base.swap.depth
    source = workdir / "random.img"
    svn.make_source(source, limit_size)
    server = NetswapServer(base.swap.export, EXPORT_SIZE, workdir)
    server.start()
    try:
        limits = [limit_run(server, source, depth, attempts, progress)]
        one = swap_run(
            f"max_io_pages={unclustered.machine.max_io_pages}", unclustered, server,
            attempts, progress,
        )  # fmt: skip
        limits.append(limit_run(server, source, depth, attempts, progress))
        many = swap_run(
            f"max_io_pages={base.machine.max_io_pages}", base, server, attempts, progress
        )
        limits.append(limit_run(server, source, depth, attempts, progress))
    finally:
        server.stop()
        source.unlink(missing_ok=True)
    floor = bench_floor([unclustered, base], FLOOR_ROUNDS, progress)
    hogs = [w for w in base.workloads if isinstance(w, HogConfig)]
    hog_bytes = sum(w.total_bytes(base.machine.memory) for w in hogs)
    processes = sum(w.processes for w in hogs)
    return SwapResults(
        str(SCENARIO.relative_to(REPO)), base.swap.export, base.machine.memory, hog_bytes,
        processes, depth, one, many, limits, floor,
    )  # fmt: skip


# -- part 3b: the model alone ---------------------------------------------------------------
@dataclass
class FloorRun:
    """The write phase of the scenario's memory and hogs over a swap device that costs
    nothing: the model's own CPU per page swapped out."""

    max_io_pages: int
    pswpout: int  # by the end of the write phase
    write_requests: int
    cpu_s: float
    wall_s: float

    @property
    def us_per_page(self) -> float:
        return self.cpu_s / self.pswpout * 1e6

    @property
    def rate(self) -> float:
        """Pages swapped out per second of this process's CPU: the ceiling of the machine's
        write-phase rate on this CPU if the network, NBD and the server cost nothing."""
        return self.pswpout / self.cpu_s


def floor_once(scenario: ScenarioConfig) -> FloorRun:
    memory = Memory.from_config(memory_config(scenario.machine))
    device = MemorySwapDevice(nr_pages=EXPORT_SIZE // PAGE, latency=0)  # answers at once
    memory.swapon(device)
    integrity = Integrity()
    hogs = [AnonHog(w, memory, integrity) for w in scenario.workloads if isinstance(w, HogConfig)]
    first_pass = sum(h.result.processes * h.result.pages_per_process for h in hogs)
    out: dict[str, float] = {}

    async def main() -> None:
        async with memory.running(), trio.open_nursery() as nursery:
            t0, c0 = time.perf_counter(), time.process_time()
            for hog in hogs:
                nursery.start_soon(hog.run)
            while integrity.pages_written < first_pass:
                await trio.sleep(WATCH_INTERVAL)
            out["cpu"], out["wall"] = time.process_time() - c0, time.perf_counter() - t0
            out["pswpout"] = memory.stat.pswpout
            out["writes"] = len(device.writes())
            nursery.cancel_scope.cancel()

    gc.collect()
    trio.run(main)
    return FloorRun(
        scenario.machine.max_io_pages, int(out["pswpout"]), int(out["writes"]),
        out["cpu"], out["wall"],
    )  # fmt: skip


def bench_floor(scenarios: list[ScenarioConfig], rounds: int, progress: bool) -> list[FloorRun]:
    """Each scenario ``rounds`` times; the run with the median CPU per page counts."""
    best = []
    for scenario in scenarios:
        runs = sorted((floor_once(scenario) for _ in range(rounds)), key=lambda r: r.us_per_page)
        run = runs[len(runs) // 2]
        if progress:
            print(
                f"  model alone, max_io_pages={run.max_io_pages}: {run.us_per_page:.1f} µs "
                f"of CPU per page ({', '.join(f'{r.us_per_page:.1f}' for r in runs)})",
                file=sys.stderr,
                flush=True,
            )
        best.append(run)
    return best


# -- part 4: the allocator ------------------------------------------------------------------
def noisy(cpus: list[Cpu]) -> float:
    """Other processes' share of one CPU over ``cpus`` (wall-time weighted)."""
    wall = sum(c.wall for c in cpus)
    return sum(c.other for c in cpus) / wall if wall else 0.0


@dataclass
class FastPath:
    memory: int
    pairs: int
    ns_per_pair: list[float]
    loop_ns: float  # an empty loop of the same shape, per iteration
    cpu: list[Cpu]
    attempts: int = 1

    @property
    def median_ns(self) -> float:
        return statistics.median(self.ns_per_pair)

    @property
    def pairs_per_s(self) -> float:
        return 1e9 / self.median_ns


def fast_path_once(pairs: int, batches: int) -> FastPath:
    size = 256 * MiB
    memory = Memory.from_config(MemoryConfig(total_bytes=size))
    try_alloc = memory.allocator.try_alloc
    free_page = memory.free_page
    for _ in range(10_000):  # warm up: the first page object is created lazily
        page = try_alloc()
        assert page is not None
        free_page(page)
    per_batch = pairs // batches
    times: list[float] = []
    cpus: list[Cpu] = []
    stat = memory.stat
    before = (stat.pgalloc, stat.pgfree)
    gc.collect()
    for _ in range(batches):
        with CpuMeter() as cpu:
            t0 = time.perf_counter_ns()
            for _ in range(per_batch):
                page = try_alloc()
                free_page(page)  # type: ignore[arg-type]
            times.append((time.perf_counter_ns() - t0) / per_batch)
        cpus.append(cpu)
    done = (stat.pgalloc - before[0], stat.pgfree - before[1])
    if done != (per_batch * batches,) * 2:
        raise BenchError(f"fast path: {done} allocs/frees, expected {per_batch * batches}")
    t0 = time.perf_counter_ns()
    for _ in range(per_batch):
        pass
    loop = (time.perf_counter_ns() - t0) / per_batch
    return FastPath(size, per_batch * batches, times, loop, cpus)


def bench_fast_path(pairs: int, batches: int, attempts: int, progress: bool) -> FastPath:
    """``fast_path_once``, repeated while others used the CPU; the quietest attempt."""
    best: FastPath | None = None
    for attempt in range(1, attempts + 1):
        QUIET.wait()
        fp = fast_path_once(pairs, batches)
        if progress:
            print(
                f"  allocator fast path, attempt {attempt}: {fp.median_ns:.0f} ns per pair; "
                f"other CPU {noisy(fp.cpu):.0%}",
                file=sys.stderr,
                flush=True,
            )
        if best is None or noisy(fp.cpu) < noisy(best.cpu):
            best = fp
        best.attempts = attempt
        if noisy(fp.cpu) < NOISE_LIMIT:
            break
    assert best is not None
    return best


@dataclass
class SizeRow:
    memory: int
    pages: int  # frames of modelled RAM
    taken: int  # pages try_alloc handed out (all free pages above the low watermark)
    construct_ms: float
    construct_peak: int  # tracemalloc peak while constructing, bytes
    alloc_us: float  # per page
    free_us: float  # per page
    alloc_nogc_us: float  # per page, the same with Python's cyclic GC disabled
    alloc_bytes: int  # Python memory after taking every page, minus before, bytes
    alloc_peak: int
    cpu: Cpu
    attempts: int = 1

    @property
    def bytes_per_page(self) -> float:
        return self.alloc_bytes / self.taken

    @property
    def construct_per_page(self) -> float:
        return self.construct_peak / self.pages


def _take_all(memory: Memory) -> list[Any]:
    """Every page ``try_alloc`` hands out, until it says no."""
    expected = sum(max(0, z.nr_free - z.watermarks.low - z.lowmem_reserve) for z in memory.zones)
    try_alloc = memory.allocator.try_alloc
    pages = [try_alloc() for _ in range(expected)]
    if None in pages or try_alloc() is not None:
        raise BenchError(f"try_alloc did not hand out exactly {expected} pages")
    return pages


def _timed_pass(size: int) -> tuple[float, float, float, int, int, Cpu]:
    """(construct s, alloc s, free s, pages taken, frames, cpu), tracemalloc off."""
    gc.collect()
    with CpuMeter() as cpu:
        t0 = time.perf_counter()
        memory = Memory.from_config(MemoryConfig(total_bytes=size))
        construct = time.perf_counter() - t0
        t0 = time.perf_counter()
        pages = _take_all(memory)
        alloc = time.perf_counter() - t0
        free_page = memory.free_page
        t0 = time.perf_counter()
        for page in pages:
            free_page(page)
        free = time.perf_counter() - t0
    taken, nr_pages = len(pages), memory.config.nr_pages
    del memory, pages, free_page
    gc.collect()
    return construct, alloc, free, taken, nr_pages, cpu


def _nogc_pass(size: int) -> float:
    """Seconds per page to take every page of a fresh ``Memory`` with ``gc`` disabled."""
    gc.collect()
    gc.disable()
    try:
        memory = Memory.from_config(MemoryConfig(total_bytes=size))
        t0 = time.perf_counter()
        pages = _take_all(memory)
        seconds = (time.perf_counter() - t0) / len(pages)
    finally:
        gc.enable()
    del memory, pages
    gc.collect()
    return seconds


def _memory_pass(size: int, taken: int) -> tuple[int, int, int]:
    """(construct peak, bytes held after taking ``taken`` pages, peak), under tracemalloc."""
    tracemalloc.start()
    try:
        base = tracemalloc.get_traced_memory()[0]
        memory = Memory.from_config(MemoryConfig(total_bytes=size))
        current, peak = tracemalloc.get_traced_memory()
        construct_peak = peak - base
        before = current
        tracemalloc.reset_peak()
        # The list holding the pages is the benchmark's, not the model's: allocate it first.
        holder: list[Any] = [None] * taken
        before += 8 * taken
        try_alloc = memory.allocator.try_alloc
        for i in range(taken):
            holder[i] = try_alloc()
        current, peak = tracemalloc.get_traced_memory()
        for page in holder:
            memory.free_page(page)
    finally:
        tracemalloc.stop()
    del memory, holder
    gc.collect()
    return construct_peak, current - before, peak - before


def bench_size(size: int, attempts: int) -> SizeRow:
    best: tuple[float, float, float, int, int, Cpu] | None = None
    tried = 0
    while tried < attempts:
        tried += 1
        QUIET.wait()
        timed = _timed_pass(size)
        cpu = timed[-1]
        if best is None or cpu.share(cpu.other) < best[-1].share(best[-1].other):
            best = timed
        if cpu.share(cpu.other) < NOISE_LIMIT:
            break
    assert best is not None
    construct, alloc, free, taken, nr_pages, cpu = best
    nogc = _nogc_pass(size)
    construct_peak, alloc_bytes, alloc_peak = _memory_pass(size, taken)
    return SizeRow(
        size, nr_pages, taken, construct * 1e3, construct_peak,
        alloc / taken * 1e6, free / taken * 1e6, nogc * 1e6, alloc_bytes, alloc_peak, cpu, tried,
    )  # fmt: skip


# -- reporting ------------------------------------------------------------------------------
def size_text(nbytes: int) -> str:
    if nbytes >= GiB and nbytes % GiB == 0:
        return f"{nbytes // GiB} GiB"
    return f"{nbytes / MiB:g} MiB"


def pct(x: float) -> str:
    return f"{x:.0%}"


def swap_table(res: SwapResults) -> str:
    lines = [
        "| run | pswpout | duration s | pages/s (run) | write phase s | pswpout in it "
        "| pages/s (write phase) | write requests | pages/request | pswpin "
        "| client CPU | server CPU | other CPU |",
        "|---|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|",
    ]
    for run in (res.unclustered, res.clustered):
        wr = run.write_rate
        c = run.cpu
        lines.append(
            f"| machine, {run.label} | {run.pswpout:,} | {run.duration:.2f} | {run.rate:,.0f} "
            f"| {run.write_seconds or 0:.2f} | {run.write_pswpout or 0:,} "
            f"| {'–' if wr is None else f'{wr:,.0f}'} | {run.write_requests:,} "
            f"| {run.pages_per_request:.1f} | {run.pswpin:,} "
            f"| {pct(c.share(c.own))} | {pct(c.share(c.server))} | {pct(c.share(c.other))} |"
        )
    for i, lim in enumerate(res.limits, 1):
        c = lim.cpu
        pages = lim.bytes // PAGE
        lines.append(
            f"| limit: nbdcopy 4 KiB qd{res.depth}, run {i} | {pages:,} | {lim.seconds:.2f} "
            f"| {lim.rate:,.0f} | | | | {pages:,} | 1.0 | "
            f"| {pct(c.share(c.own))} (nbdcopy) | {pct(c.share(c.server))} "
            f"| {pct(c.share(c.other))} |"
        )
    lines.append(f"| **limit (median)** | | | **{res.limit:,.0f}** | | | | | | | | | |")
    return "\n".join(lines)


def ratio_table(res: SwapResults) -> str:
    lines = [
        "| swap-out / limit | whole run | write phase | target | |",
        "|---|--:|--:|--:|---|",
    ]
    for label, ratio, wratio, target, ok in res.ratios():
        lines.append(
            f"| {label} | {ratio:.3f} | {'–' if wratio is None else f'{wratio:.3f}'} "
            f"| {target} | {'PASS' if ok else 'below target'} |"
        )
    return "\n".join(lines)


def floor_table(res: SwapResults) -> str:
    lines = [
        "| model alone | pswpout in the write phase | write requests | CPU s | µs CPU per page "
        "| pages per CPU second | / limit | machine over TCP, µs CPU per page | target |",
        "|---|--:|--:|--:|--:|--:|--:|--:|--:|",
    ]
    for f, run, target in (
        (res.floor[0], res.unclustered, f"≥ {TARGET_UNCLUSTERED}"),
        (res.floor[1], res.clustered, f"> {TARGET_CLUSTERED}"),
    ):
        tcp = _write_us_per_page(run)
        lines.append(
            f"| max_io_pages={f.max_io_pages} | {f.pswpout:,} | {f.write_requests:,} "
            f"| {f.cpu_s:.2f} | {f.us_per_page:.1f} | {f.rate:,.0f} | {f.rate / res.limit:.2f} "
            f"| {'–' if tcp is None else f'{tcp:.1f}'} | {target} |"
        )
    return "\n".join(lines)


def _write_us_per_page(run: SwapRun) -> float | None:
    """Client CPU per page swapped out in a machine run's write phase (CPU share x wall)."""
    if not run.write_seconds or not run.write_pswpout:
        return None
    return run.write_seconds / run.write_pswpout * run.cpu.share(run.cpu.own) * 1e6


def floor_note(res: SwapResults) -> str:
    un, cl = res.floor
    budget_un = 1e6 / (TARGET_UNCLUSTERED * res.limit)
    budget_cl = 1e6 / (TARGET_CLUSTERED * res.limit)
    return (
        f"The targets leave {budget_un:.1f} µs of client CPU per page without clustering "
        f"and {budget_cl:.1f} µs with it. The model alone, with a swap device that costs "
        f"nothing, takes {un.us_per_page:.1f} and {cl.us_per_page:.1f} µs: at best "
        f"{un.rate / res.limit:.2f} and {cl.rate / res.limit:.2f} of the limit on this CPU "
        "before one byte goes over the network. Everything the network path adds (NBD "
        "framing, the modelled socket and its skbs, trio's tasks, the syscalls) comes on "
        "top of that."
    )


def swap_noise(res: SwapResults) -> str:
    cpus = [res.unclustered.cpu, res.clustered.cpu, *(r.cpu for r in res.limits)]
    attempts = res.unclustered.attempts + res.clustered.attempts
    extra = f" (machine runs kept out of {attempts} attempts)" if attempts > 2 else ""
    return noise_line(cpus, "the runs in the table" + extra)


def fast_noise(fp: FastPath) -> str:
    extra = f" (the quietest of {fp.attempts} attempts)" if fp.attempts > 1 else ""
    return noise_line(fp.cpu, "the batches" + extra)


def size_noise(rows: list[SizeRow]) -> str:
    attempts = sum(r.attempts for r in rows)
    extra = f" (passes kept out of {attempts} attempts)" if attempts > len(rows) else ""
    return noise_line([r.cpu for r in rows], "the timed passes" + extra)


def fast_table(fp: FastPath) -> str:
    lines = [
        "| machine | pairs | ns per alloc+free | pairs/s | batches (ns per pair) "
        "| empty loop ns | policy |",
        "|---|--:|--:|--:|---|--:|---|",
        f"| {size_text(fp.memory)} | {fp.pairs:,} | {fp.median_ns:.0f} | {fp.pairs_per_s:,.0f} "
        f"| {', '.join(f'{t:.0f}' for t in fp.ns_per_pair)} | {fp.loop_ns:.0f} "
        "| NullPolicy (default) |",
    ]
    return "\n".join(lines)


def size_table(rows: list[SizeRow]) -> str:
    lines = [
        "| modelled RAM | frames | pages taken | construct ms | construct KiB (peak) "
        "| alloc µs/page | alloc µs/page, gc off | free µs/page | Python bytes/page "
        "| peak bytes/page |",
        "|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|",
    ]
    for r in rows:
        lines.append(
            f"| {size_text(r.memory)} | {r.pages:,} | {r.taken:,} | {r.construct_ms:.2f} "
            f"| {r.construct_peak / KiB:,.1f} | {r.alloc_us:.3f} | {r.alloc_nogc_us:.3f} "
            f"| {r.free_us:.3f} "
            f"| {r.bytes_per_page:.0f} | {r.alloc_peak / r.taken:.0f} |"
        )
    return "\n".join(lines)


def bottleneck(res: SwapResults) -> str:
    """What limited the machine's swap-out, from the CPU shares, and what a page cost."""
    parts = []
    for run in (res.unclustered, res.clustered):
        c = run.cpu
        client, server = c.share(c.own), c.share(c.server)
        who = (
            "the client machine (this process, one Python thread)"
            if client >= 0.8 and client > 1.5 * server
            else "the server"
            if server >= 0.8
            else "neither process's CPU"
        )
        cost = ""
        if (us := _write_us_per_page(run)) is not None:
            cost = f", about {us:,.0f} µs of client CPU per page swapped out in the write phase"
        parts.append(f"{run.label}: client {client:.0%} of a CPU, server {server:.0%}{cost}")
        parts[-1] += f" -> limited by {who}"
    lim = res.limits
    per_req = statistics.median(r.cpu.own / (r.bytes / PAGE) * 1e6 for r in lim)
    srv_req = statistics.median(r.cpu.server / (r.bytes / PAGE) * 1e6 for r in lim)
    parts.append(
        f"nbdcopy: {per_req:.0f} µs of its own CPU and {srv_req:.0f} µs of the server's "
        "per 4 KiB request"
    )
    return "; ".join(parts) + "."


def read_pass_note(res: SwapResults) -> str:
    """How much of each run came after the write phase (swap-in bound, not swap-out)."""
    parts = []
    for run in (res.unclustered, res.clustered):
        if run.write_seconds:
            after = run.duration - run.write_seconds
            parts.append(
                f"{after:.1f} s of {run.duration:.1f} s ({after / run.duration:.0%}; "
                f"{run.pswpin:,} pages in {run.read_requests:,} read requests)"
            )
    if not parts:
        return ""
    return (
        f"After the write phase come {' and '.join(parts)} of read-back: swap-in, with swap "
        f"readahead (`machine.page_cluster`, requests of at most `max_io_pages`), at most "
        f"{res.processes} faults in flight (one per hog process), while the pages the write "
        "pass left resident are swapped out in turn. Most of the whole-run time is not "
        "swap-out, which is why the whole-run rate stays far below the write-phase rate."
    )


def gc_note(rows: list[SizeRow]) -> str:
    def spread(xs: list[float]) -> str:
        return f"{min(xs):.2f}–{max(xs):.2f}"

    on = [r.alloc_us for r in rows]
    off = [r.alloc_nogc_us for r in rows]
    bpp = [r.bytes_per_page for r in rows]
    text = (
        f"Construction stays at {spread([r.construct_ms for r in rows])} ms and "
        f"{spread([r.construct_peak / KiB for r in rows])} KiB whatever the size; Python "
        f"memory per page taken stays at {min(bpp):.0f}–{max(bpp):.0f} bytes (the lazily "
        f"created `Page`); freeing costs {spread([r.free_us for r in rows])} µs/page.  "
        f"Taking a page costs {spread(on)} µs with the cyclic GC on and {spread(off)} µs "
        "with it off"
    )
    if max(on) / min(on) > 1.2 and max(off) / min(off) < 1.15:
        text += (
            ": the growth with size is Python's cyclic GC, whose full collections traverse "
            "every live `Page` (they are GC-tracked), not the model's own work."
        )
    else:
        text += "."
    return text


def section(
    res: SwapResults,
    fp: FastPath,
    rows: list[SizeRow],
    info: dict[str, Any],
    command: str,
) -> str:
    c = res.clustered
    export = f"{res.export}:{EXPORT_SIZE // MiB}M"
    return f"""{SECTION}

Measured {info["date"]} by `{command}`
on {info["nproc"]} CPUs ({info["cpu"]}), {info["kernel"]}, {info["python"]},
{info["nbdcopy"]}.

### Swap-out throughput and the limit for the server

One `netswap server --export {export}` subprocess on 127.0.0.1.  The client machine
of `{res.scenario}` ({size_text(res.memory)} of modelled RAM; hogs touching
{size_text(res.hog_bytes)}: a write pass, then a read-and-verify pass) runs in the
benchmark's process (`trio.run`), its swap device connected to that server over TCP:
once with `machine.max_io_pages=1` (one NBD write per page) and once with the
scenario's clustering (up to {c.max_io_pages} contiguous pages per write).

* "pages/s (run)" is `vmstat.pswpout / duration` from the machine's summary, the measure
  the targets apply to: the whole run, including the read-back pass (swap-in, while the
  pages the write pass left resident are swapped out in turn).
* The "write phase" ends when every hog has finished its write pass (sampled every
  {WATCH_INTERVAL * 1e3:g} ms); its pages/s count only the pages swapped out by then:
  swap-out with no swap-in in the way, the part comparable to nbdcopy.
* The limit is `nbdcopy --request-size=4096 --requests={res.depth} --connections=1
  --threads=1 --sparse=0 --no-extents` writing {size_text(res.limits[0].bytes)} of random
  data to the same server process before, between and after the machine runs (the
  median counts); pages/s = bytes / 4096 / seconds.
* CPU columns are shares of one CPU over each run's wall time: client = the benchmark
  process (nbdcopy for the limit rows), server = the `netswap server` process, other =
  everything else on the machine (noise).

{swap_table(res)}

{swap_noise(res)}

{ratio_table(res)}

The verdict is for the whole-run ratio (the script prints it and exits 0 either way).
{bottleneck(res)}

{read_pass_note(res)}

#### The model alone

The same scenario's memory model and hogs (`client.machine.memory_config`, `AnonHog`) in
this process, with `client.mm.testing.MemorySwapDevice(latency=0)` as swap: a dict that
stores each page and answers at once, with no network, no NBD, no server and no modelled
socket. The write phase is measured as above ({FLOOR_ROUNDS} runs per setting, the median
counts). "Pages per CPU second" is the highest write-phase rate this CPU could give the
machine if the rest of the swap path cost nothing.

{floor_table(res)}

{floor_note(res)}

{PROFILE_NOTE}

### Allocator fast path

`page = memory.allocator.try_alloc(); memory.free_page(page)` in a tight loop (the two
bound methods looked up once) on a fresh {size_text(fp.memory)} machine with all its
memory free and the default `NullPolicy`; {len(fp.ns_per_pair)} batches, the median
counts.  The time includes the loop itself (an empty loop of the same shape:
{fp.loop_ns:.0f} ns per iteration).  The comparison with reserves configured
(DESIGN.md §8) comes later, with the reserve policies.

{fast_table(fp)}

{fast_noise(fp)}

### Cost per page as modelled RAM grows

For each size: a fresh `Memory.from_config(MemoryConfig(total_bytes=SIZE))`, every free
page above the low watermark taken once with `try_alloc` (a frame's `Page` object is
created on its first allocation), then all of them freed.  Times come from a pass
without tracemalloc ("gc off": a separate pass with Python's cyclic GC disabled);
"construct KiB" and the bytes per page are Python memory from a pass under tracemalloc
(the list holding the pages is allocated beforehand and not counted).  The frames'
bytes are an anonymous mmap, which tracemalloc does not see and the host backs only
when a frame is written (`try_alloc` never writes one).

{size_table(rows)}

{size_noise(rows)}

{gc_note(rows)}
"""


#: Where the client's time goes, from profiling these runs (cProfile, write phase and
#: read-back separately); not measured by this script, so it is dated.
PROFILE_NOTE = """\
#### Where the client's time goes (profiled 2026-11-25 and 2026-11-26)

The first version of the swap path (2026-11-25: 0.018 / 0.037 of the limit over the whole
run, 0.027 / 0.190 in the write phase) spent about 380 µs of client CPU per page swapped
out without clustering, 58 µs with it, and about 300 µs per swap-in. Three things
dominated, none of them the model's rules:

* **Scheduling rounds per request.**  `trio.Semaphore`, `trio.Lock` and a real `send` each
  yield, and the NBD client held its send lock across the socket lock's yield and each
  skb's write: a burst of 32 one-page requests from one `blk_finish_plug` went out one at
  a time over about 100 scheduling rounds, each with its own `send()` syscall and its own
  ACK packet (an RX skb allocation) in the softirq.
* **`enum.IntFlag` arithmetic** (about 1 µs per `&` or `|`): a machine at its watermarks
  takes most pages through the allocator's slow path, which decoded gfp, task and
  allocation flags with some twenty such operations per page (a quarter of all CPU).
* **A cancel scope per wait**, a new `WaitFor` per wait and a generator context manager
  per softirq allocation and per workload step.

What changed, with every rule of the model kept (each skb's pages are still allocated in
the sender's task with the socket's gfp and held until its ACK; `sndbuf`, `rcvbuf` and the
drop rules are untouched):

* `send_all` queues the skb's bytes for a per-socket transmit task (`nbdN.xmit`, the
  device), as `tcp_sendmsg` returns once the data is in skbs; the transmit task writes
  everything queued in one `send()`.  Uncontended locks cost nothing; the NBD queue depth
  keeps trio.Semaphore's schedule point (the outcome tests' interleavings depend on it).
  A reply wakes its request directly instead of through a `trio.Event`.
* Flags are decoded once per value: the watermark check's `AllocFlags` (`zone.py`), the
  allocator slow path's plan per (gfp, task flags) (`alloc.py`), the bio mempool's gfp
  masks, the RX path's masked gfp; the softirq task enters softirq context once.
* Waits are built once and park without a cancel scope when they have no timeout; PSI's
  `nonidle`/`memstall` is a plain context manager, and a non-idle scope reads the clock
  only while some task is stalled (exact: with nothing stalled no PSI state can change).
* **Swap readahead** (2026-11-26, `swapin_readahead` with `vm.page-cluster` 3): the
  read-back went from 65,536 one-page reads to about 8,200 faults that read up to 8 pages
  each, which about halves the whole run with clustering.

Not applied: a gen-0 GC threshold of 20,000 while a machine runs (-9 % CPU per page
without clustering): it changes the whole process's collector, which a library should
not do behind its caller's back.

**The targets are out of reach of a per-page model in CPython, not of more tuning.**  The
table "the model alone" above is the evidence: with a swap device that costs nothing, the
model's own work per page (the fault, the allocator, the LRU and reclaim scan, the swap
slot and swap cache, writeback completion, freeing, PSI, filling and checking 4 KiB) is
already above what the targets leave per page, before NBD framing, the modelled socket
and trio's tasks add theirs.  Meeting them needs that work compiled or the targets
restated against the model-alone ceiling; both are decisions for the project, not for
this benchmark.  A trial with mypyc (2026-11-26, in a scratch copy): 8 of the 17 modules
of `client/mm` compile and load; the ones with attrs classes, among them the hot `Page`,
`Zone` and `Bio`, do not (attrs `define`/`frozen` fields, imports only under
`TYPE_CHECKING`); with the 8, CPU per page fell by about 4 %, within two runs' noise.
trio's scheduler, about 30 % of the model's own time, stays interpreted whatever
compiles."""


def write_docs(path: Path, text: str) -> None:
    """Replace (or append at the end) the ``## Client machine`` section of ``path``."""
    svn.write_docs(path, text, SECTION)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="a shorter run (about 30 s)")
    parser.add_argument(
        "--attempts", type=int, default=2, metavar="N",
        help="repeat a timed run (up to N in all) while others use >= 5%% of a CPU; keep "
        "the quietest (default 2)",
    )  # fmt: skip
    parser.add_argument(
        "--limit-size", type=int, metavar="MiB",
        help="data nbdcopy writes per limit run (default 256; 64 with --quick)",
    )  # fmt: skip
    parser.add_argument(
        "--wait-quiet", type=float, default=0.0, metavar="S",
        help="before each timed run, wait until others use < 5%% of a CPU; at most S "
        "seconds in all (default 0: never wait)",
    )  # fmt: skip
    parser.add_argument("--json", metavar="FILE", help="also write the results here as JSON")
    parser.add_argument(
        "--write-docs", action="store_true",
        help=f"rewrite the '{SECTION}' section of --docs with the results",
    )  # fmt: skip
    parser.add_argument("--docs", default=str(DOCS), metavar="FILE", help=f"default {DOCS}")
    parser.add_argument("-q", "--quiet", action="store_true", help="no per-run progress")
    args = parser.parse_args(argv)
    limit_mib = args.limit_size or (64 if args.quick else 256)
    if args.attempts < 1 or not 1 <= limit_mib <= EXPORT_SIZE // MiB:
        parser.error(f"--attempts must be >= 1 and --limit-size 1..{EXPORT_SIZE // MiB}")
    if shutil.which("nbdcopy") is None:
        print("nbdcopy is not installed (Debian: libnbd-bin)", file=sys.stderr)
        return 1
    progress = not args.quiet
    QUIET.left = max(0.0, args.wait_quiet)
    info = svn.machine()
    print(
        f"{info['date']}: {info['nproc']} CPUs ({info['cpu']}), {info['kernel']}, "
        f"{info['python']}, {info['nbdcopy']}",
        file=sys.stderr,
    )
    started = time.perf_counter()
    try:
        with tempfile.TemporaryDirectory(prefix="netswap-bench-") as tmp:
            res = bench_swapout(args.quick, args.attempts, limit_mib * MiB, Path(tmp), progress)
    except (BenchError, subprocess.TimeoutExpired, OSError) as exc:
        print(f"benchmark failed: {exc}", file=sys.stderr)
        return 1
    print("\nSwap-out throughput and the limit for the server (pages/s)")
    print(swap_table(res))
    print(swap_noise(res))
    print("\nRatios")
    print(ratio_table(res))
    print(bottleneck(res))
    print(read_pass_note(res))
    print("\nThe model alone (an in-memory swap device that answers at once), write phase")
    print(floor_table(res))
    print(floor_note(res))

    pairs, batches = (200_000, 4) if args.quick else (1_000_000, 5)
    fp = bench_fast_path(pairs, batches, args.attempts, progress)
    print("\nAllocator fast path (try_alloc + free_page)")
    print(fast_table(fp))
    print(fast_noise(fp))

    rows = []
    for size in SIZES_QUICK if args.quick else SIZES_FULL:
        if progress:
            print(f"  cost per page: {size_text(size)} ...", file=sys.stderr, flush=True)
        rows.append(bench_size(size, args.attempts))
    print("\nCost per page vs modelled RAM")
    print(size_table(rows))
    print(size_noise(rows))
    print(gc_note(rows))
    print(
        f"\n(total {time.perf_counter() - started:.0f} s, of which {QUIET.waited:.0f} s "
        "waiting for quiet)",
        file=sys.stderr,
    )

    command = "bench/swapout.py" + (" --quick" if args.quick else "")
    if args.attempts != 2:
        command += f" --attempts {args.attempts}"
    if args.wait_quiet:
        command += f" --wait-quiet {args.wait_quiet:g}"
    if args.limit_size:
        command += f" --limit-size {args.limit_size}"
    if args.json:
        payload = {
            "machine": info,
            "command": command,
            "swapout": {
                "scenario": res.scenario,
                "depth": res.depth,
                "limit_pages_s": round(res.limit),
                "runs": [
                    {**asdict(r), "pages_s": round(r.rate), "write_pages_s": r.write_rate}
                    for r in (res.unclustered, res.clustered)
                ],
                "limits": [{**asdict(r), "pages_s": round(r.rate)} for r in res.limits],
                "model_alone": [
                    {**asdict(f), "us_per_page": f.us_per_page, "ratio": f.rate / res.limit}
                    for f in res.floor
                ],
                "ratios": [
                    {"run": lbl, "ratio": round(x, 4), "write_phase": w, "target": t, "pass": ok}
                    for lbl, x, w, t, ok in res.ratios()
                ],
            },
            "fast_path": {**asdict(fp), "pairs_s": round(fp.pairs_per_s)},
            "per_page": [asdict(r) for r in rows],
        }
        Path(args.json).write_text(json.dumps(payload, indent=2) + "\n")
    if args.write_docs:
        write_docs(Path(args.docs), section(res, fp, rows, info, command))
        print(f"wrote the '{SECTION}' section of {args.docs}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
