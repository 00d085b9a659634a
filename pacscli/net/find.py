"""C-FIND against a remote: the core of `pacs find REMOTE`.

Yields one record per match as it arrives (the same records `pacs find --archive` gives for
the same query); never prints or exits. A failure yields a `status: failed` record, then
raises its PacsError (NetworkError: exit 3, PeerFailure: exit 4).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from typing import Any

from pydicom.dataset import Dataset
from pynetdicom.pdu_primitives import SOPClassExtendedNegotiation
from pynetdicom.presentation import build_context

from pacscli.config import Remote, Settings
from pacscli.dicom.query import (
    QR_MODELS,
    UNIQUE_KEYS,
    Query,
    dataset_record,
    identifier_record,
    level_identifier,
    levels_of,
    record_text,
    relational_levels,
    value_text,
)
from pacscli.errors import NetworkError, PacsError, UsageError
from pacscli.net.ae import Watch, abort, associate, make_ae, release, requestor_tls
from pacscli.net.qr import CANCEL, PENDING, failure, lost
from pacscli.records import Record, failed

log = logging.getLogger(__name__)

# Responses read after a C-CANCEL before giving up on a peer that ignores it.
_DRAIN_AFTER_CANCEL = 1000


def find_negotiation(sop_class: str, *, relational: bool,
                     fuzzy: bool) -> SOPClassExtendedNegotiation:
    """C-FIND extended negotiation (PS3.4 C.4.1.1.1, C.5.1.1.1): relational queries and
    fuzzy semantic matching of person names asked for or not, combined date-time not."""
    item = SOPClassExtendedNegotiation()
    item.sop_class_uid = sop_class
    item.service_class_application_information = bytes([int(relational), 0, int(fuzzy)])
    return item


def _agreed(info: bytes | None, byte: int) -> bool:
    """Did the peer's answer to our extended negotiation set option `byte` (0: relational
    queries, 2: fuzzy matching)?"""
    return info is not None and len(info) > byte and info[byte] == 1


def find(settings: Settings, remote: Remote, query: Query, *, limit: int | None = None,
         case_insensitive_names: bool = False) -> Iterator[Record]:
    """C-FIND `query` at `remote`: one record per match, keys in the query's order.

    `limit` stops after that many matches (a C-CANCEL tells the peer). With
    `case_insensitive_names` we ask for fuzzy person name matching by extended negotiation; a
    peer that does not agree matches names as it always does (logged as a warning).

    A query that matches on keys of a level above its own (a series query by PatientID) is
    relational: peers that do not agree to relational queries ignore such keys (PS3.4
    C.4.1.2.1) and would answer too much, so the levels are then queried one by one, each
    match of one level giving the unique key of the next.
    """
    if limit is not None and limit < 1:
        raise UsageError(f"--limit must be 1 or more, not {limit}")
    sop_class = QR_MODELS[query.model]["find"]
    upper = relational_levels(query)
    relational = bool(upper)
    ext_neg = ([find_negotiation(sop_class, relational=relational, fuzzy=case_insensitive_names)]
               if relational or case_insensitive_names else None)
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
    agreed = assoc.acceptor.sop_class_extended.get(sop_class)
    if case_insensitive_names and not _agreed(agreed, 2):
        log.warning("%s did not agree to fuzzy person name matching: it matches names as it "
                    "does by default (often case-sensitively)", remote)
    search = _Search(assoc, sop_class, remote, watch, float(ae.dimse_timeout or 0), limit)
    error: PacsError | None = None
    try:
        if relational and not _agreed(agreed, 0):
            log.info("%s did not agree to relational queries: querying level by level", remote)
            yield from search.walk(query, upper[0])
        else:
            for found in search.responses(query.identifier):
                yield identifier_record(found, query.order)
    except PacsError as exc:
        error = exc
    except BaseException:
        abort(assoc)
        raise
    finally:
        release(assoc)
    if error is not None:
        yield failed(error, **base)
        raise error


class _Search:
    """The C-FINDs of one `find` on one association, sharing its limit."""

    def __init__(self, assoc: Any, sop_class: str, remote: Remote, watch: Watch, timeout: float,
                 limit: int | None) -> None:
        self.assoc, self.sop_class, self.remote = assoc, sop_class, remote
        self.watch, self.timeout = watch, timeout
        self.left = limit  # matches still wanted; None: all
        self.msg_id = 0

    def responses(self, identifier: Dataset, *, final: bool = True) -> Iterator[Dataset]:
        """The identifiers of one C-FIND's pending responses. Matches of the query's own
        level (`final`) count towards the limit; reaching it sends a C-CANCEL. Raises
        PacsError for a failure status or a lost association."""
        self.msg_id += 1
        msg_id, assoc, remote = self.msg_id, self.assoc, self.remote
        cancelled, drained = False, 0
        started = time.monotonic()
        for status, found in assoc.send_c_find(identifier, self.sop_class, msg_id=msg_id):
            if "Status" not in status:
                raise lost(self.watch, remote, "C-FIND", started, self.timeout)
            code = int(status.Status)
            if code in PENDING:
                if cancelled:
                    drained += 1
                    if drained > _DRAIN_AFTER_CANCEL:
                        log.warning("%s ignores C-CANCEL: aborting the association", remote)
                        assoc.abort()
                        return
                    continue
                if found is not None and (self.left is None or self.left > 0):
                    yield found
                    if final and self.left is not None:
                        self.left -= 1
                if self.left is not None and self.left <= 0:
                    assoc.send_c_cancel(msg_id, query_model=self.sop_class)
                    cancelled = True
                started = time.monotonic()
                continue
            if code == 0x0000 or (code == CANCEL and cancelled):
                return
            if code == 0xB001:
                log.warning("%s reached its response limit: there may be more matches", remote)
                return
            raise failure(status, "C-FIND", remote, code="find-failed")

    def walk(self, query: Query, start: str) -> Iterator[Record]:
        """The records of `query` asked level by level, from `start` (the highest level it
        matches on) down, each with the values its parents gave for their levels' keys. The
        levels above `start` are left to the unique keys the query gives them, if any."""
        levels = levels_of(query.model, query.level)
        given: Record = {}
        for above in levels[:levels.index(start)]:
            key = UNIQUE_KEYS[above]
            text = value_text(query.identifier[key].value) if key in query.identifier else None
            if text:
                given[key] = text
        yield from self._walk(query, levels[levels.index(start):], given)

    def _walk(self, query: Query, levels: list[str], parent: Record) -> Iterator[Record]:
        level = levels[0]
        identifier = level_identifier(query, level, parent)
        if level == query.level:
            for found in self.responses(identifier):
                record = identifier_record(found, query.order)
                for key, value in parent.items():
                    if record.get(key) is None and key in query.order:
                        record[key] = value
                yield record
            return
        # Read to the end before the next C-FIND: pynetdicom runs one operation at a time
        # on an association, and would take this one's responses for the next one's.
        matches = [dataset_record(found) for found in self.responses(identifier, final=False)]
        for found in matches:
            if self.left is not None and self.left <= 0:
                return
            child = {**parent, **{k: v for k, v in found.items() if v is not None}}
            if record_text(child, UNIQUE_KEYS[level]) is None:
                log.warning("%s returned a %s without its %s: its %s are not queried",
                            self.remote, level.lower(), UNIQUE_KEYS[level], levels[1].lower())
                continue
            yield from self._walk(query, levels[1:], child)
