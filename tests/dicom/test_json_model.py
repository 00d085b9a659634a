"""The PS3.18 DICOM JSON model that `--dicom-json` adds to records."""

from __future__ import annotations

import base64
from pathlib import Path
from typing import Any

import pydicom
import pytest
from pydicom.dataset import Dataset
from pydicom.filewriter import dcmwrite
from pydicom.uid import (
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
)

from pacscli.dicom.json_model import (
    BULK_DATA_THRESHOLD,
    dataset_json,
    file_json,
    record_json,
    with_dicom_json,
)
from tests.conftest import testdata
from tests.dicom_files import bulk_bytes, make_dataset, write_instance


def test_a_file_gives_its_dataset_without_pixel_data() -> None:
    path = testdata("explicit_le")
    model = file_json(path)
    full = pydicom.dcmread(path)
    assert "7FE00010" not in model  # pixel data is left out
    assert "00020010" not in model  # the file meta is not part of the model
    for tag in [e.tag for e in full if e.tag >= 0x7FE00010]:  # pixel data and what follows
        del full[tag]
    bulk = {tag for tag, element in model.items() if "BulkDataURI" in element}
    assert bulk == {"00431029"}  # GE's private 2 KB: named, not inlined
    assert bulk_bytes(model.pop("00431029")["BulkDataURI"]) == full[0x00431029].value
    del full[0x00431029]
    assert model == full.to_json_dict()
    assert model["00100020"] == {"vr": "LO", "Value": ["1CT1"]}


def test_a_records_sequences_are_in_its_model() -> None:
    """A find match's sequences (lists of item records) were left out of --dicom-json."""
    model = record_json({"StudyInstanceUID": "1.2.3", "ProcedureCodeSequence": [
        {"CodeValue": "RPID5", "CodeMeaning": "CT HEAD"}, {"CodeValue": "RPID6",
                                                            "CodeMeaning": None}],
                         "ReferencedStudySequence": None})
    assert model["00081032"] == {"vr": "SQ", "Value": [
        {"00080100": {"vr": "SH", "Value": ["RPID5"]}, "00080104": {"vr": "LO", "Value": ["CT HEAD"]}},
        {"00080100": {"vr": "SH", "Value": ["RPID6"]}, "00080104": {"vr": "LO"}}]}
    assert model["00081110"] == {"vr": "SQ"}  # asked for, empty


def test_a_record_gives_its_own_values_with_dictionary_vrs() -> None:
    model = record_json({"QueryRetrieveLevel": "STUDY", "StudyInstanceUID": "1.2.3",
                         "PatientName": "Doe^John", "ModalitiesInStudy": ["CT", "MR"],
                         "NumberOfStudyRelatedInstances": 3, "PatientID": "",
                         "StudyDescription": None, "remote": "X@h:104", "status": "ok",
                         "error": {"code": "x"}})
    assert model == {
        "00080052": {"vr": "CS", "Value": ["STUDY"]},
        "00080061": {"vr": "CS", "Value": ["CT", "MR"]},
        "00081030": {"vr": "LO"},  # no value: the VR alone (PS3.18 F.2.5)
        "00100010": {"vr": "PN", "Value": [{"Alphabetic": "Doe^John"}]},
        "00100020": {"vr": "LO"},
        "0020000D": {"vr": "UI", "Value": ["1.2.3"]},
        "00201208": {"vr": "IS", "Value": [3]},
    }
    assert list(model) == sorted(model)  # in tag order, as in a file


def test_which_records_get_a_model() -> None:
    assert "dicom" not in with_dicom_json({"path": "x", "status": "failed"})
    skipped = {"path": str(testdata("explicit_le")), "status": "skipped"}
    assert with_dicom_json(skipped) == skipped  # not an instance for the command: no model


def test_values_json_cannot_hold_are_left_out_not_the_rest(caplog: pytest.LogCaptureFixture) -> None:
    """An IS of "abc", a NaN, a bad value deep in a sequence: each is left out with a warning
    (they raised, or gave invalid JSON), and everything around it is kept."""
    import json
    import struct
    from io import BytesIO

    from pydicom.filereader import read_dataset

    def element(group: int, number: int, value: bytes) -> bytes:  # Implicit VR Little Endian
        return struct.pack("<HHI", group, number, len(value)) + value

    undefined = struct.pack("<HHI", 0x0008, 0x1250, 0xFFFFFFFF)  # a sequence, then an item
    item = struct.pack("<HHI", 0xFFFE, 0xE000, 0xFFFFFFFF) + element(0x0008, 0x1150, b"1.2.3\x00") \
        + element(0x0018, 0x1063, b"x1.2") + struct.pack("<HHI", 0xFFFE, 0xE00D, 0)
    raw = undefined + item + struct.pack("<HHI", 0xFFFE, 0xE0DD, 0) \
        + element(0x0010, 0x0020, b"P1") + element(0x0018, 0x9087, struct.pack("<d", float("nan")))
    model = dataset_json(read_dataset(BytesIO(raw), True, True))
    assert model["00081250"] == {"vr": "SQ", "Value": [
        {"00081150": {"vr": "UI", "Value": ["1.2.3"]}}]}
    assert "00189087" not in model and model["00100020"] == {"vr": "LO", "Value": ["P1"]}
    json.loads(json.dumps(model, allow_nan=False))
    assert "left out" in caplog.text

    from_record = record_json({"InstanceNumber": "abc", "PatientWeight": "NaN", "PatientID": "P1"})
    assert from_record == {"00100020": {"vr": "LO", "Value": ["P1"]}}


def test_a_damaged_file_falls_back_to_the_record(tmp_path: Path) -> None:
    """A deflated file whose stream is garbage raised zlib.error through the command."""
    damaged = tmp_path / "damaged.dcm"
    data = bytearray(testdata("deflated").read_bytes())
    data[400:] = bytes(len(data) - 400)  # past the file meta: the deflate stream is gone
    damaged.write_bytes(bytes(data))
    record = with_dicom_json({"path": str(damaged), "status": "ok", "PatientID": "P1"})
    assert record["dicom"] == {"00100020": {"vr": "LO", "Value": ["P1"]}}


def test_a_file_gone_falls_back_to_the_record(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    record = {"path": str(tmp_path / "gone.dcm"), "status": "ok", "SOPInstanceUID": "1.2"}
    assert with_dicom_json(record)["dicom"] == {"00080018": {"vr": "UI", "Value": ["1.2"]}}
    assert "cannot read" in caplog.text


def test_long_binary_values_are_named_by_bulk_data_uris_into_the_file() -> None:
    """A waveform's samples, inside a sequence: a BulkDataURI naming their bytes in the file,
    not 240 KB of base64 in every record."""
    path = testdata("waveform_ecg.dcm")
    model = file_json(path)
    full = pydicom.dcmread(path)
    items = model["54000100"]["Value"]
    assert len(items) == len(full.WaveformSequence) == 2
    for item, dataset in zip(items, full.WaveformSequence, strict=True):
        assert set(item["54001010"]) == {"vr", "BulkDataURI"}
        assert item["54001010"]["vr"] == "OW"
        assert bulk_bytes(item["54001010"]["BulkDataURI"]) == dataset.WaveformData
        assert item["003A0005"] == {"vr": "US", "Value": [dataset.NumberOfWaveformChannels]}


@pytest.mark.parametrize("syntax", [ImplicitVRLittleEndian, DeflatedExplicitVRLittleEndian])
def test_bulk_data_in_implicit_vr_and_deflated_files(tmp_path: Path, syntax: str) -> None:
    """Implicit VR: the VR comes from the dictionary (UN for a private tag). Deflated: the
    file holds no offsets of the values, so they stay inline. A value at the threshold is
    inline either way."""
    ds = make_dataset()
    document = bytes(range(256)) * 20
    ds.EncapsulatedDocument = document
    ds.add_new(0x00091010, "LO", "PACSCLI TEST")  # a private creator, then its element
    ds.add_new(0x00091001, "OB", document[:BULK_DATA_THRESHOLD + 2])
    ds.add_new(0x00091002, "OB", document[:BULK_DATA_THRESHOLD])
    path = write_instance(tmp_path / "x.dcm", ds)
    written = pydicom.dcmread(path, force=True)
    written.file_meta.TransferSyntaxUID = syntax
    written.save_as(path, implicit_vr=syntax == ImplicitVRLittleEndian, little_endian=True)
    model = file_json(path)

    def value(element: dict[str, Any]) -> bytes:
        if syntax == DeflatedExplicitVRLittleEndian:
            assert "BulkDataURI" not in element
            return base64.b64decode(element["InlineBinary"])
        return bulk_bytes(element["BulkDataURI"])

    assert value(model["00420011"]) == document
    assert model["00420011"]["vr"] == "OB"
    assert value(model["00091001"]) == document[:BULK_DATA_THRESHOLD + 2]
    assert model["00091001"]["vr"] == ("UN" if syntax == ImplicitVRLittleEndian else "OB")
    assert base64.b64decode(model["00091002"]["InlineBinary"]) == document[:BULK_DATA_THRESHOLD]


def assert_bulk_data_is_in_place(model: dict[str, Any], dataset: pydicom.Dataset) -> int:
    """Check that each BulkDataURI of `model`, at any depth, names the bytes of pydicom's
    value for its element; return how many there were."""
    found = 0
    for key, element in model.items():
        tag = int(key, 16)
        if "BulkDataURI" in element:
            assert bulk_bytes(element["BulkDataURI"]) == dataset[tag].value, key
            found += 1
        elif element["vr"] == "SQ":
            for item, item_dataset in zip(element.get("Value", []), dataset[tag].value,
                                          strict=True):
                found += assert_bulk_data_is_in_place(item, item_dataset)
    return found


def test_bulk_data_in_a_sequence_of_defined_length() -> None:
    """pydicom counts the offsets of elements in such a sequence from its value: the icon
    image's pixel data was named 958 bytes into the file, where a UID is."""
    path = testdata("examples_overlay.dcm")
    model = file_json(path)
    assert assert_bulk_data_is_in_place(model, pydicom.dcmread(path)) == 3
    assert "BulkDataURI" in model["00880200"]["Value"][0]["7FE00010"]


@pytest.mark.parametrize("syntax", [ExplicitVRLittleEndian, ImplicitVRLittleEndian,
                                    ExplicitVRBigEndian])
def test_bulk_data_in_nested_sequences(tmp_path: Path, syntax: str) -> None:
    """Defined-length sequences within one another, and one of undefined length among
    them: every offset is the file's."""
    def item(payload: bytes, inner: list[Dataset] | None = None,
             defined: bool = True) -> Dataset:
        ds = Dataset()
        ds.add_new(0x00420011, "OB", payload)  # EncapsulatedDocument
        if inner is not None:
            ds.ReferencedImageSequence = inner
            ds["ReferencedImageSequence"].is_undefined_length = not defined
            for it in inner:
                it.is_undefined_length_sequence_item = not defined
        return ds

    ds = make_dataset()
    deepest = item(b"\x03" * 2048)
    middle = item(b"\x02" * 1500, [deepest], defined=False)
    ds.ContentSequence = [item(b"\x01" * 1200, [middle])]
    ds["ContentSequence"].is_undefined_length = False
    ds.ContentSequence[0].is_undefined_length_sequence_item = False
    path = write_instance(tmp_path / "x.dcm", ds)
    written = pydicom.dcmread(path, force=True)
    written.file_meta.TransferSyntaxUID = syntax
    dcmwrite(path, written, implicit_vr=syntax == ImplicitVRLittleEndian,
             little_endian=syntax != ExplicitVRBigEndian, force_encoding=True)
    assert pydicom.dcmread(path).get_item(0x0040A730).length != 0xFFFFFFFF  # defined, as meant
    model = file_json(path)
    assert assert_bulk_data_is_in_place(model, pydicom.dcmread(path)) == 3


def test_a_vr_pydicom_settles_decides_what_is_bulk_data(tmp_path: Path) -> None:
    """A public element written as UN is put in the model as pydicom reads it (a report's
    text as UT, not 2 KB of UN bulk data); overlay data in implicit VR is OW."""
    ds = make_dataset()
    text = "Findings: " + "x" * 2000
    ds.add_new(0x0040A160, "UN", text.encode())  # TextValue, UT in the dictionary
    explicit = write_instance(tmp_path / "explicit.dcm", ds)
    assert file_json(explicit)["0040A160"] == {"vr": "UT", "Value": [text]}

    ds = make_dataset()
    ds.add_new(0x60003000, "OW", b"\x55" * 2048)  # OverlayData, "OB or OW"
    implicit = write_instance(tmp_path / "implicit.dcm", ds)
    written = pydicom.dcmread(implicit, force=True)
    written.file_meta.TransferSyntaxUID = ImplicitVRLittleEndian
    written.save_as(implicit, implicit_vr=True, little_endian=True)
    model = file_json(implicit)
    assert model["60003000"]["vr"] == "OW"
    assert assert_bulk_data_is_in_place(model, pydicom.dcmread(implicit)) == 1


def test_a_long_value_named_by_a_bulk_data_uri_is_not_read(tmp_path: Path) -> None:
    """A 30 MB document: the model names it without loading it (the VR pydicom settles on
    is learned from an empty copy); it once cost its size in memory."""
    import tracemalloc

    ds = make_dataset()
    ds.EncapsulatedDocument = bytes(30 * 1024 * 1024)
    path = write_instance(tmp_path / "big.dcm", ds)
    del ds
    tracemalloc.start()
    try:
        model = file_json(path)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert model["00420011"]["vr"] == "OB" and "BulkDataURI" in model["00420011"]
    assert peak < 5 * 1024 * 1024, peak
