"""Transmission: a connection's requests, executed against its export's store.

The hot path.  One receive may carry dozens of pipelined requests; they are parsed and
executed in a row and all their replies leave in one send.  Stores are synchronous (memory,
or a file in the page cache); only ``fdatasync`` for FLUSH/FUA goes to a worker thread.
Requests and bytes are counted as they are done, into the connection's ``Counters`` and the
server's ``Stats`` both: a swap device keeps its one connection open for as long as it is
watched.
"""

from __future__ import annotations

import errno
import os

import trio

from nbdproto import (
    NEED_DATA,
    Cmd,
    CmdFlags,
    ConnectionClosed,
    Disconnect,
    Errno,
    Extent,
    Request,
    RequestRejected,
    ServerConnection,
)

from .events import NbdRequestRejected, NbdStoreError, emit
from .exports import Export
from .faults import Faults
from .stats import Counters, Stats
from .stores import FileStore, MemoryStore, Store, StoreError
from .wire import FIRST_RECEIVE_SIZE, RECEIVE_SIZE, SocketWire, Wire, wire_for

#: Queue at most this much READ data before sending it, so that a peer pipelining huge reads
#: cannot make the server hold more than this (plus one request's worth).
MAX_QUEUED_OUTPUT = 4 * 1024 * 1024
#: A WRITE payload of at least this size that is still arriving is received straight into a
#: memory store: one receive more per request, one copy of the payload less.
DIRECT_MIN = 64 * 1024
#: After such a WRITE, the next receive takes this much: the next request's header.
PEEK_SIZE = 4 * 1024

_FUA = int(CmdFlags.FUA)
_READ, _WRITE = int(Cmd.READ), int(Cmd.WRITE)
_ERRNO_MAP = {
    errno.EPERM: Errno.EPERM,
    errno.EROFS: Errno.EPERM,
    errno.EACCES: Errno.EPERM,
    errno.ENOSPC: Errno.ENOSPC,
    errno.EDQUOT: Errno.ENOSPC,
    errno.EFBIG: Errno.ENOSPC,
    errno.ENOMEM: Errno.ENOMEM,
    errno.EINVAL: Errno.EINVAL,
    errno.EOPNOTSUPP: Errno.ENOTSUP,
    errno.EOVERFLOW: Errno.EOVERFLOW,
}


def nbd_errno(exc: OSError | StoreError) -> Errno:
    """Host errno → the NBD wire value (anything unknown is EIO)."""
    return _ERRNO_MAP.get(exc.errno or 0, Errno.EIO)


async def serve_transmission(
    stream: trio.abc.Stream,
    conn: ServerConnection,
    export: Export,
    counters: Counters,
    stats: Stats,
) -> str:
    """Serve ``conn``'s requests on ``stream`` until it ends; the close reason (``"eof"``,
    ``"disconnect"``).  Written data is flushed before returning."""
    wire = wire_for(stream)
    try:
        return await _serve_requests(wire, conn, export, counters, stats)
    finally:
        wire.close()


async def _serve_requests(
    wire: Wire,
    conn: ServerConnection,
    export: Export,
    counters: Counters,
    stats: Stats,
) -> str:
    store = export.store
    durable = store.needs_flush
    faults = export.faults
    receive_into = wire.receive_into
    get_buffer = conn.get_buffer
    receive_data = conn.receive_data
    next_event = conn.next_event
    reply = conn.reply
    data_to_send = conn.data_to_send
    pread, pwrite = store.pread, store.pwrite
    READ, WRITE = _READ, _WRITE
    # Straight into the store only from a socket, where it spares a copy: from any other
    # stream the bytes are copied out of it anyway, and the virtual-clock outcome tests'
    # interleavings depend on how the server reads an in-memory stream (with the peeks
    # below, clean-pages.toml under recursive stopped completing).
    direct = (
        _Direct(store, faults)
        if isinstance(store, MemoryStore) and isinstance(wire, SocketWire)
        else None
    )
    conn.payload_sink = direct
    size = FIRST_RECEIVE_SIZE
    reason = "eof"
    done = False
    while not done:
        # Straight into the protocol object's buffer; each WRITE's payload is borrowed from
        # there (conn was made with borrow_payloads) and stored before the next receive, so
        # a payload byte is copied twice, as in nbdkit: from the kernel, into the store.  A
        # large payload still to come goes straight into a memory store (_Direct): once.
        view = get_buffer(size)
        n = await receive_into(view)
        receive_data(view[:n])
        if n == size and size < RECEIVE_SIZE:
            size *= 2  # a client with more to send: take more per receive
        queued = 0
        while True:
            event = next_event()
            if event is NEED_DATA:
                break
            cls = event.__class__
            if cls is Request:
                req: Request = event  # type: ignore[assignment]
                cmd = req.command
                # Counted as they happen, into the server's totals too: a swap device
                # keeps its one connection open for as long as it is watched.
                counters.requests += 1
                stats.requests += 1
                if faults.armed:
                    err, sent = await _inject(wire, conn, faults, req)
                    if sent:
                        queued = 0
                    if err:
                        reply(req, err, message=f"injected fault: {err.name}")
                        continue
                try:
                    if cmd == WRITE:
                        assert req.data is not None
                        if direct is not None and req.data is direct.view:
                            direct.landed(req.offset, req.length)
                            # Most likely another large WRITE follows: take only its
                            # header (and a little) into the buffer, the rest direct.
                            size = PEEK_SIZE
                        else:
                            pwrite(req.offset, req.data)
                        if durable and req.flags & _FUA:
                            await trio.to_thread.run_sync(store.flush)
                        reply(req)
                        counters.bytes_written += req.length
                        stats.bytes_written += req.length
                    elif cmd == READ:
                        reply(req, 0, pread(req.offset, req.length))
                        counters.bytes_read += req.length
                        stats.bytes_read += req.length
                        queued += req.length
                        if queued > MAX_QUEUED_OUTPUT:
                            await wire.send(data_to_send())
                            queued = 0
                    else:
                        await _other(conn, store, req, durable)
                except (OSError, StoreError) as exc:
                    err = nbd_errno(exc)
                    emit(
                        NbdStoreError(
                            command=Cmd(cmd).name,
                            offset=req.offset,
                            length=req.length,
                            error=str(exc),
                            nbd_error=err.name,
                        )
                    )
                    reply(req, err, message=str(exc))
            elif cls is RequestRejected:
                rej: RequestRejected = event  # type: ignore[assignment]
                counters.rejected += 1
                stats.rejected += 1
                emit(
                    NbdRequestRejected(
                        cookie=rej.cookie,
                        command=rej.command,
                        error=rej.error.name,
                        reason=rej.reason,
                    )
                )
            elif cls is Disconnect:
                reason, done = "disconnect", True
                break
            elif cls is ConnectionClosed:
                reason, done = "eof", True
                break
        out = data_to_send()
        if out:
            await wire.send(out)
    if durable and counters.bytes_written:
        await trio.to_thread.run_sync(store.flush)
    return reason


class _Direct:
    """The payload sink of a connection to a memory export: a WRITE of DIRECT_MIN bytes or
    more whose payload is still arriving is received straight into the store's mapping
    (``MemoryStore.receive_view``), the kernel's copy being the only one (nbdkit makes two).

    Offered only requests that pass every check.  Not used while faults are armed (a
    failed WRITE must leave the store as it was), except for a WRITE whose payload was
    already arriving when they were armed: that one may fail with its bytes stored."""

    def __init__(self, store: MemoryStore, faults: Faults) -> None:
        self._store = store
        self._faults = faults
        #: The view lent last: a Request whose data is this view is already in the store.
        self.view: memoryview | None = None

    def __call__(self, offset: int, length: int) -> memoryview | None:
        if length < DIRECT_MIN or self._faults.armed:
            return None
        try:
            self.view = self._store.receive_view(offset, length)
        except StoreError:
            return None  # buffered instead, and pwrite answers the error
        return self.view

    def landed(self, offset: int, length: int) -> None:
        self.view = None
        self._store.written(offset, length)


async def _other(conn: ServerConnection, store: Store, req: Request, durable: bool) -> None:
    """The less frequent commands: FLUSH, TRIM, WRITE_ZEROES, CACHE, BLOCK_STATUS."""
    cmd = req.command
    fua = durable and bool(req.flags & CmdFlags.FUA)
    if cmd == Cmd.FLUSH:
        if durable:
            await trio.to_thread.run_sync(store.flush)
    elif cmd == Cmd.TRIM:
        store.trim(req.offset, req.length)
    elif cmd == Cmd.WRITE_ZEROES:
        if req.flags & CmdFlags.FAST_ZERO and not _zero_is_fast(store):
            conn.reply(req, Errno.ENOTSUP, message="zeroing would not be fast")
            return
        store.zero(req.offset, req.length, may_trim=not req.flags & CmdFlags.NO_HOLE)
    elif cmd == Cmd.CACHE:
        pass  # everything is already as close as it gets
    elif cmd == Cmd.BLOCK_STATUS:
        extents = store.extents(req.offset, req.length)
        conn.reply_block_status(req, [Extent(n, f) for n, f in extents])
        return
    if fua:
        await trio.to_thread.run_sync(store.flush)
    conn.reply(req)


async def _inject(
    wire: Wire,
    conn: ServerConnection,
    faults: Faults,
    req: Request,
) -> tuple[Errno, bool]:
    """The faults armed for this request: wait out a stall, sleep the delay (after
    sending the replies already made, so that each reply is late by ``delay``), draw
    an error.  Returns the error to answer with (``OK``: execute it) and whether the
    queued output was sent."""
    sent = False
    await faults.wait_while_stalled()
    if faults.delay:
        out = conn.data_to_send()
        if out:
            await wire.send(out)
            sent = True
        await faults.sleep_delay(req.command)
    return faults.draw_error(req.command), sent


def _zero_is_fast(store: Store) -> bool:
    # Memory drops pages; a file punches holes (fallocate), which every Linux fs we run on has.
    return isinstance(store, MemoryStore) or (isinstance(store, FileStore) and os.name == "posix")
