"""The client machine's swap device: NBD over a real connection, that survives it breaking.

``NBDSwapDevice`` implements the model's ``SwapDevice`` (slot n = bytes n*4096..) on top of
:class:`client.nbd_client.NBDClient`:

* When the connection breaks (or a request outlives ``io_timeout``) it reconnects with
  back-off and resubmits every request that was in flight.  The model just sees a slow
  request, as the kernel's nbd driver makes a reconnect look to the block layer.
* **Stale writes are fenced in space, not in time.**  A write that was in flight on a dead
  connection has an unknown fate: the server may still execute it later, after a newer
  write to the same place (nbd.md §5 item 9, ydb-platform/nbs#7070).  No client can know
  when that danger has passed, so after a disconnect every slot whose write had an unknown
  fate is *remapped* to fresh physical space, and the old blocks are quarantined for
  ``quarantine_seconds`` (TCP's TIME_WAIT reasoning) before reuse.  The successor never
  lands where the stale write can.  The spare space for remapping is the part of the export
  beyond the swap area (``spare_pages``).
* An error *reply* (EIO, ENOSPC, ...) is not a disconnect: it raises ``SwapIOError`` and the
  model re-dirties the page, as ``end_swap_bio_write`` does.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Awaitable, Callable, Iterator, Sequence
from typing import Any, ClassVar

import attrs
import trio

from client.mm.block import SwapIOError
from client.mm.facts import Fact, Observer
from client.nbd_client import Disconnected, NBDClient, NBDError, nbd_xmit_context
from nbdproto import Errno, ProtocolError

PAGE = 4096

Connect = Callable[[], Awaitable[trio.abc.Stream]]


# -- facts for the observer: the NBD connection under the model, which sees only slow requests
@attrs.frozen
class SwapdevConnectionLost(Fact):
    """The swap connection broke, a request outlived ``io_timeout``, or the server answered
    ESHUTDOWN: the slots whose writes were in flight on it are fenced (remapped), and the
    device reconnects in the background."""

    event: ClassVar[str] = "swapdev.connection_lost"
    reason: str
    fenced_slots: int  # slots whose write was in flight, now remapped


@attrs.frozen
class SwapdevReconnectFailed(Fact):
    """One reconnection attempt failed; it is retried after ``retry_in`` seconds."""

    event: ClassVar[str] = "swapdev.reconnect_failed"
    error: str
    retry_in: float


@attrs.frozen
class SwapdevReconnected(Fact):
    """A new connection is up after a loss; the requests in flight are resubmitted on it."""

    event: ClassVar[str] = "swapdev.reconnected"
    connects: int  # connections made so far, the first one included


@attrs.frozen
class SwapdevFenceExhausted(Fact):
    """A slot had to be fenced but no spare block was left: it keeps its place, and
    correctness then depends on the server having finished the stale write."""

    event: ClassVar[str] = "swapdev.fence_exhausted"
    slot: int


@attrs.define
class DeviceStats:
    connects: int = 0
    reconnects: int = 0
    reconnect_failures: int = 0
    resubmitted: int = 0
    remapped_slots: int = 0
    quarantined_blocks: int = 0
    io_errors: int = 0
    timeouts: int = 0


class NBDSwapDevice:
    """Swap over NBD, with reconnect and stale-write fencing.  Run ``await run(nursery)``."""

    def __init__(
        self,
        connect: Connect,
        export: str,
        *,
        depth: int = 32,
        io_timeout: float = 30.0,
        spare_pages: int | None = None,
        quarantine_seconds: float = 30.0,
        observer: Observer = lambda _fact: None,
        structured: bool = True,
        nbd: str = "2.6.18",
    ) -> None:
        self._connect = connect
        #: The kernel era of drivers/block/nbd.c whose send context requests get
        #: (``nbd_xmit_context``; ``[swap] nbd``).
        self.nbd = nbd
        self._xmit = nbd_xmit_context(nbd)
        self.export = export
        self.depth = depth
        self.io_timeout = io_timeout
        self.quarantine_seconds = quarantine_seconds
        self._spare_request = spare_pages
        self._observer = observer
        self._structured = structured
        self.stats = DeviceStats()
        self._client: NBDClient | None = None
        self._epoch = 0
        self._nursery: trio.Nursery | None = None
        self._connected = trio.Event()
        self._reconnecting = False
        self._export_pages = 0
        self.swap_pages = 0  # the logical size the model sees
        self._remap: dict[int, int] = {}  # logical slot -> physical block, once remapped
        self._free_spare: deque[int] = deque()
        self._quarantine: deque[tuple[float, int]] = deque()  # (release time, block)
        self._inflight_writes: dict[int, set[int]] = {}  # epoch -> logical slots in flight

    # -- lifecycle ------------------------------------------------------------------------
    async def start(self, nursery: trio.Nursery) -> None:
        """Connect (the first connection must succeed) and size the device."""
        self._nursery = nursery
        await self._open()
        assert self._client is not None
        self._export_pages = self._client.size // PAGE
        spare = self._spare_request
        if spare is None:
            spare = min(max(self._export_pages // 16, 64), self._export_pages // 4)
        if spare >= self._export_pages - 2:
            raise ValueError(f"export of {self._export_pages} pages leaves no room for swap")
        self.swap_pages = self._export_pages - spare
        self._free_spare.extend(range(self.swap_pages, self._export_pages))

    @property
    def size_bytes(self) -> int:
        return self.swap_pages * PAGE

    @property
    def connected(self) -> bool:
        return self._client is not None

    async def close(self) -> None:
        client, self._client = self._client, None
        if client is not None:
            with trio.move_on_after(2):
                await client.close()

    async def _open(self) -> None:
        assert self._nursery is not None
        stream = await self._connect()
        try:
            self._client = await NBDClient.over(
                stream,
                self.export,
                depth=self.depth,
                structured=self._structured,
                nursery=self._nursery,
                xmit=self._xmit,
            )
        except BaseException:
            await trio.aclose_forcefully(stream)
            raise
        self.stats.connects += 1
        self._epoch += 1
        self._connected.set()

    def _lost(self, epoch: int, why: str) -> None:
        """The connection of ``epoch`` is gone: fence its writes, reconnect in background."""
        if epoch != self._epoch or self._client is None:
            return
        client, self._client = self._client, None
        self._connected = trio.Event()
        # Every write in flight on the dead connection may still land: remap those slots.
        slots = self._inflight_writes.pop(epoch, set())
        for slot in slots:
            self._fence(slot)
        self._observer(SwapdevConnectionLost(reason=why, fenced_slots=len(slots)))
        assert self._nursery is not None
        self._nursery.start_soon(self._reconnect, client)

    async def _reconnect(self, old: NBDClient) -> None:
        with trio.move_on_after(1):
            await old.close()
        delay = 0.05
        while self._client is None:
            try:
                await self._open()
            except (OSError, NBDError, ProtocolError, trio.BrokenResourceError) as exc:
                self.stats.reconnect_failures += 1
                self._observer(SwapdevReconnectFailed(error=str(exc), retry_in=delay))
                await trio.sleep(delay)
                delay = min(delay * 2, 2.0)
                continue
            self.stats.reconnects += 1
            self._observer(SwapdevReconnected(connects=self.stats.connects))

    # -- fencing --------------------------------------------------------------------------
    def _fence(self, slot: int) -> None:
        """Give ``slot`` a new physical block; quarantine the block a stale write may hit."""
        old = self._remap.get(slot, slot)
        self._release_quarantine()
        if not self._free_spare:
            # Out of spare blocks: keep the mapping; correctness then depends on the server
            # having finished the stale write, so say so loudly.
            self._observer(SwapdevFenceExhausted(slot=slot))
            return
        self._remap[slot] = self._free_spare.popleft()
        self._quarantine.append((trio.current_time() + self.quarantine_seconds, old))
        self.stats.remapped_slots += 1
        self.stats.quarantined_blocks += 1

    def _release_quarantine(self) -> None:
        now = trio.current_time()
        while self._quarantine and self._quarantine[0][0] <= now:
            # Whether it was spare or a home slot remapped away, a block out of quarantine
            # can no longer be hit by a stale write: it becomes spare.
            self._free_spare.append(self._quarantine.popleft()[1])

    def _physical(self, slot: int) -> int:
        return self._remap.get(slot, slot)

    # -- I/O --------------------------------------------------------------------------------
    async def write(self, slot_start: int, pages: Sequence[memoryview]) -> None:
        slots = range(slot_start, slot_start + len(pages))
        while True:
            client, epoch = await self._current()
            inflight = self._inflight_writes.setdefault(epoch, set())
            inflight.update(slots)
            try:
                targets = await self._timed(epoch, self._write_runs(client, slots, pages))
                remap = self._remap
                if not remap or all(
                    remap.get(s, s) == t for s, t in zip(slots, targets, strict=True)
                ):
                    return
                # Fenced while in flight: the reply came on the old connection, but the
                # slots were remapped before we saw it, so the data is at the old place
                # (now quarantined).  Write it again where the slots live now.
                self.stats.resubmitted += 1
                continue
            except (NBDError, _Timeout) as exc:
                self._retry_or_raise(epoch, exc)
            finally:
                inflight.difference_update(slots)

    async def _write_runs(
        self, client: NBDClient, slots: range, pages: Sequence[memoryview]
    ) -> list[int]:
        """One NBD WRITE per run of physically contiguous blocks (one, unless remapped).
        Returns the physical block each slot was written to."""
        if not pages:
            return []
        remap = self._remap
        if not remap or not any(slot in remap for slot in slots):
            # Nothing remapped: one write at the slots' home (the usual case).
            data = b"".join(pages) if len(pages) > 1 else bytes(pages[0])
            await client.write(slots[0] * PAGE, data)
            return list(slots)
        targets = [remap.get(slot, slot) for slot in slots]
        for start, end in _runs(targets):
            data = b"".join(pages[start:end]) if end - start > 1 else bytes(pages[start])
            await client.write(targets[start] * PAGE, data)
        return targets

    async def read(self, slot_start: int, into: Sequence[memoryview]) -> None:
        slots = range(slot_start, slot_start + len(into))
        while True:
            client, epoch = await self._current()
            try:
                await self._timed(epoch, self._read_runs(client, slots, into))
            except (NBDError, _Timeout) as exc:
                self._retry_or_raise(epoch, exc)
                continue
            return

    async def _read_runs(self, client: NBDClient, slots: range, into: Sequence[memoryview]) -> None:
        """One NBD READ per run of physically contiguous blocks (one, unless remapped)."""
        targets = [self._physical(slot) for slot in slots]
        for start, end in _runs(targets):
            data = await client.read(targets[start] * PAGE, (end - start) * PAGE)
            if end - start == 1:
                into[start][:] = data
                continue
            view = memoryview(data)
            for i in range(start, end):
                into[i][:] = view[(i - start) * PAGE : (i - start + 1) * PAGE]

    def _retry_or_raise(self, epoch: int, exc: NBDError | _Timeout) -> None:
        """A request failed: if the connection is gone (broken, timed out, or the server
        answered ESHUTDOWN, "the server is shutting down") mark it lost so that the caller
        resubmits on the next one; any other error reply is the device's I/O error."""
        if isinstance(exc, Disconnected | _Timeout) or exc.errno == Errno.ESHUTDOWN:
            self._lost(epoch, str(exc))
            self.stats.resubmitted += 1
            return
        self.stats.io_errors += 1
        raise SwapIOError(str(exc)) from exc

    async def _current(self) -> tuple[NBDClient, int]:
        while self._client is None:
            await self._connected.wait()
        return self._client, self._epoch

    async def _timed(self, epoch: int, request: Awaitable[Any]) -> Any:
        if math.isinf(self.io_timeout):
            return await request
        with trio.move_on_after(self.io_timeout):
            return await request
        self.stats.timeouts += 1
        raise _Timeout(f"request outlived io_timeout {self.io_timeout}s (epoch {epoch})")


class _Timeout(Exception):
    pass


def _runs(targets: Sequence[int]) -> Iterator[tuple[int, int]]:
    """(start, end) of each run of consecutive blocks in ``targets``."""
    start = 0
    while start < len(targets):
        end = start + 1
        while end < len(targets) and targets[end] == targets[start] + (end - start):
            end += 1
        yield start, end
        start = end
