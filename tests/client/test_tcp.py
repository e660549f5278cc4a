"""TCP buffer sizing as Linux 6.1 does it (client/net/tcp.py, client/net/skbuff.py and the
socket that applies them, issue G §2-§3), with worked numbers.

The pure rules first (``TcpSysctls``, ``TcpProto``, ``TcpSock``: no trio), then the socket
on the small machine of tests/client/netrig.py, under trio's virtual clock.  Sizes are x86_64
6.1's: an MSS of 1448 bytes of data (1460 with the timestamp option), MAX_TCP_HEADER 320,
struct skb_shared_info 320 and struct sk_buff 256 once aligned, so ``tcp_sndbuf_expand``'s
``per_mss`` is roundup_pow_of_two(1460 + 320 + 320) + 256 = 4352 bytes, and a TX skb's head
(alloc_skb_fclone(MAX_TCP_HEADER): 640 bytes of kmalloc, served by kmalloc-1k) has a
truesize of 1280.
"""

from __future__ import annotations

import pytest

from client.mm import PAGE_SIZE, Memory, MemoryConfig
from client.mm.policy import NullPolicy
from client.net.skbuff import MAX_TCP_HEADER, alloc_skb_truesize
from client.net.tcp import (
    SK_MEM_RECV,
    SK_MEMORY_PCPU_RESERVE,
    SOCK_MIN_RCVBUF,
    SOCK_MIN_SNDBUF,
    TCP_ATO_MIN,
    VM_WAIT,
    TcpProto,
    TcpSock,
    TcpSysctls,
    boot_free_buffer_pages,
)

MSS = 1448  # data per segment: a 1500-byte MTU less IP, TCP and timestamps

#: tcp_init's sysctls for the 64 MiB machine of configs/swap-over-nbd.toml.
SYSCTLS_64M = TcpSysctls.for_free_buffer_pages(16000)
TX_HEAD = 1280
PER_MSS = 4352


def test_constants_are_the_kernels() -> None:
    assert MAX_TCP_HEADER == 320 and alloc_skb_truesize(MAX_TCP_HEADER) == TX_HEAD
    assert (SOCK_MIN_SNDBUF, SOCK_MIN_RCVBUF) == (4608, 2304)
    assert SK_MEMORY_PCPU_RESERVE == 256  # 1 MiB per CPU, in pages
    assert TCP_ATO_MIN == 0.04 and pytest.approx(0.106) == VM_WAIT


# -- the sysctls ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("mib", "free_buffer_pages", "tcp_mem", "wmem_max", "rmem_max"),
    [
        # high watermark 192 of 4096 pages; 3904 / 16 = 244; 3904 << 5 = 124928 bytes
        (16, 3904, (183, 244, 366), 124928, 131072),
        # high 384 of 16384; 1000; 512000 bytes: the 64 MiB scenario's
        (64, 16000, (750, 1000, 1500), 512000, 512000),
        # high 663 of 49152; 3030; 1551648 bytes
        (192, 48489, (2271, 3030, 4542), 1551648, 1551648),
        # high 1548 of 262144; 16287; 8339072 bytes, above both caps (4M, 6M)
        (1024, 260596, (12213, 16287, 24426), 4 << 20, 6 << 20),
    ],
)
def test_sysctls_from_ram_as_tcp_init_computes_them(
    mib: int,
    free_buffer_pages: int,
    tcp_mem: tuple[int, int, int],
    wmem_max: int,
    rmem_max: int,
) -> None:
    """tcp_init_mem: limit = nr_free_buffer_pages() / 16 (at least 128), tcp_mem = [limit/4*3,
    limit, 2 * limit/4*3]; tcp_init: "no more than 1/128 the pressure threshold":
    tcp_wmem[2] = max(64K, min(4M, pages << 5)), tcp_rmem[2] = max(128K, min(6M, that));
    the defaults 16K and 128K."""
    memory = Memory.from_config(MemoryConfig(total_bytes=mib << 20))
    assert boot_free_buffer_pages(memory) == free_buffer_pages
    sysctls = TcpSysctls.for_memory(memory)
    assert sysctls.tcp_mem == tcp_mem
    assert sysctls.tcp_wmem == (PAGE_SIZE, 16384, wmem_max)
    assert sysctls.tcp_rmem == (PAGE_SIZE, 131072, rmem_max)


def test_a_tiny_machine_gets_the_floors() -> None:
    """The netrig machine: 928 free buffer pages, /16 = 58 is raised to 128; 29696 bytes
    of share is below both floors."""
    assert TcpSysctls.for_free_buffer_pages(928) == TcpSysctls(
        (96, 128, 192), (4096, 16384, 65536), (4096, 131072, 131072)
    )


class _ReservesMin(NullPolicy):
    def extra_min_pages(self) -> int:
        return 512


def test_sysctls_are_computed_at_boot_before_a_policy_raises_min() -> None:
    """tcp_init runs at boot: a reserve that raises min later (Zijlstra's var_free_kbytes)
    does not move tcp_mem."""
    plain = Memory.from_config(MemoryConfig(total_bytes=64 << 20))
    raised = Memory.from_config(MemoryConfig(total_bytes=64 << 20), policy=_ReservesMin())
    assert raised.zones[0].watermarks.high > plain.zones[0].watermarks.high
    assert TcpSysctls.for_memory(raised) == TcpSysctls.for_memory(plain) == SYSCTLS_64M


# -- one socket's buffers: pure -------------------------------------------------------------


def _proto(tcp_mem: tuple[int, int, int] = (750, 1000, 1500)) -> TcpProto:
    return TcpProto(TcpSysctls(tcp_mem, SYSCTLS_64M.tcp_wmem, SYSCTLS_64M.tcp_rmem))


def test_a_new_socket_starts_from_tcp_sndbuf_expand_and_tcp_rmem1() -> None:
    """tcp_init_sock: sk_sndbuf = tcp_wmem[1], sk_rcvbuf = tcp_rmem[1]; then
    tcp_init_buffer_space -> tcp_sndbuf_expand: 2 * max(cwnd, TCP_INIT_CWND) * per_mss =
    2 * 10 * 4352 = 87040, under tcp_wmem[2]."""
    sk = TcpSock(_proto(), mss=MSS)
    assert (sk.sndbuf, sk.rcvbuf) == (87040, 131072)
    assert not sk.sndbuf_locked and not sk.rcvbuf_locked
    small = TcpProto(TcpSysctls.for_free_buffer_pages(928))
    assert TcpSock(small, mss=MSS).sndbuf == 65536  # capped at tcp_wmem[2]


def test_so_sndbuf_and_so_rcvbuf_set_the_buffer_and_lock_it() -> None:
    """The values are the resulting sk_sndbuf/sk_rcvbuf (what setsockopt stores, twice its
    argument), locked; the kernel's floors still apply (SOCK_MIN_SNDBUF, SOCK_MIN_RCVBUF)."""
    sk = TcpSock(_proto(), mss=MSS, sndbuf=768 << 10, rcvbuf=1 << 20)
    assert (sk.sndbuf, sk.rcvbuf) == (768 << 10, 1 << 20)
    assert sk.sndbuf_locked and sk.rcvbuf_locked
    tiny = TcpSock(_proto(), mss=MSS, sndbuf=1000, rcvbuf=1000)
    assert (tiny.sndbuf, tiny.rcvbuf) == (SOCK_MIN_SNDBUF, SOCK_MIN_RCVBUF)
    sk.nospace = True
    sk.sent(10 * MSS, 10)
    sk.acked(10 * MSS, 10)
    sk.check_space()
    sk.moderate_sndbuf()
    assert sk.sndbuf == 768 << 10  # SOCK_SNDBUF_LOCK: never expanded, never moderated


def test_sndbuf_grows_with_the_congestion_window_after_each_ack() -> None:
    """A writer that keeps a congestion window in flight and waits for room (SOCK_NOSPACE):
    each ACK of 10 segments grows cwnd by 10 in slow start (it is cwnd-limited), and
    tcp_new_space -> tcp_sndbuf_expand makes sndbuf 2 * cwnd * 4352, up to tcp_wmem[2]."""
    sk = TcpSock(_proto(), mss=MSS)
    after_each_ack = []
    for _round in range(3):
        skbs = sk.snd_cwnd // 10
        for _ in range(skbs):
            sk.sent(10 * MSS, 10)  # a full window: is_cwnd_limited
        for _ in range(skbs):
            sk.nospace = True
            sk.acked(10 * MSS, 10)
            assert sk.check_space()  # writeable: the writer is woken
            after_each_ack.append((sk.snd_cwnd, sk.sndbuf))
    assert after_each_ack == [
        (20, 174080),
        (30, 261120),
        (40, 348160),
        (50, 435200),
        (60, 512000),  # 522240, capped at tcp_wmem[2]
        (70, 512000),
        (80, 512000),
    ]


def test_an_application_limited_flow_stops_growing_sndbuf() -> None:
    """tcp_is_cwnd_limited in slow start: "tcp_snd_cwnd(tp) < 2 * tp->max_packets_out" --
    a writer that keeps 20 segments in flight grows cwnd to 40 and sndbuf to 2 * 40 * 4352
    = 348160, and no further."""
    sk = TcpSock(_proto(), mss=MSS)
    for _round in range(5):
        sk.sent(10 * MSS, 10)
        sk.sent(10 * MSS, 10)
        for _ in range(2):
            sk.nospace = True
            sk.acked(10 * MSS, 10)
            sk.check_space()
    assert (sk.snd_cwnd, sk.sndbuf) == (40, 348160)


def test_sndbuf_does_not_grow_under_pressure_or_above_tcp_mem0() -> None:
    proto = _proto()
    sk = TcpSock(proto, mss=MSS)
    sk.sent(10 * MSS, 10)
    proto.memory_allocated = 750  # tcp_mem[0]: "soft global TCP memory pressure"
    sk.nospace = True
    sk.acked(10 * MSS, 10)
    sk.check_space()
    assert sk.sndbuf == 87040
    proto.memory_allocated = 0
    proto.enter_memory_pressure()
    sk.sent(20 * MSS, 20)
    sk.nospace = True
    sk.acked(20 * MSS, 20)
    sk.check_space()
    assert sk.sndbuf == 87040


def test_moderate_sndbuf_halves_it_to_what_is_queued_down_to_sock_min_sndbuf() -> None:
    sk = TcpSock(_proto(), mss=MSS)
    sk.wmem_queued = TX_HEAD + 65536 + TX_HEAD
    sk.moderate_sndbuf()
    assert sk.sndbuf == 34048  # min(87040, 68096 >> 1)
    sk.wmem_queued = 0
    sk.moderate_sndbuf()
    assert sk.sndbuf == SOCK_MIN_SNDBUF


def test_the_per_cpu_reserve_batches_tcp_memory_allocated() -> None:
    """sk_memory_allocated_add/_sub (6.0+): charges gather on the CPU and reach
    tcp_memory_allocated, which every rule reads, 256 pages at a time, either way."""
    proto = _proto()
    proto.allocated_add(255)
    assert (proto.memory_allocated, proto.charged) == (0, 255)
    proto.allocated_add(1)
    assert (proto.memory_allocated, proto.per_cpu_fw_alloc) == (256, 0)
    proto.allocated_sub(255)
    assert (proto.memory_allocated, proto.charged) == (256, 1)
    proto.allocated_sub(1)
    assert (proto.memory_allocated, proto.per_cpu_fw_alloc) == (0, 0)


def test_sk_mem_raise_allocated_receive_rules() -> None:
    """__sk_mem_raise_allocated with tcp_mem [300, 400, 500] and the rest of the machine's
    sockets holding ``memory_allocated`` pages: under tcp_mem[0] anything goes and pressure
    is left; above tcp_mem[1] pressure is entered; up to tcp_mem[2] a socket below
    tcp_rmem[0] is guaranteed, one under pressure only if tcp_mem[2] > sockets x its
    pages; above tcp_mem[2] nothing is charged."""
    proto = _proto((300, 400, 500))
    sk = TcpSock(proto, mss=MSS)
    skb = 2304
    proto.memory_allocated = 350
    assert sk.rmem_schedule(skb, False) and not proto.memory_pressure
    sk.set_owner_r(skb, MSS)
    sk.rmem_alloc = 8192  # holds more than tcp_rmem[0]
    sk.forward_alloc = 0
    assert sk.rmem_schedule(skb, False) and not proto.memory_pressure
    proto.memory_allocated = 450
    assert sk.rmem_schedule(skb + PAGE_SIZE, False) and proto.memory_pressure
    assert proto.stats.memory_pressures == 1
    # Under pressure: 500 > 1 socket x 3 pages, yes; 500 > 200 sockets x 3 pages, no, and
    # the charge is undone.
    proto.sockets_allocated = 200
    fwd, batch = sk.forward_alloc, proto.per_cpu_fw_alloc
    assert not sk.rmem_schedule(fwd + PAGE_SIZE, False)
    assert (sk.forward_alloc, proto.per_cpu_fw_alloc) == (fwd, batch)
    proto.sockets_allocated = 1
    proto.memory_allocated = 510  # over tcp_mem[2]
    sk.rmem_alloc = 0  # even a socket holding nothing
    assert not sk.mem_schedule(PAGE_SIZE, SK_MEM_RECV)
    proto.memory_allocated = 250
    assert sk.mem_schedule(PAGE_SIZE, SK_MEM_RECV) and not proto.memory_pressure


def test_sk_rmem_schedule_lets_a_pfmemalloc_skb_through_over_the_hard_limit() -> None:
    """sk_rmem_schedule: "... || skb_pfmemalloc(skb)" -- Gorman's fix for the stream
    deadlock: a pfmemalloc skb (which only a SOCK_MEMALLOC socket can get past sk_filter)
    is queued though tcp_mem[2] is exceeded, uncharged: sk_forward_alloc goes negative and
    comes back when the skb is freed."""
    proto = _proto((300, 400, 500))
    sk = TcpSock(proto, mss=MSS)
    proto.memory_allocated = 600
    assert not sk.rmem_schedule(2304, False)
    assert sk.rmem_schedule(2304, True)
    assert sk.stats.rmem_pfmemalloc == 1 and proto.charged == 600
    sk.set_owner_r(2304, MSS)
    assert sk.forward_alloc == -2304
    sk.rfree(2304)
    assert sk.forward_alloc == 0 and proto.charged == 600


def test_tcp_data_queue_forces_the_first_skb_into_an_empty_queue() -> None:
    """tcp_data_queue: "if (skb_queue_len(&sk->sk_receive_queue) == 0)
    sk_forced_mem_schedule(sk, skb->truesize);" -- whatever tcp_mem says."""
    proto = _proto((300, 400, 500))
    sk = TcpSock(proto, mss=MSS)
    proto.memory_allocated = 600
    assert sk.data_queue_scheduled(2304, pfmemalloc=False, queue_empty=True)
    assert sk.forward_alloc == PAGE_SIZE and proto.charged == 601
    sk.set_owner_r(2304, MSS)
    assert not sk.data_queue_scheduled(2304, pfmemalloc=False, queue_empty=False)


def test_over_the_hard_limit_a_sender_over_its_sndbuf_is_still_charged() -> None:
    """__sk_mem_raise_allocated, suppress_allocation for a stream socket's send:
    "sk_stream_moderate_sndbuf(sk); /* Fail only if socket is _under_ its sndbuf. */ if
    (sk->sk_wmem_queued + size >= sk->sk_sndbuf) ... return 1;"."""
    proto = _proto((300, 400, 500))
    busy = TcpSock(proto, mss=MSS)
    busy.wmem_queued = 100000
    proto.memory_allocated = 600
    assert busy.wmem_schedule(PAGE_SIZE)
    assert busy.sndbuf == 50000  # moderated to half of what it queues
    idle = TcpSock(proto, mss=MSS)
    assert not idle.wmem_schedule(PAGE_SIZE)  # 0 + 4096 < SOCK_MIN_SNDBUF: fails
    assert idle.sndbuf == SOCK_MIN_SNDBUF


def test_drs_grows_rcvbuf_with_what_the_reader_copied_per_rtt() -> None:
    """tcp_rcv_space_adjust: rcvq_space starts at 10 * advmss = 14600.  The reader copies
    29200 bytes in one RTT: rcvwin = 2 * 29200 + 16 * 1460 = 81760; grow = 81760 * (29200 -
    14600) / 14600 = 81760; rcvwin += 2 * grow -> 245280; rcvmem = SKB_TRUESIZE(1460 + 320)
    = 2356, raised by 128s until half of it holds an advmss: 2996; rcvbuf = 245280 / 1460 *
    2996 = 503328 (under tcp_rmem[2])."""
    sk = TcpSock(_proto(), mss=MSS, now=0.0)
    sk.copied_seq = 29200
    sk.rcv_space_adjust(0.005, rtt=0.01)  # less than an RTT: nothing yet
    assert sk.rcvbuf == 131072
    sk.rcv_space_adjust(0.01, rtt=0.01)
    assert sk.rcvbuf == 503328 and sk.rcvq_space == 29200
    locked = TcpSock(_proto(), mss=MSS, rcvbuf=131072, now=0.0)
    locked.copied_seq = 29200
    locked.rcv_space_adjust(0.01, rtt=0.01)
    assert locked.rcvbuf == 131072
    no_rtt = TcpSock(_proto(), mss=MSS, now=0.0)
    no_rtt.copied_seq = 29200
    no_rtt.rcv_space_adjust(1.0, rtt=0.0)  # "tp->rcv_rtt_est.rtt_us == 0": no estimate
    assert no_rtt.rcvbuf == 131072
