"""Fault injection on the server side: what a misbehaving NBD server does to its clients.

Each export has one :class:`Faults`, changeable while the server runs (a test, or later a
control endpoint, holds it and turns the knobs):

* ``delay``: seconds every request waits before it is executed and answered.  A
  connection's requests are served in order, so this is a slow disk (one connection does
  at most ``1/delay`` requests per second), not a long wire;
* ``error_rate``: per command (``"write"``, ``"read"``, ``"flush"``, ``"trim"``,
  ``"write_zeroes"``, ``"block_status"``, ``"cache"``), a probability and the NBD error
  to answer with.  A failed request is answered with that error and never executed: a
  failed WRITE leaves the store as it was (nothing lands, not even partly);
* ``stall(seconds)`` / ``unstall()``: requests stop being answered, and stop being read,
  until the time has passed (on trio's clock: call it from the server's trio run) or
  ``unstall`` is called.  They wait in the connection's buffers (ours, then the kernel's:
  TCP flow control pushes back on the client); none is lost, every one is answered
  afterwards.  Handshakes go on meanwhile: a new connection stalls at its first request;
* drops and restarts act on connections and stores, so they live on the server
  (``NBDServer.drop_connections`` and ``NBDServer.restart``), which counts them here.

Errors are drawn from ``random.Random(seed)``: the same seed and the same sequence of
requests give the same failures, so a failing run can be replayed (``reseed``).  Every
fault that fires is counted in ``counts`` (``"delay"``, ``"error.write.EIO"``, ``"stall"``,
``"stall.held"``, ``"drop"``, ``"restart"``) and logged as ``fault.fired`` with its kind,
export, command and errno (delays at debug level: there is one per request).

With nothing configured the server pays one attribute test per request (``armed``): the
knobs are properties that recompute it, so it is never stale.
"""

from __future__ import annotations

import math
import random
from collections.abc import Mapping

import attrs
import trio

from nbdproto import Errno

from .config import FAULT_COMMANDS, FAULT_ERRNOS, FaultConfig, FaultErrorConfig
from .events import ServerFaultCleared, ServerFaultDelayed, ServerFaultFired, emit

#: Command number → the name faults use for it ("write", "block_status", ...).
_NAMES: dict[int, str] = {int(cmd): name for name, cmd in FAULT_COMMANDS.items()}


def _errors_from_rates(
    rates: Mapping[str, tuple[float, str]] | None,
) -> dict[int, tuple[float, Errno, str]]:
    """``{"write": (0.5, "EIO")}`` → ``{Cmd.WRITE: (0.5, Errno.EIO, "write")}``, checked."""
    return dict(
        _error(name, rate, errno_name) for name, (rate, errno_name) in (rates or {}).items()
    )


def _error(command: str, rate: float, errno: str) -> tuple[int, tuple[float, Errno, str]]:
    """One command's error, checked as ``[exports.faults.errors]`` is (ConfigError, a
    ValueError, naming the command, rate or errno): (command number, its entry)."""
    e = FaultErrorConfig(command, rate, errno)
    return FAULT_COMMANDS[e.command], (float(e.rate), FAULT_ERRNOS[e.errno], e.command)


@attrs.define(on_setattr=attrs.setters.NO_OP, repr=False)
class Faults:
    """The faults of one export.  See the module docstring for each knob."""

    export: str = ""
    _delay: float = attrs.field(default=0.0, alias="delay")
    _errors: dict[int, tuple[float, Errno, str]] = attrs.field(
        factory=dict, alias="error_rate", converter=_errors_from_rates
    )
    seed: int = 0
    #: How often each fault fired, by kind (``"error.write.EIO"``, ``"stall"``, ...).
    counts: dict[str, int] = attrs.field(factory=dict, init=False)
    #: True when a request must go through the fault path (the hot path's one test).
    armed: bool = attrs.field(default=False, init=False)
    rng: random.Random = attrs.field(init=False)
    _stalled: bool = attrs.field(default=False, init=False)
    _stall_until: float = attrs.field(default=-math.inf, init=False)
    _resume: trio.Event = attrs.field(factory=trio.Event, init=False)

    def __attrs_post_init__(self) -> None:
        self.delay = self._delay  # validates
        self.rng = random.Random(self.seed)

    @classmethod
    def from_config(cls, config: FaultConfig, export: str = "") -> Faults:
        return cls(
            export,
            delay=config.delay,
            error_rate={e.command: (e.rate, e.errno) for e in config.errors},
            seed=config.seed,
        )

    def __repr__(self) -> str:
        return (
            f"Faults(export={self.export!r}, delay={self._delay}, "
            f"error_rate={self.error_rate}, stalled={self._stalled}, counts={self.counts})"
        )

    # -- knobs ----------------------------------------------------------------------------
    @property
    def delay(self) -> float:
        return self._delay

    @delay.setter
    def delay(self, seconds: float) -> None:
        if not 0.0 <= seconds < math.inf:
            raise ValueError(f"delay {seconds}: must be >= 0 and finite")
        self._delay = float(seconds)
        self._rearm()

    @property
    def error_rate(self) -> dict[str, tuple[float, str]]:
        """``{command: (probability, errno name)}`` (a copy: assign to change it)."""
        return {name: (rate, err.name) for rate, err, name in self._errors.values()}

    @error_rate.setter
    def error_rate(self, rates: Mapping[str, tuple[float, str]]) -> None:
        self._errors = _errors_from_rates(rates)
        self._rearm()

    def set_error(self, command: str, rate: float, errno: str = "EIO") -> None:
        """Fail ``command`` with probability ``rate``, answering ``errno``."""
        number, entry = _error(command, rate, errno)
        self._errors[number] = entry
        self._rearm()

    def clear_errors(self) -> None:
        self._errors = {}
        self._rearm()

    def reseed(self, seed: int | None = None) -> None:
        """Restart the error sequence (from ``seed``, or the current seed): a replay."""
        if seed is not None:
            self.seed = seed
        self.rng = random.Random(self.seed)

    @property
    def stalled(self) -> bool:
        return self._stalled and trio.current_time() < self._stall_until

    def stall(self, seconds: float = math.inf) -> None:
        """Stop answering for ``seconds`` (on trio's clock; forever by default) or until
        :meth:`unstall`.  A second call while stalled extends the stall."""
        if seconds < 0:
            raise ValueError(f"stall of {seconds} seconds")
        until = trio.current_time() + seconds
        if self._stalled:
            self._stall_until = max(self._stall_until, until)
            return
        self._stalled = True
        self._stall_until = until
        self._resume = trio.Event()
        self._rearm()
        self.fired("stall", seconds=None if math.isinf(seconds) else seconds)

    def unstall(self) -> None:
        """End a stall now: the held requests are executed and answered."""
        self._end_stall("unstall")

    def _end_stall(self, reason: str) -> None:
        if not self._stalled:
            return
        self._stalled = False
        self._resume.set()
        self._rearm()
        emit(ServerFaultCleared(export=self.export, reason=reason))

    def _rearm(self) -> None:
        self.armed = bool(self._delay or self._errors or self._stalled)

    # -- firing ---------------------------------------------------------------------------
    def fired(
        self, kind: str, command: str | None = None, errno: str | None = None, **kw: object
    ) -> None:
        """Count a fault that fired and log it (``fault.fired``)."""
        key = kind if errno is None else f"{kind}.{command}.{errno}"
        self.counts[key] = self.counts.get(key, 0) + 1
        emit(ServerFaultFired(kind, self.export, command, errno, detail=kw))

    async def wait_while_stalled(self) -> bool:
        """Hold the caller while a stall lasts; True when it had to wait."""
        held = False
        while self._stalled:
            held = True
            with trio.move_on_at(self._stall_until):
                await self._resume.wait()
            if self._stalled and trio.current_time() >= self._stall_until:
                self._end_stall("timeout")
        if held:
            self.counts["stall.held"] = self.counts.get("stall.held", 0) + 1
        return held

    async def sleep_delay(self, command: int) -> None:
        """The configured delay, counted (and logged at debug level: one per request)."""
        self.counts["delay"] = self.counts.get("delay", 0) + 1
        emit(
            ServerFaultDelayed(
                export=self.export,
                command=_NAMES.get(command, str(command)),
                seconds=self._delay,
            )
        )
        await trio.sleep(self._delay)

    def draw_error(self, command: int) -> Errno:
        """The error this request fails with, or ``Errno.OK``: one draw per request of a
        command that has an error rate, none for the others (so that replaying the same
        requests with the same seed gives the same failures)."""
        spec = self._errors.get(command)
        if spec is None:
            return Errno.OK
        rate, err, name = spec
        if self.rng.random() >= rate:
            return Errno.OK
        self.fired("error", command=name, errno=err.name)
        return err
