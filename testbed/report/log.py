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

This module only splits the log; what a run's facts are is :mod:`testbed.report.facts`, the
text :mod:`testbed.report.render`, the plot :mod:`testbed.plot` (matplotlib).
"""

from __future__ import annotations

import json
import os
from collections import Counter
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

import attrs

from client.summary import RunSummary, structure_summary

#: The outcome of a run whose log has no ``run.summary`` (the process was killed).
UNFINISHED = "unfinished"

#: The events a run is made of; a log with none of them is not a netswap run log.
RUN_EVENTS = frozenset({"run.start", "vm.sample", "watchdog.deadlock", "run.summary"})

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
    #: The summary as a record (None without one, or if it is not a run summary).
    result: RunSummary | None = None

    @property
    def outcome(self) -> str:
        """``completed``, ``deadlock``, ``integrity_error``, ``error`` or ``unfinished``."""
        if self.result is not None:
            return self.result.outcome
        if self.summary is None:
            return UNFINISHED
        return str(self.summary.get("outcome", UNFINISHED))  # not a whole summary

    @property
    def reason(self) -> str:
        if self.result is not None:
            return self.result.reason or ""
        if self.summary is None:
            return "no run.summary in the log: the process was stopped"
        return str(self.summary.get("reason") or "")

    @property
    def duration(self) -> float | None:
        """The summary's ``duration`` (seconds of the run's clock), else the last sample's
        ``t``."""
        if self.result is not None and self.result.duration is not None:
            return self.result.duration
        return self.last_t

    @property
    def last_t(self) -> float | None:
        """The last sample's ``t``, None without samples."""
        times = [t for t in (number(s.get("t")) for s in self.samples) if t is not None]
        return times[-1] if times else None

    @property
    def end_time(self) -> float | None:
        """When the run ended on its clock, for a timeline.  For a deadlock, when the
        watchdog fired: its event's ``t`` if it has one, else the last sample (the sampler
        stops with the run, at most a sample interval after it): the summary's ``duration``
        is taken later, after the swap device's close has waited for its timeout.
        Otherwise the ``duration``."""
        if self.deadlock is not None:
            fired = number(self.deadlock.get("t"))
            if fired is not None:
                return fired
        if self.outcome == "deadlock" and self.last_t is not None:
            return self.last_t
        return self.duration

    def series(self, field: str) -> list[float]:
        """One numeric field of every sample (missing or non-numeric values as 0)."""
        return [number(s.get(field)) or 0.0 for s in self.samples]


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
            t, last = number(fields.get("t")), number(self.samples[-1].get("t"))
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
            result=_structured(self.summary),
        )


def _structured(summary: dict[str, Any] | None) -> RunSummary | None:
    if summary is None:
        return None
    try:
        return structure_summary(summary)
    except ValueError:  # not what netswap writes: the report says what it can without it
        return None


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


def number(value: object) -> float | None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    return float(value)


def whole(value: object) -> int | None:
    n = number(value)
    return None if n is None else int(n)
