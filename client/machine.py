"""One client machine: modelled memory, a real NBD swap device, and its workloads.

``ClientMachine(scenario, connect).run()`` assembles the memory manager from the scenario,
connects the swap device (``connect`` opens a trio stream: TCP for ``netswap client``, an
in-memory pair in outcome tests), starts kswapd, runs the workloads to the end and returns
the run's summary.  Facts from the model and the device go to ``observer``; the harness
turns them into log events.

A *controlled* machine (``controlled=True``: ``netswap client --control``) keeps running
after its workloads end, until ``stop()``; meanwhile the control endpoint
(testbed/control/) injects pressure (client/pressure.py) and faults through the methods
under "control": ``inject_hog``, ``inject_flood``, ``set_swap_latency``, ``reset_swap``,
``set_alloc_fault``, ``clear_faults``, ``release``, ``status``, ``stop``.
"""

from __future__ import annotations

import math
import time
from collections.abc import Awaitable, Callable
from typing import Any

import attrs
import trio
import trio.testing

from client.config import AllocFaultConfig, HogConfig, Scenario
from client.faults import ClientFaults
from client.mm import Memory, Process
from client.mm.waits import IDLE
from client.net.device import NicSettings
from client.net.noise import consume, flood
from client.net.socket import ModelledSocket
from client.net.stack import NOISE, SWAP, NetStack
from client.net.tcp import TcpSysctls
from client.policy import Policy, make_policy
from client.pressure import Pressure
from client.summary import (
    IntegritySummary,
    MachineStatus,
    MemorySummary,
    RunSummary,
    Verdict,
    VmSample,
    ZoneSummary,
)
from client.swapdev import Connect, NBDSwapDevice
from client.workload import AnonHog, FileReader, Integrity

Observer = Callable[[object], None]


#: Runs beside the workloads (the harness's watchdog); a verdict it returns ends the run as
#: a deadlock and becomes the summary's ``deadlock``.
Supervisor = Callable[["ClientMachine"], Awaitable[Verdict | None]]


#: Waits that end only when a peer sends something: a connection with nothing in flight
#: (the socket's softirq waits for a packet, the NBD reader for a reply).  A machine whose
#: tasks wait only for these, or idle (kswapd asleep), has nothing to do: it is quiescent,
#: not deadlocked.
QUIET_WAITS = frozenset({IDLE, "packet", "rx_data"})
#: How often a controlled machine looks whether it is quiescent (the watchdog's poll).
QUIESCENCE_POLL = 0.05


class MachineStateError(Exception):
    """A control request the machine cannot act on now (not started, ended, no swap
    connection to cut); ``str()`` is one line for the control peer."""


def _drop(_fact: object) -> None:
    pass


class ClientMachine:
    def __init__(
        self,
        scenario: Scenario,
        connect: Connect,
        *,
        observer: Observer = _drop,
        policy: str | None = None,
        controlled: bool = False,
    ) -> None:
        self.scenario = scenario
        self.policy_name = policy or scenario.policy
        self.policy: Policy = make_policy(self.policy_name, scenario)
        self.observer = observer
        self._connect = connect
        m = scenario.machine
        self.memory = Memory(
            m.memory_config(), policy=self.policy, observer=observer, oom_hook=self._oom_killed
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
            nbd=s.nbd,
        )
        self.faults = ClientFaults(self.memory, seed=scenario.run.seed, observer=observer)
        if scenario.faults.latency_ms is not None:
            self.faults.latency = scenario.faults.latency_ms / 1000
        self.integrity = Integrity()
        self.pressure = Pressure(self.memory, self.faults, self.integrity)
        # Where allocation faults may be injected (from the scenario, or later through
        # control), hogs see memory through HogMemory, which retries a page fault whose
        # allocation was failed on purpose; elsewhere they use the model directly.
        faultable = controlled or scenario.faults.alloc is not None
        self.hogs: list[AnonHog | FileReader] = [
            AnonHog(w, self.pressure.hog_memory() if faultable else self.memory, self.integrity)
            if isinstance(w, HogConfig)
            else FileReader(w, self.memory, self.integrity)
            for w in scenario.workloads
        ]
        self.net: NetStack | None = None
        self.deadlock: Verdict | None = None
        self.min_free = self.memory.nr_free_pages
        self._swap_sockets = 0
        self.outcome = "running"
        self.reason = ""
        self._started = 0.0
        self._ended_at: float | None = None
        self.swap_socket: ModelledSocket | None = None
        #: Keep running after the workloads end, until ``stop()`` (a control endpoint).
        self.controlled = controlled
        #: Set once the machine runs (swap connected, kswapd started): control may act.
        self.ready = trio.Event()
        self.workloads_done = False
        self.ended = False
        self._stop = trio.Event()
        self._stop_reason = ""
        self._run_nursery: trio.Nursery | None = None
        self._workloads_scope: trio.CancelScope | None = None
        self._cut: ModelledSocket | None = None

    def _oom_killed(self, victim: Process) -> None:
        self.pressure.exit_held(victim)

    async def _connect_swap(self) -> trio.abc.Stream:
        """Open the swap connection as a modelled socket (``SOCK_MEMALLOC`` if the policy
        says so); the watchdog learns that its RX task is what "the swap device" is."""
        assert self.net is not None
        raw = await self._connect()
        name = f"nbd{self._swap_sockets}"
        self._swap_sockets += 1
        s = self.scenario.swap
        sock = self.net.socket(
            raw, name, SWAP, sndbuf=s.sndbuf, rcvbuf=s.rcvbuf, latency=self._swap_latency()
        )
        waits = self.memory.waits
        for role in ("swap device", "mempool_free"):
            waits.roles[role] = [sock.rx_task_name]
        self.swap_socket = sock
        return sock

    def tcp_sysctls(self) -> TcpSysctls:
        """net.ipv4.tcp_mem, tcp_wmem and tcp_rmem: tcp_init's, from the machine's memory
        at boot, with the scenario's ``[net]`` in their place where it sets them."""
        boot = TcpSysctls.for_memory(self.memory)
        net = self.scenario.net
        return TcpSysctls(
            tcp_mem=boot.tcp_mem if net.tcp_mem is None else net.tcp_mem,
            tcp_wmem=boot.tcp_wmem if net.tcp_wmem is None else net.tcp_wmem,
            tcp_rmem=boot.tcp_rmem if net.tcp_rmem is None else net.tcp_rmem,
        )

    def _swap_latency(self) -> float:
        """The swap connection's latency: a latency fault's, else the scenario's."""
        if self.faults.latency is not None:
            return self.faults.latency
        return self.scenario.swap.latency

    def progress(self) -> tuple[int, ...]:
        """What the watchdog counts as progress (never retries or drops)."""
        p = self.memory.progress
        return (p.pages_freed, p.writebacks_completed, p.swapins_completed, self.integrity.steps)

    async def run(self, *, supervisor: Supervisor | None = None) -> RunSummary:
        """Run to the end of the workloads (a controlled machine: to ``stop()``), a
        deadlock, or the time limit; the summary.  A controlled machine's time limit
        covers its workloads only: after them the operator decides when to stop."""
        wall = time.perf_counter()
        self._started = trio.current_time()
        timed_out = False
        try:
            async with trio.open_nursery() as nursery:
                n = self.scenario.nic
                # The link's and the softirq's time are the virtual clock's: on the real
                # clock the host's own loopback and CPU take their time already (and a
                # timer there costs a millisecond, not a microsecond).
                virtual = isinstance(trio.lowlevel.current_clock(), trio.testing.MockClock)
                nic = NicSettings(
                    driver="virtio" if n.driver == "virtio" else "netdev",
                    ring_size=n.ring_size,
                    rx_buffer=n.rx_buffer,
                    bandwidth=n.bandwidth / 8 if virtual else math.inf,
                    softirq_cost=n.softirq_cost if virtual else 0.0,
                )
                self.net = NetStack(
                    self.memory,
                    self.policy,
                    nursery,
                    observer=self.observer,
                    nic=nic,
                    tcp=self.tcp_sysctls(),
                )
                self.net.up()  # the interface comes up at boot, before any socket
                self.memory.waits.roles["kswapd"] = ["kswapd0"]
                await self.device.start(nursery)
                self.memory.swapon(self.device)
                await self.memory.start(nursery)
                self._start_faults()
                nursery.start_soon(self._sample)
                with trio.move_on_after(self.scenario.run.time_limit) as limit:
                    async with trio.open_nursery() as run:
                        self._run_nursery = run
                        if supervisor is not None:
                            run.start_soon(self._supervise, supervisor, run.cancel_scope)
                        async with trio.open_nursery() as workloads:
                            self._workloads_scope = workloads.cancel_scope
                            if self._stop.is_set():
                                workloads.cancel_scope.cancel()
                            self.ready.set()
                            self._start_noise(run)
                            for hog in self.hogs:
                                workloads.start_soon(hog.run, name=f"workload {hog.config.name}")
                        self.workloads_done = True
                        if self.controlled:
                            limit.deadline = math.inf
                            await self._stop.wait()
                        run.cancel_scope.cancel()  # workloads done: stop noise and watchdog
                timed_out = limit.cancelled_caught
                self._ended_at = trio.current_time()  # before closing: a dead peer may stall
                self._decide(timed_out=timed_out)
                nursery.cancel_scope.cancel()
        finally:
            self.ended = True
            self._run_nursery = None
            with trio.CancelScope(shield=True):
                await self.device.close()
            if self.net is not None:
                self.net.close()
        return self.summary(wall_seconds=time.perf_counter() - wall)

    def _start_faults(self) -> None:
        """The scenario's ``[faults]``, from the start."""
        if self.faults.latency is not None and self.swap_socket is not None:
            self.faults.fired(
                "latency", ms=self.scenario.faults.latency_ms, sock=self.swap_socket.name
            )
        if self.scenario.faults.alloc is not None:
            self.faults.set_alloc(self.scenario.faults.alloc)

    async def _supervise(self, supervisor: Supervisor, run: trio.CancelScope) -> None:
        if self.controlled:
            verdict = await self._supervise_while_busy(supervisor)
        else:
            verdict = await supervisor(self)
        if verdict is not None:
            self.deadlock = verdict
            run.cancel()

    def quiescent(self) -> bool:
        """Nothing to do: every task that waits, waits for a peer or idles (``QUIET_WAITS``).
        A controlled machine between commands is like this; no progress then is no stall."""
        return all(what.kind in QUIET_WAITS for what in self.memory.waits.snapshot().values())

    async def _supervise_while_busy(self, supervisor: Supervisor) -> Verdict | None:
        """Run the supervisor only while the machine is not quiescent, afresh each time it
        gets busy: a machine waiting for commands makes no progress without being stuck.
        A deadlock is never quiescent (someone waits for memory, writeback, a reserve), so
        the watchdog sees every deadlock it would see without control."""
        while True:
            while self.quiescent():
                await trio.sleep(QUIESCENCE_POLL)
            verdict: Verdict | None = None
            async with trio.open_nursery() as watch:

                async def until_quiescent() -> None:
                    while not self.quiescent():
                        await trio.sleep(QUIESCENCE_POLL)
                    watch.cancel_scope.cancel()

                async def judge() -> None:
                    nonlocal verdict
                    verdict = await supervisor(self)
                    watch.cancel_scope.cancel()

                watch.start_soon(until_quiescent)
                watch.start_soon(judge)
            if verdict is not None:
                return verdict

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
        net_now = self.net.memory_now() if self.net is not None else {}
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
            nr_file_pages=m.pagecache.nr_pages,
            nr_slab_unreclaimable=stat.nr_slab_unreclaimable,
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
            **net_now,
        )

    def _decide(self, *, timed_out: bool) -> None:
        killed = sum(h.result.killed for h in self.hogs)
        killed += self.pressure.oom_killed
        if self.deadlock is not None and not self.device.connected:
            # No progress because the swap server is gone, not because memory ran out:
            # an error of the testbed's world, not a deadlock of the kernel's.
            self.outcome = "error"
            self.reason = (
                f"no progress for {self.deadlock.stalled_for or 0:.1f}s: the swap server"
                f" is unreachable ({self.device.stats.reconnect_failures} reconnects failed)"
            )
        elif self.deadlock is not None:
            self.outcome = "deadlock"
            self.reason = f"no progress for {self.deadlock.stalled_for or 0:.1f}s"
        elif self.integrity.corrupt:
            self.outcome, self.reason = "integrity_error", f"{self.integrity.corrupt} corrupt pages"
        elif timed_out:
            self.outcome, self.reason = "error", f"time limit {self.scenario.run.time_limit}s"
        elif killed:
            self.outcome, self.reason = "error", f"{killed} processes OOM-killed"
        elif (
            sigbus := sum(h.result.sigbus for h in self.hogs if isinstance(h, AnonHog))
            + self.pressure.sigbus
        ):
            self.outcome, self.reason = "error", f"{sigbus} processes got SIGBUS (swap-in failed)"
        elif failed := sum(h.result.failed for h in self.hogs if isinstance(h, FileReader)):
            self.outcome, self.reason = "error", f"{failed} readers got ENOMEM"
        else:
            self.outcome = "completed"
            self.reason = self._stop_reason

    def summary(self, *, wall_seconds: float = 0.0) -> RunSummary:
        ended = self._ended_at if self._ended_at is not None else trio.current_time()
        return RunSummary(
            machine=self.scenario.machine.name,
            policy=self.policy_name,
            outcome=self.outcome,
            reason=self.reason,
            duration=round(ended - self._started, 6),
            wall_seconds=round(wall_seconds, 3),
            memory=MemorySummary(
                total_pages=self.memory.config.nr_pages,
                min_free_kbytes=self.memory.min_free_kbytes,
                zones=[
                    ZoneSummary(
                        name=z.name,
                        managed=z.managed,
                        nr_free=z.nr_free,
                        min=z.watermarks.min,
                        low=z.watermarks.low,
                        high=z.watermarks.high,
                    )
                    for z in self.memory.zones
                ],
            ),
            vmstat=dict(self.memory.vmstat()),
            slabinfo=[attrs.asdict(info) for info in self.memory.slab.slabinfo()],
            psi=attrs.asdict(self.memory.pressure()),
            integrity=IntegritySummary(**attrs.asdict(self.integrity)),
            workloads=[attrs.asdict(h.result) for h in self.hogs],
            swap_device={
                "export": self.device.export,
                "swap_pages": self.device.swap_pages,
                **attrs.asdict(self.device.stats),
            },
            min_free_pages=self.min_free,
            net=self._net_summary(),
            policy_report=self.policy.report(),
            deadlock=self.deadlock,
            pressure=self.pressure.report(),
            faults=self.faults.report(),
        )

    def _net_summary(self) -> dict[str, Any]:
        if self.net is None:
            return {}
        sockets: list[ModelledSocket] = [*self.net.sockets.values(), *self.net.closed]
        return {
            **self.net.totals(),
            "tcp": self.net.tcp.snapshot(),
            "nic": self.net.device.snapshot(),
            "sockets": [s.snapshot() for s in sockets],
        }

    # -- control ----------------------------------------------------------------------------
    def require_running(self) -> trio.Nursery:
        """The nursery injected pressure runs in; MachineStateError unless running."""
        if self.ended or self._stop.is_set():
            raise MachineStateError("the run has ended")
        if not self.ready.is_set() or self._run_nursery is None or self.net is None:
            raise MachineStateError("the machine is not running yet")
        return self._run_nursery

    def _net(self) -> NetStack:
        assert self.net is not None  # require_running checked it
        return self.net

    def inject_hog(
        self, pages: int, *, rate: float | None = None, processes: int = 1
    ) -> dict[str, Any]:
        """``Pressure.hog``: ``processes`` processes write, verify and hold ``pages``."""
        return self.pressure.hog(self.require_running, pages, rate=rate, processes=processes)

    def inject_flood(self, mbps: float, seconds: float) -> dict[str, Any]:
        """``Pressure.flood``: a peer floods a new ordinary socket for ``seconds``."""
        return self.pressure.flood(self.require_running, self._net, mbps, seconds)

    def set_swap_latency(self, ms: float) -> dict[str, Any]:
        """The swap connection's latency becomes ``ms`` (this connection and the next)."""
        if not 0 <= ms < math.inf:
            raise ValueError(f"latency: ms {ms!r} must be >= 0 and finite")
        self.require_running()
        self.faults.latency = ms / 1000
        sock = self.swap_socket
        if sock is not None:
            sock.latency = self.faults.latency
        self.faults.fired("latency", ms=ms, sock=sock.name if sock else None)
        return {"latency_ms": ms, "socket": sock.name if sock else None}

    async def reset_swap(self) -> dict[str, Any]:
        """Cut the swap connection under the NBD client, as a reset would: the swap device
        notices at its next request, reconnects and resubmits what was in flight."""
        self.require_running()
        sock = self.swap_socket
        if sock is None or sock is self._cut or not self.device.connected:
            raise MachineStateError("the swap connection is already down (reconnecting)")
        self._cut = sock
        self.faults.fired("reset", sock=sock.name)
        await trio.aclose_forcefully(sock.inner)
        return {"socket": sock.name, "connects": self.device.stats.connects}

    def set_alloc_fault(self, config: AllocFaultConfig) -> dict[str, Any]:
        """Install ``fail_page_alloc`` with ``config`` (replacing any earlier one)."""
        self.require_running()
        return self.faults.set_alloc(config).report()

    def clear_faults(self) -> dict[str, Any]:
        """Remove every client fault; the swap latency is the scenario's again."""
        self.require_running()
        self.faults.clear()
        if self.swap_socket is not None:
            self.swap_socket.latency = self.scenario.swap.latency
        return {"faults": self.faults.report()}

    def release(self) -> dict[str, Any]:
        """End injected pressure: hog processes exit (at once if they hold their memory,
        else at their next page) and free their memory; floods stop."""
        self.require_running()
        return self.pressure.release()

    def status(self) -> MachineStatus:
        """The machine now: the ``vm.sample`` fact and the counters behind it."""
        return MachineStatus(
            machine=self.scenario.machine.name,
            policy=self.policy_name,
            outcome=self.outcome,
            reason=self.reason,
            t=round(trio.current_time() - self._started, 6),
            workloads_done=self.workloads_done,
            sample=attrs.asdict(self.sample()),
            vmstat=self.memory.vmstat(),
            psi=attrs.asdict(self.memory.pressure()),
            policy_report=self.policy.report(),
            integrity=IntegritySummary(**attrs.asdict(self.integrity)),
            net=self._net_summary(),
            swap_device={"connected": self.device.connected, **attrs.asdict(self.device.stats)},
            pressure=self.pressure.report(),
            faults=self.faults.report(),
        )

    def stop(self, reason: str = "stopped") -> None:
        """End the run as if its workloads had ended (any still running are cut short)."""
        if self._stop.is_set():
            return
        if not self.workloads_done:
            self._stop_reason = f"{reason} before the workloads finished"
            if self._workloads_scope is not None:
                self._workloads_scope.cancel()
        self._stop.set()
