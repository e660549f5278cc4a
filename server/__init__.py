"""The netswap NBD server: real, strict, and fast enough to stand beside nbdkit."""

from .exports import Export
from .faults import Faults
from .serve import NBDServer
from .stores import FileStore, MemoryStore, Store, StoreError

__all__ = ["Export", "Faults", "FileStore", "MemoryStore", "NBDServer", "Store", "StoreError"]
