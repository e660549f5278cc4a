"""The NBD protocol, sans I/O: both roles as state machines over bytes (see ``_state``).

Nothing here imports trio, sockets, or anything else of netswap's.
"""

from . import constants
from ._state import Phase, Role
from .client import ClientConnection, opt_export_name, opt_go, opt_info, opt_meta
from .constants import Cmd, CmdFlags, Errno, Info, Opt, Rep, StateFlags, TransmissionFlags
from .errors import LocalProtocolError, ProtocolError, RemoteProtocolError
from .events import (
    NEED_DATA,
    Aborted,
    ConnectionClosed,
    Disconnect,
    Event,
    ExportInfo,
    ExportListed,
    Extent,
    Greeting,
    Hello,
    InfoBlockSize,
    InfoDescription,
    InfoExport,
    InfoName,
    MetaContext,
    OptionAck,
    OptionError,
    OptionHandled,
    OptionReply,
    OptionRequest,
    Reply,
    Request,
    RequestRejected,
    TransmissionStarted,
)
from .server import ServerConnection

__all__ = [
    "NEED_DATA",
    "Aborted",
    "ClientConnection",
    "Cmd",
    "CmdFlags",
    "ConnectionClosed",
    "Disconnect",
    "Errno",
    "Event",
    "ExportInfo",
    "ExportListed",
    "Extent",
    "Greeting",
    "Hello",
    "Info",
    "InfoBlockSize",
    "InfoDescription",
    "InfoExport",
    "InfoName",
    "LocalProtocolError",
    "MetaContext",
    "Opt",
    "OptionAck",
    "OptionError",
    "OptionHandled",
    "OptionReply",
    "OptionRequest",
    "Phase",
    "ProtocolError",
    "RemoteProtocolError",
    "Rep",
    "Reply",
    "Request",
    "RequestRejected",
    "Role",
    "ServerConnection",
    "StateFlags",
    "TransmissionFlags",
    "TransmissionStarted",
    "constants",
    "opt_export_name",
    "opt_go",
    "opt_info",
    "opt_meta",
]
