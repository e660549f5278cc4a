"""Server-side fault injection: each fault against the live server, over a real socket (or,
where time is what is measured, an in-memory stream under trio's virtual clock)."""

from __future__ import annotations

import os
import random
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import structlog
import trio
import trio.testing

from client.nbd_client import Disconnected, NBDClient
from nbdproto import Cmd, CmdFlags, Errno
from nbdproto.config import ConfigError
from server import Export, Faults, FileStore, NBDServer
from server.config import ExportConfig, FaultConfig, ServerConfig
from testbed.config import load_server_config

from .test_serve import Raw, connect

MiB = 1 << 20


def faulty(**faults: Any) -> list[ExportConfig]:
    """One 8 MiB memory export ``disk`` with the given faults configured."""
    return [ExportConfig(name="disk", size=8 * MiB, faults=FaultConfig(**faults))]


def in_memory_server(**faults: Any) -> NBDServer:
    cfg = ServerConfig(listen="127.0.0.1:0", exports=tuple(faulty(**faults)))
    return NBDServer(cfg, [Export.from_config(e) for e in cfg.exports])


async def connect_in_memory(server: NBDServer, nursery: trio.Nursery, **kw: Any) -> NBDClient:
    client_end, server_end = trio.testing.memory_stream_pair()
    nursery.start_soon(server.handle_stream, server_end)
    return await NBDClient.over(client_end, "disk", nursery=nursery, **kw)


# -- errors --------------------------------------------------------------------------------
async def test_write_error_rate_one_fails_every_write_and_lands_nothing(
    make_server: Callable[..., Any], nursery: trio.Nursery
) -> None:
    server = await make_server(exports=faulty())
    c = await connect(server, nursery)
    before = os.urandom(256 * 1024)
    await c.write(0, before)
    faults = server.exports["disk"].faults
    faults.set_error("write", 1.0, "EIO")
    shapes = [(0, 4096, 0), (100, 5000, 0), (4096, 65536, CmdFlags.FUA), (0, 256 * 1024, 0)]
    for offset, length, flags in shapes * 5:
        reply = await c.request(Cmd.WRITE, offset, length, flags, os.urandom(length))
        assert reply.error == Errno.EIO
    assert await c.read(0, len(before)) == before
    assert faults.counts == {"error.write.EIO": 20}
    faults.clear_errors()
    await c.write(0, b"landed")
    assert await c.read(0, 6) == b"landed"


@pytest.mark.parametrize(
    ("command", "errno"),
    [
        ("read", "EIO"),
        ("write", "ENOSPC"),
        ("trim", "EPERM"),
        ("write_zeroes", "EIO"),
        ("flush", "ENOMEM"),
        ("cache", "EINVAL"),
        ("block_status", "ENOTSUP"),
    ],
)
async def test_each_command_fails_with_its_errno_and_changes_nothing(
    make_server: Callable[..., Any], command: str, errno: str
) -> None:
    server = await make_server(exports=faulty(errors={command: {"rate": 1.0, "errno": errno}}))
    store = server.exports["disk"].store
    content = os.urandom(16384)
    store.pwrite(0, content)
    raw = await Raw.open(server)
    await raw.handshake(structured=True, meta=True)  # READ errors travel as error chunks
    cmd = Cmd[command.upper()]
    data = os.urandom(8192) if cmd == Cmd.WRITE else None
    length = 0 if cmd == Cmd.FLUSH else 8192
    reply = await raw.request(cmd, 0 if cmd == Cmd.FLUSH else 4096, length, data=data)
    assert reply.error == Errno[errno]
    if cmd in (Cmd.READ, Cmd.BLOCK_STATUS):  # an error chunk, with its message
        assert reply.message == f"injected fault: {errno}"
    assert store.pread(0, 16384) == content
    assert server.fault_counts() == {"disk": {f"error.{command}.{errno}": 1}}


async def test_seeded_error_rate_replays_the_same_pattern(
    make_server: Callable[..., Any], nursery: trio.Nursery
) -> None:
    seed, n = 42, 64
    server = await make_server(exports=faulty(seed=seed, errors={"write": (0.5, "EIO")}))
    faults = server.exports["disk"].faults
    c = await connect(server, nursery, depth=1)  # one at a time: the draw order is fixed

    model = [bytes(4096)] * n  # what each block holds: a failed write never lands

    async def run(fill: int) -> list[bool]:
        failed = []
        for i in range(n):
            block = bytes([fill]) * 4096
            reply = await c.request(Cmd.WRITE, i * 4096, 4096, 0, block)
            failed.append(reply.error == Errno.EIO)
            if not reply.error:
                model[i] = block
            assert await c.read(i * 4096, 4096) == model[i]
        return failed

    faults.clear_errors()
    assert not any(await run(0xAA))
    faults.set_error("write", 0.5, "EIO")
    first = await run(0xBB)
    faults.reseed()
    second = await run(0xCC)
    rng = random.Random(seed)
    assert first == second == [rng.random() < 0.5 for _ in range(n)]
    assert 0 < sum(first) < n
    assert faults.counts == {"error.write.EIO": 2 * sum(first)}
    # The blocks that failed twice still hold the first generation.
    assert model == [bytes([0xAA if f else 0xCC]) * 4096 for f in first]


# -- delay ---------------------------------------------------------------------------------
async def test_delay_makes_each_reply_late_by_the_delay(autojump_clock: trio.abc.Clock) -> None:
    server = in_memory_server(delay=0.25)
    async with trio.open_nursery() as nursery:
        c = await connect_in_memory(server, nursery)
        start = trio.current_time()
        await c.write(0, b"x" * 4096)
        assert trio.current_time() - start == pytest.approx(0.25)
        # Pipelined: served in order, each one 0.25 s after the previous one.
        arrivals: dict[int, float] = {}
        start = trio.current_time()

        async def read(i: int) -> None:
            await c.read(i * 4096, 4096)
            arrivals[i] = trio.current_time() - start

        async with trio.open_nursery() as n:
            for i in range(4):
                n.start_soon(read, i)
        assert sorted(arrivals.values()) == pytest.approx([0.25, 0.5, 0.75, 1.0])
        server.exports["disk"].faults.delay = 0
        start = trio.current_time()
        await c.read(0, 4096)
        assert trio.current_time() == start
        await c.close()
    assert server.fault_counts()["disk"] == {"delay": 5}


# -- stall ---------------------------------------------------------------------------------
async def test_stalled_requests_are_all_answered_after_unstall(
    make_server: Callable[..., Any], nursery: trio.Nursery
) -> None:
    server = await make_server(exports=faulty())
    faults = server.exports["disk"].faults
    c = await connect(server, nursery, depth=64)
    blocks = {i: os.urandom(64 * 1024) for i in range(64)}  # 4 MiB: more than the sockets hold
    done: list[int] = []

    async def write(i: int) -> None:
        await c.write(i * len(blocks[i]), blocks[i])
        done.append(i)

    faults.stall()
    assert faults.stalled
    async with trio.open_nursery() as n:
        for i in blocks:
            n.start_soon(write, i)
        await trio.testing.wait_all_tasks_blocked()
        assert done == [] and c.in_flight == 64  # all sent or sending, none answered
        faults.unstall()
    assert sorted(done) == list(blocks)
    for i, block in blocks.items():
        assert await c.read(i * len(block), len(block)) == block
    assert faults.counts["stall"] == 1 and faults.counts["stall.held"] >= 1
    assert not faults.armed


async def test_stall_with_a_duration_ends_by_itself(autojump_clock: trio.abc.Clock) -> None:
    server = in_memory_server()
    faults = server.exports["disk"].faults
    async with trio.open_nursery() as nursery:
        c = await connect_in_memory(server, nursery)
        start = trio.current_time()
        faults.stall(5)
        faults.stall(2)  # a shorter stall inside a longer one does not shorten it
        async with trio.open_nursery() as n:
            for i in range(8):
                n.start_soon(c.write, i * 4096, bytes([i]) * 4096)
        assert trio.current_time() - start == pytest.approx(5)
        assert await c.read(7 * 4096, 4096) == bytes([7]) * 4096
        assert not faults.stalled and not faults.armed
        await c.close()
    assert faults.counts == {"stall": 1, "stall.held": 1}


async def test_shutdown_ends_a_stall(
    make_server: Callable[..., Any], nursery: trio.Nursery
) -> None:
    server = await make_server(exports=faulty(), shutdown_grace=30)
    c = await connect(server, nursery)
    server.exports["disk"].faults.stall()
    async with trio.open_nursery() as n:
        n.start_soon(c.write, 0, b"held")
        await trio.testing.wait_all_tasks_blocked()
        server.shutdown()
    assert server.exports["disk"].store.pread(0, 4) == b"held"


# -- drop and restart ----------------------------------------------------------------------
async def test_drop_connections_of_one_export_leaves_the_others(
    make_server: Callable[..., Any], nursery: trio.Nursery
) -> None:
    server = await make_server(
        exports=[ExportConfig(name="disk", size=MiB), ExportConfig(name="other", size=MiB)]
    )
    a = await connect(server, nursery, "disk")
    b = await connect(server, nursery, "other")
    assert server.drop_connections("disk") == 1
    with pytest.raises(Disconnected):
        await a.read(0, 512)
    await b.write(0, b"still here")
    assert await b.read(0, 10) == b"still here"
    assert server.fault_counts() == {"disk": {"drop": 1}, "other": {}}
    assert server.drop_connections() == 1  # all exports: each counts one drop
    assert server.fault_counts() == {"disk": {"drop": 2}, "other": {"drop": 1}}


async def test_restart_keeps_acknowledged_data_of_file_and_memory_exports(
    make_server: Callable[..., Any], nursery: trio.Nursery, tmp_path: Path
) -> None:
    server = await make_server(
        exports=[
            ExportConfig(name="file", size=MiB, backend="file", path=str(tmp_path / "f.img")),
            ExportConfig(name="mem", size=MiB),
        ]
    )
    stores = {name: e.store for name, e in server.exports.items()}
    data = {name: os.urandom(3 * 4096) for name in stores}
    clients = {name: await connect(server, nursery, name) for name in stores}
    for name, c in clients.items():
        await c.write(0, data[name][:4096])  # acknowledged, never flushed
        await c.write(4096, data[name][4096:8192], fua=True)
        await c.write(8192, data[name][8192:])
        await c.flush()
    await server.restart()
    for name, c in clients.items():
        with pytest.raises(Disconnected):
            await c.read(0, 512)
        again = await connect(server, nursery, name)
        assert await again.read(0, len(data[name])) == data[name]
    assert server.exports["file"].store is not stores["file"]  # closed and reopened
    assert stores["file"]._fd == -1
    assert server.exports["mem"].store is stores["mem"]
    assert server.fault_counts() == {"file": {"restart": 1}, "mem": {"restart": 1}}


class SlowClose:
    """A store whose ``close`` (run in a worker thread by ``restart``) waits for ``release``."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner
        self.release = threading.Event()

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)

    def close(self) -> None:
        self.release.wait(30)
        self.inner.close()


async def test_connections_arriving_during_a_restart_wait_until_the_stores_are_back(
    make_server: Callable[..., Any], nursery: trio.Nursery, tmp_path: Path
) -> None:
    server = await make_server(
        exports=[ExportConfig(name="f", size=MiB, backend="file", path=str(tmp_path / "f"))]
    )
    c = await connect(server, nursery, "f")
    await c.write(0, b"before the restart")
    slow = server.exports["f"].store = SlowClose(server.exports["f"].store)
    nursery.start_soon(server.restart)
    await trio.testing.wait_all_tasks_blocked()  # restart is closing the old store
    connected: list[NBDClient] = []

    async def late_client() -> None:
        connected.append(await connect(server, nursery, "f"))

    nursery.start_soon(late_client)
    await trio.testing.wait_all_tasks_blocked()
    assert connected == [] and not server._live  # accepted, not even greeted
    slow.release.set()
    while not connected:
        await trio.testing.wait_all_tasks_blocked()
    assert await connected[0].read(0, 18) == b"before the restart"
    assert isinstance(server.exports["f"].store, FileStore)


async def test_a_shutdown_during_a_restart_closes_the_reopened_store(tmp_path: Path) -> None:
    cfg = ServerConfig(
        listen="127.0.0.1:0",
        exports=(ExportConfig(name="f", size=MiB, backend="file", path=str(tmp_path / "f")),),
    )
    server = NBDServer(cfg, [Export.from_config(e) for e in cfg.exports])
    async with trio.open_nursery() as nursery:
        await nursery.start(server.serve)
        slow = server.exports["f"].store = SlowClose(server.exports["f"].store)
        nursery.start_soon(server.restart)
        await trio.testing.wait_all_tasks_blocked()  # restart is closing the old store
        server.shutdown()
        await trio.testing.wait_all_tasks_blocked()  # serve() is stopping meanwhile
        slow.release.set()
    store = server.exports["f"].store
    assert isinstance(store, FileStore) and store is not slow.inner  # restart reopened it
    assert store._fd == -1, "the store restart reopened was left open by the shutdown"


# -- counts and logs -----------------------------------------------------------------------
async def test_every_fault_is_counted_and_logged(autojump_clock: trio.abc.Clock) -> None:
    server = in_memory_server(errors={"write": {"rate": 1.0, "errno": "ENOSPC"}}, delay=0.5)
    faults = server.exports["disk"].faults
    with structlog.testing.capture_logs() as logs:
        async with trio.open_nursery() as nursery:
            c = await connect_in_memory(server, nursery)
            assert (await c.request(Cmd.WRITE, 0, 4, 0, b"nope")).error == Errno.ENOSPC
            faults.delay = 0
            faults.stall(1)
            await c.read(0, 4)
            server.drop_connections()
            await server.restart()
    fired = [e for e in logs if e["event"].startswith("fault.")]
    common = {"export": "disk", "command": None, "errno": None, "log_level": "info"}
    assert fired == [
        {"event": "fault.fired", "kind": "delay", "export": "disk", "command": "write"}
        | {"seconds": 0.5, "log_level": "debug"},
        {"event": "fault.fired", "kind": "error", "command": "write", "errno": "ENOSPC"}
        | {"export": "disk", "log_level": "info"},
        {"event": "fault.fired", "kind": "stall", "seconds": 1} | common,
        {"event": "fault.cleared", "kind": "stall", "export": "disk", "reason": "timeout"}
        | {"log_level": "info"},
        {"event": "fault.fired", "kind": "drop", "connections": 1} | common,
        {"event": "fault.fired", "kind": "restart", "backend": "memory", "connections": 0} | common,
    ]
    assert server.fault_counts() == {
        "disk": {
            "delay": 1,
            "error.write.ENOSPC": 1,
            "stall": 1,
            "stall.held": 1,
            "drop": 1,
            "restart": 1,
        }
    }


def test_an_export_without_faults_is_not_armed() -> None:
    export = Export.from_config(ExportConfig(name="disk", size=MiB))
    assert not export.faults.armed and export.faults.counts == {}


# -- configuration -------------------------------------------------------------------------
SERVER_TOML = """
[server]
listen = "127.0.0.1:0"

[[server.exports]]
name = "swap"
size = "1M"

[server.exports.faults]
delay = 0.002
seed = 7
{extra}
"""
GOOD_ERRORS = """\
errors = { write = { rate = 0.01, errno = "EIO" }, read = { rate = 0.5 } }
"""


def test_fault_config_from_toml(tmp_path: Path) -> None:
    path = tmp_path / "server.toml"
    path.write_text(SERVER_TOML.format(extra=GOOD_ERRORS))
    config = load_server_config(path)
    faults = Faults.from_config(config.exports[0].faults, "swap")
    assert faults.delay == 0.002 and faults.seed == 7 and faults.armed
    assert faults.error_rate == {"read": (0.5, "EIO"), "write": (0.01, "EIO")}


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        ("stal = 3", "stal"),
        ("[server.exports.faults.errors.flush]\nrate = 1.5", "rate 1.5: must be in [0, 1]"),
        ("[server.exports.faults.errors.trim]\nrate = 0.1\nerrno = 'EFOO'", "'EFOO'"),
        ("[server.exports.faults.errors.trim]\nrate = 0.1\nerrn = 'EIO'", "['errn']"),
        ("[server.exports.faults.errors.trim]\nerrno = 'EIO'", "missing rate"),
        ("[server.exports.faults.errors.disc]\nrate = 0.1", "unknown command 'disc'"),
        ("[server.exports.faults.errors]\nwrite = 3", "expected {rate = R, errno = NAME}"),
    ],
)
def test_bad_fault_config_is_a_one_line_config_error(
    tmp_path: Path, extra: str, message: str
) -> None:
    path = tmp_path / "server.toml"
    path.write_text(SERVER_TOML.format(extra=extra))
    with pytest.raises(ConfigError) as info:
        load_server_config(path)
    assert message in str(info.value) and "\n" not in str(info.value)


@pytest.mark.parametrize("delay", ["-1.0", "inf", "'slow'"])
def test_bad_fault_delay_is_a_config_error(tmp_path: Path, delay: str) -> None:
    path = tmp_path / "server.toml"
    text = SERVER_TOML.format(extra="").replace("delay = 0.002", f"delay = {delay}")
    path.write_text(text)
    with pytest.raises(ConfigError, match="delay"):
        load_server_config(path)


@pytest.mark.parametrize(
    "change",
    [
        lambda f: f.set_error("disc", 0.5),
        lambda f: f.set_error("write", -0.1),
        lambda f: f.set_error("write", 0.5, "EAGAIN"),
        lambda f: setattr(f, "delay", -1),
        lambda f: f.stall(-1),
    ],
)
def test_bad_runtime_fault_changes_are_refused(change: Callable[[Faults], None]) -> None:
    faults = Faults("disk")
    with pytest.raises(ValueError):
        trio.run(_apply, change, faults)
    assert not faults.armed


async def _apply(change: Callable[[Faults], None], faults: Faults) -> None:
    change(faults)
