"""`pacs store` against real peers on loopback: DCMTK storescp accepting every syntax or only
uncompressed ones, `pacs serve`, dirty files, non-DICOM files, closed ports and aborts."""

from __future__ import annotations

import json
import os
import shutil
import struct
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
import pytest
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import (
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEGBaseline8Bit,
    generate_uid,
)

from tests.conftest import (
    CT_ONLY_PROFILE,
    DCMTK_ENV,
    TESTDATA,
    bad_peer,
    bound_by_file_modes,
    free_port,
    pacs_cmd,
    require,
    start_server,
    testdata,
    wait_for_port,
)
from tests.dicom_files import write_non_ascii_sop_class
from tests.net.test_store import vanishing_peer, write_odd_fragments, write_padded_uid

ENCAPSULATED_PDF = "1.2.840.10008.5.1.4.1.1.104.1"
UNCOMPRESSED = {ImplicitVRLittleEndian, ExplicitVRLittleEndian, ExplicitVRBigEndian}
# pylibjpeg cannot decode JPEG-lossy.dcm (a known oddity of that file): it is sent as is to
# peers that take JPEG, and tested on its own where it must be decoded.
DECODABLE = [k for k in TESTDATA if k != "jpeg_extended"]

Storescp = Callable[..., tuple[str, Path]]


def pacs_store(tmp_path: Path, *args: str, stdin: str | None = None
               ) -> subprocess.CompletedProcess[str]:
    """Run `pacs store ARGS` with an empty config; stdout a pipe, so JSON lines."""
    config = tmp_path / "config.toml"
    if not config.exists():
        config.write_text("")
    return subprocess.run(pacs_cmd("store", *args), capture_output=True, text=True, timeout=300,
                          input=stdin, stdin=None if stdin is not None else subprocess.DEVNULL,
                          env={**os.environ, "PACS_CONFIG": str(config)})


def records(result: subprocess.CompletedProcess[str]) -> list[dict[str, Any]]:
    return [json.loads(line) for line in result.stdout.splitlines()]


@pytest.fixture
def storescp(tmp_path: Path) -> Iterator[Storescp]:
    """Start DCMTK storescp (AE title STORESCP) with extra flags: (remote, output folder)."""
    procs: list[subprocess.Popen[bytes]] = []

    def start(*flags: str) -> tuple[str, Path]:
        port = free_port()
        out = tmp_path / f"storescp-{port}"
        out.mkdir()
        # +uf: unique file names, since pydicom's test files share SOP Instance UIDs.
        proc = subprocess.Popen([require("storescp"), "--aetitle", "STORESCP", "-od", str(out),
                                 "+uf", *flags, str(port)], env=DCMTK_ENV,
                                stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                stderr=(tmp_path / f"storescp-{port}.log").open("wb"))
        procs.append(proc)
        wait_for_port(port, proc=proc)
        return f"STORESCP@127.0.0.1:{port}", out

    yield start
    for proc in procs:
        proc.terminate()
        proc.wait(10)


def write_pdf(path: Path) -> Path:
    """A small Encapsulated PDF instance with proper file meta."""
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = ENCAPSULATED_PDF
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID = ENCAPSULATED_PDF, meta.MediaStorageSOPInstanceUID
    ds.StudyInstanceUID, ds.SeriesInstanceUID = generate_uid(), generate_uid()
    ds.PatientName, ds.PatientID, ds.Modality = "Doc^Pdf", "PDF1", "DOC"
    ds.StudyDate, ds.StudyTime, ds.AccessionNumber = "20240102", "101010", ""
    ds.ReferringPhysicianName, ds.StudyID, ds.SeriesNumber, ds.InstanceNumber = "", "1", 1, 1
    ds.ContentDate, ds.ContentTime, ds.AcquisitionDateTime = "20240102", "101010", ""
    ds.BurnedInAnnotation, ds.DocumentTitle = "NO", "test"
    ds.ConceptNameCodeSequence = []
    ds.MIMETypeOfEncapsulatedDocument = "application/pdf"
    ds.EncapsulatedDocument = b"%PDF-1.0\n%%EOF\n"
    ds.save_as(path, enforce_file_format=True)
    return path


def comparable(ds: Dataset) -> dict[Any, Any]:
    """Elements a peer must keep: not the file meta, group lengths or trailing padding (which
    storescp rewrites or drops)."""
    return {e.tag: e.value for e in ds
            if e.tag.group != 2 and e.tag.element != 0 and e.tag != 0xFFFCFFFC}


def received(folder: Path) -> list[Dataset]:
    return [pydicom.dcmread(f) for f in sorted(folder.iterdir())]


# --- every syntax to a peer that takes every syntax -------------------------------------------

def test_store_every_syntax_to_storescp(tmp_path: Path, storescp: Storescp) -> None:
    remote, out = storescp("+xa")
    files = [testdata(k) for k in TESTDATA] + [write_pdf(tmp_path / "doc.dcm")]
    result = pacs_store(tmp_path, remote, *map(str, files))
    assert result.returncode == 0, result.stderr
    recs = records(result)
    assert [r["path"] for r in recs] == [str(f) for f in files]
    assert all(r["status"] == "ok" and r["dimse_status"] == 0 for r in recs), recs
    assert all(r["remote"] == remote for r in recs)
    for record, path in zip(recs, files, strict=True):
        original = pydicom.dcmread(path)
        assert record["SOPInstanceUID"] == original.SOPInstanceUID
        assert record["SOPClassUID"] == original.SOPClassUID
        # Sent as stored: same syntax, nothing converted.
        assert record["TransferSyntaxUID"] == record["transfer_syntax"] \
            == original.file_meta.TransferSyntaxUID
        assert "converted_from" not in record
    assert recs[-1]["SOPClassUID"] == ENCAPSULATED_PDF

    got = [comparable(ds) for ds in received(out)]
    assert len(got) == len(files)
    for path in files:  # each original arrived with every element intact
        want = comparable(pydicom.dcmread(path))
        assert want in got, path.name
        got.remove(want)


# --- start-up: what sending files as they are loads --------------------------------------------

# `pacs store ARGS...` in this interpreter; then the DICOM libraries it loaded, into a file.
LOADED_LAUNCHER = """
import sys
from pacscli.cli.app import app
try:
    app(sys.argv[2:], prog_name="pacs")
finally:
    loaded = {m.split(".")[0] for m in sys.modules} & {"pydicom", "pynetdicom", "numpy"}
    with open(sys.argv[1], "w") as out:
        out.write(" ".join(sorted(loaded)))
"""


def store_loading(tmp_path: Path, *args: str) -> tuple[subprocess.CompletedProcess[str], set[str]]:
    """Run `pacs store ARGS`: its result, and which of pydicom, pynetdicom and numpy it loaded."""
    config, loaded = tmp_path / "config.toml", tmp_path / "loaded.txt"
    config.write_text("")
    result = subprocess.run([sys.executable, "-c", LOADED_LAUNCHER, str(loaded), "store", *args],
                            capture_output=True, text=True, timeout=300, stdin=subprocess.DEVNULL,
                            env={**os.environ, "PACS_CONFIG": str(config)})
    return result, set(loaded.read_text().split())


def test_sending_files_as_stored_loads_neither_pydicom_nor_pynetdicom(tmp_path: Path,
                                                                      storescp: Storescp) -> None:
    """Their imports were ~0.3 s of a short run's ~0.75 s start-up: a file the peer takes as
    it is needs neither; a file to rewrite or convert loads pydicom, and still arrives."""
    remote, out = storescp("+xa")
    files = [testdata("explicit_le"), testdata("implicit_le"), testdata("jpeg_baseline")]
    result, loaded = store_loading(tmp_path, remote, *map(str, files))
    assert result.returncode == 0, result.stderr
    assert [(r["status"], r["transfer_syntax"]) for r in records(result)] \
        == [("ok", pydicom.dcmread(f).file_meta.TransferSyntaxUID) for f in files]
    assert loaded == set()
    assert sorted(comparable(ds)[0x00080018] for ds in received(out)) \
        == sorted(pydicom.dcmread(f).SOPInstanceUID for f in files)

    result, loaded = store_loading(tmp_path, remote, str(write_padded_uid(tmp_path / "padded.dcm")))
    [record] = records(result)
    assert record["status"] == "ok" and "SOPInstanceUID padding removed" in record["fixed"]
    assert loaded == {"pydicom", "numpy"}  # the rewrite reads and writes it with pydicom

    uncompressed_only, converted = storescp()
    result, loaded = store_loading(tmp_path, uncompressed_only, str(testdata("jpeg_baseline")))
    [record] = records(result)
    assert record["status"] == "ok" and record["converted_from"] == JPEGBaseline8Bit, record
    assert "pydicom" in loaded and "pynetdicom" not in loaded
    assert len(received(converted)) == 1


# --- conversion for peers that take only uncompressed syntaxes --------------------------------

@pytest.mark.parametrize("flags, sent", [
    ((), {ExplicitVRLittleEndian, ImplicitVRLittleEndian, ExplicitVRBigEndian}),
    (("+xi",), {ImplicitVRLittleEndian}),  # implicit only: explicit and big endian converted
])
def test_converts_for_uncompressed_only_peer(tmp_path: Path, storescp: Storescp,
                                             flags: tuple[str, ...], sent: set[str]) -> None:
    remote, out = storescp(*flags)
    files = [testdata(k) for k in DECODABLE]
    result = pacs_store(tmp_path, remote, *map(str, files))
    assert result.returncode == 0, result.stderr
    recs = records(result)
    assert all(r["status"] == "ok" for r in recs), recs
    for record in recs:
        original_ts = record["TransferSyntaxUID"]
        assert record["transfer_syntax"] in sent
        if original_ts in sent:
            assert "converted_from" not in record
        else:  # compressed, deflated, or refused by +xi
            assert record["converted_from"] == original_ts
            assert original_ts != record["transfer_syntax"]

    arrived = received(out)
    assert len(arrived) == len(files)
    assert all(ds.file_meta.TransferSyntaxUID in UNCOMPRESSED for ds in arrived)
    for path in files:  # same pixels as the original decodes to
        original = pydicom.dcmread(path)
        if "PixelData" not in original:
            continue
        matches = [ds for ds in arrived if ds.SOPInstanceUID == original.SOPInstanceUID
                   and ds.Rows == original.Rows and ds.get("NumberOfFrames") ==
                   original.get("NumberOfFrames")
                   and np.array_equal(ds.pixel_array, original.pixel_array)]
        assert matches, path.name


def test_undecodable_file_fails_alone(tmp_path: Path, storescp: Storescp) -> None:
    remote, out = storescp()  # uncompressed only: the JPEG must be decoded
    broken = pydicom.dcmread(testdata("jpeg_baseline"))
    broken.PixelData = b"\xfe\xff\x00\xe0\x00\x00\x00\x00" + b"\xfe\xff\x00\xe0\x04\x00\x00\x00" \
        + b"\xff\xd8\xff\xd9"
    broken.SOPInstanceUID = broken.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    broken.save_as(tmp_path / "broken.dcm")
    result = pacs_store(tmp_path, remote, str(tmp_path / "broken.dcm"),
                        str(testdata("explicit_le")))
    assert result.returncode == 1, result.stderr
    bad, good = records(result)
    assert bad["status"] == "failed" and bad["error"]["code"] == "cannot-convert"
    assert "\n" not in bad["error"]["message"]
    assert good["status"] == "ok"
    assert len(list(out.iterdir())) == 1


def test_truncated_files_fail_and_are_not_sent(tmp_path: Path, storescp: Storescp) -> None:
    """pydicom reads a file cut inside its pixel data without complaint, and the peer would
    archive it as whole: it gets a `truncated` failure instead, and the others still go."""
    remote, out = storescp()
    whole = testdata("explicit_le")
    data = whole.read_bytes()
    cut = tmp_path / "cut.dcm"
    cut.write_bytes(data[:len(data) // 2])
    result = pacs_store(tmp_path, remote, str(cut), str(whole))
    assert result.returncode == 1, result.stderr
    bad, good = records(result)
    assert bad["path"] == str(cut) and bad["status"] == "failed"
    assert bad["error"]["code"] == "truncated" and "(7FE0,0010) declares" in bad["error"]["message"]
    assert good["status"] == "ok"
    assert len(list(out.iterdir())) == 1


def test_a_sop_class_uid_that_is_not_a_uid_fails_that_file_only(tmp_path: Path,
                                                                 storescp: Storescp) -> None:
    """A dataset SOP Class UID with non-ASCII bytes could not be proposed: the whole run
    stopped at the association request (exit 2, no records). Now that file fails."""
    remote, out = storescp()
    bad = write_non_ascii_sop_class(tmp_path / "bad.dcm")
    result = pacs_store(tmp_path, remote, str(bad), str(testdata("explicit_le")))
    assert result.returncode == 1, result.stderr
    refused, good = records(result)
    assert refused["path"] == str(bad) and refused["status"] == "failed"
    assert refused["error"] == {"code": "invalid-dicom", "message":
                                "the SOP Class UID '\u00c3\u00a92.840.10008.5.1.4.1.1.2' is not a "
                                "UID (1 to 64 characters of digits and dots)"}
    assert good["status"] == "ok"
    assert len(list(out.iterdir())) == 1


def test_a_sop_instance_uid_over_64_characters_fails_here(tmp_path: Path,
                                                          storescp: Storescp) -> None:
    """storescp cannot parse such a command and aborts the association: the record blamed
    the peer ('association-aborted'). The file now fails here, saying why, and the next goes."""
    remote, out = storescp()
    ds = pydicom.dcmread(testdata("explicit_le"))
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = "1." + "2" * 63
    ds.save_as(tmp_path / "long.dcm")
    result = pacs_store(tmp_path, remote, str(tmp_path / "long.dcm"), str(testdata("rtdose")))
    assert result.returncode == 1, result.stderr
    long, good = records(result)
    assert long["error"] == {"code": "invalid-dicom", "message":
                             f"SOPInstanceUID is 65 characters long (at most 64): '1.{'2' * 63}'"}
    assert good["status"] == "ok"
    assert len(list(out.iterdir())) == 1


def test_a_file_whose_meta_misnames_its_encoding_is_sent_as_encoded(tmp_path: Path,
                                                                      storescp: Storescp) -> None:
    """File meta Explicit VR LE, dataset Implicit VR LE (old devices write such files, and
    pydicom reads them): sent under the meta's syntax, storescp could not parse it and
    aborted the association. It now goes as Implicit VR LE, and the record says so."""
    from pydicom.filewriter import write_dataset

    from pacscli.dicom.identity import seek_dataset

    remote, out = storescp()
    ds = pydicom.dcmread(testdata("explicit_le"))
    raw = pydicom.filebase.DicomBytesIO()
    raw.is_little_endian, raw.is_implicit_VR = True, True
    write_dataset(raw, ds)
    with open(testdata("explicit_le"), "rb") as fp:
        offset = seek_dataset(fp)
        fp.seek(0)
        head = fp.read(offset)
    (tmp_path / "mislabelled.dcm").write_bytes(head + raw.getvalue())
    result = pacs_store(tmp_path, remote, str(tmp_path / "mislabelled.dcm"))
    assert result.returncode == 0, result.stderr
    [record] = records(result)
    assert record["status"] == "ok" and record["transfer_syntax"] == ImplicitVRLittleEndian
    assert any("dataset is Implicit VR Little Endian" in fix for fix in record["fixed"])
    [received] = out.iterdir()
    assert pydicom.dcmread(received).PatientName == ds.PatientName


def test_a_file_that_cannot_be_read_is_unreadable_as_index_says(tmp_path: Path) -> None:
    """Permission denied was an `invalid-dicom` failure: index calls it `unreadable`."""
    locked = tmp_path / "locked.dcm"
    locked.write_bytes(testdata("explicit_le").read_bytes())
    locked.chmod(0)
    (tmp_path / "config.toml").write_text("")
    result = subprocess.run([*bound_by_file_modes(), *pacs_cmd("store", f"X@127.0.0.1:{free_port()}",
                                                 str(locked))],
                            capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL,
                            env={**os.environ, "PACS_CONFIG": str(tmp_path / "config.toml")})
    [record] = records(result)
    assert record["status"] == "failed" and record["error"]["code"] == "unreadable", record
    assert "Permission denied" in record["error"]["message"]


def test_a_peer_aborting_the_association_request_is_named_with_why(tmp_path: Path) -> None:
    from tests.cli.test_echo import _raw_peer

    port = _raw_peer(bytes([0x07, 0, 0, 0, 0, 4, 0, 0, 2, 1]))
    result = pacs_store(tmp_path, f"X@127.0.0.1:{port}", str(testdata("explicit_le")))
    assert result.returncode == 3
    assert (f"X@127.0.0.1:{port} aborted the association during negotiation (A-ABORT from the "
            "service provider, for an unrecognised PDU)") in result.stderr


def test_unencodable_file_fails_in_one_line(tmp_path: Path, storescp: Storescp) -> None:
    """SC_rgb_jpeg.dcm's file meta says JPEG, its dataset is implicit VR: converting it for an
    uncompressed-only peer fails in pydicom's writer, whose message carries a traceback; the
    record keeps its first line."""
    remote, _ = storescp()
    result = pacs_store(tmp_path, remote, str(testdata("SC_rgb_jpeg.dcm")))
    assert result.returncode == 1, result.stderr
    [record] = records(result)
    assert record["error"]["code"] == "cannot-convert"
    assert record["error"]["message"] == ("cannot encode the dataset as Explicit VR Little Endian: "
                                          "With tag (0008,0008) got exception: encoding without a "
                                          "string argument")


# --- dirty files from real devices ------------------------------------------------------------

def test_dirty_files_are_fixed_and_received(tmp_path: Path, storescp: Storescp) -> None:
    remote, out = storescp("+xa")
    padded = write_padded_uid(tmp_path / "padded.dcm")
    mismatch = pydicom.dcmread(testdata("explicit_le"))
    mismatch.SOPInstanceUID = "1.2.826.0.1.3680043.2.1125.77.3"
    mismatch.file_meta.MediaStorageSOPInstanceUID = "1.2.826.0.1.3680043.2.1125.77.4"
    mismatch.save_as(tmp_path / "mismatch.dcm")
    odd = write_odd_fragments(tmp_path / "odd.dcm")
    files = [padded, tmp_path / "mismatch.dcm", odd, testdata("deflated")]

    result = pacs_store(tmp_path, remote, *map(str, files))
    assert result.returncode == 0, result.stderr
    recs = {Path(r["path"]).name: r for r in records(result)}
    assert all(r["status"] == "ok" for r in recs.values()), recs
    assert recs["padded.dcm"]["SOPInstanceUID"] == "1.2.826.0.1.3680043.2.1125.77.2"
    assert "SOPInstanceUID padding removed" in recs["padded.dcm"]["fixed"]
    assert recs["mismatch.dcm"]["SOPInstanceUID"] == "1.2.826.0.1.3680043.2.1125.77.3"
    assert any("differs from the dataset's" in f for f in recs["mismatch.dcm"]["fixed"])
    assert any("odd-length pixel data fragment" in f for f in recs["odd.dcm"]["fixed"])
    # DCMTK aborts on an odd-length dataset (its deflate stream): padded, still deflated.
    assert recs["image_dfl.dcm"]["fixed"] == ["odd-length dataset padded to even length"]
    assert recs["image_dfl.dcm"]["transfer_syntax"] == DeflatedExplicitVRLittleEndian

    arrived = {ds.SOPInstanceUID: ds for ds in received(out)}
    assert len(arrived) == 4
    assert arrived["1.2.826.0.1.3680043.2.1125.77.2"].file_meta.MediaStorageSOPInstanceUID \
        == "1.2.826.0.1.3680043.2.1125.77.2"
    assert "1.2.826.0.1.3680043.2.1125.77.3" in arrived
    odd_in = arrived["1.2.826.0.1.3680043.2.1125.77.1"]
    assert np.array_equal(odd_in.pixel_array, pydicom.dcmread(odd).pixel_array)
    assert comparable(arrived[recs["image_dfl.dcm"]["SOPInstanceUID"]]) \
        == comparable(pydicom.dcmread(testdata("deflated")))


# --- inputs: folders, non-DICOM files, stdin records ------------------------------------------

def test_folder_with_non_dicom_file(tmp_path: Path, storescp: Storescp) -> None:
    remote, out = storescp()
    folder = tmp_path / "in"
    (folder / "sub").mkdir(parents=True)
    shutil.copy(testdata("explicit_le"), folder / "sub" / "b.dcm")
    shutil.copy(testdata("sr"), folder / "a.dcm")
    (folder / "README.txt").write_text("not DICOM\n")
    result = pacs_store(tmp_path, remote, str(folder))
    assert result.returncode == 0, result.stderr
    recs = records(result)
    skipped = [r for r in recs if r["status"] == "skipped"]
    assert [r["path"] for r in skipped] == [str(folder / "README.txt")]
    assert "not a DICOM" in skipped[0]["reason"]
    sent = [r for r in recs if r["status"] == "ok"]
    assert [r["path"] for r in sent] == [str(folder / "a.dcm"), str(folder / "sub" / "b.dcm")]
    assert len(list(out.iterdir())) == 2


def test_folder_with_a_fifo_and_links(tmp_path: Path, storescp: Storescp) -> None:
    """Each gets a skipped record saying what it is (they used to vanish silently, a link to
    a folder still did), the same record `pacs index` gives, as do files that are not Part 10
    (store used to pass on pydicom's "Use force=True to force reading"); the FIFO, given
    alone too, is never opened, which would wait forever."""
    remote, out = storescp()
    folder = tmp_path / "in"
    folder.mkdir()
    (folder / "ct.dcm").write_bytes(testdata("explicit_le").read_bytes())
    os.mkfifo(folder / "pipe")
    (folder / "dangling").symlink_to(tmp_path / "nowhere")
    (folder / "loop").symlink_to(folder)
    (folder / "empty").write_bytes(b"")
    (folder / "notes.txt").write_text("not DICOM")
    shutil.copy(testdata("ExplVR_LitEndNoMeta.dcm"), folder / "raw.dcm")
    result = pacs_store(tmp_path, remote, str(folder))
    assert result.returncode == 0, result.stderr
    by_path = {r["path"]: r for r in records(result)}
    assert by_path.pop(str(folder / "ct.dcm"))["status"] == "ok"
    assert by_path == {
        str(folder / name): {"path": str(folder / name), "status": "skipped",
                             "reason": reason, "reason_code": code}
        for name, code, reason in [
            ("dangling", "not-a-file", "a symbolic link to nothing"),
            ("empty", "empty", "an empty file (0 bytes)"),
            ("loop", "not-a-file", "a link to a folder (not followed)"),
            ("notes.txt", "not-dicom", "not a DICOM file (no DICM prefix at byte 128; 9 bytes)"),
            ("pipe", "not-a-file", "not a regular file (a FIFO, socket or device)"),
            ("raw.dcm", "no-preamble",
             "a DICOM dataset without the Part 10 preamble and file meta (a raw dataset)")]}
    indexed = subprocess.run(pacs_cmd("index", "--archive", str(tmp_path / "archive"),
                                      "--format", "jsonl", str(folder)),
                             capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL,
                             env={**os.environ, "PACS_CONFIG": str(tmp_path / "config.toml")})
    assert indexed.returncode == 0, indexed.stderr
    assert [r for r in map(json.loads, indexed.stdout.splitlines())
            if r["status"] == "skipped"] == list(by_path.values())
    alone = pacs_store(tmp_path, remote, str(folder / "pipe"))
    assert [r["status"] for r in records(alone)] == ["skipped"]
    assert len(list(out.iterdir())) == 1


def test_a_wrong_file_meta_group_length_is_sent(tmp_path: Path, storescp: Storescp) -> None:
    """Real devices write wrong file meta group lengths; `pacs index` archives such files,
    and `pacs store` skipped them ("invalid-dicom", exit 0): now it sends their dataset."""
    remote, out = storescp()
    source = testdata("explicit_le")
    data = bytearray(source.read_bytes())
    struct.pack_into("<I", data, 140, struct.unpack_from("<I", data, 140)[0] + 8)
    wrong = tmp_path / "wrong.dcm"
    wrong.write_bytes(bytes(data))
    result = pacs_store(tmp_path, remote, str(wrong))
    assert result.returncode == 0, result.stderr
    assert [r["status"] for r in records(result)] == ["ok"]
    [arrived] = received(out)
    assert comparable(arrived) == comparable(pydicom.dcmread(source))


def test_stdin_records_and_parallel_jobs(tmp_path: Path, storescp: Storescp) -> None:
    remote, out = storescp("+xa", "--fork")  # --fork: several associations at once
    files = [testdata(k) for k in DECODABLE]
    lines = [json.dumps({"path": str(f), "PatientID": "passes through"}) for f in files[:-1]]
    lines.append(str(files[-1]))  # a bare path line works too
    result = pacs_store(tmp_path, remote, "--jobs", "3", stdin="\n".join(lines) + "\n")
    recs = records(result)
    assert result.returncode == 0, [r for r in recs if r["status"] != "ok"]
    assert sorted(r["path"] for r in recs) == sorted(map(str, files))
    assert all(r["status"] == "ok" for r in recs)
    assert len(list(out.iterdir())) == len(files)


def test_a_record_without_path_names_its_line(tmp_path: Path, storescp: Storescp) -> None:
    remote, _ = storescp()
    stdin = (json.dumps({"path": str(testdata("explicit_le"))}) + '\n{"SOPInstanceUID": "1.2"}\n'
             + '{"status": "ok"}\n')
    result = pacs_store(tmp_path, remote, "--archive", str(tmp_path / "none"), stdin=stdin)
    assert result.returncode == 1
    [ok] = [r for r in records(result) if r["status"] == "ok"]
    [no_archive, no_uid] = [r for r in records(result) if r["status"] == "failed"]
    assert ok["path"] == str(testdata("explicit_le"))
    assert no_archive["input"] == 2 and no_archive["SOPInstanceUID"] == "1.2"
    assert no_archive["error"]["message"].startswith(
        f"input record 2 has no path, and no archive at {tmp_path / 'none'}")
    assert no_uid["input"] == 3 and no_uid["error"] == {
        "code": "no-path", "message": "input record 3 has no path, and no UID to look up in the archive"}


def test_find_records_of_the_archive_send_its_instances(tmp_path: Path, storescp: Storescp) -> None:
    """`pacs find --archive A | pacs store REMOTE --archive A`: records without a path send
    the archived instances their UIDs name, at their level (DESIGN.md section 2)."""
    from pacscli.archive.archive import Archive

    remote, out = storescp()
    archive = Archive(tmp_path / "archive")
    kept = [archive.put(testdata(name)) for name in ("explicit_le", "implicit_le", "rle")]
    archive.close()
    wanted = kept[0].info
    found = subprocess.run(pacs_cmd("find", "--archive", str(tmp_path / "archive"), "--level", "series",
                                    "-k", f"SeriesInstanceUID={wanted.series_uid}"),
                           capture_output=True, text=True, timeout=120, stdin=subprocess.DEVNULL)
    assert found.returncode == 0, found.stderr
    missing = json.dumps({"QueryRetrieveLevel": "STUDY", "StudyInstanceUID": "1.2.3.4"}) + "\n"
    result = pacs_store(tmp_path, remote, "--archive", str(tmp_path / "archive"),
                        stdin=found.stdout + missing)
    assert result.returncode == 1
    [sent] = [r for r in records(result) if r["status"] == "ok"]
    assert sent["SOPInstanceUID"] == wanted.sop_uid and sent["path"] == str(kept[0].path)
    [absent] = [r for r in records(result) if r["status"] == "failed"]
    assert absent["error"]["code"] == "not-in-archive" and "has no instance of this study" \
        in absent["error"]["message"]
    [received] = list(out.iterdir())
    assert pydicom.dcmread(received).SOPInstanceUID == wanted.sop_uid


def test_store_folder_to_pacs_serve(tmp_path: Path) -> None:
    folder = tmp_path / "in"
    folder.mkdir()
    for key in ("explicit_le", "jpeg_baseline", "jpeg_lossless", "sr", "rtdose", "deflated"):
        shutil.copy(testdata(key), folder / f"{key}.dcm")
    write_pdf(folder / "pdf.dcm")
    server = start_server(tmp_path / "serve")
    try:
        result = pacs_store(tmp_path, server.remote, str(folder))
    finally:
        server.stop()
    assert result.returncode == 0, result.stderr
    recs = records(result)
    assert len(recs) == 7 and all(r["status"] == "ok" for r in recs), recs
    stored = {p.stem for p in (server.archive / "studies").rglob("*.dcm")}
    assert stored == {r["SOPInstanceUID"] for r in recs}


# --- failures: usage, network, refused classes ------------------------------------------------



def test_sop_class_the_peer_refuses(tmp_path: Path, storescp: Storescp) -> None:
    profile = tmp_path / "ct-only.cfg"
    profile.write_text(CT_ONLY_PROFILE)
    remote, out = storescp("-xf", str(profile), "CTOnly")
    ct, sr = str(testdata("explicit_le")), str(testdata("sr"))
    result = pacs_store(tmp_path, remote, ct, sr)
    assert result.returncode == 1, result.stderr  # the CT went, the SR could not
    sent, refused = records(result)
    assert sent["status"] == "ok"
    assert refused["status"] == "failed"
    assert refused["error"]["code"] == "sop-class-not-accepted"
    assert len(list(out.iterdir())) == 1

    result = pacs_store(tmp_path, remote, sr)  # no context at all: nothing could be sent
    assert result.returncode == 3, result.stderr
    [refused] = records(result)
    assert refused["error"]["code"] == "no-accepted-context"


def test_output_closed_mid_run_is_not_all_done(tmp_path: Path, storescp: Storescp) -> None:
    """`pacs store DIR | head -1`: the reader goes away, the rest is not sent, and store says
    so and exits 130 rather than 0 (all done)."""
    remote, _ = storescp()
    folder = tmp_path / "many"
    folder.mkdir()
    for n in range(200):
        (folder / f"{n:03}.dcm").write_bytes(testdata("explicit_le").read_bytes())
    (tmp_path / "config.toml").write_text("")
    proc = subprocess.Popen(pacs_cmd("store", remote, str(folder)), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, stdin=subprocess.DEVNULL,
                            env={**os.environ, "PACS_CONFIG": str(tmp_path / "config.toml")})
    assert proc.stdout is not None and proc.stderr is not None
    assert json.loads(proc.stdout.readline())["status"] == "ok"
    proc.stdout.close()
    assert proc.wait(120) == 130
    assert "output closed (broken pipe): stopped before all was done" in proc.stderr.read().decode()


def test_no_inputs_is_usage_error(tmp_path: Path) -> None:
    result = pacs_store(tmp_path, f"X@127.0.0.1:{free_port()}")  # stdin /dev/null
    assert result.returncode == 2
    assert "nothing to store" in result.stderr
    piped = pacs_store(tmp_path, f"X@127.0.0.1:{free_port()}", stdin="")  # an empty pipe
    assert (piped.returncode, piped.stdout, piped.stderr) == (0, "", "")


def test_closed_port_exits_3(tmp_path: Path) -> None:
    port = free_port()
    result = pacs_store(tmp_path, f"NOBODY@127.0.0.1:{port}", str(testdata("explicit_le")))
    assert result.returncode == 3, result.stderr
    assert "connection refused" in result.stderr
    [record] = records(result)  # the instance is still accounted for
    assert record["status"] == "failed" and record["error"]["code"] == "connection-failed"


def test_peer_aborting_every_store_exits_3(tmp_path: Path, storescp: Storescp) -> None:
    remote, _ = storescp("--abort-after")
    result = pacs_store(tmp_path, remote, str(testdata("explicit_le")), str(testdata("sr")))
    assert result.returncode == 3, result.stderr
    recs = records(result)
    assert [r["status"] for r in recs] == ["failed", "failed"]
    assert all(r["error"]["code"] == "association-aborted" for r in recs)


def test_peer_vanishing_mid_run_exits_1(tmp_path: Path) -> None:
    files = [str(testdata(k)) for k in ("explicit_le", "sr", "rtdose")]
    with vanishing_peer() as (port, received):
        result = pacs_store(tmp_path, f"VANISH@127.0.0.1:{port}", *files)
    assert result.returncode == 1, result.stderr
    recs = records(result)
    assert [r["status"] for r in recs] == ["ok", "failed", "failed"]  # none silently lost
    assert received == [recs[0]["SOPInstanceUID"]]


def test_help_lists_the_options() -> None:
    result = subprocess.run(pacs_cmd("store", "--help"), capture_output=True, text=True,
                            timeout=60)
    assert result.returncode == 0
    for option in ("REMOTE", "PATH", "--jobs", "--aet", "--config", "--format", "--verbose"):
        assert option in result.stdout


def test_paths_no_file_can_have_fail_as_records(tmp_path: Path) -> None:
    """A name longer than the filesystem allows and a path holding a NUL: failed records
    naming them (the first ended in a traceback, with no record)."""
    too_long = str(tmp_path / ("a" * 300 + ".dcm"))
    result = pacs_store(tmp_path, f"X@127.0.0.1:{free_port()}", too_long)
    assert "Traceback" not in result.stderr
    [record] = [json.loads(line) for line in result.stdout.splitlines()]
    assert record["path"] == too_long and record["error"]["code"] == "unreadable"
    assert "too long" in record["error"]["message"] and result.returncode == 1
    result = pacs_store(tmp_path, f"X@127.0.0.1:{free_port()}",
                        stdin=json.dumps({"path": "/tmp/x\u0000y"}) + "\n")
    [record] = [json.loads(line) for line in result.stdout.splitlines()]
    assert record["error"]["code"] == "bad-path" and result.returncode == 1


def test_records_are_sent_as_they_come(tmp_path: Path, storescp: Storescp) -> None:
    """stdin that stays open (`pacs serve | pacs store OTHER`, a forwarder): each record's
    instance goes out as it comes; store used to read all of stdin first, so a forwarder
    sent nothing until the receiver stopped."""
    import select

    remote, out = storescp()
    config = tmp_path / "config.toml"
    config.write_text("")
    proc = subprocess.Popen(pacs_cmd("store", remote), stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "PACS_CONFIG": str(config)})
    assert proc.stdin is not None and proc.stdout is not None
    try:
        for name in ("explicit_le", "implicit_le"):
            proc.stdin.write(json.dumps({"path": str(testdata(name))}) + "\n")
            proc.stdin.flush()
            ready, _, _ = select.select([proc.stdout], [], [], 30)
            assert ready, f"no record for {name} while stdin is still open"
            record = json.loads(proc.stdout.readline())
            assert record["status"] == "ok" and record["path"] == str(testdata(name))
        proc.stdin.close()
        assert proc.wait(60) == 0
    finally:
        proc.kill()
    assert len(list(out.iterdir())) == 2


def test_an_archived_file_gone_missing_fails(tmp_path: Path, storescp: Storescp) -> None:
    """A record resolved in the archive to a file since deleted: failed, not-found, exit 1
    (it was skipped as "a FIFO, socket or device", and the run exited 0)."""
    from pacscli.archive.archive import Archive

    remote, _ = storescp()
    archive = Archive(tmp_path / "archive")
    kept = archive.put(testdata("explicit_le"))
    archive.close()
    kept.path.unlink()
    record = {"QueryRetrieveLevel": "IMAGE", "StudyInstanceUID": kept.info.study_uid,
              "SeriesInstanceUID": kept.info.series_uid, "SOPInstanceUID": kept.info.sop_uid}
    result = pacs_store(tmp_path, remote, "--archive", str(tmp_path / "archive"),
                        stdin=json.dumps(record) + "\n")
    assert result.returncode == 1
    [failure] = records(result)
    assert failure["status"] == "failed" and failure["error"]["code"] == "not-found"


def test_records_before_a_bad_line_are_sent(tmp_path: Path, storescp: Storescp) -> None:
    """A line that is not JSON in the middle of stdin stops the run (exit 2), but the
    records before it are sent and reported whatever the timing (those read in the same
    round as the bad line were dropped)."""
    remote, out = storescp()
    good = [json.dumps({"path": str(testdata(name))}) for name in ("explicit_le", "implicit_le")]
    result = pacs_store(tmp_path, remote, stdin="\n".join([*good, "{not json", good[0]]) + "\n")
    assert result.returncode == 2 and "line 3" in result.stderr
    assert [r["status"] for r in records(result)] == ["ok", "ok"]
    assert len(list(out.iterdir())) == 2


def test_a_uid_list_too_long_for_the_index_fails_its_record_only(tmp_path: Path) -> None:
    """A record whose UID list is longer than SQLite takes in one query: that record fails,
    with the reason (the whole run stopped, blaming a damaged index)."""
    from pacscli.archive.archive import Archive

    archive = Archive(tmp_path / "archive")
    archive.put(testdata("explicit_le"))
    archive.close()
    huge = {"SOPInstanceUID": [f"1.2.{n}" for n in range(260_000)]}
    result = pacs_store(tmp_path, f"X@127.0.0.1:{free_port()}", "--archive", str(tmp_path / "archive"),
                        stdin=json.dumps(huge) + "\n")
    assert "Traceback" not in result.stderr and "damaged" not in result.stderr
    [record] = records(result)
    assert record["error"]["code"] == "lookup-failed" and result.returncode == 1


def test_store_peer_answering_with_an_undecodable_command(tmp_path: Path) -> None:
    """A C-STORE answered with a command set that runs past its end: we abort and say the peer
    broke the protocol (it was put as the peer aborting). The next instance goes on a new
    association, which this peer never answers."""
    port = bad_peer(command=b"\x00\x00\x00\x00\x04\x00\x00\x00\x02\x00")
    files = [str(testdata("explicit_le")), str(testdata("implicit_le"))]
    result = pacs_store(tmp_path, f"BAD@127.0.0.1:{port}", *files)
    # 3, as for a peer that aborts: the association, not the instances, failed.
    assert result.returncode == 3 and "Traceback" not in result.stderr, result.stderr
    assert "broke the DICOM protocol while this instance was sent (bad command set: command " \
        "set element runs past the end); the association was aborted" in result.stderr
    first, second = records(result)
    assert first["error"]["code"] == "invalid-response" and second["status"] == "failed"
