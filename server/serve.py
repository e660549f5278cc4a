"""The NBD server: a listener, one task per connection, a thin loop around the protocol.

Shaped like trio's own servers: ``serve(task_status=...)`` reports the bound address through
``task_status.started``; streams are closed in ``finally``; the handshake runs under a
deadline; shutdown stops accepting first, answers late requests with ESHUTDOWN, gives live
connections a grace period, then flushes the exports.

The transmission loop is the hot path.  One ``receive_some`` may carry dozens of pipelined
requests; they are parsed and executed in a row and all their replies leave in one
``send_all``.  Stores are synchronous (memory, or a file in the page cache); only
``fdatasync`` for FLUSH/FUA goes to a worker thread.
"""

from __future__ import annotations

import contextlib
import errno
import itertools
import os
import select
import socket
import time
from collections.abc import Iterable

import attrs
import structlog
import trio

from nbdproto import (
    NEED_DATA,
    Aborted,
    Cmd,
    CmdFlags,
    ConnectionClosed,
    Disconnect,
    Errno,
    ExportInfo,
    Extent,
    OptionHandled,
    ProtocolError,
    Request,
    RequestRejected,
    ServerConnection,
    TransmissionFlags,
    TransmissionStarted,
)

from .config import ExportConfig, ServerConfig, is_loopback
from .faults import Faults
from .stores import FileStore, MemoryStore, Store, StoreError

log = structlog.get_logger()

RECEIVE_SIZE = 256 * 1024
SPIN_SECONDS = 50e-6
SPIN_BACKOFF_MAX = 64
#: Spin this long before yielding the CPU between looks (a peer on another CPU answers
#: within it; one on ours needs the CPU to answer at all).
SPIN_BEFORE_YIELD = 15e-6
#: Queue at most this much READ data before sending it, so that a peer pipelining huge reads
#: cannot make the server hold more than this (plus one request's worth).
MAX_QUEUED_OUTPUT = 4 * 1024 * 1024

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


class _StreamWire:
    """Bytes in and out through any trio stream (an in-memory pair in tests, TLS, ...)."""

    def __init__(self, stream: trio.abc.Stream) -> None:
        self._stream = stream

    async def receive(self) -> bytes | bytearray | memoryview:
        return await self._stream.receive_some(RECEIVE_SIZE)

    async def send(self, data: bytes) -> None:
        await self._stream.send_all(data)

    def close(self) -> None:
        pass


class _SocketWire:
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
        _SocketWire.live += 1

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
        if _SocketWire.live > 1:
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
            _SocketWire.live -= 1
        trio.lowlevel.notify_closing(self._sock)
        self._sock.close()


def _wire_for(stream: trio.abc.Stream) -> _StreamWire | _SocketWire:
    if isinstance(stream, trio.SocketStream):
        return _SocketWire(stream)
    return _StreamWire(stream)


def open_store(config: ExportConfig) -> Store:
    """The store an export's configuration describes (a file is created if missing)."""
    if config.backend == "file":
        assert config.path is not None
        return FileStore(config.path, config.size, read_only=config.read_only)
    return MemoryStore(config.size, read_only=config.read_only)


@attrs.define
class Export:
    """A named export: its store, what the handshake says about it, and its faults."""

    config: ExportConfig
    store: Store
    info: ExportInfo
    faults: Faults = attrs.field()

    @faults.default
    def _faults_from_config(self) -> Faults:
        return Faults.from_config(self.config.faults, self.info.name)

    @classmethod
    def from_config(cls, config: ExportConfig) -> Export:
        store = open_store(config)
        flags = (
            TransmissionFlags.HAS_FLAGS
            | TransmissionFlags.SEND_FLUSH
            | TransmissionFlags.SEND_CACHE
            # One store object serves every connection, so a FLUSH on one covers writes
            # completed on all of them: multi-conn is true for both backends.
            | TransmissionFlags.CAN_MULTI_CONN
        )
        if config.read_only:
            flags |= TransmissionFlags.READ_ONLY
        else:  # writing features only where writing is possible (as nbdkit -r does)
            flags |= (
                TransmissionFlags.SEND_FUA
                | TransmissionFlags.SEND_TRIM
                | TransmissionFlags.SEND_WRITE_ZEROES
                | TransmissionFlags.SEND_FAST_ZERO
            )
        info = ExportInfo(config.name, config.size, flags, config.description)
        return cls(config, store, info)


@attrs.define
class Counters:
    """One connection's work so far (logged when it closes)."""

    requests: int = 0
    rejected: int = 0
    bytes_read: int = 0
    bytes_written: int = 0


@attrs.define
class Stats:
    """The server's totals.  Requests and bytes count as they are done, on live connections
    too: a swap device keeps one connection for its whole life."""

    connections: int = 0
    live: int = 0
    refused: int = 0
    requests: int = 0
    rejected: int = 0
    bytes_read: int = 0
    bytes_written: int = 0
    protocol_errors: int = 0
    handshake_timeouts: int = 0


class NBDServer:
    """A trio NBD server over a set of exports."""

    def __init__(self, config: ServerConfig, exports: Iterable[Export] | None = None) -> None:
        self.config = config
        if exports is None:
            exports = [Export.from_config(e) for e in config.exports]
        self.exports: dict[str, Export] = {e.info.name: e for e in exports}
        if not self.exports:
            raise ValueError("a server needs at least one export")
        self._catalog = {name: e.info for name, e in self.exports.items()}
        self._ids = itertools.count(1)
        self._live: dict[int, ServerConnection] = {}
        self._scopes: dict[int, trio.CancelScope] = {}
        self._all_closed = trio.Event()
        self._all_closed.set()
        self._shutdown = trio.Event()
        self.stats = Stats()
        self.address: tuple[str, int] | None = None
        #: Unset while :meth:`restart` reopens the stores: new connections wait for it.
        self._open = trio.Event()
        self._open.set()
        self._restarting = trio.Lock()

    # -- lifecycle ------------------------------------------------------------------------
    def shutdown(self) -> None:
        """Begin a graceful shutdown (idempotent; safe from a signal-handling task).

        Stalls end, so that requests held by a stall fault are answered within the grace
        period instead of being cut at its end."""
        self._shutdown.set()
        for export in self.exports.values():
            export.faults.unstall()

    async def serve(
        self, *, task_status: trio.TaskStatus[tuple[str, int]] = trio.TASK_STATUS_IGNORED
    ) -> None:
        host, port = self.config.address
        if not is_loopback(host):
            log.warning("server.remote_bind", host=host, note="listening beyond loopback")
        listeners = await trio.open_tcp_listeners(port, host=host)
        sockname = listeners[0].socket.getsockname()
        self.address = (sockname[0], sockname[1])
        try:
            async with trio.open_nursery() as connections:
                async with trio.open_nursery() as acceptors:
                    for listener in listeners:
                        acceptors.start_soon(self._accept_loop, listener, connections)
                    if self.config.stats_interval > 0:
                        acceptors.start_soon(self._stats_loop)
                    log.info(
                        "server.listening",
                        host=self.address[0],
                        port=self.address[1],
                        exports=[
                            {
                                "name": e.info.name,
                                "size": e.info.size,
                                "backend": e.config.backend,
                                "read_only": e.config.read_only,
                            }
                            for e in self.exports.values()
                        ],
                        max_payload=self.config.max_payload,
                    )
                    task_status.started(self.address)
                    await self._shutdown.wait()
                    acceptors.cancel_scope.cancel()
                for listener in listeners:
                    await listener.aclose()
                log.info(
                    "server.shutdown_started",
                    live=len(self._live),
                    grace=self.config.shutdown_grace,
                )
                for conn in self._live.values():
                    conn.shutting_down = True
                with trio.move_on_after(self.config.shutdown_grace):
                    await self._all_closed.wait()
                connections.cancel_scope.cancel()
        finally:
            # Shielded: a cancelled serve() (its nursery cancelled) must still close the
            # listeners and flush and close the stores, or acknowledged data is at risk.
            with trio.CancelScope(shield=True):
                for listener in listeners:
                    await listener.aclose()
                # A restart in progress may be reopening a store: let it finish, so that
                # the stores closed here are the open ones, each once; a later restart
                # sees the shutdown and does nothing.
                self._shutdown.set()
                async with self._restarting:
                    await self._close_stores()
            log.info("server.stopped", **attrs.asdict(self.stats))

    async def _close_stores(self) -> None:
        for export in self.exports.values():
            try:
                await trio.to_thread.run_sync(export.store.close)
            except OSError as exc:
                log.error("server.store_close_failed", export=export.info.name, error=str(exc))

    async def _stats_loop(self) -> None:
        while True:
            await trio.sleep(self.config.stats_interval)
            log.info("server.stats", **attrs.asdict(self.stats))

    async def _accept_loop(self, listener: trio.SocketListener, nursery: trio.Nursery) -> None:
        while True:
            try:
                stream = await listener.accept()
            except OSError as exc:
                # Out of descriptors or buffers: back off instead of spinning (like trio's
                # serve_listeners); anything else is a real error.
                if exc.errno in (errno.EMFILE, errno.ENFILE, errno.ENOMEM, errno.ENOBUFS):
                    log.error("server.accept_failed", error=str(exc))
                    await trio.sleep(0.1)
                    continue
                raise
            if len(self._live) >= self.config.max_connections:
                self.stats.refused += 1
                log.warning(
                    "server.connection_refused",
                    reason="max_connections",
                    limit=self.config.max_connections,
                )
                await stream.aclose()
                continue
            nursery.start_soon(self.handle_stream, stream)

    # -- one connection -------------------------------------------------------------------
    async def handle_stream(self, stream: trio.abc.Stream, peer: str | None = None) -> None:
        """Serve one connection on any trio stream until it ends, then close it.

        The listener calls this for each TCP connection; an embedding process (or a test
        under trio's virtual clock) may call it with an in-memory stream instead.
        """
        if not self._open.is_set():
            await self._open.wait()  # a restart is reopening the stores
        cid = next(self._ids)
        if peer is None:
            try:
                addr = stream.socket.getpeername()  # type: ignore[attr-defined]
                peer = f"{addr[0]}:{addr[1]}"
            except (AttributeError, OSError):
                peer = type(stream).__name__
        peer_s = peer
        conn = ServerConnection(self._catalog, max_payload=self.config.max_payload)
        self._live[cid] = conn
        self._all_closed = trio.Event() if len(self._live) == 1 else self._all_closed
        self.stats.connections += 1
        self.stats.live = len(self._live)
        reason = "eof"
        counters = Counters()
        scope = self._scopes[cid] = trio.CancelScope()
        with structlog.contextvars.bound_contextvars(conn=cid):
            log.info("server.connection_opened", peer=peer_s)
            try:
                with scope:
                    reason = await self._serve_connection(stream, conn, counters)
                if scope.cancelled_caught:
                    reason = "dropped"
            except ProtocolError as exc:
                reason = "protocol_error"
                self.stats.protocol_errors += 1
                log.warning("nbd.protocol_error", error=str(exc), phase=conn.phase.value)
                # A hard disconnect; send whatever reply was already decided (best effort).
                await self._send_quietly(stream, conn)
            except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
                reason = "connection_lost"
                log.info("server.connection_lost", error=str(exc) or type(exc).__name__)
            finally:
                del self._live[cid]
                del self._scopes[cid]
                self.stats.live = len(self._live)
                if not self._live:
                    self._all_closed.set()
                with trio.move_on_after(1) as cs:
                    cs.shield = True
                    await stream.aclose()
                log.info("server.connection_closed", reason=reason, **attrs.asdict(counters))

    async def _serve_connection(
        self, stream: trio.abc.Stream, conn: ServerConnection, counters: Counters
    ) -> str:
        """Greeting, handshake under its deadline, then transmission; the close reason."""
        reason = "eof"
        await stream.send_all(conn.initiate())
        started: TransmissionStarted | None = None
        with trio.move_on_after(self.config.handshake_timeout):
            started = await self._handshake(stream, conn)
            reason = "handshake_ended" if started is None else reason
        if started is None:
            if reason == "eof":
                reason = "handshake_timeout"
                self.stats.handshake_timeouts += 1
                log.warning("nbd.handshake_timeout", timeout=self.config.handshake_timeout)
        else:
            log.info(
                "nbd.transmission_started",
                export=started.export_name,
                structured=started.structured_replies,
                via=started.via.name,
                flags=int(started.flags),
            )
            reason = await self._transmission(
                stream, conn, self.exports[started.export_name], counters
            )
        return reason

    # -- faults ---------------------------------------------------------------------------
    def drop_connections(self, export: str | None = None) -> int:
        """Cut every live connection at once (a fault to inject: the server "crashed" for
        its clients, while it keeps listening), or only those in transmission on
        ``export``.  Counted as a ``drop`` on each export concerned.  Returns how many
        connections were cut."""
        per_export = self._cut(export)
        cut = sum(per_export.values())
        log.warning("server.connections_dropped", count=cut, export=export)
        for name, n in per_export.items():
            if name is not None:
                self.exports[name].faults.fired("drop", connections=n)
        return cut

    def _cut(self, export: str | None) -> dict[str | None, int]:
        """Cancel the connections (all, or those on ``export``); how many per export
        (``None``: still in the handshake)."""
        if export is not None and export not in self.exports:
            raise ValueError(f"no export named {export!r}")
        names = list(self.exports) if export is None else [export]
        per_export: dict[str | None, int] = dict.fromkeys(names, 0)
        for cid, scope in self._scopes.items():
            if scope.cancel_called:  # already cut, still closing
                continue
            info = self._live[cid].export
            name = None if info is None else info.name
            if export is not None and name != export:
                continue
            scope.cancel()
            per_export[name] = per_export.get(name, 0) + 1
        return per_export

    async def restart(self) -> None:
        """Restart the server in place: cut every connection, close every store and open
        it again, as a restarted server would (the listener stays open, and
        connections that arrive meanwhile wait until the stores are back).

        A file export keeps its data: what was written is in the file, and the close
        flushes it.  A memory export keeps its store object, hence its data: within one
        process a restart cannot lose what a real restart of a memory server would.
        """
        async with self._restarting:
            if self._shutdown.is_set():
                return
            gate = self._open = trio.Event()
            try:
                await self._restart_stores()
            finally:
                gate.set()

    async def _restart_stores(self) -> None:
        cut = self._cut(None)
        # A connection that was inside a flush finishes it first (threads are not
        # cancelled): after this no task touches the old stores.
        while self._live:
            await self._all_closed.wait()
        for export in self.exports.values():
            if export.config.backend == "file":
                await trio.to_thread.run_sync(export.store.close)
                export.store = open_store(export.config)
            export.faults.fired(
                "restart",
                backend=export.config.backend,
                connections=cut.get(export.info.name, 0),
            )
        log.info("server.restarted", connections=sum(cut.values()))

    def fault_counts(self) -> dict[str, dict[str, int]]:
        """Per export, how often each fault fired (for summaries)."""
        return {name: dict(e.faults.counts) for name, e in self.exports.items()}

    async def _inject(
        self,
        wire: _StreamWire | _SocketWire,
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

    async def _send_quietly(self, stream: trio.abc.Stream, conn: ServerConnection) -> None:
        data = conn.data_to_send()
        if data:
            with (
                trio.move_on_after(1),
                contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError),
            ):
                await stream.send_all(data)

    async def _handshake(
        self, stream: trio.abc.Stream, conn: ServerConnection
    ) -> TransmissionStarted | None:
        """Run the option haggling.  Returns the start of transmission, or None on close."""
        while True:
            event = conn.next_event()
            if event is NEED_DATA:
                out = conn.data_to_send()
                if out:
                    await stream.send_all(out)
                conn.receive_data(await stream.receive_some(65536))
                continue
            if isinstance(event, OptionHandled):
                log.debug("nbd.option", option=event.option, reply=event.reply, detail=event.detail)
                if event.reply is not None and event.reply & (1 << 31):
                    log.info(
                        "nbd.option_refused",
                        option=event.option,
                        reply=event.reply.name if event.reply else None,
                        detail=event.detail,
                    )
            elif isinstance(event, TransmissionStarted):
                out = conn.data_to_send()
                if out:
                    await stream.send_all(out)
                return event
            elif isinstance(event, ConnectionClosed):
                return None
            elif isinstance(event, Aborted):
                log.info("nbd.aborted")
                await self._send_quietly(stream, conn)  # the peer may not wait for the ACK
                return None

    async def _transmission(
        self,
        stream: trio.abc.Stream,
        conn: ServerConnection,
        export: Export,
        counters: Counters,
    ) -> str:
        wire = _wire_for(stream)
        try:
            return await self._transmission_loop(wire, conn, export, counters)
        finally:
            wire.close()

    async def _transmission_loop(
        self,
        wire: _StreamWire | _SocketWire,
        conn: ServerConnection,
        export: Export,
        counters: Counters,
    ) -> str:
        store = export.store
        durable = store.needs_flush
        faults = export.faults
        stats = self.stats
        receive = wire.receive
        receive_data = conn.receive_data
        next_event = conn.next_event
        reply = conn.reply
        data_to_send = conn.data_to_send
        pread, pwrite = store.pread, store.pwrite
        READ, WRITE = _READ, _WRITE
        reason = "eof"
        done = False
        while not done:
            receive_data(await receive())
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
                        err, sent = await self._inject(wire, conn, faults, req)
                        if sent:
                            queued = 0
                        if err:
                            reply(req, err, message=f"injected fault: {err.name}")
                            continue
                    try:
                        if cmd == WRITE:
                            assert req.data is not None
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
                            await self._other(conn, store, req, durable)
                    except (OSError, StoreError) as exc:
                        err = nbd_errno(exc)
                        log.warning(
                            "nbd.store_error",
                            command=Cmd(cmd).name,
                            offset=req.offset,
                            length=req.length,
                            error=str(exc),
                            nbd_error=err.name,
                        )
                        reply(req, err, message=str(exc))
                elif cls is RequestRejected:
                    rej: RequestRejected = event  # type: ignore[assignment]
                    counters.rejected += 1
                    stats.rejected += 1
                    log.info(
                        "nbd.request_rejected",
                        cookie=rej.cookie,
                        command=rej.command,
                        error=rej.error.name,
                        reason=rej.reason,
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

    async def _other(
        self, conn: ServerConnection, store: Store, req: Request, durable: bool
    ) -> None:
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


def _zero_is_fast(store: Store) -> bool:
    # Memory drops pages; a file punches holes (fallocate), which every Linux fs we run on has.
    return isinstance(store, MemoryStore) or (isinstance(store, FileStore) and os.name == "posix")
