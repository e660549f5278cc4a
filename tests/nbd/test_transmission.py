"""Transmission: every command end to end, the errors the server answers itself, framing,
and a client that reassembles the chunk shapes real servers send (nbd.md §5.7)."""

from __future__ import annotations

import struct

import pytest

from nbdproto import (
    NEED_DATA,
    ClientConnection,
    Cmd,
    CmdFlags,
    ConnectionClosed,
    Disconnect,
    Errno,
    Extent,
    LocalProtocolError,
    Opt,
    OptionRequest,
    Phase,
    RemoteProtocolError,
    Rep,
    Reply,
    Request,
    RequestRejected,
    StateFlags,
    TransmissionFlags,
    TransmissionStarted,
    constants,
    opt_export_name,
    opt_go,
)
from nbdproto.constants import Chunk, ReplyFlags

from .helpers import (
    ConnectionPair,
    KiB,
    MemoryExecutor,
    MiB,
    drain,
    handshake,
    hello,
    make_exports,
)

TF = TransmissionFlags
HOLE_ZERO = StateFlags.HOLE | StateFlags.ZERO
PATTERN = bytes(range(256)) * 16  # 4 KiB


def connected(
    export: str = "disk", *, structured: bool = True, meta: bool = True, **server_kwargs: object
) -> ConnectionPair:
    """A pair in transmission on ``export``, its requests answered by a MemoryExecutor."""
    exports = make_exports()
    executor = MemoryExecutor.of_size(exports[export].size)
    pair = ConnectionPair(exports, executor=executor, **server_kwargs)  # type: ignore[arg-type]
    handshake(pair, export, structured=structured, meta=meta)
    return pair


both_reply_kinds = pytest.mark.parametrize(
    "structured", [False, True], ids=["simple", "structured"]
)


def one_reply(pair: ConnectionPair, req: Request) -> Reply:
    events = pair.request(req)
    assert len(events) == 1, events
    (reply,) = events
    assert isinstance(reply, Reply) and reply.cookie == req.cookie
    return reply


def rejected(pair: ConnectionPair, req: Request, error: Errno) -> Reply:
    """``req`` is refused by the server machine itself with ``error``; the client sees it."""
    server_events, client_events = pair.send(req)
    assert len(server_events) == 1, server_events
    (event,) = server_events
    assert isinstance(event, RequestRejected), event
    assert (event.cookie, event.error) == (req.cookie, error)
    (reply,) = client_events
    assert isinstance(reply, Reply) and (reply.cookie, reply.error) == (req.cookie, error)
    return reply


def chunk(cookie: int, kind: int, payload: bytes, *, done: bool = False) -> bytes:
    flags = ReplyFlags.DONE if done else 0
    return (
        constants.CHUNK_HEADER.pack(
            constants.STRUCTURED_REPLY_MAGIC, flags, kind, cookie, len(payload)
        )
        + payload
    )


def data_chunk(cookie: int, offset: int, data: bytes, *, done: bool = False) -> bytes:
    return chunk(cookie, Chunk.OFFSET_DATA, struct.pack(">Q", offset) + data, done=done)


def hole_chunk(cookie: int, offset: int, size: int, *, done: bool = False) -> bytes:
    return chunk(cookie, Chunk.OFFSET_HOLE, struct.pack(">QI", offset, size), done=done)


def error_chunk(cookie: int, error: int, message: bytes = b"", *, done: bool = True) -> bytes:
    payload = struct.pack(">IH", error, len(message)) + message
    return chunk(cookie, Chunk.ERROR, payload, done=done)


def simple(cookie: int, error: int = 0) -> bytes:
    return constants.SIMPLE_REPLY.pack(constants.SIMPLE_REPLY_MAGIC, error, cookie)


def client_in_transmission(structured: bool = True) -> ClientConnection:
    """A client machine alone in transmission, for feeding it hand-made server bytes."""
    pair = ConnectionPair()
    handshake(pair, "disk", structured=structured)
    return pair.client


# -- every command, simple and structured ------------------------------------------------------
@both_reply_kinds
def test_write_then_read_round_trip(structured: bool) -> None:
    pair = connected(structured=structured)
    assert one_reply(pair, Request(1, Cmd.WRITE, 8192, data=PATTERN)) == Reply(1, Cmd.WRITE)
    assert one_reply(pair, Request(2, Cmd.READ, 8192 - 16, 4096 + 32)) == Reply(
        2, Cmd.READ, data=bytes(16) + PATTERN + bytes(16)
    )


@both_reply_kinds
@pytest.mark.parametrize("command", [Cmd.TRIM, Cmd.WRITE_ZEROES])
def test_trim_and_write_zeroes_zero_the_range(structured: bool, command: Cmd) -> None:
    pair = connected(structured=structured)
    one_reply(pair, Request(1, Cmd.WRITE, 0, data=PATTERN * 2))
    assert one_reply(pair, Request(2, command, 1024, 2048)) == Reply(2, command)
    expected = PATTERN[:1024] + bytes(2048) + PATTERN[3072:] + PATTERN
    assert one_reply(pair, Request(3, Cmd.READ, 0, 8192)).data == expected


@both_reply_kinds
@pytest.mark.parametrize("command", [Cmd.FLUSH, Cmd.CACHE])
def test_flush_and_cache_are_acknowledged(structured: bool, command: Cmd) -> None:
    pair = connected(structured=structured)
    length = 0 if command == Cmd.FLUSH else 4096
    assert one_reply(pair, Request(7, command, 0, length)) == Reply(7, command)
    assert pair.executor is not None
    assert pair.executor.executed[-1] == Request(7, command, 0, length)


def test_block_status_reports_base_allocation_per_context() -> None:
    pair = connected()
    one_reply(pair, Request(1, Cmd.WRITE, 4096, data=PATTERN))
    reply = one_reply(pair, Request(2, Cmd.BLOCK_STATUS, 0, 16384))
    (ctx_id,) = pair.client.meta_contexts
    assert reply == Reply(
        2,
        Cmd.BLOCK_STATUS,
        extents={ctx_id: (Extent(4096, HOLE_ZERO), Extent(4096, 0), Extent(8192, HOLE_ZERO))},
    )


def test_block_status_req_one_returns_a_single_extent() -> None:
    pair = connected()
    one_reply(pair, Request(1, Cmd.WRITE, 4096, data=PATTERN))
    reply = one_reply(pair, Request(2, Cmd.BLOCK_STATUS, 0, 16384, CmdFlags.REQ_ONE))
    (ctx_id,) = pair.client.meta_contexts
    assert reply.extents == {ctx_id: (Extent(4096, HOLE_ZERO),)}


@both_reply_kinds
def test_fua_reaches_the_executor_on_writes(structured: bool) -> None:
    pair = connected(structured=structured)
    req = Request(1, Cmd.WRITE, 0, flags=CmdFlags.FUA, data=PATTERN)
    assert one_reply(pair, req) == Reply(1, Cmd.WRITE)
    assert pair.executor is not None and pair.executor.executed[-1].flags == CmdFlags.FUA


@pytest.mark.parametrize(
    "flags", [CmdFlags.NO_HOLE, CmdFlags.FAST_ZERO, CmdFlags.FUA | CmdFlags.NO_HOLE]
)
def test_write_zeroes_accepts_no_hole_fast_zero_and_fua(flags: CmdFlags) -> None:
    pair = connected()
    assert one_reply(pair, Request(1, Cmd.WRITE_ZEROES, 0, 4096, flags)).error == 0


def test_fast_zero_that_cannot_be_fast_fails_with_enotsup() -> None:
    pair = connected()
    assert pair.executor is not None
    pair.executor.fast_zero = False
    reply = one_reply(pair, Request(1, Cmd.WRITE_ZEROES, 0, 4096, CmdFlags.FAST_ZERO))
    assert reply.error == Errno.ENOTSUP


def test_read_with_df_gets_one_data_chunk() -> None:
    pair = connected()
    pair.to_server(pair.client.send(Request(1, Cmd.READ, 0, 4096, CmdFlags.DF)))
    out = pair.server.data_to_send()
    assert out[:20] == constants.CHUNK_HEADER.pack(
        constants.STRUCTURED_REPLY_MAGIC, ReplyFlags.DONE, Chunk.OFFSET_DATA, 1, 8 + 4096
    )
    assert len(out) == 20 + 8 + 4096
    assert pair.to_client(out) == [Reply(1, Cmd.READ, data=bytes(4096))]


def test_df_without_structured_replies_is_einval() -> None:
    pair = connected(structured=False)
    rejected(pair, Request(1, Cmd.READ, 0, 512, CmdFlags.DF), Errno.EINVAL)


@both_reply_kinds
@pytest.mark.parametrize("command", [Cmd.READ, Cmd.WRITE, Cmd.TRIM, Cmd.WRITE_ZEROES])
def test_zero_length_requests_succeed(structured: bool, command: Cmd) -> None:
    pair = connected(structured=structured)
    req = Request(1, command, 4096, 0, data=b"" if command == Cmd.WRITE else None)
    expected = Reply(1, command, data=b"" if command == Cmd.READ else None)
    assert one_reply(pair, req) == expected


def test_zero_length_read_at_the_end_of_the_export_succeeds() -> None:
    pair = connected()
    assert one_reply(pair, Request(1, Cmd.READ, MiB, 0)).data == b""


# -- errors the server machine answers itself ------------------------------------------------------
@both_reply_kinds
@pytest.mark.parametrize(
    ("command", "error"),
    [
        (Cmd.READ, Errno.EINVAL),
        (Cmd.TRIM, Errno.EINVAL),
        (Cmd.CACHE, Errno.EINVAL),
        (Cmd.WRITE_ZEROES, Errno.ENOSPC),
    ],
)
@pytest.mark.parametrize("offset", [MiB - 512, MiB, 2**64 - 1])
def test_requests_past_the_end_are_refused(
    structured: bool, command: Cmd, error: Errno, offset: int
) -> None:
    pair = connected(structured=structured)
    reply = rejected(pair, Request(1, command, offset, 1024), error)
    if structured and command == Cmd.READ:
        assert "past the end" in reply.message
    assert pair.executor is not None and pair.executor.executed == []


def test_block_status_past_the_end_is_einval() -> None:
    pair = connected()
    rejected(pair, Request(1, Cmd.BLOCK_STATUS, MiB - 512, 1024), Errno.EINVAL)


@both_reply_kinds
def test_write_past_the_end_is_enospc_and_its_payload_drained(structured: bool) -> None:
    pair = connected(structured=structured)
    rejected(pair, Request(1, Cmd.WRITE, MiB - 512, data=PATTERN), Errno.ENOSPC)
    assert pair.server.buffered == 0
    assert one_reply(pair, Request(2, Cmd.READ, MiB - 512, 512)) == Reply(
        2, Cmd.READ, data=bytes(512)
    )


@pytest.mark.parametrize(
    "req",
    [
        Request(1, Cmd.WRITE, 0, data=PATTERN),
        Request(1, Cmd.TRIM, 0, 4096),
        Request(1, Cmd.WRITE_ZEROES, 0, 4096),
    ],
    ids=lambda r: Cmd(r.command).name,
)
def test_modifying_a_read_only_export_is_eperm(req: Request) -> None:
    pair = connected("ro")
    rejected(pair, req, Errno.EPERM)
    assert one_reply(pair, Request(2, Cmd.READ, 0, 4096)).data == bytes(4096)


@both_reply_kinds
@pytest.mark.parametrize("command", [8, 9, 0x7FFF, 0xFFFF])
def test_unknown_commands_are_einval(structured: bool, command: int) -> None:
    pair = connected(structured=structured)
    rejected(pair, Request(1, command, 0, 4096), Errno.EINVAL)
    assert one_reply(pair, Request(2, Cmd.FLUSH)).error == 0


@pytest.mark.parametrize(
    ("command", "flags"),
    [
        (Cmd.WRITE, CmdFlags.NO_HOLE),
        (Cmd.WRITE, CmdFlags.DF),
        (Cmd.READ, CmdFlags.REQ_ONE),
        (Cmd.READ, CmdFlags.FAST_ZERO),
        (Cmd.TRIM, CmdFlags.NO_HOLE),
        (Cmd.FLUSH, CmdFlags.DF),
        (Cmd.BLOCK_STATUS, CmdFlags.DF),
        (Cmd.READ, 1 << 5),  # PAYLOAD_LEN: extended headers only
        (Cmd.WRITE, 1 << 15),
        (Cmd.WRITE_ZEROES, 1 << 7),
    ],
)
def test_invalid_command_flags_are_einval(command: Cmd, flags: int) -> None:
    pair = connected()
    data = PATTERN if command == Cmd.WRITE else None
    rejected(pair, Request(1, command, 0, 4096, flags, data), Errno.EINVAL)
    assert pair.server.buffered == 0


@pytest.mark.parametrize(
    "req",
    [
        Request(1, Cmd.FLUSH),
        Request(1, Cmd.TRIM, 0, 4096),
        Request(1, Cmd.WRITE_ZEROES, 0, 4096),
        Request(1, Cmd.CACHE, 0, 4096),
        Request(1, Cmd.READ, 0, 4096, CmdFlags.FUA),
    ],
    ids=["flush", "trim", "write-zeroes", "cache", "fua"],
)
def test_commands_and_flags_not_advertised_are_einval(req: Request) -> None:
    pair = connected("bare")
    rejected(pair, req, Errno.EINVAL)


def test_block_status_without_a_meta_context_is_einval() -> None:
    pair = connected(meta=False)
    rejected(pair, Request(1, Cmd.BLOCK_STATUS, 0, 4096), Errno.EINVAL)


@pytest.mark.parametrize(("offset", "length"), [(4096, 0), (0, 4096), (512, 512)])
def test_flush_with_an_offset_or_a_length_is_einval(offset: int, length: int) -> None:
    """ "The client MUST set offset and length to zero" (proto.md); nbdkit answers EINVAL.
    Found by the live-server fuzz test."""
    pair = connected()
    rejected(pair, Request(1, Cmd.FLUSH, offset, length), Errno.EINVAL)


def test_zero_length_block_status_is_einval() -> None:
    pair = connected()
    rejected(pair, Request(1, Cmd.BLOCK_STATUS, 0, 0), Errno.EINVAL)


def test_shutting_down_answers_requests_with_eshutdown() -> None:
    pair = connected()
    pair.server.shutting_down = True
    rejected(pair, Request(1, Cmd.READ, 0, 512), Errno.ESHUTDOWN)
    rejected(pair, Request(2, Cmd.WRITE, 0, data=PATTERN), Errno.ESHUTDOWN)


# -- the payload limit -----------------------------------------------------------------------------
def test_write_over_max_payload_is_refused_at_once_and_drained_unbuffered() -> None:
    pair = connected(max_payload=MiB)
    piece = 64 * KiB
    wire = pair.client.send(Request(1, Cmd.WRITE, 0, data=bytes(40 * MiB)))
    header, payload = wire[:28], memoryview(wire)[28:]
    pair.server.receive_data(header)
    (event,) = drain(pair.server)
    assert event == RequestRejected(1, Cmd.WRITE, Errno.EINVAL, event.reason)
    assert pair.deliver() == [Reply(1, Cmd.WRITE, Errno.EINVAL)]  # before the payload arrives
    for start in range(0, len(payload), piece):
        pair.server.receive_data(payload[start : start + piece])
        assert pair.server.buffered <= piece
        assert pair.server.next_event() is NEED_DATA
    assert pair.server.buffered == 0
    assert one_reply(pair, Request(2, Cmd.READ, 0, 512)).data == bytes(512)


def test_write_over_max_payload_in_one_buffer_with_the_next_request() -> None:
    pair = connected(max_payload=4096)
    wire = pair.client.send(Request(1, Cmd.WRITE, 0, data=PATTERN * 3))
    wire += pair.client.send(Request(2, Cmd.READ, 0, 16))
    events = pair.to_server(wire)
    assert [type(e) for e in events] == [RequestRejected, Request]
    assert pair.deliver() == [Reply(1, Cmd.WRITE, Errno.EINVAL), Reply(2, Cmd.READ, data=bytes(16))]


@pytest.mark.parametrize(("flags", "error"), [(0, Errno.EINVAL), (CmdFlags.DF, Errno.EOVERFLOW)])
def test_read_over_max_payload_is_refused(flags: int, error: Errno) -> None:
    pair = connected(max_payload=64 * KiB)
    reply = rejected(pair, Request(1, Cmd.READ, 0, 64 * KiB + 1, flags), error)
    assert reply.message
    assert one_reply(pair, Request(2, Cmd.READ, 0, 64 * KiB)).data == bytes(64 * KiB)


@pytest.mark.parametrize("command", [Cmd.TRIM, Cmd.WRITE_ZEROES])
def test_trim_and_write_zeroes_may_exceed_max_payload(command: Cmd) -> None:
    pair = connected(max_payload=64 * KiB)
    assert one_reply(pair, Request(1, command, 0, 512 * KiB)).error == 0


# -- framing ---------------------------------------------------------------------------------------
def test_bad_request_magic_drops_the_connection() -> None:
    pair = connected()
    pair.server.receive_data(constants.REQUEST.pack(0x25609514, 0, Cmd.READ, 1, 0, 512))
    with pytest.raises(RemoteProtocolError):
        pair.server.next_event()
    assert pair.server.phase is Phase.ERROR
    assert pair.server.data_to_send() == b""


def test_disc_ends_transmission_and_later_bytes_are_ignored() -> None:
    pair = connected()
    server_events, _ = pair.send(Request(1, Cmd.DISC))
    assert server_events == [Disconnect()]
    assert pair.client.phase is pair.server.phase is Phase.CLOSED
    pair.server.receive_data(constants.REQUEST.pack(constants.REQUEST_MAGIC, 0, 0, 2, 0, 512))
    assert pair.server.next_event() is NEED_DATA
    assert pair.server.buffered == 0
    assert pair.server.data_to_send() == b""
    pair.server.receive_data(b"")
    assert pair.server.next_event() == ConnectionClosed()


@both_reply_kinds
def test_requests_in_flight_at_disc_are_still_answered(structured: bool) -> None:
    pair = connected(structured=structured)
    pair.executor = None  # the server answers by hand, after DISC
    wire = pair.client.send(Request(1, Cmd.READ, 0, 512))
    wire += pair.client.send(Request(2, Cmd.FLUSH))
    wire += pair.client.send(Request(3, Cmd.DISC))
    read, flush, disc = pair.to_server(wire)
    assert disc == Disconnect()
    pair.server.reply(read, data=PATTERN[:512])
    pair.server.reply(flush)
    assert pair.deliver() == [Reply(1, Cmd.READ, data=PATTERN[:512]), Reply(2, Cmd.FLUSH)]
    assert pair.client.in_flight == 0


@pytest.mark.parametrize(
    "partial",
    [b"", b"\x25\x60", 10, 28, 28 + 100],
    ids=["between-frames", "in-magic", "in-header", "before-payload", "in-payload"],
)
def test_eof_mid_frame_is_connection_closed(partial: bytes | int) -> None:
    pair = connected()
    wire = pair.client.send(Request(1, Cmd.WRITE, 0, data=PATTERN))
    if isinstance(partial, int):
        partial = wire[:partial]
    if partial:
        pair.server.receive_data(partial)
        assert pair.server.next_event() is NEED_DATA
    pair.server.receive_data(b"")
    assert pair.server.next_event() == ConnectionClosed()
    assert pair.server.phase is Phase.CLOSED


def test_client_eof_mid_reply_is_connection_closed() -> None:
    pair = connected()
    pair.to_server(pair.client.send(Request(1, Cmd.READ, 0, 4096)))
    out = pair.server.data_to_send()
    pair.client.receive_data(out[:100])
    assert pair.client.next_event() is NEED_DATA
    pair.client.receive_data(b"")
    assert pair.client.next_event() == ConnectionClosed()


@both_reply_kinds
def test_pipelined_requests_in_one_buffer_are_parsed_in_order(structured: bool) -> None:
    pair = connected(structured=structured)
    requests = []
    for i in range(64):
        if i % 3 == 0:
            requests.append(Request(i, Cmd.WRITE, i * 512, data=bytes([i]) * 512))
        elif i % 3 == 1:
            requests.append(Request(i, Cmd.READ, (i - 1) * 512, 512))
        else:
            requests.append(Request(i, Cmd.FLUSH))
    server_events, client_events = pair.send(*requests)
    assert [(e.cookie, e.command) for e in server_events] == [
        (r.cookie, r.command) for r in requests
    ]
    assert [r.cookie for r in client_events] == list(range(64))
    for reply in client_events:
        if reply.command == Cmd.READ:
            assert reply.data == bytes([reply.cookie - 1]) * 512


@both_reply_kinds
def test_replies_out_of_order_are_matched_by_cookie(structured: bool) -> None:
    pair = connected(structured=structured)
    pair.executor = None
    reads = [Request(0xDEAD_0000 + i, Cmd.READ, i * 4096, 4096) for i in range(3)]
    server_events, _ = pair.send(*reads)
    for req in reversed(server_events):
        pair.server.reply(req, data=bytes([req.cookie & 0xFF]) * req.length)
    replies = pair.deliver()
    assert [r.cookie for r in replies] == [r.cookie for r in reversed(reads)]
    assert all(r.data == bytes([r.cookie & 0xFF]) * 4096 for r in replies)


def test_structured_read_errors_arrive_as_error_chunks_with_their_message() -> None:
    pair = connected()
    pair.executor = None
    (req,) = pair.send(Request(1, Cmd.READ, 0, 4096))[0]
    pair.server.reply(req, error=Errno.EIO, message="medium error at sector 3")
    out = pair.server.data_to_send()
    kind = constants.CHUNK_HEADER.unpack_from(out)[2]
    assert kind == Chunk.ERROR
    assert pair.to_client(out) == [
        Reply(1, Cmd.READ, Errno.EIO, message="medium error at sector 3")
    ]


def test_simple_read_errors_carry_no_data() -> None:
    pair = connected(structured=False)
    pair.executor = None
    (req,) = pair.send(Request(1, Cmd.READ, 0, 4096))[0]
    pair.server.reply(req, error=Errno.EIO)
    out = pair.server.data_to_send()
    assert out == simple(1, Errno.EIO)
    assert pair.to_client(out) == [Reply(1, Cmd.READ, Errno.EIO)]


def test_reply_with_an_error_outside_the_spec_list_still_goes_out() -> None:
    pair = connected()
    pair.executor = None
    (req,) = pair.send(Request(1, Cmd.FLUSH))[0]
    pair.server.reply(req, error=30)  # EROFS: clients treat unknown errors as EINVAL
    assert pair.deliver() == [Reply(1, Cmd.FLUSH, 30)]


@pytest.mark.parametrize(
    "bad",
    [
        lambda server, req: server.reply(req, data=b"short"),
        lambda server, req: server.reply(req),
    ],
    ids=["wrong-length", "no-data"],
)
def test_server_read_reply_must_carry_the_requested_length(bad) -> None:  # type: ignore[no-untyped-def]
    pair = connected()
    pair.executor = None
    (req,) = pair.send(Request(1, Cmd.READ, 0, 4096))[0]
    with pytest.raises(LocalProtocolError):
        bad(pair.server, req)
    assert pair.server.phase is Phase.ERROR


def test_server_refuses_data_on_non_read_replies_and_simple_block_status() -> None:
    for req, call in [
        (Request(1, Cmd.WRITE, 0, 4), lambda s, r: s.reply(r, data=b"x")),
        (Request(2, Cmd.BLOCK_STATUS, 0, 4096), lambda s, r: s.reply(r)),
        (Request(3, Cmd.BLOCK_STATUS, 0, 4096), lambda s, r: s.reply_block_status(r, [])),
        (Request(4, Cmd.READ, 0, 4096), lambda s, r: s.reply_block_status(r, [Extent(1, 0)])),
    ]:
        pair = connected()
        with pytest.raises(LocalProtocolError):
            call(pair.server, req)
        assert pair.server.phase is Phase.ERROR


# -- client reassembly of hand-made structured replies -----------------------------------------------
def test_client_reassembles_a_qemu_style_read_of_hole_and_data_chunks() -> None:
    client = client_in_transmission()
    client.send(Request(5, Cmd.READ, 4096, 3 * 4096))
    a, b = b"\x11" * 4096, b"\x22" * 4096
    frames = [
        data_chunk(5, 3 * 4096, b),
        hole_chunk(5, 4096, 4096),
        data_chunk(5, 2 * 4096, a, done=True),
    ]
    for frame in frames[:-1]:
        client.receive_data(frame)
        assert client.next_event() is NEED_DATA  # not DONE yet
    client.receive_data(frames[-1])
    assert client.next_event() == Reply(5, Cmd.READ, data=bytes(4096) + a + b)
    assert client.in_flight == 0


def test_client_reassembles_an_all_hole_read() -> None:
    client = client_in_transmission()
    client.send(Request(5, Cmd.READ, 0, 8192))
    client.receive_data(hole_chunk(5, 0, 8192) + chunk(5, Chunk.NONE, b"", done=True))
    assert client.next_event() == Reply(5, Cmd.READ, data=bytes(8192))


def test_client_takes_an_nbdkit_style_single_data_chunk() -> None:
    client = client_in_transmission()
    client.send(Request(9, Cmd.READ, 512, 4096))
    client.receive_data(data_chunk(9, 512, PATTERN, done=True))
    assert client.next_event() == Reply(9, Cmd.READ, data=PATTERN)


def test_client_interleaves_chunks_of_different_replies() -> None:
    client = client_in_transmission()
    client.send(Request(1, Cmd.READ, 0, 1024))
    client.send(Request(2, Cmd.FLUSH))
    client.receive_data(
        data_chunk(1, 0, b"a" * 512) + simple(2) + data_chunk(1, 512, b"b" * 512, done=True)
    )
    assert drain(client) == [
        Reply(2, Cmd.FLUSH),
        Reply(1, Cmd.READ, data=b"a" * 512 + b"b" * 512),
    ]


def test_client_error_chunk_after_data_fails_the_read() -> None:
    client = client_in_transmission()
    client.send(Request(1, Cmd.READ, 0, 1024))
    client.receive_data(data_chunk(1, 0, b"a" * 512) + error_chunk(1, Errno.EIO, b"bad sector"))
    assert client.next_event() == Reply(1, Cmd.READ, Errno.EIO, message="bad sector")


def test_client_error_chunk_with_zero_error_counts_as_einval() -> None:
    client = client_in_transmission()
    client.send(Request(1, Cmd.READ, 0, 1024))
    client.receive_data(error_chunk(1, 0))
    assert client.next_event().error == Errno.EINVAL


def test_client_error_offset_chunk_is_an_error() -> None:
    client = client_in_transmission()
    client.send(Request(1, Cmd.READ, 0, 1024))
    payload = struct.pack(">IH", Errno.EIO, 2) + b"at" + struct.pack(">Q", 512)
    client.receive_data(chunk(1, Chunk.ERROR_OFFSET, payload, done=True))
    assert client.next_event() == Reply(1, Cmd.READ, Errno.EIO, message="at")


def test_client_maps_block_status_chunks_per_context() -> None:
    client = client_in_transmission()
    client.send(Request(1, Cmd.BLOCK_STATUS, 0, 8192))
    body = struct.pack(">IIIII", 1, 4096, 0, 4096, HOLE_ZERO)
    client.receive_data(chunk(1, Chunk.BLOCK_STATUS, body, done=True))
    assert client.next_event().extents == {1: (Extent(4096, 0), Extent(4096, HOLE_ZERO))}


# -- what the client refuses -------------------------------------------------------------------------
@pytest.mark.parametrize(
    "frames",
    [
        pytest.param(simple(99), id="simple-unknown-cookie"),
        pytest.param(data_chunk(99, 0, b"x", done=True), id="chunk-unknown-cookie"),
        pytest.param(data_chunk(1, 4096, b"x", done=True), id="data-after-range"),
        pytest.param(data_chunk(1, 0, bytes(4097), done=True), id="data-past-range"),
        pytest.param(hole_chunk(1, 0, 8192, done=True), id="hole-past-range"),
        pytest.param(chunk(1, Chunk.OFFSET_HOLE, bytes(16), done=True), id="hole-wrong-length"),
        pytest.param(chunk(1, Chunk.OFFSET_DATA, bytes(4), done=True), id="data-too-short"),
        pytest.param(data_chunk(1, 0, bytes(2048), done=True), id="read-not-covered"),
        pytest.param(  # would "cover" 4096 bytes while leaving 2048..4096 unsent
            data_chunk(1, 0, bytes(2048)) + data_chunk(1, 0, bytes(2048), done=True),
            id="overlapping-data",
        ),
        pytest.param(
            data_chunk(1, 1024, bytes(2048)) + hole_chunk(1, 0, 2048, done=True),
            id="hole-over-data",
        ),
        pytest.param(chunk(1, Chunk.NONE, b"", done=True), id="none-for-a-read"),
        pytest.param(chunk(1, 77, b"", done=True), id="unknown-chunk-type"),
        pytest.param(chunk(1, Chunk.BLOCK_STATUS, bytes(7), done=True), id="bad-block-status"),
        pytest.param(chunk(1, Chunk.ERROR, bytes(3), done=True), id="short-error"),
        pytest.param(chunk(1, Chunk.ERROR, b"\0\0\0\x05\0\x09oops", done=True), id="long-message"),
        pytest.param(b"\x12\x34\x56\x78" + bytes(12), id="bad-magic"),
    ],
)
def test_client_rejects_broken_replies(frames: bytes) -> None:
    client = client_in_transmission()
    client.send(Request(1, Cmd.READ, 0, 4096))
    client.receive_data(frames)
    with pytest.raises(RemoteProtocolError):
        client.next_event()
    assert client.phase is Phase.ERROR


def test_client_rejects_an_oversized_chunk_before_buffering_it() -> None:
    client = client_in_transmission()
    client.send(Request(1, Cmd.FLUSH))
    header = constants.CHUNK_HEADER.pack(
        constants.STRUCTURED_REPLY_MAGIC, ReplyFlags.DONE, Chunk.ERROR, 1, 1 << 30
    )
    client.receive_data(header)  # the 1 GiB payload never needs to arrive
    with pytest.raises(RemoteProtocolError):
        client.next_event()


def test_client_forgets_requests_in_flight_for_a_reconnect() -> None:
    client = client_in_transmission()
    client.send(Request(1, Cmd.READ, 0, 512))
    client.send(Request(2, Cmd.FLUSH))
    assert client.in_flight == 2
    assert client.forget_in_flight() == [1, 2]
    assert client.in_flight == 0
    client.receive_data(simple(1))
    with pytest.raises(RemoteProtocolError):  # a stale reply is now for an unknown cookie
        client.next_event()


def test_server_block_status_reply_before_transmission_is_a_local_error() -> None:
    pair = ConnectionPair()
    hello(pair)
    with pytest.raises(LocalProtocolError):
        pair.server.reply_block_status(Request(1, Cmd.BLOCK_STATUS, 0, 512), [Extent(512, 0)])
    assert pair.server.phase is Phase.ERROR


def test_server_queues_replies_until_data_to_send() -> None:
    pair = connected()
    pair.executor = None
    (req,) = pair.send(Request(1, Cmd.FLUSH))[0]
    assert not pair.server.has_output
    pair.server.reply(req)
    assert pair.server.has_output
    assert pair.server.data_to_send() == simple(1)
    assert not pair.server.has_output and pair.server.data_to_send() == b""


def test_client_rejects_data_chunks_for_a_non_read() -> None:
    client = client_in_transmission()
    client.send(Request(1, Cmd.FLUSH))
    client.receive_data(data_chunk(1, 0, b"", done=True))
    with pytest.raises(RemoteProtocolError):
        client.next_event()


def client_waiting_for(option: OptionRequest) -> ClientConnection:
    pair = ConnectionPair()
    hello(pair)
    pair.client.send(option)
    return pair.client


def option_reply(option: int, rep: int, data: bytes = b"") -> bytes:
    header = constants.OPTION_REPLY_HEADER.pack(
        constants.OPTION_REPLY_MAGIC, option, rep, len(data)
    )
    return header + data


@pytest.mark.parametrize("option", [Opt.LIST, Opt.GO, Opt.STRUCTURED_REPLY])
def test_client_rejects_an_ack_with_a_payload(option: int) -> None:
    client = client_waiting_for(
        OptionRequest(option, opt_go("disk").data if option == Opt.GO else b"")
    )
    if option == Opt.GO:
        client.receive_data(option_reply(option, Rep.INFO, struct.pack(">HQH", 0, MiB, 1)))
        client.next_event()
    client.receive_data(option_reply(option, Rep.ACK, b"\0\0\0\0"))
    with pytest.raises(RemoteProtocolError):
        client.next_event()


def test_client_rejects_go_ack_without_info_export() -> None:
    client = client_waiting_for(opt_go("disk"))
    client.receive_data(option_reply(Opt.GO, Rep.ACK))
    with pytest.raises(RemoteProtocolError):
        client.next_event()
    assert client.phase is Phase.ERROR


def test_client_rejects_transmission_flags_without_has_flags() -> None:
    client = client_waiting_for(opt_go("disk"))
    client.receive_data(option_reply(Opt.GO, Rep.INFO, struct.pack(">HQH", 0, MiB, 0)))
    client.receive_data(option_reply(Opt.GO, Rep.ACK))
    client.next_event()
    with pytest.raises(RemoteProtocolError):
        client.next_event()
    client = client_waiting_for(opt_export_name("disk"))
    client.receive_data(constants.EXPORT_NAME_REPLY.pack(MiB, 0))
    with pytest.raises(RemoteProtocolError):
        client.next_event()


@pytest.mark.parametrize(
    "reply",
    [
        option_reply(Opt.INFO, Rep.ACK),  # the wrong option echoed
        constants.OPTION_REPLY_HEADER.pack(0, Opt.LIST, Rep.ACK, 0),
        option_reply(Opt.LIST, Rep.SERVER, b"\0\0\0\x09disk"),
        option_reply(Opt.LIST, Rep.SERVER, b"\0\0"),
        option_reply(Opt.LIST, Rep.SERVER, b"\0\0\0\x02\xff\xfe"),
        constants.OPTION_REPLY_HEADER.pack(
            constants.OPTION_REPLY_MAGIC, Opt.LIST, Rep.SERVER, 1 << 20
        ),
    ],
    ids=["wrong-option", "bad-magic", "name-overrun", "short", "not-utf8", "huge"],
)
def test_client_rejects_broken_option_replies(reply: bytes) -> None:
    client = client_waiting_for(OptionRequest(Opt.LIST))
    client.receive_data(reply)
    with pytest.raises(RemoteProtocolError):
        client.next_event()
    assert client.phase is Phase.ERROR


def test_client_keeps_option_replies_it_does_not_interpret() -> None:
    client = client_waiting_for(OptionRequest(Opt.LIST))
    client.receive_data(option_reply(Opt.LIST, 77, b"future") + option_reply(Opt.LIST, Rep.ACK))
    events = drain(client)
    assert [type(e).__name__ for e in events] == ["OptionReply", "OptionAck"]
    assert events[0].data == b"future"


def test_client_send_refuses_a_duplicate_cookie_and_a_write_without_data() -> None:
    client = client_in_transmission()
    client.send(Request(1, Cmd.READ, 0, 512))
    with pytest.raises(LocalProtocolError):
        client.send(Request(1, Cmd.READ, 0, 512))
    assert client.phase is Phase.ERROR
    client = client_in_transmission()
    with pytest.raises(LocalProtocolError):
        client.send(Request(2, Cmd.WRITE, 0, 512))
    assert client.phase is Phase.ERROR


def test_client_transmission_started_matches_the_server() -> None:
    pair = ConnectionPair()
    client, server = handshake(pair, "disk")
    assert client == server
    assert client == TransmissionStarted(
        "disk", MiB, server.flags, True, dict(pair.client.meta_contexts), Opt.GO
    )
    assert pair.client.size == MiB and pair.client.flags == server.flags
