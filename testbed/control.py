"""The runtime control endpoint: push pressure and faults into a running client machine.

``netswap client --control HOST:PORT`` serves it; ``netswap pressure`` is its client.

Protocol: line-delimited JSON over TCP.  Each request is one JSON object on one line, each
answer one JSON object on one line, in order::

    {"cmd": "hog", "pages": 8192, "rate": 2000, "processes": 2}
    {"ok": true, "cmd": "hog", "id": "hog1", ...}
    {"cmd": "hog", "pages": -1}
    {"ok": false, "error": "hog: 'pages' must be >= 1, got -1"}

Commands (``parse_command`` is the reference; unknown keys are errors):

``status``
    the machine now: ``vm.sample``, vmstat, PSI, reserves, net, integrity, injected
    pressure, faults, outcome so far.
``hog`` pages:int>=1, rate:number>0 (pages/s, optional: as fast as it can), processes:int>=1
    new anonymous-memory processes that write and verify their pages, then hold them
    until ``release``.
``flood`` mbps:number>0, seconds:number>0
    a peer floods a new ordinary socket while a slow consumer reads it.
``fault`` kind: ``latency`` (ms:number>=0), ``reset``, ``alloc`` (probability 0..1,
    interval:int>=1, times:int>=-1, space:int>=0 bytes, gfp, task), ``clear``
    client faults (client/faults.py).  ``"target": "server"`` addresses the faults of a
    server embedded in the same process (``ServerFaults``: the extension point for
    server/faults.py); ``netswap client`` has none.
``release``
    injected hogs exit and free their memory; floods stop.
``stop``
    end the run as if its workloads had ended; the answer comes first.

A request that is not one JSON object with a known ``cmd`` and valid, typed arguments is
answered ``{"ok": false, "error": ...}`` naming the bad field or value; a line longer than
``MAX_LINE`` is answered so and the connection closed.  Nothing a peer sends can stop the
machine except ``stop``.  Several connections may be open at once.
"""

from __future__ import annotations

import enum
import itertools
import json
import math
from collections.abc import Callable
from typing import Any, ClassVar, Protocol

import attrs
import structlog
import trio

from client.config import GFP_FILTER_NAMES, AllocFaultConfig
from client.machine import MAX_HOG_PAGES, MAX_HOG_PROCESSES, ClientMachine, MachineStateError
from nbdproto.config import ConfigError
from server.config import is_loopback

#: The longest request line accepted (bytes, without the newline).
MAX_LINE = 64 * 1024
#: ``--control HOST`` without a port.
DEFAULT_CONTROL_PORT = 10810
RECEIVE_SIZE = 16 * 1024

COMMANDS = ("status", "hog", "flood", "fault", "release", "stop")
CLIENT_FAULTS = ("latency", "reset", "alloc", "clear")
FAULT_TARGETS = ("client", "server")


class CommandError(ValueError):
    """A request that is not a valid command; ``str()`` is the one-line answer."""


# -- commands: what a request line means ---------------------------------------------------
@attrs.frozen
class Status:
    cmd: ClassVar[str] = "status"


@attrs.frozen
class Stop:
    cmd: ClassVar[str] = "stop"


@attrs.frozen
class Release:
    cmd: ClassVar[str] = "release"


@attrs.frozen
class Hog:
    cmd: ClassVar[str] = "hog"
    pages: int
    rate: float | None = None  # pages/s over all the processes; None: as fast as they can
    processes: int = 1


@attrs.frozen
class Flood:
    cmd: ClassVar[str] = "flood"
    mbps: float
    seconds: float


@attrs.frozen
class FaultLatency:
    cmd: ClassVar[str] = "fault"
    kind: ClassVar[str] = "latency"
    ms: float


@attrs.frozen
class FaultReset:
    cmd: ClassVar[str] = "fault"
    kind: ClassVar[str] = "reset"


@attrs.frozen
class FaultAlloc:
    cmd: ClassVar[str] = "fault"
    kind: ClassVar[str] = "alloc"
    config: AllocFaultConfig


@attrs.frozen
class FaultClear:
    cmd: ClassVar[str] = "fault"
    kind: ClassVar[str] = "clear"


@attrs.frozen
class ServerFault:
    """A fault for an embedded server: ``kind`` and its arguments, checked by the server's
    own fault code (``ServerFaults.apply``), not here."""

    cmd: ClassVar[str] = "fault"
    kind: str
    params: dict[str, Any] = attrs.field(factory=dict)


Command = (
    Status
    | Stop
    | Release
    | Hog
    | Flood
    | FaultLatency
    | FaultReset
    | FaultAlloc
    | FaultClear
    | ServerFault
)


class ServerFaults(Protocol):
    """The extension point for server faults (delay, error rate, stall, restart: built in
    server/faults.py).  Where the server runs in the same process as the machine
    (``netswap run``, tests), pass an adapter to ``ControlEndpoint(server_faults=...)``;
    ``{"cmd": "fault", "target": "server", "kind": K, ...}`` then reaches ``apply(K, {...})``
    and ``status`` includes ``report()``.  ``apply`` raises ``ValueError`` (one line) for
    bad arguments."""

    async def apply(self, kind: str, params: dict[str, Any]) -> dict[str, Any]: ...

    def report(self) -> dict[str, Any]: ...


# -- parsing ------------------------------------------------------------------------------
def _show(value: Any) -> str:
    """A value as the peer wrote it, kept short for a one-line message."""
    text = json.dumps(value)
    return text if len(text) <= 40 else text[:37] + "..."


def _kind_of(value: Any) -> str:
    if isinstance(value, list):
        return "an array"
    if isinstance(value, dict):
        return "an object"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int | float):
        return "a number"
    return "null" if value is None else type(value).__name__


class _Required:
    pass


_REQUIRED: Any = _Required()


class _Args:
    """The arguments of one request, taken one by one and typed strictly: an integer is a
    JSON integer (not 1.0, not true), a number an integer or a float, finite; null or an
    absent key means the default (an error if there is none)."""

    def __init__(self, what: str, obj: dict[str, Any], allowed: tuple[str, ...]) -> None:
        self.what = what
        self.obj = obj
        unknown = sorted(set(obj) - {"cmd", *allowed})
        if unknown:
            keys = ", ".join(repr(k) for k in unknown)
            expected = ", ".join(allowed) if allowed else "no arguments"
            raise CommandError(f"{what}: unknown key {keys} (expected {expected})")

    def _given(self, key: str, default: Any) -> bool:
        """Is ``key`` given?  If not, is that all right?"""
        if self.obj.get(key) is not None:
            return True
        if isinstance(default, _Required):
            if key in self.obj:
                raise CommandError(f"{self.what}: {key!r} must not be null")
            raise CommandError(f"{self.what}: missing {key!r}")
        return False

    def _wrong_type(self, key: str, expected: str) -> CommandError:
        value = self.obj[key]
        return CommandError(
            f"{self.what}: {key!r} must be {expected}, got {_kind_of(value)} {_show(value)}"
        )

    def integer(
        self, key: str, default: Any = _REQUIRED, *, minimum: int, maximum: int | None = None
    ) -> Any:
        if not self._given(key, default):
            return default
        value = self.obj[key]
        if isinstance(value, bool) or not isinstance(value, int):
            raise self._wrong_type(key, "an integer")
        if value < minimum or (maximum is not None and value > maximum):
            bound = f">= {minimum}" if maximum is None else f"in {minimum}..{maximum}"
            raise CommandError(f"{self.what}: {key!r} must be {bound}, got {value}")
        return value

    def number(
        self,
        key: str,
        default: Any = _REQUIRED,
        *,
        minimum: float = 0.0,
        positive: bool = False,
        maximum: float | None = None,
    ) -> Any:
        if not self._given(key, default):
            return default
        value = self.obj[key]
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise self._wrong_type(key, "a number")
        try:
            number = float(value)
        except OverflowError:
            number = math.inf
        if not math.isfinite(number):
            raise CommandError(f"{self.what}: {key!r} must be finite, got {_show(value)}")
        if positive and not number > 0:
            raise CommandError(f"{self.what}: {key!r} must be > 0, got {_show(value)}")
        if number < minimum or (maximum is not None and number > maximum):
            bound = f">= {minimum:g}" if maximum is None else f"in {minimum:g}..{maximum:g}"
            raise CommandError(f"{self.what}: {key!r} must be {bound}, got {_show(value)}")
        return number

    def text(self, key: str, default: Any = _REQUIRED, *, choices: tuple[str, ...] = ()) -> Any:
        if not self._given(key, default):
            return default
        value = self.obj[key]
        if not isinstance(value, str):
            raise self._wrong_type(key, "a string")
        if choices and value not in choices:
            raise CommandError(
                f"{self.what}: {key!r} {_show(value)} is not one of {', '.join(choices)}"
            )
        if not value:
            raise CommandError(f"{self.what}: {key!r} must not be empty")
        return value


def _reject_constant(name: str) -> Any:
    raise CommandError(f"request is not JSON: {name} is not a JSON number")


def parse_command(line: bytes | str) -> Command:
    """One request line → a command; ``CommandError`` (one line) for anything else."""
    if len(line) > MAX_LINE:
        raise CommandError(f"request longer than {MAX_LINE} bytes")
    if isinstance(line, bytes):
        try:
            line = line.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise CommandError(f"request is not UTF-8 (byte {exc.start})") from None
    if not line.strip():
        raise CommandError('empty request: expected one JSON object like {"cmd": "status"}')
    try:
        obj = json.loads(line, parse_constant=_reject_constant)
    except CommandError:
        raise
    except json.JSONDecodeError as exc:
        raise CommandError(
            f"request is not JSON: {exc.msg} (line {exc.lineno} column {exc.colno})"
        ) from None
    except RecursionError:
        raise CommandError("request is not JSON this endpoint takes: nested too deeply") from None
    except ValueError as exc:  # an integer of more than 4300 digits (sys.int_info)
        reason = str(exc).split(";")[0]
        raise CommandError(f"request is not JSON this endpoint takes: {reason}") from None
    if not isinstance(obj, dict):
        raise CommandError(f"request must be a JSON object, got {_kind_of(obj)}")
    cmd = obj.get("cmd")
    if cmd is None:
        raise CommandError(f"request has no 'cmd' (one of: {', '.join(COMMANDS)})")
    if not isinstance(cmd, str):
        raise CommandError(f"'cmd' must be a string, got {_kind_of(cmd)} {_show(cmd)}")
    parser = _PARSERS.get(cmd)
    if parser is None:
        raise CommandError(f"unknown cmd {_show(cmd)} (one of: {', '.join(COMMANDS)})")
    return parser(obj)


def _parse_status(obj: dict[str, Any]) -> Command:
    _Args("status", obj, ())
    return Status()


def _parse_stop(obj: dict[str, Any]) -> Command:
    _Args("stop", obj, ())
    return Stop()


def _parse_release(obj: dict[str, Any]) -> Command:
    _Args("release", obj, ())
    return Release()


def _parse_hog(obj: dict[str, Any]) -> Command:
    args = _Args("hog", obj, ("pages", "rate", "processes"))
    pages = args.integer("pages", minimum=1, maximum=MAX_HOG_PAGES)
    rate = args.number("rate", None, positive=True)
    processes = args.integer("processes", 1, minimum=1, maximum=MAX_HOG_PROCESSES)
    if pages < processes:
        raise CommandError(f"hog: 'pages' {pages} is fewer than 'processes' {processes}")
    return Hog(pages, rate, processes)


def _parse_flood(obj: dict[str, Any]) -> Command:
    args = _Args("flood", obj, ("mbps", "seconds"))
    return Flood(args.number("mbps", positive=True), args.number("seconds", positive=True))


def _parse_fault(obj: dict[str, Any]) -> Command:
    target = obj.get("target", "client")
    if target not in FAULT_TARGETS:
        raise CommandError(f"fault: 'target' {_show(target)} is not one of client, server")
    kind = obj.get("kind")
    if target == "server":
        if not isinstance(kind, str) or not kind:
            raise CommandError(f"fault: missing 'kind' for target server, got {_show(kind)}")
        params = {k: v for k, v in obj.items() if k not in ("cmd", "target", "kind")}
        return ServerFault(kind, params)
    if kind is None:
        raise CommandError(f"fault: missing 'kind' (one of: {', '.join(CLIENT_FAULTS)})")
    if not isinstance(kind, str) or kind not in CLIENT_FAULTS:
        raise CommandError(
            f"fault: unknown kind {_show(kind)} (client faults: {', '.join(CLIENT_FAULTS)})"
        )
    what = f"fault {kind}"
    common = ("target", "kind")
    if kind == "latency":
        args = _Args(what, obj, (*common, "ms"))
        return FaultLatency(args.number("ms", minimum=0.0))
    if kind == "reset":
        _Args(what, obj, common)
        return FaultReset()
    if kind == "clear":
        _Args(what, obj, common)
        return FaultClear()
    args = _Args(what, obj, (*common, "probability", "interval", "times", "space", "gfp", "task"))
    fields = {
        "probability": args.number("probability", maximum=1.0),
        "interval": args.integer("interval", 1, minimum=1),
        "times": args.integer("times", -1, minimum=-1),
        "space": args.integer("space", 0, minimum=0),
        "gfp": args.text("gfp", "any", choices=GFP_FILTER_NAMES),
        "task": args.text("task", None),
    }
    try:
        return FaultAlloc(AllocFaultConfig(**fields))
    except ConfigError as exc:  # the config's own checks, after the types above
        raise CommandError(f"{what}: {exc}") from None


_PARSERS: dict[str, Callable[[dict[str, Any]], Command]] = {
    "status": _parse_status,
    "hog": _parse_hog,
    "flood": _parse_flood,
    "fault": _parse_fault,
    "release": _parse_release,
    "stop": _parse_stop,
}
assert tuple(_PARSERS) == COMMANDS


# -- answers ------------------------------------------------------------------------------
def _jsonable(value: Any) -> Any:
    if isinstance(value, enum.Enum):
        return value.name or str(value.value)
    return str(value)


def encode_answer(answer: dict[str, Any]) -> bytes:
    """One answer line."""
    return json.dumps(answer, default=_jsonable, separators=(",", ":")).encode() + b"\n"


def error_answer(message: str) -> dict[str, Any]:
    return {"ok": False, "error": message}


# -- the endpoint -------------------------------------------------------------------------
class ControlEndpoint:
    """Executes commands on one machine; serves control connections (``handle_stream``)."""

    def __init__(
        self,
        machine: ClientMachine,
        *,
        server_faults: ServerFaults | None = None,
        log: Any = None,
    ) -> None:
        self.machine = machine
        self.server_faults = server_faults
        self.log = log if log is not None else structlog.get_logger()
        self._conns = itertools.count(1)
        self.connections = 0  # open right now

    async def execute(self, line: bytes | str) -> tuple[dict[str, Any], Callable[[], None] | None]:
        """The answer to one request line, and what to do once it is sent (``stop``)."""
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
                    status["server_faults"] = self.server_faults.report()
                return status, None
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
                return {"t": m.status()["t"]}, lambda: m.stop("stopped by control")
        raise AssertionError(f"unhandled command {command!r}")  # pragma: no cover

    async def handle_stream(self, stream: trio.abc.Stream) -> None:
        """Serve one connection until the peer closes it (or sends an over-long line).
        Never raises: whatever the peer does, only this connection is affected."""
        conn = next(self._conns)
        log = self.log.bind(control_conn=conn)
        self.connections += 1
        log.debug("control.connection_opened")
        buf = bytearray()
        scanned = 0
        try:
            while True:
                end = buf.find(b"\n", scanned)
                if end < 0:
                    if len(buf) > MAX_LINE:
                        log.warning("control.line_too_long", bytes=len(buf))
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
                    log.info("control.command", cmd=answer["cmd"])
                else:
                    log.info("control.refused", error=answer["error"])
                await stream.send_all(encode_answer(answer))
                if after is not None:
                    after()
                if len(line) > MAX_LINE:
                    return
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass
        except Exception:  # a bug here must not take the machine down with it
            log.exception("control.error")
        finally:
            self.connections -= 1
            log.debug("control.connection_closed")
            await trio.aclose_forcefully(stream)


def check_control_address(host: str, *, allow_remote: bool) -> None:
    """``--control`` must be loopback unless ``--allow-remote-control``."""
    if not allow_remote and not is_loopback(host):
        raise ConfigError(
            f"--control {host}: not a loopback address; pass --allow-remote-control to "
            "accept commands from the network"
        )


async def serve_control(
    endpoint: ControlEndpoint,
    host: str,
    port: int,
    *,
    task_status: trio.TaskStatus[tuple[str, int]] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Listen on ``host:port`` (port 0: a free one) and serve control connections; the
    bound address is logged (``control.listening``) and reported through ``task_status``."""
    log = endpoint.log
    if not is_loopback(host):
        log.warning("control.remote", host=host, note="accepting commands from the network")
    listeners = await trio.open_tcp_listeners(port, host=host)
    if port == 0 and len(listeners) > 1:
        # Port 0 on a name with several addresses binds a different port on each: keep one.
        for extra in listeners[1:]:
            await extra.aclose()
        listeners = listeners[:1]
    sockname = listeners[0].socket.getsockname()
    address = (str(sockname[0]), int(sockname[1]))
    log.info("control.listening", host=address[0], port=address[1])
    task_status.started(address)
    await trio.serve_listeners(endpoint.handle_stream, listeners)


# -- a server's own endpoint --------------------------------------------------------------
SERVER_FAULT_KINDS = ("delay", "error", "clear", "stall", "unstall", "drop", "restart")


class NBDServerFaults:
    """``ServerFaults`` for an ``NBDServer`` (server/faults.py), one export at a time:

    ``delay`` (export, seconds), ``error`` (export, command, rate, errno="EIO"), ``clear``
    (export: no delay, no errors, no stall), ``stall`` (export, seconds), ``unstall``
    (export), ``drop`` (export optional: every connection), ``restart``."""

    def __init__(self, server: Any) -> None:
        self.server = server

    async def apply(self, kind: str, params: dict[str, Any]) -> dict[str, Any]:
        if kind not in SERVER_FAULT_KINDS:
            raise ValueError(f"unknown kind {_show(kind)} (server faults: "
                             f"{', '.join(SERVER_FAULT_KINDS)})")  # fmt: skip
        what = f"server fault {kind}"
        if kind == "restart":
            _Args(what, params, ())
            await self.server.restart()
            return {}
        if kind == "drop":
            args = _Args(what, params, ("export",))
            export = args.text("export", None)
            if export is not None:
                self._faults(export)
            return {"connections": self.server.drop_connections(export)}
        keys = {
            "delay": ("export", "seconds"),
            "error": ("export", "command", "rate", "errno"),
            "clear": ("export",),
            "stall": ("export", "seconds"),
            "unstall": ("export",),
        }[kind]
        args = _Args(what, params, keys)
        export = args.text("export")
        faults = self._faults(export)
        if kind == "delay":
            faults.delay = args.number("seconds", minimum=0.0)
        elif kind == "error":
            command = args.text("command")
            faults.set_error(command, args.number("rate", maximum=1.0), args.text("errno", "EIO"))
        elif kind == "stall":
            faults.stall(args.number("seconds", minimum=0.0))
        elif kind == "unstall":
            faults.unstall()
        else:
            faults.delay = 0.0
            faults.clear_errors()
            faults.unstall()
        return {"export": export, "faults": repr(faults)}

    def _faults(self, export: str) -> Any:
        found = self.server.exports.get(export)
        if found is None:
            raise CommandError(
                f"no export {_show(export)} (exports: {', '.join(sorted(self.server.exports))})"
            )
        return found.faults

    def report(self) -> dict[str, Any]:
        return {
            name: {"faults": repr(e.faults), "counts": dict(e.faults.counts)}
            for name, e in self.server.exports.items()
        }


class ServerControlEndpoint(ControlEndpoint):
    """``netswap server --control``: ``status`` and ``fault`` with ``"target": "server"``
    (the client's commands have no machine to act on here)."""

    def __init__(self, server: Any, *, log: Any = None) -> None:
        super().__init__(None, server_faults=NBDServerFaults(server), log=log)  # type: ignore[arg-type]
        self._server = server

    async def execute(self, line: bytes | str) -> tuple[dict[str, Any], Callable[[], None] | None]:
        try:
            command = parse_command(line)
        except CommandError as exc:
            return error_answer(str(exc)), None
        assert self.server_faults is not None
        try:
            match command:
                case Status():
                    return {
                        "ok": True,
                        "cmd": "status",
                        "exports": self.server_faults.report(),
                        # Live connections' requests and bytes included (server.stats).
                        "stats": attrs.asdict(self._server.stats),
                    }, None
                case ServerFault(kind=kind, params=params):
                    result = await self.server_faults.apply(kind, params)
                    return {
                        "ok": True,
                        "cmd": "fault",
                        "target": "server",
                        "kind": kind,
                        **result,
                    }, None
        except (CommandError, ValueError) as exc:
            return error_answer(f"{command.cmd}: {exc}"), None
        return error_answer(
            f"{command.cmd}: a server takes only 'status' and 'fault' with \"target\": \"server\""
        ), None
