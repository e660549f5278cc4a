"""What the server counts: per connection, and in total."""

from __future__ import annotations

import attrs


@attrs.define
class Counters:
    """One connection's work so far (logged when it closes)."""

    requests: int = 0
    rejected: int = 0
    bytes_read: int = 0
    bytes_written: int = 0


@attrs.define
class Stats:
    """The server's totals.  Requests and bytes count as they are done, on live connections
    too: a swap device keeps one connection for its whole life."""

    connections: int = 0
    live: int = 0
    refused: int = 0
    requests: int = 0
    rejected: int = 0
    bytes_read: int = 0
    bytes_written: int = 0
    protocol_errors: int = 0
    handshake_timeouts: int = 0
    #: Connections ended by a bug of this server (an unexpected exception), not by the peer.
    internal_errors: int = 0
