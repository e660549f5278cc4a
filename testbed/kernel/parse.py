"""Reading what the guest says: its records (``testbed.kernel.guest``) and its console.

Pure functions of text, so they are tested on captured lines.  The samples come out under
the names a model run uses in ``vm.sample`` and ``run.summary``, so ``netswap report`` and
``--plot`` read a kernel run as they read a model run.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from typing import Any

import attrs

#: /proc/vmstat splits allocstall by zone (allocstall_dma32, ...); the model has one.
ALLOCSTALL = re.compile(r"^allocstall_")
PSI_FIELDS = ("avg10", "avg60", "avg300", "total")


@attrs.frozen
class Sample:
    """One ``S`` record: the guest's uptime, its counters, PSI and zones."""

    t: float
    counters: Mapping[str, int]
    psi: Mapping[str, Mapping[str, float]]  # "some"/"full" -> avg10, avg60, avg300, total
    zones: tuple[Mapping[str, Any], ...]  # populated zones: name, free, min, low, high, managed

    def counter(self, name: str) -> int:
        if name == "allocstall":
            return allocstall(self.counters)
        return int(self.counters.get(name, 0))

    def fields(self, pages_verified: int) -> dict[str, Any]:
        """The fields of a ``vm.sample`` event, as a model run names them."""
        return {
            "t": round(self.t, 3),
            "nr_free_pages": self.counter("nr_free_pages"),
            "zones": [
                {k: z[k] for k in ("name", "free", "min", "low", "high")} for z in self.zones
            ],
            "nr_writeback": self.counter("nr_writeback"),
            "nr_shmem": self.counter("nr_shmem"),
            "pswpout": self.counter("pswpout"),
            "pswpin": self.counter("pswpin"),
            "pgscan_kswapd": self.counter("pgscan_kswapd"),
            "pgscan_direct": self.counter("pgscan_direct"),
            "allocstall": self.counter("allocstall"),
            "throttled": self.counter("pgscan_direct_throttle"),
            "psi_some_avg10": self.psi.get("some", {}).get("avg10", 0.0),
            "psi_full_avg10": self.psi.get("full", {}).get("avg10", 0.0),
            "pages_verified": pages_verified,
        }


def allocstall(counters: Mapping[str, int]) -> int:
    return sum(int(v) for k, v in counters.items() if ALLOCSTALL.match(k))


def parse_sample(line: str) -> Sample:
    """``S 12.34 nr_free_pages=300 ... psi_some=avg10=0.00,... zone.DMA32.free=250 ...``"""
    parts = line.split()
    if len(parts) < 2 or parts[0] != "S":
        raise ValueError(f"not a sample: {line[:60]!r}")
    t = float(parts[1])
    counters: dict[str, int] = {}
    psi: dict[str, dict[str, float]] = {}
    zones: dict[str, dict[str, Any]] = {}
    for item in parts[2:]:
        key, sep, value = item.partition("=")
        if not sep:
            continue
        if key.startswith("psi_"):
            psi[key[4:]] = _psi_figures(value)
        elif key.startswith("zone."):
            _, name, field = key.split(".", 2)
            zones.setdefault(name, {"name": name})[field] = int(value)
        else:
            counters[key] = int(value)
    populated = tuple(z for z in zones.values() if z.get("managed", 0) > 0)
    return Sample(t=t, counters=counters, psi=psi, zones=populated)


def _psi_figures(value: str) -> dict[str, float]:
    out: dict[str, float] = {}
    for part in value.split(","):
        k, _, v = part.partition("=")
        if k in PSI_FIELDS and v:
            out[k] = float(v)
    return out


def parse_tcpext(value: str) -> dict[str, int]:
    """The ``TcpExt:`` header and value lines of /proc/net/netstat, as the guest sends them
    (``|TcpExt: names...|TcpExt: values...``)."""
    lines = [s.split()[1:] for s in value.split("|") if s.startswith("TcpExt:")]
    if len(lines) < 2:
        return {}
    return {k: int(v) for k, v in zip(lines[0], lines[1], strict=False) if v.lstrip("-").isdigit()}


# -- the console ----------------------------------------------------------------------------
_PRINTK = re.compile(r"^\[\s*\d+\.\d+\]\s?")
_TASK = re.compile(r"^task:(\S+)\s+state:(\S+)")
#: A frame of a stack dump; one marked ``?`` is a stale return address the unwinder found on
#: the stack, not a caller (Documentation/admin-guide/bug-hunting.rst), and is left out.
_FRAME = re.compile(r"^\s*(\?\s+)?([A-Za-z_][\w.]*)\+0x[0-9a-f]+/0x[0-9a-f]+")
#: Frames that say only that a task sleeps, not what for.
_SCHEDULER = frozenset(
    {
        "__schedule",
        "schedule",
        "schedule_timeout",
        "io_schedule_timeout",
        "io_schedule",
        "schedule_preempt_disabled",
        "__cond_resched",
    }
)
#: A line that ends a run as an error.
FATAL = re.compile(r"Kernel panic|BUG: |Oops: |general protection fault|kernel BUG at")


def strip_printk(line: str) -> str:
    return _PRINTK.sub("", line.rstrip("\r\n"))


@attrs.frozen
class BlockedTask:
    task: str
    state: str
    stack: tuple[str, ...]  # innermost first, scheduler frames dropped

    @property
    def waits_in(self) -> str:
        """Where it waits: its first frames below the scheduler, innermost first."""
        return " <- ".join(self.stack[:3]) if self.stack else "?"


def blocked_tasks(lines: Iterable[str]) -> list[BlockedTask]:
    """The tasks of sysrq-w's "Show Blocked State" dump (the last one in ``lines``)."""
    tasks: list[BlockedTask] = []
    current: tuple[str, str] | None = None
    frames: list[str] = []

    def flush() -> None:
        nonlocal current, frames
        if current is not None:
            stack = tuple(f for f in frames if f not in _SCHEDULER)
            tasks.append(BlockedTask(current[0], current[1], stack))
        current, frames = None, []

    for raw in lines:
        line = strip_printk(raw)
        if "sysrq: Show Blocked State" in line:
            flush()
            tasks = []
            continue
        m = _TASK.match(line)
        if m:
            flush()
            current = (m.group(1), m.group(2))
            continue
        if current is None:
            continue
        if line.strip() in ("</TASK>",) or line.startswith("sysrq:"):
            flush()
            continue
        f = _FRAME.match(line)
        if f and not f.group(1):
            frames.append(f.group(2))
    flush()
    return tasks


#: The hung-task detector (kernel/hung_task.c): a task in TASK_UNINTERRUPTIBLE for longer
#: than hung_task_timeout_secs (120 s by default).
_HUNG = re.compile(r"INFO: task (\S+):(\d+) blocked for more than (\d+) seconds")


def hung_task(line: str) -> tuple[str, int, int] | None:
    """(task, pid, seconds) of a hung-task report, or None."""
    m = _HUNG.search(strip_printk(line))
    return (m.group(1), int(m.group(2)), int(m.group(3))) if m else None


def fatal_line(line: str) -> str | None:
    """The console line, without its timestamp, if it ends the run as an error."""
    text = strip_printk(line)
    return text if FATAL.search(text) else None
