"""The handshake: option haggling until transmission starts (or the client goes away).

The protocol object answers every option itself from the export catalogue; this loop only
moves its bytes and logs what it did.  The caller runs it under the handshake deadline.
"""

from __future__ import annotations

import contextlib

import trio

from nbdproto import (
    NEED_DATA,
    Aborted,
    ConnectionClosed,
    OptionHandled,
    ServerConnection,
    TransmissionStarted,
)

from .events import NbdAborted, NbdOption, NbdOptionRefused, emit


async def run_handshake(
    stream: trio.abc.Stream, conn: ServerConnection
) -> TransmissionStarted | None:
    """Run the option haggling.  Returns the start of transmission, or None on close."""
    while True:
        event = conn.next_event()
        if event is NEED_DATA:
            out = conn.data_to_send()
            if out:
                await stream.send_all(out)
            conn.receive_data(await stream.receive_some(65536))
            continue
        if isinstance(event, OptionHandled):
            emit(NbdOption(option=event.option, reply=event.reply, detail=event.detail))
            if event.reply is not None and event.reply & (1 << 31):
                emit(
                    NbdOptionRefused(
                        option=event.option,
                        reply=event.reply.name if event.reply else None,
                        detail=event.detail,
                    )
                )
        elif isinstance(event, TransmissionStarted):
            out = conn.data_to_send()
            if out:
                await stream.send_all(out)
            return event
        elif isinstance(event, ConnectionClosed):
            return None
        elif isinstance(event, Aborted):
            emit(NbdAborted())
            await send_quietly(stream, conn)  # the peer may not wait for the ACK
            return None


async def send_quietly(stream: trio.abc.Stream, conn: ServerConnection) -> None:
    """Send whatever replies ``conn`` has queued, if the peer still takes them within a
    second (a refused or aborted peer may already be gone)."""
    data = conn.data_to_send()
    if data:
        with (
            trio.move_on_after(1),
            contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError),
        ):
            await stream.send_all(data)
