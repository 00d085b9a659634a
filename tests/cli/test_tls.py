"""DICOM over TLS against real peers on loopback: our requestors against DCMTK's storescp
+tls, DCMTK's echoscu and storescu +tls against `pacs serve --tls`, our pynetdicom-based
find and get against `pacs serve --tls`, and what each side says when a handshake fails."""

from __future__ import annotations

import contextlib
import json
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pydicom
import pytest

from tests.conftest import DCMTK_ENV, Server, free_port, require, start_server, testdata, wait_for_port
from tests.qr_data import run_pacs
from tests.tls_pki import Pki, make_pki


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return make_pki(tmp_path_factory.mktemp("pki"))


def tls_config(folder: Path, cert: Path | None, key: Path | None, ca: Path | None,
               extra: str = "") -> Path:
    """A config.toml in `folder` with a [tls] table (None leaves a setting out)."""
    folder.mkdir(parents=True, exist_ok=True)
    lines = [f'{name} = "{value}"' for name, value in (("cert", cert), ("key", key), ("ca", ca))
             if value is not None]
    config = folder / "config.toml"
    config.write_text(extra + "[tls]\n" + "\n".join(lines) + "\n")
    return config


def records(result: subprocess.CompletedProcess[str]) -> list[dict[str, Any]]:
    return [json.loads(line) for line in result.stdout.splitlines()]


@pytest.fixture
def storescp_tls(tmp_path: Path, pki: Pki) -> Iterator[tuple[int, Path]]:
    """DCMTK storescp over TLS (requiring a client certificate from our CA): port, folder."""
    port = free_port()
    received = tmp_path / "received"
    received.mkdir()
    proc = subprocess.Popen(
        [require("storescp"), "--aetitle", "STORESCP", "+tls", str(pki.server_key),
         str(pki.server_cert), "+cf", str(pki.ca), "-od", str(received), str(port)],
        env=DCMTK_ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        stdin=subprocess.DEVNULL)
    try:
        wait_for_port(port, proc=proc)
        yield port, received
    finally:
        proc.terminate()
        proc.wait(10)


@pytest.fixture
def serve_tls(tmp_path: Path, pki: Pki) -> Iterator[Server]:
    """`pacs serve --tls`, requiring client certificates from our CA."""
    tls_config(tmp_path / "serve", pki.server_cert, pki.server_key, pki.ca)
    server = start_server(tmp_path / "serve", "--tls")
    yield server
    server.stop()


def test_echo_and_store_to_dcmtk_storescp_over_tls(tmp_path: Path, pki: Pki,
                                                   storescp_tls: tuple[int, Path]) -> None:
    port, received = storescp_tls
    tls_config(tmp_path / "me", pki.client_cert, pki.client_key, pki.ca)
    echo = run_pacs(tmp_path / "me", "echo", f"STORESCP@127.0.0.1:{port}", "--tls")
    assert echo.returncode == 0, echo.stderr
    assert records(echo)[0]["implementation_version_name"].startswith("OFFIS_DCMTK")

    source = testdata("explicit_le")
    store = run_pacs(tmp_path / "me", "store", f"STORESCP@127.0.0.1:{port}", "--tls", str(source))
    assert store.returncode == 0, store.stderr
    [arrived] = list(received.iterdir())
    assert pydicom.dcmread(arrived).PixelData == pydicom.dcmread(source).PixelData


def test_dcmtk_echoscu_and_storescu_to_serve_over_tls(tmp_path: Path, pki: Pki,
                                                      serve_tls: Server) -> None:
    tls = ["+tls", str(pki.client_key), str(pki.client_cert), "+cf", str(pki.ca)]
    echo = subprocess.run([require("echoscu"), "-aec", "PACSCLI", *tls, "127.0.0.1",
                           str(serve_tls.port)], capture_output=True, text=True, env=DCMTK_ENV,
                          timeout=60)
    assert echo.returncode == 0, echo.stderr
    store = subprocess.run([require("storescu"), "-aec", "PACSCLI", *tls, "127.0.0.1",
                            str(serve_tls.port), str(testdata("explicit_le"))],
                           capture_output=True, text=True, env=DCMTK_ENV, timeout=60)
    assert store.returncode == 0, store.stderr
    plain = subprocess.run([require("echoscu"), "-aec", "PACSCLI", "127.0.0.1",
                            str(serve_tls.port)], capture_output=True, text=True, env=DCMTK_ENV,
                           timeout=60)
    assert plain.returncode != 0  # no DICOM in the clear on a TLS port
    serve_tls.stop()
    [record] = [json.loads(line) for line in serve_tls.stdout().splitlines()]
    assert record["status"] == "ok" and str(record["remote"]).startswith("STORESCU@")
    assert "TLS handshake with 127.0.0.1:" in serve_tls.stderr()
    assert "wrong version number (a client not using TLS?)" in serve_tls.stderr()


def test_find_and_get_with_a_remote_that_says_tls(tmp_path: Path, pki: Pki,
                                                  serve_tls: Server) -> None:
    """The pynetdicom-based requestors, through `tls = true` in [remotes], no --tls flag."""
    me = tmp_path / "me"
    remote = f'[remotes.PACS]\nae_title = "PACSCLI"\nhost = "127.0.0.1"\nport = {serve_tls.port}\n' \
             'tls = true\n'
    tls_config(me, pki.client_cert, pki.client_key, pki.ca, extra=remote)
    source = testdata("explicit_le")
    assert run_pacs(me, "store", "PACS", str(source)).returncode == 0
    study = str(pydicom.dcmread(source).StudyInstanceUID)
    find = run_pacs(me, "find", "PACS", "--level", "study")
    assert find.returncode == 0, find.stderr
    assert [r["StudyInstanceUID"] for r in records(find)] == [study]
    get = run_pacs(me, "get", "PACS", "--study", study, "--out", str(tmp_path / "got"))
    assert get.returncode == 0, get.stderr
    [got] = records(get)
    assert pydicom.dcmread(got["path"]).PixelData == pydicom.dcmread(source).PixelData


@pytest.mark.parametrize("command", ["echo", "store"])  # pynetdicom's requestor, and ours
def test_what_a_failed_handshake_says(tmp_path: Path, pki: Pki, storescp_tls: tuple[int, Path],
                                      command: str) -> None:
    port, _ = storescp_tls
    files = [str(testdata("explicit_le"))] if command == "store" else []
    remote = f"STORESCP@127.0.0.1:{port}"

    other = make_pki(tmp_path / "other", "another CA")  # a CA that did not sign the server's
    tls_config(tmp_path / "wrong-ca", pki.client_cert, pki.client_key, other.ca)
    wrong_ca = run_pacs(tmp_path / "wrong-ca", command, remote, "--tls", *files)
    assert wrong_ca.returncode == 3 and "Traceback" not in wrong_ca.stderr
    assert f"TLS handshake with {remote} failed: certificate verify failed" in wrong_ca.stderr
    assert "(is its CA in [tls] ca?)" in wrong_ca.stderr
    assert records(wrong_ca)[-1]["error"]["code"] == "tls-failed"

    tls_config(tmp_path / "no-cert", None, None, pki.ca)
    no_cert = run_pacs(tmp_path / "no-cert", command, remote, "--tls", *files)
    assert no_cert.returncode == 3 and "Traceback" not in no_cert.stderr
    # TLS 1.3 (our own requestor) names the cause; TLS 1.2 (pynetdicom's) only fails.
    assert "it wants a certificate of ours: set [tls] cert and key" in no_cert.stderr or \
        "does it want a certificate of ours ([tls] cert and key)" in no_cert.stderr

    plain_port = free_port()  # a storescp without TLS
    plain = subprocess.Popen([require("storescp"), "--aetitle", "STORESCP", "-od",
                              str(tmp_path), str(plain_port)], env=DCMTK_ENV,
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_for_port(plain_port, proc=plain)
        tls_config(tmp_path / "me", pki.client_cert, pki.client_key, pki.ca)
        clear = run_pacs(tmp_path / "me", command, f"STORESCP@127.0.0.1:{plain_port}", "--tls",
                         *files)
    finally:
        plain.terminate()
        plain.wait(10)
    assert clear.returncode == 3 and "(does it speak TLS on this port?)" in clear.stderr


def test_serve_over_tls_needs_a_certificate_key_and_ca(tmp_path: Path, pki: Pki) -> None:
    """Without [tls] ca, serve would check clients against the system's CAs: anyone with a
    public certificate would get in."""
    serve = ["serve", "--archive", str(tmp_path / "a"), "--port", "0", "--bind", "127.0.0.1",
             "--tls"]
    result = run_pacs(tmp_path, *serve)
    assert result.returncode == 2
    assert "serving over TLS needs our certificate and key" in result.stderr
    tls_config(tmp_path, pki.server_cert, pki.server_key, None)
    no_ca = run_pacs(tmp_path, *serve)
    assert no_ca.returncode == 2 and "checks clients' certificates against [tls] ca" in no_ca.stderr


def test_without_a_ca_the_peer_name_is_checked(tmp_path: Path, pki: Pki) -> None:
    """Trusting the system's CAs, a client checks the peer's host name whatever
    check_hostname says: a certificate anyone can buy would do otherwise."""
    from pacscli.config import Remote, Settings, TlsSettings
    from pacscli.net.tls import client_context

    remote = Remote("X", "127.0.0.1", 104, tls=True)
    system = client_context(Settings(archive=tmp_path, tls=TlsSettings()), remote)
    own_ca = client_context(Settings(archive=tmp_path, tls=TlsSettings(ca=str(pki.ca))), remote)
    assert system is not None and system.check_hostname
    assert own_ca is not None and not own_ca.check_hostname


def test_only_associations_pynetdicom_runs_are_capped_at_tls_1_2(tmp_path: Path, pki: Pki) -> None:
    """pynetdicom's requestors (echo, find, move, get) get a context capped at TLS 1.2, each
    a fresh one; our own requestor (store) keeps TLS 1.3. `associate` used to set the cap on
    whatever context it was given."""
    import ssl

    from pacscli.config import Remote, Settings, TlsSettings
    from pacscli.net.ae import requestor_tls
    from pacscli.net.tls import client_context

    remote = Remote("X", "127.0.0.1", 104, tls=True)
    settings = Settings(archive=tmp_path, tls=TlsSettings(ca=str(pki.ca)))
    ours, theirs = client_context(settings, remote), requestor_tls(settings, remote)
    assert ours is not None and ours.maximum_version == ssl.TLSVersion.MAXIMUM_SUPPORTED
    assert theirs is not None and theirs.maximum_version == ssl.TLSVersion.TLSv1_2
    assert requestor_tls(settings, Remote("X", "127.0.0.1", 104)) is None


def test_an_encrypted_key_is_a_config_error_not_a_prompt(tmp_path: Path, pki: Pki) -> None:
    """A passphrase was asked on the terminal (or, without one, 'Invalid argument')."""
    from cryptography.hazmat.primitives import serialization

    key = serialization.load_pem_private_key(pki.client_key.read_bytes(), password=None)
    encrypted = tmp_path / "encrypted.key"
    encrypted.write_bytes(key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
        serialization.BestAvailableEncryption(b"secret")))
    tls_config(tmp_path, pki.client_cert, encrypted, pki.ca)
    result = run_pacs(tmp_path, "echo", "X@127.0.0.1:104", "--tls", timeout=30)
    assert result.returncode == 2 and "is encrypted: pacscli cannot ask for its passphrase" \
        in result.stderr


def _silent_tls_server(pki: Pki) -> int:
    """A TLS 1.3 server on a free port that completes the handshake, then says nothing."""
    import socket
    import ssl
    import threading
    import time

    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(pki.server_cert, pki.server_key)
    listener = socket.create_server(("127.0.0.1", 0))

    def serve() -> None:
        with listener:
            listener.settimeout(30)
            with contextlib.suppress(OSError), listener.accept()[0] as raw, \
                    context.wrap_socket(raw, server_side=True) as sock:
                sock.recv(65536)  # the association request, never answered
                time.sleep(90)

    import contextlib

    threading.Thread(target=serve, daemon=True).start()
    return int(listener.getsockname()[1])


def test_a_tls_peer_that_never_answers_the_association_request(tmp_path: Path, pki: Pki) -> None:
    """pynetdicom read its socket without a timeout: under TLS 1.3 the server's session
    tickets woke it, and the command hung for good, deaf to Ctrl-C."""
    port = _silent_tls_server(pki)
    tls_config(tmp_path, pki.client_cert, pki.client_key, pki.ca,
               extra="[network]\nacse_timeout = 2\n")
    result = run_pacs(tmp_path, "echo", f"X@127.0.0.1:{port}", "--tls", timeout=30)
    assert result.returncode == 3, result.stderr
    assert "did not answer the association request within 2 s" in result.stderr


@pytest.mark.parametrize("command", ["echo", "store"])
def test_a_peer_that_never_answers_the_tls_handshake(tmp_path: Path, pki: Pki,
                                                     command: str) -> None:
    """Said as such (it was 'TCP connection works, but...' or the ssl module's raw text)."""
    import socket
    import threading
    import time

    listener = socket.create_server(("127.0.0.1", 0))
    port = int(listener.getsockname()[1])

    def hold() -> None:
        with listener:
            conns = [listener.accept()[0] for _ in range(2)]  # ours, then the diagnosis's
            time.sleep(10)
            for conn in conns:
                conn.close()

    threading.Thread(target=hold, daemon=True).start()
    tls_config(tmp_path, pki.client_cert, pki.client_key, pki.ca,
               extra="[network]\nacse_timeout = 1\nconnect_timeout = 1\n")
    files = [str(testdata("explicit_le"))] if command == "store" else []
    result = run_pacs(tmp_path, command, f"X@127.0.0.1:{port}", "--tls", *files, timeout=60)
    assert result.returncode == 3, result.stderr
    assert "no answer to the TLS handshake in time (does it speak TLS on this port?)" \
        in result.stderr


def test_move_receive_over_tls(tmp_path: Path, pki: Pki) -> None:
    """`move --tls --receive`: the sub-operations come back over TLS too (the receiver
    listened in the clear, and a serve sending over TLS failed the handshake)."""
    receive_port = free_port()
    server, remote, study = _serve_holding_one_study(tmp_path, pki, "ME", receive_port)
    try:
        move = run_pacs(tmp_path / "me", "move", remote, "--tls", "--dest", "ME", "--receive",
                        "--port", str(receive_port), "--archive", str(tmp_path / "mine"),
                        "--study", study)
        assert move.returncode == 0, move.stderr + server.stderr()
    finally:
        server.stop()
    assert [r["received"] for r in records(move)] == [1]


def _serve_holding_one_study(tmp_path: Path, pki: Pki, destination: str,
                             port: int) -> tuple[Server, str, str]:
    """`pacs serve --tls` knowing `destination` at `port` with tls = true, holding one
    instance stored over TLS (a client config in tmp_path/me): the server, its remote, and
    the instance's study."""
    remotes = f'[remotes.DEST]\nae_title = "{destination}"\nhost = "127.0.0.1"\n' \
              f'port = {port}\ntls = true\n'
    tls_config(tmp_path / "serve", pki.server_cert, pki.server_key, pki.ca, extra=remotes)
    server = start_server(tmp_path / "serve", "--tls")
    tls_config(tmp_path / "me", pki.client_cert, pki.client_key, pki.ca)
    source = testdata("explicit_le")
    remote = f"PACSCLI@127.0.0.1:{server.port}"
    assert run_pacs(tmp_path / "me", "store", remote, "--tls", str(source)).returncode == 0
    return server, remote, str(pydicom.dcmread(source).StudyInstanceUID)


def test_move_from_serve_to_a_tls_destination(tmp_path: Path, pki: Pki,
                                              storescp_tls: tuple[int, Path]) -> None:
    """C-MOVE over TLS, and `pacs serve` sending its sub-operations over TLS to a
    destination whose [remotes] table says tls = true."""
    port, received = storescp_tls
    server, remote, study = _serve_holding_one_study(tmp_path, pki, "STORESCP", port)
    try:
        move = run_pacs(tmp_path / "me", "move", remote, "--tls", "--dest", "STORESCP",
                        "--study", study)
        assert move.returncode == 0, move.stderr + server.stderr()
    finally:
        server.stop()
    [arrived] = list(received.iterdir())
    source = testdata("explicit_le")
    assert pydicom.dcmread(arrived).SOPInstanceUID == pydicom.dcmread(source).SOPInstanceUID


def test_serve_gives_the_handshake_and_the_association_request_one_acse_timeout(
        tmp_path: Path, pki: Pki) -> None:
    """A client slow in the TLS handshake, then silent: serve closes the connection one ACSE
    timeout after it came, not a second one after the handshake."""
    import socket
    import ssl
    import time

    tls_config(tmp_path / "serve", pki.server_cert, pki.server_key, pki.ca,
               extra="[network]\nacse_timeout = 2\n")
    server = start_server(tmp_path / "serve", "--tls")
    try:
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        context.load_verify_locations(pki.ca)
        context.load_cert_chain(pki.client_cert, pki.client_key)
        context.check_hostname = False
        started = time.monotonic()
        with socket.create_connection(("127.0.0.1", server.port)) as raw:
            time.sleep(1.4)  # slow to begin the handshake
            with context.wrap_socket(raw) as sock:
                sock.settimeout(10)
                with contextlib.suppress(OSError):  # closed, or reset: either way it ends
                    assert sock.recv(1) == b""
        waited = time.monotonic() - started
    finally:
        server.stop()
    assert 1.9 < waited < 2.7, waited
