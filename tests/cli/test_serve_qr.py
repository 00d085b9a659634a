"""`pacs serve` as a Query/Retrieve SCP, driven by DCMTK's findscu, movescu and getscu and by
a pynetdicom SCU for C-CANCEL."""

from __future__ import annotations

import subprocess
from collections.abc import Iterator
from pathlib import Path

import pydicom
import pytest
from pydicom.dataset import Dataset
from pynetdicom import AE
from pynetdicom.pdu_primitives import SOPClassExtendedNegotiation
from pynetdicom.sop_class import StudyRootQueryRetrieveInformationModelFind

from pacscli.archive.archive import Archive
from tests.conftest import DCMTK_ENV, Server, free_port, require, start_server, testdata
from tests.qr_data import (
    HOLMES_SERIES_1,
    HOLMES_STUDY_1,
    HOLMES_STUDY_2,
    WATSON_STUDY,
    StoreSCP,
    corpus,
    records,
    run_pacs,
    sop_uids_of_studies,
    synthetic,
)


@pytest.fixture(scope="module")
def qr(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Server, list[Path], StoreSCP]]:
    """pacs serve over an archive holding the Q/R corpus, with DEST (a DCMTK storescp) as
    its only configured move destination."""
    tmp = tmp_path_factory.mktemp("serve-qr")
    files = corpus(tmp / "corpus")
    archive = Archive(tmp / "serve" / "archive")
    for path in files:
        archive.put(path)
    archive.close()
    dest = StoreSCP(tmp / "dest", free_port()).start()
    (tmp / "serve" / "config.toml").write_text(
        f'[remotes.DEST]\nae_title = "STORESCP"\nhost = "127.0.0.1"\nport = {dest.port}\n')
    server = start_server(tmp / "serve", archive=tmp / "serve" / "archive")
    yield server, files, dest
    server.stop()
    dest.stop()


def dcmtk(tool: str, server: Server, *args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    cwd.mkdir(parents=True, exist_ok=True)
    return subprocess.run([require(tool), "-aec", "PACSCLI", *args, "127.0.0.1", str(server.port)],
                          capture_output=True, text=True, cwd=cwd, env=DCMTK_ENV, timeout=120)


def find(server: Server, tmp: Path, *keys: str, patient_root: bool = False) -> list[Dataset]:
    """findscu, each response extracted to a file (-X) and read back."""
    args = ["-P" if patient_root else "-S", "-X"]
    for key in keys:
        args += ["-k", key]
    result = dcmtk("findscu", server, *args, cwd=tmp)
    assert result.returncode == 0, result.stderr
    return [pydicom.dcmread(p) for p in sorted(tmp.glob("rsp*.dcm"))]


def values(responses: list[Dataset], keyword: str) -> set[str]:
    return {str(ds.get(keyword, "")) for ds in responses}


def test_find_study_level_wildcard_name(qr: tuple[Server, list[Path], StoreSCP], tmp_path: Path) -> None:
    server, _, _ = qr
    found = find(server, tmp_path, "QueryRetrieveLevel=STUDY", "PatientName=Holmes*",
                 "StudyInstanceUID", "StudyDate", "ModalitiesInStudy",
                 "NumberOfStudyRelatedInstances")
    assert values(found, "StudyInstanceUID") == {HOLMES_STUDY_1, HOLMES_STUDY_2}
    first = next(ds for ds in found if ds.StudyInstanceUID == HOLMES_STUDY_1)
    assert int(first.NumberOfStudyRelatedInstances) == 3
    assert list(first.ModalitiesInStudy) == ["CT"] or first.ModalitiesInStudy == "CT"
    # only the requested keys come back (plus the level and character set)
    assert {e.keyword for e in first} <= {"QueryRetrieveLevel", "SpecificCharacterSet", "PatientName",
                                          "StudyInstanceUID", "StudyDate", "ModalitiesInStudy",
                                          "NumberOfStudyRelatedInstances", "RetrieveAETitle"}


def test_serve_agrees_to_relational_queries_and_fuzzy_names(
        qr: tuple[Server, list[Path], StoreSCP], tmp_path: Path) -> None:
    """serve matches relationally and names case-insensitively on request, but said so to
    no requestor: `pacs find --ci-names` against it matched names case-sensitively (and
    warned), and a relational query was asked level by level."""
    server, _, _ = qr
    ci = run_pacs(tmp_path, "find", server.remote, "--ci-names", "-k", "PatientName=holmes*")
    assert ci.returncode == 0, ci.stderr
    assert {r["StudyInstanceUID"] for r in records(ci)} == {HOLMES_STUDY_1, HOLMES_STUDY_2}
    assert "did not agree" not in ci.stderr
    relational = run_pacs(tmp_path, "find", server.remote, "-v", "--level", "series",
                          "-k", "PatientID=HOLMES1")
    assert relational.returncode == 0, relational.stderr
    assert len(records(relational)) == 3 and "did not agree" not in relational.stderr
    # options serve does not support (combined date-time matching) are not agreed to
    ae = AE(ae_title="FINDSCU")
    ae.add_requested_context(StudyRootQueryRetrieveInformationModelFind)
    asked = SOPClassExtendedNegotiation()
    asked.sop_class_uid = StudyRootQueryRetrieveInformationModelFind
    asked.service_class_application_information = b"\x01\x01\x01"
    assoc = ae.associate("127.0.0.1", server.port, ae_title=server.aet, ext_neg=[asked])
    try:
        assert assoc.acceptor.sop_class_extended == {
            StudyRootQueryRetrieveInformationModelFind: b"\x01\x00\x01"}
    finally:
        assoc.release()


def test_a_private_creator_in_a_query_reserves_its_block_and_matches_nothing(
        qr: tuple[Server, list[Path], StoreSCP], tmp_path: Path) -> None:
    """Vendor workstations send their private creator with each query: serve matched on it,
    and found nothing where dcmqrscp finds the study."""
    server, _, _ = qr
    found = find(server, tmp_path, "QueryRetrieveLevel=STUDY", "PatientID=WATSON1",
                 "StudyInstanceUID", "(0009,0010)=ACME", "(0009,1001)")
    assert values(found, "StudyInstanceUID") == {WATSON_STUDY}


def test_find_date_range_and_uid_list(qr: tuple[Server, list[Path], StoreSCP], tmp_path: Path) -> None:
    server, _, _ = qr
    in_range = find(server, tmp_path / "range", "QueryRetrieveLevel=STUDY",
                    "StudyDate=20240101-20240228", "StudyInstanceUID")
    assert values(in_range, "StudyInstanceUID") == {HOLMES_STUDY_1, HOLMES_STUDY_2}
    listed = find(server, tmp_path / "list", "QueryRetrieveLevel=STUDY",
                  f"StudyInstanceUID={HOLMES_STUDY_2}\\{WATSON_STUDY}")
    assert values(listed, "StudyInstanceUID") == {HOLMES_STUDY_2, WATSON_STUDY}


def test_find_series_and_image_levels(qr: tuple[Server, list[Path], StoreSCP], tmp_path: Path) -> None:
    server, _, _ = qr
    series = find(server, tmp_path / "series", "QueryRetrieveLevel=SERIES",
                  f"StudyInstanceUID={HOLMES_STUDY_1}", "SeriesInstanceUID", "Modality")
    assert len(series) == 2 and values(series, "Modality") == {"CT"}
    images = find(server, tmp_path / "images", "QueryRetrieveLevel=IMAGE",
                  f"StudyInstanceUID={HOLMES_STUDY_1}", f"SeriesInstanceUID={HOLMES_SERIES_1}",
                  "SOPInstanceUID", "InstanceNumber")
    assert sorted(int(ds.InstanceNumber) for ds in images) == [1, 2]


def test_find_patient_root(qr: tuple[Server, list[Path], StoreSCP], tmp_path: Path) -> None:
    server, _, _ = qr
    patients = find(server, tmp_path / "patients", "QueryRetrieveLevel=PATIENT", "PatientID=HOLMES1",
                    "PatientName", patient_root=True)
    assert len(patients) == 1 and str(patients[0].PatientName) == "Holmes^Sherlock"
    studies = find(server, tmp_path / "studies", "QueryRetrieveLevel=STUDY", "PatientID=HOLMES1",
                   "StudyInstanceUID", patient_root=True)
    assert values(studies, "StudyInstanceUID") == {HOLMES_STUDY_1, HOLMES_STUDY_2}


def test_move_to_a_configured_destination(qr: tuple[Server, list[Path], StoreSCP], tmp_path: Path) -> None:
    server, files, dest = qr
    dest.clear()
    result = dcmtk("movescu", server, "-S", "-aem", "STORESCP", "-k", "QueryRetrieveLevel=STUDY",
                   "-k", f"StudyInstanceUID={HOLMES_STUDY_1}\\{WATSON_STUDY}", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert dest.received() == sop_uids_of_studies(files, [HOLMES_STUDY_1, WATSON_STUDY])


def test_move_to_an_unknown_destination_is_a801(qr: tuple[Server, list[Path], StoreSCP],
                                                tmp_path: Path) -> None:
    server, _, _ = qr
    result = dcmtk("movescu", server, "-S", "-aem", "NOWHERE", "-k", "QueryRetrieveLevel=STUDY",
                   "-k", f"StudyInstanceUID={HOLMES_STUDY_1}", cwd=tmp_path)
    assert "MoveDestinationUnknown" in result.stdout + result.stderr
    assert "[remotes.NOWHERE]" in server.stderr()


def test_move_to_an_unreachable_destination_says_so_in_its_comment(tmp_path: Path) -> None:
    """The destination is configured but nothing listens there: 0xA702 whose 64-character
    Error Comment names the destination and the failure (it was the start of a longer
    message, cut in the middle: "...connection refused by")."""
    src = tmp_path / "src"
    archive = Archive(tmp_path / "archive")
    archive.put(testdata("explicit_le"))
    archive.close()
    study = str(pydicom.dcmread(testdata("explicit_le")).StudyInstanceUID)
    (tmp_path / "serve").mkdir()
    (tmp_path / "serve" / "config.toml").write_text(
        f'[remotes.DEST]\nae_title = "DEST"\nhost = "127.0.0.1"\nport = {free_port()}\n')
    server = start_server(tmp_path / "serve", archive=tmp_path / "archive")
    try:
        result = dcmtk("movescu", server, "-S", "-d", "-aem", "DEST", "-k",  # -d shows the comment
                       "QueryRetrieveLevel=STUDY", "-k", f"StudyInstanceUID={study}", cwd=src)
    finally:
        server.stop()
    output = result.stdout + result.stderr
    assert "cannot send to DEST: connection-failed" in output, output
    assert "connection refused" in server.stderr()  # the log has the whole story


def test_move_of_nothing_known_is_success_with_no_sub_operations(
        qr: tuple[Server, list[Path], StoreSCP], tmp_path: Path) -> None:
    """A study the archive does not hold: success and nothing sent, as for C-GET; it used to
    be 0xA702 with `pacs store`'s "nothing to store" as the comment."""
    server, _, dest = qr
    dest.clear()
    result = dcmtk("movescu", server, "-S", "-v", "-aem", "STORESCP", "-k",
                   "QueryRetrieveLevel=STUDY", "-k", "StudyInstanceUID=9.9.9", cwd=tmp_path)
    output = result.stdout + result.stderr
    assert result.returncode == 0, output
    assert "Success" in output and "OutOfResources" not in output
    assert dest.received() == set()
    assert "nothing to store" not in server.stderr()


def test_get_study_and_series(qr: tuple[Server, list[Path], StoreSCP], tmp_path: Path) -> None:
    server, files, _ = qr
    result = dcmtk("getscu", server, "-S", "-k", "QueryRetrieveLevel=STUDY",
                   "-k", f"StudyInstanceUID={HOLMES_STUDY_1}", cwd=tmp_path / "study")
    assert result.returncode == 0, result.stderr
    got = {str(pydicom.dcmread(p).SOPInstanceUID) for p in (tmp_path / "study").iterdir()}
    assert got == sop_uids_of_studies(files, [HOLMES_STUDY_1])
    result = dcmtk("getscu", server, "-P", "-k", "QueryRetrieveLevel=SERIES",
                   "-k", "PatientID=HOLMES1", "-k", f"StudyInstanceUID={HOLMES_STUDY_1}",
                   "-k", f"SeriesInstanceUID={HOLMES_SERIES_1}", cwd=tmp_path / "series")
    assert result.returncode == 0, result.stderr
    assert len(list((tmp_path / "series").iterdir())) == 2


def test_get_and_move_go_on_past_an_instance_they_cannot_convert(tmp_path: Path) -> None:
    """getscu takes uncompressed syntaxes only: an archived JPEG whose data cannot be
    decoded fails its own sub-operation, and the association carries the rest (the error
    pydicom raised used to abort it)."""
    study = "1.2.826.0.1.3680043.2.1125.77.1"
    broken = pydicom.dcmread(testdata("jpeg_baseline"))
    broken.PixelData = b"\xfe\xff\x00\xe0\x00\x00\x00\x00" + b"\xfe\xff\x00\xe0\x04\x00\x00\x00" \
        + b"\xff\xd8\xff\xd9"
    broken.StudyInstanceUID = study
    broken.save_as(tmp_path / "broken.dcm")
    good = pydicom.dcmread(testdata("explicit_le"))
    good.StudyInstanceUID = study
    good.save_as(tmp_path / "good.dcm")
    archive = Archive(tmp_path / "archive")
    for name in ("broken.dcm", "good.dcm"):
        archive.put(tmp_path / name)
    archive.close()
    dest = StoreSCP(tmp_path / "dest", free_port()).start()  # uncompressed syntaxes only
    (tmp_path / "serve").mkdir()
    (tmp_path / "serve" / "config.toml").write_text(
        f'[remotes.DEST]\nae_title = "STORESCP"\nhost = "127.0.0.1"\nport = {dest.port}\n')
    server = start_server(tmp_path / "serve", archive=tmp_path / "archive")
    try:
        result = dcmtk("getscu", server, "-S", "-k", "QueryRetrieveLevel=STUDY",
                       "-k", f"StudyInstanceUID={study}", cwd=tmp_path / "got")
        moved = dcmtk("movescu", server, "-S", "-aem", "STORESCP", "-k",
                      "QueryRetrieveLevel=STUDY", "-k", f"StudyInstanceUID={study}",
                      cwd=tmp_path / "mv")
    finally:
        server.stop()
        dest.stop()
    output = result.stdout + result.stderr
    assert "abort" not in output.lower(), output
    [received] = (tmp_path / "got").iterdir()
    assert pydicom.dcmread(received).SOPInstanceUID == good.SOPInstanceUID
    assert f"C-GET: cannot convert {tmp_path / 'archive'}" in server.stderr()
    # C-MOVE: the same one fails alone, and the log names it and says why
    assert "abort" not in (moved.stdout + moved.stderr).lower()
    assert dest.received() == {good.SOPInstanceUID}
    assert "to STORESCP: " in server.stderr() and "failed: cannot decompress" in server.stderr()


@pytest.mark.parametrize("accept", ["+x=", "+xi"])
def test_get_converts_between_uncompressed_syntaxes(tmp_path: Path, accept: str) -> None:
    """getscu accepts one uncompressed syntax (+x=: explicit VR first, which serve takes;
    +xi: implicit VR only): an instance archived in the other one arrives converted, with
    the same pixel data. It used to fail its sub-operation (0xB000)."""
    study = "1.2.826.0.1.3680043.2.1125.77.2"
    originals = {}
    for name in ("implicit_le", "explicit_le"):
        ds = pydicom.dcmread(testdata(name))
        ds.StudyInstanceUID = study
        ds.save_as(tmp_path / f"{name}.dcm")
        originals[str(ds.SOPInstanceUID)] = ds
    archive = Archive(tmp_path / "archive")
    for name in ("implicit_le", "explicit_le"):
        archive.put(tmp_path / f"{name}.dcm")
    archive.close()
    (tmp_path / "serve").mkdir()
    server = start_server(tmp_path / "serve", archive=tmp_path / "archive")
    try:
        result = dcmtk("getscu", server, "-S", accept, "-k", "QueryRetrieveLevel=STUDY",
                       "-k", f"StudyInstanceUID={study}", cwd=tmp_path / "got")
    finally:
        server.stop()
    assert result.returncode == 0, result.stdout + result.stderr
    received = [pydicom.dcmread(p) for p in (tmp_path / "got").iterdir()]
    assert {str(ds.SOPInstanceUID) for ds in received} == set(originals)
    for ds in received:  # getscu writes its files in a syntax of its own choosing
        assert ds.PixelData == originals[str(ds.SOPInstanceUID)].PixelData


def test_c_cancel_stops_a_large_find(tmp_path: Path) -> None:
    archive = Archive(tmp_path / "archive")
    for n in range(300):
        ds = synthetic("1.2.3.4", "1.2.3.4.5", f"1.2.3.4.5.{n}", name="Many^Results",
                       patient_id="MANY", date="20240101", modality="CT", number=n)
        from tests.qr_data import save

        archive.put(save(ds, tmp_path / "files" / f"{n}.dcm"))
    archive.close()
    server = start_server(tmp_path / "serve", archive=tmp_path / "archive", port=free_port())
    try:
        ae = AE(ae_title="CANCELLER")
        ae.add_requested_context(StudyRootQueryRetrieveInformationModelFind)
        assoc = ae.associate("127.0.0.1", server.port, ae_title="PACSCLI")
        query = Dataset()
        query.QueryRetrieveLevel = "IMAGE"
        query.StudyInstanceUID = "1.2.3.4"
        query.SeriesInstanceUID = "1.2.3.4.5"
        query.SOPInstanceUID = ""
        pending = 0
        final = None
        context_id = assoc.accepted_contexts[0].context_id
        for status, _ in assoc.send_c_find(query, StudyRootQueryRetrieveInformationModelFind, msg_id=7):
            if status.Status in (0xFF00, 0xFF01):
                pending += 1
                if pending == 5:
                    assoc.send_c_cancel(7, context_id)
            else:
                final = status.Status
        assoc.release()
        assert final == 0xFE00
        assert 5 <= pending < 300
    finally:
        server.stop()


def test_per_remote_permissions(tmp_path: Path) -> None:
    """[remotes.X] permissions and [serve] qr_from_unknown decide who may find, move, get."""
    (tmp_path / "serve").mkdir()
    (tmp_path / "serve" / "config.toml").write_text(
        '[serve]\nqr_from_unknown = false\n\n'
        '[remotes.VIEWER]\nae_title = "VIEWER"\nhost = "127.0.0.1"\nport = 104\n'
        'permissions = ["find"]\n')
    server = start_server(tmp_path / "serve")
    from pynetdicom.sop_class import StudyRootQueryRetrieveInformationModelMove

    query = Dataset()
    query.QueryRetrieveLevel = "STUDY"
    query.StudyInstanceUID = ""
    try:
        def statuses(calling: str, service: str) -> list[int]:
            ae = AE(ae_title=calling)
            ae.add_requested_context(StudyRootQueryRetrieveInformationModelFind)
            ae.add_requested_context(StudyRootQueryRetrieveInformationModelMove)
            assoc = ae.associate("127.0.0.1", server.port, ae_title="PACSCLI")
            if service == "find":
                responses = assoc.send_c_find(query, StudyRootQueryRetrieveInformationModelFind)
            else:
                responses = assoc.send_c_move(query, "VIEWER", StudyRootQueryRetrieveInformationModelMove)
            result = [int(status.Status) for status, _ in responses]
            assoc.release()
            return result

        assert statuses("VIEWER", "find") == [0x0000]  # allowed, nothing archived
        assert statuses("VIEWER", "move") == [0x0124]  # not among its permissions
        assert statuses("STRANGER", "find") == [0x0124]  # unknown AEs may not query
        assert "not permitted" in server.stderr()
    finally:
        server.stop()
