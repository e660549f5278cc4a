"""What both machines share: the receive buffer, the phase, and the error discipline."""

from __future__ import annotations

from typing import NoReturn

from ._state import Phase, Role, Trigger, transition
from .errors import LocalProtocolError, ProtocolError, RemoteProtocolError

#: A receive buffer grown past this (for a payload that large) is dropped once it is empty.
_SHRINK_ABOVE = 4 << 20
#: A receive buffer that must grow gets up to this much room beyond what was asked, so that
#: the unparsed tail is moved to its front only once every few receives.
_GROW_SLACK = 1 << 20


class Machine:
    """Receive buffer plus phase bookkeeping.

    Bytes go in with ``receive_data``; subclasses parse from ``_buf`` between ``_pos`` and
    ``_end``.  The buffer is a bytearray of fixed capacity that is never resized in place
    (only replaced), so views into it stay valid while others are taken; parsing a run of
    pipelined requests costs no copies beyond the payloads themselves.

    A caller that owns a socket can skip the copy into the buffer: ``get_buffer(n)`` lends
    the free space at its end, the caller receives into it (``socket.recv_into``) and hands
    back the filled part, ``view[:k]``, to ``receive_data``, which then only takes note of
    it (asyncio's ``BufferedProtocol`` pair, in one method).
    """

    role: Role

    def __init__(self, phase: Phase) -> None:
        self._phase = phase
        self._buf = bytearray()
        # Views of _buf, kept: a new view costs ~0.6 us, a slice of a kept one ~0.2 us.
        self._view = memoryview(self._buf)
        self._rview = self._view.toreadonly()
        self._pos = 0
        self._end = 0
        self._eof = False
        self._skip = 0  # bytes of a refused payload still to drain, never buffered
        self._lent = 0  # size of the view get_buffer lent last (0: none outstanding)
        #: Where the payload being received goes instead of the buffer (a server's
        #: payload sink), and how much of it has arrived.
        self._sink: memoryview | None = None
        self._sink_filled = 0

    @property
    def phase(self) -> Phase:
        return self._phase

    @property
    def buffered(self) -> int:
        """Bytes received and not yet parsed (the memory a peer can make us hold)."""
        return self._end - self._pos

    def get_buffer(self, size: int) -> memoryview:
        """A writable view of ``size`` bytes at the end of the receive buffer, to receive into;
        pass the part filled to :meth:`receive_data`.  Valid until the next call of either.

        While a payload is being received into a sink (``ServerConnection.payload_sink``),
        the view is the rest of that payload instead, whatever its size."""
        sink = self._sink
        if sink is not None:
            return sink[self._sink_filled :]
        self._room(size)
        self._lent = size
        return self._view[self._end : self._end + size]

    def _room(self, size: int) -> None:
        """Make room for ``size`` more bytes at the end of the buffer."""
        if self._pos == self._end:
            self._pos = self._end = 0
            if len(self._buf) > _SHRINK_ABOVE and size <= _SHRINK_ABOVE:
                self._set_buffer(bytearray())  # a huge payload came and went: give it back
        if len(self._buf) - self._end < size:
            self._make_room(size)

    def _make_room(self, size: int) -> None:
        """Room for ``size`` more bytes after the unparsed ones: move those to the front, or
        into a new, larger buffer (the old one stays intact for views still taken on it)."""
        pos, end = self._pos, self._end
        unparsed = end - pos
        need = unparsed + size
        if need <= len(self._buf):
            # A memoryview source is copied with memcpy: only safe without overlap.
            self._buf[:unparsed] = self._view[pos:end] if unparsed <= pos else self._buf[pos:end]
        else:
            buf = bytearray(need + min(need, _GROW_SLACK))
            buf[:unparsed] = self._view[pos:end]
            self._set_buffer(buf)
        self._pos, self._end = 0, unparsed

    def _set_buffer(self, buf: bytearray) -> None:
        self._buf = buf
        self._view = memoryview(buf)
        self._rview = self._view.toreadonly()

    def receive_data(self, data: bytes | bytearray | memoryview) -> None:
        """Feed bytes from the peer; ``b""`` means EOF.  ``data`` may be the filled part of
        the view :meth:`get_buffer` lent (``view[:n]``): it is then taken without a copy."""
        n = len(data)
        if not n:
            self._eof = True
            return
        sink = self._sink
        if sink is not None:
            room = len(sink) - self._sink_filled
            if type(data) is memoryview and data.obj is sink.obj:  # received into the sink
                if n > room:
                    raise ValueError(f"{n} bytes received into a payload of {room} to go")
                self._sink_filled += n
                return
            take = min(n, room)
            sink[self._sink_filled : self._sink_filled + take] = memoryview(data)[:take]
            self._sink_filled += take
            if take == n:
                return
            data = memoryview(data)[take:]
            n -= take
        lent, self._lent = self._lent, 0
        if lent and type(data) is memoryview and data.obj is self._buf:
            if n > lent:
                raise ValueError(f"{n} bytes received into a view of {lent}")
            self._end += n
        else:
            if self._skip:
                skipped = min(self._skip, n)
                self._skip -= skipped
                if skipped == n:
                    return
                data = memoryview(data)[skipped:]
                n -= skipped
            self._room(n)
            end = self._end
            self._buf[end : end + n] = data
            self._end = end + n
            return
        if self._skip:  # everything before was parsed or skipped: drop from the front
            skipped = min(self._skip, n)
            self._skip -= skipped
            self._pos += skipped

    def _drain(self, n: int) -> None:
        """Discard the next ``n`` bytes, buffered or yet to come, without holding them."""
        have = self._end - self._pos
        take = min(have, n)
        self._pos += take
        self._skip += n - take

    def _take(self, n: int) -> bytes:
        start = self._pos
        self._pos = start + n
        return self._view[start : start + n].tobytes()

    def _available(self) -> int:
        return self._end - self._pos

    def _discard_buffered(self) -> None:
        """Forget every byte received and not parsed (after a close)."""
        self._pos = self._end = 0

    def _move(self, trigger: Trigger, *, remote: bool) -> None:
        nxt = transition(self.role, self._phase, trigger)
        if nxt is None:
            err = RemoteProtocolError if remote else LocalProtocolError
            self._fail(err(f"{trigger.value} is not allowed in phase {self._phase.value}"))
        self._phase = nxt

    def _fail(self, exc: ProtocolError) -> NoReturn:
        self._phase = Phase.ERROR
        raise exc

    def _check_usable(self) -> None:
        if self._phase is Phase.ERROR:
            raise LocalProtocolError("the connection is in the ERROR state")
