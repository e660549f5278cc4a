"""nbdinfo (libnbd 1.14): what a client sees of our exports, flags and allocation map."""

from __future__ import annotations

from pathlib import Path

import pytest

from server import NBDServer
from server.config import ExportConfig

from .peers import MakeServer, MiB, run, run_json, uri, write_random

pytestmark = pytest.mark.interop


async def test_nbdinfo_shows_size_description_and_flags(
    nbd_server: NBDServer, nbdinfo: str
) -> None:
    out = (await run(nbdinfo, uri(nbd_server, "disk"))).stdout.decode()
    for line in (
        'export="disk":',
        "description: scratch disk",
        "export-size: 67108864 (64M)",
        "is_read_only: false",
        "can_flush: true",
        "can_fua: true",
        "can_multi_conn: true",
        "can_trim: true",
        "can_zero: true",
        "can_fast_zero: true",
        "base:allocation",
    ):
        assert line in out, f"{line!r} missing from nbdinfo output:\n{out}"
    assert "using structured" in out


@pytest.mark.parametrize(
    ("export", "size", "read_only"), [("disk", 64 * MiB, False), ("ro", 1 * MiB, True)]
)
async def test_nbdinfo_json_reports_size_and_flags(
    nbd_server: NBDServer, nbdinfo: str, export: str, size: int, read_only: bool
) -> None:
    info = await run_json(nbdinfo, "--json", uri(nbd_server, export))
    assert info["protocol"] == "newstyle-fixed"
    assert info["TLS"] is False
    [exp] = info["exports"]
    assert exp["export-name"] == export
    assert exp["export-size"] == size
    assert exp["is_read_only"] is read_only
    for flag in ("can_multi_conn", "can_flush"):
        assert exp[flag] is True, flag
    if not read_only:
        for flag in ("can_fua", "can_trim", "can_zero", "can_fast_zero", "can_cache"):
            assert exp[flag] is True, flag
    assert exp["contexts"] == ["base:allocation"]


async def test_nbdinfo_list_shows_both_exports_with_description(
    nbd_server: NBDServer, nbdinfo: str
) -> None:
    listing = await run_json(nbdinfo, "--list", "--json", uri(nbd_server))
    exports = {e["export-name"]: e for e in listing["exports"]}
    assert set(exports) == {"disk", "ro"}
    assert exports["disk"]["description"] == "scratch disk"
    assert exports["disk"]["export-size"] == 64 * MiB
    assert exports["ro"]["export-size"] == 1 * MiB
    assert exports["ro"]["is_read_only"] is True
    assert "description" not in exports["ro"]  # none configured: none sent

    text = (await run(nbdinfo, "--list", uri(nbd_server))).stdout.decode()
    assert 'export="disk":' in text and 'export="ro":' in text
    assert "description: scratch disk" in text


async def test_nbdinfo_size(nbd_server: NBDServer, nbdinfo: str) -> None:
    for export, size in (("disk", 64 * MiB), ("ro", 1 * MiB)):
        out = (await run(nbdinfo, "--size", uri(nbd_server, export))).stdout
        assert out.strip() == str(size).encode()


async def test_nbdinfo_map_of_a_fresh_export_is_one_hole(
    nbd_server: NBDServer, nbdinfo: str
) -> None:
    extents = await run_json(nbdinfo, "--map", "--json", uri(nbd_server, "disk"))
    assert extents == [{"offset": 0, "length": 64 * MiB, "type": 3, "description": "hole,zero"}]
    text = (await run(nbdinfo, "--map", uri(nbd_server, "disk"))).stdout.decode()
    assert text.split() == ["0", str(64 * MiB), "3", "hole,zero"]


async def test_nbdinfo_map_reports_data_where_nbdcopy_wrote(
    make_server: MakeServer, nbdinfo: str, nbdcopy: str, tmp_path: Path
) -> None:
    server = await make_server(exports=[ExportConfig("disk", 16 * MiB)])
    src = tmp_path / "head.img"
    write_random(src, 3 * MiB)
    await run(nbdcopy, src, uri(server, "disk"))
    extents = await run_json(nbdinfo, "--map", "--json", uri(server, "disk"))
    assert extents == [
        {"offset": 0, "length": 3 * MiB, "type": 0, "description": "data"},
        {"offset": 3 * MiB, "length": 13 * MiB, "type": 3, "description": "hole,zero"},
    ]
    totals = (await run(nbdinfo, "--map", "--totals", uri(server, "disk"))).stdout.decode()
    rows = {(int(n), int(t), d) for n, _pct, t, d in (line.split() for line in totals.splitlines())}
    assert rows == {(3 * MiB, 0, "data"), (13 * MiB, 3, "hole,zero")}
