"""What both machines share: the receive buffer, the phase, and the error discipline."""

from __future__ import annotations

from typing import NoReturn

from ._state import Phase, Role, Trigger, transition
from .errors import LocalProtocolError, ProtocolError, RemoteProtocolError


def _copy(buf: bytearray, start: int, end: int) -> bytes:
    """``bytes(buf[start:end])`` with one copy instead of two (no intermediate bytearray).

    The temporary view is released at once, so the buffer can still grow afterwards.
    """
    with memoryview(buf) as view:
        return view[start:end].tobytes()


class Machine:
    """Receive buffer plus phase bookkeeping.

    Bytes go in with ``receive_data``; subclasses parse from ``_buf`` starting at ``_pos``.
    The buffer is compacted lazily so that parsing a run of pipelined requests costs no
    copies beyond the payloads themselves.
    """

    role: Role

    def __init__(self, phase: Phase) -> None:
        self._phase = phase
        self._buf = bytearray()
        self._pos = 0
        self._eof = False
        self._skip = 0  # bytes of a refused payload still to drain, never buffered

    @property
    def phase(self) -> Phase:
        return self._phase

    @property
    def buffered(self) -> int:
        """Bytes received and not yet parsed (the memory a peer can make us hold)."""
        return len(self._buf) - self._pos

    def receive_data(self, data: bytes | bytearray | memoryview) -> None:
        """Feed bytes from the peer; ``b""`` means EOF."""
        if not data:
            self._eof = True
            return
        if self._skip:
            n = min(self._skip, len(data))
            self._skip -= n
            if n == len(data):
                return
            data = memoryview(data)[n:]
        if self._pos and self._pos == len(self._buf):
            self._buf.clear()
            self._pos = 0
        elif self._pos > 65536 and self._pos * 2 > len(self._buf):
            del self._buf[: self._pos]
            self._pos = 0
        self._buf += data

    def _drain(self, n: int) -> None:
        """Discard the next ``n`` bytes, buffered or yet to come, without holding them."""
        have = len(self._buf) - self._pos
        take = min(have, n)
        self._pos += take
        self._skip += n - take

    def _take(self, n: int) -> bytes:
        start = self._pos
        self._pos = start + n
        return _copy(self._buf, start, start + n)

    def _available(self) -> int:
        return len(self._buf) - self._pos

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
