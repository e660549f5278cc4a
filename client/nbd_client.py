"""A pipelining NBD client over a trio stream, built on :mod:`nbdproto`.

Many requests may be in flight (up to ``depth``); replies are matched by cookie in whatever
order the server sends them.  The handshake asks for structured replies and GO, and falls
back to EXPORT_NAME when a server does not know GO (nbd.md §2, "Fallback behaviour").

This is the transport of the client machine's swap device; reconnection and the fencing of
superseded writes belong to the swap device above it.

``xmit`` (optional) is the context every request's send runs in: the kernel's nbd driver
changes the sending task's flags around ``sock_xmit``, and which flags depends on its era
(``nbd_xmit_context``).  Without it a send runs in whatever context the caller has.
"""

from __future__ import annotations

import contextlib
import itertools
from collections.abc import Awaitable, Callable
from contextlib import AbstractContextManager
from typing import Any

import trio

from client.mm.gfp import PF, as_task, task_flags
from client.mm.waits import WaitQueue
from client.sync import HandoffLock
from nbdproto import (
    NEED_DATA,
    ClientConnection,
    Cmd,
    CmdFlags,
    ConnectionClosed,
    Errno,
    Greeting,
    Hello,
    Info,
    Opt,
    OptionAck,
    OptionError,
    OptionRequest,
    ProtocolError,
    RemoteProtocolError,
    Rep,
    Reply,
    Request,
    TransmissionStarted,
    opt_export_name,
    opt_go,
)
from nbdproto.constants import ClientFlags, HandshakeFlags

RECEIVE_SIZE = 256 * 1024

#: The context of one send: entered around each request's ``send_all``.
XmitContext = Callable[[], AbstractContextManager[object]]

#: ``[swap] nbd``: the kernel eras of drivers/block/nbd.c whose transmit context differs.
NBD_ERAS = ("2.6.18", "3.5", "3.6", "6.1")


def nbd_xmit_context(era: str) -> XmitContext:
    """The task context drivers/block/nbd.c sends a request in, by kernel era.

    What a sender's allocations carry is its task's flags (``PF_MEMALLOC`` lets them go
    below min, ``gfp_pfmemalloc_flags``); its skbs' gfp is ``sk_allocation``, which the
    policy sets (``socket_created``: each design's nbd patch).  A request reaches the driver
    in its submitter's task (client/mm/block.py), and then:

    * ``"2.6.18"``: the request_fn ``do_nbd_request`` calls ``nbd_send_req`` itself, so the
      send runs in whoever runs the queue -- the submitter, with its flags and nothing more
      (kswapd's and a direct reclaimer's ``PF_MEMALLOC``; a faulting process's none).  The
      driver Zijlstra patched in "nbd: deadlock prevention for NBD" (Aug 2006).
    * ``"3.5"``: ``do_nbd_request`` only queues; the per-device kernel thread
      ``nbd_thread`` sends (``nbd_handle_req`` -> ``nbd_send_req`` -> ``sock_xmit``) with
      the flags of a kernel thread: ``PF_KTHREAD``, no ``PF_MEMALLOC``.  The driver Gorman's
      3.6 patch was made against.
    * ``"3.6"``: the same thread; ``sock_xmit`` does ``current->flags |= PF_MEMALLOC`` around
      the send and ``tsk_restore_flags`` after ("nbd: Set SOCK_MEMALLOC for access to
      PFMEMALLOC reserves", Gorman, Linux 3.6).
    * ``"6.1"``: blk-mq; ``nbd_queue_rq`` runs in the submitter's task (or a kblockd
      worker), and ``__sock_xmit`` wraps ``sock_sendmsg`` in ``memalloc_noreclaim_save()``:
      the submitter's flags plus ``PF_MEMALLOC``.  For the allocator this equals 3.6: a
      ``PF_MEMALLOC`` task never reaches direct reclaim or its throttle, where the other
      flags would matter.

    Receiving allocates nothing in the model (RX buffers are the softirq's), so the
    receiving side (``nbd_do_it``'s ioctl process, 6.1's ``recv_work``) is not modelled here.
    """
    if era == "2.6.18":
        return contextlib.nullcontext
    if era == "3.5":
        return lambda: as_task(PF.KTHREAD)  # nbd_thread: a kernel thread, nothing more
    if era == "3.6":
        # sock_xmit in nbd_thread: "current->flags |= PF_MEMALLOC"
        return lambda: as_task(PF.KTHREAD | PF.MEMALLOC)
    if era == "6.1":
        # __sock_xmit: "noreclaim_flag = memalloc_noreclaim_save();" in queue_rq's task
        return lambda: task_flags(PF.MEMALLOC)
    raise ValueError(f"nbd era {era!r}: choose one of {', '.join(NBD_ERAS)}")


class NBDError(Exception):
    """A request answered with an NBD error, or a connection that failed."""

    def __init__(self, message: str, errno: int = Errno.EIO) -> None:
        super().__init__(message)
        self.errno = errno


class Disconnected(NBDError):
    """The connection is gone; requests in flight have no answer."""


class _Slot:
    """One request in flight: its reply, and the task waiting for it.

    Lighter than a ``trio.Event`` per request: the reader reschedules the waiting task.
    """

    __slots__ = ("done", "reply", "task")

    def __init__(self) -> None:
        self.done = False
        self.reply: Reply | None = None
        self.task: trio.lowlevel.Task | None = None

    def set(self) -> None:
        self.done = True
        task, self.task = self.task, None
        if task is not None:
            trio.lowlevel.reschedule(task)

    async def wait(self) -> None:
        if self.done:
            return
        self.task = trio.lowlevel.current_task()

        def abort(_raise_cancel: object) -> trio.lowlevel.Abort:
            self.task = None
            return trio.lowlevel.Abort.SUCCEEDED

        await trio.lowlevel.wait_task_rescheduled(abort)


class NBDClient:
    """One connection to an export.  Use :meth:`connect`, then the async request methods."""

    def __init__(
        self,
        stream: trio.abc.Stream,
        machine: ClientConnection,
        depth: int,
        xmit: XmitContext = contextlib.nullcontext,
    ) -> None:
        self._stream = stream
        self._xmit = xmit
        self._machine = machine
        # The queue depth (a semaphore, acquired as trio.Semaphore does) and the send lock:
        # both handed over to the next waiter, as trio's are, but the send lock costs no
        # scheduling round when it is free, so that a burst of requests is written out
        # in one round instead of each holding the lock across a round of its own.
        self._depth_free = depth
        self._depth_waiters = WaitQueue()
        self._send_lock = HandoffLock()
        self._slots: dict[int, _Slot] = {}
        self._cookies = itertools.count(1)
        self._closed = False
        self._failure: BaseException | None = None
        self.size = machine.size
        self.flags = machine.flags
        self.export_name = machine.export_name
        self.structured = machine.structured

    # -- connecting -----------------------------------------------------------------------
    @classmethod
    async def connect(
        cls,
        host: str,
        port: int,
        export: str = "",
        *,
        depth: int = 64,
        structured: bool = True,
        nursery: trio.Nursery,
    ) -> NBDClient:
        stream = await trio.open_tcp_stream(host, port)
        try:
            return await cls.over(
                stream, export, depth=depth, structured=structured, nursery=nursery
            )
        except BaseException:
            await trio.aclose_forcefully(stream)
            raise

    @classmethod
    async def over(
        cls,
        stream: trio.abc.Stream,
        export: str = "",
        *,
        depth: int = 64,
        structured: bool = True,
        nursery: trio.Nursery,
        xmit: XmitContext = contextlib.nullcontext,
    ) -> NBDClient:
        """Handshake on an open stream (TCP or an in-memory pair) and start the reader;
        requests are then sent in the ``xmit`` context (``nbd_xmit_context``)."""
        machine = ClientConnection()
        await _handshake(stream, machine, export, structured)
        client = cls(stream, machine, depth, xmit)
        # The name trio gives the plain Python method; compiled (make compiled), the method
        # has no qualified name for trio to read, and the task would be named by its repr.
        nursery.start_soon(client._reader, name="client.nbd_client.NBDClient._reader")
        return client

    # -- requests -------------------------------------------------------------------------
    async def read(self, offset: int, length: int) -> bytes:
        reply = await self._request(Cmd.READ, offset, length)
        assert reply.data is not None
        return reply.data

    async def write(self, offset: int, data: bytes, *, fua: bool = False) -> None:
        await self._request(Cmd.WRITE, offset, len(data), CmdFlags.FUA if fua else 0, data)

    async def flush(self) -> None:
        await self._request(Cmd.FLUSH, 0, 0)

    async def trim(self, offset: int, length: int) -> None:
        await self._request(Cmd.TRIM, offset, length)

    async def write_zeroes(self, offset: int, length: int, *, no_hole: bool = False) -> None:
        await self._request(Cmd.WRITE_ZEROES, offset, length, CmdFlags.NO_HOLE if no_hole else 0)

    async def request(
        self,
        command: int,
        offset: int = 0,
        length: int = 0,
        flags: int = 0,
        data: bytes | None = None,
    ) -> Reply:
        """Any request; the reply is returned whatever its error (no exception)."""
        return await self._request(command, offset, length, flags, data, check=False)

    async def _request(
        self,
        command: int,
        offset: int,
        length: int,
        flags: int = 0,
        data: bytes | None = None,
        *,
        check: bool = True,
    ) -> Reply:
        # trio.Semaphore.acquire: a cancellation point, then a place in the queue (handed
        # over by a finishing request) or a schedule point.
        await trio.lowlevel.checkpoint_if_cancelled()
        if self._depth_free:
            self._depth_free -= 1
            await trio.lowlevel.cancel_shielded_checkpoint()
        else:
            await self._depth_waiters.park()
        try:
            if self._closed:
                raise Disconnected(f"connection closed: {self._failure or 'by us'}")
            cookie = next(self._cookies)
            slot = _Slot()
            self._slots[cookie] = slot
            try:
                payload = self._machine.send(Request(cookie, command, offset, length, flags, data))
                try:
                    await self._send(payload)
                except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
                    # The send side may notice a dead connection before the reader does.
                    self._fail(exc)
                    raise Disconnected(f"connection lost while sending: {exc}") from exc
                await slot.wait()
            finally:
                self._slots.pop(cookie, None)
        finally:
            if self._depth_waiters:
                self._depth_waiters.unpark()
            else:
                self._depth_free += 1
        reply = slot.reply
        if reply is None:
            raise Disconnected(f"connection lost with request {cookie} in flight: {self._failure}")
        if check and reply.error:
            raise NBDError(
                f"{Cmd(command).name} {offset}+{length}: {_name(Errno, reply.error)} "
                f"{reply.message}".rstrip(),
                reply.error,
            )
        return reply

    async def _send(self, payload: bytes) -> None:
        """``send_all`` under the send lock (requests must not interleave on the wire)."""
        await self._send_lock.acquire()
        try:
            with self._xmit():  # nbd's sock_xmit: the sending task's flags, by era
                await self._stream.send_all(payload)
        finally:
            self._send_lock.release()

    async def _reader(self) -> None:
        machine = self._machine
        try:
            while True:
                event = machine.next_event()
                if event is NEED_DATA:
                    machine.receive_data(await self._stream.receive_some(RECEIVE_SIZE))
                    continue
                if isinstance(event, Reply):
                    slot = self._slots.get(event.cookie)
                    if slot is not None:
                        slot.reply = event
                        slot.set()
                elif isinstance(event, ConnectionClosed):
                    raise Disconnected("server closed the connection")
        except (ProtocolError, NBDError, trio.BrokenResourceError, trio.ClosedResourceError) as exc:
            self._fail(exc)

    def _fail(self, exc: BaseException) -> None:
        self._closed = True
        self._failure = exc
        for slot in self._slots.values():
            slot.set()

    @property
    def in_flight(self) -> int:
        return len(self._slots)

    async def close(self) -> None:
        """Send DISC (if still connected) and close the stream.  The stream is closed even
        when the DISC cannot be sent in time (the caller's deadline cancels a send stuck
        behind a full send buffer): a socket left open would keep its buffers forever."""
        try:
            if not self._closed:
                self._closed = True
                with contextlib.suppress(
                    trio.BrokenResourceError, trio.ClosedResourceError, ProtocolError
                ):
                    await self._send(self._machine.send(Request(0, Cmd.DISC)))
        finally:
            await self._stream.aclose()  # trio: closed even if cancelled


async def _handshake(
    stream: trio.abc.Stream, machine: ClientConnection, export: str, structured: bool
) -> TransmissionStarted:
    async def next_event() -> Any:
        while True:
            event = machine.next_event()
            if event is not NEED_DATA:
                return event
            machine.receive_data(await stream.receive_some(65536))

    greeting = await next_event()
    if not isinstance(greeting, Greeting):
        raise NBDError(f"unexpected {greeting!r} instead of a greeting")
    flags = ClientFlags.C_FIXED_NEWSTYLE
    if greeting.flags & HandshakeFlags.NO_ZEROES:
        flags |= ClientFlags.C_NO_ZEROES
    if not greeting.flags & HandshakeFlags.FIXED_NEWSTYLE:
        flags = ClientFlags(0)
        await stream.send_all(machine.send(Hello(flags)))
        await stream.send_all(machine.send(opt_export_name(export)))
        return await _expect_start(next_event)
    await stream.send_all(machine.send(Hello(flags)))

    async def option(req: OptionRequest) -> Any:
        await stream.send_all(machine.send(req))
        return await next_event()

    if structured:
        ev = await option(OptionRequest(Opt.STRUCTURED_REPLY))
        if not isinstance(ev, OptionAck | OptionError):
            raise RemoteProtocolError(f"unexpected {ev!r} after STRUCTURED_REPLY")
    await stream.send_all(machine.send(opt_go(export, [Info.BLOCK_SIZE])))
    while True:
        ev = await next_event()
        if isinstance(ev, TransmissionStarted):
            return ev
        if isinstance(ev, OptionError):
            if ev.reply == Rep.ERR_UNSUP:
                await stream.send_all(machine.send(opt_export_name(export)))
                return await _expect_start(next_event)
            raise NBDError(
                f"server refused export {export!r}: {_name(Rep, ev.reply)} {ev.message}".rstrip()
            )
        if isinstance(ev, ConnectionClosed):
            raise Disconnected("server closed the connection during the handshake")


def _name(enum_cls: Any, value: int) -> str:
    try:
        return str(enum_cls(value).name)
    except ValueError:
        return str(value)


async def _expect_start(next_event: Callable[[], Awaitable[Any]]) -> TransmissionStarted:
    ev = await next_event()
    if isinstance(ev, TransmissionStarted):
        return ev
    if isinstance(ev, ConnectionClosed):
        raise NBDError("server closed the connection: unknown export?")
    raise NBDError(f"unexpected {ev!r} instead of export data")


__all__ = ["Disconnected", "NBDClient", "NBDError"]
