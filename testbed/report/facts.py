"""What a report says about one run (:class:`RunFacts`): read from its typed summary
(:class:`client.summary.RunSummary`) where the run has one, else from its ``vm.sample``
events (a run whose process was killed); None where the log does not say.

``netswap report --json`` is :func:`facts_json` of these records (cattrs), and the text
report renders them (:mod:`testbed.report.render`).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import attrs
import cattrs

from client.summary import RunSummary, ZoneSummary, unstructure_verdict
from testbed.report.log import Run, number, whole

#: The ``/proc/vmstat`` counters a report shows, in this order.
VMSTAT_KEYS = (
    "pswpout",
    "pswpin",
    "swap_ra",
    "swap_ra_hit",
    "pgscan_kswapd",
    "pgscan_direct",
    "pgsteal_kswapd",
    "pgsteal_direct",
    "allocstall",
    "pgscan_direct_throttle",
    "oom_kill",
    "alloc_fail",
    "alloc_emergency",
)

#: vmstat counters a ``vm.sample`` also carries: sample field -> vmstat name.
SAMPLE_VMSTAT = {
    "pswpout": "pswpout",
    "pswpin": "pswpin",
    "allocstall": "allocstall",
    "throttled": "pgscan_direct_throttle",
}


# -- watermarks -----------------------------------------------------------------------------


@attrs.frozen
class Watermarks:
    """A zone's ``min``/``low``/``high`` watermarks in pages (or their sum over zones)."""

    min: int
    low: int
    high: int

    @property
    def atomic_floor(self) -> int:
        return atomic_floor(self.min)

    def where(self, free: int) -> str:
        """Where ``free`` pages stand against these watermarks, in the kernel's terms."""
        if free < self.atomic_floor:
            return "below 3/8 min, the GFP_ATOMIC floor"
        if free < self.min:
            return "below min"
        if free < self.low:
            return "below low"
        if free < self.high:
            return "below high"
        return "above high"

    def as_dict(self) -> dict[str, int]:
        return {"min": self.min, "low": self.low, "high": self.high}


def atomic_floor(wmin: int) -> int:
    """How far below ``min`` a GFP_ATOMIC allocation may go: ``__zone_watermark_ok`` takes
    ``min -= min/2`` for ALLOC_HIGH, then ``min -= min/4`` for ALLOC_HARDER (3/8 of min)."""
    wmin -= wmin // 2
    wmin -= wmin // 4
    return wmin


def sample_watermarks(zones: object) -> Watermarks | None:
    """The watermarks of a sample's ``zones`` list (or a summary's zones), summed over the
    zones.

    netswap compares the machine's total free pages with the sum of its zones' watermarks:
    exact for the one-zone machines of the scenarios, an approximation for several zones
    (the kernel checks each zone on its own).
    """
    if not isinstance(zones, list) or not zones:
        return None
    total = {"min": 0, "low": 0, "high": 0}
    for zone in zones:
        if isinstance(zone, ZoneSummary):
            zone = {"min": zone.min, "low": zone.low, "high": zone.high}
        if not isinstance(zone, dict):
            return None
        for key in total:
            value = whole(zone.get(key))
            if value is None:
                return None
            total[key] += value
    return Watermarks(**total)


# -- the facts ------------------------------------------------------------------------------


@attrs.frozen
class SampleSpan:
    count: int
    t_first: float | None
    t_last: float | None


@attrs.frozen
class VmstatFacts:
    source: str | None  # "summary", "samples" (last - first), or None
    counters: dict[str, int | None]


@attrs.frozen
class FreePages:
    lowest: int | None  # the lowest seen: the machine's own 10 ms tracking or a sample
    lowest_sampled: int | None
    highest_sampled: int | None
    at_end: int | None
    watermarks: Watermarks | None  # in force when free pages were lowest
    atomic_floor: int | None
    watermarks_at_end: Watermarks | None
    zones: int | None


@attrs.frozen
class PsiFigures:
    avg10: float | None
    avg60: float | None
    avg300: float | None
    total_us: float | None


@attrs.frozen
class PsiFacts:
    some: PsiFigures
    full: PsiFigures
    source: str | None


@attrs.frozen
class ReserveFacts:
    peak: int | None
    reserve_used_max: int | None
    nr_emergency_max: int | None
    reserve_info: list[Any] | None
    policy_report: dict[str, Any]  # the policy's other figures, by name


@attrs.frozen
class DropFacts:
    PFMemallocDrop: int | None  # netstat's name
    rx_alloc_fail: int | None
    drops: int | None


@attrs.frozen
class SocketFacts:
    """One socket, from the summary: the ring buffers it still held, what it refused."""

    name: str
    memalloc: bool | None
    rx_bufs: int | None  # ring buffers holding data not yet read
    rcvq_drop: int | None  # TCPRcvQDrop: data tcp_data_queue could not charge
    pfmemalloc_drop: int | None


@attrs.frozen
class NetFacts:
    """Who held the network's memory.  The state (``ring_posted`` .. ``tcp_memory_pressure``)
    is the last ``vm.sample``'s, at ``t``: the summary's is taken after the swap connection
    and the ring were closed.  The peaks, failures, limits and sockets are the summary's.
    None: not in the log (older logs, kernel runs)."""

    t: float | None
    ring_posted: int | None
    ring_pages: int | None
    rx_queued: int | None
    tx_pages: int | None
    tcp_memory_allocated: int | None
    tcp_memory_pressure: bool | None
    device: str | None
    ring_pages_peak: int | None
    refill_failed: int | None
    tcp_mem: tuple[int, ...] | None
    sockets: tuple[SocketFacts, ...]


@attrs.frozen
class IntegrityFacts:
    pages_written: int | None
    pages_verified: int | None
    corrupt: int | None


@attrs.frozen
class DeadlockFacts:
    cycle: list[str]
    has_cycle: bool
    description: str
    stalled_for: float | None
    waiting: dict[str, str]


@attrs.frozen
class RunFacts:
    """Everything a report says about a run."""

    index: int
    machine: str
    policy: str
    transport: Any
    memory_bytes: int | None
    description: Any
    outcome: str
    reason: str
    duration: float | None
    duration_source: str | None
    ended_at: float | None
    ended_at_source: str | None
    wall_seconds: float | None
    samples: SampleSpan
    events: dict[str, int]
    vmstat: VmstatFacts
    free_pages: FreePages
    psi: PsiFacts
    reserve: ReserveFacts
    net: DropFacts
    #: None when neither the samples nor the summary say anything of the ring.
    network: NetFacts | None
    throttled: int | None
    integrity: IntegrityFacts
    deadlock: DeadlockFacts | None


_converter = cattrs.Converter()


def facts_json(facts: RunFacts) -> dict[str, Any]:
    """The JSON-able form (``netswap report --json``'s runs)."""
    out: dict[str, Any] = _converter.unstructure(facts)
    return out


def run_facts(run: Run) -> RunFacts:
    """What the log tells about ``run``."""
    s = run.result
    samples = run.samples
    first, last = (samples[0], samples[-1]) if samples else ({}, {})
    times = [t for t in (number(x.get("t")) for x in samples) if t is not None]

    # Counters: the summary's (since the machine started), else last minus first sample.
    counters: dict[str, int | None]
    if s is not None and s.vmstat is not None:
        vmstat = s.vmstat
        counters = {k: vmstat.get(k) for k in VMSTAT_KEYS}
        counter_source: str | None = "summary"
    else:
        by_vmstat = {v: k for k, v in SAMPLE_VMSTAT.items()}
        counters = {
            k: _delta(first, last, by_vmstat[k]) if k in by_vmstat else None for k in VMSTAT_KEYS
        }
        counter_source = "samples" if samples else None
    duration_source = None
    if s is not None and s.duration is not None:
        duration_source = "summary"
    elif times:
        duration_source = "samples"

    return RunFacts(
        index=run.index,
        machine=run.machine,
        policy=run.policy,
        transport=run.start.get("transport"),
        memory_bytes=whole(run.start.get("memory")),
        description=run.start.get("description"),
        outcome=run.outcome,
        reason=run.reason,
        duration=run.duration,
        duration_source=duration_source,
        ended_at=run.end_time,
        ended_at_source=_end_source(run),
        wall_seconds=s.wall_seconds if s is not None else None,
        samples=SampleSpan(
            count=len(samples),
            t_first=times[0] if times else None,
            t_last=times[-1] if times else None,
        ),
        events=dict(run.events),
        vmstat=VmstatFacts(counter_source, counters),
        free_pages=_free_pages(run, s),
        psi=_psi(s, last),
        reserve=_reserve(samples, s),
        net=_net(s, first, last),
        network=_network(s, last),
        throttled=counters["pgscan_direct_throttle"],
        integrity=_integrity(s, first, last),
        deadlock=_deadlock(run, s),
    )


def _end_source(run: Run) -> str | None:
    """Where :attr:`Run.end_time` comes from."""
    if run.deadlock is not None and number(run.deadlock.get("t")) is not None:
        return "watchdog.deadlock"
    if run.outcome == "deadlock" and run.last_t is not None:
        return "last sample"
    if run.result is not None and run.result.duration is not None:
        return "summary"
    return "last sample" if run.last_t is not None else None


def _delta(first: Mapping[str, Any], last: Mapping[str, Any], field: str) -> int | None:
    a, b = whole(first.get(field)), whole(last.get(field))
    return None if a is None or b is None else b - a


def _free_pages(run: Run, s: RunSummary | None) -> FreePages:
    free = [(n, x) for x in run.samples if (n := whole(x.get("nr_free_pages"))) is not None]
    lowest_sampled = min(free, key=lambda pair: pair[0]) if free else None
    tracked = s.min_free_pages if s is not None else None  # tracked every 10 ms
    candidates = [tracked] if tracked is not None else []
    if lowest_sampled is not None:
        candidates.append(lowest_sampled[0])
    zones_at_end = s.memory.zones if s is not None and s.memory is not None else None
    at_end = (s.vmstat or {}).get("nr_free_pages") if s is not None else None
    if at_end is None and free:
        at_end = free[-1][0]
    # The watermarks in force when free pages were lowest (a policy may move them: the
    # reserve policy raises min while its reserves exist), else the summary's at the end.
    end_marks = sample_watermarks(zones_at_end)
    marks = sample_watermarks(lowest_sampled[1].get("zones")) if lowest_sampled else None
    marks = marks or end_marks
    return FreePages(
        lowest=min(candidates) if candidates else None,
        lowest_sampled=lowest_sampled[0] if lowest_sampled else None,
        highest_sampled=max(n for n, _ in free) if free else None,
        at_end=at_end,
        watermarks=marks,
        atomic_floor=marks.atomic_floor if marks else None,
        watermarks_at_end=end_marks,
        zones=len(zones_at_end) if zones_at_end is not None else None,
    )


def _psi(s: RunSummary | None, last: Mapping[str, Any]) -> PsiFacts:
    psi = s.psi if s is not None else None
    figures: dict[str, PsiFigures] = {}
    for kind in ("some", "full"):
        line = psi.get(kind) if psi is not None else None
        if isinstance(line, dict):
            figures[kind] = PsiFigures(
                avg10=number(line.get("avg10")),
                avg60=number(line.get("avg60")),
                avg300=number(line.get("avg300")),
                total_us=number(line.get("total", line.get("total_us"))),
            )
        else:
            figures[kind] = PsiFigures(number(last.get(f"psi_{kind}_avg10")), None, None, None)
    source = "summary" if psi is not None else ("samples" if last else None)
    return PsiFacts(figures["some"], figures["full"], source)


def _reserve(samples: Sequence[Mapping[str, Any]], s: RunSummary | None) -> ReserveFacts:
    used = [n for x in samples if (n := whole(x.get("reserve_used"))) is not None]
    emergency = [n for x in samples if (n := whole(x.get("nr_emergency"))) is not None]
    report = (s.policy_report if s is not None else None) or {}
    peak = whole(report.get("reserve_peak"))
    if peak is None and s is None and used and max(used) > 0:
        peak = max(used)
    info = report.get("reserve_info")
    return ReserveFacts(
        peak=peak,
        reserve_used_max=max(used) if used else None,
        nr_emergency_max=max(emergency) if emergency else None,
        reserve_info=info if isinstance(info, list) else None,
        policy_report={
            k: v for k, v in sorted(report.items()) if k not in ("reserve_info", "reserve_peak")
        },
    )


def _net(s: RunSummary | None, first: Mapping[str, Any], last: Mapping[str, Any]) -> DropFacts:
    if s is not None and s.net is not None:
        pfmemalloc, rx_fail = whole(s.net.get("PFMemallocDrop")), whole(s.net.get("rx_alloc_fail"))
        return DropFacts(pfmemalloc, rx_fail, (pfmemalloc or 0) + (rx_fail or 0))
    # vm.sample's drops is PFMemallocDrop + rx_alloc_fail together.
    return DropFacts(None, None, _delta(first, last, "drops"))


def _network(s: RunSummary | None, last: Mapping[str, Any]) -> NetFacts | None:
    net = s.net if s is not None and isinstance(s.net, dict) else {}
    nic = net.get("nic")
    nic = nic if isinstance(nic, dict) else {}
    tcp = net.get("tcp")
    tcp = tcp if isinstance(tcp, dict) else {}
    sampled = "ring_posted" in last
    if not sampled and not nic:
        return None  # a log from before the model had a ring, or a kernel run
    sockets = tuple(
        SocketFacts(
            name=str(sock.get("name", "?")),
            memalloc=sock["memalloc"] if isinstance(sock.get("memalloc"), bool) else None,
            rx_bufs=whole(sock.get("rx_bufs")),
            rcvq_drop=whole(sock.get("rcvq_drop")),
            pfmemalloc_drop=whole(sock.get("pfmemalloc_drop")),
        )
        for sock in net.get("sockets") or ()
        if isinstance(sock, dict)
    )
    limits = tcp.get("tcp_mem")
    pressure = last.get("tcp_memory_pressure")
    return NetFacts(
        t=number(last.get("t")) if sampled else None,
        ring_posted=whole(last.get("ring_posted")),
        ring_pages=whole(last.get("ring_pages")),
        rx_queued=whole(last.get("rx_queued")),
        tx_pages=whole(last.get("tx_pages")),
        tcp_memory_allocated=whole(last.get("tcp_memory_allocated")),
        tcp_memory_pressure=pressure if isinstance(pressure, bool) else None,
        device=str(nic["name"]) if "name" in nic else None,
        ring_pages_peak=whole(nic.get("ring_pages_peak")),
        refill_failed=whole(nic.get("refill_failed")),
        tcp_mem=tuple(w for x in limits if (w := whole(x)) is not None)
        if isinstance(limits, list)
        else None,
        sockets=sockets,
    )


def _integrity(
    s: RunSummary | None, first: Mapping[str, Any], last: Mapping[str, Any]
) -> IntegrityFacts:
    if s is not None and s.integrity is not None:
        i = s.integrity
        return IntegrityFacts(i.pages_written, i.pages_verified, i.corrupt)
    return IntegrityFacts(None, _delta(first, last, "pages_verified"), None)


def _deadlock(run: Run, s: RunSummary | None) -> DeadlockFacts | None:
    """The summary's verdict, with the ``watchdog.deadlock`` event's fields over it."""
    merged: dict[str, Any] = {}
    if s is not None and s.deadlock is not None:
        merged.update(unstructure_verdict(s.deadlock))
    if run.deadlock is not None:
        merged.update({k: v for k, v in run.deadlock.items() if k not in ("machine", "policy")})
    if not merged:
        return None
    cycle = merged.get("cycle")
    path = [str(step) for step in cycle] if isinstance(cycle, list) else []
    waiting = merged.get("waiting")
    return DeadlockFacts(
        cycle=path,
        has_cycle=bool(merged.get("has_cycle", True)),
        description=" -> ".join(path),
        stalled_for=number(merged.get("stalled_for")),
        waiting=(
            {str(k): str(v) for k, v in sorted(waiting.items())}
            if isinstance(waiting, dict)
            else {}
        ),
    )
