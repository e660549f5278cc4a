"""A sweep's definition: the scenario, the grid of config values, and the runs they make.

``--grid KEY=V1,V2,...`` takes any dotted config key that ``--set`` takes, and each value is
read as ``--set`` reads its VALUE (TOML when it parses, else a string: ``768K``).  Every
value is checked against the scenario before anything runs, and so is every cell (a
combination of one value per key: cross-field rules), so that a bad grid is one line and
exit 2, not a database of failed runs.

A run is a cell × a policy × a seed.  Its identity (``RunSpec.key``) is made of the values as
written, the policy and the seed: the same command finds the runs it already did.  The
definition (``SweepDefinition``) is what a resumed sweep must share with the one in the
database: the scenario file's content, the ``--set`` overrides and the grid.  Policies and
seeds are not part of it: a sweep may be resumed with more of them.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import os
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import attrs

from nbdproto.config import ConfigError
from testbed.config import POLICY_NAMES, ScenarioConfig, load_scenario, parse_override_value

#: Keys a grid may not sweep, and the option that does it instead.
RESERVED_KEYS = {"policy": "--policies", "run.seed": "--seeds"}

#: Most runs one sweep may define (a typo like ``--seeds 0-99999`` fails here, not later).
MAX_RUNS = 1_000_000


@attrs.frozen
class Axis:
    """One ``--grid KEY=V1,V2,...``: the values as written and as TOML reads them."""

    key: str
    raws: tuple[str, ...]
    values: tuple[Any, ...]

    @property
    def sql_type(self) -> str:
        """The column type of this key in the database: numbers stay numbers when every
        value is one, anything else (sizes like ``768K``, arrays) is the text written."""
        if all(isinstance(v, bool) for v in self.values):
            return "BOOLEAN"
        if all(isinstance(v, int) and not isinstance(v, bool) for v in self.values):
            return "BIGINT"
        if all(isinstance(v, int | float) and not isinstance(v, bool) for v in self.values):
            return "DOUBLE"
        return "VARCHAR"

    @property
    def stored(self) -> tuple[Any, ...]:
        """The values as the database holds them (see :attr:`sql_type`)."""
        if self.sql_type == "VARCHAR":
            return tuple(
                v if isinstance(v, str) else raw
                for v, raw in zip(self.values, self.raws, strict=True)
            )
        if self.sql_type == "DOUBLE":
            return tuple(float(v) for v in self.values)
        return self.values

    def to_json(self) -> dict[str, Any]:
        return {"key": self.key, "values": list(self.raws), "type": self.sql_type}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Axis:
        raws = tuple(str(r) for r in data["values"])
        return cls(str(data["key"]), raws, tuple(parse_override_value(r) for r in raws))


def split_values(text: str) -> list[str]:
    """``a,b,[1,2],"x,y"`` → ``['a', 'b', '[1,2]', '"x,y"']``: commas inside brackets,
    braces or quotes belong to the value (a TOML array is one value)."""
    parts: list[str] = []
    depth = 0
    quote = ""
    current: list[str] = []
    for ch in text:
        if quote:
            if ch == quote:
                quote = ""
        elif ch in "\"'":
            quote = ch
        elif ch in "[{":
            depth += 1
        elif ch in "]}":
            depth -= 1
        elif ch == "," and depth == 0:
            parts.append("".join(current).strip())
            current = []
            continue
        current.append(ch)
    parts.append("".join(current).strip())
    return parts


def parse_grid(items: Sequence[str]) -> tuple[Axis, ...]:
    """The ``--grid`` options → axes, in the order given; one-line errors."""
    axes: list[Axis] = []
    for item in items:
        key, sep, rest = item.partition("=")
        key = key.strip()
        if not sep or not key or not rest.strip():
            raise ConfigError(f"--grid {item!r}: expected KEY=V1,V2,...")
        if key in RESERVED_KEYS:
            raise ConfigError(f"--grid {key}: sweep it with {RESERVED_KEYS[key]}, not --grid")
        if any(a.key == key for a in axes):
            raise ConfigError(f"--grid {key}: given twice; list every value in one --grid")
        raws = split_values(rest)
        if any(not r for r in raws):
            raise ConfigError(f"--grid {key}={rest}: an empty value")
        dup = sorted({r for r in raws if raws.count(r) > 1})
        if dup:
            raise ConfigError(f"--grid {key}: value(s) {', '.join(dup)} given twice")
        axes.append(Axis(key, tuple(raws), tuple(parse_override_value(r) for r in raws)))
    if not axes:
        raise ConfigError("netswap sweep: give at least one --grid KEY=V1,V2,...")
    return tuple(axes)


def parse_policies(text: str | None) -> tuple[str, ...]:
    if text is None:
        return POLICY_NAMES
    policies = [p.strip() for p in text.split(",") if p.strip()]
    unknown = [p for p in policies if p not in POLICY_NAMES]
    if unknown or not policies:
        raise ConfigError(
            f"--policies: unknown {unknown or 'empty'}; choose from {', '.join(POLICY_NAMES)}"
        )
    return tuple(dict.fromkeys(policies))


@attrs.frozen
class SweepFile:
    """A sweep written down (``configs/sweeps/*.toml``): a ``[sweep]`` table naming the
    scenario (relative to the file), the grid, and optionally policies, seeds and
    overrides; the command line's options add to it (``--grid``, ``--set``) or replace it
    (``--policies``, ``--seeds``)."""

    scenario: str
    grid: tuple[Axis, ...]
    policies: str | None = None  # as --policies takes them
    seeds: str | None = None  # as --seeds takes them
    overrides: tuple[tuple[str, Any], ...] = ()


_SWEEP_KEYS = {"scenario", "grid", "policies", "seeds", "set", "description"}


def load_sweep_file(path: str | Path, data: dict[str, Any]) -> SweepFile:
    """The ``[sweep]`` table of ``data`` (the TOML of ``path``), checked."""
    where = f"{path}: [sweep]"
    table = data["sweep"]
    if not isinstance(table, dict) or set(data) != {"sweep"}:
        raise ConfigError(f"{path}: a sweep file has one [sweep] table and nothing else")
    unknown = sorted(set(table) - _SWEEP_KEYS)
    if unknown:
        raise ConfigError(f"{where}: unknown key(s) {unknown} (known: {sorted(_SWEEP_KEYS)})")
    scenario = table.get("scenario")
    if not isinstance(scenario, str) or not scenario:
        raise ConfigError(f"{where}: scenario = 'FILE' is missing (relative to this file)")
    grid_table = table.get("grid")
    if not isinstance(grid_table, dict) or not grid_table:
        raise ConfigError(f"{where}: a [sweep.grid] table of KEY = [V1, V2, ...] is missing")
    axes = []
    for key, values in grid_table.items():
        if not isinstance(values, list) or not values:
            raise ConfigError(f"{where}.grid: {key} = {values!r}: expected a list of values")
        raws = [_raw(v) for v in values]
        (axis,) = parse_grid([f"{key}={','.join(raws)}"])
        axes.append(attrs.evolve(axis, values=tuple(values)))
    policies = table.get("policies")
    if isinstance(policies, list):
        policies = ",".join(str(p) for p in policies)
    seeds = table.get("seeds")
    if isinstance(seeds, int) and not isinstance(seeds, bool):
        seeds = str(seeds)
    if isinstance(seeds, list):
        seeds = ",".join(str(s) for s in seeds)
    overrides = table.get("set", {})
    if not isinstance(overrides, dict):
        raise ConfigError(f"{where}.set: expected a table of KEY = VALUE")
    for name, value in (("policies", policies), ("seeds", seeds)):
        if value is not None and not isinstance(value, str):
            raise ConfigError(f"{where}: {name} = {value!r}: expected a list or a string")
    return SweepFile(
        scenario=os.path.normpath(Path(path).parent / scenario),
        grid=tuple(axes),
        policies=str(policies) if policies is not None else None,
        seeds=str(seeds) if seeds is not None else None,
        overrides=tuple(overrides.items()),
    )


def _raw(value: Any) -> str:
    """A value of a sweep file as ``--grid`` would have it written (and reads it back)."""
    if isinstance(value, str):
        plain = parse_override_value(value) == value and not set(value) & set(",[]{}\"'")
        return value if plain else json.dumps(value)
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    return json.dumps(value)


@attrs.frozen
class SweepDefinition:
    """What a resumed sweep must share with the sweep already in its database."""

    scenario: str  # the path given (for people; the hash is what is compared)
    scenario_sha256: str
    overrides: tuple[tuple[str, Any], ...]  # --set, as parsed
    grid: tuple[Axis, ...]

    def identity(self) -> dict[str, Any]:
        """As JSON reads it back (what the database stores and a resume compares)."""
        identity = {
            "scenario_sha256": self.scenario_sha256,
            "overrides": [[k, v] for k, v in self.overrides],
            "grid": [a.to_json() for a in self.grid],
        }
        loaded: dict[str, Any] = json.loads(json.dumps(identity, default=str))
        return loaded

    def describe_grid(self) -> str:
        return " ".join(f"{a.key}={','.join(a.raws)}" for a in self.grid)

    def mismatch(self, stored: dict[str, Any]) -> str | None:
        """Why a sweep stored as ``stored`` (an :meth:`identity`, plus ``scenario``) is
        not this one, or None if it is."""
        if stored["scenario_sha256"] != self.scenario_sha256:
            return (
                f"it swept {stored.get('scenario', '?')} as it was then (sha256 "
                f"{stored['scenario_sha256'][:12]}), not {self.scenario} as it is now "
                f"(sha256 {self.scenario_sha256[:12]})"
            )
        if stored["grid"] != self.identity()["grid"]:
            theirs = " ".join(
                f"{a['key']}={','.join(a['values'])}" for a in stored["grid"]
            )  # fmt: skip
            return f"its grid is {theirs}, not {self.describe_grid()}"
        if stored["overrides"] != self.identity()["overrides"]:
            theirs = " ".join(
                f"--set {k}={json.dumps(v, default=str)}" for k, v in stored["overrides"]
            )
            return f"its overrides are {theirs or 'none'}, not {self.describe_overrides()}"
        return None

    def describe_overrides(self) -> str:
        return (
            " ".join(f"--set {k}={json.dumps(v, default=str)}" for k, v in self.overrides) or "none"
        )


@attrs.frozen
class RunSpec:
    """One run of a sweep: a cell of the grid (one value per key), a policy and a seed."""

    cell: tuple[tuple[Axis, int], ...]  # each axis with the index of its value
    policy: str
    seed: int

    @property
    def key(self) -> str:
        """The run's identity in the database: the values as written, policy, seed."""
        cell = {axis.key: axis.raws[i] for axis, i in self.cell}
        return json.dumps(
            {"cell": cell, "policy": self.policy, "seed": self.seed},
            sort_keys=True,
            separators=(",", ":"),
        )

    @property
    def columns(self) -> dict[str, Any]:
        """The grid columns of its row: each key's value as the database holds it."""
        return {axis.key: axis.stored[i] for axis, i in self.cell}

    def label(self) -> str:
        cell = " ".join(f"{axis.key}={axis.raws[i]}" for axis, i in self.cell)
        return f"{cell} {self.policy} seed {self.seed}"

    def log_name(self) -> str:
        """A file name for its log, readable and unique within the sweep."""
        cell = "_".join(f"{axis.key}={axis.raws[i]}" for axis, i in self.cell)
        name = re.sub(r"[^A-Za-z0-9._=+-]", "_", f"{self.policy}-seed{self.seed}-{cell}")
        if len(name) > 150 or name != f"{self.policy}-seed{self.seed}-{cell}":
            digest = hashlib.sha256(self.key.encode()).hexdigest()[:10]
            name = f"{name[:140]}-{digest}"
        return f"{name}.jsonl.gz"


@attrs.frozen
class SweepPlan:
    """A checked sweep: its definition and every run, with its scenario."""

    definition: SweepDefinition
    policies: tuple[str, ...]
    seeds: tuple[int, ...]
    runs: tuple[tuple[RunSpec, ScenarioConfig], ...]


def plan_sweep(
    scenario_path: str,
    overrides: dict[str, Any],
    grid: tuple[Axis, ...],
    policies: tuple[str, ...],
    seeds: Sequence[int] | None,
) -> SweepPlan:
    """Check every value and every cell against the scenario and list the runs; raise
    :class:`ConfigError` (one line naming the key or the cell) on the first bad one.
    ``seeds`` None: the scenario's own ``run.seed``."""
    base = load_scenario(scenario_path, overrides)
    text = Path(scenario_path).read_bytes()
    for key in overrides:
        if any(a.key == key for a in grid):
            raise ConfigError(f"--grid {key}: also given with --set; give it in one place")
    for axis in grid:
        for raw, value in zip(axis.raws, axis.values, strict=True):
            try:
                load_scenario(scenario_path, {**overrides, axis.key: value}, what="--grid")
            except ConfigError as exc:
                raise ConfigError(f"--grid {axis.key}={raw}: {_without_prefix(exc)}") from None
    seeds = tuple(seeds) if seeds is not None else (base.run.seed,)
    cells = list(itertools.product(*(range(len(a.values)) for a in grid)))
    total = len(cells) * len(policies) * len(seeds)
    if total > MAX_RUNS:
        raise ConfigError(f"netswap sweep: {total} runs; at most {MAX_RUNS} in one sweep")
    runs: list[tuple[RunSpec, ScenarioConfig]] = []
    for indexes in cells:
        cell = tuple(zip(grid, indexes, strict=True))
        values = {axis.key: axis.values[i] for axis, i in cell}
        try:
            scenario = load_scenario(scenario_path, {**overrides, **values}, what="--grid")
        except ConfigError as exc:
            where = " ".join(f"{a.key}={a.raws[i]}" for a, i in cell)
            raise ConfigError(f"--grid: the cell {where}: {_without_prefix(exc)}") from None
        for policy in policies:
            for seed in seeds:
                seeded = attrs.evolve(scenario, run=attrs.evolve(scenario.run, seed=seed))
                runs.append((RunSpec(cell, policy, seed), seeded))
    definition = SweepDefinition(
        scenario=scenario_path,
        scenario_sha256=hashlib.sha256(text).hexdigest(),
        overrides=tuple(overrides.items()),
        grid=grid,
    )
    return SweepPlan(definition, policies, seeds, tuple(runs))


def _without_prefix(exc: ConfigError) -> str:
    """A config error without the ``--grid KEY`` it already starts with."""
    text = str(exc)
    return text.split(": ", 1)[1] if text.startswith("--grid ") and ": " in text else text
