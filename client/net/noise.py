"""Noise traffic: Christoph Lameter's fileserver beside the swapping machine.

"How do we guarantee that the HPC application is not impacted if the network services of the
fileserver flood the system with messages and exhaust memory?" (10 Sep 2007).  A peer floods
ordinary sockets of the client machine; a consumer process on the machine reads them slowly
and needs memory for each page it processes, so under pressure it blocks in the allocator
while its socket's receive buffers stay charged.
"""

from __future__ import annotations

import math

import trio

from client.mm import GFP_HIGHUSER, PAGE_SIZE, Memory, Page
from client.net.socket import ModelledSocket

CHUNK = 16 * 1024


async def flood(stream: trio.abc.Stream, rate: int) -> None:
    """The peer (not on the client machine): send as fast as allowed, or ``rate`` bytes/s."""
    payload = bytes(CHUNK)
    try:
        while True:
            await stream.send_all(payload)
            if rate:
                await trio.sleep(CHUNK / rate)
    except (trio.BrokenResourceError, trio.ClosedResourceError):
        return


async def consume(sock: ModelledSocket, memory: Memory, rate: int, process_pages: int) -> None:
    """The fileserver process: read ``rate`` bytes/s; for each page read, allocate (and then
    free) ``process_pages`` user pages — blocking in reclaim like any process under pressure."""
    while True:
        data = await sock.receive_some(4 * PAGE_SIZE)
        if not data:
            return
        held: list[Page] = []
        for _ in range(math.ceil(len(data) / PAGE_SIZE) * process_pages):
            page = await memory.alloc_page(GFP_HIGHUSER)
            if page is not None:
                held.append(page)
        for page in held:
            memory.free_page(page)
        await trio.sleep(len(data) / rate)
