"""C-FIND against a remote: the core of `pacs find REMOTE`.

Yields one record per match as it arrives (the same records `pacs find --archive` gives for
the same query); never prints or exits. A failure yields a `status: failed` record, then
raises its PacsError (NetworkError: exit 3, PeerFailure: exit 4).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator

from pynetdicom.pdu_primitives import SOPClassExtendedNegotiation
from pynetdicom.presentation import build_context

from pacscli.config import Remote, Settings
from pacscli.dicom.query import QR_MODELS, Query, identifier_record
from pacscli.errors import NetworkError, PacsError, UsageError
from pacscli.net.ae import Watch, abort, associate, make_ae, release, requestor_tls
from pacscli.net.qr import CANCEL, PENDING, failure, lost
from pacscli.records import Record, failed

log = logging.getLogger(__name__)

# Responses read after a C-CANCEL before giving up on a peer that ignores it.
_DRAIN_AFTER_CANCEL = 1000


def fuzzy_names_negotiation(sop_class: str) -> SOPClassExtendedNegotiation:
    """C-FIND extended negotiation (PS3.4 C.5.1.1.1) asking for fuzzy semantic matching of
    person names: relational queries no, combined date-time no, fuzzy matching yes."""
    item = SOPClassExtendedNegotiation()
    item.sop_class_uid = sop_class
    item.service_class_application_information = bytes([0, 0, 1])
    return item


def _fuzzy_accepted(info: bytes | None) -> bool:
    return bool(info) and len(info or b"") >= 3 and (info or b"")[2] == 1


def find(settings: Settings, remote: Remote, query: Query, *, limit: int | None = None,
         case_insensitive_names: bool = False) -> Iterator[Record]:
    """C-FIND `query` at `remote`: one record per match, keys in the query's order.

    `limit` stops after that many matches (a C-CANCEL tells the peer). With
    `case_insensitive_names` we ask for fuzzy person name matching by extended negotiation; a
    peer that does not agree matches names as it always does (logged as a warning).
    """
    if limit is not None and limit < 1:
        raise UsageError(f"--limit must be 1 or more, not {limit}")
    sop_class = QR_MODELS[query.model]["find"]
    ext_neg = [fuzzy_names_negotiation(sop_class)] if case_insensitive_names else None
    ae = make_ae(settings)
    watch = Watch()
    base: Record = {"QueryRetrieveLevel": query.level, "remote": str(remote)}
    try:
        assoc = associate(ae, remote, contexts=[build_context(sop_class)], ext_neg=ext_neg,
                          evt_handlers=watch.handlers(),
                          tls=requestor_tls(settings, remote))
    except NetworkError as exc:
        yield failed(exc, **base)
        raise
    if case_insensitive_names and not _fuzzy_accepted(
            assoc.acceptor.sop_class_extended.get(sop_class)):
        log.warning("%s did not agree to fuzzy person name matching: it matches names as it "
                    "does by default (often case-sensitively)", remote)
    error: PacsError | None = None
    timeout = float(ae.dimse_timeout or 0)
    produced = drained = 0
    cancelled = False
    try:
        started = time.monotonic()
        for status, identifier in assoc.send_c_find(query.identifier, sop_class, msg_id=1):
            if "Status" not in status:
                error = lost(watch, remote, "C-FIND", started, timeout)
                break
            code = int(status.Status)
            if code in PENDING:
                if cancelled:
                    drained += 1
                    if drained > _DRAIN_AFTER_CANCEL:
                        log.warning("%s ignores C-CANCEL: aborting the association", remote)
                        assoc.abort()
                        break
                    continue
                if identifier is not None:
                    yield identifier_record(identifier, query.order)
                    produced += 1
                if limit is not None and produced >= limit:
                    assoc.send_c_cancel(1, query_model=sop_class)
                    cancelled = True
                started = time.monotonic()
                continue
            if code == 0x0000 or (code == CANCEL and cancelled):
                break
            if code == 0xB001:
                log.warning("%s reached its response limit: there may be more matches", remote)
                break
            error = failure(status, "C-FIND", remote, code="find-failed")
            break
    except BaseException:
        abort(assoc)
        raise
    finally:
        release(assoc)
    if error is not None:
        yield failed(error, **base)
        raise error
