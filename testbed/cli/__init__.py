"""``netswap ...``: the command-line entry points.

Exit codes (DESIGN.md §6): 0 completed, 3 deadlock, 4 integrity error, 2 usage or
configuration error, 1 anything else.  Every usage or configuration error is one line on
stderr naming the bad value, never a traceback.

One job per module: :mod:`~testbed.cli.parser` (the arguments),
:mod:`~testbed.cli.commands` (what the commands do), :mod:`~testbed.cli.runs` (runs one at
a time or ``--jobs`` at a time), :mod:`~testbed.cli.seeds` (``compare --seeds``),
:mod:`~testbed.cli.render` (the outcome line, the table, ``--summary``),
:mod:`~testbed.cli.pressure` (the control endpoint's blocking client) and
:mod:`~testbed.cli.common` (exit codes, errors, shared parsing).
"""

from __future__ import annotations

import os
import sys
from collections.abc import Sequence

from nbdproto.config import ConfigError
from testbed import compiled
from testbed.cli.common import (
    EXIT_DEADLOCK,
    EXIT_ERROR,
    EXIT_INTEGRITY,
    EXIT_OK,
    EXIT_USAGE,
    RunFailed,
    UsageError,
    exit_code,
    parse_nbd_uri,
    parse_overrides,
)
from testbed.cli.parser import build_parser, counted
from testbed.cli.pressure import pressure_request
from testbed.cli.render import compare_table, write_summary
from testbed.cli.runs import _Job, _job, _JobFailed
from testbed.cli.seeds import parse_seeds

__all__ = [
    "EXIT_DEADLOCK",
    "EXIT_ERROR",
    "EXIT_INTEGRITY",
    "EXIT_OK",
    "EXIT_USAGE",
    "RunFailed",
    "UsageError",
    "_Job",
    "_JobFailed",
    "_job",
    "build_parser",
    "compare_table",
    "counted",
    "exit_code",
    "main",
    "parse_nbd_uri",
    "parse_overrides",
    "parse_seeds",
    "pressure_request",
    "write_summary",
]


def main(argv: Sequence[str] | None = None) -> int:
    from testbed.sweep.cli import with_default_command

    parser = build_parser()
    try:
        args = parser.parse_args(with_default_command(sys.argv[1:] if argv is None else argv))
        compiled.check()  # a stale compiled model would run other code than the sources say
        code: int = args.func(args)
        return code
    except (UsageError, ConfigError, compiled.StaleBuild) as exc:
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
