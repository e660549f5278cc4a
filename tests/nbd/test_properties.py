"""Properties (hypothesis): request streams match a reference model whatever the byte
boundaries, and arbitrary bytes make either machine raise only ``ProtocolError``.

Examples are bounded (200 per test, derandomized) so that the suite stays fast and
deterministic; ``NETSWAP_LONG=1`` asks for 5000 random examples per test.
"""

from __future__ import annotations

import os
import random
import struct

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from nbdproto import (
    NEED_DATA,
    ClientConnection,
    Cmd,
    CmdFlags,
    ConnectionClosed,
    Errno,
    Info,
    Opt,
    OptionRequest,
    Phase,
    ProtocolError,
    Rep,
    Reply,
    Request,
    ServerConnection,
    constants,
    opt_export_name,
    opt_go,
    opt_info,
    opt_meta,
)
from nbdproto.constants import Chunk, ReplyFlags

from .helpers import (
    CLIENT_FLAGS,
    ConnectionPair,
    KiB,
    MemoryExecutor,
    drain,
    handshake,
    hello,
    make_exports,
    pieces,
)

LONG = os.environ.get("NETSWAP_LONG") == "1"
bounded = settings(
    max_examples=5000 if LONG else 200,
    deadline=None,
    derandomize=not LONG,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)

SIZE = 64 * KiB  # the "ro"/"bare" exports; "disk" is sized SIZE for the model tests
MAX_PAYLOAD = 4096
U32, U64 = 2**32 - 1, 2**64 - 1


def payload(seed: int, length: int) -> bytes:
    """``length`` pseudo-random bytes (no period that could hide a misplaced write)."""
    return random.Random(seed).randbytes(length)


# -- (a) request streams against a reference model ----------------------------------------------
COMMANDS = [Cmd.READ, Cmd.WRITE, Cmd.TRIM, Cmd.WRITE_ZEROES, Cmd.FLUSH, Cmd.CACHE]


def allowed_flags(command: int, structured: bool) -> int:
    """The command flags this server accepts on the ``disk`` export (every feature on)."""
    allowed = int(CmdFlags.FUA)
    if command == Cmd.READ and structured:
        allowed |= CmdFlags.DF
    if command == Cmd.WRITE_ZEROES:
        allowed |= CmdFlags.NO_HOLE | CmdFlags.FAST_ZERO
    return int(allowed)  # a plain int: ~ on an IntFlag would only cover known bits


@st.composite
def request_streams(draw: st.DrawFn, structured: bool) -> list[Request]:
    requests = []
    for cookie in range(draw(st.integers(1, 24))):
        command = draw(st.sampled_from(COMMANDS))
        offset = draw(st.integers(0, SIZE))
        length = draw(st.integers(0, min(SIZE - offset, 6000)))
        if command == Cmd.FLUSH:
            offset = length = 0
        allowed = allowed_flags(command, structured)
        flags = draw(
            st.one_of(
                st.integers(0, allowed).map(lambda f, a=allowed: f & a),
                st.integers(0, 0xFFFF),
            )
        )
        data = payload(draw(st.integers(0, U32)), length) if command == Cmd.WRITE else None
        requests.append(Request(cookie + 1, command, offset, length, flags, data))
    return requests


def model_reply(model: bytearray, req: Request, structured: bool) -> tuple[int, int, bytes | None]:
    """What the spec says the answer is: (cookie, error, data); applies writes to ``model``."""
    if req.flags & ~allowed_flags(req.command, structured):
        return req.cookie, Errno.EINVAL, None
    end = req.offset + req.length
    if req.command == Cmd.READ:
        return req.cookie, 0, bytes(model[req.offset : end])
    if req.command == Cmd.WRITE:
        assert req.data is not None
        model[req.offset : end] = req.data
    elif req.command in (Cmd.TRIM, Cmd.WRITE_ZEROES):
        model[req.offset : end] = bytes(req.length)
    return req.cookie, 0, None


def run_stream(
    requests: list[Request], structured: bool, sizes: list[int] | None = None
) -> ConnectionPair:
    executor = MemoryExecutor.of_size(SIZE)
    split = None if sizes is None else (lambda data: pieces(data, sizes))
    pair = ConnectionPair(make_exports(SIZE), executor=executor, split=split)
    handshake(pair, "disk", structured=structured)
    pair.send(*requests)
    return pair


@bounded
@given(data=st.data(), structured=st.booleans())
def test_request_streams_match_the_reference_model(data: st.DataObject, structured: bool) -> None:
    requests = data.draw(request_streams(structured))
    pair = run_stream(requests, structured)
    model = bytearray(SIZE)
    expected = [model_reply(model, req, structured) for req in requests]
    replies = pair.client_events[-len(requests) :]
    assert all(isinstance(r, Reply) for r in replies)
    assert [(r.cookie, r.error, r.data) for r in replies] == expected
    assert pair.executor is not None and pair.executor.disk == model
    assert pair.server.buffered == pair.client.buffered == pair.client.in_flight == 0


@bounded
@given(
    data=st.data(),
    structured=st.booleans(),
    sizes=st.lists(st.one_of(st.integers(1, 40), st.integers(1, 9000)), min_size=1, max_size=8),
)
def test_request_streams_give_the_same_events_whatever_the_byte_boundaries(
    data: st.DataObject, structured: bool, sizes: list[int]
) -> None:
    requests = data.draw(request_streams(structured))
    whole = run_stream(requests, structured)
    cut = run_stream(requests, structured, sizes)
    assert cut.server_events == whole.server_events
    assert cut.client_events == whole.client_events
    assert cut.executor is not None and whole.executor is not None
    assert cut.executor.disk == whole.executor.disk


# -- (b) a server fed arbitrary bytes ------------------------------------------------------------
names = st.sampled_from(["", "disk", "ro", "bare", "nope", "dïsk"])
option_numbers = st.one_of(st.sampled_from(list(Opt)), st.integers(0, U32))


@st.composite
def option_data(draw: st.DrawFn) -> bytes:
    kind = draw(st.integers(0, 3))
    if kind == 0:
        return draw(st.binary(max_size=48))
    if kind == 1:
        return opt_go(draw(names), draw(st.lists(st.sampled_from(list(Info)), max_size=4))).data
    if kind == 2:
        queries = draw(st.lists(st.sampled_from(["", "base:", constants.BASE_ALLOCATION, "x:"])))
        return opt_meta(draw(names), queries, set_=False).data
    return draw(names).encode()


@st.composite
def option_frames(draw: st.DrawFn) -> bytes:
    data = draw(option_data())
    length = draw(st.one_of(st.just(len(data)), st.integers(0, 80), st.integers(0, U32)))
    magic = draw(st.sampled_from([constants.IHAVEOPT] * 9 + [constants.NBDMAGIC]))
    return constants.OPTION_HEADER.pack(magic, draw(option_numbers), length) + data


@st.composite
def request_frames(draw: st.DrawFn) -> bytes:
    command = draw(st.one_of(st.sampled_from(list(Cmd)), st.integers(0, 0xFFFF)))
    length = draw(st.one_of(st.integers(0, 2 * MAX_PAYLOAD), st.integers(0, U32)))
    offset = draw(st.one_of(st.integers(0, SIZE), st.integers(0, U64)))
    flags = draw(st.one_of(st.integers(0, 0x1F), st.integers(0, 0xFFFF)))
    magic = draw(st.sampled_from([constants.REQUEST_MAGIC] * 9 + [0x25609514]))
    frame = constants.REQUEST.pack(magic, flags, command, draw(st.integers(0, U64)), offset, length)
    if command == Cmd.WRITE:
        frame += payload(draw(st.integers(0, 255)), min(length, 2 * MAX_PAYLOAD + 7))
    return frame


def mutate(data: bytes, flips: list[tuple[int, int]]) -> bytes:
    out = bytearray(data)
    for pos, value in flips:
        if out:
            out[pos % len(out)] = value
    return bytes(out)


server_prefixes = st.sampled_from(
    [
        b"",
        b"\0\0\0\x03",
        b"\0\0\0\x00",
        b"\0\0\0\x03" + constants.OPTION_HEADER.pack(constants.IHAVEOPT, Opt.STRUCTURED_REPLY, 0),
    ]
)


def handshake_bytes(structured: bool, export: str) -> bytes:
    """What a client sends to get to transmission on ``export``."""
    frames = [constants.CLIENT_FLAGS.pack(CLIENT_FLAGS)]
    if structured:
        frames.append(constants.OPTION_HEADER.pack(constants.IHAVEOPT, Opt.STRUCTURED_REPLY, 0))
        meta = opt_meta(export, [constants.BASE_ALLOCATION], set_=True)
        frames.append(constants.OPTION_HEADER.pack(constants.IHAVEOPT, meta.option, len(meta.data)))
        frames.append(meta.data)
    go = opt_go(export, [Info.BLOCK_SIZE])
    frames.append(constants.OPTION_HEADER.pack(constants.IHAVEOPT, go.option, len(go.data)))
    frames.append(go.data)
    return b"".join(frames)


def feed_server(server: ServerConnection, stream: bytes, sizes: list[int]) -> None:
    """Feed ``stream`` in pieces, answering requests; only ProtocolError may escape."""
    executor = MemoryExecutor.of_size(SIZE)
    for piece in pieces(stream, sizes):
        server.receive_data(piece)
        while True:
            event = server.next_event()
            if isinstance(event, Request):
                executor.execute(server, event)
            elif event is NEED_DATA or isinstance(event, ConnectionClosed):
                break
        limit = {
            Phase.TRANSMISSION: server.max_payload + constants.REQUEST.size,
            Phase.OPTIONS: constants.MAX_OPTION_DATA + constants.OPTION_HEADER.size,
        }.get(server.phase, constants.OPTION_HEADER.size)
        assert server.buffered < limit, (server.phase, server.buffered)
        server.data_to_send()
    server.receive_data(b"")
    assert drain(server)[-1] == ConnectionClosed()


def fuzz_server(stream: bytes, sizes: list[int], prefix: bytes = b"") -> ServerConnection:
    server = ServerConnection(make_exports(SIZE), max_payload=MAX_PAYLOAD)
    server.initiate()
    try:
        feed_server(server, prefix + stream, sizes)
    except ProtocolError:
        assert server.phase is Phase.ERROR
    return server


chunk_sizes = st.lists(st.one_of(st.integers(1, 8), st.integers(1, 5000)), min_size=1, max_size=6)
flips = st.lists(st.tuples(st.integers(0, 1 << 20), st.integers(0, 255)), max_size=3)


@bounded
@given(prefix=server_prefixes, garbage=st.binary(max_size=600), sizes=chunk_sizes)
def test_server_fed_random_bytes_raises_only_protocol_errors(
    prefix: bytes, garbage: bytes, sizes: list[int]
) -> None:
    fuzz_server(garbage, sizes, prefix)


@bounded
@given(
    prefix=server_prefixes,
    frames=st.lists(st.one_of(option_frames(), st.binary(max_size=24)), max_size=8),
    flips=flips,
    sizes=chunk_sizes,
)
def test_server_fed_random_options_raises_only_protocol_errors(
    prefix: bytes, frames: list[bytes], flips: list[tuple[int, int]], sizes: list[int]
) -> None:
    fuzz_server(mutate(b"".join(frames), flips), sizes, prefix)


@bounded
@given(
    structured=st.booleans(),
    export=st.sampled_from(["disk", "ro", "bare"]),
    frames=st.lists(st.one_of(request_frames(), st.binary(max_size=24)), max_size=10),
    flips=flips,
    sizes=chunk_sizes,
)
def test_server_in_transmission_fed_random_requests_raises_only_protocol_errors(
    structured: bool,
    export: str,
    frames: list[bytes],
    flips: list[tuple[int, int]],
    sizes: list[int],
) -> None:
    prefix = handshake_bytes(structured, export)
    fuzz_server(mutate(b"".join(frames), flips), sizes, prefix)


def test_server_random_fuzz_reaches_transmission() -> None:
    """The transmission fuzz really starts in transmission (its prefix is a valid handshake)."""
    for structured in (False, True):
        server = ServerConnection(make_exports(SIZE), max_payload=MAX_PAYLOAD)
        server.initiate()
        server.receive_data(handshake_bytes(structured, "disk"))
        drain(server)
        assert server.phase is Phase.TRANSMISSION
        assert bool(server.structured) is structured


# -- (c) a client fed arbitrary bytes ------------------------------------------------------------
client_options = st.sampled_from(
    [
        OptionRequest(Opt.LIST),
        OptionRequest(Opt.STRUCTURED_REPLY),
        OptionRequest(Opt.ABORT),
        OptionRequest(99, b"x"),
        opt_go("disk", [Info.NAME]),
        opt_info("", [Info.BLOCK_SIZE, Info.DESCRIPTION]),
        opt_export_name("disk"),
        opt_meta("disk", [constants.BASE_ALLOCATION], set_=True),
        opt_meta("", [], set_=False),
    ]
)
reply_types = st.one_of(st.sampled_from(list(Rep)), st.integers(0, U32))


@st.composite
def option_reply_frames(draw: st.DrawFn, option: int) -> bytes:
    rep = draw(reply_types)
    kind = draw(st.integers(0, 3))
    if kind == 0:
        data = draw(st.binary(max_size=40))
    elif kind == 1:  # an INFO reply of a random type
        info = draw(st.integers(0, 5))
        data = struct.pack(">H", info) + draw(st.binary(max_size=16))
        rep = Rep.INFO
    elif kind == 2:
        data = struct.pack(
            ">HQH", Info.EXPORT, draw(st.integers(0, U64)), draw(st.integers(0, 0xFFFF))
        )
        rep = Rep.INFO
    else:
        data = struct.pack(">I", draw(st.integers(0, 12))) + draw(names).encode()
    echoed = draw(st.sampled_from([option] * 9 + [draw(option_numbers)]))
    length = draw(st.sampled_from([len(data)] * 9 + [draw(st.integers(0, U32))]))
    header = constants.OPTION_REPLY_HEADER.pack(constants.OPTION_REPLY_MAGIC, echoed, rep, length)
    return header + data


def drain_client(client: ClientConnection) -> None:
    while True:
        event = client.next_event()
        if event is NEED_DATA or isinstance(event, ConnectionClosed):
            return


@bounded
@given(data=st.data(), option=client_options, sizes=chunk_sizes, flips=flips)
def test_client_negotiating_fed_random_replies_raises_only_protocol_errors(
    data: st.DataObject, option: OptionRequest, sizes: list[int], flips: list[tuple[int, int]]
) -> None:
    pair = ConnectionPair(make_exports(SIZE))
    hello(pair)
    client = pair.client
    client.send(option)
    frames = data.draw(
        st.lists(st.one_of(option_reply_frames(option.option), st.binary(max_size=24)), max_size=8)
    )
    stream = mutate(b"".join(frames), flips)
    try:
        for piece in pieces(stream, sizes):
            client.receive_data(piece)
            drain_client(client)
            if client.phase is Phase.OPTIONS:
                client.send(option)  # the same option again, so later frames are replies to it
        client.receive_data(b"")
        drain_client(client)
    except ProtocolError:
        assert client.phase is Phase.ERROR


@st.composite
def reply_frames(draw: st.DrawFn, cookies: list[int]) -> bytes:
    cookie = draw(st.sampled_from([*cookies, draw(st.integers(0, U64))]))
    if draw(st.booleans()):
        error = draw(st.sampled_from([0, 0, Errno.EIO, draw(st.integers(0, U32))]))
        return constants.SIMPLE_REPLY.pack(constants.SIMPLE_REPLY_MAGIC, error, cookie)
    kind = draw(st.one_of(st.sampled_from(list(Chunk)), st.integers(0, 0xFFFF)))
    body = {
        Chunk.OFFSET_DATA: lambda: (
            struct.pack(">Q", draw(st.integers(0, 9000))) + draw(st.binary(max_size=64))
        ),
        Chunk.OFFSET_HOLE: lambda: struct.pack(
            ">QI", draw(st.integers(0, 9000)), draw(st.integers(0, 9000))
        ),
        Chunk.BLOCK_STATUS: lambda: (
            struct.pack(">I", 1)
            + b"".join(
                struct.pack(">II", n, 3) for n in draw(st.lists(st.integers(0, U32), max_size=3))
            )
        ),
        Chunk.ERROR: lambda: struct.pack(">IH", draw(st.integers(0, U32)), 2) + b"no",
    }.get(kind, lambda: draw(st.binary(max_size=32)))()
    flags = draw(st.sampled_from([0, ReplyFlags.DONE, draw(st.integers(0, 0xFFFF))]))
    length = draw(st.sampled_from([len(body)] * 9 + [draw(st.integers(0, U32))]))
    header = constants.CHUNK_HEADER.pack(
        constants.STRUCTURED_REPLY_MAGIC, flags, kind, cookie, length
    )
    return header + body


IN_FLIGHT = [
    Request(1, Cmd.READ, 0, 4096),
    Request(2, Cmd.READ, 4096, 512),
    Request(3, Cmd.WRITE, 0, data=b"w" * 512),
    Request(4, Cmd.FLUSH),
    Request(5, Cmd.BLOCK_STATUS, 0, 8192),
    Request(6, Cmd.READ, 0, 0),
]


@bounded
@given(
    data=st.data(),
    structured=st.booleans(),
    sizes=chunk_sizes,
    flips=flips,
    genuine=st.booleans(),
)
def test_client_in_transmission_fed_random_replies_raises_only_protocol_errors(
    data: st.DataObject,
    structured: bool,
    sizes: list[int],
    flips: list[tuple[int, int]],
    genuine: bool,
) -> None:
    executor = MemoryExecutor.of_size(SIZE)
    pair = ConnectionPair(make_exports(SIZE), executor=executor)
    handshake(pair, "disk", structured=structured)
    requests = [r for r in IN_FLIGHT if structured or r.command != Cmd.BLOCK_STATUS]
    wire = b"".join(pair.client.send(r) for r in requests)
    stream = b""
    if genuine:  # the server's real answers, mutated below
        pair.to_server(wire)
        stream = pair.server.data_to_send()
    frames = data.draw(
        st.lists(
            st.one_of(reply_frames([r.cookie for r in requests]), st.binary(max_size=24)),
            max_size=8,
        )
    )
    stream = mutate(stream + b"".join(frames), flips)
    client = pair.client
    try:
        for piece in pieces(stream, sizes):
            client.receive_data(piece)
            drain_client(client)
        client.receive_data(b"")
        drain_client(client)
    except ProtocolError:
        assert client.phase is Phase.ERROR
