#!/usr/bin/env python3
"""netswap's NBD server against ``nbdkit memory``, under the same client (``nbdcopy``).

A benchmark, not a test (DESIGN.md §8): it reports ratios measured in one run and always
exits 0 when the measurements themselves succeed, whatever the ratios are.

Two kinds of measurement (``--mode``), each timing ``nbdcopy SRC nbd://127.0.0.1:PORT/...``
writing a file of random data into an in-memory export -- ``python -m testbed.cli server
--export bench:SIZE`` or ``nbdkit memory SIZE`` on 127.0.0.1 (server start and stop are not
timed):

    fresh     each copy goes to a new server with an empty export (first writes: the
              stores allocate as they go)
    reused    one server of each kind per workload, filled once untimed, then overwritten
              by every timed copy (a swap device is overwritten, not fresh)

The two servers alternate (netswap, nbdkit, netswap, nbdkit, ...) for ``--rounds`` rounds
and each row reports the median.  The CPU time other processes used
during the timed runs is measured too (``/proc``) and printed under the table: on a shared
machine that is the noise.  Workloads (all writes, one connection, one nbdcopy thread, no
sparseness detection, no extent queries):

    4k-qd1    4 KiB requests, 1 in flight
    4k-qd64   4 KiB requests, 64 in flight
    128k-qd16 128 KiB requests, 16 in flight

Usage::

    .venv/bin/python bench/server_vs_nbdkit.py [--rounds 3] [--size-scale 1.0]
        [--mode fresh|reused|both] [--only 4k-qd1,...]
        [--json FILE] [--write-docs [--docs docs/benchmarks.md]] [-q]

Needs nbdkit and nbdcopy (Debian: nbdkit, libnbd-bin).  Only the standard library is used
here; the server under test is run from the interpreter running this script.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from benchlib import (
    COPY_TIMEOUT,
    HOST,
    STARTUP_TIMEOUT,
    BenchError,
    MiB,
    busy_seconds,
    machine,
    make_source,
    own_seconds,
    process_seconds,
    stop_server,
    write_docs,
)
from server_vs_nbdkit_results import (
    MODE_TITLES,
    MODES,
    SECTION,
    SERVERS,
    WORKLOADS,
    Row,
    Workload,
    noise,
    noise_line,
    section,
    table,
)

REPO = Path(__file__).resolve().parent.parent
DOCS = REPO / "docs" / "benchmarks.md"


# -- servers ------------------------------------------------------------------------------
class Server:
    """A server process on 127.0.0.1; ``port`` is known once ``start`` returns."""

    name = ""

    def __init__(self, size: int, workdir: Path) -> None:
        self.size = size
        self.workdir = workdir
        self.proc: subprocess.Popen[bytes] | None = None
        self.port = 0
        self.export = ""

    @property
    def uri(self) -> str:
        return f"nbd://{HOST}:{self.port}/{self.export}"

    def start(self) -> None:
        raise NotImplementedError

    def stop(self) -> None:
        proc, self.proc = self.proc, None
        if proc is not None:
            stop_server(proc, self.name)

    def _wait(self, ready: Any, what: str) -> Any:
        deadline = time.monotonic() + STARTUP_TIMEOUT
        assert self.proc is not None
        while time.monotonic() < deadline:
            value = ready()
            if value:
                return value
            if self.proc.poll() is not None:
                raise BenchError(f"{self.name} exited {self.proc.returncode} before {what}")
            time.sleep(0.02)
        raise BenchError(f"{self.name}: no {what} within {STARTUP_TIMEOUT} s")


class NetswapServer(Server):
    name = "netswap"

    def start(self) -> None:
        log = self.workdir / "netswap.log"
        log.unlink(missing_ok=True)
        self.export = "bench"
        cmd = [
            sys.executable, "-m", "testbed.cli", "server",
            "--listen", f"{HOST}:0",
            "--export", f"bench:{self.size}",
            "--log-file", str(log),
        ]  # fmt: skip
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH")) if p)
        self.proc = subprocess.Popen(
            cmd, cwd=REPO, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL
        )

        def listening() -> dict[str, Any] | None:
            try:
                first = log.read_text().partition("\n")
            except FileNotFoundError:
                return None
            if not first[1]:
                return None  # the line is not complete yet
            event: dict[str, Any] = json.loads(first[0])
            return event

        event = self._wait(listening, "server.listening in its log")
        if event.get("event") != "server.listening":
            raise BenchError(f"netswap: first log event is {event.get('event')!r}")
        self.port = int(event["port"])


class NbdkitServer(Server):
    name = "nbdkit"

    def start(self) -> None:
        pidfile = self.workdir / "nbdkit.pid"
        pidfile.unlink(missing_ok=True)
        self.export = ""
        self.port = free_port()
        cmd = [
            "nbdkit", "-f", "-i", HOST, "-p", str(self.port), "-P", str(pidfile),
            "--exit-with-parent", "memory", str(self.size),
        ]  # fmt: skip
        self.proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL)
        # nbdkit writes its pidfile once it accepts connections (nbdkit(1), -P).
        self._wait(lambda: pidfile.exists() and pidfile.read_text().strip(), "pidfile")


def free_port() -> int:
    """A port the kernel just handed out on 127.0.0.1 (closed again; nbdkit binds it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((HOST, 0))
        port: int = s.getsockname()[1]
        return port


# -- measuring ----------------------------------------------------------------------------
def export_size(nbytes: int) -> int:
    return -(-nbytes // MiB) * MiB


@dataclass
class Measurement:
    seconds: float
    #: CPU time used during the run by processes other than this script, the server and
    #: nbdcopy: other people's work on a shared machine, i.e. noise.
    other_cpu: float


def copy_into(server: Server, workload: Workload, source: Path) -> Measurement:
    """Time one nbdcopy of ``source`` into the running ``server``."""
    assert server.proc is not None
    cmd = ["nbdcopy", *workload.nbdcopy_options(), str(source), server.uri]
    cpu0 = (busy_seconds(), own_seconds(), process_seconds(server.proc.pid))
    t0 = time.perf_counter()
    result = subprocess.run(cmd, capture_output=True, timeout=COPY_TIMEOUT, check=False)
    elapsed = time.perf_counter() - t0
    cpu1 = (busy_seconds(), own_seconds(), process_seconds(server.proc.pid))
    if result.returncode != 0:
        raise BenchError(
            f"{' '.join(cmd)} against {server.name} exited {result.returncode}: "
            f"{result.stderr.decode(errors='replace').strip()}"
        )
    busy, own, srv = (b - a for a, b in zip(cpu0, cpu1, strict=True))
    return Measurement(elapsed, max(0.0, busy - own - srv))


def copy_once(server: Server, workload: Workload, source: Path) -> Measurement:
    """Start ``server``, time one nbdcopy of ``source`` into it, stop it."""
    server.start()
    try:
        return copy_into(server, workload, source)
    finally:
        server.stop()


def _servers(nbytes: int, workdir: Path) -> tuple[Server, Server]:
    return NetswapServer(export_size(nbytes), workdir), NbdkitServer(export_size(nbytes), workdir)


def _record(row: Row, server: Server, m: Measurement, where: str, progress: bool) -> None:
    row.seconds[server.name].append(m.seconds)
    row.other_cpu[server.name].append(m.other_cpu)
    if progress:
        print(
            f"  {where} {row.workload:<9} {server.name:<7} "
            f"{row.bytes / MiB:6.0f} MiB in {m.seconds:6.3f} s "
            f"({row.bytes / m.seconds / 1e6:7.1f} MB/s)"
            f"  other CPU {m.other_cpu / m.seconds:4.0%}",
            file=sys.stderr,
            flush=True,
        )


def run_benchmark(
    rounds: int,
    scale: float,
    workdir: Path,
    progress: bool,
    mode: str = "fresh",
    only: tuple[str, ...] = (),
) -> list[Row]:
    """``mode`` "fresh": a new pair of servers for each round; "reused": one pair per
    workload, filled by an untimed copy, then overwritten by each timed one."""
    workloads = [(w, w.scaled_size(scale)) for w in WORKLOADS if not only or w.name in only]
    sources: dict[int, Path] = {}
    for _, nbytes in workloads:
        if nbytes not in sources:
            sources[nbytes] = workdir / f"random-{nbytes}.img"
            make_source(sources[nbytes], nbytes)
    rows = [
        Row(w.name, w.label, nbytes, w.request_size, w.requests, w.target)
        for w, nbytes in workloads
    ]
    try:
        if mode == "fresh":
            for r in range(rounds):
                for (w, nbytes), row in zip(workloads, rows, strict=True):
                    for server in _servers(nbytes, workdir):
                        m = copy_once(server, w, sources[nbytes])
                        _record(row, server, m, f"fresh  round {r + 1}/{rounds}", progress)
        else:
            for (w, nbytes), row in zip(workloads, rows, strict=True):
                pair = _servers(nbytes, workdir)
                try:
                    for server in pair:
                        server.start()
                        copy_into(server, w, sources[nbytes])  # fill: later copies overwrite
                    for r in range(rounds):
                        for server in pair:
                            m = copy_into(server, w, sources[nbytes])
                            _record(row, server, m, f"reused round {r + 1}/{rounds}", progress)
                finally:
                    for server in pair:
                        server.stop()
    finally:
        for path in sources.values():
            path.unlink(missing_ok=True)
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=3, help="runs per server (default 3)")
    parser.add_argument(
        "--size-scale", type=float, default=1.0, metavar="X",
        help="multiply every workload's data size by X (default 1; 0.1 for a quick look)",
    )  # fmt: skip
    parser.add_argument(
        "--mode", choices=(*MODES, "both"), default="both",
        help="fresh servers per copy, reused (overwritten) servers, or both (default)",
    )  # fmt: skip
    parser.add_argument(
        "--only", metavar="NAMES", default="",
        help="comma-separated workloads to run (default all: "
        + ", ".join(w.name for w in WORKLOADS) + ")",
    )  # fmt: skip
    parser.add_argument("--json", metavar="FILE", help="also write the results here as JSON")
    parser.add_argument(
        "--write-docs", action="store_true",
        help=f"rewrite the '{SECTION}' section of --docs with the results",
    )  # fmt: skip
    parser.add_argument("--docs", default=str(DOCS), metavar="FILE", help=f"default {DOCS}")
    parser.add_argument("-q", "--quiet", action="store_true", help="no per-run progress")
    args = parser.parse_args(argv)
    if args.rounds < 1 or args.size_scale <= 0:
        parser.error("--rounds must be >= 1 and --size-scale > 0")
    only = tuple(n for n in args.only.split(",") if n)
    unknown = set(only) - {w.name for w in WORKLOADS}
    if unknown:
        parser.error(f"--only: no workload named {', '.join(sorted(unknown))}")
    modes = MODES if args.mode == "both" else (args.mode,)
    for tool in ("nbdkit", "nbdcopy"):
        if shutil.which(tool) is None:
            print(f"{tool} is not installed (Debian: nbdkit, libnbd-bin)", file=sys.stderr)
            return 1

    info = machine()
    print(
        f"{info['date']}: {info['nproc']} CPUs ({info['cpu']}), {info['kernel']}, "
        f"{info['python']}, {info['nbdkit']}, {info['nbdcopy']}",
        file=sys.stderr,
    )
    results: dict[str, list[Row]] = {}
    try:
        with tempfile.TemporaryDirectory(prefix="netswap-bench-") as tmp:
            for mode in modes:
                results[mode] = run_benchmark(
                    args.rounds, args.size_scale, Path(tmp), not args.quiet, mode, only
                )
    except (BenchError, subprocess.TimeoutExpired, OSError) as exc:
        print(f"benchmark failed: {exc}", file=sys.stderr)
        return 1

    for mode, rows in results.items():
        print(f"{MODE_TITLES[mode]}:")
        print(table(rows))
        print(noise_line(rows))
    if args.json:
        payload = {
            "machine": info,
            "rounds": args.rounds,
            "size_scale": args.size_scale,
            "modes": {
                mode: {
                    "other_cpu": dict(zip(("average", "worst"), noise(rows), strict=True)),
                    "results": [
                        {
                            **asdict(row),
                            **{f"{s}_mb_s": round(row.mb_s(s), 2) for s in SERVERS},
                            **{f"{s}_ops_s": round(row.ops_s(s)) for s in SERVERS},
                            "ratio": round(row.ratio, 3),
                            "round_ratios": [round(r, 3) for r in row.round_ratios],
                            "verdict": row.verdict,
                        }
                        for row in rows
                    ],
                }
                for mode, rows in results.items()
            },
        }
        Path(args.json).write_text(json.dumps(payload, indent=2) + "\n")
    if args.write_docs:
        write_docs(
            Path(args.docs),
            section(results, info, args.rounds, args.size_scale, args.mode),
            SECTION,
        )
        print(f"wrote the '{SECTION}' section of {args.docs}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
