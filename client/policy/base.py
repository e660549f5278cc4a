"""What every policy shares: the hooks with their "do nothing special" answers.

A policy is one object per machine that the allocator (``client.mm.policy.PolicyHooks``)
and the network stack (``client.net.stack.NetPolicy``) consult at their decision points.
Subclasses override only the decisions their kernel design changes.  Nothing outside a
policy looks at a policy's name: outcomes come from what these hooks do.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, ClassVar

import attrs

from client.mm import GFP_ATOMIC, GFP_NOIO, gfp_t
from client.mm.facts import Fact
from client.mm.policy import NullPolicy

if TYPE_CHECKING:
    from client.mm import Memory
    from client.net.socket import ModelledSocket


@attrs.frozen
class ReserveChargeFailed(Fact):
    """An emergency allocation found its reserve at its limit (it waits, or fails if it may
    not sleep): Zijlstra's bean counting saying no."""

    event: ClassVar[str] = "reserve.charge_failed"
    reserve: str
    usage: int
    limit: int
    waits: bool


@attrs.frozen
class ReclaimThrottled(Fact):
    """A direct reclaimer was throttled: free pages at or below half the summed min
    watermarks (Gorman's throttle_direct_reclaim)."""

    event: ClassVar[str] = "reclaim.throttled"
    free: int
    threshold: int
    timeout: float | None  # HZ for callers without __GFP_FS, else None (until woken)


class Policy(NullPolicy):
    name: ClassVar[str] = "base"
    #: One line for tables and docs: who it models.
    models: ClassVar[str] = ""

    def __init__(self) -> None:
        self.memory: Memory | None = None

    # -- the allocator's hooks: NullPolicy's answers, unless a subclass overrides them -----
    def attach(self, memory: Memory) -> None:
        self.memory = memory

    # -- the network stack's hooks (client.net.stack.NetPolicy) ---------------------------
    def socket_created(self, sock: ModelledSocket, kind: str) -> None:
        # drivers/block/nbd.c sock_xmit (before 3.6): sk_allocation = GFP_NOIO.
        sock.allocation = GFP_NOIO

    def socket_closed(self, sock: ModelledSocket) -> None:
        pass

    def rx_gfp(self, memalloc_socks: int) -> gfp_t:
        # __netdev_alloc_skb in softirq: GFP_ATOMIC, which reaches 3/8 of min and no further.
        return GFP_ATOMIC

    def rx_reserve(self) -> object | None:
        return None

    # -- reporting ------------------------------------------------------------------------
    def reserve_in_use(self) -> int:
        """Pages charged to the policy's own reserves right now (``vm.sample``)."""
        return 0

    def report(self) -> dict[str, Any]:
        """Policy-specific figures for the run summary (reserve table, throttling, ...)."""
        return {}
