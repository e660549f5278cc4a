"""Read a netswap log back and tell its runs' story: :mod:`~testbed.report.log` splits the
log into runs, :mod:`~testbed.report.facts` says what each run's summary and samples show,
:mod:`~testbed.report.render` writes it as text or JSON.  Plotting is :mod:`testbed.plot`."""

from testbed.report.facts import (
    SAMPLE_VMSTAT,
    VMSTAT_KEYS,
    RunFacts,
    Watermarks,
    atomic_floor,
    run_facts,
    sample_watermarks,
)
from testbed.report.log import UNFINISHED, LogRuns, ReportError, Run, load_runs
from testbed.report.render import format_table, render_report, report_json

__all__ = [
    "SAMPLE_VMSTAT",
    "UNFINISHED",
    "VMSTAT_KEYS",
    "LogRuns",
    "ReportError",
    "Run",
    "RunFacts",
    "Watermarks",
    "atomic_floor",
    "format_table",
    "load_runs",
    "render_report",
    "report_json",
    "run_facts",
    "sample_watermarks",
]
