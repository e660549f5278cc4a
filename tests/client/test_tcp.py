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

from typing import Any

import pytest
import trio
import trio.testing
from trio.testing import wait_all_tasks_blocked

from client.machine import ClientMachine
from client.mm import GFP, GFP_ATOMIC, GFP_NOIO, PAGE_SIZE, PF, Memory, MemoryConfig
from client.mm import current_task_flags as task_flags_now
from client.mm.policy import NullPolicy
from client.mm.slab import SKBUFF_FCLONE_CACHE, SKBUFF_HEAD_CACHE, SlabCache, SlabObject
from client.net.skbuff import MAX_TCP_HEADER, alloc_skb_truesize
from client.net.socket import AckDelayed
from client.net.stack import NOISE, SWAP
from client.net.tcp import (
    SK_MEM_RECV,
    SK_MEMORY_PCPU_RESERVE,
    SOCK_MIN_RCVBUF,
    SOCK_MIN_SNDBUF,
    TCP_ATO_MIN,
    VM_WAIT,
    TcpMemoryPressure,
    TcpProto,
    TcpSock,
    TcpSysctls,
    boot_free_buffer_pages,
)
from client.policy import PfmemallocPolicy
from testbed.config import load_scenario
from tests.client.netrig import MSS, MakeNet, Net, wait_of

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
    memory = Memory(MemoryConfig(total_bytes=mib << 20))
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
    plain = Memory(MemoryConfig(total_bytes=64 << 20))
    raised = Memory(MemoryConfig(total_bytes=64 << 20), policy=_ReservesMin())
    assert raised.zones[0].watermarks.high > plain.zones[0].watermarks.high
    assert TcpSysctls.for_memory(raised) == TcpSysctls.for_memory(plain) == SYSCTLS_64M


async def _never_connect() -> trio.abc.Stream:
    raise AssertionError("not used")


def test_the_net_table_replaces_the_boot_values_it_names() -> None:
    scenario = load_scenario(None, {"net.tcp_mem": [10, 20, 30], "net.tcp_rmem": [1, 2, "3M"]})
    sysctls = ClientMachine(scenario, _never_connect).tcp_sysctls()
    assert sysctls == TcpSysctls((10, 20, 30), SYSCTLS_64M.tcp_wmem, (1, 2, 3 << 20))


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


# -- the socket -------------------------------------------------------------------------------


def record_cache(cache: SlabCache) -> list[dict[str, Any]]:
    """Wrap ``cache.alloc`` to record each request's gfp and task flags."""
    calls: list[dict[str, Any]] = []
    real = cache.alloc

    async def alloc(gfp: GFP = GFP_NOIO, *, reserve: object | None = None) -> SlabObject | None:
        call: dict[str, Any] = {"gfp": gfp, "flags": task_flags_now()}
        calls.append(call)
        call["obj"] = obj = await real(gfp, reserve=reserve)
        return obj

    cache.alloc = alloc  # type: ignore[method-assign]
    return calls


async def test_wmem_queued_counts_truesize_and_sndbuf_grows_as_acks_arrive(
    make_net: MakeNet, autojump_clock: trio.testing.MockClock
) -> None:
    """A 64 KiB skb queues 1280 + 65536 = 66816 bytes of truesize; a writer of 1 MiB fills
    the autotuned 87040 and waits ("sndbuf"); the ACKs of its 46-segment skbs grow cwnd,
    and sndbuf with it, to tcp_wmem[2]."""
    net = make_net(tcp=SYSCTLS_64M)
    await net.opened()
    sock, peer = net.socket("nbd0", SWAP, latency=0.01)
    assert sock.sndbuf == 87040
    await sock.send_all(bytes(65536))
    assert sock.tcp.wmem_queued == TX_HEAD + 65536
    assert sock.tcp.snd_cwnd == 10 and sock.tcp.packets_out == 46

    async def drain() -> None:
        while await peer.receive_some():
            pass

    async with trio.open_nursery() as nursery:
        nursery.start_soon(drain)
        writer_done = trio.Event()

        async def writer() -> None:
            await sock.send_all(bytes(1 << 20))
            writer_done.set()

        nursery.start_soon(writer, name="writer")
        await wait_all_tasks_blocked()
        assert wait_of(net.memory, "writer") == "sndbuf"
        await writer_done.wait()
        nursery.cancel_scope.cancel()
    assert sock.sndbuf == 512000 and sock.tcp.stats.sndbuf_expanded >= 2
    assert sock.tcp.snd_cwnd > 100


async def test_a_failed_tx_allocation_moderates_sndbuf_and_enters_memory_pressure(
    make_net: MakeNet, autojump_clock: trio.testing.MockClock
) -> None:
    """sk_page_frag_refill: "sk_enter_memory_pressure(sk); sk_stream_moderate_sndbuf(sk);"
    -- a page for the next skb's data cannot be had: sndbuf falls from 87040 to half of the
    68096 queued (one full skb and the new, empty one), 34048, which the queue exceeds, so
    the writer waits for ACKs.  The ACK frees 66816: TCP leaves pressure (below tcp_mem[0])
    and the writer, still SOCK_NOSPACE, gets sndbuf expanded for cwnd 56, 487424."""
    net = make_net(tcp=SYSCTLS_64M)
    await net.opened()
    sock, _peer = net.socket("nbd0", SWAP, latency=1.0)
    await sock.send_all(bytes(65536))  # its last frag page is full
    net.memory.allocator.fail_page_alloc = lambda _gfp: True
    done: list[float] = []

    async def writer() -> None:
        await sock.send_all(bytes(PAGE_SIZE))
        done.append(trio.current_time())

    async with trio.open_nursery() as nursery:
        nursery.start_soon(writer, name="writer")
        await wait_all_tasks_blocked()
        assert sock.sndbuf == 34048 and sock.tcp.wmem_queued == 2 * TX_HEAD + 65536
        assert sock.tcp.stats.sndbuf_moderated == 1
        assert net.stack.tcp.memory_pressure
        assert wait_of(net.memory, "writer") == "sndbuf"
        net.memory.allocator.fail_page_alloc = None
    assert done == [pytest.approx(1.0)]
    assert not net.stack.tcp.memory_pressure
    assert [f.entered for f in net.facts if isinstance(f, TcpMemoryPressure)] == [True, False]
    assert sock.sndbuf == 2 * 56 * PER_MSS == 487424


async def test_a_locked_sndbuf_is_not_moderated_the_writer_waits_vm_wait(
    make_net: MakeNet, autojump_clock: trio.testing.MockClock
) -> None:
    """SO_SNDBUF: moderation leaves it; the queue (68096) is under it, so the failure was
    memory's, and sk_stream_wait_memory sleeps vm_wait (named "tx_buffer") before each
    retry: four tries by 3.5 vm_waits."""
    net = make_net(tcp=SYSCTLS_64M)
    await net.opened()
    sock, _peer = net.socket("nbd0", SWAP, latency=10.0, sndbuf=128 << 10)
    await sock.send_all(bytes(65536))
    net.memory.allocator.fail_page_alloc = lambda _gfp: True
    async with trio.open_nursery() as nursery:
        nursery.start_soon(sock.send_all, bytes(PAGE_SIZE), name="writer")
        await wait_all_tasks_blocked()
        assert wait_of(net.memory, "writer") == "tx_buffer"
        await trio.sleep(3.5 * VM_WAIT)
        assert sock.stats.tx_alloc_wait == 4 and sock.sndbuf == 128 << 10
        net.memory.allocator.fail_page_alloc = None
    assert sock.tcp.wmem_queued == 2 * TX_HEAD + 65536 + PAGE_SIZE


async def test_a_fresh_socket_whose_first_skb_fails_sleeps_vm_wait(
    make_net: MakeNet, autojump_clock: trio.testing.MockClock
) -> None:
    """The first skb's head needs a new slab page; it fails: sndbuf moderated to
    SOCK_MIN_SNDBUF (nothing is queued), and the empty queue is under it, so the writer
    sleeps one vm_wait and tries again (nothing else wakes it: no ACK is coming)."""
    net = make_net(tcp=SYSCTLS_64M)
    await net.opened()
    sock, peer = net.socket("nbd0", SWAP)
    net.memory.allocator.fail_page_alloc = lambda _gfp: True
    t0 = trio.current_time()
    done: list[float] = []

    async def writer() -> None:
        await sock.send_all(b"x" * 100)
        done.append(trio.current_time())

    async with trio.open_nursery() as nursery:
        nursery.start_soon(writer, name="writer")
        await wait_all_tasks_blocked()
        assert wait_of(net.memory, "writer") == "tx_buffer"
        assert sock.sndbuf == SOCK_MIN_SNDBUF and net.stack.tcp.memory_pressure
        await trio.sleep(VM_WAIT / 2)
        net.memory.allocator.fail_page_alloc = None
    assert done == [pytest.approx(t0 + VM_WAIT)]
    assert await peer.receive_some() == b"x" * 100


@pytest.mark.patches_model
async def test_skb_heads_come_from_their_caches_with_the_right_gfp(
    make_net: MakeNet, autojump_clock: trio.testing.MockClock
) -> None:
    """TX: alloc_skb_fclone from skbuff_fclone_cache with sk_allocation, in the sender.  RX
    (a netdev_alloc_skb driver): build_skb's head with GFP_ATOMIC at each refill, whatever
    gfp the data had (__GFP_MEMALLOC here).  Our ACKs: alloc_skb from skbuff_head_cache
    with sk_gfp_mask(sk, GFP_ATOMIC | __GFP_NOWARN), __GFP_MEMALLOC added on a
    SOCK_MEMALLOC socket, in softirq."""
    net = make_net(PfmemallocPolicy())
    await net.opened()
    fclones = record_cache(net.memory.slab[SKBUFF_FCLONE_CACHE])
    heads = record_cache(net.memory.slab[SKBUFF_HEAD_CACHE])
    swap, swap_peer = net.socket("nbd0", SWAP)
    noise, noise_peer = net.socket("noise0", NOISE)
    assert swap.allocation == GFP_NOIO | GFP.MEMALLOC
    await swap.send_all(bytes(100))
    assert [c["gfp"] for c in fclones] == [GFP_NOIO | GFP.MEMALLOC]
    assert not fclones[0]["flags"] & PF.SOFTIRQ
    await swap_peer.send_all(bytes(16 * MSS))  # then a refill of 16 buffers
    await noise_peer.send_all(bytes(2 * MSS))
    await wait_all_tasks_blocked()
    # A connection's first data starts quickack mode: each packet is ACKed from softirq.
    assert swap.stats.acks_sent == 16 and noise.stats.acks_sent == 2
    assert all(c["flags"] & PF.SOFTIRQ for c in heads)
    gfps = [c["gfp"] for c in heads]
    ack_swap, ack_noise = GFP_ATOMIC | GFP.NOWARN | GFP.MEMALLOC, GFP_ATOMIC | GFP.NOWARN
    assert gfps.count(ack_swap) == 16 and gfps.count(ack_noise) == 2
    assert gfps.count(GFP_ATOMIC) == 16  # the refill's build_skb heads


async def test_quickacks_then_every_second_segment_then_the_delayed_ack_timer(
    make_net: MakeNet, autojump_clock: trio.testing.MockClock
) -> None:
    """tcp_event_data_recv: the first data arms TCP_MAX_QUICKACKS quick ACKs, and every
    segment that grows rcv_ssthresh (tcp_grow_window: "icsk_ack.quick |= 1") one more, so
    a new connection ACKs each segment.  Once rcv_ssthresh has reached the window clamp
    (half of the 256 KiB rcvbuf), a reader taking each segment as it comes sends the ACK
    itself for every second one (tcp_cleanup_rbuf: more than one full frame unacked),
    and a lone segment waits for the delayed-ACK timer, TCP_ATO_MIN (40 ms)."""
    net = make_net()
    await net.opened()
    sock, peer = net.socket("noise0", NOISE, rcvbuf=256 << 10)
    tcp = sock.tcp
    assert tcp.rcv_wnd == 0xFFFF and tcp.window_clamp == 128 << 10
    n = 0
    while n == 0 or tcp.quick:
        n += 1
        await peer.send_all(bytes(MSS))
        assert await sock.receive_some() == bytes(MSS)
        assert sock.stats.acks_sent == n  # each segment ACKed at once
    # rcv_ssthresh grows 2920 a segment from 65535 until it meets the free space with one
    # segment held, (256K - 2304) / 2 = 129920: 22 growths; "quick |= 1" on an even count
    # adds one more: 39 quick ACKs in all.
    assert n == 39 and tcp.rcv_ssthresh == 129920
    acks = sock.stats.acks_sent
    for _ in range(2):
        for _ in range(2):
            await peer.send_all(bytes(MSS))
            await sock.receive_some()
        assert sock.stats.acks_sent == acks + 1 and tcp.rcv_wup == tcp.rcv_nxt
        acks += 1
    t0 = trio.current_time()
    await peer.send_all(bytes(MSS))
    await sock.receive_some()
    assert sock.stats.acks_sent == acks and tcp.rcv_nxt - tcp.rcv_wup == MSS
    await trio.sleep(TCP_ATO_MIN - 0.001)
    assert sock.stats.acks_sent == acks
    await trio.sleep(0.002)
    assert sock.stats.acks_sent == acks + 1 and tcp.rcv_wup == tcp.rcv_nxt
    assert trio.current_time() == pytest.approx(t0 + TCP_ATO_MIN + 0.001)
    # A data segment we send carries the ACK: none is sent of its own.
    await peer.send_all(bytes(MSS))
    await sock.receive_some()
    await sock.send_all(bytes(10))
    await trio.sleep(1)
    assert sock.stats.acks_sent == acks + 1 and tcp.rcv_wup == tcp.rcv_nxt


async def test_an_ack_that_cannot_be_allocated_stalls_the_peers_window(
    make_net: MakeNet, autojump_clock: trio.testing.MockClock
) -> None:
    """At the GFP_ATOMIC floor no slab can grow: every ACK fails ("delay = TCP_DELACK_MAX <<
    icsk->icsk_ack.retry", 200 ms doubling, the timer reset each time).  The peer sends the
    window it was offered at the start -- tcp_select_initial_window: half of the 128 KiB
    rcvbuf rounded down to whole segments, 45 x 1448 = 65160 -- and stops, though it has
    more.  Once memory is back, the reader's tcp_cleanup_rbuf sends the ACK the timer is
    still far from, and the peer goes on into the window it offers."""
    net = make_net(ring_size=64)
    await net.opened()
    sock, peer = net.socket("noise0", NOISE)
    window = sock.tcp.rcv_wnd
    assert window == 45 * MSS
    net.hold_until(net.atomic_floor)
    await peer.send_all(bytes(100 * MSS))
    await trio.sleep(5)
    assert sock.stats.rx_bytes == window and sock.tcp.rcv_wup == 0
    assert sock.stats.acks_sent == 0 and sock.stats.ack_failed >= 4
    delays = [f.delay for f in net.facts if isinstance(f, AckDelayed)]
    assert delays == [min(0.2 * 2**i, 120.0) for i in range(len(delays))]
    assert delays[-1] == 120.0  # every segment tried (quickack mode): the back-off is full
    net.release()
    await trio.sleep(1)
    assert sock.stats.rx_bytes == window  # the timer is seconds away still
    assert sock._delack_at > trio.current_time()
    assert await sock.receive_some(MSS) == bytes(MSS)
    assert sock.stats.acks_sent == 1 and sock.tcp.rcv_wup == window
    await wait_all_tasks_blocked()
    assert sock.stats.rx_bytes > window


async def test_a_pfmemalloc_skb_is_queued_over_tcp_mem2_on_a_memalloc_socket(
    make_net: MakeNet, autojump_clock: trio.testing.MockClock
) -> None:
    """With tcp_memory_allocated above tcp_mem[2], tcp_data_queue takes the first skb of an
    empty queue (forced) and drops the rest (TCPRcvQDrop) -- except that
    sk_rmem_schedule lets a pfmemalloc skb through: the swap socket keeps receiving from
    the reserves while an ordinary buffer on the same socket is dropped."""
    net = make_net(PfmemallocPolicy())
    await net.opened()
    swap, swap_peer = net.socket("nbd0", SWAP)
    await _fill_ring_from_the_reserves(net, swap, swap_peer)
    net.stack.tcp.memory_allocated = 10 * net.stack.tcp.sysctls.tcp_mem[2]
    await swap_peer.send_all(bytes(3 * MSS))
    await wait_all_tasks_blocked()
    assert swap.rx_pages == 3 and swap.stats.rcvq_drop == 0
    assert swap.tcp.stats.rmem_pfmemalloc == 2  # the first was forced into the empty queue

    net.release()
    for _ in range(net.device.settings.ring_size):  # the reserve buffers go; ordinary ones
        await swap_peer.send_all(bytes(MSS))
        await wait_all_tasks_blocked()
        if not any(b.pfmemalloc for b in net.device.ring):
            break
        await swap.receive_some(MSS)
    assert not any(b.pfmemalloc for b in net.device.ring) and swap.rx_pages >= 1
    dropped = swap.stats.rcvq_drop
    await swap_peer.send_all(bytes(MSS))
    await wait_all_tasks_blocked()
    assert swap.stats.rcvq_drop == dropped + 1
    assert net.drops("nbd0", "proto_mem")[-1].what == "data"
    assert net.stack.totals()["TCPRcvQDrop"] == swap.stats.rcvq_drop


async def _fill_ring_from_the_reserves(net: Net, sock: Any, peer: trio.abc.Stream) -> None:
    """Below the GFP_ATOMIC floor a memalloc socket's traffic refills the ring from the
    reserves (see test_net.py's _reserve_buffers); it reads as it goes."""
    await peer.send_all(bytes(32 * MSS))
    received = 0
    while received < 32 * MSS:
        received += len(await sock.receive_some())
    for _ in range(64):
        net.hold_until(net.atomic_floor - 4)
        await peer.send_all(bytes(MSS))
        await sock.receive_some()
    await wait_all_tasks_blocked()
    assert all(b.pfmemalloc for b in net.device.ring)


@pytest.mark.patches_model
async def test_a_failed_rx_head_drops_the_packet_and_counts_it(
    make_net: MakeNet, autojump_clock: trio.testing.MockClock
) -> None:
    """virtio_net builds the skb in the poll: build_skb's GFP_ATOMIC head needs a new page
    for an empty skbuff_head_cache, which one page below the floor cannot give, so the
    packet is dropped (rx_dropped, in rx_alloc_fail) and the peer retransmits after a
    back-off.  Each two dropped buffers give a page back: the fifth attempt, 75 ms on
    (5 + 10 + 20 + 40 ms of back-off), finds free above the floor and is received."""
    net = make_net(driver="virtio")
    await net.opened()
    heads = record_cache(net.memory.slab[SKBUFF_HEAD_CACHE])
    sock, peer = net.socket("noise0", NOISE)
    net.hold_until(net.atomic_floor - 1)
    t0 = trio.current_time()
    await peer.send_all(b"d" * 100)
    assert await sock.receive_some() == b"d" * 100
    assert trio.current_time() == pytest.approx(t0 + 0.075)
    assert net.device.stats.rx_dropped == 4 and net.device.stats.rx_packets == 5
    assert net.stack.totals()["rx_alloc_fail"] == 4
    builds = [c for c in heads if c["gfp"] == GFP_ATOMIC]  # the ACK's has __GFP_NOWARN
    assert [c["obj"] is None for c in builds] == [True] * 4 + [False]
    assert all(c["flags"] & PF.SOFTIRQ for c in heads)


async def test_drs_grows_an_autotuned_rcvbuf_and_leaves_a_locked_one(
    make_net: MakeNet, autojump_clock: trio.testing.MockClock
) -> None:
    net = make_net(tcp=SYSCTLS_64M)
    await net.opened()
    tuned, tuned_peer = net.socket("noise0", NOISE, latency=0.01)
    locked, locked_peer = net.socket("noise1", NOISE, latency=0.01, rcvbuf=131072)
    for sock, peer in ((tuned, tuned_peer), (locked, locked_peer)):
        await peer.send_all(bytes(1 << 20))
        received = 0
        while received < 1 << 20:
            received += len(await sock.receive_some())
    assert tuned.rcvbuf > 131072 and tuned.tcp.stats.rcvbuf_grown >= 1
    assert tuned.rcvbuf <= SYSCTLS_64M.tcp_rmem[2]
    assert locked.rcvbuf == 131072
