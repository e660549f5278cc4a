"""The control endpoint (testbed/control/): parsing, the endpoint on a running machine,
and ``netswap client --control`` driven by ``netswap pressure`` as real processes.

The in-process tests join a control connection to the endpoint with an in-memory stream
and run the machine over the in-memory transport, on trio's virtual clock.
"""

from __future__ import annotations

import contextlib
import json
import socket
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import attrs
import pytest
import trio
import trio.testing

from client.config import AllocFaultConfig
from client.faults import FaultFired
from client.machine import ClientMachine
from client.nbd_client import NBDClient, NBDError
from client.summary import RunSummary
from nbdproto import Errno
from testbed.config import load_scenario
from testbed.control import (
    MAX_LINE,
    CommandError,
    ControlEndpoint,
    FaultAlloc,
    FaultClear,
    FaultLatency,
    FaultReset,
    Flood,
    Hog,
    Release,
    ServerFault,
    Status,
    Stop,
    parse_command,
    serve_control,
)
from testbed.scenario import embedded_server, watchdog_supervisor
from tests.processes import Cli, one_line

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


# -- parsing ------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("line", "command"),
    [
        ('{"cmd": "status"}', Status()),
        ('{"cmd": "stop"}', Stop()),
        ('{"cmd": "release"}', Release()),
        ('{"cmd": "hog", "pages": 100}', Hog(100)),
        ('{"cmd": "hog", "pages": 100, "rate": 50, "processes": 4}', Hog(100, 50.0, 4)),
        ('{"cmd": "hog", "pages": 100, "rate": null}', Hog(100)),
        ('{"cmd": "flood", "mbps": 10, "seconds": 0.5}', Flood(10.0, 0.5)),
        ('{"cmd": "fault", "kind": "latency", "ms": 0}', FaultLatency(0.0)),
        ('{"cmd": "fault", "kind": "reset"}', FaultReset()),
        ('{"cmd": "fault", "kind": "clear", "target": "client"}', FaultClear()),
        (
            '{"cmd": "fault", "kind": "alloc", "probability": 0.5}',
            FaultAlloc(AllocFaultConfig(probability=0.5)),
        ),
        (
            '{"cmd": "fault", "kind": "alloc", "probability": 1, "interval": 3, "times": 10, '
            '"space": 8192, "gfp": "atomic", "task": "nbd"}',
            FaultAlloc(AllocFaultConfig(1.0, 3, 10, 8192, "atomic", "nbd")),
        ),
        (
            '{"cmd": "fault", "target": "server", "kind": "delay", "seconds": 0.1}',
            ServerFault("delay", {"seconds": 0.1}),
        ),
        (b' {"cmd": "status"} \r', Status()),
    ],
)
def test_valid_commands_parse(line: str | bytes, command: object) -> None:
    assert parse_command(line) == command


@pytest.mark.parametrize(
    ("line", "error"),
    [
        ("", 'empty request: expected one JSON object like {"cmd": "status"}'),
        ("status", "request is not JSON: Expecting value (line 1 column 1)"),
        ('{"cmd": "status"', "request is not JSON: Expecting ',' delimiter (line 1 column 17)"),
        ('{"cmd": "status"} {}', "request is not JSON: Extra data (line 1 column 19)"),
        (b"\xff{}", "request is not UTF-8 (byte 0)"),
        ('["status"]', "request must be a JSON object, got an array"),
        ('"status"', "request must be a JSON object, got a string"),
        ("{}", "request has no 'cmd' (one of: status, hog, flood, fault, release, stop)"),
        ('{"cmd": 7}', "'cmd' must be a string, got a number 7"),
        (
            '{"cmd": "explode"}',
            'unknown cmd "explode" (one of: status, hog, flood, fault, release, stop)',
        ),
        (
            '{"cmd": "status", "verbose": true}',
            "status: unknown key 'verbose' (expected no arguments)",
        ),
        ('{"cmd": "hog"}', "hog: missing 'pages'"),
        ('{"cmd": "hog", "pages": null}', "hog: 'pages' must not be null"),
        ('{"cmd": "hog", "pages": "100"}', "hog: 'pages' must be an integer, got a string \"100\""),
        ('{"cmd": "hog", "pages": 1.5}', "hog: 'pages' must be an integer, got a number 1.5"),
        ('{"cmd": "hog", "pages": true}', "hog: 'pages' must be an integer, got a boolean true"),
        ('{"cmd": "hog", "pages": 0}', "hog: 'pages' must be in 1..2147483648, got 0"),
        (
            '{"cmd": "hog", "pages": 9, "processes": 0}',
            "hog: 'processes' must be in 1..4096, got 0",
        ),
        (
            '{"cmd": "hog", "pages": 2, "processes": 3}',
            "hog: 'pages' 2 is fewer than 'processes' 3",
        ),
        ('{"cmd": "hog", "pages": 9, "rate": 0}', "hog: 'rate' must be > 0, got 0"),
        (
            '{"cmd": "hog", "pages": 9, "rate": [1]}',
            "hog: 'rate' must be a number, got an array [1]",
        ),
        (
            '{"cmd": "hog", "pages": 9, "colour": "red", "size": 1}',
            "hog: unknown key 'colour', 'size' (expected pages, rate, processes)",
        ),
        ('{"cmd": "flood", "mbps": 1}', "flood: missing 'seconds'"),
        ('{"cmd": "flood", "mbps": -1, "seconds": 1}', "flood: 'mbps' must be > 0, got -1"),
        (
            '{"cmd": "flood", "mbps": NaN, "seconds": 1}',
            "request is not JSON: NaN is not a JSON number",
        ),
        (
            '{"cmd": "flood", "mbps": 1e999, "seconds": 1}',
            "flood: 'mbps' must be finite, got Infinity",
        ),
        ('{"cmd": "fault"}', "fault: missing 'kind' (one of: latency, reset, alloc, clear)"),
        (
            '{"cmd": "fault", "kind": "fire"}',
            'fault: unknown kind "fire" (client faults: latency, reset, alloc, clear)',
        ),
        ('{"cmd": "fault", "kind": "latency"}', "fault latency: missing 'ms'"),
        (
            '{"cmd": "fault", "kind": "latency", "ms": -1}',
            "fault latency: 'ms' must be >= 0, got -1",
        ),
        (
            '{"cmd": "fault", "kind": "reset", "ms": 1}',
            "fault reset: unknown key 'ms' (expected target, kind)",
        ),
        ('{"cmd": "fault", "kind": "alloc"}', "fault alloc: missing 'probability'"),
        (
            '{"cmd": "fault", "kind": "alloc", "probability": 2}',
            "fault alloc: 'probability' must be in 0..1, got 2",
        ),
        (
            '{"cmd": "fault", "kind": "alloc", "probability": 1, "gfp": "some"}',
            "fault alloc: 'gfp' \"some\" is not one of any, atomic, nowait, wait, highmem, nohighmem",
        ),
        (
            '{"cmd": "fault", "kind": "alloc", "probability": 1, "times": -2}',
            "fault alloc: 'times' must be >= -1, got -2",
        ),
        (
            '{"cmd": "fault", "kind": "alloc", "probability": 1, "interval": 0}',
            "fault alloc: 'interval' must be >= 1, got 0",
        ),
        (
            '{"cmd": "fault", "kind": "alloc", "probability": 1, "task": ""}',
            "fault alloc: 'task' must not be empty",
        ),
        (
            '{"cmd": "fault", "target": "moon", "kind": "reset"}',
            "fault: 'target' \"moon\" is not one of client, server",
        ),
        (
            '{"cmd": "fault", "target": "server"}',
            "fault: missing 'kind' for target server, got null",
        ),
        ("[" * 60000, "request is not JSON this endpoint takes: nested too deeply"),
        ("x" * (MAX_LINE + 1), f"request longer than {MAX_LINE} bytes"),
    ],
)
def test_each_bad_request_gets_its_one_line_error(line: str | bytes, error: str) -> None:
    with pytest.raises(CommandError) as info:
        parse_command(line)
    assert str(info.value) == error


# -- the endpoint on a running machine ------------------------------------------------------
@attrs.define
class Harness:
    """A controlled machine (16 MiB, the small scenario's hogs at 1x RAM, 1 ms to the server)
    over the in-memory transport, its control endpoint, and the facts it emitted."""

    machine: ClientMachine
    endpoint: ControlEndpoint
    nursery: trio.Nursery
    facts: list[object]
    ended: trio.Event = attrs.field(factory=trio.Event)
    summary: RunSummary | None = None

    async def connect(self) -> Connection:
        client_end, server_end = trio.testing.memory_stream_pair()
        self.nursery.start_soon(self.endpoint.handle_stream, server_end)
        return Connection(client_end)

    async def ask(self, request: dict[str, Any] | str) -> dict[str, Any]:
        conn = await self.connect()
        answer = await conn.ask(request)
        await conn.stream.aclose()
        return answer

    async def until(self, predicate: Callable[[dict[str, Any]], bool]) -> dict[str, Any]:
        """Poll ``status`` (every 0.1 s of virtual time) until ``predicate`` holds."""
        with trio.fail_after(300):
            while True:
                status = await self.ask({"cmd": "status"})
                if predicate(status):
                    return status
                await trio.sleep(0.1)


@attrs.define
class Connection:
    stream: trio.abc.Stream
    buf: bytearray = attrs.field(factory=bytearray)

    async def send(self, data: bytes) -> None:
        await self.stream.send_all(data)

    async def answer(self) -> dict[str, Any] | None:
        """The next answer line, or None if the endpoint closed the connection."""
        while b"\n" not in self.buf:
            chunk = await self.stream.receive_some()
            if not chunk:
                return None
            self.buf += chunk
        end = self.buf.index(b"\n")
        line = bytes(self.buf[:end])
        del self.buf[: end + 1]
        answer: dict[str, Any] = json.loads(line)
        return answer

    async def ask(self, request: dict[str, Any] | str) -> dict[str, Any]:
        line = request if isinstance(request, str) else json.dumps(request)
        await self.send(line.encode() + b"\n")
        answer = await self.answer()
        assert answer is not None
        return answer


async def start(nursery: trio.Nursery, config: str = "small.toml", **overrides: Any) -> Harness:
    small = {
        "machine.memory": "16M",
        "workloads.0.total": "1x",
        "swap.latency": 0.001,
        "run.stall_seconds": 2.0,
    }
    scenario = load_scenario(CONFIGS / config, {**small, **overrides})
    server = embedded_server(scenario)

    async def connect() -> trio.abc.Stream:
        client_end, server_end = trio.testing.memory_stream_pair()
        nursery.start_soon(server.handle_stream, server_end)
        return client_end

    facts: list[object] = []
    machine = ClientMachine(scenario, connect, observer=facts.append, controlled=True)
    harness = Harness(machine, ControlEndpoint(machine), nursery, facts)

    async def run() -> None:
        supervisor = watchdog_supervisor(scenario.run.stall_seconds, _Quiet())
        harness.summary = await machine.run(supervisor=supervisor)
        harness.ended.set()

    nursery.start_soon(run)
    await machine.ready.wait()
    return harness


class _Quiet:
    def warning(self, *args: Any, **kwargs: Any) -> None:
        pass


async def test_status_answers_with_the_machine_now(
    autojump_clock: trio.abc.Clock, nursery: trio.Nursery
) -> None:
    h = await start(nursery)
    status = await h.until(lambda s: s["workloads_done"])
    assert status["ok"] is True and status["cmd"] == "status"
    assert status["outcome"] == "running" and status["machine"] == "client0"
    sample = status["sample"]
    assert sample["zones"][0]["name"] == "Normal"
    assert sample["zones"][0]["min"] < sample["zones"][0]["low"] < sample["zones"][0]["high"]
    assert status["vmstat"]["nr_free_pages"] == sample["nr_free_pages"]
    assert set(status["psi"]) == {"some", "full"}
    assert status["integrity"]["pages_verified"] == 4096  # the configured hogs' 1x RAM
    assert status["swap_device"]["connected"] is True
    assert status["pressure"] == {"hogs": [], "floods": []}
    assert status["faults"] == {"fired": {"alloc": 0, "latency": 0, "reset": 0}, "active": {}}
    assert status["t"] > 0 and "policy_report" in status and "net" in status


async def test_an_idle_controlled_machine_is_not_a_deadlock(
    autojump_clock: trio.abc.Clock, nursery: trio.Nursery
) -> None:
    """Between commands nothing progresses, and the swap socket and the NBD reader wait
    for the server: waits for a peer, which leave the machine quiescent, not stuck."""
    h = await start(nursery)
    await h.until(lambda s: s["workloads_done"])
    await trio.sleep(10 * h.machine.scenario.run.stall_seconds)
    assert h.machine.quiescent()
    status = await h.ask({"cmd": "status"})
    assert status["outcome"] == "running" and h.machine.deadlock is None


async def test_hog_swaps_out_and_release_frees_its_memory(
    autojump_clock: trio.abc.Clock, nursery: trio.Nursery
) -> None:
    h = await start(nursery)
    before = await h.until(lambda s: s["workloads_done"])
    answer = await h.ask({"cmd": "hog", "pages": 6144, "processes": 2})
    assert answer == {
        "ok": True,
        "cmd": "hog",
        "id": "hog1",
        "processes": ["hog1/0", "hog1/1"],
        "pages_per_process": 3072,
        "pages": 6144,
    }
    held = await h.until(lambda s: s["pressure"]["hogs"][0]["state"] == "holding")
    hog = held["pressure"]["hogs"][0]
    assert hog["finished"] == 2 and hog["resident"] + hog["swapped"] == 6144
    assert held["vmstat"]["pswpout"] > before["vmstat"]["pswpout"]  # 1.5x RAM: it swapped
    assert held["vmstat"]["nr_anon_pages"] == hog["resident"] > 0
    verified = held["integrity"]["pages_verified"] - before["integrity"]["pages_verified"]
    assert verified == 6144 and held["integrity"]["corrupt"] == 0

    released = await h.ask({"cmd": "release"})
    assert released["ok"] and released["hogs"] == ["hog1"] and released["floods"] == []
    after = await h.ask({"cmd": "status"})
    assert after["pressure"]["hogs"][0]["state"] == "released"
    assert after["vmstat"]["nr_anon_pages"] == 0
    assert after["sample"]["nr_free_pages"] > held["sample"]["nr_free_pages"] + 3000
    assert (await h.ask({"cmd": "release"}))["hogs"] == []  # nothing left to release


async def test_a_paced_hog_keeps_to_its_rate(
    autojump_clock: trio.abc.Clock, nursery: trio.Nursery
) -> None:
    h = await start(nursery)
    await h.until(lambda s: s["workloads_done"])
    t0 = trio.current_time()
    await h.ask({"cmd": "hog", "pages": 400, "rate": 200, "processes": 2})
    await h.until(lambda s: s["pressure"]["hogs"][0]["state"] == "holding")
    # 400 pages written and 400 verified at 200 pages/s: four seconds.
    assert 3.9 <= trio.current_time() - t0 <= 4.5


async def test_release_while_the_hog_runs_ends_it_at_its_next_page(
    autojump_clock: trio.abc.Clock, nursery: trio.Nursery
) -> None:
    h = await start(nursery)
    await h.until(lambda s: s["workloads_done"])
    await h.ask({"cmd": "hog", "pages": 2000, "rate": 100})
    await trio.sleep(1)
    await h.ask({"cmd": "release"})
    status = await h.until(lambda s: s["pressure"]["hogs"][0]["state"] == "released")
    assert status["vmstat"]["nr_anon_pages"] == 0
    assert status["pressure"]["hogs"][0]["oom_killed"] == 0  # a release is not an OOM kill


async def test_flood_moves_the_net_counters_then_stops(
    autojump_clock: trio.abc.Clock, nursery: trio.Nursery
) -> None:
    h = await start(nursery)
    await h.until(lambda s: s["workloads_done"])
    answer = await h.ask({"cmd": "flood", "mbps": 8, "seconds": 1.5})
    assert answer == {
        "ok": True,
        "cmd": "flood",
        "id": "flood1",
        "socket": "flood1",
        "seconds": 1.5,
    }
    running = await h.until(lambda s: s["pressure"]["floods"][0]["rx_bytes"] > 0)
    sock = next(s for s in running["net"]["sockets"] if s["name"] == "flood1")
    assert sock["memalloc"] is False and sock["rx_bytes"] > 0
    done = await h.until(lambda s: s["pressure"]["floods"][0]["state"] == "done")
    flood = done["pressure"]["floods"][0]
    # 1 MB/s for 1.5 s, read by a consumer of 256 KiB/s: its rcvbuf filled and the rest waited.
    assert 256 * 1024 <= flood["rx_bytes"] <= 1_500_000
    assert flood["rx_bufs"] == 0  # its buffers went back when it ended


async def test_release_stops_a_flood(autojump_clock: trio.abc.Clock, nursery: trio.Nursery) -> None:
    h = await start(nursery)
    await h.until(lambda s: s["workloads_done"])
    await h.ask({"cmd": "flood", "mbps": 100, "seconds": 1000})
    await h.until(lambda s: s["pressure"]["floods"][0]["rx_bytes"] > 0)
    assert (await h.ask({"cmd": "release"}))["floods"] == ["flood1"]
    await trio.testing.wait_all_tasks_blocked()
    status = await h.ask({"cmd": "status"})
    assert status["pressure"]["floods"][0]["state"] == "released"
    assert status["pressure"]["floods"][0]["rx_bufs"] == 0


async def test_faults_through_the_endpoint(
    autojump_clock: trio.abc.Clock, nursery: trio.Nursery
) -> None:
    h = await start(nursery)
    await h.until(lambda s: s["workloads_done"])
    latency = await h.ask({"cmd": "fault", "kind": "latency", "ms": 3})
    assert latency == {
        "ok": True,
        "cmd": "fault",
        "kind": "latency",
        "latency_ms": 3.0,
        "socket": "nbd0",
    }
    alloc = await h.ask(
        {
            "cmd": "fault",
            "kind": "alloc",
            "probability": 1,
            "times": 5,
            "gfp": "atomic",
            "task": "eth0.rx",  # the NAPI softirq refilling the ring
        }
    )
    assert alloc["ok"] and alloc["times_left"] == 5 and alloc["gfp"] == "atomic"
    reset = await h.ask({"cmd": "fault", "kind": "reset"})
    assert reset == {"ok": True, "cmd": "fault", "kind": "reset", "socket": "nbd0", "connects": 1}
    again = await h.ask({"cmd": "fault", "kind": "reset"})
    assert again == {
        "ok": False,
        "error": "fault: the swap connection is already down (reconnecting)",
    }
    # Pressure makes the device notice, reconnect and swap on, the RX faults firing.
    await h.ask({"cmd": "hog", "pages": 6000})
    status = await h.until(lambda s: s["pressure"]["hogs"][0]["state"] == "holding")
    assert status["swap_device"]["reconnects"] == 1
    assert status["faults"]["fired"] == {"alloc": 5, "latency": 1, "reset": 1}
    assert status["integrity"]["corrupt"] == 0
    assert h.machine.swap_socket is not None and h.machine.swap_socket.latency == 0.003
    cleared = await h.ask({"cmd": "fault", "kind": "clear"})
    assert cleared["ok"] and cleared["faults"]["active"] == {}
    assert h.machine.swap_socket.latency == 0.001  # the scenario's again
    assert [f.kind for f in h.facts if isinstance(f, FaultFired)] == (
        ["latency", "reset"] + ["alloc"] * 5
    )


async def test_server_faults_need_an_embedded_server(
    autojump_clock: trio.abc.Clock, nursery: trio.Nursery
) -> None:
    h = await start(nursery)
    answer = await h.ask({"cmd": "fault", "target": "server", "kind": "stall"})
    assert answer["ok"] is False and "target 'server' needs a server" in answer["error"]

    class Embedded:
        def __init__(self) -> None:
            self.applied: list[tuple[str, dict[str, Any]]] = []

        async def apply(self, kind: str, params: dict[str, Any]) -> dict[str, Any]:
            if kind != "delay":
                raise ValueError(f"unknown server fault {kind!r}")
            self.applied.append((kind, params))
            return {"delay": params["seconds"]}

        def report(self) -> dict[str, Any]:
            return {"applied": len(self.applied)}

    embedded = Embedded()
    h.endpoint.server_faults = embedded
    ok = await h.ask({"cmd": "fault", "target": "server", "kind": "delay", "seconds": 0.5})
    assert ok == {"ok": True, "cmd": "fault", "target": "server", "kind": "delay", "delay": 0.5}
    bad = await h.ask({"cmd": "fault", "target": "server", "kind": "explode"})
    assert bad == {"ok": False, "error": "fault: unknown server fault 'explode'"}
    assert (await h.ask({"cmd": "status"}))["server_faults"] == {"applied": 1}


async def test_stop_ends_the_run_with_its_summary(
    autojump_clock: trio.abc.Clock, nursery: trio.Nursery
) -> None:
    h = await start(nursery)
    await h.until(lambda s: s["workloads_done"])
    await h.ask({"cmd": "hog", "pages": 5000})
    await h.until(lambda s: s["pressure"]["hogs"][0]["state"] == "holding")
    conn = await h.connect()
    answer = await conn.ask({"cmd": "stop"})
    assert answer["ok"] is True and answer["cmd"] == "stop"
    with trio.fail_after(60):
        await h.ended.wait()
    summary = h.summary
    assert summary is not None
    assert summary.outcome == "completed" and summary.reason == ""
    assert summary.integrity.corrupt == 0
    assert summary.integrity.pages_verified == 4096 + 5000
    assert summary.pressure["hogs"][0]["id"] == "hog1"
    assert summary.faults["fired"] == {"alloc": 0, "latency": 0, "reset": 0}
    after = await conn.ask({"cmd": "hog", "pages": 10})
    assert after == {"ok": False, "error": "hog: the run has ended"}


async def test_stop_before_the_workloads_end_cuts_them_short(
    autojump_clock: trio.abc.Clock, nursery: trio.Nursery
) -> None:
    h = await start(nursery, **{"workloads.0.total": "4x"})
    assert (await h.ask({"cmd": "stop"}))["ok"]
    with trio.fail_after(60):
        await h.ended.wait()
    assert h.summary is not None
    assert h.summary.outcome == "completed"
    assert h.summary.reason == "stopped by control before the workloads finished"


async def test_the_watchdog_still_sees_a_deadlock_under_control(
    autojump_clock: trio.abc.Clock, nursery: trio.Nursery
) -> None:
    overrides = {
        "workloads.0.processes": 8,
        "workloads.0.total": "4x",
        "swap.latency": 0.002,
        "nic.ring_size": 64,  # scaled with the 16M machine, as test_outcomes.py's SMALL
    }
    h = await start(nursery, "swap-over-nbd.toml", **overrides)
    with trio.fail_after(60):  # virtual: a machine that does not deadlock waits for "stop"
        await h.ended.wait()
    assert h.summary is not None and h.summary.outcome == "deadlock"
    assert "rx_buffer(eth0 ring)" in h.summary.deadlock.cycle


async def test_the_machine_survives_garbage_on_the_control_socket(
    autojump_clock: trio.abc.Clock, nursery: trio.Nursery
) -> None:
    h = await start(nursery)
    conn = await h.connect()
    garbage = {
        b"\x00\xff\xfe": "request is not UTF-8 (byte 1)",
        b"{": "request is not JSON: Expecting property name enclosed in double quotes "
        "(line 1 column 2)",
        b"[]": "request must be a JSON object, got an array",
        b"null": "request must be a JSON object, got null",
        b'{"cmd": {}}': "'cmd' must be a string, got an object {}",
        b"[" * 50000: "request is not JSON this endpoint takes: nested too deeply",
        b"": 'empty request: expected one JSON object like {"cmd": "status"}',
    }
    for line, error in garbage.items():
        await conn.send(line + b"\n")
        assert await conn.answer() == {"ok": False, "error": error}
    await conn.send(b'{"cmd": "status"}\n{"cmd": "status", "x": 1}\n')  # two at once
    first, second = await conn.answer(), await conn.answer()
    assert first is not None and first["ok"] is True
    assert second == {"ok": False, "error": "status: unknown key 'x' (expected no arguments)"}

    # A line without end: answered once it is too long, and the connection closed.
    await conn.send(b"7" * (MAX_LINE + 10))
    assert await conn.answer() == {"ok": False, "error": f"request longer than {MAX_LINE} bytes"}
    assert await conn.answer() is None
    # A peer that goes away mid-line or mid-answer.
    half = await h.connect()
    await half.send(b'{"cmd": "sta')
    await half.stream.aclose()
    rude = await h.connect()
    await rude.send(b'{"cmd": "status"}\n')
    await rude.stream.aclose()
    await trio.testing.wait_all_tasks_blocked()

    status = await h.ask({"cmd": "status"})
    assert status["ok"] and status["outcome"] == "running"
    await trio.testing.wait_all_tasks_blocked()
    assert h.endpoint.connections == 0


async def test_several_connections_at_once(
    autojump_clock: trio.abc.Clock, nursery: trio.Nursery
) -> None:
    h = await start(nursery)
    a, b = await h.connect(), await h.connect()
    await a.send(b'{"cmd": "status"}\n')
    await b.send(b'{"cmd": "hog", "pages": 10}\n')
    answer_b = await b.answer()
    answer_a = await a.answer()
    assert answer_a is not None and answer_a["cmd"] == "status"
    assert answer_b is not None and answer_b["id"] == "hog1"
    assert h.endpoint.connections == 2


async def test_serve_control_on_port_zero_reports_its_address(nursery: trio.Nursery) -> None:
    scenario = load_scenario(None)
    machine = ClientMachine(scenario, _never_connect)
    endpoint = ControlEndpoint(machine)
    host, port = await nursery.start(serve_control, endpoint, "127.0.0.1", 0)
    assert host == "127.0.0.1" and port > 0
    stream = await trio.open_tcp_stream(host, port)
    conn = Connection(stream)
    # Parse errors need no running machine.
    assert await conn.ask("nonsense") == {
        "ok": False,
        "error": "request is not JSON: Expecting value (line 1 column 1)",
    }
    await stream.aclose()


async def _never_connect() -> trio.abc.Stream:
    raise AssertionError("not used")


# -- the command line -----------------------------------------------------------------------
def test_a_remote_control_address_needs_allow_remote_control(cli: Cli) -> None:
    result = cli("client", "--server", "nbd://127.0.0.1:1/swap", "--control", "192.0.2.1:0")
    assert result.returncode == 2
    assert "--allow-remote-control" in one_line(result)


@pytest.mark.parametrize(
    ("argv", "request_line"),
    [
        (["status"], {"cmd": "status"}),
        (["hog", "--pages", "10"], {"cmd": "hog", "pages": 10}),
        (
            ["hog", "--pages", "10", "--rate", "5", "--processes", "2"],
            {"cmd": "hog", "pages": 10, "rate": 5.0, "processes": 2},
        ),
        (["flood", "--mbps", "8", "--seconds", "2"], {"cmd": "flood", "mbps": 8.0, "seconds": 2.0}),
        (["fault", "latency", "--ms", "3"], {"cmd": "fault", "kind": "latency", "ms": 3.0}),
        (["fault", "reset"], {"cmd": "fault", "kind": "reset"}),
        (
            ["fault", "alloc", "--probability", "0.1", "--times", "-1", "--gfp", "atomic"],
            {"cmd": "fault", "kind": "alloc", "probability": 0.1, "times": -1, "gfp": "atomic"},
        ),
        (["fault", "clear"], {"cmd": "fault", "kind": "clear"}),
        (["release"], {"cmd": "release"}),
        (["stop"], {"cmd": "stop"}),
        (
            ["server-fault", "error", "--export", "swap", "--command", "write", "--rate", "0.01"],
            {
                "cmd": "fault",
                "target": "server",
                "kind": "error",
                "export": "swap",
                "command": "write",
                "rate": 0.01,
            },
        ),
        (
            ["server-fault", "delay", "--export", "swap", "--seconds", "0.5"],
            {"cmd": "fault", "target": "server", "kind": "delay", "export": "swap", "seconds": 0.5},
        ),
        (["server-fault", "drop"], {"cmd": "fault", "target": "server", "kind": "drop"}),
        (["server-fault", "restart"], {"cmd": "fault", "target": "server", "kind": "restart"}),
    ],
)
def test_pressure_arguments_become_requests_the_endpoint_accepts(
    argv: list[str], request_line: dict[str, Any]
) -> None:
    from testbed.cli import build_parser, pressure_request

    line = pressure_request(build_parser().parse_args(["pressure", "--control", ":1", *argv]))
    assert json.loads(line) == request_line
    parse_command(line)  # and the endpoint takes it


def test_pressure_usage_errors_and_unreachable_endpoint(cli: Cli) -> None:
    bad = cli("pressure", "--control", "127.0.0.1:1", "hog", "--pages", "many")
    assert bad.returncode == 2 and "'many'" in one_line(bad)
    missing = cli("pressure", "--control", "127.0.0.1:1", "fault", "alloc")
    assert missing.returncode == 2 and "--probability" in one_line(missing)
    no_export = cli("pressure", "--control", "127.0.0.1:1", "server-fault", "stall")
    assert no_export.returncode == 2 and "--export" in one_line(no_export)
    with unused_port() as port:
        gone = cli("pressure", "--control", f"127.0.0.1:{port}", "status")
    assert gone.returncode == 1
    assert f"cannot reach 127.0.0.1:{port}" in one_line(gone)


# -- real processes -------------------------------------------------------------------------


@contextlib.contextmanager
def unused_port() -> Iterator[int]:
    """A loopback port nobody listens on (bound, not listening, while in use)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        yield sock.getsockname()[1]


async def _pressure(address: str, *args: str) -> tuple[int, dict[str, Any]]:
    result = await trio.run_process(
        [sys.executable, "-P", "-m", "testbed.cli", "pressure", "--control", address, *args],
        capture_stdout=True,
        capture_stderr=True,
        check=False,
    )
    return result.returncode, json.loads(result.stdout)


async def _first_line(stream: trio.abc.ReceiveStream) -> str:
    buf = b""
    while b"\n" not in buf:
        chunk = await stream.receive_some()
        assert chunk, f"stream ended before a line: {buf!r}"
        buf += chunk
    return buf.split(b"\n", 1)[0].decode()


async def test_client_and_pressure_as_processes(tmp_path: Path, nursery: trio.Nursery) -> None:
    """netswap server, netswap client --control 127.0.0.1:0, and netswap pressure: status,
    hog (until it swaps), a bad command, stop; the client exits 0 with its summary."""
    with trio.fail_after(40):
        server_log = tmp_path / "server.jsonl"
        server = await nursery.start(
            _process,
            [
                "server",
                "--listen",
                "127.0.0.1:0",
                "--export",
                "swap:256M",
                "--log-file",
                str(server_log),
            ],
        )
        while not server_log.exists() or not server_log.read_text().endswith("\n"):
            assert server.returncode is None
            await trio.sleep(0.05)
        port = json.loads(server_log.read_text().splitlines()[0])["port"]

        summary_path = tmp_path / "summary.json"
        client = await trio.lowlevel.open_process(
            [
                sys.executable, "-P", "-m", "testbed.cli", "client",
                "--server", f"nbd://127.0.0.1:{port}/swap",
                "--config", str(CONFIGS / "small.toml"),
                "--set", "machine.memory=16M",
                "--set", "workloads.0.total=0.5x",
                "--set", "workloads.0.processes=2",
                "--control", "127.0.0.1:0",
                "--summary", str(summary_path),
                "--log-file", str(tmp_path / "client.jsonl"),
            ],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )  # fmt: skip
        try:
            assert client.stderr is not None and client.stdout is not None
            line = await _first_line(client.stderr)
            assert line.startswith("control listening on 127.0.0.1:")
            address = line.rsplit(" ", 1)[1]

            code, status = await _pressure(address, "status")
            assert code == 0 and status["ok"] and status["outcome"] == "running"
            baseline = status["vmstat"]["pswpout"]

            code, hog = await _pressure(address, "hog", "--pages", "6000", "--processes", "2")
            assert code == 0 and hog["id"] == "hog1" and hog["pages"] == 6000
            while True:  # polling a condition of another process, with the deadline above
                code, status = await _pressure(address, "status")
                assert code == 0
                if status["vmstat"]["pswpout"] > baseline:
                    break
                await trio.sleep(0.1)

            code, error = await _pressure(address, "raw", '{"cmd": "hog", "pages": -1}')
            assert code == 2
            assert error == {"ok": False, "error": "hog: 'pages' must be in 1..2147483648, got -1"}

            code, stop = await _pressure(address, "stop")
            assert code == 0 and stop["ok"] and stop["cmd"] == "stop"
            assert await client.wait() == 0
            printed = (await client.stdout.receive_some()).decode()
            assert printed.startswith("client0: completed")
        finally:
            if client.returncode is None:
                client.kill()
                await client.wait()
        summary = json.loads(summary_path.read_text())
        assert summary["outcome"] == "completed"
        assert summary["integrity"]["corrupt"] == 0
        assert summary["pressure"]["hogs"][0]["id"] == "hog1"
        server.terminate()


async def test_server_faults_from_the_command_line(tmp_path: Path, nursery: trio.Nursery) -> None:
    """netswap server --control 127.0.0.1:0 and netswap pressure server-fault: a write
    error rate of 1 fails writes with the chosen errno, status counts them, clear ends it."""
    with trio.fail_after(40):
        log_path = tmp_path / "server.jsonl"
        server = await trio.lowlevel.open_process(
            [
                sys.executable, "-P", "-m", "testbed.cli", "server",
                "--listen", "127.0.0.1:0", "--export", "swap:1M",
                "--control", "127.0.0.1:0", "--log-file", str(log_path),
            ],
            stdin=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )  # fmt: skip
        try:
            assert server.stderr is not None
            line = await _first_line(server.stderr)
            assert line.startswith("control listening on 127.0.0.1:")
            address = line.rsplit(" ", 1)[1]
            # The control endpoint starts first; the NBD listener logs its port just after.
            while not (port := _listening_port(log_path)):  # another process; deadline above
                assert server.returncode is None
                await trio.sleep(0.05)
            stream = await trio.open_tcp_stream("127.0.0.1", port)
            client = await NBDClient.over(stream, "swap", nursery=nursery)

            fail = ("server-fault", "error", "--export", "swap", "--command", "write")
            code, answer = await _pressure(address, *fail, "--rate", "1", "--errno", "ENOSPC")
            assert code == 0 and answer["ok"] and answer["target"] == "server"
            with pytest.raises(NBDError) as info:
                await client.write(0, b"x" * 4096)
            assert info.value.errno == Errno.ENOSPC
            code, status = await _pressure(address, "status")
            assert code == 0 and status["exports"]["swap"]["counts"] == {"error.write.ENOSPC": 1}
            code, bad = await _pressure(address, *fail, "--rate", "2")
            assert code == 2 and not bad["ok"] and "rate" in bad["error"]
            code, _ = await _pressure(address, "server-fault", "clear", "--export", "swap")
            assert code == 0
            await client.write(0, b"y" * 4096)
            assert await client.read(0, 4096) == b"y" * 4096
            await client.close()
        finally:
            server.terminate()
            assert await server.wait() == 0


def _listening_port(log: Path) -> int | None:
    """The port of ``server.listening`` in a server's JSON log, once it is there."""
    for line in log.read_text().splitlines() if log.exists() else []:
        try:
            event = json.loads(line)
        except ValueError:
            continue  # the last line, still being written
        if event["event"] == "server.listening":
            return int(event["port"])
    return None


async def _process(
    args: list[str], *, task_status: trio.TaskStatus[trio.Process] = trio.TASK_STATUS_IGNORED
) -> None:
    """``netswap ARGS`` as a child process, killed when the test ends."""
    await trio.run_process(
        [sys.executable, "-P", "-m", "testbed.cli", *args],
        check=False,
        stdin=subprocess.DEVNULL,
        task_status=task_status,
    )


# -- netswap server --control: server faults at run time ----------------------------------


async def test_a_servers_status_counts_a_live_connections_requests(
    autojump_clock: trio.abc.Clock,
) -> None:
    """Watched while a swap device (one long connection) works, the status shows its work."""
    import trio.testing

    from client.nbd_client import NBDClient
    from server import Export, NBDServer
    from server.config import ExportConfig, ServerConfig
    from testbed.control import ServerControlEndpoint

    cfg = ServerConfig(listen="127.0.0.1:0", exports=(ExportConfig(name="swap", size=1 << 20),))
    server = NBDServer(cfg, [Export.from_config(e) for e in cfg.exports])
    endpoint = ServerControlEndpoint(server)
    client_end, server_end = trio.testing.memory_stream_pair()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(server.handle_stream, server_end)
        client = await NBDClient.over(client_end, "swap", nursery=nursery)
        await client.write(0, b"w" * 4096)
        await client.write(4096, b"w" * 4096)
        status, _after = await endpoint.execute('{"cmd": "status"}')
        stats = status["stats"]
        assert (stats["live"], stats["requests"], stats["bytes_written"]) == (1, 2, 8192)
        await client.close()


async def test_a_servers_endpoint_sets_and_clears_its_faults() -> None:
    from server import Export, NBDServer
    from server.config import ExportConfig, ServerConfig
    from testbed.control import ServerControlEndpoint

    cfg = ServerConfig(listen="127.0.0.1:0", exports=(ExportConfig(name="disk", size=1 << 20),))
    server = NBDServer(cfg, [Export.from_config(e) for e in cfg.exports])
    endpoint = ServerControlEndpoint(server)
    faults = server.exports["disk"].faults

    async def ask(request: dict[str, Any]) -> dict[str, Any]:
        answer, _after = await endpoint.execute(json.dumps(request))
        return answer

    fault = {"cmd": "fault", "target": "server", "export": "disk"}
    assert (await ask({**fault, "kind": "delay", "seconds": 0.25}))["ok"]
    assert faults.delay == 0.25
    answer = await ask({**fault, "kind": "error", "command": "write", "rate": 1, "errno": "ENOSPC"})
    assert answer["ok"] and faults.error_rate == {"write": (1.0, "ENOSPC")}
    assert (await ask({**fault, "kind": "stall", "seconds": 5}))["ok"] and faults.stalled
    assert (await ask({**fault, "kind": "clear"}))["ok"]
    assert faults.delay == 0 and faults.error_rate == {} and not faults.stalled
    status = await ask({"cmd": "status"})
    assert status["ok"] and set(status["exports"]) == {"disk"}
    # Bad input: an error naming it, nothing changed.
    for request, needle in [
        ({**fault, "kind": "delay", "seconds": -1}, "'seconds' must be >= 0"),
        ({**fault, "export": "nope", "kind": "delay", "seconds": 1}, 'no export "nope"'),
        ({**fault, "kind": "error", "command": "frob", "rate": 0.5}, "frob"),
        ({**fault, "kind": "melt"}, "unknown kind"),
        ({**fault, "kind": "delay", "seconds": 1, "extra": 1}, "unknown key 'extra'"),
        ({"cmd": "hog", "pages": 10}, "a server takes only"),
        ({"cmd": "fault", "kind": "reset"}, "a server takes only"),
    ]:
        answer = await ask(request)
        assert not answer["ok"] and needle in answer["error"], (request, answer)
    assert faults.delay == 0 and faults.error_rate == {}


def test_the_progress_line_draws_on_a_terminal_and_clears_at_the_end() -> None:
    import io

    from testbed.log import ProgressLine

    out = io.StringIO()
    line = ProgressLine(out)
    sample = {"event": "vm.sample", "machine": "m", "policy": "none", "t": 1.5,
              "nr_free_pages": 300, "zones": [{"min": 256}], "nr_writeback": 4,
              "pswpout": 10, "pswpin": 2, "drops": 0, "pages_verified": 7}  # fmt: skip
    assert line(None, "info", dict(sample)) == sample  # the event itself goes on unchanged
    assert out.getvalue().startswith("\r\x1b[2K") and "free 300 (min 256)" in out.getvalue()
    line(None, "info", {"event": "run.summary"})
    assert out.getvalue().endswith("\r\x1b[2K")  # cleared before the summary is printed
