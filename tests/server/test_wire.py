"""SocketWire's waits for a lone connection: the spin before poll(2), and its backoff.

Only what is deterministic is asserted: whether a request is already there decides what
a wait returns; how long a spin lasts is SPIN_SECONDS of wall time and is not checked.
"""

from __future__ import annotations

import trio

from server import wire
from server.wire import SPIN_BACKOFF_MAX, SocketWire


async def socket_wire() -> tuple[SocketWire, trio.socket.SocketType]:
    ours, peer = trio.socket.socketpair()
    return SocketWire(trio.SocketStream(ours)), peer


async def test_a_spin_that_sees_the_next_request_keeps_spinning() -> None:
    w, peer = await socket_wire()
    with peer:
        try:
            await peer.send(b"x")
            assert w._spin()
            assert (w._spin_backoff, w._spin_skip) == (0, 0)
            view = memoryview(bytearray(8))
            assert await w.receive_into(view) == 1
        finally:
            w.close()


async def test_spins_that_see_nothing_are_skipped_for_doubling_runs_of_waits() -> None:
    w, peer = await socket_wire()
    with peer:
        try:
            skipped = []
            for _ in range(9):
                assert not w._spin()  # nothing sent: the spin fails...
                skipped.append(w._spin_skip)
                for _ in range(w._spin_skip):  # ...and the next waits do not spin
                    assert not w._spin()
                assert w._spin_skip == 0
            assert skipped == [1, 2, 4, 8, 16, 32, 64, 64, 64]
            assert SPIN_BACKOFF_MAX == 64
            await peer.send(b"x")  # a request in time resets the backoff
            assert w._spin()
            assert w._spin_backoff == 0
        finally:
            w.close()


async def test_a_second_connection_stops_the_lone_waits() -> None:
    w1, p1 = await socket_wire()
    w2, p2 = await socket_wire()
    with p1, p2:
        try:
            await p1.send(b"x")
            assert SocketWire.live >= 2
            assert not w1._wait_alone()  # another connection: wait in trio, not here
            w2.close()
            assert w1._wait_alone()
        finally:
            w1.close()
            w2.close()
    assert wire.SocketWire.live == 0
