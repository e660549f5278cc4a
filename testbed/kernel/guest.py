"""What runs inside the guest: its ``/init``, and the per-run settings it reads.

The guest is a busybox system: ``/init`` loads the modules, brings up the NIC, attaches
``/dev/nbd0`` with Debian's nbd-client, swaps on it, sets the scenario's sysctls, starts a
sampler and runs the workloads in tmpfs (shmem pages are swap-backed and sit on the anon
LRU, as the model's hogs do).  It reports to the host on the second serial port
(``/dev/ttyS1``), one line per record; the console (``ttyS0``) carries the kernel's own
messages.  The records:

``S <uptime> key=value ...``
    a sample: ``/proc/vmstat`` counters, ``/proc/pressure/memory``, and free pages and
    watermarks per zone from ``/proc/zoneinfo``.  The sampler is shell builtins only
    (``read``, ``case``, ``echo``; ``read -t`` on a FIFO is its sleep), so it forks nothing
    while the machine is under pressure.
``@ <what> ...``
    a step: ``modules``, ``sysctl NAME VALUE``, ``swapon``, ``written WORKLOAD/I PAGES SHA``,
    ``verified WORKLOAD/I PAGES ok|bad``, ``done``, ``error MESSAGE``.
``F <key> <value>``
    the final ``/proc/vmstat`` and ``TcpExt`` counters, after the workloads, before ``@ end``.

The settings come as ``/etc/netswap.conf`` (shell variables) in a second cpio archive that
the host appends to the cached initramfs for each run.
"""

from __future__ import annotations

import shlex
from collections.abc import Mapping

import attrs

#: The guest's side of qemu's user-mode network: its address, and the address the host's
#: ``guestfwd`` listens on for the NBD server (both inside qemu's private 10.0.2.0/24).
GUEST_IP = "10.0.2.15"
SERVER_IP = "10.0.2.100"
SERVER_PORT = 10809

INIT_SCRIPT = r"""#!/bin/sh
# netswap guest init: see testbed/kernel/guest.py for the records it writes to /dev/ttyS1.
export PATH=/bin:/sbin:/usr/bin
/bin/busybox --install -s /bin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
. /etc/netswap.conf
# One descriptor on the records port for the whole run, raw: no reopening, no line
# discipline between the shell and the host.
stty -F /dev/ttyS1 raw -echo
exec 3> /dev/ttyS1
out=/dev/fd/3
say() { echo "@ $*" >&3; }
fail() { say error "$*"; sync; poweroff -f; }

for m in /modules/*.ko; do
  case "$m" in
    *-nbd.ko) insmod "$m" nbds_max=1 || fail "insmod $m" ;;
    *) insmod "$m" || fail "insmod $m" ;;
  esac
done
say modules
ip link set lo up
ip link set eth0 up || fail "no eth0: the NIC driver did not attach"
ip addr add $GUEST_IP/24 dev eth0 || fail "ip addr add $GUEST_IP"

sysctl() {  # sysctl NAME FILE VALUE: set it if VALUE is given, report what it is
  [ -n "$3" ] && { echo "$3" > "$2" || fail "cannot set $1 to $3"; }
  v=$(cat "$2")  # not read: it reads a byte at a time, and /proc/sys answers only the first
  say sysctl "$1" "$v"
}
sysctl min_free_kbytes /proc/sys/vm/min_free_kbytes "$MIN_FREE_KBYTES"
sysctl swappiness /proc/sys/vm/swappiness "$SWAPPINESS"
sysctl page_cluster /proc/sys/vm/page-cluster "$PAGE_CLUSTER"
sysctl watermark_scale_factor /proc/sys/vm/watermark_scale_factor "$WATERMARK_SCALE_FACTOR"
sysctl vma_ra_enabled /sys/kernel/mm/swap/vma_ra_enabled "$VMA_RA"
sysctl tcp_mem /proc/sys/net/ipv4/tcp_mem "$TCP_MEM"
sysctl tcp_wmem /proc/sys/net/ipv4/tcp_wmem "$TCP_WMEM"
sysctl tcp_rmem /proc/sys/net/ipv4/tcp_rmem "$TCP_RMEM"
read release < /proc/sys/kernel/osrelease
say release "$release"

if [ -n "$COLOCATED" ]; then
  # The NBD server inside the guest, on its own loopback: Debian's nbdkit memory, whose
  # memory the kernel it serves may reclaim (--swap mlocks it).
  # nbdkit 1.32's data segment declares 192 MiB of .bss: under the default overcommit
  # heuristic a guest below ~256 MiB with no swap yet cannot exec it (the kernel kills
  # it with SIGSEGV), so overcommit is allowed while it starts, then put back.
  read overcommit < /proc/sys/vm/overcommit_memory
  echo 1 > /proc/sys/vm/overcommit_memory
  set -- -i 127.0.0.1 -p $SERVER_PORT -e "$EXPORT" -P /run/nbdkit.pid
  [ "$COLOCATED" = guest-swap ] && set -- --swap "$@"
  nbdkit "$@" memory "$SWAP_BYTES" > /tmp/nbdkit.out 2>&1 || {
    read e < /tmp/nbdkit.out; fail "nbdkit: $e"; }
  while [ ! -s /run/nbdkit.pid ]; do sleep 0.1; done  # written once it listens
  echo "$overcommit" > /proc/sys/vm/overcommit_memory
  say nbdkit "$COLOCATED"
fi
nbd-client -N "$EXPORT" $SERVER_IP $SERVER_PORT /dev/nbd0 -b 4096 -t "$NBD_TIMEOUT" \
  > /tmp/nbd-client.out 2>&1 || { read e < /tmp/nbd-client.out; fail "nbd-client: $e"; }
sysctl max_sectors_kb /sys/block/nbd0/queue/max_sectors_kb "$MAX_SECTORS_KB"
# Swap readahead by slot needs a rotational device (swap_use_vma_readahead counts them).
sysctl rotational /sys/block/nbd0/queue/rotational "$ROTATIONAL"
mkswap /dev/nbd0 > /dev/null 2>&1 || fail "mkswap /dev/nbd0"
swapon /dev/nbd0 || fail "swapon /dev/nbd0"
say swapon
mkdir -p /work
mount -t tmpfs -o size=${TMPFS_KB}k tmpfs /work || fail "mount tmpfs"
mkfifo /run/tick /run/wait

# The sampler: one awk process, woken by a ticker loop through a FIFO; both run for the
# whole workload, so no sample forks anything (awk reads /proc with buffered I/O; a shell
# `read` costs a system call per byte, which the emulated CPU pays dearly for).
ticker() {
  while :; do read -t "$SAMPLE_INTERVAL" x <> /run/wait; echo t; done > /run/tick
}
sampler() {
  awk -v want='^(nr_free_pages|nr_writeback|nr_shmem|nr_inactive_anon|nr_active_anon|nr_swapcached|pswpin|pswpout|pgscan_kswapd|pgscan_direct|pgsteal_kswapd|pgsteal_direct|pgscan_direct_throttle|allocstall_.*|oom_kill|pgmajfault|pageoutrun|kswapd_.*)$' '
  BEGIN {
    while ((getline tick < "/run/tick") > 0) {
      getline up < "/proc/uptime"; close("/proc/uptime"); split(up, u, " ")
      s = "S " u[1]
      while ((getline l < "/proc/vmstat") > 0) {
        split(l, f, " "); if (f[1] ~ want) s = s " " f[1] "=" f[2]
      }
      close("/proc/vmstat")
      while ((getline l < "/proc/pressure/memory") > 0) {
        split(l, f, " "); s = s " psi_" f[1] "=" f[2] "," f[3] "," f[4] "," f[5]
      }
      close("/proc/pressure/memory")
      zone = ""
      while ((getline l < "/proc/zoneinfo") > 0) {
        n = split(l, f, " ")
        if (f[1] == "Node") zone = f[4]
        else if (f[1] == "pages" && f[2] == "free") s = s " zone." zone ".free=" f[3]
        else if (n == 2 && f[1] ~ /^(min|low|high|managed)$/) s = s " zone." zone "." f[1] "=" f[2]
      }
      close("/proc/zoneinfo")
      print s; fflush()
    }
  }' >&3
}

# hog NAME I PAGES ROUNDS: each round writes PAGES of random data into a tmpfs file, 4 MiB
# at a time, hashing each chunk while it is still in memory; then reads every chunk back
# and compares.  (PAGES is a multiple of 16: dd moves 64 KiB blocks.  No tee: busybox's
# copies in small pieces and costs the emulated CPU five times what dd does.)
hog() {
  f=/work/$1.$2
  r=0
  while [ $r -lt $4 ]; do
    : > $f.sums
    k=0
    while [ $((k * 1024)) -lt $3 ]; do
      n=$(($3 - k * 1024)); [ $n -gt 1024 ] && n=1024
      dd if=/dev/urandom of=$f bs=65536 count=$((n / 16)) seek=$((k * 64)) conv=notrunc \
        2>/dev/null || fail "dd into $f"
      dd if=$f bs=65536 count=$((n / 16)) skip=$((k * 64)) 2>/dev/null | sha256sum >> $f.sums
      k=$((k + 1))
    done
    say written "$1/$2" $3
    ok=0; bad=0; k=0
    while read w rest; do
      n=$(($3 - k * 1024)); [ $n -gt 1024 ] && n=1024
      v=$(dd if=$f bs=65536 count=$((n / 16)) skip=$((k * 64)) 2>/dev/null | sha256sum)
      if [ "${v%% *}" = "$w" ]; then ok=$((ok + n)); else bad=$((bad + n)); fi
      k=$((k + 1))
    done < $f.sums
    say verified "$1/$2" $ok $bad
    r=$((r + 1))
  done
  rm -f $f $f.sums
}

sampler &
sampler_pid=$!
ticker &
ticker_pid=$!
say started
pids=
while read name procs pages rounds delay; do
  i=0
  while [ $i -lt $procs ]; do
    ( [ "$delay" != 0 ] && sleep "$delay"; hog $name $i $pages $rounds ) &
    pids="$pids $!"
    i=$((i + 1))
  done
done < /etc/netswap.workloads
for p in $pids; do wait $p; done
say done
kill $ticker_pid $sampler_pid
awk '{ print "F " $1 " " $2 }' /proc/vmstat >&3
awk '/^TcpExt:/ { t = t "|" $0 } END { print "F tcpext " t }' /proc/net/netstat >&3
say end
sync
poweroff -f
"""


@attrs.frozen
class GuestSettings:
    """What ``/etc/netswap.conf`` and ``/etc/netswap.workloads`` say for one run."""

    export: str
    nbd_timeout: int
    sample_interval: float
    tmpfs_kb: int
    sysctls: Mapping[str, str]  # conf variable -> value ("" leaves the kernel's default)
    workloads: tuple[tuple[str, int, int, int, float], ...]  # name, procs, pages, rounds, delay
    colocated: str = ""  # "", "guest" or "guest-swap": nbdkit serves swap inside the guest
    swap_bytes: int = 0  # the size of the colocated server's export

    def conf(self) -> str:
        values = {
            "GUEST_IP": GUEST_IP,
            "SERVER_IP": "127.0.0.1" if self.colocated else SERVER_IP,
            "SERVER_PORT": str(SERVER_PORT),
            "EXPORT": self.export,
            "NBD_TIMEOUT": str(self.nbd_timeout),
            "SAMPLE_INTERVAL": f"{self.sample_interval:g}",
            "TMPFS_KB": str(self.tmpfs_kb),
            "COLOCATED": self.colocated,
            "SWAP_BYTES": str(self.swap_bytes),
            **self.sysctls,
        }
        return "".join(f"{k}={shlex.quote(v)}\n" for k, v in values.items())

    def workload_lines(self) -> str:
        return "".join(
            f"{name} {procs} {pages} {rounds} {delay:g}\n"
            for name, procs, pages, rounds, delay in self.workloads
        )

    @property
    def pages_written(self) -> int:
        return sum(procs * pages * rounds for _, procs, pages, rounds, _ in self.workloads)
