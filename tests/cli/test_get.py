"""`pacs get` against DCMTK's dcmqrscp: into the archive (indexed) or `--out DIR`."""

from __future__ import annotations

import sqlite3
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pydicom
import pynetdicom.sop_class as sop_classes
import pytest

from pacscli import IMPLEMENTATION_CLASS_UID
from pacscli.archive.archive import Archive
from pacscli.net.get import (
    COMMON_STORAGE,
    MAX_CONTEXTS,
    STORED_SYNTAXES,
    get_contexts,
    storage_classes_to_offer,
)
from tests.conftest import free_port, start_server, testdata
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
    # `-` names stdin as the input, as for every command acting on studies
    result = run_pacs(tmp_path, "get", qrscp.remote, "--out", str(out), "-", stdin=found.stdout)
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


def test_get_starts_before_its_input_ends(peer: tuple[Dcmqrscp, list[Path]],
                                          tmp_path: Path) -> None:
    """`find | get` retrieves each match as it comes: the first study arrives while stdin is
    still open (get read all of stdin first, to choose its presentation contexts)."""
    import json
    import os
    import selectors
    import subprocess
    import time

    from tests.conftest import pacs_cmd

    qrscp, files = peer
    (tmp_path / "config.toml").write_text("")
    proc = subprocess.Popen(
        pacs_cmd("get", qrscp.remote, "--out", str(tmp_path / "out"), "-"), text=True,
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        env={**os.environ, "PACS_CONFIG": str(tmp_path / "config.toml")})
    assert proc.stdin is not None and proc.stdout is not None
    try:
        proc.stdin.write(json.dumps({"QueryRetrieveLevel": "STUDY",
                                     "StudyInstanceUID": HOLMES_STUDY_2}) + "\n")
        proc.stdin.flush()
        selector = selectors.DefaultSelector()
        selector.register(proc.stdout, selectors.EVENT_READ)
        deadline = time.monotonic() + 60
        while not selector.select(timeout=max(0.0, deadline - time.monotonic())):
            if time.monotonic() > deadline:
                pytest.fail("no record while stdin stays open")
        first = json.loads(proc.stdout.readline())
        assert first["StudyInstanceUID"] == HOLMES_STUDY_2 and first["status"] == "ok"
        assert proc.poll() is None  # still waiting for more input
        proc.stdin.write(json.dumps({"QueryRetrieveLevel": "STUDY",
                                     "StudyInstanceUID": LESTRADE_STUDY}) + "\n")
        proc.stdin.close()
        rest = [json.loads(line) for line in proc.stdout]
        assert proc.wait(60) == 0, proc.stderr.read() if proc.stderr else ""
    finally:
        proc.kill()
        proc.wait()
    got = {first["SOPInstanceUID"], *(r["SOPInstanceUID"] for r in rest)}
    assert got == sop_uids_of_studies(files, [HOLMES_STUDY_2, LESTRADE_STUDY])


def test_usage_errors(peer: tuple[Dcmqrscp, list[Path]], tmp_path: Path) -> None:
    qrscp, _ = peer
    both = run_pacs(tmp_path, "get", qrscp.remote, "--study", "1.2.3", "--out", str(tmp_path),
                    "--archive", str(tmp_path / "a"))
    assert both.returncode == 2 and "not both" in both.stderr
    empty = run_pacs(tmp_path, "get", qrscp.remote, "--out", str(tmp_path))  # /dev/null
    assert empty.returncode == 2 and "nothing to get" in empty.stderr
    piped = run_pacs(tmp_path, "get", qrscp.remote, "--out", str(tmp_path), stdin="")
    assert (piped.returncode, piped.stdout, piped.stderr) == (0, "", "")  # an empty result upstream
    plain = run_pacs(tmp_path, "get", qrscp.remote, "--out", str(tmp_path), stdin="hello\n")
    [record] = records(plain)
    assert record["error"]["message"] == "input record 1 has no StudyInstanceUID, " \
        "SeriesInstanceUID or SOPInstanceUID to retrieve (not a JSON record: 'hello')"


def test_storage_contexts_fit_pynetdicom_limit() -> None:
    hinted = "1.2.840.10008.5.1.4.1.1.77.1.6"  # VL Whole Slide Microscopy
    offered = storage_classes_to_offer(["9.9.9", hinted], 10)
    assert offered[:2] == ["9.9.9", hinted] and len(offered) == 10
    contexts, roles = get_contexts("patient", [hinted])
    assert len(contexts) == MAX_CONTEXTS
    classes = [str(cx.abstract_syntax) for cx in contexts[3:]]
    assert classes[0] == hinted and len(roles) == len(set(classes))
    common = {str(getattr(sop_classes, n)) for n in COMMON_STORAGE if hasattr(sop_classes, n)}
    assert common <= set(classes)
    assert "1.2.840.10008.1.2.4.50" in contexts[3].transfer_syntax  # any syntax, as the sender likes
    # and a context of its own per compressed syntax, for the hinted class and common images
    own = {(str(cx.abstract_syntax), cx.transfer_syntax[0]) for cx in contexts
           if len(cx.transfer_syntax) == 1}
    for uid in (hinted, str(sop_classes.CTImageStorage), str(sop_classes.MRImageStorage)):
        assert {(uid, syntax) for syntax in STORED_SYNTAXES} <= own


def test_get_from_pacs_serve_brings_images_as_stored(tmp_path: Path) -> None:
    """JPEG, JPEG 2000 and RLE images come as the archive holds them, not decoded by the
    sender (which expanded lossy JPEG): pacs serve answers each on the context offered
    for its own syntax."""
    names = ("jpeg_baseline", "jpeg_2000", "rle", "explicit_le")  # four distinct instances
    archive = Archive(tmp_path / "served")
    studies = []
    for name in names:
        ds = pydicom.dcmread(testdata(name))
        studies.append(str(ds.StudyInstanceUID))
        archive.put(testdata(name))
    archive.close()
    server = start_server(tmp_path / "serve", archive=tmp_path / "served")
    try:
        args = [arg for study in studies for arg in ("--study", study)]
        result = run_pacs(tmp_path, "get", f"PACSCLI@127.0.0.1:{server.port}",
                          "--out", str(tmp_path / "out"), *args)
    finally:
        server.stop()
    assert result.returncode == 0, result.stderr
    got = {pydicom.dcmread(path).SOPInstanceUID: pydicom.dcmread(path).file_meta.TransferSyntaxUID
           for path in (tmp_path / "out").rglob("*.dcm")}
    sent = {pydicom.dcmread(testdata(n)).SOPInstanceUID:
            pydicom.dcmread(testdata(n)).file_meta.TransferSyntaxUID for n in names}
    assert got == sent


def test_a_class_the_first_contexts_left_out_gets_an_association_of_its_own(
        tmp_path: Path) -> None:
    """Requests read as they come: a later one naming a SOP class the association's contexts
    do not offer (128 contexts cannot hold every class) gets a new association offering it."""
    import json

    from tests.dicom_files import make_dataset, write_instance

    rare = "1.2.840.10008.5.1.4.1.1.9.4.2"  # General Audio Waveform: not among the first 88
    contexts, _ = get_contexts("study", ["1.2.840.10008.5.1.4.1.1.2"])
    assert rare not in {str(cx.abstract_syntax) for cx in contexts}
    ct = pydicom.dcmread(testdata("explicit_le"))
    dataset = make_dataset()
    dataset.SOPClassUID = rare
    audio = write_instance(tmp_path / "audio.dcm", dataset)
    archive = Archive(tmp_path / "served")
    archive.put(testdata("explicit_le"))
    archive.put(audio)
    archive.close()
    wanted = [pydicom.dcmread(p) for p in (testdata("explicit_le"), audio)]
    lines = "".join(json.dumps({"QueryRetrieveLevel": "IMAGE", "SOPClassUID": str(ds.SOPClassUID),
                                "StudyInstanceUID": str(ds.StudyInstanceUID),
                                "SeriesInstanceUID": str(ds.SeriesInstanceUID),
                                "SOPInstanceUID": str(ds.SOPInstanceUID)}) + "\n" for ds in wanted)
    server = start_server(tmp_path / "serve", archive=tmp_path / "served")
    try:
        result = run_pacs(tmp_path, "get", f"PACSCLI@127.0.0.1:{server.port}",
                          "--out", str(tmp_path / "out"), "-", stdin=lines)
    finally:
        server.stop()
    assert result.returncode == 0, result.stderr
    assert {r["SOPInstanceUID"] for r in records(result)} == \
        {str(ct.SOPInstanceUID), str(wanted[1].SOPInstanceUID)}


def test_get_into_an_out_that_is_a_file(tmp_path: Path) -> None:
    """--out naming a file: each instance fails with a plain record (the cleanup of its
    temporary name raised NotADirectoryError: a traceback per instance)."""
    archive = Archive(tmp_path / "served")
    archive.put(testdata("explicit_le"))
    archive.close()
    study = str(pydicom.dcmread(testdata("explicit_le")).StudyInstanceUID)
    (tmp_path / "a-file").write_text("not a folder")
    server = start_server(tmp_path / "serve", archive=tmp_path / "served")
    try:
        result = run_pacs(tmp_path, "get", f"PACSCLI@127.0.0.1:{server.port}",
                          "--out", str(tmp_path / "a-file"), "--study", study)
    finally:
        server.stop()
    assert "Traceback" not in result.stderr and result.returncode != 0
    [record] = [r for r in records(result) if r.get("SOPInstanceUID")]
    assert record["status"] == "failed" and "cannot write" in record["error"]["message"]


def test_get_never_overwrites_a_file_under_out(tmp_path: Path) -> None:
    """A second get into the same --out: the same dataset is a duplicate; a different one
    under the same name is kept, with a warning (it was overwritten in silence)."""
    archive = Archive(tmp_path / "served")
    archive.put(testdata("explicit_le"))
    archive.close()
    study = str(pydicom.dcmread(testdata("explicit_le")).StudyInstanceUID)
    server = start_server(tmp_path / "serve", archive=tmp_path / "served")
    out = tmp_path / "out"
    try:
        first = run_pacs(tmp_path, "get", f"PACSCLI@127.0.0.1:{server.port}", "--out", str(out),
                         "--study", study)
        assert first.returncode == 0, first.stderr
        [path] = list(out.rglob("*.dcm"))
        again = run_pacs(tmp_path, "get", f"PACSCLI@127.0.0.1:{server.port}", "--out", str(out),
                         "--study", study)
        edited = bytearray(path.read_bytes())
        edited[-1] ^= 0xFF
        path.write_bytes(bytes(edited))
        third = run_pacs(tmp_path, "get", f"PACSCLI@127.0.0.1:{server.port}", "--out", str(out),
                         "--study", study)
    finally:
        server.stop()
    [record] = [r for r in records(again) if r.get("SOPInstanceUID")]
    assert again.returncode == 0 and record["outcome"] == "duplicate"
    [record] = [r for r in records(third) if r.get("SOPInstanceUID")]
    assert record["outcome"] == "kept" and record["status"] == "warning"
    assert path.read_bytes() == bytes(edited)
