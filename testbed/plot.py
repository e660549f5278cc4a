"""Plot the runs of a netswap log: free pages against the watermarks, writeback, drops.

One column of three panels per run, side by side, on one time axis (seconds of the run's
clock) so the runs of a comparison can be read against each other:

1. free pages (the machine's ``nr_free_pages``) against the ``min``/``low``/``high``
   watermarks (dashed) and 3/8 of min, the floor of a GFP_ATOMIC allocation (dotted).
   With several zones the watermarks are summed over the zones, as the report does
   (:func:`testbed.report.sample_watermarks`): exact for one zone, an approximation for
   more.  The watermarks are drawn as they were at each sample, since a policy may move
   them (the reserve policy raises min while its reserves exist).  The y axis stops at
   three times the highest ``high`` watermark, or a little above nine samples in ten if
   the machine was rarely under pressure: the start, with all memory free, is off scale
   and marked with its peak.
2. pages in writeback (``nr_writeback``), pages served below min still in use
   (``nr_emergency``), pages charged to the reserve policy's reserves
   (``reserve_used``), and the network's pages: the receive ring's (``ring_pages``, posted
   or queued on sockets) and unacknowledged TX (``tx_pages``), where the samples have them
   (a model run's do; a kernel run's and older logs' do not).
3. RX drops (``PFMemallocDrop`` + ``rx_alloc_fail``, cumulative, left axis) and
   ``pswpout`` (cumulative, right axis).

A vertical line marks the end of each run (:attr:`testbed.report.Run.end_time`): red
"deadlock" when the watchdog fired, green "completed", grey "unfinished" (no
``run.summary``), orange for an error.  A run
without samples gets panels that say so.

matplotlib is an optional dependency (the ``plot`` extra), imported when a plot is drawn;
the figure is drawn with the Agg canvas and never touches pyplot, so it works headless.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import attrs

from testbed.report import LogRuns, ReportError, Run, Watermarks, sample_watermarks

if TYPE_CHECKING:
    from matplotlib.axes import Axes

__all__ = ["PlotInfo", "plot_runs"]

DPI = 100
INCHES_PER_RUN = 4.0
HEIGHT_INCHES = 7.0

#: The colour of the end-of-run line, by outcome (others: ``error``).
END_COLOURS = {
    "deadlock": "tab:red",
    "completed": "tab:green",
    "unfinished": "tab:grey",
    "integrity_error": "tab:purple",
}
ERROR_COLOUR = "tab:orange"

#: The second panel's series: field, colour, label.  The network's are drawn only where
#: the samples have them (older logs and kernel runs do not).
PAGE_SERIES = (
    ("nr_writeback", "tab:blue", "nr_writeback"),
    ("nr_emergency", "tab:red", "nr_emergency (below min)"),
    ("reserve_used", "tab:purple", "reserve_used"),
    ("ring_pages", "tab:olive", "ring_pages (RX ring)"),
    ("tx_pages", "tab:cyan", "tx_pages (unacked TX)"),
)
_OPTIONAL_PAGE_SERIES = frozenset({"ring_pages", "tx_pages"})


@attrs.frozen
class PlotInfo:
    """What :func:`plot_runs` drew, so a caller (or a test) can check the data went in."""

    path: Path
    #: Column titles, one per run: ``policy — outcome``.
    runs: tuple[str, ...]
    #: ``vm.sample`` points plotted per run.
    points: tuple[int, ...]
    #: Lowest and highest free pages plotted per run (None for a run without samples).
    free_pages: tuple[tuple[int, int] | None, ...]
    #: The fields drawn in each run's pages panel (the network's only where sampled).
    page_series: tuple[tuple[str, ...], ...]
    #: Where each run's end line is drawn (seconds of the run's clock; None: not drawn).
    ends: tuple[float | None, ...]
    #: The y-axis limits of the free-pages panels (shared by every run).
    free_ylim: tuple[float, float]
    #: Image size in pixels (width, height).
    size: tuple[int, int]


def plot_runs(
    runs: LogRuns | Sequence[Run],
    out_path: str | os.PathLike[str],
    *,
    title: str | None = None,
) -> PlotInfo:
    """Draw the runs into a PNG at ``out_path``; raise :class:`ReportError` if there is no
    run, matplotlib is missing, or the file cannot be written."""
    chosen = list(runs)
    if not chosen:
        raise ReportError("nothing to plot: the log has no runs")
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        raise ReportError("plotting needs matplotlib: pip install 'netswap[plot]'") from None

    several_machines = len({r.machine for r in chosen}) > 1
    width = max(5.0, INCHES_PER_RUN * len(chosen))
    fig = Figure(figsize=(width, HEIGHT_INCHES), dpi=DPI, layout="constrained")
    FigureCanvasAgg(fig)
    grid = fig.subplots(3, len(chosen), sharex=True, squeeze=False)
    if title is None:
        title = f"netswap: {Path(runs.source).name}" if isinstance(runs, LogRuns) else "netswap"
    fig.suptitle(title)

    ends = [r.end_time or 0.0 for r in chosen]
    t_max = max([*ends, *(max(r.series("t"), default=0.0) for r in chosen)])
    free_ylim = _free_ylim(chosen)
    pages_top = _top(r.series(k) for r in chosen for k, _colour, _label in PAGE_SERIES)
    drops_top = _top(r.series("drops") for r in chosen)
    pswpout_top = _top(r.series("pswpout") for r in chosen)

    titles, points, ranges = [], [], []
    page_series: list[tuple[str, ...]] = []
    for col, run in enumerate(chosen):
        free_ax, pages_ax, net_ax = grid[0][col], grid[1][col], grid[2][col]
        first = col == 0
        heading = f"{run.policy} — {run.outcome}"
        if several_machines:
            heading = f"{run.machine}: {heading}"
        titles.append(heading)
        free_ax.set_title(heading, fontsize=10)
        points.append(len(run.samples))
        ranges.append(_free_panel(free_ax, run, free_ylim, legend=first))
        page_series.append(_pages_panel(pages_ax, run, pages_top, legend=first))
        _net_panel(net_ax, run, drops_top, pswpout_top, legend=first, right=col == len(chosen) - 1)
        for ax in (free_ax, pages_ax, net_ax):
            ax.set_xlim(0.0, max(t_max * 1.03, 0.1))
            ax.grid(True, color="0.9", linewidth=0.5)
            _end_line(ax, run, label=ax is free_ax)
            if not run.samples:
                ax.text(
                    0.5,
                    0.5,
                    "no vm.sample events",
                    transform=ax.transAxes,
                    ha="center",
                    va="center",
                    color="0.4",
                )
        net_ax.set_xlabel("time (s, run clock)")
        if first:
            free_ax.set_ylabel("free pages")
            pages_ax.set_ylabel("pages")
            net_ax.set_ylabel("RX drops")

    path = Path(out_path)
    try:
        fig.savefig(path, format="png", dpi=DPI, metadata={"Software": None})
    except OSError as e:
        raise ReportError(f"{path}: cannot write the plot: {e.strerror or e}") from None
    return PlotInfo(
        path=path,
        runs=tuple(titles),
        points=tuple(points),
        free_pages=tuple(ranges),
        page_series=tuple(page_series),
        ends=tuple(r.end_time for r in chosen),
        free_ylim=free_ylim,
        size=(round(width * DPI), round(HEIGHT_INCHES * DPI)),
    )


def _top(series: Any) -> float:
    """A shared upper y limit: 5% above the largest value, at least 1."""
    peak = max((max(s, default=0.0) for s in series), default=0.0)
    return max(1.0, peak * 1.05)


def _marks(run: Run) -> list[Watermarks | None]:
    """Each sample's watermarks (summed over zones), the summary's when a sample has none."""
    fallback = None
    if run.result is not None and run.result.memory is not None:
        fallback = sample_watermarks(run.result.memory.zones)
    return [sample_watermarks(s.get("zones")) or fallback for s in run.samples]


def _free_ylim(runs: Sequence[Run]) -> tuple[float, float]:
    """0 to three times the highest ``high`` watermark, or 10% above the 90th percentile of
    free pages when that is higher (a machine rarely under pressure)."""
    highs = [m.high for r in runs for m in _marks(r) if m is not None]
    free = sorted(v for r in runs for v in r.series("nr_free_pages"))
    p90 = free[int(0.9 * (len(free) - 1))] if free else 0.0
    return 0.0, max(3.0 * max(highs, default=0), 1.1 * p90, 1.0)


def _free_panel(
    ax: Axes, run: Run, ylim: tuple[float, float], *, legend: bool
) -> tuple[int, int] | None:
    t = run.series("t")
    free = run.series("nr_free_pages")
    ax.set_ylim(*ylim)
    if not free:
        return None
    marks = _marks(run)
    if any(m is not None for m in marks):
        for name, colour, style in (
            ("high", "tab:green", "--"),
            ("low", "tab:orange", "--"),
            ("min", "tab:red", "--"),
        ):
            values = [float(getattr(m, name)) if m else float("nan") for m in marks]
            ax.plot(t, values, style, color=colour, linewidth=1, drawstyle="steps-post", label=name)
        floor = [float(m.atomic_floor) if m else float("nan") for m in marks]
        ax.plot(
            t,
            floor,
            ":",
            color="darkred",
            linewidth=1.2,
            drawstyle="steps-post",
            label="3/8 min (GFP_ATOMIC)",
        )
    ax.plot(t, free, "-", color="tab:blue", linewidth=1.5, label="free pages")
    peak = max(free)
    if peak > ylim[1]:
        ax.annotate(
            f"peak {peak:.0f} off scale",
            xy=(t[free.index(peak)], ylim[1]),
            xytext=(4, -12),
            textcoords="offset points",
            fontsize=7,
            color="tab:blue",
        )
    if legend:
        ax.legend(loc="center right", fontsize=7)
    return int(min(free)), int(peak)


def _pages_panel(ax: Axes, run: Run, top: float, *, legend: bool) -> tuple[str, ...]:
    """Draw the pages panel; return the fields drawn."""
    ax.set_ylim(0.0, top)
    if not run.samples:
        return ()
    t = run.series("t")
    drawn = []
    for field, colour, label in PAGE_SERIES:
        if field in _OPTIONAL_PAGE_SERIES and not any(field in s for s in run.samples):
            continue
        ax.plot(t, run.series(field), color=colour, linewidth=1.2, label=label)
        drawn.append(field)
    if legend:
        ax.legend(loc="upper right", fontsize=7)
    return tuple(drawn)


def _net_panel(
    ax: Axes, run: Run, drops_top: float, pswpout_top: float, *, legend: bool, right: bool
) -> None:
    ax.set_ylim(0.0, drops_top)
    twin = ax.twinx()
    twin.set_ylim(0.0, pswpout_top)
    if right:
        twin.set_ylabel("pswpout", color="tab:blue")
    else:
        twin.tick_params(labelright=False)
    if not run.samples:
        return
    t = run.series("t")
    lines = ax.plot(t, run.series("drops"), color="tab:red", linewidth=1.5, label="RX drops")
    lines += twin.plot(
        t, run.series("pswpout"), color="tab:blue", linewidth=1.2, label="pswpout (right)"
    )
    if legend:
        ax.legend(handles=lines, loc="upper left", fontsize=7)


def _end_line(ax: Axes, run: Run, *, label: bool) -> None:
    end = run.end_time
    if end is None:
        return
    colour = END_COLOURS.get(run.outcome, ERROR_COLOUR)
    ax.axvline(end, color=colour, linewidth=1.5)
    if label:
        ax.annotate(
            run.outcome,
            xy=(end, 1.0),
            xycoords=("data", "axes fraction"),
            xytext=(-3, -4),
            textcoords="offset points",
            rotation=90,
            ha="right",
            va="top",
            fontsize=8,
            color=colour,
        )
