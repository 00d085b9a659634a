"""`pacs find` against DCMTK's dcmqrscp holding pydicom's test files and small synthetic
studies, and the same queries on the local archive's index (`--archive`)."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from pacscli.archive.archive import Archive
from tests.conftest import bad_peer, free_port, pacs_cmd
from tests.qr_data import (
    CT1_STUDY,
    HOLMES_SERIES_1,
    HOLMES_STUDY_1,
    HOLMES_STUDY_2,
    LESTRADE_SERIES,
    LESTRADE_STUDY,
    MR1_STUDY,
    US1_STUDY,
    WATSON_STUDY,
    Dcmqrscp,
    corpus,
    records,
    run_pacs,
)


@pytest.fixture(scope="module")
def peer(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Dcmqrscp, Path]]:
    """dcmqrscp holding the corpus, and an archive holding the same files (Archive.put)."""
    work = tmp_path_factory.mktemp("find")
    files = corpus(work / "files")
    qrscp = Dcmqrscp(work / "qrscp").start(files)
    store = Archive(work / "archive")
    for path in files:
        store.put(path)
    store.close()
    yield qrscp, work / "archive"
    qrscp.stop()


def find(peer: tuple[Dcmqrscp, Path], tmp_path: Path, *args: str,
         local: bool = False) -> subprocess.CompletedProcess[str]:
    qrscp, archive = peer
    where = ["--archive", str(archive)] if local else [qrscp.remote]
    return run_pacs(tmp_path, "find", *where, *args)


def uids(result: subprocess.CompletedProcess[str], key: str = "StudyInstanceUID") -> set[str]:
    assert result.returncode == 0, result.stderr
    return {r[key] for r in records(result)}


def test_study_level_wildcard_name(peer: tuple[Dcmqrscp, Path], tmp_path: Path) -> None:
    result = find(peer, tmp_path, "--level", "study", "-k", "PatientName=CompressedSamples*")
    assert uids(result) == {CT1_STUDY, MR1_STUDY, US1_STUDY}
    got = records(result)
    assert all(r["QueryRetrieveLevel"] == "STUDY" for r in got)
    assert all(r["RetrieveAETitle"] == "QRSCP" for r in got)
    ct = next(r for r in got if r["StudyInstanceUID"] == CT1_STUDY)
    assert ct["PatientID"] == "1CT1" and ct["StudyDate"] == "20040119"
    assert ct["PatientName"] == "CompressedSamples^CT1"
    assert list(ct)[:4] == ["QueryRetrieveLevel", "PatientName", "PatientID", "PatientBirthDate"]
    assert "pacs find: 3 study matches in" in result.stderr


def test_date_ranges(peer: tuple[Dcmqrscp, Path], tmp_path: Path) -> None:
    assert uids(find(peer, tmp_path, "-k", "StudyDate=20040101-20041231")) == {
        CT1_STUDY, MR1_STUDY, US1_STUDY}
    assert uids(find(peer, tmp_path, "-k", "StudyDate=20240201-")) == {HOLMES_STUDY_2, WATSON_STUDY}
    assert len(uids(find(peer, tmp_path, "-k", "StudyDate=-20031231"))) == 3


def test_uid_list(peer: tuple[Dcmqrscp, Path], tmp_path: Path) -> None:
    result = find(peer, tmp_path, "-k", f"StudyInstanceUID={CT1_STUDY}\\{WATSON_STUDY}")
    assert uids(result) == {CT1_STUDY, WATSON_STUDY}


def test_series_and_image_levels(peer: tuple[Dcmqrscp, Path], tmp_path: Path) -> None:
    series = find(peer, tmp_path, "--level", "series", "-k", f"StudyInstanceUID={HOLMES_STUDY_1}")
    assert uids(series, "SeriesInstanceUID") == {HOLMES_SERIES_1, HOLMES_SERIES_1[:-1] + "2"}
    assert {r["Modality"] for r in records(series)} == {"CT"}
    assert {r["QueryRetrieveLevel"] for r in records(series)} == {"SERIES"}
    images = find(peer, tmp_path, "--level", "image", "-k", f"StudyInstanceUID={LESTRADE_STUDY}",
                  "-k", f"SeriesInstanceUID={LESTRADE_SERIES}")
    got = records(images)
    assert len(got) == 2 and {r["QueryRetrieveLevel"] for r in got} == {"IMAGE"}
    assert all(r["StudyInstanceUID"] == LESTRADE_STUDY and r["SOPInstanceUID"] for r in got)


def test_patient_root(peer: tuple[Dcmqrscp, Path], tmp_path: Path) -> None:
    patients = find(peer, tmp_path, "--model", "patient", "--level", "patient",
                    "-k", "PatientName=Holmes*")
    [holmes] = records(patients)
    assert holmes["PatientID"] == "HOLMES1" and holmes["QueryRetrieveLevel"] == "PATIENT"
    studies = find(peer, tmp_path, "--model", "patient", "--level", "study",
                   "-k", "PatientID=HOLMES1")
    assert uids(studies) == {HOLMES_STUDY_1, HOLMES_STUDY_2}
    assert all(r["PatientID"] == "HOLMES1" for r in records(studies))


# The keys dcmqrscp supports at each level (it drops the others from its responses).
STUDY_KEYS = ["PatientName", "PatientID", "PatientBirthDate", "PatientSex", "StudyDate",
              "StudyTime", "AccessionNumber", "StudyID", "StudyDescription",
              "ReferringPhysicianName"]
SAME_QUERIES = [
    ("study", [f"-k{k}" for k in STUDY_KEYS] + ["-kPatientName=CompressedSamples*"]),
    ("study", [f"-k{k}" for k in STUDY_KEYS] + ["-kStudyDate=20040101-20041231"]),
    ("study", [f"-k{k}" for k in STUDY_KEYS] + ["-kStudyDate=20240201-"]),
    ("study", [f"-k{k}" for k in STUDY_KEYS] + [f"-kStudyInstanceUID={CT1_STUDY}\\{WATSON_STUDY}"]),
    ("study", [f"-k{k}" for k in STUDY_KEYS] + ["-kPatientName=*^Sherlock"]),
    ("study", [f"-k{k}" for k in STUDY_KEYS] + ["-kStudyTime=0930"]),  # at its precision
    ("study", [f"-k{k}" for k in STUDY_KEYS]),
    ("series", ["-kModality", "-kSeriesNumber", f"-kStudyInstanceUID={HOLMES_STUDY_1}"]),
    ("series", ["-kModality=CT", "-kSeriesNumber"]),
    ("image", ["-kInstanceNumber", f"-kStudyInstanceUID={HOLMES_STUDY_1}",
               f"-kSeriesInstanceUID={HOLMES_SERIES_1}"]),
    ("image", ["-kInstanceNumber", f"-kSOPInstanceUID={HOLMES_SERIES_1.replace('.2.1', '.3.1')}.2"]),
    # Relational: keys of a level above the query's. dcmqrscp does not agree to relational
    # queries and ignores them, so find asks it level by level.
    ("series", ["-kModality", "-kSeriesNumber", "-kPatientID=HOLMES1"]),
    ("series", ["-kModality=CT", "-kStudyDate=20240115", "-kPatientName"]),
    ("image", ["-kInstanceNumber", "-kPatientName=Holmes*", "-kModality"]),
    ("image", ["-kInstanceNumber", "-kPatientID=HOLMES1", f"-kSeriesInstanceUID={HOLMES_SERIES_1}"]),
]


def _comparable(result: subprocess.CompletedProcess[str]) -> list[dict[str, Any]]:
    assert result.returncode == 0, result.stderr
    got = [{k: v for k, v in r.items() if k != "RetrieveAETitle"} for r in records(result)]
    return sorted(got, key=lambda r: sorted((k, str(v)) for k, v in r.items()))


@pytest.mark.parametrize(("level", "keys"), SAME_QUERIES)
def test_archive_gives_the_same_records_as_dcmqrscp(peer: tuple[Dcmqrscp, Path], tmp_path: Path,
                                                    level: str, keys: list[str]) -> None:
    remote = _comparable(find(peer, tmp_path, "--level", level, "--no-defaults", *keys))
    local = _comparable(find(peer, tmp_path, "--level", level, "--no-defaults", *keys, local=True))
    assert remote, "the query should match something"
    assert local == remote


def test_archive_gives_the_same_records_in_patient_root(peer: tuple[Dcmqrscp, Path],
                                                        tmp_path: Path) -> None:
    for level, keys in (("patient", ["-kPatientName=Holmes*", "-kPatientBirthDate", "-kPatientSex"]),
                        ("study", ["-kPatientID=HOLMES1", "-kStudyDate", "-kAccessionNumber"]),
                        ("study", ["-kPatientName=Holmes*", "-kStudyDate"]),
                        ("series", ["-kPatientName=Holmes*", "-kModality"])):
        args = ("--model", "patient", "--level", level, "--no-defaults", *keys)
        remote = _comparable(find(peer, tmp_path, *args))
        assert remote and _comparable(find(peer, tmp_path, *args, local=True)) == remote


def test_a_walk_names_a_non_ascii_parent_in_its_encoding(tmp_path: Path) -> None:
    """Level by level, a parent's PatientID "MÜ3" went into the next C-FIND with no
    Specific Character Set: dcmqrscp matched nothing, and the patient's studies were missing."""
    from tests.qr_data import save, synthetic

    files = [save(synthetic(f"1.2.3.{n}", f"1.2.3.{n}.1", f"1.2.3.{n}.1.1", name=name,
                            patient_id=pid, date="20240101", modality="CT", number=1),
                  tmp_path / "files" / f"{n}.dcm")
             for n, (name, pid) in enumerate([("Müller^Otto", "MÜ3"), ("Mxller^Karl", "MX3")], 1)]
    qrscp = Dcmqrscp(tmp_path / "qrscp").start(files)
    try:
        result = run_pacs(tmp_path, "find", qrscp.remote, "--model", "patient", "--level",
                          "study", "-k", "PatientName=M*ller*", "-v")
    finally:
        qrscp.stop()
    assert "querying level by level" in result.stderr
    assert {r["PatientID"] for r in records(result)} == {"MÜ3", "MX3"}


def test_upper_level_uid_lists_are_sent_as_they_are(peer: tuple[Dcmqrscp, Path],
                                                    tmp_path: Path) -> None:
    """A list of series UIDs at image level walked every patient and study of the peer (26
    times slower on 450 studies); hierarchical peers match unique keys as lists."""
    result = find(peer, tmp_path, "--level", "image", "--model", "patient", "-v",
                  "-k", f"SeriesInstanceUID={HOLMES_SERIES_1}\\{LESTRADE_SERIES}")
    assert "level by level" not in result.stderr
    assert {r["SeriesInstanceUID"] for r in records(result)} == {HOLMES_SERIES_1, LESTRADE_SERIES}
    assert len(records(result)) == 4


def test_private_keys_are_returned_as_the_instance_has_them(tmp_path: Path) -> None:
    """A private creator and a private key of its block, asked of the archive: the key was
    refused ("not in the DICOM dictionary"). A private value cannot be matched on: its VR
    is known only to its creator."""
    from tests.dicom_files import make_dataset, write_instance

    ds = make_dataset(patient_id="PRIV1")
    ds.private_block(0x0009, "ACME", create=True).add_new(0x01, "LO", "secret")
    archive = Archive(tmp_path / "archive")
    archive.put(write_instance(tmp_path / "a.dcm", ds))
    archive.close()
    result = run_pacs(tmp_path, "find", "--archive", str(tmp_path / "archive"),
                      "-k", "PatientID=PRIV1", "-k", "(0009,0010)=ACME", "-k", "(0009,1001)")
    [record] = records(result)
    assert (record["(0009,0010)"], record["(0009,1001)"]) == ("ACME", "secret")
    other = run_pacs(tmp_path, "find", "--archive", str(tmp_path / "archive"),
                     "-k", "(0009,0010)=OTHER")
    assert len(records(other)) == 1  # the creator reserves a block: it does not filter
    refused = run_pacs(tmp_path, "find", "--archive", str(tmp_path / "archive"),
                       "-k", "(0009,1001)=secret")
    assert refused.returncode == 2 and "can be asked for" in refused.stderr


def test_limit_cancels_the_query(peer: tuple[Dcmqrscp, Path], tmp_path: Path) -> None:
    result = find(peer, tmp_path, "--limit", "2")
    assert result.returncode == 0, result.stderr
    assert len(records(result)) == 2
    assert len(records(find(peer, tmp_path, "--limit", "2", local=True))) == 2
    for limit in ("1", "3"):  # level by level: the limit spans the C-FINDs of several series
        walked = find(peer, tmp_path, "--level", "image", "-k", "PatientName=Holmes*",
                      "--limit", limit)
        assert walked.returncode == 0, walked.stderr
        assert len(records(walked)) == int(limit)


def test_a_relational_query_to_a_hierarchical_peer_is_asked_level_by_level(
        peer: tuple[Dcmqrscp, Path], tmp_path: Path) -> None:
    """dcmqrscp ignores a series query's PatientID (a study-level key in Study Root): sent as
    it was, every series in it came back, and `find | move` moved them all."""
    result = find(peer, tmp_path, "--level", "series", "-k", "PatientID=HOLMES1", "-v")
    assert uids(result, "SeriesInstanceUID") == {HOLMES_SERIES_1, HOLMES_SERIES_1[:-1] + "2",
                                                  HOLMES_SERIES_1[:-1] + "3"}
    assert all(r["PatientID"] == "HOLMES1" for r in records(result))
    assert "did not agree to relational queries: querying level by level" in result.stderr


def test_case_insensitive_names(peer: tuple[Dcmqrscp, Path], tmp_path: Path) -> None:
    local = find(peer, tmp_path, "--ci-names", "-k", "PatientName=holmes*", local=True)
    assert uids(local) == {HOLMES_STUDY_1, HOLMES_STUDY_2}
    remote = find(peer, tmp_path, "--ci-names", "-k", "PatientName=holmes*")
    assert remote.returncode == 0
    assert "did not agree to fuzzy person name matching" in remote.stderr


def test_csv_and_quiet(peer: tuple[Dcmqrscp, Path], tmp_path: Path) -> None:
    result = find(peer, tmp_path, "-q", "--format", "csv", "-k", "PatientID=HOLMES1", local=True)
    assert result.returncode == 0 and result.stderr == ""
    lines = result.stdout.splitlines()
    assert lines[0].startswith("QueryRetrieveLevel,PatientName,PatientID") and len(lines) == 3
    for fmt in ("csv", "table"):  # a failure was a row of empty keys, read as a match
        refused = run_pacs(tmp_path, "find", f"X@127.0.0.1:{free_port()}", "--format", fmt)
        assert refused.returncode == 3 and "connection refused" in refused.stderr
        assert "STUDY" not in refused.stdout


@pytest.fixture
def failing_scp() -> Iterator[int]:
    """A pynetdicom C-FIND SCP (AE PEER) that answers every query with 0xC001 after one match."""
    from pydicom.dataset import Dataset
    from pynetdicom import AE, evt
    from pynetdicom.sop_class import StudyRootQueryRetrieveInformationModelFind

    def handler(event: Any) -> Iterator[tuple[Any, Any]]:
        match = Dataset()
        match.QueryRetrieveLevel, match.StudyInstanceUID = "STUDY", "1.2.3"
        yield 0xFF00, match
        status = Dataset()
        status.Status, status.ErrorComment = 0xC001, "index offline"
        yield status, None

    ae = AE(ae_title="PEER")
    ae.add_supported_context(StudyRootQueryRetrieveInformationModelFind)
    port = free_port()
    server = ae.start_server(("127.0.0.1", port), block=False,
                             evt_handlers=[(evt.EVT_C_FIND, handler)])
    yield port
    server.shutdown()


def test_peer_failure_status_exits_4(failing_scp: int, tmp_path: Path) -> None:
    result = run_pacs(tmp_path, "find", f"PEER@127.0.0.1:{failing_scp}")
    assert result.returncode == 4
    assert "answered C-FIND with failure status 0xC001 (Unable to Process): index offline" \
        in result.stderr
    first, last = records(result)
    assert first["StudyInstanceUID"] == "1.2.3"  # what came before the failure is kept
    assert last["status"] == "failed" and last["error"]["code"] == "find-failed"


@pytest.mark.parametrize("local", [False, True])
def test_dicom_json_model_of_each_match(peer: tuple[Dcmqrscp, Path], tmp_path: Path,
                                        local: bool) -> None:
    """`--dicom-json`: each match also as PS3.18 JSON, from a remote and from the archive."""
    result = find(peer, tmp_path, "--level", "study", "-k", "PatientID=1CT1", "--dicom-json",
                  local=local)
    [match] = records(result)
    model = match["dicom"]
    assert model["0020000D"] == {"vr": "UI", "Value": [CT1_STUDY]}
    assert model["00100010"] == {"vr": "PN", "Value": [{"Alphabetic": "CompressedSamples^CT1"}]}
    assert model["00080052"] == {"vr": "CS", "Value": ["STUDY"]}
    assert model["00080020"] == {"vr": "DA", "Value": ["20040119"]}


def test_a_silent_peer_is_a_dimse_timeout(tmp_path: Path) -> None:
    """A peer that takes longer than [network] dimse_timeout to answer: the association is
    aborted on our side, and the message says so (it used to blame the peer for closing)."""
    import time

    from pynetdicom import AE, evt
    from pynetdicom.sop_class import StudyRootQueryRetrieveInformationModelFind

    def handler(event: Any) -> Iterator[tuple[Any, Any]]:
        time.sleep(4)
        yield 0x0000, None

    ae = AE(ae_title="SLOW")
    ae.add_supported_context(StudyRootQueryRetrieveInformationModelFind)
    port = free_port()
    server = ae.start_server(("127.0.0.1", port), block=False,
                             evt_handlers=[(evt.EVT_C_FIND, handler)])
    try:
        (tmp_path / "config.toml").write_text("[network]\ndimse_timeout = 1\n")
        result = run_pacs(tmp_path, "find", f"SLOW@127.0.0.1:{port}", "-k", "PatientID=X")
    finally:
        server.shutdown()
    assert result.returncode == 3
    assert "no C-FIND response from SLOW@127.0.0.1" in result.stderr and "DIMSE timeout" in result.stderr
    assert records(result)[-1]["error"]["code"] == "dimse-timeout"


def test_a_response_that_cannot_be_decoded(tmp_path: Path) -> None:
    """A C-FIND answered with a command set without a Command Field: said so at once, no
    traceback (pynetdicom's thread died, and find waited out the DIMSE timeout)."""
    (tmp_path / "config.toml").write_text("[network]\ndimse_timeout = 20\n")
    # Status 0x0000 alone: a well-formed element, but no Command Field.
    port = bad_peer(command=b"\x00\x00\x00\x09\x02\x00\x00\x00\x00\x00")
    result = run_pacs(tmp_path, "find", f"BAD@127.0.0.1:{port}", "-k", "PatientID=X")
    assert result.returncode == 3 and "Traceback" not in result.stderr, result.stderr
    assert "the peer sent a command set that cannot be decoded (no Command Field); the " \
        "association was aborted during C-FIND" in result.stderr
    assert records(result)[-1]["error"]["code"] == "invalid-response"


def test_connection_refused_exits_3(tmp_path: Path) -> None:
    result = run_pacs(tmp_path, "find", f"QRSCP@127.0.0.1:{free_port()}")
    assert result.returncode == 3
    assert "connection refused" in result.stderr


@pytest.mark.parametrize(("args", "message"), [
    (["-k", "PatientNme=X"], "unknown DICOM attribute 'PatientNme'"),
    (["-k", "Modality=CT"], "Modality is a series-level key"),
    (["--level", "patient"], "Patient Root"),
    (["--level", "frame"], "unknown query level"),
])
def test_usage_errors_exit_2(peer: tuple[Dcmqrscp, Path], tmp_path: Path, args: list[str],
                             message: str) -> None:
    result = find(peer, tmp_path, *args, local=True)
    assert result.returncode == 2
    assert message in result.stderr


def test_archive_that_does_not_exist(tmp_path: Path) -> None:
    result = run_pacs(tmp_path, "find", "--archive", str(tmp_path / "none"))
    assert result.returncode == 2 and "no archive at" in result.stderr
    assert not (tmp_path / "none").exists()


def test_remote_and_archive_together(peer: tuple[Dcmqrscp, Path], tmp_path: Path) -> None:
    qrscp, archive = peer
    result = run_pacs(tmp_path, "find", qrscp.remote, "--archive", str(archive))
    assert result.returncode == 2 and "not both" in result.stderr


def test_find_core_does_not_load_cli_modules() -> None:
    code = ("import sys, pacscli.net.find, pacscli.net.move, pacscli.net.get; "
            "assert not {'typer', 'rich'} & set(sys.modules), sorted(sys.modules)")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)


def test_ctrl_c_while_the_peer_still_answers_exits_at_once(tmp_path: Path) -> None:
    """Ctrl-C during a long C-FIND from a peer still busy answering: exit 130 within
    seconds. The release used to wait the whole ACSE timeout (30 s) for a peer that does
    not answer it while its handler runs; now the association is aborted."""
    import signal
    import time

    from pydicom.dataset import Dataset
    from pynetdicom import AE, evt
    from pynetdicom.sop_class import StudyRootQueryRetrieveInformationModelFind

    def slow(event: Any) -> Iterator[tuple[int, Any]]:
        for number in range(100):
            match = Dataset()
            match.QueryRetrieveLevel, match.StudyInstanceUID = "STUDY", f"1.2.3.{number}"
            time.sleep(0.2)
            yield 0xFF00, match

    ae = AE(ae_title="SLOW")
    ae.add_supported_context(StudyRootQueryRetrieveInformationModelFind)
    port = free_port()
    server = ae.start_server(("127.0.0.1", port), block=False, evt_handlers=[(evt.EVT_C_FIND, slow)])
    (tmp_path / "config.toml").write_text("")
    proc = subprocess.Popen(pacs_cmd("find", f"SLOW@127.0.0.1:{port}", "--format", "jsonl"),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "PACS_CONFIG": str(tmp_path / "config.toml")})
    try:
        assert proc.stdout is not None and proc.stdout.readline()  # the answers have begun
        proc.send_signal(signal.SIGINT)
        started = time.monotonic()
        assert proc.wait(30) == 130
        assert time.monotonic() - started < 5
    finally:
        proc.kill()
        server.shutdown()


def test_sigterm_is_an_interruption(tmp_path: Path) -> None:
    """SIGTERM (a service manager, `timeout`) ends a command as Ctrl-C does: a message and
    exit 130 (it died at once with status 143 and no word)."""
    import signal

    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen()  # accepts the connection, never answers: echo waits
    port = listener.getsockname()[1]
    (tmp_path / "config.toml").write_text("")
    proc = subprocess.Popen(pacs_cmd("echo", f"X@127.0.0.1:{port}"), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "PACS_CONFIG": str(tmp_path / "config.toml")})
    try:
        listener.settimeout(30)
        conn, _ = listener.accept()  # echo is connected and waiting
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=30)
        assert proc.returncode == 130 and "pacs: interrupted" in err
        conn.close()
    finally:
        proc.kill()
        listener.close()
