"""`pacs serve`: the services of the SCP over the archive, on our association server.

Each service is a plain function bound with what it needs (pynetdicom's event-handler
design): it answers one DIMSE message. Every stored instance goes through the archive's
single insert path (`Archive.put_received`).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator

from pydicom.uid import AllTransferSyntaxes

from pacscli.archive.archive import Archive, IncomingInstance
from pacscli.archive.query import RetrieveItem
from pacscli.config import Settings
from pacscli.errors import InvalidDicomError, OutOfResourcesError, PacsError, UsageError
from pacscli.net.dimse import (
    C_ECHO_RQ,
    C_ECHO_RSP,
    C_FIND_RQ,
    C_GET_RQ,
    C_MOVE_RQ,
    C_STORE_RQ,
    C_STORE_RSP,
    NO_DATASET,
    Command,
    encode_command,
)
from pacscli.net.scp_qr import (
    FIND_EXTENDED,
    MODELS,
    QR_TRANSFER_SYNTAXES,
    handle_find,
    handle_get,
    handle_move,
)
from pacscli.net.server import (
    Association,
    AssociationServer,
    Context,
    DatasetSink,
    ReceivedDataset,
    ServerConfig,
    Service,
    SinkFactory,
)
from pacscli.net.sop_classes import storage_sop_classes
from pacscli.net.tls import server_context
from pacscli.records import Record, failed

log = logging.getLogger(__name__)

VERIFICATION = "1.2.840.10008.1.1"

# DIMSE statuses of C-STORE (PS3.4 B.2.3)
STATUS_SUCCESS = 0x0000
STATUS_OUT_OF_RESOURCES = 0xA700
STATUS_CANNOT_UNDERSTAND = 0xC000

RecordSink = Callable[[Record], None]


def handle_echo(assoc: Association, context: Context, command: Command,
                dataset: ReceivedDataset | None) -> None:
    """C-ECHO: answer success."""
    assoc.send_message(context.id, encode_command(
        CommandField=C_ECHO_RSP, AffectedSOPClassUID=command.get("AffectedSOPClassUID", VERIFICATION),
        MessageIDBeingRespondedTo=command.message_id, CommandDataSetType=NO_DATASET,
        Status=STATUS_SUCCESS))


def store_received(archive: Archive, assoc: Association, context: Context, command: Command,
                   dataset: ReceivedDataset | None) -> tuple[int, Record]:
    """Put a received C-STORE dataset into the archive; return the status and the record.

    Success is answered only once the file is in place and indexed; a disk full or I/O
    error is 0xA700 with nothing half-written; a dataset we cannot use, 0xC000.
    """
    base: Record = {"remote": str(assoc), "SOPInstanceUID": command.get("AffectedSOPInstanceUID"),
                    "outcome": "failed"}  # a success's record has its own outcome
    try:
        if dataset is None:
            raise InvalidDicomError("C-STORE request without a dataset")
        if dataset.error is not None:
            raise OutOfResourcesError(
                f"cannot receive into the archive: {dataset.error.strerror or dataset.error}")
        receiving = dataset.sink if isinstance(dataset.sink, IncomingInstance) else None
        result = archive.put_received(dataset.content(), transfer_syntax=context.transfer_syntax,
                                      source_aet=assoc.calling_aet, receiving=receiving)
    except OutOfResourcesError as exc:
        log.error("out of resources storing %s: %s", base["SOPInstanceUID"], exc.message)
        return STATUS_OUT_OF_RESOURCES, failed(exc, **base, dimse_status=STATUS_OUT_OF_RESOURCES)
    except InvalidDicomError as exc:
        log.warning("refused %s from %s: %s", base["SOPInstanceUID"], assoc, exc.message)
        return STATUS_CANNOT_UNDERSTAND, failed(exc, **base, dimse_status=STATUS_CANNOT_UNDERSTAND)
    except PacsError as exc:
        log.error("cannot store %s: %s", base["SOPInstanceUID"], exc.message)
        return STATUS_OUT_OF_RESOURCES, failed(exc, **base, dimse_status=STATUS_OUT_OF_RESOURCES)
    return STATUS_SUCCESS, {**result.record(), "remote": base["remote"], "dimse_status": STATUS_SUCCESS}


def handle_store(archive: Archive, emit: RecordSink) -> Service:
    """The C-STORE service over `archive`."""

    def service(assoc: Association, context: Context, command: Command,
                dataset: ReceivedDataset | None) -> None:
        status, record = store_received(archive, assoc, context, command, dataset)
        assoc.send_message(context.id, encode_command(
            CommandField=C_STORE_RSP, AffectedSOPClassUID=command.get("AffectedSOPClassUID"),
            MessageIDBeingRespondedTo=command.message_id, CommandDataSetType=NO_DATASET,
            Status=status, AffectedSOPInstanceUID=command.get("AffectedSOPInstanceUID")))
        # What the answer need not wait for, done while the sender sends the next instance.
        emit(record)
        if status == STATUS_SUCCESS:
            archive.prepare_staging()  # for the next instance, in place of the file just used

    return service


def receive_into_archive(archive: Archive) -> SinkFactory:
    """Write each C-STORE dataset into an archive staging file while it arrives (see
    `Archive.begin_received`); other messages' datasets stay in memory only."""

    def sink(assoc: Association, context: Context, command: Command) -> DatasetSink | None:
        if command.field != C_STORE_RQ:
            return None
        return archive.begin_received(
            sop_class_uid=command.get("AffectedSOPClassUID"),
            sop_uid=command.get("AffectedSOPInstanceUID"),
            transfer_syntax=context.transfer_syntax, source_aet=assoc.calling_aet)

    return sink


def send_for_move(settings: Settings, destination_aet: str,
                  items: list[RetrieveItem]) -> Iterator[Record]:
    """C-MOVE sub-operations: `pacs store`'s SCU sends the instances to the destination."""
    from pacscli.net.store import store

    remote = settings.remote_by_ae_title(destination_aet)
    assert remote is not None  # checked by the C-MOVE service
    yield from store(settings, remote, ({"path": str(item.path)} for item in items))


class DicomServer:
    """The DICOM SCP of `pacs serve` over one archive: C-ECHO, C-STORE (every storage SOP
    class, every transfer syntax pydicom knows), and C-FIND/C-MOVE/C-GET (Patient Root and
    Study Root)."""

    def __init__(self, settings: Settings, archive: Archive, emit: RecordSink) -> None:
        syntaxes = frozenset(str(ts) for ts in AllTransferSyntaxes)
        supported = {VERIFICATION: syntaxes}
        supported.update({str(uid): syntaxes for uid in storage_sop_classes()})
        net, serve = settings.network, settings.serve
        config = ServerConfig(
            ae_title=settings.ae_title, supported=supported, max_pdu=net.max_pdu,
            allow=serve.allow, require_called_aet=serve.require_called_aet,
            max_associations=serve.max_associations, acse_timeout=net.acse_timeout,
            network_timeout=net.network_timeout,
            tls=server_context(settings) if serve.tls else None,
            extended=FIND_EXTENDED,
        )
        supported.update({uid: QR_TRANSFER_SYNTAXES for uid in MODELS})
        services: dict[int, Service] = {
            C_ECHO_RQ: handle_echo,
            C_STORE_RQ: handle_store(archive, emit),
            C_FIND_RQ: handle_find(settings, archive),
            C_MOVE_RQ: handle_move(settings, archive, send_for_move),
            C_GET_RQ: handle_get(settings, archive),
        }
        self.server = AssociationServer(config, services, archive.staging,
                                        dataset_sink=receive_into_archive(archive))

    def start(self, bind: str, port: int) -> tuple[str, int]:
        """Start listening in the background; return the bound address."""
        try:
            return self.server.start(bind, port)
        except OSError as exc:
            raise UsageError(f"cannot listen on {bind or '*'}:{port}: {exc.strerror or exc}") from exc

    def stop(self, grace: float = 12.0) -> None:
        """Stop accepting, let in-flight associations finish, then abort the rest."""
        self.server.stop(grace)
