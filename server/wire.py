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

#: The most one receive takes: the loop receives into the protocol object's buffer, starting
#: with FIRST_RECEIVE_SIZE and doubling up to this while receives come back full.
RECEIVE_SIZE = 256 * 1024
FIRST_RECEIVE_SIZE = 64 * 1024
#: A lone connection waits for its next request in poll(2) for up to this long before it
#: sleeps in trio's scheduler (see SocketWire._wait_alone).
ALONE_WAIT_MS = 1
#: After a wait in poll(2) that timed out, this many waits (doubling each time) go straight
#: to trio's scheduler: an idle client costs one such wait, not one per request.
ALONE_BACKOFF_MAX = 64
#: Before it sleeps in poll(2), a lone connection polls without sleeping for up to this long
#: (SocketWire._spin): the kernel's busy polling (``net.core.busy_poll``, ``SO_BUSY_POLL``)
#: for a peer that answers within microseconds.
SPIN_SECONDS = 25e-6
#: After a spin that saw nothing, this many waits (doubling each time) skip the spin: a
#: client that cannot answer that fast (busy CPUs, the same CPU, an idle client) costs
#: one spin in SPIN_BACKOFF_MAX + 1 waits.
SPIN_BACKOFF_MAX = 64


class Wire(Protocol):
    """What the transmission loop needs of a connection's byte stream."""

    async def receive_into(self, view: memoryview) -> int:
        """Receive at most ``len(view)`` bytes into ``view``; how many (0: end of stream)."""
        ...

    async def send(self, data: bytes) -> None: ...
    def close(self) -> None: ...


class StreamWire:
    """Bytes in and out through any trio stream (an in-memory pair in tests, TLS, ...)."""

    def __init__(self, stream: trio.abc.Stream) -> None:
        self._stream = stream

    async def receive_into(self, view: memoryview) -> int:
        data = await self._stream.receive_some(len(view))
        n = len(data)
        view[:n] = data
        return n

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
    #: Socket wires open in this process.  Waiting outside trio helps a lone client at
    #: queue depth 1; with several connections it would only delay the others, so only a
    #: lone wire does it.
    live = 0

    def __init__(self, stream: trio.SocketStream) -> None:
        # A duplicate descriptor of the same socket (same O_NONBLOCK file description),
        # so that we use only public socket and trio.lowlevel APIs.
        self._sock = socket.socket(fileno=os.dup(stream.socket.fileno()))
        self._poll = select.poll()  # for _wait_alone
        self._poll.register(self._sock.fileno(), select.POLLIN)
        self._yielded = time.perf_counter()
        self._backoff = 0  # waits to leave to trio after the next timed-out poll
        self._skip = 0  # waits left to leave to trio before polling again
        self._spin_backoff = 0  # waits to skip the spin for after the next spin that fails
        self._spin_skip = 0  # waits left to skip the spin for
        self._closed = False
        SocketWire.live += 1

    async def receive_into(self, view: memoryview) -> int:
        while True:
            try:
                n = self._sock.recv_into(view)
            except BlockingIOError:
                if self._wait_alone():
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
            return n

    def _wait_alone(self) -> bool:
        """Wait for the next request in poll(2), outside trio, for up to ALONE_WAIT_MS; True
        when it came.

        A client at queue depth 1 sends its next request microseconds after our reply.
        Waiting for it in trio (``wait_readable``: epoll, a scheduler pass, the task
        rescheduled) costs Python work on every request; here the kernel wakes this thread
        straight out of poll.  Nothing else in this process runs meanwhile, so only a lone
        connection does it, and never for longer than a checkpoint interval: other tasks
        (the acceptor, timers, the control endpoint) wait at most that, as they already do
        while data keeps arriving.  This replaced a busy poll (up to 50 us, yielding the
        CPU after 15 us): when other processes kept both CPUs busy, spinning only burnt
        the time slice the client needed to send the request.  A shorter spin that backs
        off when it misses (:meth:`_spin`) now comes first.

        A poll that times out means the client has gone quiet: the next waits, doubling
        up to ALONE_BACKOFF_MAX, go straight to trio; a request that comes in time resets
        that.  (A client in this same thread, as in ``netswap run --clock real``, can never
        answer in time: it loses one millisecond per ALONE_BACKOFF_MAX + 1 waits.)"""
        if SocketWire.live > 1:
            return False
        if self._skip:
            self._skip -= 1
            return False
        if self._spin():
            return True
        if self._poll.poll(ALONE_WAIT_MS):
            self._backoff = 0
            return True
        self._backoff = min(max(1, 2 * self._backoff), ALONE_BACKOFF_MAX)
        self._skip = self._backoff
        return False

    def _spin(self) -> bool:
        """Poll without sleeping for up to SPIN_SECONDS; True when a request came.

        Measured at queue depth 1 with nbdcopy on the other CPU of a 2-CPU VM: a server
        that sleeps in poll(2) between requests is woken from the other CPU every request
        (an inter-processor interrupt, and an idle CPU's exit from a halt on a VM), which
        cost more than the server's own work: 4 KiB writes took 70-85 us each, nbdkit
        (whose worker threads the scheduler moves onto the client's CPU) 50-55 us.
        nbdcopy answers a reply within 20 us, so a short spin catches most requests
        without sleeping.  When it does not (both CPUs busy with other work, client and
        server on one CPU, a client gone quiet), the spin is skipped for the next waits,
        doubling up to SPIN_BACKOFF_MAX, as the kernel's adaptive spinning gives up on an
        owner that is not running."""
        if self._spin_skip:
            self._spin_skip -= 1
            return False
        poll = self._poll.poll
        clock = time.perf_counter
        end = clock() + SPIN_SECONDS
        while True:
            if poll(0):
                self._spin_backoff = 0
                return True
            if clock() >= end:
                break
        self._spin_backoff = min(max(1, 2 * self._spin_backoff), SPIN_BACKOFF_MAX)
        self._spin_skip = self._spin_backoff
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
