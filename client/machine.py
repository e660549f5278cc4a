"""One client machine: modelled memory, a real NBD swap device, and its workloads.

``ClientMachine(scenario, connect).run()`` assembles the memory manager from the scenario,
connects the swap device (``connect`` opens a trio stream: TCP for ``netswap client``, an
in-memory pair in outcome tests), starts kswapd, runs the workloads to the end and returns
the run's summary.  Facts from the model and the device go to ``observer``; the harness
turns them into log events.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable
from typing import Any, ClassVar

import attrs
import trio
import trio.testing

from client.mm import Memory, MemoryConfig
from client.net.noise import consume, flood
from client.net.socket import ModelledSocket
from client.net.stack import NOISE, SWAP, NetStack
from client.policy import Policy, make_policy
from client.swapdev import Connect, NBDSwapDevice
from client.workload import AnonHog, Integrity
from testbed.config import ScenarioConfig

Observer = Callable[[object], None]


@attrs.frozen
class VmSample:
    """The machine at one instant, every ``run.sample_interval`` seconds: what a timeline
    plot needs (free pages against the watermarks, writeback, reserve use, drops)."""

    event: ClassVar[str] = "vm.sample"
    t: float  # seconds since the run started (the run's clock: virtual or real)
    nr_free_pages: int
    zones: list[dict[str, int | str]]  # name, free, min, low, high
    nr_writeback: int
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
#: Runs beside the workloads (the harness's watchdog); a dict it returns ends the run as a
#: deadlock and becomes the summary's ``deadlock`` entry (``cycle``, ``chain``, ...).
Supervisor = Callable[["ClientMachine"], Awaitable[dict[str, Any] | None]]


def _drop(_fact: object) -> None:
    pass


class ClientMachine:
    def __init__(
        self,
        scenario: ScenarioConfig,
        connect: Connect,
        *,
        observer: Observer = _drop,
        policy: str | None = None,
    ) -> None:
        self.scenario = scenario
        self.policy_name = policy or scenario.policy
        self.policy: Policy = make_policy(self.policy_name, scenario)
        self.observer = observer
        self._connect = connect
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
            policy=self.policy,
            observer=observer,
        )
        s = scenario.swap
        self.device = NBDSwapDevice(
            self._connect_swap,
            s.export,
            depth=s.depth,
            io_timeout=s.io_timeout,
            spare_pages=s.spare_pages,
            quarantine_seconds=s.quarantine_seconds,
            observer=observer,
        )
        self.integrity = Integrity()
        self.hogs = [AnonHog(w, self.memory, self.integrity) for w in scenario.workloads]
        self.net: NetStack | None = None
        self.deadlock: dict[str, Any] | None = None
        self.min_free = self.memory.nr_free_pages
        self._swap_sockets = 0
        self.outcome = "running"
        self.reason = ""
        self._started = 0.0

    async def _connect_swap(self) -> trio.abc.Stream:
        """Open the swap connection as a modelled socket (``SOCK_MEMALLOC`` if the policy
        says so); the watchdog learns that its RX task is what "the swap device" is."""
        assert self.net is not None
        raw = await self._connect()
        name = f"nbd{self._swap_sockets}"
        self._swap_sockets += 1
        s = self.scenario.swap
        sock = self.net.socket(raw, name, SWAP, sndbuf=s.sndbuf, rcvbuf=s.rcvbuf, latency=s.latency)
        waits = self.memory.waits
        for role in ("swap device", "mempool_free"):
            waits.roles[role] = [sock.rx_task_name]
        return sock

    def progress(self) -> tuple[int, ...]:
        """What the watchdog counts as progress (never retries or drops)."""
        p = self.memory.progress
        return (p.pages_freed, p.writebacks_completed, p.swapins_completed, self.integrity.steps)

    async def run(self, *, supervisor: Supervisor | None = None) -> dict[str, Any]:
        """Run to the end of the workloads, a deadlock, or the time limit; the summary."""
        wall = time.perf_counter()
        self._started = trio.current_time()
        timed_out = False
        try:
            async with trio.open_nursery() as nursery:
                self.net = NetStack(self.memory, self.policy, nursery, observer=self.observer)
                self.memory.waits.roles["kswapd"] = ["kswapd0"]
                await self.device.start(nursery)
                self.memory.swapon(self.device)
                await self.memory.start(nursery)
                nursery.start_soon(self._sample)
                with trio.move_on_after(self.scenario.run.time_limit) as limit:
                    async with trio.open_nursery() as run:
                        if supervisor is not None:
                            run.start_soon(self._supervise, supervisor, run.cancel_scope)
                        async with trio.open_nursery() as workloads:
                            self._start_noise(run)
                            for hog in self.hogs:
                                workloads.start_soon(hog.run, name=f"workload {hog.config.name}")
                        run.cancel_scope.cancel()  # workloads done: stop noise and watchdog
                timed_out = limit.cancelled_caught
                self._decide(timed_out=timed_out)
                nursery.cancel_scope.cancel()
        finally:
            with trio.CancelScope(shield=True):
                await self.device.close()
        return self.summary(wall_seconds=time.perf_counter() - wall)

    async def _supervise(self, supervisor: Supervisor, run: trio.CancelScope) -> None:
        verdict = await supervisor(self)
        if verdict is not None:
            self.deadlock = verdict
            run.cancel()

    def _start_noise(self, nursery: trio.Nursery) -> None:
        assert self.net is not None
        for noise in self.scenario.noise:
            for i in range(noise.sockets):
                peer, local = trio.testing.lockstep_stream_pair()
                sock = self.net.socket(local, f"{noise.name}{i}", NOISE, rcvbuf=noise.rcvbuf)
                consumer = f"{noise.name}{i} consumer"
                self.memory.waits.roles[sock.consumer_role] = [consumer]
                nursery.start_soon(
                    self._delayed,
                    noise.start_after,
                    flood(peer, noise.rate),
                    name=f"{noise.name}{i} peer",
                )
                nursery.start_soon(
                    self._delayed,
                    noise.start_after,
                    consume(sock, self.memory, noise.consume_rate, noise.process_pages),
                    name=consumer,
                )

    @staticmethod
    async def _delayed(delay: float, coro: Any) -> None:
        if delay:
            await trio.sleep(delay)
        await coro

    async def _sample(self) -> None:
        """Track the lowest free count (every 10 ms) and emit ``vm.sample`` facts."""
        interval = self.scenario.run.sample_interval
        tick = 0.01 if interval <= 0 else min(0.01, interval)
        next_sample = trio.current_time()
        while True:
            self.min_free = min(self.min_free, self.memory.nr_free_pages)
            now = trio.current_time()
            if interval > 0 and now >= next_sample:
                self.observer(self.sample())
                next_sample = now + interval
            await trio.sleep(tick)

    def sample(self) -> VmSample:
        """The machine now, as a ``vm.sample`` fact (also the control endpoint's status)."""
        m = self.memory
        stat = m.stat
        psi = m.pressure()
        net = self.net.totals() if self.net is not None else {}
        return VmSample(
            t=round(trio.current_time() - self._started, 6),
            nr_free_pages=m.nr_free_pages,
            zones=[
                {
                    "name": z.name,
                    "free": z.nr_free,
                    "min": z.watermarks.min,
                    "low": z.watermarks.low,
                    "high": z.watermarks.high,
                }
                for z in m.zones
            ],
            nr_writeback=stat.nr_writeback,
            nr_emergency=stat.nr_emergency,
            reserve_used=self.policy.reserve_in_use(),
            pswpout=stat.pswpout,
            pswpin=stat.pswpin,
            allocstall=stat.allocstall,
            drops=net.get("PFMemallocDrop", 0) + net.get("rx_alloc_fail", 0),
            throttled=stat.pgscan_direct_throttle,
            psi_some_avg10=psi.some.avg10,
            psi_full_avg10=psi.full.avg10,
            pages_verified=self.integrity.pages_verified,
        )

    def _decide(self, *, timed_out: bool) -> None:
        killed = sum(h.result.killed for h in self.hogs)
        if self.deadlock is not None:
            self.outcome = "deadlock"
            self.reason = f"no progress for {self.deadlock.get('stalled_for', 0):.1f}s"
        elif self.integrity.corrupt:
            self.outcome, self.reason = "integrity_error", f"{self.integrity.corrupt} corrupt pages"
        elif timed_out:
            self.outcome, self.reason = "error", f"time limit {self.scenario.run.time_limit}s"
        elif killed:
            self.outcome, self.reason = "error", f"{killed} processes OOM-killed"
        elif sigbus := sum(h.result.sigbus for h in self.hogs):
            self.outcome, self.reason = "error", f"{sigbus} processes got SIGBUS (swap-in failed)"
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
            "min_free_pages": self.min_free,
            "net": self._net_summary(),
            "policy_report": self.policy.report(),
            "deadlock": self.deadlock,
        }

    def _net_summary(self) -> dict[str, Any]:
        if self.net is None:
            return {}
        sockets: list[ModelledSocket] = [*self.net.sockets.values(), *self.net.closed]
        return {**self.net.totals(), "sockets": [s.snapshot() for s in sockets]}
