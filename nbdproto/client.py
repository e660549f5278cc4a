"""The client role of NBD, sans I/O.

``send(event) -> bytes`` for what the client says (``Hello``, ``OptionRequest``,
``Request``); ``receive_data`` / ``next_event`` for what the server answers.  Structured
replies are reassembled per cookie into one ``Reply``, whatever chunk shapes the server
chose (qemu splits reads into hole and data chunks, nbdkit sends one data chunk), and
meta-context ids are mapped to names.  Tolerated quirks (nbd.md §5): servers without
structured replies, LIST replies with odd descriptions, INFO reporting size 0.
"""

from __future__ import annotations

import bisect
import struct
from collections.abc import Iterable

from . import constants as c
from ._base import Machine
from ._state import Phase, Role, Trigger
from .constants import Chunk, Cmd, Info, Opt, Rep, TransmissionFlags
from .errors import LocalProtocolError, RemoteProtocolError
from .events import (
    NEED_DATA,
    ConnectionClosed,
    Event,
    ExportListed,
    Extent,
    Greeting,
    Hello,
    InfoBlockSize,
    InfoDescription,
    InfoExport,
    InfoName,
    MetaContext,
    OptionAck,
    OptionError,
    OptionReply,
    OptionRequest,
    Reply,
    Request,
    TransmissionStarted,
    _NeedData,
)

_U16 = struct.Struct(">H")
_U32 = struct.Struct(">I")
_U64 = struct.Struct(">Q")
_EXTENT = struct.Struct(">II")
#: Option replies longer than this are not believed (we never ask for anything that big).
MAX_OPTION_REPLY = 64 * 1024


# -- option builders ------------------------------------------------------------------------
def opt_export_name(name: str) -> OptionRequest:
    return OptionRequest(Opt.EXPORT_NAME, name.encode())


def opt_go(name: str, info: Iterable[int] = (), *, option: int = Opt.GO) -> OptionRequest:
    raw = name.encode()
    types = list(info)
    data = _U32.pack(len(raw)) + raw + _U16.pack(len(types))
    data += b"".join(_U16.pack(t) for t in types)
    return OptionRequest(option, data)


def opt_info(name: str, info: Iterable[int] = ()) -> OptionRequest:
    return opt_go(name, info, option=Opt.INFO)


def opt_meta(name: str, queries: Iterable[str], *, set_: bool) -> OptionRequest:
    raw = name.encode()
    qs = [q.encode() for q in queries]
    data = _U32.pack(len(raw)) + raw + _U32.pack(len(qs))
    data += b"".join(_U32.pack(len(q)) + q for q in qs)
    return OptionRequest(Opt.SET_META_CONTEXT if set_ else Opt.LIST_META_CONTEXT, data)


def _export_name_of(option: OptionRequest) -> str:
    """The export an option names: all its data for EXPORT_NAME, else a u32-prefixed name.

    Lenient, because a raw ``OptionRequest`` may be malformed on purpose: the server answers
    it with ERR_INVALID, and sending it must not blow up the client machine.
    """
    data = option.data
    if option.option != Opt.EXPORT_NAME:
        n = _U32.unpack_from(data)[0] if len(data) >= 4 else 0
        data = data[4 : 4 + n]
    return data.decode(errors="replace")


class _Pending:
    """A request in flight and, for structured replies, what has arrived of its answer."""

    __slots__ = (
        "command",
        "covered",
        "data",
        "error",
        "extents",
        "length",
        "message",
        "offset",
        "ranges",
    )

    def __init__(self, command: int, offset: int, length: int) -> None:
        self.command = command
        self.offset = offset
        self.length = length
        self.data: bytearray | None = None
        self.covered = 0
        self.ranges: list[tuple[int, int]] = []  # relative [start, end) of content chunks
        self.error = 0
        self.message = ""
        self.extents: dict[int, tuple[Extent, ...]] | None = None


class ClientConnection(Machine):
    """One client-side NBD connection."""

    role = Role.CLIENT

    def __init__(self, *, max_payload: int = c.DEFAULT_MAX_PAYLOAD) -> None:
        super().__init__(Phase.AWAIT_GREETING)
        self.max_payload = max_payload
        self.server_flags = c.HandshakeFlags(0)
        self._no_zeroes = False
        self._pending_option: int | None = None
        self._go_name = ""
        self._meta_name = ""  # the export named by the last SET_META_CONTEXT
        self._info: InfoExport | None = None
        self.structured = False
        self.meta_contexts: dict[int, str] = {}
        self.size = 0
        self.flags = TransmissionFlags(0)
        self.export_name = ""
        self._inflight: dict[int, _Pending] = {}

    @property
    def in_flight(self) -> int:
        return len(self._inflight)

    # -- sending --------------------------------------------------------------------------
    def send(self, event: Hello | OptionRequest | Request) -> bytes:
        self._check_usable()
        if isinstance(event, Hello):
            self._move(Trigger.FLAGS, remote=False)
            self._no_zeroes = bool(event.flags & c.ClientFlags.C_NO_ZEROES)
            return c.CLIENT_FLAGS.pack(event.flags)
        if isinstance(event, OptionRequest):
            self._move(Trigger.OPTION, remote=False)
            self._pending_option = event.option
            self._info = None
            if event.option in (Opt.GO, Opt.EXPORT_NAME):
                self._go_name = _export_name_of(event)
            if event.option == Opt.SET_META_CONTEXT:
                self.meta_contexts = {}
                self._meta_name = _export_name_of(event)
            header = c.OPTION_HEADER.pack(c.IHAVEOPT, event.option, len(event.data))
            return header + event.data
        return self._send_request(event)

    def _send_request(self, req: Request) -> bytes:
        if self._phase is not Phase.TRANSMISSION:
            self._fail(LocalProtocolError(f"cannot send a request in phase {self._phase.value}"))
        if req.command == Cmd.DISC:
            self._move(Trigger.DISC, remote=False)
            return c.REQUEST.pack(c.REQUEST_MAGIC, req.flags, req.command, req.cookie, 0, 0)
        if req.cookie in self._inflight:
            self._fail(LocalProtocolError(f"cookie {req.cookie} is already in flight"))
        length = req.length
        if req.command == Cmd.WRITE:
            if req.data is None:
                self._fail(LocalProtocolError("WRITE needs data"))
            length = len(req.data)
        self._inflight[req.cookie] = _Pending(req.command, req.offset, length)
        header = c.REQUEST.pack(
            c.REQUEST_MAGIC, req.flags, req.command, req.cookie, req.offset, length
        )
        if req.command == Cmd.WRITE:
            assert req.data is not None
            return header + req.data
        return header

    def forget_in_flight(self) -> list[int]:
        """Cookies that were in flight (for a caller that reconnects and resubmits)."""
        cookies = list(self._inflight)
        self._inflight.clear()
        return cookies

    # -- receiving ------------------------------------------------------------------------
    def next_event(self) -> Event | _NeedData:
        self._check_usable()
        try:
            phase = self._phase
            if phase is Phase.TRANSMISSION or (phase is Phase.CLOSED and self._inflight):
                # After DISC the server still answers what was in flight (proto.md).
                return self._next_reply()
            if phase is Phase.OPTION_PENDING:
                return self._next_option_reply()
            if phase is Phase.AWAIT_GREETING:
                return self._next_greeting()
            return self._eof_or_need()
        except RemoteProtocolError:
            self._phase = Phase.ERROR
            raise

    def _eof_or_need(self) -> Event | _NeedData:
        if self._eof:
            self._move(Trigger.EOF, remote=True)
            return ConnectionClosed()
        return NEED_DATA

    def _next_greeting(self) -> Event | _NeedData:
        if self._available() < c.GREETING.size:
            return self._eof_or_need()
        magic, opt, flags = c.GREETING.unpack_from(self._buf, self._pos)
        if magic != c.NBDMAGIC:
            self._fail(RemoteProtocolError(f"not an NBD server (magic {magic:#x})"))
        if opt != c.IHAVEOPT:
            self._fail(RemoteProtocolError("oldstyle negotiation is not supported"))
        self._pos += c.GREETING.size
        self.server_flags = c.HandshakeFlags(flags & 3)
        self._move(Trigger.GREETING, remote=True)
        return Greeting(self.server_flags)

    def _next_option_reply(self) -> Event | _NeedData:
        option = self._pending_option
        assert option is not None
        if option == Opt.EXPORT_NAME:
            need = c.EXPORT_NAME_REPLY.size + (0 if self._no_zeroes else 124)
            if self._available() < need:
                return self._eof_or_need()
            size, flags = c.EXPORT_NAME_REPLY.unpack_from(self._buf, self._pos)
            self._pos += need
            return self._start(size, flags, Opt.EXPORT_NAME)
        hdr = c.OPTION_REPLY_HEADER
        if self._available() < hdr.size:
            return self._eof_or_need()
        magic, echoed, rep, length = hdr.unpack_from(self._buf, self._pos)
        if magic != c.OPTION_REPLY_MAGIC:
            self._fail(RemoteProtocolError(f"bad option reply magic {magic:#x}"))
        if echoed != option:
            self._fail(RemoteProtocolError(f"reply for option {echoed}, expected {option}"))
        if length > MAX_OPTION_REPLY:
            self._fail(RemoteProtocolError(f"option reply of {length} bytes"))
        if self._available() < hdr.size + length:
            return self._eof_or_need()
        self._pos += hdr.size
        data = self._take(length)
        if rep == Rep.ACK:
            if length:
                self._fail(RemoteProtocolError("ACK with a payload"))
            if option == Opt.GO:
                if self._info is None:
                    self._fail(RemoteProtocolError("server omitted NBD_INFO_EXPORT before ACK"))
                return self._start(self._info.size, self._info.flags, Opt.GO)
            if option == Opt.STRUCTURED_REPLY:
                self.structured = True
            self._move(Trigger.ABORT if option == Opt.ABORT else Trigger.OPTION_DONE, remote=True)
            return OptionAck(option)
        if c.rep_is_error(rep):
            self._move(Trigger.OPTION_DONE, remote=True)
            return OptionError(option, rep, data.decode(errors="replace"))
        return self._parse_option_data(option, rep, data)

    def _parse_option_data(self, option: int, rep: int, data: bytes) -> Event:
        try:
            if rep == Rep.SERVER:
                (n,) = _U32.unpack_from(data)
                if 4 + n > len(data):
                    raise struct.error("name longer than reply")
                return ExportListed(data[4 : 4 + n].decode(), data[4 + n :].decode())
            if rep == Rep.META_CONTEXT:
                (ctx_id,) = _U32.unpack_from(data)
                name = data[4:].decode()
                if option == Opt.SET_META_CONTEXT:
                    self.meta_contexts[ctx_id] = name
                return MetaContext(ctx_id, name)
            if rep == Rep.INFO:
                (kind,) = _U16.unpack_from(data)
                if kind == Info.EXPORT:
                    size, flags = struct.unpack_from(">QH", data, 2)
                    self._info = InfoExport(size, TransmissionFlags(flags))
                    return self._info
                if kind == Info.NAME:
                    return InfoName(data[2:].decode())
                if kind == Info.DESCRIPTION:
                    return InfoDescription(data[2:].decode())
                if kind == Info.BLOCK_SIZE:
                    return InfoBlockSize(*struct.unpack_from(">III", data, 2))
        except (struct.error, UnicodeDecodeError) as exc:
            self._fail(RemoteProtocolError(f"malformed option reply {rep}: {exc}"))
        return OptionReply(option, rep, data)

    def _start(self, size: int, flags: int, via: Opt) -> TransmissionStarted:
        if not flags & TransmissionFlags.HAS_FLAGS:
            self._fail(RemoteProtocolError(f"invalid transmission flags {flags:#x}"))
        self.size = size
        self.flags = TransmissionFlags(flags)
        self.export_name = self._go_name
        if via == Opt.EXPORT_NAME or self._meta_name != self._go_name:
            # Contexts were selected for another export: the server drops them (proto.md).
            self.meta_contexts = {}
        self._move(Trigger.GO, remote=True)
        return TransmissionStarted(
            self._go_name, size, self.flags, self.structured, dict(self.meta_contexts), via
        )

    # -- transmission replies -------------------------------------------------------------
    def _next_reply(self) -> Event | _NeedData:
        while True:
            event = self._next_reply_frame()
            if event is not None:
                return event

    def _next_reply_frame(self) -> Event | _NeedData | None:
        """One frame: a whole simple reply, or one chunk (None when it was not the last)."""
        buf = self._buf
        pos = self._pos
        if self._end - pos < 4:
            return self._eof_or_need()
        (magic,) = _U32.unpack_from(buf, pos)
        if magic == c.SIMPLE_REPLY_MAGIC:
            if self._end - pos < c.SIMPLE_REPLY.size:
                return self._eof_or_need()
            _, error, cookie = c.SIMPLE_REPLY.unpack_from(buf, pos)
            p = self._inflight.get(cookie)
            if p is None:
                self._fail(RemoteProtocolError(f"reply for unknown cookie {cookie:#x}"))
            data = None
            if p.command == Cmd.READ and error == 0:
                end = pos + c.SIMPLE_REPLY.size + p.length
                if self._end < end:
                    return self._eof_or_need()
                data = self._view[pos + c.SIMPLE_REPLY.size : end].tobytes()
                self._pos = end
            else:
                self._pos = pos + c.SIMPLE_REPLY.size
            del self._inflight[cookie]
            return Reply(cookie, p.command, error, data)
        if magic == c.STRUCTURED_REPLY_MAGIC:
            return self._next_chunk()
        self._fail(RemoteProtocolError(f"bad reply magic {magic:#x}"))

    def _next_chunk(self) -> Event | _NeedData | None:
        hdr = c.CHUNK_HEADER
        buf = self._buf
        pos = self._pos
        if self._end - pos < hdr.size:
            return self._eof_or_need()
        _, flags, kind, cookie, length = hdr.unpack_from(buf, pos)
        p = self._inflight.get(cookie)
        if p is None:
            self._fail(RemoteProtocolError(f"chunk for unknown cookie {cookie:#x}"))
        if length > p.length + 8 and length > MAX_OPTION_REPLY:
            self._fail(
                RemoteProtocolError(f"chunk of {length} bytes for a {p.length}-byte request")
            )
        if self._end - pos < hdr.size + length:
            return self._eof_or_need()
        body = memoryview(buf)[pos + hdr.size : pos + hdr.size + length]
        try:
            self._apply_chunk(p, kind, body)
        finally:
            body.release()
        self._pos = pos + hdr.size + length
        if not flags & c.ReplyFlags.DONE:
            return None
        del self._inflight[cookie]
        data = None
        if p.command == Cmd.READ and not p.error:
            if p.covered != p.length:
                self._fail(
                    RemoteProtocolError(f"read reply covered {p.covered} of {p.length} bytes")
                )
            data = bytes(p.data) if p.data is not None else bytes(p.length)
        return Reply(cookie, p.command, p.error, data, p.extents, p.message)

    def _apply_chunk(self, p: _Pending, kind: int, body: memoryview) -> None:
        if kind == Chunk.OFFSET_DATA or kind == Chunk.OFFSET_HOLE:
            if p.command != Cmd.READ or len(body) < 8:
                self._fail(RemoteProtocolError("data chunk for a non-READ or too short"))
            (offset,) = _U64.unpack_from(body)
            if kind == Chunk.OFFSET_DATA:
                size = len(body) - 8
            else:
                if len(body) != 12:
                    self._fail(RemoteProtocolError("OFFSET_HOLE chunk must be 12 bytes"))
                (size,) = _U32.unpack_from(body, 8)
            rel = offset - p.offset
            if rel < 0 or rel + size > p.length:
                self._fail(RemoteProtocolError("chunk outside the requested range"))
            if kind == Chunk.OFFSET_DATA:
                if p.data is None:
                    p.data = bytearray(p.length)
                p.data[rel : rel + size] = body[8:]
            if size:
                # "Content chunks MUST NOT overlap": an overlap would also let ``covered``
                # reach the length with a gap left unsent, read back as zeroes.
                i = bisect.bisect_left(p.ranges, (rel, rel + size))
                if (i and p.ranges[i - 1][1] > rel) or (
                    i < len(p.ranges) and p.ranges[i][0] < rel + size
                ):
                    self._fail(RemoteProtocolError("chunk overlaps an earlier chunk"))
                p.ranges.insert(i, (rel, rel + size))
            p.covered += size
        elif kind == Chunk.BLOCK_STATUS:
            if len(body) < 4 or (len(body) - 4) % 8:
                self._fail(RemoteProtocolError("malformed BLOCK_STATUS chunk"))
            (ctx_id,) = _U32.unpack_from(body)
            extents = tuple(
                Extent(*_EXTENT.unpack_from(body, off)) for off in range(4, len(body), 8)
            )
            if p.extents is None:
                p.extents = {}
            p.extents[ctx_id] = extents
        elif c.chunk_is_error(kind):
            if len(body) < 6:
                self._fail(RemoteProtocolError("ERROR chunk too short"))
            error, msglen = struct.unpack_from(">IH", body)
            if 6 + msglen > len(body):
                self._fail(RemoteProtocolError("ERROR chunk message overruns the chunk"))
            if not p.error:
                p.error = error or c.Errno.EINVAL  # a zero error in an ERROR chunk is invalid
                p.message = bytes(body[6 : 6 + msglen]).decode(errors="replace")
        elif kind != Chunk.NONE:
            self._fail(RemoteProtocolError(f"unknown chunk type {kind}"))
