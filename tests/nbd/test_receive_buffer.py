"""The receive buffer: bytes received straight into it (``get_buffer``), payloads borrowed
from it (``borrow_payloads``) or received into a sink instead (``payload_sink``), and the
same events whichever way the bytes come in."""

from __future__ import annotations

import attrs
import pytest

from nbdproto import (
    NEED_DATA,
    Cmd,
    ConnectionClosed,
    Errno,
    Event,
    LocalProtocolError,
    Request,
    RequestRejected,
    constants,
)

from .helpers import ConnectionPair, KiB, MiB, handshake, make_exports

PAYLOADS = [bytes([i]) * (4 * KiB) for i in range(1, 4)]
REQUESTS = [Request(i, Cmd.WRITE, i * 4 * KiB, 4 * KiB, 0, p) for i, p in enumerate(PAYLOADS)]


def in_transmission(**server_kwargs: object) -> ConnectionPair:
    pair = ConnectionPair(make_exports(), **server_kwargs)  # type: ignore[arg-type]
    handshake(pair, "disk", structured=True, meta=False)
    return pair


def wire_bytes(pair: ConnectionPair, requests: list[Request]) -> bytes:
    return b"".join(pair.client.send(r) for r in requests)


def events_of(pair: ConnectionPair) -> list[Event]:
    out: list[Event] = []
    while (event := pair.server.next_event()) is not NEED_DATA:
        out.append(event)  # type: ignore[arg-type]
        if isinstance(event, ConnectionClosed):
            break
    return out


def receive_into(pair: ConnectionPair, data: bytes) -> None:
    """What a server does with a socket: recv_into the lent view, hand back the filled part."""
    view = pair.server.get_buffer(len(data))
    view[: len(data)] = data
    pair.server.receive_data(view[: len(data)])


@pytest.mark.parametrize("cut", [1, 27, 28, 29, 4 * KiB + 28, 4 * KiB + 40, 9000])
def test_bytes_received_into_the_lent_buffer_give_the_same_events(cut: int) -> None:
    pair = in_transmission()
    data = wire_bytes(pair, REQUESTS)
    events = []
    for start in range(0, len(data), cut):
        receive_into(pair, data[start : start + cut])
        events += events_of(pair)
    assert events == REQUESTS
    assert pair.server.buffered == 0


def test_lent_and_copied_bytes_mix_in_any_order() -> None:
    pair = in_transmission()
    data = wire_bytes(pair, REQUESTS)
    events = []
    for i, start in enumerate(range(0, len(data), 1000)):
        piece = data[start : start + 1000]
        if i % 2:
            receive_into(pair, piece)
        else:
            pair.server.receive_data(piece)
        events += events_of(pair)
    assert events == REQUESTS


def test_a_lent_view_may_be_filled_in_part() -> None:
    pair = in_transmission()
    data = wire_bytes(pair, REQUESTS[:1])
    view = pair.server.get_buffer(64 * KiB)
    view[: len(data)] = data
    pair.server.receive_data(view[: len(data)])
    assert events_of(pair) == REQUESTS[:1]


def test_handing_back_more_than_was_lent_is_an_error() -> None:
    pair = in_transmission()
    view = pair.server.get_buffer(64)
    with pytest.raises(ValueError, match="65 bytes received into a view of 64"):
        pair.server.receive_data(memoryview(view.obj)[: len(view) + 1])


def test_borrowed_payloads_are_read_only_views_of_the_received_bytes() -> None:
    pair = in_transmission(borrow_payloads=True)
    receive_into(pair, wire_bytes(pair, REQUESTS))
    events = events_of(pair)
    assert events == REQUESTS
    for event in events:
        assert isinstance(event, Request) and isinstance(event.data, memoryview)
        assert event.data.readonly


def test_payloads_are_bytes_unless_borrowed() -> None:
    pair = in_transmission()
    receive_into(pair, wire_bytes(pair, REQUESTS))
    assert all(isinstance(e, Request) and type(e.data) is bytes for e in events_of(pair))


def test_a_refused_payload_received_into_the_lent_buffer_is_drained_not_held() -> None:
    """A WRITE over max_payload is refused at its header; its payload, received through
    get_buffer in pieces, is dropped as it comes and the next request parses."""
    pair = in_transmission(max_payload=4 * KiB)
    big = 64 * KiB
    header = constants.REQUEST.pack(constants.REQUEST_MAGIC, 0, Cmd.WRITE, 7, 0, big)
    receive_into(pair, header)
    (refused,) = events_of(pair)
    assert isinstance(refused, RequestRejected) and refused.error == Errno.EINVAL
    payload = bytes(big)
    for start in range(0, big, 5000):
        receive_into(pair, payload[start : start + 5000])
        assert pair.server.buffered == 0
        assert events_of(pair) == []
    receive_into(pair, wire_bytes(pair, REQUESTS[:1]))
    assert events_of(pair) == REQUESTS[:1]


def test_a_payload_larger_than_the_buffer_grows_it() -> None:
    pair = in_transmission()
    payload = bytes(range(256)) * 1024  # 256 KiB
    req = Request(9, Cmd.WRITE, 0, len(payload), 0, payload)
    data = wire_bytes(pair, [req])
    for start in range(0, len(data), 64 * KiB):
        receive_into(pair, data[start : start + 64 * KiB])
    assert events_of(pair) == [req]


# -- a payload sink: a large payload received straight into the server's store ------------
BIG = 64 * KiB
BIG_PAYLOAD = bytes(range(256)) * (BIG // 256)
BIG_WRITE = Request(5, Cmd.WRITE, 128 * KiB, BIG, 0, BIG_PAYLOAD)


class Sink:
    """A store's bytes, lent for payloads to be received into; records what it was offered."""

    def __init__(self, size: int = MiB, *, take: bool = True) -> None:
        self.disk = bytearray(size)
        self.offered: list[tuple[int, int]] = []
        self.take = take

    def __call__(self, offset: int, length: int) -> memoryview | None:
        self.offered.append((offset, length))
        return memoryview(self.disk)[offset : offset + length] if self.take else None


def with_sink(sink: Sink, **server_kwargs: object) -> ConnectionPair:
    return in_transmission(borrow_payloads=True, payload_sink=sink, **server_kwargs)


@pytest.mark.parametrize("first", [28, 29, 1000, 28 + BIG - 1])
def test_a_payload_still_arriving_is_received_into_the_sink(first: int) -> None:
    sink = Sink()
    pair = with_sink(sink)
    data = wire_bytes(pair, [BIG_WRITE])
    receive_into(pair, data[:first])
    assert events_of(pair) == []
    assert sink.offered == [(BIG_WRITE.offset, BIG)]
    rest = pair.server.get_buffer(4096)  # the rest of the payload, whatever was asked
    assert len(rest) == len(data) - first
    rest[:] = data[first:]
    pair.server.receive_data(rest)
    (event,) = events_of(pair)
    assert event == BIG_WRITE
    assert isinstance(event, Request) and event.data is not None
    assert event.data.obj is sink.disk  # type: ignore[union-attr]
    assert sink.disk[BIG_WRITE.offset : BIG_WRITE.offset + BIG] == BIG_PAYLOAD
    assert pair.server.buffered == 0


def test_copied_bytes_fill_the_sink_then_the_buffer() -> None:
    """Bytes that come with receive_data (not through get_buffer) fill the sink first; what
    follows the payload is the next request."""
    sink = Sink()
    pair = with_sink(sink)
    data = wire_bytes(pair, [BIG_WRITE, *REQUESTS])
    events = []
    for start in range(0, len(data), 10_000):
        pair.server.receive_data(data[start : start + 10_000])
        # A borrowed payload is valid until the next receive: keep a copy.
        events += [attrs.evolve(e, data=bytes(e.data)) for e in events_of(pair)]  # type: ignore[arg-type,misc]
    assert events == [BIG_WRITE, *REQUESTS]
    # Every WRITE cut by a receive is offered (how large is worth it is the sink's call).
    assert sink.offered[0] == (BIG_WRITE.offset, BIG)
    assert sink.disk[BIG_WRITE.offset : BIG_WRITE.offset + BIG] == BIG_PAYLOAD


def test_a_payload_that_has_all_arrived_is_not_offered() -> None:
    sink = Sink()
    pair = with_sink(sink)
    receive_into(pair, wire_bytes(pair, [BIG_WRITE]))
    (event,) = events_of(pair)
    assert event == BIG_WRITE and sink.offered == []


def test_a_sink_that_declines_leaves_the_payload_to_the_buffer() -> None:
    sink = Sink(take=False)
    pair = with_sink(sink)
    data = wire_bytes(pair, [BIG_WRITE])
    receive_into(pair, data[:100])
    assert events_of(pair) == []
    receive_into(pair, data[100:])
    (event,) = events_of(pair)
    assert event == BIG_WRITE and sink.offered == [(BIG_WRITE.offset, BIG)]
    assert not any(sink.disk)


@pytest.mark.parametrize(
    ("export", "offset", "error"),
    [("disk", MiB - 4096, Errno.ENOSPC), ("ro", 0, Errno.EPERM)],
    ids=["past the end", "read-only"],
)
def test_a_write_that_will_be_refused_is_never_offered(
    export: str, offset: int, error: Errno
) -> None:
    sink = Sink()
    pair = ConnectionPair(make_exports(), borrow_payloads=True, payload_sink=sink)
    handshake(pair, export, structured=True, meta=False)
    data = pair.client.send(Request(6, Cmd.WRITE, offset, BIG, 0, BIG_PAYLOAD))
    receive_into(pair, data[:100])
    receive_into(pair, data[100:])
    (event,) = events_of(pair)
    assert isinstance(event, RequestRejected) and event.error == error
    assert sink.offered == []


def test_end_of_stream_in_a_sunk_payload_closes_the_connection() -> None:
    pair = with_sink(Sink())
    receive_into(pair, wire_bytes(pair, [BIG_WRITE])[:1000])
    assert events_of(pair) == []
    pair.server.receive_data(b"")
    assert events_of(pair) == [ConnectionClosed()]


def test_a_sink_of_the_wrong_size_is_a_local_error() -> None:
    pair = with_sink(lambda offset, length: memoryview(bytearray(length - 1)))  # type: ignore[arg-type]
    with pytest.raises(LocalProtocolError, match="payload sink of"):
        receive_into(pair, wire_bytes(pair, [BIG_WRITE])[:1000])
        events_of(pair)
