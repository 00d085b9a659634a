"""The association PDUs (A-ASSOCIATE-RQ, -AC and -RJ, PS3.8 section 9.3), encoded and decoded.

Written from the standard's layout so that `pacs store` and `pacs serve` negotiate without
loading pynetdicom (and pydicom under it): the rest of our upper layer (P-DATA, release,
abort, DIMSE command sets) is hand-written already. The functions here work on PDU bodies,
the bytes after the 6-byte PDU header, as `Association.recv_pdu` and `send_pdu` frame them.

An A-ASSOCIATE-RQ or -AC body: protocol version (2 bytes), 2 reserved, called and calling AE
titles (16 bytes each, space padded), 32 reserved, then items of type (1), reserved (1),
length (2, big endian) and value: the application context (0x10), presentation contexts
(0x20 proposed, 0x21 answered) and user information (0x50), whose sub-items share that
layout. Items and user sub-items this module does not use (user identity, extended
negotiation...) are skipped; anything that does not add up raises PduError.
"""

from __future__ import annotations

import struct
from collections.abc import Iterator
from dataclasses import dataclass, field

APPLICATION_CONTEXT = "1.2.840.10008.3.1.1.1"  # the DICOM application context name (PS3.7 A.2.1)

# Presentation context results in an A-ASSOCIATE-AC (PS3.8 table 9-18)
ACCEPTANCE, USER_REJECTION, NO_REASON = 0, 1, 2
ABSTRACT_SYNTAX_NOT_SUPPORTED, TRANSFER_SYNTAXES_NOT_SUPPORTED = 3, 4

_APPLICATION_CONTEXT_ITEM = 0x10
_RQ_CONTEXT_ITEM, _AC_CONTEXT_ITEM = 0x20, 0x21
_ABSTRACT_SYNTAX, _TRANSFER_SYNTAX = 0x30, 0x40
_USER_INFORMATION = 0x50
_MAX_LENGTH, _IMPLEMENTATION_CLASS_UID, _ASYNC_WINDOW, _ROLE_SELECTION, _IMPLEMENTATION_VERSION = (
    0x51, 0x52, 0x53, 0x54, 0x55)
_EXTENDED_NEGOTIATION = 0x56  # SOP Class Extended Negotiation (PS3.7 D.3.3.5)

_FIXED = struct.Struct(">HH16s16s32s")  # protocol version, reserved, called, calling, reserved
_ITEM = struct.Struct(">BBH")  # item type, reserved, item length


class PduError(ValueError):
    """An association PDU that cannot be decoded (or a value that cannot be encoded)."""


@dataclass
class PresentationContext:
    """A presentation context: as proposed in an A-ASSOCIATE-RQ (abstract syntax and the
    transfer syntaxes offered), or as answered in an A-ASSOCIATE-AC (result and the one
    transfer syntax chosen; the AC does not repeat the abstract syntax)."""

    context_id: int = 0  # odd, 1-255; a requestor assigns it when it sends the request
    abstract_syntax: str = ""
    transfer_syntax: list[str] = field(default_factory=list)
    result: int | None = None  # None in a request; ACCEPTANCE... in an answer


@dataclass
class Associate:
    """What an A-ASSOCIATE-RQ or -AC carries.

    In an AC the AE titles are those of the request, sent back (PS3.8 says they are not
    tested), and `contexts` are the answers. SCP/SCU roles are negotiated per SOP class in
    the user information, not per context, hence `roles`.
    """

    called_ae_title: str
    calling_ae_title: str
    contexts: list[PresentationContext] = field(default_factory=list)
    max_pdu: int | None = None  # the Maximum Length sub-item: None when absent, 0 = no limit
    implementation_class_uid: str = ""
    implementation_version_name: str = ""
    async_ops_window: tuple[int, int] | None = None  # (invoked, performed)
    roles: dict[str, tuple[bool, bool]] = field(default_factory=dict)  # SOP class -> (SCU, SCP)
    # SOP class -> its service class application information (for C-FIND: relational
    # queries, combined date-time matching, fuzzy person name matching... one byte each)
    extended: dict[str, bytes] = field(default_factory=dict)
    application_context: str = APPLICATION_CONTEXT
    protocol_version: int = 1


# A-ASSOCIATE-RJ fields in words (PS3.8 table 9-21), lower case for a sentence.
_RESULTS = {1: "rejected permanent", 2: "rejected transient"}
_SOURCES = {1: "service user", 2: "service provider (ACSE)", 3: "service provider (presentation)"}
_REASONS = {
    (1, 1): "no reason given",
    (1, 2): "application context name not supported",
    (1, 3): "calling AE title not recognised",
    (1, 7): "called AE title not recognised",
    (2, 1): "no reason given",
    (2, 2): "protocol version not supported",
    (3, 1): "temporary congestion",
    (3, 2): "local limit exceeded",
}


@dataclass(frozen=True)
class Rejection:
    """An A-ASSOCIATE-RJ: result (1 permanent, 2 transient), source (1 service user, 2 the
    provider's ACSE, 3 its presentation layer) and reason (the diagnostic)."""

    result: int
    source: int
    reason: int

    @property
    def result_text(self) -> str:
        """'rejected permanent' or 'rejected transient'."""
        return _RESULTS.get(self.result, f"result {self.result} (not defined)")

    @property
    def source_text(self) -> str:
        """'service user', 'service provider (ACSE)'..."""
        return _SOURCES.get(self.source, f"source {self.source} (not defined)")

    @property
    def reason_text(self) -> str:
        """'called AE title not recognised', 'local limit exceeded'..."""
        return _REASONS.get((self.source, self.reason), f"reason {self.reason} (reserved)")


# -- encoding ------------------------------------------------------------------------------

def encode_rq(request: Associate) -> bytes:
    """The body of an A-ASSOCIATE-RQ PDU. Raises PduError for a value that does not fit
    (an AE title over 16 characters, a context ID that is not odd in 1-255...)."""
    items = []
    for context in request.contexts:
        if not 1 <= context.context_id <= 255 or context.context_id % 2 == 0:
            raise PduError(f"presentation context ID {context.context_id} is not odd in 1-255")
        if not context.transfer_syntax:
            raise PduError(f"presentation context {context.context_id} offers no transfer syntax")
        sub_items = _item(_ABSTRACT_SYNTAX, _ascii(context.abstract_syntax, "abstract syntax")) + b"".join(
            _item(_TRANSFER_SYNTAX, _ascii(ts, "transfer syntax")) for ts in context.transfer_syntax)
        items.append(_item(_RQ_CONTEXT_ITEM, bytes([context.context_id, 0, 0, 0]) + sub_items))
    return _encode_associate(request, items)


def encode_ac(accept: Associate) -> bytes:
    """The body of an A-ASSOCIATE-AC PDU: each context's result and chosen transfer syntax
    (for a context not accepted, the syntax is sent but not tested by the requestor)."""
    items = []
    for context in accept.contexts:
        if not 0 <= context.context_id <= 255:
            raise PduError(f"presentation context ID {context.context_id} is not in 0-255")
        syntax = context.transfer_syntax[0] if context.transfer_syntax else ""
        result = ACCEPTANCE if context.result is None else context.result
        items.append(_item(_AC_CONTEXT_ITEM, bytes([context.context_id, 0, result, 0])
                           + _item(_TRANSFER_SYNTAX, _ascii(syntax, "transfer syntax"))))
    return _encode_associate(accept, items)


def encode_rj(rejection: Rejection) -> bytes:
    """The body of an A-ASSOCIATE-RJ PDU."""
    return bytes([0, rejection.result, rejection.source, rejection.reason])


def _encode_associate(message: Associate, context_items: list[bytes]) -> bytes:
    fixed = _FIXED.pack(message.protocol_version, 0, _ae_title(message.called_ae_title),
                        _ae_title(message.calling_ae_title), bytes(32))
    application = _item(_APPLICATION_CONTEXT_ITEM, _ascii(message.application_context, "application context"))
    user_information = _item(_USER_INFORMATION, _user_information(message))
    return fixed + application + b"".join(context_items) + user_information


def _user_information(message: Associate) -> bytes:
    """The user information sub-items, in the order of their types (PS3.7 D.3.3)."""
    sub_items = []
    if message.max_pdu is not None:
        sub_items.append(_item(_MAX_LENGTH, struct.pack(">I", message.max_pdu)))
    if message.implementation_class_uid:
        sub_items.append(_item(_IMPLEMENTATION_CLASS_UID,
                               _ascii(message.implementation_class_uid, "implementation class UID")))
    if message.async_ops_window is not None:
        sub_items.append(_item(_ASYNC_WINDOW, struct.pack(">HH", *message.async_ops_window)))
    for sop_class, (scu, scp) in message.roles.items():
        uid = _ascii(sop_class, "role selection SOP class")
        sub_items.append(_item(_ROLE_SELECTION, struct.pack(">H", len(uid)) + uid + bytes([scu, scp])))
    if message.implementation_version_name:
        sub_items.append(_item(_IMPLEMENTATION_VERSION,
                               _ascii(message.implementation_version_name, "implementation version name")))
    for sop_class, info in message.extended.items():
        uid = _ascii(sop_class, "extended negotiation SOP class")
        sub_items.append(_item(_EXTENDED_NEGOTIATION, struct.pack(">H", len(uid)) + uid + info))
    return b"".join(sub_items)


def _item(item_type: int, value: bytes) -> bytes:
    if len(value) > 0xFFFF:
        raise PduError(f"item 0x{item_type:02X} of {len(value)} bytes exceeds 65535")
    return _ITEM.pack(item_type, 0, len(value)) + value


def _ascii(text: str, what: str) -> bytes:
    try:
        return text.encode("ascii")
    except UnicodeEncodeError:
        raise PduError(f"{what} {text!r} is not ASCII") from None


def _ae_title(title: str) -> bytes:
    raw = _ascii(title, "AE title")
    if len(raw) > 16:
        raise PduError(f"AE title {title!r} is longer than 16 characters")
    return raw.ljust(16, b" ")


# -- decoding ------------------------------------------------------------------------------

def decode_rq(body: bytes | bytearray | memoryview) -> Associate:
    """Decode the body of an A-ASSOCIATE-RQ PDU; raises PduError when it is malformed.

    Every proposed context has its abstract syntax and at least one transfer syntax. A
    missing application context item leaves `application_context` empty (for the acceptor
    to reject).
    """
    return _decode_associate(bytes(body), "A-ASSOCIATE-RQ", _RQ_CONTEXT_ITEM)


def decode_ac(body: bytes | bytearray | memoryview) -> Associate:
    """Decode the body of an A-ASSOCIATE-AC PDU; raises PduError when it is malformed."""
    return _decode_associate(bytes(body), "A-ASSOCIATE-AC", _AC_CONTEXT_ITEM)


def decode_rj(body: bytes | bytearray | memoryview) -> Rejection:
    """Decode the body of an A-ASSOCIATE-RJ PDU; raises PduError when it is too short."""
    if len(body) < 4:
        raise PduError(f"A-ASSOCIATE-RJ of {len(body)} bytes is shorter than its 4")
    return Rejection(body[1], body[2], body[3])


def _decode_associate(data: bytes, name: str, context_item: int) -> Associate:
    if len(data) < _FIXED.size:
        raise PduError(f"{name} of {len(data)} bytes is shorter than its {_FIXED.size} fixed bytes")
    version, _, called, calling, _ = _FIXED.unpack_from(data)
    message = Associate(_title(called, "called AE title"), _title(calling, "calling AE title"),
                        application_context="", protocol_version=version)
    for item_type, value in _items(data, _FIXED.size, name):
        if item_type == _APPLICATION_CONTEXT_ITEM:
            message.application_context = _text(value, "application context name")
        elif item_type == context_item:
            message.contexts.append(_decode_context(value, item_type))
        elif item_type == _USER_INFORMATION:
            _decode_user_information(value, message)
        # any other item type has no place in this PDU: skipped
    return message


def _decode_context(value: bytes, item_type: int) -> PresentationContext:
    if len(value) < 4:
        raise PduError(f"presentation context item of {len(value)} bytes is shorter than its 4 fixed bytes")
    context = PresentationContext(context_id=value[0])
    if item_type == _AC_CONTEXT_ITEM:
        context.result = value[2]
    abstract: list[str] = []
    for sub_type, sub_value in _items(value, 4, f"presentation context {context.context_id}"):
        if sub_type == _ABSTRACT_SYNTAX:
            abstract.append(_text(sub_value, "abstract syntax"))
        elif sub_type == _TRANSFER_SYNTAX:
            context.transfer_syntax.append(_text(sub_value, "transfer syntax"))
    if item_type == _RQ_CONTEXT_ITEM:
        if len(abstract) != 1:
            raise PduError(f"presentation context {context.context_id} has {len(abstract)} abstract "
                           "syntaxes, not one")
        if not context.transfer_syntax:
            raise PduError(f"presentation context {context.context_id} offers no transfer syntax")
        context.abstract_syntax = abstract[0]
    return context


def _decode_user_information(value: bytes, message: Associate) -> None:
    for sub_type, sub_value in _items(value, 0, "user information"):
        if sub_type == _MAX_LENGTH:
            message.max_pdu = _unpack(">I", sub_value, "maximum length")[0]
        elif sub_type == _IMPLEMENTATION_CLASS_UID:
            message.implementation_class_uid = _text(sub_value, "implementation class UID")
        elif sub_type == _ASYNC_WINDOW:
            invoked, performed = _unpack(">HH", sub_value, "asynchronous operations window")
            message.async_ops_window = (invoked, performed)
        elif sub_type == _ROLE_SELECTION:
            uid_length = _unpack(">H", sub_value[:2], "role selection")[0]
            if len(sub_value) != 2 + uid_length + 2:
                raise PduError(f"role selection of {len(sub_value)} bytes holds no {uid_length}-byte UID "
                               "and two roles")
            uid = _text(sub_value[2:2 + uid_length], "role selection SOP class")
            message.roles[uid] = (bool(sub_value[-2]), bool(sub_value[-1]))
        elif sub_type == _IMPLEMENTATION_VERSION:
            message.implementation_version_name = _text(sub_value, "implementation version name")
        elif sub_type == _EXTENDED_NEGOTIATION:
            uid_length = _unpack(">H", sub_value[:2], "extended negotiation")[0]
            if len(sub_value) < 2 + uid_length:
                raise PduError(f"extended negotiation of {len(sub_value)} bytes holds no "
                               f"{uid_length}-byte UID")
            uid = _text(sub_value[2:2 + uid_length], "extended negotiation SOP class")
            message.extended[uid] = bytes(sub_value[2 + uid_length:])
        # user identity and the like: not used here, skipped


def _items(data: bytes, start: int, where: str) -> Iterator[tuple[int, bytes]]:
    """The (type, value) items (or sub-items) of data[start:]."""
    position, end = start, len(data)
    while position < end:
        if end - position < _ITEM.size:
            raise PduError(f"{where}: {end - position} stray bytes where an item header should be")
        item_type, _, length = _ITEM.unpack_from(data, position)
        position += _ITEM.size
        if position + length > end:
            raise PduError(f"{where}: item 0x{item_type:02X} of {length} bytes runs past the end "
                           f"({end - position} left)")
        yield item_type, data[position:position + length]
        position += length


def _unpack(layout: str, value: bytes, what: str) -> tuple[int, ...]:
    if len(value) != struct.calcsize(layout):
        raise PduError(f"{what} sub-item of {len(value)} bytes, not {struct.calcsize(layout)}")
    return struct.unpack(layout, value)


def _text(value: bytes, what: str) -> str:
    """A UID or name: ASCII, without the trailing NUL or space padding some peers add."""
    try:
        return value.decode("ascii").rstrip("\x00 ")
    except UnicodeDecodeError:
        raise PduError(f"{what} {value!r} is not ASCII") from None


def _title(value: bytes, what: str) -> str:
    """An AE title: leading and trailing spaces are not significant (PS3.5 6.2)."""
    return _text(value, what).strip(" \x00")
