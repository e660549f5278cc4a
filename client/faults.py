"""Faults injected into the client machine, in the kernel's style.

``fail_page_alloc`` follows Documentation/fault-injection/fault-injection.rst: the decision
is ``should_fail_ex`` (lib/fault-inject.c) behind the filters of
``__should_fail_alloc_page`` (mm/fail_page_alloc.c), checked in this order:

* ``__GFP_NOFAIL`` allocations never fail;
* the gfp filter (the kernel has two switches, ``ignore-gfp-wait`` and
  ``ignore-gfp-highmem``; here one name picks the allocations that may fail, see
  ``GFP_FILTERS``);
* ``probability`` 0 never fails; the task filter (the kernel marks tasks with
  ``/proc/<pid>/make-it-fail``; here a substring of the trio task's name: ``hog/0``,
  ``nbd0.rx``, ``kswapd0``, ...); ``times`` 0 never fails;
* ``space``: "failure injection is suppressed until space reaches zero", each call spending
  its size (``PAGE_SIZE``);
* ``interval``: with ``interval > 1`` only every interval-th call that got this far may fail;
* ``probability`` (0..1 here, a percentage in the kernel): the draw, from a ``random.Random``
  seeded by the run's seed, so a run is reproducible;
* a failure spends one of ``times`` unless it is -1.

The allocator consults ``Allocator.fail_page_alloc`` before its fast path, as
``prepare_alloc_pages`` does; an injected failure then counts and reports like any failed
allocation (``alloc_fail``, ``AllocFailed``), and ``ClientFaults`` adds a ``FaultFired`` fact.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from typing import Any, ClassVar

import attrs
import trio

from client.config import GFP_FILTER_NAMES, AllocFaultConfig
from client.mm import GFP, PAGE_SIZE, Memory, gfp_names, gfp_t
from client.mm.facts import FLATTEN, Fact

#: Which allocations each ``gfp`` filter name lets a fault fail.
GFP_FILTERS: dict[str, Callable[[gfp_t], bool]] = {
    "any": lambda gfp: True,
    # GFP_ATOMIC (__GFP_ATOMIC, 4.x-6.2): RX skbs at device level, interrupt context.
    "atomic": lambda gfp: bool(gfp & GFP.ATOMIC),
    # The kernel's default ignore-gfp-wait=Y: only allocations that cannot sleep.
    "nowait": lambda gfp: not gfp & GFP.DIRECT_RECLAIM,
    # Only allocations that may sleep and reclaim: user pages, TX buffers (GFP_NOIO).
    "wait": lambda gfp: bool(gfp & GFP.DIRECT_RECLAIM),
    # Only __GFP_HIGHMEM allocations: user pages (GFP_HIGHUSER*).
    "highmem": lambda gfp: bool(gfp & GFP.HIGHMEM),
    # The kernel's default ignore-gfp-highmem=Y: everything but user pages.
    "nohighmem": lambda gfp: not gfp & GFP.HIGHMEM,
}
assert tuple(GFP_FILTERS) == GFP_FILTER_NAMES, "client.config names the same filters"

#: The kinds of fault the client counts (the summary lists each, fired or not).
FAULT_KINDS = ("alloc", "latency", "reset")


@attrs.frozen
class FaultFired(Fact):
    """An injected fault took effect: an allocation failed, the swap connection's latency
    changed, the swap connection was cut.  ``detail`` holds the kind's own fields."""

    event: ClassVar[str] = "fault.fired"
    kind: str
    # An injected allocation failure's ``gfp`` is a plain int: the log names its bits.
    detail: dict[str, Any] = attrs.field(
        factory=dict, metadata={**FLATTEN, "render": {"gfp": gfp_names}}
    )


@attrs.frozen
class FaultsCleared(Fact):
    """Every client fault was removed (the swap latency is the scenario's again)."""

    event: ClassVar[str] = "fault.cleared"
    alloc_fired: int


def _current_task_name() -> str:
    return trio.lowlevel.current_task().name


class FailPageAlloc:
    """One ``fail_page_alloc`` setting; call it with an allocation's gfp: fail it or not."""

    def __init__(
        self,
        config: AllocFaultConfig,
        rng: random.Random,
        *,
        on_fail: Callable[[gfp_t, str], None] = lambda gfp, task: None,
        task_name: Callable[[], str] = _current_task_name,
    ) -> None:
        self.config = config
        self._rng = rng
        self._on_fail = on_fail
        self._task_name = task_name
        self._wants = GFP_FILTERS[config.gfp]
        self.times = config.times  # attr->times, counted down
        self.space = config.space  # attr->space, in bytes
        self.count = 0  # attr->count: calls that reached the interval check
        self.fired = 0

    def __call__(self, gfp: gfp_t) -> bool:
        """``__should_fail_alloc_page(gfp, 0)``: True means "fail this allocation"."""
        if gfp & GFP.NOFAIL or not self._wants(gfp):
            return False
        config = self.config
        if config.probability == 0:  # "No need to check any other properties"
            return False
        task = ""
        if config.task is not None:
            task = self._task_name()
            if config.task not in task:
                return False
        if self.times == 0:
            return False
        if self.space > PAGE_SIZE:
            self.space -= PAGE_SIZE
            return False
        if config.interval > 1:
            self.count += 1
            if self.count % config.interval:
                return False
        # "if (attr->probability <= get_random_u32_below(100)) return false", in 0..1.
        if self._rng.random() >= config.probability:
            return False
        if self.times != -1:
            self.times -= 1
        self.fired += 1
        self._on_fail(gfp, task or self._task_name())
        return True

    def report(self) -> dict[str, Any]:
        return {**attrs.asdict(self.config), "fired": self.fired, "times_left": self.times}


class ClientFaults:
    """The faults of one client machine: what is set, and how often each kind fired.

    ``fail_page_alloc`` is installed here (on the machine's allocator); the machine applies
    latency and reset to its swap connection and reports them with ``fired``.
    """

    def __init__(
        self, memory: Memory, *, seed: int = 0, observer: Callable[[object], None]
    ) -> None:
        self._memory = memory
        self._seed = seed
        self._observer = observer
        self.counts: dict[str, int] = dict.fromkeys(FAULT_KINDS, 0)
        self.alloc: FailPageAlloc | None = None
        self.latency: float | None = None  # seconds, replacing the scenario's swap.latency
        self._settings = 0
        #: Tasks whose last allocation failure was injected (for the page-fault retry).
        self._injected: set[str] = set()

    def fired(self, kind: str, **detail: Any) -> None:
        """Count a fault of ``kind`` and tell the observer."""
        self.counts[kind] += 1
        self._observer(FaultFired(kind, detail))

    def set_alloc(self, config: AllocFaultConfig) -> FailPageAlloc:
        """Install ``fail_page_alloc`` (replacing any previous one).  Each setting draws
        from its own generator, seeded by the run's seed and how many came before."""
        self._settings += 1
        rng = random.Random(self._seed * 1_000_003 + self._settings)
        fault = FailPageAlloc(config, rng, on_fail=self._alloc_failed)
        self.alloc = fault
        self._memory.allocator.fail_page_alloc = fault
        return fault

    def _alloc_failed(self, gfp: gfp_t, task: str) -> None:
        assert self.alloc is not None
        self._injected.add(task)
        self.fired("alloc", gfp=gfp, task=task, nth=self.alloc.fired)

    def take_injected(self, task: str) -> bool:
        """Did an injected failure hit ``task`` since it last asked?  (A page fault whose
        allocation failed that way is retried, as the kernel retries a VM_FAULT_OOM fault.)"""
        if task in self._injected:
            self._injected.discard(task)
            return True
        return False

    def clear(self) -> None:
        """Remove every client fault."""
        fired = self.alloc.fired if self.alloc is not None else 0
        self.alloc = None
        self._memory.allocator.fail_page_alloc = None
        self.latency = None
        self._injected.clear()
        self._observer(FaultsCleared(fired))

    def report(self) -> dict[str, Any]:
        """``{"fired": {kind: n}, "active": {...}}`` for the summary and ``status``."""
        active: dict[str, Any] = {}
        if self.alloc is not None:
            active["alloc"] = self.alloc.report()
        if self.latency is not None:
            active["latency_ms"] = round(self.latency * 1000, 6)
        return {"fired": dict(self.counts), "active": active}
