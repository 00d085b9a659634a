"""What the Query/Retrieve SCUs (`find`, `move`, `get`) share: statuses in words, how an
association went away, retrieve requests built from records or UIDs, and the C-FIND that
completes a request's parent UIDs for a hierarchical peer."""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field

from pydicom.dataset import Dataset
from pynetdicom import Association
from pynetdicom.status import (
    QR_FIND_SERVICE_CLASS_STATUS,
    QR_GET_SERVICE_CLASS_STATUS,
    QR_MOVE_SERVICE_CLASS_STATUS,
)

from pacscli.config import Remote
from pacscli.dicom.query import LEVELS, QR_MODELS, UNIQUE_KEYS, normalize_level, record_text
from pacscli.errors import NetworkError, PacsError, PeerFailure, UsageError
from pacscli.net.ae import Watch
from pacscli.records import Record, failed

log = logging.getLogger(__name__)

PENDING = (0xFF00, 0xFF01)
CANCEL = 0xFE00
_STATUS_TABLES = {"C-FIND": QR_FIND_SERVICE_CLASS_STATUS, "C-MOVE": QR_MOVE_SERVICE_CLASS_STATUS,
                  "C-GET": QR_GET_SERVICE_CLASS_STATUS}


def status_text(code: int, service: str) -> str:
    """'0xA801 (Move destination unknown)'."""
    meaning = _STATUS_TABLES[service].get(code, ("", "unknown status"))[1]
    return f"0x{code:04X} ({meaning})"


class StatusFailure(PeerFailure):
    """The peer answered a request with a failure status (`dimse_status`)."""

    def __init__(self, message: str, *, code: str, dimse_status: int) -> None:
        super().__init__(message, code=code)
        self.dimse_status = dimse_status


def failure(status: Dataset, service: str, remote: Remote, *, code: str) -> StatusFailure:
    """The StatusFailure of a failure status, with the peer's Error Comment when it gave one."""
    value = int(status.Status)
    comment = str(status.get("ErrorComment", "") or "").strip()
    text = f"{remote} answered {service} with failure status {status_text(value, service)}"
    return StatusFailure(text + (f": {comment}" if comment else ""), code=code,
                         dimse_status=value)


def outcome(final: Dataset, counts: dict[str, int | None], failed_list: list[str],
            remote: Remote, service: str) -> Record:
    """The outcome fields of a C-MOVE or C-GET record from its final status and sub-operation
    counts: status, dimse_status, completed, failed, warning (and failed_sop_instances, error).

    Raises StatusFailure for a failure status. A success that moved nothing is a failed record
    (nothing-matched); failed sub-operations make it failed too, warnings a warning."""
    code = int(final.Status)
    done = {k: counts.get(k) or 0 for k in ("completed", "failed", "warning")}
    record: Record = {"status": "ok", "dimse_status": code, **done}
    if failed_list:
        record["failed_sop_instances"] = failed_list
    if code not in (0x0000, CANCEL) and not 0xB000 <= code <= 0xBFFF:
        raise failure(final, service, remote, code=f"{service[2:].lower()}-failed")
    total = sum(done.values())
    if code == CANCEL:
        record.update(status="failed", error={"code": "cancelled",
                                              "message": f"{remote} cancelled the {service}"})
    elif done["failed"]:
        record.update(status="failed", error={
            "code": "sub-operations-failed",
            "message": f"{done['failed']} of {total} sub-operations failed "
                       f"({status_text(code, service)})"})
    elif code == 0x0000 and counts.get("completed") == 0 and not done["warning"]:
        record.update(status="failed", error={
            "code": "nothing-matched", "message": f"{remote} found nothing to send for this request"})
    elif done["warning"] or code != 0x0000:
        record["status"] = "warning"
    return record


def failed_instances(response: Dataset | None) -> list[str]:
    """The Failed SOP Instance UID List of a final C-MOVE/C-GET response."""
    if response is None or "FailedSOPInstanceUIDList" not in response:
        return []
    value = response.FailedSOPInstanceUIDList
    values = value if isinstance(value, list | tuple) or type(value).__name__ == "MultiValue" \
        else [value]
    return [str(v) for v in values if str(v)]


def lost(watch: Watch, remote: Remote, service: str, started: float, timeout: float) -> NetworkError:
    """The error for a request that came back without a status."""
    waited = time.monotonic() - started
    ended = watch.why_ended()
    # Our own abort on the DIMSE timeout closes the connection too: a close after the
    # timeout is ours, a peer's A-ABORT is the peer's whenever it came.
    if ended is not None and (ended[0] == "association-aborted" or not timeout
                              or waited < timeout * 0.95):
        code, words = ended
        return NetworkError(f"{remote}: {words} during {service}", code=code)
    if timeout and waited >= timeout * 0.95:
        return NetworkError(f"no {service} response from {remote} within {timeout:g} s "
                            "(DIMSE timeout); the association was aborted", code="dimse-timeout")
    return NetworkError(f"{remote} sent an invalid {service} response", code="invalid-response")


def sub_operations(status: Dataset) -> dict[str, int | None]:
    """The sub-operation counts of a C-MOVE or C-GET response (None when not given)."""
    def count(keyword: str) -> int | None:
        value = status.get(keyword)
        return int(value) if value is not None and value != "" else None

    return {"remaining": count("NumberOfRemainingSuboperations"),
            "completed": count("NumberOfCompletedSuboperations"),
            "failed": count("NumberOfFailedSuboperations"),
            "warning": count("NumberOfWarningSuboperations")}


# --- retrieve requests ------------------------------------------------------------------------

_UID_KEYS = ("PatientID", "StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID")


@dataclass
class RetrieveRequest:
    """One C-MOVE or C-GET: a level and the unique keys of it and of the levels above."""

    level: str
    uids: dict[str, str] = field(default_factory=dict)
    sop_class_uid: str | None = None  # a hint for C-GET's storage contexts

    def identifier(self, model: str) -> Dataset:
        """The request identifier: QueryRetrieveLevel and the unique keys the model uses."""
        ds = Dataset()
        ds.QueryRetrieveLevel = self.level
        for keyword in self.keys(model):
            if keyword in self.uids:
                setattr(ds, keyword, self.uids[keyword])
        return ds

    def keys(self, model: str) -> list[str]:
        """The unique keys of this level and those above, as the model's hierarchy has them."""
        levels = LEVELS[:LEVELS.index(self.level) + 1]
        return [UNIQUE_KEYS[lv] for lv in levels
                if not (lv == "PATIENT" and model == "study" and self.level != "PATIENT")]

    def missing(self, model: str) -> list[str]:
        """Unique keys of the levels above that a hierarchical peer needs and we lack."""
        return [k for k in self.keys(model) if k not in self.uids]

    def fields(self) -> Record:
        """The request's part of its result record."""
        record: Record = {"QueryRetrieveLevel": self.level}
        record.update({k: self.uids[k] for k in _UID_KEYS if k in self.uids})
        return record


def requests_from_records(records: Iterable[Record], level: str | None = None
                          ) -> Iterator[RetrieveRequest | Record]:
    """Retrieve requests from JSON-lines records (`pacs find` results, `store` or `get`
    records...): each record's QueryRetrieveLevel (or `level`, e.g. whole studies from series
    records; else the lowest level whose UID it has) and its UIDs. A record without the UID
    of its level becomes a failed record; repeats are dropped, and failed records skipped."""
    wanted = normalize_level(level) if level else None
    seen: set[tuple[str, str]] = set()
    for number, record in enumerate(records, start=1):
        if record.get("status") == "failed":
            log.info("input record %d failed upstream: skipped", number)
            continue
        uids = {k: v for k in _UID_KEYS if (v := record_text(record, k)) is not None}
        try:
            lvl = wanted or (normalize_level(str(record["QueryRetrieveLevel"]))
                             if record.get("QueryRetrieveLevel") else _lowest(uids))
        except UsageError as exc:
            yield failed(exc, input=number)
            continue
        if lvl is None or UNIQUE_KEYS[lvl] not in uids:
            key = UNIQUE_KEYS[lvl] if lvl else "StudyInstanceUID, SeriesInstanceUID or " \
                "SOPInstanceUID"
            # a line that is not JSON comes as a path (what `pacs store` takes)
            plain = f" (not a JSON record: {record['path']!r})" if set(record) == {"path"} else ""
            yield failed(UsageError(f"input record {number} has no {key} to retrieve{plain}",
                                    code="bad-input"), input=number, **uids)
            continue
        keep = {UNIQUE_KEYS[lv] for lv in LEVELS[:LEVELS.index(lvl) + 1]}
        uids = {k: v for k, v in uids.items() if k in keep}
        identity = (lvl, uids[UNIQUE_KEYS[lvl]])
        if identity in seen:
            continue
        seen.add(identity)
        sop_class = record_text(record, "SOPClassUID") if lvl == "IMAGE" else None
        yield RetrieveRequest(lvl, uids, sop_class)


def _lowest(uids: dict[str, str]) -> str | None:
    for lvl in reversed(LEVELS):
        if UNIQUE_KEYS[lvl] in uids:
            return lvl
    return None


def requests_from_uids(*, patients: Sequence[str] = (), studies: Sequence[str] = (),
                       series: Sequence[str] = (), instances: Sequence[str] = ()
                       ) -> list[RetrieveRequest]:
    """Requests from `--patient/--study/--series/--instance` options: one per UID of the lowest
    level given; a single UID of a level above names their parent."""
    given = [("PATIENT", list(patients)), ("STUDY", list(studies)), ("SERIES", list(series)),
             ("IMAGE", list(instances))]
    present = [(lvl, uids) for lvl, uids in given if uids]
    if not present:
        return []
    level, uids = present[-1]
    parents: dict[str, str] = {}
    for lvl, values in present[:-1]:
        if len(values) > 1:
            raise UsageError(f"several --{lvl.lower()} values with --{level.lower()}: give one "
                             f"{lvl.lower()} as the parent, or run one command per {lvl.lower()}")
        parents[UNIQUE_KEYS[lvl]] = values[0]
    requests, seen = [], set()
    for uid in uids:
        if uid not in seen:
            seen.add(uid)
            requests.append(RetrieveRequest(level, {**parents, UNIQUE_KEYS[level]: uid}))
    return requests


def find_model_for_lookup(assoc: Association) -> str | None:
    """A C-FIND model the peer accepted, Study Root first (it returns PatientID too)."""
    accepted = {str(cx.abstract_syntax) for cx in assoc.accepted_contexts}
    for model in ("study", "patient"):
        if QR_MODELS[model]["find"] in accepted:
            return QR_MODELS[model]["find"]
    return None


def complete_request(assoc: Association, request: RetrieveRequest, model: str, remote: Remote,
                     watch: Watch, timeout: float, msg_id: int) -> RetrieveRequest:
    """Fill the parent UIDs a hierarchical peer needs (a series' study, an image's series and
    study, and PatientID in Patient Root) with a C-FIND on the same association.

    Raises PacsError (code not-found) when the peer finds nothing, and PeerFailure when it
    cannot answer such a query."""
    missing = request.missing(model)
    if not missing:
        return request
    find_model = find_model_for_lookup(assoc)
    key = UNIQUE_KEYS[request.level]
    uid = request.uids[key]
    hint = " or ".join(f"--{'patient' if k == 'PatientID' else k[:-len('InstanceUID')].lower()}"
                       for k in missing)
    if find_model is None:
        raise PeerFailure(f"{remote} needs {', '.join(missing)} for this {request.level} "
                          f"retrieve and accepted no C-FIND to look it up: give {hint}",
                          code="parent-unknown")
    query = Dataset()
    query.QueryRetrieveLevel = request.level
    for keyword in (*missing, key):
        setattr(query, keyword, request.uids.get(keyword, ""))
    started = time.monotonic()
    found: Dataset | None = None
    for status, identifier in assoc.send_c_find(query, find_model, msg_id=msg_id):
        if "Status" not in status:
            raise lost(watch, remote, "C-FIND", started, timeout)
        if int(status.Status) in PENDING:
            found = found or identifier
            continue
        if int(status.Status) not in (0x0000, CANCEL):
            raise PeerFailure(f"{remote} cannot look up {', '.join(missing)} of {key} {uid} "
                              f"(C-FIND status {status_text(int(status.Status), 'C-FIND')}): "
                              f"give {hint}", code="parent-unknown")
    if found is None:
        raise PacsError(f"{remote} has no {request.level.lower()} with {key} {uid}",
                        code="not-found")
    uids = dict(request.uids)
    for keyword in missing:
        raw = found.get(keyword)
        value = str(raw).strip() if raw else None
        if not value:
            # An instance without a PatientID cannot be named in Patient Root at all.
            advice = ("retrieve it in the Study Root model (--model study)"
                      if keyword == "PatientID" else f"give {hint}")
            raise PeerFailure(f"{remote} did not return the {keyword} of {key} {uid}: {advice}",
                              code="parent-unknown")
        uids[keyword] = value
    log.info("%s %s is in %s", key, uid, {k: uids[k] for k in missing})
    return RetrieveRequest(request.level, uids, request.sop_class_uid)
