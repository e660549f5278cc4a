"""The one place structlog is configured (structlog docs, "Configuration": once, at the edge).

Every event is one JSON object per line with ``event``, ``timestamp`` and ``level``, to a
file or to stderr; on a terminal the default is structlog's console renderer instead.
Library code logs typed facts (``testbed/events.py``, the client's facts) through
:func:`emit`, the server's through ``server.events.emit``; it calls
``structlog.get_logger()`` only to bind context variables.
"""

from __future__ import annotations

import enum
import logging
import sys
from typing import IO, Any, Literal, TextIO, cast

import attrs
import structlog

LogFormat = Literal["json", "console"]
_opened: list[IO[str]] = []


#: The events a report or a plot is built from (``testbed.report``).
RUN_EVENTS = frozenset({"run.start", "vm.sample", "watchdog.deadlock", "run.summary"})


class Capture:
    """A processor that keeps a copy of the run events (for ``compare --plot``)."""

    def __init__(self) -> None:
        self.events: list[dict[str, Any]] = []

    def __call__(self, _logger: Any, _name: str, event_dict: dict[str, Any]) -> dict[str, Any]:
        if event_dict.get("event") in RUN_EVENTS:
            self.events.append(dict(event_dict))
        return event_dict


class ProgressLine:
    """A one-line live display on a terminal, redrawn from each ``vm.sample`` and cleared
    at ``run.summary``; it writes to the terminal only, never into a log or a pipe."""

    def __init__(self, out: IO[str]) -> None:
        self.out = out
        self._shown = False

    def __call__(self, _logger: Any, _name: str, event_dict: dict[str, Any]) -> dict[str, Any]:
        event = event_dict.get("event")
        if event == "vm.sample":
            zones = event_dict.get("zones") or [{}]
            line = (
                f"{event_dict.get('machine', '?')} {event_dict.get('policy', '?')}"
                f"  t {event_dict.get('t', 0):6.2f}s  free {event_dict.get('nr_free_pages')}"
                f" (min {sum(z.get('min', 0) for z in zones)})"
                f"  writeback {event_dict.get('nr_writeback')}"
                f"  pswpout {event_dict.get('pswpout')}  pswpin {event_dict.get('pswpin')}"
                f"  drops {event_dict.get('drops')}  verified {event_dict.get('pages_verified')}"
            )
            self.out.write("\r\x1b[2K" + line[:160])
            self.out.flush()
            self._shown = True
        elif event in ("run.summary", "watchdog.deadlock") and self._shown:
            self.out.write("\r\x1b[2K")
            self.out.flush()
            self._shown = False
        return event_dict


def configure(
    *,
    log_file: str | None = None,
    log_format: LogFormat | None = None,
    level: str = "info",
    stream: IO[str] | None = None,
    capture: Capture | None = None,
    progress: bool | None = None,
) -> None:
    """Set up logging for a process.  ``log_format`` None picks json unless on a terminal.

    ``progress`` None shows the live progress line when stderr is a terminal and the log
    goes to a file (a console log on that terminal would be torn by it)."""
    for fh in _opened:
        fh.close()
    _opened.clear()
    if log_file is not None:
        out: IO[str] = open(log_file, "a", buffering=1, encoding="utf-8")  # noqa: SIM115
        _opened.append(out)
    else:
        out = stream if stream is not None else sys.stderr
    if log_format is None:
        log_format = "console" if log_file is None and out.isatty() else "json"
    renderer: Any = (
        structlog.processors.JSONRenderer(sort_keys=False, default=str)
        if log_format == "json"
        else structlog.dev.ConsoleRenderer(colors=out.isatty())
    )
    extra: list[Any] = []
    if capture is not None:
        extra.append(capture)
    if progress is None:
        progress = log_file is not None and sys.stderr.isatty()
    if progress:
        extra.append(ProgressLine(sys.stderr))
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.processors.format_exc_info,
            *extra,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(
            logging.getLevelNamesMapping()[level.upper()]
        ),
        logger_factory=structlog.PrintLoggerFactory(cast(TextIO, out)),
        cache_logger_on_first_use=False,
    )


def get_logger(**initial: Any) -> Any:
    return structlog.get_logger(**initial)


_Shape = tuple[str, str, bool, tuple[tuple[str, Any], ...], tuple[str, ...]]
_SHAPES: dict[type, _Shape] = {}


def _shape(cls: type) -> _Shape:
    """What :func:`emit` needs of the fact class ``cls`` (once a class): its event, level,
    whether it carries a traceback, the fields whose metadata names a renderer, and the
    fields flattened into the event (``metadata["flatten"]``)."""
    found = _SHAPES.get(cls)
    if found is None:
        fields = attrs.fields(cls)
        found = _SHAPES[cls] = (
            cls.event,  # type: ignore[attr-defined]
            getattr(cls, "level", "info"),
            getattr(cls, "exc_info", False),
            tuple((f.name, f.metadata["render"]) for f in fields if "render" in f.metadata),
            tuple(f.name for f in fields if f.metadata.get("flatten")),
        )
    return found


def emit(fact: Any, log: Any | None = None) -> None:
    """Log ``fact`` (a frozen attrs class with an ``event`` class attribute): one event
    named by its ``event``, at its ``level`` (``info`` if it has none), with its fields as
    the event's fields.  The one way the testbed logs an event; the model's facts come here
    through :func:`fact_observer`."""
    if log is None:
        log = structlog.get_logger()
    name, level, exc_info, renderers, flattened = _shape(type(fact))
    fields = attrs.asdict(fact, recurse=False)
    # Flags are plain ints in a fact; a field's metadata["render"] names their bits
    # (client/mm/gfp.py), for a dict field one renderer per key.
    for field_name, render in renderers:
        value = fields[field_name]
        if isinstance(render, dict) and isinstance(value, dict):
            fields[field_name] = {k: render[k](v) if k in render else v for k, v in value.items()}
        else:
            fields[field_name] = render(value)
    for field_name in flattened:
        fields.update(fields.pop(field_name))
    for key, value in fields.items():
        if isinstance(value, enum.Enum):
            fields[key] = value.name if value.name else str(value.value)
    if exc_info:
        fields["exc_info"] = True
    getattr(log, level)(name, **fields)


def fact_observer(logger: Any | None = None) -> Any:
    """An observer for the model and the swap device: :func:`emit` on ``logger``."""
    log = logger if logger is not None else structlog.get_logger()

    def observe(fact: Any) -> None:
        emit(fact, log)

    return observe
