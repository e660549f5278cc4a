"""nbd's transmit context, explicit and by kernel era (client/nbd_client.py nbd_xmit_context,
client/mm/block.py): what the task that sends a request carries in ``current->flags``."""

from __future__ import annotations

from collections.abc import Sequence

import pytest
import trio

from client import config
from client.mm import GFP_NOIO, PAGE_SIZE, PF, Memory, MemoryConfig, current_task_flags, task_flags
from client.nbd_client import NBD_ERAS, NBDClient, nbd_xmit_context
from nbdproto import ClientConnection

KSWAPD = PF.MEMALLOC | PF.SWAPWRITE | PF.KSWAPD | PF.KTHREAD  # kswapd's own flags


class FlagsDevice:
    """A swap device that records the task flags each request reaches it with."""

    size_bytes = 64 * PAGE_SIZE

    def __init__(self) -> None:
        self.seen: list[PF] = []

    async def write(self, slot_start: int, pages: Sequence[memoryview]) -> None:
        self.seen.append(current_task_flags())

    async def read(self, slot_start: int, into: Sequence[memoryview]) -> None:
        self.seen.append(current_task_flags())


@pytest.mark.parametrize("submitter", [KSWAPD, PF.MEMALLOC, 0])
async def test_a_request_reaches_the_driver_with_exactly_its_submitters_flags(
    submitter: PF,
) -> None:
    """submit_bio hands the request to the driver in the submitter's task: kswapd's flags
    for its writeback, a direct reclaimer's PF_MEMALLOC, nothing for a faulting process --
    set from ``Bio.submitter_flags``, whatever the task that runs the request inherited."""
    memory = Memory(MemoryConfig(total_bytes=256 * PAGE_SIZE))
    device = FlagsDevice()
    memory.swapon(device)
    async with memory.running():
        block = memory.block
        assert block is not None
        page = await memory.alloc_page()
        assert page is not None
        with task_flags(submitter):
            bio = await block.submit(
                write=True, slot=1, pages=[page], gfp=GFP_NOIO, end_io=lambda _b: None
            )
        with task_flags(PF.SOFTIRQ):  # a later context of the submitter does not leak in
            await bio.done.wait()
    assert bio.submitter_flags == submitter
    assert device.seen == [submitter]


class FlagsStream(trio.abc.Stream):
    """A stream that records the task flags of each send."""

    def __init__(self) -> None:
        self.sends: list[PF] = []

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        self.sends.append(current_task_flags())

    async def wait_send_all_might_not_block(self) -> None:
        pass

    async def receive_some(self, max_bytes: int | None = None) -> bytes:
        await trio.sleep_forever()
        return b""  # pragma: no cover

    async def aclose(self) -> None:
        pass


# (era, submitter's flags) -> the flags sock_xmit sends with.
CASES = [
    # request_fn: nbd_send_req in whoever runs the queue -- the submitter, as it is.
    ("2.6.18", KSWAPD, KSWAPD),
    ("2.6.18", 0, 0),
    # nbd_thread: a kernel thread; the submitter's PF_MEMALLOC does not come along.
    ("3.5", KSWAPD, PF.KTHREAD),
    ("3.5", 0, PF.KTHREAD),
    # nbd_thread + sock_xmit's "current->flags |= PF_MEMALLOC".
    ("3.6", 0, PF.KTHREAD | PF.MEMALLOC),
    ("3.6", KSWAPD, PF.KTHREAD | PF.MEMALLOC),
    # queue_rq in the submitter's task + __sock_xmit's memalloc_noreclaim_save().
    ("6.1", 0, PF.MEMALLOC),
    ("6.1", KSWAPD, KSWAPD),
]


@pytest.mark.parametrize(("era", "submitter", "sends_with"), CASES)
async def test_nbd_sends_in_the_context_of_its_era(era: str, submitter: PF, sends_with: PF) -> None:
    stream = FlagsStream()
    client = NBDClient(stream, ClientConnection(), 1, nbd_xmit_context(era))
    with task_flags(submitter):
        await client._send(b"request")
        assert current_task_flags() == submitter  # restored after the send
    assert stream.sends == [sends_with]


def test_the_default_era_is_todays_behaviour_the_submitters_context() -> None:
    """[swap] nbd defaults to "2.6.18": the send carries the submitter's flags and nothing
    else, which is what the model did before the era was explicit."""
    assert config.SwapConfig().nbd == "2.6.18"
    assert nbd_xmit_context("2.6.18")().__enter__() is None  # no change to the flags


def test_the_config_names_the_eras_the_driver_knows() -> None:
    assert config.NBD_ERAS is NBD_ERAS  # one list, the driver's
    with pytest.raises(ValueError, match=r"nbd era '4\.0'"):
        nbd_xmit_context("4.0")
