"""The live display of a sweep: runs done of the total, the rate, the time left and the
outcomes so far, redrawn in place on a terminal (rich).  Off a terminal there is none of
it, only the notes (a worker that died) as plain lines on stderr."""

from __future__ import annotations

import sys
from collections import Counter
from types import TracebackType
from typing import Any

from rich.progress import ProgressColumn, Task
from rich.text import Text


class SweepProgress:
    """``with SweepProgress(total, done) as progress: progress.advance(result)``."""

    def __init__(self, total: int, done: int, *, live: bool | None = None) -> None:
        self.total = total
        self.counts: Counter[str] = Counter()
        self._done = done
        self._live = sys.stderr.isatty() if live is None else live
        self._progress: Any = None
        self._task: Any = None

    def __enter__(self) -> SweepProgress:
        if self._live:
            from rich.console import Console
            from rich.progress import (
                BarColumn,
                MofNCompleteColumn,
                Progress,
                TextColumn,
                TimeElapsedColumn,
                TimeRemainingColumn,
            )

            self._progress = Progress(
                TextColumn("sweep"),
                BarColumn(),
                MofNCompleteColumn(),
                _RateColumn(),
                TimeElapsedColumn(),
                TextColumn("eta"),
                TimeRemainingColumn(),
                TextColumn("{task.fields[outcomes]}"),
                console=Console(stderr=True),
                transient=False,
            )
            self._progress.start()
            self._task = self._progress.add_task(
                "sweep", total=self.total, completed=self._done, outcomes=""
            )
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self._progress is not None:
            self._progress.stop()

    def advance(self, result: str) -> None:
        self.counts[result] += 1
        if self._progress is not None:
            outcomes = " ".join(f"{k} {n}" for k, n in sorted(self.counts.items()))
            self._progress.update(self._task, advance=1, outcomes=outcomes)

    def note(self, line: str) -> None:
        """A line for the user (above the live display on a terminal)."""
        if self._progress is not None:
            self._progress.console.print(line, markup=False, highlight=False)
        else:
            print(line, file=sys.stderr, flush=True)


class _RateColumn(ProgressColumn):
    """Runs per second (rich's estimate over the last half minute)."""

    def render(self, task: Task) -> Text:
        speed = task.speed
        if speed is None:
            return Text("- runs/s")
        return Text(f"{speed:.2f} runs/s" if speed < 10 else f"{speed:.0f} runs/s")
