"""The control endpoint on a connection: request lines in, answer lines out, in order
(:class:`Endpoint`); :class:`ControlEndpoint` executes the commands on a client machine.
``serve_control`` listens for them."""

from __future__ import annotations

import enum
import itertools
import json
from collections.abc import Callable
from typing import Any, Protocol

import attrs
import structlog
import trio

from client.machine import ClientMachine, MachineStateError
from client.summary import unstructure_status
from nbdproto.config import ConfigError
from server.config import is_loopback
from testbed.control.commands import (
    MAX_LINE,
    Command,
    CommandError,
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
)
from testbed.events import (
    ControlCommand,
    ControlConnectionClosed,
    ControlConnectionOpened,
    ControlError,
    ControlLineTooLong,
    ControlListening,
    ControlRefused,
    ControlRemote,
)
from testbed.log import emit

#: ``--control HOST`` without a port.
DEFAULT_CONTROL_PORT = 10810
RECEIVE_SIZE = 16 * 1024

#: One answer: ``{"ok": true, "cmd": ..., ...}`` or ``{"ok": false, "error": ...}``.
Answer = dict[str, Any]


class ServerFaults(Protocol):
    """The extension point for server faults (delay, error rate, stall, restart: built in
    server/faults.py).  Where the server runs in the same process as the machine
    (``netswap run``, tests), pass an adapter to ``ControlEndpoint(server_faults=...)``;
    ``{"cmd": "fault", "target": "server", "kind": K, ...}`` then reaches ``apply(K, {...})``
    and ``status`` includes ``report()``.  ``apply`` raises ``ValueError`` (one line) for
    bad arguments."""

    async def apply(self, kind: str, params: dict[str, Any]) -> dict[str, Any]: ...

    def report(self) -> dict[str, Any]: ...


def _jsonable(value: Any) -> Any:
    if isinstance(value, enum.Enum):
        return value.name or str(value.value)
    return str(value)


def encode_answer(answer: Answer) -> bytes:
    """One answer line."""
    return json.dumps(answer, default=_jsonable, separators=(",", ":")).encode() + b"\n"


def error_answer(message: str) -> Answer:
    return {"ok": False, "error": message}


class Endpoint:
    """Serves control connections (``handle_stream``); what a request does is ``execute``'s."""

    def __init__(self, *, log: Any = None) -> None:
        self.log = log if log is not None else structlog.get_logger()
        self._conns = itertools.count(1)
        self.connections = 0  # open right now

    async def execute(self, line: bytes | str) -> tuple[Answer, Callable[[], None] | None]:
        """The answer to one request line, and what to do once it is sent (``stop``)."""
        raise NotImplementedError

    async def handle_stream(self, stream: trio.abc.Stream) -> None:
        """Serve one connection until the peer closes it (or sends an over-long line).
        Never raises: whatever the peer does, only this connection is affected."""
        conn = next(self._conns)
        log = self.log.bind(control_conn=conn)
        self.connections += 1
        emit(ControlConnectionOpened(), log)
        buf = bytearray()
        scanned = 0
        try:
            while True:
                end = buf.find(b"\n", scanned)
                if end < 0:
                    if len(buf) > MAX_LINE:
                        emit(ControlLineTooLong(bytes=len(buf)), log)
                        await stream.send_all(
                            encode_answer(error_answer(f"request longer than {MAX_LINE} bytes"))
                        )
                        return
                    scanned = len(buf)
                    data = await stream.receive_some(RECEIVE_SIZE)
                    if not data:
                        return
                    buf += data
                    continue
                line = bytes(buf[:end])
                del buf[: end + 1]
                scanned = 0
                answer, after = await self.execute(line)
                if answer["ok"]:
                    emit(ControlCommand(cmd=answer["cmd"]), log)
                else:
                    emit(ControlRefused(error=answer["error"]), log)
                await stream.send_all(encode_answer(answer))
                if after is not None:
                    after()
                if len(line) > MAX_LINE:
                    return
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass
        except Exception:  # a bug here must not take the machine down with it
            emit(ControlError(), log)
        finally:
            self.connections -= 1
            emit(ControlConnectionClosed(), log)
            await trio.aclose_forcefully(stream)


class ControlEndpoint(Endpoint):
    """Executes commands on one client machine."""

    def __init__(
        self,
        machine: ClientMachine,
        *,
        server_faults: ServerFaults | None = None,
        log: Any = None,
    ) -> None:
        super().__init__(log=log)
        self.machine = machine
        self.server_faults = server_faults

    async def execute(self, line: bytes | str) -> tuple[Answer, Callable[[], None] | None]:
        try:
            command = parse_command(line)
        except CommandError as exc:
            return error_answer(str(exc)), None
        # Commands act on a running machine: wait until it is (swap connected, kswapd up).
        await self.machine.ready.wait()
        try:
            result, after = await self._dispatch(command)
        except (CommandError, MachineStateError, ValueError) as exc:
            return error_answer(f"{command.cmd}: {exc}"), None
        return {"ok": True, "cmd": command.cmd, **result}, after

    async def _dispatch(self, command: Command) -> tuple[dict[str, Any], Callable[[], None] | None]:
        m = self.machine
        match command:
            case Status():
                status = m.status()
                if self.server_faults is not None:
                    status = attrs.evolve(status, server_faults=self.server_faults.report())
                return unstructure_status(status), None
            case Hog(pages=pages, rate=rate, processes=processes):
                return m.inject_hog(pages, rate=rate, processes=processes), None
            case Flood(mbps=mbps, seconds=seconds):
                return m.inject_flood(mbps, seconds), None
            case FaultLatency(ms=ms):
                return {"kind": "latency", **m.set_swap_latency(ms)}, None
            case FaultReset():
                return {"kind": "reset", **await m.reset_swap()}, None
            case FaultAlloc(config=config):
                return {"kind": "alloc", **m.set_alloc_fault(config)}, None
            case FaultClear():
                return {"kind": "clear", **m.clear_faults()}, None
            case ServerFault(kind=kind, params=params):
                if self.server_faults is None:
                    raise CommandError(
                        "target 'server' needs a server running in this process; this "
                        "client's server is a separate process"
                    )
                result = await self.server_faults.apply(kind, params)
                return {"target": "server", "kind": kind, **result}, None
            case Release():
                return m.release(), None
            case Stop():
                m.require_running()  # "the run has ended" rather than a silent success
                return {"t": m.status().t}, lambda: m.stop("stopped by control")
        raise AssertionError(f"unhandled command {command!r}")  # pragma: no cover


def check_control_address(host: str, *, allow_remote: bool) -> None:
    """``--control`` must be loopback unless ``--allow-remote-control``."""
    if not allow_remote and not is_loopback(host):
        raise ConfigError(
            f"--control {host}: not a loopback address; pass --allow-remote-control to "
            "accept commands from the network"
        )


async def serve_control(
    endpoint: Endpoint,
    host: str,
    port: int,
    *,
    task_status: trio.TaskStatus[tuple[str, int]] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Listen on ``host:port`` (port 0: a free one) and serve control connections; the
    bound address is logged (``control.listening``) and reported through ``task_status``."""
    log = endpoint.log
    if not is_loopback(host):
        emit(ControlRemote(host=host), log)
    listeners = await trio.open_tcp_listeners(port, host=host)
    if port == 0 and len(listeners) > 1:
        # Port 0 on a name with several addresses binds a different port on each: keep one.
        for extra in listeners[1:]:
            await extra.aclose()
        listeners = listeners[:1]
    sockname = listeners[0].socket.getsockname()
    address = (str(sockname[0]), int(sockname[1]))
    emit(ControlListening(host=address[0], port=address[1]), log)
    task_status.started(address)
    await trio.serve_listeners(endpoint.handle_stream, listeners)
