"""The handshake: every option, the real clients' sequences (nbd.md §2), and the state table."""

from __future__ import annotations

import pytest

from nbdproto import (
    NEED_DATA,
    Aborted,
    ClientConnection,
    Cmd,
    ConnectionClosed,
    Disconnect,
    ExportInfo,
    ExportListed,
    Extent,
    Greeting,
    Hello,
    Info,
    InfoBlockSize,
    InfoDescription,
    InfoExport,
    InfoName,
    LocalProtocolError,
    MetaContext,
    Opt,
    OptionAck,
    OptionError,
    OptionHandled,
    OptionRequest,
    Phase,
    ProtocolError,
    RemoteProtocolError,
    Rep,
    Reply,
    Request,
    Role,
    ServerConnection,
    StateFlags,
    TransmissionFlags,
    TransmissionStarted,
    constants,
    opt_export_name,
    opt_go,
    opt_info,
    opt_meta,
)
from nbdproto._state import TABLE, Trigger, transition
from nbdproto.constants import ClientFlags, HandshakeFlags

from .helpers import (
    ALL_FEATURES,
    CLIENT_FLAGS,
    ConnectionPair,
    KiB,
    MemoryExecutor,
    MiB,
    drain,
    handshake,
    hello,
    make_exports,
    pieces,
)

TF = TransmissionFlags
BASE = constants.BASE_ALLOCATION
DISK_FLAGS = ALL_FEATURES | TF.HAS_FLAGS
DEFAULT_BLOCKS = InfoBlockSize(1, 4096, constants.DEFAULT_MAX_PAYLOAD)


def ready(**server_kwargs: object) -> ConnectionPair:
    """A pair past the greeting and client flags, ready for options."""
    pair = ConnectionPair(**server_kwargs)  # type: ignore[arg-type]
    hello(pair)
    return pair


def only_error(events: list[object], option: int, rep: Rep) -> OptionError:
    assert len(events) == 1, events
    (event,) = events
    assert isinstance(event, OptionError), event
    assert (event.option, event.reply) == (option, rep)
    return event


def assert_still_negotiating(pair: ConnectionPair) -> None:
    """Both machines are between options, and the next option (GO) still works."""
    assert pair.client.phase is Phase.OPTIONS
    assert pair.server.phase is Phase.OPTIONS
    assert isinstance(pair.option(opt_go("disk"))[-1], TransmissionStarted)
    assert pair.server.phase is Phase.TRANSMISSION


def raw_option(option: int, data: bytes = b"", magic: int = constants.IHAVEOPT) -> bytes:
    return constants.OPTION_HEADER.pack(magic, option, len(data)) + data


# -- greeting and client flags -----------------------------------------------------------------
def test_greeting_offers_fixed_newstyle_and_no_zeroes() -> None:
    pair = ConnectionPair()
    assert pair.greet() == [Greeting(HandshakeFlags.FIXED_NEWSTYLE | HandshakeFlags.NO_ZEROES)]
    assert pair.client.phase is Phase.SEND_FLAGS


@pytest.mark.parametrize(
    "greeting",
    [
        constants.GREETING.pack(constants.IHAVEOPT, constants.IHAVEOPT, 3),
        constants.GREETING.pack(constants.NBDMAGIC, 0x00420281861253, 0),  # oldstyle
    ],
    ids=["bad-magic", "oldstyle"],
)
def test_client_refuses_anything_but_a_newstyle_greeting(greeting: bytes) -> None:
    client = ClientConnection()
    client.receive_data(greeting)
    with pytest.raises(RemoteProtocolError):
        client.next_event()
    assert client.phase is Phase.ERROR


def test_client_ignores_unknown_handshake_flags() -> None:
    client = ClientConnection()
    client.receive_data(constants.GREETING.pack(constants.NBDMAGIC, constants.IHAVEOPT, 0xFFFF))
    assert client.next_event() == Greeting(HandshakeFlags.FIXED_NEWSTYLE | HandshakeFlags.NO_ZEROES)


def test_server_refuses_a_max_payload_below_4096() -> None:
    with pytest.raises(ValueError, match="max_payload"):
        ServerConnection(make_exports(), max_payload=4095)


def test_client_flags_move_both_machines_to_options() -> None:
    pair = ConnectionPair()
    pair.greet()
    assert pair.send(Hello(CLIENT_FLAGS)) == ([Hello(CLIENT_FLAGS)], [])
    assert pair.client.phase is pair.server.phase is Phase.OPTIONS


def test_greeting_and_flags_survive_one_byte_pieces() -> None:
    pair = ConnectionPair(split=lambda data: pieces(data, [1]))
    client, server = handshake(pair, "disk")
    assert client.size == server.size == MiB


@pytest.mark.parametrize("flags", [1 << 2, 1 << 31, CLIENT_FLAGS | 1 << 5])
def test_unknown_client_flags_drop_the_connection(flags: int) -> None:
    pair = ConnectionPair()
    pair.greet()
    pair.server.receive_data(pair.client.send(Hello(flags)))
    with pytest.raises(RemoteProtocolError):
        pair.server.next_event()
    assert pair.server.phase is Phase.ERROR
    assert pair.server.data_to_send() == b""


def test_eof_before_client_flags_is_connection_closed() -> None:
    server = ServerConnection(make_exports())
    server.initiate()
    server.receive_data(b"\0\0")
    server.receive_data(b"")
    assert server.next_event() == ConnectionClosed()
    assert server.phase is Phase.CLOSED


# -- EXPORT_NAME ---------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("flags", "padding"),
    [(CLIENT_FLAGS, 0), (ClientFlags.C_FIXED_NEWSTYLE, 124)],
    ids=["no-zeroes", "zero-padded"],
)
def test_export_name_enters_transmission_padded_unless_no_zeroes(flags: int, padding: int) -> None:
    pair = ConnectionPair()
    hello(pair, flags)
    server_events = pair.to_server(pair.client.send(opt_export_name("disk")))
    started = TransmissionStarted("disk", MiB, DISK_FLAGS, False, {}, Opt.EXPORT_NAME)
    assert server_events == [started]
    out = pair.server.data_to_send()
    assert out == constants.EXPORT_NAME_REPLY.pack(MiB, DISK_FLAGS) + bytes(padding)
    pair.split = lambda data: pieces(data, [1])  # the client counts the padding byte by byte
    assert pair.to_client(out) == [started]
    assert pair.client.phase is pair.server.phase is Phase.TRANSMISSION


def test_export_name_empty_selects_the_default_export() -> None:
    pair = ready()
    server_events, client_events = pair.send(opt_export_name(""))
    assert server_events[0].export_name == "disk"
    assert client_events == [TransmissionStarted("", MiB, DISK_FLAGS, False, {}, Opt.EXPORT_NAME)]


def test_export_name_honours_an_explicit_default_export() -> None:
    pair = ready(default_export="ro")
    (started,) = pair.send(opt_export_name(""))[0]
    assert started.export_name == "ro"
    assert started.flags & TF.READ_ONLY


@pytest.mark.parametrize("name", ["nope", "DISK"])
def test_export_name_unknown_export_closes_without_any_reply(name: str) -> None:
    pair = ready()
    pair.server.receive_data(pair.client.send(opt_export_name(name)))
    with pytest.raises(RemoteProtocolError):
        pair.server.next_event()
    assert pair.server.data_to_send() == b""  # EXPORT_NAME has no error reply: just close
    assert pair.server.phase is Phase.ERROR
    pair.client.receive_data(b"")
    assert drain(pair.client) == [ConnectionClosed()]


def test_export_name_not_utf8_closes() -> None:
    pair = ready()
    pair.server.receive_data(raw_option(Opt.EXPORT_NAME, b"\xff\xfe"))
    with pytest.raises(RemoteProtocolError):
        pair.server.next_event()
    assert pair.server.data_to_send() == b""


def test_export_name_longer_than_option_limit_closes() -> None:
    pair = ready()
    pair.server.receive_data(raw_option(Opt.EXPORT_NAME, bytes(constants.MAX_OPTION_DATA + 1)))
    with pytest.raises(RemoteProtocolError):
        pair.server.next_event()
    assert pair.server.data_to_send() == b""


# -- non-fixed newstyle --------------------------------------------------------------------
@pytest.mark.parametrize(("flags", "padding"), [(0, 124), (ClientFlags.C_NO_ZEROES, 0)])
def test_non_fixed_newstyle_client_can_use_export_name(flags: int, padding: int) -> None:
    pair = ConnectionPair()
    hello(pair, flags)
    data = pair.client.send(opt_export_name("disk"))
    assert isinstance(pair.to_server(data)[0], TransmissionStarted)
    out = pair.server.data_to_send()
    assert len(out) == constants.EXPORT_NAME_REPLY.size + padding
    assert isinstance(pair.to_client(out)[0], TransmissionStarted)


@pytest.mark.parametrize("option", [Opt.LIST, Opt.GO, Opt.ABORT, 99])
def test_non_fixed_newstyle_client_other_options_drop_the_connection(option: int) -> None:
    pair = ConnectionPair()
    hello(pair, 0)
    pair.server.receive_data(raw_option(option))
    with pytest.raises(RemoteProtocolError):
        pair.server.next_event()
    assert pair.server.data_to_send() == b""


def test_bad_option_magic_drops_the_connection() -> None:
    pair = ready()
    pair.server.receive_data(raw_option(Opt.LIST, magic=constants.NBDMAGIC))
    with pytest.raises(RemoteProtocolError):
        pair.server.next_event()
    assert pair.server.phase is Phase.ERROR


# -- ABORT ---------------------------------------------------------------------------------
def test_abort_is_acked_and_closes_both_sides() -> None:
    pair = ready()
    assert pair.send(OptionRequest(Opt.ABORT)) == ([Aborted()], [OptionAck(Opt.ABORT)])
    assert pair.client.phase is pair.server.phase is Phase.CLOSED
    pair.server.receive_data(raw_option(Opt.LIST))  # anything after ABORT is ignored
    assert pair.server.next_event() is NEED_DATA
    assert pair.server.buffered == 0


def test_abort_then_close_without_waiting_is_tolerated() -> None:
    pair = ready()
    pair.server.receive_data(pair.client.send(OptionRequest(Opt.ABORT)))
    pair.server.receive_data(b"")
    assert drain(pair.server) == [Aborted(), ConnectionClosed()]


# -- LIST ----------------------------------------------------------------------------------
def test_list_sends_one_server_reply_per_export_then_ack() -> None:
    pair = ready()
    assert pair.option(OptionRequest(Opt.LIST)) == [
        ExportListed("disk", "scratch disk"),
        ExportListed("ro", ""),
        ExportListed("bare", ""),
        OptionAck(Opt.LIST),
    ]
    assert_still_negotiating(pair)


def test_list_with_no_exports_is_just_ack() -> None:
    pair = ConnectionPair({})
    hello(pair)
    assert pair.option(OptionRequest(Opt.LIST)) == [OptionAck(Opt.LIST)]


def test_list_with_data_is_invalid() -> None:
    pair = ready()
    only_error(pair.option(OptionRequest(Opt.LIST, b"x")), Opt.LIST, Rep.ERR_INVALID)
    assert_still_negotiating(pair)


# -- INFO ----------------------------------------------------------------------------------
def test_info_reports_export_and_block_size_then_acks_and_stays_in_options() -> None:
    pair = ready()
    assert pair.option(opt_info("disk")) == [
        InfoExport(MiB, DISK_FLAGS),
        DEFAULT_BLOCKS,
        OptionAck(Opt.INFO),
    ]
    assert_still_negotiating(pair)


def test_info_sends_name_and_description_when_asked() -> None:
    pair = ready()
    assert pair.option(opt_info("", [Info.NAME, Info.DESCRIPTION, Info.BLOCK_SIZE])) == [
        InfoExport(MiB, DISK_FLAGS),
        InfoName("disk"),
        InfoDescription("scratch disk"),
        DEFAULT_BLOCKS,
        OptionAck(Opt.INFO),
    ]


def test_info_omits_an_empty_description() -> None:
    pair = ready()
    events = pair.option(opt_info("ro", [Info.NAME, Info.DESCRIPTION]))
    assert InfoName("ro") in events
    assert not any(isinstance(e, InfoDescription) for e in events)


def test_info_block_size_maximum_is_the_servers_max_payload() -> None:
    exports = {"big": ExportInfo("big", MiB, TF(0), min_block=512, preferred_block=8192)}
    pair = ConnectionPair(exports, max_payload=MiB)
    hello(pair)
    assert InfoBlockSize(512, 8192, MiB) in pair.option(opt_info("big", [Info.BLOCK_SIZE]))


def test_info_unknown_export_is_err_unknown() -> None:
    pair = ready()
    only_error(pair.option(opt_info("nope")), Opt.INFO, Rep.ERR_UNKNOWN)
    assert_still_negotiating(pair)


# -- GO ------------------------------------------------------------------------------------
def test_go_acks_and_enters_transmission() -> None:
    pair = ready()
    server_events, client_events = pair.send(opt_go("disk", [Info.BLOCK_SIZE]))
    started = TransmissionStarted("disk", MiB, DISK_FLAGS, False, {}, Opt.GO)
    assert server_events == [started]
    assert client_events == [InfoExport(MiB, DISK_FLAGS), DEFAULT_BLOCKS, started]
    assert pair.client.phase is pair.server.phase is Phase.TRANSMISSION
    assert pair.server.export is not None and pair.server.export.name == "disk"


def test_go_with_zero_info_requests_still_gets_info_export() -> None:
    pair = ready()
    assert pair.option(opt_go(""))[0] == InfoExport(MiB, DISK_FLAGS)


def test_go_unknown_export_is_err_unknown_and_handshake_continues() -> None:
    pair = ready()
    only_error(pair.option(opt_go("nope")), Opt.GO, Rep.ERR_UNKNOWN)
    assert_still_negotiating(pair)


@pytest.mark.parametrize(
    "data",
    [
        b"",
        b"\0\0\0",
        b"\0\0\0\x04disk",  # no info count
        b"\0\0\0\x09disk\0\0",  # name length past the end
        b"\0\0\0\x04disk\0\x01",  # one info request announced, none sent
        b"\0\0\0\x04disk\0\0\0",  # a trailing byte
        b"\0\0\0\x02\xff\xfe\0\0",  # name not UTF-8
        b"\0\0\x10\x01" + b"a" * 4097 + b"\0\0",  # name over 4096 bytes
    ],
)
@pytest.mark.parametrize("option", [Opt.GO, Opt.INFO])
def test_go_and_info_with_malformed_data_are_invalid(option: int, data: bytes) -> None:
    pair = ready()
    only_error(pair.option(OptionRequest(option, data)), option, Rep.ERR_INVALID)
    assert_still_negotiating(pair)


# -- STRUCTURED_REPLY ----------------------------------------------------------------------
def test_structured_reply_is_acked_and_carries_into_transmission() -> None:
    pair = ready()
    assert pair.option(OptionRequest(Opt.STRUCTURED_REPLY)) == [OptionAck(Opt.STRUCTURED_REPLY)]
    assert pair.client.structured and pair.server.structured
    client, server = pair.send(opt_go("disk"))[1][-1], pair.server_events[-1]
    assert client.structured_replies and server.structured_replies


def test_structured_reply_twice_is_invalid() -> None:
    pair = ready()
    pair.option(OptionRequest(Opt.STRUCTURED_REPLY))
    events = pair.option(OptionRequest(Opt.STRUCTURED_REPLY))
    only_error(events, Opt.STRUCTURED_REPLY, Rep.ERR_INVALID)
    assert pair.server.structured


def test_structured_reply_with_data_is_invalid() -> None:
    pair = ready()
    events = pair.option(OptionRequest(Opt.STRUCTURED_REPLY, b"\0"))
    only_error(events, Opt.STRUCTURED_REPLY, Rep.ERR_INVALID)
    assert not pair.server.structured
    assert_still_negotiating(pair)


def test_structured_reply_disabled_is_unsupported_and_replies_stay_simple() -> None:
    pair = ready(structured_replies=False)
    events = pair.option(OptionRequest(Opt.STRUCTURED_REPLY))
    only_error(events, Opt.STRUCTURED_REPLY, Rep.ERR_UNSUP)
    assert not pair.client.structured
    started = pair.option(opt_go("disk"))[-1]
    assert not started.structured_replies
    assert not started.flags & TF.SEND_DF


# -- meta contexts -------------------------------------------------------------------------
@pytest.mark.parametrize("queries", [[], ["base:"], [BASE], ["qemu:", BASE]])
def test_list_meta_context_lists_base_allocation_with_id_zero(queries: list[str]) -> None:
    pair = ready()
    events = pair.option(opt_meta("disk", queries, set_=False))
    assert events == [MetaContext(0, BASE), OptionAck(Opt.LIST_META_CONTEXT)]


@pytest.mark.parametrize("queries", [["qemu:"], ["qemu:dirty-bitmap:x"], ["base:alloc"], ["base"]])
def test_list_meta_context_unknown_queries_list_nothing(queries: list[str]) -> None:
    pair = ready()
    assert pair.option(opt_meta("", queries, set_=False)) == [OptionAck(Opt.LIST_META_CONTEXT)]


def test_list_meta_context_selects_nothing() -> None:
    pair = ready()
    pair.option(OptionRequest(Opt.STRUCTURED_REPLY))
    pair.option(opt_meta("disk", [], set_=False))
    assert pair.option(opt_go("disk"))[-1].meta_contexts == {}
    assert pair.server_events[-1].meta_contexts == {}


@pytest.mark.parametrize("set_", [False, True])
def test_meta_context_unknown_export_is_err_unknown(set_: bool) -> None:
    pair = ready()
    pair.option(OptionRequest(Opt.STRUCTURED_REPLY))
    option = Opt.SET_META_CONTEXT if set_ else Opt.LIST_META_CONTEXT
    only_error(pair.option(opt_meta("nope", [BASE], set_=set_)), option, Rep.ERR_UNKNOWN)


@pytest.mark.parametrize(
    "data",
    [
        b"",
        b"\0\0\0\x04disk",  # no query count
        b"\0\0\0\x09disk",  # name length past the end
        b"\0\0\x10\x01" + b"a" * 4097 + b"\0\0\0\0",  # name over 4096 bytes
        b"\0\0\0\x04disk\0\0\0\x01",  # one query announced, none sent
        b"\0\0\0\0\0\0\0\x01\0\0\0\x09base:",  # query length past the end
        b"\0\0\0\0\0\0\0\x01\0\0\0\x02\xff\xfe",  # query not UTF-8
        b"\0\0\0\0\0\0\0\0!",  # a trailing byte
    ],
)
@pytest.mark.parametrize("option", [Opt.LIST_META_CONTEXT, Opt.SET_META_CONTEXT])
def test_meta_context_with_malformed_data_is_invalid(option: int, data: bytes) -> None:
    pair = ready()
    pair.option(OptionRequest(Opt.STRUCTURED_REPLY))
    only_error(pair.option(OptionRequest(option, data)), option, Rep.ERR_INVALID)
    assert_still_negotiating(pair)


def test_set_meta_context_needs_structured_replies() -> None:
    pair = ready()
    events = pair.option(opt_meta("disk", [BASE], set_=True))
    only_error(events, Opt.SET_META_CONTEXT, Rep.ERR_INVALID)
    assert_still_negotiating(pair)


def test_set_meta_context_returns_a_nonzero_id_used_in_transmission() -> None:
    pair = ready()
    pair.option(OptionRequest(Opt.STRUCTURED_REPLY))
    events = pair.option(opt_meta("disk", [BASE], set_=True))
    assert len(events) == 2 and events[1] == OptionAck(Opt.SET_META_CONTEXT)
    ctx = events[0]
    assert isinstance(ctx, MetaContext) and ctx.name == BASE and ctx.context_id != 0
    client = pair.option(opt_go("disk"))[-1]
    server = pair.server_events[-1]
    assert client.meta_contexts == server.meta_contexts == {ctx.context_id: BASE}


def test_set_meta_context_with_unknown_query_selects_nothing() -> None:
    pair = ready()
    pair.option(OptionRequest(Opt.STRUCTURED_REPLY))
    assert pair.option(opt_meta("disk", ["qemu:allocation-depth"], set_=True)) == [
        OptionAck(Opt.SET_META_CONTEXT)
    ]
    assert pair.option(opt_go("disk"))[-1].meta_contexts == {}


def test_set_meta_context_replaces_the_previous_selection() -> None:
    pair = ready()
    pair.option(OptionRequest(Opt.STRUCTURED_REPLY))
    pair.option(opt_meta("disk", [BASE], set_=True))
    pair.option(opt_meta("disk", [], set_=True))
    assert pair.option(opt_go("disk"))[-1].meta_contexts == {}
    assert pair.server_events[-1].meta_contexts == {}


def test_meta_contexts_are_dropped_when_go_names_another_export() -> None:
    pair = ready()
    pair.option(OptionRequest(Opt.STRUCTURED_REPLY))
    pair.option(opt_meta("ro", [BASE], set_=True))
    client = pair.option(opt_go("disk"))[-1]
    server = pair.server_events[-1]
    assert server.meta_contexts == {}
    assert client.meta_contexts == {}  # the client must not believe in them either


def test_meta_contexts_for_the_default_export_survive_go_by_its_empty_name() -> None:
    pair = ready()
    pair.option(OptionRequest(Opt.STRUCTURED_REPLY))
    pair.option(opt_meta("", [BASE], set_=True))
    client = pair.option(opt_go(""))[-1]
    assert client.meta_contexts == pair.server_events[-1].meta_contexts != {}


# -- options this server does not support ----------------------------------------------------
def test_starttls_is_unsupported() -> None:
    pair = ready()
    only_error(pair.option(OptionRequest(Opt.STARTTLS)), Opt.STARTTLS, Rep.ERR_UNSUP)
    assert_still_negotiating(pair)


@pytest.mark.parametrize(
    "option", [Opt.EXTENDED_HEADERS, Opt.PEEK_EXPORT, 0, 12, 4242, 0x7FFF_FFFF, 0xFFFF_FFFF]
)
@pytest.mark.parametrize("data", [b"", b"\x01\x02\x03", bytes(range(256)) * 16])
def test_unknown_options_are_unsupported_their_data_drained(option: int, data: bytes) -> None:
    pair = ready()
    only_error(pair.option(OptionRequest(option, data)), option, Rep.ERR_UNSUP)
    assert pair.server.buffered == 0
    assert_still_negotiating(pair)


@pytest.mark.parametrize(
    ("option", "rep"),
    [
        (99, Rep.ERR_UNSUP),
        (Opt.EXTENDED_HEADERS, Rep.ERR_UNSUP),
        (Opt.LIST, Rep.ERR_TOO_BIG),
        (Opt.GO, Rep.ERR_TOO_BIG),
        (Opt.SET_META_CONTEXT, Rep.ERR_TOO_BIG),
    ],
)
def test_overlong_option_data_is_drained_without_being_buffered(option: int, rep: Rep) -> None:
    pair = ready()
    piece = 4 * KiB
    data = pair.client.send(OptionRequest(option, bytes(4 * constants.MAX_OPTION_DATA + 5)))
    events = []
    for chunk in pieces(data, [piece]):
        pair.server.receive_data(chunk)
        assert pair.server.buffered <= piece + constants.OPTION_HEADER.size
        events += drain(pair.server)
    assert events == [OptionHandled(option, rep, events[0].detail)]
    only_error(pair.deliver(), option, rep)
    assert pair.server.buffered == 0
    assert_still_negotiating(pair)


def test_option_data_at_the_limit_is_still_parsed() -> None:
    pair = ready()
    data = bytes(constants.MAX_OPTION_DATA)
    only_error(pair.option(OptionRequest(Opt.LIST, data)), Opt.LIST, Rep.ERR_INVALID)


# -- shutting down -------------------------------------------------------------------------
@pytest.mark.parametrize(
    "option",
    [
        OptionRequest(Opt.LIST),
        OptionRequest(Opt.STRUCTURED_REPLY),
        opt_info("disk"),
        opt_go("disk"),
        opt_meta("disk", [], set_=False),
        OptionRequest(99, b"junk"),
    ],
    ids=lambda o: str(o.option),
)
def test_shutting_down_answers_options_with_err_shutdown(option: OptionRequest) -> None:
    pair = ready()
    pair.server.shutting_down = True
    only_error(pair.option(option), option.option, Rep.ERR_SHUTDOWN)
    assert pair.server.phase is Phase.OPTIONS


def test_shutting_down_still_acks_abort() -> None:
    # proto.md: "SHOULD error further options received (other than an NBD_OPT_ABORT)".
    pair = ready()
    pair.server.shutting_down = True
    assert pair.send(OptionRequest(Opt.ABORT)) == ([Aborted()], [OptionAck(Opt.ABORT)])


def test_shutting_down_closes_on_export_name() -> None:
    pair = ready()
    pair.server.shutting_down = True
    pair.server.receive_data(pair.client.send(opt_export_name("disk")))
    with pytest.raises(RemoteProtocolError):
        pair.server.next_event()
    assert pair.server.data_to_send() == b""


# -- transmission flags --------------------------------------------------------------------
@pytest.mark.parametrize("via", ["go", "export_name"])
def test_transmission_flags_always_include_has_flags(via: str) -> None:
    pair = ConnectionPair()
    client, server = handshake(pair, "bare", structured=False, via=via)
    assert client.flags == server.flags == TF.HAS_FLAGS
    pair = ready()
    assert pair.option(opt_info("bare"))[0] == InfoExport(64 * KiB, TF.HAS_FLAGS)


@pytest.mark.parametrize("via", ["go", "export_name"])
def test_send_df_is_advertised_only_after_structured_replies(via: str) -> None:
    pair = ready()
    assert not pair.option(opt_info("disk"))[0].flags & TF.SEND_DF
    pair.option(OptionRequest(Opt.STRUCTURED_REPLY))
    assert pair.option(opt_info("disk"))[0].flags & TF.SEND_DF
    opt = opt_go("disk") if via == "go" else opt_export_name("disk")
    server_events, client_events = pair.send(opt)
    assert server_events[-1].flags & TF.SEND_DF and client_events[-1].flags & TF.SEND_DF
    assert pair.server.flags & TF.SEND_DF
    _, server = handshake(ConnectionPair(), "disk", structured=False, via=via)
    assert not server.flags & TF.SEND_DF


# -- what real clients send (nbd.md §2) ------------------------------------------------------
def connected_pair(size: int = MiB, flags: int = CLIENT_FLAGS) -> ConnectionPair:
    pair = ConnectionPair(make_exports(size), executor=MemoryExecutor.of_size(size))
    hello(pair, flags)
    return pair


def test_nbdinfo_sequence_completes() -> None:
    pair = connected_pair()
    assert pair.option(OptionRequest(Opt.STRUCTURED_REPLY)) == [OptionAck(Opt.STRUCTURED_REPLY)]
    info = [Info.BLOCK_SIZE, Info.NAME, Info.DESCRIPTION]
    expected = [
        InfoExport(MiB, DISK_FLAGS | TF.SEND_DF),
        InfoName("disk"),
        InfoDescription("scratch disk"),
        DEFAULT_BLOCKS,
    ]
    assert pair.option(opt_info("", info)) == [*expected, OptionAck(Opt.INFO)]
    assert pair.option(opt_meta("", [], set_=False)) == [
        MetaContext(0, BASE),
        OptionAck(Opt.LIST_META_CONTEXT),
    ]
    go = pair.option(opt_go("", info))
    assert go[:-1] == expected and isinstance(go[-1], TransmissionStarted)
    assert pair.request(Request(1, Cmd.READ, 0, 8192)) == [Reply(1, Cmd.READ, data=bytes(8192))]
    assert pair.send(Request(2, Cmd.DISC))[0] == [Disconnect()]
    assert pair.server.phase is Phase.CLOSED


def test_nbdinfo_map_sequence_completes() -> None:
    pair = connected_pair()
    pair.option(OptionRequest(Opt.STRUCTURED_REPLY))
    (ctx, _) = pair.option(opt_meta("", [BASE], set_=True))
    pair.option(opt_go("", [Info.BLOCK_SIZE, Info.NAME, Info.DESCRIPTION]))
    (reply,) = pair.request(Request(1, Cmd.BLOCK_STATUS, 0, MiB))
    assert reply.error == 0
    assert reply.extents == {ctx.context_id: (Extent(MiB, StateFlags.HOLE | StateFlags.ZERO),)}


def test_nbdinfo_list_sequence_completes() -> None:
    pair = connected_pair()
    assert len(pair.option(OptionRequest(Opt.LIST))) == 4
    assert pair.option(opt_info("disk", [Info.NAME]))[-1] == OptionAck(Opt.INFO)
    assert pair.option(opt_meta("disk", [], set_=False))[-1] == OptionAck(Opt.LIST_META_CONTEXT)
    assert pair.send(OptionRequest(Opt.ABORT)) == ([Aborted()], [OptionAck(Opt.ABORT)])


def test_nbdcopy_sequence_completes_with_write_zeroes_over_32_mib() -> None:
    size = 40 * MiB
    pair = connected_pair(size)
    pair.option(OptionRequest(Opt.STRUCTURED_REPLY))
    pair.option(opt_meta("", [BASE], set_=True))
    assert isinstance(pair.option(opt_go("", [Info.BLOCK_SIZE]))[-1], TransmissionStarted)
    block = bytes(range(256)) * 1024  # 256 KiB
    assert pair.request(Request(1, Cmd.WRITE, 0, data=block)) == [Reply(1, Cmd.WRITE)]
    assert pair.request(Request(2, Cmd.READ, 0, len(block))) == [Reply(2, Cmd.READ, data=block)]
    zeroes = Request(3, Cmd.WRITE_ZEROES, 256 * KiB, 37_748_736)
    assert pair.request(zeroes) == [Reply(3, Cmd.WRITE_ZEROES)]


def test_qemu_img_sequence_completes() -> None:
    size = 36 * MiB
    pair = connected_pair(size)
    pair.option(OptionRequest(Opt.STRUCTURED_REPLY))
    pair.option(opt_meta("disk", [BASE], set_=True))
    pair.option(opt_go("disk", [Info.BLOCK_SIZE]))
    assert pair.request(Request(1, Cmd.READ, 0, 512)) == [Reply(1, Cmd.READ, data=bytes(512))]
    piece = b"\xa5" * (2 * MiB)
    writes = [Request(10 + i, Cmd.WRITE, i * 2 * MiB, data=piece) for i in range(2)]
    assert pair.send(*writes)[1] == [Reply(10, Cmd.WRITE), Reply(11, Cmd.WRITE)]
    zero = Request(20, Cmd.WRITE_ZEROES, 4 * MiB, 32 * MiB)
    assert pair.request(zero) == [Reply(20, Cmd.WRITE_ZEROES)]
    assert pair.request(Request(21, Cmd.FLUSH)) == [Reply(21, Cmd.FLUSH)]
    assert pair.send(Request(22, Cmd.DISC))[0] == [Disconnect()]
    assert pair.executor is not None and pair.executor.flushes == 1


def test_qemu_nbd_list_sequence_completes() -> None:
    pair = connected_pair()
    pair.option(OptionRequest(Opt.STRUCTURED_REPLY))
    assert pair.option(OptionRequest(Opt.LIST))[-1] == OptionAck(Opt.LIST)
    assert pair.option(opt_info("disk", [Info.BLOCK_SIZE]))[-1] == OptionAck(Opt.INFO)
    assert pair.option(opt_meta("disk", [], set_=False))[0] == MetaContext(0, BASE)
    assert pair.option(opt_meta("disk", ["qemu:"], set_=False)) == [
        OptionAck(Opt.LIST_META_CONTEXT)
    ]
    assert pair.send(OptionRequest(Opt.ABORT))[1] == [OptionAck(Opt.ABORT)]


def test_nbd_client_sequence_completes_with_go_and_no_info_requests() -> None:
    pair = connected_pair()
    started = pair.option(opt_go(""))[-1]
    assert isinstance(started, TransmissionStarted) and not started.structured_replies
    data = b"\x5a" * 4096
    fua = constants.CmdFlags.FUA
    assert pair.send(
        Request(1, Cmd.WRITE, 4096, flags=fua, data=data),
        Request(2, Cmd.READ, 4096, 4096),
        Request(3, Cmd.FLUSH),
        Request(4, Cmd.TRIM, 0, 8192),
        Request(5, Cmd.READ, 0, 8192),
    )[1] == [
        Reply(1, Cmd.WRITE),
        Reply(2, Cmd.READ, data=data),
        Reply(3, Cmd.FLUSH),
        Reply(4, Cmd.TRIM),
        Reply(5, Cmd.READ, data=bytes(8192)),
    ]
    assert pair.send(Request(6, Cmd.DISC))[0] == [Disconnect()]


# -- the state table -----------------------------------------------------------------------
def test_state_table_allows_eof_and_error_everywhere_but_after_the_end() -> None:
    for (_role, phase), moves in TABLE.items():
        if phase is Phase.ERROR:
            assert moves == {}
        else:
            assert moves[Trigger.EOF] is Phase.CLOSED
            if phase is not Phase.CLOSED:
                assert moves[Trigger.ERROR] is Phase.ERROR
    assert transition(Role.SERVER, Phase.OPTIONS, Trigger.REQUEST) is None
    assert transition(Role.CLIENT, Phase.OPTION_PENDING, Trigger.OPTION) is None


def test_client_request_before_handshake_is_a_local_error() -> None:
    pair = ready()
    with pytest.raises(LocalProtocolError):
        pair.client.send(Request(1, Cmd.READ, 0, 512))
    assert pair.client.phase is Phase.ERROR


def test_client_option_while_one_is_pending_is_a_local_error() -> None:
    pair = ready()
    pair.client.send(OptionRequest(Opt.LIST))
    with pytest.raises(LocalProtocolError):
        pair.client.send(OptionRequest(Opt.LIST))
    assert pair.client.phase is Phase.ERROR


@pytest.mark.parametrize(
    "event", [OptionRequest(Opt.LIST), Hello(CLIENT_FLAGS)], ids=["option", "hello"]
)
def test_client_sends_nothing_before_the_greeting(event: Hello | OptionRequest) -> None:
    client = ClientConnection()
    with pytest.raises(LocalProtocolError):
        client.send(event)
    assert client.phase is Phase.ERROR


def test_client_sends_its_flags_only_once() -> None:
    pair = ready()
    with pytest.raises(LocalProtocolError):
        pair.client.send(Hello(CLIENT_FLAGS))
    assert pair.client.phase is Phase.ERROR


def test_client_option_after_transmission_started_is_a_local_error() -> None:
    pair = ConnectionPair()
    handshake(pair)
    with pytest.raises(LocalProtocolError):
        pair.client.send(OptionRequest(Opt.LIST))
    assert pair.client.phase is Phase.ERROR


def test_server_reply_before_transmission_is_a_local_error() -> None:
    pair = ready()
    with pytest.raises(LocalProtocolError):
        pair.server.reply(Request(1, Cmd.FLUSH))
    assert pair.server.phase is Phase.ERROR


def test_server_greets_only_once() -> None:
    server = ServerConnection(make_exports())
    server.initiate()
    with pytest.raises(LocalProtocolError):
        server.initiate()


def broken_server() -> ConnectionPair:
    pair = ready()
    pair.server.receive_data(raw_option(Opt.LIST, magic=0))
    with pytest.raises(RemoteProtocolError):
        pair.server.next_event()
    return pair


def broken_client() -> ConnectionPair:
    pair = ready()
    pair.client.send(OptionRequest(Opt.LIST))
    pair.client.receive_data(bytes(constants.OPTION_REPLY_HEADER.size))
    with pytest.raises(RemoteProtocolError):
        pair.client.next_event()
    return pair


@pytest.mark.parametrize("broken", [broken_server, broken_client])
def test_after_a_protocol_error_the_machine_is_in_error_and_refuses_everything(broken) -> None:  # type: ignore[no-untyped-def]
    pair = broken()
    machine = pair.server if broken is broken_server else pair.client
    assert machine.phase is Phase.ERROR
    machine.receive_data(raw_option(Opt.LIST))
    with pytest.raises(LocalProtocolError):
        machine.next_event()
    with pytest.raises(ProtocolError):
        if machine is pair.server:
            pair.server.reply(Request(1, Cmd.FLUSH))
        else:
            pair.client.send(OptionRequest(Opt.LIST))
    assert machine.phase is Phase.ERROR


def test_client_eof_while_an_option_is_pending_is_connection_closed() -> None:
    pair = ready()
    pair.client.send(OptionRequest(Opt.LIST))
    pair.client.receive_data(b"\0\x03")
    pair.client.receive_data(b"")
    assert pair.client.next_event() == ConnectionClosed()
    assert pair.client.phase is Phase.CLOSED
