"""A scenario as the guest runs it: which keys map to what in the guest, and which it
cannot honour (refused, one line naming the key; never silently ignored).

Mapped: ``machine.memory`` (qemu's RAM), ``min_free_kbytes``, ``swappiness``,
``page_cluster``, ``watermark_scale_factor``, ``swap_readahead`` (``vma_ra_enabled``, and a
rotational nbd0 for readahead by slot, as ``swap_use_vma_readahead`` requires),
``max_io_pages`` (nbd0's ``max_sectors_kb``), ``[net]``'s ``tcp_mem``, ``tcp_wmem`` and
``tcp_rmem`` (net.ipv4's), ``swap.export``/``size``, ``swap.io_timeout``
(nbd-client ``-t``), ``anon_hog`` workloads (processes writing random data into tmpfs,
each read back and compared by SHA-256), and the server's exports and faults.

Not applicable: the tables that configure the model's designs (``policy``, ``reserve``,
``throttle``): the guest runs the design its kernel has, Gorman's, and is reported as
policy ``kernel``.  ``run.seed`` and ``run.stall_seconds`` belong to the model's virtual
clock; the guest's limits are ``[kernel]``'s.
"""

from __future__ import annotations

import math
from typing import Any

from client.config import HogConfig, MachineConfig, SwapConfig
from nbdproto.config import ConfigError
from testbed.config import ScenarioConfig
from testbed.kernel.guest import GuestSettings

PAGE = 4096
#: Model keys with no counterpart a guest can be given: refused unless at their default.
_UNSUPPORTED = {
    "machine": (
        ("zones", "the guest's zones are its kernel's (DMA, DMA32)"),
        ("swap_queue_depth", "nbd's tag set depth is fixed by the driver"),
        ("bio_pool_size", "the kernel's BIO_POOL_SIZE is 2"),
        ("disk_read_latency", "the guest has no local disk"),
        ("readahead_pages", "the guest has no local disk"),
    ),
    "swap": (
        ("sndbuf", "nbd's kernel socket cannot be given SO_SNDBUF"),
        ("rcvbuf", "nbd's kernel socket cannot be given SO_RCVBUF"),
        ("latency", "the guest's network is qemu's; use a server fault delay instead"),
        ("depth", "nbd's tag set depth is fixed by the driver"),
        ("spare_pages", "the kernel does not remap fenced swap writes"),
        ("quarantine_seconds", "the kernel does not remap fenced swap writes"),
    ),
}


def guest_settings(scenario: ScenarioConfig) -> GuestSettings:
    """What the guest is told for ``scenario``; ConfigError for what it cannot do."""
    refuse_unsupported(scenario)
    machine = scenario.machine
    ram = machine.memory
    workloads = []
    for i, w in enumerate(scenario.workloads):
        if not isinstance(w, HogConfig):
            raise ConfigError(
                f"workloads.{i}.kind {w.kind!r}: the kernel lab runs anon_hog workloads only"
            )
        if w.rate:
            raise ConfigError(f"workloads.{i}.rate: the guest's hogs run as fast as they can")
        # Whole 64 KiB blocks per process (the guest's dd moves 64 KiB at a time).
        pages = max(16, -(-w.total_bytes(ram) // PAGE // w.processes // 16) * 16)
        workloads.append((w.name, w.processes, pages, w.rounds, float(w.start_after)))
    written = sum(procs * pages for _, procs, pages, _, _ in workloads)
    sysctls = {
        "MIN_FREE_KBYTES": "" if machine.min_free_kbytes is None else str(machine.min_free_kbytes),
        "SWAPPINESS": str(machine.swappiness),
        "PAGE_CLUSTER": str(machine.page_cluster),
        "WATERMARK_SCALE_FACTOR": str(machine.watermark_scale_factor),
        "VMA_RA": "true" if machine.swap_readahead == "vma" else "false",
        "ROTATIONAL": "0" if machine.swap_readahead == "vma" else "1",
        "MAX_SECTORS_KB": str(machine.max_io_pages * PAGE // 1024),
        # [net]: net.ipv4's TCP sysctls, as "min default max" (empty: the kernel's own)
        **{
            name.upper(): "" if value is None else " ".join(map(str, value))
            for name, value in (
                ("tcp_mem", scenario.net.tcp_mem),
                ("tcp_wmem", scenario.net.tcp_wmem),
                ("tcp_rmem", scenario.net.tcp_rmem),
            )
        },
    }
    return GuestSettings(
        export=scenario.swap.export,
        nbd_timeout=max(1, math.ceil(scenario.swap.io_timeout)),
        sample_interval=scenario.kernel.sample_interval,
        # Room for every workload's file at once, and their checksums.
        tmpfs_kb=written * PAGE // 1024 + 4096,
        sysctls=sysctls,
        workloads=tuple(workloads),
        colocated="" if scenario.kernel.server == "host" else scenario.kernel.server,
        swap_bytes=scenario.swap.size,
    )


def refuse_unsupported(scenario: ScenarioConfig) -> None:
    defaults: dict[str, Any] = {"machine": MachineConfig(), "swap": SwapConfig()}
    for table, keys in _UNSUPPORTED.items():
        ours, default = getattr(scenario, table), defaults[table]
        for key, why in keys:
            if getattr(ours, key) != getattr(default, key):
                raise ConfigError(f"{table}.{key}: the kernel lab cannot set it ({why})")
    if scenario.noise:
        raise ConfigError("noise: the kernel lab has no noise sockets yet")
    if scenario.faults.alloc is not None:
        raise ConfigError("faults.alloc: the guest's kernel has no fail_page_alloc here")
    if scenario.faults.latency_ms is not None:
        raise ConfigError("faults.latency_ms: the guest's network is qemu's")
    if not scenario.workloads:
        raise ConfigError("workloads: the kernel lab needs at least one anon_hog")


def memory_mib(scenario: ScenarioConfig) -> int:
    """qemu's ``-m`` for ``machine.memory`` (whole MiB, at least 64)."""
    mib = scenario.machine.memory // (1 << 20)
    if mib < 64:
        raise ConfigError(f"machine.memory {scenario.machine.memory}: a guest needs at least 64M")
    return mib


__all__ = ["guest_settings", "memory_mib", "refuse_unsupported"]
