"""The server's log events: typed facts, each logged through :func:`emit`.

Every event the server logs is a frozen attrs class here: ``event`` names it, ``level`` is
its structlog level, its fields are the event's fields (in their order), and its docstring
says when it happens; docs/events.md documents each (tests/test_events_doc.py checks it
against these classes).  Not to be confused with ``nbdproto.events``, the protocol's own
events, which the server turns into some of these.

The server cannot use the testbed's emitter (the testbed is above it), so it has this one:
the same rules, in a few lines.
"""

from __future__ import annotations

from typing import Any, ClassVar

import attrs
import structlog

from nbdproto import Rep

_log = structlog.get_logger()

#: A field with this metadata is a dict of extra fields, merged into the event.
FLATTEN = {"flatten": True}


@attrs.frozen
class Fact:
    """Base of the server's facts (never emitted itself: it names no event)."""

    event: ClassVar[str]
    level: ClassVar[str] = "info"
    #: True: logged with the traceback of the exception being handled (``log.exception``).
    exc_info: ClassVar[bool] = False


_FLATTENED: dict[type, tuple[str, ...]] = {}


def emit(fact: Fact) -> None:
    """Log ``fact``: its ``event`` at its ``level``, its attrs fields as the fields."""
    cls = type(fact)
    flattened = _FLATTENED.get(cls)
    if flattened is None:
        flattened = _FLATTENED[cls] = tuple(
            f.name for f in attrs.fields(cls) if f.metadata.get("flatten")
        )
    fields: dict[str, Any] = attrs.asdict(fact, recurse=False)
    for name in flattened:
        fields.update(fields.pop(name))
    if cls.exc_info:
        fields["exc_info"] = True
    getattr(_log, cls.level)(cls.event, **fields)


# -- server.* ------------------------------------------------------------------------------
@attrs.frozen
class ServerListening(Fact):
    """The listeners are bound (the first event of ``netswap server``)."""

    event: ClassVar[str] = "server.listening"
    host: str
    port: int
    exports: list[dict[str, Any]]  # name, size (bytes), backend, read_only
    max_payload: int


@attrs.frozen
class ServerRemoteBind(Fact):
    """The server listens beyond loopback (``--allow-remote``)."""

    event: ClassVar[str] = "server.remote_bind"
    level: ClassVar[str] = "warning"
    host: str
    note: str = "listening beyond loopback"


@attrs.frozen
class ServerConnectionOpened(Fact):
    """A connection starts being served (it carries ``conn`` from here on)."""

    event: ClassVar[str] = "server.connection_opened"
    peer: str  # HOST:PORT, or the stream's type for an in-memory stream


@attrs.frozen
class ServerConnectionRefused(Fact):
    """A connection was closed at once because ``max_connections`` are live."""

    event: ClassVar[str] = "server.connection_refused"
    level: ClassVar[str] = "warning"
    reason: str
    limit: int


@attrs.frozen
class ServerAcceptFailed(Fact):
    """``accept`` failed for lack of descriptors or buffers; the listener backs off."""

    event: ClassVar[str] = "server.accept_failed"
    level: ClassVar[str] = "error"
    error: str


@attrs.frozen
class ServerConnectionLost(Fact):
    """The connection broke under the server (reset, closed while sending)."""

    event: ClassVar[str] = "server.connection_lost"
    error: str


@attrs.frozen
class ServerConnectionFailed(Fact):
    """A bug of this server ended the connection (an exception nothing expected): the
    connection is closed, the server and its other connections go on."""

    event: ClassVar[str] = "server.connection_failed"
    level: ClassVar[str] = "error"
    exc_info: ClassVar[bool] = True
    error: str


@attrs.frozen
class ServerConnectionClosed(Fact):
    """A connection ended, whatever the reason; its own counters (``Counters``)."""

    event: ClassVar[str] = "server.connection_closed"
    reason: str
    requests: int
    rejected: int
    bytes_read: int
    bytes_written: int


@attrs.frozen
class ServerConnectionsDropped(Fact):
    """``drop_connections()`` cut live connections (all, or those on ``export``)."""

    event: ClassVar[str] = "server.connections_dropped"
    level: ClassVar[str] = "warning"
    count: int
    export: str | None


@attrs.frozen
class ServerRestarted(Fact):
    """``restart()`` cut every connection and reopened every store."""

    event: ClassVar[str] = "server.restarted"
    connections: int


@attrs.frozen
class _Totals(Fact):
    """The server's totals (``Stats``), as two events log them."""

    connections: int
    live: int
    refused: int
    requests: int
    rejected: int
    bytes_read: int
    bytes_written: int
    protocol_errors: int
    handshake_timeouts: int
    internal_errors: int


@attrs.frozen
class ServerStatsReport(_Totals):
    """Every ``stats_interval`` seconds: the server's totals so far."""

    event: ClassVar[str] = "server.stats"


@attrs.frozen
class ServerShutdownStarted(Fact):
    """A graceful shutdown stopped accepting; live connections get the grace period."""

    event: ClassVar[str] = "server.shutdown_started"
    live: int
    grace: float


@attrs.frozen
class ServerStoreCloseFailed(Fact):
    """Flushing and closing an export's store failed at the end."""

    event: ClassVar[str] = "server.store_close_failed"
    level: ClassVar[str] = "error"
    export: str
    error: str


@attrs.frozen
class ServerStopped(_Totals):
    """The server stopped and its stores are closed: its final totals."""

    event: ClassVar[str] = "server.stopped"


# -- nbd.* ---------------------------------------------------------------------------------
@attrs.frozen
class NbdOption(Fact):
    """The server answered a handshake option (``reply`` None when the answer is to close)."""

    event: ClassVar[str] = "nbd.option"
    level: ClassVar[str] = "debug"
    option: int
    reply: Rep | None
    detail: str


@attrs.frozen
class NbdOptionRefused(Fact):
    """An option was answered with an error reply (unsupported, unknown export, ...)."""

    event: ClassVar[str] = "nbd.option_refused"
    option: int
    reply: str | None  # the error reply's name
    detail: str


@attrs.frozen
class NbdAborted(Fact):
    """The client sent ``NBD_OPT_ABORT``; the connection ends."""

    event: ClassVar[str] = "nbd.aborted"


@attrs.frozen
class NbdHandshakeTimeout(Fact):
    """A handshake did not finish within ``handshake_timeout``; the connection is cut."""

    event: ClassVar[str] = "nbd.handshake_timeout"
    level: ClassVar[str] = "warning"
    timeout: float


@attrs.frozen
class NbdTransmissionStarted(Fact):
    """The handshake ended and the client selected an export."""

    event: ClassVar[str] = "nbd.transmission_started"
    export: str
    structured: bool
    via: str  # the option that selected it: GO, EXPORT_NAME, ...
    flags: int  # the transmission flags sent (NBD_FLAG_* bits)


@attrs.frozen
class NbdRequestRejected(Fact):
    """The protocol layer answered a request with an error without executing it."""

    event: ClassVar[str] = "nbd.request_rejected"
    cookie: int
    command: int
    error: str  # the NBD error's name
    reason: str


@attrs.frozen
class NbdStoreError(Fact):
    """The store failed a request; it is answered with the matching NBD error."""

    event: ClassVar[str] = "nbd.store_error"
    level: ClassVar[str] = "warning"
    command: str
    offset: int
    length: int
    error: str
    nbd_error: str


@attrs.frozen
class NbdProtocolError(Fact):
    """The peer broke the protocol in a way that requires a hard disconnect."""

    event: ClassVar[str] = "nbd.protocol_error"
    level: ClassVar[str] = "warning"
    error: str
    phase: str


# -- fault.* -------------------------------------------------------------------------------
@attrs.frozen
class ServerFaultFired(Fact):
    """An injected fault took effect on an export (an error answered, a stall begun,
    connections dropped, the store restarted); ``detail`` holds the kind's own fields."""

    event: ClassVar[str] = "fault.fired"
    kind: str
    export: str
    command: str | None
    errno: str | None
    detail: dict[str, Any] = attrs.field(factory=dict, metadata=FLATTEN)


@attrs.frozen
class ServerFaultDelayed(Fact):
    """A request waits the export's delay (one per request, hence debug)."""

    event: ClassVar[str] = "fault.fired"
    level: ClassVar[str] = "debug"
    kind: str = attrs.field(default="delay", kw_only=True)
    export: str
    command: str
    seconds: float


@attrs.frozen
class ServerFaultCleared(Fact):
    """A stall ended, by ``unstall()`` (or a shutdown) or by its time passing."""

    event: ClassVar[str] = "fault.cleared"
    kind: str = attrs.field(default="stall", kw_only=True)
    export: str
    reason: str  # "unstall" or "timeout"
