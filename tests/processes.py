"""The command line as tests run it: in this process (the ``cli`` fixture of
tests/conftest.py, for usage errors), or in a subprocess, as a user runs it."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

#: ``cli(*args)``: ``netswap ARGS`` run in this process (the ``cli`` fixture).
Cli = Callable[..., subprocess.CompletedProcess[str]]


def console_script() -> Path:
    """The ``netswap`` console script pip installed beside this interpreter."""
    return Path(sys.executable).with_name("netswap")


def netswap(
    *args: str, timeout: float = 60, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    """``netswap ARGS`` with no stdin; its exit status, stdout and stderr.  (``-P``: not the
    working directory first on sys.path, which would hide a compiled model's client/.)"""
    return subprocess.run(
        [sys.executable, "-P", "-m", "testbed.cli", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        stdin=subprocess.DEVNULL,
        env=env,
    )


def one_line(result: subprocess.CompletedProcess[str]) -> str:
    """The one line a failed command printed on stderr (no traceback)."""
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in result.stderr, result.stderr
    return lines[0]
