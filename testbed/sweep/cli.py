"""``netswap sweep FILE --grid ...``, ``sweep show|plot|export DIR``: the command line of
sweeps (docs/sweeps.md).  ``netswap sweep FILE ...`` is ``netswap sweep run FILE ...``."""

from __future__ import annotations

import argparse
import signal
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from nbdproto.config import ConfigError
from testbed.config import POLICY_NAMES

#: The subcommands of ``netswap sweep``; anything else after ``sweep`` is a scenario FILE.
COMMANDS = ("run", "show", "plot", "export")


def with_default_command(argv: Sequence[str]) -> list[str]:
    """``sweep FILE ...`` → ``sweep run FILE ...`` (``sweep -h`` still lists the commands)."""
    args = list(argv)
    if args[:1] == ["sweep"] and len(args) > 1 and args[1] not in (*COMMANDS, "-h", "--help"):
        args.insert(1, "run")
    return args


def add_parser(
    sub: Any,
    *,
    parser_class: type[argparse.ArgumentParser],
    jobs_type: Callable[[str], int],
) -> None:
    sweep = sub.add_parser(
        "sweep",
        help="run a grid of config values x policies x seeds into a DuckDB database",
        description="netswap sweep FILE --grid KEY=V1,V2,... --out DIR runs every "
        "combination of the grid's values, policies and seeds on the virtual clock and "
        "writes one row per run into DIR/sweep.duckdb (resumable); show, plot and export "
        "read it.  See docs/sweeps.md.",
    )
    what = sweep.add_subparsers(
        dest="sweep_command", required=True, metavar="COMMAND", parser_class=parser_class
    )
    run = what.add_parser(
        "run",
        help="run the sweep (the default: netswap sweep FILE ... is netswap sweep run FILE ...)",
        description="Run every combination of --grid values x --policies x --seeds on the "
        "virtual clock and write a row per run into DIR/sweep.duckdb, as each finishes.  Runs "
        "already in the database are skipped: the same command continues an interrupted "
        "sweep, and may add policies or seeds.",
    )
    run.add_argument(
        "scenario", metavar="FILE",
        help="a scenario TOML (configs/), or a sweep file (configs/sweeps/) that names one "
        "with its grid, policies and seeds",
    )  # fmt: skip
    run.add_argument(
        "--grid", action="append", default=[], metavar="KEY=V1,V2,...",
        help="a dotted config key (as --set takes it) and its values; repeat for more keys",
    )  # fmt: skip
    run.add_argument(
        "--policies", metavar="a,b,...",
        help=f"comma-separated (default: all, {','.join(POLICY_NAMES)})",
    )  # fmt: skip
    run.add_argument(
        "--seeds", metavar="A-B|A,B,...",
        help="run every cell and policy once per seed (default: the scenario's run.seed)",
    )  # fmt: skip
    run.add_argument(
        "--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
        help="override a config key for every run (e.g. to scale the scenario down)",
    )  # fmt: skip
    run.add_argument(
        "--out", required=True, metavar="DIR",
        help="the sweep's directory: DIR/sweep.duckdb and DIR/logs/ (created if missing)",
    )  # fmt: skip
    run.add_argument(
        "--jobs", type=jobs_type, metavar="N",
        help="local worker processes (default: the number of cores)",
    )  # fmt: skip
    run.add_argument(
        "--scheduler", metavar="tcp://HOST:PORT",
        help="run on this Dask scheduler's workers instead of local processes",
    )  # fmt: skip
    run.add_argument(
        "--scheduler-timeout", type=float, metavar="SECONDS",
        help="how long to wait for the scheduler and a first worker (default 5)",
    )  # fmt: skip
    run.add_argument(
        "--retry-errors", action="store_true",
        help="run again the runs that raised (their rows are replaced)",
    )  # fmt: skip
    run.add_argument(
        "--log-level", default="info", choices=("debug", "info", "warning", "error"),
        help="level of the runs' logs in DIR/logs/ (default: info)",
    )  # fmt: skip
    run.set_defaults(func=cmd_sweep_run)

    show = what.add_parser(
        "show",
        help="print P(completed) per cell and policy as a table",
        description="A row per cell of the grid, a column per policy: completed/runs, then "
        "the runs that did not complete by result (DL deadlock, OOM, ...).",
    )
    show.add_argument("directory", metavar="DIR")
    show.set_defaults(func=cmd_sweep_show)

    plot = what.add_parser(
        "plot",
        help="draw P(completed) maps, one per policy, into a PNG",
        description="One heat map per policy of P(completed) over --x and --y (a line per "
        "policy over --x when the grid has one key); cells annotated with completed/runs, "
        "cells where nothing completed coloured by their failure.",
    )
    plot.add_argument("directory", metavar="DIR")
    plot.add_argument("--x", metavar="KEY", help="the grid key across (default: the first)")
    plot.add_argument("--y", metavar="KEY", help="the grid key up (default: the next)")
    plot.add_argument("--out", metavar="PNG", help="the image (default: DIR/sweep.png)")
    plot.set_defaults(func=cmd_sweep_plot)

    export = what.add_parser(
        "export",
        help="write the runs table to a Parquet file",
        description="Copy the runs table (one row per run) to a Parquet file.",
    )
    export.add_argument("directory", metavar="DIR")
    export.add_argument("--parquet", required=True, metavar="FILE")
    export.set_defaults(func=cmd_sweep_export)


def cmd_sweep_run(args: argparse.Namespace) -> int:
    from testbed.cli import parse_seeds
    from testbed.sweep.grid import parse_policies, plan_sweep
    from testbed.sweep.run import run_sweep

    if args.scheduler is not None and args.jobs is not None:
        raise ConfigError("--jobs: not with --scheduler (the cluster's workers run the runs)")
    if args.scheduler is not None:
        from testbed.sweep.cluster import check_address

        check_address(args.scheduler)
    if args.scheduler_timeout is not None and not args.scheduler_timeout > 0:
        raise ConfigError(f"--scheduler-timeout {args.scheduler_timeout}: must be > 0")
    scenario, grid, policies_text, seeds_text, overrides = _sweep_from(args)
    policies = parse_policies(policies_text)
    seeds = parse_seeds(seeds_text) if seeds_text is not None else None
    plan = plan_sweep(scenario, overrides, grid, policies, seeds)
    out = Path(args.out)
    # SIGTERM stops a sweep as Ctrl-C does: the runs in flight are lost, none half-written.
    previous = signal.signal(signal.SIGTERM, signal.default_int_handler)
    try:
        report = run_sweep(
            plan,
            out,
            jobs=args.jobs,
            scheduler=args.scheduler,
            scheduler_timeout=args.scheduler_timeout,
            retry_errors=args.retry_errors,
            log_level=args.log_level,
        )
    except KeyboardInterrupt:
        from testbed.sweep.store import reading

        try:
            with reading(out) as store:
                (n,) = store.query("SELECT count(*) FROM runs")[0]
        except ConfigError:
            raise KeyboardInterrupt from None  # stopped before the database was made
        print(
            f"netswap sweep: interrupted; {n} runs are in {out / 'sweep.duckdb'}, "
            "the same command continues",
            file=sys.stderr,
        )
        raise
    finally:
        signal.signal(signal.SIGTERM, previous)
    ran = sum(report.ran.values())
    outcomes = ", ".join(f"{k} {n}" for k, n in sorted(report.ran.items())) or "nothing to run"
    print(
        f"sweep {out}: {report.planned} runs, {report.skipped} already done, {ran} run now: "
        f"{outcomes}"
    )
    if report.retried:
        print(f"sweep {out}: ran again {report.retried} runs that had raised", file=sys.stderr)
    raised = report.ran.get("raised", 0)
    if raised:
        print(
            f"sweep {out}: {raised} runs raised; their error and traceback are in the "
            f"database (SELECT error FROM runs WHERE outcome = 'raised'), and "
            "--retry-errors runs them again",
            file=sys.stderr,
        )
    return 0


def _sweep_from(
    args: argparse.Namespace,
) -> tuple[str, tuple[Any, ...], str | None, str | None, dict[str, Any]]:
    """The scenario, grid, policies, seeds and overrides of the command line, over those of
    a sweep file (``configs/sweeps/``) when FILE is one."""
    from testbed.cli import parse_overrides
    from testbed.config import load_toml
    from testbed.sweep.grid import load_sweep_file, parse_grid

    data = load_toml(args.scenario)
    overrides = parse_overrides(args.overrides)
    if "sweep" not in data:  # a scenario
        if not args.grid:
            raise ConfigError("netswap sweep: give at least one --grid KEY=V1,V2,...")
        return args.scenario, parse_grid(args.grid), args.policies, args.seeds, overrides
    sweep = load_sweep_file(args.scenario, data)
    grid = sweep.grid + (parse_grid(args.grid) if args.grid else ())
    keys = [a.key for a in grid]
    twice = sorted({k for k in keys if keys.count(k) > 1})
    if twice:
        raise ConfigError(f"--grid {twice[0]}: {args.scenario} sweeps it already")
    return (
        sweep.scenario,
        grid,
        args.policies if args.policies is not None else sweep.policies,
        args.seeds if args.seeds is not None else sweep.seeds,
        {**dict(sweep.overrides), **overrides},
    )


def cmd_sweep_show(args: argparse.Namespace) -> int:
    from rich.console import Console

    from testbed.sweep.maps import LEGEND, render_table, tally
    from testbed.sweep.store import reading

    with reading(args.directory) as store:
        table = render_table(tally(store))
    console = Console() if sys.stdout.isatty() else Console(width=200, no_color=True)
    console.print(table)
    console.print(LEGEND, markup=False, highlight=False)
    return 0


def cmd_sweep_plot(args: argparse.Namespace) -> int:
    from testbed.sweep.maps import plot_sweep
    from testbed.sweep.store import reading

    out = Path(args.out) if args.out else Path(args.directory) / "sweep.png"
    if out.suffix.lower() != ".png":
        raise ConfigError(f"--out {out}: the map is a PNG; name it FILE.png")
    if not out.resolve().parent.is_dir():
        raise ConfigError(f"--out {out}: directory {out.resolve().parent} does not exist")
    with reading(args.directory) as store:
        info = plot_sweep(store, out, x=args.x, y=args.y)
    what = f"{info.x} x {info.y}" if info.y else info.x
    print(f"plot: {info.path} ({info.kind} of P(completed) over {what}, {len(info.policies)} "
          f"policies)")  # fmt: skip
    return 0


def cmd_sweep_export(args: argparse.Namespace) -> int:
    from testbed.sweep.store import reading

    out = Path(args.parquet)
    if not out.resolve().parent.is_dir():
        raise ConfigError(f"--parquet {out}: directory {out.resolve().parent} does not exist")
    with reading(args.directory) as store:
        n = store.export_parquet(out)
    print(f"export: {n} runs to {out}")
    return 0
