"""Facts of the modelled network stack: what the NIC, TCP and the sockets hand to the
observer (see :mod:`client.mm.facts`; docs/events.md documents each).

They live apart from the code that raises them, as the memory model's do, so that the
modules of the per-packet path hold no subclass of the ``Fact`` base: mypyc compiles those
modules (bench/compile_model.py), and attrs cannot derive a compiled class from an
interpreted one."""

from __future__ import annotations

from typing import ClassVar

import attrs

from client.mm.facts import Fact


@attrs.frozen
class SkbDropped(Fact):
    """A received packet dropped before its socket took it (a fact for the log)."""

    event: ClassVar[str] = "skb.dropped"
    sock: str
    reason: str  # "pfmemalloc" (sk_filter), "proto_mem" (tcp_data_queue) or "no_memory"
    what: str  # "data" or "ack"


@attrs.frozen
class AckDelayed(Fact):
    """An ACK could not be allocated; the delayed-ACK timer tries again (a fact for the log)."""

    event: ClassVar[str] = "tcp.ack_delayed"
    level: ClassVar[str] = "debug"
    sock: str
    retry: int  # icsk_ack.retry after this failure
    delay: float  # seconds until the timer tries again
    unacked: int  # bytes received and not yet acknowledged (rcv_nxt - rcv_wup)


@attrs.frozen
class TcpMemoryPressure(Fact):
    """TCP entered or left memory pressure (a fact for the log)."""

    event: ClassVar[str] = "tcp.memory_pressure"
    entered: bool  # True: tcp_enter_memory_pressure; False: tcp_leave_memory_pressure
    allocated: int  # tcp_memory_allocated then, pages (the global counter)
    tcp_mem: tuple[int, int, int]  # pages: low, pressure, high


@attrs.frozen
class RefillFailed(Fact):
    """A refill of the receive ring got fewer buffers than it wanted (a fact for the log)."""

    event: ClassVar[str] = "nic.refill_failed"
    device: str
    context: str  # "napi" (GFP_ATOMIC, softirq) or "refill_work" (GFP_KERNEL, a worker)
    posted: int  # buffers in the ring after the attempt
    wanted: int
