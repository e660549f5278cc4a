"""Fixtures shared by the suite.

Servers start in-process on port 0 with ``nursery.start`` (the bound address comes back
through ``task_status``).  Every async test runs under a trio-clock deadline, so a model or a
server that stops making progress FAILS the test instead of hanging the suite: real-clock tests
get ``SOCKET_TEST_DEADLINE`` wall seconds, virtual-clock tests (``autojump_clock``,
``mock_clock``) ``VIRTUAL_TEST_DEADLINE`` virtual seconds, or what their
``@pytest.mark.virtual_deadline(SECONDS)`` says; a real-clock test that runs a whole
scenario over TCP asks for more wall seconds with ``@pytest.mark.wall_deadline(SECONDS)``.
Under ``autojump_clock`` a hung model reaches that deadline at once.  pytest-timeout (``timeout`` in pyproject.toml) is the
backstop for what no trio deadline covers: sync tests, fixtures, a loop that never yields.
Interop peers (nbdkit, nbdinfo, nbdcopy, qemu-img) are looked up with ``require_tool``: a
missing one skips the test locally and FAILS it when ``CI`` is set.  Usage errors of the
command line run in this process through ``cli``: a subprocess each would cost a second.
"""

from __future__ import annotations

import functools
import inspect
import os
import shutil
import subprocess
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator

import pytest
import structlog
import trio

from server import Export, NBDServer
from server.config import ExportConfig, ServerConfig
from testbed.compiled import build as compiled_build
from tests.processes import Cli

#: Seconds a socket-touching test may take before it is failed rather than left hanging.
SOCKET_TEST_DEADLINE = float(os.environ.get("NETSWAP_TEST_DEADLINE", "60"))

#: Virtual seconds a virtual-clock test may take: ten times the longest today (32 s), and
#: reached in no wall time by a model that stops.  Not more: a model that stops making
#: progress while its timers still fire (the watchdog's polls, kswapd, noise) walks through
#: each of them up to the deadline, some 40 ms of wall time per virtual second for a 16 MiB
#: machine, so an hour would take minutes to fail, past pytest-timeout.  An autojump_clock
#: test must not wait on real I/O (a TCP socket, a subprocess): the clock would jump to
#: this deadline meanwhile.
VIRTUAL_TEST_DEADLINE = 300.0

_VIRTUAL_CLOCKS = frozenset({"autojump_clock", "mock_clock"})

#: ``NETSWAP_LONG=1`` (``make test-long``) runs the long runs too: ``slow``-marked tests.
LONG = os.environ.get("NETSWAP_LONG") == "1"


def require_tool(name: str) -> str:
    """The path of an interop peer; skip without it, but fail in CI (``CI`` set)."""
    path = shutil.which(name)
    if path is None:
        message = (
            f"{name} is not installed (Debian: nbdkit, libnbd-bin, python3-libnbd, qemu-utils)"
        )
        if os.environ.get("CI"):
            pytest.fail(f"{message}; CI must run the interop tests")
        pytest.skip(message)
    return path


@pytest.fixture(autouse=True)
def _structlog_config_put_back() -> Iterator[None]:
    """structlog's configuration is global: a test that sets it up (a CLI command, a run
    that configures logging) must not change what the next test's logs look like, e.g.
    leave a filter at info under a test that captures debug events."""
    saved = structlog.get_config()
    try:
        yield
    finally:
        structlog.configure(**saved)


@pytest.fixture
def cli(capsys: pytest.CaptureFixture[str]) -> Iterator[Cli]:
    """``cli(*args)``: ``netswap ARGS`` in this process, as ``main`` returns it to the
    console script (exit status, stdout, stderr); structlog's configuration (a command may
    set it up before failing) is put back after the test."""
    from testbed.cli import main  # the CLI's imports only for the tests that use it

    saved = structlog.get_config()

    def run(*args: str) -> subprocess.CompletedProcess[str]:
        capsys.readouterr()
        code = main(list(args))
        out, err = capsys.readouterr()
        return subprocess.CompletedProcess(["netswap", *args], code, out, err)

    try:
        yield run
    finally:
        structlog.configure(**saved)


@pytest.fixture
def make_server(nursery: trio.Nursery) -> Callable[..., object]:
    """``await make_server(exports=[...], **config)`` → a started NBDServer on 127.0.0.1:0."""

    async def start(exports: list[ExportConfig] | None = None, **config: object) -> NBDServer:
        if exports is None:
            exports = [ExportConfig(name="disk", size=64 << 20)]
        cfg = ServerConfig(listen="127.0.0.1:0", exports=tuple(exports), **config)  # type: ignore[arg-type]
        server = NBDServer(cfg, [Export.from_config(e) for e in cfg.exports])
        await nursery.start(server.serve)
        return server

    return start


@pytest.fixture
async def nbd_server(make_server: Callable[..., object]) -> AsyncIterator[NBDServer]:
    """A server with one 64 MiB memory export named ``disk`` and a 1 MiB read-only ``ro``."""
    server = await make_server(  # type: ignore[operator]
        exports=[
            ExportConfig(name="disk", size=64 << 20, description="scratch disk"),
            ExportConfig(name="ro", size=1 << 20, read_only=True),
        ]
    )
    yield server
    server.shutdown()


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Run every async test under a trio deadline, so a hang fails, not stalls: virtual
    seconds on the virtual clock, wall seconds on the real one.  ``slow`` tests are skipped
    unless ``NETSWAP_LONG=1``; ``patches_model`` tests when the suite runs against the
    compiled model (``make test-compiled``), whose classes' methods cannot be replaced."""
    compiled = compiled_build() is not None
    for item in items:
        if item.get_closest_marker("slow") and not LONG:
            item.add_marker(pytest.mark.skip(reason="slow: opt in with NETSWAP_LONG=1"))
        if compiled and item.get_closest_marker("patches_model"):
            item.add_marker(
                pytest.mark.skip(reason="replaces a method of a model object: not when compiled")
            )
        func = getattr(item, "obj", None)
        if not isinstance(item, pytest.Function) or not inspect.iscoroutinefunction(func):
            continue
        if _VIRTUAL_CLOCKS & set(item.fixturenames):
            marker = item.get_closest_marker("virtual_deadline")
            seconds = float(marker.args[0]) if marker else VIRTUAL_TEST_DEADLINE
        else:
            marker = item.get_closest_marker("wall_deadline")
            seconds = float(marker.args[0]) if marker else SOCKET_TEST_DEADLINE
        item.obj = _with_deadline(func, seconds)


def _with_deadline(
    func: Callable[..., Awaitable[None]], seconds: float
) -> Callable[..., Awaitable[None]]:
    @functools.wraps(func)
    async def wrapper(*args: object, **kwargs: object) -> None:
        with trio.fail_after(seconds):
            await func(*args, **kwargs)

    return wrapper
