"""`pacs index` as a library: pydicom's test files, junk, DICOMDIR media, re-runs, in place,
and `--rebuild` reproducing the index built while receiving."""

from __future__ import annotations

import os
import shutil
import time
from pathlib import Path

import pydicom
import pytest
from pydicom.data import get_testdata_file
from pydicom.fileset import FileSet

from pacscli.archive import layout
from pacscli.archive.archive import Archive
from pacscli.archive.index import Index
from pacscli.config import StorageSettings
from pacscli.ops.indexer import IndexTally, index_files, rebuild_index
from pacscli.ops.verify import verify_archive
from pacscli.records import Record
from tests.conftest import TESTDATA, testdata
from tests.dicom_files import junk_folder, make_dataset, sha256, write_instance

PYDICOM_FILES = Path(pydicom.__file__).parent / "data" / "test_files"
DICOMDIR = Path(str(get_testdata_file("DICOMDIR")))

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


def all_files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.is_file())


def run_index(archive: Path, paths: list[Path], **options: object) -> list[Record]:
    return list(index_files(archive, StorageSettings(), [str(p) for p in paths],
                            **options))  # type: ignore[arg-type]


def source(record: Record) -> str:
    """The input file a record is about (copied records name the archive file in `path`)."""
    return str(record.get("source") or record["path"])


def indexed_sops(archive: Path) -> list[str]:
    index = Index(archive / layout.INDEX_FILE)
    try:
        return [row[0] for row in index.connection().execute("SELECT SOPInstanceUID FROM instances")]
    finally:
        index.close()


def sop_of(path: Path) -> str | None:
    """The SOP Instance UID pydicom finds in a file, if it finds one."""
    try:
        return str(pydicom.dcmread(path, force=True, stop_before_pixels=True).SOPInstanceUID)
    except Exception:
        return None


def tally(records: list[Record]) -> IndexTally:
    counts = IndexTally()
    for record in records:
        counts.add(record)
    return counts


def test_pydicom_test_files_and_junk(tmp_path: Path) -> None:
    junk = tmp_path / "junk"
    expected = junk_folder(junk)
    archive = tmp_path / "archive"
    records = run_index(archive, [PYDICOM_FILES, junk], jobs=2)

    # every file reported, once
    inputs = sorted(str(p) for p in all_files(PYDICOM_FILES) + all_files(junk))
    assert sorted(source(r) for r in records) == inputs
    by_source = {source(r): r for r in records}

    # the junk: skipped with its reason, never a crash, never a row
    for name, code in expected.items():
        record = by_source[str(junk / name)]
        assert record["reason"] if record["status"] == "skipped" else True
        if code != "any":
            assert (record["status"], record["reason_code"]) == ("skipped", code), record
    junk_sops = {sop_of(p) for p in all_files(junk)} - {None}
    assert junk_sops and not junk_sops & set(indexed_sops(archive))

    # pydicom's own files: readable instances indexed, the rest skipped for what they are
    for name in TESTDATA.values():
        assert by_source[str(testdata(name))]["status"] in ("ok", "warning"), name
    for name, reason_code in {"MR_truncated.dcm": "truncated", "rtplan_truncated.dcm": "truncated",
                       "README.txt": "not-dicom", "zipMR.gz": "not-dicom",
                       "test1.json": "not-dicom", "ExplVR_LitEndNoMeta.dcm": "no-preamble",
                       "rtstruct.dcm": "no-preamble", "meta_missing_tsyntax.dcm": "invalid-dicom",
                       "no_meta_group_length.dcm": "unsafe-uid", "badVR.dcm": None}.items():
        record = by_source[str(PYDICOM_FILES / name)]
        assert record.get("reason_code") == reason_code, record
    for path in PYDICOM_FILES.glob("dicomdirtests/DICOMDIR*"):
        assert by_source[str(path)]["reason_code"] == "dicomdir"

    # every readable instance indexed once: one row per SOP Instance UID reported
    instances = [r for r in records if r["status"] in ("ok", "warning")]
    sops = indexed_sops(archive)
    assert len(sops) == len(set(sops)) == len({r["SOPInstanceUID"] for r in instances})
    assert set(sops) == {r["SOPInstanceUID"] for r in instances}
    # pydicom's files share UIDs: a later one with other content is kept out, not mixed in
    assert any(r["outcome"] == "kept" and r["status"] == "warning" for r in instances)

    # what enters the archive is the input's bytes, unchanged
    for record in instances:
        if record["outcome"] == "stored":
            assert sha256(Path(record["path"])) == sha256(Path(record["source"])) \
                == record["sha256"]

    # exit code: skips are not failures unless asked
    counts = tally(records)
    assert counts.statuses["failed"] == 0
    assert counts.exit_code() == 0
    assert counts.exit_code(strict=True) == 1
    assert list(verify_archive(archive))[-1]["problems"] == 0


def test_dicomdir_file_set(tmp_path: Path) -> None:
    expected = {i.SOPInstanceUID for i in FileSet(pydicom.dcmread(DICOMDIR))}
    assert len(expected) == 31
    records = run_index(tmp_path / "archive", [DICOMDIR], jobs=2)
    assert records[0]["reason_code"] == "dicomdir" and records[0]["referenced"] == 31
    assert records[0]["path"] == str(DICOMDIR)
    ok = [r for r in records[1:] if r["status"] == "ok"]
    assert {r["SOPInstanceUID"] for r in ok} == expected == set(indexed_sops(tmp_path / "archive"))
    assert len(records) == 32


def test_folder_holding_a_dicomdir_is_read_through_it(tmp_path: Path) -> None:
    """Media: files without suffix, 8-character names, and a mount that lowercased them."""
    media = tmp_path / "cdrom"
    shutil.copytree(DICOMDIR.parent / "TINY_ALPHA", media)
    fileset = FileSet(pydicom.dcmread(media / "DICOMDIR"))
    expected = [i.SOPInstanceUID for i in fileset]
    for path in sorted(media.rglob("*"), key=lambda p: -len(p.parts)):
        path.rename(path.with_name(path.name.lower()))
    missing = media / "pt000000" / "st000000" / "se000000" / "im00000a"
    missing.unlink()

    records = run_index(tmp_path / "archive", [media])
    assert records[0]["path"] == str(media / "dicomdir")
    assert records[0]["reason_code"] == "dicomdir" and records[0]["referenced"] == 49
    gone = [r for r in records if r["status"] == "failed"]
    assert [r["error"]["code"] for r in gone] == ["missing-file"]
    assert gone[0]["path"].endswith("PT000000/ST000000/SE000000/IM00000A")
    ok = [r for r in records if r["status"] == "ok"]
    # in the DICOMDIR's order, each once
    assert [r["SOPInstanceUID"] for r in ok] == [s for s in expected if s in
                                                 {r["SOPInstanceUID"] for r in ok}]
    assert len(ok) == 49
    assert [r["reason_code"] for r in records if r["status"] == "skipped"] == \
        ["dicomdir", "not-dicom"]  # and the README beside it
    assert tally(records).exit_code() == 1  # a file the DICOMDIR names is missing


def test_rerun_skips_what_is_indexed_and_unchanged(tmp_path: Path) -> None:
    src, archive = tmp_path / "src", tmp_path / "archive"
    for number in range(5):
        write_instance(src / f"{number}.dcm", number=number)
    first = run_index(archive, [src], jobs=2)
    assert sorted(r["outcome"] for r in first) == ["stored"] * 5
    mtimes = {r["path"]: os.stat(r["path"]).st_mtime_ns for r in first}

    write_instance(src / "new.dcm")
    second = run_index(archive, [src], jobs=2)
    assert sorted(r["outcome"] for r in second) == ["stored"] + ["unchanged"] * 5
    unchanged = [r for r in second if r["outcome"] == "unchanged"]
    assert {r["path"]: os.stat(r["path"]).st_mtime_ns for r in unchanged} == mtimes
    assert all(r["SOPInstanceUID"] and r["StudyInstanceUID"] for r in unchanged)


def test_in_place_records_where_files_lie_and_copies_nothing(tmp_path: Path) -> None:
    src, archive = tmp_path / "share", tmp_path / "archive"
    files = [write_instance(src / f"{n}.dcm", number=n) for n in range(4)]
    src.chmod(0o555)  # a read-only share
    try:
        records = run_index(archive, [src], in_place=True, jobs=2)
        assert [(r["outcome"], r["path"]) for r in records] == \
            [("indexed", str(p)) for p in files]
        assert not (archive / layout.STUDIES_DIR).exists()
        index = Index(archive / layout.INDEX_FILE)
        assert sorted(f.path for f in index.iter_files()) == [str(p) for p in files]
        index.close()

        again = run_index(archive, [src], in_place=True)
        assert [r["outcome"] for r in again] == ["unchanged"] * 4
        os.utime(files[1], (time.time() + 5, time.time() + 5))
        touched = run_index(archive, [src], in_place=True)
        assert {r["path"]: r["outcome"] for r in touched} == {
            str(p): "indexed" if p == files[1] else "unchanged" for p in files}
        assert list(verify_archive(archive))[-1]["problems"] == 0

        # a rebuild keeps what was indexed in place
        index = Index(archive / layout.INDEX_FILE)
        before = index.dump()
        index.close()
        assert all(r["status"] == "ok" for r in rebuild_index(archive, StorageSettings()))
        index = Index(archive / layout.INDEX_FILE)
        assert index.dump() == before
        index.close()
    finally:
        src.chmod(0o755)


def test_in_place_records_name_the_file_indexed(tmp_path: Path) -> None:
    """A second file with the instance's UID but other content is kept out of the index; its
    record's path is the file indexed before, and its source the one kept out (the latter
    was named nowhere)."""
    src, archive = tmp_path / "share", tmp_path / "archive"
    first = write_instance(src / "a" / "first.dcm", number=1)
    ds = pydicom.dcmread(first)
    ds.StudyDescription = "CHANGED"
    other = write_instance(src / "b" / "other.dcm", ds)
    records = run_index(archive, [src], in_place=True)
    by_source = {r["source"]: r for r in records}
    assert by_source[str(first)]["outcome"] == "indexed"
    assert by_source[str(other)]["outcome"] == "kept"
    assert by_source[str(other)]["path"] == str(first)


def test_rebuild_reproduces_the_index_built_while_receiving(tmp_path: Path) -> None:
    """`serve` stores through Archive.put(rewrite_meta=True) naming the sender; a rebuild
    from the files alone must give the same rows, study attributes of the newest included."""
    root = tmp_path / "archive"
    archive = Archive(root)
    sent = [testdata(name) for name in TESTDATA.values()] + all_files(DICOMDIR.parent / "77654033")
    outcomes = []
    for number, path in enumerate(sent):
        outcomes.append(archive.put(path, source_aet=f"MODALITY{number % 3}",
                                    rewrite_meta=True).outcome)
    study = "1.2.826.0.1.3680043.8.498.1"
    for number, description in enumerate(["first", "second", "third"]):
        ds = make_dataset(study=study, number=number, patient_id="SAME")
        ds.StudyDescription = description
        outcomes.append(archive.put(write_instance(tmp_path / f"s{number}.dcm", ds),
                                    source_aet="CT1", rewrite_meta=True).outcome)
    archive.put(write_instance(tmp_path / "copied.dcm"))  # as `pacs index` copies files
    assert "stored" in outcomes and "kept" in outcomes
    before = archive.index.dump()
    archive.close()
    assert any("third" in row for row in before["studies"])

    records = list(rebuild_index(root, StorageSettings(), jobs=2))
    assert {r["outcome"] for r in records} == {"indexed"}
    index = Index(root / layout.INDEX_FILE)
    after = index.dump()
    index.close()
    assert {k: len(v) for k, v in after.items()} == {k: len(v) for k, v in before.items()}
    assert after == before


def test_rebuild_sets_aside_an_index_sqlite_cannot_open(tmp_path: Path) -> None:
    root = tmp_path / "archive"
    run_index(root, [write_instance(tmp_path / "one.dcm")])
    (root / layout.INDEX_FILE).write_bytes(b"this is no database" * 100)
    for suffix in ("-wal", "-shm"):
        (root / f"{layout.INDEX_FILE}{suffix}").unlink(missing_ok=True)
    records = list(rebuild_index(root, StorageSettings()))
    assert [r["outcome"] for r in records] == ["set-aside", "indexed"]
    assert Path(records[0]["path"]).read_bytes().startswith(b"this is no database")
    assert list(verify_archive(root))[-1]["problems"] == 0


@pytest.mark.parametrize("rewrite", ["cut", "same-size"])
def test_a_file_rewritten_after_its_check_is_not_archived(tmp_path: Path,
                                                          monkeypatch: pytest.MonkeyPatch,
                                                          rewrite: str) -> None:
    """A file checked whole, then rewritten before its copy (a modality still writing to
    the folder): the copy was archived and indexed as `stored`, cut short. Now the file
    fails as changed, and nothing enters the archive."""
    source = write_instance(tmp_path / "src" / "a.dcm", rows=64)
    whole = source.read_bytes()
    from pacscli.dicom.identity import read_instance_info as read_info

    def then_rewritten(path: Path) -> object:
        info = read_info(path)
        time.sleep(0.01)  # a later modification time, however coarse the clock
        source.write_bytes(whole[:len(whole) // 2] if rewrite == "cut" else whole[::-1])
        return info

    monkeypatch.setattr("pacscli.ops.indexer.read_instance_info", then_rewritten)
    [record] = run_index(tmp_path / "archive", [source])
    assert record["status"] == "failed" and record["error"]["code"] == "changed", record
    assert f"{source} changed while it was read" in record["error"]["message"]
    assert [p for p in all_files(tmp_path / "archive")
            if layout.STUDIES_DIR in p.parts] == []
    assert Index(tmp_path / "archive" / layout.INDEX_FILE).dump()["instances"] == []
