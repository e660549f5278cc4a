"""Fuzzing (hypothesis): mutated valid transcripts against both protocol machines, then
random and mutated byte streams against the live server, which must survive every one.

``tests/nbd/test_properties.py`` feeds the machines random frames.  Here the inputs start
from *valid* transcripts (a real handshake, a run of real requests, the server's real
answers) and are mutated the way a broken peer or a bad network would: bytes flipped,
frames truncated, duplicated, dropped, reordered, length fields lied about, garbage
spliced in; then cut into random pieces.  Beyond "only ProtocolError escapes", each
machine's state is checked after every event: every request the server machine accepts is
valid for its export and gets exactly one reply, in order, with its cookie; every reply
the client machine emits answers a request it had in flight, once.

Example counts: 460 in all by default (derandomized, so CI is reproducible); with
``NETSWAP_LONG=1``, 12,000 random ones.  Each test counts what it tried; ``pytest -s``
prints the totals.
"""

from __future__ import annotations

import contextlib
import os
import random
import struct
import threading
from collections import Counter
from collections.abc import Awaitable, Callable, Iterator
from typing import Any

import attrs
import hypothesis
import pytest
import trio
import trio.testing
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.control import currently_in_test_context

from client.nbd_client import NBDClient
from nbdproto import (
    NEED_DATA,
    ClientConnection,
    Cmd,
    CmdFlags,
    ConnectionClosed,
    Disconnect,
    Hello,
    Info,
    Opt,
    OptionRequest,
    Phase,
    ProtocolError,
    Reply,
    Request,
    RequestRejected,
    ServerConnection,
    TransmissionFlags,
    TransmissionStarted,
    constants,
    opt_export_name,
    opt_go,
    opt_meta,
)
from nbdproto.constants import ClientFlags, ReplyFlags
from server import Export, NBDServer
from server.config import ExportConfig, FaultConfig, ServerConfig
from tests.nbd.helpers import MemoryExecutor, make_exports, pieces

LONG = os.environ.get("NETSWAP_LONG") == "1"
TRIED: Counter[str] = Counter()


def fuzz_settings(ci: int, long: int) -> settings:
    return settings(
        max_examples=long if LONG else ci,
        deadline=None,
        derandomize=not LONG,
        database=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    )


def outcome(description: str) -> None:
    """Tally how an input ended (``--hypothesis-show-statistics`` shows the shares)."""
    if currently_in_test_context():
        hypothesis.event(description)


@pytest.fixture(scope="module", autouse=True)
def report_counts() -> Iterator[None]:
    yield
    print(f"\nfuzz inputs tried: {dict(TRIED)}, total {sum(TRIED.values())}")


SIZE = 64 * 1024  # the "disk" export of tests/nbd/helpers.make_exports, resized
MAX_PAYLOAD = 8192
U32 = 2**32 - 1


# -- valid transcripts -------------------------------------------------------------------------
@st.composite
def handshakes(draw: st.DrawFn) -> list[Hello | OptionRequest]:
    """What a client says to reach transmission, in one of the ways clients do it."""
    export = draw(st.sampled_from(["disk", "", "ro", "bare"]))
    script: list[Hello | OptionRequest] = [
        Hello(draw(st.sampled_from([ClientFlags.C_FIXED_NEWSTYLE, int(CLIENT_FLAGS)])))
    ]
    if draw(st.booleans()):
        script.append(OptionRequest(Opt.LIST))
    if draw(st.booleans()):
        script.append(OptionRequest(Opt.STRUCTURED_REPLY))
        if draw(st.booleans()):
            script.append(opt_meta(export, [constants.BASE_ALLOCATION], set_=True))
    if draw(st.booleans()):
        script.append(opt_go(export, [Info.BLOCK_SIZE, Info.NAME], option=Opt.INFO))
    if draw(st.booleans()):
        script.append(opt_export_name(export))
    else:
        script.append(opt_go(export, draw(st.lists(st.sampled_from(list(Info)), max_size=3))))
    return script


CLIENT_FLAGS = ClientFlags.C_FIXED_NEWSTYLE | ClientFlags.C_NO_ZEROES
COMMANDS = [Cmd.READ, Cmd.WRITE, Cmd.FLUSH, Cmd.TRIM, Cmd.WRITE_ZEROES, Cmd.CACHE]


@st.composite
def requests(draw: st.DrawFn, size: int = SIZE, block_status: bool = True) -> list[Request]:
    """A run of valid requests (distinct cookies, inside ``size``), maybe ending in DISC."""
    out = []
    for cookie in range(1, draw(st.integers(1, 12)) + 1):
        cmd = draw(st.sampled_from([*COMMANDS, Cmd.BLOCK_STATUS] if block_status else COMMANDS))
        offset = draw(st.integers(0, size - 1))
        length = draw(st.integers(0, min(size - offset, 5000)))
        flags = 0
        if cmd == Cmd.FLUSH:
            offset = length = 0
        elif cmd == Cmd.BLOCK_STATUS:
            length = max(length, 1)
            flags = draw(st.sampled_from([0, CmdFlags.REQ_ONE]))
        elif cmd == Cmd.WRITE_ZEROES:
            flags = draw(st.sampled_from([0, CmdFlags.NO_HOLE, CmdFlags.FUA]))
        elif cmd == Cmd.WRITE:
            flags = draw(st.sampled_from([0, CmdFlags.FUA]))
        data = random.Random(cookie).randbytes(length) if cmd == Cmd.WRITE else None
        out.append(Request(cookie, cmd, offset, length, int(flags), data))
    if draw(st.booleans()):
        out.append(Request(0, Cmd.DISC))
    return out


def client_frames(script: list[Hello | OptionRequest], reqs: list[Request]) -> list[bytes]:
    """The client's bytes for ``script`` then ``reqs``, one frame per message (encoded by
    hand: a mutated transcript need not be something a client machine would agree to send)."""
    frames = []
    for item in script:
        if isinstance(item, Hello):
            frames.append(constants.CLIENT_FLAGS.pack(item.flags))
        else:
            header = constants.OPTION_HEADER.pack(constants.IHAVEOPT, item.option, len(item.data))
            frames.append(header + item.data)
    for r in reqs:
        length = len(r.data) if r.data is not None else r.length
        header = constants.REQUEST.pack(
            constants.REQUEST_MAGIC, r.flags, r.command, r.cookie, r.offset, length
        )
        frames.append(header + (r.data or b""))
    return frames


# -- mutations ---------------------------------------------------------------------------------
LIES = [0, 1, 7, 28, 4095, 4096, MAX_PAYLOAD + 1, 2**31, U32]


@st.composite
def mutated(draw: st.DrawFn, frames: list[bytes]) -> bytes:
    """``frames`` after a few frame- and byte-level mutations, joined."""
    frames = list(frames)
    for _ in range(draw(st.integers(0, 4))):
        if not frames:
            break
        i = draw(st.integers(0, len(frames) - 1))
        kind = draw(
            st.sampled_from(
                ["flip", "truncate", "duplicate", "reorder", "drop", "splice", "lie", "cookie"]
            )
        )
        frame = bytearray(frames[i])
        if kind == "duplicate":
            frames.insert(i, frames[i])
        elif kind == "reorder":
            j = draw(st.integers(0, len(frames) - 1))
            frames[i], frames[j] = frames[j], frames[i]
        elif kind == "drop":
            del frames[i]
        elif kind == "splice":
            frames.insert(i, draw(st.binary(min_size=1, max_size=40)))
        elif kind == "truncate":
            frames[i] = bytes(frame[: draw(st.integers(0, len(frame)))])
        elif kind == "flip" and frame:
            pos = draw(st.integers(0, len(frame) - 1))
            frame[pos] ^= draw(st.integers(1, 255))
            frames[i] = bytes(frame)
        elif kind == "lie" and len(frame) >= 4:
            # A length or offset field (or whatever sits there) replaced by a lie.
            pos = draw(st.integers(0, len(frame) - 4))
            frame[pos : pos + 4] = struct.pack(">I", draw(st.sampled_from(LIES)))
            frames[i] = bytes(frame)
        elif kind == "cookie" and len(frame) >= 16:
            # Cookies sit at bytes 8..16 of requests and of simple and structured replies.
            j = draw(st.integers(0, len(frames) - 1))
            if len(frames[j]) >= 16:
                frame[8:16] = frames[j][8:16]
                frames[i] = bytes(frame)
    data = b"".join(frames)
    if data and draw(st.integers(0, 3)) == 0:
        data = data[: draw(st.integers(0, len(data)))]
    return data


chunk_sizes = st.lists(st.one_of(st.integers(1, 8), st.integers(1, 3000)), min_size=1, max_size=6)


# -- (a) the server machine --------------------------------------------------------------------
def reply_frame(out: bytes, structured: bool, req: Request | RequestRejected) -> int:
    """Parse the one reply ``out`` must be; its cookie.  Fails unless ``out`` is exactly one
    complete reply (a simple reply, or chunks up to the one flagged DONE)."""
    (magic,) = struct.unpack_from(">I", out)
    if magic == constants.SIMPLE_REPLY_MAGIC:
        _, error, cookie = constants.SIMPLE_REPLY.unpack_from(out)
        size = constants.SIMPLE_REPLY.size
        if isinstance(req, Request) and req.command == Cmd.READ and not error:
            assert not structured, "a structured connection answered READ with a simple reply"
            size += req.length
        assert len(out) == size, (len(out), size)
        return int(cookie)
    assert magic == constants.STRUCTURED_REPLY_MAGIC and structured
    pos, cookies = 0, set()
    while True:
        _, flags, _, cookie, length = constants.CHUNK_HEADER.unpack_from(out, pos)
        cookies.add(cookie)
        pos += constants.CHUNK_HEADER.size + length
        if flags & ReplyFlags.DONE:
            break
    assert pos == len(out) and len(cookies) == 1, (pos, len(out), cookies)
    return int(cookies.pop())


def check_request(server: ServerConnection, req: Request) -> None:
    """A request the server machine let through is valid for the export it negotiated."""
    info = server.export
    assert info is not None and server.phase is Phase.TRANSMISSION
    assert req.command in (*COMMANDS, Cmd.BLOCK_STATUS)
    if req.command != Cmd.FLUSH:
        # FLUSH's offset and length are reserved ("MUST be set to all-zero" by the client);
        # the machine lets a nonzero pair through and the server ignores it.
        assert req.offset + req.length <= info.size
    if req.command in (Cmd.READ, Cmd.WRITE):
        assert req.length <= server.max_payload
    if req.command == Cmd.WRITE:
        assert req.data is not None and len(req.data) == req.length
    else:
        assert req.data is None
    if info.flags & TransmissionFlags.READ_ONLY:
        assert req.command not in (Cmd.WRITE, Cmd.TRIM, Cmd.WRITE_ZEROES)
    if req.command == Cmd.BLOCK_STATUS:
        assert req.length > 0 and server.structured


def feed_server(stream: bytes, sizes: list[int]) -> ServerConnection:
    """``stream`` into a server machine in pieces, checking every event and reply."""
    server = ServerConnection(make_exports(SIZE), max_payload=MAX_PAYLOAD)
    executor = MemoryExecutor.of_size(SIZE)
    server.initiate()
    try:
        for piece in [*pieces(stream, sizes), b""]:
            server.receive_data(piece)
            while True:
                event = server.next_event()
                if event is NEED_DATA:
                    break
                if isinstance(event, Request):
                    check_request(server, event)
                    executor.execute(server, event)
                if isinstance(event, Request | RequestRejected):
                    out = server.data_to_send()
                    assert reply_frame(out, server.structured, event) == event.cookie
                elif isinstance(event, Disconnect | ConnectionClosed):
                    assert server.phase is Phase.CLOSED and not server.has_output
                    if isinstance(event, ConnectionClosed):
                        break
                else:
                    server.data_to_send()  # handshake answers
            limit = {
                Phase.TRANSMISSION: MAX_PAYLOAD + constants.REQUEST.size,
                Phase.OPTIONS: constants.MAX_OPTION_DATA + constants.OPTION_HEADER.size,
            }.get(server.phase, constants.OPTION_HEADER.size)
            assert server.buffered < limit, (server.phase, server.buffered)
        assert server.phase is Phase.CLOSED
        outcome(f"server closed cleanly, {'after' if server.export else 'before'} transmission")
    except ProtocolError:
        assert server.phase is Phase.ERROR
        outcome(f"server protocol error, {'after' if server.export else 'before'} transmission")
        with pytest.raises(ProtocolError):  # and nothing more comes out of it
            server.next_event()
    return server


@st.composite
def client_transcripts(draw: st.DrawFn) -> bytes:
    script = draw(handshakes())
    return draw(mutated_parts(client_frames(script, []), client_frames([], draw(requests()))))


@st.composite
def mutated_parts(draw: st.DrawFn, handshake: list[bytes], transmission: list[bytes]) -> bytes:
    """Mutate the handshake, the transmission, or both (mostly the transmission: a broken
    handshake ends everything that follows, so it needs fewer examples)."""
    where = draw(st.sampled_from(["transmission"] * 3 + ["handshake", "both", "neither"]))
    head = draw(mutated(handshake)) if where in ("handshake", "both") else b"".join(handshake)
    if where in ("transmission", "both"):
        return head + draw(mutated(transmission))
    return head + b"".join(transmission)


@fuzz_settings(ci=150, long=5000)
@given(stream=client_transcripts(), sizes=chunk_sizes)
def test_server_machine_fed_mutated_client_transcripts(stream: bytes, sizes: list[int]) -> None:
    TRIED["server machine"] += 1
    feed_server(stream, sizes)


def test_unmutated_transcripts_reach_transmission_and_are_all_answered() -> None:
    """The mutation fuzz starts from transcripts a server accepts whole."""
    script: list[Hello | OptionRequest] = [Hello(CLIENT_FLAGS)]
    script += [OptionRequest(Opt.STRUCTURED_REPLY), opt_go("disk")]
    script.insert(2, opt_meta("disk", [constants.BASE_ALLOCATION], set_=True))
    reqs = [Request(1, Cmd.WRITE, 0, 5, 0, b"hello"), Request(2, Cmd.BLOCK_STATUS, 0, 9)]
    server = feed_server(b"".join(client_frames(script, reqs)), [7])
    assert server.phase is Phase.CLOSED and server.export is not None


# -- (a) the client machine --------------------------------------------------------------------
def server_transcript(
    script: list[Hello | OptionRequest], reqs: list[Request]
) -> tuple[list[bytes], list[bytes]]:
    """What a real server machine answers to ``script`` then ``reqs``: the handshake's
    frames (option replies split on their headers) and transmission's (one per reply)."""
    server = ServerConnection(make_exports(SIZE), max_payload=MAX_PAYLOAD)
    executor = MemoryExecutor.of_size(SIZE)
    client = ClientConnection()
    frames = [server.initiate()]
    replies: list[bytes] = []
    client.receive_data(frames[0])
    drain(client)
    for item in [*script, *reqs]:
        if client.phase is Phase.CLOSED:
            break
        if isinstance(item, Request):
            if client.phase is not Phase.TRANSMISSION:
                break
            if item.command == Cmd.BLOCK_STATUS and not client.meta_contexts:
                continue  # as ClientDriver does
        server.receive_data(client.send(item))
        while True:
            event = server.next_event()
            if event is NEED_DATA or isinstance(event, ConnectionClosed):
                break
            if isinstance(event, Request):
                executor.execute(server, event)
            out = server.data_to_send()
            if not out:
                continue
            if isinstance(event, Request | RequestRejected):
                replies.append(out)
            else:
                frames += split_option_replies(out)
            client.receive_data(out)
        drain(client)
    return frames, replies


def split_option_replies(out: bytes) -> list[bytes]:
    frames, pos = [], 0
    hdr = constants.OPTION_REPLY_HEADER
    while pos + hdr.size <= len(out):
        magic, _, _, length = hdr.unpack_from(out, pos)
        if magic != constants.OPTION_REPLY_MAGIC:
            break
        frames.append(out[pos : pos + hdr.size + length])
        pos += hdr.size + length
    if pos < len(out):
        frames.append(out[pos:])  # EXPORT_NAME's reply, or the first transmission bytes
    return frames


def drain(client: ClientConnection) -> list[Any]:
    events: list[Any] = []
    while True:
        event = client.next_event()
        if event is NEED_DATA:
            return events
        events.append(event)
        if isinstance(event, ConnectionClosed):
            return events


class ClientDriver:
    """A client machine following ``script`` then ``reqs`` whatever the server answers:
    each message is sent as soon as the machine's phase allows it.  Checks each event."""

    def __init__(self, script: list[Hello | OptionRequest], reqs: list[Request]) -> None:
        self.machine = ClientConnection()
        self.script = list(script)
        self.reqs = reqs
        self.sent: dict[int, Request] = {}
        self.answered: set[int] = set()
        self.started = 0

    def step(self) -> None:
        m = self.machine
        if m.phase is Phase.SEND_FLAGS and self.script and isinstance(self.script[0], Hello):
            m.send(self.script.pop(0))
        elif m.phase is Phase.OPTIONS:
            self.script = [s for s in self.script if isinstance(s, OptionRequest)]
            if self.script:
                m.send(self.script.pop(0))
        elif m.phase is Phase.TRANSMISSION and not self.sent:
            for r in self.reqs:
                if r.command == Cmd.BLOCK_STATUS and not m.meta_contexts:
                    continue
                m.send(r)
                if r.command != Cmd.DISC:
                    self.sent[r.cookie] = r
                if m.phase is not Phase.TRANSMISSION:
                    break

    def check(self, event: Any) -> None:
        m = self.machine
        if isinstance(event, TransmissionStarted):
            self.started += 1
            assert self.started == 1 and m.phase is Phase.TRANSMISSION
        elif isinstance(event, Reply):
            req = self.sent.get(event.cookie)
            assert req is not None and event.cookie not in self.answered
            assert event.command == req.command
            self.answered.add(event.cookie)
            if req.command == Cmd.READ and not event.error:
                assert event.data is not None and len(event.data) == req.length
            assert m.in_flight == len(self.sent) - len(self.answered)

    def feed(self, stream: bytes, sizes: list[int]) -> None:
        m = self.machine
        try:
            for piece in [*pieces(stream, sizes), b""]:
                m.receive_data(piece)
                while True:
                    self.step()
                    event = m.next_event()
                    if event is NEED_DATA:
                        break
                    self.check(event)
                    if isinstance(event, ConnectionClosed):
                        outcome(f"client closed, {len(self.answered)} replies")
                        return
        except ProtocolError:
            assert m.phase is Phase.ERROR
            stage = "in transmission" if self.started else "in the handshake"
            outcome(f"client protocol error {stage}")
            with pytest.raises(ProtocolError):
                m.next_event()


@st.composite
def server_transcripts(draw: st.DrawFn) -> tuple[list[Any], list[Request], bytes]:
    script = draw(handshakes())
    reqs = [r for r in draw(requests()) if r.command != Cmd.DISC]
    return script, reqs, draw(mutated_parts(*server_transcript(script, reqs)))


@fuzz_settings(ci=150, long=5000)
@given(case=server_transcripts(), sizes=chunk_sizes)
def test_client_machine_fed_mutated_server_transcripts(
    case: tuple[list[Any], list[Request], bytes], sizes: list[int]
) -> None:
    TRIED["client machine"] += 1
    script, reqs, stream = case
    ClientDriver(script, reqs).feed(stream, sizes)


def test_unmutated_server_transcripts_answer_every_request() -> None:
    script: list[Hello | OptionRequest] = [Hello(CLIENT_FLAGS)]
    script += [OptionRequest(Opt.STRUCTURED_REPLY), opt_go("disk")]
    script.insert(2, opt_meta("disk", [constants.BASE_ALLOCATION], set_=True))
    reqs = [
        Request(1, Cmd.WRITE, 0, 5, 0, b"hello"),
        Request(2, Cmd.READ, 0, 5),
        Request(3, Cmd.BLOCK_STATUS, 0, 9),
    ]
    driver = ClientDriver(script, reqs)
    handshake, replies = server_transcript(script, reqs)
    assert len(replies) == 3
    driver.feed(b"".join(handshake + replies), [5])
    assert driver.answered == {1, 2, 3}


# -- (b) the live server ----------------------------------------------------------------------
class LiveServer:
    """One NBDServer for a whole test module, served by a trio loop in a thread, so that
    every hypothesis example (a plain function) can run coroutines in it and the server
    meets every input of the run, one after another."""

    def __init__(self) -> None:
        # Faults armed on "disk", so that the fuzz also runs through the fault path.
        errors = {"read": (0.2, "EIO"), "write": (0.2, "ENOSPC"), "trim": (0.5, "EPERM")}
        exports = (
            ExportConfig(name="disk", size=SIZE, faults=FaultConfig(seed=1, errors=errors)),
            ExportConfig(name="ro", size=SIZE, read_only=True),
            ExportConfig(name="check", size=SIZE),
        )
        config = ServerConfig(listen="127.0.0.1:0", exports=exports, handshake_timeout=5)
        self.server = NBDServer(config, [Export.from_config(e) for e in config.exports])
        self.error: BaseException | None = None
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        assert self._ready.wait(30), "the server loop did not start"
        if self.error is not None:
            raise self.error

    def _run(self) -> None:
        try:
            trio.run(self._main)
        except BaseException as exc:  # reported by check() in the test's thread
            self.error = exc
        finally:
            self._ready.set()

    async def _main(self) -> None:
        self._token = trio.lowlevel.current_trio_token()
        self._stop = trio.Event()
        async with trio.open_nursery() as nursery:
            self.address = await nursery.start(self.server.serve)
            self._ready.set()
            await self._stop.wait()
            self.server.shutdown()

    def run(self, fn: Callable[..., Awaitable[Any]], *args: Any) -> Any:
        self.check()
        return trio.from_thread.run(fn, *args, trio_token=self._token)

    def check(self) -> None:
        if self.error is not None:
            raise AssertionError("the server crashed") from self.error
        assert self._thread.is_alive(), "the server loop has ended"

    def close(self) -> None:
        if self._thread.is_alive():
            trio.from_thread.run_sync(self._stop.set, trio_token=self._token)
            self._thread.join(30)
        if self.error is not None:
            raise self.error


@pytest.fixture(scope="module")
def live() -> Iterator[LiveServer]:
    server = LiveServer()
    yield server
    server.close()


async def send_and_drain(stream: trio.abc.Stream, data: bytes, sizes: list[int]) -> None:
    """Send ``data`` in pieces, then EOF, while reading whatever comes back until the server
    closes: every input ends with the server hanging up (our EOF, or its own verdict)."""

    async def drain() -> None:
        try:
            while await stream.receive_some(1 << 20):
                pass
        except trio.BrokenResourceError:
            pass

    async with trio.open_nursery() as nursery:
        nursery.start_soon(drain)
        try:
            for piece in pieces(data, sizes):
                await stream.send_all(piece)
            await stream.send_eof()  # type: ignore[attr-defined]
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass  # the server hung up first
    await stream.aclose()


async def well_behaved_client(connect: Callable[[], Awaitable[trio.abc.Stream]], n: int) -> None:
    """The server still serves: a fresh client writes and reads back its own block."""
    async with trio.open_nursery() as nursery:
        c = await NBDClient.over(await connect(), "check", nursery=nursery)
        offset = (n % (SIZE // 4096)) * 4096
        block = random.Random(n).randbytes(4096)
        await c.write(offset, block)
        assert await c.read(offset, 4096) == block
        await c.close()


async def fuzz_over_tcp(live: LiveServer, data: bytes, sizes: list[int], n: int) -> None:
    host, port = live.address
    with trio.fail_after(20):
        await send_and_drain(await trio.open_tcp_stream(host, port), data, sizes)
        await well_behaved_client(lambda: trio.open_tcp_stream(host, port), n)


async def fuzz_in_memory(live: LiveServer, data: bytes, sizes: list[int], n: int) -> None:
    server = live.server

    async def connect() -> trio.abc.Stream:
        client_end, server_end = trio.testing.memory_stream_pair()
        nursery.start_soon(server.handle_stream, server_end)
        return client_end

    with trio.fail_after(20):
        async with trio.open_nursery() as nursery:
            # handle_stream raises anything but the errors it handles: here, into this test.
            await send_and_drain(await connect(), data, sizes)
            await well_behaved_client(connect, n)


@contextlib.contextmanager
def verdict(server: NBDServer) -> Iterator[None]:
    """Tally how the server ended the fuzzing connection."""
    before = attrs.asdict(server.stats)
    yield
    after = attrs.asdict(server.stats)
    for key in ("protocol_errors", "handshake_timeouts", "rejected"):
        if after[key] > before[key]:
            outcome(f"server: {key}")
    if after["requests"] > before["requests"] + 2:  # beyond the well-behaved client's two
        outcome("server: executed requests")


raw_garbage = st.tuples(
    st.sampled_from([b"", constants.CLIENT_FLAGS.pack(CLIENT_FLAGS)]),
    st.binary(max_size=300),
).map(b"".join)
live_inputs = st.one_of(raw_garbage, client_transcripts())


@fuzz_settings(ci=100, long=1500)
@given(data=live_inputs, sizes=chunk_sizes)
def test_live_server_in_memory_survives_mutated_streams(
    live: LiveServer, data: bytes, sizes: list[int]
) -> None:
    TRIED["live server, in memory"] += 1
    with verdict(live.server):
        live.run(fuzz_in_memory, live, data, sizes, TRIED["live server, in memory"])


@fuzz_settings(ci=60, long=500)
@given(data=live_inputs, sizes=chunk_sizes)
def test_live_server_over_tcp_survives_mutated_streams(
    live: LiveServer, data: bytes, sizes: list[int]
) -> None:
    TRIED["live server, TCP"] += 1
    with verdict(live.server):
        live.run(fuzz_over_tcp, live, data, sizes, TRIED["live server, TCP"])


def test_live_server_is_still_whole_after_the_fuzz(live: LiveServer) -> None:
    """Runs after the fuzz tests above (file order): no connection left behind."""
    live.check()

    async def settled() -> None:
        await trio.testing.wait_all_tasks_blocked()
        assert not live.server._live

    live.run(settled)
    stats = live.server.stats
    assert stats.connections >= 2 * TRIED["live server, TCP"]
    print(
        f"\nlive server after the fuzz: {attrs.asdict(stats)}, faults {live.server.fault_counts()}"
    )
