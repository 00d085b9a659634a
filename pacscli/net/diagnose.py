"""Why an association could not be made, in words a field engineer can act on.

Shared by our own requestor (pacscli.net.client) and the pynetdicom SCUs (pacscli.net.ae),
and kept free of pynetdicom so that `pacs store` never loads it.
"""

from __future__ import annotations

import socket

from pacscli.config import Remote
from pacscli.net.pdu import Rejection


def rejection_text(rejection: Rejection, ae_title: str, remote: Remote) -> str:
    """'rejected permanent by the service user: called AE title not recognised (...)'."""
    text = f"{rejection.result_text} by the {rejection.source_text}: {rejection.reason_text}"
    why = (rejection.source, rejection.reason)
    if why == (1, 3):
        text += f" (the peer does not accept our AE title {ae_title!r})"
    elif why == (1, 7):
        text += f" (the peer does not answer to the AE title {remote.ae_title!r})"
    return text


_ABORT_REASONS = {1: "unrecognised PDU", 2: "unexpected PDU", 4: "unrecognised PDU parameter",
                  5: "unexpected PDU parameter", 6: "invalid PDU parameter value"}


def abort_text(source: int, reason: int) -> str:
    """Who sent an A-ABORT and why, from its source and reason fields (PS3.8 9.3.8):
    'the service provider, for an unexpected PDU'."""
    if source == 0:
        return "the service user"  # its reason field is not significant then
    if source == 2:
        why = _ABORT_REASONS.get(reason)
        return "the service provider" + (f", for an {why}" if why else ", reason not specified")
    return f"source {source} (reserved), reason {reason}"


def diagnose_connection(remote: Remote, timeout: float) -> str:
    """Why a TCP connection to `remote` fails, in words a field engineer can act on."""
    try:
        infos = socket.getaddrinfo(remote.host, remote.port, type=socket.SOCK_STREAM)
    except socket.gaierror as exc:
        return f"cannot resolve host {remote.host!r}: {exc.strerror}"
    address = infos[0][4]
    try:
        with socket.create_connection((str(address[0]), int(address[1])), timeout=timeout):
            return (
                f"TCP connection to {remote.host}:{remote.port} works, but the peer did not "
                "answer the association request (is it a DICOM service? TLS expected?)"
            )
    except ConnectionRefusedError:
        return (
            f"connection refused by {remote.host}:{remote.port}: nothing is listening on that "
            "port (service down or wrong port?)"
        )
    except TimeoutError:
        return (
            f"no answer from {remote.host}:{remote.port} within {timeout:g} s "
            "(host down, wrong address or a firewall dropping packets?)"
        )
    except OSError as exc:
        return f"cannot connect to {remote.host}:{remote.port}: {exc.strerror or exc}"
