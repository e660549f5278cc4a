"""Pressure injected into a running machine through control (``netswap ctl hog``,
``flood``, ``release``): anonymous-memory hogs that write, verify and hold their pages, and
floods of noise traffic into new ordinary sockets.

``Pressure`` keeps what one machine was given and reports it; ``ClientMachine`` hands it
the nursery to run in once the machine runs (``require_running``).  ``HogMemory`` is also
what the scenario's own hogs see where allocation faults may be injected.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import attrs
import trio
import trio.testing

from client.config import HogConfig
from client.faults import ClientFaults
from client.mm import PAGE_SIZE, Memory, OutOfMemory, Process, ProcessKilled
from client.mm.alloc import CONGESTION_WAIT
from client.mm.memory import ContentFn
from client.net.noise import consume, flood
from client.net.socket import ModelledSocket
from client.net.stack import NOISE, NetStack
from client.workload import AnonHog, Integrity

#: Lameter's fileserver again: an injected flood's consumer reads this many bytes/s and
#: allocates a page for each page it reads (a slow consumer, as in swap-over-nbd.toml).
FLOOD_CONSUME_RATE = 256 * 1024
#: Bounds on what one ``inject_hog`` may ask for (the control protocol checks them too).
MAX_HOG_PAGES = 1 << 31
MAX_HOG_PROCESSES = 4096


class HogMemory:
    """What one ``AnonHog`` sees of the machine's memory (``config``, ``new_process``,
    ``touch``, ``exit_process``), with what the harness adds around its processes:

    * A page fault whose allocation an injected fault failed (``OutOfMemory`` from
      ``Memory.touch``, the model's VM_FAULT_OOM) is retried, as the kernel retries such a
      fault (5.16+, "mm, oom: do not trigger out_of_memory from the #PF":
      ``pagefault_out_of_memory`` returns and the task faults again); first it waits for a
      free page as the allocator's own retries do, so that a machine where every
      allocation fails stalls where the watchdog sees it instead of spinning.  A real
      OutOfMemory (nothing left to kill) is raised as before.
    * For injected hogs (``hold``): a process that finished its round keeps its memory
      until ``release()``; after ``release()`` each process still running exits at its
      next touch, as on SIGKILL.  Cancelling it instead could interrupt it inside reclaim,
      with pages isolated for writeback that would then never be written.
    """

    def __init__(self, memory: Memory, faults: ClientFaults, *, hold: bool = False) -> None:
        self.memory = memory
        self.config = memory.config
        self._faults = faults
        self._hold = hold
        self.processes: list[Process] = []
        self.held: list[Process] = []
        self.released = False
        self.exited_by_release = 0
        self.fault_retries = 0

    def new_process(self, name: str) -> Process:
        process = self.memory.new_process(name)
        self.processes.append(process)
        return process

    async def touch(
        self, process: Process, vpage: int, *, write: bool, content_fn: ContentFn
    ) -> None:
        if self.released:
            self._exit(process)
            self.exited_by_release += 1
            raise ProcessKilled(process.pid)
        task = trio.lowlevel.current_task().name
        self._faults.take_injected(task)  # only a failure injected from here on counts
        while True:
            try:
                await self.memory.touch(process, vpage, write=write, content_fn=content_fn)
                return
            except OutOfMemory:
                if not self._faults.take_injected(task):
                    raise
                self.fault_retries += 1
                await self.memory.allocator.wait_for_free_pages(CONGESTION_WAIT)

    def exit_process(self, process: Process) -> None:
        if self._hold and not self.released and not process.killed:
            self.held.append(process)
        else:  # a killed process exits whether held or not: its memory goes now
            self._exit(process)

    def _exit(self, process: Process) -> None:
        self.memory.exit_process(process)  # idempotent: exited already by release

    def exit_held(self, process: Process) -> None:
        """``process``, if it holds its memory here, exits now (it was killed)."""
        if process in self.held:
            self.held.remove(process)
            self._exit(process)

    def release(self) -> None:
        """End the hold: held processes exit now, running ones at their next touch."""
        self.released = True
        held, self.held = self.held, []
        for process in held:
            self._exit(process)

    @property
    def resident(self) -> int:
        return sum(p.rss for p in self.processes if not p.killed)

    @property
    def swapped(self) -> int:
        return sum(p.swapents for p in self.processes if not p.killed)


@attrs.define(eq=False)
class InjectedHog:
    """Anonymous-memory pressure injected into a running machine (``inject_hog``)."""

    id: str
    hog: AnonHog
    memory: HogMemory
    rate: float | None  # pages/s over all its processes; None: as fast as they can
    done: trio.Event = attrs.field(factory=trio.Event)

    @property
    def state(self) -> str:
        """running, holding (every process wrote and verified its pages), releasing,
        released (every process has exited), or stopped (the run ended first)."""
        if self.memory.released:
            return "released" if self.done.is_set() else "releasing"
        r = self.hog.result
        if r.finished + r.killed + r.sigbus >= r.processes:
            return "holding"
        return "stopped" if self.done.is_set() else "running"

    @property
    def oom_killed(self) -> int:
        return self.hog.result.killed - self.memory.exited_by_release

    def report(self) -> dict[str, Any]:
        r = self.hog.result
        return {
            "id": self.id,
            "state": self.state,
            "processes": r.processes,
            "pages": r.pages_per_process * r.processes,
            "rate": self.rate,
            "finished": r.finished,
            "oom_killed": self.oom_killed,
            "sigbus": r.sigbus,
            "resident": self.memory.resident,
            "swapped": self.memory.swapped,
            "fault_retries": self.memory.fault_retries,
        }


@attrs.define(eq=False)
class InjectedFlood:
    """Noise traffic injected into a running machine (``inject_flood``): a peer floods a new
    ordinary socket for ``seconds`` while a slow consumer reads it."""

    id: str
    mbps: float
    seconds: float
    sock: ModelledSocket
    scope: trio.CancelScope  # the peer's: its deadline is the end of the flood
    state: str = "running"  # running, done, released

    def report(self) -> dict[str, Any]:
        stats = self.sock.stats
        return {
            "id": self.id,
            "state": self.state,
            "mbps": self.mbps,
            "seconds": self.seconds,
            "socket": self.sock.name,
            "rx_bytes": stats.rx_bytes,
            "rx_bufs": self.sock.rx_pages,
            "pfmemalloc_drop": stats.pfmemalloc_drop,
        }


class Pressure:
    """The hogs and floods injected into one machine: started, released, reported."""

    def __init__(self, memory: Memory, faults: ClientFaults, integrity: Integrity) -> None:
        self.memory = memory
        self.faults = faults
        self.integrity = integrity
        self.hogs: list[InjectedHog] = []
        self.floods: list[InjectedFlood] = []
        self._injections: dict[str, int] = {}

    def hog_memory(self, *, hold: bool = False) -> HogMemory:
        """A ``HogMemory`` for an ``AnonHog``."""
        return HogMemory(self.memory, self.faults, hold=hold)

    def exit_held(self, victim: Process) -> None:
        """The OOM killer chose ``victim``: if it is a held process of an injected hog, its
        task sleeps killably (a process holding its memory sleeps in pause(2)), so SIGKILL
        ends the sleep and it exits now."""
        for injected in self.hogs:
            injected.memory.exit_held(victim)

    @property
    def oom_killed(self) -> int:
        return sum(i.oom_killed for i in self.hogs)

    @property
    def sigbus(self) -> int:
        return sum(i.hog.result.sigbus for i in self.hogs)

    def _next_id(self, kind: str) -> str:
        self._injections[kind] = n = self._injections.get(kind, 0) + 1
        return f"{kind}{n}"

    def hog(
        self,
        running: Callable[[], trio.Nursery],
        pages: int,
        *,
        rate: float | None = None,
        processes: int = 1,
    ) -> dict[str, Any]:
        """Start ``processes`` processes mapping ``pages`` anonymous pages between them: each
        writes its pages (``rate`` pages/s shared between them, or as fast as it can), reads
        and verifies them, then holds them until ``release()``.  They count in the
        machine's integrity like the scenario's workloads.  ``running`` gives the nursery
        to run in, or raises if the machine is not running."""
        if not 0 < processes <= MAX_HOG_PROCESSES or not processes <= pages <= MAX_HOG_PAGES:
            raise ValueError(
                f"hog: pages {pages} must be in {processes}..{MAX_HOG_PAGES} and processes "
                f"{processes} in 1..{MAX_HOG_PROCESSES}"
            )
        if rate is not None and not 0 < rate < math.inf:
            raise ValueError(f"hog: rate {rate!r} must be > 0 and finite")
        nursery = running()
        hog_id = self._next_id("hog")
        config = HogConfig(
            name=hog_id,
            processes=processes,
            total=pages * PAGE_SIZE,
            rounds=1,
            rate=rate / processes if rate is not None else 0.0,
        )
        memory = self.hog_memory(hold=True)
        hog = AnonHog(config, memory, self.integrity)
        injected = InjectedHog(hog_id, hog, memory, rate)
        self.hogs.append(injected)
        nursery.start_soon(self._run_hog, injected, name=f"workload {hog_id}")
        return {
            "id": hog_id,
            "processes": [f"{hog_id}/{i}" for i in range(processes)],
            "pages_per_process": hog.result.pages_per_process,
            "pages": hog.result.pages_per_process * processes,
        }

    @staticmethod
    async def _run_hog(injected: InjectedHog) -> None:
        try:
            await injected.hog.run()
        finally:
            injected.done.set()

    def flood(
        self, running: Callable[[], trio.Nursery], net: Callable[[], NetStack], mbps: float,
        seconds: float,
    ) -> dict[str, Any]:  # fmt: skip
        """A peer floods a new ordinary socket at ``mbps`` megabit/s for ``seconds``; a
        consumer process reads it slowly (``FLOOD_CONSUME_RATE``), allocating as it goes."""
        if not 0 < mbps < math.inf or not 0 < seconds < math.inf:
            raise ValueError(f"flood: mbps {mbps!r} and seconds {seconds!r} must be > 0")
        nursery = running()
        flood_id = self._next_id("flood")
        peer, local = trio.testing.lockstep_stream_pair()
        sock = net().socket(local, flood_id, NOISE)
        scope = trio.CancelScope(deadline=trio.current_time() + seconds)
        injected = InjectedFlood(flood_id, mbps, seconds, sock, scope)
        self.floods.append(injected)
        nursery.start_soon(self._run_flood, injected, peer, name=f"{flood_id} peer")
        return {"id": flood_id, "socket": sock.name, "seconds": seconds}

    async def _run_flood(self, injected: InjectedFlood, peer: trio.abc.Stream) -> None:
        sock = injected.sock
        consumer = f"{injected.id} consumer"
        waits = self.memory.waits
        waits.provide(sock.consumer_role, consumer)
        rate = max(1, int(injected.mbps * 1_000_000 / 8))
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(consume, sock, self.memory, FLOOD_CONSUME_RATE, 1, name=consumer)
                with injected.scope:
                    await flood(peer, rate)
                # Over: cut both ends.  The consumer is not cancelled (it may be inside the
                # allocator); it frees what it holds and then reads end-of-file.
                await trio.aclose_forcefully(peer)
                await sock.aclose()
        finally:
            waits.retire(sock.consumer_role, consumer)
            if injected.state == "running":
                injected.state = "done"

    def release(self) -> dict[str, Any]:
        """End injected pressure: hog processes exit (at once if they hold their memory,
        else at their next page) and free their memory; floods stop."""
        hogs, floods = [], []
        for hog in self.hogs:
            if not hog.memory.released:
                hog.memory.release()
                hogs.append(hog.id)
        for fl in self.floods:
            if fl.state == "running":
                fl.state = "released"
                fl.scope.cancel()
                floods.append(fl.id)
        return {"hogs": hogs, "floods": floods, "nr_free_pages": self.memory.nr_free_pages}

    def report(self) -> dict[str, Any]:
        """The pressure injected through control: hogs and floods, with their state."""
        return {
            "hogs": [h.report() for h in self.hogs],
            "floods": [f.report() for f in self.floods],
        }
