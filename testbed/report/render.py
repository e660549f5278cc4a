"""A netswap log's report as text (``netswap report``) and as JSON (``--json``): the
facts of :mod:`testbed.report.facts`, as aligned plain-text tables a kernel engineer can
read."""

from __future__ import annotations

import io
from collections.abc import Sequence
from typing import Any

from rich import box
from rich.console import Console
from rich.table import Table

from testbed.report.facts import NetFacts, RunFacts, facts_json, run_facts
from testbed.report.log import UNFINISHED, LogRuns, Run


def _as_log(runs: LogRuns | Sequence[Run]) -> LogRuns:
    if isinstance(runs, LogRuns):
        return runs
    return LogRuns(source="<runs>", runs=tuple(runs))


def report_json(runs: LogRuns | Sequence[Run]) -> dict[str, Any]:
    """The report's facts as a JSON-able dict (``netswap report --json``)."""
    log = _as_log(runs)
    return {
        "source": log.source,
        "lines": log.lines,
        "bad_lines": log.bad_lines,
        "bad_line_numbers": list(log.bad_line_numbers),
        "unbound_events": dict(log.unbound_events),
        "runs": [facts_json(run_facts(run)) for run in log.runs],
    }


def render_report(runs: LogRuns | Sequence[Run]) -> str:
    """The runs' story as aligned plain text: an overview line per run when there are
    several, then each run's outcome, vmstat, free pages against the watermarks, pressure,
    reserves, drops, integrity and deadlock cycle.  "?" marks what the log does not say
    (a run without its summary), "-" what does not apply."""
    log = _as_log(runs)
    facts = [run_facts(run) for run in log.runs]
    out: list[str] = []
    if isinstance(runs, LogRuns):
        out.append(f"netswap report: {log.source}")
        skipped = f"{log.bad_lines} skipped (not JSON events)"
        if log.bad_line_numbers:
            more = ", ..." if log.bad_lines > len(log.bad_line_numbers) else ""
            skipped += f": line {', '.join(map(str, log.bad_line_numbers))}{more}"
        plural = "run" if len(facts) == 1 else "runs"
        out.append(f"{len(facts)} {plural}; {log.lines} lines, {skipped}")
        out.append("")
    if len(facts) > 1:
        out.extend(_overview(facts))
        out.append("")
    for f in facts:
        out.extend(_run_text(f, len(facts)))
        out.append("")
    return "\n".join(out).rstrip("\n") + "\n"


def _fmt(value: object, missing: str = "?") -> str:
    if value is None:
        return missing
    if isinstance(value, float):
        return f"{value:.3f}".rstrip("0").rstrip(".") if value != int(value) else f"{value:.0f}"
    return str(value)


#: No edges, no lines between columns; under the header (format_table), a rule of dashes.
_PLAIN = box.Box("    \n    \n    \n    \n    \n    \n    \n    \n", ascii=True)
_RULED = box.Box("    \n    \n -  \n    \n    \n    \n    \n    \n", ascii=True)


def _table_lines(
    rows: Sequence[Sequence[str]], right: Sequence[bool], *, header: bool, indent: str = ""
) -> list[str]:
    """Rows of cells as a rich table rendered to plain text: columns two spaces apart,
    left- or right-aligned, never wrapped; trailing spaces removed."""
    table = Table(
        box=_RULED if header else _PLAIN,
        show_header=header,
        show_edge=False,
        pad_edge=False,
        padding=(0, 1, 0, 0),
        header_style="",
    )
    first = rows[0] if header else [""] * len(right)
    for title, r in zip(first, right, strict=True):
        table.add_column(title, justify="right" if r else "left", no_wrap=True)
    for row in rows[1:] if header else rows:
        table.add_row(*row)
    out = io.StringIO()
    Console(file=out, width=100_000, color_system=None, highlight=False).print(table)
    return [(indent + line).rstrip() for line in out.getvalue().splitlines()]


def _columns(rows: Sequence[Sequence[str]], right: Sequence[bool], indent: str = "") -> list[str]:
    """Rows of cells as aligned columns (two spaces apart), trailing spaces removed."""
    return _table_lines(rows, right, header=False, indent=indent)


def format_table(rows: Sequence[Sequence[str]]) -> list[str]:
    """A header row, a rule of dashes under it, then the rows: left-aligned columns two
    spaces apart (the tables of ``netswap compare`` and ``netswap report``)."""
    return _table_lines(rows, [False] * len(rows[0]), header=True)


def _overview(facts: Sequence[RunFacts]) -> list[str]:
    """One line per run, the columns of ``netswap compare``."""
    several_machines = len({f.machine for f in facts}) > 1
    header = ["policy", "outcome", "time s", "pswpout", "min free", "reserve peak"]
    header += ["drops", "throttled", "verified", "corrupt"]
    if several_machines:
        header.insert(0, "machine")
    rows = [header]
    for f in facts:
        duration = f.duration
        row = [
            f.policy,
            f.outcome,
            "?" if duration is None else f"{duration:.1f}",
            _fmt(f.vmstat.counters["pswpout"]),
            _fmt(f.free_pages.lowest),
            _fmt(f.reserve.peak, "-"),
            _fmt(f.net.drops),
            _fmt(f.throttled),
            _fmt(f.integrity.pages_verified),
            _fmt(f.integrity.corrupt),
        ]
        if several_machines:
            row.insert(0, f.machine)
        rows.append(row)
    lines = format_table(rows)
    for f in facts:
        if f.deadlock and f.deadlock.cycle:
            lines.append(f"{f.policy}: {f.deadlock.description}")
    return lines


def _section(title: str, rows: Sequence[Sequence[str]]) -> list[str]:
    """A titled block of label / value / note rows; values right-aligned."""
    if not rows:
        return []
    width = max(len(r) for r in rows)
    padded = [[*r, *([""] * (width - len(r)))] for r in rows]
    return ["", f"  {title}", *_columns(padded, [False, True, *([False] * (width - 2))], "    ")]


def _run_text(f: RunFacts, nruns: int) -> list[str]:
    title = f"run {f.index}/{nruns}: machine {f.machine}, policy {f.policy}"
    lines = [title, "=" * len(title)]
    outcome = f.outcome + (f" ({f.reason})" if f.reason else "")
    head = [("outcome", outcome)]
    duration = f.duration
    if duration is not None:
        clock = "run clock" if f.duration_source == "summary" else "last sample"
        text = f"{_fmt(duration)} s ({clock})"
        if f.wall_seconds is not None:
            text += f", {_fmt(f.wall_seconds)} s wall"
        head.append(("duration", text))
    ended = f.ended_at
    if ended is not None and ended != duration:
        how = {
            "watchdog.deadlock": "when the watchdog fired",
            "last sample": "the last vm.sample before the watchdog fired",
        }.get(f.ended_at_source or "", "")
        head.append(("ended", f"t {_fmt(ended)} s, {how}".rstrip(", ")))
    machine = []
    if f.memory_bytes is not None:
        machine.append(f"{f.memory_bytes / 2**20:g} MiB")
    if f.transport:
        machine.append(f"transport {f.transport}")
    if machine:
        head.append(("machine", ", ".join(machine)))
    if f.description:
        head.append(("scenario", str(f.description)))
    s = f.samples
    sampled = f"{s.count} vm.sample"
    if s.count:
        sampled += f", t {_fmt(s.t_first)} .. {_fmt(s.t_last)} s"
    head.append(("samples", sampled))
    if f.events:
        head.append(("events", ", ".join(f"{k} {v}" for k, v in f.events.items())))
    lines += _columns([[k, v] for k, v in head], [False, False], "  ")

    source = f.vmstat.source
    counters = f.vmstat.counters
    lines += _section(
        f"vmstat ({'from the samples, last - first' if source == 'samples' else source})",
        [[k, _fmt(v)] for k, v in counters.items()],
    )

    fp = f.free_pages
    marks = fp.watermarks

    def where(value: int | None) -> str:
        if value is None or marks is None:
            return ""
        return marks.where(value)

    zones = "" if fp.zones in (None, 1) else f", summed over {fp.zones} zones"
    rows = [
        ["lowest", _fmt(fp.lowest), where(fp.lowest)],
        ["lowest sampled", _fmt(fp.lowest_sampled), where(fp.lowest_sampled)],
        ["highest sampled", _fmt(fp.highest_sampled), where(fp.highest_sampled)],
        ["at the end", _fmt(fp.at_end), ""],
    ]
    if marks is not None:
        rows += [
            ["watermark high", str(marks.high), ""],
            ["watermark low", str(marks.low), ""],
            ["watermark min", str(marks.min), ""],
            ["3/8 min", str(fp.atomic_floor), "GFP_ATOMIC floor"],
        ]
    end = fp.watermarks_at_end
    if end is not None and marks is not None and end != marks:
        rows.append(["watermarks at the end", "", f"min {end.min} low {end.low} high {end.high}"])
    lines += _section(f"free pages{zones}", rows)

    psi_rows = [["", "avg10", "avg60", "avg300", "total s"]]
    for kind, p in (("some", f.psi.some), ("full", f.psi.full)):
        total = p.total_us
        psi_rows.append(
            [
                kind,
                *("?" if x is None else f"{x:.2f}" for x in (p.avg10, p.avg60, p.avg300)),
                "?" if total is None else f"{total / 1e6:.3f}",
            ]
        )
    lines += ["", "  memory pressure (PSI)"]
    lines += _columns(psi_rows, [False, True, True, True, True], "    ")

    r = f.reserve
    reserve_rows = [
        ["reserve peak", _fmt(r.peak, "-"), "policy_report" if r.peak is not None else ""],
        ["reserve_used, max sampled", _fmt(r.reserve_used_max), ""],
        ["nr_emergency, max sampled", _fmt(r.nr_emergency_max), "pages below min in use"],
    ]
    reserve_rows += [[k, _fmt(v), "policy_report"] for k, v in r.policy_report.items()]
    if r.peak is not None and f.outcome == UNFINISHED:
        reserve_rows[0][2] = "max reserve_used sampled"
    lines += _section("reserves", reserve_rows)
    if r.reserve_info:
        info = [["reserve", "pages", "limit", "usage", "peak", "charge_failed"]]
        for row in r.reserve_info:
            if isinstance(row, dict):
                info.append([str(row.get("reserve", "")), *(_fmt(row.get(k)) for k in info[0][1:])])
        lines += ["", "  reserve_info"]
        lines += _columns(info, [False, True, True, True, True, True], "    ")

    net = f.net
    lines += _section(
        "drops and throttling",
        [
            [
                "PFMemallocDrop",
                _fmt(net.PFMemallocDrop),
                "memalloc skbs dropped at other sockets",
            ],
            ["rx_alloc_fail", _fmt(net.rx_alloc_fail), "RX buffers not allocated"],
            ["drops", _fmt(net.drops), "both"],
            ["throttled", _fmt(f.throttled), "pgscan_direct_throttle"],
        ],
    )
    lines += _network_text(f.network)
    i = f.integrity
    lines += _section(
        "integrity",
        [
            ["pages_written", _fmt(i.pages_written)],
            ["pages_verified", _fmt(i.pages_verified)],
            ["corrupt", _fmt(i.corrupt)],
        ],
    )

    dl = f.deadlock
    if dl is not None:
        stalled = dl.stalled_for
        after = f" (no progress for {_fmt(stalled)} s)" if stalled is not None else ""
        lines += ["", f"  deadlock{after}"]
        label = "cycle" if dl.has_cycle else "wait chain (no cycle)"
        lines.append(f"    {label}: {dl.description or '?'}")
        if dl.waiting:
            lines.append(f"    waiting ({len(dl.waiting)} tasks):")
            lines += _columns([[k, v] for k, v in dl.waiting.items()], [False, False], "      ")
    return lines


def _network_text(n: NetFacts | None) -> list[str]:
    """Who held the network's memory: where a stuck reply's buffer went."""
    if n is None:
        return []
    peak = f", peak {n.ring_pages_peak}" if n.ring_pages_peak is not None else ""
    tcp = []
    if n.tcp_mem:
        tcp.append(f"tcp_mem {' '.join(map(str, n.tcp_mem))}")
    if n.tcp_memory_pressure is not None:
        tcp.append("in memory pressure" if n.tcp_memory_pressure else "no memory pressure")
    when = f"the last vm.sample, t {_fmt(n.t)} s" if n.t is not None else "the summary"
    lines = _section(
        f"network ({when})",
        [
            ["ring buffers posted", _fmt(n.ring_posted), f"on {n.device or '?'}'s receive ring"],
            ["ring pages", _fmt(n.ring_pages), f"posted or queued on sockets{peak}"],
            ["queued on sockets", _fmt(n.rx_queued), "ring buffers of unread data"],
            ["TX pages", _fmt(n.tx_pages), "held by skbs not yet acknowledged"],
            ["tcp_memory_allocated", _fmt(n.tcp_memory_allocated), ", ".join(tcp)],
            ["refills failed", _fmt(n.refill_failed), "in the run"],
        ],
    )
    if n.sockets:
        rows = [["socket (summary)", "rx_bufs", "TCPRcvQDrop", "PFMemallocDrop"]]
        for sock in n.sockets:
            name = sock.name + (" (memalloc)" if sock.memalloc else "")
            rows.append([name, *map(_fmt, (sock.rx_bufs, sock.rcvq_drop, sock.pfmemalloc_drop))])
        lines += _columns(rows, [False, True, True, True], "    ")
    return lines
