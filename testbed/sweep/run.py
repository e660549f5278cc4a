"""A sweep from its plan to its database: skip the runs already done, hand the others to
local worker processes or to a Dask cluster, write each row as its run finishes.

The runs go out seed by seed (every cell and policy at the first seed, then at the next), so
a sweep stopped early has a coarse map of the whole grid rather than a fine one of a part.
"""

from __future__ import annotations

import gzip
import os
from collections import Counter
from collections.abc import Iterator
from contextlib import ExitStack
from pathlib import Path
from typing import TYPE_CHECKING

import attrs

from testbed.sweep.execute import Job, RunResult, code_version, execute
from testbed.sweep.grid import RunSpec, SweepPlan
from testbed.sweep.pool import LocalPool, WorkerDied
from testbed.sweep.progress import SweepProgress
from testbed.sweep.store import SweepStore

if TYPE_CHECKING:
    from testbed.sweep.cluster import DaskRunner


@attrs.frozen
class SweepReport:
    """What one invocation did."""

    directory: Path
    planned: int  # runs the plan has
    skipped: int  # of those, already in the database
    ran: Counter[str]  # results of the runs done now
    retried: int = 0  # rows of raised runs deleted by --retry-errors
    other_code: int = 0  # rows in the database made by other code


def default_jobs() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not Linux
        return os.cpu_count() or 1


def run_sweep(
    plan: SweepPlan,
    directory: str | Path,
    *,
    jobs: int | None = None,
    scheduler: str | None = None,
    scheduler_timeout: float | None = None,
    retry_errors: bool = False,
    log_level: str = "info",
    live: bool | None = None,
) -> SweepReport:
    """Run what ``plan`` has that ``directory``'s database has not.  Raises ConfigError
    (before any run, and before DIR is made) if the scheduler cannot be used or DIR holds
    another sweep; KeyboardInterrupt leaves every finished run in the database."""
    with ExitStack() as stack:
        if scheduler is not None:
            from testbed.sweep.cluster import CONNECT_TIMEOUT, DaskRunner

            dask = DaskRunner(scheduler, timeout=scheduler_timeout or CONNECT_TIMEOUT)
            runner: _Runner = _OnDask(stack.enter_context(dask))
        else:
            runner = _Local(jobs or default_jobs())
        store = SweepStore.create_or_resume(directory, plan.definition)
        stack.callback(store.close)
        retried = store.forget_raised() if retry_errors else 0
        done = store.done()
        seeds = {s: i for i, s in enumerate(plan.seeds)}
        todo = sorted(
            ((n, spec, scenario) for n, (spec, scenario) in enumerate(plan.runs)
             if spec.key not in done),
            key=lambda t: (seeds[t[1].seed], t[0]),
        )  # fmt: skip
        code = code_version()
        report = SweepReport(
            Path(directory),
            len(plan.runs),
            len(plan.runs) - len(todo),
            Counter(),
            retried,
            store.other_code(code),
        )
        if not todo:
            return report
        specs = {spec.key: spec for _, spec, _ in todo}
        work = [Job(spec.key, scenario, spec.policy, log_level) for _, spec, scenario in todo]
        with SweepProgress(len(plan.runs), report.skipped, live=live) as progress:
            if report.other_code:
                progress.note(
                    f"note: {report.other_code} runs already in {directory} were made by "
                    f"other netswap code than this (code {code}; see the code column)"
                )
            for job, result, attempts in runner.results(work, progress, specs):
                outcome = store.record(specs[job.key], result, attempts=attempts, code=code)
                report.ran[outcome] += 1
                progress.advance(outcome)
        return report
    raise AssertionError("unreachable")  # pragma: no cover - mypy: ExitStack may swallow


class _Runner:
    """Where the runs go: each job with its result and how many tries it took."""

    def results(
        self, work: list[Job], progress: SweepProgress, specs: dict[str, RunSpec]
    ) -> Iterator[tuple[Job, RunResult, int]]:
        raise NotImplementedError


@attrs.define
class _OnDask(_Runner):
    dask: DaskRunner

    def results(
        self, work: list[Job], progress: SweepProgress, specs: dict[str, RunSpec]
    ) -> Iterator[tuple[Job, RunResult, int]]:
        progress.note(f"sweep: {len(work)} runs on {self.dask.workers} Dask workers")
        for job, value in self.dask.run(work):
            if isinstance(value, RunResult):
                yield job, value, 1
            else:
                yield job, _failed(job, f"Dask gave up on it: {value}"), 1


@attrs.define
class _Local(_Runner):
    jobs: int

    def results(
        self, work: list[Job], progress: SweepProgress, specs: dict[str, RunSpec]
    ) -> Iterator[tuple[Job, RunResult, int]]:
        def died(job: Job, description: str, again: bool) -> None:
            what = "running it again" if again else "recorded as an error"
            progress.note(
                f"sweep: the worker running {specs[job.key].label()} died ({description}); {what}"
            )

        with LocalPool(execute, self.jobs, retries=1, on_death=died) as pool:
            for job, got, attempts in pool.run(work):
                if isinstance(got, WorkerDied):
                    error = f"WorkerDied: its worker process died {got.attempts} times"
                    yield job, _failed(job, f"{error} ({got.description})"), attempts
                else:
                    yield job, got, attempts


def _failed(job: Job, error: str) -> RunResult:
    """The result of a run that never came back."""
    return RunResult(
        key=job.key,
        summary=None,
        error=error,
        traceback=None,
        log_gz=gzip.compress(b"", mtime=0),
        wall_seconds=0.0,
        host="",
    )
