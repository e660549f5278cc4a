"""Fixtures shared by the suite.

Servers start in-process on port 0 with ``nursery.start`` (the bound address comes back
through ``task_status``); every test that touches a socket runs under a trio-clock deadline.
Interop peers (nbdkit, nbdinfo, nbdcopy, qemu-img) are looked up with ``require_tool``: a
missing one skips the test locally and FAILS it when ``CI`` is set.
"""

from __future__ import annotations

import functools
import inspect
import os
import shutil
from collections.abc import AsyncIterator, Awaitable, Callable

import pytest
import trio

from server import Export, NBDServer
from testbed.config import ExportConfig, ServerConfig

#: Seconds a socket-touching test may take before it is failed rather than left hanging.
SOCKET_TEST_DEADLINE = float(os.environ.get("NETSWAP_TEST_DEADLINE", "60"))


def require_tool(name: str) -> str:
    """The path of an interop peer; skip without it, but fail in CI (``CI`` set)."""
    path = shutil.which(name)
    if path is None:
        message = f"{name} is not installed (Debian: nbdkit, libnbd-bin, python3-libnbd, qemu-utils)"
        if os.environ.get("CI"):
            pytest.fail(f"{message}; CI must run the interop tests")
        pytest.skip(message)
    return path


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
    """Run every real-clock async test under a trio deadline, so a hang fails, not stalls."""
    for item in items:
        func = getattr(item, "obj", None)
        if not isinstance(item, pytest.Function) or not inspect.iscoroutinefunction(func):
            continue
        if {"autojump_clock", "mock_clock"} & set(item.fixturenames):
            continue
        item.obj = _with_deadline(func)


def _with_deadline(func: Callable[..., Awaitable[None]]) -> Callable[..., Awaitable[None]]:
    @functools.wraps(func)
    async def wrapper(*args: object, **kwargs: object) -> None:
        with trio.fail_after(SOCKET_TEST_DEADLINE):
            await func(*args, **kwargs)

    return wrapper
