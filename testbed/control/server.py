"""``netswap server --control``: a server's own control endpoint, and the server faults of
``{"cmd": "fault", "target": "server", ...}`` (server/faults.py) for whatever endpoint has a
server in its process.

Each kind of server fault is a record whose arguments cattrs structures as it does the
client's commands (:mod:`testbed.control.commands`)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, ClassVar

import attrs
import cattrs

from testbed.control.commands import (
    CommandError,
    Number,
    ServerFault,
    Status,
    Text,
    checked,
    parse_command,
    register_strict,
    show,
    structure_args,
)
from testbed.control.endpoint import Answer, Endpoint, error_answer


@attrs.frozen
class Delay:
    kind: ClassVar[str] = "delay"
    export: str = checked(Text())
    seconds: float = checked(Number(minimum=0.0))


@attrs.frozen
class Error:
    kind: ClassVar[str] = "error"
    export: str = checked(Text())
    command: str = checked(Text())
    rate: float = checked(Number(maximum=1.0))
    errno: str = checked(Text(), default="EIO")


@attrs.frozen
class Clear:
    kind: ClassVar[str] = "clear"
    export: str = checked(Text())


@attrs.frozen
class Stall:
    kind: ClassVar[str] = "stall"
    export: str = checked(Text())
    seconds: float = checked(Number(minimum=0.0))


@attrs.frozen
class Unstall:
    kind: ClassVar[str] = "unstall"
    export: str = checked(Text())


@attrs.frozen
class Drop:
    kind: ClassVar[str] = "drop"
    export: str | None = checked(Text(), default=None)  # None: every connection


@attrs.frozen
class Restart:
    kind: ClassVar[str] = "restart"


SERVER_FAULTS: dict[str, type] = {
    cls.kind: cls for cls in (Delay, Error, Clear, Stall, Unstall, Drop, Restart)
}
SERVER_FAULT_KINDS = tuple(SERVER_FAULTS)

_converter = cattrs.Converter(forbid_extra_keys=True, detailed_validation=False)
for _kind, _cls in SERVER_FAULTS.items():
    register_strict(_converter, _cls, f"server fault {_kind}")


def parse_server_fault(kind: str, params: dict[str, Any]) -> Any:
    """A server fault's record; ValueError (CommandError) naming what is wrong."""
    cls = SERVER_FAULTS.get(kind)
    if cls is None:
        raise ValueError(
            f"unknown kind {show(kind)} (server faults: {', '.join(SERVER_FAULT_KINDS)})"
        )
    return structure_args(cls, f"server fault {kind}", params, conv=_converter, common=())


class NBDServerFaults:
    """``ServerFaults`` for an ``NBDServer`` (server/faults.py), one export at a time:

    ``delay`` (export, seconds), ``error`` (export, command, rate, errno="EIO"), ``clear``
    (export: no delay, no errors, no stall), ``stall`` (export, seconds), ``unstall``
    (export), ``drop`` (export optional: every connection), ``restart``."""

    def __init__(self, server: Any) -> None:
        self.server = server

    async def apply(self, kind: str, params: dict[str, Any]) -> dict[str, Any]:
        fault = parse_server_fault(kind, params)
        match fault:
            case Restart():
                await self.server.restart()
                return {}
            case Drop(export=export):
                if export is not None:
                    self._faults(export)
                return {"connections": self.server.drop_connections(export)}
        export = fault.export
        faults = self._faults(export)
        match fault:
            case Delay(seconds=seconds):
                faults.delay = seconds
            case Error(command=command, rate=rate, errno=errno):
                faults.set_error(command, rate, errno)
            case Stall(seconds=seconds):
                faults.stall(seconds)
            case Unstall():
                faults.unstall()
            case Clear():
                faults.delay = 0.0
                faults.clear_errors()
                faults.unstall()
        return {"export": export, "faults": repr(faults)}

    def _faults(self, export: str) -> Any:
        found = self.server.exports.get(export)
        if found is None:
            raise CommandError(
                f"no export {show(export)} (exports: {', '.join(sorted(self.server.exports))})"
            )
        return found.faults

    def report(self) -> dict[str, Any]:
        return {
            name: {"faults": repr(e.faults), "counts": dict(e.faults.counts)}
            for name, e in self.server.exports.items()
        }


class ServerControlEndpoint(Endpoint):
    """``netswap server --control``: ``status`` and ``fault`` with ``"target": "server"``
    (the client's commands have no machine to act on here)."""

    def __init__(self, server: Any, *, log: Any = None) -> None:
        super().__init__(log=log)
        self._server = server
        self.server_faults = NBDServerFaults(server)

    async def execute(self, line: bytes | str) -> tuple[Answer, Callable[[], None] | None]:
        try:
            command = parse_command(line)
        except CommandError as exc:
            return error_answer(str(exc)), None
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
