"""Events: small frozen records for what crosses the wire, in both directions.

A ``ServerConnection`` *emits* ``Hello``, ``OptionHandled``, ``TransmissionStarted``,
``Request``, ``RequestRejected``, ``Disconnect``, ``ConnectionClosed``; a server *sends*
replies through ``ServerConnection.reply``.  A ``ClientConnection`` *sends* ``Hello``,
``Opt*`` and ``Request`` and *emits* ``Greeting``, option-reply events,
``TransmissionStarted`` and ``Reply``.
"""

from __future__ import annotations

import attrs

from .constants import Cmd, CmdFlags, Errno, HandshakeFlags, Opt, Rep, TransmissionFlags


class _NeedData:
    """Sentinel: the connection needs more bytes before it can emit another event."""

    _instance: _NeedData | None = None

    def __repr__(self) -> str:
        return "NEED_DATA"


NEED_DATA = _NeedData()


@attrs.frozen
class ExportInfo:
    """What a server says about an export: its name, size and transmission flags."""

    name: str
    size: int
    flags: TransmissionFlags
    description: str = ""
    min_block: int = 1
    preferred_block: int = 4096


# -- handshake ------------------------------------------------------------------------------
@attrs.frozen
class Greeting:
    flags: HandshakeFlags


@attrs.frozen
class Hello:
    """The client's flags (C_FIXED_NEWSTYLE, C_NO_ZEROES)."""

    flags: int


@attrs.frozen
class OptionRequest:
    """An option as the client sends it: number and raw data.  Build with the ``opt_*``
    helpers in :mod:`nbdproto.client` for the known ones."""

    option: int
    data: bytes = b""


@attrs.frozen
class OptionHandled:
    """Server side: an option was answered (``reply`` None when the answer is to close)."""

    option: int
    reply: Rep | None
    detail: str = ""


@attrs.frozen
class OptionAck:
    option: int


@attrs.frozen
class OptionError:
    option: int
    reply: int
    message: str


@attrs.frozen
class OptionReply:
    """A reply type the client machine does not interpret (kept for the caller)."""

    option: int
    reply: int
    data: bytes


@attrs.frozen
class ExportListed:
    name: str
    description: str


@attrs.frozen
class InfoExport:
    size: int
    flags: TransmissionFlags


@attrs.frozen
class InfoName:
    name: str


@attrs.frozen
class InfoDescription:
    description: str


@attrs.frozen
class InfoBlockSize:
    minimum: int
    preferred: int
    maximum: int


@attrs.frozen
class MetaContext:
    context_id: int
    name: str


@attrs.frozen
class Aborted:
    """The handshake ended by NBD_OPT_ABORT."""


@attrs.frozen
class TransmissionStarted:
    export_name: str
    size: int
    flags: TransmissionFlags
    structured_replies: bool
    meta_contexts: dict[int, str] = attrs.field(factory=dict)
    via: Opt = Opt.GO


# -- transmission ---------------------------------------------------------------------------
@attrs.frozen
class Request:
    """A request.  ``data`` is a WRITE's payload: bytes, or on a server that borrows payloads
    (``ServerConnection(borrow_payloads=True)``) a read-only view of its receive buffer."""

    cookie: int
    command: Cmd | int
    offset: int = 0
    length: int = 0
    flags: CmdFlags | int = 0
    data: bytes | memoryview | None = None


@attrs.frozen
class RequestRejected:
    """Server side: the connection answered a request with an error without emitting it."""

    cookie: int
    command: int
    error: Errno
    reason: str


@attrs.frozen
class Extent:
    length: int
    flags: int


@attrs.frozen
class Reply:
    """Client side: one request's whole answer (structured chunks already reassembled)."""

    cookie: int
    command: int
    error: int = 0
    data: bytes | None = None
    extents: dict[int, tuple[Extent, ...]] | None = None
    message: str = ""


@attrs.frozen
class Disconnect:
    """NBD_CMD_DISC received: finish what is in flight, then close."""


@attrs.frozen
class ConnectionClosed:
    """The peer closed its side (EOF), possibly mid-frame."""


Event = (
    Greeting
    | Hello
    | OptionRequest
    | OptionHandled
    | OptionAck
    | OptionError
    | OptionReply
    | ExportListed
    | InfoExport
    | InfoName
    | InfoDescription
    | InfoBlockSize
    | MetaContext
    | Aborted
    | TransmissionStarted
    | Request
    | RequestRejected
    | Reply
    | Disconnect
    | ConnectionClosed
)
