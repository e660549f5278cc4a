"""What the kernel lab prints: the compare row, the trials table, the outcome line."""

from __future__ import annotations

from typing import Any

from client.summary import structure_summary
from testbed.cli import compare_table
from testbed.kernel.cli import deadlock_lines, outcome_line, trials_table


def kernel_summary(outcome: str, trial: int = 0) -> dict[str, Any]:
    summary: dict[str, Any] = {
        "machine": "6.1.0-57-cloud-amd64",
        "policy": "kernel",
        "outcome": outcome,
        "reason": "" if outcome == "completed" else "no progress for 60s",
        "duration": 201.4,
        "vmstat": {"pswpout": 94178, "pswpin": 51167, "allocstall": 437,
                   "pgscan_direct_throttle": 3},
        "min_free_pages": 507,
        "net": {"PFMemallocDrop": None},
        "integrity": {"pages_written": 49152, "pages_verified": 49152, "corrupt": 0},
        "kernel": {"release": "6.1.0-57-cloud-amd64", "nic": "virtio"},
        "trial": trial,
    }  # fmt: skip
    if outcome == "deadlock":
        summary["deadlock"] = {
            "cycle": None,
            "has_cycle": False,
            "waiting": {"kswapd0": "mempool_alloc <- bio_alloc_bioset <- __swap_writepage"},
        }
    return summary


def test_a_kernel_row_in_compare_shows_its_blocked_tasks_instead_of_a_cycle() -> None:
    table = compare_table([structure_summary(kernel_summary("deadlock"))])
    lines = table.splitlines()
    assert lines[2].split()[:4] == ["kernel", "deadlock", "201.4", "94178"]
    assert lines[2].split()[6:8] == ["0", "3"]  # drops (none reported), throttled
    assert lines[-1] == (
        "kernel: blocked: kswapd0: mempool_alloc <- bio_alloc_bioset <- __swap_writepage"
    )


def test_trials_count_each_outcome() -> None:
    runs = [kernel_summary("completed", 0), kernel_summary("deadlock", 1),
            kernel_summary("completed", 2)]  # fmt: skip
    text = trials_table(runs)
    assert text.splitlines()[2].split() == ["6.1.0-57-cloud-amd64", "virtio", "2/3", "1/3"]
    assert "completed: trials 1, 3" in text and "deadlock: trials 2" in text


def test_the_outcome_line_and_the_blocked_tasks() -> None:
    summary = kernel_summary("deadlock")
    assert outcome_line(summary).startswith(
        "6.1.0-57-cloud-amd64 (virtio): deadlock (no progress for 60s) after 201s"
    )
    assert deadlock_lines(summary) == [
        "  kswapd0: mempool_alloc <- bio_alloc_bioset <- __swap_writepage"
    ]
