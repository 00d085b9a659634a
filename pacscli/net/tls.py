"""DICOM over TLS (PS3.15 B.9): the SSL contexts of our requestors and of `pacs serve`, and
why a handshake failed, in words a field engineer can act on.

Peers are checked against `[tls] ca` unless `verify_peer = false`. With our own CA, their
host names are matched to their certificates only when `check_hostname = true` (DICOM peers
are often reached by address, and modalities' certificates seldom name one); trusting the
system's CAs instead, they always are. `pacs serve` with `verify_peer` requires a certificate
from each client, as DCMTK's storescp does, and one signed by `[tls] ca` only.
"""

from __future__ import annotations

import socket
import ssl
from pathlib import Path

from pacscli.config import Remote, Settings, TlsSettings
from pacscli.errors import ConfigError


def client_context(settings: Settings, remote: Remote) -> ssl.SSLContext | None:
    """The context of an association with `remote`: None unless it is to go over TLS.
    Raises ConfigError when a file of [tls] cannot be loaded."""
    if not remote.tls:
        return None
    tls = settings.tls
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.minimum_version = ssl.TLSVersion.TLSv1_2  # BCP 195
    # Trusting the system's CAs, a certificate anyone can buy would do without its name
    # checked: the name is then checked whatever check_hostname says.
    context.check_hostname = tls.verify_peer and (tls.check_hostname or not tls.ca)
    context.verify_mode = ssl.CERT_REQUIRED if tls.verify_peer else ssl.CERT_NONE
    _load_trust(context, tls)
    if tls.cert:  # shown to peers that ask for one (most DICOM TLS servers do)
        _load_identity(context, tls)
    return context


def server_context(settings: Settings) -> ssl.SSLContext:
    """The context of `pacs serve` over TLS. Raises ConfigError without [tls] cert and key,
    or when a file cannot be loaded."""
    tls = settings.tls
    if not tls.cert or not tls.key:
        raise ConfigError("serving over TLS needs our certificate and key: set cert and key in "
                          "the config file's [tls] table")
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    _load_identity(context, tls)
    if tls.verify_peer:
        if not tls.ca:  # the system's CAs would let in anyone with a public certificate
            raise ConfigError("serving over TLS checks clients' certificates against [tls] ca: "
                              "set it to the CA that signs them, or set verify_peer = false to "
                              "let in clients without one")
        context.verify_mode = ssl.CERT_REQUIRED
        _load_trust(context, tls)
    return context


def _path(value: str) -> str:
    return str(Path(value).expanduser())


def _load_trust(context: ssl.SSLContext, tls: TlsSettings) -> None:
    try:
        if tls.ca:
            context.load_verify_locations(cafile=_path(tls.ca))
        else:  # only a client gets here: serve refuses to check clients without [tls] ca
            context.load_default_certs(ssl.Purpose.SERVER_AUTH)
    except (OSError, ssl.SSLError) as exc:
        raise ConfigError(f"cannot load the CA certificates of [tls] ca = {tls.ca!r}: "
                          f"{_reason(exc)}") from exc


class _EncryptedKey(Exception):
    """Raised by the password callback: a passphrase would be asked on the terminal."""


def _no_password() -> str:
    raise _EncryptedKey


def _load_identity(context: ssl.SSLContext, tls: TlsSettings) -> None:
    try:
        context.load_cert_chain(_path(tls.cert), _path(tls.key) if tls.key else None,
                                password=_no_password)
    except _EncryptedKey:
        raise ConfigError(f"[tls] key = {tls.key!r} is encrypted: pacscli cannot ask for its "
                          "passphrase (a service has no terminal); give it the key unencrypted, "
                          "readable by its user only") from None
    except (OSError, ssl.SSLError) as exc:
        raise ConfigError(f"cannot load our certificate and key ([tls] cert = {tls.cert!r}, "
                          f"key = {tls.key!r}): {_reason(exc)}") from exc


def _reason(exc: BaseException) -> str:
    """The useful part of an ssl or OS error: 'certificate verify failed: self-signed
    certificate', 'No such file or directory'..."""
    if isinstance(exc, ssl.SSLCertVerificationError) and exc.verify_message:
        return f"certificate verify failed: {exc.verify_message}"
    if isinstance(exc, ssl.SSLError) and exc.reason:
        return str(exc.reason).replace("_", " ").lower()
    if isinstance(exc, TimeoutError):
        return "no answer to the TLS handshake in time"
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror
    return str(exc) or type(exc).__name__


def handshake_problem(exc: BaseException, remote: Remote) -> str:
    """Why a TLS handshake with `remote` failed, with what to check."""
    reason = _reason(exc)
    if isinstance(exc, ssl.SSLCertVerificationError):
        hint = ("is its CA in [tls] ca?" if "issuer" in reason or "self-signed" in reason
                else "check its certificate")
    elif "wrong version number" in reason or "record layer failure" in reason or \
            isinstance(exc, ssl.SSLEOFError | ConnectionResetError | TimeoutError):
        hint = "does it speak TLS on this port?"
    elif "certificate required" in reason:
        hint = "it wants a certificate of ours: set [tls] cert and key"
    elif "unknown ca" in reason or "bad certificate" in reason:
        hint = "it refused our certificate: is [tls] cert one its CA signed?"
    elif "handshake failure" in reason:  # TLS 1.2 says no more, whatever the cause
        hint = ("does it want a certificate of ours ([tls] cert and key), one its CA signed, "
                "or cipher suites we do not offer?")
    else:
        hint = "check both sides' TLS settings"
    return f"TLS handshake with {remote} failed: {reason} ({hint})"


def client_handshake_problem(exc: BaseException) -> str:
    """Why a client's TLS handshake with `pacs serve` failed, with what to check."""
    reason = _reason(exc)
    if "wrong version number" in reason or "http request" in reason:
        return f"{reason} (a client not using TLS?)"
    if "did not return a certificate" in reason or "certificate required" in reason:
        return f"{reason} (the client showed no certificate; [tls] verify_peer = false lets such " \
               "clients in)"
    if isinstance(exc, ssl.SSLCertVerificationError) or "unknown ca" in reason:
        return f"{reason} (its certificate is not signed by the CA of [tls] ca)"
    return reason


def diagnose_handshake(remote: Remote, context: ssl.SSLContext, timeout: float) -> str | None:
    """Why a TLS handshake with `remote` fails, by trying one; None when it succeeds (the
    trouble is then elsewhere) or when no TCP connection can be made at all."""
    try:
        raw = socket.create_connection((remote.host, remote.port), timeout=timeout)
    except OSError:
        return None
    try:
        sock = context.wrap_socket(raw, server_hostname=remote.host)
    except OSError as exc:  # ssl.SSLError is one; a TimeoutError: no answer to it
        raw.close()
        return handshake_problem(exc, remote)
    try:
        # Under TLS 1.3 the server checks our certificate after the handshake, and an alert
        # refusing it comes with the first read.
        sock.settimeout(min(timeout, 2.0))
        sock.recv(1)
    except TimeoutError:  # nothing to read: the handshake went well
        return None
    except OSError as exc:
        return handshake_problem(exc, remote)
    finally:
        sock.close()
    return None
