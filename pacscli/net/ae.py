"""pynetdicom glue shared by every SCU and SCP: the AE factory, TCP_NODELAY, and opening an
association with a field engineer's diagnosis of why it failed."""

from __future__ import annotations

import logging
import socket
import ssl
import time
import warnings
from collections.abc import Sequence
from io import BytesIO
from typing import Any

from pynetdicom import AE, Association, evt
from pynetdicom.dsutils import decode
from pynetdicom.presentation import PresentationContext

from pacscli import IMPLEMENTATION_CLASS_UID, IMPLEMENTATION_VERSION_NAME
from pacscli.config import Remote, Settings
from pacscli.errors import NetworkError
from pacscli.net.diagnose import abort_text, diagnose_connection, rejection_text
from pacscli.net.pdu import Rejection
from pacscli.net.tls import client_context, diagnose_handshake

log = logging.getLogger(__name__)

Handler = tuple[Any, ...]


def set_nodelay(event: evt.Event) -> None:
    """EVT_CONN_OPEN handler: disable Nagle, or every C-STORE waits ~40 ms for a delayed ACK."""
    sock = getattr(event.assoc.dul.socket, "socket", None)
    if sock is not None:
        try:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        except OSError as exc:  # e.g. already closed by the peer
            log.debug("cannot set TCP_NODELAY: %s", exc)


NODELAY_HANDLER: Handler = (evt.EVT_CONN_OPEN, set_nodelay)


def make_ae(settings: Settings, ae_title: str | None = None) -> AE:
    """An AE with our identity, bounded max PDU and the configured timeouts."""
    ae = AE(ae_title=ae_title or settings.ae_title)
    net = settings.network
    ae.maximum_pdu_size = net.max_pdu
    ae.connection_timeout = net.connect_timeout
    ae.acse_timeout = net.acse_timeout
    ae.dimse_timeout = net.dimse_timeout
    ae.network_timeout = net.network_timeout
    ae.implementation_class_uid = IMPLEMENTATION_CLASS_UID
    ae.implementation_version_name = IMPLEMENTATION_VERSION_NAME
    return ae


def _plain(text: object) -> str:
    """Words in lower case for a sentence, acronyms kept: 'Called AE title' -> 'called AE title'."""
    return " ".join(w if w.isupper() else w.lower() for w in str(text).split())


def requestor_tls(settings: Settings, remote: Remote) -> ssl.SSLContext | None:
    """The TLS context of an association `associate` opens with `remote` (None unless it
    goes over TLS): `client_context`'s, capped at TLS 1.2. Raises ConfigError as it does."""
    context = client_context(settings, remote)
    if context is not None:
        # pynetdicom reads its socket without a timeout once connected: TLS 1.3 session
        # tickets make it look readable, and a peer that then says nothing held the command
        # for ever (pynetdicom issue #364). TLS 1.2 is what BCP 195 asks for anyway.
        context.maximum_version = ssl.TLSVersion.TLSv1_2
    return context


def associate(
    ae: AE,
    remote: Remote,
    *,
    contexts: Sequence[PresentationContext] | None = None,
    ext_neg: list[Any] | None = None,
    evt_handlers: Sequence[Handler] = (),
    tls: ssl.SSLContext | None = None,
) -> Association:
    """Open an association with `remote` (over TLS with the `tls` context, which
    `requestor_tls` makes), or raise NetworkError saying exactly why not.

    The error distinguishes name resolution, refused TCP, a failed TLS handshake, timeouts,
    a rejection (with its decoded result, source and reason) and an abort during negotiation.
    """
    try:
        socket.getaddrinfo(remote.host, remote.port, type=socket.SOCK_STREAM)
    except socket.gaierror as exc:
        raise NetworkError(f"cannot resolve host {remote.host!r}: {exc.strerror}",
                           code="name-resolution") from exc
    received: list[Any] = []
    connected: list[bool] = []
    # In order: "closed" when the connection closed, and the class name of each primitive
    # the ACSE got ("A_ABORT" from the peer, "A_P_ABORT" from the local upper layer).
    happened: list[str] = []

    def on_acse_recv(event: evt.Event) -> None:
        received.append(event.primitive)
        happened.append(type(event.primitive).__name__)

    def on_conn_open(event: evt.Event) -> None:
        connected.append(True)
        # pynetdicom's own PDU logger is bound first, and it raises on a reserved value in an
        # A-ASSOCIATE-RJ, which skips the handlers after it: ours goes before it.
        assoc = event.assoc
        for handler, args in list(assoc.get_handlers(evt.EVT_PDU_RECV)):
            if handler is not on_pdu_recv:
                assoc.unbind(evt.EVT_PDU_RECV, handler)
                assoc.bind(evt.EVT_PDU_RECV, handler, args)

    def on_conn_close(event: evt.Event) -> None:
        happened.append("closed")

    rejections: list[Rejection] = []

    aborts: list[str] = []  # who sent each A-ABORT and why

    def on_pdu_recv(event: evt.Event) -> None:
        if type(event.pdu).__name__ == "A_ASSOCIATE_RJ":
            rejections.append(_kept_rejection(event.pdu))
        elif type(event.pdu).__name__ == "A_ABORT_RQ":
            aborts.append(abort_text(int(event.pdu.source), int(event.pdu.reason_diagnostic)))

    handlers = [NODELAY_HANDLER, (evt.EVT_CONN_OPEN, on_conn_open),
                (evt.EVT_CONN_CLOSE, on_conn_close), (evt.EVT_ACSE_RECV, on_acse_recv),
                (evt.EVT_PDU_RECV, on_pdu_recv), *evt_handlers]
    started = time.monotonic()
    assoc = ae.associate(
        remote.host,
        remote.port,
        contexts=list(contexts) if contexts is not None else None,
        ae_title=remote.ae_title,
        max_pdu=ae.maximum_pdu_size,
        ext_neg=ext_neg,
        evt_handlers=handlers,
        tls_args=(tls, remote.host) if tls is not None else None,
    )
    if assoc.is_established:
        peer_max = assoc.acceptor.maximum_length
        if peer_max is not None and 0 < peer_max < _SMALLEST_PDU:
            assoc.abort()
            raise NetworkError(f"{remote} accepted the association with a maximum PDU length of "
                               f"{peer_max} bytes, too small to carry any message (at least "
                               f"{_SMALLEST_PDU})", code="association-aborted")
        return assoc
    # A rejection seen by the ACSE counts even when pynetdicom did not flag it (it did not,
    # now and then, and the diagnosis became a timeout that had not happened).
    rejected = assoc.is_rejected or bool(rejections) or \
        any(getattr(p, "result", None) in (1, 2) for p in received)
    if rejected:
        reply = next((p for p in received if hasattr(p, "reason_str")), None)
        rejection = rejections[0] if rejections else \
            _rejection(reply) if reply is not None else None
        detail = (rejection_text(rejection, ae.ae_title, remote) if rejection is not None
                  else "rejected")
        raise NetworkError(f"association rejected by {remote}: {detail}",
                           code="association-rejected")
    if assoc.rejected_contexts and not assoc.accepted_contexts:
        # pynetdicom aborts an association accepted with no presentation context.
        refused = [f"{cx.abstract_syntax.name}: {_plain(cx.status)}"
                   for cx in assoc.rejected_contexts]
        more = f"; and {len(refused) - 3} more" if len(refused) > 3 else ""
        raise NetworkError(f"{remote} accepted the association but none of the presentation "
                           f"contexts offered ({'; '.join(refused[:3])}{more})",
                           code="no-accepted-context")
    if tls is not None and (not connected or "A_P_ABORT" in happened):
        # pynetdicom only logs why the handshake failed; under TLS 1.3 a server refusing our
        # certificate says so only after it, and pynetdicom sees the connection close.
        problem = diagnose_handshake(remote, tls, ae.connection_timeout or 10)
        if problem is not None:
            raise NetworkError(problem, code="tls-failed")
    if not connected:
        raise NetworkError(f"cannot associate with {remote}: "
                           f"{diagnose_connection(remote, ae.connection_timeout or 10)}",
                           code="connection-failed")
    # pynetdicom marks the association aborted however negotiation ended; what it received
    # tells the peer's A-ABORT from a closed connection, bytes that are not DICOM, or silence.
    # pynetdicom gives an A-ABORT from the peer's service provider as A_P_ABORT: the PDU
    # itself tells it from bytes that are not DICOM.
    if aborts:
        raise NetworkError(f"{remote} aborted the association during negotiation (A-ABORT "
                           f"from {aborts[0]})", code="association-aborted")
    if "A_ABORT" in happened:
        raise NetworkError(f"{remote} aborted the association during negotiation",
                           code="association-aborted")
    if "A_P_ABORT" in happened:
        closed_first = "closed" in happened[:happened.index("A_P_ABORT")]
        what = ("closed the connection during association negotiation" if closed_first
                else "answered the association request with something that is not DICOM")
        raise NetworkError(f"{remote} {what} (is it a DICOM service? TLS expected?)",
                           code="association-aborted")
    waited = time.monotonic() - started
    if ae.acse_timeout and waited < 0.9 * ae.acse_timeout:
        raise NetworkError(f"{remote} ended the association negotiation after {waited:.1f} s "
                           "without an answer we could read", code="association-aborted")
    raise NetworkError(f"{remote} accepted the TCP connection but did not answer the "
                       f"association request within {ae.acse_timeout:g} s", code="acse-timeout")


# A P-DATA PDU of less than this holds no data: its PDV header alone takes 6 bytes, and
# pynetdicom fails (ValueError, ZeroDivisionError) on a peer's maximum of 1 to 7.
_SMALLEST_PDU = 8


# What pynetdicom's A-ASSOCIATE primitive takes: any other value in an A-ASSOCIATE-RJ
# (a reserved reason, say) raised ValueError in its reactor thread, which died with a
# traceback, and the rejection was reported as an ACSE timeout 30 s later.
_RJ_RESULTS = (1, 2)
_RJ_SOURCES = (1, 2, 3)
_RJ_REASONS = (1, 2, 3, 7)


def _kept_rejection(pdu: Any) -> Rejection:
    """The result, source and reason of a received A-ASSOCIATE-RJ PDU, as sent; values
    pynetdicom would refuse are then replaced in the PDU (by 1: 'rejected permanent', 'service
    user', 'no reason given'), so that it takes the rejection as one at once."""
    sent = Rejection(int(pdu.result or 0), int(pdu.source or 0), int(pdu.reason_diagnostic or 0))
    if sent.result not in _RJ_RESULTS:
        pdu.result = 1
    if sent.source not in _RJ_SOURCES:
        pdu.source = 1
    if sent.reason not in _RJ_REASONS:
        pdu.reason_diagnostic = 1
    return sent


def _rejection(primitive: Any) -> Rejection:
    """The result, source and reason of pynetdicom's A-ASSOCIATE primitive for a rejection."""
    return Rejection(int(primitive.result or 0), int(primitive.result_source or 0),
                     int(primitive.diagnostic or 0))


def release(assoc: Association) -> None:
    """Release an association if it is still up."""
    if assoc.is_established:
        assoc.release()


def abort(assoc: Association) -> None:
    """Abort an association if it is still up: on Ctrl-C, or when our reader went away, a
    release would wait up to the ACSE timeout for a peer still busy answering."""
    if assoc.is_established:
        assoc.abort()


# The DIMSE command fields pynetdicom knows (PS3.7 E.1): C-STORE, C-GET, C-FIND, C-MOVE,
# C-ECHO, N-EVENT-REPORT, N-GET, N-SET, N-ACTION, N-CREATE and N-DELETE requests and
# responses, and C-CANCEL.
_REQUEST_FIELDS = (0x0001, 0x0010, 0x0020, 0x0021, 0x0030,
                   0x0100, 0x0110, 0x0120, 0x0130, 0x0140, 0x0150)
_COMMAND_FIELDS = frozenset([*_REQUEST_FIELDS, *(f | 0x8000 for f in _REQUEST_FIELDS), 0x0FFF])


def _command_problem(command: bytes) -> str | None:
    """Why pynetdicom could not take this command set in, or None when it can: the same
    decoding it does (tolerant of what real peers send, such as trailing padding or an empty
    count), every value read, and the two elements it needs."""
    try:
        with warnings.catch_warnings(action="ignore"):
            dataset = decode(BytesIO(command), True, True)
            for element in dataset:  # pydicom reads values lazily: a broken one raises here
                _ = element.value
    except Exception as exc:  # what pydicom raises on bytes it cannot read varies
        first = str(exc).split(". ")[0]  # pydicom's messages run on with advice for its users
        return f"{type(exc).__name__}: {first}" if first else type(exc).__name__
    field = dataset.get("CommandField")
    if field not in _COMMAND_FIELDS:
        return "no Command Field" if field is None else f"unknown Command Field 0x{field:04X}"
    if dataset.get("CommandDataSetType") is None:
        return "no Command Data Set Type"
    return None


class Watch:
    """Event handlers noting how an association ended: a peer's A-ABORT or a closed connection.

    pynetdicom's send_c_* calls come back without a status in both cases; this says which.
    """

    def __init__(self) -> None:
        self.abort: Any = None
        self.closed = False
        self.malformed: str | None = None  # why a command set the peer sent cannot be decoded
        self._command = bytearray()  # command fragments so far

    def handlers(self) -> list[Handler]:
        """The (event, handler) pairs to pass to associate()."""
        return [(evt.EVT_CONN_OPEN, self._on_open), (evt.EVT_PDU_RECV, self._on_pdu),
                (evt.EVT_CONN_CLOSE, self._on_close)]

    def _on_open(self, event: evt.Event) -> None:
        # A new association (move opens another when one ended): what ended the last one
        # is not this one's story.
        self.abort, self.closed, self.malformed = None, False, None
        self._command.clear()

    def _on_pdu(self, event: evt.Event) -> None:
        kind = type(event.pdu).__name__
        if kind == "A_ABORT_RQ":
            self.abort = event.pdu
        elif kind == "P_DATA_TF" and self.malformed is None:
            self._check_commands(event)

    def _check_commands(self, event: evt.Event) -> None:
        """Decode each command set as its last fragment arrives. One that cannot be decoded
        killed pynetdicom's reactor thread (a traceback), and the request then waited out
        the DIMSE timeout: such a PDU is emptied before pynetdicom reads it, and the
        request ends without a response."""
        for item in event.pdu.presentation_data_value_items:
            data = item.presentation_data_value or b""
            if not data or not data[0] & 0x01:  # a dataset fragment
                continue
            self._command += data[1:]
            if data[0] & 0x02:
                command, self._command = bytes(self._command), bytearray()
                problem = _command_problem(command)
                if problem is not None:
                    self.malformed = problem
                    event.pdu.presentation_data_value_items = []
                    # What pynetdicom itself queues when the association goes: the request
                    # waiting for its response comes back without one now, not at the DIMSE
                    # timeout, and pynetdicom aborts the association. (An abort from here
                    # would wake its reactor, which could take the item first.)
                    event.assoc.dimse.msg_queue.put((None, None))
                    return

    def _on_close(self, event: evt.Event) -> None:
        self.closed = True

    def why_ended(self) -> tuple[str, str] | None:
        """(code, words) when the peer sent a command set that cannot be decoded, aborted or
        closed the connection, else None."""
        if self.malformed is not None:
            return "invalid-response", (f"the peer sent a command set that cannot be decoded "
                                        f"({self.malformed}); the association was aborted")
        if self.abort is not None:
            source, reason = self.abort.source_str, self.abort.reason_str
            detail = "" if reason == "(no value available)" else f", reason: {reason}"
            return "association-aborted", (f"the peer aborted the association (A-ABORT, "
                                           f"source: {source}{detail})")
        if self.closed:
            return "connection-closed", "the peer closed the connection"
        return None
