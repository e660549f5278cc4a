"""Running a scenario: an embedded server, one client machine, and the watchdog over it.

``run_scenario`` is what ``netswap run``, ``netswap compare``, ``--jobs`` workers and
``netswap sweep`` call (``run_virtual`` on the virtual clock); ``run_machine`` is the part
``netswap client`` shares with it: ``run.start``, the machine under the watchdog,
``run.summary``.  The transport is real
TCP on loopback (the command line) or an in-memory stream pair (outcome tests under trio's
virtual clock); the model, the server and the watchdog are the same code either way.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from contextlib import nullcontext
from typing import Any, Literal

import structlog
import trio
import trio.testing

from client.machine import ClientMachine, Supervisor
from client.summary import RunSummary, Verdict, unstructure_summary
from server import Export, NBDServer
from server.config import ExportConfig, ServerConfig
from testbed.config import ScenarioConfig
from testbed.determinism import seeded_scheduling
from testbed.events import ClientRunStarted, RunStarted, RunSummarised, WatchdogDeadlock
from testbed.log import emit, fact_observer
from testbed.watchdog import Watchdog

Transport = Literal["tcp", "memory"]


def watchdog_supervisor(stall_seconds: float, log: Any) -> Supervisor:
    """The machine's supervisor: a Watchdog on its progress and named waits."""

    async def supervise(machine: ClientMachine) -> Verdict | None:
        watchdog = Watchdog(machine.progress, machine.memory.waits, stall_seconds=stall_seconds)
        verdict = await watchdog.run()
        emit(
            WatchdogDeadlock(
                cycle=verdict.path,
                has_cycle=verdict.cycle is not None,
                description=verdict.describe(),
                stalled_for=round(verdict.stalled_for, 3),
                waiting=verdict.waiting,
                progress=list(verdict.progress),
            ),
            log,
        )
        return Verdict(
            cycle=verdict.path,
            has_cycle=verdict.cycle is not None,
            waiting=verdict.waiting,
            stalled_for=round(verdict.stalled_for, 3),
        )

    return supervise


def embedded_server(
    scenario: ScenarioConfig, *, handshake_timeout: float | None = None
) -> NBDServer:
    """The server ``netswap run`` embeds: the scenario's exports (or its swap export) on
    127.0.0.1:0.  ``handshake_timeout`` overrides the config's (a guest that boots under
    emulation opens its connection long before nbd-client speaks)."""
    base = scenario.server or ServerConfig(listen="127.0.0.1:0")
    exports = base.exports or (ExportConfig(name=scenario.swap.export, size=scenario.swap.size),)
    config = ServerConfig(
        listen="127.0.0.1:0",
        exports=tuple(exports),
        max_payload=base.max_payload,
        handshake_timeout=handshake_timeout or base.handshake_timeout,
        max_connections=base.max_connections,
        shutdown_grace=0.5,
    )
    # No helper thread populating the memory store ahead of the writer: the model writes
    # far slower than first-touch faults limit a server, and the thread's faults and
    # wake-ups cost a tenth of a run's CPU (docs/benchmarks.md), on the core a sweep's
    # other worker needs.
    return NBDServer(config, [Export.from_config(e, populate=False) for e in config.exports])


async def run_scenario(
    scenario: ScenarioConfig,
    *,
    policy: str | None = None,
    transport: Transport = "tcp",
    log: Any = None,
) -> RunSummary:
    """One run of ``scenario`` under ``policy``; returns the machine's summary."""
    log = log if log is not None else structlog.get_logger()
    name = policy or scenario.policy
    log = log.bind(machine=scenario.machine.name, policy=name)
    server = embedded_server(scenario)
    # Under the virtual clock a run is a function of its scenario and run.seed.
    seeded = seeded_scheduling(scenario.run.seed) if transport == "memory" else nullcontext()
    with seeded:
        return await _run(scenario, server, name, transport, log)


def run_virtual(scenario: ScenarioConfig, policy: str | None = None) -> RunSummary:
    """One run on trio's virtual clock, server and client joined in memory: a function of
    the scenario, the policy and ``run.seed`` (what ``--clock virtual``, ``--jobs`` and
    ``netswap sweep`` run).  Structlog is used as configured."""
    return trio.run(
        lambda: run_scenario(scenario, policy=policy, transport="memory"),
        clock=trio.testing.MockClock(autojump_threshold=0),
    )


async def _run(
    scenario: ScenarioConfig, server: NBDServer, name: str, transport: Transport, log: Any
) -> RunSummary:
    try:
        async with trio.open_nursery() as nursery:
            if transport == "tcp":
                host, port = await nursery.start(server.serve)

                async def connect() -> trio.abc.Stream:
                    return await trio.open_tcp_stream(host, port)

            else:

                async def serve(stream: trio.abc.Stream) -> None:
                    await server.handle_stream(stream)
                    _check(server)  # a bug ends the run now, not after the client's retries

                async def connect() -> trio.abc.Stream:
                    client_end, server_end = trio.testing.memory_stream_pair()
                    nursery.start_soon(serve, server_end)
                    return client_end

            machine = ClientMachine(scenario, connect, observer=fact_observer(log), policy=name)
            summary = await run_machine(machine, scenario, log, transport=transport)
            server.shutdown()
            nursery.cancel_scope.cancel()
    except BaseExceptionGroup as group:
        if len(group.exceptions) == 1 and isinstance(group.exceptions[0], EmbeddedServerError):
            raise group.exceptions[0] from None
        raise
    _check(server)
    return summary


def _check(server: NBDServer) -> None:
    """Raise if the server closed a connection on a bug of its own
    (``server.connection_failed``): what the machine saw of it is no result."""
    if server.stats.internal_errors:
        raise EmbeddedServerError(
            f"the embedded server failed {server.stats.internal_errors} connection(s) on an "
            "internal error (server.connection_failed in the log)"
        )


class EmbeddedServerError(RuntimeError):
    """The run's embedded server failed a connection on a bug of its own."""


#: How a machine is run under its supervisor (``netswap client --control`` wraps it).
Runner = Callable[[ClientMachine, Supervisor], Awaitable[RunSummary]]


async def _plain(machine: ClientMachine, supervisor: Supervisor) -> RunSummary:
    return await machine.run(supervisor=supervisor)


async def run_machine(
    machine: ClientMachine,
    scenario: ScenarioConfig,
    log: Any,
    *,
    transport: Transport,
    runner: Runner = _plain,
    server: str | None = None,
    control: str | None = None,
) -> RunSummary:
    """``run.start``, the machine under the watchdog, and ``run.summary``: one run, logged,
    whatever the machine's server and transport.  ``server`` and ``control`` (``netswap
    client``'s ``--server`` and ``--control``) go into ``run.start``."""
    memory, description = scenario.machine.memory, scenario.description
    if server is None:
        start = RunStarted(transport, memory, description)
    else:
        start = ClientRunStarted(transport, memory, description, server=server, control=control)
    emit(start, log)
    summary = await runner(machine, watchdog_supervisor(scenario.run.stall_seconds, log))
    emit(RunSummarised(unstructure_summary(summary)), log)
    return summary
