"""Errors the memory model raises to the tasks that use it."""

from __future__ import annotations


class MmError(Exception):
    """Base of the model's errors."""


class ProcessKilled(MmError):
    """The process was killed (by the OOM killer) and its memory is gone."""

    def __init__(self, pid: int) -> None:
        super().__init__(f"process {pid} was killed")
        self.pid = pid


class OutOfMemory(MmError):
    """A page fault could not get a page and there was nothing left to kill (VM_FAULT_OOM)."""


class SwapReadError(MmError):
    """Swap-in failed (the kernel would SIGBUS the process)."""

    def __init__(self, pid: int, vpage: int, slot: int) -> None:
        super().__init__(f"swap-in of process {pid} page {vpage} from slot {slot} failed")
        self.pid, self.vpage, self.slot = pid, vpage, slot


class IntegrityError(MmError):
    """A page did not hold the bytes its process expects."""

    def __init__(self, pid: int, vpage: int) -> None:
        super().__init__(f"process {pid} page {vpage} does not hold the expected bytes")
        self.pid, self.vpage = pid, vpage
