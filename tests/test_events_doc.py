"""docs/events.md documents every log event the code can emit, and nothing else.

There is one way to emit an event: a *fact*, a frozen attrs class with an ``event`` class
attribute (its name), a ``level`` class attribute (``info`` unless it says ``debug``,
``warning`` or ``error``), its attrs fields as the event's fields and a docstring saying
when it happens.  The model and the rest of the client hand facts to an observer
(``client.mm.facts.Fact`` and its subclasses; ``testbed.log.fact_observer`` logs them), the
server logs its own through ``server.events.emit`` and the testbed its own through
``testbed.log.emit``.  A field whose metadata says ``flatten`` is a dict of extra fields,
merged into the event (its keys are not the class's to declare).

The facts are collected by importing every module of client/, server/ and testbed/ and
taking the classes defined there whose ``event`` is a string.  Each event needs a
``### `name``` heading in docs/events.md, whose entry names its levels on its
``- **Level:**`` line, every class that emits it and the file defining each, and every
field; every heading must name an event of some class.  A guard over the sources keeps
direct structlog calls with an event name out, so that facts stay the one way.
"""

from __future__ import annotations

import functools
import importlib
import inspect
import pkgutil
import re
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import attrs
import pytest
import structlog

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("client", "server", "testbed")
DOC = ROOT / "docs" / "events.md"

#: What an event name looks like: a namespace, a dot, a name (``server.connection_opened``).
EVENT_NAME = re.compile(r"^[a-z_]+\.[a-z_.]+$")
LEVELS = {"debug", "info", "warning", "error"}
#: The base class of each side's facts (never emitted: they name no event).
BASES = ("client.mm.facts:Fact", "server.events:Fact", "testbed.events:Fact")

EVENT_HEADING = re.compile(r"^### `([^`]+)`\s*$")
SECTION_END = re.compile(r"^#{1,3} ")
BACKTICKED = re.compile(r"`([^`\n]+)`")
#: A structlog level call whose first argument is an event name: what facts replaced.
DIRECT_CALL = re.compile(
    r"\.(?:debug|info|warning|warn|error|exception|critical|fatal|msg|log)\(\s*"
    r"(?:[^()]*?,\s*)?[\"'][a-z_]+\.[a-z_.]+[\"']"
)


def _modules() -> list[str]:
    """Every module of ``PACKAGES`` (``__main__`` left out: importing it runs the CLI)."""
    names = []
    for top in PACKAGES:
        package = importlib.import_module(top)
        names.append(top)
        names += [
            m.name
            for m in pkgutil.walk_packages(package.__path__, f"{top}.")
            if m.name.rsplit(".", 1)[-1] != "__main__"
        ]
    return names


@functools.cache
def fact_classes() -> tuple[type, ...]:
    """Every class of client/, server/ and testbed/ that names an event."""
    found: list[type] = []
    for name in _modules():
        module = importlib.import_module(name)
        for obj in vars(module).values():
            if (
                isinstance(obj, type)
                and obj.__module__ == name
                and isinstance(getattr(obj, "event", None), str)
            ):
                found.append(obj)
    return tuple(sorted(found, key=lambda c: (c.event, c.__module__, c.__qualname__)))


def source_file(cls: type) -> str:
    """``server/events.py``: the file defining ``cls``, relative to its checkout."""
    top = importlib.import_module(cls.__module__.split(".")[0])
    checkout = Path(inspect.getfile(top)).resolve().parents[1]
    return Path(inspect.getfile(cls)).resolve().relative_to(checkout).as_posix()


def event_fields(cls: type) -> list[str]:
    """The fields ``cls`` logs under their own names (flattened dicts left out)."""
    return [f.name for f in attrs.fields(cls) if not f.metadata.get("flatten")]


@dataclass
class Emitted:
    """What the classes say about one event name."""

    classes: list[type] = field(default_factory=list)
    levels: set[str] = field(default_factory=set)
    files: set[str] = field(default_factory=set)
    fields: set[str] = field(default_factory=set)


@functools.cache
def code_events() -> dict[str, Emitted]:
    """Every event name the code can emit, with its classes, levels, files and fields."""
    events: dict[str, Emitted] = defaultdict(Emitted)
    for cls in fact_classes():
        e = events[cls.event]
        e.classes.append(cls)
        e.levels.add(cls.level)
        e.files.add(source_file(cls))
        e.fields.update(event_fields(cls))
    return dict(events)


@dataclass
class DocEntry:
    name: str
    lineno: int
    text: str

    @property
    def backticked(self) -> set[str]:
        return set(BACKTICKED.findall(self.text))

    @property
    def levels(self) -> set[str] | None:
        for line in self.text.splitlines():
            if line.startswith("- **Level:**"):
                return set(BACKTICKED.findall(line))
        return None


@functools.cache
def doc_entries() -> tuple[DocEntry, ...]:
    """The ``### `name``` entries of docs/events.md (headings inside code blocks skipped)."""
    entries: list[DocEntry] = []
    current: tuple[str, int, list[str]] | None = None
    fenced = False
    for lineno, line in enumerate(DOC.read_text(encoding="utf-8").splitlines(), 1):
        if line.startswith("```"):
            fenced = not fenced
        if not fenced and SECTION_END.match(line):
            if current is not None:
                entries.append(DocEntry(current[0], current[1], "\n".join(current[2])))
                current = None
            if m := EVENT_HEADING.match(line):
                current = (m.group(1), lineno, [])
                continue
        if current is not None:
            current[2].append(line)
    if current is not None:
        entries.append(DocEntry(current[0], current[1], "\n".join(current[2])))
    return tuple(entries)


def _documented() -> dict[str, DocEntry]:
    return {e.name: e for e in doc_entries()}


def _named(spec: str) -> type:
    module, name = spec.split(":")
    base: type = getattr(importlib.import_module(module), name)
    return base


def _subclasses(cls: type) -> set[type]:
    out = set(cls.__subclasses__())
    for sub in list(out):
        out |= _subclasses(sub)
    return out


# -- the facts themselves -------------------------------------------------------------------
def test_the_collection_finds_every_kind_of_fact() -> None:
    """Guard the collection itself: each side's facts, and each peculiarity, are seen."""
    events = code_events()
    for name, level, path, cls in [
        ("alloc.failed", "debug", "client/mm/facts.py", "AllocFailed"),  # the model, debug
        ("vm.sample", "info", "client/summary.py", "VmSample"),  # a fact outside client/mm
        ("reclaim.throttled", "info", "client/policy/base.py", "ReclaimThrottled"),
        ("swapdev.connection_lost", "info", "client/swapdev.py", "SwapdevConnectionLost"),
        ("server.connection_opened", "info", "server/events.py", "ServerConnectionOpened"),
        ("fault.fired", "debug", "server/events.py", "ServerFaultDelayed"),  # two levels
        ("watchdog.deadlock", "warning", "testbed/events.py", "WatchdogDeadlock"),
        ("control.error", "error", "testbed/events.py", "ControlError"),
        ("run.start", "info", "testbed/events.py", "ClientRunStarted"),  # event inherited
    ]:
        assert name in events, f"the collection lost {name}"
        e = events[name]
        assert level in e.levels, (name, e.levels)
        assert path in e.files, (name, e.files)
        assert cls in {c.__name__ for c in e.classes}, (name, e.classes)
    assert {"free", "threshold", "timeout"} <= events["reclaim.throttled"].fields
    assert events["swapdev.connection_lost"].fields == {"reason", "fenced_slots"}
    assert "detail" not in events["fault.fired"].fields  # flattened: not a field
    assert "detail" in events["nbd.option"].fields  # a plain field that happens to be so named
    assert {"nic", "accel", "server", "control"} <= events["run.start"].fields
    assert len(events) >= 70


def test_every_fact_is_a_frozen_attrs_class_with_a_level_and_a_docstring() -> None:
    wrong = {}
    for cls in fact_classes():
        what = []
        if not attrs.has(cls):
            what.append("not an attrs class")
        else:
            instance = object.__new__(cls)
            try:
                instance.__setattr__("_probe", 1)
            except attrs.exceptions.FrozenInstanceError:
                pass
            else:
                what.append("not frozen")
        if not EVENT_NAME.match(cls.event):
            what.append(f"event {cls.event!r} is not namespace.name")
        if getattr(cls, "level", None) not in LEVELS:
            what.append(f"level {getattr(cls, 'level', None)!r} not one of {sorted(LEVELS)}")
        if not isinstance(getattr(cls, "exc_info", False), bool):
            what.append("exc_info is not a bool")
        if not (cls.__doc__ or "").strip():
            what.append("no docstring saying when it happens")
        if what:
            wrong[f"{cls.__module__}.{cls.__qualname__}"] = what
    assert not wrong, f"facts that do not follow the rules: {wrong}"


def test_every_concrete_fact_names_its_event() -> None:
    """A subclass of a side's ``Fact`` that forgot ``event`` would fail only when emitted;
    a base meant to be shared (``_Totals``) says so with a leading underscore, and a side's
    base may derive from another's (the testbed's from the client's)."""
    bases = {_named(spec) for spec in BASES}
    nameless = sorted(
        f"{sub.__module__}.{sub.__qualname__}"
        for spec in BASES
        for sub in _subclasses(_named(spec))
        if not sub.__name__.startswith("_")
        and sub not in bases
        and not isinstance(getattr(sub, "event", None), str)
    )
    assert not nameless, f"facts without an event name: {nameless}"
    for spec in BASES:
        assert not hasattr(_named(spec), "event"), f"{spec} must not name an event"


def test_no_direct_structlog_call_names_an_event() -> None:
    """Facts are the one way: no ``log.info("server.listening", ...)`` is left."""
    offenders = []
    for top in PACKAGES:
        for path in sorted((ROOT / top).rglob("*.py")):
            text = path.read_text(encoding="utf-8")
            for m in DIRECT_CALL.finditer(text):
                line = text.count("\n", 0, m.start()) + 1
                offenders.append(f"{path.relative_to(ROOT).as_posix()}:{line}: {m.group(0)!r}")
    assert not offenders, f"log events emitted without a fact class: {offenders}"


def test_the_guard_sees_a_direct_call() -> None:
    for call in [
        'log.info("server.listening", host=host)',
        'structlog.get_logger().error(\n    "sweep.run_raised", policy=p\n)',
        "self.log.exception('control.error')",
    ]:
        assert DIRECT_CALL.search(call), call
    assert not DIRECT_CALL.search('log.info("started")')  # not an event name


# -- the emitters ---------------------------------------------------------------------------
def test_the_server_emitter_logs_level_fields_and_flattened_extras() -> None:
    from server.events import NbdOption, ServerFaultDelayed, ServerFaultFired, emit

    structlog.reset_defaults()  # no level filter left by another test (conftest restores)
    with structlog.testing.capture_logs() as logs:
        emit(ServerFaultDelayed(export="disk", command="write", seconds=0.5))
        emit(ServerFaultFired("drop", "disk", None, None, detail={"connections": 2}))
        emit(NbdOption(option=7, reply=None, detail="a note"))
    assert logs == [
        {"event": "fault.fired", "log_level": "debug", "kind": "delay", "export": "disk"}
        | {"command": "write", "seconds": 0.5},
        {"event": "fault.fired", "log_level": "info", "kind": "drop", "export": "disk"}
        | {"command": None, "errno": None, "connections": 2},
        {"event": "nbd.option", "log_level": "debug", "option": 7, "reply": None}
        | {"detail": "a note"},
    ]


def test_the_testbed_emitter_keeps_the_traceback_and_renders_client_facts() -> None:
    from client.faults import FaultFired
    from client.mm import GFP_ATOMIC
    from testbed.events import ControlError, RunSummarised
    from testbed.log import emit, fact_observer

    structlog.reset_defaults()  # no level filter left by another test (conftest restores)
    with structlog.testing.capture_logs() as logs:
        log = structlog.get_logger().bind(machine="m")
        try:
            raise ValueError("boom")
        except ValueError:
            emit(ControlError(), log)
        emit(RunSummarised({"outcome": "completed", "reason": ""}), log)
        fact_observer(log)(FaultFired("alloc", {"gfp": int(GFP_ATOMIC), "nth": 1}))
    assert logs[0] == {
        "event": "control.error",
        "log_level": "error",
        "machine": "m",
        "exc_info": True,
    }
    assert logs[1] == {"event": "run.summary", "log_level": "info", "machine": "m"} | {
        "outcome": "completed",
        "reason": "",
    }
    assert logs[2]["event"] == "fault.fired" and logs[2]["nth"] == 1
    assert logs[2]["gfp"] == "HIGH|ATOMIC|KSWAPD_RECLAIM"  # the bits named, as documented


# -- the page -------------------------------------------------------------------------------
def test_every_event_is_documented() -> None:
    documented = _documented()
    missing = {
        name: [f"{c.__module__}.{c.__qualname__}" for c in e.classes]
        for name, e in sorted(code_events().items())
        if name not in documented
    }
    assert not missing, f"events without a `### \\`name\\`` entry in docs/events.md: {missing}"


def test_every_documented_event_exists() -> None:
    events = code_events()
    gone = [f"{e.name} (line {e.lineno})" for e in doc_entries() if e.name not in events]
    assert not gone, f"docs/events.md documents events no fact class emits: {gone}"
    names = [e.name for e in doc_entries()]
    twice = sorted({n for n in names if names.count(n) > 1})
    assert not twice, f"documented twice: {twice}"


def test_levels_match() -> None:
    documented = _documented()
    wrong = {}
    for name, e in sorted(code_events().items()):
        entry = documented.get(name)
        if entry is None:
            continue  # test_every_event_is_documented says so
        if entry.levels != e.levels:
            wrong[name] = {"doc": entry.levels, "code": sorted(e.levels)}
    assert not wrong, f"levels in docs/events.md differ from the classes: {wrong}"


def test_classes_and_their_files_are_named() -> None:
    documented = _documented()
    unnamed = {}
    for name, e in sorted(code_events().items()):
        entry = documented.get(name)
        if entry is None:
            continue
        wanted = {c.__name__ for c in e.classes} | e.files
        if missing := wanted - entry.backticked:
            unnamed[name] = sorted(missing)
    assert not unnamed, f"entries that do not name their fact classes and files: {unnamed}"


def test_fields_are_documented() -> None:
    documented = _documented()
    undocumented = {}
    for name, e in sorted(code_events().items()):
        entry = documented.get(name)
        if entry is not None and (fields := e.fields - entry.backticked):
            undocumented[name] = sorted(fields)
    assert not undocumented, f"fields missing from their entry: {undocumented}"


@pytest.mark.parametrize(
    ("event", "record", "not_logged"),
    [
        # compare --seeds adds a summary's seed after the run was logged (testbed/cli/seeds.py).
        ("run.summary", "client.summary:RunSummary", {"seed"}),
        ("vm.sample", "client.summary:VmSample", set()),
    ],
)
def test_flattened_records_are_documented(event: str, record: str, not_logged: set[str]) -> None:
    """``run.summary`` and a guest's ``vm.sample`` carry a flattened dict: the keys of the
    model's record (which the kernel lab follows where it can) must be on the page."""
    cls: Any = _named(record)
    entry = _documented()[event]
    missing = sorted({f.name for f in attrs.fields(cls)} - not_logged - entry.backticked)
    assert not missing, f"{event}: keys of {record} missing from its entry: {missing}"


def test_event_sets_in_testbed_log_are_events() -> None:
    """The names testbed/log.py singles out (``RUN_EVENTS``) exist."""
    from testbed.log import RUN_EVENTS

    unknown = sorted(RUN_EVENTS - set(code_events()))
    assert not unknown, f"testbed/log.py names events nothing emits: {unknown}"
