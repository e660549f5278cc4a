"""docs/events.md documents every log event the code can emit, and nothing else.

The events are collected statically, by parsing the sources under client/, server/ and
testbed/ with ``ast`` (nothing is imported or run):

* facts: a class body that sets ``event`` to a string constant (``event: ClassVar[str] =
  "alloc.failed"``, or a plain ``event = "skb.dropped"``); ``testbed.log.fact_observer``
  logs it at debug if the name is in ``_DEBUG_EVENTS`` (testbed/log.py), else at info, with
  the class's attrs fields as the event's fields;
* direct structlog calls: ``<anything>.info("server.listening", host=...)`` and the other
  level methods, whose first argument is a namespaced string constant;
* ``DeviceEvent("swapdev.connection_lost", {"reason": ...})``: the swap device's facts,
  named per instance, whose dict literal becomes the fields.

Each event needs a ``### `name``` heading in docs/events.md, whose entry names the event's
levels on its ``- **Level:**`` line, the file that emits it (for a fact: the file defining
its class) and every field the code passes by name; and every heading must name an event
the code still emits.
"""

from __future__ import annotations

import ast
import functools
import re
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SOURCE_DIRS = ("client", "server", "testbed")
DOC = ROOT / "docs" / "events.md"

#: What an event name looks like: a namespace, a dot, a name (``server.connection_opened``).
EVENT_NAME = re.compile(r"^[a-z_]+\.[a-z_.]+$")
#: structlog's level methods; ``exception`` logs at error level.
LOG_METHODS = {
    "debug": "debug",
    "info": "info",
    "warning": "warning",
    "error": "error",
    "exception": "error",
    "critical": "critical",
}
#: The base ``Fact``'s default name: never emitted (the base class is never instantiated,
#: which ``test_placeholder_is_never_emitted`` checks).
PLACEHOLDERS = {"mm.fact": "Fact"}
#: Fields a fact has that do not become event fields under their own name.
NOT_FIELDS = {"event", "detail", "summary", "sample"}

EVENT_HEADING = re.compile(r"^### `([^`]+)`\s*$")
SECTION_END = re.compile(r"^#{1,3} ")
BACKTICKED = re.compile(r"`([^`\n]+)`")


@dataclass
class Emitted:
    """What the code says about one event name."""

    levels: set[str] = field(default_factory=set)
    files: set[str] = field(default_factory=set)
    fields: set[str] = field(default_factory=set)
    where: list[str] = field(default_factory=list)


@dataclass
class _FactClass:
    name: str
    event: str | None
    level: str | None
    fields: set[str]
    bases: list[str]
    path: str
    lineno: int


@functools.cache
def _sources() -> tuple[tuple[str, ast.Module], ...]:
    """Every source file under ``SOURCE_DIRS``, parsed (once per test session)."""
    out = []
    for top in SOURCE_DIRS:
        for path in sorted((ROOT / top).rglob("*.py")):
            rel = path.relative_to(ROOT).as_posix()
            out.append((rel, ast.parse(path.read_text(encoding="utf-8"), filename=rel)))
    return tuple(out)


def _str_constant(node: ast.AST | None) -> str | None:
    if isinstance(node, ast.Constant) and isinstance(node.value, str):
        return node.value
    return None


def _is_classvar(annotation: ast.AST) -> bool:
    target = annotation.value if isinstance(annotation, ast.Subscript) else annotation
    return (isinstance(target, ast.Name) and target.id == "ClassVar") or (
        isinstance(target, ast.Attribute) and target.attr == "ClassVar"
    )


def _class_info(node: ast.ClassDef, path: str) -> _FactClass:
    event = level = None
    fields: set[str] = set()
    for stmt in node.body:
        if isinstance(stmt, ast.AnnAssign) and isinstance(stmt.target, ast.Name):
            if stmt.target.id == "event":
                event = _str_constant(stmt.value) or event
            elif stmt.target.id == "level":
                level = _str_constant(stmt.value) or level
            elif not _is_classvar(stmt.annotation) and not stmt.target.id.startswith("_"):
                fields.add(stmt.target.id)
        elif isinstance(stmt, ast.Assign):
            for target in stmt.targets:
                if isinstance(target, ast.Name) and target.id == "event":
                    event = _str_constant(stmt.value) or event
    bases = [b.id if isinstance(b, ast.Name) else ast.unparse(b) for b in node.bases]
    return _FactClass(node.name, event, level, fields, bases, path, node.lineno)


def _callee(call: ast.Call) -> str | None:
    if isinstance(call.func, ast.Name):
        return call.func.id
    if isinstance(call.func, ast.Attribute):
        return call.func.attr
    return None


@functools.cache
def code_events() -> dict[str, Emitted]:
    """Every event name the code can emit, with its levels, files and named fields."""
    modules = _sources()
    events: dict[str, Emitted] = defaultdict(Emitted)
    classes: dict[str, _FactClass] = {}

    def fact_level(name: str) -> str:
        return "info"

    for path, tree in modules:
        for node in ast.walk(tree):
            if isinstance(node, ast.ClassDef):
                info = _class_info(node, path)
                classes.setdefault(info.name, info)
            elif isinstance(node, ast.Call):
                callee = _callee(node)
                first = _str_constant(node.args[0]) if node.args else None
                if (
                    isinstance(node.func, ast.Attribute)
                    and callee in LOG_METHODS
                    and first is not None
                    and EVENT_NAME.match(first)
                ):
                    e = events[first]
                    e.levels.add(LOG_METHODS[callee])
                    e.files.add(path)
                    e.fields.update(k.arg for k in node.keywords if k.arg is not None)
                    e.where.append(f"{path}:{node.lineno}")
                elif callee == "DeviceEvent":
                    kw = {k.arg: k.value for k in node.keywords}
                    name = first or _str_constant(kw.get("event"))
                    assert name is not None, (
                        f"{path}:{node.lineno}: DeviceEvent name not a constant"
                    )
                    detail = node.args[1] if len(node.args) > 1 else kw.get("detail")
                    e = events[name]
                    e.levels.add(fact_level(name))
                    e.files.add(path)
                    if isinstance(detail, ast.Dict):
                        e.fields.update(k for k in map(_str_constant, detail.keys) if k)
                    e.where.append(f"{path}:{node.lineno}")

    def all_fields(cls: _FactClass, seen: frozenset[str] = frozenset()) -> set[str]:
        out = set(cls.fields)
        for base in cls.bases:
            if base in classes and base not in seen:
                out |= all_fields(classes[base], seen | {cls.name})
        return out

    def class_level(cls: _FactClass, event: str) -> str:
        """The class's ``level``, or its base's (in its own package), or by name."""
        if cls.level is not None:
            return cls.level
        for base in cls.bases:
            if base in classes and classes[base].path.split("/")[0] == cls.path.split("/")[0]:
                return class_level(classes[base], event)
        return fact_level(event)

    for cls in classes.values():
        if cls.event is None or not EVENT_NAME.match(cls.event):
            continue
        e = events[cls.event]
        e.levels.add(class_level(cls, cls.event))
        e.files.add(cls.path)
        e.fields.update(all_fields(cls) - NOT_FIELDS)
        e.where.append(f"{cls.path}:{cls.lineno} ({cls.name})")
    for name in PLACEHOLDERS:
        events.pop(name, None)
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


def test_the_scan_finds_the_events_it_should() -> None:
    """Guard the scanner itself: each kind of emitter is seen."""
    events = code_events()
    for name, level, path in [
        ("alloc.failed", "debug", "client/mm/facts.py"),  # a fact, at debug
        ("vm.sample", "info", "client/summary.py"),  # a fact outside client/mm
        ("skb.dropped", "info", "client/net/socket.py"),  # `event = ...` without ClassVar
        ("reclaim.throttled", "info", "client/policy/base.py"),  # fields from a Fact subclass
        ("swapdev.reconnected", "info", "client/swapdev.py"),  # DeviceEvent
        ("server.connection_opened", "info", "server/events.py"),  # a server fact
        ("watchdog.deadlock", "warning", "testbed/events.py"),
        ("control.error", "error", "testbed/events.py"),
    ]:
        assert name in events, f"the scan lost {name}"
        assert level in events[name].levels, (name, events[name].levels)
        assert path in events[name].files, (name, events[name].files)
    assert {"free", "threshold", "timeout"} <= events["reclaim.throttled"].fields
    assert events["swapdev.connection_lost"].fields == {"reason", "fenced_slots"}
    assert len(events) >= 50


def test_placeholder_is_never_emitted() -> None:
    """``mm.fact`` (the base class's default) is left out because no code makes a bare
    ``Fact``; if that changes, it is a real event and needs an entry."""
    for name, cls in PLACEHOLDERS.items():
        made = [
            f"{path}:{node.lineno}"
            for path, tree in _sources()
            for node in ast.walk(tree)
            if isinstance(node, ast.Call) and _callee(node) == cls
        ]
        assert not made, f"{cls} ({name}) is instantiated at {made}: document {name}"


def test_every_event_is_documented() -> None:
    documented = _documented()
    text = DOC.read_text(encoding="utf-8")
    missing = {
        name: e.where
        for name, e in sorted(code_events().items())
        if name not in documented or f"`{name}`" not in text
    }
    assert not missing, f"events without a `### \\`name\\`` entry in docs/events.md: {missing}"


def test_every_documented_event_exists() -> None:
    events = code_events()
    gone = [f"{e.name} (line {e.lineno})" for e in doc_entries() if e.name not in events]
    assert not gone, f"docs/events.md documents events the code does not emit: {gone}"
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
    assert not wrong, f"levels in docs/events.md differ from the code: {wrong}"


def test_sources_are_named() -> None:
    documented = _documented()
    unnamed = {}
    for name, e in sorted(code_events().items()):
        entry = documented.get(name)
        if entry is not None and (files := e.files - entry.backticked):
            unnamed[name] = sorted(files)
    assert not unnamed, f"entries that do not name the file emitting them: {unnamed}"


def test_fields_are_documented() -> None:
    documented = _documented()
    undocumented = {}
    for name, e in sorted(code_events().items()):
        entry = documented.get(name)
        if entry is not None and (fields := e.fields - entry.backticked):
            undocumented[name] = sorted(fields)
    assert not undocumented, f"fields missing from their entry: {undocumented}"


def test_event_sets_in_testbed_log_are_events() -> None:
    """The names testbed/log.py singles out (``_DEBUG_EVENTS``, ``RUN_EVENTS``) exist."""
    modules = _sources()
    tree = dict(modules)["testbed/log.py"]
    named: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Assign) and any(
            isinstance(t, ast.Name) and t.id == "RUN_EVENTS" for t in node.targets
        ):
            named |= {s for n in ast.walk(node.value) if (s := _str_constant(n)) is not None}
    unknown = sorted(named - set(code_events()))
    assert not unknown, f"testbed/log.py names events nothing emits: {unknown}"
