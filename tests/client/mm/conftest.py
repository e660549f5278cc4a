"""Fixtures for the memory model: small machines with an in-memory swap device."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import attrs
import pytest

from client.mm import PAGE_SIZE, Fact, Memory, MemoryConfig, Process
from client.mm.testing import MemorySwapDevice


@attrs.define
class Machine:
    """A memory model, its swap device (if any) and the facts it emitted."""

    memory: Memory
    device: MemorySwapDevice | None
    facts: list[Fact]

    def facts_of(self, kind: type[Fact]) -> list[Any]:
        return [f for f in self.facts if isinstance(f, kind)]


MakeMachine = Callable[..., Machine]


@pytest.fixture
def make_machine() -> MakeMachine:
    """``make_machine(nr_pages, swap_pages=, latency=, oom_hook=, **MemoryConfig fields)``."""

    def make(
        nr_pages: int = 1024,
        *,
        swap_pages: int | None = None,
        latency: float = 0.001,
        oom_hook: Callable[[Process], None] | None = None,
        **config: Any,
    ) -> Machine:
        facts: list[Fact] = []
        memory = Memory(
            MemoryConfig(total_bytes=nr_pages * PAGE_SIZE, **config),
            observer=facts.append,
            oom_hook=oom_hook,
        )
        device = None
        if swap_pages is not None:
            device = MemorySwapDevice(nr_pages=swap_pages, latency=latency)
            memory.swapon(device)
        return Machine(memory, device, facts)

    return make
