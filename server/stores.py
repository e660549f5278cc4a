"""Export backends: what an NBD export's bytes live in.

Both stores are synchronous and fast for the common case (the server calls them inline
from its request loop); only ``flush`` may be slow (``fdatasync``), and the server runs it
in a worker thread.  A store is shared by every connection to its export, so what one
connection wrote is what the next one reads: that is what makes ``CAN_MULTI_CONN`` true.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import os
from typing import Protocol

from testbed.nbd.constants import StateFlags

PAGE = 4096
_HOLE = int(StateFlags.HOLE | StateFlags.ZERO)
#: A block-status answer may describe less than was asked (proto.md): bound the work per call.
MAX_STATUS_SCAN = 1 << 30


class StoreError(Exception):
    """A store-level failure; ``errno`` is the host errno (EIO, ENOSPC, ...)."""

    def __init__(self, err: int, message: str) -> None:
        super().__init__(message)
        self.errno = err


class Store(Protocol):
    size: int
    read_only: bool
    #: True when FLUSH/FUA have work to do (the data is not durable until then).
    needs_flush: bool

    def pread(self, offset: int, length: int) -> bytes: ...
    def pwrite(self, offset: int, data: bytes) -> None: ...
    def trim(self, offset: int, length: int) -> None: ...
    def zero(self, offset: int, length: int, *, may_trim: bool) -> None: ...
    def flush(self) -> None: ...
    def extents(self, offset: int, length: int) -> list[tuple[int, int]]: ...
    def close(self) -> None: ...


class MemoryStore:
    """A sparse in-memory disk: a dict of 4 KiB pages; absent pages read as zeros."""

    needs_flush = False

    def __init__(self, size: int, *, read_only: bool = False) -> None:
        if size < 0:
            raise ValueError("size must not be negative")
        self.size = size
        self.read_only = read_only
        self._pages: dict[int, bytes] = {}

    @property
    def allocated_bytes(self) -> int:
        return len(self._pages) * PAGE

    def pread(self, offset: int, length: int) -> bytes:
        pages = self._pages
        index, skip = divmod(offset, PAGE)
        if skip + length <= PAGE:  # the common case: inside one page
            page = pages.get(index)
            if page is None:
                return bytes(length)
            return page if length == PAGE else page[skip : skip + length]
        parts = []
        remaining = length
        while remaining:
            n = min(PAGE - skip, remaining)
            page = pages.get(index)
            if page is None:
                parts.append(bytes(n))
            else:
                parts.append(page if n == PAGE else page[skip : skip + n])
            remaining -= n
            index += 1
            skip = 0
        return b"".join(parts)

    def pwrite(self, offset: int, data: bytes) -> None:
        pages = self._pages
        index, skip = divmod(offset, PAGE)
        length = len(data)
        if skip == 0 and length == PAGE:
            pages[index] = data
            return
        view = memoryview(data)
        pos = 0
        while pos < length:
            n = min(PAGE - skip, length - pos)
            if n == PAGE:
                pages[index] = bytes(view[pos : pos + PAGE])
            else:
                page = bytearray(pages.get(index) or bytes(PAGE))
                page[skip : skip + n] = view[pos : pos + n]
                pages[index] = bytes(page)
            pos += n
            index += 1
            skip = 0

    def trim(self, offset: int, length: int) -> None:
        # Discarded ranges read back as zeros here (allowed: TRIM content is unspecified).
        self.zero(offset, length, may_trim=True)

    def zero(self, offset: int, length: int, *, may_trim: bool) -> None:
        end = offset + length
        first = -(-offset // PAGE)  # first whole page
        last = end // PAGE  # one past the last whole page
        if first >= last:
            self._zero_partial(offset, end)
            return
        self._zero_partial(offset, first * PAGE)
        pages = self._pages
        if not may_trim:  # NO_HOLE: the range must stay allocated, so store zero pages
            zero = bytes(PAGE)
            for index in range(first, last):
                pages[index] = zero
        elif last - first < len(pages):
            for index in range(first, last):
                pages.pop(index, None)
        else:
            for index in [i for i in pages if first <= i < last]:
                del pages[index]
        self._zero_partial(last * PAGE, end)

    def _zero_partial(self, start: int, end: int) -> None:
        while start < end:
            index, skip = divmod(start, PAGE)
            n = min(PAGE - skip, end - start)
            page = self._pages.get(index)
            if page is not None:
                buf = bytearray(page)
                buf[skip : skip + n] = bytes(n)
                self._pages[index] = bytes(buf)
            start += n

    def flush(self) -> None:
        pass

    def extents(self, offset: int, length: int) -> list[tuple[int, int]]:
        """(length, flags) runs from ``offset``: allocated pages are data, others holes."""
        end = offset + min(length, MAX_STATUS_SCAN)
        out: list[tuple[int, int]] = []
        pos = offset
        pages = self._pages
        while pos < end:
            index = pos // PAGE
            flags = 0 if index in pages else _HOLE
            run_end = min((index + 1) * PAGE, end)
            index += 1
            while run_end < end and (0 if index in pages else _HOLE) == flags:
                run_end = min(run_end + PAGE, end)
                index += 1
            if out and out[-1][1] == flags:
                out[-1] = (out[-1][0] + run_end - pos, flags)
            else:
                out.append((run_end - pos, flags))
            pos = run_end
        return out

    def close(self) -> None:
        self._pages.clear()


_FALLOC_FL_KEEP_SIZE = 0x01
_FALLOC_FL_PUNCH_HOLE = 0x02
_FALLOC_FL_ZERO_RANGE = 0x10
_libc_fallocate = None
_libc_name = ctypes.util.find_library("c")
if _libc_name:
    try:
        _libc = ctypes.CDLL(_libc_name, use_errno=True)
        _libc_fallocate = _libc.fallocate
        _libc_fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]
        _libc_fallocate.restype = ctypes.c_int
    except (OSError, AttributeError):
        _libc_fallocate = None


def _fallocate(fd: int, mode: int, offset: int, length: int) -> bool:
    """Linux fallocate(2); False when the file system or platform does not support ``mode``."""
    if _libc_fallocate is None or length <= 0:
        return False
    if _libc_fallocate(fd, mode, offset, length) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL):
        return False
    raise OSError(err, os.strerror(err))


class FileStore:
    """A regular file.  FLUSH and FUA mean ``fdatasync``: acknowledged data is durable."""

    needs_flush = True

    def __init__(self, path: str | os.PathLike[str], size: int, *, read_only: bool = False) -> None:
        self.path = os.fspath(path)
        self.read_only = read_only
        exists = os.path.exists(self.path)
        if exists:
            actual = os.path.getsize(self.path)
            if actual != size:
                raise StoreError(
                    errno.EINVAL,
                    f"file {self.path} is {actual} bytes, not the export's {size}",
                )
        elif read_only:
            raise StoreError(errno.ENOENT, f"read-only export file {self.path} does not exist")
        flags = os.O_RDONLY if read_only else os.O_RDWR | os.O_CREAT
        self._fd = os.open(self.path, flags | getattr(os, "O_CLOEXEC", 0), 0o644)
        if not exists:
            os.ftruncate(self._fd, size)  # sparse: blocks are allocated as they are written
        self.size = size

    def pread(self, offset: int, length: int) -> bytes:
        data = os.pread(self._fd, length, offset)
        if len(data) < length:  # only if the file shrank behind our back
            data += bytes(length - len(data))
        return data

    def pwrite(self, offset: int, data: bytes) -> None:
        view = memoryview(data)
        while view:
            n = os.pwrite(self._fd, view, offset)
            view = view[n:]
            offset += n

    def trim(self, offset: int, length: int) -> None:
        _fallocate(self._fd, _FALLOC_FL_PUNCH_HOLE | _FALLOC_FL_KEEP_SIZE, offset, length)

    def zero(self, offset: int, length: int, *, may_trim: bool) -> None:
        mode = (
            _FALLOC_FL_PUNCH_HOLE | _FALLOC_FL_KEEP_SIZE
            if may_trim
            else _FALLOC_FL_ZERO_RANGE | _FALLOC_FL_KEEP_SIZE
        )
        if _fallocate(self._fd, mode, offset, length):
            return
        chunk = bytes(min(length, 1 << 20))
        end = offset + length
        while offset < end:
            n = min(len(chunk), end - offset)
            self.pwrite(offset, chunk[:n])
            offset += n

    def flush(self) -> None:
        os.fdatasync(self._fd)

    def extents(self, offset: int, length: int) -> list[tuple[int, int]]:
        end = offset + min(length, MAX_STATUS_SCAN)
        out: list[tuple[int, int]] = []
        pos = offset
        while pos < end:
            try:
                data = os.lseek(self._fd, pos, os.SEEK_DATA)
            except OSError as exc:
                if exc.errno != errno.ENXIO:  # ENXIO: no data after pos
                    return [(end - offset, 0)]  # no SEEK_DATA support: report all data
                data = end
            if data > pos:
                out.append((min(data, end) - pos, _HOLE))
                pos = min(data, end)
                continue
            hole = os.lseek(self._fd, pos, os.SEEK_HOLE)
            out.append((min(hole, end) - pos, 0))
            pos = min(hole, end)
        return out

    def close(self) -> None:
        if self._fd >= 0:
            if not self.read_only:
                os.fdatasync(self._fd)
            os.close(self._fd)
            self._fd = -1
