"""Typed configuration, loaded from TOML and command-line strings, strictly.

Every bad value raises :class:`ConfigError` with one line that names the key (or argument)
and the value: the CLI prints it and exits 2.  Unknown keys are errors, never ignored.
"""

from __future__ import annotations

import ipaddress
import re
import tomllib
from pathlib import Path
from typing import Any, Literal

import attrs
import cattrs
from cattrs.v import transform_error

from nbdproto.constants import Cmd, Errno

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 10809
_SIZE_RE = re.compile(r"^\s*(\d+)\s*([KMGT]?)(i?B)?\s*$", re.IGNORECASE)
_UNITS = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}


class ConfigError(ValueError):
    """A configuration or argument error; ``str()`` is a one-line message for the user."""


def parse_size(value: str | int, *, what: str = "size") -> int:
    """``"64M"`` → 67108864.  K/M/G/T are powers of 1024; a bare number is bytes."""
    if isinstance(value, bool) or not isinstance(value, str | int):
        raise ConfigError(f"{what}: expected a size, got {value!r}")
    if isinstance(value, int):
        if value < 0:
            raise ConfigError(f"{what}: {value} is negative")
        return value
    m = _SIZE_RE.match(value)
    if not m:
        raise ConfigError(f"{what}: {value!r} is not a size (examples: 4096, 64K, 256M, 1G)")
    return int(m.group(1)) * _UNITS[m.group(2).upper()]


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def parse_hostport(
    value: str, *, what: str = "--listen", default_port: int = DEFAULT_PORT
) -> tuple[str, int]:
    """``HOST:PORT``, ``[V6]:PORT``, ``HOST`` or ``:PORT``."""
    m = re.fullmatch(r"\[([^\]]+)\](?::(\d*))?|([^:\[\]]*)(?::(\d*))?", value.strip())
    if not m:
        raise ConfigError(f"{what}: {value!r} is not HOST:PORT")
    host = m.group(1) or m.group(3) or DEFAULT_HOST
    port_s = m.group(2) if m.group(1) else m.group(4)
    port = default_port if port_s in (None, "") else int(port_s)
    if not 0 <= port <= 65535:
        raise ConfigError(f"{what}: port {port} is out of range 0..65535")
    return host, port


def _export_size(value: str | int) -> int:
    return parse_size(value, what="export size")


def _max_payload(value: str | int) -> int:
    return parse_size(value, what="max_payload")


#: Commands a fault may fail, by the names ``[exports.faults.errors]`` uses (proto.md's
#: ``NBD_CMD_*`` in lower case); DISC has no reply to fail.
FAULT_COMMANDS: dict[str, Cmd] = {
    name.lower(): cmd for name, cmd in Cmd.__members__.items() if cmd is not Cmd.DISC
}
#: Errors a fault may answer with: the spec's wire values (proto.md "Error values").
FAULT_ERRNOS: dict[str, Errno] = {
    name: err for name, err in Errno.__members__.items() if err is not Errno.OK
}


@attrs.frozen
class FaultErrorConfig:
    """One command's injected error: each request of that command fails with probability
    ``rate``, answered with ``errno`` (a name: ``EIO``, ``ENOSPC``, ``EPERM``, ...)."""

    command: str
    rate: float
    errno: str = "EIO"

    def __attrs_post_init__(self) -> None:
        if self.command not in FAULT_COMMANDS:
            raise ConfigError(
                f"faults.errors: unknown command {self.command!r} "
                f"(choose from {', '.join(FAULT_COMMANDS)})"
            )
        if isinstance(self.rate, bool) or not isinstance(self.rate, int | float):
            raise ConfigError(f"faults.errors.{self.command}.rate: {self.rate!r} is not a number")
        if not 0.0 <= self.rate <= 1.0:
            raise ConfigError(f"faults.errors.{self.command}.rate {self.rate}: must be in [0, 1]")
        if self.errno not in FAULT_ERRNOS:
            raise ConfigError(
                f"faults.errors.{self.command}.errno {self.errno!r}: "
                f"choose from {', '.join(FAULT_ERRNOS)}"
            )


def _fault_errors(value: Any) -> tuple[FaultErrorConfig, ...]:
    """``{write = {rate = 0.01, errno = "EIO"}}`` (TOML) → records sorted by command.

    Also takes records, or a mapping of command to a record or a ``(rate, errno)`` pair."""
    if isinstance(value, tuple | list) and all(isinstance(v, FaultErrorConfig) for v in value):
        return tuple(sorted(value, key=lambda e: e.command))
    if not isinstance(value, dict):
        raise ConfigError(f"faults.errors: expected a table of commands, got {value!r}")
    out = []
    for command, spec in value.items():
        if isinstance(spec, FaultErrorConfig):
            spec = {"rate": spec.rate, "errno": spec.errno}
        elif isinstance(spec, tuple | list) and len(spec) == 2:
            spec = {"rate": spec[0], "errno": spec[1]}
        if not isinstance(spec, dict):
            raise ConfigError(f"faults.errors.{command}: expected {{rate = R, errno = NAME}}")
        unknown = set(spec) - {"rate", "errno"}
        if unknown:
            raise ConfigError(f"faults.errors.{command}: unknown key(s) {sorted(unknown)}")
        if "rate" not in spec:
            raise ConfigError(f"faults.errors.{command}: missing rate")
        out.append(FaultErrorConfig(str(command), spec["rate"], spec.get("errno", "EIO")))
    return tuple(sorted(out, key=lambda e: e.command))


@attrs.frozen
class FaultConfig:
    """Faults injected into one export (``[server.exports.faults]``): ``delay`` seconds
    before each request is served, and per-command error rates drawn from a generator
    seeded with ``seed`` (the same seed and requests give the same failures).  Stalls,
    drops and restarts are runtime actions (``server.faults``), not configuration."""

    delay: float = 0.0
    seed: int = 0
    errors: tuple[FaultErrorConfig, ...] = attrs.field(default=(), converter=_fault_errors)

    def __attrs_post_init__(self) -> None:
        if isinstance(self.delay, bool) or not isinstance(self.delay, int | float):
            raise ConfigError(f"faults.delay: {self.delay!r} is not a number of seconds")
        if not 0.0 <= self.delay < float("inf"):
            raise ConfigError(f"faults.delay {self.delay}: must be >= 0 and finite")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int):
            raise ConfigError(f"faults.seed: {self.seed!r} is not an integer")


@attrs.frozen
class ExportConfig:
    name: str
    size: int = attrs.field(converter=_export_size)
    backend: Literal["memory", "file"] = "memory"
    path: str | None = None
    read_only: bool = False
    description: str = ""
    faults: FaultConfig = FaultConfig()

    def __attrs_post_init__(self) -> None:
        if len(self.name.encode()) > 4096:
            raise ConfigError(f"export name {self.name[:40]!r}...: longer than 4096 bytes")
        if self.size <= 0:
            raise ConfigError(f"export {self.name!r}: size must be positive")
        if self.backend == "file" and not self.path:
            raise ConfigError(f"export {self.name!r}: backend 'file' needs a path")
        if self.backend == "memory" and self.path:
            raise ConfigError(f"export {self.name!r}: a path needs backend 'file'")


@attrs.frozen
class ServerConfig:
    listen: str = f"{DEFAULT_HOST}:{DEFAULT_PORT}"
    allow_remote: bool = False
    exports: tuple[ExportConfig, ...] = ()
    max_payload: int = attrs.field(default=32 << 20, converter=_max_payload)
    handshake_timeout: float = 10.0
    max_connections: int = 256
    shutdown_grace: float = 2.0
    stats_interval: float = 0.0

    def __attrs_post_init__(self) -> None:
        host, _ = self.address
        if not self.allow_remote and not is_loopback(host):
            raise ConfigError(
                f"listen address {host!r} is not loopback; pass --allow-remote to bind it"
            )
        if not 4096 <= self.max_payload <= 1 << 30:
            raise ConfigError(f"max_payload {self.max_payload}: must be 4K..1G")
        if self.handshake_timeout <= 0 or self.shutdown_grace < 0:
            raise ConfigError("handshake_timeout must be > 0 and shutdown_grace >= 0")
        if self.max_connections < 1:
            raise ConfigError(f"max_connections {self.max_connections}: must be at least 1")
        names = [e.name for e in self.exports]
        dup = {n for n in names if names.count(n) > 1}
        if dup:
            raise ConfigError(f"export names must be unique: {sorted(dup)}")

    @property
    def address(self) -> tuple[str, int]:
        return parse_hostport(self.listen, what="listen")


def parse_export_spec(spec: str) -> ExportConfig:
    """``NAME:SIZE[:file=PATH][:ro][:desc=TEXT]`` as given to ``--export``."""
    parts = spec.split(":")
    if len(parts) < 2 or not parts[1]:
        raise ConfigError(f"--export {spec!r}: expected NAME:SIZE[:file=PATH][:ro]")
    name, size_s, *opts = parts
    kwargs: dict[str, Any] = {
        "name": name,
        "size": parse_size(size_s, what=f"--export {spec!r} size"),
    }
    for opt in opts:
        key, _, val = opt.partition("=")
        if key == "file" and val:
            kwargs.update(backend="file", path=val)
        elif key == "ro" and not val:
            kwargs["read_only"] = True
        elif key == "desc":
            kwargs["description"] = val
        else:
            raise ConfigError(
                f"--export {spec!r}: unknown option {opt!r} (file=PATH, ro, desc=TEXT)"
            )
    export: ExportConfig = _build(ExportConfig, kwargs, where=f"--export {spec!r}")
    return export


_converter = cattrs.Converter(forbid_extra_keys=True, prefer_attrib_converters=True)


def _build(cls: type[Any], data: Any, *, where: str) -> Any:
    try:
        return _converter.structure(data, cls)
    except ConfigError:
        raise
    except cattrs.ClassValidationError as exc:
        # Surface our own one-line messages from converters and validators first.
        for sub in _leaves(exc):
            if isinstance(sub, ConfigError):
                raise ConfigError(f"{where}: {sub}") from None
        msgs = transform_error(exc, path=where)
        raise ConfigError(msgs[0] if len(msgs) == 1 else "; ".join(msgs)) from None
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"{where}: {exc}") from None


def _leaves(exc: BaseException) -> list[BaseException]:
    if isinstance(exc, BaseExceptionGroup):
        out: list[BaseException] = []
        for sub in exc.exceptions:
            out.extend(_leaves(sub))
        return out
    return [exc]


def load_toml(path: str | Path) -> dict[str, Any]:
    p = Path(path)
    try:
        with p.open("rb") as fh:
            return tomllib.load(fh)
    except FileNotFoundError:
        raise ConfigError(f"config file {str(p)!r} does not exist") from None
    except IsADirectoryError:
        raise ConfigError(f"config file {str(p)!r} is a directory") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"config file {str(p)!r}: invalid TOML: {exc}") from None


def load_server_config(path: str | Path | None, **overrides: Any) -> ServerConfig:
    """The ``[server]`` table of a TOML file (if any), with command-line ``overrides``."""
    data: dict[str, Any] = {}
    if path is not None:
        raw = load_toml(path)
        unknown = set(raw) - {"server"}
        if unknown:
            raise ConfigError(
                f"{path}: unknown top-level key(s) {sorted(unknown)}; expected [server]"
            )
        data = dict(raw.get("server", {}))
        if not isinstance(data, dict):
            raise ConfigError(f"{path}: [server] must be a table")
    exports = overrides.pop("exports", None)
    for key, value in overrides.items():
        if value is not None:
            data[key] = value
    where = str(path) if path is not None else "arguments"
    config: ServerConfig = _build(ServerConfig, data, where=where)
    if exports:
        config = attrs.evolve(config, exports=tuple(config.exports) + tuple(exports))
    return config


# -- scenarios: what a client machine run does --------------------------------------------
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
    bio_cache: str = "page"  # a page per bio, or "kernel": 6.1's bio-200 slab objects
    swappiness: int = 60  # vm.swappiness
    disk_read_latency: float = 0.0001  # seconds per readahead window from the local disk
    readahead_pages: int = 32
    page_cluster: int = 3  # vm.page-cluster: swap readahead reads up to 2^page_cluster pages
    swap_readahead: str = "cluster"  # by swap slot ("cluster") or by address ("vma", 4.14+)

    def __attrs_post_init__(self) -> None:
        if not 0 <= self.swappiness <= 200:
            raise ConfigError(f"machine.swappiness {self.swappiness}: must be 0..200")
        if self.disk_read_latency < 0 or self.readahead_pages < 1:
            raise ConfigError("machine.disk_read_latency must be >= 0, readahead_pages >= 1")
        if self.memory < 1 << 20:
            raise ConfigError(f"machine.memory {self.memory}: at least 1M")
        if not 0 <= self.page_cluster <= 10:
            raise ConfigError(
                f"machine.page_cluster {self.page_cluster}: must be 0..10 (0: no swap readahead)"
            )
        if self.bio_cache not in ("page", "kernel"):
            raise ConfigError(
                f"machine.bio_cache {self.bio_cache!r}: must be 'page' (a page per bio) or "
                "'kernel' (objects of the bio-200 slab)"
            )
        if self.swap_readahead not in ("cluster", "vma"):
            raise ConfigError(
                f"machine.swap_readahead {self.swap_readahead!r}: must be 'cluster' (by swap "
                "slot) or 'vma' (by address)"
            )
        if not 1 <= self.max_io_pages <= 256:
            raise ConfigError(f"machine.max_io_pages {self.max_io_pages}: must be 1..256")
        if self.swap_queue_depth < 1 or self.bio_pool_size < 1:
            raise ConfigError("machine.swap_queue_depth and bio_pool_size must be >= 1")
        if self.min_free_kbytes is not None and self.min_free_kbytes < 0:
            raise ConfigError("machine.min_free_kbytes must not be negative")


def _buf_size(value: str | int) -> int:
    return parse_size(value, what="socket buffer size")


#: ``[swap] nbd``: the same names as client/nbd_client.py NBD_ERAS (testbed may not import
#: the client at config time; a test checks that they agree).
NBD_ERAS = ("2.6.18", "3.5", "3.6", "6.1")


def _nbd_era(value: str) -> str:
    if value not in NBD_ERAS:
        raise ConfigError(f"swap.nbd {value!r}: choose one of {', '.join(NBD_ERAS)}")
    return value


@attrs.frozen
class SwapConfig:
    """The swap device: an NBD export, the connection's depth and its failure handling."""

    export: str = "swap"
    size: int = attrs.field(default=512 << 20, converter=_swap_size)  # for embedded servers
    sndbuf: int = attrs.field(default=256 << 10, converter=_buf_size)  # sk_sndbuf
    rcvbuf: int = attrs.field(default=1 << 20, converter=_buf_size)  # sk_rcvbuf
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


def _structure_workload(data: Any, _type: Any) -> Any:
    """A ``[[workloads]]`` table, by its ``kind`` (default ``anon_hog``)."""
    if not isinstance(data, dict):
        raise ConfigError(f"a workload must be a table, got {data!r}")
    kind = data.get("kind", "anon_hog")
    cls = WORKLOAD_KINDS.get(kind) if isinstance(kind, str) else None
    if cls is None:
        raise ConfigError(f"workload kind {kind!r}: choose from {', '.join(WORKLOAD_KINDS)}")
    return _converter.structure(data, cls)


_converter.register_structure_hook(WorkloadConfig, _structure_workload)


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
    rcvbuf: int = attrs.field(default=256 << 10, converter=_buf_size)
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


POLICY_NAMES = ("none", "recursive", "reserve", "pfmemalloc")


def _policy(value: str) -> str:
    if value not in POLICY_NAMES:
        raise ConfigError(f"policy {value!r}: choose one of {', '.join(POLICY_NAMES)}")
    return value


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


KERNEL_NICS = ("virtio", "e1000")
KERNEL_FLAVOURS = ("auto", "cloud", "generic")
KERNEL_ACCELS = ("auto", "kvm", "tcg")
KERNEL_SERVERS = ("host", "guest", "guest-swap")


@attrs.frozen
class KernelConfig:
    """How ``netswap kernel run`` runs the scenario on a real Linux guest in qemu
    (docs/kernel.md).  ``nic``: the guest's NIC model (virtio-net, or e1000, whose driver
    allocates receive buffers through ``netdev_alloc_skb``); ``flavour``: Debian's kernel
    (``cloud`` has no e1000 module; ``auto`` takes cloud for virtio, generic for e1000).
    The guest runs on emulated CPUs, so its stall and time limits are its own, in seconds of
    the host's clock."""

    nic: str = "virtio"
    flavour: str = "auto"
    accel: str = "auto"
    cpus: int = 1
    stall_seconds: float = 60.0  # no progress this long: sysrq w and m, then deadlock
    boot_timeout: float = 120.0  # from qemu's start to the workloads' start
    time_limit: float = 1800.0
    sample_interval: float = 1.0
    #: Where the NBD server runs: on the host's loopback, or inside the guest itself
    #: (Debian's ``nbdkit memory``, serving the guest's own loopback; ``guest-swap`` adds
    #: nbdkit's ``--swap``, which mlocks it), so that the kernel reclaims the memory of the
    #: server it swaps to.
    server: str = "host"

    def __attrs_post_init__(self) -> None:
        if self.server not in KERNEL_SERVERS:
            raise ConfigError(
                f"kernel.server {self.server!r}: choose from {', '.join(KERNEL_SERVERS)}"
            )
        if self.nic not in KERNEL_NICS:
            raise ConfigError(f"kernel.nic {self.nic!r}: choose from {', '.join(KERNEL_NICS)}")
        if self.flavour not in KERNEL_FLAVOURS:
            raise ConfigError(
                f"kernel.flavour {self.flavour!r}: choose from {', '.join(KERNEL_FLAVOURS)}"
            )
        if self.accel not in KERNEL_ACCELS:
            raise ConfigError(
                f"kernel.accel {self.accel!r}: choose from {', '.join(KERNEL_ACCELS)}"
            )
        if not 1 <= self.cpus <= 16:
            raise ConfigError(f"kernel.cpus {self.cpus}: must be 1..16")
        for name in ("stall_seconds", "boot_timeout", "time_limit", "sample_interval"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int | float) or not value > 0:
                raise ConfigError(f"kernel.{name} {value!r}: must be a number > 0")

    @property
    def kernel_flavour(self) -> str:
        if self.flavour != "auto":
            return self.flavour
        return "generic" if self.nic == "e1000" else "cloud"


@attrs.frozen
class ScenarioConfig:
    """One run: the machine, its swap, its workloads, and (for ``netswap run``) a server."""

    description: str = ""
    machine: MachineConfig = MachineConfig()
    swap: SwapConfig = SwapConfig()
    workloads: tuple[WorkloadConfig, ...] = (HogConfig(),)
    noise: tuple[NoiseConfig, ...] = ()
    policy: str = attrs.field(default="none", converter=_policy)
    reserve: ReserveConfig = ReserveConfig()
    throttle: bool = True  # pfmemalloc: throttle direct reclaimers at half the min watermarks
    run: RunConfig = RunConfig()
    server: ServerConfig | None = None
    faults: ClientFaultsConfig = ClientFaultsConfig()
    kernel: KernelConfig = KernelConfig()


def parse_override_value(raw: str) -> Any:
    """The VALUE of ``--set KEY=VALUE`` (and of each value of ``--grid KEY=V1,V2``): read as
    TOML when it parses (numbers, booleans, arrays, quoted strings), else taken as a string
    (``768K``)."""
    try:
        return tomllib.loads(f"v = {raw}")["v"]
    except tomllib.TOMLDecodeError:
        return raw


def load_scenario(
    path: str | Path | None, overrides: dict[str, Any] | None = None, *, what: str = "--set"
) -> ScenarioConfig:
    """A scenario from TOML (strict: unknown keys are errors), with dotted-path overrides;
    ``what`` names the overrides' option in the error of a key that cannot be set."""
    data: dict[str, Any] = load_toml(path) if path is not None else {}
    for dotted, value in (overrides or {}).items():
        _set_dotted(data, dotted, value, what=what)
    where = str(path) if path is not None else "scenario"
    scenario: ScenarioConfig = _build(ScenarioConfig, data, where=where)
    return scenario


def _set_dotted(data: dict[str, Any], dotted: str, value: Any, *, what: str = "--set") -> None:
    """Set ``a.b.c`` in nested tables; a numeric part indexes an array of tables
    (``workloads.0.processes``)."""
    keys = dotted.split(".")
    node: Any = data
    for i, key in enumerate(keys):
        last = i == len(keys) - 1
        if isinstance(node, list):
            if not key.isdigit() or int(key) >= len(node):
                raise ConfigError(f"{what} {dotted}: {key!r} is not an index of that array")
            if last:
                node[int(key)] = value
            else:
                node = node[int(key)]
            continue
        if not isinstance(node, dict):
            raise ConfigError(f"{what} {dotted}: {'.'.join(keys[:i])!r} is not a table")
        if last:
            node[key] = value
        else:
            node = node.setdefault(key, {})
