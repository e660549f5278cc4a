"""A sweep's results: an embedded DuckDB database, ``DIR/sweep.duckdb``, and ``DIR/logs/``.

Two tables.  ``sweep`` has one row: the definition (scenario path, its sha256 and its text,
the ``--set`` overrides, the grid) that a resumed sweep must match.  ``runs`` has one row
per finished run, written as the run finishes (a sweep stopped by Ctrl-C or a crash keeps
them): a column per grid key (named by the key, so quote it in SQL: ``"swap.sndbuf"``), then
``policy``, ``seed``, the outcome and the counters of :data:`COLUMNS`, and the whole
summary as JSON (``summary->>'$.vmstat.pgscan_kswapd'``).

Only the sweep's own process writes, with one connection held for the whole sweep (DuckDB
lets one process write a file; a second sweep into the same DIR is refused).  The file is
created readable by DuckDB 1.1 and later (``storage_compatibility_version``), so the
``duckdb`` command-line shell of another release opens it.
"""

from __future__ import annotations

import datetime
import json
import os
import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import attrs

from client.summary import unstructure_summary
from nbdproto.config import ConfigError
from testbed.sweep.execute import RunResult
from testbed.sweep.grid import Axis, RunSpec, SweepDefinition

DB_NAME = "sweep.duckdb"
LOGS = "logs"
#: The oldest DuckDB release that reads our files.
STORAGE_COMPATIBILITY = "v1.1.0"

#: The columns of ``runs`` after the grid's, with their types.  A run that raised has
#: outcome ``raised``, its ``error`` and ``traceback``, and NULL counters.
COLUMNS: dict[str, str] = {
    "policy": "VARCHAR",
    "seed": "BIGINT",
    "outcome": "VARCHAR",  # the machine's: completed, deadlock, integrity_error, error; raised
    "result": "VARCHAR",  # outcome with errors told apart: oom, time_limit (see result_of)
    "reason": "VARCHAR",
    "sim_seconds": "DOUBLE",  # the run's duration on its virtual clock
    "wall_seconds": "DOUBLE",
    "pswpout": "BIGINT",
    "pswpin": "BIGINT",
    "pages_written": "BIGINT",
    "verified": "BIGINT",
    "corrupt": "BIGINT",
    "drops": "BIGINT",  # PFMemallocDrop + rx_alloc_fail, as netswap compare counts them
    "pfmemalloc_drop": "BIGINT",
    "rx_alloc_fail": "BIGINT",
    "throttled": "BIGINT",  # pgscan_direct_throttle
    "allocstall": "BIGINT",
    "oom_kill": "BIGINT",
    "alloc_fail": "BIGINT",
    "alloc_emergency": "BIGINT",
    "min_free": "BIGINT",  # the lowest nr_free_pages seen
    "min_watermark": "BIGINT",  # sum of the zones' min watermarks at the end
    "reserve_peak": "BIGINT",  # the reserve policy's; NULL for the others
    "deadlock_cycle": "VARCHAR",  # the watchdog's wait-for path, a -> b -> ...
    "error": "VARCHAR",
    "traceback": "VARCHAR",
    "log": "VARCHAR",  # its gzipped event log, relative to DIR
    "host": "VARCHAR",  # hostname:pid of the process that ran it
    "attempts": "INTEGER",  # 2 when its first worker died
    "code": "VARCHAR",  # testbed.sweep.execute.code_version of the sweep that ran it
    "finished_at": "TIMESTAMP",
    "summary": "JSON",
}


def result_of(outcome: str, reason: str) -> str:
    """The outcome, with the machine's ``error`` outcomes told apart by their reason: what
    a map colours by."""
    if outcome != "error":
        return outcome
    if reason.startswith("time limit"):
        return "time_limit"
    if "OOM" in reason:
        return "oom"
    return "error"


def row_of(
    spec: RunSpec, result: RunResult, *, log: str, attempts: int, code: str
) -> dict[str, Any]:
    """The ``runs`` row of a finished run (grid columns included)."""
    row: dict[str, Any] = {name: None for name in COLUMNS}
    row.update(spec.columns)
    row.update(
        policy=spec.policy,
        seed=spec.seed,
        wall_seconds=result.wall_seconds,
        log=log,
        host=result.host,
        attempts=attempts,
        code=code,
        finished_at=datetime.datetime.now(datetime.UTC).replace(tzinfo=None),
        error=result.error,
        traceback=result.traceback,
    )
    s = result.summary
    if s is None:
        row.update(outcome="raised", result="raised", reason=result.error)
        return row
    integrity = s.integrity
    vm = s.vmstat or {}
    zones = s.memory.zones if s.memory is not None else []
    net = s.net or {}
    drop, rx_fail = net.get("PFMemallocDrop"), net.get("rx_alloc_fail")
    row.update(
        outcome=s.outcome,
        result=result_of(s.outcome, s.reason or ""),
        reason=s.reason or "",
        sim_seconds=s.duration,
        pswpout=vm.get("pswpout"),
        pswpin=vm.get("pswpin"),
        pages_written=integrity.pages_written if integrity else None,
        verified=integrity.pages_verified if integrity else None,
        corrupt=integrity.corrupt if integrity else None,
        drops=(drop or 0) + (rx_fail or 0),
        pfmemalloc_drop=drop,
        rx_alloc_fail=rx_fail,
        throttled=vm.get("pgscan_direct_throttle"),
        allocstall=vm.get("allocstall"),
        oom_kill=vm.get("oom_kill"),
        alloc_fail=vm.get("alloc_fail"),
        alloc_emergency=vm.get("alloc_emergency"),
        min_free=s.min_free_pages,
        min_watermark=sum(z.min or 0 for z in zones) if zones else None,
        reserve_peak=s.reserve_peak,
        deadlock_cycle=" -> ".join(s.deadlock.cycle) if s.deadlock and s.deadlock.cycle else None,
        summary=json.dumps(unstructure_summary(s), default=str),
    )
    return row


@attrs.define
class SweepStore:
    """The database of one sweep directory, open for the sweep or for reading."""

    dir: Path
    _db: Any  # duckdb.DuckDBPyConnection
    grid: tuple[Axis, ...]
    info: dict[str, Any]  # the sweep row: scenario, scenario_sha256, overrides, grid, ...

    @classmethod
    def create_or_resume(cls, directory: str | Path, definition: SweepDefinition) -> SweepStore:
        """Open DIR for ``definition``: a new sweep, or the same one resumed; a one-line
        :class:`ConfigError` if DIR holds another sweep or another process has it open."""
        root = Path(directory)
        try:
            (root / LOGS).mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise ConfigError(f"--out {root}: {exc.strerror or exc}") from None
        db = _connect(root / DB_NAME, read_only=False)
        try:
            if not _has_table(db, "sweep"):
                _create(db, definition)
            info = _info(db)
            why = definition.mismatch(info)
            if why is not None:
                raise ConfigError(
                    f"--out {root} holds another sweep: {why}; resume it with its own "
                    "definition, or sweep into another --out DIR"
                )
        except BaseException:
            db.close()
            raise
        return cls(root, db, definition.grid, info)

    @classmethod
    def open_read(cls, directory: str | Path) -> SweepStore:
        root = Path(directory)
        path = root / DB_NAME
        if not path.is_file():
            raise ConfigError(f"{root}: no {DB_NAME} here (netswap sweep FILE ... --out DIR)")
        db = _connect(path, read_only=True)
        if not _has_table(db, "sweep"):
            db.close()
            raise ConfigError(f"{path}: not a netswap sweep database")
        info = _info(db)
        grid = tuple(Axis.from_json(a) for a in info["grid"])
        return cls(root, db, grid, info)

    def close(self) -> None:
        self._db.close()

    def done(self) -> set[str]:
        """The keys of the runs in the database."""
        return {k for (k,) in self._db.execute("SELECT run_key FROM runs").fetchall()}

    def forget_raised(self) -> int:
        """Delete the rows of runs that raised (``--retry-errors``); how many."""
        (n,) = self._db.execute("SELECT count(*) FROM runs WHERE outcome = 'raised'").fetchone()
        self._db.execute("DELETE FROM runs WHERE outcome = 'raised'")
        return int(n)

    def other_code(self, code: str) -> int:
        """How many runs in the database were made by code other than ``code``."""
        (n,) = self._db.execute("SELECT count(*) FROM runs WHERE code <> ?", [code]).fetchone()
        return int(n)

    def record(self, spec: RunSpec, result: RunResult, *, attempts: int, code: str) -> str:
        """Write a finished run's log, then its row (committed at once); its result.  A
        Ctrl-C meanwhile is held until both are written."""
        with sigint_deferred():
            return self._record(spec, result, attempts=attempts, code=code)

    def _record(self, spec: RunSpec, result: RunResult, *, attempts: int, code: str) -> str:
        log = f"{LOGS}/{spec.log_name()}"
        target = self.dir / log
        tmp = target.with_name(target.name + ".tmp")
        tmp.write_bytes(result.log_gz)
        os.replace(tmp, target)
        row = row_of(spec, result, log=log, attempts=attempts, code=code)
        names = ["run_key", *row]
        sql = (
            f"INSERT OR REPLACE INTO runs ({', '.join(sql_name(n) for n in names)}) "
            f"VALUES ({', '.join('?' for _ in names)})"
        )
        self._db.execute(sql, [spec.key, *row.values()])
        return str(row["result"])

    def query(self, sql: str, params: list[Any] | None = None) -> list[tuple[Any, ...]]:
        rows: list[tuple[Any, ...]] = self._db.execute(sql, params or []).fetchall()
        return rows

    def export_parquet(self, out: str | Path) -> int:
        order = ", ".join([*(sql_name(a.key) for a in self.grid), "policy", "seed"])
        self._db.execute(
            f"COPY (SELECT * FROM runs ORDER BY {order}) TO '{_literal(str(out))}' (FORMAT PARQUET)"
        )
        (n,) = self._db.execute("SELECT count(*) FROM runs").fetchone()
        return int(n)


@contextmanager
def sigint_deferred() -> Iterator[None]:
    """Hold SIGINT and SIGTERM until the block ends, then deliver them.  DuckDB turns a
    KeyboardInterrupt raised during a query into "Query interrupted" and drops the
    statement; a row is worth the moment it takes to write."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    caught: list[int] = []
    signals = (signal.SIGINT, signal.SIGTERM)
    previous = {s: signal.signal(s, lambda signum, frame: caught.append(signum)) for s in signals}
    try:
        yield
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
        for signum in dict.fromkeys(caught):
            signal.raise_signal(signum)


@contextmanager
def reading(directory: str | Path) -> Iterator[SweepStore]:
    store = SweepStore.open_read(directory)
    try:
        yield store
    finally:
        store.close()


def _connect(path: Path, *, read_only: bool) -> Any:
    import duckdb

    config: dict[str, str | bool | int | float | list[str]] = (
        {} if read_only else {"storage_compatibility_version": STORAGE_COMPATIBILITY}
    )
    try:
        return duckdb.connect(str(path), read_only=read_only, config=config)
    except duckdb.IOException as exc:
        if "lock" in str(exc).lower():
            raise ConfigError(
                f"{path} is open in another process (a sweep still running?): "
                f"{str(exc).splitlines()[0]}"
            ) from None
        raise ConfigError(f"{path}: {str(exc).splitlines()[0]}") from None
    except duckdb.Error as exc:
        raise ConfigError(f"{path}: {str(exc).splitlines()[0]}") from None


def _has_table(db: Any, name: str) -> bool:
    rows = db.execute(
        "SELECT 1 FROM information_schema.tables WHERE table_name = ?", [name]
    ).fetchall()
    return bool(rows)


def _create(db: Any, definition: SweepDefinition) -> None:
    names = [a.key for a in definition.grid]
    clash = [n for n in names if n in COLUMNS or n == "run_key"]
    if clash:
        raise ConfigError(f"--grid {clash[0]}: the name of a column of its own; cannot sweep it")
    identity = definition.identity()
    grid_columns = [f"{sql_name(a.key)} {a.sql_type}" for a in definition.grid]
    fixed = [f"{sql_name(n)} {t}" for n, t in COLUMNS.items()]
    db.execute("BEGIN TRANSACTION")
    db.execute(
        "CREATE TABLE sweep (scenario VARCHAR, scenario_sha256 VARCHAR, scenario_text VARCHAR,"
        " overrides JSON, grid JSON, created_at TIMESTAMP)"
    )
    db.execute(
        "INSERT INTO sweep VALUES (?, ?, ?, ?, ?, ?)",
        [
            definition.scenario,
            definition.scenario_sha256,
            Path(definition.scenario).read_text(encoding="utf-8", errors="replace"),
            json.dumps(identity["overrides"]),
            json.dumps(identity["grid"]),
            datetime.datetime.now(datetime.UTC).replace(tzinfo=None),
        ],
    )
    db.execute(
        f"CREATE TABLE runs (run_key VARCHAR PRIMARY KEY, {', '.join(grid_columns + fixed)})"
    )
    db.execute("COMMIT")


def _info(db: Any) -> dict[str, Any]:
    row = db.execute(
        "SELECT scenario, scenario_sha256, overrides, grid, created_at FROM sweep"
    ).fetchone()
    if row is None:
        raise ConfigError("the sweep database has no definition (an empty sweep table)")
    scenario, sha, overrides, grid, created = row
    return {
        "scenario": scenario,
        "scenario_sha256": sha,
        "overrides": json.loads(overrides),
        "grid": json.loads(grid),
        "created_at": created,
    }


def sql_name(name: str) -> str:
    """A column name quoted for SQL (grid keys have dots: ``"swap.sndbuf"``)."""
    return '"' + name.replace('"', '""') + '"'


def _literal(text: str) -> str:
    return text.replace("'", "''")
