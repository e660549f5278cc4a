"""The testbed's log events: typed facts, each logged through :func:`testbed.log.emit`.

Every event the testbed itself logs (a run's start and summary, the watchdog's verdict, the
control endpoint, the kernel lab, the commands' signals) is a frozen attrs class here:
``event`` names it, ``level`` is its structlog level, its fields are the event's fields (in
their order), and its docstring says when it happens; docs/events.md documents each
(tests/test_events_doc.py checks it against these classes).  The model's facts are the
client's (``client.mm.facts`` and its neighbours), the server's are ``server.events``.
"""

from __future__ import annotations

from typing import Any, ClassVar

import attrs

from client.mm.facts import FLATTEN
from client.mm.facts import Fact as ClientFact


@attrs.frozen
class Fact(ClientFact):
    """Base of the testbed's facts (never emitted itself: it names no event): the client's
    facts' base (``event``, ``level``, FLATTEN), which the model needs without logging,
    plus what only a logger needs."""

    #: True: logged with the traceback of the exception being handled (``log.exception``).
    exc_info: ClassVar[bool] = False


# -- run.* ---------------------------------------------------------------------------------
@attrs.frozen
class RunStarted(Fact):
    """A run starts (``run``, ``compare``, ``demo``): the machine is built, the swap device
    not yet connected.  Opens a run in ``netswap report``."""

    event: ClassVar[str] = "run.start"
    transport: str  # "memory" (virtual clock) or "tcp"
    memory: int  # the machine's RAM, bytes
    description: str


@attrs.frozen
class ClientRunStarted(RunStarted):
    """A run of ``netswap client`` starts, against its ``--server``."""

    server: str  # the --server URI
    control: str | None  # the --control address as given


@attrs.frozen
class KernelRunStarted(RunStarted):
    """A guest's run starts (``netswap kernel run``, transport ``kernel``): the image is
    ready, qemu not started."""

    nic: str
    accel: str


@attrs.frozen
class RunSummarised(Fact):
    """A run ended: its summary, last (a model run's ``RunSummary`` unstructured, or a
    kernel run's summary); its keys are the event's fields."""

    event: ClassVar[str] = "run.summary"
    summary: dict[str, Any] = attrs.field(metadata=FLATTEN)


@attrs.frozen
class KernelVmSample(Fact):
    """A sample of the guest's ``/proc/vmstat`` and zones, as the model's ``VmSample``."""

    event: ClassVar[str] = "vm.sample"
    sample: dict[str, Any] = attrs.field(metadata=FLATTEN)


# -- watchdog.* ----------------------------------------------------------------------------
@attrs.frozen
class WatchdogDeadlock(Fact):
    """The machine's progress stood still for ``run.stall_seconds`` while some task waited:
    the run is ended."""

    event: ClassVar[str] = "watchdog.deadlock"
    level: ClassVar[str] = "warning"
    cycle: list[str]  # the wait-for cycle, or the longest chain without one
    has_cycle: bool
    description: str
    stalled_for: float
    waiting: dict[str, str]
    progress: list[int]


# -- sweep.* -------------------------------------------------------------------------------
@attrs.frozen
class SweepRunRaised(Fact):
    """A run of a sweep raised instead of ending with a summary (the last event of its log)."""

    event: ClassVar[str] = "sweep.run_raised"
    level: ClassVar[str] = "error"
    policy: str
    error: str  # "Type: message"
    traceback: str


# -- signals -------------------------------------------------------------------------------
@attrs.frozen
class ServerSignal(Fact):
    """``netswap server`` received SIGINT or SIGTERM; a graceful shutdown begins."""

    event: ClassVar[str] = "server.signal"
    signal: str


@attrs.frozen
class ClientSignal(Fact):
    """``netswap client --control`` received SIGINT or SIGTERM; the run stops."""

    event: ClassVar[str] = "client.signal"
    signal: str


# -- control.* -----------------------------------------------------------------------------
@attrs.frozen
class ControlListening(Fact):
    """The control endpoint is listening."""

    event: ClassVar[str] = "control.listening"
    host: str
    port: int


@attrs.frozen
class ControlRemote(Fact):
    """The control endpoint listens on a non-loopback address."""

    event: ClassVar[str] = "control.remote"
    level: ClassVar[str] = "warning"
    host: str
    note: str = "accepting commands from the network"


@attrs.frozen
class ControlConnectionOpened(Fact):
    """A control connection was accepted."""

    event: ClassVar[str] = "control.connection_opened"
    level: ClassVar[str] = "debug"


@attrs.frozen
class ControlCommand(Fact):
    """A command was executed and answered ``ok``."""

    event: ClassVar[str] = "control.command"
    cmd: str


@attrs.frozen
class ControlRefused(Fact):
    """A request was answered with an error."""

    event: ClassVar[str] = "control.refused"
    error: str


@attrs.frozen
class ControlLineTooLong(Fact):
    """A request line exceeded the maximum length; the connection is closed."""

    event: ClassVar[str] = "control.line_too_long"
    level: ClassVar[str] = "warning"
    bytes: int


@attrs.frozen
class ControlError(Fact):
    """A bug while serving a control connection (logged with its traceback); only that
    connection is closed."""

    event: ClassVar[str] = "control.error"
    level: ClassVar[str] = "error"
    exc_info: ClassVar[bool] = True


@attrs.frozen
class ControlConnectionClosed(Fact):
    """A control connection ended, for whatever reason."""

    event: ClassVar[str] = "control.connection_closed"
    level: ClassVar[str] = "debug"


# -- kernel.* ------------------------------------------------------------------------------
@attrs.frozen
class KernelImageBuild(Fact):
    """The guest image is not in the cache and is being built."""

    event: ClassVar[str] = "kernel.image_build"
    message: str


@attrs.frozen
class KernelImage(Fact):
    """The guest image is ready, before qemu starts."""

    event: ClassVar[str] = "kernel.image"
    release: str
    flavour: str
    packages: dict[str, str]  # Debian package -> version
    modules: list[str]  # the initramfs's modules, in load order


@attrs.frozen
class KernelBoot(Fact):
    """qemu is started."""

    event: ClassVar[str] = "kernel.boot"
    argv: list[str]


@attrs.frozen
class KernelStep(Fact):
    """The guest's ``/init`` reported a step on its records port."""

    event: ClassVar[str] = "kernel.step"
    step: str
    args: list[str]


@attrs.frozen
class KernelConsole(Fact):
    """A line on the guest's console (printk timestamp removed)."""

    event: ClassVar[str] = "kernel.console"
    line: str


@attrs.frozen
class KernelHungTask(Fact):
    """The guest's hung-task detector reported a task."""

    event: ClassVar[str] = "kernel.hung_task"
    level: ClassVar[str] = "warning"
    task: str
    pid: int
    seconds: int


@attrs.frozen
class KernelBadRecord(Fact):
    """A sample line from the guest does not parse (skipped)."""

    event: ClassVar[str] = "kernel.bad_record"
    level: ClassVar[str] = "warning"
    line: str  # its first 200 characters


@attrs.frozen
class KernelStall(Fact):
    """No progress for ``kernel.stall_seconds``: the host sends the sysrq keys next."""

    event: ClassVar[str] = "kernel.stall"
    level: ClassVar[str] = "warning"
    stalled_for: float
    sysrq: list[str]


@attrs.frozen
class KernelMonitorFailed(Fact):
    """qemu's monitor could not be reached to send sysrq."""

    event: ClassVar[str] = "kernel.monitor_failed"
    level: ClassVar[str] = "warning"
    error: str


@attrs.frozen
class KernelBlockedTasks(Fact):
    """After sysrq w, the tasks it showed blocked (the run then ends as ``deadlock``)."""

    event: ClassVar[str] = "kernel.blocked_tasks"
    level: ClassVar[str] = "warning"
    tasks: list[dict[str, Any]]  # task, state, stack


@attrs.frozen
class KernelExit(Fact):
    """qemu has exited (the run's summary follows)."""

    event: ClassVar[str] = "kernel.exit"
    returncode: int | None
