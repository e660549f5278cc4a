"""``netswap ...``: the command-line entry points.

Exit codes (DESIGN.md §6): 0 completed, 3 deadlock, 4 integrity error, 2 usage or
configuration error, 1 anything else.  Every usage or configuration error is one line on
stderr naming the bad value, never a traceback.
"""

from __future__ import annotations

import argparse
import errno
import json
import os
import signal
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, NoReturn

import attrs
import structlog
import trio

from nbdproto.config import ConfigError
from server.config import is_loopback, parse_hostport
from testbed import log as logsetup
from testbed.config import (
    POLICY_NAMES,
    ScenarioConfig,
    load_scenario,
    load_server_config,
    parse_export_spec,
    parse_override_value,
)
from testbed.report import format_table

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
    p.add_argument(
        "--seed",
        type=int,
        metavar="N",
        help="run.seed: seeds the faults and, under the virtual clock, trio's scheduler, so "
        "the same seed gives the same run (default: the scenario's, 0)",
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
    srv.add_argument(
        "--control",
        metavar="HOST:PORT",
        help="serve status and server faults on a control endpoint (line-delimited JSON, "
        "loopback only unless --allow-remote-control); see `netswap pressure ... raw`",
    )
    srv.add_argument(
        "--allow-remote-control",
        action="store_true",
        help="allow a non-loopback --control address (logs a warning)",
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
    cli.add_argument("--policy", choices=POLICY_NAMES, help="override the scenario's policy")
    cli.add_argument(
        "--control",
        metavar="HOST:PORT",
        help="serve the control endpoint here (netswap pressure; port 0 picks a free port, "
        "printed as 'control listening on HOST:PORT' on stderr); the machine then keeps "
        "running after its workloads, until 'stop', SIGINT or SIGTERM",
    )
    cli.add_argument(
        "--allow-remote-control",
        action="store_true",
        help="allow a control address that is not on loopback (anyone who reaches it can "
        "drive the machine)",
    )
    _add_logging(cli)
    cli.set_defaults(func=cmd_client)

    _add_pressure(sub)

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
    cmp.add_argument("--plot", metavar="FILE.png", help="draw the policies' timelines side by side")
    cmp.add_argument(
        "--seeds",
        metavar="A-B|A,B,...",
        help="run every policy once per seed (virtual clock) and count the outcomes: how "
        "likely each is near a threshold",
    )
    cmp.add_argument(
        "--kernel",
        action="store_true",
        help="also run the scenario on a real Linux guest (netswap kernel run) and add it "
        "as a row, policy 'kernel'",
    )
    _add_jobs(cmp)
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
    demo.add_argument(
        "--plot",
        default="demo.png",
        metavar="FILE.png",
        help="the policies' timelines side by side (default demo.png)",
    )
    demo.add_argument("--log-level", default="info", choices=("debug", "info", "warning", "error"))
    _add_jobs(demo)
    demo.set_defaults(func=cmd_demo)

    from testbed.kernel.cli import add_parser as add_kernel_parser

    add_kernel_parser(
        sub, add_logging=_add_logging, add_overrides=_add_overrides, parser_class=_Parser
    )

    from testbed.sweep.cli import add_parser as add_sweep_parser

    add_sweep_parser(sub, parser_class=_Parser, jobs_type=_jobs)

    rep = sub.add_parser(
        "report",
        help="tell a run's story from its log",
        description="Read a JSON-lines log written with --log-file (by run, compare, demo or "
        "client) and print each run: outcome, vmstat, free pages against the watermarks, PSI, "
        "reserves, drops, the deadlock cycle.",
    )
    rep.add_argument("log", metavar="LOG", help="a JSON-lines log (e.g. demo.jsonl)")
    rep.add_argument("--plot", metavar="FILE.png", help="also draw the timeline of every run")
    rep.add_argument("--json", action="store_true", help="print the report as JSON instead")
    rep.set_defaults(func=cmd_report)
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
    control: tuple[str, int] | None = None
    if args.control is not None:
        from testbed.control import DEFAULT_CONTROL_PORT, check_control_address

        control = parse_hostport(args.control, what="--control", default_port=DEFAULT_CONTROL_PORT)
        check_control_address(control[0], allow_remote=args.allow_remote_control)

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
                if control is not None:
                    from testbed.control import ServerControlEndpoint, serve_control

                    endpoint = ServerControlEndpoint(server)
                    host, port = await nursery.start(serve_control, endpoint, *control)
                    print(
                        f"control listening on {_hostport(host, port)}", file=sys.stderr, flush=True
                    )
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
        out[key.strip()] = parse_override_value(raw)
    return out


def cmd_client(args: argparse.Namespace) -> int:
    from client.machine import ClientMachine

    host, port, export = parse_nbd_uri(args.server, allow_remote=args.allow_remote)
    overrides = _overrides(args)
    if export:
        overrides["swap.export"] = export
    scenario = load_scenario(args.config, overrides)
    control: tuple[str, int] | None = None
    if args.control is not None:
        from testbed.control import DEFAULT_CONTROL_PORT, check_control_address

        control = parse_hostport(args.control, what="--control", default_port=DEFAULT_CONTROL_PORT)
        check_control_address(control[0], allow_remote=args.allow_remote_control)
    logsetup.configure(log_file=args.log_file, log_format=args.log_format, level=args.log_level)
    log = structlog.get_logger().bind(
        machine=scenario.machine.name, policy=args.policy or scenario.policy
    )

    async def main() -> dict[str, Any]:
        async def connect() -> trio.abc.Stream:
            return await trio.open_tcp_stream(host, port)

        try:
            probe = await connect()
        except OSError as exc:
            raise ConfigError(f"cannot reach {args.server}: {exc.strerror or exc}") from None
        await probe.aclose()
        machine = ClientMachine(
            scenario,
            connect,
            observer=logsetup.fact_observer(log),
            policy=args.policy,
            controlled=control is not None,
        )
        log.info(
            "run.start",
            transport="tcp",
            memory=scenario.machine.memory,
            description=scenario.description,
            server=args.server,
            control=args.control,
        )
        from testbed.scenario import watchdog_supervisor

        supervisor = watchdog_supervisor(scenario.run.stall_seconds, log)
        if control is None:
            summary = await machine.run(supervisor=supervisor)
        else:
            summary = await _run_controlled(machine, control, supervisor, log)
        log.info("run.summary", **summary)
        return summary

    try:
        summary = trio.run(main)
    except BaseException as exc:
        for leaf in _leaves(exc):
            if isinstance(leaf, ConfigError):
                raise leaf from None
            if control and isinstance(leaf, OSError) and leaf.errno in _LISTEN_ERRNOS:
                raise ConfigError(f"--control {args.control}: {leaf.strerror}") from None
        raise
    write_summary(args.summary, summary)
    print_outcome(summary)
    return exit_code(summary["outcome"])


async def _run_controlled(
    machine: Any, address: tuple[str, int], supervisor: Any, log: Any
) -> dict[str, Any]:
    """Run ``machine`` with its control endpoint on ``address``, until ``stop``, SIGINT or
    SIGTERM (each ends the run with its summary, as its workloads ending would)."""
    from testbed.control import ControlEndpoint, serve_control

    endpoint = ControlEndpoint(machine, log=log)
    summary: dict[str, Any] = {}
    with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        async with trio.open_nursery() as nursery:
            host, port = await nursery.start(serve_control, endpoint, *address)
            print(f"control listening on {_hostport(host, port)}", file=sys.stderr, flush=True)

            async def watch() -> None:
                async for signum in signals:
                    name = signal.Signals(signum).name
                    log.info("client.signal", signal=name)
                    machine.stop(f"stopped by {name}")

            async def run() -> None:
                summary.update(await machine.run(supervisor=supervisor))
                nursery.cancel_scope.cancel()

            nursery.start_soon(watch)
            nursery.start_soon(run)
    return summary


def _hostport(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def counted(what: str, most: int) -> Callable[[str], int]:
    """An argparse type: a whole number of ``what`` from 1 to ``most``."""

    def parse(text: str) -> int:
        try:
            n = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a number of {what}") from None
        if not 1 <= n <= most:
            raise argparse.ArgumentTypeError(f"{n}: must be 1..{most}")
        return n

    return parse


_jobs = counted("processes", 256)


def _add_jobs(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--jobs", type=_jobs, default=1, metavar="N",
        help="run up to N runs at once, each in its own process (virtual clock only; the "
        "results and the log are the same as one at a time, in the same order; default 1)",
    )  # fmt: skip


# -- netswap pressure -----------------------------------------------------------------------
def _add_pressure(sub: Any) -> None:
    from client.config import GFP_FILTER_NAMES

    pr = sub.add_parser(
        "pressure",
        help="send one command to a running client's control endpoint",
        description="Inject pressure or faults into a client started with --control, or ask "
        "its status.  Prints the JSON answer; exit 0 if it is ok, 2 if it is an error (or "
        "the arguments are bad), 1 if the endpoint cannot be reached.",
    )
    pr.add_argument("--control", required=True, metavar="HOST:PORT", help="the endpoint")
    pr.add_argument(
        "--timeout",
        type=float,
        default=30.0,
        metavar="SECONDS",
        help="how long to wait for the answer (default 30)",
    )
    what = pr.add_subparsers(dest="what", required=True, metavar="COMMAND", parser_class=_Parser)
    hog = what.add_parser("hog", help="start anonymous-memory hogs that hold until release")
    hog.add_argument("--pages", type=int, required=True, help="pages between the processes")
    hog.add_argument("--rate", type=float, help="pages/s over all processes (default: max)")
    hog.add_argument("--processes", type=int, help="how many processes (default 1)")
    flood = what.add_parser("flood", help="flood a new ordinary socket of the machine")
    flood.add_argument("--mbps", type=float, required=True, help="megabit/s the peer sends")
    flood.add_argument("--seconds", type=float, required=True, help="for how long")
    fault = what.add_parser("fault", help="set or clear a client fault")
    kinds = fault.add_subparsers(dest="kind", required=True, metavar="KIND", parser_class=_Parser)
    lat = kinds.add_parser("latency", help="the swap connection's latency")
    lat.add_argument("--ms", type=float, required=True, help="milliseconds")
    kinds.add_parser("reset", help="cut the swap connection (the device reconnects)")
    alloc = kinds.add_parser("alloc", help="fail_page_alloc, as in the kernel's fault-injection")
    alloc.add_argument("--probability", type=float, required=True, help="0..1")
    alloc.add_argument("--interval", type=int, help="fail only every N-th (default 1)")
    alloc.add_argument("--times", type=int, help="at most N failures (default -1: no limit)")
    alloc.add_argument("--space", type=int, help="bytes of allocations spared first (default 0)")
    alloc.add_argument("--gfp", choices=GFP_FILTER_NAMES, help="which allocations (default any)")
    alloc.add_argument("--task", metavar="NAME", help="only tasks whose name contains NAME")
    kinds.add_parser("clear", help="remove every client fault")
    _add_server_fault(what)
    what.add_parser("release", help="end injected pressure: hogs exit, floods stop")
    what.add_parser("status", help="the machine's state")
    what.add_parser("stop", help="end the run (the client prints its summary and exits)")
    raw = what.add_parser("raw", help="send one request line as given")
    raw.add_argument("line", metavar="JSON", help='e.g. \'{"cmd": "status"}\'')
    pr.set_defaults(func=cmd_pressure)


def _add_server_fault(what: Any) -> None:
    """``pressure server-fault KIND``: a fault of the server, through the control endpoint
    of ``netswap server --control``."""
    from server.config import FAULT_COMMANDS, FAULT_ERRNOS

    sf = what.add_parser(
        "server-fault",
        help="set or clear a fault of a server started with --control",
        description="A fault of the NBD server's export: the request line "
        '{"cmd": "fault", "target": "server", "kind": KIND, ...} to its control endpoint.',
    )
    kinds = sf.add_subparsers(dest="kind", required=True, metavar="KIND", parser_class=_Parser)

    def kind(name: str, help: str, *, export: bool | None = True) -> argparse.ArgumentParser:
        k: argparse.ArgumentParser = kinds.add_parser(name, help=help)
        if export is not None:
            k.add_argument(
                "--export", required=export, metavar="NAME",
                help="the export" if export else "only this export's (default: all)",
            )  # fmt: skip
        return k

    delay = kind("delay", "answer every request of the export late")
    delay.add_argument("--seconds", type=float, required=True, help="the delay per request")
    error = kind("error", "fail a share of one command's requests with an NBD error")
    error.add_argument(
        "--command", dest="nbd_command", required=True, choices=FAULT_COMMANDS,
        help="which command",
    )  # fmt: skip
    error.add_argument("--rate", type=float, required=True, help="the share to fail, 0..1")
    error.add_argument("--errno", choices=FAULT_ERRNOS, help="the NBD error (default EIO)")
    stall = kind("stall", "hold every request of the export, unanswered")
    stall.add_argument("--seconds", type=float, required=True, help="for how long")
    kind("unstall", "end a stall: the held requests are answered")
    kind("clear", "no delay, no errors, no stall on the export")
    kind("drop", "cut the connections", export=False)
    kind("restart", "cut every connection, close and reopen the stores", export=None)


def pressure_request(args: argparse.Namespace) -> str:
    """The request line for ``netswap pressure`` arguments (options left out are left to
    the endpoint's defaults)."""
    if args.what == "raw":
        line: str = args.line
        return line
    request: dict[str, Any] = {"cmd": args.what}
    if args.what == "fault":
        request["kind"] = args.kind
    elif args.what == "server-fault":
        request = {"cmd": "fault", "target": "server", "kind": args.kind}
        if getattr(args, "nbd_command", None) is not None:
            request["command"] = args.nbd_command
    names = {
        "hog": ("pages", "rate", "processes"),
        "flood": ("mbps", "seconds"),
        "fault": ("ms", "probability", "interval", "times", "space", "gfp", "task"),
        "server-fault": ("export", "seconds", "rate", "errno"),
    }.get(args.what, ())
    for name in names:
        value = getattr(args, name, None)
        if value is not None:
            request[name] = value
    return json.dumps(request)


def cmd_pressure(args: argparse.Namespace) -> int:
    import socket

    from testbed.control import DEFAULT_CONTROL_PORT

    host, port = parse_hostport(args.control, what="--control", default_port=DEFAULT_CONTROL_PORT)
    line = pressure_request(args)
    if "\n" in line:
        raise UsageError("netswap pressure raw: the request must be one line")
    where = _hostport(host, port)
    try:
        with socket.create_connection((host, port), timeout=args.timeout) as sock:
            sock.sendall(line.encode() + b"\n")
            answer_line = _read_line(sock)
    except TimeoutError:
        print(f"netswap pressure: no answer from {where} in {args.timeout}s", file=sys.stderr)
        return EXIT_ERROR
    except OSError as exc:
        reason = exc.strerror or str(exc) or type(exc).__name__
        print(f"netswap pressure: cannot reach {where}: {reason}", file=sys.stderr)
        return EXIT_ERROR
    if answer_line is None:
        print(f"netswap pressure: {where} closed the connection unanswered", file=sys.stderr)
        return EXIT_ERROR
    try:
        answer = json.loads(answer_line)
    except ValueError:
        print(f"netswap pressure: {where} answered something not JSON", file=sys.stderr)
        return EXIT_ERROR
    print(json.dumps(answer, indent=2))
    return EXIT_OK if isinstance(answer, dict) and answer.get("ok") is True else EXIT_USAGE


def _read_line(sock: Any) -> bytes | None:
    """One answer line (None if the peer closed first)."""
    buf = bytearray()
    while b"\n" not in buf:
        chunk = sock.recv(65536)
        if not chunk:
            return None
        buf += chunk
    return bytes(buf[: buf.index(b"\n")])


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


def _overrides(args: argparse.Namespace) -> dict[str, Any]:
    overrides = parse_overrides(args.overrides)
    if getattr(args, "seed", None) is not None:
        overrides["run.seed"] = args.seed
    return overrides


def _scenario_from(args: argparse.Namespace) -> ScenarioConfig:
    return load_scenario(args.scenario, _overrides(args))


def _run_one(scenario: ScenarioConfig, policy: str | None, clock: str) -> dict[str, Any]:
    from testbed.scenario import run_scenario, run_virtual

    if clock == "virtual":
        return run_virtual(scenario, policy)
    return trio.run(lambda: run_scenario(scenario, policy=policy, transport="tcp"))


Work = list[tuple[str, ScenarioConfig, str]]
"""(label for progress, scenario, policy) for each run, in the order the results go."""


def _run_all(
    args: argparse.Namespace, work: Work, capture: logsetup.Capture | None
) -> list[dict[str, Any]]:
    """Every run of ``work``, one at a time in this process or ``--jobs`` at a time in
    worker processes; the summaries, and the log written in the order of ``work``."""
    jobs = getattr(args, "jobs", 1)
    if jobs == 1 or len(work) == 1:
        logsetup.configure(
            log_file=args.log_file, log_format=args.log_format, level=args.log_level,
            capture=capture,
        )  # fmt: skip
        runs = []
        for label, scenario, policy in work:
            print(f"running {label} ...", file=sys.stderr, flush=True)
            runs.append(_run_one(scenario, policy, args.clock))
        return runs
    if args.clock != "virtual":
        raise ConfigError("--jobs: runs on the real clock would compete for the CPUs")
    return _run_parallel(args, work, capture, min(jobs, len(work)))


@attrs.frozen
class _Job:
    scenario: ScenarioConfig
    policy: str
    log_format: logsetup.LogFormat
    level: str
    capture: bool


def _job(job: _Job) -> tuple[dict[str, Any], str, list[str]]:
    """One virtual-clock run in a worker process: its summary, its log as text, and (for
    ``--plot``) its run events as JSON lines."""
    import io

    out = io.StringIO()
    capture = logsetup.Capture() if job.capture else None
    logsetup.configure(
        stream=out, log_format=job.log_format, level=job.level, capture=capture, progress=False
    )
    try:
        summary = _run_one(job.scenario, job.policy, "virtual")
    except Exception as exc:  # a bug: keep the run's log and its traceback for the parent
        import traceback

        first = _leaves(exc)[0]  # the error itself, not the nursery's group around it
        error = f"{type(first).__name__}: {first}"
        raise _JobFailed(out.getvalue(), error, traceback.format_exc()) from None
    events = [json.dumps(e, default=str) for e in capture.events] if capture else []
    return summary, out.getvalue(), events


class _JobFailed(Exception):
    """A run that raised in its worker: (its log so far, the error, the traceback)."""


def _run_parallel(
    args: argparse.Namespace, work: Work, capture: logsetup.Capture | None, jobs: int
) -> list[dict[str, Any]]:
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor
    from concurrent.futures.process import BrokenProcessPool

    log_format: logsetup.LogFormat = args.log_format or (
        "console" if args.log_file is None and sys.stderr.isatty() else "json"
    )
    try:
        out = open(args.log_file, "a", encoding="utf-8") if args.log_file else sys.stderr  # noqa: SIM115
    except OSError as exc:
        raise ConfigError(f"--log-file {args.log_file}: {exc.strerror or exc}") from None
    tasks = [_Job(s, p, log_format, args.log_level, capture is not None) for _, s, p in work]
    print(f"running {len(work)} runs, {jobs} at a time ...", file=sys.stderr, flush=True)
    runs = []
    # spawn, not fork: a fresh interpreter per worker, whatever this process holds.  A
    # worker that dies (killed, out of memory) fails the map (BrokenProcessPool) instead
    # of losing its run; the workers ignore SIGINT, and on Ctrl-C or any error this
    # process stops them at once rather than letting the queued runs finish.
    pool = ProcessPoolExecutor(
        jobs, mp_context=multiprocessing.get_context("spawn"), initializer=_ignore_sigint
    )
    try:
        for (label, _, _), (summary, text, events) in zip(work, pool.map(_job, tasks), strict=True):
            out.write(text)
            out.flush()
            if capture is not None:
                capture.events.extend(json.loads(e) for e in events)
            print(f"finished {label}: {summary['outcome']}", file=sys.stderr, flush=True)
            runs.append(summary)
    except _JobFailed as exc:
        text, error, trace = exc.args
        out.write(text)
        _stop(pool)
        print(trace, file=sys.stderr, end="")
        raise RunFailed(f"{work[len(runs)][0]} failed: {error}") from None
    except BrokenProcessPool:
        done = len(runs)
        pool.shutdown(wait=False, cancel_futures=True)
        raise RunFailed(
            f"a worker process died (killed, or out of memory?) before {work[done][0]} "
            f"finished; {done} of {len(work)} runs finished, their log is written"
        ) from None
    except BaseException:
        _stop(pool)
        raise
    finally:
        pool.shutdown(wait=True)
        if out is not sys.stderr:
            out.close()
    return runs


def _stop(pool: Any) -> None:
    """Cancel the queued runs and end the running ones now (there is no public way)."""
    workers = list(getattr(pool, "_processes", {}).values())
    pool.shutdown(wait=False, cancel_futures=True)
    for worker in workers:
        worker.terminate()


def _ignore_sigint() -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)


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
    seeds = parse_seeds(args.seeds) if getattr(args, "seeds", None) else None
    if seeds is not None:
        if args.clock != "virtual":
            raise ConfigError("--seeds: a seed fixes a run only under --clock virtual")
        if getattr(args, "plot", None):
            raise ConfigError("--seeds: no --plot for a sweep; plot one seed with --seed N")
        if getattr(args, "kernel", False):
            raise ConfigError(
                "--kernel: the guest is no seeded run; use netswap kernel run --trials"
            )
        return _compare_seeds(args, scenario, policies, seeds)
    plot = getattr(args, "plot", None)
    if plot:
        _check_writable(plot, "--plot")
    if getattr(args, "kernel", False):
        from testbed.kernel.plan import guest_settings

        guest_settings(scenario)  # what the guest cannot do fails before any run
    capture = logsetup.Capture() if plot else None
    runs = _run_all(args, [(policy, scenario, policy) for policy in policies], capture)
    if getattr(args, "kernel", False):
        runs.append(_run_kernel_row(args, scenario, capture))
    print(compare_table(runs))
    if args.summary:
        write_summary(args.summary, {"scenario": args.scenario, "runs": runs})
    if capture is not None and plot:
        from testbed.plot import plot_runs
        from testbed.report import load_runs

        lines = (json.dumps(e, default=str) for e in capture.events)
        plot_runs(load_runs(lines), plot, title=f"netswap compare: {Path(args.scenario).name}")
        print(f"plot: {plot}", file=sys.stderr)
    return EXIT_OK


def _run_kernel_row(
    args: argparse.Namespace, scenario: ScenarioConfig, capture: logsetup.Capture | None
) -> dict[str, Any]:
    """The scenario on a real guest, logged to the same log as the model's runs."""
    from testbed.kernel.run import KernelRunError, run_kernel

    logsetup.configure(
        log_file=args.log_file, log_format=args.log_format, level=args.log_level, capture=capture
    )
    print("running kernel (a real guest under qemu: minutes) ...", file=sys.stderr, flush=True)
    log = structlog.get_logger()
    try:
        summary: dict[str, Any] = trio.run(lambda: run_kernel(scenario, log=log))
    except KernelRunError as exc:
        raise ConfigError(str(exc)) from None
    return summary


def parse_seeds(text: str) -> list[int]:
    """``0-9`` or ``1,5,7`` (or both: ``0-4,10``) → the seeds, in order, each once."""
    seeds: list[int] = []
    for part in text.split(","):
        first, dash, last = part.strip().partition("-")
        try:
            lo = int(first)
            hi = int(last) if dash else lo
        except ValueError:
            raise ConfigError(f"--seeds {text!r}: expected A-B or A,B,... (integers)") from None
        if lo < 0 or hi < lo or hi - lo > 10_000:
            raise ConfigError(f"--seeds {text!r}: {part.strip()!r} is not a range of seeds")
        seeds.extend(s for s in range(lo, hi + 1) if s not in seeds)
    return seeds


def _compare_seeds(
    args: argparse.Namespace, scenario: ScenarioConfig, policies: list[str], seeds: list[int]
) -> int:
    """Every policy once per seed; a table of how often each outcome came out."""
    work = [
        (f"{policy}, seed {seed}", attrs.evolve(scenario, run=attrs.evolve(scenario.run, seed=seed)),
         policy)
        for policy in policies
        for seed in seeds
    ]  # fmt: skip
    runs = _run_all(args, work, None)
    counts: dict[str, dict[str, list[int]]] = {}
    for summary, (_, seeded, policy) in zip(runs, work, strict=True):
        seed = seeded.run.seed
        summary["seed"] = seed
        counts.setdefault(policy, {}).setdefault(summary["outcome"], []).append(seed)
    outcomes = sorted({o for by in counts.values() for o in by})
    rows = [("policy", *outcomes)]
    for policy in policies:
        rows.append((policy, *(f"{len(counts[policy].get(o, []))}/{len(seeds)}" for o in outcomes)))
    lines = format_table(rows)
    for policy in policies:
        for outcome in outcomes:
            which = counts[policy].get(outcome)
            if which:
                lines.append(f"{policy} {outcome}: seeds {', '.join(map(str, which))}")
    print("\n".join(lines))
    if args.summary:
        write_summary(args.summary, {"scenario": args.scenario, "seeds": seeds, "runs": runs})
    return EXIT_OK


def _check_writable(path: str, what: str) -> None:
    """Fail before a long run, not after it, when an output file cannot be written."""
    parent = Path(path).resolve().parent
    if not parent.is_dir():
        raise ConfigError(f"{what} {path}: directory {parent} does not exist")
    if not path.lower().endswith(".png"):
        raise ConfigError(f"{what} {path}: the plot is a PNG; name it FILE.png")


def cmd_report(args: argparse.Namespace) -> int:
    from testbed.report import ReportError, load_runs, render_report, report_json

    if args.plot:
        _check_writable(args.plot, "--plot")
    try:
        runs = load_runs(args.log)
    except ReportError as exc:
        raise ConfigError(str(exc)) from None
    if args.json:
        print(json.dumps(report_json(runs), indent=2, default=str))
    else:
        print(render_report(runs))
    if args.plot:
        from testbed.plot import plot_runs

        try:
            plot_runs(runs, args.plot, title=f"netswap report: {Path(args.log).name}")
        except ReportError as exc:
            raise ConfigError(str(exc)) from None
        print(f"plot: {args.plot}", file=sys.stderr)
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
        duration = r.get("duration")
        rows.append(
            (
                r["policy"],
                r["outcome"],
                "?" if duration is None else f"{duration:.1f}",
                str(r["vmstat"].get("pswpout", 0)),
                str(r.get("min_free_pages", "")),
                str(report.get("reserve_peak", "-")),
                str((net.get("PFMemallocDrop") or 0) + (net.get("rx_alloc_fail") or 0)),
                str(r["vmstat"].get("pgscan_direct_throttle", 0)),
                str(r["integrity"]["pages_verified"]),
                str(r["integrity"]["corrupt"]),
            )
        )
    lines = format_table(rows)
    for r in runs:
        deadlock = r.get("deadlock")
        if deadlock and deadlock.get("cycle"):
            lines.append(f"{r['policy']}: " + " -> ".join(deadlock["cycle"]))
        elif deadlock:  # a guest's: no wait-for graph, the blocked tasks of sysrq w
            waits = "; ".join(f"{t}: {w}" for t, w in (deadlock.get("waiting") or {}).items())
            lines.append(f"{r['policy']}: blocked: {waits}")
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
        f"netswap demo: {DEMO_SCENARIO.name}, every policy, log in {args.log_file},"
        f" plot in {args.plot}",
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
    from testbed.sweep.cli import with_default_command

    parser = build_parser()
    try:
        args = parser.parse_args(with_default_command(sys.argv[1:] if argv is None else argv))
        code: int = args.func(args)
        return code
    except (UsageError, ConfigError) as exc:
        print(
            f"netswap: {exc}" if not str(exc).startswith("netswap") else str(exc), file=sys.stderr
        )
        return EXIT_USAGE
    except RunFailed as exc:
        print(f"netswap: {exc}", file=sys.stderr)
        return EXIT_ERROR
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        # `netswap report LOG | head`: the reader left; say nothing more, as cat does.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return 1


if __name__ == "__main__":
    sys.exit(main())
