"""The one place structlog is configured (structlog docs, "Configuration": once, at the edge).

Every event is one JSON object per line with ``event``, ``timestamp`` and ``level``, to a
file or to stderr; on a terminal the default is structlog's console renderer instead.
Library code only calls ``structlog.get_logger()`` and binds context variables.
"""

from __future__ import annotations

import enum
import logging
import sys
from typing import IO, Any, Literal, TextIO, cast

import structlog

LogFormat = Literal["json", "console"]
_opened: list[IO[str]] = []


def configure(
    *,
    log_file: str | None = None,
    log_format: LogFormat | None = None,
    level: str = "info",
    stream: IO[str] | None = None,
) -> None:
    """Set up logging for a process.  ``log_format`` None picks json unless on a terminal."""
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
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.processors.format_exc_info,
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


#: High-volume facts (one per page) are logged at debug level; the rest at info.
_DEBUG_EVENTS = frozenset(
    {"swap.readpage", "swap.read_done", "alloc.failed", "alloc.emergency", "kswapd.sleep"}
)


def fact_observer(logger: Any | None = None) -> Any:
    """An observer for the model and the swap device: each fact becomes one log event
    named by its ``event`` attribute, its fields as the event's fields."""
    import attrs

    log = logger if logger is not None else structlog.get_logger()

    def observe(fact: Any) -> None:
        name = getattr(fact, "event", None) or type(fact).__name__
        if attrs.has(type(fact)):
            fields = attrs.asdict(fact, recurse=False)
            fields.pop("event", None)
            detail = fields.pop("detail", None)
            if isinstance(detail, dict):
                fields.update(detail)
        else:
            fields = {"fact": repr(fact)}
        for key, value in fields.items():
            if isinstance(value, enum.Enum):
                fields[key] = value.name if value.name else str(value.value)
        if name in _DEBUG_EVENTS:
            log.debug(name, **fields)
        else:
            log.info(name, **fields)

    return observe
