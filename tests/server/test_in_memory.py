"""The server on an in-memory stream pair under trio's virtual clock: the path the client
machine's outcome tests use (same server code, no socket, deterministic time)."""

from __future__ import annotations

import trio
import trio.testing

from client.nbd_client import NBDClient
from server import Export, NBDServer
from server.config import ExportConfig, ServerConfig


def make_server(**config: object) -> NBDServer:
    cfg = ServerConfig(
        listen="127.0.0.1:0",
        exports=(ExportConfig(name="swap", size=8 << 20),),
        **config,  # type: ignore[arg-type]
    )
    return NBDServer(cfg, [Export.from_config(e) for e in cfg.exports])


async def test_client_and_server_over_a_memory_stream_pair(autojump_clock: trio.abc.Clock) -> None:
    server = make_server()
    client_end, server_end = trio.testing.memory_stream_pair()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(server.handle_stream, server_end)
        client = await NBDClient.over(client_end, "swap", nursery=nursery)
        assert client.size == 8 << 20
        await client.write(4096, b"page" * 1024)
        assert await client.read(4096, 4096) == b"page" * 1024
        await client.close()
    assert server.stats.requests == 2
    assert not server._live


async def test_handshake_timeout_runs_on_the_virtual_clock(autojump_clock: trio.abc.Clock) -> None:
    server = make_server(handshake_timeout=30)
    _client_end, server_end = trio.testing.memory_stream_pair()
    start = trio.current_time()
    await server.handle_stream(server_end)  # the client never answers the greeting
    assert trio.current_time() - start == 30
    assert server.stats.handshake_timeouts == 1
