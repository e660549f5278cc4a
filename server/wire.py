"""Bytes in and out of one connection: a wire over any trio stream, or straight on a socket.

The transmission loop (``transmission.py``) reads and writes through a :class:`Wire`.  On a
TCP socket, :class:`SocketWire` calls ``recv_into``/``send`` itself and waits only when the
kernel says "would block": ``SocketStream.receive_some`` and ``send_all`` each pass through
trio's scheduler even when the data is already there.  Any other stream (an in-memory pair
under a virtual clock in tests, TLS one day) goes through :class:`StreamWire`.
"""

from __future__ import annotations

import os
import select
import socket
import time
from typing import Protocol

import trio

RECEIVE_SIZE = 256 * 1024
SPIN_SECONDS = 50e-6
SPIN_BACKOFF_MAX = 64
#: Spin this long before yielding the CPU between looks (a peer on another CPU answers
#: within it; one on ours needs the CPU to answer at all).
SPIN_BEFORE_YIELD = 15e-6


class Wire(Protocol):
    """What the transmission loop needs of a connection's byte stream."""

    async def receive(self) -> bytes | bytearray | memoryview: ...
    async def send(self, data: bytes) -> None: ...
    def close(self) -> None: ...


class StreamWire:
    """Bytes in and out through any trio stream (an in-memory pair in tests, TLS, ...)."""

    def __init__(self, stream: trio.abc.Stream) -> None:
        self._stream = stream

    async def receive(self) -> bytes | bytearray | memoryview:
        return await self._stream.receive_some(RECEIVE_SIZE)

    async def send(self, data: bytes) -> None:
        await self._stream.send_all(data)

    def close(self) -> None:
        pass


class SocketWire:
    """Bytes straight on a TCP socket: non-blocking ``recv_into``/``send``, waiting only when
    the kernel says "would block".

    ``SocketStream.receive_some`` and ``send_all`` each pass through the scheduler even when
    the data is already there; at queue depth 1 that is most of a request's cost.  Here a
    request costs one wait (for the client's next request).  When data keeps arriving
    without a wait, an explicit checkpoint once CHECKPOINT_SECONDS have passed since the
    task last yielded keeps other tasks running.
    """

    #: A checkpoint costs ~10 us on a small VM (a whole scheduler pass): once every 8
    #: receives it was a tenth of a request's time at queue depth 1.  By the clock instead,
    #: other tasks still run within a millisecond.
    CHECKPOINT_SECONDS = 1e-3
    #: Socket wires open in this process.  Spinning helps a lone client at queue depth 1;
    #: with several connections it only delays the others (the 64-connection load test
    #: ran 25% faster without it), so only a lone wire spins.
    live = 0

    def __init__(self, stream: trio.SocketStream) -> None:
        # A duplicate descriptor of the same socket (same O_NONBLOCK file description),
        # so that we use only public socket and trio.lowlevel APIs.
        self._sock = socket.socket(fileno=os.dup(stream.socket.fileno()))
        self._buf = bytearray(RECEIVE_SIZE)
        self._view = memoryview(self._buf)
        self._poll = select.poll()  # for _spin: a third of select.select's cost per look
        self._poll.register(self._sock.fileno(), select.POLLIN)
        self._yielded = time.perf_counter()
        self._backoff = 0  # waits to sleep through without spinning after the next miss
        self._skip = 0  # waits left to sleep through before spinning again
        self._closed = False
        SocketWire.live += 1

    async def receive(self) -> bytes | bytearray | memoryview:
        while True:
            try:
                n = self._sock.recv_into(self._buf)
            except BlockingIOError:
                if self._spin():
                    continue
                await trio.lowlevel.wait_readable(self._sock)
                self._yielded = time.perf_counter()
                continue
            except OSError as exc:
                raise trio.BrokenResourceError(str(exc)) from exc
            now = time.perf_counter()
            if now - self._yielded >= self.CHECKPOINT_SECONDS:
                await trio.lowlevel.checkpoint()
                self._yielded = now
            return self._view[:n]

    def _spin(self) -> bool:
        """Poll for up to SPIN_SECONDS before sleeping: a client at queue depth 1 sends its
        next request within microseconds of our reply, and sleeping in epoll costs a
        wake-up plus a scheduler pass each time (the SO_BUSY_POLL trade).

        Only while the peer keeps answering that fast.  Each miss doubles the number of
        waits that sleep straight away before the next try (up to SPIN_BACKOFF_MAX); a hit
        resets it.  Between looks the spinner yields the CPU: when the peer runs on the
        same CPU (two cores, other work on them), a pure busy loop only kept it from
        sending the request we were waiting for (~7.6k requests/s instead of ~30k)."""
        if SocketWire.live > 1:
            return False
        if self._skip:
            self._skip -= 1
            return False
        clock = time.perf_counter
        now = clock()
        deadline = now + SPIN_SECONDS
        courtesy = now + SPIN_BEFORE_YIELD
        poll = self._poll.poll
        yield_ = os.sched_yield
        while now < deadline:
            if poll(0):
                self._backoff = 0
                return True
            if now > courtesy:
                yield_()
            now = clock()
        self._backoff = min(max(1, 2 * self._backoff), SPIN_BACKOFF_MAX)
        self._skip = self._backoff
        return False

    async def send(self, data: bytes) -> None:
        view = memoryview(data)
        while view:
            try:
                n = self._sock.send(view)
            except BlockingIOError:
                await trio.lowlevel.wait_writable(self._sock)
                continue
            except OSError as exc:
                raise trio.BrokenResourceError(str(exc)) from exc
            view = view[n:]

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            SocketWire.live -= 1
        trio.lowlevel.notify_closing(self._sock)
        self._sock.close()


def wire_for(stream: trio.abc.Stream) -> Wire:
    if isinstance(stream, trio.SocketStream):
        return SocketWire(stream)
    return StreamWire(stream)
