"""bench/swapout.py's results as text: the tables and notes it prints, and the
``## Client machine`` section of docs/benchmarks.md it writes (``--write-docs``)."""

from __future__ import annotations

import statistics
import sys
from pathlib import Path
from typing import Any

from swapout_alloc import (
    FastPath,
    SizeRow,
)
from swapout_measure import (
    EXPORT_SIZE,
    FLOOR_ROUNDS,
    PAGE,
    SECTION,
    TARGET_CLUSTERED,
    TARGET_UNCLUSTERED,
    WATCH_INTERVAL,
    GiB,
    KiB,
    MiB,
    SwapResults,
    SwapRun,
    noise_line,
)

sys.path.insert(0, str(Path(__file__).resolve().parent))


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

The same scenario's memory model and hogs (`MachineConfig.memory_config`, `AnonHog`) in
this process, with `client.mm.testing.MemorySwapDevice(latency=0)` as swap: a dict that
stores each page and answers at once, with no network, no NBD, no server and no modelled
socket. The write phase is measured as above ({FLOOR_ROUNDS} runs per setting, the median
counts). "Pages per CPU second" is the highest write-phase rate this CPU could give the
machine if the rest of the swap path cost nothing.

{floor_table(res)}

{floor_note(res)}

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

For each size: a fresh `Memory(MemoryConfig(total_bytes=SIZE))`, every free
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
