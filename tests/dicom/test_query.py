"""Query identifiers: `-k KEY=VALUE` parsing, default keys per level and model, DICOM matching
in memory, and query results as records."""

from __future__ import annotations

import pytest
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence
from pydicom.tag import Tag

from pacscli.dicom.query import (
    DEFAULT_KEYS,
    InvalidQueryError,
    build_query,
    check_level,
    identifier_record,
    matcher,
    matches,
    parse_key,
    tag_of,
)
from pacscli.errors import UsageError


def test_tag_of_keywords_and_tags() -> None:
    assert tag_of("PatientName") == Tag(0x0010, 0x0010)
    assert tag_of("(0010,0020)") == tag_of("0010,0020") == tag_of("00100020") == Tag(0x0010, 0x0020)
    with pytest.raises(UsageError, match="unknown DICOM attribute 'PatientNme'"):
        tag_of("PatientNme")


def test_parse_key() -> None:
    assert parse_key("PatientName=SMI*") == ([Tag(0x0010, 0x0010)], "SMI*")
    assert parse_key("StudyDate") == ([Tag(0x0008, 0x0020)], "")
    assert parse_key("(0008,0061)=CT\\MR") == ([Tag(0x0008, 0x0061)], "CT\\MR")
    assert parse_key("ProcedureCodeSequence[0].CodeValue=X") == (
        [Tag(0x0008, 0x1032), Tag(0x0008, 0x0100)], "X")
    with pytest.raises(UsageError, match="one item"):
        parse_key("ProcedureCodeSequence[1].CodeValue=X")
    with pytest.raises(UsageError, match="not a sequence"):
        parse_key("PatientName.CodeValue=X")
    with pytest.raises(UsageError, match="invalid key"):
        parse_key("=X")


def test_values_outside_their_vr_syntax() -> None:
    """Wildcards, ranges and lists are kept as written; a range on an IS is a usage error (no
    range matching there), reported as such rather than as a traceback."""
    query = build_query("image", ["StudyDate=20240101-20240131", "PatientName=SMI*",
                                  "InstanceNumber=1\\2", "StudyInstanceUID=1.2"])
    assert query.identifier.StudyDate == "20240101-20240131"
    assert query.identifier.PatientName == "SMI*"
    assert list(query.identifier.InstanceNumber) == [1, 2]
    with pytest.raises(UsageError, match="'1-3' is not a valid IS value for InstanceNumber"):
        build_query("image", ["InstanceNumber=1-3", "StudyInstanceUID=1.2"])


@pytest.mark.parametrize("key", ["StudyDate=2024", "StudyDate=abc", "StudyDate=2024-01-01",
                                 "StudyDate=2024-", "StudyTime=9", "StudyTime=09:30",
                                 "StudyDate=20240101\\x"])
def test_malformed_dates_and_times_are_usage_errors(key: str) -> None:
    """They matched nothing, with exit 0: 'StudyDate=2024' looked like a year's studies."""
    keyword = key.partition("=")[0]
    with pytest.raises(UsageError, match=f"is not a valid (DA|TM) value for {keyword}: give"):
        build_query("study", [key])


def test_a_value_for_a_return_only_key_is_a_usage_error() -> None:
    """NumberOfStudyRelatedInstances=3 was ignored without a word: every study came back."""
    with pytest.raises(UsageError, match="NumberOfStudyRelatedInstances is computed by the "
                                         "peer: a return key only"):
        build_query("study", ["NumberOfStudyRelatedInstances=3"])
    assert "NumberOfStudyRelatedInstances" in build_query(
        "study", ["NumberOfStudyRelatedInstances"]).identifier
    assert build_query("study", ["ModalitiesInStudy=CT"]).identifier.ModalitiesInStudy == "CT"


def test_levels_and_models() -> None:
    assert check_level("instance", "study") == ("IMAGE", "study")
    assert check_level("Patient", "patient-root") == ("PATIENT", "patient")
    with pytest.raises(InvalidQueryError, match="Patient Root"):
        check_level("patient", "study")
    with pytest.raises(InvalidQueryError, match="unknown query level"):
        check_level("frame", "study")


def test_study_level_defaults() -> None:
    query = build_query("study", ["PatientName=SMI*"])
    ds = query.identifier
    assert ds.QueryRetrieveLevel == "STUDY"
    assert ds.PatientName == "SMI*"
    for keyword in ("StudyDate", "StudyTime", "AccessionNumber", "PatientID", "StudyID",
                    "StudyInstanceUID", "ModalitiesInStudy", "NumberOfStudyRelatedInstances",
                    "StudyDescription"):
        assert keyword in ds and not ds[keyword].value, keyword
    assert query.order[0] == "QueryRetrieveLevel"
    assert query.order[1:] == list(DEFAULT_KEYS["study"]["STUDY"])


def test_unique_keys_of_the_levels_above_are_always_asked() -> None:
    query = build_query("image", ["InstanceNumber=1"], defaults=False)
    assert query.order == ["QueryRetrieveLevel", "StudyInstanceUID", "SeriesInstanceUID",
                           "SOPInstanceUID", "InstanceNumber"]
    patient_root = build_query("series", [], model="patient", defaults=False)
    assert patient_root.order[1:] == ["PatientID", "StudyInstanceUID", "SeriesInstanceUID"]


def test_later_keys_win_and_empty_values_are_return_keys() -> None:
    ds = build_query("study", ["PatientID=A", "PatientID=B", "PatientAge="]).identifier
    assert ds.PatientID == "B"
    assert "PatientAge" in ds and not ds.PatientAge


def test_lower_level_keys_are_refused() -> None:
    with pytest.raises(UsageError, match=r"Modality is a series-level key.*ModalitiesInStudy"):
        build_query("study", ["Modality=CT"])
    with pytest.raises(UsageError, match="SOPInstanceUID is an image-level key"):
        build_query("series", ["SOPInstanceUID=1.2.3"])
    # patient keys are study level in Study Root, and upper levels are fine
    build_query("series", ["PatientName=X*", "StudyDate=20240101-"])


def test_non_ascii_values_set_utf8() -> None:
    assert build_query("study", ["PatientName=Müller*"]).identifier.SpecificCharacterSet == "ISO_IR 192"
    assert "SpecificCharacterSet" not in build_query("study", ["PatientName=M*"]).identifier


def test_sequence_keys() -> None:
    ds = build_query("study", ["ProcedureCodeSequence[0].CodeValue=RPID5",
                               "ProcedureCodeSequence[0].CodeMeaning"]).identifier
    item = ds.ProcedureCodeSequence[0]
    assert item.CodeValue == "RPID5" and "CodeMeaning" in item
    with pytest.raises(UsageError, match="is a sequence"):
        build_query("study", ["ProcedureCodeSequence=X"])


@pytest.mark.parametrize(("vr", "query", "value", "expected"), [
    ("PN", "", "Anything", True),
    ("PN", "*", "Anything", True),
    ("PN", "SMITH^JOHN", "SMITH^JOHN", True),
    ("PN", "SMITH^JOHN", "SMITH^JOHNNY", False),
    ("PN", "SMI*", "SMITH^JOHN", True),
    ("PN", "SMI*", "smith^john", False),
    ("PN", "?MITH*", "SMITH^JOHN", True),
    ("LO", "A[1]*", "A[1]B", True),
    ("DA", "20240101-20240131", "20240115", True),
    ("DA", "20240101-20240131", "20240201", False),
    ("DA", "20240101-", "20991231", True),
    ("DA", "-20240101", "20240101", True),
    ("DA", "-20240101", "20240102", False),
    ("TM", "-1300", "130059", True),
    ("TM", "-1300", "130100", False),
    ("TM", "1200-", "115959", False),
    ("UI", "1.2.3\\1.2.4", "1.2.4", True),
    ("UI", "1.2.3\\1.2.4", "1.2.5", False),
    ("UI", "1.2.*", "1.2.3", False),  # no wildcards for UIDs
    ("CS", "CT\\MR", "MR", True),
    ("PN", "SMI*", "", False),  # an empty value matches universal matching only
    # a DT's negative UTC offset is not a range's hyphen (it was split as one)
    ("DT", "20200101120000-0500", "20200101120000-0500", True),
    ("DT", "20200101120000-0500", "20200101120000", False),
    ("DT", "20200101120000-0500-20200102", "20200101120000-0500", True),
    ("DT", "20200101120000-0500-20200102", "20200103", False),
    ("DT", "20200101-2021", "20210615", True),  # -2021 is no offset (hours up to 14)
    ("DT", "20200101-", "20200101120000+0100", True),
    # a time or date-time matches at its own precision, as its ranges do (DCMTK does too)
    ("TM", "0930", "093000", True),
    ("TM", "0930", "093059.999", True),
    ("TM", "0930", "093100", False),
    ("TM", "235959", "235959.123456", True),
    ("TM", "1230\\0930", "093015", True),
    ("DT", "2020010112", "20200101123000", True),
    ("DT", "2020010112", "20200101130000", False),
])
def test_matcher(vr: str, query: str, value: str, expected: bool) -> None:
    assert matcher(vr, query).test(value) is expected


def test_case_insensitive_names_only() -> None:
    assert matcher("PN", "smi*", case_insensitive_names=True).test("SMITH^JOHN")
    assert matcher("PN", "müller", case_insensitive_names=True).test("MÜLLER")
    assert not matcher("LO", "smi*", case_insensitive_names=True).test("SMITH")


def test_matches_datasets_and_sequences() -> None:
    candidate = Dataset()
    candidate.PatientName, candidate.StudyDate = "SMITH^JOHN", "20240115"
    candidate.OtherPatientIDs = ["A1", "B2"]
    code = Dataset()
    code.CodeValue, code.CodingSchemeDesignator = "RPID5", "RADLEX"
    candidate.ProcedureCodeSequence = Sequence([code])
    query = build_query("study", ["PatientName=SMI*", "StudyDate=20240101-",
                                  "OtherPatientIDs=B2",
                                  "ProcedureCodeSequence[0].CodeValue=RPID5"]).identifier
    assert matches(query, candidate)
    query.ProcedureCodeSequence[0].CodeValue = "OTHER"
    assert not matches(query, candidate)
    query.ProcedureCodeSequence[0].CodeValue = ""
    assert matches(query, candidate)  # an item of return keys only matches universally
    query.OtherPatientIDs = "C3"
    assert not matches(query, candidate)


def test_identifier_record() -> None:
    ds = Dataset()
    ds.QueryRetrieveLevel = "STUDY"
    ds.SpecificCharacterSet = "ISO_IR 192"
    ds.PatientName = "Müller^Jürgen"
    ds.ModalitiesInStudy = ["CT", "MR"]
    ds.NumberOfStudyRelatedInstances = "12"
    ds.StudyDescription = ""
    ds.RetrieveAETitle = "QRSCP"
    record = identifier_record(ds, ["QueryRetrieveLevel", "PatientName", "StudyDescription",
                                    "ModalitiesInStudy", "NumberOfStudyRelatedInstances",
                                    "AccessionNumber"])
    assert record == {"QueryRetrieveLevel": "STUDY", "PatientName": "Müller^Jürgen",
                      "StudyDescription": None, "ModalitiesInStudy": ["CT", "MR"],
                      "NumberOfStudyRelatedInstances": 12, "AccessionNumber": None,
                      "RetrieveAETitle": "QRSCP"}
    assert list(record)[-1] == "RetrieveAETitle"  # what the peer adds comes last
