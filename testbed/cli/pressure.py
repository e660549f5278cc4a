"""``netswap pressure``: one command to a running machine's (or server's) control
endpoint, as a blocking client: its arguments, its request line, and the answer."""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from server.config import parse_hostport
from testbed.cli.common import EXIT_ERROR, EXIT_OK, EXIT_USAGE, Parser, UsageError, hostport


def add_pressure(sub: Any) -> None:
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
    what = pr.add_subparsers(dest="what", required=True, metavar="COMMAND", parser_class=Parser)
    hog = what.add_parser("hog", help="start anonymous-memory hogs that hold until release")
    hog.add_argument("--pages", type=int, required=True, help="pages between the processes")
    hog.add_argument("--rate", type=float, help="pages/s over all processes (default: max)")
    hog.add_argument("--processes", type=int, help="how many processes (default 1)")
    flood = what.add_parser("flood", help="flood a new ordinary socket of the machine")
    flood.add_argument("--mbps", type=float, required=True, help="megabit/s the peer sends")
    flood.add_argument("--seconds", type=float, required=True, help="for how long")
    fault = what.add_parser("fault", help="set or clear a client fault")
    kinds = fault.add_subparsers(dest="kind", required=True, metavar="KIND", parser_class=Parser)
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
    kinds = sf.add_subparsers(dest="kind", required=True, metavar="KIND", parser_class=Parser)

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
    where = hostport(host, port)
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
