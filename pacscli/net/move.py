"""C-MOVE: the core of `pacs move`, and the temporary storage SCP of `pacs move --receive`.

`move` sends one C-MOVE per request on one association and yields one record per request
with the peer's sub-operation counts; never prints or exits. A request whose parent UIDs a
hierarchical peer needs (a series' study...) gets them by a C-FIND first.

`StorageReceiver` is a storage SCP in this process that puts every instance it receives into
the archive (`pacs serve`'s server and C-STORE service, so `Archive.put_received`), so that
`pacs move REMOTE --receive` retrieves into the archive in one command.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import replace
from typing import Any

from pynetdicom.presentation import build_context

from pacscli.archive.archive import Archive
from pacscli.config import Remote, Settings
from pacscli.dicom.query import QR_MODELS, check_level, normalize_model
from pacscli.errors import NetworkError, PacsError, PeerFailure, UsageError
from pacscli.net.ae import Watch, abort, associate, make_ae, release, requestor_tls
from pacscli.net.qr import (
    PENDING,
    RetrieveRequest,
    StatusFailure,
    complete_request,
    failed_instances,
    lost,
    outcome,
    status_text,
    sub_operations,
)
from pacscli.records import Record, failed

log = logging.getLogger(__name__)

MOVE_DESTINATION_UNKNOWN = 0xA801
OUT_OF_RESOURCES_SUB_OPERATIONS = 0xA702  # also what peers answer when dest is unreachable
Progress = Callable[[int, int], None]


class StorageReceiver:
    """A storage SCP in this process, answering to `ae_title` from any calling AE, putting
    what it receives into the archive: `pacs serve`'s server and C-STORE service."""

    def __init__(self, settings: Settings, archive: Archive, ae_title: str, *,
                 tls: bool = False) -> None:
        from pacscli.net.scp import DicomServer

        # Over TLS when the retrieve is (`move --tls`): what comes back must not be in the clear.
        serve = replace(settings.serve, allow=(), require_called_aet=True,
                        tls=settings.serve.tls or tls)
        self._lock = threading.Condition()
        self.stored = 0
        self.refused = 0
        self._server = DicomServer(settings.with_changes(ae_title=ae_title, serve=serve),
                                   archive, self._emit)

    def _emit(self, record: Record) -> None:
        with self._lock:
            if record.get("status") == "failed":
                self.refused += 1
            else:
                self.stored += 1
                self._lock.notify_all()
        log.info("received %s: %s", record.get("SOPInstanceUID"), record.get("status"))

    def counts(self) -> tuple[int, int]:
        """(stored, refused) so far."""
        with self._lock:
            return self.stored, self.refused

    def wait_for(self, stored: int, timeout: float) -> int:
        """How many were stored, once `stored` were or after `timeout` s. A record comes
        just after its C-STORE response: the peer may report the sub-operation done first."""
        with self._lock:
            self._lock.wait_for(lambda: self.stored >= stored, timeout)
            return self.stored

    def start(self, bind: str, port: int) -> tuple[str, int]:
        """Listen in the background; return the bound address."""
        return self._server.start(bind, port)

    def stop(self, grace: float = 10.0) -> None:
        """Stop listening; let associations in progress end for up to `grace` s."""
        self._server.stop(grace)


def _unknown_destination(remote: Remote, dest: str, receiving: tuple[str, int] | None) -> str:
    where = (f"this host, port {receiving[1]}, where `pacs move --receive` listens" if receiving
             else "the host and port where it listens")
    return (f"{remote} answered C-MOVE with status "
            f"{status_text(MOVE_DESTINATION_UNKNOWN, 'C-MOVE')}: it does not know the AE title "
            f"{dest!r}. Configure {dest} on {remote.ae_title} with {where} (dcmqrscp: a "
            f"HostTable entry; pacs serve: a [remotes.NAME] table with ae_title = \"{dest}\", "
            f"host and port; other PACS: their list of DICOM nodes)")


def _reach_hint(remote: Remote, dest: str, receiving: tuple[str, int] | None) -> str:
    """Why sub-operations may all fail: the peer cannot reach the destination."""
    if receiving is not None:
        return (f"; nothing arrived here: {remote.ae_title} must send {dest} to this host, "
                f"port {receiving[1]}, and be able to connect to it")
    return (f"; can {remote.ae_title} connect to {dest} at the address it has for it, and "
            f"does {dest} accept these instances' SOP classes and transfer syntaxes? "
            f"{remote.ae_title}'s log says which")


def _not_received(record: Record, remote: Remote, dest: str, sent_to_dest: int,
                  receiving: tuple[str, int] | None) -> Record:
    """A C-MOVE the peer reports done whose instances did not all reach `--receive`: they
    went to another node known to the peer as `dest`, so not where the user asked."""
    where = f", port {receiving[1]}" if receiving is not None else ""
    error = PacsError(f"{remote} reports {sent_to_dest} instance(s) sent to {dest}, but "
                      f"{record['received']} arrived here: {remote.ae_title} must know {dest} "
                      f"as this host{where}", code="not-received")
    return failed(error, **{k: v for k, v in record.items() if k not in ("status", "error")})


def move(settings: Settings, remote: Remote, requests: Iterable[RetrieveRequest | Record],
         dest: str, *, model: str = "study", receiver: StorageReceiver | None = None,
         receiving: tuple[str, int] | None = None,
         progress: Progress | None = None) -> Iterator[Record]:
    """C-MOVE each request from `remote` to `dest` on one association.

    Each record: the request's QueryRetrieveLevel and UIDs, remote, dest, status, dimse_status,
    completed, failed, warning (sub-operation counts), failed_sop_instances when the peer
    names them, elapsed_ms, and `received` (what `receiver` archived meanwhile) with a
    receiver. Records given instead of requests (bad input) pass through.

    Raises NetworkError when the association fails, PeerFailure when the peer does not know
    `dest` (0xA801: the message says what to configure) or answered every request with a
    failure status.
    """
    model = normalize_model(model)
    sop_class = QR_MODELS[model]["move"]
    contexts = [build_context(sop_class), build_context(QR_MODELS["study"]["find"])]
    if model == "patient":
        contexts.append(build_context(QR_MODELS["patient"]["find"]))
    ae = make_ae(settings)
    watch = Watch()
    timeout = float(ae.dimse_timeout or 0)
    assoc = None
    sent = refused_by_peer = 0
    last_failure: PeerFailure | None = None
    msg_id = 0
    try:
        for request in requests:
            if isinstance(request, dict):
                yield request
                continue
            base: Record = {**request.fields(), "remote": str(remote), "dest": dest}
            try:
                check_level(request.level, model)
            except UsageError as exc:
                yield failed(exc, **base)
                continue
            if assoc is not None and not assoc.is_established:
                # idle past the network timeout while stdin was slow (`find | move`): anew
                log.info("association with %s ended; opening another", remote)
                assoc = None
            if assoc is None:
                try:
                    assoc = associate(ae, remote, contexts=contexts, evt_handlers=watch.handlers(),
                                      tls=requestor_tls(settings, remote))
                except NetworkError as exc:
                    yield failed(exc, **base)
                    raise
                if sop_class not in {str(cx.abstract_syntax) for cx in assoc.accepted_contexts}:
                    error = NetworkError(f"{remote} does not accept C-MOVE in the "
                                         f"{model.title()} Root model", code="no-accepted-context")
                    yield failed(error, **base)
                    raise error
            sent += 1
            started = time.monotonic()
            try:
                msg_id += 1
                request = complete_request(assoc, request, model, remote, watch, timeout, msg_id)
                base = {**request.fields(), "remote": str(remote), "dest": dest}
                before = receiver.counts()[0] if receiver else 0
                msg_id += 1
                record = _one_move(assoc, request, sop_class, dest, remote, watch, timeout,
                                   msg_id, progress)
            except StatusFailure as exc:
                if exc.dimse_status == MOVE_DESTINATION_UNKNOWN:
                    unknown = StatusFailure(_unknown_destination(remote, dest, receiving),
                                            code="move-destination-unknown",
                                            dimse_status=MOVE_DESTINATION_UNKNOWN)
                    yield failed(unknown, **base, dimse_status=MOVE_DESTINATION_UNKNOWN,
                                 elapsed_ms=_ms(started))
                    raise unknown from None
                if exc.dimse_status == OUT_OF_RESOURCES_SUB_OPERATIONS:
                    exc = StatusFailure(exc.message + _reach_hint(remote, dest, receiving),
                                        code=exc.code, dimse_status=exc.dimse_status)
                refused_by_peer += 1
                last_failure = exc
                yield failed(exc, **base, dimse_status=exc.dimse_status, elapsed_ms=_ms(started))
                continue
            except NetworkError as exc:
                so_far = exc.counts if isinstance(exc, _Lost) else {}
                yield failed(exc, **base, **so_far, elapsed_ms=_ms(started))
                raise
            except PacsError as exc:
                yield failed(exc, **base, elapsed_ms=_ms(started))
                continue
            record = {**base, **record, "elapsed_ms": _ms(started)}
            if record["failed"] and not record["completed"]:
                record["error"]["message"] += _reach_hint(remote, dest, receiving)
            if receiver is not None:
                sent_to_dest = (record.get("completed") or 0) + (record.get("warning") or 0)
                record["received"] = receiver.wait_for(before + sent_to_dest, 0.5) - before
                if record["received"] < sent_to_dest and record["status"] != "failed":
                    record = _not_received(record, remote, dest, sent_to_dest, receiving)
            yield record
    except BaseException:
        if assoc is not None:
            abort(assoc)
        raise
    finally:
        if assoc is not None:
            release(assoc)
    if sent and refused_by_peer == sent and last_failure is not None:
        raise PeerFailure(last_failure.message if sent == 1 else
                          f"{remote} answered every C-MOVE with a failure status; the last: "
                          f"{last_failure.message}", code=last_failure.code)


def _ms(started: float) -> float:
    return round((time.monotonic() - started) * 1000, 1)


def _one_move(assoc: Any, request: RetrieveRequest, sop_class: str, dest: str, remote: Remote,
              watch: Watch, timeout: float, msg_id: int, progress: Progress | None) -> Record:
    """Send one C-MOVE and wait for its final response: the outcome fields of its record.

    Raises StatusFailure for a failure status."""
    identifier = request.identifier("patient" if sop_class == QR_MODELS["patient"]["move"]
                                    else "study")
    counts: dict[str, int | None] = {}
    failed_list: list[str] = []
    started = time.monotonic()
    final: Any = None
    for status, response in assoc.send_c_move(identifier, dest, sop_class, msg_id=msg_id):
        if "Status" not in status:
            raise _Lost(lost(watch, remote, "C-MOVE", started, timeout), counts)
        found = {k: v for k, v in sub_operations(status).items() if v is not None}
        counts.update(found)
        if int(status.Status) in PENDING:
            if progress is not None and found:
                done = sum(counts.get(k) or 0 for k in ("completed", "failed", "warning"))
                progress(done, done + (counts.get("remaining") or 0))
            started = time.monotonic()
            continue
        final = status
        failed_list = failed_instances(response)
        break
    if final is None:
        raise _Lost(lost(watch, remote, "C-MOVE", started, timeout), counts)
    return outcome(final, counts, failed_list, remote, "C-MOVE")


class _Lost(NetworkError):
    """The association ended before a C-MOVE's final response, with the sub-operation
    counts its pending responses had reported (the record keeps them)."""

    def __init__(self, error: NetworkError, counts: dict[str, int | None]) -> None:
        super().__init__(error.message, code=error.code)
        self.counts = {k: v for k, v in counts.items() if k != "remaining"}
