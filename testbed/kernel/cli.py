"""``netswap kernel run|image``: the scenario on a real Linux guest (docs/kernel.md)."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import structlog
import trio

from nbdproto.config import ConfigError
from testbed.config import ScenarioConfig, load_scenario

#: The kernel lab's own scenario, run when ``netswap kernel run`` is given no FILE.
DEFAULT_SCENARIO = Path(__file__).resolve().parents[2] / "configs" / "kernel-calibration.toml"


def add_parser(
    sub: Any,
    *,
    add_logging: Callable[[argparse.ArgumentParser], None],
    add_overrides: Callable[[argparse.ArgumentParser], None],
    parser_class: type[argparse.ArgumentParser],
) -> None:
    kernel = sub.add_parser(
        "kernel",
        help="run a scenario on a real Linux guest in qemu, swapping over NBD",
        description="The kernel lab: a Debian kernel under qemu whose swap is an NBD export "
        "on the host's loopback, running the scenario's workloads (docs/kernel.md).",
    )
    what = kernel.add_subparsers(
        dest="kernel_command", required=True, metavar="COMMAND", parser_class=parser_class
    )
    run = what.add_parser(
        "run",
        help="boot the guest and run the scenario (one or --trials N boots)",
        description="Boot a guest, swap on an NBD export, run the scenario's anon_hog "
        "workloads in tmpfs and report as a model run does (policy 'kernel').",
    )
    run.add_argument(
        "scenario",
        nargs="?",
        metavar="FILE",
        help=f"scenario TOML (default: configs/{DEFAULT_SCENARIO.name})",
    )
    run.add_argument("--memory", metavar="SIZE", help="the guest's RAM (machine.memory)")
    run.add_argument(
        "--hog", metavar="SIZE|Nx", help="the first workload's total (workloads.0.total)"
    )
    run.add_argument(
        "--server",
        metavar="nbd://HOST:PORT/EXPORT",
        help="swap on this NBD server (loopback only) instead of an embedded netswap server",
    )
    from testbed.cli import counted

    run.add_argument(
        "--trials", type=counted("trials", 1000), default=1, metavar="N", help="boot N times"
    )
    run.add_argument("--nic", choices=("virtio", "e1000"), help="the guest's NIC (kernel.nic)")
    run.add_argument(
        "--accel", choices=("auto", "kvm", "tcg"), help="qemu's accelerator (kernel.accel)"
    )
    run.add_argument("--summary", metavar="FILE", help="write the summary (or {runs}) as JSON")
    run.add_argument(
        "--control",
        metavar="HOST:PORT",
        help="serve the embedded server's control endpoint here, for "
        "`netswap pressure server-fault` during the run",
    )
    add_overrides(run)
    add_logging(run)
    run.set_defaults(func=cmd_kernel_run)

    image = what.add_parser(
        "image",
        help="build (or find in the cache) the guest image and say what is in it",
        description="Download the kernel, busybox-static and nbd-client with apt-get "
        "download, unpack them with dpkg-deb and build the initramfs; cached by version.",
    )
    image.add_argument(
        "--flavour", choices=("cloud", "generic"), default="cloud", help="Debian's kernel"
    )
    image.set_defaults(func=cmd_kernel_image)


def kernel_scenario(args: argparse.Namespace) -> ScenarioConfig:
    from testbed.cli import parse_overrides

    overrides = parse_overrides(args.overrides)
    if args.memory is not None:
        overrides["machine.memory"] = args.memory
    if args.hog is not None:
        overrides["workloads.0.total"] = args.hog
    if args.nic is not None:
        overrides["kernel.nic"] = args.nic
    if args.accel is not None:
        overrides["kernel.accel"] = args.accel
    path = args.scenario or str(DEFAULT_SCENARIO)
    if args.hog is not None:
        data = {} if path is None else _toml(path)
        if not data.get("workloads"):
            raise ConfigError("--hog: the scenario has no workloads.0 to size")
    return load_scenario(path, overrides)


def _toml(path: str) -> dict[str, Any]:
    from testbed.config import load_toml

    return load_toml(path)


def cmd_kernel_run(args: argparse.Namespace) -> int:
    from server.config import parse_hostport
    from testbed import log as logsetup
    from testbed.cli import EXIT_OK, exit_code, parse_nbd_uri, write_summary
    from testbed.kernel.run import KernelRunError, run_kernel

    scenario = kernel_scenario(args)
    server = parse_nbd_uri(args.server) if args.server else None
    control: tuple[str, int] | None = None
    if args.control is not None:
        if server is not None:
            raise ConfigError("--control: only the embedded server has a control endpoint")
        from testbed.control import DEFAULT_CONTROL_PORT, check_control_address

        control = parse_hostport(args.control, what="--control", default_port=DEFAULT_CONTROL_PORT)
        check_control_address(control[0], allow_remote=False)
    from testbed.kernel.plan import guest_settings, memory_mib

    guest_settings(scenario)  # what the guest cannot do fails here, before any download
    memory_mib(scenario)
    logsetup.configure(log_file=args.log_file, log_format=args.log_format, level=args.log_level)
    log = structlog.get_logger()
    runs: list[dict[str, Any]] = []

    async def main() -> None:
        async with trio.open_nursery() as nursery:

            def attach(nbd: Any) -> None:
                if control is None:
                    return
                from testbed.control import ServerControlEndpoint, serve_control

                async def serve() -> None:
                    host, port = await nursery.start(
                        serve_control, ServerControlEndpoint(nbd), *control
                    )
                    print(f"control listening on {host}:{port}", file=sys.stderr, flush=True)

                nursery.start_soon(serve)

            for trial in range(args.trials):
                if args.trials > 1:
                    print(f"trial {trial + 1}/{args.trials} ...", file=sys.stderr, flush=True)
                summary = await run_kernel(
                    scenario, server=server, log=log, server_ready=attach, trial=trial
                )
                runs.append(summary)
                if args.trials > 1:
                    print(
                        f"trial {trial + 1}: {summary['outcome']}"
                        + (f" ({summary['reason']})" if summary.get("reason") else ""),
                        file=sys.stderr,
                        flush=True,
                    )
            nursery.cancel_scope.cancel()

    try:
        trio.run(main)
    except KernelRunError as exc:
        raise ConfigError(str(exc)) from None
    except BaseException as exc:
        from testbed.cli.common import leaves as _leaves

        for leaf in _leaves(exc):
            if isinstance(leaf, KernelRunError | ConfigError):
                raise ConfigError(str(leaf)) from None
        raise
    if args.trials == 1:
        summary = runs[0]
        write_summary(args.summary, summary)
        print(outcome_line(summary))
        for line in deadlock_lines(summary):
            print(line)
        return exit_code(summary["outcome"])
    write_summary(args.summary, {"scenario": args.scenario, "trials": args.trials, "runs": runs})
    print(trials_table(runs))
    return EXIT_OK


def outcome_line(summary: dict[str, Any]) -> str:
    integ, vm = summary["integrity"], summary["vmstat"]
    duration = summary.get("duration")
    took = f" after {duration:.0f}s of guest uptime" if duration is not None else ""
    return (
        f"{summary['kernel']['release']} ({summary['kernel']['nic']}): {summary['outcome']}"
        + (f" ({summary['reason']})" if summary.get("reason") else "")
        + f"{took}; pages verified {integ['pages_verified']}, corrupt {integ['corrupt']};"
        f" pswpout {vm.get('pswpout', 0)}, pswpin {vm.get('pswpin', 0)},"
        f" allocstall {vm.get('allocstall', 0)}"
    )


def deadlock_lines(summary: dict[str, Any]) -> list[str]:
    """The blocked tasks of a deadlocked guest, one line each: where each waits."""
    deadlock = summary.get("deadlock") or {}
    return [f"  {task}: {where}" for task, where in (deadlock.get("waiting") or {}).items()]


def trials_table(runs: list[dict[str, Any]]) -> str:
    """How often each outcome came out over the trials (as ``compare --seeds`` prints)."""
    from testbed.report import format_table

    outcomes = sorted({r["outcome"] for r in runs})
    release = runs[0]["kernel"]["release"] if runs else "?"
    nic = runs[0]["kernel"]["nic"] if runs else "?"
    rows = [("kernel", "nic", *outcomes)]
    rows.append(
        (release, nic, *(f"{sum(r['outcome'] == o for r in runs)}/{len(runs)}" for o in outcomes))
    )
    lines = format_table(rows)
    for outcome in outcomes:
        which = [str(r["trial"] + 1) for r in runs if r["outcome"] == outcome]
        lines.append(f"{outcome}: trials {', '.join(which)}")
    return "\n".join(lines)


def cmd_kernel_image(args: argparse.Namespace) -> int:
    from testbed.cli import EXIT_OK
    from testbed.kernel.image import ImageError, build_image

    try:
        image = build_image(args.flavour, progress=lambda m: print(m, file=sys.stderr))
    except ImageError as exc:
        raise ConfigError(str(exc)) from None
    print("\n".join(image.describe()))
    return EXIT_OK
