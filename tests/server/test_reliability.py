"""Reliability: acknowledged data survives ``kill -9``; the server holds a load of pipelining
clients with no wrong byte and bounded buffers; trickling and lying peers cost it nothing.

The load runs ~4 s here and 60 s with ``NETSWAP_LONG=1``; it prints what it achieved
(``pytest -s``), and asserts correctness only, never speed.
"""

from __future__ import annotations

import os
import random
import resource
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any, ClassVar

import pytest
import trio
import trio.testing

from client.nbd_client import Disconnected, NBDClient, NBDError
from nbdproto import (
    NEED_DATA,
    ClientConnection,
    Cmd,
    Errno,
    Hello,
    Info,
    Opt,
    OptionRequest,
    Reply,
    Request,
    ServerConnection,
    TransmissionStarted,
    constants,
    opt_go,
)
from nbdproto.constants import ClientFlags
from server import Export, NBDServer, serve
from server.config import ExportConfig, ServerConfig
from server.wire import RECEIVE_SIZE
from tests.interop.test_cli_process import server_command, wait_for_listening

from .test_serve import Raw, connect

LONG = os.environ.get("NETSWAP_LONG") == "1"
KiB, MiB = 1 << 10, 1 << 20
PAGE = 4096


# -- durability: kill -9 ---------------------------------------------------------------------
async def start_process_server(
    nursery: trio.Nursery, image: Path, log: Path, size: int
) -> tuple[trio.Process, int]:
    """``netswap server`` as a child process on a file export; its port from its log."""
    cmd = [
        *server_command(),
        "server",
        "--listen",
        "127.0.0.1:0",
        "--export",
        f"disk:{size}:file={image}",
        "--log-file",
        str(log),
    ]
    process: trio.Process = await nursery.start(partial(trio.run_process, cmd, check=False))
    first = await wait_for_listening(log, process)
    assert first["event"] == "server.listening"
    return process, int(first["port"])


async def test_acknowledged_writes_survive_kill_9(nursery: trio.Nursery, tmp_path: Path) -> None:
    size = 16 * MiB
    image = tmp_path / "disk.img"
    process, port = await start_process_server(nursery, image, tmp_path / "one.log", size)
    c = await NBDClient.connect("127.0.0.1", port, "disk", depth=32, nursery=nursery)
    rng = random.Random(2026)
    expect: dict[int, bytes] = {}  # offset -> content that MUST be there after the kill

    async def write_all(blocks: dict[int, bytes], *, fua: bool = False) -> None:
        async with trio.open_nursery() as n:
            for offset, data in blocks.items():
                n.start_soon(partial(c.write, offset, data, fua=fua))

    # 1. Written, then FLUSH: durable by the protocol's rules.
    flushed = {i * 64 * KiB: rng.randbytes(64 * KiB) for i in range(64)}  # 0 .. 4 MiB
    await write_all(flushed)
    await c.flush()
    expect |= flushed
    # 2. FUA writes: each durable when acknowledged.
    fua = {8 * MiB + i * PAGE: rng.randbytes(PAGE) for i in range(64)}
    await write_all(fua, fua=True)
    expect |= fua
    # 3. Acknowledged without FLUSH or FUA.  The protocol does not promise these survive a
    # crash of the *machine*; this server writes to the kernel before it acknowledges
    # (no cache of its own), so they survive the death of the *process*.
    plain = {12 * MiB + i * PAGE: rng.randbytes(PAGE) for i in range(64)}
    await write_all(plain)
    expect |= plain
    # 4. A stream of writes, killed in the middle: the acknowledged ones must be there;
    # the others may be old or new, page by page, never anything else.
    stream = {14 * MiB + i * PAGE: rng.randbytes(PAGE) for i in range(256)}
    acked: set[int] = set()
    killed = trio.Event()

    async def write_one(offset: int) -> None:
        try:
            await c.write(offset, stream[offset])
        except (Disconnected, NBDError):
            return
        acked.add(offset)  # even after the kill: a reply means the server had written it
        if len(acked) >= 100 and not killed.is_set():
            killed.set()
            process.kill()  # SIGKILL, with up to 32 writes in flight

    async with trio.open_nursery() as n:
        for offset in stream:
            n.start_soon(write_one, offset)
    assert killed.is_set()
    assert await process.wait() == -9

    process, port = await start_process_server(nursery, image, tmp_path / "two.log", size)
    again = await NBDClient.connect("127.0.0.1", port, "disk", nursery=nursery)
    for offset, data in expect.items():
        assert await again.read(offset, len(data)) == data, f"lost write at {offset}"
    landed = 0
    for offset, data in stream.items():
        got = await again.read(offset, PAGE)
        if offset in acked:
            assert got == data, f"lost acknowledged write at {offset}"
        else:
            assert got in (data, bytes(PAGE)), f"torn or garbage page at {offset}"
            landed += got == data
    print(
        f"\nkill -9: {len(expect)} flushed/FUA/acknowledged writes before, all back; "
        f"{len(acked)} acknowledged in the killed stream, all back; "
        f"{len(stream) - len(acked)} not acknowledged (at most 32 were in flight), "
        f"{landed} of them landed anyway"
    )
    await again.close()
    process.terminate()


class CountingStore:
    """A store wrapper that records the order of pwrite and flush calls."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner
        self.calls: list[str] = []

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)

    def pwrite(self, offset: int, data: bytes) -> None:
        self.calls.append("pwrite")
        self.inner.pwrite(offset, data)

    def flush(self) -> None:
        self.calls.append("flush")
        self.inner.flush()


async def test_flush_and_fua_reach_fdatasync_before_their_reply(
    make_server: Callable[..., Any], nursery: trio.Nursery, tmp_path: Path
) -> None:
    """What ``kill -9`` cannot show (the kernel keeps the page cache): FLUSH and FUA are
    answered only after the file store's ``flush`` (``fdatasync``) has returned."""
    server = await make_server(
        exports=[ExportConfig(name="f", size=MiB, backend="file", path=str(tmp_path / "f"))]
    )
    store = server.exports["f"].store = CountingStore(server.exports["f"].store)
    c = await connect(server, nursery, "f")
    await c.write(0, b"a" * PAGE)
    assert store.calls == ["pwrite"]
    await c.write(PAGE, b"b" * PAGE, fua=True)
    assert store.calls == ["pwrite", "pwrite", "flush"]
    await c.flush()
    assert store.calls == ["pwrite", "pwrite", "flush", "flush"]


# -- load ------------------------------------------------------------------------------------
CONNECTIONS = 64
DEPTH = 32  # requests in flight per connection: one worker task per slot
SLOT = 16 * KiB  # each worker owns one slot of its connection's region
REGION = DEPTH * SLOT
LOAD_SECONDS = 60.0 if LONG else 4.0
#: The most a connection's protocol object may hold unparsed: one receive (RECEIVE_SIZE)
#: on top of the incomplete request left from the previous one (header + largest payload).
BUFFER_BOUND = RECEIVE_SIZE + constants.REQUEST.size + SLOT
#: The most a connection may queue in replies before sending them: what its client can have
#: in flight (the server also caps READ data at MAX_QUEUED_OUTPUT, far above this).
OUTPUT_BOUND = DEPTH * (constants.CHUNK_HEADER.size + 8 + SLOT)


class WatchedConnection(ServerConnection):
    """The server's protocol object (``conn``), recording the most it ever held: bytes
    received and not yet parsed (right after each receive, before parsing), and replies
    queued."""

    peaks: ClassVar[dict[str, int]] = {"buffered": 0, "output": 0}

    def receive_data(self, data: bytes | bytearray | memoryview) -> None:
        super().receive_data(data)
        peaks = WatchedConnection.peaks
        peaks["buffered"] = max(peaks["buffered"], self.buffered)

    def data_to_send(self) -> bytes:
        out = super().data_to_send()
        peaks = WatchedConnection.peaks
        peaks["output"] = max(peaks["output"], len(out))
        return out


def test_sixty_four_pipelining_connections_get_every_byte_right(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """64 connections x 32 requests in flight, mixed reads and writes of 512 B..16 KiB, each
    worker on its own slot with a model of its content.  A sync test running its own
    ``trio.run``: the long version outlasts the suite's per-test deadline."""
    monkeypatch.setattr(serve, "ServerConnection", WatchedConnection)
    monkeypatch.setattr(WatchedConnection, "peaks", {"buffered": 0, "output": 0})
    result = trio.run(_load, LOAD_SECONDS)
    peaks = WatchedConnection.peaks
    print(
        f"\nload: {CONNECTIONS} connections x {DEPTH} in flight, {result['seconds']:.1f} s: "
        f"{result['requests']} requests ({result['reads']} reads, {result['writes']} writes), "
        f"{result['requests'] / result['seconds']:,.0f} ops/s, "
        f"{result['bytes'] / result['seconds'] / MiB:.1f} MiB/s; wrong bytes "
        f"{result['wrong_bytes']}, errors {len(result['errors'])}; server peaks per "
        f"connection: {peaks['buffered']} B unparsed, {peaks['output']} B of replies queued; "
        f"store {result['store_bytes'] / MiB:.1f} MiB; process max RSS "
        f"{result['max_rss_mib']:.0f} MiB"
    )
    assert result["errors"] == [] and result["wrong_bytes"] == 0
    assert result["requests"] >= CONNECTIONS * DEPTH  # every worker did at least one
    assert 0 < peaks["buffered"] <= BUFFER_BOUND
    assert 0 < peaks["output"] <= OUTPUT_BOUND
    assert result["store_bytes"] <= CONNECTIONS * REGION
    assert result["server_stats"]["protocol_errors"] == 0
    assert result["server_stats"]["rejected"] == 0


async def _load(seconds: float) -> dict[str, Any]:
    config = ServerConfig(
        listen="127.0.0.1:0",
        exports=(ExportConfig(name="load", size=CONNECTIONS * REGION),),
    )
    server = NBDServer(config, [Export.from_config(e) for e in config.exports])
    totals = {"reads": 0, "writes": 0, "bytes": 0, "wrong_bytes": 0}
    errors: list[str] = []
    with trio.fail_after(seconds + 120):
        async with trio.open_nursery() as nursery:
            host, port = await nursery.start(server.serve)
            async with trio.open_nursery() as clients:
                conns = [
                    await NBDClient.connect(host, port, "load", depth=DEPTH, nursery=clients)
                    for _ in range(CONNECTIONS)
                ]
                stop = trio.current_time() + seconds
                start = time.perf_counter()
                async with trio.open_nursery() as workers:
                    for ci, c in enumerate(conns):
                        for wi in range(DEPTH):
                            base = ci * REGION + wi * SLOT
                            workers.start_soon(
                                _worker,
                                c,
                                base,
                                random.Random(ci * DEPTH + wi),
                                stop,
                                totals,
                                errors,
                            )
                    await trio.sleep_until(stop)
                elapsed = time.perf_counter() - start
                store_bytes = server.exports["load"].store.allocated_bytes  # type: ignore[attr-defined]
                for c in conns:
                    await c.close()
            server.shutdown()
    return {
        **totals,
        "requests": totals["reads"] + totals["writes"],
        "seconds": elapsed,
        "errors": errors,
        "store_bytes": store_bytes,
        "max_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "server_stats": {
            "protocol_errors": server.stats.protocol_errors,
            "rejected": server.stats.rejected,
        },
    }


async def _worker(
    c: NBDClient,
    base: int,
    rng: random.Random,
    stop: float,
    totals: dict[str, int],
    errors: list[str],
) -> None:
    model = bytearray(SLOT)  # the export starts as zeros
    try:
        while trio.current_time() < stop:
            start = rng.randrange(0, SLOT, 512)
            length = rng.randrange(512, SLOT - start + 1, 512)
            if rng.random() < 0.5:
                data = rng.randbytes(length)
                await c.write(base + start, data)
                model[start : start + length] = data
                totals["writes"] += 1
            else:
                got = await c.read(base + start, length)
                totals["wrong_bytes"] += _wrong(got, model[start : start + length])
                totals["reads"] += 1
            totals["bytes"] += length
        # Finally the whole slot, so that a lost write no later read covered shows up too.
        totals["wrong_bytes"] += _wrong(await c.read(base, SLOT), model)
    except NBDError as exc:
        errors.append(f"{base}: {exc}")


def _wrong(got: bytes, want: bytes | bytearray) -> int:
    if got == want:
        return 0
    return sum(a != b for a, b in zip(got, want, strict=False)) + abs(len(got) - len(want))


# -- trickling and lying peers ---------------------------------------------------------------
class Trickler:
    """A protocol client whose bytes reach an in-memory server one at a time, every
    ``interval`` seconds of virtual time, while the server connection's buffer is watched."""

    def __init__(self, server: NBDServer, stream: trio.abc.Stream, interval: float) -> None:
        self.server = server
        self.stream = stream
        self.interval = interval
        self.conn = ClientConnection()
        self.peak = 0

    async def send(self, item: Hello | OptionRequest | Request) -> None:
        for byte in self.conn.send(item):
            await self.stream.send_all(bytes([byte]))
            await trio.sleep(self.interval)  # the trickle's pace, on the virtual clock
            for m in self.server._live.values():
                self.peak = max(self.peak, m.buffered)

    async def event(self) -> Any:
        while True:
            ev = self.conn.next_event()
            if ev is not NEED_DATA:
                return ev
            self.conn.receive_data(await self.stream.receive_some(65536))


def in_memory_server(**config: Any) -> NBDServer:
    cfg = ServerConfig(
        listen="127.0.0.1:0", exports=(ExportConfig(name="disk", size=MiB),), **config
    )
    return NBDServer(cfg, [Export.from_config(e) for e in cfg.exports])


async def test_handshake_and_request_trickled_byte_by_byte_are_accepted(
    autojump_clock: trio.abc.Clock,
) -> None:
    server = in_memory_server(handshake_timeout=10)
    client_end, server_end = trio.testing.memory_stream_pair()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(server.handle_stream, server_end)
        t = Trickler(server, client_end, interval=0.01)
        await t.event()  # greeting
        await t.send(Hello(ClientFlags.C_FIXED_NEWSTYLE | ClientFlags.C_NO_ZEROES))
        await t.send(OptionRequest(Opt.STRUCTURED_REPLY))
        await t.event()
        go = opt_go("disk", [Info.BLOCK_SIZE])
        await t.send(go)
        while not isinstance(await t.event(), TransmissionStarted):
            pass
        handshake_peak = t.peak
        data = bytes(range(256)) * 2
        await t.send(Request(1, Cmd.WRITE, 4096, len(data), 0, data))
        assert (await t.event()).error == 0
        await t.send(Request(2, Cmd.READ, 4096, len(data)))
        reply = await t.event()
        assert isinstance(reply, Reply) and reply.data == data
        await t.send(Request(3, Cmd.DISC))
    # Never more than the largest frame of the handshake (GO) and of transmission.
    assert handshake_peak <= constants.OPTION_HEADER.size + len(go.data)
    assert t.peak <= constants.REQUEST.size + len(data)
    assert server.stats.handshake_timeouts == 0


async def test_handshake_trickled_too_slowly_is_cut_at_the_timeout(
    autojump_clock: trio.abc.Clock,
) -> None:
    server = in_memory_server(handshake_timeout=10)
    client_end, server_end = trio.testing.memory_stream_pair()
    start = trio.current_time()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(server.handle_stream, server_end)
        t = Trickler(server, client_end, interval=1.0)
        await t.event()
        await t.send(Hello(ClientFlags.C_FIXED_NEWSTYLE))
        with pytest.raises(trio.BrokenResourceError):
            await t.send(OptionRequest(200, b"z" * 60))  # 16 + 60 bytes: 76 s at this pace
    assert server.stats.handshake_timeouts == 1
    assert 10 <= trio.current_time() - start <= 11
    assert t.peak <= constants.OPTION_HEADER.size + 60


LIE = 1 << 31


@pytest.mark.parametrize(
    ("option", "answer"),
    [
        (Opt.GO, constants.Rep.ERR_TOO_BIG),  # a known option: too big, connection kept
        (200, constants.Rep.ERR_UNSUP),  # an unknown one: unsupported, connection kept
        (Opt.EXPORT_NAME, None),  # no error reply exists: a hard disconnect
    ],
)
async def test_option_announcing_two_gib_is_answered_before_its_data_and_never_buffered(
    nbd_server: NBDServer, option: int, answer: int | None
) -> None:
    raw = await Raw.open(nbd_server)
    await raw.event()
    await raw.send(Hello(ClientFlags.C_FIXED_NEWSTYLE | ClientFlags.C_NO_ZEROES))
    await raw.send(constants.OPTION_HEADER.pack(constants.IHAVEOPT, option, LIE))
    if answer is None:
        assert await raw.closed()
        assert nbd_server.stats.protocol_errors == 1
        return
    reply = raw.stream  # answered at once, before any of the 2 GiB
    header = await _receive_exactly(reply, constants.OPTION_REPLY_HEADER.size)
    _, echoed, rep, length = constants.OPTION_REPLY_HEADER.unpack(header)
    assert (echoed, rep) == (option, answer)
    await _receive_exactly(reply, length)
    (conn,) = nbd_server._live.values()
    chunk = bytes(1 << 20)
    for _ in range(16):  # 16 MiB of the 2 GiB: drained as it comes, never held
        await raw.stream.send_all(chunk)
        assert conn.buffered <= RECEIVE_SIZE
    assert nbd_server.stats.protocol_errors == 0


async def test_write_announcing_two_gib_is_refused_before_its_payload(
    nbd_server: NBDServer,
) -> None:
    raw = await Raw.open(nbd_server)
    await raw.handshake()
    await raw.send(constants.REQUEST.pack(constants.REQUEST_MAGIC, 0, Cmd.WRITE, 9, 0, LIE))
    header = await _receive_exactly(raw.stream, constants.SIMPLE_REPLY.size)
    assert constants.SIMPLE_REPLY.unpack(header)[1:] == (Errno.EINVAL, 9)
    (conn,) = nbd_server._live.values()
    for _ in range(16):
        await raw.stream.send_all(bytes(1 << 20))
        assert conn.buffered <= RECEIVE_SIZE
    await raw.stream.aclose()


async def _receive_exactly(stream: trio.abc.ReceiveStream, n: int) -> bytes:
    buf = b""
    while len(buf) < n:
        chunk = await stream.receive_some(n - len(buf))
        assert chunk, "server closed the connection"
        buf += chunk
    return buf
