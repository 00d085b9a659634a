"""C-ECHO with timings and a diagnosis of any failure: the core of `pacs echo`.

Yields one record per echo; never prints or exits. A failure yields a `status: failed` record,
then raises its PacsError (NetworkError: exit 3, PeerFailure: exit 4), so a pipe keeps the
record and a person reads the diagnosis.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from dataclasses import replace

from pynetdicom.presentation import build_context
from pynetdicom.status import VERIFICATION_SERVICE_CLASS_STATUS

from pacscli.config import Remote, Settings
from pacscli.errors import NetworkError, PacsError, PeerFailure, UsageError
from pacscli.net.ae import Watch, abort, associate, make_ae, release, requestor_tls
from pacscli.records import Record, failed

log = logging.getLogger(__name__)

VERIFICATION = "1.2.840.10008.1.1"


def with_timeout(settings: Settings, timeout: float) -> Settings:
    """Settings whose connect, ACSE and DIMSE timeouts are all `timeout` seconds."""
    if timeout <= 0:
        raise UsageError(f"--timeout must be more than 0 seconds, not {timeout:g}")
    network = replace(settings.network, connect_timeout=timeout, acse_timeout=timeout,
                      dimse_timeout=timeout)
    return settings.with_changes(network=network)


def _ms(start: float) -> float:
    return round((time.perf_counter() - start) * 1000, 3)


def _no_response(watch: Watch, waited_ms: float, timeout: float) -> tuple[str, str]:
    """Why send_c_echo came back without a status."""
    if watch.malformed is not None:
        return watch.why_ended() or ("invalid-response", "the peer sent an invalid C-ECHO response")
    if watch.abort is None and waited_ms >= timeout * 1000 * 0.95:
        return "dimse-timeout", (f"no C-ECHO response within {timeout:g} s (DIMSE timeout); "
                                 "the association was aborted")
    if watch.abort is None and not watch.closed:
        return "invalid-response", "the peer sent an invalid C-ECHO response"
    return watch.why_ended() or ("association-aborted", "the association was aborted")


def echo(settings: Settings, remote: Remote, *, count: int = 1,
         interval: float = 0.0) -> Iterator[Record]:
    """Send `count` C-ECHOs to `remote` on one association, `interval` seconds apart.

    Each record: remote, echo (number), status, assoc_ms, rtt_ms, dimse_status, max_pdu (the
    peer's), implementation_class_uid, implementation_version_name; and error when failed.
    """
    if count < 1:
        raise UsageError(f"--count must be 1 or more, not {count}")
    if interval < 0:
        raise UsageError(f"--interval must not be negative, not {interval:g}")
    ae = make_ae(settings)
    if interval:  # pynetdicom aborts an association idle longer than the network timeout
        ae.network_timeout = max(ae.network_timeout or 0, interval + (ae.dimse_timeout or 0) + 1)
    dimse_timeout = float(ae.dimse_timeout or 0)
    watch = Watch()
    record: Record = {"remote": str(remote), "echo": None, "status": "ok", "assoc_ms": None,
                      "rtt_ms": None, "dimse_status": None, "max_pdu": None,
                      "implementation_class_uid": None, "implementation_version_name": None}
    start = time.perf_counter()
    try:
        assoc = associate(ae, remote, contexts=[build_context(VERIFICATION)],
                          evt_handlers=watch.handlers(),
                          tls=requestor_tls(settings, remote))
    except NetworkError as exc:
        yield failed(exc, **{**record, "assoc_ms": _ms(start)})
        raise
    peer = assoc.acceptor
    record.update(
        assoc_ms=_ms(start),
        max_pdu=peer.maximum_length,
        implementation_class_uid=str(peer.implementation_class_uid or "") or None,
        implementation_version_name=peer.implementation_version_name or None,
    )
    log.info("associated with %s in %.1f ms", remote, record["assoc_ms"])
    error: PacsError | None = None
    try:
        for number in range(1, count + 1):
            record.update(echo=number, rtt_ms=None, dimse_status=None)
            if number > 1 and interval:
                time.sleep(interval)
            if not assoc.is_established:
                code, words = watch.why_ended() or ("association-aborted",
                                                    "the association was aborted")
                error = NetworkError(f"{remote}: {words} before echo {number}", code=code)
                break
            sent = time.perf_counter()
            status = assoc.send_c_echo(msg_id=number)
            record["rtt_ms"] = _ms(sent)
            if "Status" not in status:
                code, words = _no_response(watch, record["rtt_ms"], dimse_timeout)
                error = NetworkError(f"echo {number} to {remote} failed: {words}", code=code)
                break
            record["dimse_status"] = int(status.Status)
            if status.Status != 0x0000:
                meaning = VERIFICATION_SERVICE_CLASS_STATUS.get(status.Status, ("", "unknown"))[1]
                error = PeerFailure(f"{remote} answered C-ECHO with failure status "
                                    f"0x{status.Status:04X} ({meaning})", code="echo-failed")
                break
            yield dict(record)
    except BaseException:
        abort(assoc)  # Ctrl-C: the peer's answer to a release is not waited for
        raise
    finally:
        release(assoc)
    if error is not None:
        if count > 1:  # how far it got, for a link that drops part-way
            answered = int(record["echo"] or 1) - 1
            error = type(error)(f"{error.message} ({answered} of {count} echoes succeeded before)",
                                code=error.code)
        yield failed(error, **record)
        raise error
