"""`pacs serve`: the SCP over the archive. Handlers are plain functions bound with their
arguments (pynetdicom's event-handler design); every stored instance goes through
`Archive.put`, the archive's single insert path."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from pydicom.uid import AllTransferSyntaxes
from pynetdicom import evt
from pynetdicom.sop_class import Verification
from pynetdicom.transport import ThreadedAssociationServer

from pacscli.archive.archive import Archive
from pacscli.config import Settings
from pacscli.errors import InvalidDicomError, OutOfResourcesError, PacsError
from pacscli.net.ae import NODELAY_HANDLER, make_ae
from pacscli.net.receive import install_staging_receiver, receive_error
from pacscli.net.sop_classes import storage_sop_classes
from pacscli.records import Record, failed

log = logging.getLogger(__name__)

# DIMSE statuses of C-STORE (PS3.4 B.2.3)
STATUS_SUCCESS = 0x0000
STATUS_OUT_OF_RESOURCES = 0xA700
STATUS_CANNOT_UNDERSTAND = 0xC000
STATUS_PROCESSING_FAILURE = 0x0110

RecordSink = Callable[[Record], None]


def _peer(event: evt.Event) -> str:
    requestor = event.assoc.requestor
    return f"{requestor.ae_title}@{requestor.address}:{requestor.port}"


def handle_store(event: evt.Event, archive: Archive, emit: RecordSink) -> int:
    """EVT_C_STORE: put the received file into the archive; answer only once it is indexed."""
    calling = str(event.assoc.requestor.ae_title).strip()
    base: Record = {"remote": _peer(event),
                    "SOPInstanceUID": str(event.request.AffectedSOPInstanceUID or "").strip()}
    try:
        error = receive_error(event.request)
        if error is not None:
            raise OutOfResourcesError(f"cannot receive into the archive: {error.strerror or error}")
        result = archive.put(Path(event.dataset_path), source_aet=calling, rewrite_meta=True)
    except OutOfResourcesError as exc:
        log.error("out of resources storing %s: %s", base["SOPInstanceUID"], exc.message)
        emit(failed(exc, **base, dimse_status=STATUS_OUT_OF_RESOURCES))
        return STATUS_OUT_OF_RESOURCES
    except InvalidDicomError as exc:
        log.warning("refused %s from %s: %s", base["SOPInstanceUID"], calling, exc.message)
        emit(failed(exc, **base, dimse_status=STATUS_CANNOT_UNDERSTAND))
        return STATUS_CANNOT_UNDERSTAND
    except PacsError as exc:
        log.error("cannot store %s: %s", base["SOPInstanceUID"], exc.message)
        emit(failed(exc, **base, dimse_status=STATUS_OUT_OF_RESOURCES))
        return STATUS_OUT_OF_RESOURCES
    emit({**result.record(), "remote": base["remote"], "dimse_status": STATUS_SUCCESS})
    return STATUS_SUCCESS


class DicomServer:
    """The DICOM SCP of `pacs serve`: C-ECHO and C-STORE over one archive."""

    def __init__(self, settings: Settings, archive: Archive, emit: RecordSink) -> None:
        self.settings = settings
        self.archive = archive
        self.emit = emit
        self._server: ThreadedAssociationServer | None = None
        # Receive each dataset in chunks straight to a file in the archive's staging folder
        # (same filesystem), never whole in memory.
        install_staging_receiver(archive.staging)
        self.ae = make_ae(settings)
        serve = settings.serve
        self.ae.maximum_associations = serve.max_associations
        self.ae.require_called_aet = serve.require_called_aet
        if serve.allow:
            self.ae.require_calling_aet = list(serve.allow)
        syntaxes = list(AllTransferSyntaxes)
        self.ae.add_supported_context(Verification, syntaxes)
        for sop_class in storage_sop_classes():
            self.ae.add_supported_context(sop_class, syntaxes)

    def start(self, bind: str, port: int) -> tuple[str, int]:
        """Start listening in the background; return the bound address."""
        handlers: list[Any] = [
            NODELAY_HANDLER,
            (evt.EVT_C_STORE, handle_store, [self.archive, self.emit]),
            (evt.EVT_REJECTED, _log_rejected),
            (evt.EVT_ACSE_RECV, prefer_requestor_order),
        ]
        try:
            self._server = self.ae.start_server((bind, port), block=False, evt_handlers=handlers)
        except OSError as exc:
            from pacscli.errors import UsageError

            raise UsageError(f"cannot listen on {bind or '*'}:{port}: {exc.strerror or exc}") from exc
        host, bound_port = self._server.server_address[:2]
        return str(host), int(bound_port)

    def active_associations(self) -> int:
        """How many associations are in progress."""
        return len(self._server.active_associations) if self._server else 0

    def stop(self, grace: float = 12.0) -> None:
        """Stop accepting, let in-flight associations finish for up to `grace` s, then abort."""
        if self._server is None:
            return
        self._server.shutdown()
        deadline = time.monotonic() + grace
        # Wait for associations with transfers in flight; one still negotiating (or a bare
        # TCP probe, which pynetdicom keeps until its ACSE timeout) has nothing to lose.
        while time.monotonic() < deadline and any(
                a.is_established for a in self._server.active_associations):
            time.sleep(0.05)
        for assoc in self._server.active_associations:
            if assoc.is_established:
                log.warning("aborting association with %s at shutdown", assoc.requestor.ae_title)
                assoc.abort()
            assoc.dul.kill_dul()  # its thread is not a daemon: it would hold the exit
        self._server = None


def prefer_requestor_order(event: evt.Event) -> None:
    """EVT_ACSE_RECV: accept, of the syntaxes a sender proposes, the first it lists.

    pynetdicom picks by the acceptor's order; a PACS should keep what the modality encoded,
    so before negotiation this association's copy of our contexts is reordered to follow
    the request's order.
    """
    primitive = event.primitive
    requested = getattr(primitive, "presentation_context_definition_list", None)
    if not requested or getattr(primitive, "result", None) is not None:
        return  # not an A-ASSOCIATE request
    wanted: dict[str, list[str]] = {}
    for context in requested:
        order = wanted.setdefault(str(context.abstract_syntax), [])
        order.extend(str(ts) for ts in context.transfer_syntax if str(ts) not in order)
    for context in event.assoc.acceptor.supported_contexts:
        order = wanted.get(str(context.abstract_syntax), [])
        if order:
            ours = list(context.transfer_syntax)
            first = [ts for ts in ours if ts in order]
            first.sort(key=order.index)
            context._transfer_syntax = first + [ts for ts in ours if ts not in order]


def _log_rejected(event: evt.Event) -> None:
    requestor = event.assoc.requestor
    log.warning("rejected association from %s@%s (called %s)", requestor.ae_title,
                requestor.address, event.assoc.acceptor.ae_title)


def wait_forever(stop: threading.Event) -> None:
    """Block until `stop` is set (signal handlers set it)."""
    while not stop.wait(0.5):
        pass
