"""Reports and plots read back from a recorded log (``netswap report LOG [--plot PNG]``).

``data/compare.jsonl`` is a recorded ``netswap compare`` of the four policies on the
swap-over-NBD scenario at 16 MiB, trimmed: every ``run.start``, ``vm.sample``,
``watchdog.deadlock`` and ``run.summary``, and the first three of each other event per run.
Expected figures are read from the fixture's own ``run.summary`` events, never restated.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest

from testbed.report import (
    UNFINISHED,
    VMSTAT_KEYS,
    LogRuns,
    ReportError,
    atomic_floor,
    load_runs,
    render_report,
    report_json,
)

FIXTURE = Path(__file__).parent / "data" / "compare.jsonl"


def fixture_lines() -> list[str]:
    return FIXTURE.read_text(encoding="utf-8").splitlines(keepends=True)


def fixture_events(name: str) -> list[dict[str, Any]]:
    events = [json.loads(line) for line in fixture_lines()]
    return [e for e in events if e["event"] == name]


SUMMARIES = fixture_events("run.summary")
POLICIES = [s["policy"] for s in SUMMARIES]


def overview(text: str) -> list[list[str]]:
    """The overview table's rows (split on runs of spaces), header first."""
    lines = text.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("policy "))
    rows = []
    for line in lines[start:]:
        if not line.strip() or ":" in line:
            break
        if not set(line) <= {"-", " "}:
            rows.append(re.split(r"\s{2,}", line.strip()))
    return rows


def section(text: str, index: int) -> str:
    """Run ``index``'s section of the report."""
    parts = re.split(r"^run \d+/\d+: ", text, flags=re.MULTILINE)
    return parts[index]


def value_of(section_text: str, label: str) -> str:
    match = re.search(rf"^ +{re.escape(label)} +(\S+)", section_text, flags=re.MULTILINE)
    assert match is not None, f"no {label!r} row"
    return match.group(1)


# -- the recorded comparison ------------------------------------------------------------------


def test_fixture_is_the_four_policy_comparison() -> None:
    assert POLICIES == ["none", "recursive", "reserve", "pfmemalloc"]
    assert [s["outcome"] for s in SUMMARIES] == ["deadlock", "deadlock", "completed", "completed"]
    assert FIXTURE.stat().st_size < 300_000


def test_log_splits_into_one_run_per_run_start() -> None:
    log = load_runs(FIXTURE)
    assert [r.policy for r in log] == POLICIES
    assert [r.outcome for r in log] == [s["outcome"] for s in SUMMARIES]
    assert [r.summary for r in log] == [
        {k: v for k, v in s.items() if k not in ("event", "timestamp", "level")} for s in SUMMARIES
    ]
    for run in log:
        samples = [e for e in fixture_events("vm.sample") if e["policy"] == run.policy]
        assert len(run.samples) == len(samples) > 0
        assert run.start["transport"] == "memory"
    assert log.bad_lines == 0
    assert log.lines == len(fixture_lines())


def test_overview_lists_every_policy_with_its_outcome() -> None:
    rows = overview(render_report(load_runs(FIXTURE)))
    assert rows[0] == [
        "policy",
        "outcome",
        "time s",
        "pswpout",
        "min free",
        "reserve peak",
        "drops",
        "throttled",
        "verified",
        "corrupt",
    ]
    body = rows[1:]
    assert [(r[0], r[1]) for r in body] == [(s["policy"], s["outcome"]) for s in SUMMARIES]
    for row, s in zip(body, SUMMARIES, strict=True):
        net = s["net"]
        assert row[2] == f"{s['duration']:.1f}"
        assert row[3] == str(s["vmstat"]["pswpout"])
        assert row[4] == str(s["min_free_pages"])
        assert row[5] == str(s["policy_report"].get("reserve_peak", "-"))
        assert row[6] == str(net["PFMemallocDrop"] + net["rx_alloc_fail"])
        assert row[7] == str(s["vmstat"]["pgscan_direct_throttle"])
        assert row[8] == str(s["integrity"]["pages_verified"])
        assert row[9] == str(s["integrity"]["corrupt"])


def test_deadlock_cycle_appears_joined_with_arrows() -> None:
    text = render_report(load_runs(FIXTURE))
    deadlocked = [s for s in SUMMARIES if s["deadlock"]]
    assert deadlocked
    for s in deadlocked:
        cycle = " -> ".join(s["deadlock"]["cycle"])
        assert f"{s['policy']}: {cycle}" in text
        assert f"cycle: {cycle}" in section(text, POLICIES.index(s["policy"]) + 1)
    for s in SUMMARIES:
        if not s["deadlock"]:
            assert "cycle:" not in section(text, POLICIES.index(s["policy"]) + 1)


NETWORK_NOW = {
    "ring_posted": 0,
    "ring_pages": 202,
    "rx_queued": 400,
    "tx_pages": 65,
    "tcp_memory_allocated": 256,
    "tcp_memory_pressure": True,
}


def with_network(lines: list[str]) -> list[str]:
    """The fixture's lines with today's network fields: in its last vm.sample (NETWORK_NOW)
    and its summary's ``net`` (the ring's peak, the limits, each socket's buffers)."""
    last = max(i for i, line in enumerate(lines) if '"vm.sample"' in line)
    out = []
    for i, line in enumerate(lines):
        event = json.loads(line)
        if i == last:
            event.update(NETWORK_NOW)
        elif event["event"] == "run.summary":
            event["net"] = {
                **event["net"],
                "nic": {"name": "eth0", "posted": 0, "ring_pages_peak": 210, "refill_failed": 7},
                "tcp": {"tcp_mem": [183, 244, 366]},
                "sockets": [
                    {"name": "fileserver0", "memalloc": False, "rx_bufs": 400, "rcvq_drop": 3},
                    {"name": "nbd0", "memalloc": True, "rx_bufs": 0, "pfmemalloc_drop": 0},
                ],
            }
        out.append(json.dumps(event))
    return out


def test_network_section_says_who_held_the_ring() -> None:
    """The state is the last sample's (the summary's is taken after the ring was closed);
    peaks, failures, limits and the sockets are the summary's.  A log without any of it
    (the fixture) has no such section."""
    none = [line for line in fixture_lines() if '"policy": "none"' in line]
    assert "  network (" not in render_report(load_runs(none))
    runs = load_runs(with_network(none))
    text = render_report(runs)
    assert re.search(r"^  network \(the last vm.sample, t [0-9.]+ s\)$", text, flags=re.MULTILINE)
    assert value_of(text, "ring buffers posted") == "0"
    assert value_of(text, "ring pages") == "202"
    assert "posted or queued on sockets, peak 210" in text
    assert value_of(text, "queued on sockets") == "400"
    assert value_of(text, "TX pages") == "65"
    assert value_of(text, "tcp_memory_allocated") == "256"
    assert "tcp_mem 183 244 366, in memory pressure" in text
    assert value_of(text, "refills failed") == "7"
    assert re.search(r"^ +fileserver0 +400 +3 +\?$", text, flags=re.MULTILINE)
    assert re.search(r"^ +nbd0 \(memalloc\) +0 +\? +0$", text, flags=re.MULTILINE)
    network = report_json(runs)["runs"][0]["network"]
    assert {k: network[k] for k in NETWORK_NOW} == NETWORK_NOW
    assert network["t"] == runs[0].samples[-1]["t"]
    assert network["tcp_mem"] == [183, 244, 366] and len(network["sockets"]) == 2


def test_vmstat_figures_match_the_summary() -> None:
    log = load_runs(FIXTURE)
    text = render_report(log)
    facts = report_json(log)["runs"]
    for i, s in enumerate(SUMMARIES):
        # The fixture predates swap readahead: its counters are missing, shown as "?".
        assert facts[i]["vmstat"] == {
            "source": "summary",
            "counters": {k: s["vmstat"].get(k) for k in VMSTAT_KEYS},
        }
        run_text = section(text, i + 1)
        for key in VMSTAT_KEYS:
            expected = s["vmstat"].get(key)
            assert value_of(run_text, key) == ("?" if expected is None else str(expected))
        assert value_of(run_text, "swap_ra") == "?"


def test_free_pages_are_read_against_the_watermarks() -> None:
    log = load_runs(FIXTURE)
    facts = report_json(log)["runs"]
    for run, f in zip(log, facts, strict=True):
        free = [s["nr_free_pages"] for s in run.samples]
        assert f["free_pages"]["lowest_sampled"] == min(free)
        assert f["free_pages"]["highest_sampled"] == max(free)
        lowest = next(s for s in run.samples if s["nr_free_pages"] == min(free))
        zone = lowest["zones"][0]
        assert f["free_pages"]["watermarks"] == {k: zone[k] for k in ("min", "low", "high")}
        assert f["free_pages"]["atomic_floor"] == atomic_floor(zone["min"])
    # Without reserves free pages fall below the GFP_ATOMIC floor: RX cannot allocate.
    none = section(render_report(log), 1)
    assert re.search(r"lowest sampled +\d+ +below 3/8 min, the GFP_ATOMIC floor", none)


def test_atomic_floor_is_three_eighths_of_min_as_the_kernel_rounds() -> None:
    assert [atomic_floor(m) for m in (128, 304, 7, 0)] == [48, 114, 3, 0]


def test_reserve_table_and_peak_are_reported() -> None:
    log = load_runs(FIXTURE)
    reserve = SUMMARIES[POLICIES.index("reserve")]
    text = section(render_report(log), POLICIES.index("reserve") + 1)
    assert "reserve_info" in text
    for row in reserve["policy_report"]["reserve_info"]:
        assert row["reserve"] in text
    assert value_of(text, "reserve peak") == str(reserve["policy_report"]["reserve_peak"])
    run = log[POLICIES.index("reserve")]
    assert value_of(text, "reserve_used, max sampled") == str(
        max(s["reserve_used"] for s in run.samples)
    )


def test_deadlock_ends_when_the_watchdog_fired_not_at_the_summary_duration() -> None:
    log = load_runs(FIXTURE)
    for run, s in zip(log, SUMMARIES, strict=True):
        assert run.duration == s["duration"]
        if s["outcome"] == "deadlock":
            # The sampler stops with the run; the summary comes after the swap device's close.
            assert run.end_time == run.samples[-1]["t"] < s["duration"]
        else:
            assert run.end_time == s["duration"]
    # A watchdog.deadlock that carries the run's clock is believed.
    lines = fixture_lines()
    i = next(i for i, line in enumerate(lines) if '"watchdog.deadlock"' in line)
    event = json.loads(lines[i])
    lines[i] = json.dumps({**event, "t": 2.1}) + "\n"
    text = render_report(load_runs(lines))
    assert load_runs(lines)[0].end_time == 2.1
    assert "ended     t 2.1 s, when the watchdog fired" in text


def test_psi_and_integrity_come_from_the_summary() -> None:
    facts = report_json(load_runs(FIXTURE))["runs"]
    for f, s in zip(facts, SUMMARIES, strict=True):
        assert f["psi"]["some"]["avg10"] == s["psi"]["some"]["avg10"]
        assert f["psi"]["full"]["total_us"] == s["psi"]["full"]["total"]
        assert f["integrity"] == {
            k: s["integrity"][k] for k in ("pages_written", "pages_verified", "corrupt")
        }


def test_report_json_is_json_and_deterministic() -> None:
    data = report_json(load_runs(FIXTURE))
    assert json.loads(json.dumps(data)) == data
    assert [r["outcome"] for r in data["runs"]] == [s["outcome"] for s in SUMMARIES]
    assert data["unbound_events"] == {
        "nbd.transmission_started": 3,
        "server.connection_closed": 3,
        "server.connection_opened": 3,
    }
    assert render_report(load_runs(FIXTURE)) == render_report(load_runs(FIXTURE))


def test_a_single_run_has_no_overview() -> None:
    lines = [line for line in fixture_lines() if '"policy": "none"' in line]
    text = render_report(load_runs(lines))
    assert "1 run;" in text
    assert "time s" not in text
    assert "run 1/1: machine client0, policy none" in text


# -- logs that are not whole ------------------------------------------------------------------


def test_truncated_log_reports_last_run_unfinished_and_counts_the_cut_line() -> None:
    lines = fixture_lines()
    last_summary = max(i for i, line in enumerate(lines) if '"run.summary"' in line)
    cut = [*lines[:last_summary], lines[last_summary][:200]]  # killed mid-write
    log = load_runs(cut)
    assert log.bad_lines == 1 and log.bad_line_numbers == (last_summary + 1,)
    last = log[-1]
    assert last.policy == POLICIES[-1]
    assert last.summary is None and last.outcome == UNFINISHED
    assert [r.outcome for r in log][:-1] == [s["outcome"] for s in SUMMARIES][:-1]

    text = render_report(log)
    assert f"1 skipped (not JSON events): line {last_summary + 1}" in text
    assert overview(text)[-1][:2] == [POLICIES[-1], UNFINISHED]
    # What the samples say: counters as last minus first sample, the rest unknown.
    f = report_json(log)["runs"][-1]
    first, final = last.samples[0], last.samples[-1]
    assert f["vmstat"]["source"] == "samples"
    assert f["vmstat"]["counters"]["pswpout"] == final["pswpout"] - first["pswpout"]
    assert f["vmstat"]["counters"]["pgscan_kswapd"] is None
    assert f["duration"] == final["t"]
    assert f["integrity"]["corrupt"] is None
    assert value_of(section(text, len(log)), "pgscan_kswapd") == "?"


def test_blank_and_non_object_lines_are_skipped_and_counted() -> None:
    lines = fixture_lines()
    junk = ["\n", "[1, 2]\n", "42\n", '{"no_event": 1}\n', "not json at all\n", '{"event": 3}\n']
    log = load_runs([*junk[:3], *lines, *junk[3:]])
    assert log.bad_lines == len(junk)
    assert log.bad_line_numbers == (1, 2, 3, len(lines) + 4, len(lines) + 5, len(lines) + 6)
    assert [r.outcome for r in log] == [s["outcome"] for s in SUMMARIES]


def test_unknown_events_are_counted_not_errors() -> None:
    lines = fixture_lines()
    extra = json.dumps({"event": "future.fact", "machine": "client0", "policy": "none", "x": [1]})
    log = load_runs([lines[0], extra + "\n", *lines[1:]])
    assert log[0].events["future.fact"] == 1
    assert "future.fact 1" in section(render_report(log), 1)


def test_log_without_run_start_is_grouped_by_machine_and_policy() -> None:
    lines = [line for line in fixture_lines() if '"run.start"' not in line]
    log = load_runs(lines)
    assert [(r.policy, r.outcome) for r in log] == [(s["policy"], s["outcome"]) for s in SUMMARIES]
    assert all(r.start == {} for r in log)


def test_same_policy_twice_without_run_start_is_two_runs() -> None:
    none = [
        line for line in fixture_lines() if '"policy": "none"' in line and '"run.start"' not in line
    ]
    log = load_runs(none + none)
    assert [r.outcome for r in log] == ["deadlock", "deadlock"]
    assert len(log[0].samples) == len(log[1].samples)
    # Killed before its summary, the first run still ends where its clock went back.
    unfinished = [line for line in none if '"run.summary"' not in line]
    log = load_runs(unfinished + none)
    assert [r.outcome for r in log] == [UNFINISHED, "deadlock"]


def test_missing_file_is_a_report_error(tmp_path: Path) -> None:
    missing = tmp_path / "nope.jsonl"
    with pytest.raises(ReportError, match=r"nope\.jsonl: no such file"):
        load_runs(missing)


def test_directory_is_a_report_error(tmp_path: Path) -> None:
    with pytest.raises(ReportError, match="is a directory"):
        load_runs(tmp_path)


def test_empty_file_is_a_report_error(tmp_path: Path) -> None:
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    with pytest.raises(ReportError, match=r"empty\.jsonl: is empty"):
        load_runs(empty)


def test_garbage_file_is_a_report_error(tmp_path: Path) -> None:
    garbage = tmp_path / "garbage.bin"
    garbage.write_bytes(bytes(range(256)) * 8 + b"\nhello\n{not json\n")
    with pytest.raises(ReportError, match=r"garbage\.bin: no netswap run in \d+ lines"):
        load_runs(garbage)


def test_log_of_only_server_events_is_a_report_error() -> None:
    server = [line for line in fixture_lines() if '"machine"' not in line]
    assert server
    with pytest.raises(ReportError, match="no netswap run"):
        load_runs(server)


# -- the plot ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def compare_png(tmp_path_factory: pytest.TempPathFactory) -> tuple[Any, Path]:
    pytest.importorskip("matplotlib")
    from testbed.plot import plot_runs

    out = tmp_path_factory.mktemp("plot") / "compare.png"
    return plot_runs(load_runs(FIXTURE), out), out


def read_png(path: Path) -> Any:
    from matplotlib import image

    return image.imread(str(path))


def pixels_near(img: Any, rgb: tuple[int, int, int], tolerance: float = 0.06) -> int:
    """How many pixels are within ``tolerance`` of ``rgb`` (0-255) in every channel."""
    import numpy as np

    target = np.array(rgb) / 255.0
    return int((np.abs(img[:, :, :3] - target) < tolerance).all(axis=2).sum())


TAB_BLUE = (31, 119, 180)
TAB_RED = (214, 39, 40)
TAB_GREEN = (44, 160, 44)


def test_plot_has_a_column_per_run_with_every_sample(compare_png: tuple[Any, Path]) -> None:
    info, path = compare_png
    assert info.path == path and path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert info.runs == tuple(f"{s['policy']} — {s['outcome']}" for s in SUMMARIES)
    samples = fixture_events("vm.sample")
    assert info.points == tuple(sum(e["policy"] == p for e in samples) for p in POLICIES)
    for (low, high), policy in zip(info.free_pages, POLICIES, strict=True):
        free = [e["nr_free_pages"] for e in samples if e["policy"] == policy]
        assert (low, high) == (min(free), max(free))
    assert info.ends == tuple(r.end_time for r in load_runs(FIXTURE))
    # The watermarks are on the scale, with room above high.
    highs = [z["high"] for e in samples for z in e["zones"]]
    assert info.free_ylim[0] == 0 and info.free_ylim[1] >= 2 * max(highs)


def test_plot_image_shows_the_data(compare_png: tuple[Any, Path]) -> None:
    import numpy as np

    info, path = compare_png
    img = read_png(path)
    assert (img.shape[1], img.shape[0]) == info.size == (400 * len(SUMMARIES), 700)
    rgb = (img[:, :, :3] * 255).astype(np.uint32)
    colours = np.unique(rgb[:, :, 0] << 16 | rgb[:, :, 1] << 8 | rgb[:, :, 2])
    assert len(colours) > 200  # lines, text and antialiasing: not a blank canvas
    assert pixels_near(img, TAB_BLUE) > 2000  # free pages, writeback, pswpout
    assert pixels_near(img, TAB_RED) > 500  # deadlock end lines, drops, min watermark
    assert pixels_near(img, TAB_GREEN) > 500  # completed end lines, high watermark


def test_plotting_twice_gives_the_same_size(compare_png: tuple[Any, Path], tmp_path: Path) -> None:
    from testbed.plot import plot_runs

    info, path = compare_png
    again = plot_runs(load_runs(FIXTURE), tmp_path / "again.png")
    assert read_png(path).shape == read_png(again.path).shape
    assert again.size == info.size and again.points == info.points


def test_run_without_samples_gets_an_annotated_empty_panel(tmp_path: Path) -> None:
    pytest.importorskip("matplotlib")
    from testbed.plot import plot_runs

    none = [line for line in fixture_lines() if '"policy": "none"' in line]
    with_samples = plot_runs(load_runs(none), tmp_path / "with.png")
    bare = load_runs([line for line in none if '"vm.sample"' not in line])
    assert bare[0].samples == () and bare[0].outcome == "deadlock"
    info = plot_runs(bare, tmp_path / "bare.png")
    assert info.points == (0,) and info.free_pages == (None,)
    assert info.size == with_samples.size
    # The data lines are gone; the deadlock line and the annotation remain.
    empty, full = read_png(info.path), read_png(with_samples.path)
    assert pixels_near(empty, TAB_BLUE) * 5 < pixels_near(full, TAB_BLUE)
    assert pixels_near(empty, TAB_RED) > 100
    assert "0 vm.sample" in render_report(bare)


def test_the_networks_pages_are_drawn_only_where_sampled(tmp_path: Path) -> None:
    """The fixture predates the network's fields in vm.sample: no line for them (a zero
    line would claim the ring was empty); a sample with them gets both."""
    pytest.importorskip("matplotlib")
    from testbed.plot import plot_runs

    base = ("nr_writeback", "nr_emergency", "reserve_used")
    none = [line for line in fixture_lines() if '"policy": "none"' in line]
    assert plot_runs(load_runs(none), tmp_path / "old.png").page_series == (base,)
    sampled = [
        json.dumps({**event, "ring_pages": 40, "tx_pages": 3})
        if (event := json.loads(line))["event"] == "vm.sample"
        else line
        for line in none
    ]
    info = plot_runs(load_runs(sampled), tmp_path / "new.png")
    assert info.page_series == ((*base, "ring_pages", "tx_pages"),)


def test_plot_of_no_runs_is_a_report_error(tmp_path: Path) -> None:
    pytest.importorskip("matplotlib")
    from testbed.plot import plot_runs

    with pytest.raises(ReportError, match="no runs"):
        plot_runs(LogRuns(source="x", runs=()), tmp_path / "x.png")
