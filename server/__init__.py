"""The netswap NBD server: real, strict, and fast enough to stand beside nbdkit."""

from .serve import Export, NBDServer
from .stores import FileStore, MemoryStore, Store, StoreError

__all__ = ["Export", "FileStore", "MemoryStore", "NBDServer", "Store", "StoreError"]
