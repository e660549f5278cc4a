"""NBD wire constants, named as in the spec (NetworkBlockDevice/nbd doc/proto.md).

All integers on the wire are big-endian.  Names drop the ``NBD_`` prefix and live in
IntEnum/IntFlag classes so that logs show ``Cmd.WRITE`` rather than ``1``.
"""

from __future__ import annotations

import enum
import struct

# -- handshake ------------------------------------------------------------------------------
NBDMAGIC = 0x4E42444D41474943  # "NBDMAGIC"
IHAVEOPT = 0x49484156454F5054  # "IHAVEOPT"
OPTION_REPLY_MAGIC = 0x0003E889045565A9
REQUEST_MAGIC = 0x25609513
SIMPLE_REPLY_MAGIC = 0x67446698
STRUCTURED_REPLY_MAGIC = 0x668E33EF

#: Strings (export names, messages) "MUST be no longer than 4096 bytes" (proto.md, Conventions).
MAX_STRING = 4096
#: The default maximum payload a client may assume without INFO_BLOCK_SIZE (proto.md): 32 MiB.
DEFAULT_MAX_PAYLOAD = 32 * 1024 * 1024
#: Known options carry at most a name, a description and a few queries: anything longer is
#: answered ERR_TOO_BIG and drained rather than buffered.
MAX_OPTION_DATA = 64 * 1024


class HandshakeFlags(enum.IntFlag):
    FIXED_NEWSTYLE = 1 << 0
    NO_ZEROES = 1 << 1


class ClientFlags(enum.IntFlag):
    C_FIXED_NEWSTYLE = 1 << 0
    C_NO_ZEROES = 1 << 1


class Opt(enum.IntEnum):
    EXPORT_NAME = 1
    ABORT = 2
    LIST = 3
    PEEK_EXPORT = 4
    STARTTLS = 5
    INFO = 6
    GO = 7
    STRUCTURED_REPLY = 8
    LIST_META_CONTEXT = 9
    SET_META_CONTEXT = 10
    EXTENDED_HEADERS = 11


_REP_ERR = 1 << 31


class Rep(enum.IntEnum):
    ACK = 1
    SERVER = 2
    INFO = 3
    META_CONTEXT = 4
    ERR_UNSUP = _REP_ERR | 1
    ERR_POLICY = _REP_ERR | 2
    ERR_INVALID = _REP_ERR | 3
    ERR_PLATFORM = _REP_ERR | 4
    ERR_TLS_REQD = _REP_ERR | 5
    ERR_UNKNOWN = _REP_ERR | 6
    ERR_SHUTDOWN = _REP_ERR | 7
    ERR_BLOCK_SIZE_REQD = _REP_ERR | 8
    ERR_TOO_BIG = _REP_ERR | 9
    ERR_EXT_HEADER_REQD = _REP_ERR | 10

    @property
    def is_error(self) -> bool:
        return bool(self & _REP_ERR)


def rep_is_error(value: int) -> bool:
    return bool(value & _REP_ERR)


class Info(enum.IntEnum):
    EXPORT = 0
    NAME = 1
    DESCRIPTION = 2
    BLOCK_SIZE = 3


class TransmissionFlags(enum.IntFlag):
    HAS_FLAGS = 1 << 0
    READ_ONLY = 1 << 1
    SEND_FLUSH = 1 << 2
    SEND_FUA = 1 << 3
    ROTATIONAL = 1 << 4
    SEND_TRIM = 1 << 5
    SEND_WRITE_ZEROES = 1 << 6
    SEND_DF = 1 << 7
    CAN_MULTI_CONN = 1 << 8
    SEND_RESIZE = 1 << 9
    SEND_CACHE = 1 << 10
    SEND_FAST_ZERO = 1 << 11


class Cmd(enum.IntEnum):
    READ = 0
    WRITE = 1
    DISC = 2
    FLUSH = 3
    TRIM = 4
    CACHE = 5
    WRITE_ZEROES = 6
    BLOCK_STATUS = 7


class CmdFlags(enum.IntFlag):
    FUA = 1 << 0
    NO_HOLE = 1 << 1
    DF = 1 << 2
    REQ_ONE = 1 << 3
    FAST_ZERO = 1 << 4


class ReplyFlags(enum.IntFlag):
    DONE = 1 << 0


class Chunk(enum.IntEnum):
    NONE = 0
    OFFSET_DATA = 1
    OFFSET_HOLE = 2
    BLOCK_STATUS = 5
    ERROR = (1 << 15) | 1
    ERROR_OFFSET = (1 << 15) | 2


def chunk_is_error(value: int) -> bool:
    return bool(value & (1 << 15))


class Errno(enum.IntEnum):
    """Error values on the wire; fixed by the spec, independent of the host's errno."""

    OK = 0
    EPERM = 1
    EIO = 5
    ENOMEM = 12
    EINVAL = 22
    ENOSPC = 28
    EOVERFLOW = 75
    ENOTSUP = 95
    ESHUTDOWN = 108


class StateFlags(enum.IntFlag):
    """``base:allocation`` extent flags."""

    HOLE = 1 << 0
    ZERO = 1 << 1


BASE_ALLOCATION = "base:allocation"

# -- fixed-size frames ----------------------------------------------------------------------
GREETING = struct.Struct(">QQH")  # NBDMAGIC, IHAVEOPT, handshake flags           (18 bytes)
CLIENT_FLAGS = struct.Struct(">I")  #                                               (4 bytes)
OPTION_HEADER = struct.Struct(">QII")  # IHAVEOPT, option, length                  (16 bytes)
OPTION_REPLY_HEADER = struct.Struct(">QIII")  # magic, option, reply type, length (20 bytes)
EXPORT_NAME_REPLY = struct.Struct(">QH")  # size, transmission flags (+124 zeroes)  (10 bytes)
REQUEST = struct.Struct(">IHHQQI")  # magic, flags, type, cookie, offset, length   (28 bytes)
SIMPLE_REPLY = struct.Struct(">IIQ")  # magic, error, cookie                         (16 bytes)
CHUNK_HEADER = struct.Struct(">IHHQI")  # magic, flags, type, cookie, length        (20 bytes)
INFO_EXPORT = struct.Struct(">HQH")  # info type, size, transmission flags         (12 bytes)
INFO_BLOCK_SIZE = struct.Struct(">HIII")  # info type, minimum, preferred, maximum (14 bytes)
EXPORT_NAME_PADDING = bytes(124)
