"""A client machine joined to a server machine with no socket (h11's ``tests/helpers.py``).

``ConnectionPair`` carries bytes between a :class:`ClientConnection` and a
:class:`ServerConnection`, optionally cut into arbitrary pieces on the way, and collects each
side's events.  ``handshake`` drives a pair to transmission.  ``MemoryExecutor`` plays the
part of the server's storage: it answers each ``Request`` the server machine emits from a
``bytearray``, so that a request can be followed from the client's ``send`` to its ``Reply``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any

import attrs

from nbdproto import (
    NEED_DATA,
    ClientConnection,
    Cmd,
    CmdFlags,
    ConnectionClosed,
    Errno,
    Event,
    ExportInfo,
    Extent,
    Hello,
    Info,
    OptionAck,
    OptionRequest,
    Request,
    ServerConnection,
    StateFlags,
    TransmissionFlags,
    TransmissionStarted,
    constants,
    opt_export_name,
    opt_go,
    opt_meta,
)
from nbdproto.constants import ClientFlags, Opt

KiB = 1024
MiB = 1024 * KiB

TF = TransmissionFlags
#: Every optional command and command flag a server can advertise.
ALL_FEATURES = (
    TF.SEND_FLUSH | TF.SEND_FUA | TF.SEND_TRIM | TF.SEND_WRITE_ZEROES | TF.SEND_CACHE
) | TF.SEND_FAST_ZERO
CLIENT_FLAGS = ClientFlags.C_FIXED_NEWSTYLE | ClientFlags.C_NO_ZEROES


def make_exports(size: int = 1 * MiB) -> dict[str, ExportInfo]:
    """``disk`` (the default, every feature), ``ro`` (read-only) and ``bare`` (no flags)."""
    return {
        "disk": ExportInfo("disk", size, ALL_FEATURES, description="scratch disk"),
        "ro": ExportInfo("ro", 64 * KiB, ALL_FEATURES | TF.READ_ONLY),
        "bare": ExportInfo("bare", 64 * KiB, TF(0)),
    }


def pieces(data: bytes, sizes: Iterable[int]) -> Iterator[bytes]:
    """``data`` cut into pieces of the given sizes (cycled); the last piece takes the rest."""
    sizes = list(sizes) or [len(data) or 1]
    pos, i = 0, 0
    while pos < len(data):
        n = max(1, sizes[i % len(sizes)])
        yield data[pos : pos + n]
        pos += n
        i += 1


def drain(machine: ClientConnection | ServerConnection) -> list[Event]:
    """Every event the machine can emit from the bytes it has, up to NEED_DATA or EOF."""
    events: list[Event] = []
    while True:
        event = machine.next_event()
        if event is NEED_DATA:
            return events
        events.append(event)  # type: ignore[arg-type]
        if isinstance(event, ConnectionClosed):
            return events


@attrs.define
class MemoryExecutor:
    """Storage behind a server machine: answers its ``Request`` events from ``disk``.

    TRIM and WRITE_ZEROES both zero the range.  ``fast_zero=False`` models storage that
    cannot zero quickly, which the spec answers with ENOTSUP for FAST_ZERO requests.
    BLOCK_STATUS reports ``base:allocation`` per ``block``: all-zero blocks as HOLE|ZERO.
    """

    disk: bytearray
    fast_zero: bool = True
    block: int = 4096
    executed: list[Request] = attrs.field(factory=list)
    flushes: int = 0

    @classmethod
    def of_size(cls, size: int, **kwargs: Any) -> MemoryExecutor:
        return cls(bytearray(size), **kwargs)

    def execute(self, server: ServerConnection, req: Request) -> None:
        self.executed.append(req)
        end = req.offset + req.length
        if req.command == Cmd.READ:
            server.reply(req, data=bytes(self.disk[req.offset : end]))
        elif req.command == Cmd.WRITE:
            assert req.data is not None
            self.disk[req.offset : end] = req.data
            server.reply(req)
        elif req.command in (Cmd.TRIM, Cmd.WRITE_ZEROES):
            if req.flags & CmdFlags.FAST_ZERO and not self.fast_zero:
                server.reply(req, error=Errno.ENOTSUP, message="cannot zero fast")
                return
            self.disk[req.offset : end] = bytes(req.length)
            server.reply(req)
        elif req.command == Cmd.FLUSH:
            self.flushes += 1
            server.reply(req)
        elif req.command == Cmd.CACHE:
            server.reply(req)
        elif req.command == Cmd.BLOCK_STATUS:
            server.reply_block_status(req, self.extents(req.offset, req.length))
        else:  # pragma: no cover - the machine rejects unknown commands itself
            server.reply(req, error=Errno.EINVAL)

    def extents(self, offset: int, length: int) -> list[Extent]:
        out: list[tuple[int, int]] = []
        pos, end = offset, offset + length
        while pos < end:
            nxt = min(end, (pos // self.block + 1) * self.block)
            zero = self.disk.count(0, pos, nxt) == nxt - pos
            flags = StateFlags.HOLE | StateFlags.ZERO if zero else 0
            if out and out[-1][1] == flags:
                out[-1] = (out[-1][0] + nxt - pos, flags)
            else:
                out.append((nxt - pos, flags))
            pos = nxt
        return [Extent(n, int(f)) for n, f in out]


class ConnectionPair:
    """A client and a server machine joined in memory.

    ``split`` decides how bytes are cut in transit (``None``: delivered whole); ``executor``
    answers the server's requests as they are parsed.  Every event is also appended to
    ``server_events`` / ``client_events``, and ``max_server_buffered`` records the most the
    server machine ever held unparsed.
    """

    def __init__(
        self,
        exports: Mapping[str, ExportInfo] | None = None,
        *,
        executor: MemoryExecutor | None = None,
        split: Callable[[bytes], Iterable[bytes]] | None = None,
        **server_kwargs: Any,
    ) -> None:
        self.client = ClientConnection()
        self.server = ServerConnection(
            make_exports() if exports is None else exports, **server_kwargs
        )
        self.executor = executor
        self.split = split
        self.server_events: list[Event] = []
        self.client_events: list[Event] = []
        self.max_server_buffered = 0

    def _cut(self, data: bytes) -> Iterable[bytes]:
        return [data] if self.split is None else self.split(data)

    def to_server(self, data: bytes) -> list[Event]:
        """Deliver client bytes to the server; return its events (requests get executed)."""
        events: list[Event] = []
        for piece in self._cut(data):
            if not piece:
                continue
            self.server.receive_data(piece)
            self.max_server_buffered = max(self.max_server_buffered, self.server.buffered)
            while True:  # each request is executed as soon as it is parsed, as a server would
                event = self.server.next_event()
                if event is NEED_DATA:
                    break
                events.append(event)  # type: ignore[arg-type]
                if isinstance(event, ConnectionClosed):
                    break
                if self.executor is not None and isinstance(event, Request):
                    self.executor.execute(self.server, event)
        self.server_events += events
        return events

    def to_client(self, data: bytes) -> list[Event]:
        """Deliver server bytes to the client; return its events."""
        events: list[Event] = []
        for piece in self._cut(data):
            if piece:
                self.client.receive_data(piece)
                events += drain(self.client)
        self.client_events += events
        return events

    def deliver(self) -> list[Event]:
        """Whatever the server has queued goes to the client."""
        return self.to_client(self.server.data_to_send())

    def greet(self) -> list[Event]:
        return self.to_client(self.server.initiate())

    def send(self, *events: Hello | OptionRequest | Request) -> tuple[list[Event], list[Event]]:
        """The client sends ``events`` back to back; the server reads them and answers.

        Returns ``(server_events, client_events)``.
        """
        data = b"".join(self.client.send(e) for e in events)
        server_events = self.to_server(data)
        return server_events, self.deliver()

    def option(self, option: OptionRequest) -> list[Event]:
        """One option: the client's events for the server's answer."""
        return self.send(option)[1]

    def request(self, req: Request) -> list[Event]:
        """One request answered by the executor: the client's events (normally one Reply)."""
        return self.send(req)[1]


def hello(pair: ConnectionPair, flags: int = CLIENT_FLAGS) -> None:
    """Greeting and client flags: the pair is ready for options."""
    pair.greet()
    pair.send(Hello(flags))


def handshake(
    pair: ConnectionPair,
    export: str = "",
    *,
    structured: bool = True,
    meta: bool = True,
    via: str = "go",
    info: Iterable[int] = (Info.BLOCK_SIZE,),
) -> tuple[TransmissionStarted, TransmissionStarted]:
    """Drive ``pair`` to transmission; return the ``(client, server)`` TransmissionStarted.

    ``structured`` negotiates structured replies, ``meta`` (with structured) selects
    ``base:allocation``; ``via`` is ``"go"`` or ``"export_name"``.
    """
    hello(pair)
    if structured:
        assert pair.option(OptionRequest(Opt.STRUCTURED_REPLY)) == [OptionAck(Opt.STRUCTURED_REPLY)]
        if meta:
            replies = pair.option(opt_meta(export, [constants.BASE_ALLOCATION], set_=True))
            assert replies[-1] == OptionAck(Opt.SET_META_CONTEXT), replies
    opt = opt_go(export, info) if via == "go" else opt_export_name(export)
    server_events, client_events = pair.send(opt)
    (server_started,) = [e for e in server_events if isinstance(e, TransmissionStarted)]
    assert isinstance(client_events[-1], TransmissionStarted), client_events
    return client_events[-1], server_started
