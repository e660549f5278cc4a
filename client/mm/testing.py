"""Test helpers: an in-memory swap device with latency and failure injection, page patterns,
draining the free lists.

Kept in the package (like ``trio.testing``) so that tests of other layers and benchmarks
can run the model without a server.
"""

from __future__ import annotations

import struct
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

import attrs
import trio

from client.mm.block import SwapIOError
from client.mm.page import PAGE_SIZE
from client.mm.process import Process

if TYPE_CHECKING:
    from client.mm.gfp import gfp_t
    from client.mm.memory import Memory
    from client.mm.page import Page


async def drain(memory: Memory, gfp: gfp_t) -> list[Page]:
    """Allocate with ``gfp`` until it fails; the pages taken."""
    pages = []
    while (page := await memory.alloc_page(gfp)) is not None:
        pages.append(page)
    return pages


@attrs.define(eq=False)
class DeviceRequest:
    """A request the device saw (for assertions)."""

    op: str  # "write" or "read"
    slot: int
    nr_pages: int
    failed: bool = False


@attrs.define(eq=False)
class MemorySwapDevice:
    """A swap device in a dict: each request sleeps ``latency`` seconds (use a virtual
    clock), then succeeds unless ``fail_write``/``fail_read`` says otherwise. Set ``gate``
    to an unset ``trio.Event`` to hold every request until it is set."""

    nr_pages: int
    latency: float = 0.001
    fail_write: Callable[[int, int], bool] = lambda slot, nr_pages: False
    fail_read: Callable[[int], bool] = lambda slot: False  # asked for each slot of a read
    gate: trio.Event | None = None
    slots: dict[int, bytes] = attrs.field(factory=dict, repr=False)
    log: list[DeviceRequest] = attrs.field(factory=list, repr=False)
    in_flight: int = 0
    max_in_flight: int = 0

    @property
    def size_bytes(self) -> int:
        return self.nr_pages * PAGE_SIZE

    async def _io(self) -> None:
        self.in_flight += 1
        self.max_in_flight = max(self.max_in_flight, self.in_flight)
        try:
            if self.gate is not None:
                await self.gate.wait()
            await trio.sleep(self.latency)
        finally:
            self.in_flight -= 1

    async def write(self, slot_start: int, pages: Sequence[memoryview]) -> None:
        if slot_start <= 0 or slot_start + len(pages) > self.nr_pages:
            raise ValueError(f"write of {len(pages)} pages at slot {slot_start} out of range")
        request = DeviceRequest("write", slot_start, len(pages))
        self.log.append(request)
        await self._io()
        if self.fail_write(slot_start, len(pages)):
            request.failed = True
            raise SwapIOError(f"injected write error at slot {slot_start}")
        for i, view in enumerate(pages):
            self.slots[slot_start + i] = bytes(view)

    async def read(self, slot_start: int, into: Sequence[memoryview]) -> None:
        if slot_start <= 0 or slot_start + len(into) > self.nr_pages:
            raise ValueError(f"read of {len(into)} pages at slot {slot_start} out of range")
        slots = range(slot_start, slot_start + len(into))
        request = DeviceRequest("read", slot_start, len(into))
        self.log.append(request)
        await self._io()
        if any(self.fail_read(slot) for slot in slots):
            request.failed = True
            raise SwapIOError(f"injected read error at slot {slot_start}")
        for slot, view in zip(slots, into, strict=True):
            view[:] = self.slots.get(slot, bytes(PAGE_SIZE))

    def reads(self) -> list[DeviceRequest]:
        return [r for r in self.log if r.op == "read"]

    def writes(self) -> list[DeviceRequest]:
        return [r for r in self.log if r.op == "write"]


def pattern_content(process: Process, vpage: int) -> bytes:
    """A page's worth of bytes unique to (pid, vpage): a verifiable workload pattern."""
    return struct.pack("<QQ", process.pid, vpage) * (PAGE_SIZE // 16)


def versioned_content(version: int) -> Callable[[Process, int], bytes]:
    """Like ``pattern_content`` with a version number, for workloads that rewrite pages."""

    def content(process: Process, vpage: int) -> bytes:
        return struct.pack("<QQQQ", process.pid, vpage, version, 0) * (PAGE_SIZE // 32)

    return content
