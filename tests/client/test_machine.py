"""The client machine end to end: real NBD servers, a cut connection, the stale-write race."""

from __future__ import annotations

import socket
import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import trio
import trio.testing

from client.machine import ClientMachine
from client.mm import PAGE_SIZE
from client.summary import RunSummary
from client.swapdev import NBDSwapDevice
from server import Export, NBDServer
from server.config import ExportConfig, ServerConfig
from testbed.config import load_scenario
from tests.conftest import require_tool

CONFIGS = Path(__file__).resolve().parents[2] / "configs"


def tcp(host: str, port: int) -> Callable[[], Any]:
    async def connect() -> trio.abc.Stream:
        return await trio.open_tcp_stream(host, port)

    return connect


def assert_completed_clean(summary: RunSummary) -> None:
    assert summary.outcome == "completed", summary.reason
    integrity = summary.integrity
    assert integrity.corrupt == 0
    assert integrity.pages_verified == integrity.pages_written > 0
    assert summary.vmstat["pswpout"] > 0 and summary.vmstat["pswpin"] > 0


#: A whole scenario on the real clock over loopback TCP: about 20 s on 2 idle cores, past
#: the 60 s of SOCKET_TEST_DEADLINE with five CPU-bound processes beside it.
SCENARIO_OVER_TCP = pytest.mark.wall_deadline(300)


@SCENARIO_OVER_TCP
async def test_small_scenario_against_netswap_server(make_server: Callable[..., Any]) -> None:
    scenario = load_scenario(CONFIGS / "small.toml")
    server = await make_server(exports=[ExportConfig(name="swap", size=scenario.swap.size)])
    summary = await ClientMachine(scenario, tcp(*server.address)).run()
    assert_completed_clean(summary)
    # 4 hogs x 4 x RAM: every page was written, swapped and read back.
    assert summary.integrity.pages_verified == 4 * scenario.machine.memory // PAGE_SIZE
    assert summary.swap_device["connects"] == 1


@pytest.mark.interop
@SCENARIO_OVER_TCP
async def test_small_scenario_against_nbdkit_memory(tmp_path: Path) -> None:
    nbdkit = require_tool("nbdkit")
    scenario = load_scenario(CONFIGS / "small.toml", {"machine.memory": "32M"})
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    pidfile = tmp_path / "nbdkit.pid"
    # A plain Popen, terminated by us: nbdkit started through trio.run_process was shut
    # down after ~10 s (ESHUTDOWN), with or without --exit-with-parent.
    argv = [
        nbdkit,
        "-f",
        "-i",
        "127.0.0.1",
        "-p",
        str(port),
        "-P",
        str(pidfile),
        "-e",
        "swap",
        "memory",
        "512M",
    ]
    proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL)
    try:
        while not pidfile.exists():  # nbdkit writes the pidfile once it is listening
            assert proc.poll() is None, "nbdkit exited at start-up"
            await trio.sleep(0.02)
        summary = await ClientMachine(scenario, tcp("127.0.0.1", port)).run()
    finally:
        proc.terminate()
        proc.wait(timeout=10)
    assert_completed_clean(summary)


@SCENARIO_OVER_TCP
async def test_run_survives_the_server_dropping_every_connection(
    make_server: Callable[..., Any],
) -> None:
    scenario = load_scenario(
        None, {"machine.memory": "16M", "workloads": [{"processes": 2, "total": "4x", "rounds": 2}]}
    )
    server = await make_server(exports=[ExportConfig(name="swap", size=scenario.swap.size)])
    machine = ClientMachine(scenario, tcp(*server.address))
    async with trio.open_nursery() as nursery:

        async def cut_twice() -> None:
            for _ in range(2):
                while machine.memory.stat.pswpout < 2000 + 4000 * _:
                    await trio.sleep(0.01)
                server.drop_connections()

        nursery.start_soon(cut_twice)
        summary = await machine.run()
    assert_completed_clean(summary)
    assert summary.swap_device["reconnects"] == 2
    assert summary.swap_device["connects"] == 3


# -- the stale-write race (nbd.md §5 item 9) ------------------------------------------------
class StallableStream(trio.abc.Stream):
    """A server-side stream that, once ``stalled``, holds what it has read until ``release``:
    a server stalled with a client's write sitting in its receive buffer."""

    def __init__(self, inner: trio.abc.Stream) -> None:
        self.inner = inner
        self.stalled = False
        self.release = trio.Event()

    async def receive_some(self, max_bytes: int | None = None) -> bytes:
        data = await self.inner.receive_some(max_bytes)
        if self.stalled:
            await self.release.wait()
        return data

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        await self.inner.send_all(data)

    async def wait_send_all_might_not_block(self) -> None:
        await self.inner.wait_send_all_might_not_block()

    async def aclose(self) -> None:
        await self.inner.aclose()


def memory_server(size: int) -> NBDServer:
    cfg = ServerConfig(listen="127.0.0.1:0", exports=(ExportConfig(name="swap", size=size),))
    return NBDServer(cfg, [Export.from_config(e) for e in cfg.exports])


@pytest.mark.parametrize("fenced", [True, False])
async def test_stale_write_never_lands_over_its_successor(
    autojump_clock: trio.abc.Clock, fenced: bool
) -> None:
    """Write A to slot 5 while the server is stalled; the client times out, reconnects and
    writes A again, then the successor B.  Then the stalled server wakes and executes the
    old A.  With fencing the read still returns B; without it (the control) A overwrote B,
    which shows that the test really provokes the race."""
    server = memory_server(4 << 20)
    server_ends: list[StallableStream] = []
    async with trio.open_nursery() as nursery:

        async def connect() -> trio.abc.Stream:
            client_end, server_end = trio.testing.memory_stream_pair()
            server_ends.append(StallableStream(server_end))
            nursery.start_soon(server.handle_stream, server_ends[-1])
            return client_end

        device = NBDSwapDevice(connect, "swap", io_timeout=5.0, spare_pages=64)
        await device.start(nursery)
        if not fenced:
            device._fence = lambda slot: None  # type: ignore[method-assign]
        server_ends[0].stalled = True  # handshake done; now the server stops making progress
        a, b = b"A" * PAGE_SIZE, b"B" * PAGE_SIZE
        await device.write(5, [memoryview(a)])  # times out, reconnects, resubmitted
        assert device.stats.timeouts == 1 and device.stats.reconnects == 1
        await device.write(5, [memoryview(b)])  # the successor
        server_ends[0].release.set()  # the stalled server executes the old write of A
        await trio.testing.wait_all_tasks_blocked()
        into = bytearray(PAGE_SIZE)
        await device.read(5, [memoryview(into)])
        home = server.exports["swap"].store.pread(5 * PAGE_SIZE, PAGE_SIZE)
        assert home == a, "the stale write did land, at the slot's original place"
        if fenced:
            assert bytes(into) == b
            assert device.stats.remapped_slots == 1
        else:
            assert bytes(into) == a  # the control: without fencing the newer data is lost
        # A readahead run across the remapped slot: three pages, each from where it lives.
        c, d = b"C" * PAGE_SIZE, b"D" * PAGE_SIZE
        await device.write(4, [memoryview(c)])
        await device.write(6, [memoryview(d)])
        run = [bytearray(PAGE_SIZE) for _ in range(3)]
        await device.read(4, [memoryview(r) for r in run])
        assert [bytes(r) for r in run] == [c, b if fenced else a, d]
        await device.close()
        nursery.cancel_scope.cancel()
