"""Facts: small frozen records the model hands to its observer (it never logs).

``testbed/log.py`` turns them into namespaced structlog events (``alloc.failed``, ...): the
``event`` class attribute names the event each fact becomes, ``level`` its level, its attrs
fields are the event's fields, and its docstring says when it happens (docs/events.md
documents each; tests/test_events_doc.py checks it against the classes).  The facts of the
rest of the client (the network stack, the swap device, faults, samples) derive from
:class:`Fact` too.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import ClassVar

import attrs

from client.mm.gfp import alloc_flags_names, gfp_names, gfp_t, task_flags_names

# Flags fields are plain ``int``s in a fact; ``metadata["render"]`` names their bits for a
# log (``testbed/log.py``).
_GFP = {"render": gfp_names}
_ALLOC_FLAGS = {"render": alloc_flags_names}
_TASK_FLAGS = {"render": task_flags_names}
#: A field with this metadata is a dict of extra fields, merged into the event.
FLATTEN = {"flatten": True}


@attrs.frozen
class Fact:
    """Base of every fact of the client (never emitted itself: it names no event)."""

    event: ClassVar[str]
    #: The log level: "info", or "debug" for the high-volume facts (one per page).
    level: ClassVar[str] = "info"


@attrs.frozen
class AllocFailed(Fact):
    """An allocation returned no page (``warn_alloc``; counted as ``alloc_fail``)."""

    event: ClassVar[str] = "alloc.failed"
    level: ClassVar[str] = "debug"
    gfp: gfp_t = attrs.field(metadata=_GFP)
    alloc_flags: int = attrs.field(metadata=_ALLOC_FLAGS)
    task_flags: int = attrs.field(metadata=_TASK_FLAGS)
    order: int = 0


@attrs.frozen
class AllocEmergency(Fact):
    """A page was served below the min watermark (ALLOC_NO_WATERMARKS; ``page->pfmemalloc``)."""

    event: ClassVar[str] = "alloc.emergency"
    level: ClassVar[str] = "debug"
    gfp: gfp_t = attrs.field(metadata=_GFP)
    task_flags: int = attrs.field(metadata=_TASK_FLAGS)
    zone: str
    nr_free: int  # free pages left in the zone after this one
    order: int = 0


@attrs.frozen
class KswapdWoken(Fact):
    """``wakeup_kswapd`` woke a sleeping kswapd because ``zone`` fell below low."""

    event: ClassVar[str] = "kswapd.woken"
    zone: str
    nr_free: int


@attrs.frozen
class KswapdSleep(Fact):
    """kswapd went back to sleep: ``balanced`` (all zones above high) or gave up."""

    event: ClassVar[str] = "kswapd.sleep"
    level: ClassVar[str] = "debug"
    balanced: bool
    nr_reclaimed: int


@attrs.frozen
class DirectReclaim(Fact):
    """One ``try_to_free_pages`` by an allocating task."""

    event: ClassVar[str] = "reclaim.direct"
    gfp: gfp_t = attrs.field(metadata=_GFP)
    nr_scanned: int
    nr_reclaimed: int


@attrs.frozen
class SwapWritepage(Fact):
    """A swap write request was submitted (``swap_writepage``, merged by the plug)."""

    event: ClassVar[str] = "swap.writepage"
    req: int
    slot: int
    nr_pages: int


@attrs.frozen
class SwapWritebackDone(Fact):
    """A swap write completed (``end_swap_bio_write``); ``error`` is None on success."""

    event: ClassVar[str] = "swap.writeback_done"
    req: int
    slot: int
    nr_pages: int
    error: str | None


@attrs.frozen
class SwapReadpage(Fact):
    """A swap read request was submitted (``swap_readpage`` for the faulting page and its
    readahead neighbours, merged by the plug); ``readahead`` of its pages were not asked
    for by the fault."""

    event: ClassVar[str] = "swap.readpage"
    level: ClassVar[str] = "debug"
    req: int
    slot: int
    nr_pages: int
    readahead: int


@attrs.frozen
class SwapReadDone(Fact):
    """A swap read completed (``end_swap_bio_read``); ``error`` is None on success."""

    event: ClassVar[str] = "swap.read_done"
    level: ClassVar[str] = "debug"
    req: int
    slot: int
    nr_pages: int
    error: str | None


@attrs.frozen
class OomKill(Fact):
    """The OOM killer chose a process and sent it SIGKILL (``__oom_kill_process``); its
    memory is freed later, when it exits (``oom.victim_exited``) or is reaped
    (``oom.reaped``)."""

    event: ClassVar[str] = "oom.kill"
    pid: int
    name: str
    rss: int
    swapents: int


@attrs.frozen
class OomReaped(Fact):
    """The oom_reaper unmapped the anonymous memory of a victim that had not exited
    ``OOM_REAPER_DELAY`` after it was chosen (mm/oom_kill.c ``oom_reap_task_mm``: "oom_reaper:
    reaped process ...")."""

    event: ClassVar[str] = "oom.reaped"
    pid: int
    name: str
    unmapped: int  # resident pages unmapped
    freed: int  # of those, pages freed now (the rest are under writeback or isolated)
    swapents: int  # swap entries dropped
    since_kill: float  # seconds from the choice to the reaping (run clock)


@attrs.frozen
class OomVictimExited(Fact):
    """An OOM victim's task reached exit and ``exit_mmap`` freed what the oom_reaper had not
    (everything, if it exits before the reaper runs)."""

    event: ClassVar[str] = "oom.victim_exited"
    pid: int
    name: str
    unmapped: int
    freed: int
    swapents: int
    since_kill: float


@attrs.frozen
class IntegrityFailure(Fact):
    """A page read back did not hold the bytes the workload expects."""

    event: ClassVar[str] = "mm.integrity_error"
    pid: int
    vpage: int


Observer = Callable[[Fact], None]


def drop(fact: Fact) -> None:
    """The default observer: facts go nowhere."""
