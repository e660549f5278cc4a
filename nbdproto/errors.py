"""One family of errors for the NBD protocol (the h11 ``_util.py`` habit).

``LocalProtocolError``: our side asked the machine to do something the protocol forbids.
``RemoteProtocolError``: the peer broke a MUST; the only answer is a hard disconnect.
Anything the peer did that the protocol answers with an error *reply* (EINVAL, ENOSPC,
NBD_REP_ERR_INVALID, ...) is not an exception: it is an event and a reply.
"""

from __future__ import annotations


class ProtocolError(Exception):
    """Base of every error the NBD machines raise.  Once raised, the machine is in ERROR."""


class LocalProtocolError(ProtocolError):
    """We tried to send something illegal in the current phase."""


class RemoteProtocolError(ProtocolError):
    """The peer sent something illegal: disconnect (proto.md "hard disconnect")."""
