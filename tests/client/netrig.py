"""A small client machine's network for the tests of client/net: ``Net`` and its helpers.

The machine: 1024 pages, min_free_kbytes 256 -> min 64, low 80, high 96; GFP_ATOMIC reaches
3/8·min = 24 (``free > 24``).  Its NIC (``client/net/device.py``) posts a ring of 32 buffers
of 2048 bytes -- 16 pages, two buffers a page -- when it opens; a packet carries at most an
MSS (1448 bytes) of data.  The link is infinitely fast and the softirq costs no time unless
a test says otherwise.  Its TCP sysctls are tcp_init's for 1024 pages unless a test gives
its own: tcp_mem [96, 128, 192] (nr_free_buffer_pages 928, /16 raised to 128),
tcp_wmem [4K, 16K, 64K], tcp_rmem [4K, 128K, 128K].
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import attrs
import trio
import trio.testing
from trio.testing import wait_all_tasks_blocked

from client.mm import GFP, GFP_NOIO, PAGE_SIZE, Memory, MemoryConfig, Page, Zone, current_task_flags
from client.net.device import NicSettings
from client.net.socket import ModelledSocket, SkbDropped
from client.net.stack import NetStack
from client.net.tcp import TcpSysctls
from client.policy import NonePolicy, Policy

NR_PAGES = 1024
RING = 32  # buffers
RING_PAGES = 16
MSS = 1448


# -- helpers ------------------------------------------------------------------------------


@attrs.define
class Net:
    memory: Memory
    stack: NetStack
    policy: Policy
    facts: list[object]
    held: list[Page] = attrs.field(factory=list)

    @property
    def wmark_min(self) -> int:
        return self.memory.zones[0].watermarks.min

    @property
    def atomic_floor(self) -> int:
        """3/8·min: a GFP_ATOMIC allocation needs ``free > atomic_floor``
        (__zone_watermark_ok: ALLOC_HIGH halves min, ALLOC_HARDER takes a further quarter)."""
        wmin = self.wmark_min
        wmin -= wmin // 2
        wmin -= wmin // 4
        return wmin

    def hold_until(self, target: int) -> None:
        """Take pages off the free list (fast path while it allows, then directly) until
        ``nr_free_pages == target``; give held pages back if free is below ``target``."""
        memory = self.memory
        while memory.nr_free_pages > target:
            page = memory.allocator.try_alloc() or _fullest(memory).take()
            self.held.append(page)
        while memory.nr_free_pages < target:
            memory.free_page(self.held.pop())

    def release(self) -> None:
        while self.held:
            self.memory.free_page(self.held.pop())

    def drops(self, sock: str, reason: str) -> list[SkbDropped]:
        return [
            f
            for f in self.facts
            if isinstance(f, SkbDropped) and f.sock == sock and f.reason == reason
        ]

    @property
    def device(self) -> Any:
        return self.stack.device

    async def opened(self) -> int:
        """Bring the device up and let it post its ring; the free pages then."""
        self.stack.up()
        await wait_all_tasks_blocked()
        return self.memory.nr_free_pages

    def socket(self, name: str, kind: str, **kw: Any) -> tuple[ModelledSocket, trio.abc.Stream]:
        """A modelled socket on one end of an in-memory pair; the other end is the peer."""
        ours, peer = trio.testing.memory_stream_pair()
        return self.stack.socket(ours, name, kind, **kw), peer


def _fullest(memory: Memory) -> Zone:
    return max(memory.zones, key=lambda z: z.nr_free)


MakeNet = Callable[..., Net]


def net_factory(nursery: trio.Nursery) -> MakeNet:
    """``make_net(policy=None, tcp=None, **nic)``: a ``Net`` whose stack runs in
    ``nursery``; ``tcp`` replaces the sysctls tcp_init would compute."""

    def make(policy: Policy | None = None, tcp: TcpSysctls | None = None, **nic: Any) -> Net:
        policy = NonePolicy() if policy is None else policy
        facts: list[object] = []
        memory = Memory(MemoryConfig(total_bytes=NR_PAGES * PAGE_SIZE), policy=policy)
        settings = {"ring_size": RING, "bandwidth": math.inf, "softirq_cost": 0.0, **nic}
        stack = NetStack(
            memory, policy, nursery, observer=facts.append, nic=NicSettings(**settings), tcp=tcp
        )
        return Net(memory, stack, policy, facts)

    return make


def record_allocations(memory: Memory) -> list[dict[str, Any]]:
    """Wrap ``memory.alloc_page`` (what the socket calls) to record every request."""
    calls: list[dict[str, Any]] = []
    real = memory.alloc_page

    async def alloc_page(gfp: GFP = GFP_NOIO, *, reserve: object | None = None) -> Page | None:
        call = {
            "gfp": gfp,
            "flags": current_task_flags(),
            "task": trio.lowlevel.current_task(),
            "time": trio.current_time(),
            "reserve": reserve,
        }
        calls.append(call)
        page = await real(gfp, reserve=reserve)
        call["page"] = page
        return page

    memory.alloc_page = alloc_page  # type: ignore[method-assign]
    return calls


def wait_of(memory: Memory, task_name: str) -> str | None:
    what = memory.waits.snapshot().get(task_name)
    return None if what is None else what.kind
