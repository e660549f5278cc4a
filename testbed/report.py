"""Read a netswap log back: its runs, as plain-text tables a kernel engineer can read.

A log is JSON lines (``testbed/log.py``): every event has ``event``, ``timestamp`` and
``level``, and the machine's events carry the ``machine`` and ``policy`` of their run.  One
file may hold several runs (``netswap compare`` runs each policy in turn into one file).
The events a report is built from:

- ``run.start`` (``transport``, ``memory``, ``description``) opens a run;
- ``vm.sample`` every ``run.sample_interval`` of the run's clock (``t``, free pages, zone
  watermarks, writeback, emergency pages, reserve use, counters);
- ``watchdog.deadlock`` (``cycle``, ``description``, ``stalled_for``, ``waiting``);
- ``run.summary``, the run's last event: the whole summary (``outcome``, ``vmstat``,
  ``psi``, ``net``, ``integrity``, ``policy_report``, ``memory``, ``deadlock``, ...).

How lines become runs (:func:`load_runs`):

- a ``run.start`` opens a new run for its (machine, policy);
- an event of a (machine, policy) with no open run opens one implicitly, so a log without
  ``run.start`` is grouped by (machine, policy); a ``vm.sample`` whose ``t`` goes back, or a
  sample, deadlock or summary after that run's ``run.summary``, opens the next run of the
  same (machine, policy);
- other events of a run are counted by name; events with no machine or policy (the
  embedded NBD server's) are counted for the whole log; unknown events are never an error;
- a line that is not a JSON object with an ``event`` (blank, a last line cut short when the
  process was killed) is skipped and counted;
- a run with no ``run.summary`` (the process was killed) is reported as ``unfinished``,
  from its samples.

This module only reads and formats; plotting is :mod:`testbed.plot` (matplotlib).
"""

from __future__ import annotations

import json
import os
from collections import Counter
from collections.abc import Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import attrs

__all__ = [
    "UNFINISHED",
    "LogRuns",
    "ReportError",
    "Run",
    "Watermarks",
    "atomic_floor",
    "load_runs",
    "render_report",
    "report_json",
    "sample_watermarks",
]

#: The outcome of a run whose log has no ``run.summary`` (the process was killed).
UNFINISHED = "unfinished"

#: The events a run is made of; a log with none of them is not a netswap run log.
RUN_EVENTS = frozenset({"run.start", "vm.sample", "watchdog.deadlock", "run.summary"})

#: The ``/proc/vmstat`` counters a report shows, in this order.
VMSTAT_KEYS = (
    "pswpout",
    "pswpin",
    "swap_ra",
    "swap_ra_hit",
    "pgscan_kswapd",
    "pgscan_direct",
    "pgsteal_kswapd",
    "pgsteal_direct",
    "allocstall",
    "pgscan_direct_throttle",
    "oom_kill",
    "alloc_fail",
    "alloc_emergency",
)

#: vmstat counters a ``vm.sample`` also carries: sample field -> vmstat name.
SAMPLE_VMSTAT = {
    "pswpout": "pswpout",
    "pswpin": "pswpin",
    "allocstall": "allocstall",
    "throttled": "pgscan_direct_throttle",
}

#: Fields every structlog event has; not part of a run's facts.
_ENVELOPE = ("event", "timestamp", "level")

#: How many skipped line numbers a log remembers (to name them in the report).
_KEEP_BAD_LINES = 10


class ReportError(Exception):
    """A log that cannot be reported on (missing, a directory, no netswap runs in it) or
    runs that cannot be plotted.  The message is one line naming the file."""


# -- the log, split into runs ---------------------------------------------------------------


@attrs.frozen
class Run:
    """One run of one machine under one policy, as the log tells it."""

    #: 1-based, in the order the runs start in the log.
    index: int
    machine: str
    policy: str
    #: The ``run.start`` fields (empty when the log has no ``run.start`` for this run).
    start: Mapping[str, Any]
    #: The ``vm.sample`` events, in log order, without ``event``/``timestamp``/``level``.
    samples: tuple[dict[str, Any], ...]
    #: The ``watchdog.deadlock`` event's fields, None if the watchdog did not fire.
    deadlock: dict[str, Any] | None
    #: The ``run.summary`` event's fields, None if the run did not finish.
    summary: dict[str, Any] | None
    #: Every other event of the run, counted by name.
    events: Mapping[str, int]
    #: Line of the log where the run begins.
    first_line: int = 0

    @property
    def outcome(self) -> str:
        """``completed``, ``deadlock``, ``integrity_error``, ``error`` or ``unfinished``."""
        if self.summary is None:
            return UNFINISHED
        return str(self.summary.get("outcome", UNFINISHED))

    @property
    def reason(self) -> str:
        if self.summary is None:
            return "no run.summary in the log: the process was stopped"
        return str(self.summary.get("reason") or "")

    @property
    def duration(self) -> float | None:
        """The summary's ``duration`` (seconds of the run's clock), else the last sample's
        ``t``."""
        if self.summary is not None:
            duration = _number(self.summary.get("duration"))
            if duration is not None:
                return duration
        return self.last_t

    @property
    def last_t(self) -> float | None:
        """The last sample's ``t``, None without samples."""
        times = [t for t in (_number(s.get("t")) for s in self.samples) if t is not None]
        return times[-1] if times else None

    @property
    def end_time(self) -> float | None:
        """When the run ended on its clock, for a timeline.  For a deadlock, when the
        watchdog fired: its event's ``t`` if it has one, else the last sample (the sampler
        stops with the run, at most a sample interval after it): the summary's ``duration``
        is taken later, after the swap device's close has waited for its timeout.
        Otherwise the ``duration``."""
        if self.deadlock is not None:
            fired = _number(self.deadlock.get("t"))
            if fired is not None:
                return fired
        if self.outcome == "deadlock" and self.last_t is not None:
            return self.last_t
        return self.duration

    def series(self, field: str) -> list[float]:
        """One numeric field of every sample (missing or non-numeric values as 0)."""
        return [_number(s.get(field)) or 0.0 for s in self.samples]


@attrs.frozen
class LogRuns:
    """The runs of one log, and what was skipped to get them."""

    #: The file name, or ``<lines>`` for lines given directly.
    source: str
    runs: tuple[Run, ...]
    #: Lines read, and how many were skipped (not JSON objects with an ``event``).
    lines: int = 0
    bad_lines: int = 0
    #: The first few skipped lines' numbers.
    bad_line_numbers: tuple[int, ...] = ()
    #: Events with no machine or policy (the embedded NBD server's), by name.
    unbound_events: Mapping[str, int] = attrs.field(factory=dict)

    def __iter__(self) -> Iterator[Run]:
        return iter(self.runs)

    def __len__(self) -> int:
        return len(self.runs)

    def __getitem__(self, index: int) -> Run:
        return self.runs[index]


@attrs.define
class _RunBuilder:
    index: int
    machine: str
    policy: str
    first_line: int
    start: dict[str, Any] = attrs.field(factory=dict)
    samples: list[dict[str, Any]] = attrs.field(factory=list)
    deadlock: dict[str, Any] | None = None
    summary: dict[str, Any] | None = None
    events: Counter[str] = attrs.field(factory=Counter)

    def has_run_events(self) -> bool:
        return bool(self.start or self.samples or self.deadlock or self.summary)

    def follows(self, event: str, fields: Mapping[str, Any]) -> bool:
        """Does this event belong to a later run of the same (machine, policy)?"""
        if event not in RUN_EVENTS:
            return False
        if event == "run.start":
            return self.has_run_events()
        if self.summary is not None:
            return True
        if event == "watchdog.deadlock":
            return self.deadlock is not None
        if event == "vm.sample" and self.samples:
            t, last = _number(fields.get("t")), _number(self.samples[-1].get("t"))
            return t is not None and last is not None and t < last
        return False

    def add(self, event: str, fields: dict[str, Any]) -> None:
        if event == "run.start":
            self.start = fields
        elif event == "vm.sample":
            self.samples.append(fields)
        elif event == "watchdog.deadlock":
            self.deadlock = fields
        elif event == "run.summary":
            self.summary = fields
        else:
            self.events[event] += 1

    def build(self) -> Run:
        return Run(
            index=self.index,
            machine=self.machine,
            policy=self.policy,
            start=self.start,
            samples=tuple(self.samples),
            deadlock=self.deadlock,
            summary=self.summary,
            events=dict(sorted(self.events.items())),
            first_line=self.first_line,
        )


def load_runs(source: str | os.PathLike[str] | Iterable[str]) -> LogRuns:
    """The runs of a log file (a ``str`` or path-like is a file name) or of its lines.

    Raises :class:`ReportError` for a missing file, a directory, or a log with no netswap
    run in it.
    """
    if isinstance(source, str | os.PathLike):
        path = Path(source)
        if path.is_dir():
            raise ReportError(f"{path}: is a directory, not a netswap log file")
        try:
            with path.open(encoding="utf-8", errors="replace") as lines:
                return _parse(lines, str(path))
        except FileNotFoundError:
            raise ReportError(f"{path}: no such file") from None
        except OSError as e:
            raise ReportError(f"{path}: cannot read it: {e.strerror or e}") from None
    return _parse(source, "<lines>")


def _parse(lines: Iterable[str], source: str) -> LogRuns:
    builders: list[_RunBuilder] = []
    current: dict[tuple[str, str], _RunBuilder] = {}
    unbound: Counter[str] = Counter()
    bad: list[int] = []
    bad_count = 0
    count = 0
    for count, raw in enumerate(lines, 1):
        obj = _event(raw)
        if obj is None:
            bad_count += 1
            if len(bad) < _KEEP_BAD_LINES:
                bad.append(count)
            continue
        event = obj["event"]
        machine, policy = obj.get("machine"), obj.get("policy")
        if not isinstance(machine, str) or not isinstance(policy, str):
            unbound[event] += 1
            continue
        fields = {k: v for k, v in obj.items() if k not in _ENVELOPE}
        key = (machine, policy)
        run = current.get(key)
        if run is None or run.follows(event, fields):
            run = _RunBuilder(len(builders) + 1, machine, policy, first_line=count)
            builders.append(run)
            current[key] = run
        run.add(event, fields)

    if not any(b.has_run_events() for b in builders):
        if count == 0:
            raise ReportError(f"{source}: is empty, not a netswap log")
        raise ReportError(
            f"{source}: no netswap run in {count} lines "
            f"(no {', '.join(sorted(RUN_EVENTS))} event; {bad_count} lines are not JSON "
            "events): is it a log written with --log-file and --log-format json?"
        )
    return LogRuns(
        source=source,
        runs=tuple(b.build() for b in builders),
        lines=count,
        bad_lines=bad_count,
        bad_line_numbers=tuple(bad),
        unbound_events=dict(sorted(unbound.items())),
    )


def _event(raw: str) -> dict[str, Any] | None:
    """The line as an event, or None if it is not a JSON object with a string ``event``."""
    text = raw.strip()
    if not text:
        return None
    try:
        obj = json.loads(text)
    except (ValueError, RecursionError):
        return None
    if not isinstance(obj, dict) or not isinstance(obj.get("event"), str):
        return None
    return obj


def _number(value: object) -> float | None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    return float(value)


def _int(value: object) -> int | None:
    n = _number(value)
    return None if n is None else int(n)


# -- watermarks -----------------------------------------------------------------------------


@attrs.frozen
class Watermarks:
    """A zone's ``min``/``low``/``high`` watermarks in pages (or their sum over zones)."""

    min: int
    low: int
    high: int

    @property
    def atomic_floor(self) -> int:
        return atomic_floor(self.min)

    def where(self, free: int) -> str:
        """Where ``free`` pages stand against these watermarks, in the kernel's terms."""
        if free < self.atomic_floor:
            return "below 3/8 min, the GFP_ATOMIC floor"
        if free < self.min:
            return "below min"
        if free < self.low:
            return "below low"
        if free < self.high:
            return "below high"
        return "above high"

    def as_dict(self) -> dict[str, int]:
        return {"min": self.min, "low": self.low, "high": self.high}


def atomic_floor(wmin: int) -> int:
    """How far below ``min`` a GFP_ATOMIC allocation may go: ``__zone_watermark_ok`` takes
    ``min -= min/2`` for ALLOC_HIGH, then ``min -= min/4`` for ALLOC_HARDER (3/8 of min)."""
    wmin -= wmin // 2
    wmin -= wmin // 4
    return wmin


def sample_watermarks(zones: object) -> Watermarks | None:
    """The watermarks of a sample's (or a summary's) ``zones`` list, summed over the zones.

    netswap compares the machine's total free pages with the sum of its zones' watermarks:
    exact for the one-zone machines of the scenarios, an approximation for several zones
    (the kernel checks each zone on its own).
    """
    if not isinstance(zones, list) or not zones:
        return None
    total = {"min": 0, "low": 0, "high": 0}
    for zone in zones:
        if not isinstance(zone, dict):
            return None
        for key in total:
            value = _int(zone.get(key))
            if value is None:
                return None
            total[key] += value
    return Watermarks(**total)


# -- the facts of a run ---------------------------------------------------------------------


def _facts(run: Run) -> dict[str, Any]:
    """Everything a report says about a run, JSON-able; None where the log does not say."""
    summary = run.summary or {}
    samples = run.samples
    first, last = (samples[0], samples[-1]) if samples else ({}, {})
    times = [t for t in (_number(s.get("t")) for s in samples) if t is not None]

    # Counters: the summary's (since the machine started), else last minus first sample.
    vmstat = summary.get("vmstat") if isinstance(summary.get("vmstat"), dict) else None
    counters: dict[str, int | None]
    if vmstat is not None:
        counters = {k: _int(vmstat.get(k)) for k in VMSTAT_KEYS}
        counter_source: str | None = "summary"
    else:
        by_vmstat = {v: k for k, v in SAMPLE_VMSTAT.items()}
        counters = {
            k: _delta(first, last, by_vmstat[k]) if k in by_vmstat else None for k in VMSTAT_KEYS
        }
        counter_source = "samples" if samples else None
    duration_source = None
    if _number(summary.get("duration")) is not None:
        duration_source = "summary"
    elif times:
        duration_source = "samples"

    return {
        "index": run.index,
        "machine": run.machine,
        "policy": run.policy,
        "transport": run.start.get("transport"),
        "memory_bytes": _int(run.start.get("memory")),
        "description": run.start.get("description"),
        "outcome": run.outcome,
        "reason": run.reason,
        "duration": run.duration,
        "duration_source": duration_source,
        "ended_at": run.end_time,
        "ended_at_source": _end_source(run),
        "wall_seconds": _number(summary.get("wall_seconds")),
        "samples": {
            "count": len(samples),
            "t_first": times[0] if times else None,
            "t_last": times[-1] if times else None,
        },
        "events": dict(run.events),
        "vmstat": {"source": counter_source, "counters": counters},
        "free_pages": _free_pages(run, summary),
        "psi": _psi(summary, last),
        "reserve": _reserve(samples, summary),
        "net": _net(summary, first, last),
        "throttled": counters["pgscan_direct_throttle"],
        "integrity": _integrity(summary, first, last),
        "deadlock": _deadlock(run, summary),
    }


def _end_source(run: Run) -> str | None:
    """Where :attr:`Run.end_time` comes from."""
    if run.deadlock is not None and _number(run.deadlock.get("t")) is not None:
        return "watchdog.deadlock"
    if run.outcome == "deadlock" and run.last_t is not None:
        return "last sample"
    if run.summary is not None and _number(run.summary.get("duration")) is not None:
        return "summary"
    return "last sample" if run.last_t is not None else None


def _delta(first: Mapping[str, Any], last: Mapping[str, Any], field: str) -> int | None:
    a, b = _int(first.get(field)), _int(last.get(field))
    return None if a is None or b is None else b - a


def _free_pages(run: Run, summary: Mapping[str, Any]) -> dict[str, Any]:
    free = [(n, s) for s in run.samples if (n := _int(s.get("nr_free_pages"))) is not None]
    lowest_sampled = min(free, key=lambda pair: pair[0]) if free else None
    tracked = _int(summary.get("min_free_pages"))  # tracked every 10 ms by the machine
    candidates = [tracked] if tracked is not None else []
    if lowest_sampled is not None:
        candidates.append(lowest_sampled[0])
    memory = summary.get("memory") if isinstance(summary.get("memory"), dict) else {}
    zones_at_end = memory.get("zones") if isinstance(memory, dict) else None
    vmstat = summary.get("vmstat") if isinstance(summary.get("vmstat"), dict) else {}
    at_end = _int(vmstat.get("nr_free_pages")) if vmstat else None
    if at_end is None and free:
        at_end = free[-1][0]
    # The watermarks in force when free pages were lowest (a policy may move them: the
    # reserve policy raises min while its reserves exist), else the summary's at the end.
    end_marks = sample_watermarks(zones_at_end)
    marks = sample_watermarks(lowest_sampled[1].get("zones")) if lowest_sampled else None
    marks = marks or end_marks
    return {
        "lowest": min(candidates) if candidates else None,
        "lowest_sampled": lowest_sampled[0] if lowest_sampled else None,
        "highest_sampled": max(n for n, _ in free) if free else None,
        "at_end": at_end,
        "watermarks": marks.as_dict() if marks else None,
        "atomic_floor": marks.atomic_floor if marks else None,
        "watermarks_at_end": end_marks.as_dict() if end_marks else None,
        "zones": len(zones_at_end) if isinstance(zones_at_end, list) else None,
    }


def _psi(summary: Mapping[str, Any], last: Mapping[str, Any]) -> dict[str, Any]:
    psi = summary.get("psi")
    out: dict[str, Any] = {}
    for kind in ("some", "full"):
        figures = psi.get(kind) if isinstance(psi, dict) else None
        if isinstance(figures, dict):
            total = _number(figures.get("total", figures.get("total_us")))
            out[kind] = {
                "avg10": _number(figures.get("avg10")),
                "avg60": _number(figures.get("avg60")),
                "avg300": _number(figures.get("avg300")),
                "total_us": total,
            }
        else:
            out[kind] = {
                "avg10": _number(last.get(f"psi_{kind}_avg10")),
                "avg60": None,
                "avg300": None,
                "total_us": None,
            }
    out["source"] = "summary" if isinstance(psi, dict) else ("samples" if last else None)
    return out


def _reserve(samples: Sequence[Mapping[str, Any]], summary: Mapping[str, Any]) -> dict[str, Any]:
    used = [n for s in samples if (n := _int(s.get("reserve_used"))) is not None]
    emergency = [n for s in samples if (n := _int(s.get("nr_emergency"))) is not None]
    report = summary.get("policy_report")
    report = report if isinstance(report, dict) else {}
    peak = _int(report.get("reserve_peak"))
    if peak is None and not summary and used and max(used) > 0:
        peak = max(used)
    info = report.get("reserve_info")
    return {
        "peak": peak,
        "reserve_used_max": max(used) if used else None,
        "nr_emergency_max": max(emergency) if emergency else None,
        "reserve_info": info if isinstance(info, list) else None,
        "policy_report": {
            k: v for k, v in sorted(report.items()) if k not in ("reserve_info", "reserve_peak")
        },
    }


def _net(
    summary: Mapping[str, Any], first: Mapping[str, Any], last: Mapping[str, Any]
) -> dict[str, Any]:
    net = summary.get("net")
    if isinstance(net, dict):
        pfmemalloc, rx_fail = _int(net.get("PFMemallocDrop")), _int(net.get("rx_alloc_fail"))
        drops = (pfmemalloc or 0) + (rx_fail or 0)
        return {"PFMemallocDrop": pfmemalloc, "rx_alloc_fail": rx_fail, "drops": drops}
    # vm.sample's drops is PFMemallocDrop + rx_alloc_fail together.
    return {"PFMemallocDrop": None, "rx_alloc_fail": None, "drops": _delta(first, last, "drops")}


def _integrity(
    summary: Mapping[str, Any], first: Mapping[str, Any], last: Mapping[str, Any]
) -> dict[str, Any]:
    integrity = summary.get("integrity")
    if isinstance(integrity, dict):
        return {
            "pages_written": _int(integrity.get("pages_written")),
            "pages_verified": _int(integrity.get("pages_verified")),
            "corrupt": _int(integrity.get("corrupt")),
        }
    return {
        "pages_written": None,
        "pages_verified": _delta(first, last, "pages_verified"),
        "corrupt": None,
    }


def _deadlock(run: Run, summary: Mapping[str, Any]) -> dict[str, Any] | None:
    found = summary.get("deadlock")
    merged: dict[str, Any] = dict(found) if isinstance(found, dict) else {}
    if run.deadlock is not None:
        merged.update({k: v for k, v in run.deadlock.items() if k not in ("machine", "policy")})
    if not merged:
        return None
    cycle = merged.get("cycle")
    path = [str(step) for step in cycle] if isinstance(cycle, list) else []
    waiting = merged.get("waiting")
    return {
        "cycle": path,
        "has_cycle": bool(merged.get("has_cycle", True)),
        "description": " -> ".join(path),
        "stalled_for": _number(merged.get("stalled_for")),
        "waiting": (
            {str(k): str(v) for k, v in sorted(waiting.items())}
            if isinstance(waiting, dict)
            else {}
        ),
    }


# -- JSON and text --------------------------------------------------------------------------


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
        "runs": [_facts(run) for run in log.runs],
    }


def render_report(runs: LogRuns | Sequence[Run]) -> str:
    """The runs' story as aligned plain text: an overview line per run when there are
    several, then each run's outcome, vmstat, free pages against the watermarks, pressure,
    reserves, drops, integrity and deadlock cycle.  "?" marks what the log does not say
    (a run without its summary), "-" what does not apply."""
    log = _as_log(runs)
    facts = [_facts(run) for run in log.runs]
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


def _columns(rows: Sequence[Sequence[str]], right: Sequence[bool], indent: str = "") -> list[str]:
    """Rows of cells as aligned columns (two spaces apart), trailing spaces removed."""
    widths = [max(len(row[i]) for row in rows) for i in range(len(right))]
    lines = []
    for row in rows:
        cells = [
            cell.rjust(w) if r else cell.ljust(w)
            for cell, w, r in zip(row, widths, right, strict=True)
        ]
        lines.append((indent + "  ".join(cells)).rstrip())
    return lines


def format_table(rows: Sequence[Sequence[str]]) -> list[str]:
    """A header row, a rule of dashes under it, then the rows: left-aligned columns two
    spaces apart (the tables of ``netswap compare`` and ``netswap report``)."""
    lines = _columns(rows, [False] * len(rows[0]))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return lines


def _overview(facts: Sequence[Mapping[str, Any]]) -> list[str]:
    """One line per run, the columns of ``netswap compare``."""
    several_machines = len({f["machine"] for f in facts}) > 1
    header = ["policy", "outcome", "time s", "pswpout", "min free", "reserve peak"]
    header += ["drops", "throttled", "verified", "corrupt"]
    if several_machines:
        header.insert(0, "machine")
    rows = [header]
    for f in facts:
        duration = f["duration"]
        row = [
            f["policy"],
            f["outcome"],
            "?" if duration is None else f"{duration:.1f}",
            _fmt(f["vmstat"]["counters"]["pswpout"]),
            _fmt(f["free_pages"]["lowest"]),
            _fmt(f["reserve"]["peak"], "-"),
            _fmt(f["net"]["drops"]),
            _fmt(f["throttled"]),
            _fmt(f["integrity"]["pages_verified"]),
            _fmt(f["integrity"]["corrupt"]),
        ]
        if several_machines:
            row.insert(0, f["machine"])
        rows.append(row)
    lines = format_table(rows)
    for f in facts:
        if f["deadlock"] and f["deadlock"]["cycle"]:
            lines.append(f"{f['policy']}: {f['deadlock']['description']}")
    return lines


def _section(title: str, rows: Sequence[Sequence[str]]) -> list[str]:
    """A titled block of label / value / note rows; values right-aligned."""
    if not rows:
        return []
    width = max(len(r) for r in rows)
    padded = [[*r, *([""] * (width - len(r)))] for r in rows]
    return ["", f"  {title}", *_columns(padded, [False, True, *([False] * (width - 2))], "    ")]


def _run_text(f: Mapping[str, Any], nruns: int) -> list[str]:
    title = f"run {f['index']}/{nruns}: machine {f['machine']}, policy {f['policy']}"
    lines = [title, "=" * len(title)]
    outcome = f["outcome"] + (f" ({f['reason']})" if f["reason"] else "")
    head = [("outcome", outcome)]
    duration = f["duration"]
    if duration is not None:
        clock = "run clock" if f["duration_source"] == "summary" else "last sample"
        text = f"{_fmt(duration)} s ({clock})"
        if f["wall_seconds"] is not None:
            text += f", {_fmt(f['wall_seconds'])} s wall"
        head.append(("duration", text))
    ended = f["ended_at"]
    if ended is not None and ended != duration:
        how = {
            "watchdog.deadlock": "when the watchdog fired",
            "last sample": "the last vm.sample before the watchdog fired",
        }.get(f["ended_at_source"], "")
        head.append(("ended", f"t {_fmt(ended)} s, {how}".rstrip(", ")))
    machine = []
    if f["memory_bytes"] is not None:
        machine.append(f"{f['memory_bytes'] / 2**20:g} MiB")
    if f["transport"]:
        machine.append(f"transport {f['transport']}")
    if machine:
        head.append(("machine", ", ".join(machine)))
    if f["description"]:
        head.append(("scenario", str(f["description"])))
    s = f["samples"]
    sampled = f"{s['count']} vm.sample"
    if s["count"]:
        sampled += f", t {_fmt(s['t_first'])} .. {_fmt(s['t_last'])} s"
    head.append(("samples", sampled))
    if f["events"]:
        head.append(("events", ", ".join(f"{k} {v}" for k, v in f["events"].items())))
    lines += _columns([[k, v] for k, v in head], [False, False], "  ")

    source = f["vmstat"]["source"]
    counters = f["vmstat"]["counters"]
    lines += _section(
        f"vmstat ({'from the samples, last - first' if source == 'samples' else source})",
        [[k, _fmt(v)] for k, v in counters.items()],
    )

    fp = f["free_pages"]
    marks = fp["watermarks"]

    def where(value: int | None) -> str:
        if value is None or marks is None:
            return ""
        return Watermarks(**marks).where(value)

    zones = "" if fp["zones"] in (None, 1) else f", summed over {fp['zones']} zones"
    rows = [
        ["lowest", _fmt(fp["lowest"]), where(fp["lowest"])],
        ["lowest sampled", _fmt(fp["lowest_sampled"]), where(fp["lowest_sampled"])],
        ["highest sampled", _fmt(fp["highest_sampled"]), where(fp["highest_sampled"])],
        ["at the end", _fmt(fp["at_end"]), ""],
    ]
    if marks is not None:
        rows += [
            ["watermark high", str(marks["high"]), ""],
            ["watermark low", str(marks["low"]), ""],
            ["watermark min", str(marks["min"]), ""],
            ["3/8 min", str(fp["atomic_floor"]), "GFP_ATOMIC floor"],
        ]
    end = fp["watermarks_at_end"]
    if end is not None and marks is not None and end != marks:
        rows.append(
            ["watermarks at the end", "", f"min {end['min']} low {end['low']} high {end['high']}"]
        )
    lines += _section(f"free pages{zones}", rows)

    psi = f["psi"]
    psi_rows = [["", "avg10", "avg60", "avg300", "total s"]]
    for kind in ("some", "full"):
        p = psi[kind]
        total = p["total_us"]
        psi_rows.append(
            [
                kind,
                *("?" if p[k] is None else f"{p[k]:.2f}" for k in ("avg10", "avg60", "avg300")),
                "?" if total is None else f"{total / 1e6:.3f}",
            ]
        )
    lines += ["", "  memory pressure (PSI)"]
    lines += _columns(psi_rows, [False, True, True, True, True], "    ")

    r = f["reserve"]
    reserve_rows = [
        ["reserve peak", _fmt(r["peak"], "-"), "policy_report" if r["peak"] is not None else ""],
        ["reserve_used, max sampled", _fmt(r["reserve_used_max"]), ""],
        ["nr_emergency, max sampled", _fmt(r["nr_emergency_max"]), "pages below min in use"],
    ]
    reserve_rows += [[k, _fmt(v), "policy_report"] for k, v in r["policy_report"].items()]
    if r["peak"] is not None and f["outcome"] == UNFINISHED:
        reserve_rows[0][2] = "max reserve_used sampled"
    lines += _section("reserves", reserve_rows)
    if r["reserve_info"]:
        info = [["reserve", "pages", "limit", "usage", "peak", "charge_failed"]]
        for row in r["reserve_info"]:
            if isinstance(row, dict):
                info.append([str(row.get("reserve", "")), *(_fmt(row.get(k)) for k in info[0][1:])])
        lines += ["", "  reserve_info"]
        lines += _columns(info, [False, True, True, True, True, True], "    ")

    net = f["net"]
    lines += _section(
        "drops and throttling",
        [
            [
                "PFMemallocDrop",
                _fmt(net["PFMemallocDrop"]),
                "memalloc skbs dropped at other sockets",
            ],
            ["rx_alloc_fail", _fmt(net["rx_alloc_fail"]), "RX buffers not allocated"],
            ["drops", _fmt(net["drops"]), "both"],
            ["throttled", _fmt(f["throttled"]), "pgscan_direct_throttle"],
        ],
    )
    integrity = f["integrity"]
    lines += _section("integrity", [[k, _fmt(v)] for k, v in integrity.items()])

    dl = f["deadlock"]
    if dl is not None:
        stalled = dl["stalled_for"]
        after = f" (no progress for {_fmt(stalled)} s)" if stalled is not None else ""
        lines += ["", f"  deadlock{after}"]
        label = "cycle" if dl["has_cycle"] else "wait chain (no cycle)"
        lines.append(f"    {label}: {dl['description'] or '?'}")
        if dl["waiting"]:
            lines.append(f"    waiting ({len(dl['waiting'])} tasks):")
            lines += _columns([[k, v] for k, v in dl["waiting"].items()], [False, False], "      ")
    return lines
