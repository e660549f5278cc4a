"""What the benchmarks share: the loopback host and timeouts, random data for a copy,
CPU accounting from /proc, the machine's description, and the rewriting of a section of
docs/benchmarks.md."""

from __future__ import annotations

import datetime as dt
import os
import platform
import re
import signal
import subprocess
from pathlib import Path
from typing import Any

HOST = "127.0.0.1"
KiB = 1 << 10
MiB = 1 << 20
STARTUP_TIMEOUT = 20.0
COPY_TIMEOUT = 600.0
#: Random data is made of this block, repeated: nothing in the path compares or dedupes.
RANDOM_BLOCK = 16 * MiB


class BenchError(Exception):
    """A measurement could not be taken (a tool failed, a server did not start)."""


def stop_server(proc: subprocess.Popen[bytes], name: str) -> None:
    """SIGTERM a server subprocess and wait; a server that does not stop on it, or exits
    non-zero, is a benchmark error (after it has been killed)."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
            raise BenchError(f"{name} did not stop on SIGTERM") from None
    if proc.returncode != 0:
        raise BenchError(f"{name} exited {proc.returncode} after SIGTERM")


def make_source(path: Path, size: int) -> None:
    block = os.urandom(min(RANDOM_BLOCK, size))
    with path.open("wb") as fh:
        left = size
        while left:
            n = min(len(block), left)
            fh.write(block[:n])
            left -= n


_TICK = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


def busy_seconds() -> float:
    """CPU time spent in user and system mode on the whole machine (from /proc/stat)."""
    try:
        fields = Path("/proc/stat").read_text().split("\n", 1)[0].split()
    except OSError:
        return 0.0
    user, nice, system = (int(x) for x in fields[1:4])
    return (user + nice + system) / _TICK


def process_seconds(pid: int) -> float:
    """utime + stime of a live process, all threads (/proc/PID/stat)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return 0.0
    fields = stat.rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / _TICK


def own_seconds() -> float:
    """This process and its waited-for children (nbdcopy)."""
    t = os.times()
    return t.user + t.system + t.children_user + t.children_system


def tool_version(cmd: list[str]) -> str:
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=10, check=False)
    except OSError:
        return "not installed"
    return out.stdout.strip().splitlines()[0] if out.stdout.strip() else "unknown"


def machine() -> dict[str, Any]:
    model = "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    try:
        nproc = len(os.sched_getaffinity(0))
    except AttributeError:
        nproc = os.cpu_count() or 0
    return {
        "date": dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "nproc": nproc,
        "cpu": model,
        "kernel": f"{platform.system()} {platform.release()}",
        "python": f"{platform.python_implementation()} {platform.python_version()}",
        "nbdkit": tool_version(["nbdkit", "--version"]),
        "nbdcopy": tool_version(["nbdcopy", "--version"]),
    }


DOCS_INTRO = """# Benchmarks

Performance measurements of netswap (DESIGN.md §8).  They are ratios measured in one run on
one machine, never timed tests: rerun the script to update a section, and compare numbers
only within a section.
"""


def write_docs(path: Path, text: str, section: str) -> None:
    """Replace (or append at the end) the ``section`` of ``path``."""
    old = path.read_text() if path.exists() else DOCS_INTRO
    pattern = re.compile(rf"^{re.escape(section)}\n.*?(?=^## |\Z)", re.MULTILINE | re.DOTALL)
    if pattern.search(old):
        new = pattern.sub(lambda _: text + "\n", old, count=1)
    else:
        new = old.rstrip("\n") + "\n\n" + text
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(new.rstrip("\n") + "\n")
