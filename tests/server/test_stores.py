"""Export backends: sparse memory and file, against a bytearray reference."""

from __future__ import annotations

import errno
import os
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from server.stores import PAGE, FileStore, MemoryStore, StoreError

SIZE = 64 * PAGE
HOLE = 3


def stores(tmp_path: Path) -> list[MemoryStore | FileStore]:
    return [MemoryStore(SIZE), FileStore(tmp_path / "disk.img", SIZE)]


def test_fresh_store_reads_zeros_and_is_one_hole(tmp_path: Path) -> None:
    for store in stores(tmp_path):
        assert store.pread(0, SIZE) == bytes(SIZE)
        assert store.extents(0, SIZE) == [(SIZE, HOLE)]


def test_unaligned_write_then_read_back(tmp_path: Path) -> None:
    for store in stores(tmp_path):
        data = os.urandom(3 * PAGE + 17)
        store.pwrite(PAGE - 5, data)
        assert store.pread(PAGE - 5, len(data)) == data
        assert store.pread(0, PAGE - 5) == bytes(PAGE - 5)


def test_extents_report_written_pages_as_data(tmp_path: Path) -> None:
    for store in stores(tmp_path):
        store.pwrite(4 * PAGE, b"x" * PAGE)
        ext = store.extents(0, 8 * PAGE)
        assert ext == [(4 * PAGE, HOLE), (PAGE, 0), (3 * PAGE, HOLE)]
        assert sum(n for n, _ in ext) == 8 * PAGE


def test_zero_and_trim_read_back_as_zeros(tmp_path: Path) -> None:
    for store in stores(tmp_path):
        store.pwrite(0, b"\xff" * (8 * PAGE))
        store.zero(100, 2 * PAGE, may_trim=True)
        store.zero(5 * PAGE, PAGE, may_trim=False)
        store.trim(7 * PAGE, PAGE)
        got = store.pread(0, 8 * PAGE)
        want = bytearray(b"\xff" * (8 * PAGE))
        want[100 : 100 + 2 * PAGE] = bytes(2 * PAGE)
        want[5 * PAGE : 6 * PAGE] = bytes(PAGE)
        want[7 * PAGE :] = bytes(PAGE)
        assert got == bytes(want)


def test_memory_store_frees_whole_pages_on_zero() -> None:
    store = MemoryStore(SIZE)
    store.pwrite(0, b"a" * (4 * PAGE))
    store.zero(0, 4 * PAGE, may_trim=True)
    assert store.allocated_bytes == 0


def test_file_store_refuses_a_file_of_another_size(tmp_path: Path) -> None:
    path = tmp_path / "disk.img"
    path.write_bytes(b"x" * 100)
    with pytest.raises(StoreError, match="100 bytes"):
        FileStore(path, SIZE)


def test_file_store_keeps_data_across_reopen(tmp_path: Path) -> None:
    path = tmp_path / "disk.img"
    store = FileStore(path, SIZE)
    store.pwrite(PAGE, b"persist")
    store.flush()
    store.close()
    again = FileStore(path, SIZE)
    assert again.pread(PAGE, 7) == b"persist"
    again.close()


def test_read_only_file_store_must_exist(tmp_path: Path) -> None:
    with pytest.raises(StoreError, match="does not exist"):
        FileStore(tmp_path / "missing.img", SIZE, read_only=True)


ops = st.lists(
    st.tuples(
        st.sampled_from(["write", "zero", "trim"]),
        st.integers(0, SIZE - 1),
        st.integers(1, 3 * PAGE),
        st.binary(min_size=1, max_size=16),
    ),
    max_size=25,
)


@settings(max_examples=150, deadline=None)
@given(ops)
def test_memory_store_matches_a_flat_reference(sequence: list[tuple[str, int, int, bytes]]) -> None:
    store = MemoryStore(SIZE)
    ref = bytearray(SIZE)
    for op, offset, length, pattern in sequence:
        length = min(length, SIZE - offset)
        if op == "write":
            data = (pattern * (length // len(pattern) + 1))[:length]
            store.pwrite(offset, data)
            ref[offset : offset + length] = data
        else:
            if op == "zero":
                store.zero(offset, length, may_trim=True)
            else:
                store.trim(offset, length)
            ref[offset : offset + length] = bytes(length)
    assert store.pread(0, SIZE) == bytes(ref)
    assert sum(n for n, _ in store.extents(0, SIZE)) == SIZE


def test_zero_with_no_hole_keeps_the_range_allocated() -> None:
    store = MemoryStore(SIZE)
    store.zero(0, 4 * PAGE, may_trim=False)
    assert store.pread(0, 4 * PAGE) == bytes(4 * PAGE)
    assert store.extents(0, 4 * PAGE) == [(4 * PAGE, 0)]  # data, not a hole


def test_a_payload_received_into_a_memory_store_counts_as_data_once_written() -> None:
    store = MemoryStore(SIZE)
    data = os.urandom(2 * PAGE)
    view = store.receive_view(PAGE - 5, len(data))
    view[:] = data  # what recv_into does
    assert store.pread(PAGE - 5, len(data)) == data
    store.written(PAGE - 5, len(data))
    assert store.allocated_bytes == 3 * PAGE
    assert store.extents(0, 8 * PAGE) == [(3 * PAGE, 0), (5 * PAGE, HOLE)]


def test_receive_view_refuses_a_read_only_store_and_ranges_past_the_end() -> None:
    with pytest.raises(StoreError) as excinfo:
        MemoryStore(SIZE, read_only=True).receive_view(0, PAGE)
    assert excinfo.value.errno == errno.EROFS
    with pytest.raises(StoreError) as excinfo:
        MemoryStore(SIZE).receive_view(SIZE - PAGE, 2 * PAGE)
    assert excinfo.value.errno == errno.ENOSPC


def test_pages_populated_ahead_of_a_sequential_writer_stay_holes() -> None:
    """A sequential writer has the pages ahead of it faulted in by a helper thread: they
    read as zeros and count as holes, and the writer's data is all there."""
    size = 16 << 20
    store = MemoryStore(size)
    data = os.urandom(128 << 10)
    written = 4 << 20
    for offset in range(0, written, len(data)):
        view = store.receive_view(offset, len(data))  # as the server's payload sink does
        view[:] = data
        store.written(offset, len(data))
    assert store._populator is not None  # the run was followed
    assert store.allocated_bytes == written
    assert store.extents(0, size) == [(written, 0), (size - written, HOLE)]
    assert store.pread(written, 4 << 20) == bytes(4 << 20)
    assert store.pread(written - len(data), len(data)) == data
    store.close()
    assert store._populator is None and store.allocated_bytes == 0


def test_a_store_told_not_to_populate_starts_no_helper() -> None:
    """``populate=False`` (the embedded server's, whose writer is the model): the same
    sequential writes start no helper thread and store the same bytes."""
    store = MemoryStore(16 << 20, populate=False)
    data = os.urandom(128 << 10)
    for offset in range(0, 4 << 20, len(data)):
        store.pwrite(offset, data)
    assert store._populator is None
    assert store.allocated_bytes == 4 << 20
    assert store.pread((4 << 20) - len(data), len(data)) == data
    store.close()
