"""The compiled model (``make compiled``, bench/compile_model.py): which build a run uses,
and never a stale one.

``make compiled`` writes a copy of ``client/`` to ``.build/compiled`` whose per-fault and
per-packet modules are C extensions built by mypyc from the same sources; a process uses it
when that directory comes first on ``PYTHONPATH``.  The copy carries ``client/_build.py``:
the source tree it was built from and a digest of its Python files.  A copy whose source
has changed since is stale: it would run yesterday's model under today's name, so
:func:`check` refuses it (``netswap`` exits 2 and says how to rebuild).
"""

from __future__ import annotations

import hashlib
import importlib
from pathlib import Path

import attrs

__all__ = ["Build", "StaleBuild", "build", "check", "hash_sources", "source_digest"]


class StaleBuild(Exception):
    """The compiled model on the path was built from sources that have changed since."""


@attrs.frozen
class Build:
    """The compiled copy of ``client/`` this process imports."""

    path: Path  # its client/ directory
    source: Path  # the client/ directory it was built from
    digest: str  # source_digest(source) when it was built


def hash_sources(digest: hashlib._Hash, package_dir: Path) -> None:
    """Feed ``digest`` every Python file under ``package_dir``, by path (from the package's
    name down) and content."""
    for path in sorted(package_dir.rglob("*.py")):
        digest.update(str(path.relative_to(package_dir.parent)).encode() + b"\0")
        digest.update(path.read_bytes() + b"\0")


def source_digest(client_dir: Path) -> str:
    """A hash of every Python file under ``client_dir``, by relative path and content."""
    digest = hashlib.sha256()
    hash_sources(digest, client_dir)
    return digest.hexdigest()[:16]


def build() -> Build | None:
    """The compiled build this process imports ``client`` from, or None (plain Python)."""
    import client

    try:
        info = importlib.import_module("client._build")
    except ImportError:
        return None
    return Build(
        path=Path(client.__file__ or "").parent,
        source=Path(info.SOURCE),
        digest=str(info.DIGEST),
    )


def check() -> Build | None:
    """The compiled build in use, after making sure it is not stale; None without one.

    Raises :class:`StaleBuild` when the sources it was built from have changed (or are
    gone): rebuild with ``make compiled``, or take it off ``PYTHONPATH``."""
    found = build()
    if found is None:
        return None
    if not found.source.is_dir():
        raise StaleBuild(
            f"the compiled model at {found.path} was built from {found.source}, which is "
            "gone: rebuild it with `make compiled` or take it off PYTHONPATH"
        )
    if source_digest(found.source) != found.digest:
        raise StaleBuild(
            f"the compiled model at {found.path} is stale: {found.source} changed since it "
            "was built; rebuild it with `make compiled` or take it off PYTHONPATH"
        )
    return found
