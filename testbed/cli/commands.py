"""What ``netswap server``, ``client``, ``run``, ``compare``, ``demo`` and ``report`` do,
given their parsed arguments (:mod:`testbed.cli.parser`).  Each returns the exit code."""

from __future__ import annotations

import argparse
import json
import signal
import sys
from pathlib import Path
from typing import Any

import structlog
import trio

from client.summary import RunSummary, structure_summary, unstructure_summary
from nbdproto.config import ConfigError
from server.config import parse_hostport
from testbed import log as logsetup
from testbed.cli.common import (
    EXIT_OK,
    LISTEN_ERRNOS,
    check_writable,
    exit_code,
    hostport,
    leaves,
    overrides_from,
    parse_nbd_uri,
    run_trio,
    scenario_from,
)
from testbed.cli.render import compare_table, print_outcome, write_summary
from testbed.cli.runs import run_all, run_one
from testbed.cli.seeds import compare_seeds, parse_seeds
from testbed.config import (
    POLICY_NAMES,
    ScenarioConfig,
    load_scenario,
    load_server_config,
    parse_export_spec,
)
from testbed.events import ClientSignal, ServerSignal


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
    control = _control_address(args)

    async def main() -> None:
        with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
            async with trio.open_nursery() as nursery:

                async def watch() -> None:
                    async for signum in signals:
                        logsetup.emit(ServerSignal(signal=signal.Signals(signum).name))
                        server.shutdown()

                nursery.start_soon(watch)
                if control is not None:
                    from testbed.control import ServerControlEndpoint, serve_control

                    endpoint = ServerControlEndpoint(server)
                    host, port = await nursery.start(serve_control, endpoint, *control)
                    print(
                        f"control listening on {hostport(host, port)}", file=sys.stderr, flush=True
                    )
                await server.serve()
                nursery.cancel_scope.cancel()

    run_trio(main)
    return EXIT_OK


def _control_address(args: argparse.Namespace) -> tuple[str, int] | None:
    """``--control`` (checked: loopback unless ``--allow-remote-control``), or None."""
    if args.control is None:
        return None
    from testbed.control import DEFAULT_CONTROL_PORT, check_control_address

    control = parse_hostport(args.control, what="--control", default_port=DEFAULT_CONTROL_PORT)
    check_control_address(control[0], allow_remote=args.allow_remote_control)
    return control


def cmd_client(args: argparse.Namespace) -> int:
    from client.machine import ClientMachine
    from testbed.scenario import run_machine

    host, port, export = parse_nbd_uri(args.server, allow_remote=args.allow_remote)
    overrides = overrides_from(args)
    if export:
        overrides["swap.export"] = export
    scenario = load_scenario(args.config, overrides)
    control = _control_address(args)
    logsetup.configure(log_file=args.log_file, log_format=args.log_format, level=args.log_level)
    log = structlog.get_logger().bind(
        machine=scenario.machine.name, policy=args.policy or scenario.policy
    )

    async def main() -> RunSummary:
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

        async def controlled(machine: ClientMachine, supervisor: Any) -> RunSummary:
            assert control is not None
            return await _run_controlled(machine, control, supervisor, log)

        return await run_machine(
            machine,
            scenario,
            log,
            transport="tcp",
            **({} if control is None else {"runner": controlled}),
            server=args.server,
            control=args.control,
        )

    try:
        summary = trio.run(main)
    except BaseException as exc:
        for leaf in leaves(exc):
            if isinstance(leaf, ConfigError):
                raise leaf from None
            if control and isinstance(leaf, OSError) and leaf.errno in LISTEN_ERRNOS:
                raise ConfigError(f"--control {args.control}: {leaf.strerror}") from None
        raise
    write_summary(args.summary, unstructure_summary(summary))
    print_outcome(summary)
    return exit_code(summary.outcome)


async def _run_controlled(
    machine: Any, address: tuple[str, int], supervisor: Any, log: Any
) -> RunSummary:
    """Run ``machine`` with its control endpoint on ``address``, until ``stop``, SIGINT or
    SIGTERM (each ends the run with its summary, as its workloads ending would)."""
    from testbed.control import ControlEndpoint, serve_control

    endpoint = ControlEndpoint(machine, log=log)
    summary: list[RunSummary] = []
    with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        async with trio.open_nursery() as nursery:
            host, port = await nursery.start(serve_control, endpoint, *address)
            print(f"control listening on {hostport(host, port)}", file=sys.stderr, flush=True)

            async def watch() -> None:
                async for signum in signals:
                    name = signal.Signals(signum).name
                    logsetup.emit(ClientSignal(signal=name), log)
                    machine.stop(f"stopped by {name}")

            async def run() -> None:
                summary.append(await machine.run(supervisor=supervisor))
                nursery.cancel_scope.cancel()

            nursery.start_soon(watch)
            nursery.start_soon(run)
    return summary[0]


#: How many of the tasks that wait for a resource of the deadlock's path ``run`` names.
ALSO_WAITING_SHOWN = 6


def cmd_run(args: argparse.Namespace) -> int:
    scenario = scenario_from(args)
    logsetup.configure(log_file=args.log_file, log_format=args.log_format, level=args.log_level)
    summary = run_one(scenario, args.policy, args.clock)
    write_summary(args.summary, unstructure_summary(summary))
    print_outcome(summary)
    if summary.deadlock:
        print("deadlock: " + summary.deadlock.chain())
        for resource, tasks in summary.deadlock.also_waiting():
            shown = ", ".join(tasks[:ALSO_WAITING_SHOWN])
            more = len(tasks) - ALSO_WAITING_SHOWN
            print(
                f"  also waiting for {resource}: {shown}"
                + (f" and {more} more" if more > 0 else "")
            )
    return exit_code(summary.outcome)


def cmd_compare(args: argparse.Namespace) -> int:
    policies = [p.strip() for p in args.policies.split(",") if p.strip()]
    unknown = [p for p in policies if p not in POLICY_NAMES]
    if unknown or not policies:
        raise ConfigError(
            f"--policies: unknown {unknown or 'empty'}; choose from {', '.join(POLICY_NAMES)}"
        )
    scenario = scenario_from(args)
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
        return compare_seeds(args, scenario, policies, seeds)
    plot = getattr(args, "plot", None)
    if plot:
        check_writable(plot, "--plot")
    if getattr(args, "kernel", False):
        from testbed.kernel.plan import guest_settings

        guest_settings(scenario)  # what the guest cannot do fails before any run
    capture = logsetup.Capture() if plot else None
    runs = run_all(args, [(policy, scenario, policy) for policy in policies], capture)
    if getattr(args, "kernel", False):
        runs.append(_run_kernel_row(args, scenario, capture))
    print(compare_table(runs))
    if args.summary:
        write_summary(
            args.summary,
            {"scenario": args.scenario, "runs": [unstructure_summary(r) for r in runs]},
        )
    if capture is not None and plot:
        from testbed.plot import plot_runs
        from testbed.report import load_runs

        lines = (json.dumps(e, default=str) for e in capture.events)
        plot_runs(load_runs(lines), plot, title=f"netswap compare: {Path(args.scenario).name}")
        print(f"plot: {plot}", file=sys.stderr)
    return EXIT_OK


def _run_kernel_row(
    args: argparse.Namespace, scenario: ScenarioConfig, capture: logsetup.Capture | None
) -> RunSummary:
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
    return structure_summary(summary)


def cmd_report(args: argparse.Namespace) -> int:
    from testbed.report import ReportError, load_runs, render_report, report_json

    if args.plot:
        check_writable(args.plot, "--plot")
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


DEMO_SCENARIO = Path(__file__).resolve().parents[2] / "configs" / "swap-over-nbd.toml"


def cmd_demo(args: argparse.Namespace) -> int:
    if not DEMO_SCENARIO.exists():
        raise ConfigError(f"the demo scenario {DEMO_SCENARIO} is missing (run from a checkout)")
    args.scenario = str(DEMO_SCENARIO)
    args.policies = ",".join(POLICY_NAMES)
    args.clock = "virtual"
    args.log_format = "json"
    scenario_from(args)  # a bad --set is a one-line error before anything runs
    print(
        f"netswap demo: {DEMO_SCENARIO.name}, every policy, log in {args.log_file},"
        f" plot in {args.plot}",
        file=sys.stderr,
    )
    return cmd_compare(args)
