"""Exports: a name, a store for its bytes, what the handshake says about it, its faults."""

from __future__ import annotations

import attrs

from nbdproto import ExportInfo, TransmissionFlags

from .config import ExportConfig
from .faults import Faults
from .stores import FileStore, MemoryStore, Store


def open_store(config: ExportConfig, *, populate: bool = True) -> Store:
    """The store an export's configuration describes (a file is created if missing);
    ``populate`` as :class:`MemoryStore`'s."""
    if config.backend == "file":
        assert config.path is not None
        return FileStore(config.path, config.size, read_only=config.read_only)
    return MemoryStore(config.size, read_only=config.read_only, populate=populate)


@attrs.define
class Export:
    """A named export: its store, what the handshake says about it, and its faults."""

    config: ExportConfig
    store: Store
    info: ExportInfo
    faults: Faults = attrs.field()

    @faults.default
    def _faults_from_config(self) -> Faults:
        return Faults.from_config(self.config.faults, self.info.name)

    @classmethod
    def from_config(cls, config: ExportConfig, *, populate: bool = True) -> Export:
        store = open_store(config, populate=populate)
        flags = (
            TransmissionFlags.HAS_FLAGS
            | TransmissionFlags.SEND_FLUSH
            | TransmissionFlags.SEND_CACHE
            # One store object serves every connection, so a FLUSH on one covers writes
            # completed on all of them: multi-conn is true for both backends.
            | TransmissionFlags.CAN_MULTI_CONN
        )
        if config.read_only:
            flags |= TransmissionFlags.READ_ONLY
        else:  # writing features only where writing is possible (as nbdkit -r does)
            flags |= (
                TransmissionFlags.SEND_FUA
                | TransmissionFlags.SEND_TRIM
                | TransmissionFlags.SEND_WRITE_ZEROES
                | TransmissionFlags.SEND_FAST_ZERO
            )
        info = ExportInfo(config.name, config.size, flags, config.description)
        return cls(config, store, info)
