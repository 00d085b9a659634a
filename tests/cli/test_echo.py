"""`pacs echo` against real peers on loopback: DCMTK storescp and echoscu, `pacs serve`, and
pynetdicom SCPs that misbehave on purpose (failure status, no answer, abort)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import (
    CT_ONLY_PROFILE,
    DCMTK_ENV,
    Server,
    bad_peer,
    free_port,
    pacs_cmd,
    require,
    start_server,
    wait_for_port,
)

VERIFICATION = "1.2.840.10008.1.1"



def pacs_echo(tmp_path: Path, *args: str) -> subprocess.CompletedProcess[str]:
    """Run `pacs echo ARGS` with an empty config, stdout a pipe (so JSON lines)."""
    config = tmp_path / "config.toml"
    if not config.exists():
        config.write_text("")
    return subprocess.run(pacs_cmd("echo", *args), capture_output=True, text=True, timeout=120,
                          stdin=subprocess.DEVNULL, env={**os.environ, "PACS_CONFIG": str(config)})


def records(result: subprocess.CompletedProcess[str]) -> list[dict[str, Any]]:
    return [json.loads(line) for line in result.stdout.splitlines()]


def start_storescp(tmp_path: Path, *extra: str) -> Iterator[int]:
    """DCMTK storescp (AE title STORESCP) on a free port, stopped afterwards."""
    port = free_port()
    workdir = tmp_path / f"storescp-{port}"
    workdir.mkdir()
    proc = subprocess.Popen([require("storescp"), "--aetitle", "STORESCP", *extra, str(port)],
                            cwd=workdir, env=DCMTK_ENV, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, stdin=subprocess.DEVNULL)
    try:
        wait_for_port(port, proc=proc)
        yield port
    finally:
        proc.terminate()
        proc.wait(10)


@pytest.fixture
def storescp(tmp_path: Path) -> Iterator[int]:
    yield from start_storescp(tmp_path)


@pytest.fixture
def allow_server(tmp_path: Path) -> Iterator[Server]:
    """`pacs serve --allow GOODAE`."""
    srv = start_server(tmp_path / "serve", "--allow", "GOODAE")
    yield srv
    srv.stop()


@pytest.fixture
def echo_scp() -> Iterator[Callable[[Callable[[Any], int]], int]]:
    """Start pynetdicom Verification SCPs (AE title PEER) with a given C-ECHO handler."""
    from pynetdicom import AE, evt

    servers: list[Any] = []

    def start(handler: Callable[[Any], int]) -> int:
        ae = AE(ae_title="PEER")
        ae.add_supported_context(VERIFICATION)
        port = free_port()
        servers.append(ae.start_server(("127.0.0.1", port), block=False,
                                       evt_handlers=[(evt.EVT_C_ECHO, handler)]))
        return port

    yield start
    for server in servers:
        server.shutdown()


# --- success ---------------------------------------------------------------------------------

def test_dcmtk_echoscu_against_pacs_serve(server: Server) -> None:
    result = subprocess.run([require("echoscu"), "-aec", "PACSCLI", "127.0.0.1", str(server.port)],
                            capture_output=True, text=True, env=DCMTK_ENV, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr


def test_echo_storescp(tmp_path: Path, storescp: int) -> None:
    result = pacs_echo(tmp_path, f"STORESCP@127.0.0.1:{storescp}")
    assert result.returncode == 0, result.stderr
    assert result.stderr == ""  # quiet in a pipe when all is well
    [record] = records(result)
    assert record["remote"] == f"STORESCP@127.0.0.1:{storescp}"
    assert record["status"] == "ok"
    assert record["echo"] == 1
    assert record["dimse_status"] == 0
    assert record["assoc_ms"] > 0
    assert record["rtt_ms"] > 0
    assert isinstance(record["max_pdu"], int) and record["max_pdu"] > 0
    assert record["implementation_class_uid"].startswith("1.2.276.0.7230010")
    assert record["implementation_version_name"].startswith("OFFIS_DCMTK")


def test_echo_count_on_one_association_with_summary(tmp_path: Path, storescp: int) -> None:
    result = pacs_echo(tmp_path, f"STORESCP@127.0.0.1:{storescp}", "--count", "3", "-v")
    assert result.returncode == 0, result.stderr
    recs = records(result)
    assert [r["echo"] for r in recs] == [1, 2, 3]
    assert all(r["status"] == "ok" and r["rtt_ms"] > 0 for r in recs)
    assert len({r["assoc_ms"] for r in recs}) == 1  # one association for all three
    assert "3 echoes ok" in result.stderr  # -v: the summary on stderr
    assert "OFFIS_DCMTK" in result.stderr


def test_echo_interval_and_table(tmp_path: Path, server: Server) -> None:
    started = time.monotonic()
    result = pacs_echo(tmp_path, server.remote, "--count", "2", "--interval", "0.5",
                       "--format", "table")
    assert result.returncode == 0, result.stderr
    assert time.monotonic() - started >= 0.5
    lines = result.stdout.splitlines()
    assert len(lines) == 2 and lines[0].startswith("1  ok") and "PACSCLI_010" in lines[0]


def test_echo_configured_remote_name(tmp_path: Path, server: Server) -> None:
    (tmp_path / "config.toml").write_text(
        f'[remotes.archive]\nae_title = "PACSCLI"\nhost = "127.0.0.1"\nport = {server.port}\n')
    result = pacs_echo(tmp_path, "archive")
    assert result.returncode == 0, result.stderr
    assert records(result)[0]["remote"] == server.remote


# --- could not connect: exit 3 ---------------------------------------------------------------

def test_echo_connection_refused(tmp_path: Path) -> None:
    result = pacs_echo(tmp_path, f"X@127.0.0.1:{free_port()}")
    assert result.returncode == 3
    assert "pacs: error:" in result.stderr and "connection refused" in result.stderr
    [record] = records(result)  # the failure is a record too, for the pipe
    assert record["status"] == "failed" and record["error"]["code"] == "connection-failed"


def _raw_peer(answer: bytes | None) -> int:
    """A TCP peer that reads the association request, then sends `answer` (None: nothing)
    and closes: at once after an empty answer, else 3 s later, as a web server keeping its
    connection alive would. It serves one connection."""
    import socket

    listener = socket.create_server(("127.0.0.1", 0))
    port = int(listener.getsockname()[1])

    def serve() -> None:
        with listener, listener.accept()[0] as conn:
            conn.recv(65536)
            if answer:
                conn.sendall(answer)
            if answer != b"":
                time.sleep(3)

    threading.Thread(target=serve, daemon=True).start()
    return port


@pytest.mark.parametrize("answer, says", [
    (b"HTTP/1.1 400 Bad Request\r\n\r\n",
     "answered the association request with something that is not DICOM"),
    (b"", "closed the connection during association negotiation"),
    (None, "accepted the TCP connection but did not answer the association request within 1 s"),
])
def test_echo_peer_that_is_not_dicom(tmp_path: Path, answer: bytes | None, says: str) -> None:
    """Nothing aborted the association: a web server, a peer that hangs up, a silent one.
    Each is told apart, not reported as an abort (as it was)."""
    result = pacs_echo(tmp_path, f"X@127.0.0.1:{_raw_peer(answer)}", "--timeout", "1")
    assert result.returncode == 3
    assert says in result.stderr, result.stderr
    assert "aborted" not in result.stderr


@pytest.mark.parametrize("source, reason, says", [
    (2, 2, "A-ABORT from the service provider, for an unexpected PDU"),
    (2, 0, "A-ABORT from the service provider, reason not specified"),
    (0, 0, "A-ABORT from the service user"),
])
def test_echo_peer_aborting_the_association_request(tmp_path: Path, source: int, reason: int,
                                                    says: str) -> None:
    """An A-ABORT in answer to the association request, with who sent it and why. One from
    the service provider was called "something that is not DICOM"."""
    abort = bytes([0x07, 0, 0, 0, 0, 4, 0, 0, source, reason])
    result = pacs_echo(tmp_path, f"X@127.0.0.1:{_raw_peer(abort)}", "--timeout", "5")
    assert result.returncode == 3
    assert f"aborted the association during negotiation ({says})" in result.stderr, result.stderr
    assert records(result)[0]["error"]["code"] == "association-aborted"


def test_echo_unresolvable_host(tmp_path: Path) -> None:
    result = pacs_echo(tmp_path, "X@no-such-host.invalid:104")
    assert result.returncode == 3
    assert "cannot resolve host 'no-such-host.invalid'" in result.stderr


def test_dcmtk_echoscu_rejected_by_allow_list(allow_server: Server) -> None:
    echoscu = require("echoscu")
    bad = subprocess.run([echoscu, "-aet", "BADAE", "-aec", "PACSCLI", "127.0.0.1",
                          str(allow_server.port)], capture_output=True, text=True, timeout=60)
    assert bad.returncode != 0
    assert "calling ae title not recogni" in (bad.stdout + bad.stderr).lower()
    good = subprocess.run([echoscu, "-aet", "GOODAE", "-aec", "PACSCLI", "127.0.0.1",
                           str(allow_server.port)], capture_output=True, text=True, timeout=60)
    assert good.returncode == 0, good.stdout + good.stderr


def test_echo_calling_aet_rejected(tmp_path: Path, allow_server: Server) -> None:
    result = pacs_echo(tmp_path, allow_server.remote, "--aet", "BADAE")
    assert result.returncode == 3
    assert f"association rejected by {allow_server.remote}" in result.stderr
    assert "rejected permanent by the service user" in result.stderr
    assert "calling AE title not recognised" in result.stderr
    assert "'BADAE'" in result.stderr
    assert records(result)[0]["error"]["code"] == "association-rejected"
    assert pacs_echo(tmp_path, allow_server.remote, "--aet", "GOODAE").returncode == 0


def test_echo_called_aet_rejected(tmp_path: Path, server: Server) -> None:
    result = pacs_echo(tmp_path, f"WRONG@127.0.0.1:{server.port}")
    assert result.returncode == 3
    assert "called AE title not recognised" in result.stderr
    assert "'WRONG'" in result.stderr


def test_echo_verification_not_accepted(tmp_path: Path) -> None:
    profile = tmp_path / "ct-only.cfg"
    profile.write_text(CT_ONLY_PROFILE)
    for port in start_storescp(tmp_path, "-xf", str(profile), "CTOnly"):
        result = pacs_echo(tmp_path, f"STORESCP@127.0.0.1:{port}")
        assert result.returncode == 3
        assert "none of the presentation contexts" in result.stderr
        assert "Verification SOP Class: abstract syntax not supported" in result.stderr
        assert records(result)[0]["error"]["code"] == "no-accepted-context"


def test_echo_dimse_timeout(tmp_path: Path, echo_scp: Callable[..., int]) -> None:
    def slow(event: Any) -> int:
        time.sleep(3)
        return 0x0000

    result = pacs_echo(tmp_path, f"PEER@127.0.0.1:{echo_scp(slow)}", "--timeout", "0.5")
    assert result.returncode == 3
    assert "no C-ECHO response within 0.5 s (DIMSE timeout)" in result.stderr
    [record] = records(result)
    assert record["error"]["code"] == "dimse-timeout" and record["echo"] == 1


def test_echo_peer_aborts(tmp_path: Path, echo_scp: Callable[..., int]) -> None:
    def abort(event: Any) -> int:
        event.assoc.abort()
        return 0x0000

    result = pacs_echo(tmp_path, f"PEER@127.0.0.1:{echo_scp(abort)}", "--count", "2")
    assert result.returncode == 3
    assert "the peer aborted the association" in result.stderr
    assert records(result)[-1]["error"]["code"] == "association-aborted"


def test_echo_peer_aborts_between_echoes(tmp_path: Path, echo_scp: Callable[..., int]) -> None:
    def then_abort(event: Any) -> int:
        threading.Timer(0.2, event.assoc.abort).start()
        return 0x0000

    result = pacs_echo(tmp_path, f"PEER@127.0.0.1:{echo_scp(then_abort)}", "--count", "2",
                       "--interval", "1")
    assert result.returncode == 3
    assert "the peer aborted the association" in result.stderr
    assert "before echo 2" in result.stderr
    assert "(1 of 2 echoes succeeded before)" in result.stderr  # how far a dropping link got
    assert [r["status"] for r in records(result)] == ["ok", "failed"]


# --- the peer answered with a failure: exit 4 ------------------------------------------------

def test_echo_failure_status(tmp_path: Path, echo_scp: Callable[..., int]) -> None:
    port = echo_scp(lambda event: 0x0122)
    result = pacs_echo(tmp_path, f"PEER@127.0.0.1:{port}", "--count", "3")
    assert result.returncode == 4
    assert "failure status 0x0122 (Refused: SOP Class Not Supported)" in result.stderr
    assert "(0 of 3 echoes succeeded before)" in result.stderr
    [record] = records(result)  # stops at the first failure
    assert record["status"] == "failed" and record["dimse_status"] == 0x0122
    assert record["error"]["code"] == "echo-failed"


# --- the core stays a library ----------------------------------------------------------------

def test_echo_core_does_not_load_cli_modules() -> None:
    code = ("import sys, pacscli.net.echo; "
            "assert not {'typer', 'rich'} & set(sys.modules), sorted(sys.modules)")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)



def test_echo_peer_with_a_tiny_maximum_pdu(tmp_path: Path) -> None:
    """An A-ASSOCIATE-AC whose maximum PDU length (4) cannot carry a PDV: a plain error,
    exit 3 (pynetdicom's ValueError came out as a traceback, exit 1)."""
    import struct

    from pacscli.net.pdu import Associate, PresentationContext, encode_ac

    accept = encode_ac(Associate("X", "PACSCLI", [PresentationContext(1, transfer_syntax=[
        "1.2.840.10008.1.2"], result=0)], max_pdu=4, implementation_class_uid="1.2.3.4"))
    port = _raw_peer(struct.pack(">BBI", 0x02, 0, len(accept)) + accept)
    result = pacs_echo(tmp_path, f"X@127.0.0.1:{port}", "--timeout", "5")
    assert result.returncode == 3 and "Traceback" not in result.stderr
    assert "maximum PDU length of 4 bytes, too small" in result.stderr


@pytest.mark.parametrize("rejection, says", [
    (bytes([0, 1, 1, 5]), "rejected permanent by the service user: reason 5 (reserved)"),
    (bytes([0, 2, 4, 1]), "rejected transient by the source 4 (not defined)"),
])
def test_echo_rejection_with_a_reserved_value(tmp_path: Path, rejection: bytes, says: str) -> None:
    """A rejection whose source or reason PS3.8 leaves reserved is still a rejection, decoded
    as sent (pynetdicom's thread died on it with a traceback, and the echo waited out the
    ACSE timeout to call it one)."""
    port = bad_peer(rejection=rejection)
    result = pacs_echo(tmp_path, f"X@127.0.0.1:{port}", "--timeout", "20")
    assert result.returncode == 3 and "Traceback" not in result.stderr, result.stderr
    assert says in result.stderr
    [record] = records(result)
    assert record["error"]["code"] == "association-rejected"


def test_echo_response_that_cannot_be_decoded(tmp_path: Path) -> None:
    """A C-ECHO answered with a command set of an unknown Command Field: said so, the
    association aborted (pynetdicom's thread died with a traceback, and the echo waited out
    the DIMSE timeout to blame a timeout)."""
    from pacscli.net.dimse import encode_command

    port = bad_peer(command=encode_command(CommandField=0x9999, CommandDataSetType=0x0101))
    result = pacs_echo(tmp_path, f"X@127.0.0.1:{port}", "--timeout", "20")
    assert result.returncode == 3 and "Traceback" not in result.stderr, result.stderr
    assert "the peer sent a command set that cannot be decoded (unknown Command Field 0x9999); " \
        "the association was aborted" in result.stderr
    [record] = records(result)
    assert record["error"]["code"] == "invalid-response" and record["rtt_ms"] < 10_000


def test_echo_response_with_padding_and_an_empty_element(tmp_path: Path) -> None:
    """What pynetdicom takes in, such as trailing padding and an empty count, is no reason to
    abort (the check of command sets once refused both)."""
    import struct

    from pacscli.net.dimse import encode_command

    response = encode_command(CommandField=0x8030, AffectedSOPClassUID=VERIFICATION,
                              MessageIDBeingRespondedTo=1, CommandDataSetType=0x0101, Status=0)
    empty_count = struct.pack("<HHI", 0x0000, 0x1020, 0)  # Number of Remaining Sub-operations
    port = bad_peer(command=response + empty_count + b"\x00\x00")
    result = pacs_echo(tmp_path, f"X@127.0.0.1:{port}", "--timeout", "20")
    assert result.returncode == 0, result.stderr
    assert records(result)[0]["status"] == "ok"
