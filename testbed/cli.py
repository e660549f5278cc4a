"""``netswap ...``: the command-line entry points.

Exit codes (DESIGN.md §6): 0 completed, 3 deadlock, 4 integrity error, 2 usage or
configuration error, 1 anything else.  Every usage or configuration error is one line on
stderr naming the bad value, never a traceback.
"""

from __future__ import annotations

import argparse
import errno
import os
import signal
import sys
from collections.abc import Callable, Sequence
from typing import Any, NoReturn

import structlog
import trio

from testbed import log as logsetup
from testbed.config import ConfigError, load_server_config, parse_export_spec, parse_size

EXIT_OK = 0
EXIT_ERROR = 1
EXIT_USAGE = 2
EXIT_DEADLOCK = 3
EXIT_INTEGRITY = 4


class UsageError(Exception):
    """Bad command-line usage; printed as one line, exit 2."""


class _Parser(argparse.ArgumentParser):
    """argparse, but errors are one line and exit 2 (argparse prints usage first)."""

    def error(self, message: str) -> NoReturn:
        raise UsageError(f"{self.prog}: {message}")


def _add_logging(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--log-file", metavar="FILE", help="write JSON-lines logs here (default: stderr)"
    )
    p.add_argument(
        "--log-format",
        choices=("json", "console"),
        help="json (default unless stderr is a terminal) or console",
    )
    p.add_argument(
        "--log-level",
        default="info",
        choices=("debug", "info", "warning", "error"),
        help="minimum level to log (default: info)",
    )


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="netswap",
        description="A testbed for swap over the network (NBD).",
    )
    sub = parser.add_subparsers(
        dest="command", required=True, metavar="COMMAND", parser_class=_Parser
    )

    srv = sub.add_parser(
        "server",
        help="run the NBD block server",
        description="Serve NBD exports to real clients (nbdinfo, nbdcopy, qemu-img, nbd-client).",
    )
    srv.add_argument(
        "--listen",
        metavar="HOST:PORT",
        help="address to listen on (default 127.0.0.1:10809; port 0 picks a free port)",
    )
    srv.add_argument(
        "--export",
        metavar="NAME:SIZE[:file=PATH][:ro]",
        action="append",
        default=[],
        help="an export; SIZE takes K/M/G suffixes; repeat for several (default: swap:256M)",
    )
    srv.add_argument("--config", metavar="FILE", help="TOML file with a [server] table")
    srv.add_argument(
        "--allow-remote",
        action="store_true",
        default=None,
        help="allow listening on a non-loopback address",
    )
    srv.add_argument("--max-connections", type=int, metavar="N")
    srv.add_argument("--handshake-timeout", type=float, metavar="SECONDS")
    srv.add_argument(
        "--stats-interval",
        type=float,
        metavar="SECONDS",
        help="log server.stats every SECONDS (default: never)",
    )
    _add_logging(srv)
    srv.set_defaults(func=cmd_server)

    demo = sub.add_parser(
        "demo",
        help="run the default demonstration (nothing to set up)",
        description="Start an embedded NBD server on loopback, swap-write pages to it through "
        "the pipelined client, read every page back and verify it.",
    )
    demo.add_argument("--size", default="64M", help="how much to write (default 64M)")
    demo.add_argument("--depth", type=int, default=32, help="requests in flight (default 32)")
    _add_logging(demo)
    demo.set_defaults(func=cmd_demo)
    return parser


def cmd_server(args: argparse.Namespace) -> int:
    from server import Export, NBDServer
    from server.stores import StoreError

    exports = [parse_export_spec(s) for s in args.export]
    config = load_server_config(
        args.config,
        listen=args.listen,
        allow_remote=args.allow_remote,
        max_connections=args.max_connections,
        handshake_timeout=args.handshake_timeout,
        stats_interval=args.stats_interval,
        exports=exports,
    )
    if not config.exports:
        config = load_server_config(
            None,
            listen=config.listen,
            allow_remote=config.allow_remote,
            exports=[parse_export_spec("swap:256M")],
        )
    try:
        built = [Export.from_config(e) for e in config.exports]
    except StoreError as exc:
        raise ConfigError(str(exc)) from None
    except OSError as exc:
        raise ConfigError(f"export file: {exc.strerror}: {exc.filename}") from None
    logsetup.configure(log_file=args.log_file, log_format=args.log_format, level=args.log_level)
    server = NBDServer(config, built)

    async def main() -> None:
        with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
            async with trio.open_nursery() as nursery:

                async def watch() -> None:
                    async for signum in signals:
                        structlog.get_logger().info(
                            "server.signal", signal=signal.Signals(signum).name
                        )
                        server.shutdown()

                nursery.start_soon(watch)
                await server.serve()
                nursery.cancel_scope.cancel()

    _run_trio(main)
    return EXIT_OK


def cmd_demo(args: argparse.Namespace) -> int:
    from testbed.demo import run_demo

    size = parse_size(args.size, what="--size")
    if size < 4096 or args.depth < 1:
        raise ConfigError("--size must be at least 4K and --depth at least 1")
    logsetup.configure(
        log_file=args.log_file,
        log_format=args.log_format or "json",
        level=args.log_level,
        stream=None if args.log_file else open(os.devnull, "w"),  # noqa: SIM115
    )
    result = trio.run(run_demo, size, args.depth)
    print(result.table())
    return EXIT_OK if result.corrupt == 0 else EXIT_INTEGRITY


def _run_trio(main: Callable[[], Any]) -> None:
    """``trio.run``, turning "cannot listen" errors (maybe inside exception groups) into
    one-line configuration errors."""
    try:
        trio.run(main)
    except BaseException as exc:
        for leaf in _leaves(exc):
            if isinstance(leaf, OSError) and leaf.errno in _LISTEN_ERRNOS:
                raise ConfigError(f"cannot listen: {leaf.strerror}") from None
        raise


_LISTEN_ERRNOS = (errno.EADDRINUSE, errno.EADDRNOTAVAIL, errno.EACCES)


def _leaves(exc: BaseException) -> list[BaseException]:
    if isinstance(exc, BaseExceptionGroup):
        return [leaf for sub in exc.exceptions for leaf in _leaves(sub)]
    return [exc]


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
        code: int = args.func(args)
        return code
    except (UsageError, ConfigError) as exc:
        print(
            f"netswap: {exc}" if not str(exc).startswith("netswap") else str(exc), file=sys.stderr
        )
        return EXIT_USAGE
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
