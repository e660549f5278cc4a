"""The server's configuration: its listening address, its exports and their faults.

Typed and strict (attrs); :mod:`testbed.config` loads it from TOML (``[server]``) and from
the command line.  Every bad value raises :class:`~nbdproto.config.ConfigError` with one line
that names the key and the value.
"""

from __future__ import annotations

import ipaddress
import re
from typing import Any, Literal

import attrs

from nbdproto.config import ConfigError, parse_size
from nbdproto.constants import Cmd, Errno

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 10809


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def parse_hostport(
    value: str, *, what: str = "--listen", default_port: int = DEFAULT_PORT
) -> tuple[str, int]:
    """``HOST:PORT``, ``[V6]:PORT``, ``HOST`` or ``:PORT``."""
    m = re.fullmatch(r"\[([^\]]+)\](?::(\d*))?|([^:\[\]]*)(?::(\d*))?", value.strip())
    if not m:
        raise ConfigError(f"{what}: {value!r} is not HOST:PORT")
    host = m.group(1) or m.group(3) or DEFAULT_HOST
    port_s = m.group(2) if m.group(1) else m.group(4)
    port = default_port if port_s in (None, "") else int(port_s)
    if not 0 <= port <= 65535:
        raise ConfigError(f"{what}: port {port} is out of range 0..65535")
    return host, port


def _export_size(value: str | int) -> int:
    return parse_size(value, what="export size")


def _max_payload(value: str | int) -> int:
    return parse_size(value, what="max_payload")


#: Commands a fault may fail, by the names ``[exports.faults.errors]`` uses (proto.md's
#: ``NBD_CMD_*`` in lower case); DISC has no reply to fail.
FAULT_COMMANDS: dict[str, Cmd] = {
    name.lower(): cmd for name, cmd in Cmd.__members__.items() if cmd is not Cmd.DISC
}
#: Errors a fault may answer with: the spec's wire values (proto.md "Error values").
FAULT_ERRNOS: dict[str, Errno] = {
    name: err for name, err in Errno.__members__.items() if err is not Errno.OK
}


@attrs.frozen
class FaultErrorConfig:
    """One command's injected error: each request of that command fails with probability
    ``rate``, answered with ``errno`` (a name: ``EIO``, ``ENOSPC``, ``EPERM``, ...)."""

    command: str
    rate: float
    errno: str = "EIO"

    def __attrs_post_init__(self) -> None:
        if self.command not in FAULT_COMMANDS:
            raise ConfigError(
                f"faults.errors: unknown command {self.command!r} "
                f"(choose from {', '.join(FAULT_COMMANDS)})"
            )
        if isinstance(self.rate, bool) or not isinstance(self.rate, int | float):
            raise ConfigError(f"faults.errors.{self.command}.rate: {self.rate!r} is not a number")
        if not 0.0 <= self.rate <= 1.0:
            raise ConfigError(f"faults.errors.{self.command}.rate {self.rate}: must be in [0, 1]")
        if self.errno not in FAULT_ERRNOS:
            raise ConfigError(
                f"faults.errors.{self.command}.errno {self.errno!r}: "
                f"choose from {', '.join(FAULT_ERRNOS)}"
            )


def _fault_errors(value: Any) -> tuple[FaultErrorConfig, ...]:
    """``{write = {rate = 0.01, errno = "EIO"}}`` (TOML) → records sorted by command.

    Also takes records, or a mapping of command to a record or a ``(rate, errno)`` pair."""
    if isinstance(value, tuple | list) and all(isinstance(v, FaultErrorConfig) for v in value):
        return tuple(sorted(value, key=lambda e: e.command))
    if not isinstance(value, dict):
        raise ConfigError(f"faults.errors: expected a table of commands, got {value!r}")
    out = []
    for command, spec in value.items():
        if isinstance(spec, FaultErrorConfig):
            spec = {"rate": spec.rate, "errno": spec.errno}
        elif isinstance(spec, tuple | list) and len(spec) == 2:
            spec = {"rate": spec[0], "errno": spec[1]}
        if not isinstance(spec, dict):
            raise ConfigError(f"faults.errors.{command}: expected {{rate = R, errno = NAME}}")
        unknown = set(spec) - {"rate", "errno"}
        if unknown:
            raise ConfigError(f"faults.errors.{command}: unknown key(s) {sorted(unknown)}")
        if "rate" not in spec:
            raise ConfigError(f"faults.errors.{command}: missing rate")
        out.append(FaultErrorConfig(str(command), spec["rate"], spec.get("errno", "EIO")))
    return tuple(sorted(out, key=lambda e: e.command))


@attrs.frozen
class FaultConfig:
    """Faults injected into one export (``[server.exports.faults]``): ``delay`` seconds
    before each request is served, and per-command error rates drawn from a generator
    seeded with ``seed`` (the same seed and requests give the same failures).  Stalls,
    drops and restarts are runtime actions (``server.faults``), not configuration."""

    delay: float = 0.0
    seed: int = 0
    errors: tuple[FaultErrorConfig, ...] = attrs.field(default=(), converter=_fault_errors)

    def __attrs_post_init__(self) -> None:
        if isinstance(self.delay, bool) or not isinstance(self.delay, int | float):
            raise ConfigError(f"faults.delay: {self.delay!r} is not a number of seconds")
        if not 0.0 <= self.delay < float("inf"):
            raise ConfigError(f"faults.delay {self.delay}: must be >= 0 and finite")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int):
            raise ConfigError(f"faults.seed: {self.seed!r} is not an integer")


@attrs.frozen
class ExportConfig:
    name: str
    size: int = attrs.field(converter=_export_size)
    backend: Literal["memory", "file"] = "memory"
    path: str | None = None
    read_only: bool = False
    description: str = ""
    faults: FaultConfig = FaultConfig()

    def __attrs_post_init__(self) -> None:
        if len(self.name.encode()) > 4096:
            raise ConfigError(f"export name {self.name[:40]!r}...: longer than 4096 bytes")
        if self.size <= 0:
            raise ConfigError(f"export {self.name!r}: size must be positive")
        if self.backend == "file" and not self.path:
            raise ConfigError(f"export {self.name!r}: backend 'file' needs a path")
        if self.backend == "memory" and self.path:
            raise ConfigError(f"export {self.name!r}: a path needs backend 'file'")


@attrs.frozen
class ServerConfig:
    listen: str = f"{DEFAULT_HOST}:{DEFAULT_PORT}"
    allow_remote: bool = False
    exports: tuple[ExportConfig, ...] = ()
    max_payload: int = attrs.field(default=32 << 20, converter=_max_payload)
    handshake_timeout: float = 10.0
    max_connections: int = 256
    shutdown_grace: float = 2.0
    stats_interval: float = 0.0

    def __attrs_post_init__(self) -> None:
        host, _ = self.address
        if not self.allow_remote and not is_loopback(host):
            raise ConfigError(
                f"listen address {host!r} is not loopback; pass --allow-remote to bind it"
            )
        if not 4096 <= self.max_payload <= 1 << 30:
            raise ConfigError(f"max_payload {self.max_payload}: must be 4K..1G")
        if self.handshake_timeout <= 0 or self.shutdown_grace < 0:
            raise ConfigError("handshake_timeout must be > 0 and shutdown_grace >= 0")
        if self.max_connections < 1:
            raise ConfigError(f"max_connections {self.max_connections}: must be at least 1")
        names = [e.name for e in self.exports]
        dup = {n for n in names if names.count(n) > 1}
        if dup:
            raise ConfigError(f"export names must be unique: {sorted(dup)}")

    @property
    def address(self) -> tuple[str, int]:
        return parse_hostport(self.listen, what="listen")
