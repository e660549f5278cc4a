"""One run of a sweep, wherever it runs: a local worker process or a Dask worker.

:func:`execute` takes a :class:`Job` (the run's scenario, already checked, and its policy)
and returns a :class:`RunResult`: the run's summary, or the error it raised, and its event
log, gzipped.  It never raises for the run's sake: a run that raises is a result too.  The
caller (the process that owns the database) writes the log and the row, so a worker needs
no access to the sweep's directory, and a Dask worker may be on another machine.

A run is a function of its scenario, policy and seed on the virtual clock
(:mod:`testbed.determinism`), so where it ran does not change what it did.  Both the seeded
scheduler and structlog's configuration are process-wide, so runs of one process take turns
(:data:`_ONE_AT_A_TIME`): a Dask worker with several threads runs one at a time.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import os
import socket
import threading
import time
import traceback
from pathlib import Path

import attrs

from client.summary import RunSummary
from testbed import compiled
from testbed import log as logsetup
from testbed.config import ScenarioConfig
from testbed.events import SweepRunRaised

_ONE_AT_A_TIME = threading.Lock()


@attrs.frozen
class Job:
    key: str  # RunSpec.key
    scenario: ScenarioConfig
    policy: str
    log_level: str = "info"


@attrs.frozen
class RunResult:
    key: str
    summary: RunSummary | None  # None: the run raised
    error: str | None  # "Type: message" of what it raised
    traceback: str | None
    log_gz: bytes  # its JSON-lines event log, gzipped
    wall_seconds: float
    host: str  # hostname:pid of the process that ran it


def execute(job: Job) -> RunResult:
    """Run ``job`` on the virtual clock; its summary or its error, and its log."""
    from testbed.scenario import run_virtual

    with _ONE_AT_A_TIME:
        out = io.StringIO()
        logsetup.configure(stream=out, log_format="json", level=job.log_level, progress=False)
        started = time.perf_counter()
        summary: RunSummary | None = None
        error = trace = None
        try:
            summary = run_virtual(job.scenario, job.policy)
        except Exception as exc:  # a bug of the model or the testbed: a row, not a crash
            first = _leaves(exc)[0]  # the error itself, not the nursery's group around it
            error = f"{type(first).__name__}: {first}"
            trace = traceback.format_exc()
            logsetup.emit(SweepRunRaised(policy=job.policy, error=error, traceback=trace))
        wall = time.perf_counter() - started
        return RunResult(
            key=job.key,
            summary=summary,
            error=error,
            traceback=trace,
            log_gz=gzip.compress(out.getvalue().encode(), compresslevel=6, mtime=0),
            wall_seconds=round(wall, 3),
            host=f"{socket.gethostname()}:{os.getpid()}",
        )


def _leaves(exc: BaseException) -> list[BaseException]:
    if isinstance(exc, BaseExceptionGroup):
        return [leaf for sub in exc.exceptions for leaf in _leaves(sub)]
    return [exc]


def code_version() -> str:
    """A hash of the code a run executes (the Python sources of the protocol, the client,
    the server and the testbed, as this process imports them): two processes with the same
    hash run the same model, so their runs of the same seed agree.  With the compiled model
    (``make compiled``) the client counts by the sources it was built from, and the hash
    ends in ``+mypyc``."""
    import client
    import nbdproto
    import server
    import testbed

    build = compiled.check()
    digest = hashlib.sha256()
    for package in (nbdproto, client, server, testbed):
        root = Path(package.__file__ or "").parent
        if package is client and build is not None:
            root = build.source
        compiled.hash_sources(digest, root)
    return digest.hexdigest()[:16] + ("+mypyc" if build is not None else "")
