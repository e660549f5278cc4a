"""What the run commands print and write: the outcome line, the comparison table, the
``--summary`` file."""

from __future__ import annotations

import json
from typing import Any

from client.summary import RunSummary
from testbed.report import format_table


def write_summary(path: str | None, summary: dict[str, Any]) -> None:
    """``summary`` (JSON-able: ``unstructure_summary`` of a run, or ``{runs: ...}``) as
    ``--summary FILE`` writes it."""
    if path:
        with open(path, "w", encoding="utf-8") as fh:
            json.dump(summary, fh, indent=2, default=str)
            fh.write("\n")


def outcome_line(summary: RunSummary) -> str:
    integ = summary.integrity
    assert integ is not None
    return (
        f"{summary.machine}: {summary.outcome}"
        + (f" ({summary.reason})" if summary.reason else "")
        + f" in {summary.duration or 0:.1f}s; pages verified {integ.pages_verified},"
        f" corrupt {integ.corrupt}; pswpout {summary.counter('pswpout')},"
        f" pswpin {summary.counter('pswpin')}, allocstall {summary.counter('allocstall')}"
    )


def print_outcome(summary: RunSummary) -> None:
    print(outcome_line(summary))


def compare_table(runs: list[RunSummary]) -> str:
    """policy, outcome, time, pswpout, minimum free pages, reserve peak, drops, throttled."""
    header = (
        "policy",
        "outcome",
        "time s",
        "pswpout",
        "min free",
        "reserve peak",
        "drops",
        "throttled",
        "verified",
        "corrupt",
    )
    rows = [header]
    for r in runs:
        integrity = r.integrity
        peak = r.reserve_peak
        rows.append(
            (
                r.policy,
                r.outcome,
                "?" if r.duration is None else f"{r.duration:.1f}",
                str(r.counter("pswpout")),
                "" if r.min_free_pages is None else str(r.min_free_pages),
                "-" if peak is None else str(peak),
                str(r.drops),
                str(r.counter("pgscan_direct_throttle")),
                str(integrity.pages_verified if integrity else None),
                str(integrity.corrupt if integrity else None),
            )
        )
    lines = format_table(rows)
    for r in runs:
        deadlock = r.deadlock
        if deadlock and deadlock.cycle:
            lines.append(f"{r.policy}: {deadlock.chain()}")
        elif deadlock:  # a guest's: no wait-for graph, the blocked tasks of sysrq w
            waits = "; ".join(f"{t}: {w}" for t, w in (deadlock.waiting or {}).items())
            lines.append(f"{r.policy}: blocked: {waits}")
    return "\n".join(lines)
