"""Shared fixtures: free ports, pydicom's bundled test files, and real `pacs serve` processes."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from pydicom.data import get_testdata_file

# Bundled pydicom test files covering the transfer syntaxes and kinds the issues name.
TESTDATA = {
    "implicit_le": "MR_small_implicit.dcm",
    "explicit_le": "CT_small.dcm",
    "explicit_be": "MR_small_bigendian.dcm",
    "deflated": "image_dfl.dcm",
    "jpeg_baseline": "SC_rgb_jpeg_dcmtk.dcm",
    "jpeg_extended": "JPEG-lossy.dcm",
    "jpeg_lossless": "SC_rgb_jpeg_gdcm.dcm",
    "jpeg_ls": "MR_small_jpeg_ls_lossless.dcm",
    "jpeg_2000_lossless": "MR_small_jp2klossless.dcm",
    "jpeg_2000": "JPEG2000.dcm",
    "rle": "MR_small_RLE.dcm",
    "multiframe": "SC_rgb_rle_2frame.dcm",
    "multiframe_us": "examples_ybr_color.dcm",
    "sr": "test-SR.dcm",
    "rtdose": "rtdose.dcm",
}

DCMTK_ENV = {**os.environ, "TCP_NODELAY": "1"}


def testdata(name: str) -> Path:
    """Path of a pydicom bundled test file, by key of TESTDATA or by file name."""
    path = get_testdata_file(TESTDATA.get(name, name))
    assert path is not None, name
    return Path(path)


testdata.__test__ = False  # type: ignore[attr-defined]  # a helper, not a test


def bound_by_file_modes() -> list[str]:
    """A command prefix under which file modes hold: root reads and writes whatever a mode
    says (CAP_DAC_OVERRIDE), so as root the command runs with those capabilities dropped."""
    if os.geteuid() != 0:
        return []
    drop = "-dac_override,-dac_read_search"
    return ["setpriv", f"--bounding-set={drop}", f"--inh-caps={drop}", "--"]


def free_port() -> int:
    """A TCP port free on 127.0.0.1 right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_for_port(port: int, timeout: float = 20.0, proc: subprocess.Popen[bytes] | None = None) -> None:
    """Wait until something listens on 127.0.0.1:port."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"process exited with {proc.returncode} before listening")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.05)
    raise TimeoutError(f"nothing listening on port {port} after {timeout} s")


def pacs_cmd(*args: str) -> list[str]:
    """The command line running `pacs` with this interpreter."""
    return [sys.executable, "-m", "pacscli", *args]


@dataclass
class Server:
    """A running `pacs serve` subprocess."""

    proc: subprocess.Popen[bytes]
    port: int
    archive: Path
    aet: str = "PACSCLI"
    stdout_path: Path = field(default=Path())
    stderr_path: Path = field(default=Path())

    @property
    def remote(self) -> str:
        return f"{self.aet}@127.0.0.1:{self.port}"

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 20.0) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return int(self.proc.returncode)

    def stdout(self) -> str:
        return self.stdout_path.read_text()

    def stderr(self) -> str:
        return self.stderr_path.read_text()


def start_server(tmp: Path, *extra: str, archive: Path | None = None, aet: str = "PACSCLI",
                 port: int | None = None, env: dict[str, str] | None = None,
                 preexec: Callable[[], None] | None = None) -> Server:
    """Start `pacs serve` on a free loopback port and wait until it listens."""
    port = port or free_port()
    archive = archive or tmp / "archive"
    tmp.mkdir(parents=True, exist_ok=True)
    out = tmp / f"serve-{port}.out"
    err = tmp / f"serve-{port}.err"
    config = tmp / "config.toml"  # an empty config: the user's own never leaks into tests
    if not config.exists():
        config.write_text("")
    proc = subprocess.Popen(
        pacs_cmd("serve", "--archive", str(archive), "--aet", aet, "--port", str(port),
                 "--bind", "127.0.0.1", "--format", "jsonl", *extra),
        stdout=out.open("wb"), stderr=err.open("wb"), stdin=subprocess.DEVNULL,
        env={**os.environ, "PACS_CONFIG": str(config), **(env or {})}, preexec_fn=preexec,
    )
    try:
        wait_for_port(port, proc=proc)
    except Exception:
        proc.kill()
        raise RuntimeError(f"pacs serve did not start: {err.read_text()}") from None
    return Server(proc, port, archive, aet, out, err)


@pytest.fixture
def server(tmp_path: Path) -> Iterator[Server]:
    """A `pacs serve` on a free port over a fresh archive, stopped after the test."""
    srv = start_server(tmp_path / "serve")
    yield srv
    srv.stop()


# pynetdicom installs console scripts named like DCMTK's (storescp, echoscu...) that can come
# first on PATH: real peers are looked up in the system folders only.
SYSTEM_PATH = "/usr/bin:/bin:/usr/local/bin"


def require(tool: str) -> str:
    """The path of a DCMTK (or other system) tool, never pynetdicom's namesakes; fail loudly
    if it is missing (scripts/test installs it)."""
    path = shutil.which(tool, path=SYSTEM_PATH)
    if path is None:
        pytest.fail(f"{tool} is not installed: scripts/test installs dcmtk and dicom3tools")
    return path


# A DCMTK storescp association profile (`storescp -xf FILE CTOnly`) that accepts CT images in
# uncompressed syntaxes only: no Verification, no other class.
CT_ONLY_PROFILE = """\
[[TransferSyntaxes]]
[Uncompressed]
TransferSyntax1 = LocalEndianExplicit
TransferSyntax2 = LittleEndianImplicit
[[PresentationContexts]]
[CTOnly]
PresentationContext1 = CTImageStorage\\Uncompressed
[[Profiles]]
[CTOnly]
PresentationContexts = CTOnly
"""


def bad_peer(*, rejection: bytes | None = None, command: bytes | None = None) -> int:
    """A peer on a free port, for one connection, that answers the association request with
    the A-ASSOCIATE-RJ body `rejection` (result, source, reason as 4 bytes), or accepts every
    context in Implicit VR Little Endian and answers the first P-DATA with one PDV holding the
    command set `command`; then it holds the connection for 5 s. Gives its port."""
    import struct
    import threading

    from pacscli.net.pdu import Associate, PresentationContext, decode_rq, encode_ac

    listener = socket.create_server(("127.0.0.1", 0))

    def read(conn: socket.socket) -> bytes:
        header = conn.recv(6, socket.MSG_WAITALL)
        return conn.recv(struct.unpack(">I", header[2:])[0], socket.MSG_WAITALL)

    def serve() -> None:
        with listener, listener.accept()[0] as conn:
            conn.settimeout(10)
            request = decode_rq(read(conn))
            if rejection is not None:
                conn.sendall(struct.pack(">BBI", 0x03, 0, len(rejection)) + rejection)
            else:
                contexts = [PresentationContext(c.context_id, transfer_syntax=["1.2.840.10008.1.2"],
                                                result=0) for c in request.contexts]
                accept = encode_ac(Associate(request.called_ae_title, request.calling_ae_title,
                                             contexts, max_pdu=65536,
                                             implementation_class_uid="1.2.3.4"))
                conn.sendall(struct.pack(">BBI", 0x02, 0, len(accept)) + accept)
                context_id = read(conn)[4]
                pdv = struct.pack(">IBB", len(command or b"") + 2, context_id, 0x03) + (command or b"")
                conn.sendall(struct.pack(">BBI", 0x04, 0, len(pdv)) + pdv)
            time.sleep(5)

    threading.Thread(target=serve, daemon=True).start()
    return int(listener.getsockname()[1])
