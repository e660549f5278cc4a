"""What a control request line means: JSON in, a command record out (cattrs, strict).

Each command is a frozen record; cattrs structures the request object into it with
``forbid_extra_keys``, as the scenario config is structured.  What cattrs does not check is
said on each field (``checked``): an integer is a JSON integer (not 1.0, not true), a number
an integer or a float, finite, within bounds; null or an absent key means the default (an
error if there is none).  Every error is a :class:`CommandError` whose text is the one-line
answer, naming the command, the key and the value.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from typing import Any, ClassVar

import attrs
import cattrs
from cattrs.errors import ForbiddenExtraKeysError
from cattrs.gen import make_dict_structure_fn, override

from client.config import GFP_FILTER_NAMES, AllocFaultConfig
from client.pressure import MAX_HOG_PAGES, MAX_HOG_PROCESSES
from nbdproto.config import ConfigError

#: The longest request line accepted (bytes, without the newline).
MAX_LINE = 64 * 1024

COMMANDS = ("status", "hog", "flood", "fault", "release", "stop")
CLIENT_FAULTS = ("latency", "reset", "alloc", "clear")
FAULT_TARGETS = ("client", "server")


class CommandError(ValueError):
    """A request that is not a valid command; ``str()`` is the one-line answer."""


# -- what each field takes ----------------------------------------------------------------
@attrs.frozen
class Integer:
    minimum: int
    maximum: int | None = None


@attrs.frozen
class Number:
    minimum: float = 0.0
    positive: bool = False
    maximum: float | None = None


@attrs.frozen
class Text:
    choices: tuple[str, ...] = ()


Spec = Integer | Number | Text


def checked(spec: Spec, **kwargs: Any) -> Any:
    """An attrs field checked as ``spec`` says when a request is structured."""
    return attrs.field(metadata={"spec": spec}, **kwargs)


# -- commands -----------------------------------------------------------------------------
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
    pages: int = checked(Integer(1, MAX_HOG_PAGES))
    # pages/s over all the processes; None: as fast as they can
    rate: float | None = checked(Number(positive=True), default=None)
    processes: int = checked(Integer(1, MAX_HOG_PROCESSES), default=1)


@attrs.frozen
class Flood:
    cmd: ClassVar[str] = "flood"
    mbps: float = checked(Number(positive=True))
    seconds: float = checked(Number(positive=True))


@attrs.frozen
class FaultLatency:
    cmd: ClassVar[str] = "fault"
    kind: ClassVar[str] = "latency"
    ms: float = checked(Number(minimum=0.0))


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
    """A fault for a server: ``kind`` and its arguments, checked by the server's fault
    code (``ServerFaults.apply``), not here."""

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


#: ``fault alloc``'s arguments: the fields of ``fail_page_alloc``'s config, checked here for
#: their types and bounds, then by the config itself.
ALLOC_SPECS: dict[str, Spec] = {
    "probability": Number(maximum=1.0),
    "interval": Integer(1),
    "times": Integer(-1),
    "space": Integer(0),
    "gfp": Text(GFP_FILTER_NAMES),
    "task": Text(),
}


# -- parsing ------------------------------------------------------------------------------
def show(value: Any) -> str:
    """A value as the peer wrote it, kept short for a one-line message."""
    text = json.dumps(value)
    return text if len(text) <= 40 else text[:37] + "..."


def kind_of(value: Any) -> str:
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


def check(what: str, key: str, spec: Spec, value: Any) -> Any:
    """``value`` of ``key`` as ``spec`` takes it; ``CommandError`` naming it otherwise."""

    def wrong_type(expected: str) -> CommandError:
        return CommandError(
            f"{what}: {key!r} must be {expected}, got {kind_of(value)} {show(value)}"
        )

    if isinstance(spec, Integer):
        if isinstance(value, bool) or not isinstance(value, int):
            raise wrong_type("an integer")
        if value < spec.minimum or (spec.maximum is not None and value > spec.maximum):
            bound = (
                f">= {spec.minimum}"
                if spec.maximum is None
                else f"in {spec.minimum}..{spec.maximum}"
            )
            raise CommandError(f"{what}: {key!r} must be {bound}, got {value}")
        return value
    if isinstance(spec, Number):
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise wrong_type("a number")
        try:
            number = float(value)
        except OverflowError:
            number = math.inf
        if not math.isfinite(number):
            raise CommandError(f"{what}: {key!r} must be finite, got {show(value)}")
        if spec.positive and not number > 0:
            raise CommandError(f"{what}: {key!r} must be > 0, got {show(value)}")
        if number < spec.minimum or (spec.maximum is not None and number > spec.maximum):
            bound = (
                f">= {spec.minimum:g}"
                if spec.maximum is None
                else f"in {spec.minimum:g}..{spec.maximum:g}"
            )
            raise CommandError(f"{what}: {key!r} must be {bound}, got {show(value)}")
        return number
    if not isinstance(value, str):
        raise wrong_type("a string")
    if spec.choices and value not in spec.choices:
        raise CommandError(f"{what}: {key!r} {show(value)} is not one of {', '.join(spec.choices)}")
    if not value:
        raise CommandError(f"{what}: {key!r} must not be empty")
    return value


def _hook(what: str, key: str, spec: Spec, default: Any) -> Callable[[Any, Any], Any]:
    """cattrs's structure hook for one field; null is the default, or an error."""

    def structure(value: Any, _type: Any) -> Any:
        if value is None:
            if default is attrs.NOTHING:
                raise CommandError(f"{what}: {key!r} must not be null")
            return default
        return check(what, key, spec, value)

    return structure


def register_strict(
    conv: cattrs.Converter, cls: type, what: str, specs: dict[str, Spec] | None = None
) -> None:
    """Structure ``cls`` strictly, each field checked by its spec (``specs``, else the
    field's own metadata)."""
    hooks: dict[str, Any] = {}
    for f in attrs.fields(cls):
        spec = (specs or {}).get(f.name) or f.metadata.get("spec")
        if spec is not None:  # (no field with a spec has a factory for its default)
            hooks[f.name] = override(struct_hook=_hook(what, f.name, spec, f.default))
    fn: Any = make_dict_structure_fn(
        cls, conv, _cattrs_forbid_extra_keys=True, _cattrs_detailed_validation=False, **hooks
    )
    conv.register_structure_hook(cls, fn)


#: Per command (and fault kind): the record, what errors call it, and the keys it takes
#: besides its fields (the request's own ``target`` and ``kind``).
_FORMS: dict[str, tuple[type, str, tuple[str, ...]]] = {
    "status": (Status, "status", ()),
    "stop": (Stop, "stop", ()),
    "release": (Release, "release", ()),
    "hog": (Hog, "hog", ()),
    "flood": (Flood, "flood", ()),
    "latency": (FaultLatency, "fault latency", ("target", "kind")),
    "reset": (FaultReset, "fault reset", ("target", "kind")),
    "clear": (FaultClear, "fault clear", ("target", "kind")),
    "alloc": (AllocFaultConfig, "fault alloc", ("target", "kind")),
}

_converter = cattrs.Converter(forbid_extra_keys=True, detailed_validation=False)
for _cls, _what, _ in _FORMS.values():
    register_strict(_converter, _cls, _what, ALLOC_SPECS if _cls is AllocFaultConfig else None)


def structure_args(
    cls: type, what: str, obj: dict[str, Any], *, conv: cattrs.Converter, common: tuple[str, ...]
) -> Any:
    """``obj`` (without ``cmd`` and the ``common`` keys) as a ``cls``; CommandError naming the
    unknown, missing or bad key."""
    args = {k: v for k, v in obj.items() if k != "cmd" and k not in common}
    try:
        return conv.structure(args, cls)
    except ForbiddenExtraKeysError as exc:
        keys = ", ".join(repr(k) for k in sorted(exc.extra_fields))
        allowed = (*common, *(f.name for f in attrs.fields(cls)))
        expected = ", ".join(allowed) if allowed else "no arguments"
        raise CommandError(f"{what}: unknown key {keys} (expected {expected})") from None
    except KeyError as exc:
        raise CommandError(f"{what}: missing {exc.args[0]!r}") from None


def _reject_constant(name: str) -> Any:
    raise CommandError(f"request is not JSON: {name} is not a JSON number")


def parse_command(line: bytes | str) -> Command:
    """One request line → a command; ``CommandError`` (one line) for anything else."""
    obj = parse_request(line)
    cmd = obj.get("cmd")
    if cmd is None:
        raise CommandError(f"request has no 'cmd' (one of: {', '.join(COMMANDS)})")
    if not isinstance(cmd, str):
        raise CommandError(f"'cmd' must be a string, got {kind_of(cmd)} {show(cmd)}")
    if cmd not in COMMANDS:
        raise CommandError(f"unknown cmd {show(cmd)} (one of: {', '.join(COMMANDS)})")
    if cmd == "fault":
        return _parse_fault(obj)
    cls, what, common = _FORMS[cmd]
    command: Command = structure_args(cls, what, obj, conv=_converter, common=common)
    if isinstance(command, Hog) and command.pages < command.processes:
        raise CommandError(
            f"hog: 'pages' {command.pages} is fewer than 'processes' {command.processes}"
        )
    return command


def parse_request(line: bytes | str) -> dict[str, Any]:
    """One request line as a JSON object (strict JSON: no NaN, no Infinity)."""
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
        raise CommandError(f"request must be a JSON object, got {kind_of(obj)}")
    return obj


def _parse_fault(obj: dict[str, Any]) -> Command:
    target = obj.get("target", "client")
    if target not in FAULT_TARGETS:
        raise CommandError(f"fault: 'target' {show(target)} is not one of client, server")
    kind = obj.get("kind")
    if target == "server":
        if not isinstance(kind, str) or not kind:
            raise CommandError(f"fault: missing 'kind' for target server, got {show(kind)}")
        params = {k: v for k, v in obj.items() if k not in ("cmd", "target", "kind")}
        return ServerFault(kind, params)
    if kind is None:
        raise CommandError(f"fault: missing 'kind' (one of: {', '.join(CLIENT_FAULTS)})")
    if not isinstance(kind, str) or kind not in CLIENT_FAULTS:
        raise CommandError(
            f"fault: unknown kind {show(kind)} (client faults: {', '.join(CLIENT_FAULTS)})"
        )
    cls, what, common = _FORMS[kind]
    if cls is not AllocFaultConfig:
        command: Command = structure_args(cls, what, obj, conv=_converter, common=common)
        return command
    try:
        config = structure_args(cls, what, obj, conv=_converter, common=common)
    except ConfigError as exc:  # the config's own checks, after the types above
        raise CommandError(f"{what}: {exc}") from None
    return FaultAlloc(config)
