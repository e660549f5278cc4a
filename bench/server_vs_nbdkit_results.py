"""bench/server_vs_nbdkit.py's workloads and their results: what each copy is, the rows
of measurements, the table it prints and the ``## Server vs nbdkit`` section of
docs/benchmarks.md it writes (``--write-docs``)."""

from __future__ import annotations

import statistics
from dataclasses import dataclass, field
from typing import Any

from benchlib import (
    KiB,
    MiB,
)

SECTION = "## Server vs nbdkit"


@dataclass(frozen=True)
class Workload:
    name: str
    label: str
    request_size: int
    requests: int
    #: Bytes copied at --size-scale 1: about 1-2 s each on nbdkit 1.32 on a 2-core VM.
    size: int
    #: The issue's target for netswap/nbdkit (throughput ratio).
    target: float

    def scaled_size(self, scale: float) -> int:
        """``size`` × ``scale``, in whole requests, and at least one full queue."""
        requests = max(self.requests, int(self.size * scale) // self.request_size)
        return requests * self.request_size

    def nbdcopy_options(self) -> list[str]:
        return [
            f"--request-size={self.request_size}",
            f"--requests={self.requests}",
            "--connections=1",
            "--threads=1",
            "--sparse=0",  # never turn a run of zeros into WRITE_ZEROES
            "--no-extents",  # never skip a range: write every byte
        ]


WORKLOADS = (
    Workload("4k-qd1", "4 KiB, queue depth 1", 4 * KiB, 1, 128 * MiB, 0.8),
    Workload("4k-qd64", "4 KiB, queue depth 64", 4 * KiB, 64, 384 * MiB, 1.0),
    Workload("128k-qd16", "128 KiB, queue depth 16", 128 * KiB, 16, 1024 * MiB, 0.6),
)
SERVERS = ("netswap", "nbdkit")
MODES = ("fresh", "reused")
MODE_TITLES = {
    "fresh": "Fresh exports (a new server for each copy)",
    "reused": "Reused servers (each copy overwrites the previous one)",
}


@dataclass
class Row:
    workload: str
    label: str
    bytes: int
    request_size: int
    requests_in_flight: int
    target: float
    seconds: dict[str, list[float]] = field(default_factory=lambda: {s: [] for s in SERVERS})
    other_cpu: dict[str, list[float]] = field(default_factory=lambda: {s: [] for s in SERVERS})

    def median(self, server: str) -> float:
        return statistics.median(self.seconds[server])

    def mb_s(self, server: str) -> float:
        return self.bytes / self.median(server) / 1e6

    def ops_s(self, server: str) -> float:
        return self.bytes / self.request_size / self.median(server)

    @property
    def ratio(self) -> float:
        return self.mb_s("netswap") / self.mb_s("nbdkit")

    @property
    def round_ratios(self) -> list[float]:
        """netswap/nbdkit throughput per round (each pair ran back to back)."""
        return [k / n for n, k in zip(self.seconds["netswap"], self.seconds["nbdkit"], strict=True)]

    @property
    def verdict(self) -> str:
        return "PASS" if self.ratio >= self.target else "below target"


HEADER = (
    "| workload | data | netswap MB/s | netswap ops/s | nbdkit MB/s | nbdkit ops/s "
    "| netswap/nbdkit | per round | target | |"
)


def noise(rows: list[Row]) -> tuple[float, float]:
    """Other processes' CPU use during the timed runs, in CPUs: on average and at worst."""
    pairs = [
        (cpu, secs)
        for row in rows
        for server in SERVERS
        for cpu, secs in zip(row.other_cpu[server], row.seconds[server], strict=True)
    ]
    total = sum(secs for _, secs in pairs)
    average = sum(cpu for cpu, _ in pairs) / total if total else 0.0
    worst = max((cpu / secs for cpu, secs in pairs), default=0.0)
    return average, worst


def noise_line(rows: list[Row]) -> str:
    average, worst = noise(rows)
    return (
        f"Other processes used {average:.0%} of one CPU on average during the timed runs "
        f"({worst:.0%} in the worst run)."
    )


def mib(nbytes: int) -> str:
    return f"{nbytes / MiB:.1f}".removesuffix(".0")


def table(rows: list[Row]) -> str:
    lines = [HEADER, "|---|--:|--:|--:|--:|--:|--:|--:|--:|---|"]
    for row in rows:
        ratios = row.round_ratios
        spread = f"{min(ratios):.2f}–{max(ratios):.2f}" if len(ratios) > 1 else "–"
        lines.append(
            f"| {row.label} | {mib(row.bytes)} MiB "
            f"| {row.mb_s('netswap'):.1f} | {row.ops_s('netswap'):,.0f} "
            f"| {row.mb_s('nbdkit'):.1f} | {row.ops_s('nbdkit'):,.0f} "
            f"| {row.ratio:.2f} | {spread} | ≥ {row.target:.1f} | {row.verdict} |"
        )
    return "\n".join(lines)


def section(
    results: dict[str, list[Row]],
    info: dict[str, Any],
    rounds: int,
    scale: float,
    mode: str,
) -> str:
    opts = " ".join(o for o in WORKLOADS[0].nbdcopy_options() if not o.startswith("--request"))
    tables = "\n".join(
        f"""### {MODE_TITLES[m]}

{table(rows)}

{noise_line(rows)}
"""
        for m, rows in results.items()
    )
    return f"""{SECTION}

Measured {info["date"]} by
`bench/server_vs_nbdkit.py --rounds {rounds} --size-scale {scale:g} --mode {mode}`
on {info["nproc"]} CPUs ({info["cpu"]}), {info["kernel"]}, {info["python"]},
{info["nbdkit"]}, {info["nbdcopy"]}.

Each run times `nbdcopy SRC nbd://127.0.0.1:PORT/...` writing a file of random data into an
in-memory export on 127.0.0.1 (TCP) -- `netswap server --export bench:SIZE` or
`nbdkit memory SIZE` (default thread pool) -- with

    nbdcopy --request-size=SIZE --requests=DEPTH {opts}

"Fresh exports": each copy goes to a newly started server, so every write is a first write
to its region.  "Reused servers": one server of each kind per workload, filled once by an
untimed copy, then overwritten by every timed one (as a swap device is).  The servers
alternate (netswap, nbdkit, netswap, nbdkit, ...); each cell is the median of {rounds} runs.
MB/s is 10^6 bytes per second of nbdcopy wall-clock time (server start and stop excluded);
ops/s is write requests per second.  "netswap/nbdkit" is the ratio of the median
throughputs, "per round" the range of the ratios of the back-to-back pairs; the targets are
the issue's (the script prints PASS or "below target" and exits 0 either way).

{tables}
On a shared machine, look at the "other processes" lines before the ratios: netswap serves
from one Python thread and loses more than nbdkit when other processes compete for the
CPUs, so a run with more than a few percent of other CPU use understates its ratios.
"""
