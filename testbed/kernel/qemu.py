"""qemu: the command line of one guest, the accelerator probe, and the monitor.

The guest's only network is qemu's user-mode network with ``restrict=on``: it can reach
nothing but the one ``guestfwd`` to the NBD server on the host's loopback.  The console is
the first serial port (qemu's stdout), the guest's records the second (a unix socket the
host listens on), the monitor a third unix socket, through which the host sends sysrq.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Sequence
from pathlib import Path

import attrs
import trio

from testbed.kernel.guest import SERVER_IP, SERVER_PORT

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
        cpu = ["-cpu", "max"] if self.accel == "tcg" else ["-cpu", "host"]
        return [
            QEMU,
            "-nodefaults",
            "-no-user-config",
            "-no-reboot",
            "-display",
            "none",
            "-accel",
            self.accel,
            *cpu,
            "-smp",
            str(self.cpus),
            "-m",
            f"{self.memory_mib}M",
            "-kernel",
            str(self.kernel),
            "-initrd",
            str(self.initrd),
            "-append",
            KERNEL_CMDLINE,
            "-serial",
            "stdio",
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


def kvm_works() -> bool:
    """Whether KVM can run a guest here: /dev/kvm opens and qemu starts a bare machine with
    it.  A probe, not a promise: nested KVM has failed mid-boot on machines that pass it, so
    ``auto`` means TCG unless asked (see docs/kernel.md)."""
    if not os.access("/dev/kvm", os.R_OK | os.W_OK) or shutil.which(QEMU) is None:
        return False
    try:
        done = subprocess.run(
            [
                QEMU,
                "-accel",
                "kvm",
                "-nodefaults",
                "-display",
                "none",
                "-machine",
                "none",
                "-S",
                "-monitor",
                "stdio",
            ],
            input="quit\n",
            capture_output=True,
            text=True,
            timeout=20,
            check=False,
        )
    except (OSError, subprocess.TimeoutExpired):
        return False
    return done.returncode == 0


def choose_accel(requested: str) -> str:
    if requested == "auto":
        # Nested KVM on these machines stopped mid-boot with an emulation failure after
        # passing the probe, so "auto" takes TCG, which always works; --accel kvm asks.
        return "tcg"
    if requested == "kvm" and not kvm_works():
        raise RuntimeError("--accel kvm: KVM is not usable here (/dev/kvm or qemu -accel kvm)")
    return requested


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
