"""``netswap demo``: the default demonstration, with nothing to set up.

For now it exercises the real path the client machine will swap over: an embedded
``netswap server`` on loopback and the pipelined NBD client.  It writes pages whose content
is derived from (page number, generation) — the same kind of check the swap workload makes —
reads every page back, verifies it, and reports throughput.
"""

from __future__ import annotations

import hashlib
import time

import attrs
import trio

from client.nbd_client import NBDClient
from server import Export, NBDServer
from testbed.config import ExportConfig, ServerConfig

PAGE = 4096


def page_content(page: int, generation: int) -> bytes:
    """4 KiB that only this (page, generation) produces: a repeated 32-byte digest."""
    digest = hashlib.blake2s(f"{page}:{generation}".encode()).digest()
    return digest * (PAGE // len(digest))


@attrs.frozen
class DemoResult:
    pages: int
    depth: int
    write_seconds: float
    read_seconds: float
    verified: int
    corrupt: int

    def table(self) -> str:
        mib = self.pages * PAGE / (1 << 20)
        rows = [
            ("phase", "pages", "MiB", "seconds", "pages/s"),
            (
                "swap-out (WRITE)",
                self.pages,
                f"{mib:.0f}",
                f"{self.write_seconds:.2f}",
                f"{self.pages / self.write_seconds:,.0f}",
            ),
            (
                "swap-in (READ)",
                self.pages,
                f"{mib:.0f}",
                f"{self.read_seconds:.2f}",
                f"{self.pages / self.read_seconds:,.0f}",
            ),
        ]
        widths = [max(len(str(r[i])) for r in rows) for i in range(5)]
        lines = ["  ".join(str(v).rjust(w) for v, w in zip(r, widths, strict=True)) for r in rows]
        lines.insert(1, "  ".join("-" * w for w in widths))
        verdict = "completed" if self.corrupt == 0 else "integrity_error"
        lines.append("")
        lines.append(
            f"outcome: {verdict}  pages verified: {self.verified}  corrupt: {self.corrupt}"
            f"  (queue depth {self.depth}, embedded server on loopback)"
        )
        return "\n".join(lines)


async def run_demo(size: int, depth: int) -> DemoResult:
    pages = size // PAGE
    config = ServerConfig(listen="127.0.0.1:0", exports=(ExportConfig(name="swap", size=size),))
    server = NBDServer(config, [Export.from_config(e) for e in config.exports])
    async with trio.open_nursery() as nursery:
        host, port = await nursery.start(server.serve)
        client = await NBDClient.connect(host, port, "swap", depth=depth, nursery=nursery)
        limit = trio.CapacityLimiter(depth)

        async def each(fn: object) -> float:
            start = time.perf_counter()
            async with trio.open_nursery() as n:
                for page in range(pages):
                    await limit.acquire_on_behalf_of(page)
                    n.start_soon(fn, page)  # type: ignore[arg-type]
            return time.perf_counter() - start

        async def write(page: int) -> None:
            try:
                await client.write(page * PAGE, page_content(page, 1))
            finally:
                limit.release_on_behalf_of(page)

        verified = corrupt = 0

        async def read(page: int) -> None:
            nonlocal verified, corrupt
            try:
                data = await client.read(page * PAGE, PAGE)
            finally:
                limit.release_on_behalf_of(page)
            if data == page_content(page, 1):
                verified += 1
            else:
                corrupt += 1

        write_s = await each(write)
        read_s = await each(read)
        await client.close()
        server.shutdown()
    return DemoResult(pages, depth, write_s, read_s, verified, corrupt)
