"""The Query/Retrieve services of `pacs serve`: C-FIND, C-MOVE and C-GET over the index,
Patient Root and Study Root (PS3.4 Annex C).

C-FIND answers from the index through the same query engine as `pacs find --archive`,
streaming one pending response per match and stopping on C-CANCEL. C-MOVE sends with the
same C-STORE SCU as `pacs store` to a destination found by AE title among the configured
remotes. C-GET sends each instance back over the requesting association in its stored
transfer syntax, or converted when the requestor accepted only others.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

from pydicom.dataset import Dataset
from pydicom.uid import UID

from pacscli.archive.archive import Archive
from pacscli.archive.query import RetrieveItem, find, instances_for_retrieve
from pacscli.config import Settings
from pacscli.dicom.query import InvalidQueryError
from pacscli.dicom.uids import NATIVE_SYNTAXES, UNCOMPRESSED_SYNTAXES
from pacscli.errors import PacsError
from pacscli.net.dimse import (
    C_FIND_RSP,
    C_GET_RSP,
    C_MOVE_RSP,
    C_STORE_RQ,
    C_STORE_RSP,
    HAS_DATASET,
    NO_DATASET,
    Command,
    decode_identifier,
    encode_command,
    encode_identifier,
)
from pacscli.net.server import (
    Association,
    AssociationClosed,
    Context,
    DatasetFile,
    OutgoingDataset,
    ReceivedDataset,
    Service,
)

log = logging.getLogger(__name__)

PATIENT_ROOT_FIND = "1.2.840.10008.5.1.4.1.2.1.1"
PATIENT_ROOT_MOVE = "1.2.840.10008.5.1.4.1.2.1.2"
PATIENT_ROOT_GET = "1.2.840.10008.5.1.4.1.2.1.3"
STUDY_ROOT_FIND = "1.2.840.10008.5.1.4.1.2.2.1"
STUDY_ROOT_MOVE = "1.2.840.10008.5.1.4.1.2.2.2"
STUDY_ROOT_GET = "1.2.840.10008.5.1.4.1.2.2.3"
MODELS = {
    PATIENT_ROOT_FIND: "patient", PATIENT_ROOT_MOVE: "patient", PATIENT_ROOT_GET: "patient",
    STUDY_ROOT_FIND: "study", STUDY_ROOT_MOVE: "study", STUDY_ROOT_GET: "study",
}
# Identifiers are decoded with pydicom: the uncompressed syntaxes and deflate.
QR_TRANSFER_SYNTAXES = NATIVE_SYNTAXES
# C-FIND extended negotiation (PS3.4 C.4.1.1.1, C.5.1.1.2): the index matches relationally
# (keys of the levels above) and names case-insensitively on request; not combined date-time.
FUZZY_NAMES = 2  # the option byte of fuzzy person name matching
FIND_EXTENDED = {PATIENT_ROOT_FIND: bytes([1, 0, 1]), STUDY_ROOT_FIND: bytes([1, 0, 1])}

SUCCESS, PENDING, CANCELLED = 0x0000, 0xFF00, 0xFE00
NOT_AUTHORIZED = 0x0124
MOVE_DESTINATION_UNKNOWN = 0xA801
UNABLE_TO_PROCESS = 0xC000
IDENTIFIER_DOES_NOT_MATCH = 0xA900  # "Identifier does not match SOP Class"
SUB_OPERATIONS_FAILED = 0xB000
UNABLE_TO_PERFORM_SUB_OPERATIONS = 0xA702


def _respond(assoc: Association, context: Context, field_: int, request: Command, status: int,
             identifier: Dataset | None = None, comment: str | None = None,
             counts: SubOperations | None = None) -> None:
    """Send one C-FIND/C-MOVE/C-GET response, with an identifier when given."""
    numbers = counts.as_command(final=status not in (PENDING, 0xFF01)) if counts else {}
    assoc.send_message(context.id, encode_command(
        CommandField=field_, AffectedSOPClassUID=context.abstract_syntax,
        MessageIDBeingRespondedTo=request.message_id,
        CommandDataSetType=NO_DATASET if identifier is None else HAS_DATASET,
        Status=status, ErrorComment=_error_comment(comment) if comment else None, **numbers,
    ), None if identifier is None else encode_identifier(identifier, context.transfer_syntax))


def _error_comment(text: str) -> str:
    """An Error Comment fits in 64 characters (LO): a longer text is cut at a word, with an
    ellipsis, rather than mid-word (the log has it whole)."""
    if len(text) <= 64:
        return text
    cut = text[:61].rsplit(" ", 1)[0].rstrip(" :;,")
    return cut + "..."


def _identifier(context: Context, dataset: ReceivedDataset | None) -> Dataset:
    if dataset is None:
        raise PacsError("the request has no identifier")
    content = dataset.content()
    data = content.read_bytes() if isinstance(content, Path) else bytes(content)
    try:
        return decode_identifier(data, context.transfer_syntax)
    except Exception as exc:
        raise PacsError(f"undecodable identifier: {exc}") from exc


def handle_find(settings: Settings, archive: Archive) -> Service:
    """The C-FIND service over the archive's index."""

    def service(assoc: Association, context: Context, command: Command,
                dataset: ReceivedDataset | None) -> None:
        if not _permitted(settings, assoc, context, command, C_FIND_RSP):
            return
        try:
            identifier = _identifier(context, dataset)
            level = str(identifier.get("QueryRetrieveLevel", "")).strip()
            agreed = assoc.extended.get(context.abstract_syntax, b"")
            matches = find(archive.index, level, identifier, model=MODELS[context.abstract_syntax],
                           retrieve_aet=settings.ae_title,
                           case_insensitive_names=agreed[FUZZY_NAMES:FUZZY_NAMES + 1] == b"\x01")
            count = 0
            try:
                for match in matches:
                    if assoc.cancel_requested(command.message_id):
                        log.info("C-FIND from %s cancelled after %d matches", assoc, count)
                        _respond(assoc, context, C_FIND_RSP, command, CANCELLED)
                        return
                    _respond(assoc, context, C_FIND_RSP, command, PENDING, match)
                    count += 1
            finally:
                matches.close()  # release the index cursor now, not at garbage collection
        except InvalidQueryError as exc:
            log.warning("C-FIND from %s: bad identifier: %s", assoc, exc.message)
            _respond(assoc, context, C_FIND_RSP, command, IDENTIFIER_DOES_NOT_MATCH, comment=exc.message)
            return
        except PacsError as exc:
            log.warning("C-FIND from %s failed: %s", assoc, exc.message)
            _respond(assoc, context, C_FIND_RSP, command, UNABLE_TO_PROCESS, comment=exc.message)
            return
        log.info("C-FIND from %s at %s level: %d matches", assoc, level, count)
        _respond(assoc, context, C_FIND_RSP, command, SUCCESS)

    return service


@dataclass
class SubOperations:
    """Counts of a C-MOVE or C-GET's C-STORE sub-operations."""

    total: int
    completed: int = 0
    failed: int = 0
    warning: int = 0
    failed_uids: list[str] = field(default_factory=list)

    def add(self, status: str, sop_uid: str) -> None:
        """Count one sub-operation by its record status."""
        if status == "ok":
            self.completed += 1
        elif status == "warning":
            self.warning += 1
        else:
            self.failed += 1
            self.failed_uids.append(sop_uid)

    @property
    def remaining(self) -> int:
        return self.total - self.completed - self.failed - self.warning

    def as_command(self, final: bool) -> dict[str, int | str | None]:
        return {
            "NumberOfRemainingSuboperations": None if final else self.remaining,
            "NumberOfCompletedSuboperations": self.completed,
            "NumberOfFailedSuboperations": self.failed,
            "NumberOfWarningSuboperations": self.warning,
        }

    def final_status(self) -> tuple[int, Dataset | None]:
        """Success, or 0xB000 with the Failed SOP Instance UID List when any failed."""
        if not self.failed and not self.warning:
            return SUCCESS, None
        identifier = Dataset()
        if self.failed_uids:
            identifier.FailedSOPInstanceUIDList = self.failed_uids
        return SUB_OPERATIONS_FAILED, identifier if self.failed_uids else None


_SERVICES = {C_FIND_RSP: ("C-FIND", "find"), C_MOVE_RSP: ("C-MOVE", "move"),
             C_GET_RSP: ("C-GET", "get")}


def _permitted(settings: Settings, assoc: Association, context: Context, command: Command,
               response: int) -> bool:
    """Whether the calling AE may use this service (per-remote permissions); when it may
    not, the request is answered 0x0124 (not authorized)."""
    name, operation = _SERVICES[response]
    if settings.may(assoc.calling_aet, operation):
        return True
    log.warning("%s from %s refused: not permitted (see [remotes] permissions)", name, assoc)
    _respond(assoc, context, response, command, NOT_AUTHORIZED, comment="not authorized")
    return False


def _retrieve_items(archive: Archive, assoc: Association, context: Context, command: Command,
                    dataset: ReceivedDataset | None, response: int) -> list[RetrieveItem] | None:
    """The instances a C-MOVE or C-GET asks for; None when the request was refused (a bad
    identifier is answered 0xA900, anything else 0xC000)."""
    try:
        identifier = _identifier(context, dataset)
        level = str(identifier.get("QueryRetrieveLevel", "")).strip()
        return instances_for_retrieve(archive.index, level, identifier,
                                      model=MODELS[context.abstract_syntax])
    except PacsError as exc:
        log.warning("%s from %s refused: %s", _SERVICES[response][0], assoc, exc.message)
        status = IDENTIFIER_DOES_NOT_MATCH if isinstance(exc, InvalidQueryError) else UNABLE_TO_PROCESS
        _respond(assoc, context, response, command, status, comment=exc.message)
        return None


def handle_move(settings: Settings, archive: Archive,
                send: Callable[[Settings, str, list[RetrieveItem]], Iterable[dict[str, object]]]) -> Service:
    """The C-MOVE service: send the matching instances to a configured destination.

    `send(settings, destination_aet, items)` yields one store record per instance (status,
    SOPInstanceUID); it is `pacs store`'s SCU.
    """

    def service(assoc: Association, context: Context, command: Command,
                dataset: ReceivedDataset | None) -> None:
        if not _permitted(settings, assoc, context, command, C_MOVE_RSP):
            return
        destination = command.get("MoveDestination")
        if settings.remote_by_ae_title(destination) is None:
            log.error("C-MOVE from %s to unknown destination %r: add it to the config, e.g. "
                      "[remotes.%s] ae_title = %r, host = \"...\", port = ...", assoc, destination,
                      destination or "DEST", destination)
            _respond(assoc, context, C_MOVE_RSP, command, MOVE_DESTINATION_UNKNOWN,
                     comment=f"unknown move destination {destination}")
            return
        items = _retrieve_items(archive, assoc, context, command, dataset, C_MOVE_RSP)
        if items is None:
            return
        counts = SubOperations(len(items))
        try:
            # Nothing matched: success with no sub-operations, as for C-GET (pacs store
            # would refuse an empty list as a usage error).
            for record in send(settings, destination, items) if items else ():
                counts.add(str(record.get("status")), str(record.get("SOPInstanceUID", "")))
                if record.get("status") == "failed":
                    error = record.get("error")
                    log.warning("C-MOVE from %s to %s: %s failed: %s", assoc, destination,
                                record.get("path") or record.get("SOPInstanceUID"),
                                error.get("message") if isinstance(error, dict) else error)
                if counts.remaining and assoc.cancel_requested(command.message_id):
                    _respond(assoc, context, C_MOVE_RSP, command, CANCELLED, counts=counts)
                    return
                if counts.remaining:
                    _respond(assoc, context, C_MOVE_RSP, command, PENDING, counts=counts)
        except PacsError as exc:
            log.error("C-MOVE from %s to %s: %s", assoc, destination, exc.message)
            counts.failed += counts.remaining
            _respond(assoc, context, C_MOVE_RSP, command, UNABLE_TO_PERFORM_SUB_OPERATIONS,
                     comment=f"cannot send to {destination}: {exc.code}", counts=counts)
            return
        status, identifier = counts.final_status()
        log.info("C-MOVE from %s to %s: %d completed, %d failed, %d warning", assoc, destination,
                 counts.completed, counts.failed, counts.warning)
        _respond(assoc, context, C_MOVE_RSP, command, status, identifier, counts=counts)

    return service


def _get_context(assoc: Association, item: RetrieveItem) -> tuple[Context | None, bool]:
    """The accepted storage context to send `item` on, and whether it must be converted."""
    candidates = [c for c in assoc.contexts.values() if c.abstract_syntax == item.sop_class_uid]
    for context in candidates:
        if context.transfer_syntax == item.transfer_syntax:
            return context, False
    # Any other syntax, uncompressed ones too (implicit and explicit VR little endian are
    # the two a requestor most often takes just one of), is converted.
    for context in candidates:
        if context.transfer_syntax in UNCOMPRESSED_SYNTAXES:
            return context, True
    return None, False


def _convert(item: RetrieveItem, target: str) -> bytes:
    """The dataset of an archived file converted to `target` (for a C-GET requestor that
    accepted only other syntaxes)."""
    import pydicom

    from pacscli.dicom.transcode import convert

    ds = pydicom.dcmread(item.path)
    convert(ds, UID(target))
    return encode_identifier(ds, target)


def handle_get(settings: Settings, archive: Archive) -> Service:
    """The C-GET service: send the matching instances back over the same association."""

    def service(assoc: Association, context: Context, command: Command,
                dataset: ReceivedDataset | None) -> None:
        if not _permitted(settings, assoc, context, command, C_GET_RSP):
            return
        items = _retrieve_items(archive, assoc, context, command, dataset, C_GET_RSP)
        if items is None:
            return
        counts = SubOperations(len(items))
        for item in items:
            if assoc.cancel_requested(command.message_id):
                _respond(assoc, context, C_GET_RSP, command, CANCELLED, counts=counts)
                return
            counts.add(_get_one(assoc, item), item.sop_instance_uid)
            if counts.remaining:
                _respond(assoc, context, C_GET_RSP, command, PENDING, counts=counts)
        status, identifier = counts.final_status()
        log.info("C-GET from %s: %d completed, %d failed, %d warning", assoc,
                 counts.completed, counts.failed, counts.warning)
        _respond(assoc, context, C_GET_RSP, command, status, identifier, counts=counts)

    return service


def _get_one(assoc: Association, item: RetrieveItem) -> str:
    """One C-STORE sub-operation of a C-GET; its status as ok, warning or failed."""
    store_context, convert = _get_context(assoc, item)
    if store_context is None:
        log.warning("C-GET: %s accepted no context for %s in %s", assoc, item.sop_class_uid,
                    item.transfer_syntax)
        return "failed"
    message_id = assoc.next_message_id()
    command = encode_command(
        CommandField=C_STORE_RQ, AffectedSOPClassUID=item.sop_class_uid, MessageID=message_id,
        Priority=0, CommandDataSetType=HAS_DATASET, AffectedSOPInstanceUID=item.sop_instance_uid)
    try:  # everything that can fail with the file, before anything is sent
        if convert:
            dataset: bytes | OutgoingDataset = _convert(item, store_context.transfer_syntax)
        else:
            dataset = assoc.open_dataset(store_context.id, DatasetFile(item.path))
    except Exception as exc:  # pydicom raises many kinds on a file it cannot convert
        log.error("C-GET: cannot %s %s: %s", "convert" if convert else "read", item.path,
                  getattr(exc, "message", None) or f"{type(exc).__name__}: {exc}")
        return "failed"
    try:
        assoc.send_message(store_context.id, command, dataset)  # streamed, never decoded
    except OSError as exc:  # the file ended early, or the peer went away: the message is cut
        assoc.abort()
        raise AssociationClosed(f"C-GET sub-operation for {item.path} cut short: {exc}") from exc
    while True:
        message = assoc.receive_message()
        if message is None:
            raise AssociationClosed("the peer released the association during a C-GET")
        _, response, extra = message
        if extra is not None:
            extra.discard()
        if not assoc.note_cancel(response):  # a C-CANCEL may come before the response
            break
    if response.field != C_STORE_RSP or response.number("MessageIDBeingRespondedTo") != message_id:
        raise AssociationClosed(f"expected the C-STORE response, got command 0x{response.field:04x}")
    status = response.number("Status")
    if status == SUCCESS:
        return "ok"
    return "warning" if status in (0xB000, 0xB006, 0xB007) else "failed"
