"""The structural scan `pacs index` and `pacs verify` rely on: whole files pass, files cut
anywhere are caught (pydicom reads a file cut inside its pixel data without complaint)."""

from __future__ import annotations

import struct
import zlib
from io import BytesIO
from pathlib import Path

import pydicom
import pytest
from pydicom.filereader import data_element_generator

from pacscli.dicom.scan import (
    SERIES_INSTANCE_UID,
    SOP_INSTANCE_UID,
    STUDY_INSTANCE_UID,
    Part10File,
    scan_part10,
)
from pacscli.errors import InvalidDicomError
from tests.conftest import TESTDATA, testdata
from tests.dicom_files import make_dataset, write_instance

UIDS = (STUDY_INSTANCE_UID, SERIES_INSTANCE_UID, SOP_INSTANCE_UID)
PYDICOM_FILES = Path(pydicom.__file__).parent / "data" / "test_files"


def code_of(data: bytes) -> str:
    with pytest.raises(InvalidDicomError) as caught:
        scan_part10(data)
    return caught.value.code


@pytest.mark.parametrize("kind", sorted(TESTDATA))
def test_whole_files_pass_and_give_their_uids(kind: str) -> None:
    path = testdata(kind)
    ds = pydicom.dcmread(path, stop_before_pixels=True)
    result = scan_part10(path.read_bytes(), UIDS)
    assert result.transfer_syntax == ds.file_meta.TransferSyntaxUID
    assert result.text(SOP_INSTANCE_UID) == ds.SOPInstanceUID
    assert result.text(STUDY_INSTANCE_UID) == ds.StudyInstanceUID
    assert result.text(SERIES_INSTANCE_UID) == ds.SeriesInstanceUID
    assert not result.is_dicomdir


def element_boundaries(data: bytes, offset: int) -> dict[int, int]:
    """Where each top-level element ends (pydicom's reading): {offset: tag}."""
    uid = pydicom.uid.UID(scan_part10(data).transfer_syntax)
    if uid.is_deflated:
        return {}
    fp = BytesIO(data)
    fp.seek(offset)
    return {e.value_tell + e.length: e.tag for e in data_element_generator(
        fp, uid.is_implicit_VR, uid.is_little_endian)
        if getattr(e, "length", 0xFFFFFFFF) != 0xFFFFFFFF}


@pytest.mark.parametrize("kind", sorted(TESTDATA))
def test_every_cut_is_caught(kind: str) -> None:
    """Cut each file at many points, the pixel data (native, encapsulated, deflated) included,
    and between every two elements: every cut is an error but those that leave a whole
    dataset before the image's Rows; pydicom reads some of them as if whole."""
    data = testdata(kind).read_bytes()
    offset = scan_part10(data).dataset_offset
    end = len(data)
    if kind == "deflated":  # bytes after the deflate stream's end are not the dataset's
        inflater = zlib.decompressobj(-zlib.MAX_WBITS)
        inflater.decompress(data[offset:])
        end -= len(inflater.unused_data)
    boundaries = element_boundaries(data, offset)
    image = 0x00280010 in boundaries.values()
    step = max(1, (end - offset) // 40)
    for keep in sorted({*range(offset + 1, end, step), end - 1, *boundaries}):
        if keep in boundaries and not (image and 0x00280010 <= boundaries[keep] < 0x7FE00000):
            continue  # between two elements, and no image left without its pixel data
        assert code_of(data[:keep]) in ("truncated", "invalid-dicom"), (kind, keep)
    for keep in (0, 50, 131, 140):
        assert code_of(data[:keep]) in ("empty", "not-dicom", "truncated")


def test_pydicom_reads_a_file_cut_in_its_pixel_data_we_do_not(tmp_path: Path) -> None:
    path = write_instance(tmp_path / "whole.dcm", rows=32)
    cut = path.read_bytes()[:-100]
    ds = pydicom.dcmread(pydicom.filebase.DicomBytesIO(cut))  # no complaint
    assert len(ds.PixelData) < 32 * 32 * 2
    assert code_of(cut) == "truncated"


def test_what_is_not_a_part10_file(tmp_path: Path) -> None:
    assert code_of(b"") == "empty"
    assert code_of(b"hello world" * 30) == "not-dicom"
    raw = tmp_path / "raw.dcm"
    pydicom.dcmwrite(raw, make_dataset(), implicit_vr=True, little_endian=True)
    assert code_of(raw.read_bytes()) == "no-preamble"
    assert code_of((PYDICOM_FILES / "meta_missing_tsyntax.dcm").read_bytes()) == "invalid-dicom"
    assert scan_part10((PYDICOM_FILES / "dicomdirtests" / "DICOMDIR").read_bytes()).is_dicomdir


def test_a_stray_delimiter_or_a_garbled_item_is_invalid(tmp_path: Path) -> None:
    path = write_instance(tmp_path / "x.dcm")
    data = path.read_bytes()
    offset = scan_part10(data).dataset_offset
    stray = data[:offset] + struct.pack("<HHI", 0xFFFE, 0xE00D, 0) + data[offset:]
    assert code_of(stray) == "invalid-dicom"
    jpeg = testdata("jpeg_baseline").read_bytes()
    at = jpeg.index(b"\xfe\xff\x00\xe0", jpeg.index(b"\xe0\x7f\x10\x00"))  # first item
    garbled = jpeg[:at] + b"\x08\x00\x10\x00" + jpeg[at + 4:]
    assert code_of(garbled) == "invalid-dicom"


def test_big_files_are_mapped_not_read(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import pacscli.dicom.scan as scan

    monkeypatch.setattr(scan, "_READ_LIMIT", 100)
    monkeypatch.setattr(scan, "_HEAD_FIRST", 100)
    path = write_instance(tmp_path / "x.dcm")
    with Part10File(path) as f:
        assert not isinstance(f.data, bytes)
        assert f.scan(UIDS).text(SOP_INSTANCE_UID) == pydicom.dcmread(path).SOPInstanceUID
    big_junk = tmp_path / "junk.bin"
    big_junk.write_bytes(b"x" * 1000)
    with pytest.raises(InvalidDicomError, match="no DICM"):
        Part10File(big_junk)
