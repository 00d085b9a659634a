"""Small DICOM files, junk and archive snapshots for the index and verify tests."""

from __future__ import annotations

import hashlib
import shutil
import subprocess
import sys
from collections import Counter
from pathlib import Path
from urllib.parse import parse_qs, unquote, urlparse

import pydicom
from pydicom.data import get_testdata_file
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid

from pacscli.archive import layout
from tests.conftest import testdata


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def bulk_bytes(uri: str) -> bytes:
    """The bytes a `--dicom-json` BulkDataURI names (file:///path?offset=N&length=M)."""
    parts = urlparse(uri)
    assert parts.scheme == "file"
    query = parse_qs(parts.query)
    offset, length = int(query["offset"][0]), int(query["length"][0])
    with open(unquote(parts.path), "rb") as fp:
        fp.seek(offset)
        return fp.read(length)


def make_dataset(*, study: str | None = None, series: str | None = None, sop: str | None = None,
                 patient_id: str = "PID1", number: int = 1, rows: int = 8) -> Dataset:
    """A small CT slice (rows x rows, 16 bits) with the given or fresh UIDs."""
    ds = Dataset()
    ds.SOPClassUID = CTImageStorage
    ds.SOPInstanceUID = sop or generate_uid()
    ds.StudyInstanceUID = study or generate_uid()
    ds.SeriesInstanceUID = series or generate_uid()
    ds.PatientID, ds.PatientName = patient_id, "Test^Patient"
    ds.StudyDate, ds.Modality, ds.InstanceNumber = "20240101", "CT", number
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.Rows = ds.Columns = rows
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
    ds.PixelData = bytes(range(256)) * (rows * rows * 2 // 256) + bytes(rows * rows * 2 % 256)
    return ds


def write_instance(path: Path, ds: Dataset | None = None, **kwargs: object) -> Path:
    """A Part 10 file (Explicit VR Little Endian) of `ds` or of make_dataset(**kwargs)."""
    ds = ds or make_dataset(**kwargs)  # type: ignore[arg-type]
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = ds.SOPClassUID
    meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta = meta
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path, enforce_file_format=True)
    return path


def cut(source: Path, target: Path, keep: int) -> Path:
    """A copy of `source` cut short: `keep` bytes, or all but -keep when negative."""
    data = source.read_bytes()
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_bytes(data[:keep])
    return target


def renamed(source: Path, target: Path) -> Path:
    """A copy of a Part 10 file under fresh UIDs, in its own transfer syntax."""
    ds = pydicom.dcmread(source)
    ds.StudyInstanceUID, ds.SeriesInstanceUID = generate_uid(), generate_uid()
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    ds.save_as(target, enforce_file_format=True)
    return target


def junk_folder(folder: Path) -> dict[str, str]:
    """Files `pacs index` must skip, each with the reason code expected: {name: code}
    ("any": a record of any kind, but one)."""
    folder.mkdir(parents=True, exist_ok=True)
    expected: dict[str, str] = {}

    (folder / "notes.txt").write_text("not DICOM at all\n" * 20)
    expected["notes.txt"] = "not-dicom"
    (folder / "empty.dcm").write_bytes(b"")
    expected["empty.dcm"] = "empty"
    (folder / "tiny.bin").write_bytes(b"\x00" * 10)
    expected["tiny.bin"] = "not-dicom"

    raw = make_dataset()
    pydicom.dcmwrite(folder / "raw.dcm", raw, implicit_vr=True, little_endian=True)
    expected["raw.dcm"] = "no-preamble"

    whole = write_instance(folder.parent / "whole-junk-source.dcm")
    size = whole.stat().st_size
    cut(whole, folder / "cut_in_pixels.dcm", size - 10)
    expected["cut_in_pixels.dcm"] = "truncated"
    cut(whole, folder / "cut_in_meta.dcm", 200)
    expected["cut_in_meta.dcm"] = "truncated"
    cut(whole, folder / "cut_in_dataset.dcm", size - 128 - 30)  # 128 bytes of pixel data
    expected["cut_in_dataset.dcm"] = "truncated"
    for name, kind, keep in (("cut_in_fragments.dcm", "jpeg_baseline", 0.5),
                             ("cut_deflated.dcm", "deflated", 0.9)):
        fresh = renamed(testdata(kind), folder.parent / f"fresh-{name}")
        cut(fresh, folder / name, int(fresh.stat().st_size * keep))
        fresh.unlink()
        expected[name] = "truncated"
    whole.unlink()

    write_instance(folder / "unsafe_uid.dcm", sop="1.2.3.4/../../../etc")
    expected["unsafe_uid.dcm"] = "unsafe-uid"
    no_study = make_dataset()
    del no_study.StudyInstanceUID
    write_instance(folder / "no_study_uid.dcm", no_study)
    expected["no_study_uid.dcm"] = "unsafe-uid"

    # An unknown VR: read as pydicom reads it, indexed or skipped but never a crash
    odd = bytearray(write_instance(folder.parent / "odd-source.dcm").read_bytes())
    at = odd.index(b"\x10\x00\x10\x00PN")  # (0010,0010) Patient's Name
    odd[at + 4:at + 6] = b"\x01\x02"
    (folder / "odd_vr.dcm").write_bytes(bytes(odd))
    (folder.parent / "odd-source.dcm").unlink()
    expected["odd_vr.dcm"] = "any"

    # A DICOMDIR under another name is never read through, nor indexed
    shutil.copy(str(get_testdata_file("DICOMDIR-bigEnd")), folder / "media.dcm")
    expected["media.dcm"] = "dicomdir"
    return expected


def archive_contents(root: Path) -> Counter[str]:
    """The sha256 of every file under an archive but the index and the lock files: what
    `verify --repair` must never lose."""
    return Counter(sha256(p) for p in root.rglob("*")
                   if p.is_file() and not p.name.startswith(layout.INDEX_FILE)
                   and layout.LOCKS_DIR not in p.parts)


def dead_pid() -> int:
    """The pid of a process that has just exited (for a stale staging folder)."""
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def write_non_ascii_sop_class(path: Path) -> Path:
    """CT_small.dcm with the first two bytes of its dataset's SOP Class UID made "é" in
    UTF-8; the file meta's stays right, so senders propose and name the real class."""
    from pydicom.data import get_testdata_file

    data = bytearray(Path(str(get_testdata_file("CT_small.dcm"))).read_bytes())
    value = data.index(b"1.2.840.10008.5.1.4.1.1.2", data.index(b"\x08\x00\x16\x00"))
    data[value:value + 2] = "é".encode()
    path.write_bytes(bytes(data))
    return path
