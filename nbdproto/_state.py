"""Phases of an NBD connection and the legal transitions between them, for both roles.

Rules of this table (proto.md, "Fixed newstyle negotiation" and "Transmission"):

* The server speaks first (greeting); the client answers with its flags, once.
* Options are strictly one at a time: a client may not send an option while one is pending,
  and a server replies to exactly one option before reading the next.
* GO's ACK and EXPORT_NAME's export data end the handshake; transmission starts at once.
* ABORT and DISC end the connection; so does EOF, in any phase (short reads mean close).
* Any protocol error moves the machine to ERROR, from which nothing is legal.

Each machine keeps its phase and moves only through ``transition(role, phase, trigger)``:
a trigger missing from the table is a protocol error — remote when the peer caused it,
local when we did.
"""

from __future__ import annotations

import enum


class Role(enum.Enum):
    CLIENT = "client"
    SERVER = "server"


class Phase(enum.Enum):
    AWAIT_GREETING = "await_greeting"  # client: waiting for the server's 18 bytes
    SEND_FLAGS = "send_flags"  # client: greeting seen, must send its flags
    AWAIT_FLAGS = "await_flags"  # server: greeting sent, waiting for client flags
    OPTIONS = "options"  # between options
    OPTION_PENDING = "option_pending"  # client: an option is out, its reply not complete
    TRANSMISSION = "transmission"
    CLOSED = "closed"
    ERROR = "error"


class Trigger(enum.Enum):
    GREETING = "greeting"
    FLAGS = "flags"
    OPTION = "option"  # an option sent (client) / handled, handshake goes on (server)
    OPTION_DONE = "option_done"  # client: final reply of a pending option
    GO = "go"  # handshake ends: GO ACK or EXPORT_NAME reply
    ABORT = "abort"
    REQUEST = "request"
    DISC = "disc"
    EOF = "eof"
    ERROR = "error"


_C, _S = Role.CLIENT, Role.SERVER
P, T = Phase, Trigger

TABLE: dict[tuple[Role, Phase], dict[Trigger, Phase]] = {
    (_C, P.AWAIT_GREETING): {T.GREETING: P.SEND_FLAGS},
    (_C, P.SEND_FLAGS): {T.FLAGS: P.OPTIONS},
    (_C, P.OPTIONS): {T.OPTION: P.OPTION_PENDING},
    (_C, P.OPTION_PENDING): {T.OPTION_DONE: P.OPTIONS, T.GO: P.TRANSMISSION, T.ABORT: P.CLOSED},
    (_C, P.TRANSMISSION): {T.REQUEST: P.TRANSMISSION, T.DISC: P.CLOSED},
    (_S, P.AWAIT_FLAGS): {T.FLAGS: P.OPTIONS},
    (_S, P.OPTIONS): {T.OPTION: P.OPTIONS, T.GO: P.TRANSMISSION, T.ABORT: P.CLOSED},
    (_S, P.TRANSMISSION): {T.REQUEST: P.TRANSMISSION, T.DISC: P.CLOSED},
}

# EOF and errors are legal everywhere except after the end.
for (_role, _phase), _moves in TABLE.items():
    _moves.setdefault(T.EOF, P.CLOSED)
    _moves.setdefault(T.ERROR, P.ERROR)
for _role in Role:
    TABLE[(_role, P.CLOSED)] = {T.EOF: P.CLOSED}
    TABLE[(_role, P.ERROR)] = {}


def transition(role: Role, phase: Phase, trigger: Trigger) -> Phase | None:
    """The next phase, or None when ``trigger`` is illegal in ``phase``."""
    return TABLE.get((role, phase), {}).get(trigger)
