"""The client machine's network stack as memory sees it: its device, sockets and policy hooks.

The stack asks the machine's policy the questions the kernel answers in code: what gfp a
``netdev_alloc_skb`` driver's RX refill uses (``__netdev_alloc_skb``), which reserve an
emergency RX allocation charges, and how a new socket is set up (``sk_set_memalloc`` or
not).  One device (``client/net/device.py``) receives for every socket, and one ``TcpProto``
(``client/net/tcp.py``) accounts for the memory of all of them against ``tcp_mem``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Protocol

import trio

from client.mm import Memory, gfp_t
from client.net.device import NetDevice, NicSettings
from client.net.socket import ModelledSocket
from client.net.tcp import TcpProto, TcpSysctls

SWAP = "swap"
NOISE = "noise"


class NetPolicy(Protocol):
    """The network decision points of a reserve policy (see ``client/policy``)."""

    def socket_created(self, sock: ModelledSocket, kind: str) -> None:
        """Set a new socket up: ``sock.memalloc``, ``sock.allocation``, ``sock.tx_reserve``."""
        ...

    def socket_closed(self, sock: ModelledSocket) -> None: ...

    def rx_gfp(self, memalloc_socks: int) -> gfp_t:
        """The gfp of an RX skb allocation, made before the socket is known."""
        ...

    def rx_reserve(self) -> object | None:
        """The reserve an emergency RX allocation charges (None: no bean counting)."""
        ...


class NetStack:
    def __init__(
        self,
        memory: Memory,
        policy: NetPolicy,
        nursery: trio.Nursery,
        *,
        observer: Callable[[object], None] = lambda _f: None,
        nic: NicSettings | None = None,
        tcp: TcpSysctls | None = None,
    ) -> None:
        """``tcp``: the sysctls; None computes them from ``memory`` as ``tcp_init`` does."""
        self.memory = memory
        self.policy = policy
        self.nursery = nursery
        self.observer = observer
        self.sockets: dict[str, ModelledSocket] = {}
        self.closed: list[ModelledSocket] = []
        self.device = NetDevice(memory, self, NicSettings() if nic is None else nic)
        sysctls = TcpSysctls.for_memory(memory) if tcp is None else tcp
        self.tcp = TcpProto(sysctls, observe=observer)
        self._up = False

    def up(self) -> None:
        """Bring the device up (``dev_open``: its driver posts the receive ring); the first
        socket does it if nobody did before."""
        if not self._up:
            self._up = True
            self.device.start(self.nursery)

    def socket(
        self,
        inner: trio.abc.Stream,
        name: str,
        kind: str,
        *,
        sndbuf: int | None = None,
        rcvbuf: int | None = None,
        latency: float = 0.0,
    ) -> ModelledSocket:
        """Wrap ``inner``; the policy sets the socket up; its RX task starts at once.
        ``sndbuf``/``rcvbuf``: SO_SNDBUF/SO_RCVBUF as the buffer sizes they set (locked);
        None: autotuned (client/net/tcp.py)."""
        if name in self.sockets:
            raise ValueError(f"socket {name!r} exists")
        self.up()
        sock = ModelledSocket(self, inner, name, sndbuf=sndbuf, rcvbuf=rcvbuf, latency=latency)
        self.policy.socket_created(sock, kind)
        self.sockets[name] = sock
        sock.start(self.nursery)
        return sock

    def socket_closed(self, sock: ModelledSocket) -> None:
        if self.sockets.get(sock.name) is sock:
            del self.sockets[sock.name]
            self.closed.append(sock)
            self.policy.socket_closed(sock)
            self.device.kick()

    @property
    def memalloc_socks(self) -> int:
        """``sk_memalloc_socks()``: how many open sockets have SOCK_MEMALLOC."""
        return sum(1 for s in self.sockets.values() if s.memalloc)

    def rx_gfp(self) -> gfp_t:
        return self.policy.rx_gfp(self.memalloc_socks)

    def rx_reserve(self) -> object | None:
        return self.policy.rx_reserve()

    def observe(self, fact: object) -> None:
        self.observer(fact)

    def totals(self) -> dict[str, int]:
        every = [*self.sockets.values(), *self.closed]
        device = self.device.stats
        return {
            "PFMemallocDrop": sum(s.stats.pfmemalloc_drop for s in every),
            # packets that found no posted buffer (the ring's refills had failed) or whose
            # skb head could not be allocated
            "rx_alloc_fail": device.rx_no_buffer + device.rx_dropped,
            "emergency_rx": sum(s.stats.emergency_rx for s in every),
            # tcp_data_queue could not charge the skb (tcp_mem, sk_rcvbuf)
            "TCPRcvQDrop": sum(s.stats.rcvq_drop for s in every),
        }

    def memory_now(self) -> dict[str, Any]:
        """The network's memory at this instant, for ``vm.sample``."""
        device, tcp = self.device, self.tcp
        open_sockets = self.sockets.values()
        return {
            "ring_posted": len(device.ring),
            "ring_pages": device.pages,
            "rx_queued": sum(s.rx_pages for s in open_sockets),
            "tx_pages": sum(s.tx_pages for s in open_sockets),
            "tcp_memory_allocated": tcp.allocated,
            "tcp_memory_pressure": tcp.memory_pressure,
        }

    def close(self) -> None:
        """The device goes down (the machine stops): its posted buffers are freed."""
        self.device.close()
