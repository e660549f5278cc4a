"""Functions the sweep's worker-pool tests hand to worker processes (spawned: they import
this module by name, so it imports nothing heavy)."""

from __future__ import annotations

import os
import signal
from pathlib import Path


def die_once(marker: str) -> str:
    """Killed the first time (leaving ``marker``), fine the next."""
    path = Path(marker)
    if not path.exists():
        path.write_text("died once\n")
        os.kill(os.getpid(), signal.SIGKILL)
    return f"done {path.name}"


def always_die(marker: str) -> str:
    os._exit(7)


def ok(marker: str) -> str:
    return f"done {Path(marker).name}"
