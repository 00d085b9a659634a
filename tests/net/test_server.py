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
from pacscli.archive.staging import OWNER_LOCK
from pacscli.dicom.identity import seek_dataset
from pacscli.net.dimse import C_STORE_RQ, HAS_DATASET, decode_command, encode_command
from pacscli.net.server import SPILL_THRESHOLD, ReceivedDataset
from tests.conftest import Server, pacs_cmd, start_server, testdata
from tests.dicom_files import write_instance


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
    assert not [p for p in (server.archive / ".staging").rglob("*")
                if p.is_file() and p.name != OWNER_LOCK]  # the live server's own lock file apart
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
    assert bytes(dataset.content()) == data  # type: ignore[arg-type]  # a view here, not a path
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


def _echo_works(port: int) -> bool:
    ae = AE(ae_title="AFTER")
    ae.add_requested_context(Verification)
    assoc = ae.associate("127.0.0.1", port, ae_title="PACSCLI")
    if not assoc.is_established:
        return False
    status = assoc.send_c_echo()
    assoc.release()
    return bool(status) and status.Status == 0


def test_a_pdu_claiming_gigabytes_is_never_read(server: Server) -> None:
    """A-RELEASE-RQ and A-ABORT bodies are 4 bytes: one claiming 1.5 GB, before or after the
    association is made, is aborted at its header. It used to be read whole, into memory
    (two such connections took serve to 3 GB)."""
    for associated in (False, True):
        sock = raw_associate(server.port) if associated else \
            socket.create_connection(("127.0.0.1", server.port), timeout=10)
        sock.sendall(struct.pack(">BBI", 0x05, 0, 1_500_000_000) + b"\x00" * 65536)
        assert read_pdu(sock)[0] == 0x07  # A-ABORT, at once
        sock.close()
    status = Path(f"/proc/{server.proc.pid}/status")
    rss_kb = next(int(line.split()[1]) for line in status.read_text().splitlines()
                  if line.startswith("VmRSS"))
    assert rss_kb < 300_000
    assert _echo_works(server.port)


def test_command_fragments_without_end_are_aborted(server: Server) -> None:
    """Command PDVs that never say "last": aborted past 64 KiB (they piled up without
    bound, 1 GB for 60,000 of them)."""
    sock = raw_associate(server.port)
    fragment = p_data(1, 0x01, b"\x00" * 16_000)
    answer = -1
    for _ in range(10):
        try:
            sock.sendall(fragment)
        except OSError:
            break
    answer = read_pdu(sock)[0]
    sock.close()
    assert answer == 0x07
    assert _echo_works(server.port)


def _trickle(sock: socket.socket, data: bytes, give_up: float = 10.0) -> tuple[bool, float]:
    """Send `data` a byte every half second until the server answers or closes (dropped),
    or `give_up` s pass; and the seconds it took."""
    import select

    started = time.monotonic()
    for byte in data:
        if select.select([sock], [], [], 0.5)[0] or time.monotonic() - started > give_up:
            return True, time.monotonic() - started  # an A-ABORT came, or the connection closed
        try:
            sock.sendall(bytes([byte]))
        except OSError:
            return True, time.monotonic() - started
    return False, time.monotonic() - started


def test_an_association_request_must_come_within_the_acse_timeout(tmp_path: Path) -> None:
    """[network] acse_timeout bounds the whole A-ASSOCIATE-RQ: a peer sending a byte every
    half second is dropped (it was timed per read, so it could stay for ever)."""

    config = tmp_path / "serve" / "config.toml"
    config.parent.mkdir(parents=True)
    config.write_text("[network]\nacse_timeout = 1.5\n")
    server = start_server(tmp_path / "serve")
    try:
        sock = socket.create_connection(("127.0.0.1", server.port), timeout=10)
        dropped, waited = _trickle(sock, struct.pack(">BBI", 0x01, 0, 300) + b"\x00" * 300)
        assert dropped and waited < 4
        sock.close()
    finally:
        server.stop()


def test_a_pdu_trickled_byte_by_byte_is_cut_after_the_network_timeout(tmp_path: Path) -> None:
    """Once associated, each read was timed, not each PDU: a P-DATA sent a byte every half
    second held its association (and a slot of max_associations) for as long as it liked.
    A PDU now has the network timeout, counted from its first byte, to arrive (plus a
    second per KiB it holds: these few bytes get none)."""
    config = tmp_path / "serve" / "config.toml"
    config.parent.mkdir(parents=True)
    config.write_text("[network]\nnetwork_timeout = 1.5\n")
    server = start_server(tmp_path / "serve")
    try:
        sock = raw_associate(server.port)
        dropped, waited = _trickle(sock, p_data(1, 0x03, store_command("1.2.3")))
        sock.close()
    finally:
        server.stop()
    assert dropped and waited < 1.5 * 2 + 1, waited  # its own timeout and one read's at most
    assert "a PDU came slower than 1024 bytes/s, past the 1.5 s network timeout" in \
        server.stderr()


def test_a_slow_but_steady_sender_is_not_cut(tmp_path: Path) -> None:
    """A PDU of 64 KiB sent at 16 KiB/s takes 4 s, over a network timeout of 1.5 s: the
    first version of the PDU deadline cut it (a slow link's sender, filling our maximum
    PDU, was aborted after the network timeout). A PDU now has a second per KiB more."""
    config = tmp_path / "serve" / "config.toml"
    config.parent.mkdir(parents=True)
    config.write_text("[network]\nnetwork_timeout = 1.5\n")
    source = write_instance(tmp_path / "slow.dcm", rows=180)  # 64 KiB of pixel data
    ds = pydicom.dcmread(source)
    with open(source, "rb") as fp:
        seek_dataset(fp)
        dataset = fp.read()
    server = start_server(tmp_path / "serve")
    try:
        sock = raw_associate(server.port)
        sock.sendall(p_data(1, 0x03, store_command(str(ds.SOPInstanceUID))))
        pdu = p_data(1, 0x02, dataset)
        started = time.monotonic()
        for at in range(0, len(pdu), 4096):
            sock.sendall(pdu[at:at + 4096])
            time.sleep(0.25)
        pdu_type, _ = read_pdu(sock)
        sock.close()
    finally:
        server.stop()
    assert time.monotonic() - started > 3
    assert pdu_type == 0x04  # the C-STORE response
    assert '"outcome":"stored"' in server.stdout()


def test_requests_arriving_together_respect_max_associations(tmp_path: Path) -> None:
    """20 A-ASSOCIATE-RQs at once with max_associations = 2: two accepted, the rest
    rejected (the count came before the counting, so 4 or 8 got in)."""
    import threading

    config = tmp_path / "serve" / "config.toml"
    config.parent.mkdir(parents=True)
    config.write_text("[serve]\nmax_associations = 2\n")
    server = start_server(tmp_path / "serve")
    results: list[int] = []
    held: list[socket.socket] = []
    lock = threading.Lock()
    go = threading.Barrier(20)

    def request() -> None:
        go.wait()
        try:
            sock = raw_associate(server.port)
        except AssertionError:
            with lock:
                results.append(0x03)
            return
        with lock:
            results.append(0x02)
            held.append(sock)

    threads = [threading.Thread(target=request) for _ in range(20)]
    try:
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(30)
        assert results.count(0x02) == 2 and results.count(0x03) == 18
    finally:
        for sock in held:
            sock.close()
        server.stop()


def test_serve_outlives_running_out_of_descriptors(tmp_path: Path) -> None:
    """With few descriptors (a low ulimit -n), a flood of bare connections: serve refuses
    what it cannot take, and answers again once they close (its accept loop died, leaving
    a process that ran but never answered)."""
    import resource

    def few_descriptors() -> None:
        resource.setrlimit(resource.RLIMIT_NOFILE, (96, 96))

    port_server = start_server(tmp_path / "serve", preexec=few_descriptors)
    flood = []
    try:
        for _ in range(150):
            try:
                flood.append(socket.create_connection(("127.0.0.1", port_server.port), timeout=5))
            except OSError:
                break
        time.sleep(1)
        for sock in flood:
            sock.close()
        time.sleep(1.5)
        assert port_server.proc.poll() is None
        assert _echo_works(port_server.port)
    finally:
        for sock in flood:
            sock.close()
        port_server.stop()


def test_a_c_cancel_after_the_last_response_is_ignored(server: Server) -> None:
    """A C-CANCEL that crosses the final C-FIND response (a normal race for a client
    cancelling): the association goes on. serve used to abort it as an unknown command."""
    from pynetdicom.sop_class import StudyRootQueryRetrieveInformationModelFind

    ae = AE(ae_title="CANCELLER")
    ae.add_requested_context(StudyRootQueryRetrieveInformationModelFind)
    ae.add_requested_context(Verification)
    assoc = ae.associate("127.0.0.1", server.port, ae_title="PACSCLI")
    assert assoc.is_established
    query = pydicom.Dataset()
    query.QueryRetrieveLevel, query.StudyInstanceUID = "STUDY", ""
    responses = list(assoc.send_c_find(query, StudyRootQueryRetrieveInformationModelFind, msg_id=7))
    assert responses[-1][0].Status == 0
    context_id = next(c.context_id for c in assoc.accepted_contexts
                      if c.abstract_syntax == StudyRootQueryRetrieveInformationModelFind)
    assoc.send_c_cancel(7, context_id)
    status = assoc.send_c_echo()
    assert status and status.Status == 0 and assoc.is_established
    assoc.release()


def test_a_context_id_proposed_twice_is_refused_and_roles_follow_accepted_contexts(
        server: Server) -> None:
    """The second context with ID 1 is refused (it took the first one's place), and a role
    for a SOP class with no accepted context is not answered (it was echoed back)."""
    from pacscli.net.pdu import Associate, PresentationContext, decode_ac, encode_rq

    request = Associate("PACSCLI", "RAWPEER", [
        PresentationContext(1, CTImageStorage, [ExplicitVRLittleEndian]),
        PresentationContext(1, Verification, ["1.2.840.10008.1.2"]),
        PresentationContext(3, Verification, ["1.2.840.10008.1.2"]),
    ], max_pdu=16384, roles={CTImageStorage: (True, True), "1.2.3.4.5": (True, True)})
    body = encode_rq(request)
    sock = socket.create_connection(("127.0.0.1", server.port), timeout=10)
    sock.sendall(struct.pack(">BBI", 0x01, 0, len(body)) + body)
    pdu_type, answer = read_pdu(sock)
    sock.close()
    assert pdu_type == 0x02
    accept = decode_ac(answer)
    assert [(c.context_id, c.result) for c in accept.contexts] == [(1, 0), (1, 2), (3, 0)]
    assert set(accept.roles) == {CTImageStorage}


def test_thousands_of_repeated_context_ids_are_logged_once(tmp_path: Path) -> None:
    """A request of 2,000 contexts all with ID 1 wrote 1,999 warning lines."""
    from pacscli.net.pdu import Associate, PresentationContext, encode_rq

    request = Associate("PACSCLI", "RAWPEER", [
        PresentationContext(1, Verification, ["1.2.840.10008.1.2"]) for _ in range(2000)],
        max_pdu=16384)
    body = encode_rq(request)
    server = start_server(tmp_path / "serve")
    try:
        with socket.create_connection(("127.0.0.1", server.port), timeout=10) as sock:
            sock.sendall(struct.pack(">BBI", 0x01, 0, len(body)) + body)
            assert read_pdu(sock)[0] == 0x02
    finally:
        server.stop()
    stderr = server.stderr()
    assert stderr.count("presentation context") == 1, stderr
    assert "proposed 1999 presentation contexts with an ID used before or even (1): refused" \
        in stderr


def test_a_message_split_over_two_contexts_is_aborted(server: Server) -> None:
    """The command on one presentation context and its dataset on another (PS3.8 9.3.5.1
    wants one context a message): aborted, nothing stored. It was stored as success."""
    from pacscli.net.pdu import Associate, PresentationContext, encode_rq

    request = Associate("PACSCLI", "RAWPEER", [
        PresentationContext(1, CTImageStorage, [ExplicitVRLittleEndian]),
        PresentationContext(3, CTImageStorage, [ExplicitVRLittleEndian]),
    ], max_pdu=16384)
    body = encode_rq(request)
    sock = socket.create_connection(("127.0.0.1", server.port), timeout=10)
    sock.sendall(struct.pack(">BBI", 0x01, 0, len(body)) + body)
    assert read_pdu(sock)[0] == 0x02
    ds = pydicom.dcmread(testdata("explicit_le"))
    with open(testdata("explicit_le"), "rb") as fp:
        seek_dataset(fp)
        dataset = fp.read()
    sock.sendall(p_data(1, 0x03, store_command(str(ds.SOPInstanceUID))) + p_data(3, 0x02, dataset))
    assert read_pdu(sock)[0] == 0x07
    sock.close()
    time.sleep(0.3)
    assert not list(server.archive.rglob("*.dcm"))


def test_a_release_request_in_the_middle_of_a_message_is_aborted(server: Server) -> None:
    """Half a dataset, then A-RELEASE-RQ: the connection was dropped without a word; now an
    A-ABORT (unexpected PDU), as any other protocol error gets. Nothing is stored."""
    ds = pydicom.dcmread(testdata("explicit_le"))
    with open(testdata("explicit_le"), "rb") as fp:
        seek_dataset(fp)
        dataset = fp.read()
    sock = raw_associate(server.port)
    sock.sendall(p_data(1, 0x03, store_command(str(ds.SOPInstanceUID)))
                 + p_data(1, 0x00, dataset[:len(dataset) // 2]))
    sock.sendall(struct.pack(">BBI", 0x05, 0, 4) + bytes(4))
    assert read_pdu(sock) == (0x07, bytes([0, 0, 2, 2]))  # service provider, unexpected PDU
    sock.close()
    time.sleep(0.3)
    assert not list(server.archive.rglob("*.dcm"))
