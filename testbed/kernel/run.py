"""One run of a scenario on a real Linux guest: server, qemu, sampler, stall watch.

The host writes the same events as a model run (``run.start``, ``vm.sample``,
``run.summary``) with ``policy = "kernel"`` and ``machine`` = the guest kernel's release,
plus ``kernel.*`` events: ``kernel.image``, ``kernel.boot`` (qemu's command line),
``kernel.step`` (the guest's steps), ``kernel.console`` (each console line),
``kernel.stall``, ``kernel.blocked_tasks``, ``kernel.exit``.

Outcomes: ``completed`` (every workload written and read back, every hash equal),
``integrity_error`` (a hash differs), ``deadlock`` (no progress — pswpout, pswpin, shmem
pages written, pages verified — for ``kernel.stall_seconds``; the blocked tasks of sysrq w
are in the summary), ``error`` (a panic, an oops, a guest that never boots, a failed
setup step, the time limit).
"""

from __future__ import annotations

import contextlib
import struct
import subprocess
import tempfile
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import attrs
import structlog
import trio

from nbdproto.config import ConfigError
from nbdproto.constants import CLIENT_FLAGS, GREETING, IHAVEOPT, NBDMAGIC, ClientFlags, Opt
from testbed.config import ScenarioConfig
from testbed.events import (
    KernelBadRecord,
    KernelBlockedTasks,
    KernelBoot,
    KernelConsole,
    KernelExit,
    KernelHungTask,
    KernelImage,
    KernelImageBuild,
    KernelMonitorFailed,
    KernelRunStarted,
    KernelStall,
    KernelStep,
    KernelVmSample,
    RunSummarised,
)
from testbed.kernel.guest import INIT_SCRIPT, GuestSettings
from testbed.kernel.image import (
    GuestImage,
    ImageError,
    build_image,
    colocated_server,
    cpio_newc,
    missing_host_tools,
)
from testbed.kernel.parse import (
    BlockedTask,
    Sample,
    allocstall,
    blocked_tasks,
    fatal_line,
    hung_task,
    parse_sample,
    parse_tcpext,
    strip_printk,
)
from testbed.kernel.plan import guest_settings, memory_mib
from testbed.kernel.qemu import Monitor, QemuGuest, choose_accel
from testbed.log import emit

#: The counters whose change is progress (the model's watchdog counts pages written,
#: swapped and verified, never mere activity).
PROGRESS = ("pswpout", "pswpin", "nr_shmem")
#: sysrq keys sent at a stall: console loglevel 9 (every message), blocked tasks, memory.
STALL_SYSRQ = ("9", "w", "m")
CONSOLE_KEPT = 4000


class KernelRunError(Exception):
    """The run could not start (qemu missing, the image, the server); one line."""


@attrs.define
class _State:
    """What the host has learnt of the guest so far."""

    release: str = ""
    started: bool = False  # the workloads have started
    ended: bool = False  # "@ end": the guest finished and sent its final counters
    error: str | None = None
    fatal: str | None = None
    last: Sample | None = None
    first: Sample | None = None
    final: dict[str, int] = attrs.Factory(dict)
    tcpext: dict[str, int] = attrs.Factory(dict)
    sysctls: dict[str, str] = attrs.Factory(dict)
    written: int = 0
    verified: int = 0
    corrupt: int = 0
    finished: dict[str, int] = attrs.Factory(dict)  # workload -> processes done
    min_free: int | None = None  # the lowest nr_free_pages sampled
    progress_key: tuple[int, ...] = ()
    progress_at: float = 0.0
    console: list[str] = attrs.Factory(list)
    console_at: float = 0.0


async def run_kernel(
    scenario: ScenarioConfig,
    *,
    server: tuple[str, int, str] | None = None,
    log: Any = None,
    image: GuestImage | None = None,
    cache: Path | None = None,
    server_ready: Any = None,
    trial: int | None = None,
) -> dict[str, Any]:
    """Run ``scenario`` on a guest; returns its summary (as ``run.summary`` logs it).

    ``server``: (host, port, export) of an NBD server on the host's loopback; None starts
    an embedded netswap server for the swap export.  ``server_ready(nbd_server)`` is called
    with the embedded server once it listens (the CLI's control endpoint attaches there).
    """
    log = log if log is not None else structlog.get_logger()
    missing = missing_host_tools()
    if missing:
        raise KernelRunError(missing[0])
    if server is not None:
        scenario = attrs.evolve(
            scenario, swap=attrs.evolve(scenario.swap, export=server[2] or scenario.swap.export)
        )
    settings = guest_settings(scenario)
    mib = memory_mib(scenario)
    kcfg = scenario.kernel
    if server is not None:
        await _probe(*server[:2])  # before minutes of image building, not after
    if image is None:
        try:
            image = await trio.to_thread.run_sync(
                lambda: build_image(
                    kcfg.kernel_flavour,
                    cache=cache,
                    progress=lambda m: emit(KernelImageBuild(message=m), log),
                )
            )
        except ImageError as exc:
            raise KernelRunError(str(exc)) from None
    try:
        accel = await trio.to_thread.run_sync(
            choose_accel, kcfg.accel, image.kernel, image.initramfs, image.directory
        )
    except RuntimeError as exc:
        raise KernelRunError(str(exc)) from None
    nic_module = {"virtio": "virtio_net", "e1000": "e1000"}[kcfg.nic]
    if not image.has_module(nic_module):
        raise ConfigError(
            f"kernel.nic {kcfg.nic}: the {image.flavour} kernel has no {nic_module} module "
            "(set kernel.flavour = generic)"
        )
    log = log.bind(machine=image.release, policy="kernel", trial=trial)
    emit(
        KernelImage(
            release=image.release,
            flavour=image.flavour,
            packages=image.packages,
            modules=list(image.modules),
        ),
        log,
    )
    extra: list[Path] = []
    colocated = kcfg.server != "host"
    if colocated:
        if server is not None:
            raise ConfigError(f"--server: kernel.server is {kcfg.server!r}, inside the guest")
        try:
            extra.append(await trio.to_thread.run_sync(colocated_server, image))
        except ImageError as exc:
            raise KernelRunError(str(exc)) from None
    async with trio.open_nursery() as nursery:
        address: tuple[str, int] | None
        nbd = None
        if colocated:
            address = None
        elif server is None:
            from testbed.scenario import embedded_server

            nbd = embedded_server(scenario, handshake_timeout=kcfg.boot_timeout)
            address = await nursery.start(nbd.serve)
            if server_ready is not None:
                server_ready(nbd)
        else:
            address = server[:2]
        try:
            summary = await _run_guest(scenario, settings, image, mib, accel, address, extra, log)
        finally:
            if nbd is not None:
                nbd.shutdown()
        nursery.cancel_scope.cancel()
    if trial is not None:
        summary["trial"] = trial
    emit(RunSummarised(summary), log)
    return summary


async def _probe(host: str, port: int) -> None:
    """Fail early, in one line, unless an NBD server answers at (host, port): read its
    greeting, then leave politely (``NBD_OPT_ABORT``), as nbd-client's checks do."""
    where = f"the NBD server at {host}:{port}"
    try:
        with trio.fail_after(10):
            stream = await trio.open_tcp_stream(host, port)
            try:
                greeting = b""
                while len(greeting) < GREETING.size:
                    chunk = await stream.receive_some(GREETING.size - len(greeting))
                    if not chunk:
                        break
                    greeting += chunk
                if len(greeting) < GREETING.size or GREETING.unpack(greeting)[:2] != (
                    NBDMAGIC,
                    IHAVEOPT,
                ):
                    raise KernelRunError(f"{where} did not greet as an NBD server does")
                flags = ClientFlags.C_FIXED_NEWSTYLE | ClientFlags.C_NO_ZEROES
                await stream.send_all(
                    CLIENT_FLAGS.pack(flags) + struct.pack(">QII", IHAVEOPT, Opt.ABORT, 0)
                )
            finally:
                await stream.aclose()
    except (OSError, trio.TooSlowError, trio.BrokenResourceError) as exc:
        what = getattr(exc, "strerror", None) or "no answer in 10 s"
        raise KernelRunError(f"cannot reach {where}: {what}") from None


def _initrd(base: Path, settings: GuestSettings, out: Path, extra: list[Path]) -> Path:
    """The cached initramfs, the ``extra`` archives (nbdkit, for a guest serving its own
    swap), and this run's /init and settings appended as a last archive."""
    settings_archive = cpio_newc(
        [
            ("init", 0o100755, INIT_SCRIPT.encode()),
            ("etc", 0o040755, b""),
            ("etc/netswap.conf", 0o100644, settings.conf().encode()),
            ("etc/netswap.workloads", 0o100644, settings.workload_lines().encode()),
        ]
    )
    with out.open("wb") as fh:
        # The kernel takes concatenated archives, compressed or not; an uncompressed one
        # must start 4-byte aligned, and zeros between archives are skipped
        # (init/initramfs.c, unpack_to_rootfs).
        for archive in (base, *extra):
            data = archive.read_bytes()
            fh.write(data + b"\0" * (-len(data) % 4))
        fh.write(settings_archive)
    return out


@contextlib.asynccontextmanager
async def _unix_listener(path: Path) -> AsyncIterator[trio.socket.SocketType]:
    sock = trio.socket.socket(trio.socket.AF_UNIX, trio.socket.SOCK_STREAM)
    try:
        await sock.bind(str(path))
        sock.listen(1)
        yield sock
    finally:
        sock.close()


async def _run_guest(
    scenario: ScenarioConfig,
    settings: GuestSettings,
    image: GuestImage,
    mib: int,
    accel: str,
    server: tuple[str, int] | None,
    extra: list[Path],
    log: Any,
) -> dict[str, Any]:
    kcfg = scenario.kernel
    state = _State(release=image.release)
    started_wall = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="netswap-kernel-") as tmp:
        work = Path(tmp)
        guest = QemuGuest(
            kernel=image.kernel,
            initrd=_initrd(image.initramfs, settings, work / "initrd", extra),
            memory_mib=mib,
            nic=kcfg.nic,
            accel=accel,
            cpus=kcfg.cpus,
            server=server,
            samples_socket=work / "samples.sock",
            monitor_socket=work / "monitor.sock",
        )
        emit(
            KernelRunStarted(
                transport="kernel",
                memory=scenario.machine.memory,
                description=scenario.description,
                nic=kcfg.nic,
                accel=accel,
            ),
            log,
        )
        async with _unix_listener(guest.samples_socket) as listener:
            argv = guest.argv()
            emit(KernelBoot(argv=argv), log)
            process = await trio.lowlevel.open_process(
                argv,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
            )
            stderr: list[bytes] = []
            outcome: dict[str, Any] = {}
            try:
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(_drain, process.stderr, stderr)
                    nursery.start_soon(_console, process.stdout, state, log)

                    async def samples() -> None:
                        conn, _ = await listener.accept()
                        stream = trio.SocketStream(conn)
                        await _records(stream, state, settings, log)

                    nursery.start_soon(samples)
                    outcome = await _supervise(process, state, kcfg, guest, stderr, log)
                    nursery.cancel_scope.cancel()
            finally:
                with trio.CancelScope(shield=True):
                    if process.returncode is None:
                        process.kill()
                    await process.wait()
            emit(KernelExit(returncode=process.returncode), log)
    return _summary(scenario, settings, image, state, outcome, time.monotonic() - started_wall)


async def _drain(stream: Any, into: list[bytes]) -> None:
    async for chunk in stream:
        into.append(chunk)


async def _lines(stream: Any) -> AsyncIterator[str]:
    buf = b""
    async for chunk in stream:
        buf += chunk
        *complete, buf = buf.split(b"\n")
        for raw in complete:
            yield raw.decode(errors="replace").rstrip("\r")
    if buf:
        yield buf.decode(errors="replace").rstrip("\r")


async def _console(stream: Any, state: _State, log: Any) -> None:
    async for line in _lines(stream):
        if not line.strip():
            continue
        state.console.append(line)
        del state.console[:-CONSOLE_KEPT]
        state.console_at = time.monotonic()
        emit(KernelConsole(line=strip_printk(line)), log)
        hung = hung_task(line)
        if hung is not None:
            emit(KernelHungTask(task=hung[0], pid=hung[1], seconds=hung[2]), log)
        fatal = fatal_line(line)
        if fatal and state.fatal is None:
            state.fatal = fatal


async def _records(
    stream: trio.abc.ReceiveStream, state: _State, settings: GuestSettings, log: Any
) -> None:
    async for line in _lines(stream):
        kind, _, rest = line.partition(" ")
        if kind == "S":
            try:
                sample = parse_sample(line)
            except ValueError:
                emit(KernelBadRecord(line=line[:200]), log)
                continue
            state.last = sample
            free = sample.counter("nr_free_pages")
            state.min_free = free if state.min_free is None else min(state.min_free, free)
            if state.first is None:
                state.first = sample
            emit(KernelVmSample(sample.fields(state.verified)), log)
            _note_progress(state)
        elif kind == "@":
            _step(rest.split(), state, log)
        elif kind == "F":
            key, _, value = rest.partition(" ")
            if key == "tcpext":
                state.tcpext = parse_tcpext(value)
            elif value.strip().lstrip("-").isdigit():
                state.final[key] = int(value)


def _step(words: list[str], state: _State, log: Any) -> None:
    if not words:
        return
    what = words[0]
    if what == "sysctl" and len(words) >= 3:
        state.sysctls[words[1]] = " ".join(words[2:])  # tcp_mem and the like are three
    elif what == "release" and len(words) >= 2:
        state.release = words[1]
    elif what == "started":
        state.started = True
        state.progress_at = time.monotonic()
    elif what == "written" and len(words) >= 3:
        state.written += int(words[2])
        state.progress_at = time.monotonic()
    elif what == "verified" and len(words) >= 4:
        state.verified += int(words[2])
        state.corrupt += int(words[3])
        name = words[1].split("/")[0]
        state.finished[name] = state.finished.get(name, 0) + 1
        state.progress_at = time.monotonic()
    elif what == "end":
        state.ended = True
    elif what == "error":
        state.error = " ".join(words[1:]) or "the guest reported an error"
    emit(KernelStep(step=what, args=words[1:]), log)


def _note_progress(state: _State) -> None:
    assert state.last is not None
    key = (*(state.last.counter(c) for c in PROGRESS), state.verified)
    if key != state.progress_key:
        state.progress_key = key
        state.progress_at = time.monotonic()


async def _supervise(
    process: trio.Process,
    state: _State,
    kcfg: Any,
    guest: QemuGuest,
    stderr: list[bytes],
    log: Any,
) -> dict[str, Any]:
    """Watch the guest until it ends; returns the outcome and its reason."""
    began = time.monotonic()
    while True:
        now = time.monotonic()
        if state.ended:
            with trio.move_on_after(30):
                await process.wait()
            return {}
        if state.fatal:
            await _settle(state)
            return {"outcome": "error", "reason": state.fatal}
        if state.error:
            return {"outcome": "error", "reason": state.error}
        if process.returncode is not None:
            await _settle(state, quiet=1.0, limit=3.0)
            if state.ended:
                return {}
            fatal = next((f for line in state.console if (f := fatal_line(line))), None)
            text = b"".join(stderr).decode(errors="replace").strip().splitlines()
            why = fatal or (text[-1] if text else f"qemu exited {process.returncode}")
            return {"outcome": "error", "reason": f"the guest stopped: {why}"}
        if not state.started and now - began > kcfg.boot_timeout:
            return {
                "outcome": "error",
                "reason": f"the guest did not start its workloads within {kcfg.boot_timeout:g} s",
            }
        if now - began > kcfg.time_limit:
            return {"outcome": "error", "reason": f"time limit {kcfg.time_limit:g} s"}
        if state.started and now - state.progress_at > kcfg.stall_seconds:
            stalled = now - state.progress_at
            emit(KernelStall(stalled_for=round(stalled, 1), sysrq=list(STALL_SYSRQ)), log)
            monitor = Monitor(guest.monitor_socket)
            try:
                await monitor.sysrq(STALL_SYSRQ)
            except OSError as exc:
                emit(KernelMonitorFailed(error=str(exc)), log)
            finally:
                await monitor.aclose()
            await _settle(state, quiet=5.0, limit=60.0)
            tasks = blocked_tasks(state.console)
            emit(
                KernelBlockedTasks(
                    tasks=[
                        {"task": t.task, "state": t.state, "stack": list(t.stack)} for t in tasks
                    ]
                ),
                log,
            )
            return {
                "outcome": "deadlock",
                "reason": f"no progress for {stalled:.0f}s",
                "deadlock": _deadlock(tasks, stalled),
            }
        await trio.sleep(0.5)


async def _settle(state: _State, quiet: float = 2.0, limit: float = 20.0) -> None:
    """Let the console drain: until no line came for ``quiet`` s, at most ``limit`` s."""
    deadline = time.monotonic() + limit
    while time.monotonic() < deadline and time.monotonic() - state.console_at < quiet:
        await trio.sleep(0.25)


def _deadlock(tasks: list[BlockedTask], stalled: float) -> dict[str, Any]:
    return {
        "cycle": None,
        "has_cycle": False,
        "waiting": {t.task: t.waits_in for t in tasks},
        "stalled_for": round(stalled, 1),
        "blocked_tasks": [
            {"task": t.task, "state": t.state, "stack": list(t.stack)} for t in tasks
        ],
    }


def _summary(
    scenario: ScenarioConfig,
    settings: GuestSettings,
    image: GuestImage,
    state: _State,
    outcome: dict[str, Any],
    wall: float,
) -> dict[str, Any]:
    last = state.last
    counters: dict[str, int] = dict(last.counters) if last else {}
    counters.update(state.final)
    counters["allocstall"] = allocstall(counters)
    if not outcome:
        complete = state.verified + state.corrupt >= settings.pages_written
        if state.corrupt:
            outcome = {"outcome": "integrity_error", "reason": f"{state.corrupt} pages differ"}
        elif complete:
            outcome = {"outcome": "completed", "reason": ""}
        else:
            outcome = {"outcome": "error", "reason": "the guest ended before its workloads did"}
    zones = list(last.zones) if last else []
    psi = {k: dict(v) for k, v in (last.psi.items() if last else ())}
    for figures in psi.values():
        figures.setdefault("total", 0.0)
        figures["total"] = int(figures["total"])
    min_free = state.sysctls.get("min_free_kbytes")
    summary: dict[str, Any] = {
        "machine": state.release or image.release,
        "policy": "kernel",
        "outcome": outcome["outcome"],
        "reason": outcome.get("reason", ""),
        "duration": round(last.t, 3) if last else None,
        "wall_seconds": round(wall, 3),
        "memory": {
            "total_pages": sum(int(z.get("managed", 0)) for z in zones),
            "min_free_kbytes": int(min_free) if min_free and min_free.isdigit() else None,
            "zones": [
                {
                    "name": z["name"],
                    "managed": z.get("managed"),
                    "nr_free": z.get("free"),
                    "min": z.get("min"),
                    "low": z.get("low"),
                    "high": z.get("high"),
                }
                for z in zones
            ],
        },
        "vmstat": counters,
        "psi": psi,
        "integrity": {
            "pages_written": state.written,
            "pages_verified": state.verified,
            "corrupt": state.corrupt,
        },
        "workloads": [
            {
                "name": name,
                "processes": procs,
                "pages_per_process": pages,
                "rounds": rounds,
                "finished": state.finished.get(name, 0) // max(1, rounds),
            }
            for name, procs, pages, rounds, _ in settings.workloads
        ],
        "net": {"PFMemallocDrop": state.tcpext.get("PFMemallocDrop")},
        "min_free_pages": state.min_free,
        "kernel": {
            "release": state.release or image.release,
            "flavour": image.flavour,
            "nic": scenario.kernel.nic,
            "server": scenario.kernel.server,
            "packages": image.packages,
            "sysctls": state.sysctls,
        },
    }
    if "deadlock" in outcome:
        summary["deadlock"] = outcome["deadlock"]
    if outcome["outcome"] == "error":
        summary["console_tail"] = [strip_printk(x) for x in state.console[-40:]]
    return summary


__all__ = ["KernelRunError", "run_kernel"]
