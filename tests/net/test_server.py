"""The association server's protocol limits and failure handling, over real sockets.

A raw socket speaks the upper layer directly where a well-behaved SCU never would (PDUs over
the limits, a peer vanishing mid-dataset); pynetdicom SCUs play the normal peers.
"""

from __future__ import annotations

import json
import socket
import struct
import subprocess
import time
from pathlib import Path

import pydicom
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian
from pynetdicom import AE
from pynetdicom.pdu import A_ASSOCIATE_RQ
from pynetdicom.pdu_primitives import A_ASSOCIATE, MaximumLengthNotification
from pynetdicom.presentation import build_context
from pynetdicom.sop_class import Verification

from pacscli.archive.archive import Archive, IncomingInstance
from pacscli.dicom.identity import seek_dataset
from pacscli.net.dimse import C_STORE_RQ, HAS_DATASET, decode_command, encode_command
from pacscli.net.server import SPILL_THRESHOLD, ReceivedDataset
from tests.conftest import Server, pacs_cmd, start_server, testdata


def raw_associate(port: int, max_pdu: int = 16384) -> socket.socket:
    """Open a socket and negotiate CT Image Storage in Explicit VR LE by hand."""
    primitive = A_ASSOCIATE()
    primitive.application_context_name = "1.2.840.10008.3.1.1.1"
    primitive.calling_ae_title = "RAWPEER"
    primitive.called_ae_title = "PACSCLI"
    context = build_context(CTImageStorage, ExplicitVRLittleEndian)
    context.context_id = 1
    primitive.presentation_context_definition_list = [context]
    max_length = MaximumLengthNotification()
    max_length.maximum_length_received = max_pdu
    primitive.user_information = [max_length]
    pdu = A_ASSOCIATE_RQ()
    pdu.from_primitive(primitive)
    sock = socket.create_connection(("127.0.0.1", port), timeout=10)
    sock.sendall(pdu.encode())
    pdu_type, _ = read_pdu(sock)
    assert pdu_type == 0x02, "expected A-ASSOCIATE-AC"
    return sock


def read_pdu(sock: socket.socket) -> tuple[int, bytes]:
    header = b""
    while len(header) < 6:
        chunk = sock.recv(6 - len(header))
        if not chunk:
            return -1, b""
        header += chunk
    length = struct.unpack(">I", header[2:])[0]
    body = b""
    while len(body) < length:
        chunk = sock.recv(length - len(body))
        if not chunk:
            break
        body += chunk
    return header[0], body


def p_data(context_id: int, control: int, data: bytes) -> bytes:
    pdv = struct.pack(">IBB", len(data) + 2, context_id, control) + data
    return struct.pack(">BBI", 0x04, 0, len(pdv)) + pdv


def store_command(sop_uid: str) -> bytes:
    return encode_command(CommandField=C_STORE_RQ, AffectedSOPClassUID=CTImageStorage, MessageID=1,
                          Priority=0, CommandDataSetType=HAS_DATASET, AffectedSOPInstanceUID=sop_uid)


def test_p_data_over_our_maximum_is_aborted(server: Server) -> None:
    sock = raw_associate(server.port)
    # A P-DATA-TF that claims 2 MiB, more than the 1 MiB we advertised
    sock.sendall(struct.pack(">BBI", 0x04, 0, 2 * 1024 * 1024) + b"\x00" * 1024)
    pdu_type, body = read_pdu(sock)
    assert pdu_type == 0x07  # A-ABORT
    assert body[2:4] == bytes([2, 6])  # service provider, invalid PDU parameter value
    assert read_pdu(sock)[0] == -1  # and the connection is closed
    sock.close()


def test_associate_request_over_one_mib_is_aborted(server: Server) -> None:
    sock = socket.create_connection(("127.0.0.1", server.port), timeout=10)
    sock.sendall(struct.pack(">BBI", 0x01, 0, 2 * 1024 * 1024) + b"\x00" * 1024)
    assert read_pdu(sock)[0] == 0x07
    sock.close()


def test_peer_vanishing_mid_dataset_leaves_nothing(server: Server) -> None:
    ds = pydicom.dcmread(testdata("explicit_le"))
    with open(testdata("explicit_le"), "rb") as fp:
        from pacscli.dicom.identity import read_file_meta

        read_file_meta(fp)
        body = fp.read()
    for size in (len(body) // 2, 20 * 1024 * 1024):  # in memory, then spilled to staging
        sock = raw_associate(server.port)
        sock.sendall(p_data(1, 0x03, store_command(str(ds.SOPInstanceUID))))
        sent = 0
        piece = (body * (size // len(body) + 1))[:1_000_000]
        while sent < size:
            sock.sendall(p_data(1, 0x00, piece[: min(len(piece), size - sent)]))
            sent += len(piece)
        sock.close()  # gone without a word, mid-dataset
    time.sleep(0.5)
    assert not list(server.archive.rglob("*.dcm"))
    assert not [p for p in (server.archive / ".staging").rglob("*") if p.is_file()]
    # and the server still works
    assert server.proc.poll() is None
    ae = AE(ae_title="AFTER")
    ae.add_requested_context(Verification)
    assoc = ae.associate("127.0.0.1", server.port, ae_title="PACSCLI")
    assert assoc.is_established
    assoc.release()


def test_two_messages_in_one_p_data_pdu_are_both_served(tmp_path: Path, server: Server) -> None:
    """PDVs of the next message after the end of one, in the same P-DATA PDU (allowed by
    PS3.8, unusual in practice): both C-STOREs are stored and answered, in order."""
    sop_uids = ["1.2.826.0.1.3680043.2.1125.91.1", "1.2.826.0.1.3680043.2.1125.91.2"]
    pdvs = b""
    for sop_uid in sop_uids:
        ds = pydicom.dcmread(testdata("explicit_le"))
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = sop_uid
        ds.save_as(tmp_path / "one.dcm")
        with open(tmp_path / "one.dcm", "rb") as fp:
            seek_dataset(fp)
            dataset = fp.read()
        for control, data in ((0x03, store_command(sop_uid)), (0x02, dataset)):
            pdvs += struct.pack(">IBB", len(data) + 2, 1, control) + data
    sock = raw_associate(server.port)
    sock.sendall(struct.pack(">BBI", 0x04, 0, len(pdvs)) + pdvs)
    answered = []
    for _ in sop_uids:
        pdu_type, body = read_pdu(sock)
        assert pdu_type == 0x04
        command = decode_command(body[6:])
        answered.append((command.get("AffectedSOPInstanceUID"), command.number("Status")))
    sock.close()
    assert answered == [(uid, 0) for uid in sop_uids]
    assert sorted(p.stem for p in (server.archive / "studies").rglob("*.dcm")) == sop_uids


def test_association_limit_rejects_transiently(tmp_path: Path) -> None:
    config = tmp_path / "serve" / "config.toml"
    config.parent.mkdir(parents=True)
    config.write_text("[serve]\nmax_associations = 2\n")
    server = start_server(tmp_path / "serve")
    try:
        ae = AE(ae_title="HOLDER")
        ae.add_requested_context(Verification)
        held = [ae.associate("127.0.0.1", server.port, ae_title="PACSCLI") for _ in range(2)]
        assert all(a.is_established for a in held)
        result = subprocess.run(pacs_cmd("echo", f"PACSCLI@127.0.0.1:{server.port}", "--format", "jsonl"),
                                capture_output=True, text=True, timeout=60)
        assert result.returncode == 3
        assert "local limit exceeded" in result.stderr.lower()
        for assoc in held:
            assoc.release()
        ok = subprocess.run(pacs_cmd("echo", f"PACSCLI@127.0.0.1:{server.port}", "--format", "jsonl"),
                            capture_output=True, text=True, timeout=60)
        assert ok.returncode == 0, ok.stderr
        assert json.loads(ok.stdout.splitlines()[0])["status"] == "ok"
    finally:
        server.stop()


def _received(archive: Archive, data: bytes, fragments: list[int], sop_uid: str) -> ReceivedDataset:
    """Feed `data` to a ReceivedDataset as PDV fragments of the given sizes, written through
    to the archive file begun for `sop_uid`, as the association does."""
    receiving = archive.begin_received(sop_class_uid=CTImageStorage, sop_uid=sop_uid,
                                       transfer_syntax=ExplicitVRLittleEndian, source_aet="X")
    dataset = ReceivedDataset(archive.staging, bytearray(), receiving)
    source = memoryview(data)
    for size in fragments:
        def read_into(view: memoryview) -> None:
            nonlocal source
            view[:] = source[:len(view)]
            source = source[len(view):]
        dataset.receive(read_into, size)
    dataset.finish()
    return dataset


def test_a_dataset_in_memory_is_written_through_as_it_arrives(tmp_path: Path) -> None:
    """Fragments larger than a step are handed on in steps; the sink's file is the header
    followed by exactly the dataset's bytes, and discarding the message leaves no file."""
    archive = Archive(tmp_path / "archive")
    data = bytes(range(256)) * 2000  # 512,000 bytes, several steps
    dataset = _received(archive, data, [100, len(data) - 100], "1.2.3")
    assert isinstance(dataset.sink, IncomingInstance)
    receiving = dataset.sink.file
    assert dataset.content() == data
    assert receiving.written()  # the association's finish() after the last fragment
    assert receiving.path.read_bytes() == receiving.header + data
    dataset.discard()
    assert not receiving.path.exists()
    archive.close()


def test_a_dataset_spilled_to_a_file_drops_its_sink(tmp_path: Path) -> None:
    """A dataset past the in-memory threshold goes to its spill file only."""
    archive = Archive(tmp_path / "archive")
    data = b"\x01" * (SPILL_THRESHOLD + 10)
    dataset = _received(archive, data, [SPILL_THRESHOLD, 10], "1.2.4")
    assert dataset.sink is None
    spilled = dataset.content()
    assert isinstance(spilled, Path) and spilled.stat().st_size == len(data)
    dataset.discard()
    assert not [p for p in archive.staging.iterdir() if p.stat().st_size]
    archive.close()
