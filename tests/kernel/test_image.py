"""The guest image's parts that need no download: cpio, .modinfo, module order."""

from __future__ import annotations

import struct
from pathlib import Path

import pytest

from testbed.kernel.image import (
    DIR,
    EXEC,
    LINK,
    ImageError,
    cpio_newc,
    image_key,
    modinfo,
    module_load_order,
)


def read_newc(data: bytes) -> list[tuple[str, int, bytes]]:
    """A reader of the newc format (the kernel's init/initramfs.c, in Python)."""
    out, pos = [], 0
    while True:
        assert data[pos : pos + 6] == b"070701", f"bad magic at {pos}"
        fields = [int(data[pos + 6 + 8 * i : pos + 14 + 8 * i], 16) for i in range(13)]
        mode, size, namesize = fields[1], fields[6], fields[11]
        pos += 110
        name = data[pos : pos + namesize - 1].decode()
        pos += namesize
        pos += -pos % 4
        body = data[pos : pos + size]
        pos += size
        pos += -pos % 4
        if name == "TRAILER!!!":
            return out
        out.append((name, mode, body))


def test_cpio_newc_round_trips_files_directories_and_links() -> None:
    entries = [
        ("bin", DIR, b""),
        ("bin/busybox", EXEC, b"\x7fELF..."),
        ("bin/sh", LINK, b"busybox"),
    ]
    assert read_newc(cpio_newc(entries)) == entries


def fake_module(path: Path, **info: str) -> Path:
    """A minimal ELF64 file with a .modinfo section, as a kernel module has."""
    modinfo_data = b"".join(f"{k}={v}\0".encode() for k, v in info.items())
    shstrtab = b"\0.shstrtab\0.modinfo\0"
    header_size, sh_size = 64, 64
    modinfo_off = header_size
    shstr_off = modinfo_off + len(modinfo_data)
    sh_off = shstr_off + len(shstrtab)
    sh_off += -sh_off % 8
    elf = bytearray(b"\x7fELF\x02\x01\x01" + b"\0" * 9)
    elf += struct.pack("<HHIQQQIHHHHHH", 1, 62, 1, 0, 0, sh_off, 0, 64, 0, 0, sh_size, 3, 1)
    elf += modinfo_data + shstrtab
    elf += b"\0" * (sh_off - len(elf))
    null = struct.pack("<IIQQQQIIQQ", 0, 0, 0, 0, 0, 0, 0, 0, 0, 0)
    shstr = struct.pack("<IIQQQQIIQQ", 1, 3, 0, 0, shstr_off, len(shstrtab), 0, 0, 1, 0)
    mod = struct.pack("<IIQQQQIIQQ", 11, 1, 0, 0, modinfo_off, len(modinfo_data), 0, 0, 1, 0)
    elf += null + shstr + mod
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(bytes(elf))
    return path


def test_modinfo_reads_the_section(tmp_path: Path) -> None:
    ko = fake_module(tmp_path / "a.ko", license="GPL", depends="b,c", name="a")
    assert modinfo(ko) == {"license": ["GPL"], "depends": ["b,c"], "name": ["a"]}


def test_modules_load_after_what_they_depend_on(tmp_path: Path) -> None:
    """virtio_net needs virtio_ring, virtio and net_failover (which needs failover), as the
    cloud kernel's .modinfo says; built-in modules need no file."""
    root = tmp_path / "lib" / "modules" / "6.1.0-test"
    kernel = root / "kernel"
    fake_module(kernel / "drivers/net/virtio_net.ko", depends="virtio_ring,virtio,net_failover")
    fake_module(kernel / "drivers/virtio/virtio_ring.ko", depends="")
    fake_module(kernel / "drivers/virtio/virtio.ko", depends="virtio_ring")
    fake_module(kernel / "drivers/net/net_failover.ko", depends="failover")
    fake_module(kernel / "net/core/failover.ko", depends="")
    fake_module(kernel / "drivers/block/nbd.ko", depends="crc32c")
    (root / "modules.builtin").write_text("kernel/lib/crc32c.ko\n")
    order = [p.stem for p in module_load_order(root, ["nbd", "virtio_net"])]
    assert order[0] == "nbd"
    for before, after in [
        ("virtio_ring", "virtio"),
        ("failover", "net_failover"),
        ("virtio", "virtio_net"),
        ("net_failover", "virtio_net"),
    ]:
        assert order.index(before) < order.index(after)
    assert len(order) == len(set(order)) == 6


def test_a_missing_module_or_a_cycle_is_one_line(tmp_path: Path) -> None:
    root = tmp_path / "mods"
    fake_module(root / "a.ko", depends="b")
    with pytest.raises(ImageError, match="module b is neither"):
        module_load_order(root, ["a"])
    fake_module(root / "b.ko", depends="a")
    with pytest.raises(ImageError, match="cycle: a -> b -> a"):
        module_load_order(root, ["a"])


def test_the_cache_key_follows_the_package_versions() -> None:
    a = image_key({"linux-image-6.1.0-57-cloud-amd64": "6.1.192-3"}, ["virtio"])
    b = image_key({"linux-image-6.1.0-57-cloud-amd64": "6.1.192-4"}, ["virtio"])
    assert a != b and a == image_key({"linux-image-6.1.0-57-cloud-amd64": "6.1.192-3"}, ["virtio"])
