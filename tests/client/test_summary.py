"""client/summary.py: a run's summary is a record, and its JSON is the one netswap always
wrote (the recorded comparison's ``run.summary`` events come back key for key, in order)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import attrs
import pytest

from client.summary import (
    RunSummary,
    Verdict,
    structure_summary,
    unstructure_summary,
)

FIXTURE = Path(__file__).parents[1] / "testbed" / "data" / "compare.jsonl"


def logged_summaries() -> list[dict[str, Any]]:
    events = [json.loads(line) for line in FIXTURE.read_text().splitlines()]
    return [
        {k: v for k, v in e.items() if k not in ("event", "timestamp", "level")}
        for e in events
        if e["event"] == "run.summary"
    ]


def test_a_logged_summary_round_trips_key_for_key_in_order() -> None:
    for fields in logged_summaries():
        summary = structure_summary(fields)
        assert isinstance(summary.deadlock, Verdict | None)
        back = unstructure_summary(summary)
        assert back == fields and list(back) == list(fields)


def test_fields_read_what_the_json_says() -> None:
    none = structure_summary(logged_summaries()[0])
    assert none.policy == "none" and none.outcome == "deadlock"
    assert (
        none.deadlock is not None
        and none.deadlock.cycle == logged_summaries()[0]["deadlock"]["cycle"]
    )
    assert none.memory is not None and none.memory.zones[0].min == 128
    assert none.drops == none.net["PFMemallocDrop"] + none.net["rx_alloc_fail"]


def test_what_a_summary_lacks_stays_out_of_its_json() -> None:
    """A guest's summary (netswap kernel run) has no slabinfo, swap_device, ...: they read
    as None and are not written back as nulls; the model's ``deadlock`` always is."""
    guest = {"machine": "6.1", "policy": "kernel", "outcome": "completed", "reason": "",
             "duration": 3.0, "vmstat": {"pswpout": 1}, "kernel": {"release": "6.1"}, "trial": 0}  # fmt: skip
    summary = structure_summary(guest)
    assert summary.slabinfo is None and summary.counter("pswpout") == 1
    assert unstructure_summary(summary) == {**guest, "deadlock": None}


def test_a_summary_without_its_names_is_a_one_line_error() -> None:
    with pytest.raises(ValueError, match="not a run summary"):
        structure_summary({"outcome": "completed"})


def test_a_seed_is_written_only_when_set() -> None:
    summary = RunSummary(machine="m", policy="none", outcome="completed", reason="", duration=1.0)
    assert "seed" not in unstructure_summary(summary)
    assert unstructure_summary(attrs.evolve(summary, seed=3))["seed"] == 3


def test_a_chain_that_ends_outside_the_machine_is_printed_as_a_stall() -> None:
    """The watchdog ends a run with no progress whether its wait-for path closes or not; only
    a path that closes is printed as a plain cycle."""
    cycle = Verdict(["kswapd0", "mempool(bio)", "eth0.rx", "kswapd0"], True, {})
    assert cycle.chain() == "kswapd0 -> mempool(bio) -> eth0.rx -> kswapd0"
    chain = Verdict(["kswapd0", "mempool(bio)", "eth0.rx", "packet(eth0)", "peer"], False, {})
    assert chain.chain() == (
        "kswapd0 -> mempool(bio) -> eth0.rx -> packet(eth0) -> peer (no cycle: a stall)"
    )


def test_the_tasks_off_the_path_that_wait_for_its_resources_are_named() -> None:
    """6.1's hang as the model prints it: the shortest cycle is the refill worker's and
    NAPI's; kswapd and the writer wait for the same bio off the path."""
    verdict = Verdict(
        ["eth0.refill", "mempool(bio)", "eth0.rx", "napi_disabled(eth0)", "eth0.refill"],
        True,
        {
            "eth0.refill": "mempool(bio)",
            "eth0.rx": "napi_disabled(eth0)",
            "kswapd0": "mempool(bio)",
            "hog/0": "mempool(bio)",
            "hog/1": "pfmemalloc_wait(Normal)",
        },
    )
    assert verdict.also_waiting() == [("mempool(bio)", ["kswapd0", "hog/0"])]
    assert Verdict(["a", "x", "a"], True, {"a": "x"}).also_waiting() == []
