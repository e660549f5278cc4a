"""The server over real loopback sockets: every command, every malformed input, many peers."""

from __future__ import annotations

import os
import struct
from collections.abc import Callable
from typing import Any

import pytest
import structlog
import structlog.testing
import trio
import trio.testing

from client.nbd_client import NBDClient, NBDError
from nbdproto import (
    NEED_DATA,
    ClientConnection,
    Cmd,
    CmdFlags,
    Errno,
    Hello,
    Info,
    Opt,
    OptionRequest,
    Reply,
    Request,
    TransmissionStarted,
    constants,
    opt_go,
    opt_meta,
)
from nbdproto.constants import ClientFlags
from server import MemoryStore, NBDServer
from server.config import ExportConfig

REQ = constants.REQUEST
MAGIC = constants.REQUEST_MAGIC


async def connect(
    server: NBDServer, nursery: trio.Nursery, export: str = "disk", **kw: Any
) -> NBDClient:
    host, port = server.address  # type: ignore[misc]
    return await NBDClient.connect(host, port, export, nursery=nursery, **kw)


class Raw:
    """A hand-driven connection: the client protocol object for parsing, raw bytes for sending."""

    def __init__(self, stream: trio.SocketStream) -> None:
        self.stream = stream
        self.conn = ClientConnection()

    @classmethod
    async def open(cls, server: NBDServer) -> Raw:
        host, port = server.address  # type: ignore[misc]
        return cls(await trio.open_tcp_stream(host, port))

    async def event(self) -> Any:
        while True:
            ev = self.conn.next_event()
            if ev is not NEED_DATA:
                return ev
            self.conn.receive_data(await self.stream.receive_some(1 << 20))

    async def send(self, item: Any) -> None:
        await self.stream.send_all(item if isinstance(item, bytes) else self.conn.send(item))

    async def handshake(
        self, export: str = "disk", structured: bool = False, meta: bool = False
    ) -> TransmissionStarted:
        await self.event()  # greeting
        await self.send(Hello(ClientFlags.C_FIXED_NEWSTYLE | ClientFlags.C_NO_ZEROES))
        if structured:
            await self.send(OptionRequest(Opt.STRUCTURED_REPLY))
            await self.event()
        if meta:
            await self.send(opt_meta(export, ["base:allocation"], set_=True))
            while type(await self.event()).__name__ != "OptionAck":
                pass
        await self.send(opt_go(export, [Info.BLOCK_SIZE]))
        while True:
            ev = await self.event()
            if isinstance(ev, TransmissionStarted):
                return ev

    async def request(
        self,
        cmd: int,
        offset: int = 0,
        length: int = 0,
        flags: int = 0,
        data: bytes | None = None,
        cookie: int = 7,
    ) -> Reply:
        await self.send(Request(cookie, cmd, offset, length, flags, data))
        reply = await self.event()
        assert isinstance(reply, Reply)
        return reply

    async def closed(self) -> bool:
        """True once the server has closed its side (EOF)."""
        try:
            while await self.stream.receive_some(65536):
                pass
        except trio.BrokenResourceError:
            pass
        return True


# -- every command ------------------------------------------------------------------------
async def test_every_command_round_trips(nbd_server: NBDServer, nursery: trio.Nursery) -> None:
    c = await connect(nbd_server, nursery)
    assert c.size == 64 << 20 and c.structured
    data = os.urandom(128 * 1024)
    await c.write(4096, data)
    assert await c.read(4096, len(data)) == data
    await c.write(0, b"f" * 512, fua=True)
    await c.flush()
    await c.trim(4096, 4096)
    assert await c.read(4096, 4096) == bytes(4096)
    await c.write_zeroes(8192, 8192)
    await c.write_zeroes(16384, 4096, no_hole=True)
    assert await c.read(8192, 12288) == bytes(12288)
    reply = await c.request(Cmd.CACHE, 0, 4096)
    assert reply.error == 0
    reply = await c.request(Cmd.WRITE_ZEROES, 0, 4096, CmdFlags.FAST_ZERO)
    assert reply.error == 0
    await c.close()


async def test_block_status_reports_data_and_holes(nbd_server: NBDServer) -> None:
    raw = await Raw.open(nbd_server)
    started = await raw.handshake(structured=True, meta=True)
    assert started.meta_contexts
    await raw.request(Cmd.WRITE, 8192, 4096, data=b"d" * 4096, cookie=1)
    reply = await raw.request(Cmd.BLOCK_STATUS, 0, 16384, cookie=2)
    (extents,) = reply.extents.values()  # type: ignore[union-attr]
    assert [(e.length, e.flags) for e in extents] == [(8192, 3), (4096, 0), (4096, 3)]
    one = await raw.request(Cmd.BLOCK_STATUS, 0, 16384, CmdFlags.REQ_ONE, cookie=3)
    assert len(next(iter(one.extents.values()))) == 1  # type: ignore[union-attr]


async def test_pipelined_requests_are_all_answered(
    nbd_server: NBDServer, nursery: trio.Nursery
) -> None:
    c = await connect(nbd_server, nursery, depth=64)
    blocks = {i: os.urandom(4096) for i in range(512)}
    async with trio.open_nursery() as n:
        for i, block in blocks.items():
            n.start_soon(c.write, i * 4096, block)
    results: dict[int, bytes] = {}

    async def read(i: int) -> None:
        results[i] = await c.read(i * 4096, 4096)

    async with trio.open_nursery() as n:
        for i in blocks:
            n.start_soon(read, i)
    assert results == blocks
    await c.close()


async def test_connections_share_one_store(nbd_server: NBDServer, nursery: trio.Nursery) -> None:
    a = await connect(nbd_server, nursery)
    b = await connect(nbd_server, nursery)
    await a.write(0, b"multi-conn" * 100)
    await a.flush()
    assert await b.read(0, 1000) == b"multi-conn" * 100


async def test_stats_count_a_live_connections_requests_as_they_happen(
    nbd_server: NBDServer, nursery: trio.Nursery
) -> None:
    """A swap device keeps one connection for its whole life: its work must show in the
    server's totals while it lasts, not when it closes."""
    c = await connect(nbd_server, nursery)
    before = nbd_server.stats.requests
    for i in range(3):
        await c.write(i * 4096, b"s" * 4096)
        # The reply came back, so the server has counted the request.
        assert nbd_server.stats.requests == before + i + 1
        assert nbd_server.stats.bytes_written == (i + 1) * 4096
    assert await c.read(0, 8192) == b"s" * 8192
    stats = nbd_server.stats
    assert (stats.live, stats.requests, stats.bytes_read) == (1, before + 4, 8192)
    await c.close()
    await trio.testing.wait_all_tasks_blocked()
    stats = nbd_server.stats
    # Closing adds nothing more: each request counted once.
    assert (stats.live, stats.requests, stats.bytes_written, stats.bytes_read) == (
        0,
        before + 4,
        3 * 4096,
        8192,
    )


async def test_a_large_write_still_arriving_goes_straight_into_the_memory_store(
    nbd_server: NBDServer, nursery: trio.Nursery, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A WRITE of 64 KiB or more whose payload is still arriving is received into the memory
    store's mapping, counted as data, and reads back whole; with faults armed it is
    buffered instead (a WRITE failed by a fault must leave the store as it was)."""
    store = nbd_server.exports["disk"].store
    assert isinstance(store, MemoryStore)
    offered: list[tuple[int, int]] = []
    receive_view = store.receive_view

    def spy(offset: int, length: int) -> memoryview:
        offered.append((offset, length))
        return receive_view(offset, length)

    monkeypatch.setattr(store, "receive_view", spy)
    c = await connect(nbd_server, nursery)
    data = os.urandom(1 << 20)
    await c.write(0, data)  # the server's first receive takes 64 KiB of it
    assert offered == [(0, 1 << 20)]
    assert await c.read(0, len(data)) == data
    assert store.allocated_bytes == len(data)
    offered.clear()
    nbd_server.exports["disk"].faults.delay = 0.001
    await c.write(1 << 20, data)
    assert offered == []
    assert await c.read(1 << 20, len(data)) == data
    assert store.allocated_bytes == 2 * len(data)
    await c.close()


# -- errors that keep the connection ------------------------------------------------------
@pytest.mark.parametrize(
    ("cmd", "offset", "length", "flags", "errno"),
    [
        (Cmd.READ, (64 << 20) - 10, 20, 0, Errno.EINVAL),
        (Cmd.TRIM, 64 << 20, 1, 0, Errno.EINVAL),
        (Cmd.CACHE, (64 << 20) + 4096, 4096, 0, Errno.EINVAL),
        (Cmd.WRITE_ZEROES, (64 << 20) - 1, 2, 0, Errno.ENOSPC),
        (Cmd.READ, 0, 4096, 1 << 7, Errno.EINVAL),  # unknown flag
        (42, 0, 0, 0, Errno.EINVAL),  # unknown command
        (Cmd.READ, 0, 33 << 20, 0, Errno.EINVAL),  # over the maximum payload
        (Cmd.BLOCK_STATUS, 0, 4096, 0, Errno.EINVAL),  # no meta context negotiated
    ],
)
async def test_bad_requests_get_errors_and_the_connection_goes_on(
    nbd_server: NBDServer, cmd: int, offset: int, length: int, flags: int, errno: int
) -> None:
    raw = await Raw.open(nbd_server)
    await raw.handshake()
    # Sent and parsed by hand: ClientConnection would refuse to build these requests.
    await raw.send(REQ.pack(MAGIC, flags, cmd, 99, offset, length))
    header = await _receive_exactly(raw, 16)
    magic, error, cookie = constants.SIMPLE_REPLY.unpack(header)
    assert (magic, error, cookie) == (constants.SIMPLE_REPLY_MAGIC, errno, 99)
    assert (await raw.request(Cmd.READ, 0, 512, cookie=100)).data == bytes(512)


async def _receive_exactly(raw: Raw, n: int) -> bytes:
    buf = b""
    while len(buf) < n:
        chunk = await raw.stream.receive_some(n - len(buf))
        assert chunk, "server closed the connection"
        buf += chunk
    return buf


async def test_write_past_end_is_enospc_and_its_payload_is_drained(nbd_server: NBDServer) -> None:
    raw = await Raw.open(nbd_server)
    await raw.handshake()
    reply = await raw.request(Cmd.WRITE, (64 << 20) - 100, 4096, data=os.urandom(4096))
    assert reply.error == Errno.ENOSPC
    assert (await raw.request(Cmd.READ, 0, 4096, cookie=8)).error == 0


async def test_write_to_read_only_export_is_eperm(nbd_server: NBDServer) -> None:
    raw = await Raw.open(nbd_server)
    started = await raw.handshake("ro")
    assert started.flags & constants.TransmissionFlags.READ_ONLY
    for cmd, data in ((Cmd.WRITE, b"x" * 512), (Cmd.TRIM, None), (Cmd.WRITE_ZEROES, None)):
        reply = await raw.request(cmd, 0, 512, data=data)
        assert reply.error == Errno.EPERM
    assert (await raw.request(Cmd.READ, 0, 512)).error == 0


async def test_zero_length_requests_succeed(nbd_server: NBDServer) -> None:
    raw = await Raw.open(nbd_server)
    await raw.handshake()
    assert (await raw.request(Cmd.WRITE, 0, 0, data=b"")).error == 0
    assert (await raw.request(Cmd.READ, 0, 0)).data == b""


async def test_structured_read_error_is_an_error_chunk(nbd_server: NBDServer) -> None:
    raw = await Raw.open(nbd_server)
    await raw.handshake(structured=True)
    reply = await raw.request(Cmd.READ, 64 << 20, 512)
    assert reply.error == Errno.EINVAL and "past the end" in reply.message


async def test_oversized_write_is_refused_before_its_payload_is_buffered(
    make_server: Callable[..., Any],
) -> None:
    server = await make_server(max_payload=1 << 20)
    raw = await Raw.open(server)
    await raw.handshake()
    huge = 64 << 20
    await raw.send(REQ.pack(MAGIC, 0, Cmd.WRITE, 5, 0, huge))
    header = await _receive_exactly(raw, 16)  # answered before any payload was sent
    assert constants.SIMPLE_REPLY.unpack(header)[1] == Errno.EINVAL
    (conn,) = server._live.values()
    chunk = bytes(1 << 16)
    for _ in range(huge // len(chunk)):
        await raw.stream.send_all(chunk)
        assert conn.buffered <= RECEIVE_BOUND
    assert (await raw.request(Cmd.READ, 0, 512, cookie=6)).error == 0


RECEIVE_BOUND = 256 * 1024  # the server's receive size: all it ever holds of a refused payload


# -- hard disconnects, one connection only ------------------------------------------------
@pytest.mark.parametrize(
    "garbage",
    [
        b"GET / HTTP/1.1\r\n\r\n",  # wrong client flags
        struct.pack(">I", 0x80),  # unknown client flag
        struct.pack(">I", 3) + b"\x00" * 16,  # bad option magic
        struct.pack(">I", 3)
        + struct.pack(">QII", constants.IHAVEOPT, 1, 4)
        + b"nope",  # unknown export
        struct.pack(">I", 3) + struct.pack(">QII", constants.IHAVEOPT, 1, 2),  # truncated option
        b"",  # connect and close
    ],
)
async def test_malformed_handshakes_close_only_that_connection(
    nbd_server: NBDServer, nursery: trio.Nursery, garbage: bytes
) -> None:
    good = await connect(nbd_server, nursery)
    raw = await Raw.open(nbd_server)
    await raw.event()
    if garbage:
        await raw.send(garbage)
    await raw.stream.send_eof()
    assert await raw.closed()
    await good.write(0, b"still here")
    assert await good.read(0, 10) == b"still here"


async def test_unknown_client_flag_is_a_hard_disconnect(nbd_server: NBDServer) -> None:
    raw = await Raw.open(nbd_server)
    await raw.event()
    await raw.send(struct.pack(">I", ClientFlags.C_FIXED_NEWSTYLE | 0x80))
    assert await raw.closed()  # without our EOF: the server itself hung up
    assert nbd_server.stats.protocol_errors == 1


async def test_bad_request_magic_is_a_hard_disconnect(nbd_server: NBDServer) -> None:
    raw = await Raw.open(nbd_server)
    await raw.handshake()
    await raw.send(REQ.pack(0xDEADBEEF, 0, Cmd.READ, 1, 0, 512))
    assert await raw.closed()
    assert nbd_server.stats.protocol_errors == 1


async def test_a_bug_in_one_connection_closes_it_and_the_server_goes_on(
    nbd_server: NBDServer, nursery: trio.Nursery, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An exception nothing expected (a bug, here in the store's read) ends that connection
    with reason ``internal_error`` and its traceback, not ``eof``; the server and its other
    connections go on."""
    good = await connect(nbd_server, nursery)
    await good.write(0, b"before")
    store = nbd_server.exports["disk"].store

    def broken_pread(offset: int, length: int) -> bytes:
        raise ZeroDivisionError("a bug")

    with structlog.testing.capture_logs() as logs:
        # Before the handshake: a connection takes the store's methods as it starts its
        # transmission phase (``good``'s loop has them already).
        monkeypatch.setattr(store, "pread", broken_pread)
        raw = await Raw.open(nbd_server)
        await raw.handshake()
        await raw.send(Request(7, Cmd.READ, 0, 512, 0, None))
        assert await raw.closed()
        monkeypatch.undo()
        await good.write(4096, b"after")
        assert await good.read(0, 6) == b"before"
        assert await good.read(4096, 5) == b"after"
    assert nbd_server.stats.internal_errors == 1
    failed = [e for e in logs if e["event"] == "server.connection_failed"]
    assert [(e["log_level"], e["error"], e["exc_info"]) for e in failed] == [
        ("error", "ZeroDivisionError: a bug", True)
    ]
    closed = [e["reason"] for e in logs if e["event"] == "server.connection_closed"]
    assert closed == ["internal_error"]


async def test_unknown_option_is_unsupported_and_drained(nbd_server: NBDServer) -> None:
    raw = await Raw.open(nbd_server)
    await raw.event()
    await raw.send(Hello(ClientFlags.C_FIXED_NEWSTYLE))
    await raw.send(OptionRequest(200, b"z" * 1000))
    ev = await raw.event()
    assert ev.reply == constants.Rep.ERR_UNSUP
    await raw.send(OptionRequest(Opt.STARTTLS))
    assert (await raw.event()).reply == constants.Rep.ERR_UNSUP
    await raw.send(opt_go("disk"))
    while not isinstance(await raw.event(), TransmissionStarted):
        pass


async def test_stalled_handshake_times_out(make_server: Callable[..., Any]) -> None:
    server = await make_server(handshake_timeout=0.3)
    raw = await Raw.open(server)
    await raw.event()
    await raw.send(b"\x00\x00")  # half the client flags, then nothing
    assert await raw.closed()
    assert server.stats.handshake_timeouts == 1


async def test_trickled_handshake_times_out(make_server: Callable[..., Any]) -> None:
    server = await make_server(handshake_timeout=0.5)
    raw = await Raw.open(server)
    await raw.event()
    hello = struct.pack(">I", 3) + struct.pack(">QII", constants.IHAVEOPT, 200, 4000)
    with trio.move_on_after(5):
        try:
            for byte in hello + bytes(4000):
                await raw.stream.send_all(bytes([byte]))
                await trio.sleep(0.01)
        except trio.BrokenResourceError:
            pass
    assert server.stats.handshake_timeouts == 1


async def test_hundred_garbage_connections_beside_a_working_client(
    nbd_server: NBDServer, nursery: trio.Nursery
) -> None:
    good = await connect(nbd_server, nursery)
    rng = __import__("random").Random(1234)
    progress = []

    async def garbage(i: int) -> None:
        try:
            stream = await trio.open_tcp_stream(*nbd_server.address)  # type: ignore[misc]
            kind = i % 4
            if kind == 0:
                payload = rng.randbytes(rng.randrange(1, 4096))
            elif kind == 1:  # valid flags, then random option traffic
                payload = struct.pack(">I", 3) + rng.randbytes(rng.randrange(16, 2048))
            elif kind == 2:  # an option claiming a huge length
                payload = struct.pack(">I", 3) + struct.pack(">QII", constants.IHAVEOPT, 7, 1 << 31)
            else:  # a full handshake, then garbage requests
                payload = struct.pack(">I", 3)
                payload += (
                    constants.OPTION_HEADER.pack(constants.IHAVEOPT, Opt.EXPORT_NAME, 4) + b"disk"
                )
                payload += rng.randbytes(rng.randrange(28, 4096))
            await stream.send_all(payload)
            with trio.move_on_after(1):
                while await stream.receive_some(65536):
                    pass
            await stream.aclose()
        except (trio.BrokenResourceError, OSError):
            pass

    async def worker() -> None:
        for i in range(200):
            data = i.to_bytes(4, "big") * 1024
            await good.write(i * 4096, data)
            assert await good.read(i * 4096, 4096) == data
            progress.append(i)

    async with trio.open_nursery() as n:
        for i in range(100):
            n.start_soon(garbage, i)
        n.start_soon(worker)
    assert len(progress) == 200
    assert nbd_server.stats.connections >= 101
    await good.close()


async def test_connections_over_the_limit_are_refused(
    make_server: Callable[..., Any], nursery: trio.Nursery
) -> None:
    server = await make_server(max_connections=2)
    a = await connect(server, nursery)
    await connect(server, nursery)
    with pytest.raises((NBDError, trio.BrokenResourceError, OSError)):
        await connect(server, nursery)
    assert server.stats.refused == 1
    await a.write(0, b"ok")


# -- shutdown ------------------------------------------------------------------------------
async def test_shutdown_answers_late_requests_with_eshutdown(
    make_server: Callable[..., Any], tmp_path: Any
) -> None:
    path = tmp_path / "disk.img"
    server = await make_server(
        exports=[ExportConfig(name="disk", size=1 << 20, backend="file", path=str(path))],
        shutdown_grace=5,
    )
    raw = await Raw.open(server)
    await raw.handshake()
    assert (await raw.request(Cmd.WRITE, 0, 5, data=b"hello", cookie=1)).error == 0
    server.shutdown()
    await trio.testing.wait_all_tasks_blocked()
    reply = await raw.request(Cmd.READ, 0, 5, cookie=2)
    assert reply.error == Errno.ESHUTDOWN
    await raw.send(Request(3, Cmd.DISC))
    assert await raw.closed()
    assert path.read_bytes()[:5] == b"hello"


async def test_shutdown_refuses_new_options(make_server: Callable[..., Any]) -> None:
    server = await make_server(shutdown_grace=5)
    raw = await Raw.open(server)
    await raw.event()
    await raw.send(Hello(ClientFlags.C_FIXED_NEWSTYLE))
    server.shutdown()
    await trio.testing.wait_all_tasks_blocked()
    await raw.send(OptionRequest(Opt.LIST))
    assert (await raw.event()).reply == constants.Rep.ERR_SHUTDOWN


async def test_read_only_export_advertises_no_writing_features(nbd_server: NBDServer) -> None:
    flags = nbd_server.exports["ro"].info.flags
    TF = constants.TransmissionFlags
    assert flags & TF.READ_ONLY and flags & TF.SEND_FLUSH
    for feature in (TF.SEND_TRIM, TF.SEND_WRITE_ZEROES, TF.SEND_FUA, TF.SEND_FAST_ZERO):
        assert not flags & feature


async def test_cancelled_server_still_closes_and_flushes_its_stores(tmp_path: Any) -> None:
    from server import Export
    from server.config import ServerConfig

    config = ServerConfig(
        listen="127.0.0.1:0",
        exports=(ExportConfig(name="f", size=1 << 20, backend="file", path=str(tmp_path / "f")),),
    )
    server = NBDServer(config, [Export.from_config(e) for e in config.exports])
    async with trio.open_nursery() as nursery:
        await nursery.start(server.serve)
        nursery.cancel_scope.cancel()
    assert server.exports["f"].store._fd == -1  # type: ignore[attr-defined]
