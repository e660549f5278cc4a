"""What a sweep found, read from its database: P(completed) per cell and policy, as a table
(``netswap sweep show``) or as maps (``netswap sweep plot``).

A cell is a combination of grid values; its runs are every seed of it (and, when the map
shows fewer keys than the grid has, every value of the other keys: pooled, and said so).
Each cell tells how many runs completed out of how many, and what the others came to, by
``result`` (:func:`testbed.sweep.store.result_of`: the machine's outcome, with its errors
told apart).  In a map, a cell where some runs completed is green, darker as more did; a
cell where none did takes the colour of its most common failure.

matplotlib is an optional dependency (the ``plot`` extra), imported when a map is drawn; the
figure uses the Agg canvas and never pyplot, so it works headless.
"""

from __future__ import annotations

import itertools
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import attrs

from nbdproto.config import ConfigError
from testbed.config import POLICY_NAMES
from testbed.sweep.grid import Axis
from testbed.sweep.store import SweepStore, sql_name

#: Colours of the results that are not ``completed`` (matplotlib's tab10 names).
RESULT_COLOURS = {
    "deadlock": "tab:red",
    "integrity_error": "tab:purple",
    "oom": "tab:brown",
    "time_limit": "tab:orange",
    "error": "tab:pink",
    "raised": "tab:gray",
}
OTHER_COLOUR = "black"
#: Short names of the failures, for the cells of the table and the maps.
ABBREVIATIONS = {
    "deadlock": "DL",
    "integrity_error": "INT",
    "oom": "OOM",
    "time_limit": "TL",
    "error": "ERR",
    "raised": "EXC",
}


def abbreviation(result: str) -> str:
    return ABBREVIATIONS.get(result, result[:3].upper())


@attrs.frozen
class Tally:
    """The results of one cell's runs under one policy."""

    counts: tuple[tuple[str, int], ...] = ()  # (result, runs), most first

    @property
    def runs(self) -> int:
        return sum(n for _, n in self.counts)

    @property
    def completed(self) -> int:
        return dict(self.counts).get("completed", 0)

    @property
    def p_completed(self) -> float | None:
        return self.completed / self.runs if self.runs else None

    @property
    def failures(self) -> tuple[tuple[str, int], ...]:
        return tuple((r, n) for r, n in self.counts if r != "completed")

    @property
    def worst(self) -> str | None:
        """The most common failure (None if every run completed)."""
        return self.failures[0][0] if self.failures else None

    def text(self) -> str:
        """``3/5 DL2``: completed of runs, then each failure and how many."""
        if not self.runs:
            return "-"
        failures = " ".join(f"{abbreviation(r)}{n}" for r, n in self.failures)
        return f"{self.completed}/{self.runs}" + (f" {failures}" if failures else "")


@attrs.frozen
class SweepTally:
    """A sweep's runs counted by cell of ``axes`` (a subset of its grid) and policy."""

    scenario: str
    axes: tuple[Axis, ...]
    pooled: tuple[str, ...]  # the grid keys not in axes, whose values are pooled
    policies: tuple[str, ...]
    cells: dict[tuple[str, tuple[int, ...]], Tally]  # (policy, value indexes) -> tally

    def get(self, policy: str, indexes: tuple[int, ...]) -> Tally:
        return self.cells.get((policy, indexes), Tally())

    @property
    def runs(self) -> int:
        return sum(t.runs for t in self.cells.values())


def tally(store: SweepStore, keys: Sequence[str] | None = None) -> SweepTally:
    """Count the runs of ``store`` by the grid ``keys`` (default: all), policy and result."""
    grid = {a.key: a for a in store.grid}
    keys = list(keys) if keys is not None else list(grid)
    for key in keys:
        if key not in grid:
            raise ConfigError(f"{key!r} is not a key of this sweep's grid ({', '.join(grid)})")
    axes = tuple(grid[k] for k in keys)
    columns = [sql_name(k) for k in keys]
    rows = store.query(
        f"SELECT policy, {''.join(c + ', ' for c in columns)}result, count(*) FROM runs "
        f"GROUP BY ALL"
    )
    counters: dict[tuple[str, tuple[int, ...]], Counter[str]] = {}
    seen: set[str] = set()
    for row in rows:
        policy, *values, result, n = row
        try:
            indexes = tuple(a.stored.index(v) for a, v in zip(axes, values, strict=True))
        except ValueError:  # a value the grid does not have (edited by hand): not mapped
            continue
        seen.add(policy)
        counters.setdefault((policy, indexes), Counter())[str(result)] += int(n)
    cells = {
        cell: Tally(tuple(sorted(c.items(), key=lambda kv: (-kv[1], kv[0]))))
        for cell, c in counters.items()
    }
    policies = tuple(p for p in POLICY_NAMES if p in seen) + tuple(sorted(seen - set(POLICY_NAMES)))
    pooled = tuple(k for k in grid if k not in keys)
    return SweepTally(str(store.info["scenario"]), axes, pooled, policies, cells)


def all_cells(axes: Sequence[Axis]) -> list[tuple[int, ...]]:
    return list(itertools.product(*(range(len(a.raws)) for a in axes)))


# -- the table -------------------------------------------------------------------------------
LEGEND = "completed/runs, then the others: " + ", ".join(
    f"{abbreviation(r)} {r}" for r in RESULT_COLOURS
)


def render_table(t: SweepTally) -> Any:
    """A rich Table: a row per cell of the grid, a column per policy."""
    from rich.table import Table

    table = Table(title=f"netswap sweep: {Path(t.scenario).name}, {t.runs} runs")
    for axis in t.axes:
        table.add_column(axis.key, justify="right")
    for policy in t.policies:
        table.add_column(policy, justify="left")
    for indexes in all_cells(t.axes):
        row = [a.raws[i] for a, i in zip(t.axes, indexes, strict=True)]
        for policy in t.policies:
            cell = t.get(policy, indexes)
            style = (
                "" if not cell.runs
                else "green" if cell.completed == cell.runs
                else "red" if not cell.completed
                else "yellow"
            )  # fmt: skip
            row.append(f"[{style}]{cell.text()}[/]" if style else cell.text())
        table.add_row(*row)
    return table


# -- the maps ---------------------------------------------------------------------------------
@attrs.frozen
class MapInfo:
    """What :func:`plot_sweep` drew (for the caller and the tests)."""

    path: Path
    kind: str  # "heatmap" or "line"
    policies: tuple[str, ...]
    x: str
    y: str | None
    pooled: tuple[str, ...]
    size: tuple[int, int]


def plot_sweep(
    store: SweepStore, out: str | Path, *, x: str | None = None, y: str | None = None
) -> MapInfo:
    """One heat map per policy of P(completed) over ``x`` × ``y`` (a line per policy over
    ``x`` when the grid has one key), into the PNG ``out``."""
    keys = [a.key for a in store.grid]
    x = x or keys[0]
    if y is None:
        y = next((k for k in keys if k != x), None)
    if y is not None and y == x:
        raise ConfigError(f"--x and --y are both {x!r}; choose two keys of the grid")
    t = tally(store, [x] if y is None else [x, y])
    if not t.runs:
        raise ConfigError(f"{store.dir}: no runs in the database yet; nothing to plot")
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        raise ConfigError("plotting needs matplotlib: pip install 'netswap[plot]'") from None

    n = len(t.policies)
    if y is None:
        fig = Figure(figsize=(7.5, 4.8), dpi=100, layout="constrained")
    else:
        fig = Figure(figsize=(max(6.0, 4.3 * n + 1.2), 4.9), dpi=100, layout="constrained")
    FigureCanvasAgg(fig)
    title = f"netswap sweep: {Path(t.scenario).name} — P(completed)"
    if t.pooled:
        title += f", pooled over {', '.join(t.pooled)}"
    fig.suptitle(title, fontsize=11)
    if y is None:
        _line_plot(fig, t)
    else:
        _heat_maps(fig, t)
    path = Path(out)
    try:
        fig.savefig(path)
    except OSError as exc:
        raise ConfigError(f"--out {path}: {exc.strerror or exc}") from None
    width, height = fig.canvas.get_width_height()
    return MapInfo(
        path, "line" if y is None else "heatmap", t.policies, x, y, t.pooled, (width, height)
    )


def _heat_maps(fig: Any, t: SweepTally) -> None:
    import numpy as np
    from matplotlib import colormaps
    from matplotlib.colors import Normalize, to_rgb
    from matplotlib.patches import Patch

    xa, ya = t.axes
    greens = colormaps["Greens"]
    shade = Normalize(vmin=0.0, vmax=1.0)

    def green(p: float) -> tuple[float, float, float]:
        r, g, b, _ = greens(0.25 + 0.7 * p)  # light at a few completions, dark at all
        return (r, g, b)

    axes = fig.subplots(1, len(t.policies), squeeze=False)[0]
    failures_seen: set[str] = set()
    for ax, policy in zip(axes, t.policies, strict=True):
        image = np.ones((len(ya.raws), len(xa.raws), 3))
        for ix, iy in itertools.product(range(len(xa.raws)), range(len(ya.raws))):
            cell = t.get(policy, (ix, iy))
            p = cell.p_completed
            if p is None:
                colour: tuple[float, float, float] = (1.0, 1.0, 1.0)
            elif p > 0:
                colour = green(p)
            else:
                worst = cell.worst or "error"
                failures_seen.add(worst)
                colour = to_rgb(RESULT_COLOURS.get(worst, OTHER_COLOUR))
            image[iy, ix] = colour
            lines = [cell.text().split(" ", 1)[0]]
            if cell.failures:
                lines.append(" ".join(f"{abbreviation(r)}{n}" for r, n in cell.failures))
            light = sum(c * w for c, w in zip(colour, (0.299, 0.587, 0.114), strict=True)) > 0.55
            ax.text(
                ix,
                iy,
                "\n".join(lines),
                ha="center",
                va="center",
                fontsize=8 if len(xa.raws) <= 8 else 6,
                color="black" if light else "white",
            )
        ax.imshow(image, origin="lower", aspect="auto", interpolation="nearest")
        ax.set_xticks([i - 0.5 for i in range(1, len(xa.raws))], minor=True)
        ax.set_yticks([i - 0.5 for i in range(1, len(ya.raws))], minor=True)
        ax.grid(which="minor", color="white", linewidth=1.5)
        ax.tick_params(which="minor", length=0)
        ax.set_xticks(range(len(xa.raws)), xa.raws, rotation=45 if len(xa.raws) > 6 else 0)
        ax.set_yticks(range(len(ya.raws)), ya.raws)
        ax.set_xlabel(xa.key)
        if ax is axes[0]:
            ax.set_ylabel(ya.key)
        ax.set_title(policy)
    from matplotlib.cm import ScalarMappable
    from matplotlib.colors import ListedColormap

    scale = ListedColormap([green(p) for p in np.linspace(0.0, 1.0, 64)])
    fig.colorbar(
        ScalarMappable(norm=shade, cmap=scale),
        ax=list(axes),
        label="P(completed), where any run completed",
        shrink=0.85,
    )
    if failures_seen:
        fig.legend(
            handles=[
                Patch(color=RESULT_COLOURS.get(r, OTHER_COLOUR), label=f"no run completed: {r}")
                for r in sorted(failures_seen)
            ],
            loc="outside lower center",
            ncols=min(4, len(failures_seen)),
            fontsize=8,
            frameon=False,
        )


def _line_plot(fig: Any, t: SweepTally) -> None:
    (xa,) = t.axes
    ax = fig.subplots()
    xs = list(range(len(xa.raws)))
    runs = {t.get(p, (i,)).runs for p in t.policies for i in xs} - {0}
    for k, policy in enumerate(t.policies):
        cells = [t.get(policy, (i,)) for i in xs]
        points = [(i, c) for i, c in zip(xs, cells, strict=True) if c.runs]
        colour = f"C{k}"
        ax.plot(
            [i for i, _ in points],
            [c.p_completed for _, c in points],
            marker="o",
            color=colour,
            label=policy,
            zorder=2,
        )
        for i, c in points:
            if c.completed == 0:  # none completed: a marker in the colour of the failure
                ax.scatter(
                    [i], [0.0], s=90, zorder=3, edgecolors=colour, linewidths=1.5,
                    color=RESULT_COLOURS.get(c.worst or "error", OTHER_COLOUR),
                )  # fmt: skip
            label = c.text() if len(runs) > 1 else c.text().partition(" ")[2]
            if label:  # completed/runs where the counts differ; the failures, if any
                ax.annotate(
                    label, (i, c.p_completed or 0.0), fontsize=7,
                    textcoords="offset points", xytext=(5, 5 + 9 * k), color=colour,
                )  # fmt: skip
    ax.set_xticks(xs, xa.raws)
    ax.set_xlabel(xa.key)
    ax.set_ylabel("P(completed)")
    ax.set_ylim(-0.08, 1.08)
    ax.grid(True, color="0.9", linewidth=0.5)
    failures = sorted({c.worst or "error" for c in t.cells.values() if c.runs and c.completed == 0})
    handles, _ = ax.get_legend_handles_labels()
    from matplotlib.lines import Line2D

    for r in failures:
        handles.append(
            Line2D(
                [], [], marker="o", linestyle="", markersize=8,
                color=RESULT_COLOURS.get(r, OTHER_COLOUR), label=f"no run completed: {r}",
            )
        )  # fmt: skip
    ax.legend(handles=handles, fontsize=8, loc="best")
    if len(runs) == 1:
        ax.set_title(f"{runs.pop()} runs per point", fontsize=9)
