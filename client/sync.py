"""A FIFO lock handed from holder to waiter: the NBD client's send lock and the modelled
socket's ``lock_sock`` (client/net/socket.py).

Like ``trio.Lock`` it is fair (released, it goes to the longest waiter, who owns it on
waking), but taking it when it is free costs no scheduling round (``trio.Lock.acquire``
checkpoints).  A burst of requests is then written out in one round instead of each
holding the lock across a round of its own: the kernel's ``lock_sock`` does not yield
either.
"""

from __future__ import annotations

from client.mm.waits import WaitQueue


class HandoffLock:
    """``await lock.acquire()`` ... ``lock.release()`` (in a ``finally``)."""

    __slots__ = ("_busy", "_waiters")

    def __init__(self) -> None:
        self._busy = False
        self._waiters = WaitQueue()

    async def acquire(self) -> None:
        if self._busy:
            await self._waiters.park()  # the holder hands the lock over
        else:
            self._busy = True

    def release(self) -> None:
        if self._waiters:
            self._waiters.unpark()
        else:
            self._busy = False
