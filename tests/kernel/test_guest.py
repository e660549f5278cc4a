"""A real Linux guest under qemu (TCG) swapping over NBD: the kernel lab end to end.

Each test boots Debian's cloud kernel with ``netswap kernel run``, as a user does, and reads
what it wrote: the summary, the log (through ``netswap report``), the exit status.  They
need qemu-system-x86, busybox-static and nbd-client (and apt's lists, to download the
kernel package once); a missing one skips locally and fails in CI.
"""

from __future__ import annotations

import contextlib
import json
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from testbed.report import load_runs
from tests import processes
from tests.conftest import require_tool

pytestmark = [pytest.mark.kernel, pytest.mark.timeout(900)]

CONFIG = Path(__file__).resolve().parents[2] / "configs" / "kernel-calibration.toml"
#: Small enough for the suite: 96 MiB of RAM, 1.5x of it written and read back.
SMALL = ["--memory", "96M", "--hog", "1.5x"]


@pytest.fixture(scope="module", autouse=True)
def guest_tools() -> None:
    for tool in ("qemu-system-x86_64", "busybox", "nbd-client", "apt-get", "dpkg-deb"):
        require_tool(tool)


def netswap(*args: str, timeout: float = 800) -> subprocess.CompletedProcess[str]:
    return processes.netswap(*args, timeout=timeout)


def assert_completed(summary: dict[str, Any], log: Path) -> None:
    assert summary["outcome"] == "completed", summary.get("reason")
    assert summary["policy"] == "kernel"
    assert summary["machine"].startswith("6.")  # the guest kernel's release
    integrity = summary["integrity"]
    assert integrity["corrupt"] == 0
    assert integrity["pages_written"] == 36864  # 1.5 x 96 MiB in pages
    assert integrity["pages_verified"] == integrity["pages_written"]
    assert summary["vmstat"]["pswpout"] > 0
    assert summary["vmstat"]["pswpin"] > 0
    assert summary["memory"]["min_free_kbytes"] > 0
    # The log reads as a model run's does: one run, policy kernel, samples with counters.
    runs = load_runs(str(log))
    assert [(r.policy, r.outcome) for r in runs] == [("kernel", "completed")]
    samples = runs[0].samples
    assert len(samples) > 10
    assert all(isinstance(s["nr_free_pages"], int) and s["zones"] for s in samples)
    assert samples[-1]["pswpout"] > 0
    report = netswap("report", str(log))
    assert report.returncode == 0, report.stderr
    assert "kernel" in report.stdout and "completed" in report.stdout


def test_a_guest_swaps_over_nbd_to_the_netswap_server(tmp_path: Path) -> None:
    log, summary_file = tmp_path / "kernel.jsonl", tmp_path / "summary.json"
    done = netswap(
        "kernel", "run", str(CONFIG), *SMALL, "--log-file", str(log),
        "--summary", str(summary_file),
    )  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr
    assert_completed(json.loads(summary_file.read_text()), log)
    assert "completed" in done.stdout


@pytest.fixture
def nbdkit(tmp_path: Path) -> Iterator[int]:
    """nbdkit's memory plugin on a free loopback port; yields the port."""
    binary = require_tool("nbdkit")
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    pidfile = tmp_path / "nbdkit.pid"
    proc = subprocess.Popen(
        [binary, "-f", "-i", "127.0.0.1", "-p", str(port), "-P", str(pidfile),
         "-e", "swap", "memory", "512M"],
        stdin=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        while not pidfile.exists():  # nbdkit writes the pidfile once it listens
            assert proc.poll() is None, "nbdkit exited at start-up"
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=0.05)
        yield port
    finally:
        proc.terminate()
        proc.wait(timeout=10)


def test_a_guest_swaps_over_nbd_to_nbdkit(tmp_path: Path, nbdkit: int) -> None:
    log, summary_file = tmp_path / "kernel.jsonl", tmp_path / "summary.json"
    done = netswap(
        "kernel", "run", str(CONFIG), *SMALL, "--server", f"nbd://127.0.0.1:{nbdkit}/swap",
        "--log-file", str(log), "--summary", str(summary_file),
    )  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr
    assert_completed(json.loads(summary_file.read_text()), log)


def test_a_stalled_server_ends_the_run_as_a_deadlock_with_the_blocked_tasks(
    tmp_path: Path,
) -> None:
    """The server holds every request once the workloads start: the guest stops making
    progress, the host dumps its blocked tasks through sysrq w and ends the run."""
    summary_file = tmp_path / "summary.json"
    proc = subprocess.Popen(
        [sys.executable, "-P", "-m", "testbed.cli", "kernel", "run", str(CONFIG), *SMALL,
         "--set", "kernel.stall_seconds=20", "--set", "swap.io_timeout=900",
         "--control", "127.0.0.1:0", "--log-format", "json", "--summary", str(summary_file)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        control = None
        assert proc.stderr is not None
        for line in proc.stderr:  # the log goes to stderr: read it as it comes
            if line.startswith("control listening on "):
                control = line.split()[-1]
            elif '"step": "started"' in line:
                break
        else:
            raise AssertionError("the guest never started its workloads")
        assert control is not None
        stall = netswap(
            "pressure", "--control", control, "server-fault", "stall", "--export", "swap",
            "--seconds", "900", timeout=60,
        )  # fmt: skip
        assert stall.returncode == 0, stall.stdout + stall.stderr
        rest = proc.stderr.read()
        assert proc.wait(timeout=600) == 3, rest[-3000:]  # exit 3: deadlock
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    summary = json.loads(summary_file.read_text())
    assert summary["outcome"] == "deadlock"
    blocked = summary["deadlock"]["blocked_tasks"]
    assert blocked, "sysrq w showed no blocked task"
    assert all(t["state"] == "D" for t in blocked)
    assert any(t["stack"] for t in blocked)
    assert '"event": "kernel.blocked_tasks"' in rest
