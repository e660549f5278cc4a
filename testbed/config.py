"""Typed configuration, loaded from TOML and command-line strings, strictly.

The server's records live in :mod:`server.config` and the client machine's in
:mod:`client.config`, each beside its code; here are the scenario that joins them, the
kernel lab's table, and the loading: TOML, ``--set`` overrides, ``--export`` specs.
Every bad value raises :class:`~nbdproto.config.ConfigError` with one line that names the
key (or argument) and the value: the CLI prints it and exits 2.  Unknown keys are errors,
never ignored.
"""

from __future__ import annotations

import tomllib
from pathlib import Path
from typing import Any

import attrs
import cattrs
from cattrs.v import transform_error

from client.config import (
    WORKLOAD_KINDS,
    ClientFaultsConfig,
    HogConfig,
    MachineConfig,
    NetConfig,
    NicConfig,
    NoiseConfig,
    ReserveConfig,
    RunConfig,
    SwapConfig,
    WorkloadConfig,
)
from client.policy import POLICIES
from nbdproto.config import ConfigError, parse_size
from server.config import ExportConfig, ServerConfig


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


POLICY_NAMES = tuple(POLICIES)  # the client's designs, in their order


def _policy(value: str) -> str:
    if value not in POLICY_NAMES:
        raise ConfigError(f"policy {value!r}: choose one of {', '.join(POLICY_NAMES)}")
    return value


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
    nic: NicConfig = NicConfig()
    net: NetConfig = NetConfig()
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
        elif key not in node and keys[i + 1].isdigit():
            raise ConfigError(
                f"{what} {dotted}: the scenario has no {key!r} array to index "
                f"(add a [[{'.'.join(keys[: i + 1])}]] table first)"
            )
        else:
            node = node.setdefault(key, {})
