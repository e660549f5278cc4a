"""Reading the guest: its records and its console, on captured text."""

from __future__ import annotations

from pathlib import Path

from testbed.kernel.parse import (
    blocked_tasks,
    fatal_line,
    hung_task,
    parse_sample,
    parse_tcpext,
    strip_printk,
)

HANG = Path(__file__).parent / "data" / "kernel-6.1-nbd-swap-hang.txt"

SAMPLE = (
    "S 123.45 nr_free_pages=267 nr_writeback=16 nr_shmem=30193 pswpin=0 pswpout=4096 "
    "pgscan_kswapd=900 pgscan_direct=120 pgscan_direct_throttle=3 allocstall_dma=1 "
    "allocstall_dma32=4 allocstall_normal=0 allocstall_movable=0 "
    "psi_some=avg10=12.50,avg60=3.10,avg300=0.70,total=4100000 "
    "psi_full=avg10=9.00,avg60=2.00,avg300=0.40,total=2000000 "
    "zone.DMA.free=142 zone.DMA.min=552 zone.DMA.low=562 zone.DMA.high=572 "
    "zone.DMA.managed=3840 zone.DMA32.free=125 zone.DMA32.min=1094 zone.DMA32.low=1178 "
    "zone.DMA32.high=1262 zone.DMA32.managed=35431 zone.Normal.free=0 zone.Normal.min=0 "
    "zone.Normal.low=0 zone.Normal.high=0 zone.Normal.managed=0"
)


def test_a_sample_reads_as_a_model_run_names_it() -> None:
    sample = parse_sample(SAMPLE)
    fields = sample.fields(pages_verified=512)
    assert fields["t"] == 123.45
    assert fields["nr_free_pages"] == 267
    assert fields["pswpout"] == 4096 and fields["pswpin"] == 0
    assert fields["allocstall"] == 5  # the kernel's per-zone counters, summed
    assert fields["throttled"] == 3
    assert fields["psi_some_avg10"] == 12.5 and fields["psi_full_avg10"] == 9.0
    assert fields["pages_verified"] == 512
    # Unpopulated zones (managed 0) are left out; the others keep their watermarks.
    assert fields["zones"] == [
        {"name": "DMA", "free": 142, "min": 552, "low": 562, "high": 572},
        {"name": "DMA32", "free": 125, "min": 1094, "low": 1178, "high": 1262},
    ]
    assert sample.psi["some"]["total"] == 4100000


def test_a_line_that_is_not_a_sample_is_refused() -> None:
    for bad in ("@ started", "S", "S notanumber x=1"):
        try:
            parse_sample(bad)
        except ValueError:
            continue
        raise AssertionError(f"{bad!r} parsed")


def test_tcpext_counters_by_name() -> None:
    value = "|TcpExt: SyncookiesSent PFMemallocDrop TCPTimeouts|TcpExt: 0 7 12"
    assert parse_tcpext(value) == {"SyncookiesSent": 0, "PFMemallocDrop": 7, "TCPTimeouts": 12}
    assert parse_tcpext("") == {}


def test_the_blocked_tasks_of_the_6_1_hang() -> None:
    """The trace of Linux 6.1 deadlocking over NBD through virtio-net (issue F): kswapd,
    virtio_net's refill worker and the writer all wait for a bio in mempool_alloc."""
    tasks = {t.task: t for t in blocked_tasks(HANG.read_text().splitlines())}
    assert set(tasks) == {"kswapd0", "kworker/0:2", "init", "dd"}
    assert all(t.state == "D" for t in tasks.values())
    assert tasks["kswapd0"].waits_in == "mempool_alloc <- bio_alloc_bioset <- __swap_writepage"
    refill = tasks["kworker/0:2"].stack
    assert refill[0] == "mempool_alloc"
    assert "refill_work" in refill and "skb_page_frag_refill" in refill
    assert "try_to_free_pages" in refill  # the refill worker entered direct reclaim
    assert tasks["init"].stack[0] == "throttle_direct_reclaim"
    assert tasks["dd"].waits_in.startswith("mempool_alloc")


def test_stale_frames_are_left_out() -> None:
    dump = [
        "[  60.1] task:kswapd0         state:D stack:0     pid:36    ppid:2      flags:0x00004000",
        "[  60.1] Call Trace:",
        "[  60.1]  <TASK>",
        "[  60.1]  __schedule+0x34d/0xa00",
        "[  60.1]  ? __bpf_trace_tick_stop+0x10/0x10",
        "[  60.1]  schedule+0x5a/0xd0",
        "[  60.1]  io_schedule_timeout+0x4c/0x80",
        "[  60.1]  mempool_alloc+0x172/0x1b0",
        "[  60.1]  ? cpuusage_read+0x10/0x10",
        "[  60.1]  bio_alloc_bioset+0x1e2/0x490",
        "[  60.1]  </TASK>",
    ]
    (task,) = blocked_tasks(dump)
    assert task.stack == ("mempool_alloc", "bio_alloc_bioset")


def test_panics_and_oopses_end_a_run_ordinary_lines_do_not() -> None:
    assert fatal_line("[   5.48] Kernel panic - not syncing: Attempted to kill init!") == (
        "Kernel panic - not syncing: Attempted to kill init!"
    )
    assert fatal_line("[  10.1] BUG: kernel NULL pointer dereference, address: 0") is not None
    assert fatal_line("[  36.02] block nbd0: Possible stuck request ...") is None
    assert strip_printk("[  350.931651] sysrq: Show Blocked State") == "sysrq: Show Blocked State"


def test_the_hung_task_detector_is_read() -> None:
    line = "[  243.2] INFO: task kswapd0:36 blocked for more than 120 seconds."
    assert hung_task(line) == ("kswapd0", 36, 120)
    assert hung_task("[  36.0] block nbd0: Possible stuck request") is None
