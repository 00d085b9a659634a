"""`pacs serve` against real senders: DCMTK's dcmsend/storescu/echoscu and pynetdicom SCUs."""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import time
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid
from pynetdicom import AE

from scripts.benchdata import make_ct_series
from tests.conftest import (
    DCMTK_ENV,
    TESTDATA,
    Server,
    free_port,
    pacs_cmd,
    require,
    start_server,
    testdata,
    wait_for_port,
)
from tests.dicom_files import write_non_ascii_sop_class


def records(server: Server) -> list[dict[str, object]]:
    return [json.loads(line) for line in server.stdout().splitlines() if line.strip()]


def index_rows(archive: Path) -> list[tuple[str, str, int, str]]:
    with sqlite3.connect(archive / "index.sqlite") as conn:
        return conn.execute("SELECT SOPInstanceUID, path, size, sha256 FROM instances").fetchall()


def archived_files(archive: Path) -> list[Path]:
    return sorted(p for p in (archive / "studies").rglob("*") if p.is_file())


def dcmsend(server: Server, *paths: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [require("dcmsend"), "-aec", server.aet, "127.0.0.1", str(server.port), *map(str, paths)],
        capture_output=True, text=True, env=DCMTK_ENV, timeout=120,
    )


def make_pdf(folder: Path) -> Path:
    """An Encapsulated PDF instance (pydicom ships none)."""
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.104.1"
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID = meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID
    ds.StudyInstanceUID, ds.SeriesInstanceUID = generate_uid(), generate_uid()
    ds.PatientName, ds.PatientID, ds.Modality = "PDF^Test", "PDF1", "DOC"
    ds.MIMETypeOfEncapsulatedDocument = "application/pdf"
    ds.EncapsulatedDocument = b"%PDF-1.4\n1 0 obj<<>>endobj\ntrailer<<>>\n%%EOF\n"
    path = folder / "pdf.dcm"
    ds.save_as(path, enforce_file_format=True)
    return path


def assert_same_dataset(stored: Dataset, sent: Dataset, name: str) -> None:
    """Every element equal; when the sender converted between uncompressed syntaxes (DCMTK
    turns big endian into little endian), the pixel values rather than the bytes."""
    sent.pop(0xFFFCFFFC, None)  # DCMTK drops Data Set Trailing Padding when it sends
    if stored.file_meta.TransferSyntaxUID != sent.file_meta.TransferSyntaxUID and "PixelData" in sent:
        assert np.array_equal(stored.pixel_array, sent.pixel_array), name
        del stored.PixelData, sent.PixelData
    # Values, not VRs: DCMTK sends encapsulated pixel data that a file calls OW as OB.
    assert [e.tag for e in stored] == [e.tag for e in sent], name
    for elem in sent:
        assert stored[elem.tag].value == elem.value, f"{name}: {elem.tag} differs"


def test_echoscu_against_serve(server: Server) -> None:
    result = subprocess.run([require("echoscu"), "-aec", "PACSCLI", "127.0.0.1", str(server.port)],
                            capture_output=True, text=True, timeout=30)
    assert result.returncode == 0, result.stderr


def test_dcmsend_every_transfer_syntax_is_archived_as_sent(tmp_path: Path) -> None:
    # Several test files share SOP Instance UIDs: with on_conflict=replace each send replaces
    # the last, so each file is checked right after it arrives.
    server = start_server(tmp_path / "serve", "--on-conflict", "replace")
    try:
        files = [testdata(key) for key in TESTDATA] + [make_pdf(tmp_path)]
        for path in files:
            result = dcmsend(server, path)
            assert result.returncode == 0, f"{path.name}: {result.stderr}"
            sent = pydicom.dcmread(path)
            sop_uid = str(sent.SOPInstanceUID).strip()
            rows = [r for r in index_rows(server.archive) if r[0] == sop_uid]
            assert len(rows) == 1, path.name
            stored = pydicom.dcmread(server.archive / rows[0][1])
            if sent.file_meta.TransferSyntaxUID.is_compressed:
                # DCMTK may convert between uncompressed syntaxes; compressed data must stay.
                assert stored.file_meta.TransferSyntaxUID == sent.file_meta.TransferSyntaxUID
            assert_same_dataset(stored, sent, path.name)
            assert stored.file_meta.SourceApplicationEntityTitle.strip() == "DCMSEND"
    finally:
        assert server.stop() == 0
    recs = records(server)
    assert recs and all(r["status"] == "ok" for r in recs), recs
    assert not list((server.archive / ".staging").rglob("*.dcm"))


def test_received_file_keeps_the_dataset_bytes(server: Server) -> None:
    """Stored as received: the bytes after our file meta are exactly the ones on the wire.

    pynetdicom's chunked send puts a file's dataset bytes on the wire unchanged (DCMTK
    re-encodes, dropping trailing padding), so the comparison is with the file itself.
    """
    from pynetdicom import _config

    path = testdata("jpeg_2000")
    _config.STORE_SEND_CHUNKED_DATASET = True
    try:
        ae = AE(ae_title="MODALITY")
        ae.add_requested_context(pydicom.dcmread(path).SOPClassUID,
                                 pydicom.dcmread(path).file_meta.TransferSyntaxUID)
        assoc = ae.associate("127.0.0.1", server.port, ae_title="PACSCLI")
        assert assoc.send_c_store(path).Status == 0x0000
        assoc.release()
    finally:
        _config.STORE_SEND_CHUNKED_DATASET = False
    (_, rel, size, _), = index_rows(server.archive)
    stored_path = server.archive / rel
    original_body = path.read_bytes()[_dataset_offset(path):]
    assert stored_path.read_bytes()[_dataset_offset(stored_path):] == original_body
    assert size == stored_path.stat().st_size


def test_dicom_json_adds_each_received_datasets_model(tmp_path: Path) -> None:
    """`serve --dicom-json`: each record carries its archived file's dataset, as PS3.18 JSON."""
    from pacscli.dicom.json_model import file_json

    srv = start_server(tmp_path / "serve", "--dicom-json")
    try:
        assert dcmsend(srv, testdata("explicit_le")).returncode == 0
    finally:
        srv.stop()
    [record] = records(srv)
    assert record["dicom"] == file_json(Path(str(record["path"])))
    assert record["dicom"]["00080018"]["Value"] == [record["SOPInstanceUID"]]  # type: ignore[index]


def _dataset_offset(path: Path) -> int:
    from pacscli.dicom.identity import read_file_meta

    with path.open("rb") as fp:
        return read_file_meta(fp)[1]


def test_resend_is_idempotent_and_conflict_policy_keep(server: Server, tmp_path: Path) -> None:
    path = testdata("explicit_le")
    assert dcmsend(server, path).returncode == 0
    assert dcmsend(server, path).returncode == 0
    changed = pydicom.dcmread(path)
    changed.PatientName = "Changed^Name"
    changed_path = tmp_path / "changed.dcm"
    changed.save_as(changed_path)
    assert dcmsend(server, changed_path).returncode == 0
    time.sleep(0.3)
    outcomes = [r["outcome"] for r in records(server)]
    assert outcomes == ["stored", "duplicate", "kept"]
    assert records(server)[2]["status"] == "warning"
    (_, rel, _, _), = index_rows(server.archive)
    assert str(pydicom.dcmread(server.archive / rel).PatientName) == "CompressedSamples^CT1"
    assert len(archived_files(server.archive)) == 1


def test_conflict_policy_replace_keeps_the_old_version_aside(tmp_path: Path) -> None:
    server = start_server(tmp_path / "serve", "--on-conflict", "replace")
    try:
        path = testdata("explicit_le")
        changed = pydicom.dcmread(path)
        changed.PatientName = "Changed^Name"
        changed.save_as(tmp_path / "changed.dcm")
        assert dcmsend(server, path).returncode == 0
        assert dcmsend(server, tmp_path / "changed.dcm").returncode == 0
        (_, rel, _, _), = index_rows(server.archive)
        assert str(pydicom.dcmread(server.archive / rel).PatientName) == "Changed^Name"
        aside = list((server.archive / ".replaced").iterdir())
        assert len(aside) == 1
        assert str(pydicom.dcmread(aside[0]).PatientName) == "CompressedSamples^CT1"
    finally:
        server.stop()
    assert [r["outcome"] for r in records(server)] == ["stored", "replaced"]


def test_a_truncated_dataset_is_refused_and_replaces_nothing(tmp_path: Path) -> None:
    """A file cut inside its pixel data, sent as it is (pynetdicom's chunked send puts the
    file's bytes on the wire): 0xC000 and a failed record, even under --on-conflict replace
    after a whole copy; the whole copy stays. pydicom itself reads such a file without
    complaint, so only a walk of the element lengths tells."""
    from pynetdicom import _config

    path = testdata("explicit_le")
    data = path.read_bytes()
    cut = tmp_path / "cut.dcm"
    cut.write_bytes(data[:len(data) - 1000])
    pydicom.dcmread(cut)  # no complaint
    server = start_server(tmp_path / "serve", "--on-conflict", "replace")
    _config.STORE_SEND_CHUNKED_DATASET = True
    try:
        ds = pydicom.dcmread(path, stop_before_pixels=True)
        ae = AE(ae_title="MODALITY")
        ae.add_requested_context(ds.SOPClassUID, ds.file_meta.TransferSyntaxUID)
        assoc = ae.associate("127.0.0.1", server.port, ae_title="PACSCLI")
        assert assoc.send_c_store(path).Status == 0x0000
        assert assoc.send_c_store(cut).Status == 0xC000
        assoc.release()
        time.sleep(0.3)
    finally:
        _config.STORE_SEND_CHUNKED_DATASET = False
        server.stop()
    whole, refused = records(server)
    assert whole["outcome"] == "stored"
    assert refused["status"] == "failed" and refused["dimse_status"] == 0xC000
    assert refused["outcome"] == "failed"
    assert "truncated" in str(refused["error"])
    (_, rel, _, _), = index_rows(server.archive)
    assert (server.archive / rel).read_bytes()[-1000:] == data[-1000:]
    assert not (server.archive / ".replaced").exists()
    assert archived_files(server.archive) == [server.archive / rel]


def test_a_sop_class_uid_that_is_not_a_uid_is_refused_and_the_association_goes_on(
        tmp_path: Path) -> None:
    """A dataset whose SOP Class UID holds non-ASCII bytes (its file meta's is right): the
    file meta could not be written, and the handler's traceback aborted dcmsend's
    association, the next file with it. Now 0xC000 and a failed record; the next is stored."""
    bad = write_non_ascii_sop_class(tmp_path / "bad.dcm")
    server = start_server(tmp_path / "serve")
    try:
        result = dcmsend(server, bad, testdata("explicit_le"))
    finally:
        server.stop()
    assert "Peer aborted" not in result.stdout + result.stderr
    refused, stored = records(server)
    assert refused["status"] == "failed" and refused["dimse_status"] == 0xC000
    assert str(refused["error"]).count("is not a UID") == 1
    assert stored["outcome"] == "stored"
    assert "Traceback" not in server.stderr()
    assert len(index_rows(server.archive)) == 1


def test_a_value_pydicom_finds_odd_is_said_once(tmp_path: Path) -> None:
    """pydicom logs an odd value, then warns the same words as a UserWarning with a line of
    its own source: three lines on serve's stderr for one value. Now its one log line."""
    data = bytearray(testdata("CT_small.dcm").read_bytes())
    at = data.index(b"\x20\x00\x13\x00IS")  # InstanceNumber, 2 bytes long
    data[at + 8:at + 10] = b"1J"
    (tmp_path / "odd.dcm").write_bytes(bytes(data))
    server = start_server(tmp_path / "serve")
    try:
        assert dcmsend(server, tmp_path / "odd.dcm").returncode == 0
    finally:
        server.stop()
    assert records(server)[0]["outcome"] == "stored"
    stderr = server.stderr()
    assert stderr.count("Invalid value for VR IS: '1J'") == 1, stderr
    assert "UserWarning" not in stderr


@pytest.mark.parametrize("field,value", [
    ("StudyInstanceUID", "../../x"),
    ("SeriesInstanceUID", ".."),
    ("SOPInstanceUID", "1.2/3"),
    ("StudyInstanceUID", "1." + "2" * 63),
    ("SeriesInstanceUID", "1..2"),
])
def test_unsafe_uids_are_refused_and_nothing_is_written(tmp_path: Path, server: Server,
                                                        field: str, value: str) -> None:
    ds = pydicom.dcmread(testdata("explicit_le"))
    setattr(ds, field, value)
    before = {p for p in tmp_path.rglob("*") if ".staging" not in p.parts}
    ae = AE(ae_title="EVIL")
    ae.add_requested_context(CTImageStorage, ExplicitVRLittleEndian)
    assoc = ae.associate("127.0.0.1", server.port, ae_title="PACSCLI")
    assert assoc.is_established
    status = assoc.send_c_store(ds)
    assoc.release()
    assert status.Status == 0xC000
    after = {p for p in tmp_path.rglob("*") if ".staging" not in p.parts}
    new = {p for p in after - before if p.name not in {"index.sqlite-wal", "index.sqlite-shm"}}
    assert new == set(), new
    assert index_rows(server.archive) == []
    # staging may hold empty files made ahead, nothing written
    assert not [p for p in (server.archive / ".staging").rglob("*") if p.is_file() and p.stat().st_size]
    time.sleep(0.2)
    (record,) = records(server)
    assert record["status"] == "failed" and record["error"]["code"] == "unsafe-uid"  # type: ignore[index]


def test_dirty_uids_are_stored_under_the_datasets_own_uid(tmp_path: Path, server: Server) -> None:
    """Leading zeros and space padding are tolerated; the dataset's UID names the instance."""
    ds = pydicom.dcmread(testdata("explicit_le"))
    ds.SOPInstanceUID = "1.2.03.4 "
    ds.SeriesInstanceUID = "1.2.3.005"
    ae = AE(ae_title="MODALITY")
    ae.add_requested_context(CTImageStorage, ExplicitVRLittleEndian)
    assoc = ae.associate("127.0.0.1", server.port, ae_title="PACSCLI")
    # The command names another instance than the dataset, as broken devices do.
    ds.file_meta.MediaStorageSOPInstanceUID = "1.2.999"
    status = assoc.send_c_store(ds)
    assoc.release()
    assert status.Status == 0x0000
    (sop, rel, _, _), = index_rows(server.archive)
    assert sop == "1.2.03.4"
    stored = pydicom.dcmread(server.archive / rel)
    assert stored.file_meta.MediaStorageSOPInstanceUID == "1.2.03.4"
    assert rel.endswith("/1.2.3.005/1.2.03.4.dcm")


def test_eight_concurrent_senders(tmp_path: Path, server: Server) -> None:
    folders = []
    for sender in range(8):
        folder = tmp_path / f"sender{sender}"
        make_ct_series(folder, 200, rows=16, cols=16)
        folders.append(folder)
    procs = [
        subprocess.Popen(
            [require("storescu"), "-aet", f"SENDER{n}", "-aec", "PACSCLI", "127.0.0.1",
             str(server.port), "+sd", str(folder), "+sp", "*.dcm"],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=DCMTK_ENV)
        for n, folder in enumerate(folders)
    ]
    for proc in procs:
        _, err = proc.communicate(timeout=300)
        assert proc.returncode == 0, err
    rows = index_rows(server.archive)
    assert len(rows) == 1600
    assert len({r[0] for r in rows}) == 1600
    assert len(archived_files(server.archive)) == 1600
    assert server.stop() == 0
    recs = records(server)
    assert len(recs) == 1600 and all(r["status"] == "ok" for r in recs)


def test_sigkill_mid_transfer_leaves_no_partial_file(tmp_path: Path) -> None:
    big = tmp_path / "big"
    make_ct_series(big, 1, rows=8192, cols=8192)  # one 128 MiB instance
    small = tmp_path / "small"
    make_ct_series(small, 3, rows=16, cols=16)
    archive = tmp_path / "archive"
    server = start_server(tmp_path / "serve1", archive=archive)
    assert dcmsend(server, *sorted(small.iterdir())).returncode == 0
    sender = subprocess.Popen(
        [require("dcmsend"), "-aec", "PACSCLI", "127.0.0.1", str(server.port),
         str(next(big.iterdir()))], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        env=DCMTK_ENV)
    deadline = time.monotonic() + 60
    [staging] = (archive / ".staging").glob(f"{server.proc.pid}-*")
    while time.monotonic() < deadline:
        partial = [p for p in staging.glob("*.dcm") if p.stat().st_size > 1_000_000]
        if partial:
            break
        time.sleep(0.01)
    else:
        pytest.fail("the big instance never started to arrive")
    server.proc.send_signal(signal.SIGKILL)
    server.proc.wait()
    sender.communicate(timeout=60)
    restarted = start_server(tmp_path / "serve2", archive=archive)
    try:
        rows = index_rows(archive)
        files = archived_files(archive)
        assert len(rows) == 3 and len(files) == 3
        assert {archive / r[1] for r in rows} == set(files)
        for _, rel, size, _ in rows:
            assert (archive / rel).stat().st_size == size
        # the dead process's staging folder is cleaned when the archive is opened again
        assert not staging.exists()
    finally:
        restarted.stop()


def test_sigterm_lets_the_transfer_in_flight_finish(tmp_path: Path) -> None:
    big = tmp_path / "big"
    make_ct_series(big, 1, rows=4096, cols=4096)  # 32 MiB
    server = start_server(tmp_path / "serve")
    sender = subprocess.Popen(
        [require("dcmsend"), "-aec", "PACSCLI", "127.0.0.1", str(server.port),
         str(next(big.iterdir()))], stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=DCMTK_ENV)
    [staging] = (server.archive / ".staging").glob(f"{server.proc.pid}-*")
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and not any(
            p.stat().st_size > 0 for p in staging.glob("*.dcm")):
        time.sleep(0.005)
    started = time.monotonic()
    server.proc.send_signal(signal.SIGTERM)
    _, err = sender.communicate(timeout=60)
    assert sender.returncode == 0, err
    assert server.proc.wait(timeout=15) == 0
    assert time.monotonic() - started < 15
    assert len(index_rows(server.archive)) == 1


def test_sigterm_aborts_an_idle_association_after_the_grace(tmp_path: Path) -> None:
    """A sender that keeps its association open and idle: serve waits 12 s, aborts it
    between messages with a warning, and exits 0 within 15 s."""
    server = start_server(tmp_path / "serve")
    ae = AE(ae_title="IDLE")
    ae.add_requested_context("1.2.840.10008.1.1")
    assoc = ae.associate("127.0.0.1", server.port, ae_title="PACSCLI")
    assert assoc.is_established
    started = time.monotonic()
    server.proc.send_signal(signal.SIGTERM)
    try:
        assert server.proc.wait(timeout=15) == 0
    finally:
        assoc.abort()
    assert 12 <= time.monotonic() - started < 15
    assert server.stderr().count("aborting association with") == 1
    assert "after the 12 s grace" in server.stderr()
    assert "lost:" not in server.stderr()  # the abort is said once, not again as a loss


def serve_into_a_pipe(tmp_path: Path) -> tuple[subprocess.Popen[bytes], int]:
    """`pacs serve` with its stdout a pipe for the test to read or not, stderr in
    tmp_path/err; once it listens: the process and its port."""
    (tmp_path / "config.toml").write_text("")
    port = free_port()
    proc = subprocess.Popen(
        pacs_cmd("serve", "--archive", str(tmp_path / "archive"), "--port", str(port),
                 "--bind", "127.0.0.1", "--format", "jsonl"),
        stdout=subprocess.PIPE, stderr=(tmp_path / "err").open("wb"), stdin=subprocess.DEVNULL,
        env={**os.environ, "PACS_CONFIG": str(tmp_path / "config.toml")})
    try:
        wait_for_port(port, proc=proc)
    except BaseException:
        proc.kill()
        raise
    return proc, port


def test_receiving_goes_on_when_the_records_reader_goes_away(tmp_path: Path) -> None:
    """`pacs serve | jq`, and jq ends: the next instances are still stored and answered, and
    stderr says once that records are no longer written."""
    proc, port = serve_into_a_pipe(tmp_path)
    try:
        assert proc.stdout is not None
        proc.stdout.close()  # the reader is gone before the first record
        files = make_ct_series(tmp_path / "ct", 3, rows=16, cols=16)
        server = Server(proc, port, tmp_path / "archive", "PACSCLI", tmp_path / "out",
                        tmp_path / "err")
        for path in files:  # one association each: a broken one would fail the next
            assert dcmsend(server, path).returncode == 0
        assert proc.poll() is None
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(15) == 0
    assert len(index_rows(tmp_path / "archive")) == 3
    err = (tmp_path / "err").read_text()
    assert err.count("stdout closed (broken pipe): records are no longer written") == 1


def test_receiving_goes_on_when_the_records_reader_stops_reading(tmp_path: Path) -> None:
    """`pacs serve | reader` and the reader stops reading: the pipe fills after some records,
    yet every instance is still stored and answered at once (serve used to stop answering
    until the sender timed out); SIGTERM still exits 0 in time, saying what was not written."""
    proc, port = serve_into_a_pipe(tmp_path)  # a pipe nobody reads
    try:
        make_ct_series(tmp_path / "ct", 400, rows=16, cols=16)  # ~700 bytes of record each
        sent = subprocess.run([require("storescu"), "-aec", "PACSCLI", "+sd", "127.0.0.1",
                               str(port), str(tmp_path / "ct")],
                              capture_output=True, text=True, env=DCMTK_ENV, timeout=50)
        assert sent.returncode == 0, sent.stderr
        assert len(index_rows(tmp_path / "archive")) == 400
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(15) == 0
        assert proc.stdout is not None
        written = proc.stdout.read().count(b"\n")  # what the pipe held
        proc.stdout.close()
    assert 0 < written < 400
    err = (tmp_path / "err").read_text()
    assert f"stdout is not being read: {400 - written} records were not written" in err


def test_serve_with_stdout_closed_stores_and_keeps_the_index_whole(tmp_path: Path) -> None:
    """`pacs serve >&-`: it used to stop with a traceback; a file it opened could also have
    taken descriptor 1 and got the records. Now records go nowhere, and all else works."""
    server = start_server(tmp_path / "serve", preexec=lambda: os.close(1))
    try:
        files = make_ct_series(tmp_path / "ct", 3, rows=16, cols=16)
        assert dcmsend(server, *files).returncode == 0
    finally:
        assert server.stop() == 0
    assert "Traceback" not in server.stderr()
    assert len(index_rows(server.archive)) == 3
    with sqlite3.connect(server.archive / "index.sqlite") as db:
        assert db.execute("PRAGMA integrity_check").fetchone() == ("ok",)
    for path in archived_files(server.archive):
        assert pydicom.dcmread(path).SOPInstanceUID in path.name


@pytest.mark.parametrize("rows", [
    1024,  # 2 MiB: received in memory, the archive write fails
    4096,  # 32 MiB: spilled to staging as it arrives, and that write fails
])
def test_disk_full_answers_out_of_resources(tmp_path: Path, rows: int) -> None:
    mount = tmp_path / "small-disk"
    mount.mkdir()
    result = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(mount)],
                            capture_output=True, text=True)
    if result.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs here: {result.stderr.strip()}")
    try:
        archive = mount / "archive"
        server = start_server(tmp_path / "serve", archive=archive)
        try:
            small = tmp_path / "small"
            make_ct_series(small, 1, rows=16, cols=16)
            assert dcmsend(server, next(small.iterdir())).returncode == 0
            big = tmp_path / "big"
            make_ct_series(big, 1, rows=rows, cols=rows)
            ds_big = pydicom.dcmread(next(big.iterdir()))
            ae = AE(ae_title="MODALITY")
            ae.add_requested_context(CTImageStorage, ExplicitVRLittleEndian)
            assoc = ae.associate("127.0.0.1", server.port, ae_title="PACSCLI")
            status = assoc.send_c_store(ds_big)
            assoc.release()
            assert status.Status == 0xA700
            assert len(index_rows(archive)) == 1  # the index is untouched by the failure
            assert len(archived_files(archive)) == 1
            assert not any(p.stat().st_size for p in (archive / ".staging").rglob("*.dcm"))
        finally:
            server.stop()
        failed = [r for r in records(server) if r["status"] == "failed"]
        assert failed and failed[0]["error"]["code"] == "out-of-resources"  # type: ignore[index]
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)


def test_allow_rejects_unknown_calling_ae(tmp_path: Path) -> None:
    server = start_server(tmp_path / "serve", "--allow", "GOODAE")
    try:
        bad = subprocess.run([require("echoscu"), "-aet", "BADAE", "-aec", "PACSCLI",
                              "127.0.0.1", str(server.port)], capture_output=True, text=True,
                             timeout=30)
        assert bad.returncode != 0
        assert "Calling AE Title Not Recognized" in bad.stdout + bad.stderr
        good = subprocess.run([require("echoscu"), "-aet", "GOODAE", "-aec", "PACSCLI",
                               "127.0.0.1", str(server.port)], capture_output=True, text=True,
                              timeout=30)
        assert good.returncode == 0, good.stderr
    finally:
        server.stop()


@pytest.mark.parametrize("option, config, says", [
    (["--port", "99999"], "", "99999 is not in the range 0<=x<=65535"),
    (["--port", "-5"], "", "-5 is not in the range 0<=x<=65535"),
    (["--aet", ""], "", "invalid local AE title '': 1 to 16 characters"),  # not the default
    ([], "[serve]\nport = 99999\n", "[serve] port must be 0 to 65535, not 99999"),
])
def test_a_port_out_of_range_is_a_usage_error(tmp_path: Path, option: list[str], config: str,
                                              says: str) -> None:
    """Exit 2 and one line, not bind()'s OverflowError and a traceback; an empty --aet is
    refused, not taken for the default."""
    (tmp_path / "config.toml").write_text(config)
    result = subprocess.run(
        pacs_cmd("serve", "--archive", str(tmp_path / "archive"), *option),
        capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL,
        env={**os.environ, "PACS_CONFIG": str(tmp_path / "config.toml"), "COLUMNS": "200"})
    assert result.returncode == 2, result.stderr
    assert says in result.stderr and "Traceback" not in result.stderr


def test_an_index_that_cannot_be_written_stops_serve_at_start(tmp_path: Path) -> None:
    """A read-only index.sqlite: serve says so and exits, rather than listening and then
    answering every C-STORE with a failure; `index` says the same before reading any file.
    Root ignores file modes, so the file is made immutable (chattr +i) instead."""
    archive = tmp_path / "archive"
    small = tmp_path / "small"
    make_ct_series(small, 1, rows=16, cols=16)
    env = {**os.environ, "PACS_CONFIG": str(tmp_path / "config.toml")}
    (tmp_path / "config.toml").write_text("")
    subprocess.run(pacs_cmd("index", "--archive", str(archive), str(small)), check=True,
                   capture_output=True, env=env, stdin=subprocess.DEVNULL)
    index = archive / "index.sqlite"
    locked = ["chattr", "+i", str(index)] if os.geteuid() == 0 else ["chmod", "a-w", str(index)]
    if subprocess.run(locked, capture_output=True).returncode != 0:
        pytest.skip("cannot make a file read-only here")
    try:
        for command in (["serve", "--port", str(free_port()), "--bind", "127.0.0.1"],
                        ["index", str(small)]):
            result = subprocess.run(pacs_cmd(*command, "--archive", str(archive)),
                                    capture_output=True, text=True, timeout=60, env=env,
                                    stdin=subprocess.DEVNULL)
            assert result.returncode == 1, result.stderr
            assert result.stderr.strip() == (f"pacs: error: cannot write the index {index}: "
                                             "attempt to write a readonly database")
            assert result.stdout == ""
    finally:
        subprocess.run(["chattr", "-i", str(index)] if os.geteuid() == 0
                       else ["chmod", "u+w", str(index)], check=True)
    assert len(index_rows(archive)) == 1
    assert list((archive / ".staging").iterdir()) == []  # no staging folder left behind
