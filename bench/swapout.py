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
import json
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import benchlib
from benchlib import (
    machine,
)
from swapout_alloc import (
    bench_fast_path,
    bench_size,
)
from swapout_measure import (
    DOCS,
    EXPORT_SIZE,
    QUIET,
    SECTION,
    SIZES_FULL,
    SIZES_QUICK,
    BenchError,
    MiB,
    bench_swapout,
)
from swapout_report import (
    bottleneck,
    fast_noise,
    fast_table,
    floor_note,
    floor_table,
    gc_note,
    ratio_table,
    read_pass_note,
    section,
    size_noise,
    size_table,
    size_text,
    swap_noise,
    swap_table,
)


def write_docs(path: Path, text: str) -> None:
    """Replace (or append at the end) the ``## Client machine`` section of ``path``."""
    benchlib.write_docs(path, text, SECTION)


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
    info = machine()
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
