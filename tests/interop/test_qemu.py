"""qemu-img and qemu-nbd (QEMU 7.2) as clients: info, convert both ways, compare, --list."""

from __future__ import annotations

from pathlib import Path

import pytest

from server import NBDServer

from .peers import MiB, first_difference, run, run_json, uri

pytestmark = pytest.mark.interop


async def test_qemu_img_info_reports_the_virtual_size(nbd_server: NBDServer, qemu_img: str) -> None:
    info = await run_json(qemu_img, "info", "--output=json", uri(nbd_server, "disk"))
    assert info["virtual-size"] == 64 * MiB
    assert info["format"] == "raw"
    text = (await run(qemu_img, "info", uri(nbd_server, "ro"))).stdout.decode()
    assert "virtual size: 1 MiB (1048576 bytes)" in text


async def test_qemu_img_convert_in_and_out_is_byte_identical(
    nbd_server: NBDServer, qemu_img: str, random_64m: Path, tmp_path: Path
) -> None:
    target = uri(nbd_server, "disk")
    await run(qemu_img, "convert", "-n", "-f", "raw", "-O", "raw", random_64m, target)
    result = await run(qemu_img, "compare", "-f", "raw", "-F", "raw", random_64m, target)
    assert b"Images are identical" in result.stdout
    out = tmp_path / "out.img"
    await run(qemu_img, "convert", "-f", "raw", "-O", "raw", target, out)
    assert first_difference(random_64m, out) is None


async def test_qemu_img_compare_notices_a_difference(
    nbd_server: NBDServer, qemu_img: str, random_64m: Path
) -> None:
    # The export is still all zeros: compare must say so (exit 1), not crash (exit 2).
    result = await run(
        qemu_img,
        "compare",
        "-f",
        "raw",
        "-F",
        "raw",
        random_64m,
        uri(nbd_server, "disk"),
        ok=False,
    )
    assert result.returncode == 1, result.stderr
    assert b"Content mismatch at offset 0" in result.stdout


async def test_qemu_nbd_list_shows_the_exports(nbd_server: NBDServer, qemu_nbd: str) -> None:
    assert nbd_server.address is not None
    host, port = nbd_server.address
    out = (await run(qemu_nbd, "--list", "-b", host, "-p", str(port))).stdout.decode()
    assert "exports available: 2" in out
    assert " export: 'disk'" in out
    assert "  description: scratch disk" in out
    assert f"  size:  {64 * MiB}" in out
    assert " export: 'ro'" in out
    assert f"  size:  {1 * MiB}" in out
    assert "readonly" in out.split(" export: 'ro'")[1]
    assert "base:allocation" in out
