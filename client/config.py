"""The client machine's configuration: its memory, its swap device, workloads, noise, the
reserve policy's sizes, the run's pace, and client faults.

Typed and strict (attrs); :mod:`testbed.config` loads them from a scenario's TOML.  Every bad
value raises :class:`~nbdproto.config.ConfigError` with one line that names the key and the
value.  :class:`Scenario` is what the client reads of a scenario, so that it never imports
the harness that loads one (DESIGN.md §2).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Literal, Protocol

import attrs

from client.mm import MemoryConfig
from client.nbd_client import NBD_ERAS  # ``[swap] nbd``: the eras nbd_client models
from nbdproto.config import ConfigError, parse_size


def _mem_size(value: str | int) -> int:
    return parse_size(value, what="machine.memory")


def _swap_size(value: str | int) -> int:
    return parse_size(value, what="swap.size")


@attrs.frozen
class MachineConfig:
    """The modelled client machine (DESIGN.md §4.1)."""

    name: str = "client0"
    memory: int = attrs.field(default=64 << 20, converter=_mem_size)
    zones: tuple[tuple[str, float], ...] = (("Normal", 1.0),)
    min_free_kbytes: int | None = None  # None: the kernel's int_sqrt(lowmem_kbytes * 16)
    watermark_scale_factor: int = 10
    max_io_pages: int = 32
    swap_queue_depth: int = 32
    bio_pool_size: int = 2
    bio_cache: str = "kernel"  # 6.1's bio-200 slab objects, or "page": a page per bio
    swappiness: int = 60  # vm.swappiness
    disk_read_latency: float = 0.0001  # seconds per readahead window from the local disk
    readahead_pages: int = 32
    page_cluster: int = 3  # vm.page-cluster: swap readahead reads up to 2^page_cluster pages
    swap_readahead: str = "cluster"  # by swap slot ("cluster") or by address ("vma", 4.14+)

    def __attrs_post_init__(self) -> None:
        if self.memory < 1 << 20:
            raise ConfigError(f"machine.memory {self.memory}: at least 1M")
        if not 1 <= self.max_io_pages <= 256:
            raise ConfigError(f"machine.max_io_pages {self.max_io_pages}: must be 1..256")
        try:  # every other value is checked once, by the memory model's own validators
            self.memory_config().zone_pages()
        except (ValueError, TypeError) as exc:
            # attrs' in_ validator adds the attribute and the options to args: the first says it
            raise ConfigError(f"[machine] {exc.args[0] if exc.args else exc}") from None

    def memory_config(self) -> MemoryConfig:
        """The memory model's configuration: the same keys, ``memory`` as ``total_bytes``."""
        return MemoryConfig(
            total_bytes=self.memory,
            **{key: getattr(self, key) for key in _MEMORY_KEYS},
        )


#: The ``[machine]`` keys that are the memory model's (``MemoryConfig``'s) under one name.
_MEMORY_KEYS = tuple(
    f.name for f in attrs.fields(MemoryConfig) if f.name in attrs.fields_dict(MachineConfig)
)


#: What a socket buffer key takes to leave the buffer to the kernel (TOML has no null).
AUTOTUNED = "auto"


def _opt_buf_size(value: str | int | None) -> int | None:
    """A socket buffer: SO_SNDBUF/SO_RCVBUF as the ``sk_sndbuf``/``sk_rcvbuf`` it sets (a
    size), or None -- absent, or "auto" -- for TCP's autotuning (client/net/tcp.py)."""
    if value is None or (isinstance(value, str) and value.strip().lower() == AUTOTUNED):
        return None
    return parse_size(value, what="socket buffer size (or 'auto')")


def _nbd_era(value: str) -> str:
    if value not in NBD_ERAS:
        raise ConfigError(f"swap.nbd {value!r}: choose one of {', '.join(NBD_ERAS)}")
    return value


@attrs.frozen
class SwapConfig:
    """The swap device: an NBD export, the connection's depth and its failure handling."""

    export: str = "swap"
    size: int = attrs.field(default=512 << 20, converter=_swap_size)  # for embedded servers
    #: SO_SNDBUF/SO_RCVBUF on the NBD socket, as the sk_sndbuf/sk_rcvbuf they set (the
    #: kernel stores twice what setsockopt is passed; these are the stored values) and lock:
    #: the kernel never changes them.  None ("auto"): TCP autotunes them, from tcp_wmem[1]/
    #: tcp_rmem[1] up to tcp_wmem[2]/tcp_rmem[2].
    sndbuf: int | None = attrs.field(default=None, converter=_opt_buf_size)
    rcvbuf: int | None = attrs.field(default=None, converter=_opt_buf_size)
    latency: float = 0.0  # seconds a packet takes to reach the client (replies and ACKs)
    depth: int = 32
    io_timeout: float = 30.0
    spare_pages: int | None = None  # remap space for fenced writes (default: 1/16)
    quarantine_seconds: float = 30.0
    # drivers/block/nbd.c's transmit context by kernel era (client/nbd_client.py
    # nbd_xmit_context): "2.6.18" the submitter's flags (request_fn), "3.5" nbd_thread
    # (PF_KTHREAD), "3.6" nbd_thread + PF_MEMALLOC in sock_xmit, "6.1" the submitter's
    # flags + memalloc_noreclaim_save in __sock_xmit.
    nbd: str = attrs.field(default="2.6.18", converter=_nbd_era)

    def __attrs_post_init__(self) -> None:
        if self.depth < 1:
            raise ConfigError(f"swap.depth {self.depth}: must be >= 1")
        if self.io_timeout <= 0:
            raise ConfigError("swap.io_timeout must be > 0")


def _of_ram(value: str | int, ram: int) -> int:
    """Bytes of a size that ``_total`` accepted: a byte count, or a multiple of RAM."""
    return int(float(value[:-1]) * ram) if isinstance(value, str) else value


def _total(value: str | int) -> str | int:
    if isinstance(value, str) and value.strip().lower().endswith("x"):
        try:
            if float(value.strip()[:-1]) <= 0:
                raise ValueError
        except ValueError:
            raise ConfigError(
                f"workload total {value!r}: expected a size or a multiple like '4x'"
            ) from None
        return value.strip().lower()
    return parse_size(value, what="workload total")


@attrs.frozen
class HogConfig:
    """Mel Gorman's anonymous-memory hog: ``processes`` map ``total`` (bytes, or a multiple
    of RAM like "4x") between them and touch it in ``rounds`` of a write pass then a
    read-and-verify pass, at ``rate`` pages/s per process (0: as fast as it can)."""

    kind: Literal["anon_hog"] = "anon_hog"
    name: str = "hog"
    processes: int = 4
    total: str | int = attrs.field(default="4x", converter=_total)
    rounds: int = 1
    start_after: float = 0.0
    rate: float = 0.0  # pages/s each process touches (0: as fast as it can)

    def __attrs_post_init__(self) -> None:
        if self.processes < 1 or self.rounds < 1:
            raise ConfigError(f"workload {self.name!r}: processes and rounds must be >= 1")
        if self.rate < 0:
            raise ConfigError(f"workload {self.name!r}: rate must not be negative")

    def total_bytes(self, ram: int) -> int:
        return _of_ram(self.total, ram)


@attrs.frozen
class FileReaderConfig:
    """Readers of files through the page cache: ``processes`` each stream through a file of
    ``size`` (bytes, or a multiple of RAM like "0.5x") ``passes`` times, at ``rate`` pages/s
    each (0: as fast as the disk allows). The pages they leave behind are clean."""

    kind: Literal["file_reader"] = "file_reader"
    name: str = "reader"
    processes: int = 1
    size: str | int = attrs.field(default="0.5x", converter=_total)
    passes: int = 1
    rate: float = 0.0
    start_after: float = 0.0

    def __attrs_post_init__(self) -> None:
        if self.processes < 1 or self.passes < 1:
            raise ConfigError(f"workload {self.name!r}: processes and passes must be >= 1")
        if self.rate < 0:
            raise ConfigError(f"workload {self.name!r}: rate must not be negative")

    def size_bytes(self, ram: int) -> int:
        return _of_ram(self.size, ram)


WorkloadConfig = HogConfig | FileReaderConfig
WORKLOAD_KINDS: dict[str, type[Any]] = {"anon_hog": HogConfig, "file_reader": FileReaderConfig}


def _rate(value: str | int) -> int:
    return parse_size(value, what="noise rate (bytes/s)")


@attrs.frozen
class NoiseConfig:
    """Other traffic competing for receive memory: a peer floods ``sockets`` connections at
    ``rate`` bytes/s each (0: as fast as the socket takes it), and a consumer process on the
    machine reads ``consume_rate`` bytes/s and allocates ``process_pages`` user pages per
    page it consumes (Christoph Lameter's fileserver beside the swapping machine)."""

    name: str = "fileserver"
    sockets: int = 2
    rate: int = attrs.field(default=0, converter=_rate)
    rcvbuf: int | None = attrs.field(default=None, converter=_opt_buf_size)  # as swap.rcvbuf
    consume_rate: int = attrs.field(default=1 << 20, converter=_rate)
    process_pages: int = 1
    start_after: float = 0.0

    def __attrs_post_init__(self) -> None:
        if self.sockets < 0 or self.process_pages < 0 or self.consume_rate <= 0:
            raise ConfigError(f"noise {self.name!r}: sockets, process_pages >= 0, consume_rate > 0")


#: How the ``reserve`` policy treats TX below min.  "posted" is Zijlstra's series:
#: ``sk_adjust_memalloc`` adds ``tx_reserve_pages`` to the reserve ("an upper-bound of memory
#: used for TX hence we need not account the pages like we do for RX pages").
#: "bean-counted" is a variant of ours, not his: each memalloc socket's TX is charged to a
#: node with a limit and the sender waits there.
TX_ACCOUNTING = ("posted", "bean-counted")


def _tx_accounting(value: str) -> str:
    if value not in TX_ACCOUNTING:
        raise ConfigError(
            f"reserve.tx_accounting {value!r}: choose one of {', '.join(TX_ACCOUNTING)}"
        )
    return value


@attrs.frozen
class ReserveConfig:
    """Zijlstra's reserve sizes, in pages (``policy = "reserve"``), and how TX is treated."""

    tx_pages: int = 32  # TX_RESERVE_PAGES per memalloc socket: "max packet size 64k, double it"
    rx_pages: int = 128  # the SKB data reserve (512K in his /proc/reserve_info example)
    block_pages: int = 16
    tx_accounting: str = attrs.field(default="posted", converter=_tx_accounting)

    def __attrs_post_init__(self) -> None:
        if min(self.tx_pages, self.rx_pages, self.block_pages) < 0:
            raise ConfigError("reserve sizes must not be negative")


@attrs.frozen
class RunConfig:
    seed: int = 0
    stall_seconds: float = 2.0
    time_limit: float = 600.0
    sample_interval: float = 0.1


#: The allocations a ``fail_page_alloc`` fault may fail (client/faults.py gives each its
#: meaning, after the kernel's ``ignore-gfp-wait`` and ``ignore-gfp-highmem``).
GFP_FILTER_NAMES = ("any", "atomic", "nowait", "wait", "highmem", "nohighmem")


@attrs.frozen
class AllocFaultConfig:
    """``fail_page_alloc`` as Documentation/fault-injection/fault-injection.rst describes it:
    after ``space`` bytes of allocations, every ``interval``-th matching allocation fails with
    ``probability`` (0..1; the kernel's percent / 100), at most ``times`` times (-1: no
    limit).  ``gfp`` picks the allocations it applies to (see ``GFP_FILTER_NAMES``), ``task``
    a substring of the allocating task's name (the kernel's per-task ``make-it-fail``)."""

    probability: float
    interval: int = 1
    times: int = -1
    space: int = 0
    gfp: str = "any"
    task: str | None = None

    def __attrs_post_init__(self) -> None:
        if not 0.0 <= self.probability <= 1.0:  # also refuses NaN
            raise ConfigError(f"alloc fault: probability {self.probability!r} is not in 0..1")
        if self.interval < 1:
            raise ConfigError(f"alloc fault: interval {self.interval} must be >= 1")
        if self.times < -1:
            raise ConfigError(f"alloc fault: times {self.times} must be >= 0, or -1 (no limit)")
        if self.space < 0:
            raise ConfigError(f"alloc fault: space {self.space} must be >= 0")
        if self.gfp not in GFP_FILTER_NAMES:
            raise ConfigError(
                f"alloc fault: gfp {self.gfp!r}: choose one of {', '.join(GFP_FILTER_NAMES)}"
            )
        if self.task is not None and not self.task:
            raise ConfigError("alloc fault: task must not be empty (leave it out for any task)")


@attrs.frozen
class ClientFaultsConfig:
    """Client faults set from the start of a run (the control endpoint can change them later):
    the swap connection's latency in milliseconds (overrides ``swap.latency``) and a
    ``fail_page_alloc`` filter.  Server faults live with the server."""

    latency_ms: float | None = None
    alloc: AllocFaultConfig | None = None

    def __attrs_post_init__(self) -> None:
        if self.latency_ms is not None and not 0.0 <= self.latency_ms < float("inf"):
            raise ConfigError(f"faults.latency_ms {self.latency_ms!r}: must be >= 0 and finite")


def _bandwidth(value: str | int | float) -> float:
    """Link bandwidth in bits a second: a number, or with a k/M/G suffix ("1G")."""
    text = str(value).strip()
    scale = {"k": 1e3, "m": 1e6, "g": 1e9}.get(text[-1:].lower(), 1.0)
    try:
        bits = float(text[:-1] if scale != 1.0 else text) * scale
    except ValueError:
        raise ConfigError(f"nic.bandwidth {value!r}: expected bits/s like '1G' or 1e9") from None
    if not 0 < bits < float("inf"):
        raise ConfigError(f"nic.bandwidth {value!r}: must be > 0")
    return bits


@attrs.frozen
class NicConfig:
    """The client's network device (client/net/device.py): its driver's refill style, its
    receive ring and its link."""

    driver: str = "netdev"  # "netdev" (netdev_alloc_skb, e1000-like) or "virtio"
    ring_size: int = 256  # receive descriptors (e1000 E1000_DEFAULT_RXD; qemu virtio-net)
    rx_buffer: int = 2048  # bytes a receive buffer takes (e1000 E1000_RXBUFFER_2048)
    bandwidth: float = attrs.field(default=1e9, converter=_bandwidth)  # bits/s each way
    softirq_cost: float = 1e-6  # seconds of the receive softirq per packet

    def __attrs_post_init__(self) -> None:
        if self.driver not in ("netdev", "virtio"):
            raise ConfigError(f"nic.driver {self.driver!r}: expected 'netdev' or 'virtio'")
        if self.ring_size < 1:
            raise ConfigError(f"nic.ring_size {self.ring_size}: must be >= 1")
        if not 64 <= self.rx_buffer <= 4096:
            raise ConfigError(f"nic.rx_buffer {self.rx_buffer}: must be 64 .. 4096 bytes")
        if not 0 <= self.softirq_cost < 1:
            raise ConfigError(f"nic.softirq_cost {self.softirq_cost}: must be >= 0 and < 1")


def _sysctl_triple(
    value: Any, name: str, unit: str, names: tuple[str, str, str], parse: Callable[[Any], int]
) -> tuple[int, int, int] | None:
    """``net.<name>``: three values in order, or None (the kernel's)."""
    if value is None:
        return None
    a, b, c = names
    if not isinstance(value, list | tuple) or len(value) != 3:
        raise ConfigError(f"net.{name} {value!r}: expected three {unit} [{a}, {b}, {c}]")
    triple = tuple(parse(v) for v in value)
    if not 0 < triple[0] <= triple[1] <= triple[2]:
        raise ConfigError(f"net.{name} {list(value)!r}: must be 0 < {a} <= {b} <= {c}")
    return (triple[0], triple[1], triple[2])


def _pages(value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ConfigError(f"net.tcp_mem: {value!r} is not a number of pages")
    return value


def _size_of(what: str) -> Callable[[Any], int]:
    return lambda value: parse_size(value, what=what)


def _tcp_mem(value: Any) -> tuple[int, int, int] | None:
    return _sysctl_triple(value, "tcp_mem", "page counts", ("low", "pressure", "high"), _pages)


def _tcp_wmem(value: Any) -> tuple[int, int, int] | None:
    return _sysctl_triple(
        value, "tcp_wmem", "sizes", ("min", "default", "max"), _size_of("net.tcp_wmem")
    )


def _tcp_rmem(value: Any) -> tuple[int, int, int] | None:
    return _sysctl_triple(
        value, "tcp_rmem", "sizes", ("min", "default", "max"), _size_of("net.tcp_rmem")
    )


@attrs.frozen
class NetConfig:
    """The client's TCP sysctls (client/net/tcp.py).  Each left out is what the kernel's
    ``tcp_init`` computes from the machine's memory: ``tcp_mem`` in pages (below the first,
    no pressure; above the second, pressure; above the third, allocations refused),
    ``tcp_wmem`` and ``tcp_rmem`` in bytes (a new socket's minimum guarantee, its starting
    buffer, and how far autotuning may grow it), as in /proc/sys/net/ipv4."""

    tcp_mem: tuple[int, int, int] | None = attrs.field(default=None, converter=_tcp_mem)
    tcp_wmem: tuple[int, int, int] | None = attrs.field(default=None, converter=_tcp_wmem)
    tcp_rmem: tuple[int, int, int] | None = attrs.field(default=None, converter=_tcp_rmem)


class Scenario(Protocol):
    """A scenario as the client machine reads it.  :class:`testbed.config.ScenarioConfig` is
    one; it also holds what the client never sees (the server, the kernel lab)."""

    @property
    def machine(self) -> MachineConfig: ...
    @property
    def swap(self) -> SwapConfig: ...
    @property
    def workloads(self) -> tuple[WorkloadConfig, ...]: ...
    @property
    def noise(self) -> tuple[NoiseConfig, ...]: ...
    @property
    def policy(self) -> str: ...
    @property
    def reserve(self) -> ReserveConfig: ...
    @property
    def throttle(self) -> bool: ...
    @property
    def run(self) -> RunConfig: ...
    @property
    def faults(self) -> ClientFaultsConfig: ...
    @property
    def nic(self) -> NicConfig: ...
    @property
    def net(self) -> NetConfig: ...
