"""``netswap ...``: the command-line entry points.

Exit codes (DESIGN.md §6): 0 completed, 3 deadlock, 4 integrity error, 2 usage or
configuration error, 1 anything else.  Every usage or configuration error is one line on
stderr naming the bad value, never a traceback.
"""

from __future__ import annotations

import argparse
import errno
import json
import signal
import sys
import tomllib
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, NoReturn

import structlog
import trio
import trio.testing

from testbed import log as logsetup
from testbed.config import (
    POLICY_NAMES,
    ConfigError,
    ScenarioConfig,
    is_loopback,
    load_scenario,
    load_server_config,
    parse_export_spec,
    parse_hostport,
)

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


def _add_overrides(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a config key by dotted path, e.g. machine.min_free_kbytes=128 or "
        "workloads.0.processes=8",
    )


def _add_clock(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--clock",
        choices=("virtual", "real"),
        default="virtual",
        help="virtual (default): server and client joined in memory on trio's virtual clock, "
        "so the model's own CPU time costs no simulated time and outcomes are deterministic; "
        "real: loopback TCP and the wall clock",
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

    cli = sub.add_parser(
        "client",
        help="run one client machine against an NBD server",
        description="Run a modelled client machine whose swap device is the given NBD export, "
        "until its workloads finish.",
    )
    cli.add_argument(
        "--server",
        required=True,
        metavar="nbd://HOST:PORT/EXPORT",
        help="the swap export (loopback unless --allow-remote)",
    )
    cli.add_argument("--config", metavar="FILE", help="scenario TOML (see configs/)")
    _add_overrides(cli)
    cli.add_argument("--summary", metavar="FILE", help="write the run's summary as JSON")
    cli.add_argument(
        "--allow-remote", action="store_true", help="allow a server that is not on loopback"
    )
    _add_logging(cli)
    cli.set_defaults(func=cmd_client)

    run = sub.add_parser(
        "run",
        help="run a scenario: embedded server and one client machine in one process",
        description="Run one scenario with an embedded NBD server, watched by the deadlock "
        "watchdog (see --clock).",
    )
    run.add_argument("scenario", metavar="FILE", help="scenario TOML (see configs/)")
    run.add_argument("--policy", choices=POLICY_NAMES, help="override the scenario's policy")
    _add_overrides(run)
    run.add_argument("--summary", metavar="FILE", help="write the run's summary as JSON")
    _add_clock(run)
    _add_logging(run)
    run.set_defaults(func=cmd_run)

    cmp = sub.add_parser(
        "compare",
        help="run every policy on the same scenario and print a table",
        description="Run the scenario once per policy (embedded server) and compare.",
    )
    cmp.add_argument("scenario", metavar="FILE")
    cmp.add_argument(
        "--policies",
        default=",".join(POLICY_NAMES),
        help=f"comma-separated, default {','.join(POLICY_NAMES)}",
    )
    _add_overrides(cmp)
    cmp.add_argument("--summary", metavar="FILE", help="write {runs: [...]} as JSON")
    _add_clock(cmp)
    _add_logging(cmp)
    cmp.set_defaults(func=cmd_compare)

    demo = sub.add_parser(
        "demo",
        help="the default comparison: every policy on the swap-over-NBD scenario",
        description="Run none, recursive, reserve and pfmemalloc on configs/swap-over-nbd.toml "
        "(embedded server, virtual clock) and print the table; the log goes to demo.jsonl.",
    )
    _add_overrides(demo)
    demo.add_argument("--summary", metavar="FILE", help="write {runs: [...]} as JSON")
    demo.add_argument(
        "--log-file",
        default="demo.jsonl",
        metavar="FILE",
        help="JSON-lines log of every run (default demo.jsonl)",
    )
    demo.add_argument("--log-level", default="info", choices=("debug", "info", "warning", "error"))
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
        try:
            value = tomllib.loads(f"v = {raw}")["v"]
        except tomllib.TOMLDecodeError:
            value = raw
        out[key.strip()] = value
    return out


def cmd_client(args: argparse.Namespace) -> int:
    from client.machine import ClientMachine

    host, port, export = parse_nbd_uri(args.server, allow_remote=args.allow_remote)
    overrides = parse_overrides(args.overrides)
    if export:
        overrides["swap.export"] = export
    scenario = load_scenario(args.config, overrides)
    logsetup.configure(log_file=args.log_file, log_format=args.log_format, level=args.log_level)
    log = structlog.get_logger().bind(machine=scenario.machine.name)

    async def main() -> dict[str, Any]:
        async def connect() -> trio.abc.Stream:
            return await trio.open_tcp_stream(host, port)

        try:
            probe = await connect()
        except OSError as exc:
            raise ConfigError(f"cannot reach {args.server}: {exc.strerror or exc}") from None
        await probe.aclose()
        machine = ClientMachine(
            scenario, connect, observer=logsetup.fact_observer(log), policy=args.policy
        )
        log.info(
            "run.start",
            server=args.server,
            policy=machine.policy_name,
            memory=scenario.machine.memory,
        )
        from testbed.scenario import watchdog_supervisor

        summary = await machine.run(supervisor=watchdog_supervisor(scenario.run.stall_seconds, log))
        log.info("run.summary", **summary)
        return summary

    try:
        summary = trio.run(main)
    except BaseException as exc:
        for leaf in _leaves(exc):
            if isinstance(leaf, ConfigError):
                raise leaf from None
        raise
    write_summary(args.summary, summary)
    print_outcome(summary)
    return exit_code(summary["outcome"])


def write_summary(path: str | None, summary: dict[str, Any]) -> None:
    if path:
        with open(path, "w", encoding="utf-8") as fh:
            json.dump(summary, fh, indent=2, default=str)
            fh.write("\n")


def print_outcome(summary: dict[str, Any]) -> None:
    integ = summary["integrity"]
    vm = summary["vmstat"]
    print(
        f"{summary['machine']}: {summary['outcome']}"
        + (f" ({summary['reason']})" if summary.get("reason") else "")
        + f" in {summary['duration']:.1f}s; pages verified {integ['pages_verified']},"
        f" corrupt {integ['corrupt']}; pswpout {vm['pswpout']}, pswpin {vm['pswpin']},"
        f" allocstall {vm['allocstall']}"
    )


def exit_code(outcome: str) -> int:
    return {"completed": EXIT_OK, "deadlock": EXIT_DEADLOCK, "integrity_error": EXIT_INTEGRITY}.get(
        outcome, EXIT_ERROR
    )


def _scenario_from(args: argparse.Namespace) -> ScenarioConfig:
    return load_scenario(args.scenario, parse_overrides(args.overrides))


def _run_one(scenario: ScenarioConfig, policy: str | None, clock: str) -> dict[str, Any]:
    from testbed.scenario import run_scenario

    if clock == "virtual":
        return trio.run(
            lambda: run_scenario(scenario, policy=policy, transport="memory"),
            clock=trio.testing.MockClock(autojump_threshold=0),
        )
    return trio.run(lambda: run_scenario(scenario, policy=policy, transport="tcp"))


def cmd_run(args: argparse.Namespace) -> int:
    scenario = _scenario_from(args)
    logsetup.configure(log_file=args.log_file, log_format=args.log_format, level=args.log_level)
    summary = _run_one(scenario, args.policy, args.clock)
    write_summary(args.summary, summary)
    print_outcome(summary)
    if summary.get("deadlock"):
        print("deadlock: " + " -> ".join(summary["deadlock"]["cycle"]))
    return exit_code(summary["outcome"])


def cmd_compare(args: argparse.Namespace) -> int:
    policies = [p.strip() for p in args.policies.split(",") if p.strip()]
    unknown = [p for p in policies if p not in POLICY_NAMES]
    if unknown or not policies:
        raise ConfigError(
            f"--policies: unknown {unknown or 'empty'}; choose from {', '.join(POLICY_NAMES)}"
        )
    scenario = _scenario_from(args)
    logsetup.configure(log_file=args.log_file, log_format=args.log_format, level=args.log_level)
    runs = []
    for policy in policies:
        print(f"running {policy} ...", file=sys.stderr, flush=True)
        runs.append(_run_one(scenario, policy, args.clock))
    print(compare_table(runs))
    if args.summary:
        write_summary(args.summary, {"scenario": args.scenario, "runs": runs})
    return EXIT_OK


def compare_table(runs: list[dict[str, Any]]) -> str:
    """policy, outcome, time, pswpout, minimum free pages, reserve peak, drops, throttled."""
    header = (
        "policy",
        "outcome",
        "time s",
        "pswpout",
        "min free",
        "reserve peak",
        "drops",
        "throttled",
        "verified",
        "corrupt",
    )
    rows = [header]
    for r in runs:
        report = r.get("policy_report") or {}
        net = r.get("net") or {}
        rows.append(
            (
                r["policy"],
                r["outcome"],
                f"{r['duration']:.1f}",
                str(r["vmstat"]["pswpout"]),
                str(r.get("min_free_pages", "")),
                str(report.get("reserve_peak", "-")),
                str(net.get("PFMemallocDrop", 0) + net.get("rx_alloc_fail", 0)),
                str(r["vmstat"].get("pgscan_direct_throttle", 0)),
                str(r["integrity"]["pages_verified"]),
                str(r["integrity"]["corrupt"]),
            )
        )
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    lines = ["  ".join(v.ljust(w) for v, w in zip(row, widths, strict=True)) for row in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    for r in runs:
        if r.get("deadlock"):
            lines.append(f"{r['policy']}: " + " -> ".join(r["deadlock"]["cycle"]))
    return "\n".join(lines)


DEMO_SCENARIO = Path(__file__).resolve().parents[1] / "configs" / "swap-over-nbd.toml"


def cmd_demo(args: argparse.Namespace) -> int:
    if not DEMO_SCENARIO.exists():
        raise ConfigError(f"the demo scenario {DEMO_SCENARIO} is missing (run from a checkout)")
    args.scenario = str(DEMO_SCENARIO)
    args.policies = ",".join(POLICY_NAMES)
    args.clock = "virtual"
    args.log_format = "json"
    _scenario_from(args)  # a bad --set is a one-line error before anything runs
    print(
        f"netswap demo: {DEMO_SCENARIO.name}, every policy, log in {args.log_file}",
        file=sys.stderr,
    )
    return cmd_compare(args)


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
