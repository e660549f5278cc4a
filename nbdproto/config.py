"""What every layer's configuration shares: one error for a bad value, and sizes.

Sizes are written as the NBD tools write them (nbdkit's ``nbdkit_parse_size``: ``64M``,
``1G``), for exports and payloads as for memory and buffers.  They live here, not in a
module of the client's and another of the server's, because the protocol package is the one
package that the server, the client and the testbed may all import (DESIGN.md §2).  Pure,
like the rest of the package: no I/O, nothing of netswap's.
"""

from __future__ import annotations

import re

_SIZE_RE = re.compile(r"^\s*(\d+)\s*([KMGT]?)(i?B)?\s*$", re.IGNORECASE)
_UNITS = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}


class ConfigError(ValueError):
    """A configuration or argument error; ``str()`` is a one-line message for the user."""


def parse_size(value: str | int, *, what: str = "size") -> int:
    """``"64M"`` → 67108864.  K/M/G/T are powers of 1024; a bare number is bytes."""
    if isinstance(value, bool) or not isinstance(value, str | int):
        raise ConfigError(f"{what}: expected a size, got {value!r}")
    if isinstance(value, int):
        if value < 0:
            raise ConfigError(f"{what}: {value} is negative")
        return value
    m = _SIZE_RE.match(value)
    if not m:
        raise ConfigError(f"{what}: {value!r} is not a size (examples: 4096, 64K, 256M, 1G)")
    return int(m.group(1)) * _UNITS[m.group(2).upper()]
