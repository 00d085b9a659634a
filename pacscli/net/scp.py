"""`pacs serve`: the SCP over the archive. Handlers are plain functions bound with their
arguments (pynetdicom's event-handler design); every stored instance goes through
`Archive.put`, the archive's single insert path."""

from __future__ import annotations

import logging
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from pydicom.uid import AllTransferSyntaxes
from pynetdicom import _config, evt
from pynetdicom.sop_class import Verification
from pynetdicom.transport import ThreadedAssociationServer

from pacscli.archive.archive import Archive
from pacscli.config import Settings
from pacscli.errors import InvalidDicomError, OutOfResourcesError, PacsError
from pacscli.net.ae import NODELAY_HANDLER, make_ae
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
        # (same filesystem), never whole in memory. pynetdicom's chunked receive writes to
        # tempfile's folder, which is process-wide: serve owns its process.
        _config.STORE_RECV_CHUNKED_DATASET = True
        tempfile.tempdir = str(archive.staging)
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
        while self._server.active_associations and time.monotonic() < deadline:
            time.sleep(0.05)
        for assoc in self._server.active_associations:
            log.warning("aborting association with %s at shutdown", assoc.requestor.ae_title)
            assoc.abort()
        self._server = None


def _log_rejected(event: evt.Event) -> None:
    requestor = event.assoc.requestor
    log.warning("rejected association from %s@%s (called %s)", requestor.ae_title,
                requestor.address, event.assoc.acceptor.ae_title)


def wait_forever(stop: threading.Event) -> None:
    """Block until `stop` is set (signal handlers set it)."""
    while not stop.wait(0.5):
        pass
