"""qemu: the command line of one guest, the accelerator probe, and the monitor.

The guest's only network is qemu's user-mode network with ``restrict=on``: it can reach
nothing but the one ``guestfwd`` to the NBD server on the host's loopback.  The console is
the first serial port (qemu's stdout), the guest's records the second (a unix socket the
host listens on), the monitor a third unix socket, through which the host sends sysrq.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import tempfile
from collections.abc import Sequence
from pathlib import Path

import attrs
import trio

from testbed.kernel.guest import SERVER_IP, SERVER_PORT
from testbed.kernel.image import cpio_newc

QEMU = "qemu-system-x86_64"
#: qemu's device for each NIC model the guest may have.
NIC_DEVICES = {"virtio": "virtio-net-pci", "e1000": "e1000"}
#: The kernel's command line: the console on ttyS0, sysrq allowed from the keyboard (the
#: monitor's sendkey; Debian's default mask 0x1b6 forbids the dumps w and m), a panic
#: reboots at once and -no-reboot turns that into qemu's exit.
KERNEL_CMDLINE = "console=ttyS0 loglevel=4 sysrq_always_enabled=1 panic=-1 oops=panic"


@attrs.frozen
class QemuGuest:
    kernel: Path
    initrd: Path
    memory_mib: int
    nic: str
    accel: str  # "kvm" or "tcg"
    cpus: int
    server: tuple[str, int] | None  # the NBD server on the host's loopback (None: none)
    samples_socket: Path  # the host listens; qemu connects as the second serial port
    monitor_socket: Path  # qemu listens; the host connects

    def argv(self) -> list[str]:
        netdev = "user,id=net0,restrict=on,ipv6=off"
        if self.server is not None:
            host, port = self.server
            netdev += f",guestfwd=tcp:{SERVER_IP}:{SERVER_PORT}-tcp:{host}:{port}"
        return [
            *machine_argv(self.accel, self.memory_mib, self.kernel, self.initrd, KERNEL_CMDLINE),
            "-smp",
            str(self.cpus),
            "-chardev",
            f"socket,id=samples,path={self.samples_socket}",
            "-serial",
            "chardev:samples",
            "-monitor",
            f"unix:{self.monitor_socket},server=on,wait=off",
            "-netdev",
            netdev,
            "-device",
            f"{NIC_DEVICES[self.nic]},netdev=net0",
        ]


#: What the probe's guest prints when it reached userspace under KVM.
KVM_PROBE_OK = "netswap-kvm-probe-ok"
KVM_PROBE_SECONDS = 30.0


def machine_argv(accel: str, memory_mib: int, kernel: Path, initrd: Path, append: str) -> list[str]:
    """qemu with nothing but what we ask for: the kernel, its initramfs and command line,
    the console on stdout (the first serial port), no display, no reboot."""
    return [
        QEMU, "-nodefaults", "-no-user-config", "-no-reboot", "-display", "none",
        "-accel", accel, "-cpu", "max" if accel == "tcg" else "host",
        "-m", f"{memory_mib}M", "-kernel", str(kernel), "-initrd", str(initrd),
        "-append", append, "-serial", "stdio",
    ]  # fmt: skip


def kvm_works(kernel: Path, initramfs: Path, cache: Path) -> bool:
    """Whether this image's kernel boots to userspace under KVM here: a real boot, not just
    an open /dev/kvm (nested KVM on these machines passed that, then stopped mid-boot with
    an emulation failure).  The answer is cached beside the image, per host kernel and
    qemu, so only the first run pays for it (up to 30 s)."""
    if not os.access("/dev/kvm", os.R_OK | os.W_OK) or shutil.which(QEMU) is None:
        return False
    key = f"{os.uname().release} {_qemu_version()}"
    cached = cache / "kvm-probe.json"
    try:
        known = json.loads(cached.read_text())
        if known.get("key") == key:
            return bool(known["works"])
    except (OSError, ValueError, KeyError):
        pass
    init = f"#!/bin/sh\n/bin/busybox echo {KVM_PROBE_OK}\n/bin/busybox poweroff -f\n"
    with tempfile.TemporaryDirectory(prefix="netswap-kvm-") as tmp:
        initrd = Path(tmp) / "initrd"
        base = initramfs.read_bytes()
        initrd.write_bytes(
            base + b"\0" * (-len(base) % 4) + cpio_newc([("init", 0o100755, init.encode())])
        )
        argv = machine_argv("kvm", 128, kernel, initrd, "console=ttyS0 panic=-1")
        try:
            done = subprocess.run(
                argv, capture_output=True, text=True, timeout=KVM_PROBE_SECONDS, check=False,
                stdin=subprocess.DEVNULL,
            )  # fmt: skip
            works = KVM_PROBE_OK in done.stdout
        except (OSError, subprocess.TimeoutExpired):
            works = False
    with contextlib.suppress(OSError):
        cached.write_text(json.dumps({"key": key, "works": works}))
    return works


def _qemu_version() -> str:
    try:
        out = subprocess.run([QEMU, "--version"], capture_output=True, text=True, check=False)
    except OSError:
        return "?"
    return out.stdout.splitlines()[0] if out.stdout else "?"


def choose_accel(requested: str, kernel: Path, initramfs: Path, cache: Path) -> str:
    """``auto``: KVM when a boot of this kernel under it reaches userspace, else TCG (which
    always works); ``kvm``: KVM or a one-line error; ``tcg``: TCG."""
    if requested == "tcg":
        return "tcg"
    if kvm_works(kernel, initramfs, cache):
        return "kvm"
    if requested == "kvm":
        raise RuntimeError(
            "--accel kvm: this kernel does not boot under KVM here (/dev/kvm is missing, "
            "or nested KVM stops mid-boot); use --accel tcg"
        )
    return "tcg"


class Monitor:
    """qemu's human monitor over its unix socket: ``sendkey`` for sysrq."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._stream: trio.SocketStream | None = None

    async def _connect(self) -> trio.SocketStream:
        if self._stream is None:
            sock = trio.socket.socket(trio.socket.AF_UNIX, trio.socket.SOCK_STREAM)
            await sock.connect(str(self.path))
            self._stream = trio.SocketStream(sock)
        return self._stream

    async def command(self, line: str) -> None:
        stream = await self._connect()
        await stream.send_all(line.encode() + b"\n")

    async def sysrq(self, keys: Sequence[str], gap: float = 2.0) -> None:
        """Send alt-sysrq-KEY for each key, ``gap`` seconds apart (the guest is emulated:
        each dump takes a while to reach the console)."""
        for key in keys:
            await self.command(f"sendkey alt-sysrq-{key}")
            await trio.sleep(gap)

    async def aclose(self) -> None:
        if self._stream is not None:
            await self._stream.aclose()
            self._stream = None
