"""One client machine: modelled memory, a real NBD swap device, and its workloads.

``ClientMachine(scenario, connect).run()`` assembles the memory manager from the scenario,
connects the swap device (``connect`` opens a trio stream: TCP for ``netswap client``, an
in-memory pair in outcome tests), starts kswapd, runs the workloads to the end and returns
the run's summary.  Facts from the model and the device go to ``observer``; the harness
turns them into log events.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import attrs
import trio

from client.mm import Memory, MemoryConfig
from client.mm.policy import NullPolicy, ReservePolicy
from client.swapdev import Connect, NBDSwapDevice
from client.workload import AnonHog, Integrity
from testbed.config import ScenarioConfig

Observer = Callable[[object], None]


def _drop(_fact: object) -> None:
    pass


class ClientMachine:
    def __init__(
        self,
        scenario: ScenarioConfig,
        connect: Connect,
        *,
        observer: Observer = _drop,
        policy: ReservePolicy | None = None,
        policy_name: str = "none",
    ) -> None:
        self.scenario = scenario
        m = scenario.machine
        self.memory = Memory.from_config(
            MemoryConfig(
                total_bytes=m.memory,
                zones=m.zones,
                min_free_kbytes=m.min_free_kbytes,
                watermark_scale_factor=m.watermark_scale_factor,
                max_io_pages=m.max_io_pages,
                swap_queue_depth=m.swap_queue_depth,
                bio_pool_size=m.bio_pool_size,
            ),
            policy=policy or NullPolicy(),
            observer=observer,
        )
        s = scenario.swap
        self.device = NBDSwapDevice(
            connect,
            s.export,
            depth=s.depth,
            io_timeout=s.io_timeout,
            spare_pages=s.spare_pages,
            quarantine_seconds=s.quarantine_seconds,
            observer=observer,
        )
        self.integrity = Integrity()
        self.hogs = [AnonHog(w, self.memory, self.integrity) for w in scenario.workloads]
        self.policy_name = policy_name
        self.outcome = "running"
        self.reason = ""
        self._started = 0.0

    async def run(self) -> dict[str, Any]:
        """Run to the end of the workloads (or the time limit); the summary as a dict."""
        wall = time.perf_counter()
        self._started = trio.current_time()
        try:
            async with trio.open_nursery() as nursery:
                await self.device.start(nursery)
                self.memory.swapon(self.device)
                await self.memory.start(nursery)
                with trio.move_on_after(self.scenario.run.time_limit) as limit:
                    async with trio.open_nursery() as workloads:
                        for hog in self.hogs:
                            workloads.start_soon(hog.run, name=f"workload {hog.config.name}")
                self._decide(timed_out=limit.cancelled_caught)
                nursery.cancel_scope.cancel()
        finally:
            with trio.CancelScope(shield=True):
                await self.device.close()
        return self.summary(wall_seconds=time.perf_counter() - wall)

    def _decide(self, *, timed_out: bool) -> None:
        killed = sum(h.result.killed for h in self.hogs)
        if self.integrity.corrupt:
            self.outcome, self.reason = "integrity_error", f"{self.integrity.corrupt} corrupt pages"
        elif timed_out:
            self.outcome, self.reason = "error", f"time limit {self.scenario.run.time_limit}s"
        elif killed:
            self.outcome, self.reason = "error", f"{killed} processes OOM-killed"
        else:
            self.outcome = "completed"

    def summary(self, *, wall_seconds: float = 0.0) -> dict[str, Any]:
        psi = self.memory.pressure()
        return {
            "machine": self.scenario.machine.name,
            "policy": self.policy_name,
            "outcome": self.outcome,
            "reason": self.reason,
            "duration": round(trio.current_time() - self._started, 6),
            "wall_seconds": round(wall_seconds, 3),
            "memory": {
                "total_pages": self.memory.config.nr_pages,
                "min_free_kbytes": self.memory.min_free_kbytes,
                "zones": [
                    {
                        "name": z.name,
                        "managed": z.managed,
                        "nr_free": z.nr_free,
                        "min": z.watermarks.min,
                        "low": z.watermarks.low,
                        "high": z.watermarks.high,
                    }
                    for z in self.memory.zones
                ],
            },
            "vmstat": self.memory.vmstat(),
            "psi": attrs.asdict(psi),
            "integrity": attrs.asdict(self.integrity),
            "workloads": [attrs.asdict(h.result) for h in self.hogs],
            "swap_device": {
                "export": self.device.export,
                "swap_pages": self.device.swap_pages,
                **attrs.asdict(self.device.stats),
            },
        }
