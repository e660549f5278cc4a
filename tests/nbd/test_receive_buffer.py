"""The receive buffer: bytes received straight into it (``get_buffer``), payloads borrowed
from it (``borrow_payloads``), and the same events whichever way the bytes come in."""

from __future__ import annotations

import pytest

from testbed.nbd import NEED_DATA, Cmd, Errno, Event, Request, RequestRejected, constants

from .helpers import ConnectionPair, KiB, handshake, make_exports

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
