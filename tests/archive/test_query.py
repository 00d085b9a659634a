"""The archive's query engine over an archive filled through Archive.put: DICOM matching in
SQL, computed attributes, keys answered from files, limits, and what a retrieve sends."""

from __future__ import annotations

import sqlite3
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from pydicom.dataelem import RawDataElement
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence
from pydicom.tag import Tag

from pacscli.archive.archive import Archive
from pacscli.archive.index import SCHEMA_VERSION, Index
from pacscli.archive.query import find, find_records, instances_for_retrieve, open_index
from pacscli.dicom.query import InvalidQueryError, build_query
from pacscli.errors import UsageError
from tests.qr_data import (
    CT1_STUDY,
    HOLMES_SERIES_1,
    HOLMES_STUDY_1,
    HOLMES_STUDY_2,
    LESTRADE_SERIES,
    LESTRADE_STUDY,
    MR1_STUDY,
    UID_ROOT,
    US1_STUDY,
    WATSON_STUDY,
    corpus,
    save,
    synthetic,
)

MULLER_STUDY = f"{UID_ROOT}.1.9"


@pytest.fixture(scope="module")
def archive(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Archive]:
    """The corpus, plus a patient with a non-ASCII name, other IDs and a coded procedure."""
    folder = tmp_path_factory.mktemp("query")
    files = corpus(folder / "files")
    code = Dataset()
    code.CodeValue, code.CodingSchemeDesignator, code.CodeMeaning = "RPID5", "RADLEX", "CT HEAD"
    other = Dataset()
    other.CodeValue, other.CodingSchemeDesignator, other.CodeMeaning = "X1", "99LOCAL", "OTHER"
    muller = synthetic(MULLER_STUDY, f"{UID_ROOT}.2.9", f"{UID_ROOT}.3.9.1",
                       name="Müller^Jürgen", patient_id="MUELLER1", date="20240405",
                       modality="CT", number=1, OtherPatientIDs=["OLD-7", "OLD-8"],
                       ProcedureCodeSequence=Sequence([other, code]),
                       StudyDescription="HEAD [CONTRAST]", PatientAge="071Y")
    files.append(save(muller, folder / "files" / "muller.dcm"))
    store = Archive(folder / "archive")
    for path in files:
        store.put(path)
    yield store
    store.close()


def run(archive: Archive, level: str, *keys: str, model: str = "study",
        ci: bool = False, limit: int | None = None, defaults: bool = True) -> list[dict[str, Any]]:
    query = build_query(level, keys, model=model, defaults=defaults)
    return list(find_records(archive.index, query, case_insensitive_names=ci, limit=limit))


def studies(records: list[dict[str, Any]]) -> set[str]:
    return {r["StudyInstanceUID"] for r in records}


# --- matching -----------------------------------------------------------------------------------

def test_universal_matching_returns_every_study(archive: Archive) -> None:
    assert len(run(archive, "study")) == 13


def test_single_value_and_wildcards(archive: Archive) -> None:
    assert studies(run(archive, "study", "PatientID=4MR1")) == {MR1_STUDY}
    assert studies(run(archive, "study", "PatientName=CompressedSamples*")) == {
        CT1_STUDY, MR1_STUDY, US1_STUDY}
    assert studies(run(archive, "study", "PatientName=CompressedSamples^?R1")) == {MR1_STUDY}
    assert studies(run(archive, "study", "PatientName=*^Sherlock")) == {
        HOLMES_STUDY_1, HOLMES_STUDY_2}
    assert run(archive, "study", "PatientName=CompressedSamples") == []  # no implicit prefix
    assert run(archive, "study", "PatientName=compressedsamples*") == []  # exact case


def test_glob_special_characters_are_literal(archive: Archive) -> None:
    assert studies(run(archive, "study", "StudyDescription=HEAD [CONTRAST]")) == {MULLER_STUDY}
    assert studies(run(archive, "study", "StudyDescription=*[CONTRAST]")) == {MULLER_STUDY}
    assert run(archive, "study", "StudyDescription=HEAD [C]*") == []


def test_case_insensitive_person_names(archive: Archive) -> None:
    assert studies(run(archive, "study", "PatientName=compressedsamples^ct1", ci=True)) == {CT1_STUDY}
    assert studies(run(archive, "study", "PatientName=holmes*", ci=True)) == {
        HOLMES_STUDY_1, HOLMES_STUDY_2}
    # Unicode case folding beyond ASCII, and other VRs stay exact
    assert studies(run(archive, "study", "PatientName=MÜLLER*", ci=True)) == {MULLER_STUDY}
    assert studies(run(archive, "study", "PatientName=müller^jürgen", ci=True)) == {MULLER_STUDY}
    assert run(archive, "study", "PatientID=mueller1", ci=True) == []


def test_date_ranges(archive: Archive) -> None:
    assert studies(run(archive, "study", "StudyDate=20040101-20041231")) == {
        CT1_STUDY, MR1_STUDY, US1_STUDY}
    assert studies(run(archive, "study", "StudyDate=20240201-")) == {
        HOLMES_STUDY_2, WATSON_STUDY, MULLER_STUDY}
    assert len(run(archive, "study", "StudyDate=-20031231")) == 3  # 20030417, 0716, 0805
    assert studies(run(archive, "study", "StudyDate=20240115")) == {HOLMES_STUDY_1}
    assert len(run(archive, "study", "StudyDate=-")) == 13


def test_time_range_at_the_bound_precision(archive: Archive) -> None:
    # 093000 is within -0930 (to 09:30:59) but not within 0931-
    assert HOLMES_STUDY_1 in studies(run(archive, "study", "StudyTime=-0930"))
    assert HOLMES_STUDY_1 not in studies(run(archive, "study", "StudyTime=0931-"))


def test_uid_list_matching(archive: Archive) -> None:
    found = run(archive, "study", f"StudyInstanceUID={CT1_STUDY}\\{WATSON_STUDY}\\1.2.3")
    assert studies(found) == {CT1_STUDY, WATSON_STUDY}


def test_multi_valued_attributes_match_any_value(archive: Archive) -> None:
    found = run(archive, "study", "OtherPatientIDs=OLD-8")
    assert studies(found) == {MULLER_STUDY}
    assert found[0]["OtherPatientIDs"] == ["OLD-7", "OLD-8"]
    assert studies(run(archive, "study", "OtherPatientIDs=OLD*")) == {MULLER_STUDY}


def test_modalities_in_study_and_counts(archive: Archive) -> None:
    [holmes] = run(archive, "study", f"StudyInstanceUID={HOLMES_STUDY_1}")
    assert holmes["ModalitiesInStudy"] == "CT"
    assert holmes["NumberOfStudyRelatedSeries"] == 2
    assert holmes["NumberOfStudyRelatedInstances"] == 3
    assert studies(run(archive, "study", "ModalitiesInStudy=MR", "PatientID=HOLMES1")) == {
        HOLMES_STUDY_2}
    assert studies(run(archive, "study", "ModalitiesInStudy=MR\\XX", "PatientID=HOLMES1")) == {
        HOLMES_STUDY_2}
    assert HOLMES_STUDY_1 in studies(run(archive, "study", "SOPClassesInStudy=1.2.840.10008.5.1.4.1.1.2"))


def test_patient_level_in_patient_root(archive: Archive) -> None:
    [holmes] = run(archive, "patient", "PatientName=Holmes*", model="patient")
    assert holmes["QueryRetrieveLevel"] == "PATIENT"
    assert holmes["PatientID"] == "HOLMES1"
    assert holmes["NumberOfPatientRelatedStudies"] == 2
    assert holmes["NumberOfPatientRelatedSeries"] == 3
    assert holmes["NumberOfPatientRelatedInstances"] == 4
    with pytest.raises(InvalidQueryError, match="Patient Root"):
        list(find(archive.index, "patient", Dataset()))


def test_series_and_image_levels(archive: Archive) -> None:
    series = run(archive, "series", f"StudyInstanceUID={HOLMES_STUDY_1}")
    assert {s["SeriesInstanceUID"] for s in series} == {HOLMES_SERIES_1, f"{UID_ROOT}.2.2"}
    first = next(s for s in series if s["SeriesInstanceUID"] == HOLMES_SERIES_1)
    assert first["NumberOfSeriesRelatedInstances"] == 2 and first["Modality"] == "CT"
    images = run(archive, "image", f"StudyInstanceUID={LESTRADE_STUDY}",
                 f"SeriesInstanceUID={LESTRADE_SERIES}")
    assert len(images) == 2
    assert all(i["QueryRetrieveLevel"] == "IMAGE" and i["SOPClassUID"] for i in images)
    # relational: upper-level keys at a lower level
    assert len(run(archive, "image", "PatientID=HOLMES1")) == 4
    assert {s["Modality"] for s in run(archive, "series", "StudyDate=20040101-20041231")} == {
        "CT", "MR", "US"}


def test_keys_not_in_the_index_come_from_the_files(archive: Archive) -> None:
    [muller] = run(archive, "study", "PatientAge", "PatientID=MUELLER1")
    assert muller["PatientAge"] == "071Y"
    assert studies(run(archive, "study", "PatientAge=071Y")) == {MULLER_STUDY}
    assert run(archive, "study", "PatientAge=070Y") == []


def test_sequence_matching(archive: Archive) -> None:
    found = run(archive, "study", "ProcedureCodeSequence[0].CodeValue=RPID5",
                "ProcedureCodeSequence[0].CodeMeaning")
    assert studies(found) == {MULLER_STUDY}
    # only the matching item, with the keys asked for
    assert found[0]["ProcedureCodeSequence"] == [{"CodeValue": "RPID5", "CodeMeaning": "CT HEAD"}]
    assert run(archive, "study", "ProcedureCodeSequence.CodeValue=NOPE") == []
    # an empty sequence key asks for the whole sequence, and matches everything
    every = run(archive, "study", "ProcedureCodeSequence")
    assert len(every) == 13
    [muller] = [r for r in every if r["StudyInstanceUID"] == MULLER_STUDY]
    assert [item["CodeValue"] for item in muller["ProcedureCodeSequence"]] == ["X1", "RPID5"]


def test_lower_level_keys_are_ignored_by_the_engine(archive: Archive) -> None:
    identifier = build_query("study", ["PatientID=HOLMES1"]).identifier
    identifier.Modality = "MR"  # a series key at study level: not supported, not matched
    found = list(find(archive.index, "study", identifier))
    assert len(found) == 2 and all(not ds.Modality for ds in found)


def test_values_as_devices_wrote_them(tmp_path: Path, caplog: pytest.LogCaptureFixture,
                                      recwarn: pytest.WarningsRecorder) -> None:
    """A date in the old dotted form comes back as archived, without a warning per response;
    an IS that no number reads ('1A'), in the index or only in the file, comes back empty with
    one warning, and the query goes on to the other instances."""
    study = f"{UID_ROOT}.1.77"
    bad = synthetic(study, f"{UID_ROOT}.2.77", f"{UID_ROOT}.3.77.1", name="DOE^BAD",
                    patient_id="BAD1", date="20240101", modality="CT", number=1)
    with pytest.warns(UserWarning):  # pydicom's own warning when the test writes it
        bad.StudyDate = "1997.04.24"
    for keyword in ("NumberOfFrames", "StageNumber"):
        tag = Tag(keyword)
        bad[tag] = RawDataElement(tag, "IS", 2, b"1A", 0, False, True)
    good = synthetic(study, f"{UID_ROOT}.2.77", f"{UID_ROOT}.3.77.2", name="DOE^BAD",
                     patient_id="BAD1", date="20240101", modality="CT", number=2,
                     NumberOfFrames=1, StageNumber=3)
    good.StudyDate = "1997.04.24"
    store = Archive(tmp_path / "archive")
    try:
        for ds in (bad, good):
            store.put(save(ds, tmp_path / "files" / f"{ds.InstanceNumber}.dcm"))
        recwarn.clear()
        caplog.clear()
        [found] = run(store, "study", f"StudyInstanceUID={study}", "StudyDate")
        assert found["StudyDate"] == "1997.04.24"
        assert not [w for w in recwarn if issubclass(w.category, UserWarning)]
        assert not caplog.records
        images = run(store, "image", f"StudyInstanceUID={study}", "NumberOfFrames",
                      "StageNumber", "InstanceNumber")
    finally:
        store.close()
    by_number = {r["InstanceNumber"]: r for r in images}
    assert set(by_number) == {1, 2}
    assert by_number[1]["NumberOfFrames"] is None and by_number[1]["StageNumber"] is None
    assert by_number[2]["NumberOfFrames"] == 1 and by_number[2]["StageNumber"] == 3
    warned = [r.getMessage() for r in caplog.records if r.name == "pacscli.archive.query"]
    # NumberOfFrames is an index column; StageNumber is read from the file
    assert "NumberOfFrames '1A' at the image level in the archive is not a valid IS: " \
        "returned empty" in warned
    assert "StageNumber '1A' at the image level in the archive is not a valid IS: " \
        "returned empty" in warned


def test_studies_without_a_patient_id_keep_their_own_patient(tmp_path: Path) -> None:
    """Instances without a Patient ID used to share one patient row, named after the last
    one stored: the other studies answered with that name, and matching on their own missed
    them. Each such study now has its own patient; a patient with an ID is one row still."""
    store = Archive(tmp_path / "archive")
    people = [("1.41", "", "ANONYMIZED"), ("1.42", "", "LAST^FIRST"),
              ("1.43", "ID7", "SEVEN^A"), ("1.44", "ID7", "SEVEN^A")]
    try:
        for n, (suffix, patient_id, name) in enumerate(people):
            ds = synthetic(f"{UID_ROOT}{suffix}", f"{UID_ROOT}{suffix}.1", f"{UID_ROOT}{suffix}.1.1",
                           name=name, patient_id=patient_id, date="20240101", modality="CT",
                           number=1)
            store.put(save(ds, tmp_path / "files" / f"{n}.dcm"))
        found = {r["StudyInstanceUID"]: r["PatientName"]
                 for r in run(store, "study", "PatientName", "PatientID")}
        assert found == {f"{UID_ROOT}{s}": name for s, _, name in people}
        assert studies(run(store, "study", "PatientName=LAST*")) == {f"{UID_ROOT}1.42"}
        patients = run(store, "patient", "PatientName", "PatientID", model="patient")
        assert sorted(r["PatientName"] for r in patients) == ["ANONYMIZED", "LAST^FIRST",
                                                              "SEVEN^A"]
    finally:
        store.close()


def test_non_ascii_results_carry_utf8_charset(archive: Archive) -> None:
    identifier = build_query("study", ["PatientID=MUELLER1"]).identifier
    [ds] = find(archive.index, "study", identifier)
    assert ds.SpecificCharacterSet == "ISO_IR 192"
    assert str(ds.PatientName) == "Müller^Jürgen"
    [plain] = find(archive.index, "study", build_query("study", ["PatientID=HOLMES1",
                                                                  "StudyDate=20240115"]).identifier)
    assert "SpecificCharacterSet" not in plain


def test_service_keys(archive: Archive) -> None:
    identifier = build_query("study", ["PatientID=4MR1", "RetrieveAETitle",
                                       "InstanceAvailability"]).identifier
    [ds] = find(archive.index, "study", identifier, retrieve_aet="ARCHIVE")
    assert ds.RetrieveAETitle == "ARCHIVE" and ds.InstanceAvailability == "ONLINE"
    assert ds.QueryRetrieveLevel == "STUDY"


def test_limit_and_streaming(archive: Archive) -> None:
    assert len(run(archive, "study", limit=3)) == 3
    assert len(run(archive, "study", "PatientAge", limit=2)) == 2
    results = find(archive.index, "image", build_query("image").identifier)
    first = next(results)
    assert first.QueryRetrieveLevel == "IMAGE"
    results.close()  # an abandoned query leaves no read transaction behind
    with archive.index.transaction():
        pass
    with pytest.raises(UsageError):
        list(find(archive.index, "study", Dataset(), limit=0))


def test_queries_inside_a_running_query(archive: Archive) -> None:
    """A C-MOVE SCP may look up instances while a query streams, on the same connection."""
    outer = find(archive.index, "study", build_query("study", ["PatientName=holmes*"]).identifier,
                 case_insensitive_names=True)
    for ds in outer:
        inner = list(find(archive.index, "series", build_query(
            "series", [f"StudyInstanceUID={ds.StudyInstanceUID}", "PatientName=HOLMES*"]).identifier,
            case_insensitive_names=True))
        assert inner and instances_for_retrieve(archive.index, "study", ds)


def test_no_defaults_gives_only_the_asked_keys(archive: Archive) -> None:
    [record] = run(archive, "study", "PatientID=4MR1", "StudyDate", defaults=False)
    assert list(record) == ["QueryRetrieveLevel", "StudyInstanceUID", "PatientID", "StudyDate"]


# --- retrieve -----------------------------------------------------------------------------------

def test_instances_for_retrieve(archive: Archive) -> None:
    study = instances_for_retrieve(archive.index, "study", {"StudyInstanceUID": HOLMES_STUDY_1})
    assert len(study) == 3
    assert all(item.path.is_file() and item.path.is_absolute() for item in study)
    assert [item.sop_instance_uid for item in study][:2] == [
        f"{UID_ROOT}.3.1.1", f"{UID_ROOT}.3.1.2"]  # series, then instance number order
    assert {item.transfer_syntax for item in study} == {"1.2.840.10008.1.2.1"}
    series = instances_for_retrieve(archive.index, "SERIES", {
        "StudyInstanceUID": HOLMES_STUDY_1, "SeriesInstanceUID": HOLMES_SERIES_1})
    assert len(series) == 2
    identifier = Dataset()
    identifier.SOPInstanceUID = [f"{UID_ROOT}.3.1.1", f"{UID_ROOT}.3.4.1"]
    assert len(instances_for_retrieve(archive.index, "IMAGE", identifier)) == 2
    patient = instances_for_retrieve(archive.index, "PATIENT", {"PatientID": "HOLMES1"},
                                     model="patient")
    assert len(patient) == 4
    # a parent UID that disagrees narrows to nothing
    assert instances_for_retrieve(archive.index, "series", {
        "StudyInstanceUID": WATSON_STUDY, "SeriesInstanceUID": HOLMES_SERIES_1}) == []
    with pytest.raises(InvalidQueryError, match="SeriesInstanceUID"):
        instances_for_retrieve(archive.index, "series", {"StudyInstanceUID": HOLMES_STUDY_1})


# --- the index ----------------------------------------------------------------------------------

def test_schema_migration_adds_the_case_insensitive_name_index(tmp_path: Path) -> None:
    path = tmp_path / "index.sqlite"
    with sqlite3.connect(path) as conn:  # an index at schema version 1
        from pacscli.archive.index import MIGRATIONS

        for statement in MIGRATIONS[1].split(";\n"):
            if statement.strip():
                conn.execute(statement)
        conn.execute("PRAGMA user_version = 1")
    index = Index(path)
    assert index.schema_version() == SCHEMA_VERSION >= 2
    names = {row[0] for row in index.connection().execute(
        "SELECT name FROM sqlite_master WHERE type = 'index'")}
    assert "patients_name_lower" in names
    index.reset()  # --rebuild recreates it
    assert index.schema_version() == SCHEMA_VERSION
    index.close()


def test_open_index_refuses_a_folder_without_archive(tmp_path: Path) -> None:
    with pytest.raises(UsageError, match="no archive"):
        open_index(tmp_path)
    assert not (tmp_path / "index.sqlite").exists()


def test_query_engine_does_not_load_cli_modules() -> None:
    code = ("import sys, pacscli.archive.query, pacscli.dicom.query; "
            "assert not {'typer', 'rich'} & set(sys.modules), sorted(sys.modules)")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)
