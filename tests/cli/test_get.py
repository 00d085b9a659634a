"""`pacs get` against DCMTK's dcmqrscp: into the archive (indexed) or `--out DIR`."""

from __future__ import annotations

import sqlite3
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pydicom
import pytest

from pacscli import IMPLEMENTATION_CLASS_UID
from pacscli.net.get import MAX_CONTEXTS, get_contexts, storage_classes_to_offer
from tests.conftest import free_port
from tests.qr_data import (
    HOLMES_SERIES_1,
    HOLMES_STUDY_1,
    HOLMES_STUDY_2,
    LESTRADE_SERIES,
    LESTRADE_STUDY,
    UID_ROOT,
    Dcmqrscp,
    corpus,
    records,
    run_pacs,
    sop_uids_of_studies,
)


@pytest.fixture(scope="module")
def peer(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Dcmqrscp, list[Path]]]:
    work = tmp_path_factory.mktemp("get")
    files = corpus(work / "files")
    qrscp = Dcmqrscp(work / "qrscp").start(files)
    yield qrscp, files
    qrscp.stop()


def index_rows(archive: Path) -> list[tuple[str, str, str]]:
    with sqlite3.connect(archive / "index.sqlite") as conn:
        return conn.execute("SELECT SOPInstanceUID, source_aet, path FROM instances").fetchall()


def test_get_study_into_the_archive(peer: tuple[Dcmqrscp, list[Path]], tmp_path: Path) -> None:
    qrscp, files = peer
    archive = tmp_path / "archive"
    result = run_pacs(tmp_path, "get", qrscp.remote, "--study", LESTRADE_STUDY,
                      "--archive", str(archive))
    assert result.returncode == 0, result.stderr
    got = records(result)
    expected = sop_uids_of_studies(files, [LESTRADE_STUDY])
    assert {r["SOPInstanceUID"] for r in got} == expected and len(got) == 2
    assert all(r["status"] == "ok" and r["outcome"] == "stored" for r in got)
    assert all(r["remote"] == qrscp.remote and Path(r["path"]).is_file() for r in got)
    rows = index_rows(archive)
    assert {row[0] for row in rows} == expected
    assert {row[1] for row in rows} == {"QRSCP"}
    originals = {str(pydicom.dcmread(p).SOPInstanceUID): pydicom.dcmread(p) for p in files}
    for record in got:
        stored = pydicom.dcmread(record["path"])
        assert stored.file_meta.ImplementationClassUID == IMPLEMENTATION_CLASS_UID
        assert stored.PixelData == originals[record["SOPInstanceUID"]].PixelData
    # again: idempotent
    again = run_pacs(tmp_path, "get", qrscp.remote, "--study", LESTRADE_STUDY,
                     "--archive", str(archive))
    assert again.returncode == 0, again.stderr
    assert {r["outcome"] for r in records(again)} == {"duplicate"}
    assert len(index_rows(archive)) == 2


def test_find_pipe_get_into_a_folder(peer: tuple[Dcmqrscp, list[Path]], tmp_path: Path) -> None:
    qrscp, files = peer
    found = run_pacs(tmp_path, "find", qrscp.remote, "--level", "series",
                     "-k", f"StudyInstanceUID={HOLMES_STUDY_1}")
    assert len(records(found)) == 2
    out = tmp_path / "out"
    result = run_pacs(tmp_path, "get", qrscp.remote, "--out", str(out), stdin=found.stdout)
    assert result.returncode == 0, result.stderr
    got = records(result)
    assert {r["SOPInstanceUID"] for r in got} == sop_uids_of_studies(files, [HOLMES_STUDY_1])
    for record in got:
        path = Path(record["path"])
        assert path == (out / record["StudyInstanceUID"] / record["SeriesInstanceUID"]
                        / f"{record['SOPInstanceUID']}.dcm")
        ds = pydicom.dcmread(path)
        assert ds.SOPInstanceUID == record["SOPInstanceUID"]
        assert ds.file_meta.SourceApplicationEntityTitle == "QRSCP"
    assert not (tmp_path / "archive").exists()
    assert not any(p.name.endswith(".tmp") for p in out.rglob("*"))


def test_instance_and_patient_root(peer: tuple[Dcmqrscp, list[Path]], tmp_path: Path) -> None:
    qrscp, files = peer
    archive = tmp_path / "archive"
    one = run_pacs(tmp_path, "get", qrscp.remote, "--instance", f"{UID_ROOT}.3.1.2",
                   "--archive", str(archive))
    assert one.returncode == 0, one.stderr
    [record] = records(one)
    assert record["SOPInstanceUID"] == f"{UID_ROOT}.3.1.2"
    assert record["SeriesInstanceUID"] == HOLMES_SERIES_1
    patient = run_pacs(tmp_path, "get", qrscp.remote, "--model", "patient", "--patient", "HOLMES1",
                       "--archive", str(archive))
    assert patient.returncode == 0, patient.stderr
    assert {r["SOPInstanceUID"] for r in records(patient)} == sop_uids_of_studies(
        files, [HOLMES_STUDY_1, HOLMES_STUDY_2])


def test_series_with_its_study(peer: tuple[Dcmqrscp, list[Path]], tmp_path: Path) -> None:
    qrscp, _ = peer
    result = run_pacs(tmp_path, "get", qrscp.remote, "--study", LESTRADE_STUDY,
                      "--series", LESTRADE_SERIES, "--out", str(tmp_path / "out"))
    assert result.returncode == 0, result.stderr
    assert len(records(result)) == 2


def test_unknown_uids_fail_per_request(peer: tuple[Dcmqrscp, list[Path]], tmp_path: Path) -> None:
    qrscp, _ = peer
    result = run_pacs(tmp_path, "get", qrscp.remote, "--out", str(tmp_path / "out"),
                      "--series", "1.2.3", "--study", "1.2.3.4", "--study", "1.2.3.5")
    assert result.returncode == 2 and "give one study as the parent" in result.stderr
    stdin = ('{"QueryRetrieveLevel": "SERIES", "SeriesInstanceUID": "1.2.3"}\n'
             '{"QueryRetrieveLevel": "STUDY", "StudyInstanceUID": "1.2.3.4"}\n'
             f'{{"QueryRetrieveLevel": "STUDY", "StudyInstanceUID": "{HOLMES_STUDY_2}"}}\n')
    result = run_pacs(tmp_path, "get", qrscp.remote, "--out", str(tmp_path / "out"), stdin=stdin)
    assert result.returncode == 1
    got = records(result)
    failures = [r for r in got if r["status"] == "failed"]
    assert [f["error"]["code"] for f in failures] == ["not-found", "nothing-matched"]
    assert [r["StudyInstanceUID"] for r in got if r["status"] == "ok"] == [HOLMES_STUDY_2]


@pytest.fixture
def refusing_scp() -> Iterator[int]:
    """A pynetdicom C-GET SCP (AE PEER) that refuses every request with 0xA702."""
    from pydicom.dataset import Dataset
    from pynetdicom import AE, evt
    from pynetdicom.sop_class import StudyRootQueryRetrieveInformationModelGet

    def handler(event: Any) -> Iterator[Any]:
        yield 1  # one sub-operation to come: then the refusal
        status = Dataset()
        status.Status = 0xA702
        yield status, None

    ae = AE(ae_title="PEER")
    ae.add_supported_context(StudyRootQueryRetrieveInformationModelGet)
    port = free_port()
    server = ae.start_server(("127.0.0.1", port), block=False,
                             evt_handlers=[(evt.EVT_C_GET, handler)])
    yield port
    server.shutdown()


def test_refused_by_the_peer_exits_4(refusing_scp: int, tmp_path: Path) -> None:
    result = run_pacs(tmp_path, "get", f"PEER@127.0.0.1:{refusing_scp}", "--study", "1.2.3",
                      "--out", str(tmp_path / "out"))
    assert result.returncode == 4
    assert "0xA702 (Refused: Out of resources, unable to perform sub-operations)" in result.stderr
    [record] = records(result)
    assert record["status"] == "failed" and record["dimse_status"] == 0xA702


def test_usage_errors(peer: tuple[Dcmqrscp, list[Path]], tmp_path: Path) -> None:
    qrscp, _ = peer
    both = run_pacs(tmp_path, "get", qrscp.remote, "--study", "1.2.3", "--out", str(tmp_path),
                    "--archive", str(tmp_path / "a"))
    assert both.returncode == 2 and "not both" in both.stderr
    empty = run_pacs(tmp_path, "get", qrscp.remote, "--out", str(tmp_path), stdin="")
    assert empty.returncode == 2 and "nothing to get" in empty.stderr


def test_storage_contexts_fit_pynetdicom_limit() -> None:
    hinted = "1.2.840.10008.5.1.4.1.1.77.1.6"  # VL Whole Slide Microscopy
    offered = storage_classes_to_offer(["9.9.9", hinted], 10)
    assert offered[:2] == ["9.9.9", hinted] and len(offered) == 10
    contexts, roles = get_contexts("patient", [hinted])
    assert len(contexts) == MAX_CONTEXTS and len(roles) == MAX_CONTEXTS - 3
    assert str(contexts[3].abstract_syntax) == hinted
    assert "1.2.840.10008.1.2.4.50" in contexts[3].transfer_syntax  # compressed as stored
