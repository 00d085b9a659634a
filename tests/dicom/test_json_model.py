"""The PS3.18 DICOM JSON model that `--dicom-json` adds to records."""

from __future__ import annotations

from pathlib import Path

import pydicom
import pytest

from pacscli.dicom.json_model import file_json, record_json, with_dicom_json
from tests.conftest import testdata


def test_a_file_gives_its_dataset_without_pixel_data() -> None:
    path = testdata("explicit_le")
    model = file_json(path)
    full = pydicom.dcmread(path)
    assert "7FE00010" not in model  # pixel data is left out
    assert "00020010" not in model  # the file meta is not part of the model
    for tag in [e.tag for e in full if e.tag >= 0x7FE00010]:  # pixel data and what follows
        del full[tag]
    assert model == full.to_json_dict()
    assert model["00100020"] == {"vr": "LO", "Value": ["1CT1"]}


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


def test_which_records_get_a_model(tmp_path: Path) -> None:
    assert "dicom" not in with_dicom_json({"path": "x", "status": "failed"})
    text = tmp_path / "notes.txt"
    text.write_text("not DICOM")
    skipped = {"path": str(text), "status": "skipped"}
    assert with_dicom_json(skipped) == skipped  # not DICOM, and said so already


def test_a_file_gone_falls_back_to_the_record(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    record = {"path": str(tmp_path / "gone.dcm"), "status": "ok", "SOPInstanceUID": "1.2"}
    assert with_dicom_json(record)["dicom"] == {"00080018": {"vr": "UI", "Value": ["1.2"]}}
    assert "cannot read" in caplog.text
