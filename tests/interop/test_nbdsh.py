"""nbdsh (python3-libnbd 1.14): single requests the bulk tools never send.

``h.set_strict_mode(0)`` stops libnbd from refusing bad requests itself, so they reach the
server.  Each script prints one JSON line with what it saw; the assertions are here.
"""

from __future__ import annotations

import pytest

from server import NBDServer

from .peers import KiB, MiB, nbdsh_script, uri

pytestmark = pytest.mark.interop


async def test_pread_past_the_end_is_einval_and_the_connection_stays_usable(
    nbd_server: NBDServer, nbdsh: str
) -> None:
    script = """
import errno, json
h.set_strict_mode(0)
size = h.get_size()
seen = {}
for name, offset in (("past", size), ("straddle", size - 256)):
    try:
        h.pread(512, offset)
        seen[name] = "ok"
    except nbd.Error as e:
        seen[name] = errno.errorcode.get(e.errnum, e.errnum)
h.pwrite(b"after", 4096)
seen["after"] = bytes(h.pread(5, 4096)).decode()
print(json.dumps(seen))
"""
    seen = await nbdsh_script(nbdsh, uri(nbd_server, "disk"), script)
    assert seen == {"past": "EINVAL", "straddle": "EINVAL", "after": "after"}
    assert nbd_server.stats.protocol_errors == 0


async def test_zero_length_pwrite_succeeds(nbd_server: NBDServer, nbdsh: str) -> None:
    script = """
import json
h.set_strict_mode(0)
h.pwrite(b"", 0)  # libnbd itself takes ~200 ms over one of these (qemu-nbd too)
print(json.dumps({"size": h.get_size(), "data": bytes(h.pread(4, 0)).hex()}))
"""
    seen = await nbdsh_script(nbdsh, uri(nbd_server, "disk"), script)
    assert seen == {"size": 64 * MiB, "data": "00000000"}


async def test_fast_zero_zeroes_written_data(nbd_server: NBDServer, nbdsh: str) -> None:
    script = """
import json
assert h.can_fast_zero()
h.pwrite(b"\\xff" * 65536, 0)
h.zero(32768, 16384, nbd.CMD_FLAG_FAST_ZERO)
data = bytes(h.pread(65536, 0))
print(json.dumps([data[:16384] == b"\\xff" * 16384, data[16384:49152] == bytes(32768),
                  data[49152:] == b"\\xff" * 16384]))
"""
    seen = await nbdsh_script(nbdsh, uri(nbd_server, "disk"), script)
    assert seen == [True, True, True]


async def test_block_status_over_a_partly_written_range(nbd_server: NBDServer, nbdsh: str) -> None:
    script = """
import json
h.pwrite(b"x" * 8192, 16384)
found = []
def extents(context, offset, entries, err):
    found.append([context, offset, list(entries)])
    return 0
h.block_status(65536, 0, extents)
h.block_status(65536, 0, extents, nbd.CMD_FLAG_REQ_ONE)
print(json.dumps(found))
"""
    seen = await nbdsh_script(nbdsh, uri(nbd_server, "disk"), script, "--base-allocation")
    hole, data = 3, 0
    assert seen == [
        # (length, flags) pairs: hole 16 KiB, data 8 KiB, hole to the end of the range.
        ["base:allocation", 0, [16 * KiB, hole, 8 * KiB, data, 40 * KiB, hole]],
        ["base:allocation", 0, [16 * KiB, hole]],  # REQ_ONE: just the first extent
    ]


async def test_writes_to_the_read_only_export_are_eperm(nbd_server: NBDServer, nbdsh: str) -> None:
    script = """
import errno, json
h.set_strict_mode(0)
seen = {}
for name, call in (
    ("pwrite", lambda: h.pwrite(b"a" * 512, 0)),
    ("trim", lambda: h.trim(4096, 0)),
    ("zero", lambda: h.zero(4096, 0)),
):
    try:
        call()
        seen[name] = "ok"
    except nbd.Error as e:
        seen[name] = errno.errorcode.get(e.errnum, e.errnum)
seen["read"] = bytes(h.pread(4, 0)).hex()
print(json.dumps(seen))
"""
    seen = await nbdsh_script(nbdsh, uri(nbd_server, "ro"), script)
    assert seen == {"pwrite": "EPERM", "trim": "EPERM", "zero": "EPERM", "read": "00000000"}
