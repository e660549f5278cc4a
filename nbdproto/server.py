"""The server role of NBD, sans I/O: bytes in, events out; replies in, bytes out.

The connection answers the whole handshake itself from an export catalogue (a mapping of name
to :class:`ExportInfo`), because every answer there follows from the catalogue and the spec.
It reports what it did as ``OptionHandled`` events.  In transmission it validates each
request against the export (range, read-only, flags, payload limit) and either emits a
``Request`` for the server to execute or answers the error itself and emits
``RequestRejected``.  The server calls :meth:`ServerConnection.reply` for each ``Request``
and sends :meth:`ServerConnection.data_to_send` whenever it likes: replies batch naturally.
"""

from __future__ import annotations

import struct
from collections.abc import Callable, Mapping

from . import constants as c
from ._base import Machine
from ._state import Phase, Role, Trigger
from .constants import Cmd, CmdFlags, Errno, Info, Opt, Rep, TransmissionFlags
from .errors import LocalProtocolError, RemoteProtocolError
from .events import (
    NEED_DATA,
    Aborted,
    ConnectionClosed,
    Disconnect,
    Event,
    ExportInfo,
    Extent,
    Hello,
    OptionHandled,
    Request,
    RequestRejected,
    TransmissionStarted,
    _NeedData,
)

_REQ = c.REQUEST
_REQ_SIZE = _REQ.size
_SIMPLE = c.SIMPLE_REPLY
_CHUNK = c.CHUNK_HEADER
_U32 = struct.Struct(">I")
_U16 = struct.Struct(">H")
_U64 = struct.Struct(">Q")
_ERR_CHUNK = struct.Struct(">IH")
# Plain ints and module-level names for the per-request path: an enum member costs an
# attribute lookup on its class at every use, and a request makes a dozen such uses.
_REQUEST_MAGIC = c.REQUEST_MAGIC
_SIMPLE_REPLY_MAGIC = c.SIMPLE_REPLY_MAGIC
_SIMPLE_PACK = _SIMPLE.pack
_READ, _WRITE, _DISC = int(Cmd.READ), int(Cmd.WRITE), int(Cmd.DISC)
_BLOCK_STATUS = int(Cmd.BLOCK_STATUS)
_STRUCTURED_REPLY_MAGIC = c.STRUCTURED_REPLY_MAGIC
_DONE = int(c.ReplyFlags.DONE)
_OFFSET_DATA = int(c.Chunk.OFFSET_DATA)
_TRANSMISSION, _CLOSED = Phase.TRANSMISSION, Phase.CLOSED

#: Meta contexts this server knows, with the (opaque, non-zero) ids it hands out.
META_CONTEXTS: dict[str, int] = {c.BASE_ALLOCATION: 1}

#: Command flags a request may carry, per command (anything else is EINVAL).  FUA is
#: accepted on every command once SEND_FUA is advertised ("MUST accept, even if ignored").
_ALLOWED_FLAGS: dict[int, int] = {
    cmd: int(flags)
    for cmd, flags in {
        Cmd.READ: CmdFlags.FUA | CmdFlags.DF,
        Cmd.WRITE: CmdFlags.FUA,
        Cmd.DISC: CmdFlags.FUA,
        Cmd.FLUSH: CmdFlags.FUA,
        Cmd.TRIM: CmdFlags.FUA,
        Cmd.CACHE: CmdFlags.FUA,
        Cmd.WRITE_ZEROES: CmdFlags.FUA | CmdFlags.NO_HOLE | CmdFlags.FAST_ZERO,
        Cmd.BLOCK_STATUS: CmdFlags.FUA | CmdFlags.REQ_ONE,
    }.items()
}
# Which commands must stay inside the export and what they get when they do not:
# "read or trim past end → EINVAL; write/write-zeroes past end → ENOSPC" (proto.md).
_RANGE_ERROR: dict[int, Errno] = {
    Cmd.READ: Errno.EINVAL,
    Cmd.WRITE: Errno.ENOSPC,
    Cmd.TRIM: Errno.EINVAL,
    Cmd.CACHE: Errno.EINVAL,
    Cmd.WRITE_ZEROES: Errno.ENOSPC,
    Cmd.BLOCK_STATUS: Errno.EINVAL,
}
_MODIFYING = frozenset({Cmd.WRITE, Cmd.TRIM, Cmd.WRITE_ZEROES})
_CMD_FLAG_FOR: dict[int, TransmissionFlags] = {
    Cmd.FLUSH: TransmissionFlags.SEND_FLUSH,
    Cmd.TRIM: TransmissionFlags.SEND_TRIM,
    Cmd.WRITE_ZEROES: TransmissionFlags.SEND_WRITE_ZEROES,
    Cmd.CACHE: TransmissionFlags.SEND_CACHE,
}


class ServerConnection(Machine):
    """One server-side NBD connection."""

    role = Role.SERVER

    def __init__(
        self,
        exports: Mapping[str, ExportInfo],
        *,
        default_export: str | None = None,
        max_payload: int = c.DEFAULT_MAX_PAYLOAD,
        structured_replies: bool = True,
        borrow_payloads: bool = False,
        payload_sink: Callable[[int, int], memoryview | None] | None = None,
    ) -> None:
        """``borrow_payloads``: a WRITE's ``Request.data`` is a read-only view of the receive
        buffer instead of a copy, valid until the next ``get_buffer`` or ``receive_data``
        (after which its bytes may change).  For a server that stores each payload before
        it receives more: one copy less per byte written.

        ``payload_sink`` (also settable later, as the attribute): called as
        ``payload_sink(offset, length)`` for a valid WRITE whose payload has not all
        arrived yet; it may return a writable view of ``length`` bytes, and the payload is
        then received into it (``get_buffer`` lends the rest of it) instead of the buffer,
        and the request emitted with that very view as its data.  ``None``: buffer it as
        usual.  Only a request that passes every check is offered, so the view receives
        nothing the connection then refuses; the payload lands in it before the request is
        emitted."""
        super().__init__(Phase.AWAIT_FLAGS)
        if max_payload < 4096:
            raise ValueError("max_payload must be at least 4096 bytes")
        self._exports = exports
        self._default = default_export if default_export is not None else next(iter(exports), "")
        self.max_payload = max_payload
        self._allow_structured = structured_replies
        self._borrow = borrow_payloads
        self.payload_sink = payload_sink
        self._sink_request: tuple[int, int, int, int] = (
            0,
            0,
            0,
            0,
        )  # cookie, flags, offset, length
        self._out: list[bytes] = []
        self._fixed = True
        self._no_zeroes = False
        self.structured = False
        self._meta: dict[int, str] = {}
        self._meta_export: str | None = None
        self.export: ExportInfo | None = None
        self.flags = TransmissionFlags(0)
        self.shutting_down = False
        self._greeted = False
        self._size = 0
        self._fast: dict[int, int] = {}

    # -- output ---------------------------------------------------------------------------
    def initiate(self) -> bytes:
        """The greeting, which the server sends as soon as the connection is accepted."""
        if self._greeted:
            self._fail(LocalProtocolError("greeting already sent"))
        self._greeted = True
        flags = c.HandshakeFlags.FIXED_NEWSTYLE | c.HandshakeFlags.NO_ZEROES
        return c.GREETING.pack(c.NBDMAGIC, c.IHAVEOPT, flags)

    def data_to_send(self) -> bytes:
        """Everything queued since the last call, as one buffer (one ``send_all``)."""
        out = self._out
        if not out:
            return b""
        data = out[0] if len(out) == 1 else b"".join(out)
        out.clear()
        return data

    @property
    def has_output(self) -> bool:
        return bool(self._out)

    # -- input ----------------------------------------------------------------------------
    def next_event(self) -> Event | _NeedData:
        if self._phase is _TRANSMISSION:  # the hot path: not ERROR, so usable
            try:
                return self._next_request()
            except RemoteProtocolError:
                self._phase = Phase.ERROR
                raise
        self._check_usable()
        try:
            if self._phase is Phase.AWAIT_FLAGS:
                return self._next_flags()
            if self._phase is Phase.OPTIONS:
                return self._next_option()
            return self._closed_event()
        except RemoteProtocolError:
            self._phase = Phase.ERROR
            raise

    def _closed_event(self) -> Event | _NeedData:
        if self._eof:
            self._discard_buffered()
            self._move(Trigger.EOF, remote=True)
            return ConnectionClosed()
        if self._phase is Phase.CLOSED:
            # After DISC/ABORT anything more is ignored; nothing is buffered.
            self._discard_buffered()
        return NEED_DATA

    def _next_flags(self) -> Event | _NeedData:
        if self._available() < 4:
            return self._closed_event()
        (flags,) = c.CLIENT_FLAGS.unpack_from(self._buf, self._pos)
        self._pos += 4
        known = int(c.ClientFlags.C_FIXED_NEWSTYLE | c.ClientFlags.C_NO_ZEROES)
        if flags & ~known:
            # "The server MUST drop the connection on an unknown or unoffered flag."
            self._fail(RemoteProtocolError(f"unknown client flags {flags:#x}"))
        self._fixed = bool(flags & c.ClientFlags.C_FIXED_NEWSTYLE)
        self._no_zeroes = bool(flags & c.ClientFlags.C_NO_ZEROES)
        self._move(Trigger.FLAGS, remote=True)
        return Hello(flags)

    # -- options --------------------------------------------------------------------------
    def _next_option(self) -> Event | _NeedData:
        if self._available() < c.OPTION_HEADER.size:
            return self._closed_event()
        magic, option, length = c.OPTION_HEADER.unpack_from(self._buf, self._pos)
        if magic != c.IHAVEOPT:
            self._fail(RemoteProtocolError(f"bad option magic {magic:#x}"))
        if not self._fixed and option != Opt.EXPORT_NAME:
            # Non-fixed newstyle has no option replies: anything but EXPORT_NAME ends it.
            self._fail(RemoteProtocolError(f"option {option} without fixed newstyle"))
        if length > c.MAX_OPTION_DATA:
            self._pos += c.OPTION_HEADER.size
            self._drain(length)
            if option == Opt.EXPORT_NAME:
                self._fail(RemoteProtocolError("EXPORT_NAME longer than any export name"))
            rep = Rep.ERR_UNSUP if option not in _KNOWN_OPTIONS else Rep.ERR_TOO_BIG
            return self._opt_error(option, rep, f"option data of {length} bytes is too long")
        if self._available() < c.OPTION_HEADER.size + length:
            return self._closed_event()
        self._pos += c.OPTION_HEADER.size
        data = self._take(length)
        return self._handle_option(option, data)

    def _opt_reply(self, option: int, rep: int, data: bytes = b"") -> None:
        self._out.append(c.OPTION_REPLY_HEADER.pack(c.OPTION_REPLY_MAGIC, option, rep, len(data)))
        if data:
            self._out.append(data)

    def _opt_error(self, option: int, rep: Rep, message: str) -> OptionHandled:
        self._opt_reply(option, rep, message.encode()[: c.MAX_STRING])
        self._move(Trigger.OPTION, remote=True)
        return OptionHandled(option, rep, message)

    def _opt_ack(self, option: int, detail: str = "") -> OptionHandled:
        self._opt_reply(option, Rep.ACK)
        self._move(Trigger.OPTION, remote=True)
        return OptionHandled(option, Rep.ACK, detail)

    def _handle_option(self, option: int, data: bytes) -> Event:
        if option == Opt.EXPORT_NAME:
            return self._opt_export_name(data)
        if option == Opt.ABORT:
            # Reply ACK and close; a client that closes without reading it is tolerated.
            self._opt_reply(option, Rep.ACK)
            self._move(Trigger.ABORT, remote=True)
            return Aborted()
        if self.shutting_down:
            # "SHOULD error further options (other than an NBD_OPT_ABORT)" (proto.md).
            return self._opt_error(option, Rep.ERR_SHUTDOWN, "server is shutting down")
        if option == Opt.LIST:
            if data:
                return self._opt_error(option, Rep.ERR_INVALID, "LIST takes no data")
            for info in self._exports.values():
                name = info.name.encode()
                self._opt_reply(
                    option, Rep.SERVER, _U32.pack(len(name)) + name + info.description.encode()
                )
            return self._opt_ack(option, f"{len(self._exports)} exports")
        if option in (Opt.INFO, Opt.GO):
            return self._opt_info_go(option, data)
        if option == Opt.STRUCTURED_REPLY:
            if data:
                return self._opt_error(option, Rep.ERR_INVALID, "STRUCTURED_REPLY takes no data")
            if not self._allow_structured:
                return self._opt_error(option, Rep.ERR_UNSUP, "structured replies disabled")
            if self.structured:
                return self._opt_error(option, Rep.ERR_INVALID, "already negotiated")
            self.structured = True
            return self._opt_ack(option)
        if option in (Opt.LIST_META_CONTEXT, Opt.SET_META_CONTEXT):
            return self._opt_meta(option, data)
        if option == Opt.STARTTLS:
            return self._opt_error(option, Rep.ERR_UNSUP, "TLS is not configured on this server")
        return self._opt_error(option, Rep.ERR_UNSUP, f"option {option} is not supported")

    def _lookup(self, name: str) -> ExportInfo | None:
        return self._exports.get(name or self._default)

    def _transmission_flags(self, info: ExportInfo) -> TransmissionFlags:
        flags = info.flags | TransmissionFlags.HAS_FLAGS
        if self.structured:
            flags |= TransmissionFlags.SEND_DF
        return flags

    def _start(self, info: ExportInfo, via: Opt) -> TransmissionStarted:
        if self._meta_export != info.name:
            self._meta = {}  # contexts selected for another export do not carry over
        self.export = info
        self.flags = self._transmission_flags(info)
        self._size = info.size
        self._fast = _fast_masks(self.flags, self.structured)
        self._move(Trigger.GO, remote=True)
        return TransmissionStarted(
            info.name, info.size, self.flags, self.structured, dict(self._meta), via
        )

    def _opt_export_name(self, data: bytes) -> Event:
        # EXPORT_NAME has no error reply: an unknown export "MUST" be answered by closing.
        try:
            name = data.decode()
        except UnicodeDecodeError:
            self._fail(RemoteProtocolError("export name is not UTF-8"))
        info = self._lookup(name)
        if info is None or self.shutting_down:
            self._fail(RemoteProtocolError(f"unknown export {name!r} (EXPORT_NAME: closing)"))
        self._out.append(c.EXPORT_NAME_REPLY.pack(info.size, self._transmission_flags(info)))
        if not self._no_zeroes:
            self._out.append(c.EXPORT_NAME_PADDING)
        return self._start(info, Opt.EXPORT_NAME)

    def _opt_info_go(self, option: int, data: bytes) -> Event:
        parsed = _parse_info_go(data)
        if parsed is None:
            return self._opt_error(option, Rep.ERR_INVALID, "malformed INFO/GO data")
        name, requests = parsed
        info = self._lookup(name)
        if info is None:
            return self._opt_error(option, Rep.ERR_UNKNOWN, f"no export named {name!r}")
        out = self._out
        reply = c.OPTION_REPLY_HEADER.pack
        magic = c.OPTION_REPLY_MAGIC
        out.append(reply(magic, option, Rep.INFO, 12))
        out.append(_U16.pack(Info.EXPORT) + _U64.pack(info.size))
        out.append(_U16.pack(self._transmission_flags(info)))
        if Info.NAME in requests:
            raw = info.name.encode()
            out.append(reply(magic, option, Rep.INFO, 2 + len(raw)) + _U16.pack(Info.NAME) + raw)
        if Info.DESCRIPTION in requests and info.description:
            raw = info.description.encode()
            out.append(
                reply(magic, option, Rep.INFO, 2 + len(raw)) + _U16.pack(Info.DESCRIPTION) + raw
            )
        # Block sizes are always sent: clients that did not ask may ignore them (proto.md).
        out.append(reply(magic, option, Rep.INFO, 14))
        out.append(
            c.INFO_BLOCK_SIZE.pack(
                Info.BLOCK_SIZE, info.min_block, info.preferred_block, self.max_payload
            )
        )
        out.append(reply(magic, option, Rep.ACK, 0))
        if option == Opt.INFO:
            self._move(Trigger.OPTION, remote=True)
            return OptionHandled(option, Rep.ACK, f"export {info.name!r}")
        return self._start(info, Opt.GO)

    def _opt_meta(self, option: int, data: bytes) -> Event:
        parsed = _parse_meta(data)
        if parsed is None:
            return self._opt_error(option, Rep.ERR_INVALID, "malformed meta context data")
        name, queries = parsed
        if option == Opt.SET_META_CONTEXT and not self.structured:
            return self._opt_error(option, Rep.ERR_INVALID, "structured replies not negotiated")
        info = self._lookup(name)
        if info is None:
            return self._opt_error(option, Rep.ERR_UNKNOWN, f"no export named {name!r}")
        selected: dict[int, str] = {}
        for ctx, ctx_id in META_CONTEXTS.items():
            if option == Opt.LIST_META_CONTEXT:
                # No queries means "list all"; a namespace query "base:" lists its leaves.
                hit = not queries or any(
                    q == ctx or (ctx.startswith(q) and q.endswith(":")) for q in queries
                )
            else:
                hit = ctx in queries
            if hit:
                selected[ctx_id] = ctx
                wire_id = 0 if option == Opt.LIST_META_CONTEXT else ctx_id
                raw = ctx.encode()
                self._opt_reply(option, Rep.META_CONTEXT, _U32.pack(wire_id) + raw)
        if option == Opt.SET_META_CONTEXT:
            self._meta = selected
            self._meta_export = info.name
        return self._opt_ack(option, ",".join(selected.values()))

    # -- transmission ---------------------------------------------------------------------
    def _next_request(self) -> Event | _NeedData:
        if self._sink is not None:
            return self._sunk_request()
        buf = self._buf
        pos = self._pos
        if self._end - pos < _REQ_SIZE:
            if not self._eof:
                return NEED_DATA  # after each batch of requests: spare the call
            return self._closed_event()
        magic, flags, cmd, cookie, offset, length = _REQ.unpack_from(buf, pos)
        if magic != _REQUEST_MAGIC:
            self._fail(RemoteProtocolError(f"bad request magic {magic:#x}"))
        start = pos + _REQ_SIZE
        if cmd == _WRITE:
            if length > self.max_payload:
                # Refuse before buffering: the payload is drained as it arrives, never held.
                self._pos = start
                self._drain(length)
                return self._reject(
                    cookie,
                    cmd,
                    Errno.EINVAL,
                    f"payload {length} exceeds maximum {self.max_payload}",
                )
            end = start + length
            if self._end < end:
                if self._eof:
                    return self._closed_event()
                if self.payload_sink is not None:
                    self._offer_payload(start, cookie, flags, offset, length)
                return NEED_DATA
            if self._borrow:
                data: bytes | memoryview | None = self._rview[start:end]
            else:
                data = self._view[start:end].tobytes()
            self._pos = end
        else:
            data = None
            self._pos = start
            if cmd == _DISC:
                self._move(Trigger.DISC, remote=True)
                return Disconnect()
        # The common, valid request passes here (a dict lookup and four comparisons);
        # anything else goes through every rule.
        mask = self._fast.get(cmd)
        if (
            mask is None
            or flags & ~mask
            or offset + length > self._size
            or (cmd == _READ and length > self.max_payload)
            or self.shutting_down
        ):
            error, reason = self._validate_slow(cmd, flags, offset, length)
            if error:
                return self._reject(cookie, cmd, error, reason)
        return Request(cookie, cmd, offset, length, flags, data)

    def _offer_payload(self, start: int, cookie: int, flags: int, offset: int, length: int) -> None:
        """A WRITE's payload, from ``start`` in the buffer, has not all arrived: if the
        request passes the fast check (every rule, for a valid WRITE) and the sink takes
        it, move what has arrived into the sink and receive the rest there."""
        mask = self._fast.get(_WRITE)
        if (
            mask is None
            or flags & ~mask
            or offset + length > self._size
            or self.shutting_down
            or self.payload_sink is None
        ):
            return
        sink = self.payload_sink(offset, length)
        if sink is None:
            return
        if len(sink) != length:
            self._fail(LocalProtocolError(f"payload sink of {len(sink)} bytes for {length}"))
        have = self._end - start
        sink[:have] = self._view[start : self._end]
        self._pos = self._end
        self._sink = sink
        self._sink_filled = have
        self._sink_request = (cookie, flags, offset, length)

    def _sunk_request(self) -> Event | _NeedData:
        """The WRITE whose payload goes to the sink, once it is all there."""
        sink = self._sink
        assert sink is not None
        if self._sink_filled < len(sink):
            if self._eof:
                self._sink = None
                return self._closed_event()
            return NEED_DATA
        self._sink = None
        cookie, flags, offset, length = self._sink_request
        return Request(cookie, _WRITE, offset, length, flags, sink)

    def _validate_slow(self, cmd: int, flags: int, offset: int, length: int) -> tuple[Errno, str]:
        """Every rule, in the order that picks the error a client should see.

        ``_next_request`` comes here only when its fast check (``_fast_masks``, the range)
        does not pass a request outright."""
        if self.shutting_down:
            return Errno.ESHUTDOWN, "server is shutting down"
        allowed = _ALLOWED_FLAGS.get(cmd)
        if allowed is None:
            return Errno.EINVAL, f"unknown command {cmd}"
        tflags = self.flags
        if cmd in _MODIFYING and tflags & TransmissionFlags.READ_ONLY:
            # Before "not advertised": a read-only export need not advertise TRIM or
            # WRITE_ZEROES, yet a write of any kind to it is EPERM (proto.md).
            return Errno.EPERM, "export is read-only"
        need = _CMD_FLAG_FOR.get(cmd)
        if need is not None and not tflags & need:
            return Errno.EINVAL, f"{Cmd(cmd).name} was not advertised"
        if flags & ~allowed:  # plain ints: ~ on an IntFlag would only cover known bits
            return Errno.EINVAL, f"flags {flags:#x} not valid for {Cmd(cmd).name}"
        if flags & CmdFlags.FUA and not tflags & TransmissionFlags.SEND_FUA:
            return Errno.EINVAL, "FUA was not advertised"
        if flags & CmdFlags.DF and not self.structured:
            return Errno.EINVAL, "DF without structured replies"
        if cmd == Cmd.FLUSH and (offset or length):
            # "the client MUST set offset and length to zero" (proto.md); nbdkit: EINVAL.
            return Errno.EINVAL, f"FLUSH with offset {offset} and length {length}, not 0 and 0"
        if cmd == Cmd.BLOCK_STATUS and not self._meta:
            return Errno.EINVAL, "no meta context was negotiated"
        if cmd == Cmd.READ and length > self.max_payload:
            return Errno.EOVERFLOW if flags & CmdFlags.DF else Errno.EINVAL, (
                f"read of {length} exceeds maximum {self.max_payload}"
            )
        range_error = _RANGE_ERROR.get(cmd)
        if range_error is not None:
            assert self.export is not None
            if offset + length > self.export.size:
                return range_error, f"{offset}+{length} is past the end ({self.export.size})"
            if cmd == Cmd.BLOCK_STATUS and length == 0:
                return Errno.EINVAL, "zero-length block status"
        return Errno.OK, ""

    def _reject(self, cookie: int, cmd: int, error: Errno, reason: str) -> RequestRejected:
        self._send_error(cookie, cmd, error, reason)
        return RequestRejected(cookie, cmd, error, reason)

    def _send_error(self, cookie: int, cmd: int, error: int, message: str) -> None:
        if self.structured and cmd in (Cmd.READ, Cmd.BLOCK_STATUS):
            # Once negotiated, READ (and BLOCK_STATUS) errors travel as an ERROR chunk.
            msg = message.encode()[: c.MAX_STRING]
            self._out.append(
                _CHUNK.pack(
                    c.STRUCTURED_REPLY_MAGIC, c.ReplyFlags.DONE, c.Chunk.ERROR, cookie, 6 + len(msg)
                )
                + _ERR_CHUNK.pack(error, len(msg))
                + msg
            )
        else:
            self._out.append(_SIMPLE.pack(c.SIMPLE_REPLY_MAGIC, error, cookie))

    # -- replies --------------------------------------------------------------------------
    def reply(
        self, req: Request, error: int = 0, data: bytes | None = None, message: str = ""
    ) -> None:
        """Queue the answer to ``req``: READ data on success, else an error or a plain ACK."""
        phase = self._phase
        if phase is not _TRANSMISSION and phase is not _CLOSED:
            self._fail(LocalProtocolError(f"cannot reply in phase {phase.value}"))
        command = req.command
        if not error and data is None and command != _READ and command != _BLOCK_STATUS:
            # The common case first: a plain ACK (WRITE, FLUSH, TRIM, ...).
            self._out.append(_SIMPLE_PACK(_SIMPLE_REPLY_MAGIC, 0, req.cookie))
            return
        if error:
            try:
                name = Errno(error).name
            except ValueError:  # not one of the spec's values: still a valid error reply
                name = f"error {error}"
            self._send_error(req.cookie, req.command, error, message or name)
            return
        if command == _BLOCK_STATUS:
            # "A server MUST reply to NBD_CMD_BLOCK_STATUS with a structured reply of type
            # NBD_REPLY_TYPE_BLOCK_STATUS": a simple success reply would break the protocol.
            self._fail(LocalProtocolError("answer BLOCK_STATUS with reply_block_status"))
        if command == _READ:
            if data is None or len(data) != req.length:
                self._fail(
                    LocalProtocolError("a READ reply must carry exactly the requested length")
                )
            if self.structured:
                if not data:
                    self._out.append(
                        _CHUNK.pack(
                            c.STRUCTURED_REPLY_MAGIC, c.ReplyFlags.DONE, c.Chunk.NONE, req.cookie, 0
                        )
                    )
                    return
                self._out.append(
                    _CHUNK.pack(
                        _STRUCTURED_REPLY_MAGIC, _DONE, _OFFSET_DATA, req.cookie, 8 + len(data)
                    )
                    + _U64.pack(req.offset)
                )
            else:
                self._out.append(_SIMPLE_PACK(_SIMPLE_REPLY_MAGIC, 0, req.cookie))
            self._out.append(data)
            return
        if data is not None:
            self._fail(LocalProtocolError(f"{Cmd(req.command).name} replies carry no data"))
        self._out.append(_SIMPLE.pack(c.SIMPLE_REPLY_MAGIC, 0, req.cookie))

    def reply_block_status(self, req: Request, extents: list[Extent]) -> None:
        """Queue a BLOCK_STATUS answer: one chunk per selected context (``base:allocation``)."""
        if self._phase is not Phase.TRANSMISSION and self._phase is not Phase.CLOSED:
            self._fail(LocalProtocolError(f"cannot reply in phase {self._phase.value}"))
        if req.command != Cmd.BLOCK_STATUS or not extents:
            self._fail(
                LocalProtocolError("block status needs a BLOCK_STATUS request and an extent")
            )
        if req.flags & CmdFlags.REQ_ONE:
            extents = extents[:1]
        ids = sorted(self._meta)
        for i, ctx_id in enumerate(ids):
            body = b"".join(struct.pack(">II", e.length, e.flags) for e in extents)
            done = c.ReplyFlags.DONE if i == len(ids) - 1 else 0
            self._out.append(
                _CHUNK.pack(
                    c.STRUCTURED_REPLY_MAGIC, done, c.Chunk.BLOCK_STATUS, req.cookie, 4 + len(body)
                )
                + _U32.pack(ctx_id)
                + body
            )


def _fast_masks(tflags: TransmissionFlags, structured: bool) -> dict[int, int]:
    """Per command, the flags a request may carry and still be valid on this connection,
    for commands whose only remaining check is the range.  A command missing here (not
    advertised, read-only, BLOCK_STATUS) goes through every rule in ``_validate_slow``."""
    masks = {}
    for cmd, allowed in _ALLOWED_FLAGS.items():
        need = _CMD_FLAG_FOR.get(cmd)
        if cmd in (Cmd.DISC, Cmd.BLOCK_STATUS, Cmd.FLUSH):
            continue  # FLUSH: its zero offset and length are checked on the slow path
        if need is not None and not tflags & need:
            continue
        if cmd in _MODIFYING and tflags & TransmissionFlags.READ_ONLY:
            continue
        if not tflags & TransmissionFlags.SEND_FUA:
            allowed &= ~int(CmdFlags.FUA)
        if not structured:
            allowed &= ~int(CmdFlags.DF)
        masks[int(cmd)] = allowed
    return masks


_KNOWN_OPTIONS = frozenset(int(o) for o in Opt if o not in (Opt.PEEK_EXPORT, Opt.EXTENDED_HEADERS))


def _parse_info_go(data: bytes) -> tuple[str, set[int]] | None:
    """INFO/GO data: u32 namelen, name, u16 n, n × u16 info type.  None when malformed."""
    if len(data) < 6:
        return None
    (namelen,) = _U32.unpack_from(data, 0)
    if namelen > c.MAX_STRING or 4 + namelen + 2 > len(data):
        return None
    try:
        name = data[4 : 4 + namelen].decode()
    except UnicodeDecodeError:
        return None
    (n,) = _U16.unpack_from(data, 4 + namelen)
    if len(data) != 4 + namelen + 2 + 2 * n:
        return None
    base = 6 + namelen
    return name, {_U16.unpack_from(data, base + 2 * i)[0] for i in range(n)}


def _parse_meta(data: bytes) -> tuple[str, list[str]] | None:
    """META_CONTEXT data: u32 namelen, name, u32 nq, nq × (u32 len, query)."""
    try:
        (namelen,) = _U32.unpack_from(data, 0)
        if namelen > c.MAX_STRING:
            return None
        name = data[4 : 4 + namelen].decode()
        if len(name.encode()) != namelen:
            return None
        pos = 4 + namelen
        (nq,) = _U32.unpack_from(data, pos)
        pos += 4
        queries = []
        for _ in range(nq):
            (qlen,) = _U32.unpack_from(data, pos)
            pos += 4
            if qlen > c.MAX_STRING or pos + qlen > len(data):
                return None
            queries.append(data[pos : pos + qlen].decode())
            pos += qlen
    except (struct.error, UnicodeDecodeError):
        return None
    if pos != len(data):
        return None
    return name, queries
