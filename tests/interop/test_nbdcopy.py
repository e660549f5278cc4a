"""nbdcopy (libnbd 1.14): bulk copies in and out, multi-conn, FLUSH, small requests."""

from __future__ import annotations

from pathlib import Path

import pytest
import trio
import trio.testing

from server import NBDServer
from server.config import ExportConfig

from .peers import KiB, MakeServer, MiB, first_difference, run, uri, write_random

pytestmark = pytest.mark.interop


@pytest.mark.parametrize(
    "options",
    [[], ["--connections=4", "--threads=4"], ["--flush"]],
    ids=["default", "multi-conn", "flush"],
)
async def test_nbdcopy_64m_in_and_out_is_byte_identical(
    nbd_server: NBDServer, nbdcopy: str, random_64m: Path, tmp_path: Path, options: list[str]
) -> None:
    before = nbd_server.stats.connections
    await run(nbdcopy, *options, random_64m, uri(nbd_server, "disk"))
    copy_in_connections = nbd_server.stats.connections - before
    out = tmp_path / "out.img"
    await run(nbdcopy, *options, uri(nbd_server, "disk"), out)
    assert first_difference(random_64m, out) is None
    if "--connections=4" in options:
        # CAN_MULTI_CONN is advertised, so nbdcopy opens several connections.
        assert copy_in_connections > 1
    else:
        assert copy_in_connections >= 1


async def test_nbdcopy_with_4k_requests_in_and_out(
    make_server: MakeServer, nbdcopy: str, tmp_path: Path
) -> None:
    server = await make_server(exports=[ExportConfig("small", 4 * MiB)])
    src = tmp_path / "src.img"
    write_random(src, 4 * MiB)
    await run(nbdcopy, "--request-size=4096", src, uri(server, "small"))
    out = tmp_path / "out.img"
    await run(nbdcopy, "--request-size=4096", uri(server, "small"), out)
    assert first_difference(src, out) is None
    # Let the server see the EOFs (live goes to 0).  Every byte went over the wire as
    # 4 KiB requests.
    await trio.testing.wait_all_tasks_blocked()
    assert server.stats.live == 0
    assert server.stats.bytes_written == 4 * MiB
    assert server.stats.bytes_read == 4 * MiB
    assert server.stats.requests >= 2048


async def test_nbdcopy_zero_runs_overwrite_old_data(
    nbd_server: NBDServer, nbdcopy: str, random_64m: Path, tmp_path: Path
) -> None:
    """nbdcopy turns runs of zeros into WRITE_ZEROES, some of them over 32 MiB (nbd.md §2)."""
    await run(nbdcopy, random_64m, uri(nbd_server, "disk"))
    sparse = tmp_path / "mostly-zero.img"
    with sparse.open("wb") as fh:
        fh.write(b"\xa5" * (4 * KiB))
        fh.truncate(64 * MiB)
    await run(nbdcopy, sparse, uri(nbd_server, "disk"))
    out = tmp_path / "out.img"
    await run(nbdcopy, uri(nbd_server, "disk"), out)
    assert first_difference(sparse, out) is None


async def test_nbdcopy_flush_into_file_export_reaches_the_backing_file(
    make_server: MakeServer, nbdcopy: str, random_64m: Path, tmp_path: Path
) -> None:
    backing = tmp_path / "backing.img"
    server = await make_server(
        exports=[ExportConfig("disk", 64 * MiB, backend="file", path=str(backing))]
    )
    await run(nbdcopy, "--flush", random_64m, uri(server, "disk"))
    # Read the file directly while the server still has it open.
    assert first_difference(random_64m, backing) is None


async def test_nbdcopy_into_read_only_export_fails_and_server_keeps_serving(
    nbd_server: NBDServer, nbdcopy: str, nbdinfo: str, tmp_path: Path
) -> None:
    src = tmp_path / "src.img"
    write_random(src, 1 * MiB)
    result = await run(nbdcopy, src, uri(nbd_server, "ro"), ok=False)
    assert result.returncode != 0
    assert b"read-only" in result.stderr
    size = (await run(nbdinfo, "--size", uri(nbd_server, "ro"))).stdout
    assert size.strip() == str(1 * MiB).encode()
    out = tmp_path / "ro.img"
    await run(nbdcopy, uri(nbd_server, "ro"), out)
    assert out.read_bytes() == bytes(1 * MiB)
