"""The guest image: a Debian kernel and an initramfs built from Debian packages only.

``apt-get download`` fetches the kernel (``linux-image-<flavour>-amd64`` resolved to its
versioned package), ``busybox-static`` and ``nbd-client``; ``dpkg-deb -x`` unpacks them
without root.  The initramfs holds busybox, nbd-client with the shared libraries ``ldd``
names for it (taken from the host, where Debian's nbd-client is installed, and listed with
the packages that own them), the kernel modules the guest needs in dependency order (read
from each module's own ``.modinfo`` ``depends=`` line, since the package ships no
``modules.dep``).  The guest's ``/init`` (``testbed.kernel.guest``) and its settings come
in a second archive appended for each run, so changing them rebuilds nothing.

Images are cached under ``$XDG_CACHE_HOME/netswap/kernel`` (``~/.cache/...``), keyed by the
package versions, so a second run costs nothing.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import os
import re
import shutil
import struct
import subprocess
import tempfile
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path

import attrs

#: What each NIC needs beyond the block device: a driver module per NIC model.
NIC_MODULES = {"virtio": ("virtio_pci", "virtio_net"), "e1000": ("e1000",)}
#: Always loaded: the NBD block device.
BASE_MODULES = ("nbd",)
#: The kernel flavours (Debian's metapackages ``linux-image-<flavour>-amd64``).
FLAVOURS = {"cloud": "linux-image-cloud-amd64", "generic": "linux-image-amd64"}
#: Where the host keeps Debian's nbd-client and busybox-static (Debian package names).
HOST_TOOLS = {
    "qemu-system-x86_64": "qemu-system-x86",
    "nbd-client": "nbd-client",
    "busybox": "busybox-static",
}


class ImageError(Exception):
    """The image cannot be built; ``str()`` is one line for the user."""


@attrs.frozen
class GuestImage:
    """A built image: the kernel, the initramfs, and what went into them."""

    directory: Path
    release: str  # the kernel's release, as ``uname -r`` prints it
    flavour: str
    packages: dict[str, str]  # Debian package -> version
    modules: tuple[str, ...]  # in load order, paths relative to /lib/modules/RELEASE
    libraries: dict[str, str]  # library file -> the Debian package that owns it on the host

    @property
    def kernel(self) -> Path:
        return self.directory / "vmlinuz"

    @property
    def initramfs(self) -> Path:
        return self.directory / "initramfs.cpio.gz"

    def has_module(self, name: str) -> bool:
        return any(Path(m).stem == name for m in self.modules)

    def describe(self) -> list[str]:
        """What ``netswap kernel image`` prints."""
        lines = [f"kernel   {self.release} ({self.flavour})", f"image    {self.directory}"]
        lines += [f"package  {p} {v}" for p, v in sorted(self.packages.items())]
        lines += [f"module   {m}" for m in self.modules]
        lines += [f"library  {lib} ({pkg})" for lib, pkg in sorted(self.libraries.items())]
        return lines


def cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "netswap" / "kernel"


def missing_host_tools(names: Iterable[str] = HOST_TOOLS) -> list[str]:
    """One message per missing host tool, naming the Debian package that provides it."""
    return [
        f"{name} is not installed (Debian package: {HOST_TOOLS[name]})"
        for name in names
        if shutil.which(name) is None
    ]


def _run(cmd: Sequence[str], *, cwd: Path | None = None, what: str) -> str:
    try:
        done = subprocess.run(
            list(cmd), cwd=cwd, capture_output=True, text=True, check=False, timeout=600
        )
    except FileNotFoundError:
        raise ImageError(f"{what}: {cmd[0]} is not installed") from None
    except subprocess.TimeoutExpired:
        raise ImageError(f"{what}: {' '.join(cmd)} took more than 10 minutes") from None
    if done.returncode != 0:
        last = (done.stderr.strip().splitlines() or [f"exit {done.returncode}"])[-1]
        raise ImageError(f"{what}: {last}")
    return done.stdout


def resolve_kernel_package(flavour: str) -> tuple[str, str]:
    """``cloud`` → (``linux-image-6.1.0-57-cloud-amd64``, its version), through the
    metapackage's dependency as apt's lists know it."""
    if flavour not in FLAVOURS:
        raise ImageError(f"kernel.flavour {flavour!r}: choose from {', '.join(FLAVOURS)}")
    meta = FLAVOURS[flavour]
    shown = _run(["apt-cache", "show", "--no-all-versions", meta], what=f"apt-cache show {meta}")
    m = re.search(r"^Depends:.*?\b(linux-image-[0-9][^\s,()]*)", shown, re.MULTILINE)
    if not m:
        raise ImageError(
            f"{meta}: apt does not know it or names no kernel (run 'apt-get update' first)"
        )
    package = m.group(1)
    return package, package_version(package)


def package_version(package: str) -> str:
    shown = _run(
        ["apt-cache", "show", "--no-all-versions", package], what=f"apt-cache show {package}"
    )
    m = re.search(r"^Version:\s*(\S+)", shown, re.MULTILINE)
    if not m:
        raise ImageError(f"{package}: apt knows no version of it (run 'apt-get update' first)")
    return m.group(1)


# -- kernel modules -------------------------------------------------------------------------
def modinfo(path: Path) -> dict[str, list[str]]:
    """The ``.modinfo`` section of an ELF64 kernel module: key -> values."""
    data = path.read_bytes()
    if data[:4] != b"\x7fELF" or data[4] != 2:
        raise ImageError(f"{path.name}: not an ELF64 kernel module")
    (shoff,) = struct.unpack_from("<Q", data, 0x28)
    shentsize, shnum, shstrndx = struct.unpack_from("<HHH", data, 0x3A)

    def section(i: int) -> tuple[int, int, int]:
        name, _type, _flags, _addr, offset, size = struct.unpack_from(
            "<IIQQQQ", data, shoff + i * shentsize
        )
        return name, offset, size

    _, str_off, _ = section(shstrndx)
    info: dict[str, list[str]] = {}
    for i in range(shnum):
        name_off, offset, size = section(i)
        end = data.index(b"\0", str_off + name_off)
        if data[str_off + name_off : end] != b".modinfo":
            continue
        for entry in data[offset : offset + size].split(b"\0"):
            key, sep, value = entry.decode(errors="replace").partition("=")
            if sep:
                info.setdefault(key, []).append(value)
    return info


def module_load_order(modules_root: Path, wanted: Iterable[str]) -> list[Path]:
    """The ``.ko`` files for ``wanted`` and everything they depend on, dependencies first;
    modules built into the kernel (``modules.builtin``) need no file."""
    by_name = {p.stem.replace("-", "_"): p for p in modules_root.rglob("*.ko")}
    builtin_file = modules_root / "modules.builtin"
    builtin = set()
    if builtin_file.exists():
        builtin = {
            Path(line.strip()).stem.replace("-", "_")
            for line in builtin_file.read_text().splitlines()
            if line.strip()
        }
    order: list[Path] = []
    seen: set[str] = set()

    def visit(name: str, chain: tuple[str, ...]) -> None:
        name = name.replace("-", "_")
        if name in seen or name in builtin:
            return
        if name in chain:
            raise ImageError(f"module dependency cycle: {' -> '.join((*chain, name))}")
        path = by_name.get(name)
        if path is None:
            raise ImageError(f"module {name} is neither in the kernel package nor built in")
        for deps in modinfo(path).get("depends", []):
            for dep in filter(None, deps.split(",")):
                visit(dep, (*chain, name))
        seen.add(name)
        order.append(path)

    for name in wanted:
        visit(name, ())
    return order


# -- shared libraries -----------------------------------------------------------------------
def needed_libraries(binary: Path) -> list[Path]:
    """The shared libraries ``ldd`` resolves for ``binary`` (the loader included)."""
    out = _run(["ldd", str(binary)], what=f"ldd {binary.name}")
    libs: list[Path] = []
    for line in out.splitlines():
        line = line.strip()
        if "not found" in line:
            lib = line.split()[0]
            raise ImageError(
                f"{binary.name} needs {lib}, which the host lacks (install Debian's nbd-client)"
            )
        m = re.search(r"(/\S+)\s+\(0x", line)
        if m:
            libs.append(Path(m.group(1)))
    return libs


def owning_package(path: Path) -> str:
    """The Debian package that installed ``path`` (with merged /usr, dpkg may know it under
    /usr/lib or under the link's target), or ``?``."""
    for candidate in dict.fromkeys((str(path), f"/usr{path}", str(path.resolve()))):
        try:
            out = subprocess.run(
                ["dpkg", "-S", candidate], capture_output=True, text=True, check=False
            ).stdout
        except FileNotFoundError:
            return "?"
        first = out.splitlines()[0] if out else ""
        if ":" in first:
            return first.split(":")[0]
    return "?"


# -- cpio (newc), the initramfs format --------------------------------------------------------
def cpio_newc(entries: Iterable[tuple[str, int, bytes]]) -> bytes:
    """A ``newc`` cpio archive of (path, mode, data) entries; a symlink's data is its
    target.  The kernel unpacks concatenated archives in order (initramfs-rootfs)."""
    out = bytearray()
    ino = 1

    def add(name: str, mode: int, data: bytes) -> None:
        nonlocal ino
        encoded = name.encode() + b"\0"
        header = "070701" + "".join(
            f"{v:08x}" for v in (ino, mode, 0, 0, 1, 0, len(data), 0, 0, 0, 0, len(encoded), 0)
        )
        out.extend(header.encode() + encoded)
        out.extend(b"\0" * (-len(out) % 4))
        out.extend(data)
        out.extend(b"\0" * (-len(out) % 4))
        ino += 1

    for name, mode, data in entries:
        add(name, mode, data)
    add("TRAILER!!!", 0, b"")
    return bytes(out)


DIR = 0o040755
FILE = 0o100644
EXEC = 0o100755
LINK = 0o120777


def _dirs_for(paths: Iterable[str]) -> Iterator[tuple[str, int, bytes]]:
    seen: set[str] = set()
    for p in paths:
        parts = p.split("/")[:-1]
        for i in range(1, len(parts) + 1):
            d = "/".join(parts[:i])
            if d and d not in seen:
                seen.add(d)
                yield d, DIR, b""


# -- building ---------------------------------------------------------------------------------
def image_key(packages: dict[str, str], nics: Sequence[str]) -> str:
    text = json.dumps({"packages": packages, "nics": sorted(nics)}, sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def build_image(
    flavour: str = "cloud",
    *,
    nics: Sequence[str] = ("virtio", "e1000"),
    cache: Path | None = None,
    progress: object = None,
) -> GuestImage:
    """The image for ``flavour`` from the cache, or built and cached.

    ``nics``: the NIC drivers to include; those the kernel lacks are left out (the cloud
    kernel has no e1000), and ``GuestImage.has_module`` tells which are there."""
    missing = missing_host_tools(("nbd-client", "busybox"))
    if missing:
        raise ImageError(missing[0])
    kernel_pkg, kernel_ver = resolve_kernel_package(flavour)
    packages = {
        kernel_pkg: kernel_ver,
        "busybox-static": package_version("busybox-static"),
        "nbd-client": package_version("nbd-client"),
    }
    root = cache or cache_dir()
    directory = root / f"{flavour}-{image_key(packages, nics)}"
    manifest = directory / "manifest.json"
    if manifest.exists():
        return _load_manifest(directory, manifest)
    _say(progress, f"building the guest image from {', '.join(sorted(packages))}")
    root.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="netswap-image-", dir=root) as tmp:
        work = Path(tmp)
        for pkg, ver in packages.items():
            _run(
                ["apt-get", "download", "-q", f"{pkg}={ver}"],
                cwd=work,
                what=f"apt-get download {pkg}",
            )
        for deb in work.glob("*.deb"):
            _run(["dpkg-deb", "-x", str(deb), str(work / "root")], what=f"dpkg-deb -x {deb.name}")
            deb.unlink()
        image = _assemble(work / "root", work / "out", flavour, packages, nics)
        shutil.rmtree(work / "root")
        if directory.exists():
            shutil.rmtree(directory)
        (work / "out").rename(directory)
    return attrs.evolve(image, directory=directory)


def _assemble(
    staged: Path, out: Path, flavour: str, packages: dict[str, str], nics: Sequence[str]
) -> GuestImage:
    vmlinuz = sorted((staged / "boot").glob("vmlinuz-*"))
    if not vmlinuz:
        raise ImageError("the kernel package holds no /boot/vmlinuz-*")
    release = vmlinuz[0].name.removeprefix("vmlinuz-")
    modules_root = staged / "lib" / "modules" / release
    wanted = list(BASE_MODULES)
    for nic in nics:
        have = all(any(modules_root.rglob(f"{m}.ko")) for m in NIC_MODULES[nic])
        if have:
            wanted += NIC_MODULES[nic]
    modules = module_load_order(modules_root, wanted)
    busybox = _unpacked(staged, "busybox", "bin", "busybox-static")
    nbd_client = _unpacked(staged, "nbd-client", "sbin", "nbd-client")
    libs = needed_libraries(nbd_client)

    entries: list[tuple[str, int, bytes]] = [
        (d, DIR, b"") for d in ("dev", "proc", "sys", "tmp", "run", "etc")
    ]
    entries += [
        ("bin/busybox", EXEC, busybox.read_bytes()),
        ("bin/sh", LINK, b"busybox"),
        ("sbin/nbd-client", EXEC, nbd_client.read_bytes()),
    ]
    rel_modules = []
    for i, ko in enumerate(modules):
        rel = ko.relative_to(modules_root).as_posix()
        rel_modules.append(rel)
        # The load order is the file name order in /modules: 00-virtio.ko, 01-...
        entries.append((f"modules/{i:02d}-{ko.name}", FILE, ko.read_bytes()))
    owners = {}
    for lib in libs:
        entries.append((lib.as_posix().lstrip("/"), EXEC, lib.resolve().read_bytes()))
        owners[lib.as_posix()] = owning_package(lib.resolve())
    # Every directory before anything in it: the kernel does not create parents.
    files = [e for e in entries if e[1] != DIR]
    parents = list(_dirs_for(sorted(e[0] for e in files)))
    mounts = [e for e in entries if e[1] == DIR and e not in parents]
    archive = cpio_newc([*parents, *mounts, *files])

    out.mkdir(parents=True)
    shutil.copyfile(vmlinuz[0], out / "vmlinuz")
    with gzip.open(out / "initramfs.cpio.gz", "wb", compresslevel=6) as fh:
        fh.write(archive)
    image = GuestImage(
        directory=out,
        release=release,
        flavour=flavour,
        packages=packages,
        modules=tuple(rel_modules),
        libraries=owners,
    )
    (out / "manifest.json").write_text(
        json.dumps(
            {
                "release": release,
                "flavour": flavour,
                "packages": packages,
                "modules": rel_modules,
                "libraries": owners,
            },
            indent=1,
        )
    )
    return image


def colocated_server(image: GuestImage, progress: object = None) -> Path:
    """A second archive for the image: Debian's nbdkit with its memory plugin and the
    libraries ``ldd`` names, for a guest that serves its own swap (``kernel.server =
    "guest"``).  Built once per nbdkit version, beside the image."""
    version = package_version("nbdkit")
    out = image.directory / f"nbdkit-{re.sub(r'[^A-Za-z0-9.+-]', '_', version)}-2.cpio.gz"
    if out.exists():
        return out
    if shutil.which("nbdkit") is None:
        raise ImageError("nbdkit is not installed (Debian package: nbdkit)")
    _say(progress, f"adding nbdkit {version} to the guest image")
    with tempfile.TemporaryDirectory(prefix="netswap-nbdkit-", dir=image.directory) as tmp:
        work = Path(tmp)
        _run(
            ["apt-get", "download", "-q", f"nbdkit={version}"],
            cwd=work,
            what="apt-get download nbdkit",
        )
        for deb in work.glob("*.deb"):
            _run(["dpkg-deb", "-x", str(deb), str(work / "root")], what=f"dpkg-deb -x {deb.name}")
        root = work / "root"
        binary = _unpacked(root, "nbdkit", "bin", "nbdkit")
        plugins = sorted(root.glob("usr/lib/*/nbdkit/plugins/nbdkit-memory-plugin.so"))
        if not plugins:
            raise ImageError("nbdkit did not unpack its memory plugin")
        plugin = plugins[0]
        libs: dict[str, Path] = {}
        for program in (binary, plugin):
            for lib in needed_libraries(program):
                libs[lib.as_posix()] = lib
        # Only what the base archive lacks: a second copy of a library would replace the
        # first as the kernel unpacks the archives in turn (and guests below 256 MiB then
        # crashed every program that loads it).
        for have in image.libraries:
            libs.pop(have, None)
        files = [("usr/bin/nbdkit", EXEC, binary.read_bytes())]
        files.append((plugin.relative_to(root).as_posix(), FILE, plugin.read_bytes()))
        files += [(p.lstrip("/"), EXEC, lib.resolve().read_bytes()) for p, lib in libs.items()]
        archive = cpio_newc([*_dirs_for(sorted(f[0] for f in files)), *files])
        partial = out.with_suffix(".part")
        with gzip.open(partial, "wb", compresslevel=6) as fh:
            fh.write(archive)
        partial.rename(out)
    return out


def _unpacked(staged: Path, name: str, bindir: str, package: str) -> Path:
    """A program where its package put it (``/sbin`` or, merged, ``/usr/sbin``)."""
    for where in (staged / bindir / name, staged / "usr" / bindir / name):
        if where.exists():
            return where
    raise ImageError(f"{package} did not unpack {name} into /{bindir} or /usr/{bindir}")


def _load_manifest(directory: Path, manifest: Path) -> GuestImage:
    data = json.loads(manifest.read_text())
    return GuestImage(
        directory=directory,
        release=data["release"],
        flavour=data["flavour"],
        packages=data["packages"],
        modules=tuple(data["modules"]),
        libraries=data["libraries"],
    )


def _say(progress: object, message: str) -> None:
    if callable(progress):
        progress(message)
