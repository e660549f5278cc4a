"""TCP's memory as Linux 6.1 sizes and accounts for it.

Three layers, each where the kernel has it:

* **The sysctls, from RAM** (``TcpSysctls.for_free_buffer_pages``; net/ipv4/tcp.c
  ``tcp_init_mem`` and ``tcp_init``).  ``tcp_mem`` (pages, for the whole protocol) is 1/16,
  6.25 % and 9.37 % of ``nr_free_buffer_pages()``; the per-socket maxima are "no more than
  1/128 the pressure threshold": ``tcp_wmem[2] = max(64K, min(4M, that))``, ``tcp_rmem[2] =
  max(128K, min(6M, that))``; the defaults (what a new socket starts with, ``tcp_init_sock``)
  are 16K and 128K.  A scenario's ``[net]`` table overrides them.
* **The protocol's memory** (``TcpProto``): ``tcp_memory_allocated`` (pages charged by every
  TCP socket, TX and RX truesize rounded up to pages through ``sk_forward_alloc``), the
  per-CPU batch in front of it (6.0+ ``sk_memory_allocated_add``), ``tcp_memory_pressure``
  (entered above ``tcp_mem[1]`` or by ``tcp_enter_memory_pressure``, left below
  ``tcp_mem[0]``) and ``tcp_sockets_allocated``.
* **One socket's buffers** (``TcpSock``): ``sk_sndbuf`` and ``sk_rcvbuf`` (SO_SNDBUF /
  SO_RCVBUF lock them; otherwise ``tcp_sndbuf_expand`` grows sndbuf with the congestion
  window as ACKs come, ``sk_stream_moderate_sndbuf`` shrinks it when memory fails, and DRS,
  ``tcp_rcv_space_adjust``, grows rcvbuf with what the reader copies), ``sk_wmem_queued``,
  ``sk_rmem_alloc`` and ``sk_forward_alloc``, and the ``__sk_mem_raise_allocated`` rules
  that let a charge through or refuse it; the congestion window in slow start (the model's
  link loses nothing; cwnd sizes sndbuf but does not gate transmission); and the receive
  side's ACK rules: the window each ACK offers (``tcp_select_window``, ``rcv_ssthresh``
  grown by ``tcp_grow_window``), quickacks, and when an ACK is due.

Not modelled: pingpong (interactive) mode, ato estimation (ato stays TCP_ATO_MIN), window
scaling's rounding, collapsing and pruning the receive queue, ``tcp_clamp_window``,
SO_RESERVE_MEM and memcg accounting.

Pure state and arithmetic, no trio: client/net/socket.py calls these where the kernel calls
them, and the tests check them line by line.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

import attrs

from client.mm import PAGE_SIZE
from client.mm.page import PAGE_SHIFT
from client.mm.zone import calculate_watermarks
from client.net.facts import TcpMemoryPressure
from client.net.skbuff import MAX_TCP_HEADER, SKB_HEAD_TRUESIZE, SKB_SHINFO_SIZE, skb_truesize

if TYPE_CHECKING:
    from client.mm import Memory

#: include/net/tcp.h: "#define TCP_INIT_CWND 10".
TCP_INIT_CWND = 10
#: sysctl_tcp_reordering's default (TCP_FASTRETRANS_THRESH).
TCP_REORDERING = 3
#: TCPOLEN_TSTAMP_ALIGNED: the timestamp option every segment carries; the peer's MSS
#: (``mss_clamp``, ``advmss``: 1460 on a 1500-byte MTU) is the data per segment plus it.
TCPOLEN_TSTAMP_ALIGNED = 12
#: include/net/sock.h: "#define TCP_SKB_MIN_TRUESIZE (2048 + SKB_DATA_ALIGN(sizeof(struct
#: sk_buff)))", "#define SOCK_MIN_SNDBUF (TCP_SKB_MIN_TRUESIZE * 2)", "#define
#: SOCK_MIN_RCVBUF TCP_SKB_MIN_TRUESIZE".
TCP_SKB_MIN_TRUESIZE = 2048 + SKB_HEAD_TRUESIZE
SOCK_MIN_SNDBUF = 2 * TCP_SKB_MIN_TRUESIZE
SOCK_MIN_RCVBUF = TCP_SKB_MIN_TRUESIZE
#: include/net/sock.h (6.0+): "/* 1 MB per cpu, in page units */ #define
#: SK_MEMORY_PCPU_RESERVE (1 << (20 - PAGE_SHIFT))".
SK_MEMORY_PCPU_RESERVE = 1 << (20 - PAGE_SHIFT)
#: The kernel's tick: Debian's CONFIG_HZ=250.  Timers below are whole jiffies of it.
HZ = 250
#: include/net/tcp.h: "TCP_DELACK_MAX ((unsigned)(HZ/5))", "TCP_ATO_MIN ((unsigned)(HZ/25))",
#: "TCP_RTO_MAX ((unsigned)(120*HZ))", in seconds.
TCP_DELACK_MAX = (HZ // 5) / HZ
TCP_ATO_MIN = (HZ // 25) / HZ
TCP_RTO_MAX = 120.0
#: include/net/tcp.h: "TCP_RTO_MIN ((unsigned)(HZ/5))", the least retransmission timeout.
TCP_RTO_MIN = (HZ // 5) / HZ
#: include/net/inet_connection_sock.h: "TCP_MAX_QUICKACKS 16U".
TCP_MAX_QUICKACKS = 16
#: net/core/stream.c sk_stream_wait_memory: "current_timeo = vm_wait = prandom_u32_max(HZ
#: / 5) + 2;" -- a sender whose allocation failed while under its sndbuf sleeps that many
#: jiffies.  The model has no machine-wide random source, so it takes the draw's mean,
#: (HZ/5 - 1)/2 + 2 jiffies (106 ms at HZ=250).
VM_WAIT = ((HZ // 5 - 1) / 2 + 2) / HZ

SK_MEM_SEND = 0
SK_MEM_RECV = 1


def sk_mem_pages(amt: int) -> int:
    """include/net/sock.h: "return (amt + PAGE_SIZE - 1) >> PAGE_SHIFT"."""
    return (amt + PAGE_SIZE - 1) >> PAGE_SHIFT


def roundup_pow_of_two(n: int) -> int:
    return 1 << (n - 1).bit_length()


def tcp_win_from_space(space: int) -> int:
    """``tcp_win_from_space`` with ``tcp_adv_win_scale`` at its default, 1: "space - (space
    >> tcp_adv_win_scale)" -- half of the buffer is payload."""
    return space - (space >> 1)


def nr_free_buffer_pages(managed: Sequence[int], high: Sequence[int]) -> int:
    """mm/page_alloc.c nr_free_buffer_pages -> nr_free_zone_pages(gfp_zone(GFP_USER)): for
    each zone up to Normal, "if (size > high) sum += size - high" (managed pages less the
    high watermark).  The model's zones are all lowmem."""
    return sum(max(0, size - mark) for size, mark in zip(managed, high, strict=True))


def boot_free_buffer_pages(memory: Memory) -> int:
    """``nr_free_buffer_pages()`` when ``tcp_init`` runs (an fs_initcall, after
    init_per_zone_wmark_min): the watermarks of ``min_free_kbytes`` alone, before any
    reserve a policy adds later raises them."""
    managed = [z.managed for z in memory.zones]
    marks = calculate_watermarks(
        managed, memory.min_free_kbytes, memory.config.watermark_scale_factor
    )
    return nr_free_buffer_pages(managed, [wm.high for wm in marks])


Triple = tuple[int, int, int]


@attrs.frozen
class TcpSysctls:
    """``net.ipv4.tcp_mem`` (pages), ``tcp_wmem`` and ``tcp_rmem`` (bytes): min, default,
    max."""

    tcp_mem: Triple
    tcp_wmem: Triple
    tcp_rmem: Triple

    @classmethod
    def for_free_buffer_pages(cls, pages: int) -> TcpSysctls:
        """What ``tcp_init`` sets at boot on a machine with ``nr_free_buffer_pages() ==
        pages``."""
        # tcp_init_mem: "unsigned long limit = nr_free_buffer_pages() / 16; limit =
        # max(limit, 128UL); sysctl_tcp_mem[0] = limit / 4 * 3; sysctl_tcp_mem[1] = limit;
        # sysctl_tcp_mem[2] = sysctl_tcp_mem[0] * 2;"
        limit = max(pages // 16, 128)
        tcp_mem = (limit // 4 * 3, limit, limit // 4 * 3 * 2)
        # tcp_init: "Set per-socket limits to no more than 1/128 the pressure threshold":
        # "limit = nr_free_buffer_pages() << (PAGE_SHIFT - 7); max_wshare = min(4UL*1024*1024,
        # limit); max_rshare = min(6UL*1024*1024, limit);"
        share = pages << (PAGE_SHIFT - 7)
        wmem = (PAGE_SIZE, 16 * 1024, max(64 * 1024, min(4 << 20, share)))
        rmem = (PAGE_SIZE, 131072, max(131072, min(6 << 20, share)))
        return cls(tcp_mem, wmem, rmem)

    @classmethod
    def for_memory(cls, memory: Memory) -> TcpSysctls:
        """What ``tcp_init`` sets at boot on ``memory``'s machine."""
        return cls.for_free_buffer_pages(boot_free_buffer_pages(memory))


@attrs.define
class TcpProtoStats:
    memory_pressures: int = 0  # LINUX_MIB_TCPMEMORYPRESSURES
    allocated_peak: int = 0  # the highest tcp_memory_allocated (pages)


class TcpProto:
    """``tcp_prot``'s memory: ``tcp_memory_allocated``, the per-CPU reserve in front of it,
    ``tcp_memory_pressure`` and ``tcp_sockets_allocated``, against ``sysctl_tcp_mem``.

    The model runs every context on one CPU, so one per-CPU counter: the global counter
    the rules read lags what sockets charged by up to ``SK_MEMORY_PCPU_RESERVE`` pages either
    way, as on one CPU of a 6.1 kernel."""

    def __init__(
        self, sysctls: TcpSysctls, *, observe: Callable[[object], None] = lambda _f: None
    ) -> None:
        self.sysctls = sysctls
        self.memory_allocated = 0  # tcp_memory_allocated (atomic_long_t), pages
        self.per_cpu_fw_alloc = 0  # tcp_memory_per_cpu_fw_alloc of the one CPU
        self.memory_pressure = False  # tcp_memory_pressure
        self.sockets_allocated = 0  # tcp_sockets_allocated
        self.stats = TcpProtoStats()
        self._observe = observe

    @property
    def allocated(self) -> int:
        """``sk_memory_allocated`` -> proto_memory_allocated: "max(0L,
        atomic_long_read(prot->memory_allocated))"."""
        return max(0, self.memory_allocated)

    @property
    def charged(self) -> int:
        """Pages charged by all sockets, the per-CPU batch included."""
        return self.memory_allocated + self.per_cpu_fw_alloc

    def allocated_add(self, amt: int) -> None:
        """sk_memory_allocated_add: "local_reserve = __this_cpu_add_return(
        *sk->sk_prot->per_cpu_fw_alloc, amt); if (local_reserve >= SK_MEMORY_PCPU_RESERVE)
        { __this_cpu_sub(..., local_reserve); atomic_long_add(local_reserve,
        sk->sk_prot->memory_allocated); }"."""
        local = self.per_cpu_fw_alloc + amt
        if local >= SK_MEMORY_PCPU_RESERVE:
            self.memory_allocated += local
            local = 0
            if self.memory_allocated > self.stats.allocated_peak:
                self.stats.allocated_peak = self.memory_allocated
        self.per_cpu_fw_alloc = local

    def allocated_sub(self, amt: int) -> None:
        """sk_memory_allocated_sub: the same batch, flushed at ``-SK_MEMORY_PCPU_RESERVE``."""
        local = self.per_cpu_fw_alloc - amt
        if local <= -SK_MEMORY_PCPU_RESERVE:
            self.memory_allocated += local
            local = 0
        self.per_cpu_fw_alloc = local

    def enter_memory_pressure(self) -> None:
        """tcp_enter_memory_pressure: "if (READ_ONCE(tcp_memory_pressure)) return; ...
        NET_INC_STATS(sock_net(sk), LINUX_MIB_TCPMEMORYPRESSURES)"."""
        if self.memory_pressure:
            return
        self.memory_pressure = True
        self.stats.memory_pressures += 1
        self._observe(TcpMemoryPressure(True, self.memory_allocated, self.sysctls.tcp_mem))

    def leave_memory_pressure(self) -> None:
        """tcp_leave_memory_pressure."""
        if not self.memory_pressure:
            return
        self.memory_pressure = False
        self._observe(TcpMemoryPressure(False, self.memory_allocated, self.sysctls.tcp_mem))

    def snapshot(self) -> dict[str, object]:
        return {
            "tcp_mem": list(self.sysctls.tcp_mem),
            "tcp_wmem": list(self.sysctls.tcp_wmem),
            "tcp_rmem": list(self.sysctls.tcp_rmem),
            "tcp_memory_allocated": self.memory_allocated,
            "tcp_memory_charged": self.charged,
            "tcp_memory_pressure": self.memory_pressure,
            "TCPMemoryPressures": self.stats.memory_pressures,
            "tcp_memory_allocated_peak": self.stats.allocated_peak,
        }


@attrs.define
class TcpSockStats:
    sndbuf_moderated: int = 0  # sk_stream_moderate_sndbuf calls that lowered sk_sndbuf
    sndbuf_expanded: int = 0  # tcp_sndbuf_expand calls that raised it
    rcvbuf_grown: int = 0  # tcp_rcv_space_adjust raised sk_rcvbuf
    rmem_refused: int = 0  # sk_rmem_schedule said no (the packet is then dropped)
    rmem_pfmemalloc: int = 0  # ... but a pfmemalloc skb was let through (sk_rmem_schedule)


class TcpSock:
    """The memory fields of one ``struct sock``/``tcp_sock`` and the rules on them.

    ``sndbuf``/``rcvbuf`` given are SO_SNDBUF/SO_RCVBUF as the resulting ``sk_sndbuf``/
    ``sk_rcvbuf`` (sock_setsockopt stores twice what setsockopt was passed; a scenario
    names the buffer, not the argument): they set ``SOCK_SNDBUF_LOCK``/``SOCK_RCVBUF_LOCK``
    and the kernel never changes them.  None: ``tcp_init_sock``'s ``tcp_wmem[1]`` and
    ``tcp_rmem[1]``, then autotuned.  ``mss`` is ``mss_cache`` (data per segment)."""

    def __init__(
        self,
        proto: TcpProto,
        *,
        mss: int,
        sndbuf: int | None = None,
        rcvbuf: int | None = None,
        now: float = 0.0,
    ) -> None:
        self.proto = proto
        s = proto.sysctls
        self.mss = mss  # tp->mss_cache, and icsk_ack.rcv_mss (the peer's is the same)
        self.advmss = mss + TCPOLEN_TSTAMP_ALIGNED  # tp->advmss, tp->rx_opt.mss_clamp
        # tcp_init_sock: "WRITE_ONCE(sk->sk_sndbuf, sock_net(sk)->ipv4.sysctl_tcp_wmem[1]);
        # WRITE_ONCE(sk->sk_rcvbuf, sock_net(sk)->ipv4.sysctl_tcp_rmem[1]);"
        self.sndbuf = s.tcp_wmem[1]
        self.rcvbuf = s.tcp_rmem[1]
        # sock_setsockopt SO_SNDBUF/SO_RCVBUF: "sk->sk_userlocks |= SOCK_SNDBUF_LOCK;
        # WRITE_ONCE(sk->sk_sndbuf, max_t(int, val * 2, SOCK_MIN_SNDBUF));"
        self.sndbuf_locked = sndbuf is not None
        self.rcvbuf_locked = rcvbuf is not None
        if sndbuf is not None:
            self.sndbuf = max(sndbuf, SOCK_MIN_SNDBUF)
        if rcvbuf is not None:
            self.rcvbuf = max(rcvbuf, SOCK_MIN_RCVBUF)
        self.wmem_queued = 0  # sk_wmem_queued: truesize of the write and rtx queues
        self.rmem_alloc = 0  # sk_rmem_alloc: truesize of received skbs held
        self.forward_alloc = 0  # sk_forward_alloc: charged to tcp_memory_allocated, unused
        self.nospace = False  # SOCK_NOSPACE: a writer found no room
        # Congestion control (CUBIC in slow start: the model's link loses nothing).
        self.snd_cwnd = TCP_INIT_CWND
        self.packets_out = 0  # segments sent, not yet acknowledged
        self.max_packets_out = 0
        self.max_packets_seq = 0
        self.is_cwnd_limited = False
        self.snd_una = 0
        self.snd_nxt = 0
        # Receive sequence: what arrived, what we acknowledged, what the reader took.
        self.rcv_nxt = 0
        self.rcv_wup = 0  # rcv_nxt at our last ACK: the peer may send rcv_wnd past it
        self.copied_seq = 0
        # tcp_connect_init -> tcp_select_initial_window(sk, tcp_full_space(sk), mss, ...):
        # "if (space > mss) space = rounddown(space, mss); ... (*rcv_wnd) = min_t(u32,
        # space, U16_MAX);" and rcv_ssthresh starts there (tcp_init_buffer_space).
        space = self.window_clamp
        if space > mss:
            space = space // mss * mss
        self.rcv_wnd = min(space, 0xFFFF)
        self.rcv_ssthresh = self.rcv_wnd
        # Delayed ACKs: icsk_ack.quick (ACKs still to send at once), icsk_ack.ato (0 until
        # the first data: the model keeps it at TCP_ATO_MIN), icsk_ack.lrcvtime.
        self.quick = 0
        self.ato = 0.0
        self.lrcvtime = now
        # tcp_init_buffer_space: "tp->rcvq_space.space = min3(tp->rcv_ssthresh, tp->rcv_wnd,
        # (u32)TCP_INIT_CWND * tp->advmss);" -- the window is never smaller than that here.
        self.rcvq_space = TCP_INIT_CWND * self.advmss
        self.rcvq_seq = 0
        self.rcvq_time = now
        self.stats = TcpSockStats()
        proto.sockets_allocated += 1  # sk_sockets_allocated_inc
        # tcp_init_buffer_space: "if (!(sk->sk_userlocks & SOCK_SNDBUF_LOCK))
        # tcp_sndbuf_expand(sk);"
        if not self.sndbuf_locked:
            self.sndbuf_expand()

    # -- accounting: include/net/sock.h, net/core/sock.c ----------------------------------
    def _raise_allocated(self, size: int, amt: int, kind: int) -> bool:
        """net/core/sock.c __sk_mem_raise_allocated (6.1, without memcg)."""
        proto = self.proto
        low, pressure, high = proto.sysctls.tcp_mem
        proto.allocated_add(amt)
        allocated = proto.allocated
        # "Under limit."
        if allocated <= low:
            proto.leave_memory_pressure()
            return True
        # "Under pressure."
        if allocated > pressure:
            proto.enter_memory_pressure()
        # "Over hard limit." goto suppress_allocation
        if allocated <= high:
            # "guarantee minimum buffer size under pressure"
            if kind == SK_MEM_RECV:
                if self.rmem_alloc < proto.sysctls.tcp_rmem[0]:
                    return True
            elif self.wmem_queued < proto.sysctls.tcp_wmem[0]:
                return True
            # "if (!sk_under_memory_pressure(sk)) return 1; alloc =
            # sk_sockets_allocated_read_positive(sk); if (sk_prot_mem_limits(sk, 2) > alloc *
            # sk_mem_pages(sk->sk_wmem_queued + atomic_read(&sk->sk_rmem_alloc) +
            # sk->sk_forward_alloc)) return 1;"
            if not proto.memory_pressure:
                return True
            mine = sk_mem_pages(self.wmem_queued + self.rmem_alloc + self.forward_alloc)
            if high > proto.sockets_allocated * mine:
                return True
        # suppress_allocation:
        if kind == SK_MEM_SEND:
            self.moderate_sndbuf()
            # "Fail only if socket is _under_ its sndbuf. In this case we cannot block, so
            # that we have to fail."
            if self.wmem_queued + size >= self.sndbuf:
                return True
        proto.allocated_sub(amt)
        return False

    def mem_schedule(self, size: int, kind: int) -> bool:
        """__sk_mem_schedule: "amt = sk_mem_pages(size); sk->sk_forward_alloc += amt <<
        PAGE_SHIFT; ret = __sk_mem_raise_allocated(sk, size, amt, kind); if (!ret)
        sk->sk_forward_alloc -= amt << PAGE_SHIFT;"."""
        amt = sk_mem_pages(size)
        self.forward_alloc += amt << PAGE_SHIFT
        if self._raise_allocated(size, amt, kind):
            return True
        self.forward_alloc -= amt << PAGE_SHIFT
        return False

    def wmem_schedule(self, size: int) -> bool:
        """sk_wmem_schedule: "delta = size - sk->sk_forward_alloc; return delta <= 0 ||
        __sk_mem_schedule(sk, delta, SK_MEM_SEND);"."""
        delta = size - self.forward_alloc
        return delta <= 0 or self.mem_schedule(delta, SK_MEM_SEND)

    def rmem_schedule(self, size: int, pfmemalloc: bool) -> bool:
        """sk_rmem_schedule: "return delta <= 0 || __sk_mem_schedule(sk, delta, SK_MEM_RECV)
        || skb_pfmemalloc(skb);" -- a pfmemalloc skb is let through uncharged: the
        stream-deadlock fix of Gorman's series.  Only a SOCK_MEMALLOC socket gets one
        (``sk_filter`` dropped it before otherwise)."""
        delta = size - self.forward_alloc
        if delta <= 0 or self.mem_schedule(delta, SK_MEM_RECV):
            return True
        self.stats.rmem_refused += 1
        if pfmemalloc:
            self.stats.rmem_pfmemalloc += 1
        return pfmemalloc

    def forced_mem_schedule(self, size: int) -> None:
        """sk_forced_mem_schedule: "delta = size - sk->sk_forward_alloc; if (delta <= 0)
        return; amt = sk_mem_pages(delta); sk->sk_forward_alloc += amt << PAGE_SHIFT;
        sk_memory_allocated_add(sk, amt);" -- whatever the limits say."""
        delta = size - self.forward_alloc
        if delta <= 0:
            return
        amt = sk_mem_pages(delta)
        self.forward_alloc += amt << PAGE_SHIFT
        self.proto.allocated_add(amt)

    def mem_uncharge(self, size: int) -> None:
        """sk_mem_uncharge (6.0+: "net: keep sk->sk_forward_alloc as small as possible"):
        "sk->sk_forward_alloc += size; sk_mem_reclaim(sk);" -- sk_mem_reclaim gives back
        every whole page: "if (reclaimable >= (int)PAGE_SIZE) __sk_mem_reclaim(sk,
        reclaimable);"."""
        self.forward_alloc += size
        if self.forward_alloc >= PAGE_SIZE:
            self._mem_reclaim(self.forward_alloc)

    def _mem_reclaim(self, amount: int) -> None:
        """__sk_mem_reclaim: "amount >>= PAGE_SHIFT; sk->sk_forward_alloc -= amount <<
        PAGE_SHIFT; __sk_mem_reduce_allocated(sk, amount);" -- which leaves pressure "if
        (sk_under_global_memory_pressure(sk) && (sk_memory_allocated(sk) <
        sk_prot_mem_limits(sk, 0)))"."""
        pages = amount >> PAGE_SHIFT
        self.forward_alloc -= pages << PAGE_SHIFT
        proto = self.proto
        proto.allocated_sub(pages)
        if proto.memory_pressure and proto.allocated < proto.sysctls.tcp_mem[0]:
            proto.leave_memory_pressure()

    def close(self) -> None:
        """The socket is destroyed with every skb freed: its forward allocation goes back
        (sk_mem_reclaim_final) and it no longer counts in tcp_sockets_allocated."""
        if self.forward_alloc > 0:
            self._mem_reclaim(self.forward_alloc)
        self.proto.sockets_allocated -= 1

    # -- TX: net/ipv4/tcp.c, net/core/stream.c -------------------------------------------
    def memory_free(self) -> bool:
        """__sk_stream_memory_free: "if (READ_ONCE(sk->sk_wmem_queued) >=
        READ_ONCE(sk->sk_sndbuf)) return false;" (tcp_notsent_lowat is unlimited)."""
        return self.wmem_queued < self.sndbuf

    def is_writeable(self) -> bool:
        """__sk_stream_is_writeable(sk, 1): "sk_stream_wspace(sk) >=
        sk_stream_min_wspace(sk) && __sk_stream_memory_free(sk, wake)" -- free room at
        least half of what is queued."""
        return self.sndbuf - self.wmem_queued >= self.wmem_queued >> 1 and self.memory_free()

    def moderate_sndbuf(self) -> None:
        """sk_stream_moderate_sndbuf: "if (sk->sk_userlocks & SOCK_SNDBUF_LOCK) return; val =
        min(sk->sk_sndbuf, sk->sk_wmem_queued >> 1); ... WRITE_ONCE(sk->sk_sndbuf,
        max_t(u32, val, SOCK_MIN_SNDBUF));"."""
        if self.sndbuf_locked:
            return
        val = max(min(self.sndbuf, self.wmem_queued >> 1), SOCK_MIN_SNDBUF)
        if val < self.sndbuf:
            self.stats.sndbuf_moderated += 1
        self.sndbuf = val

    def stream_skb_scheduled(self, truesize: int, *, first: bool) -> bool:
        """tcp_stream_alloc_skb's charge for a new skb of ``truesize``: "if (force_schedule)
        { mem_scheduled = true; sk_forced_mem_schedule(sk, skb->truesize); } else {
        mem_scheduled = sk_wmem_schedule(sk, skb->truesize); }" -- forced for the first skb
        of an empty queue (tcp_rtx_and_write_queues_empty); then tcp_skb_entail queues it:
        "sk_wmem_queued_add(sk, skb->truesize); sk_mem_charge(sk, skb->truesize);"."""
        if first:
            self.forced_mem_schedule(truesize)
        elif not self.wmem_schedule(truesize):
            return False
        self.wmem_queued += truesize
        self.forward_alloc -= truesize
        return True

    def wmem_schedule_copy(self, copy: int) -> int:
        """tcp_wmem_schedule: "if (likely(sk_wmem_schedule(sk, copy))) return copy; ... left =
        sock_net(sk)->ipv4.sysctl_tcp_wmem[0] - sk->sk_wmem_queued; if (left > 0)
        sk_forced_mem_schedule(sk, min(left, copy)); return min(copy,
        sk->sk_forward_alloc);" -- how much of ``copy`` may be copied now."""
        if self.wmem_schedule(copy):
            return copy
        left = self.proto.sysctls.tcp_wmem[0] - self.wmem_queued
        if left > 0:
            self.forced_mem_schedule(min(left, copy))
        return max(0, min(copy, self.forward_alloc))

    def charge_copy(self, copy: int) -> None:
        """skb_copy_to_page_nocache: "skb->truesize += copy; sk_wmem_queued_add(sk, copy);
        sk_mem_charge(sk, copy);"."""
        self.wmem_queued += copy
        self.forward_alloc -= copy

    def free_skb(self, truesize: int) -> None:
        """sk_wmem_free_skb: "sk_wmem_queued_add(sk, -skb->truesize); sk_mem_uncharge(sk,
        skb->truesize);"."""
        self.wmem_queued -= truesize
        self.mem_uncharge(truesize)

    def sent(self, size: int, segs: int) -> None:
        """Segments leave (tcp_event_new_data_sent: packets_out grows) and
        tcp_cwnd_validate remembers the largest flight of the window: "if
        (!before(tp->snd_una, tp->max_packets_seq) || tp->packets_out > tp->max_packets_out)
        { tp->max_packets_out = tp->packets_out; tp->max_packets_seq = tp->snd_nxt; ...
        tp->is_cwnd_limited = is_cwnd_limited; } else tp->is_cwnd_limited |=
        is_cwnd_limited" (cwnd-limited: a full congestion window in flight)."""
        self.packets_out += segs
        self.snd_nxt += size
        limited = self.packets_out >= self.snd_cwnd
        if self.snd_una >= self.max_packets_seq or self.packets_out > self.max_packets_out:
            self.max_packets_out = self.packets_out
            self.max_packets_seq = self.snd_nxt
            self.is_cwnd_limited = limited
        else:
            self.is_cwnd_limited |= limited

    def acked(self, size: int, segs: int) -> None:
        """tcp_ack for ``segs`` newly acknowledged segments: tcp_clean_rtx_queue, then
        tcp_cong_control -> CUBIC's cong_avoid in slow start: "if
        (!tcp_is_cwnd_limited(sk)) return; if (tcp_in_slow_start(tp)) acked =
        tcp_slow_start(tp, acked);" with "cwnd = min(tcp_snd_cwnd(tp) + acked,
        tp->snd_ssthresh)" (the model's link loses nothing: ssthresh stays infinite).
        tcp_is_cwnd_limited: "if (tp->is_cwnd_limited) return true; if
        (tcp_in_slow_start(tp)) return tcp_snd_cwnd(tp) < 2 * tp->max_packets_out;"."""
        self.snd_una += size
        if self.is_cwnd_limited or self.snd_cwnd < 2 * self.max_packets_out:
            self.snd_cwnd += segs
        self.packets_out -= segs

    def sndbuf_expand(self) -> None:
        """tcp_sndbuf_expand: "per_mss = max_t(u32, tp->rx_opt.mss_clamp, tp->mss_cache) +
        MAX_TCP_HEADER + SKB_DATA_ALIGN(sizeof(struct skb_shared_info)); per_mss =
        roundup_pow_of_two(per_mss) + SKB_DATA_ALIGN(sizeof(struct sk_buff)); nr_segs =
        max_t(u32, TCP_INIT_CWND, tcp_snd_cwnd(tp)); nr_segs = max_t(u32, nr_segs,
        tp->reordering + 1); sndmem = ca_ops->sndbuf_expand ? ca_ops->sndbuf_expand(sk) : 2;
        sndmem *= nr_segs * per_mss; if (sk->sk_sndbuf < sndmem) WRITE_ONCE(sk->sk_sndbuf,
        min(sndmem, sock_net(sk)->ipv4.sysctl_tcp_wmem[2]));" (CUBIC has no sndbuf_expand)."""
        per_mss = max(self.advmss, self.mss) + MAX_TCP_HEADER + SKB_SHINFO_SIZE
        per_mss = roundup_pow_of_two(per_mss) + SKB_HEAD_TRUESIZE
        nr_segs = max(TCP_INIT_CWND, self.snd_cwnd, TCP_REORDERING + 1)
        sndmem = 2 * nr_segs * per_mss
        if self.sndbuf < sndmem:
            new = min(sndmem, self.proto.sysctls.tcp_wmem[2])
            if new > self.sndbuf:
                self.stats.sndbuf_expanded += 1
                self.sndbuf = new

    def should_expand_sndbuf(self) -> bool:
        """tcp_should_expand_sndbuf: not SOCK_SNDBUF_LOCK; "If we are under global TCP memory
        pressure, do not expand"; "If we are under soft global TCP memory pressure, do not
        expand" (``sk_memory_allocated(sk) >= sk_prot_mem_limits(sk, 0)``); "If we filled
        the congestion window, do not expand" (``tcp_packets_in_flight(tp) >=
        tcp_snd_cwnd(tp)``: the model transmits regardless of cwnd, so what is beyond
        cwnd counts as queued, not in flight, and the test is packets_out >= cwnd)."""
        proto = self.proto
        if self.sndbuf_locked or proto.memory_pressure:
            return False
        if proto.allocated >= proto.sysctls.tcp_mem[0]:
            return False
        return self.packets_out < self.snd_cwnd

    def check_space(self) -> bool:
        """tcp_check_space after an ACK freed queue space: "if (sk->sk_socket &&
        test_bit(SOCK_NOSPACE, &sk->sk_socket->flags)) tcp_new_space(sk);" -- tcp_new_space
        expands sndbuf if it should, then sk_stream_write_space wakes the writers if the
        socket is writeable (clearing SOCK_NOSPACE).  True: wake them."""
        if not self.nospace:
            return False
        if self.should_expand_sndbuf():
            self.sndbuf_expand()
        if self.is_writeable():
            self.nospace = False
            return True
        return False

    # -- RX: net/ipv4/tcp_input.c ---------------------------------------------------------
    def data_queue_scheduled(self, truesize: int, *, pfmemalloc: bool, queue_empty: bool) -> bool:
        """tcp_data_queue, an in-sequence segment: "if (skb_queue_len(&sk->sk_receive_queue)
        == 0) sk_forced_mem_schedule(sk, skb->truesize); else if (tcp_try_rmem_schedule(sk,
        skb, skb->truesize)) { ... NET_INC_STATS(sock_net(sk), LINUX_MIB_TCPRCVQDROP); ...
        goto drop; }".  tcp_try_rmem_schedule: "if (atomic_read(&sk->sk_rmem_alloc) >
        sk->sk_rcvbuf || !sk_rmem_schedule(sk, skb, size)) { if (tcp_prune_queue(sk, skb) <
        0) return -1; while (!sk_rmem_schedule(sk, skb, size)) { if
        (!tcp_prune_ofo_queue(sk, skb)) return -1; } }" -- the model's receive queue holds
        in-order, uncollapsible skbs and no out-of-order queue, so pruning frees nothing."""
        if queue_empty:
            self.forced_mem_schedule(truesize)
            return True
        if self.rmem_alloc > self.rcvbuf:
            return False
        return self.rmem_schedule(truesize, pfmemalloc)

    def set_owner_r(self, truesize: int, size: int, now: float = 0.0) -> None:
        """tcp_queue_rcv: tcp_rcv_nxt_update and skb_set_owner_r ("atomic_add(skb->truesize,
        &sk->sk_rmem_alloc); sk_mem_charge(sk, skb->truesize);"); then
        tcp_event_data_recv."""
        self.rmem_alloc += truesize
        self.forward_alloc -= truesize
        self.rcv_nxt += size
        self.event_data_recv(now, truesize, size)

    def event_data_recv(self, now: float, truesize: int, size: int) -> None:
        """tcp_event_data_recv: "if (!icsk->icsk_ack.ato) { /* The _first_ data packet
        received, initialize delayed ACK engine. */ tcp_incr_quickack(sk,
        TCP_MAX_QUICKACKS); icsk->icsk_ack.ato = TCP_ATO_MIN; } else { ... } else if (m >
        icsk->icsk_rto) { /* Too long gap. Apparently sender failed to restart window, so
        that we send ACKs quickly. */ tcp_incr_quickack(sk, TCP_MAX_QUICKACKS); } }
        icsk->icsk_ack.lrcvtime = now; ... tcp_grow_window(sk, skb, true);" (the model's
        ato stays TCP_ATO_MIN; its rto is TCP_RTO_MIN)."""
        if not self.ato:
            self.incr_quickack()
            self.ato = TCP_ATO_MIN
        elif now - self.lrcvtime > TCP_RTO_MIN:
            self.incr_quickack()
        self.lrcvtime = now
        self.grow_window(truesize, size)

    def incr_quickack(self) -> None:
        """tcp_incr_quickack(sk, TCP_MAX_QUICKACKS): "unsigned int quickacks =
        tcp_sk(sk)->rcv_wnd / (2 * icsk->icsk_ack.rcv_mss); if (quickacks == 0)
        quickacks = 2; quickacks = min(quickacks, max_quickacks); if (quickacks >
        icsk->icsk_ack.quick) icsk->icsk_ack.quick = quickacks;"."""
        quickacks = self.rcv_wnd // (2 * self.mss) or 2
        self.quick = max(self.quick, min(quickacks, TCP_MAX_QUICKACKS))

    def rfree(self, truesize: int) -> None:
        """sock_rfree: "atomic_sub(len, &sk->sk_rmem_alloc); sk_mem_uncharge(sk, len);"."""
        self.rmem_alloc -= truesize
        self.mem_uncharge(truesize)

    # -- the receive window: net/ipv4/tcp_output.c, tcp_input.c ----------------------------
    @property
    def window_clamp(self) -> int:
        """``tp->window_clamp``: tcp_full_space(sk), ``tcp_win_from_space(sk_rcvbuf)``
        (tcp_init_buffer_space, and DRS makes it follow rcvbuf)."""
        return tcp_win_from_space(self.rcvbuf)

    def space(self) -> int:
        """tcp_space: "tcp_win_from_space(sk, READ_ONCE(sk->sk_rcvbuf) -
        READ_ONCE(sk->sk_backlog.len) - atomic_read(&sk->sk_rmem_alloc))"."""
        return tcp_win_from_space(max(0, self.rcvbuf - self.rmem_alloc))

    def receive_window(self) -> int:
        """tcp_receive_window: what the peer may still send, "(s32)(tp->rcv_wup +
        tp->rcv_wnd - tp->rcv_nxt)" (never below 0)."""
        return max(0, self.rcv_wup + self.rcv_wnd - self.rcv_nxt)

    def _adjust_rcv_ssthresh(self) -> None:
        """tcp_adjust_rcv_ssthresh, under TCP memory pressure: "tp->rcv_ssthresh =
        min(tp->rcv_ssthresh, 4U * tp->advmss);"."""
        self.rcv_ssthresh = min(self.rcv_ssthresh, 4 * self.advmss)

    def grow_window(self, truesize: int, size: int) -> None:
        """tcp_grow_window, for each in-order data skb (tcp_event_data_recv): "room =
        min_t(int, tp->window_clamp, tcp_space(sk)) - tp->rcv_ssthresh; if (room <= 0)
        return; if (!tcp_under_memory_pressure(sk)) { ... if (tcp_win_from_space(sk,
        truesize) <= skb->len) incr = 2 * tp->advmss; else incr = __tcp_grow_window(sk,
        skb, truesize); if (incr) { incr = max_t(int, incr, 2 * skb->len);
        tp->rcv_ssthresh += min(room, incr); ... } } else { tcp_adjust_rcv_ssthresh(sk); }"."""
        room = min(self.window_clamp, self.space()) - self.rcv_ssthresh
        if room <= 0:
            return
        if self.proto.memory_pressure:
            self._adjust_rcv_ssthresh()
            return
        if tcp_win_from_space(truesize) <= size:
            incr = 2 * self.advmss
        else:
            # __tcp_grow_window: "int truesize = tcp_win_from_space(sk, skbtruesize) >> 1;
            # int window = tcp_win_from_space(sk, sysctl_tcp_rmem[2]) >> 1; while
            # (tp->rcv_ssthresh <= window) { if (truesize <= skb->len) return 2 *
            # inet_csk(sk)->icsk_ack.rcv_mss; truesize >>= 1; window >>= 1; } return 0;"
            incr = 0
            half = tcp_win_from_space(truesize) >> 1
            window = tcp_win_from_space(self.proto.sysctls.tcp_rmem[2]) >> 1
            while self.rcv_ssthresh <= window:
                if half <= size:
                    incr = 2 * self.mss
                    break
                half >>= 1
                window >>= 1
        if incr:
            self.rcv_ssthresh += min(room, max(incr, 2 * size))
            self.quick |= 1  # "inet_csk(sk)->icsk_ack.quick |= 1;"

    def select_window_raw(self) -> int:
        """__tcp_select_window: the free space (``tcp_space``), capped at rcv_ssthresh;
        "if (free_space < (full_space >> 1)) { ... if (tcp_under_memory_pressure(sk))
        tcp_adjust_rcv_ssthresh(sk); ... if (free_space < (allowed_space >> 4) ||
        free_space < mss) return 0; }" -- the model has no window scaling to round to."""
        free = self.space()
        allowed = self.window_clamp
        if free < allowed >> 1:
            if self.proto.memory_pressure:
                self._adjust_rcv_ssthresh()
            if free < allowed >> 4 or free < self.mss:
                return 0
        return min(free, self.rcv_ssthresh)

    def ack_now(self) -> bool:
        """__tcp_ack_snd_check: "More than one full frame received... ((tp->rcv_nxt -
        tp->rcv_wup) > inet_csk(sk)->icsk_ack.rcv_mss && ... right edge of window advances
        far enough (__tcp_select_window(sk) >= tp->rcv_wnd)) || /* We ACK each frame or...
        */ tcp_in_quickack_mode(sk)" -- if the reader holds the data the window would not
        advance: the delayed-ACK timer or the reader's tcp_cleanup_rbuf sends the ACK.
        (tcp_in_quickack_mode is "icsk->icsk_ack.quick && !inet_csk_in_pingpong_mode(sk)":
        the model has no pingpong mode.)"""
        if self.quick:
            return True
        return self.rcv_nxt - self.rcv_wup > self.mss and self.select_window_raw() >= self.rcv_wnd

    def window_update_due(self) -> bool:
        """tcp_cleanup_rbuf after the reader copied: "We send an ACK if we can now advertise
        a non-zero window which has been raised "significantly"": "if (2*rcv_window_now <=
        tp->window_clamp) { __u32 new_window = __tcp_select_window(sk); if (new_window &&
        new_window >= 2 * rcv_window_now) time_to_ack = true; }"."""
        now = self.receive_window()
        if 2 * now > self.window_clamp:
            return False
        new = self.select_window_raw()
        return bool(new) and new >= 2 * now

    def ack_sent(self, pkts: int = 1) -> None:
        """An ACK, or a data skb of ``pkts`` segments (each carries one), leaves:
        tcp_select_window, "/* Never shrink the offered window */ if (new_win < cur_win) {
        ... new_win = ALIGN(cur_win, 1 << tp->rx_opt.rcv_wscale); } tp->rcv_wnd = new_win;
        tp->rcv_wup = tp->rcv_nxt;" -- the peer may now send up to rcv_nxt + new_win; and
        tcp_event_ack_sent -> tcp_dec_quickack_mode: "if (pkts >= icsk->icsk_ack.quick) {
        icsk->icsk_ack.quick = 0; ... } else icsk->icsk_ack.quick -= pkts;"."""
        self.rcv_wnd = max(self.select_window_raw(), self.receive_window())
        self.rcv_wup = self.rcv_nxt
        self.quick = max(0, self.quick - pkts)

    def rcv_space_adjust(self, now: float, rtt: float) -> None:
        """tcp_rcv_space_adjust (DRS, after the reader copied): once per receiver RTT,
        "copied = tp->copied_seq - tp->rcvq_space.seq; if (copied <= tp->rcvq_space.space)
        goto new_measure;" else, with tcp_moderate_rcvbuf and no SOCK_RCVBUF_LOCK, "rcvwin =
        ((u64)copied << 1) + 16 * tp->advmss; grow = rcvwin * (copied -
        tp->rcvq_space.space); do_div(grow, tp->rcvq_space.space); rcvwin += (grow << 1);
        rcvmem = SKB_TRUESIZE(tp->advmss + MAX_TCP_HEADER); while (tcp_win_from_space(sk,
        rcvmem) < tp->advmss) rcvmem += 128; do_div(rcvwin, tp->advmss); rcvbuf =
        min_t(u64, rcvwin * rcvmem, READ_ONCE(sock_net(sk)->ipv4.sysctl_tcp_rmem[2])); if
        (rcvbuf > sk->sk_rcvbuf) WRITE_ONCE(sk->sk_rcvbuf, rcvbuf);".  The receiver's RTT
        estimate is the socket's latency; "if (time < (tp->rcv_rtt_est.rtt_us >> 3) ||
        tp->rcv_rtt_est.rtt_us == 0) return;" -- a link of no latency never measures one."""
        if rtt <= 0 or now - self.rcvq_time < rtt:
            return
        copied = self.copied_seq - self.rcvq_seq
        if copied > self.rcvq_space:
            if not self.rcvbuf_locked:
                rcvwin = (copied << 1) + 16 * self.advmss
                grow = rcvwin * (copied - self.rcvq_space) // self.rcvq_space
                rcvwin += grow << 1
                rcvmem = skb_truesize(self.advmss + MAX_TCP_HEADER)
                while tcp_win_from_space(rcvmem) < self.advmss:
                    rcvmem += 128
                rcvbuf = min(rcvwin // self.advmss * rcvmem, self.proto.sysctls.tcp_rmem[2])
                if rcvbuf > self.rcvbuf:
                    # "WRITE_ONCE(sk->sk_rcvbuf, rcvbuf); /* Make the window clamp follow
                    # along.  */ tp->window_clamp = tcp_win_from_space(sk, rcvbuf);"
                    self.stats.rcvbuf_grown += 1
                    self.rcvbuf = rcvbuf
            self.rcvq_space = copied
        self.rcvq_seq = self.copied_seq  # new_measure:
        self.rcvq_time = now

    def snapshot(self) -> dict[str, object]:
        return {
            "sndbuf": self.sndbuf,
            "rcvbuf": self.rcvbuf,
            "sndbuf_locked": self.sndbuf_locked,
            "rcvbuf_locked": self.rcvbuf_locked,
            "wmem_queued": self.wmem_queued,
            "rmem_alloc": self.rmem_alloc,
            "forward_alloc": self.forward_alloc,
            "snd_cwnd": self.snd_cwnd,
            "rcv_wnd": self.rcv_wnd,
            **attrs.asdict(self.stats),
        }
