"""``netswap sweep``: grids of runs into DuckDB, resumed, shown, plotted, exported, and run
on a real Dask cluster with the same results as locally.

The runs are the swap-over-NBD scenario scaled to a 2 MiB machine (``SMALL``), each well
under a second: ``none`` deadlocks or ends in the OOM killer in every cell, ``pfmemalloc``
completes except with a 768K send buffer over 128 KiB of min_free_kbytes.  Which cell does
what is the model's business: the expected figures are read from the database's own rows, or
from the runs' own summaries and logs.
"""

from __future__ import annotations

import contextlib
import gzip
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import duckdb
import pytest

from client.summary import RunSummary
from nbdproto.config import ConfigError
from testbed.cli import main, parse_seeds
from testbed.sweep.execute import RunResult
from testbed.sweep.grid import RunSpec, parse_grid, plan_sweep, split_values
from testbed.sweep.maps import ABBREVIATIONS as ABBREV
from testbed.sweep.maps import plot_sweep, tally
from testbed.sweep.pool import LocalPool, WorkerDied
from testbed.sweep.store import SweepStore, reading
from tests.processes import netswap, one_line
from tests.testbed import sweep_workers

CONFIGS = Path(__file__).resolve().parents[2] / "configs"
SCENARIO = str(CONFIGS / "swap-over-nbd.toml")
SMALL = [
    "--set", "machine.memory=2M", "--set", "workloads.0.processes=2",
    "--set", "workloads.0.total=1.5x", "--set", "noise.0.sockets=1",
    "--set", "nic.ring_size=8",  # scaled with RAM, as 256 descriptors at 64M
]  # fmt: skip
GRID = ["--grid", "swap.sndbuf=16K,768K", "--grid", "machine.min_free_kbytes=128,512"]
POLICIES = ["--policies", "none,pfmemalloc"]
#: What a run's row must agree on wherever it ran (not wall time, host, log path).
SAME_EVERYWHERE = (
    "run_key, outcome, result, reason, sim_seconds, pswpout, pswpin, pages_written, verified, "
    "corrupt, drops, throttled, allocstall, min_free, min_watermark, reserve_peak, "
    "deadlock_cycle, error"
)


def cli(capsys: pytest.CaptureFixture[str], *args: str) -> subprocess.CompletedProcess[str]:
    """``netswap ARGS`` in this process (what the script calls), its status and output."""
    capsys.readouterr()
    code = main(list(args))
    out, err = capsys.readouterr()
    return subprocess.CompletedProcess(["netswap", *args], code, out, err)


def rows(directory: Path, sql: str = "SELECT * FROM runs ORDER BY run_key") -> list[dict[str, Any]]:
    with duckdb.connect(str(directory / "sweep.duckdb"), read_only=True) as db:
        cursor = db.execute(sql)
        names = [d[0] for d in cursor.description]
        return [dict(zip(names, row, strict=True)) for row in cursor.fetchall()]


@pytest.fixture(scope="module")
def swept(
    tmp_path_factory: pytest.TempPathFactory,
) -> tuple[Path, subprocess.CompletedProcess[str]]:
    """One local sweep, 2 keys x 2 values x 2 policies x 2 seeds = 16 runs, two workers."""
    out = tmp_path_factory.mktemp("sweep") / "swept"
    result = netswap(
        "sweep", SCENARIO, *SMALL, *GRID, *POLICIES, "--seeds", "0-1", "--out", str(out),
        "--jobs", "2", timeout=240,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    return out, result


# -- the grid, checked before anything runs ---------------------------------------------------
@pytest.mark.parametrize(
    ("args", "needles"),
    [
        (["--grid", "machine.memroy=1M,2M"], ["--grid machine.memroy", "memroy"]),
        (["--grid", "machine.min_free_kbytes=128,lots"], ["min_free_kbytes=lots"]),
        (["--grid", "machine.memory=2M,huge"], ["machine.memory=huge", "not a size"]),
        (["--grid", "workloads.4.processes=1"], ["--grid workloads.4.processes", "index"]),
        (["--grid", "swap.sndbuf="], ["--grid", "KEY=V1,V2"]),
        (["--grid", "swap.sndbuf=16K,,64K"], ["empty value"]),
        (["--grid", "swap.sndbuf=16K,16K"], ["16K given twice"]),
        (["--grid", "swap.sndbuf=16K", "--grid", "swap.sndbuf=64K"], ["given twice"]),
        (["--grid", "run.seed=1,2"], ["--seeds"]),
        (["--grid", "policy=none"], ["--policies"]),
        (["--grid", "machine.memory=2M", "--set", "machine.memory=4M"], ["--set"]),
        ([], ["--grid"]),
        (["--grid", "swap.depth=1", "--policies", "none,magic"], ["magic"]),
        (["--grid", "swap.depth=1", "--seeds", "5-1"], ["--seeds"]),
        (["--grid", "swap.depth=1", "--scheduler", "127.0.0.1:8786"], ["tcp://HOST:PORT"]),
        (
            ["--grid", "swap.depth=1", "--scheduler", "tcp://127.0.0.1:8786", "--jobs", "2"],
            ["--jobs", "--scheduler"],
        ),
    ],
)
def test_a_bad_grid_is_one_line_and_exit_2_before_any_run(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], args: list[str], needles: list[str]
) -> None:
    out = tmp_path / "never"
    code = main(["sweep", SCENARIO, *args, "--out", str(out)])
    err = capsys.readouterr().err
    assert code == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in err, err
    for needle in needles:
        assert needle in lines[0]
    assert not out.exists()


def test_grid_values_are_read_as_set_reads_them() -> None:
    assert split_values('16K, 64K,[["Normal", 0.5], ["DMA", 0.5]],"a,b"') == [
        "16K", "64K", '[["Normal", 0.5], ["DMA", 0.5]]', '"a,b"',
    ]  # fmt: skip
    sizes, depth, latency = parse_grid(
        ["swap.sndbuf=16K,65536", "swap.depth=1,8", "swap.latency=0,0.002"]
    )
    assert (sizes.values, sizes.sql_type, sizes.stored) == (
        ("16K", 65536),
        "VARCHAR",
        ("16K", "65536"),
    )
    assert (depth.values, depth.sql_type) == ((1, 8), "BIGINT")
    assert (latency.sql_type, latency.stored) == ("DOUBLE", (0.0, 0.002))


def test_a_plan_is_every_cell_policy_and_seed() -> None:
    grid = parse_grid(["swap.sndbuf=16K,768K", "machine.min_free_kbytes=128,256,512"])
    plan = plan_sweep(SCENARIO, {"machine.memory": "2M"}, grid, ("none", "reserve"), [3, 4])
    assert len(plan.runs) == 2 * 3 * 2 * 2
    assert len({spec.key for spec, _ in plan.runs}) == len(plan.runs)
    spec, scenario = plan.runs[-1]
    assert (spec.policy, spec.seed, spec.columns) == (
        "reserve", 4, {"swap.sndbuf": "768K", "machine.min_free_kbytes": 512},
    )  # fmt: skip
    assert (scenario.swap.sndbuf, scenario.machine.min_free_kbytes) == (768 << 10, 512)
    assert (scenario.run.seed, scenario.machine.memory) == (4, 2 << 20)


# -- the database -----------------------------------------------------------------------------
def test_a_sweep_writes_one_row_per_run(
    swept: tuple[Path, subprocess.CompletedProcess[str]],
) -> None:
    out, result = swept
    runs = rows(out)
    assert len(runs) == 16
    assert {(r["swap.sndbuf"], r["machine.min_free_kbytes"], r["policy"], r["seed"]) for r in runs} == {
        (s, m, p, seed) for s in ("16K", "768K") for m in (128, 512)
        for p in ("none", "pfmemalloc") for seed in (0, 1)
    }  # fmt: skip
    # Which cell deadlocks is the model's business; the grid spans both verdicts.  A run of
    # `none` may also end with the OOM killer (should_reclaim_retry converges to OOM).
    results = {r["result"] for r in runs}
    assert {"completed", "deadlock"} <= results <= {"completed", "deadlock", "oom"}
    for r in runs:
        summary = json.loads(r["summary"])
        assert (r["outcome"], r["policy"]) == (summary["outcome"], summary["policy"])
        assert r["pswpout"] == summary["vmstat"]["pswpout"] > 0
        assert r["verified"] == summary["integrity"]["pages_verified"]
        assert r["min_free"] == summary["min_free_pages"]
        assert r["sim_seconds"] == summary["duration"] and r["wall_seconds"] > 0
        assert r["error"] is None and r["attempts"] == 1 and r["code"]
        assert (r["deadlock_cycle"] is not None) == (r["outcome"] == "deadlock")
        # The run's own log, gzipped, has the summary the row was made from.
        events = [
            json.loads(line) for line in gzip.decompress((out / r["log"]).read_bytes()).splitlines()
        ]
        (logged,) = [e for e in events if e["event"] == "run.summary"]
        assert logged["vmstat"] == summary["vmstat"] and logged["outcome"] == r["outcome"]
    # No live display off a terminal: stdout is the closing line, stderr is empty.
    counts = Counter(r["result"] for r in runs)
    assert result.stdout.splitlines() == [
        f"sweep {out}: 16 runs, 0 already done, 16 run now: "
        + ", ".join(f"{k} {n}" for k, n in sorted(counts.items()))
    ]
    assert result.stderr == ""


def test_resuming_skips_the_runs_done_and_adds_seeds(
    swept: tuple[Path, subprocess.CompletedProcess[str]],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    out = tmp_path / "resumed"
    shutil.copytree(swept[0], out)
    before = {r["run_key"]: r for r in rows(out)}
    result = cli(
        capsys, "sweep", SCENARIO, *SMALL, *GRID, "--policies", "none", "--seeds", "0-2",
        "--out", str(out), "--jobs", "2",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert "12 runs, 8 already done, 4 run now" in result.stdout
    after = {r["run_key"]: r for r in rows(out)}
    assert set(after) - set(before) == {RunSpec(cell, "none", 2).key for cell in _cells(out)}
    for key, row in before.items():  # the rows already there are left as they were
        assert after[key] == row


def _cells(out: Path) -> list[tuple[Any, ...]]:
    with reading(out) as store:
        grid = store.grid
    return [((grid[0], i), (grid[1], j)) for i in range(2) for j in range(2)]


def test_resuming_another_sweep_into_the_same_directory_is_refused(
    swept: tuple[Path, subprocess.CompletedProcess[str]],
    capsys: pytest.CaptureFixture[str],
    tmp_path: Path,
) -> None:
    out = swept[0]
    code = main(["sweep", SCENARIO, *SMALL, "--grid", "swap.sndbuf=16K,64K", "--out", str(out)])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1
    assert "holds another sweep" in err and "swap.sndbuf=16K,768K" in err
    edited = tmp_path / "edited.toml"
    edited.write_text(Path(SCENARIO).read_text() + "\n# edited\n")
    code = main(["sweep", str(edited), *SMALL, *GRID, "--out", str(out)])
    err = capsys.readouterr().err.strip()
    assert code == 2 and "holds another sweep" in err and "sha256" in err


def test_a_run_that_raises_is_recorded_and_the_sweep_goes_on(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """An export of one page leaves the model no swap: it raises at the machine's start
    (a ValueError of client/); the other run ends in a verdict."""
    out = tmp_path / "raises"
    result = cli(
        capsys, "sweep", SCENARIO, *SMALL, "--set", "swap.sndbuf=16K",
        "--grid", "swap.size=4096,64M", "--policies", "none", "--out", str(out), "--jobs", "1",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert "raised 1" in result.stdout
    assert "1 runs raised" in result.stderr
    by_size = {r["swap.size"]: r for r in rows(out)}
    raised, fine = by_size["4096"], by_size["64M"]
    assert fine["outcome"] in ("completed", "deadlock")
    assert (raised["outcome"], raised["result"]) == ("raised", "raised")
    assert raised["error"].startswith("ValueError: ") and "no room for swap" in raised["error"]
    assert "Traceback" in raised["traceback"] and raised["pswpout"] is None
    last = json.loads(gzip.decompress((out / raised["log"]).read_bytes()).splitlines()[-1])
    assert (last["event"], last["level"]) == ("sweep.run_raised", "error")
    assert (last["error"], last["traceback"]) == (raised["error"], raised["traceback"])
    # Skipped like any run done, unless --retry-errors: then it runs (and raises) again.
    again = cli(
        capsys, "sweep", SCENARIO, *SMALL, "--set", "swap.sndbuf=16K",
        "--grid", "swap.size=4096,64M", "--policies", "none", "--out", str(out),
        "--jobs", "1", "--retry-errors",
    )  # fmt: skip
    assert again.returncode == 0, again.stderr
    assert "2 runs, 1 already done, 1 run now: raised 1" in again.stdout
    assert "ran again 1 runs that had raised" in again.stderr
    assert {r["swap.size"]: r["outcome"] for r in rows(out)} == {
        "4096": "raised",
        "64M": fine["outcome"],  # kept, not run again
    }


# -- show, plot, export -----------------------------------------------------------------------
def test_show_prints_the_cells_by_policy(
    swept: tuple[Path, subprocess.CompletedProcess[str]], capsys: pytest.CaptureFixture[str]
) -> None:
    out = swept[0]
    runs = rows(out)
    result = cli(capsys, "sweep", "show", str(out))
    assert result.returncode == 0, result.stderr
    table = {
        tuple(cell.strip() for cell in line.strip("│┃ ").split("│"))
        for line in result.stdout.splitlines()
        if line.startswith("│")
    }
    expected = set()
    for sndbuf, min_free in (("16K", 128), ("16K", 512), ("768K", 128), ("768K", 512)):
        cells = []
        for policy in ("none", "pfmemalloc"):
            results = Counter(
                r["result"] for r in runs
                if (r["swap.sndbuf"], r["machine.min_free_kbytes"], r["policy"])
                == (sndbuf, min_free, policy)
            )  # fmt: skip
            failed = sorted(
                ((k, n) for k, n in results.items() if k != "completed"),
                key=lambda kv: (-kv[1], kv[0]),
            )
            cells.append(
                f"{results['completed']}/2" + "".join(f" {ABBREV[k]}{n}" for k, n in failed)
            )
        expected.add((sndbuf, str(min_free), *cells))
    assert table == expected
    flat = {cell for cells in table for cell in cells[2:]}
    assert "2/2" in flat and "0/2 DL2" in flat  # both kinds of cell
    assert "DL deadlock" in result.stdout
    header = next(line for line in result.stdout.splitlines() if line.startswith("┃"))
    assert [h.strip() for h in header.strip("┃").split("┃")] == [
        "swap.sndbuf", "machine.min_free_kbytes", "none", "pfmemalloc",
    ]  # fmt: skip


def test_plot_draws_a_heat_map_per_policy(
    swept: tuple[Path, subprocess.CompletedProcess[str]],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    png = tmp_path / "map.png"
    result = cli(
        capsys, "sweep", "plot", str(swept[0]), "--x", "machine.min_free_kbytes", "--y", "swap.sndbuf",
        "--out", str(png),
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000
    assert "heatmap" in result.stdout and "2 policies" in result.stdout


def test_export_writes_parquet_and_plain_sql_reads_the_database(
    swept: tuple[Path, subprocess.CompletedProcess[str]],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    out = swept[0]
    parquet = tmp_path / "runs.parquet"
    result = cli(capsys, "sweep", "export", str(out), "--parquet", str(parquet))
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == f"export: 16 runs to {parquet}"
    exported = duckdb.sql(
        f"SELECT \"swap.sndbuf\", policy, seed, outcome, pswpout FROM '{parquet}' ORDER BY ALL"
    ).fetchall()
    assert exported == [
        (r["swap.sndbuf"], r["policy"], r["seed"], r["outcome"], r["pswpout"])
        for r in rows(
            out, 'SELECT * FROM runs ORDER BY "swap.sndbuf", policy, seed, outcome, pswpout'
        )
    ]
    # The duckdb shell (the dev extra's duckdb-cli, maybe another release) opens it too.
    shell = Path(sys.executable).with_name("duckdb")
    if shell.exists():
        answer = subprocess.run(
            [str(shell), "-readonly", "-csv", str(out / "sweep.duckdb"), "-c",
             "SELECT count(*) FROM runs WHERE outcome = 'deadlock'"],
            capture_output=True, text=True, timeout=60,
        )  # fmt: skip
        assert answer.returncode == 0, answer.stderr
        deadlocks = sum(r["outcome"] == "deadlock" for r in rows(out))
        assert answer.stdout.split() == ["count_star()", str(deadlocks)]


def test_show_of_a_directory_in_use_or_empty_is_one_line(
    swept: tuple[Path, subprocess.CompletedProcess[str]],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    assert main(["sweep", "show", str(tmp_path)]) == 2
    assert "no sweep.duckdb" in capsys.readouterr().err
    busy = tmp_path / "busy"
    shutil.copytree(swept[0], busy)
    with duckdb.connect(str(busy / "sweep.duckdb")):  # a sweep writing: another process
        result = netswap("sweep", "show", str(busy))
    assert result.returncode == 2 and "another process" in one_line(result)


def fabricated(tmp_path: Path, grid: list[str], outcomes: dict[tuple[str, str, int], str]) -> Path:
    """A sweep database filled with made-up results (no run): (value, policy, seed) ->
    outcome or result."""
    out = tmp_path / "made"
    plan = plan_sweep(SCENARIO, {}, parse_grid(grid), ("none", "reserve"), [0, 1, 2])
    store = SweepStore.create_or_resume(out, plan.definition)
    try:
        for spec, _ in plan.runs:
            ((axis, i),) = spec.cell
            outcome = outcomes.get((axis.raws[i], spec.policy, spec.seed), "completed")
            reason = {"oom": "2 processes OOM-killed"}.get(outcome, "")
            summary = RunSummary(
                machine="client0",
                policy=spec.policy,
                outcome="error" if outcome == "oom" else outcome,
                reason=reason,
                duration=None,
            )
            result = RunResult(spec.key, summary, None, None, b"", 0.1, "test")
            store.record(spec, result, attempts=1, code="test")
    finally:
        store.close()
    return out


def test_a_one_key_sweep_is_a_line_plot_and_failures_are_told_apart(tmp_path: Path) -> None:
    out = fabricated(
        tmp_path, ["swap.depth=1,4,16"],
        {("1", "none", 0): "deadlock", ("1", "none", 1): "deadlock", ("1", "none", 2): "oom",
         ("4", "none", 1): "deadlock", ("1", "reserve", 2): "integrity_error"},
    )  # fmt: skip
    with reading(out) as store:
        t = tally(store)
        info = plot_sweep(store, tmp_path / "line.png")
    assert t.get("none", (0,)).text() == "0/3 DL2 OOM1"
    assert t.get("none", (1,)).text() == "2/3 DL1"
    assert t.get("reserve", (0,)).text() == "2/3 INT1"
    assert t.get("reserve", (2,)).text() == "3/3"
    assert (info.kind, info.x, info.y, info.policies) == (
        "line",
        "swap.depth",
        None,
        ("none", "reserve"),
    )
    assert (tmp_path / "line.png").stat().st_size > 10_000


# -- local workers that die -------------------------------------------------------------------
def test_a_worker_that_dies_is_replaced_and_its_item_tried_once_more(tmp_path: Path) -> None:
    deaths: list[tuple[str, str, bool]] = []
    once, twice = str(tmp_path / "once"), str(tmp_path / "twice")
    with LocalPool(
        sweep_workers.die_once,
        1,
        on_death=lambda i, d, again: deaths.append((Path(i).name, d, again)),
    ) as pool:
        results = {Path(item).name: (got, n) for item, got, n in pool.run([once])}
    assert results == {"once": ("done once", 2)}
    assert deaths == [("once", "killed by SIGKILL", True)]
    with LocalPool(sweep_workers.always_die, 1) as pool:
        ((_, got, n),) = list(pool.run([twice]))
    assert (got, n) == (WorkerDied("exited with status 7", 2), 2)


# -- Ctrl-C, SIGTERM, SIGKILL -----------------------------------------------------------------
@pytest.mark.parametrize("how", ["ctrl-c", "sigterm", "sigkill"])
def test_a_stopped_sweep_keeps_the_rows_written_and_no_worker(tmp_path: Path, how: str) -> None:
    """Ctrl-C (to the process group, as a terminal sends it) and SIGTERM stop the sweep with
    exit 130, every finished run in the database with its log; SIGKILL leaves no worker
    running either (they die with their parent)."""
    out = tmp_path / "stopped"
    proc = subprocess.Popen(
        [sys.executable, "-P", "-m", "testbed.cli", "sweep", SCENARIO, *SMALL,
         "--grid", "swap.sndbuf=16K", "--policies", "none", "--seeds", "0-99",
         "--out", str(out), "--jobs", "1"],
        stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        start_new_session=True,  # its own process group, as a terminal's foreground job
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 120
        # polling another process for its first run's log (written just before its row)
        while not (out / "logs").exists() or not any((out / "logs").glob("*.gz")):
            assert proc.poll() is None, proc.communicate()
            assert time.monotonic() < deadline, "no run finished"
            time.sleep(0.05)
        workers = _children(proc.pid)
        assert workers, "no worker process"
        if how == "ctrl-c":
            os.killpg(proc.pid, signal.SIGINT)
        else:
            os.kill(proc.pid, signal.SIGTERM if how == "sigterm" else signal.SIGKILL)
        _, stderr = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    deadline = time.monotonic() + 10
    for worker in workers:  # ended with the sweep, not left running its run
        while _alive(worker):  # polling: a death signal is delivered asynchronously
            assert time.monotonic() < deadline, f"worker {worker} outlived the sweep"
            time.sleep(0.05)
    kept = rows(out)
    if how == "sigkill":  # maybe between a log and its row: the rerun writes both again
        assert proc.returncode == -signal.SIGKILL
        assert len(kept) <= len(list((out / "logs").glob("*.gz")))
        return
    assert 1 <= len(kept) < 100
    assert proc.returncode == 130, stderr
    assert f"interrupted; {len(kept)} runs are in" in stderr and "Traceback" not in stderr
    assert len(list((out / "logs").glob("*.gz"))) == len(kept)


def _alive(pid: int) -> bool:
    """A live process (a zombie's cmdline is empty; a reaped one is gone)."""
    try:
        return bool(Path(f"/proc/{pid}/cmdline").read_bytes())
    except (FileNotFoundError, ProcessLookupError):
        return False


def _children(pid: int) -> list[int]:
    path = Path(f"/proc/{pid}/task/{pid}/children")
    return [int(c) for c in path.read_text().split()] if path.exists() else []


# -- Dask -----------------------------------------------------------------------------------
def test_an_unreachable_scheduler_is_one_line_and_exit_2(tmp_path: Path) -> None:
    import socket

    with socket.socket() as unused:  # bound, never listening: connections are refused
        unused.bind(("127.0.0.1", 0))
        port = unused.getsockname()[1]
        result = netswap(
            "sweep", SCENARIO, *SMALL, "--grid", "swap.sndbuf=16K", "--out", str(tmp_path / "d"),
            "--scheduler", f"tcp://127.0.0.1:{port}", "--scheduler-timeout", "0.5",
        )  # fmt: skip
    assert result.returncode == 2
    line = one_line(result)
    assert f"--scheduler tcp://127.0.0.1:{port}: cannot connect within 0.5s" in line
    assert not (tmp_path / "d").exists()


@pytest.fixture
def dask_cluster(tmp_path: Path) -> Iterator[str]:
    """``dask scheduler`` and two ``dask worker`` processes on 127.0.0.1; the address."""
    dask = shutil.which("dask", path=str(Path(sys.executable).parent)) or shutil.which("dask")
    if dask is None:
        message = "dask is not installed (pip install 'netswap[dask]'; make test installs it)"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    from distributed import Client

    file = tmp_path / "scheduler.json"
    common = ["--no-dashboard", "--host", "127.0.0.1"]
    commands = [[dask, "scheduler", "--port", "0", "--scheduler-file", str(file), *common]]
    commands += [
        [dask, "worker", "--scheduler-file", str(file), "--nthreads", "1", "--no-nanny", *common]
    ] * 2
    with contextlib.ExitStack() as stack:
        procs: list[subprocess.Popen[bytes]] = []
        for n, command in enumerate(commands):
            log = stack.enter_context((tmp_path / f"dask{n}.log").open("w"))
            procs.append(subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=log))
        try:
            # distributed waits for the scheduler file and for the workers to register
            with Client(scheduler_file=str(file), timeout=60, set_as_default=False) as client:
                client.wait_for_workers(2, timeout=120)
                address = client.scheduler.address
            assert address.startswith("tcp://127.0.0.1:")
            yield address
        finally:
            for proc in reversed(procs):
                proc.terminate()
            for proc in procs:
                try:
                    proc.wait(timeout=30)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()


def test_a_sweep_on_dask_gives_the_rows_of_a_local_sweep(
    swept: tuple[Path, subprocess.CompletedProcess[str]], dask_cluster: str, tmp_path: Path
) -> None:
    """The local sweep's runs of seed 1 (8 of them), on a scheduler and two workers."""
    out = tmp_path / "on-dask"
    result = netswap(
        "sweep", SCENARIO, *SMALL, *GRID, *POLICIES, "--seeds", "1", "--out", str(out),
        "--scheduler", dask_cluster, timeout=300,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert "8 runs, 0 already done, 8 run now" in result.stdout
    local = rows(swept[0], f"SELECT {SAME_EVERYWHERE} FROM runs WHERE seed = 1 ORDER BY run_key")
    remote = rows(out, f"SELECT {SAME_EVERYWHERE} FROM runs ORDER BY run_key")
    assert len(remote) == 8
    for mine, theirs in zip(local, remote, strict=True):
        assert mine == theirs
    code = rows(swept[0])[0]["code"]
    for r in rows(out):
        assert r["host"] and r["code"] == code
        assert b"run.summary" in gzip.decompress((out / r["log"]).read_bytes())


# -- sweep files ------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "name", sorted(p.name for p in (CONFIGS / "sweeps").glob("*.toml")), ids=str
)
def test_every_shipped_sweep_plans_every_run_and_says_how_to_run_it(name: str) -> None:
    """Every file in configs/sweeps/: each cell is a valid scenario, the plan has a run per
    cell, policy and seed, and the file's comment names its own command line."""
    from testbed.config import load_toml
    from testbed.sweep.grid import load_sweep_file, parse_policies

    path = CONFIGS / "sweeps" / name
    sweep = load_sweep_file(path, load_toml(path))
    assert Path(sweep.scenario).resolve() == Path(SCENARIO)
    if name.startswith("sndbuf-min-free"):
        assert [a.key for a in sweep.grid] == ["swap.sndbuf", "machine.min_free_kbytes"]
    policies = parse_policies(sweep.policies)
    seeds = parse_seeds(sweep.seeds or "0")
    plan = plan_sweep(sweep.scenario, dict(sweep.overrides), sweep.grid, policies, seeds)
    cells = math.prod(len(axis.raws) for axis in sweep.grid)
    assert len(plan.runs) == cells * len(policies) * len(seeds)
    assert f"netswap sweep configs/sweeps/{name} --out " in path.read_text()


def test_the_command_line_adds_to_a_sweep_file(tmp_path: Path) -> None:
    import argparse

    from testbed.sweep.cli import _sweep_from

    file = tmp_path / "mine.toml"
    file.write_text(
        f'[sweep]\nscenario = "{SCENARIO}"\nseeds = [1, 2]\n[sweep.set]\n"machine.memory" = "2M"\n'
        '[sweep.grid]\n"swap.sndbuf" = ["16K", 65536, "a,b"]\n'
    )
    args = argparse.Namespace(
        scenario=str(file), grid=["swap.depth=1,2"], policies="none", seeds=None,
        overrides=["workloads.0.processes=2"],
    )  # fmt: skip
    scenario, grid, policies, seeds, overrides = _sweep_from(args)
    assert (scenario, policies, seeds) == (SCENARIO, "none", "1,2")
    assert [(a.key, a.raws) for a in grid] == [
        ("swap.sndbuf", ("16K", "65536", '"a,b"')), ("swap.depth", ("1", "2")),
    ]  # fmt: skip
    assert grid[0].values == ("16K", 65536, "a,b")
    assert overrides == {"machine.memory": "2M", "workloads.0.processes": 2}
    args.grid = ["swap.sndbuf=1M"]
    with pytest.raises(ConfigError, match="sweeps it already"):
        _sweep_from(args)
    file.write_text('[sweep]\nscenario = "x.toml"\ngrids = {}\n')
    with pytest.raises(ConfigError, match="unknown key"):
        _sweep_from(args)
