"""The requestor side of our upper layer: associations we open to send C-STOREs.

pynetdicom's requestor shares its acceptor's 1 ms polling reactor, which capped `pacs store`
near a quarter of DCMTK's storescu here and could take a C-STORE response from under
send_c_store (the call then waited out the DIMSE timeout). This requestor frames PDUs and
DIMSE messages with the same `Association` as `pacs serve` and blocks on its socket, and
negotiates with pacscli.net.pdu: `pacs store` loads neither pynetdicom nor pydicom.

A dataset file is read straight into place among its PDU headers in a buffer the
association reuses, and the next instance's first PDUs are read while the peer is still
storing the current one: between a response and the next request only the send is left.
"""

from __future__ import annotations

import logging
import socket
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path

from pacscli import IMPLEMENTATION_CLASS_UID, IMPLEMENTATION_VERSION_NAME
from pacscli.config import Remote, Settings
from pacscli.errors import InvalidDicomError, NetworkError, UsageError
from pacscli.net.diagnose import abort_text, diagnose_connection, rejection_text
from pacscli.net.dimse import C_STORE_RQ, C_STORE_RSP, HAS_DATASET, encode_command
from pacscli.net.pdu import (
    ACCEPTANCE,
    Associate,
    PduError,
    PresentationContext,
    decode_ac,
    decode_rj,
    encode_rq,
)
from pacscli.net.server import (
    A_ABORT_TYPE,
    A_ASSOCIATE_AC_TYPE,
    A_ASSOCIATE_RJ_TYPE,
    A_ASSOCIATE_RQ_TYPE,
    A_RELEASE_RP_TYPE,
    A_RELEASE_RQ_TYPE,
    ABORT_INVALID_PARAMETER,
    Association,
    AssociationClosed,
    Context,
    DatasetFile,
    OutgoingDataset,
)

log = logging.getLogger(__name__)



@dataclass(frozen=True)
class StoreResponse:
    """The peer's answer to one C-STORE."""

    status: int
    error_comment: str = ""


class SendStalled(TimeoutError):
    """The peer stopped reading what we sent (a TimeoutError of the sending, not of waiting
    for a response)."""


class ClientAssociation(Association):
    """An association we requested: its accepted contexts and the C-STORE it sends."""

    def __init__(self, sock: socket.socket, remote: Remote, settings: Settings, staging: Path) -> None:
        super().__init__(sock, (remote.host, remote.port), max_pdu=settings.network.max_pdu,
                         staging=staging)
        self.remote = remote
        self.dimse_timeout = settings.network.dimse_timeout
        self.peer_implementation_class_uid = ""
        self.peer_implementation_version_name = ""
        self._ahead: OutgoingDataset | None = None  # the next dataset, its first PDUs read already

    def accepted_syntaxes(self, sop_class: str) -> list[str]:
        """The transfer syntaxes accepted for `sop_class`, in context order."""
        return [c.transfer_syntax for c in sorted(self.contexts.values(), key=lambda c: c.id)
                if c.abstract_syntax == sop_class]

    def context_for(self, sop_class: str, transfer_syntax: str) -> Context | None:
        """An accepted context for this SOP class and transfer syntax."""
        return next((c for c in self.contexts.values() if c.abstract_syntax == sop_class
                     and c.transfer_syntax == transfer_syntax), None)

    def c_store(self, context: Context, sop_uid: str, dataset: bytes | DatasetFile,
                upcoming: tuple[Context, DatasetFile] | None = None) -> StoreResponse:
        """Send one C-STORE-RQ with `dataset` (bytes, or a file's dataset, streamed) and
        wait for its response.

        `upcoming` is the context and dataset file of the C-STORE likely to follow: its
        first PDUs are read while the peer stores this one, so the next request goes out
        as soon as this response arrives. Raises InvalidDicomError when the file cannot be
        opened, AssociationClosed when the peer aborts or the connection drops (OSError
        when the file ends early), and TimeoutError when no response comes within the
        DIMSE timeout.
        """
        try:
            if isinstance(dataset, DatasetFile):  # opened first: a file we cannot open uses no message ID
                outgoing = self._take_ahead(context.id, dataset) or self._open(context.id, dataset)
                message_id, command = self._store_command(context, sop_uid)
                self.send_message(context.id, command, outgoing)
            else:
                message_id, command = self._store_command(context, sop_uid)
                self.send_message(context.id, command, dataset)
        except TimeoutError:
            raise self._stalled() from None
        if upcoming is not None:
            self._read_ahead(*upcoming)
        self.sock.settimeout(self.dimse_timeout)
        message = self.receive_message()
        if message is None:
            raise AssociationClosed(f"{self.remote} released the association during a C-STORE")
        _, response, extra = message
        if extra is not None:
            extra.discard()
        if response.field != C_STORE_RSP or response.number("MessageIDBeingRespondedTo") != message_id:
            self.abort()
            raise AssociationClosed(f"{self.remote} answered with command 0x{response.field:04x} "
                                    f"instead of the C-STORE response to message {message_id}")
        return StoreResponse(response.number("Status"), response.get("ErrorComment"))

    def _stalled(self) -> Exception:
        """Why the peer took no more of a message for a timeout: an A-ABORT it sent and
        stopped reading after, or nothing it says."""
        try:
            self.sock.settimeout(0)
            head = self.sock.recv(10, socket.MSG_PEEK)
        except OSError:  # nothing waiting (BlockingIOError), or the connection is gone
            head = b""
        if len(head) == 10 and head[0] == A_ABORT_TYPE:
            return AssociationClosed(f"the peer aborted the association (A-ABORT from "
                                     f"{abort_text(head[8], head[9])})")
        return SendStalled(f"{self.remote} took none of the data sent for "
                           f"{self.dimse_timeout:g} s")

    def _store_command(self, context: Context, sop_uid: str) -> tuple[int, bytes]:
        """A new message ID and the C-STORE-RQ command set that carries it."""
        message_id = self.next_message_id()
        return message_id, encode_command(
            CommandField=C_STORE_RQ, AffectedSOPClassUID=context.abstract_syntax, MessageID=message_id,
            Priority=0, CommandDataSetType=HAS_DATASET, AffectedSOPInstanceUID=sop_uid)

    def _open(self, context_id: int, dataset: DatasetFile) -> OutgoingDataset:
        """`open_dataset`, saying which file could not be read."""
        try:
            return self.open_dataset(context_id, dataset)
        except OSError as exc:
            raise InvalidDicomError(f"cannot read {dataset.path}: {exc.strerror or exc}") from exc

    def _read_ahead(self, context: Context, dataset: DatasetFile) -> None:
        """Open the next dataset and read its first PDUs now; on any error, leave it to its
        own C-STORE, which says what is wrong."""
        try:
            self._ahead = self._open(context.id, dataset)
        except (InvalidDicomError, OSError) as exc:
            log.debug("reading %s ahead: %s", dataset.path, exc)

    def _take_ahead(self, context_id: int, dataset: DatasetFile) -> OutgoingDataset | None:
        """The dataset read ahead, if it is this one."""
        ahead, self._ahead = self._ahead, None
        if ahead is not None and (ahead.dataset, ahead.context_id) == (dataset, context_id):
            return ahead
        if ahead is not None:
            ahead.source.close()
        return None

    def close(self) -> None:
        """Close the socket and any file read ahead."""
        if self._ahead is not None:
            self._ahead.source.close()
            self._ahead = None
        super().close()

    def release(self) -> None:
        """A-RELEASE: ask, wait briefly for the answer, close."""
        try:
            self.send_pdu(A_RELEASE_RQ_TYPE, bytes(4))
            self.sock.settimeout(10)
            while True:
                pdu_type, _ = self.recv_pdu()
                if pdu_type in (A_RELEASE_RP_TYPE, A_ABORT_TYPE):
                    break
        except (OSError, AssociationClosed) as exc:
            log.debug("release of %s: %s", self.remote, exc)
        finally:
            self.close()


def request_association(settings: Settings, remote: Remote, contexts: Sequence[PresentationContext],
                        staging: Path) -> ClientAssociation:
    """Connect to `remote` and negotiate `contexts` (context IDs are assigned here, on copies).

    Raises NetworkError saying exactly why not: name resolution, refused or timed-out TCP,
    a rejection with its decoded reason, an abort, or no accepted context at all.
    """
    net = settings.network
    proposed = [replace(context, context_id=2 * number + 1) for number, context in enumerate(contexts)]
    try:
        request = encode_rq(Associate(
            called_ae_title=remote.ae_title, calling_ae_title=settings.ae_title, contexts=proposed,
            max_pdu=net.max_pdu, implementation_class_uid=IMPLEMENTATION_CLASS_UID,
            implementation_version_name=IMPLEMENTATION_VERSION_NAME))
    except PduError as exc:
        raise UsageError(f"cannot request an association with {remote}: {exc}") from exc
    try:
        addresses = socket.getaddrinfo(remote.host, remote.port, type=socket.SOCK_STREAM)
    except socket.gaierror as exc:
        raise NetworkError(f"cannot resolve host {remote.host!r}: {exc.strerror}",
                           code="name-resolution") from exc
    tls = None
    if remote.tls:  # ssl is loaded only then: `pacs store` starts in a fraction of a second
        from pacscli.net.tls import client_context

        tls = client_context(settings, remote)
    try:
        host, port = str(addresses[0][4][0]), int(addresses[0][4][1])
        sock = socket.create_connection((host, port), timeout=net.connect_timeout)
    except OSError as exc:
        raise NetworkError(f"cannot associate with {remote}: "
                           f"{diagnose_connection(remote, net.connect_timeout)}",
                           code="connection-failed") from exc
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    if tls is not None:
        try:
            sock.settimeout(net.acse_timeout)
            sock = tls.wrap_socket(sock, server_hostname=remote.host)
        except OSError as exc:  # ssl.SSLError is one
            from pacscli.net.tls import handshake_problem

            sock.close()
            raise NetworkError(handshake_problem(exc, remote), code="tls-failed") from exc
    assoc = ClientAssociation(sock, remote, settings, staging)
    try:
        assoc.send_pdu(A_ASSOCIATE_RQ_TYPE, request)
        sock.settimeout(net.acse_timeout)
        pdu_type, body = assoc.recv_pdu()
    except TimeoutError as exc:
        assoc.close()
        raise NetworkError(f"{remote} accepted the TCP connection but did not answer the association "
                           f"request within {net.acse_timeout:g} s", code="acse-timeout") from exc
    except (OSError, AssociationClosed) as exc:
        assoc.close()
        if tls is not None and isinstance(exc, OSError):  # TLS 1.3: refused after the handshake
            from pacscli.net.tls import diagnose_handshake, handshake_problem

            # The server's alert may be lost to the reset our request caused: a handshake
            # that sends nothing hears it.
            problem = diagnose_handshake(remote, tls, net.connect_timeout)
            raise NetworkError(problem or handshake_problem(exc, remote), code="tls-failed") from exc
        raise NetworkError(f"{remote} closed the connection during association negotiation: {exc}",
                           code="association-aborted") from exc
    if pdu_type == A_ASSOCIATE_RJ_TYPE:
        assoc.close()
        try:
            why = rejection_text(decode_rj(body), settings.ae_title, remote)
        except PduError as exc:
            why = f"the A-ASSOCIATE-RJ could not be read ({exc})"
        raise NetworkError(f"association rejected by {remote}: {why}", code="association-rejected")
    if pdu_type != A_ASSOCIATE_AC_TYPE:
        assoc.close()
        if pdu_type == A_ABORT_TYPE and len(body) == 4:
            raise NetworkError(f"{remote} aborted the association during negotiation (A-ABORT "
                               f"from {abort_text(body[2], body[3])})", code="association-aborted")
        kind = "aborted the association" if pdu_type == A_ABORT_TYPE else f"sent PDU 0x{pdu_type:02x}"
        raise NetworkError(f"{remote} {kind} during negotiation", code="association-aborted")
    try:
        accept = decode_ac(body)
    except PduError as exc:
        assoc.abort(ABORT_INVALID_PARAMETER)
        raise NetworkError(f"{remote} answered with an A-ASSOCIATE-AC that cannot be read: {exc}",
                           code="association-aborted") from exc
    _apply_accept(assoc, accept, {c.context_id: c for c in proposed})
    if not assoc.contexts:
        assoc.release()
        raise NetworkError(f"{remote} accepted the association but none of the presentation contexts "
                           "offered", code="no-accepted-context")
    assoc.established = True
    sock.settimeout(net.dimse_timeout)  # the sending of the first message too, not the ACSE's
    return assoc


def _apply_accept(assoc: ClientAssociation, accept: Associate,
                  proposed: dict[int, PresentationContext]) -> None:
    """Record the accepted contexts and the peer's limits and identity."""
    for result in accept.contexts:
        asked = proposed.get(result.context_id)
        syntax = result.transfer_syntax[0] if result.transfer_syntax else ""
        if asked is None or result.result != ACCEPTANCE or not syntax:
            continue
        assoc.contexts[result.context_id] = Context(result.context_id, asked.abstract_syntax, syntax)
    if accept.max_pdu:
        assoc.peer_max_pdu = accept.max_pdu
    assoc.peer_implementation_class_uid = accept.implementation_class_uid
    assoc.peer_implementation_version_name = accept.implementation_version_name
