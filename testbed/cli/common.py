"""What every ``netswap`` command shares: exit codes, the one-line errors, the parsing of
``--set``, ``--seed`` and addresses, and running trio with "cannot listen" made an error."""

from __future__ import annotations

import argparse
import errno
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, NoReturn

import trio

from nbdproto.config import ConfigError
from server.config import is_loopback, parse_hostport
from testbed.config import ScenarioConfig, load_scenario, parse_override_value

EXIT_OK = 0
EXIT_ERROR = 1
EXIT_USAGE = 2
EXIT_DEADLOCK = 3
EXIT_INTEGRITY = 4


class RunFailed(Exception):
    """A run could not finish for a reason outside the model (a worker process died); the
    message is one line, and the exit status 1."""


class UsageError(Exception):
    """Bad command-line usage; printed as one line, exit 2."""


class Parser(argparse.ArgumentParser):
    """argparse, but errors are one line and exit 2 (argparse prints usage first)."""

    def error(self, message: str) -> NoReturn:
        raise UsageError(f"{self.prog}: {message}")


def exit_code(outcome: str) -> int:
    return {"completed": EXIT_OK, "deadlock": EXIT_DEADLOCK, "integrity_error": EXIT_INTEGRITY}.get(
        outcome, EXIT_ERROR
    )


def parse_nbd_uri(uri: str, *, allow_remote: bool = False) -> tuple[str, int, str]:
    """``nbd://HOST[:PORT]/EXPORT`` → (host, port, export)."""
    if not uri.startswith("nbd://"):
        raise ConfigError(f"--server {uri!r}: expected nbd://HOST:PORT/EXPORT")
    rest = uri[len("nbd://") :]
    hostport, _, export = rest.partition("/")
    host, port = parse_hostport(hostport, what="--server")
    if not allow_remote and not is_loopback(host):
        raise ConfigError(f"--server {uri!r}: {host} is not loopback; pass --allow-remote")
    return host, port, export


def parse_overrides(items: Sequence[str]) -> dict[str, Any]:
    """``KEY=VALUE`` pairs; VALUE is read as TOML when it parses (numbers, booleans,
    arrays), else taken as a string."""
    out: dict[str, Any] = {}
    for item in items:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"--set {item!r}: expected KEY=VALUE")
        out[key.strip()] = parse_override_value(raw)
    return out


def overrides_from(args: argparse.Namespace) -> dict[str, Any]:
    overrides = parse_overrides(args.overrides)
    if getattr(args, "seed", None) is not None:
        overrides["run.seed"] = args.seed
    return overrides


def scenario_from(args: argparse.Namespace) -> ScenarioConfig:
    return load_scenario(args.scenario, overrides_from(args))


def check_writable(path: str, what: str) -> None:
    """Fail before a long run, not after it, when an output file cannot be written."""
    parent = Path(path).resolve().parent
    if not parent.is_dir():
        raise ConfigError(f"{what} {path}: directory {parent} does not exist")
    if not path.lower().endswith(".png"):
        raise ConfigError(f"{what} {path}: the plot is a PNG; name it FILE.png")


def hostport(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def run_trio(main: Callable[[], Any]) -> None:
    """``trio.run``, turning "cannot listen" errors (maybe inside exception groups) into
    one-line configuration errors."""
    try:
        trio.run(main)
    except BaseException as exc:
        for leaf in leaves(exc):
            if isinstance(leaf, OSError) and leaf.errno in LISTEN_ERRNOS:
                raise ConfigError(f"cannot listen: {leaf.strerror}") from None
        raise


LISTEN_ERRNOS = (errno.EADDRINUSE, errno.EADDRNOTAVAIL, errno.EACCES)


def leaves(exc: BaseException) -> list[BaseException]:
    """The exceptions inside (nested) exception groups, or ``exc`` itself."""
    if isinstance(exc, BaseExceptionGroup):
        return [leaf for sub in exc.exceptions for leaf in leaves(sub)]
    return [exc]
