"""Runs on an existing Dask distributed cluster (``--scheduler tcp://HOST:PORT``).

The sweep's process is a Dask client: it connects with a short timeout, checks that the
workers can import netswap and run the same code as it does (:func:`code_version`: the same
seed gives the same run only on the same model), submits one task per run and gathers the
results as they finish, writing each row as it comes.  The workers need netswap installed
(``pip install 'netswap[dask]'`` in their environment) and nothing else: no access to the
sweep's directory, since the log comes back with the result.

A worker runs one run at a time (:mod:`testbed.sweep.execute`): start workers with
``--nthreads 1`` and as many workers (or ``--nworkers``) as cores.  A worker that dies is
Dask's to handle: the scheduler gives its task to another worker, and after
``distributed.scheduler.allowed-failures`` deaths it gives up (``KilledWorker``), which is
recorded as the run's error.

Dask is an optional dependency (the ``dask`` extra), imported only here.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Iterator
from types import TracebackType
from typing import Any

from nbdproto.config import ConfigError
from testbed.sweep.execute import Job, RunResult, code_version, execute

#: Seconds to wait for the scheduler to answer, and for a first worker.
CONNECT_TIMEOUT = 5.0


def check_address(address: str) -> str:
    if not re.fullmatch(r"tcp://(\[[0-9a-fA-F:.]+\]|[^:/\[\]]+):\d{1,5}", address):
        raise ConfigError(f"--scheduler {address!r}: expected tcp://HOST:PORT")
    return address


class DaskRunner:
    """``with DaskRunner(address) as runner: for job, result in runner.run(jobs): ...``"""

    def __init__(self, address: str, *, timeout: float = CONNECT_TIMEOUT) -> None:
        self.address = check_address(address)
        self.timeout = timeout
        self._client: Any = None
        self._futures: list[Any] = []

    def __enter__(self) -> DaskRunner:
        try:
            from distributed import Client
        except ImportError:
            raise ConfigError(
                "--scheduler needs Dask's distributed: pip install 'netswap[dask]'"
            ) from None
        try:
            self._client = Client(  # type: ignore[no-untyped-call]
                self.address, timeout=self.timeout, set_as_default=False
            )
        except (OSError, TimeoutError) as exc:
            raise ConfigError(
                f"--scheduler {self.address}: cannot connect within {self.timeout:g}s "
                f"({_first_line(exc)})"
            ) from None
        try:
            self._check_workers()
        except BaseException:
            self._client.close()
            raise
        return self

    def _check_workers(self) -> None:
        try:
            self._client.wait_for_workers(1, timeout=self.timeout)
        except (OSError, TimeoutError):
            raise ConfigError(
                f"--scheduler {self.address}: no worker joined within {self.timeout:g}s"
            ) from None
        try:
            versions: dict[str, str] = self._client.run(code_version)
        except Exception as exc:  # the workers cannot unpickle our function: no netswap
            raise ConfigError(
                f"--scheduler {self.address}: its workers cannot run netswap "
                f"({type(exc).__name__}: {_first_line(exc)}); install it where they run"
            ) from None
        mine = code_version()
        other = sorted(w for w, v in versions.items() if v != mine)
        if other:
            raise ConfigError(
                f"--scheduler {self.address}: worker(s) {', '.join(other)} run other netswap "
                f"code than this one (code {versions[other[0]]}, here {mine}); the same seed "
                "would not give the same run"
            )

    @property
    def workers(self) -> int:
        return len(self._client.scheduler_info().get("workers", {}))

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self._client is None:
            return
        try:
            if self._futures:
                self._client.cancel(self._futures, force=True)
        finally:
            self._client.close(timeout=self.timeout)

    def run(self, jobs: Iterable[Job]) -> Iterator[tuple[Job, RunResult | str]]:
        """Each job with its result, or the error text of a task Dask gave up on."""
        from distributed import as_completed

        by_key: dict[str, Job] = {}
        for job in jobs:
            future = self._client.submit(execute, job, pure=False)
            by_key[future.key] = job
            self._futures.append(future)
        finished = as_completed(  # type: ignore[no-untyped-call]
            self._futures, loop=self._client.loop, with_results=True, raise_errors=False
        )
        for future, value in finished:
            job = by_key[future.key]
            if isinstance(value, RunResult):
                yield job, value
            else:
                yield job, f"{type(value).__name__}: {_first_line(value)}"


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__
