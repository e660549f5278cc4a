"""The ``netswap`` command line: its subcommands and their arguments (what each command
does is in :mod:`testbed.cli.commands`, :mod:`testbed.cli.pressure`, and the kernel lab's
and the sweep's own ``cli`` modules)."""

from __future__ import annotations

import argparse
from collections.abc import Callable

from testbed.cli import commands
from testbed.cli.common import Parser
from testbed.cli.pressure import add_pressure
from testbed.config import POLICY_NAMES


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
    parser = Parser(
        prog="netswap",
        description="A testbed for swap over the network (NBD).",
    )
    sub = parser.add_subparsers(
        dest="command", required=True, metavar="COMMAND", parser_class=Parser
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
    srv.set_defaults(func=commands.cmd_server)

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
    cli.set_defaults(func=commands.cmd_client)

    add_pressure(sub)

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
    run.set_defaults(func=commands.cmd_run)

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
    cmp.set_defaults(func=commands.cmd_compare)

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
    demo.set_defaults(func=commands.cmd_demo)

    from testbed.kernel.cli import add_parser as add_kernel_parser

    add_kernel_parser(
        sub, add_logging=_add_logging, add_overrides=_add_overrides, parser_class=Parser
    )

    from testbed.sweep.cli import add_parser as add_sweep_parser

    add_sweep_parser(sub, parser_class=Parser, jobs_type=_jobs)

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
    rep.set_defaults(func=commands.cmd_report)
    return parser


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
