"""``netswap server`` as a real process: port from the log, a real client, SIGTERM, exit 0."""

from __future__ import annotations

import json
import signal
import sys
from functools import partial
from pathlib import Path
from typing import Any

import pytest
import trio

from .peers import MiB, run

pytestmark = pytest.mark.interop

#: How long the process may take to start and log ``server.listening`` (imports included).
STARTUP_TIMEOUT = 15.0


def server_command() -> list[str]:
    """The ``netswap`` console script beside this interpreter, else ``python -m testbed.cli``."""
    script = Path(sys.executable).with_name("netswap")
    if script.exists():
        return [str(script)]
    return [sys.executable, "-P", "-m", "testbed.cli"]


def read_events(log: Path) -> list[dict[str, Any]]:
    """The complete JSON lines of the log so far (a half-written last line is left out)."""
    try:
        text = log.read_text()
    except FileNotFoundError:
        return []
    return [json.loads(line) for line in text.splitlines(keepends=True) if line.endswith("\n")]


async def wait_for_listening(log: Path, process: trio.Process) -> dict[str, Any]:
    """Poll the log (the server is another process: there is nothing to await) until its
    first event arrives, failing early if the process dies."""
    with trio.fail_after(STARTUP_TIMEOUT):
        while True:
            events = read_events(log)
            if events:
                return events[0]
            assert process.returncode is None, f"server exited {process.returncode} early"
            await trio.sleep(0.05)


async def test_cli_server_serves_nbdinfo_and_stops_on_sigterm(
    nursery: trio.Nursery, nbdinfo: str, tmp_path: Path
) -> None:
    log = tmp_path / "server.log"
    cmd = [
        *server_command(),
        "server",
        "--listen",
        "127.0.0.1:0",
        "--export",
        "x:16M",
        "--log-file",
        str(log),
    ]
    process: trio.Process = await nursery.start(
        partial(trio.run_process, cmd, check=False)  # stderr: to pytest's capture
    )
    first = await wait_for_listening(log, process)
    assert first["event"] == "server.listening"
    assert first["host"] == "127.0.0.1"
    port = first["port"]
    assert isinstance(port, int) and port > 0
    assert first["exports"] == [
        {"name": "x", "size": 16 * MiB, "backend": "memory", "read_only": False}
    ]

    info = json.loads((await run(nbdinfo, "--json", f"nbd://127.0.0.1:{port}/x")).stdout)
    assert info["exports"][0]["export-size"] == 16 * MiB

    process.send_signal(signal.SIGTERM)
    with trio.fail_after(10):
        code = await process.wait()
    assert code == 0
    events = read_events(log)
    names = [e["event"] for e in events]
    assert "server.signal" in names
    assert names[-1] == "server.stopped", names
    assert events[-1]["connections"] == 1
    assert events[-1]["live"] == 0
