"""Runs of a scenario for ``run``, ``compare`` and ``compare --seeds``: one at a time in
this process, or ``--jobs`` at a time in worker processes (``testbed.sweep.pool``), with
the summaries and the log in the order of the work either way.  Each run is
``testbed.scenario``'s: the one orchestration of a run that ``netswap sweep`` uses too."""

from __future__ import annotations

import argparse
import json
import sys

import attrs
import trio

from client.summary import RunSummary
from nbdproto.config import ConfigError
from testbed import log as logsetup
from testbed.cli.common import RunFailed, leaves
from testbed.config import ScenarioConfig
from testbed.sweep.pool import LocalPool, WorkerDied

Work = list[tuple[str, ScenarioConfig, str]]
"""(label for progress, scenario, policy) for each run, in the order the results go."""


def run_one(scenario: ScenarioConfig, policy: str | None, clock: str) -> RunSummary:
    from testbed.scenario import run_scenario, run_virtual

    if clock == "virtual":
        return run_virtual(scenario, policy)
    return trio.run(lambda: run_scenario(scenario, policy=policy, transport="tcp"))


def run_all(
    args: argparse.Namespace, work: Work, capture: logsetup.Capture | None
) -> list[RunSummary]:
    """Every run of ``work``, one at a time in this process or ``--jobs`` at a time in
    worker processes; the summaries, and the log written in the order of ``work``."""
    jobs = getattr(args, "jobs", 1)
    if jobs == 1 or len(work) == 1:
        logsetup.configure(
            log_file=args.log_file, log_format=args.log_format, level=args.log_level,
            capture=capture,
        )  # fmt: skip
        runs = []
        for label, scenario, policy in work:
            print(f"running {label} ...", file=sys.stderr, flush=True)
            runs.append(run_one(scenario, policy, args.clock))
        return runs
    if args.clock != "virtual":
        raise ConfigError("--jobs: runs on the real clock would compete for the CPUs")
    return _run_parallel(args, work, capture, min(jobs, len(work)))


@attrs.frozen
class _Job:
    scenario: ScenarioConfig
    policy: str
    log_format: logsetup.LogFormat
    level: str
    capture: bool


def _job(job: _Job) -> tuple[RunSummary, str, list[str]]:
    """One virtual-clock run in a worker process: its summary, its log as text, and (for
    ``--plot``) its run events as JSON lines."""
    import io

    out = io.StringIO()
    capture = logsetup.Capture() if job.capture else None
    logsetup.configure(
        stream=out, log_format=job.log_format, level=job.level, capture=capture, progress=False
    )
    try:
        summary = run_one(job.scenario, job.policy, "virtual")
    except Exception as exc:  # a bug: keep the run's log and its traceback for the parent
        import traceback

        first = leaves(exc)[0]  # the error itself, not the nursery's group around it
        error = f"{type(first).__name__}: {first}"
        raise _JobFailed(out.getvalue(), error, traceback.format_exc()) from None
    events = [json.dumps(e, default=str) for e in capture.events] if capture else []
    return summary, out.getvalue(), events


class _JobFailed(Exception):
    """A run that raised in its worker: (its log so far, the error, the traceback)."""


_Done = tuple[RunSummary, str, list[str]] | _JobFailed


def _worker(item: tuple[int, _Job]) -> tuple[int, _Done]:
    """What a worker process runs: the job's result, or its failure as a value (a worker
    that raised would die)."""
    index, job = item
    try:
        return index, _job(job)
    except _JobFailed as exc:
        return index, exc


def _run_parallel(
    args: argparse.Namespace, work: Work, capture: logsetup.Capture | None, jobs: int
) -> list[RunSummary]:
    log_format: logsetup.LogFormat = args.log_format or (
        "console" if args.log_file is None and sys.stderr.isatty() else "json"
    )
    try:
        out = open(args.log_file, "a", encoding="utf-8") if args.log_file else sys.stderr  # noqa: SIM115
    except OSError as exc:
        raise ConfigError(f"--log-file {args.log_file}: {exc.strerror or exc}") from None
    tasks = [
        (i, _Job(s, p, log_format, args.log_level, capture is not None))
        for i, (_, s, p) in enumerate(work)
    ]
    print(f"running {len(work)} runs, {jobs} at a time ...", file=sys.stderr, flush=True)
    runs: list[RunSummary] = []
    finished: dict[int, _Done] = {}
    # The pool's workers are spawned (a fresh interpreter, whatever this process holds) and
    # ignore SIGINT; on Ctrl-C or any error leaving the ``with``, they are stopped at once
    # rather than left to finish the queued runs.  A worker that dies fails the whole
    # comparison (retries=0): its run is not retried behind the user's back.
    try:
        with LocalPool(_worker, jobs, retries=0) as pool:
            for _item, got, _attempts in pool.run(tasks):
                if isinstance(got, WorkerDied):
                    done = len(runs)
                    raise RunFailed(
                        f"a worker process died (killed, or out of memory?) before "
                        f"{work[done][0]} finished; {done} of {len(work)} runs finished, "
                        "their log is written"
                    )
                index, result = got
                finished[index] = result
                while len(runs) in finished:  # write out, in the order of the work
                    result = finished.pop(len(runs))
                    label = work[len(runs)][0]
                    if isinstance(result, _JobFailed):
                        text, error, trace = result.args
                        out.write(text)
                        out.flush()
                        print(trace, file=sys.stderr, end="")
                        raise RunFailed(f"{label} failed: {error}")
                    summary, text, events = result
                    out.write(text)
                    out.flush()
                    if capture is not None:
                        capture.events.extend(json.loads(e) for e in events)
                    print(f"finished {label}: {summary.outcome}", file=sys.stderr, flush=True)
                    runs.append(summary)
    finally:
        if out is not sys.stderr:
            out.close()
    return runs
