"""`pacs move` against DCMTK's dcmqrscp: to DCMTK's storescp, and with `--receive` into the
archive; `find | move` moves exactly the matched studies."""

from __future__ import annotations

import os
import sqlite3
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import free_port, pacs_cmd
from tests.qr_data import (
    CT1_STUDY,
    HOLMES_SERIES_1,
    HOLMES_STUDY_1,
    HOLMES_STUDY_2,
    MR1_STUDY,
    UID_ROOT,
    US1_STUDY,
    WATSON_STUDY,
    Dcmqrscp,
    StoreSCP,
    corpus,
    records,
    run_pacs,
    sop_uids_of_studies,
)


class Peers:
    def __init__(self, qrscp: Dcmqrscp, files: list[Path], store_port: int, receive_port: int):
        self.qrscp, self.files = qrscp, files
        self.store_port, self.receive_port = store_port, receive_port


@pytest.fixture(scope="module")
def peers(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Peers]:
    """dcmqrscp holding the corpus, knowing STORESCP and PACSCLI as move destinations."""
    work = tmp_path_factory.mktemp("move")
    files = corpus(work / "files")
    store_port, receive_port = free_port(), free_port()
    qrscp = Dcmqrscp(work / "qrscp", {"STORESCP": store_port, "PACSCLI": receive_port})
    qrscp.start(files)
    yield Peers(qrscp, files, store_port, receive_port)
    qrscp.stop()


@pytest.fixture
def storescp(peers: Peers, tmp_path: Path) -> Iterator[StoreSCP]:
    scp = StoreSCP(tmp_path / "received", peers.store_port).start()
    yield scp
    scp.stop()


def pipe(tmp_path: Path, first: list[str], second: list[str]) -> subprocess.CompletedProcess[str]:
    """`pacs FIRST | pacs SECOND` through a real pipe: the second's result."""
    config = tmp_path / "config.toml"
    config.write_text("")
    env = {**os.environ, "PACS_CONFIG": str(config)}
    producer = subprocess.Popen(pacs_cmd(*first), stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                                stdin=subprocess.DEVNULL, env=env)
    try:
        consumer = subprocess.run(pacs_cmd(*second), stdin=producer.stdout, capture_output=True,
                                  text=True, env=env, timeout=120)
    finally:
        assert producer.stdout is not None
        producer.stdout.close()
        assert producer.wait(60) == 0
    return consumer


def test_find_pipe_move_moves_exactly_the_matched_studies(peers: Peers, storescp: StoreSCP,
                                                          tmp_path: Path) -> None:
    remote = peers.qrscp.remote
    result = pipe(tmp_path, ["find", remote, "--level", "study", "-k",
                             "PatientName=CompressedSamples*"],
                  ["move", remote, "--dest", "STORESCP"])
    assert result.returncode == 0, result.stderr
    moved = records(result)
    assert {r["StudyInstanceUID"] for r in moved} == {CT1_STUDY, MR1_STUDY, US1_STUDY}
    for record in moved:
        assert record["status"] == "ok" and record["QueryRetrieveLevel"] == "STUDY"
        assert (record["completed"], record["failed"], record["warning"]) == (1, 0, 0)
        assert record["dimse_status"] == 0 and record["dest"] == "STORESCP"
    assert storescp.received() == sop_uids_of_studies(peers.files, [CT1_STUDY, MR1_STUDY, US1_STUDY])


def test_find_pipe_move_receive_into_the_archive(peers: Peers, tmp_path: Path) -> None:
    remote = peers.qrscp.remote
    archive = tmp_path / "archive"
    result = pipe(tmp_path, ["find", remote, "-k", "PatientName=Holmes*"],
                  ["move", remote, "--receive", "--port", str(peers.receive_port),
                   "--bind", "127.0.0.1", "--archive", str(archive)])
    assert result.returncode == 0, result.stderr
    moved = {r["StudyInstanceUID"]: r for r in records(result)}
    assert set(moved) == {HOLMES_STUDY_1, HOLMES_STUDY_2}
    assert (moved[HOLMES_STUDY_1]["completed"], moved[HOLMES_STUDY_1]["received"]) == (3, 3)
    assert (moved[HOLMES_STUDY_2]["completed"], moved[HOLMES_STUDY_2]["received"]) == (1, 1)
    assert all(r["dest"] == "PACSCLI" for r in moved.values())
    with sqlite3.connect(archive / "index.sqlite") as conn:
        rows = conn.execute("SELECT SOPInstanceUID, source_aet, path FROM instances").fetchall()
    assert {row[0] for row in rows} == sop_uids_of_studies(peers.files,
                                                           [HOLMES_STUDY_1, HOLMES_STUDY_2])
    assert {row[1] for row in rows} == {"QRSCP"}  # the peer's AE title
    assert all((archive / row[2]).is_file() for row in rows)
    # the archive answers the same query now
    local = run_pacs(tmp_path, "find", "--archive", str(archive), "-k", "PatientName=Holmes*")
    assert {r["StudyInstanceUID"] for r in records(local)} == {HOLMES_STUDY_1, HOLMES_STUDY_2}


def test_series_and_instance_options(peers: Peers, storescp: StoreSCP, tmp_path: Path) -> None:
    remote = peers.qrscp.remote
    # a series alone: its study is looked up first (dcmqrscp is hierarchical)
    result = run_pacs(tmp_path, "move", remote, "--dest", "STORESCP", "--series", HOLMES_SERIES_1)
    assert result.returncode == 0, result.stderr
    [record] = records(result)
    assert record["QueryRetrieveLevel"] == "SERIES"
    assert record["StudyInstanceUID"] == HOLMES_STUDY_1 and record["completed"] == 2
    assert storescp.received() == {f"{UID_ROOT}.3.1.1", f"{UID_ROOT}.3.1.2"}
    storescp.clear()
    result = run_pacs(tmp_path, "move", remote, "--dest", "STORESCP",
                      "--instance", f"{UID_ROOT}.3.1.2", "--instance", f"{UID_ROOT}.3.4.1")
    assert result.returncode == 0, result.stderr
    assert [r["completed"] for r in records(result)] == [1, 1]
    assert storescp.received() == {f"{UID_ROOT}.3.1.2", f"{UID_ROOT}.3.4.1"}


def test_level_override_moves_whole_studies_once(peers: Peers, storescp: StoreSCP,
                                                 tmp_path: Path) -> None:
    remote = peers.qrscp.remote
    result = pipe(tmp_path, ["find", remote, "--level", "series", "-k",
                             f"StudyInstanceUID={HOLMES_STUDY_1}"],
                  ["move", remote, "--dest", "STORESCP", "--level", "study"])
    assert result.returncode == 0, result.stderr
    [record] = records(result)  # two series records, one study moved
    assert record["QueryRetrieveLevel"] == "STUDY" and record["completed"] == 3
    assert storescp.received() == sop_uids_of_studies(peers.files, [HOLMES_STUDY_1])


def test_patient_root(peers: Peers, storescp: StoreSCP, tmp_path: Path) -> None:
    remote = peers.qrscp.remote
    result = pipe(tmp_path, ["find", remote, "--model", "patient", "--level", "study",
                             "-k", "PatientID=WATSON1"],
                  ["move", remote, "--model", "patient", "--dest", "STORESCP"])
    assert result.returncode == 0, result.stderr
    [record] = records(result)
    assert record["PatientID"] == "WATSON1" and record["completed"] == 1
    storescp.clear()
    result = run_pacs(tmp_path, "move", remote, "--model", "patient", "--dest", "STORESCP",
                      "--patient", "HOLMES1")
    assert result.returncode == 0, result.stderr
    assert records(result)[0]["QueryRetrieveLevel"] == "PATIENT"
    assert storescp.received() == sop_uids_of_studies(peers.files, [HOLMES_STUDY_1, HOLMES_STUDY_2])
    assert WATSON_STUDY not in {r.get("StudyInstanceUID") for r in records(result)}


def test_unknown_destination_says_what_to_configure(peers: Peers, tmp_path: Path) -> None:
    result = run_pacs(tmp_path, "move", peers.qrscp.remote, "--dest", "NOWHERE",
                      "--study", CT1_STUDY, "--study", MR1_STUDY)
    assert result.returncode == 4
    [record] = records(result)  # stops at the first: every request would fail alike
    assert record["status"] == "failed" and record["dimse_status"] == 0xA801
    assert record["error"]["code"] == "move-destination-unknown"
    assert "0xA801 (Move destination unknown)" in result.stderr
    assert "does not know the AE title 'NOWHERE'" in result.stderr
    assert "Configure NOWHERE on QRSCP" in result.stderr and "HostTable" in result.stderr


def test_nothing_matched_and_bad_records(peers: Peers, storescp: StoreSCP, tmp_path: Path) -> None:
    stdin = ('{"QueryRetrieveLevel": "STUDY", "StudyInstanceUID": "1.2.3.4"}\n'
             '{"QueryRetrieveLevel": "SERIES", "StudyInstanceUID": "1.2.3.4"}\n'
             f'{{"StudyInstanceUID": "{CT1_STUDY}", "status": "ok"}}\n')
    result = run_pacs(tmp_path, "move", peers.qrscp.remote, "--dest", "STORESCP", "-", stdin=stdin)
    assert result.returncode == 1
    nothing, bad, moved = records(result)
    assert nothing["status"] == "failed" and nothing["error"]["code"] == "nothing-matched"
    assert bad["status"] == "failed" and "no SeriesInstanceUID" in bad["error"]["message"]
    assert moved["status"] == "ok" and moved["completed"] == 1


def test_no_input_is_a_usage_error(peers: Peers, tmp_path: Path) -> None:
    result = run_pacs(tmp_path, "move", peers.qrscp.remote, "--dest", "STORESCP")  # /dev/null
    assert result.returncode == 2 and "no input" in result.stderr
    result = run_pacs(tmp_path, "move", peers.qrscp.remote, "--dest", "STORESCP", "-")
    assert result.returncode == 2 and "no input" in result.stderr
    result = run_pacs(tmp_path, "move", peers.qrscp.remote, "--dest", "STORESCP", "x.json")
    assert result.returncode == 2 and "the only input argument is -" in result.stderr
    result = run_pacs(tmp_path, "move", peers.qrscp.remote, "--dest", "STORESCP", "-",
                      "--study", CT1_STUDY)
    assert result.returncode == 2 and "not both" in result.stderr
    result = run_pacs(tmp_path, "move", peers.qrscp.remote, "--study", CT1_STUDY)
    assert result.returncode == 2 and "--dest" in result.stderr


def test_an_empty_result_upstream_is_nothing_to_do(peers: Peers, tmp_path: Path) -> None:
    """`find | move` on a day nothing matched: all of nothing done, exit 0 and quiet (it was
    exit 2, bad input, for a nightly cron job that did nothing wrong)."""
    result = pipe(tmp_path, ["find", peers.qrscp.remote, "-k", "PatientID=NOBODY"],
                  ["move", peers.qrscp.remote, "--dest", "STORESCP"])
    assert (result.returncode, result.stdout, result.stderr) == (0, "", "")


def test_patient_root_retrieve_of_a_study_without_patient_id_says_what_can_be_done(
        tmp_path: Path) -> None:
    """No PatientID to name it by in Patient Root: the advice was to give --patient, which
    has no value to give; it is now to retrieve in Study Root."""
    from pacscli.archive.archive import Archive
    from tests.conftest import start_server
    from tests.dicom_files import make_dataset, write_instance

    ds = make_dataset(patient_id="")
    archive = Archive(tmp_path / "serve" / "archive")
    archive.put(write_instance(tmp_path / "anon.dcm", ds))
    archive.close()
    server = start_server(tmp_path / "serve", archive=tmp_path / "serve" / "archive")
    try:
        result = run_pacs(tmp_path, "move", server.remote, "--model", "patient", "--dest", "X",
                          "--study", str(ds.StudyInstanceUID))
    finally:
        server.stop()
    assert result.returncode == 1, result.stderr
    [record] = records(result)
    assert record["error"]["message"].endswith(
        f"did not return the PatientID of StudyInstanceUID {ds.StudyInstanceUID}: retrieve it "
        "in the Study Root model (--model study)")


def test_connection_refused_exits_3(tmp_path: Path) -> None:
    result = run_pacs(tmp_path, "move", f"QRSCP@127.0.0.1:{free_port()}", "--dest", "X",
                      "--study", "1.2.3")
    assert result.returncode == 3 and "connection refused" in result.stderr


def test_receive_on_a_port_the_remote_does_not_know(peers: Peers, tmp_path: Path) -> None:
    port = free_port()  # dcmqrscp sends PACSCLI to receive_port, not here
    result = run_pacs(tmp_path, "move", peers.qrscp.remote, "--receive", "--port", str(port),
                      "--bind", "127.0.0.1", "--archive", str(tmp_path / "archive"),
                      "--study", CT1_STUDY)
    assert result.returncode == 4
    [record] = records(result)
    assert record["dimse_status"] == 0xA702
    assert f"QRSCP must send PACSCLI to this host, port {port}" in result.stderr


def test_receive_as_an_ae_title_the_remote_sends_elsewhere_fails(peers: Peers, storescp: StoreSCP,
                                                                 tmp_path: Path) -> None:
    """`--receive --aet STORESCP`: dcmqrscp sends STORESCP's instances to storescp's port and
    reports them done. Nothing reached the archive asked for, and move said `ok`, exit 0."""
    port = free_port()
    result = run_pacs(tmp_path, "move", peers.qrscp.remote, "--receive", "--aet", "STORESCP",
                      "--port", str(port), "--bind", "127.0.0.1",
                      "--archive", str(tmp_path / "archive"), "--study", HOLMES_STUDY_1)
    assert result.returncode == 1, result.stderr
    [record] = records(result)
    assert (record["status"], record["completed"], record["received"]) == ("failed", 3, 0)
    assert record["error"] == {
        "code": "not-received",
        "message": f"{peers.qrscp.remote} reports 3 instance(s) sent to STORESCP, but 0 arrived "
                   f"here: QRSCP must know STORESCP as this host, port {port}"}
    assert storescp.received() == sop_uids_of_studies(peers.files, [HOLMES_STUDY_1])


def test_slow_input_outlives_the_association(peers: Peers, storescp: StoreSCP,
                                             tmp_path: Path) -> None:
    """`find | move` where records come slower than the association's idle timeout."""
    (tmp_path / "config.toml").write_text("[network]\nnetwork_timeout = 1\n")
    slow = subprocess.Popen(
        [sys.executable, "-c",
         "import sys, time\n"
         f"print('{{\"StudyInstanceUID\": \"{CT1_STUDY}\"}}', flush=True)\n"
         "time.sleep(2.5)\n"
         f"print('{{\"StudyInstanceUID\": \"{MR1_STUDY}\"}}', flush=True)\n"],
        stdout=subprocess.PIPE, stdin=subprocess.DEVNULL)
    try:
        result = subprocess.run(pacs_cmd("move", peers.qrscp.remote, "--dest", "STORESCP"),
                                stdin=slow.stdout, capture_output=True, text=True, timeout=120,
                                env={**os.environ, "PACS_CONFIG": str(tmp_path / "config.toml")})
    finally:
        assert slow.stdout is not None
        slow.stdout.close()
        slow.wait(30)
    assert result.returncode == 0, result.stderr
    assert [r["completed"] for r in records(result)] == [1, 1]
    assert storescp.received() == sop_uids_of_studies(peers.files, [CT1_STUDY, MR1_STUDY])


def test_a_move_cut_short_keeps_the_counts_reported(tmp_path: Path) -> None:
    """The peer moves two instances, then aborts: the failed record keeps completed = 2 (it
    carried no counts at all)."""
    from typing import Any

    import pydicom
    from pynetdicom import AE, evt
    from pynetdicom.sop_class import CTImageStorage, StudyRootQueryRetrieveInformationModelMove

    from tests.conftest import testdata

    dest = StoreSCP(tmp_path / "dest", free_port()).start()
    instances = []
    for number in (1, 2, 3):
        ds = pydicom.dcmread(testdata("explicit_le"))
        ds.SOPInstanceUID = f"1.2.826.0.1.3680043.2.1125.93.{number}"
        instances.append(ds)

    def handler(event: Any) -> Iterator[Any]:
        yield "127.0.0.1", dest.port
        yield 3
        for ds in instances[:2]:
            yield 0xFF00, ds
        event.assoc.abort()  # gone before the third and the final response
        yield 0xFF00, instances[2]

    ae = AE(ae_title="CUT")
    ae.add_supported_context(StudyRootQueryRetrieveInformationModelMove)
    ae.add_requested_context(CTImageStorage)
    port = free_port()
    server = ae.start_server(("127.0.0.1", port), block=False, evt_handlers=[(evt.EVT_C_MOVE, handler)])
    try:
        result = run_pacs(tmp_path, "move", f"CUT@127.0.0.1:{port}", "--dest", "STORESCP",
                          "--study", "1.2.3")
    finally:
        server.shutdown()
        dest.stop()
    assert result.returncode == 3, result.stderr
    [record] = records(result)
    assert record["status"] == "failed" and record.get("completed") == 2, record
