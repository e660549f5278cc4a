"""The NBD server: a listener, one task per connection, each a thin loop around the protocol.

Shaped like trio's own servers: ``serve(task_status=...)`` reports the bound address through
``task_status.started``; streams are closed in ``finally``; the handshake runs under a
deadline; shutdown stops accepting first, answers late requests with ESHUTDOWN, gives live
connections a grace period, then flushes the exports.

This module holds the server's life and its connections' bookkeeping (and the faults that
act on them: drops, restarts).  What happens on one connection is elsewhere: the handshake
in ``handshake.py``, the requests in ``transmission.py`` (the hot path), its bytes in
``wire.py``; exports and their stores in ``exports.py`` and ``stores.py``.
"""

from __future__ import annotations

import errno
import itertools
from collections.abc import Iterable

import attrs
import structlog
import trio

from nbdproto import ProtocolError, ServerConnection, TransmissionStarted

from .config import ServerConfig, is_loopback
from .events import (
    NbdHandshakeTimeout,
    NbdProtocolError,
    NbdTransmissionStarted,
    ServerAcceptFailed,
    ServerConnectionClosed,
    ServerConnectionFailed,
    ServerConnectionLost,
    ServerConnectionOpened,
    ServerConnectionRefused,
    ServerConnectionsDropped,
    ServerListening,
    ServerRemoteBind,
    ServerRestarted,
    ServerShutdownStarted,
    ServerStatsReport,
    ServerStopped,
    ServerStoreCloseFailed,
    emit,
)
from .exports import Export, open_store
from .handshake import run_handshake, send_quietly
from .stats import Counters, Stats
from .transmission import serve_transmission


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
            emit(ServerRemoteBind(host=host))
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
                    emit(
                        ServerListening(
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
                    )
                    task_status.started(self.address)
                    await self._shutdown.wait()
                    acceptors.cancel_scope.cancel()
                for listener in listeners:
                    await listener.aclose()
                emit(ServerShutdownStarted(live=len(self._live), grace=self.config.shutdown_grace))
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
            emit(ServerStopped(**attrs.asdict(self.stats)))

    async def _close_stores(self) -> None:
        for export in self.exports.values():
            try:
                await trio.to_thread.run_sync(export.store.close)
            except OSError as exc:
                emit(ServerStoreCloseFailed(export=export.info.name, error=str(exc)))

    async def _stats_loop(self) -> None:
        while True:
            await trio.sleep(self.config.stats_interval)
            emit(ServerStatsReport(**attrs.asdict(self.stats)))

    async def _accept_loop(self, listener: trio.SocketListener, nursery: trio.Nursery) -> None:
        while True:
            try:
                stream = await listener.accept()
            except OSError as exc:
                # Out of descriptors or buffers: back off instead of spinning (like trio's
                # serve_listeners); anything else is a real error.
                if exc.errno in (errno.EMFILE, errno.ENFILE, errno.ENOMEM, errno.ENOBUFS):
                    emit(ServerAcceptFailed(error=str(exc)))
                    await trio.sleep(0.1)
                    continue
                raise
            if len(self._live) >= self.config.max_connections:
                self.stats.refused += 1
                emit(
                    ServerConnectionRefused(
                        reason="max_connections", limit=self.config.max_connections
                    )
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
        conn = ServerConnection(
            self._catalog, max_payload=self.config.max_payload, borrow_payloads=True
        )
        self._live[cid] = conn
        self._all_closed = trio.Event() if len(self._live) == 1 else self._all_closed
        self.stats.connections += 1
        self.stats.live = len(self._live)
        reason = "eof"
        counters = Counters()
        scope = self._scopes[cid] = trio.CancelScope()
        with structlog.contextvars.bound_contextvars(conn=cid):
            emit(ServerConnectionOpened(peer=peer_s))
            try:
                with scope:
                    reason = await self._serve_connection(stream, conn, counters)
                if scope.cancelled_caught:
                    reason = "dropped"
            except ProtocolError as exc:
                reason = "protocol_error"
                self.stats.protocol_errors += 1
                emit(NbdProtocolError(error=str(exc), phase=conn.phase.value))
                # A hard disconnect; send whatever reply was already decided (best effort).
                await send_quietly(stream, conn)
            except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
                reason = "connection_lost"
                emit(ServerConnectionLost(error=str(exc) or type(exc).__name__))
            except Exception as exc:
                # A bug here, not the peer's doing: it ends this connection only, and says
                # so (its reason is not "eof"), with the traceback; the others go on.
                reason = "internal_error"
                self.stats.internal_errors += 1
                emit(ServerConnectionFailed(error=f"{type(exc).__name__}: {exc}"))
            finally:
                del self._live[cid]
                del self._scopes[cid]
                self.stats.live = len(self._live)
                if not self._live:
                    self._all_closed.set()
                with trio.move_on_after(1) as cs:
                    cs.shield = True
                    await stream.aclose()
                emit(ServerConnectionClosed(reason=reason, **attrs.asdict(counters)))

    async def _serve_connection(
        self, stream: trio.abc.Stream, conn: ServerConnection, counters: Counters
    ) -> str:
        """Greeting, handshake under its deadline, then transmission; the close reason."""
        reason = "eof"
        await stream.send_all(conn.initiate())
        started: TransmissionStarted | None = None
        with trio.move_on_after(self.config.handshake_timeout):
            started = await run_handshake(stream, conn)
            reason = "handshake_ended" if started is None else reason
        if started is None:
            if reason == "eof":
                reason = "handshake_timeout"
                self.stats.handshake_timeouts += 1
                emit(NbdHandshakeTimeout(timeout=self.config.handshake_timeout))
        else:
            emit(
                NbdTransmissionStarted(
                    export=started.export_name,
                    structured=started.structured_replies,
                    via=started.via.name,
                    flags=int(started.flags),
                )
            )
            reason = await serve_transmission(
                stream, conn, self.exports[started.export_name], counters, self.stats
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
        emit(ServerConnectionsDropped(count=cut, export=export))
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
        emit(ServerRestarted(connections=sum(cut.values())))

    def fault_counts(self) -> dict[str, dict[str, int]]:
        """Per export, how often each fault fired (for summaries)."""
        return {name: dict(e.faults.counts) for name, e in self.exports.items()}
