"""The association PDUs of pacscli.net.pdu: round trips, agreement with pynetdicom's encoder and
decoder both ways, malformed input, and both ends of our upper layer meeting bad peers."""

from __future__ import annotations

import contextlib
import random
import re
import socket
import struct
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from pynetdicom.pdu import A_ASSOCIATE_AC, A_ASSOCIATE_RJ, A_ASSOCIATE_RQ
from pynetdicom.pdu_primitives import (
    A_ASSOCIATE,
    AsynchronousOperationsWindowNegotiation,
    ImplementationClassUIDNotification,
    ImplementationVersionNameNotification,
    MaximumLengthNotification,
    SCP_SCU_RoleSelectionNegotiation,
    SOPClassCommonExtendedNegotiation,
    SOPClassExtendedNegotiation,
    UserIdentityNegotiation,
)
from pynetdicom.presentation import PresentationContext as PynetdicomContext

from pacscli.config import Settings, parse_remote
from pacscli.errors import NetworkError
from pacscli.net.client import request_association
from pacscli.net.pdu import (
    ACCEPTANCE,
    APPLICATION_CONTEXT,
    TRANSFER_SYNTAXES_NOT_SUPPORTED,
    Associate,
    PduError,
    PresentationContext,
    Rejection,
    decode_ac,
    decode_rj,
    decode_rq,
    encode_ac,
    encode_rj,
    encode_rq,
)
from tests.conftest import Server
from tests.net.test_server import read_pdu

CT = "1.2.840.10008.5.1.4.1.1.2"
MR = "1.2.840.10008.5.1.4.1.1.4"
EXPLICIT, IMPLICIT, JPEG = "1.2.840.10008.1.2.1", "1.2.840.10008.1.2", "1.2.840.10008.1.2.4.50"


def sample_request() -> Associate:
    return Associate(
        called_ae_title="STORESCP", calling_ae_title="PACSCLI",
        contexts=[PresentationContext(1, CT, [EXPLICIT, IMPLICIT]), PresentationContext(3, MR, [JPEG]),
                  PresentationContext(255, "1.2.840.10008.1.1", [IMPLICIT])],
        max_pdu=65536, implementation_class_uid="1.2.826.0.1.3680043.9.1",
        implementation_version_name="TEST_1",
        async_ops_window=(4, 2), roles={CT: (False, True), MR: (True, True)})


def sample_accept() -> Associate:
    return Associate(
        called_ae_title="STORESCP", calling_ae_title="PACSCLI",
        contexts=[PresentationContext(1, transfer_syntax=[EXPLICIT], result=ACCEPTANCE),
                  PresentationContext(3, transfer_syntax=[JPEG], result=TRANSFER_SYNTAXES_NOT_SUPPORTED)],
        max_pdu=16384, implementation_class_uid="1.2.276.0.7230010.3.0.3.6.7",
        implementation_version_name="OFFIS_DCMTK_367", roles={CT: (False, True)})


def pdu(pdu_type: int, body: bytes) -> bytes:
    """A whole PDU (header and body), as pynetdicom reads and writes them."""
    return struct.pack(">BBI", pdu_type, 0, len(body)) + body


# --- round trips ----------------------------------------------------------------------------

def test_request_round_trip() -> None:
    request = sample_request()
    assert decode_rq(encode_rq(request)) == request


def test_accept_round_trip() -> None:
    accept = sample_accept()
    assert decode_ac(encode_ac(accept)) == accept


def test_rejection_round_trip_and_words() -> None:
    for rejection in (Rejection(1, 1, 7), Rejection(2, 3, 2), Rejection(1, 2, 2)):
        assert decode_rj(encode_rj(rejection)) == rejection
    assert Rejection(1, 1, 3).result_text == "rejected permanent"
    assert Rejection(1, 1, 3).source_text == "service user"
    assert Rejection(1, 1, 3).reason_text == "calling AE title not recognised"
    assert Rejection(2, 3, 2).reason_text == "local limit exceeded"
    assert "reserved" in Rejection(1, 1, 5).reason_text  # defined range, no meaning: named, no crash


def test_the_fixed_fields_are_where_the_standard_puts_them() -> None:
    body = encode_rq(sample_request())
    assert body[:4] == b"\x00\x01\x00\x00"  # protocol version 1, reserved
    assert body[4:20] == b"STORESCP        " and body[20:36] == b"PACSCLI         "
    assert body[36:68] == bytes(32)
    assert body[68:72] == b"\x10\x00\x00\x15" and body[72:93] == APPLICATION_CONTEXT.encode()
    assert encode_rj(Rejection(1, 2, 2)) == b"\x00\x01\x02\x02"


# --- agreement with pynetdicom ---------------------------------------------------------------

def pynetdicom_user_information(message: Associate) -> list[Any]:
    items: list[Any] = []
    max_length = MaximumLengthNotification()
    max_length.maximum_length_received = message.max_pdu
    class_uid = ImplementationClassUIDNotification()
    class_uid.implementation_class_uid = message.implementation_class_uid
    version = ImplementationVersionNameNotification()
    version.implementation_version_name = message.implementation_version_name
    items += [max_length, class_uid, version]
    if message.async_ops_window is not None:
        window = AsynchronousOperationsWindowNegotiation()
        window.maximum_number_operations_invoked, window.maximum_number_operations_performed = (
            message.async_ops_window)
        items.append(window)
    for sop_class, (scu, scp) in message.roles.items():
        role = SCP_SCU_RoleSelectionNegotiation()
        role.sop_class_uid, role.scu_role, role.scp_role = sop_class, scu, scp
        items.append(role)
    return items


def pynetdicom_encode_rq(request: Associate, extra_user_items: list[Any] | None = None) -> bytes:
    primitive = A_ASSOCIATE()
    primitive.application_context_name = request.application_context
    primitive.called_ae_title = request.called_ae_title
    primitive.calling_ae_title = request.calling_ae_title
    contexts = []
    for ours in request.contexts:
        context = PynetdicomContext()
        context.context_id = ours.context_id
        context.abstract_syntax = ours.abstract_syntax
        context.transfer_syntax = list(ours.transfer_syntax)
        contexts.append(context)
    primitive.presentation_context_definition_list = contexts
    primitive.user_information = pynetdicom_user_information(request) + (extra_user_items or [])
    encoded = A_ASSOCIATE_RQ()
    encoded.from_primitive(primitive)
    data: bytes = encoded.encode()
    return data


def pynetdicom_encode_ac(accept: Associate) -> bytes:
    primitive = A_ASSOCIATE()
    primitive.application_context_name = accept.application_context
    primitive.called_ae_title = accept.called_ae_title
    primitive.calling_ae_title = accept.calling_ae_title
    primitive.result = 0
    results = []
    for ours in accept.contexts:
        context = PynetdicomContext()
        context.context_id = ours.context_id
        context.transfer_syntax = list(ours.transfer_syntax)
        context.result = ours.result
        results.append(context)
    primitive.presentation_context_definition_results_list = results
    primitive.user_information = pynetdicom_user_information(accept)
    encoded = A_ASSOCIATE_AC()
    encoded.from_primitive(primitive)
    data: bytes = encoded.encode()
    return data


def pynetdicom_view(primitive: Any, results: bool) -> dict[str, Any]:
    """What pynetdicom decoded, in the shape of our Associate."""
    user = {type(item).__name__: item for item in primitive.user_information}
    window = user.get("AsynchronousOperationsWindowNegotiation")
    contexts = (primitive.presentation_context_definition_results_list if results
                else primitive.presentation_context_definition_list)
    return {
        "called": str(primitive.called_ae_title).strip(), "calling": str(primitive.calling_ae_title).strip(),
        "application_context": str(primitive.application_context_name),
        "contexts": [(c.context_id, "" if results else str(c.abstract_syntax),
                      [str(ts) for ts in c.transfer_syntax], c.result if results else None)
                     for c in contexts],
        "max_pdu": user["MaximumLengthNotification"].maximum_length_received,
        "class_uid": str(user["ImplementationClassUIDNotification"].implementation_class_uid),
        "version": str(user["ImplementationVersionNameNotification"].implementation_version_name),
        "window": None if window is None else (window.maximum_number_operations_invoked,
                                               window.maximum_number_operations_performed),
        "roles": {str(item.sop_class_uid): (bool(item.scu_role), bool(item.scp_role))
                  for item in primitive.user_information
                  if isinstance(item, SCP_SCU_RoleSelectionNegotiation)},
    }


def our_view(message: Associate) -> dict[str, Any]:
    return {
        "called": message.called_ae_title, "calling": message.calling_ae_title,
        "application_context": message.application_context,
        "contexts": [(c.context_id, c.abstract_syntax, c.transfer_syntax, c.result)
                     for c in message.contexts],
        "max_pdu": message.max_pdu, "class_uid": message.implementation_class_uid,
        "version": message.implementation_version_name, "window": message.async_ops_window,
        "roles": message.roles,
    }


def test_we_read_pynetdicom_requests() -> None:
    request = sample_request()
    data = pynetdicom_encode_rq(request)
    assert data[0] == 0x01
    assert decode_rq(data[6:]) == request


def test_pynetdicom_reads_our_requests() -> None:
    request = sample_request()
    decoded = A_ASSOCIATE_RQ()
    decoded.decode(pdu(0x01, encode_rq(request)))
    assert pynetdicom_view(decoded.to_primitive(), results=False) == our_view(request)


def test_we_read_pynetdicom_accepts() -> None:
    accept = sample_accept()
    data = pynetdicom_encode_ac(accept)
    assert data[0] == 0x02
    assert decode_ac(data[6:]) == accept


def test_pynetdicom_reads_our_accepts() -> None:
    accept = sample_accept()
    decoded = A_ASSOCIATE_AC()
    decoded.decode(pdu(0x02, encode_ac(accept)))
    assert pynetdicom_view(decoded.to_primitive(), results=True) == our_view(accept)


def test_rejections_both_ways() -> None:
    primitive = A_ASSOCIATE()
    primitive.result, primitive.result_source, primitive.diagnostic = 2, 3, 2
    theirs = A_ASSOCIATE_RJ()
    theirs.from_primitive(primitive)
    assert decode_rj(theirs.encode()[6:]) == Rejection(2, 3, 2)
    decoded = A_ASSOCIATE_RJ()
    decoded.decode(pdu(0x03, encode_rj(Rejection(1, 1, 7))))
    back = decoded.to_primitive()
    assert (back.result, back.result_source, back.diagnostic) == (1, 1, 7)
    assert back.reason_str.lower() == Rejection(1, 1, 7).reason_text.lower()


def test_other_user_information_sub_items_are_skipped() -> None:
    """Common extended negotiation (0x57) and user identity (0x58) are not ours to answer:
    the request still decodes, every known field intact, SOP class extended negotiation
    (0x56) too."""
    extended = SOPClassExtendedNegotiation()
    extended.sop_class_uid = "1.2.840.10008.5.1.4.1.2.2.1"
    extended.service_class_application_information = b"\x01\x01\x00"
    common = SOPClassCommonExtendedNegotiation()
    common.sop_class_uid = CT
    common.service_class_uid = "1.2.840.10008.4.2"
    identity = UserIdentityNegotiation()
    identity.user_identity_type = 2
    identity.primary_field = b"user"
    identity.secondary_field = b"secret"
    identity.positive_response_requested = True
    request = sample_request()
    data = pynetdicom_encode_rq(request, [extended, common, identity])
    assert all(bytes([t, 0]) in data for t in (0x56, 0x57, 0x58))
    request.extended = {"1.2.840.10008.5.1.4.1.2.2.1": b"\x01\x01\x00"}
    assert decode_rq(data[6:]) == request


def test_extended_negotiation_both_ways() -> None:
    """The SOP class extended negotiation of a C-FIND: pynetdicom's request read by us, our
    answer read by pynetdicom."""
    find = "1.2.840.10008.5.1.4.1.2.2.1"
    asked = SOPClassExtendedNegotiation()
    asked.sop_class_uid = find
    asked.service_class_application_information = b"\x01\x00\x01"
    request = decode_rq(pynetdicom_encode_rq(sample_request(), [asked])[6:])
    assert request.extended == {find: b"\x01\x00\x01"}
    accept = sample_accept()
    accept.extended = {find: b"\x01\x00\x00"}
    assert decode_ac(encode_ac(accept)) == accept
    theirs = A_ASSOCIATE_AC()
    theirs.decode(pdu(0x02, encode_ac(accept)))
    [item] = [i for i in theirs.to_primitive().user_information
              if isinstance(i, SOPClassExtendedNegotiation)]
    assert (item.sop_class_uid, item.service_class_application_information) == (
        find, b"\x01\x00\x00")


def test_unknown_items_are_skipped() -> None:
    """A made-up user sub-item and a made-up item after the user information."""
    body = bytearray(encode_rq(sample_request()))
    position = 68
    while body[position] != 0x50:  # walk the items to the user information, the last one
        position += 4 + struct.unpack_from(">H", body, position + 2)[0]
    length = struct.unpack_from(">H", body, position + 2)[0]
    assert position + 4 + length == len(body)
    struct.pack_into(">H", body, position + 2, length + 7)
    body += sub_item(0x5A, b"abc") + sub_item(0x7F, b"xy")
    assert decode_rq(bytes(body)) == sample_request()


def test_padding_is_not_significant() -> None:
    """UIDs padded with a NUL, AE titles padded with NULs or led by spaces."""
    padded = sample_request()
    padded.called_ae_title = "  STORESCP"
    padded.contexts[0].abstract_syntax += "\x00"
    padded.implementation_class_uid += "\x00"
    body = bytearray(encode_rq(padded))
    body[20:36] = b"PACSCLI".ljust(16, b"\x00")
    assert decode_rq(bytes(body)) == sample_request()


# --- malformed PDUs ------------------------------------------------------------------------

def context_item(body: bytes) -> bytes:
    return struct.pack(">BBH", 0x20, 0, len(body)) + body


def sub_item(item_type: int, value: bytes) -> bytes:
    return struct.pack(">BBH", item_type, 0, len(value)) + value


FIXED = struct.pack(">HH16s16s32s", 1, 0, b"CALLED".ljust(16), b"CALLING".ljust(16), bytes(32))
APPLICATION = sub_item(0x10, APPLICATION_CONTEXT.encode())


@pytest.mark.parametrize(("body", "message"), [
    (FIXED[:40], "shorter than its 68 fixed bytes"),
    (FIXED + APPLICATION + b"\x20\x00", "stray bytes"),
    (FIXED + APPLICATION + b"\x20\x00\x00\x30" + bytes(10), "runs past the end"),
    (FIXED + APPLICATION + context_item(b"\x01\x00\x00\x00" + sub_item(0x40, EXPLICIT.encode())),
     "0 abstract syntaxes"),
    (FIXED + APPLICATION + context_item(b"\x01\x00\x00\x00" + sub_item(0x30, CT.encode())),
     "no transfer syntax"),
    (FIXED + APPLICATION + context_item(b"\x01\x00"), "shorter than its 4 fixed bytes"),
    (FIXED + APPLICATION + context_item(b"\x01\x00\x00\x00" + sub_item(0x30, CT.encode())
                                        + sub_item(0x40, EXPLICIT.encode())[:-3]), "runs past the end"),
    (FIXED + APPLICATION + sub_item(0x50, sub_item(0x51, b"\x00\x01")), "maximum length sub-item of 2 bytes"),
    (FIXED + APPLICATION + sub_item(0x50, sub_item(0x53, b"\x00")), "asynchronous operations window"),
    (FIXED + APPLICATION + sub_item(0x50, sub_item(0x54, b"\x00\x09" + CT.encode() + b"\x01\x01")),
     "role selection"),
    (FIXED + APPLICATION + sub_item(0x50, sub_item(0x54, b"\x00")), "role selection"),
    (FIXED + APPLICATION + sub_item(0x50, sub_item(0x52, "1.2.\u00e9".encode("latin-1"))), "not ASCII"),
    (FIXED[:4] + "CALLÉ".encode("latin-1").ljust(16) + FIXED[20:], "not ASCII"),
])
def test_malformed_requests_raise_a_clear_error(body: bytes, message: str) -> None:
    with pytest.raises(PduError, match=message):
        decode_rq(body)


def test_malformed_accepts_and_rejections_raise_a_clear_error() -> None:
    with pytest.raises(PduError, match="A-ASSOCIATE-AC of 12 bytes"):
        decode_ac(bytes(12))
    with pytest.raises(PduError, match="runs past the end"):
        decode_ac(encode_ac(sample_accept())[:-5])
    with pytest.raises(PduError, match="A-ASSOCIATE-RJ of 3 bytes"):
        decode_rj(b"\x00\x01\x01")


def test_truncated_and_damaged_pdus_raise_nothing_but_pdu_error() -> None:
    """Every prefix, and random damage: the decoders either read it or raise PduError (a
    cut at an item boundary is a shorter, valid PDU)."""
    rng = random.Random(20240611)
    for encode, decode in ((encode_rq, decode_rq), (encode_ac, decode_ac)):
        full = encode(sample_request() if encode is encode_rq else sample_accept())
        damaged = [full[:n] for n in range(len(full))]
        for _ in range(2000):
            changed = bytearray(full)
            for _ in range(rng.randint(1, 4)):
                changed[rng.randrange(len(changed))] = rng.randrange(256)
            damaged.append(bytes(changed))
        for data in damaged:
            with contextlib.suppress(PduError):
                decode(data)
        with pytest.raises(PduError):
            decode(full[:67])


@pytest.mark.parametrize(("change", "message"), [
    ({"calling_ae_title": "A" * 17}, "longer than 16"),
    ({"called_ae_title": "PACSÉ"}, "not ASCII"),
    ({"contexts": [PresentationContext(2, CT, [EXPLICIT])]}, "not odd"),
    ({"contexts": [PresentationContext(257, CT, [EXPLICIT])]}, "not odd"),
    ({"contexts": [PresentationContext(1, CT, [])]}, "no transfer syntax"),
    ({"contexts": [PresentationContext(1, CT, [EXPLICIT] * 4000)]}, "exceeds 65535"),
])
def test_values_that_do_not_fit_raise_on_encoding(change: dict[str, Any], message: str) -> None:
    request = sample_request()
    for name, value in change.items():
        setattr(request, name, value)
    with pytest.raises(PduError, match=message):
        encode_rq(request)


# --- both ends meet bad peers -------------------------------------------------------------

def test_the_server_aborts_an_undecodable_request(server: Server) -> None:
    body = FIXED[:4] + b"PACSCLI".ljust(16) + FIXED[20:] + APPLICATION + b"\x20\x00\x00\x30" + bytes(10)
    with socket.create_connection(("127.0.0.1", server.port), timeout=10) as sock:
        sock.sendall(pdu(0x01, body))
        pdu_type, abort = read_pdu(sock)
    assert (pdu_type, abort) == (0x07, b"\x00\x00\x02\x06")  # A-ABORT, provider, invalid parameter


@pytest.fixture
def fake_peer() -> Iterator[Callable[[bytes], tuple[int, list[tuple[int, bytes]]]]]:
    """A one-shot peer on a free port answering an association request with given bytes;
    gives the port and, once done, the PDUs it received."""
    threads: list[threading.Thread] = []

    def start(answer: bytes) -> tuple[int, list[tuple[int, bytes]]]:
        listener = socket.create_server(("127.0.0.1", 0))
        received: list[tuple[int, bytes]] = []

        def serve() -> None:
            with listener, listener.accept()[0] as conn:
                conn.settimeout(10)
                received.append(read_pdu(conn))
                conn.sendall(answer)
                while (got := read_pdu(conn))[0] != -1:
                    received.append(got)

        thread = threading.Thread(target=serve, daemon=True)
        thread.start()
        threads.append(thread)
        return int(listener.getsockname()[1]), received

    yield start
    for thread in threads:
        thread.join(timeout=10)


def client_settings(tmp_path: Path) -> Settings:
    return Settings(archive=tmp_path / "archive")


def test_the_client_aborts_on_an_undecodable_accept(tmp_path: Path, fake_peer: Any) -> None:
    port, received = fake_peer(pdu(0x02, encode_ac(sample_accept())[:-5]))
    with pytest.raises(NetworkError, match="A-ASSOCIATE-AC that cannot be read") as caught:
        request_association(client_settings(tmp_path), parse_remote(f"PEER@127.0.0.1:{port}"),
                            [PresentationContext(abstract_syntax=CT, transfer_syntax=[EXPLICIT])], tmp_path)
    assert caught.value.code == "association-aborted"
    assert [t for t, _ in received][:1] == [0x01]
    request = decode_rq(received[0][1])
    assert (request.called_ae_title, request.contexts[0].context_id) == ("PEER", 1)


def test_the_client_reports_a_rejection_in_words(tmp_path: Path, fake_peer: Any) -> None:
    port, _ = fake_peer(pdu(0x03, encode_rj(Rejection(1, 1, 7))))
    with pytest.raises(NetworkError, match=re.escape(
            "rejected permanent by the service user: called AE title not recognised (the peer does "
            "not answer to the AE title 'PEER')")):
        request_association(client_settings(tmp_path), parse_remote(f"PEER@127.0.0.1:{port}"),
                            [PresentationContext(abstract_syntax=CT, transfer_syntax=[EXPLICIT])], tmp_path)


def test_the_client_keeps_what_the_peer_accepted(tmp_path: Path, fake_peer: Any) -> None:
    accept = Associate("PEER", "PACSCLI", [PresentationContext(1, transfer_syntax=[IMPLICIT], result=0),
                                           PresentationContext(3, transfer_syntax=[JPEG], result=3)],
                       max_pdu=32768, implementation_class_uid="1.2.3", implementation_version_name="PEER_1")
    port, _ = fake_peer(pdu(0x02, encode_ac(accept)))
    offered = [PresentationContext(abstract_syntax=CT, transfer_syntax=[EXPLICIT, IMPLICIT]),
               PresentationContext(abstract_syntax=MR, transfer_syntax=[JPEG])]
    assoc = request_association(client_settings(tmp_path), parse_remote(f"PEER@127.0.0.1:{port}"),
                                offered, tmp_path)
    try:
        assert assoc.accepted_syntaxes(CT) == [IMPLICIT] and assoc.accepted_syntaxes(MR) == []
        assert (assoc.peer_max_pdu, assoc.peer_implementation_class_uid,
                assoc.peer_implementation_version_name) == (32768, "1.2.3", "PEER_1")
    finally:
        assoc.abort()
