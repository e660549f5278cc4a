"""The command line as a user meets it: exit codes and one-line errors.

Usage and configuration errors run ``testbed.cli.main`` in-process (``cli``, tests/conftest.py):
it is what the ``netswap`` script calls, and a subprocess per error would cost a second each;
one test runs an error through the installed console script, to show that the script runs
``main`` and that its status becomes the exit status.  The runs (demo, compare, report) stay
subprocesses, as a user starts them.
"""

from __future__ import annotations

import json
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from tests.processes import Cli, console_script, netswap, one_line

SMALL = str(Path(__file__).resolve().parents[1] / "configs" / "small.toml")


def assert_usage_error(result: subprocess.CompletedProcess[str], *needles: str) -> None:
    assert result.returncode == 2, result.stderr
    line = one_line(result)
    for needle in needles:
        assert needle in line


@pytest.mark.parametrize(
    ("args", "needles"),
    [
        (["server", "--export", "disk"], ["'disk'", "NAME:SIZE"]),
        (["server", "--export", "disk:12Q"], ["'12Q'", "not a size"]),
        (["server", "--export", "disk:1M:tape"], ["'tape'"]),
        (["server", "--export", "a:1M", "--export", "a:2M"], ["unique", "'a'"]),
        (["server", "--listen", "192.0.2.1:10809"], ["not loopback", "--allow-remote"]),
        (["server", "--listen", "127.0.0.1:70000"], ["70000"]),
        (["server", "--config", "/nonexistent/netswap.toml"], ["does not exist"]),
        (["server", "--max-connections", "lots"], ["lots"]),
        (["server", "--frobnicate"], ["--frobnicate"]),
        (["launch"], ["launch"]),
        (["demo", "--set", "machine.memory=huge"], ["'huge'"]),
        # The errors a user of run/compare/client makes (issue D), each one line, exit 2.
        (["run", "/nonexistent/scenario.toml"], ["does not exist"]),
        (["run", SMALL, "--set", "machine.memroy=64M"], ["memroy"]),
        (["run", SMALL, "--set", "machine.memory=[1]"], ["machine.memory"]),
        (["run", SMALL, "--policy", "magic"], ["magic", "pfmemalloc"]),
        (["compare", SMALL, "--policies", "none,magic"], ["magic"]),
        (["run", SMALL, "--set", "workloads.0.kind=disk"], ["'disk'"]),
        (["client", "--server", "nbd://127.0.0.1:1/swap"], ["cannot reach"]),
        (["client", "--server", "http://127.0.0.1/swap"], ["nbd://"]),
        (["report", "/nonexistent/run.jsonl"], ["no such file"]),
        (["compare", SMALL, "--seeds", "3-1"], ["--seeds", "'3-1'"]),
        (["compare", SMALL, "--seeds", "one"], ["--seeds", "integers"]),
        (["compare", SMALL, "--seeds", "0-1", "--clock", "real"], ["--clock virtual"]),
        (["report", SMALL], ["no netswap run"]),
        (["compare", SMALL, "--plot", "/nonexistent/dir/x.png"], ["does not exist"]),
        (["compare", SMALL, "--jobs", "0"], ["--jobs", "1..256"]),
        (["compare", SMALL, "--jobs", "two"], ["--jobs", "'two'"]),
        (["compare", SMALL, "--jobs", "2", "--clock", "real"], ["--jobs", "real clock"]),
    ],
)
def test_bad_arguments_exit_2_with_one_line(cli: Cli, args: list[str], needles: list[str]) -> None:
    assert_usage_error(cli(*args), *needles)


def test_the_console_script_exits_2_with_one_line_on_a_usage_error() -> None:
    """The ``netswap`` script pip installs (``[project.scripts]``) runs ``main``, and
    ``main``'s status is what the shell sees, stderr one line."""
    script = console_script()
    assert script.exists(), f"{script}: install the package (make .venv/.installed-stamp)"
    result = subprocess.run(
        [str(script), "server", "--export", "disk:12Q"],
        capture_output=True,
        text=True,
        timeout=60,
        stdin=subprocess.DEVNULL,
    )
    assert_usage_error(result, "'12Q'", "not a size")


@pytest.mark.parametrize(
    ("toml", "needles"),
    [
        ("[server]\nmax_conections = 3\n", ["max_conections"]),
        ("[server]\nmax_connections = 'many'\n", ["max_connections"]),
        ("[server\n", ["invalid TOML"]),
        ("[clients]\n", ["clients"]),
        ("[[server.exports]]\nname = 'a'\nsize = '1M'\nbackend = 'tape'\n", ["backend"]),
        ("[[server.exports]]\nname = 'a'\nsize = '1M'\nbackend = 'file'\n", ["needs a path"]),
    ],
)
def test_bad_config_exits_2_naming_the_key(
    cli: Cli, tmp_path: Path, toml: str, needles: list[str]
) -> None:
    path = tmp_path / "bad.toml"
    path.write_text(toml)
    assert_usage_error(cli("server", "--config", str(path)), *needles)


def test_file_export_of_another_size_is_refused(cli: Cli, tmp_path: Path) -> None:
    image = tmp_path / "disk.img"
    image.write_bytes(bytes(4096))
    assert_usage_error(
        cli("server", "--listen", "127.0.0.1:0", "--export", f"d:1M:file={image}"),
        "4096 bytes",
    )


def test_port_in_use_is_a_one_line_error(cli: Cli) -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        assert_usage_error(cli("server", "--listen", f"127.0.0.1:{port}"), "cannot listen")


def test_demo_compares_every_policy_and_writes_its_log(tmp_path: Path) -> None:
    log = tmp_path / "demo.jsonl"
    result = netswap(
        "demo",
        "--set",
        "machine.memory=16M",
        "--set",
        "workloads.0.processes=8",
        "--set",
        "nic.ring_size=64",  # scaled with the 16M machine, as test_outcomes.py's SMALL
        "--log-file",
        str(log),
        "--plot",
        str(tmp_path / "demo.png"),
        "--jobs",
        "2",  # the plot's events come back from the worker processes
        timeout=300,
    )
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "demo.png").stat().st_size > 10_000
    rows = {line.split()[0]: line.split()[1] for line in result.stdout.splitlines()[2:6]}
    assert rows == {
        "none": "deadlock",
        "recursive": "deadlock",
        "reserve": "completed",
        "pfmemalloc": "completed",
    }
    assert "none: kswapd0 -> " in result.stdout
    events = [json.loads(line) for line in log.read_text().splitlines()]
    summaries = [e for e in events if e["event"] == "run.summary"]
    assert [s["policy"] for s in summaries] == ["none", "recursive", "reserve", "pfmemalloc"]
    assert any(e["event"] == "watchdog.deadlock" for e in events)


def test_report_and_plot_on_a_recorded_log(tmp_path: Path) -> None:
    log = Path(__file__).parent / "testbed" / "data" / "compare.jsonl"
    png = tmp_path / "story.png"
    result = netswap("report", str(log), "--plot", str(png))
    assert result.returncode == 0, result.stderr
    assert "kswapd0 -> mempool(bio)" in result.stdout and "pfmemalloc" in result.stdout
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    as_json = json.loads(netswap("report", str(log), "--json").stdout)
    assert [r["policy"] for r in as_json["runs"]] == ["none", "recursive", "reserve", "pfmemalloc"]


def test_compare_over_seeds_counts_the_outcomes(tmp_path: Path) -> None:
    scenario = str(Path(SMALL).with_name("swap-over-nbd.toml"))
    summary = tmp_path / "seeds.json"
    result = netswap(
        "compare", scenario, "--set", "machine.memory=16M", "--set", "workloads.0.processes=8",
        "--set", "nic.ring_size=64", "--policies", "none,pfmemalloc", "--seeds", "0-1", "--summary", str(summary),
        "--log-file", str(tmp_path / "one.jsonl"),
        timeout=300,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    # Two at a time in worker processes: the same table, summaries and log, in order.
    parallel = netswap(
        "compare", scenario, "--set", "machine.memory=16M", "--set", "workloads.0.processes=8",
        "--set", "nic.ring_size=64", "--policies", "none,pfmemalloc", "--seeds", "0-1", "--summary", str(tmp_path / "2.json"),
        "--log-file", str(tmp_path / "two.jsonl"), "--jobs", "2",
        timeout=300,
    )  # fmt: skip
    assert parallel.returncode == 0, parallel.stderr
    assert parallel.stdout == result.stdout
    assert _without_wall_clock(tmp_path / "two.jsonl") == _without_wall_clock(
        tmp_path / "one.jsonl"
    )
    one, two = (json.loads(path.read_text())["runs"] for path in (summary, tmp_path / "2.json"))
    for run in (*one, *two):
        run.pop("wall_seconds")
    assert one == two
    lines = result.stdout.splitlines()
    header = lines[0].split()
    rows = {line.split()[0]: dict(zip(header[1:], line.split()[1:], strict=True))
            for line in lines[2:4]}  # fmt: skip
    runs = json.loads(summary.read_text())["runs"]
    assert [(r["policy"], r["seed"]) for r in runs] == [
        ("none", 0),
        ("none", 1),
        ("pfmemalloc", 0),
        ("pfmemalloc", 1),
    ]
    for policy in ("none", "pfmemalloc"):
        mine = [r["outcome"] for r in runs if r["policy"] == policy]
        for outcome, cell in rows[policy].items():
            assert cell == f"{mine.count(outcome)}/2"


def _without_wall_clock(log: Path) -> list[dict[str, object]]:
    """A log's events without what the wall clock writes (timestamps, wall_seconds)."""
    events = [json.loads(line) for line in log.read_text().splitlines()]
    for e in events:
        e.pop("timestamp", None)
        e.pop("wall_seconds", None)
    return events


def _children(pid: int) -> list[int]:
    path = Path(f"/proc/{pid}/task/{pid}/children")
    return [int(c) for c in path.read_text().split()] if path.exists() else []


def _is_worker(pid: int) -> bool:
    """A live --jobs worker (a zombie's cmdline is empty; a reaped one is gone)."""
    try:
        return b"spawn_main" in Path(f"/proc/{pid}/cmdline").read_bytes()
    except (FileNotFoundError, ProcessLookupError):
        return False


def _workers(pid: int) -> list[int]:
    """The --jobs worker processes of ``pid`` (not multiprocessing's resource tracker)."""
    return [child for child in _children(pid) if _is_worker(child)]


@pytest.mark.parametrize("how", ["ctrl-c", "worker killed"])
def test_parallel_runs_stop_at_once(tmp_path: Path, how: str) -> None:
    """compare --jobs 2 over many seeds: a Ctrl-C to the process group exits 130, a worker
    killed with SIGKILL is a one-line error with exit 1; either way at once, no worker left."""
    import os
    import signal
    import time

    scenario = str(Path(SMALL).with_name("swap-over-nbd.toml"))
    proc = subprocess.Popen(
        [sys.executable, "-P", "-m", "testbed.cli", "compare", scenario, "--seeds", "0-50",
         "--jobs", "2", "--log-file", str(tmp_path / "log.jsonl")],
        stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
        start_new_session=True,  # its own process group, as a terminal's foreground job
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )  # fmt: skip
    try:
        assert proc.stderr is not None
        assert proc.stderr.readline().startswith("running 204 runs, 2 at a time")
        deadline = time.monotonic() + 60
        while len(workers := _workers(proc.pid)) < 2:  # polling another process, deadline
            assert time.monotonic() < deadline, "no workers started"
            time.sleep(0.05)
        if how == "ctrl-c":
            os.killpg(proc.pid, signal.SIGINT)
        else:
            os.kill(workers[0], signal.SIGKILL)
        code = proc.wait(timeout=30)
        err = proc.stderr.read()
        if how == "ctrl-c":
            assert code == 130, err
        else:
            assert code == 1, err
            assert "a worker process died" in err and "Traceback" not in err
        for worker in workers:
            deadline = time.monotonic() + 10
            while _is_worker(worker):
                assert time.monotonic() < deadline, f"worker {worker} outlived its parent"
                time.sleep(0.05)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def test_a_run_that_fails_in_its_worker_keeps_its_log_and_traceback() -> None:
    """What a --jobs worker hands back when its run raises (a bug): the log written so far,
    the error itself (not the nursery's exception group) and the traceback."""
    from testbed.cli import _Job, _job, _JobFailed
    from testbed.config import load_scenario

    scenario = load_scenario(Path(SMALL).with_name("swap-over-nbd.toml"))
    with pytest.raises(_JobFailed) as info:
        _job(_Job(scenario, "no-such-policy", "json", "info", False))
    text, error, trace = info.value.args
    assert isinstance(text, str)
    assert "no-such-policy" in error and "ExceptionGroup" not in error
    assert "Traceback" in trace
