"""Running the real peers as subprocesses, with failures that say what the peer said."""

from __future__ import annotations

import json
import os
import shlex
import subprocess
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import trio

from server import NBDServer

KiB = 1 << 10
MiB = 1 << 20

#: The ``make_server`` fixture: ``await make_server(exports=[ExportConfig(...)], **config)``.
MakeServer = Callable[..., Awaitable[NBDServer]]

#: Where Debian's python3-libnbd puts ``nbd.py``; nbdsh runs ``python3 -m nbd`` from PATH.
DEBIAN_DIST_PACKAGES = "/usr/lib/python3/dist-packages"


def uri(server: NBDServer, export: str = "") -> str:
    """``nbd://127.0.0.1:PORT/EXPORT`` for an in-process server."""
    assert server.address is not None, "the server has not started"
    host, port = server.address
    return f"nbd://{host}:{port}/{export}"


def describe(cmd: list[str], result: subprocess.CompletedProcess[bytes]) -> str:
    out = result.stdout.decode(errors="replace").strip()
    err = result.stderr.decode(errors="replace").strip()
    return (
        f"`{shlex.join(cmd)}` exited {result.returncode}\n"
        f"--- stdout ---\n{out[-4000:]}\n--- stderr ---\n{err[-4000:]}"
    )


async def run(
    *cmd: str | os.PathLike[str], ok: bool = True, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[bytes]:
    """Run a peer to completion; with ``ok`` (the default) assert that it exited 0."""
    argv = [os.fspath(c) for c in cmd]
    result: subprocess.CompletedProcess[bytes] = await trio.run_process(
        argv, capture_stdout=True, capture_stderr=True, check=False, env=env
    )
    if ok:
        assert result.returncode == 0, describe(argv, result)
    return result


async def run_json(*cmd: str | os.PathLike[str]) -> Any:
    result = await run(*cmd)
    return json.loads(result.stdout)


def nbdsh_env(nbdsh: str) -> dict[str, str]:
    """An environment in which ``nbdsh`` can import ``nbd``.

    nbdsh is a shell script running ``python3 -m nbd``: put the python3 that sits beside it
    (the distribution's, which has python3-libnbd) first on PATH, and Debian's dist-packages
    on PYTHONPATH in case another python3 still wins (a pyenv or venv one).
    """
    env = dict(os.environ)
    env["PATH"] = os.pathsep.join([str(Path(nbdsh).parent), env.get("PATH", "")])
    if Path(DEBIAN_DIST_PACKAGES, "nbd.py").exists():
        env["PYTHONPATH"] = os.pathsep.join(
            p for p in (env.get("PYTHONPATH"), DEBIAN_DIST_PACKAGES) if p
        )
    return env


async def nbdsh_script(nbdsh: str, target: str, script: str, *options: str) -> Any:
    """Run ``script`` in ``nbdsh -u target`` (the handle is ``h``); it must print one JSON
    value as its last line, which is returned."""
    result = await run(nbdsh, *options, "-u", target, "-c", script, env=nbdsh_env(nbdsh))
    lines = result.stdout.decode().strip().splitlines()
    assert lines, describe([nbdsh, "-u", target, "-c", "..."], result)
    return json.loads(lines[-1])


def write_random(path: Path, size: int) -> bytes:
    data = os.urandom(size)
    path.write_bytes(data)
    return data


def first_difference(a: Path, b: Path) -> int | None:
    """None when the files are byte-identical; else the offset of the first difference
    (or the shorter file's size when one is a prefix of the other)."""
    offset = 0
    with a.open("rb") as fa, b.open("rb") as fb:
        while True:
            x, y = fa.read(MiB), fb.read(MiB)
            if x != y:
                n = min(len(x), len(y))
                return offset + next((i for i in range(n) if x[i] != y[i]), n)
            if not x:
                return None
            offset += len(x)
