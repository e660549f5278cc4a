"""Workloads that run on the client machine: Mel Gorman's anonymous-memory hog, and a
reader of files through the page cache (the clean memory of Christoph Lameter's argument).

``processes`` processes map ``total`` bytes between them and touch every page in rounds:
a write pass that fills each page with content derived from (process, virtual page,
generation), then a read pass that checks it.  A page that was swapped out is swapped in
by the read (or write) fault; every read compares the whole page, so a lost or stale swap
write shows up as a corrupt page, never as a silent pass.

A ``file_reader`` process reads its own file of ``size`` bytes from start to end in
``passes``, at ``rate`` pages/s (0: as fast as it can); every page read is checked against
what the disk holds.  Its pages stay in the page cache, clean, after the reader exits.
"""

from __future__ import annotations

import struct
from collections.abc import Awaitable, Callable
from typing import Protocol

import attrs
import trio

from client.config import FileReaderConfig, HogConfig
from client.mm import PAGE_SIZE, Memory, MemoryConfig, Process
from client.mm.errors import IntegrityError, OutOfMemory, ProcessKilled, SwapReadError
from client.mm.memory import ContentFn
from client.mm.pagecache import CachedFile

_PATTERN = struct.Struct("<QQQQ")


def page_content(pid: int, vpage: int, generation: int) -> bytes:
    """4 KiB that only (pid, vpage, generation) produce."""
    return _PATTERN.pack(pid, vpage, generation, 0x6E657473776170) * (PAGE_SIZE // 32)


@attrs.define
class Integrity:
    pages_written: int = 0
    pages_verified: int = 0
    corrupt: int = 0
    file_pages_verified: int = 0  # page cache reads checked against the disk
    steps: int = 0  # workload progress: touches completed (the watchdog's "workload steps")


@attrs.define
class HogResult:
    name: str
    processes: int
    pages_per_process: int
    rounds: int
    finished: int = 0
    killed: int = 0
    sigbus: int = 0


async def _run_processes(
    config: HogConfig | FileReaderConfig, process: Callable[[int], Awaitable[None]]
) -> None:
    """After ``start_after``, ``config.processes`` tasks named ``name/i``, to the end."""
    if config.start_after:
        await trio.sleep(config.start_after)
    async with trio.open_nursery() as nursery:
        for i in range(config.processes):
            nursery.start_soon(process, i, name=f"{config.name}/{i}")


class HogMemoryView(Protocol):
    """What an ``AnonHog`` uses of a machine's memory: the ``Memory`` itself, or the
    harness's ``client.pressure.HogMemory`` around it."""

    @property
    def config(self) -> MemoryConfig: ...

    def new_process(self, name: str) -> Process: ...

    async def touch(
        self, process: Process, vpage: int, *, write: bool, content_fn: ContentFn
    ) -> None: ...

    def exit_process(self, process: Process) -> None: ...


class AnonHog:
    """One ``anon_hog`` workload on a machine's memory."""

    def __init__(self, config: HogConfig, memory: HogMemoryView, integrity: Integrity) -> None:
        self.config = config
        self.memory = memory
        self.integrity = integrity
        ram = memory.config.total_bytes
        total_pages = max(config.total_bytes(ram) // PAGE_SIZE, config.processes)
        self.result = HogResult(
            config.name, config.processes, total_pages // config.processes, config.rounds
        )

    async def run(self) -> HogResult:
        await _run_processes(self.config, self._process)
        return self.result

    async def _process(self, index: int) -> None:
        memory = self.memory
        integrity = self.integrity
        process = memory.new_process(f"{self.config.name}/{index}")
        pages = self.result.pages_per_process
        interval = 1 / self.config.rate if self.config.rate else 0.0
        try:
            for generation in range(1, self.config.rounds + 1):
                content = _content_fn(generation)
                for vpage in range(pages):
                    await memory.touch(process, vpage, write=True, content_fn=content)
                    integrity.pages_written += 1
                    integrity.steps += 1
                    if interval:
                        await trio.sleep(interval)
                for vpage in range(pages):
                    try:
                        await memory.touch(process, vpage, write=False, content_fn=content)
                    except IntegrityError:
                        integrity.corrupt += 1
                    else:
                        integrity.pages_verified += 1
                    integrity.steps += 1
                    if interval:
                        await trio.sleep(interval)
        except ProcessKilled:
            # SIGKILL (the OOM killer's): the task exits, and exit_mmap frees what the
            # oom_reaper has not.
            memory.exit_process(process)
            self.result.killed += 1
            return
        except SwapReadError:
            # do_swap_page: a failed swap-in read is VM_FAULT_SIGBUS for the process.
            self.result.sigbus += 1
            return
        memory.exit_process(process)
        self.result.finished += 1


def _content_fn(generation: int):  # type: ignore[no-untyped-def]
    def content(process: Process, vpage: int) -> bytes:
        return page_content(process.pid, vpage, generation)

    return content


def file_content(file: CachedFile, index: int) -> bytes:
    """4 KiB that only (file, page) produce: what the local disk holds."""
    return _PATTERN.pack(file.ident, index, 0xF11E, 0x6E657473776170) * (PAGE_SIZE // 32)


@attrs.define
class ReaderResult:
    name: str
    processes: int
    pages_per_file: int
    passes: int
    finished: int = 0
    killed: int = 0
    failed: int = 0  # reads that found no memory (read(2) returned an error)


class FileReader:
    """One ``file_reader`` workload: each process streams through its own file."""

    def __init__(self, config: FileReaderConfig, memory: Memory, integrity: Integrity) -> None:
        self.config = config
        self.memory = memory
        self.integrity = integrity
        pages = max(config.size_bytes(memory.config.total_bytes) // PAGE_SIZE, 1)
        self.result = ReaderResult(config.name, config.processes, pages, config.passes)

    async def run(self) -> ReaderResult:
        await _run_processes(self.config, self._process)
        return self.result

    async def _process(self, index: int) -> None:
        memory = self.memory
        integrity = self.integrity
        name = f"{self.config.name}/{index}"
        process = memory.new_process(name)
        file = memory.open_file(name, self.result.pages_per_file)
        interval = 1 / self.config.rate if self.config.rate else 0.0
        try:
            for _ in range(self.config.passes):
                for page in range(file.nr_pages):
                    try:
                        await memory.read_file(process, file, page, file_content)
                    except IntegrityError:
                        integrity.corrupt += 1
                    else:
                        integrity.file_pages_verified += 1
                    integrity.steps += 1
                    if interval:
                        await trio.sleep(interval)
        except ProcessKilled:
            memory.exit_process(process)  # as AnonHog's
            self.result.killed += 1
            return
        except OutOfMemory:
            self.result.failed += 1
            return
        memory.exit_process(process)
        self.result.finished += 1
