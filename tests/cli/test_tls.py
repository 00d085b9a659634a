"""DICOM over TLS against real peers on loopback: our requestors against DCMTK's storescp
+tls, DCMTK's echoscu and storescu +tls against `pacs serve --tls`, our pynetdicom-based
find and get against `pacs serve --tls`, and what each side says when a handshake fails."""

from __future__ import annotations

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
    assert "it wants a certificate of ours: set [tls] cert and key" in no_cert.stderr

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


def test_serve_over_tls_needs_a_certificate_and_key(tmp_path: Path) -> None:
    result = run_pacs(tmp_path, "serve", "--archive", str(tmp_path / "a"), "--port", "0",
                      "--bind", "127.0.0.1", "--tls")
    assert result.returncode == 2
    assert "serving over TLS needs our certificate and key" in result.stderr


def test_move_from_serve_to_a_tls_destination(tmp_path: Path, pki: Pki,
                                              storescp_tls: tuple[int, Path]) -> None:
    """C-MOVE over TLS, and `pacs serve` sending its sub-operations over TLS to a
    destination whose [remotes] table says tls = true."""
    port, received = storescp_tls
    destination = f'[remotes.DEST]\nae_title = "STORESCP"\nhost = "127.0.0.1"\nport = {port}\n' \
                  'tls = true\n'
    tls_config(tmp_path / "serve", pki.server_cert, pki.server_key, pki.ca, extra=destination)
    server = start_server(tmp_path / "serve", "--tls")
    try:
        tls_config(tmp_path / "me", pki.client_cert, pki.client_key, pki.ca)
        source = testdata("explicit_le")
        remote = f"PACSCLI@127.0.0.1:{server.port}"
        assert run_pacs(tmp_path / "me", "store", remote, "--tls", str(source)).returncode == 0
        study = str(pydicom.dcmread(source).StudyInstanceUID)
        move = run_pacs(tmp_path / "me", "move", remote, "--tls", "--dest", "STORESCP",
                        "--study", study)
        assert move.returncode == 0, move.stderr + server.stderr()
    finally:
        server.stop()
    [arrived] = list(received.iterdir())
    assert pydicom.dcmread(arrived).SOPInstanceUID == pydicom.dcmread(source).SOPInstanceUID
