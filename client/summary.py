"""What a run comes to: the machine's summary and the watchdog's deadlock verdict, as
records (``client/machine.py`` builds them; the harness logs, prints and compares them).

The JSON form is the one docs/events.md gives for ``run.summary`` and the ``--summary``
files: :func:`unstructure_summary` writes it and :func:`structure_summary` reads it back
(cattrs).  Reading is lenient where logs differ: a summary of an older netswap, or of a
real guest (``netswap kernel run``, ``policy = "kernel"``), lacks some of the model's
entries, and those read as None and are left out again when written.  The counter tables
(``vmstat``, ``net``, ``policy_report``, ...) stay mappings keyed by the kernel's names, as
``/proc/vmstat`` is.
"""

from __future__ import annotations

from typing import Any, ClassVar

import attrs
import cattrs
from cattrs.gen import make_dict_structure_fn

from client.mm.facts import Fact


@attrs.frozen
class Verdict:
    """The watchdog's deadlock verdict: the summary's ``deadlock``."""

    cycle: list[str] | None  # the wait-for path (a cycle when has_cycle); None: a guest's
    has_cycle: bool
    waiting: dict[str, str]  # task -> what it waits for
    stalled_for: float | None = None  # seconds without progress
    blocked_tasks: list[dict[str, Any]] | None = None  # a guest's (sysrq w)

    def chain(self) -> str:
        """The wait-for path as printed: ``a -> b -> a``, or, when the tasks wait in a chain
        that ends outside the machine rather than in a cycle (every retransmission of a
        reply dropped, say), the chain marked as such: no progress, but no deadlock proper."""
        path = " -> ".join(self.cycle or [])
        return path if self.has_cycle else f"{path} (no cycle: a stall)"

    def also_waiting(self) -> list[tuple[str, list[str]]]:
        """For each resource on the path (every other entry, from the second), the tasks off
        the path that wait for it too: the victims, such as kswapd when the path is the
        refill worker's, which the shortest cycle leaves out."""
        path = self.cycle or []
        on_path = set(path[0::2])
        return [
            (resource, tasks)
            for resource in dict.fromkeys(path[1::2])
            if (tasks := [t for t, w in self.waiting.items() if w == resource and t not in on_path])
        ]


@attrs.frozen
class ZoneSummary:
    """A zone at the end of the run (pages)."""

    name: str
    managed: int | None
    nr_free: int | None
    min: int | None
    low: int | None
    high: int | None


@attrs.frozen
class MemorySummary:
    total_pages: int
    min_free_kbytes: int | None
    zones: list[ZoneSummary]

    @property
    def min_watermark(self) -> int | None:
        """Σ min over the zones (None without zones)."""
        if not self.zones:
            return None
        return sum(z.min or 0 for z in self.zones)


@attrs.frozen
class IntegritySummary:
    """Pages written, verified and found corrupt (client/workload.py's ``Integrity``)."""

    pages_written: int | None
    pages_verified: int | None
    corrupt: int | None
    file_pages_verified: int | None = None
    steps: int | None = None


@attrs.frozen
class RunSummary:
    """One run of one machine under one policy (the ``run.summary`` event)."""

    machine: str
    policy: str
    outcome: str  # completed, deadlock, integrity_error, error
    reason: str
    duration: float | None  # seconds of the run's clock
    wall_seconds: float | None = None
    memory: MemorySummary | None = None
    vmstat: dict[str, int | None] | None = None
    slabinfo: list[dict[str, Any]] | None = None
    psi: dict[str, Any] | None = None
    integrity: IntegritySummary | None = None
    workloads: list[dict[str, Any]] | None = None
    swap_device: dict[str, Any] | None = None
    min_free_pages: int | None = None
    net: dict[str, Any] | None = None
    policy_report: dict[str, Any] | None = None
    deadlock: Verdict | None = None
    pressure: dict[str, Any] | None = None
    faults: dict[str, Any] | None = None
    # A guest's (testbed/kernel/run.py); a sweep or --seeds adds its seed.
    kernel: dict[str, Any] | None = None
    console_tail: list[str] | None = None
    trial: int | None = None
    seed: int | None = None

    @property
    def drops(self) -> int:
        """RX buffers dropped or never allocated: ``PFMemallocDrop`` + ``rx_alloc_fail``."""
        net = self.net or {}
        return (net.get("PFMemallocDrop") or 0) + (net.get("rx_alloc_fail") or 0)

    @property
    def reserve_peak(self) -> Any:
        """The reserve policy's peak charge, None for other policies."""
        return (self.policy_report or {}).get("reserve_peak")

    def counter(self, name: str) -> int:
        """A ``/proc/vmstat`` counter, 0 when absent."""
        return (self.vmstat or {}).get(name) or 0


@attrs.frozen
class MachineStatus:
    """A running machine now: the control endpoint's answer to ``status``."""

    machine: str
    policy: str
    outcome: str  # "running" until the run has ended
    reason: str
    t: float  # seconds since the run started
    workloads_done: bool
    sample: dict[str, Any]  # the ``vm.sample`` fact's fields
    vmstat: dict[str, int]
    psi: dict[str, Any]
    policy_report: dict[str, Any]
    integrity: IntegritySummary
    net: dict[str, Any]
    swap_device: dict[str, Any]
    pressure: dict[str, Any]
    faults: dict[str, Any]
    server_faults: dict[str, Any] | None = None  # a server in the same process


@attrs.frozen
class VmSample(Fact):
    """The machine at one instant, every ``run.sample_interval`` seconds: what a timeline
    plot needs (free pages against the watermarks, writeback, reserve use, drops)."""

    event: ClassVar[str] = "vm.sample"
    t: float  # seconds since the run started (the run's clock: virtual or real)
    nr_free_pages: int
    zones: list[dict[str, int | str]]  # name, free, min, low, high
    nr_writeback: int
    nr_file_pages: int  # clean page cache (reclaimable without I/O)
    nr_slab_unreclaimable: int  # pages held by slab caches (bios, skb heads, kmalloc)
    nr_emergency: int  # pages served below min still in use (reserve usage)
    reserve_used: int  # the reserve policy's charged pages (0 for other policies)
    pswpout: int
    pswpin: int
    allocstall: int
    drops: int  # RX buffers dropped or failed: PFMemallocDrop + rx_alloc_fail
    throttled: int  # pgscan_direct_throttle
    psi_some_avg10: float
    psi_full_avg10: float
    pages_verified: int
    # The network's memory now (0 before the stack is up): what holds the pages a reply
    # needs.  ``ring_posted``: buffers posted on the NIC's receive ring; ``ring_pages``:
    # pages holding ring buffers, posted or queued on sockets; ``rx_queued``: ring buffers
    # held by sockets' receive queues (data not yet read); ``tx_pages``: pages of TX skbs
    # not yet acknowledged; ``tcp_memory_allocated`` and ``tcp_memory_pressure``:
    # ``tcp_prot``'s pages (/proc/net/sockstat "mem") and its pressure flag.
    ring_posted: int = 0
    ring_pages: int = 0
    rx_queued: int = 0
    tx_pages: int = 0
    tcp_memory_allocated: int = 0
    tcp_memory_pressure: bool = False


#: Always written, even when None (the model's summary has ``"deadlock": null``).
_ALWAYS = frozenset({"machine", "policy", "outcome", "reason", "duration", "deadlock"})


def _converter() -> cattrs.Converter:
    conv = cattrs.Converter()

    def unstructure_omitting_none(cls: type) -> Any:
        """Fields in their order (cattrs's own hook would move omitted ones last), those
        that are None and optional left out."""
        names = [f.name for f in attrs.fields(cls)]
        optional = {f.name for f in attrs.fields(cls) if f.default is None} - _ALWAYS

        def unstructure(obj: Any) -> dict[str, Any]:
            out = {}
            for name in names:
                value = getattr(obj, name)
                if value is None and name in optional:
                    continue
                out[name] = conv.unstructure(value)
            return out

        return unstructure

    for cls in (Verdict, IntegritySummary, RunSummary, MachineStatus):
        conv.register_unstructure_hook(cls, unstructure_omitting_none(cls))
        conv.register_structure_hook(cls, make_dict_structure_fn(cls, conv))
    return conv


_CONVERTER = _converter()


def unstructure_summary(summary: RunSummary) -> dict[str, Any]:
    """The JSON-able form: the ``run.summary`` event's fields."""
    out: dict[str, Any] = _CONVERTER.unstructure(summary)
    return out


def structure_summary(fields: dict[str, Any]) -> RunSummary:
    """A summary read back from JSON (unknown keys ignored); ``ValueError`` (one line) if it
    is not one."""
    try:
        return _CONVERTER.structure(fields, RunSummary)
    except (cattrs.BaseValidationError, TypeError, ValueError, KeyError) as exc:
        raise ValueError(f"not a run summary: {exc}") from None


def unstructure_verdict(verdict: Verdict) -> dict[str, Any]:
    out: dict[str, Any] = _CONVERTER.unstructure(verdict)
    return out


def unstructure_status(status: MachineStatus) -> dict[str, Any]:
    """The JSON-able form: the fields of the control endpoint's ``status`` answer."""
    out: dict[str, Any] = _CONVERTER.unstructure(status)
    return out
