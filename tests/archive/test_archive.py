"""Archive.put, the single insert path: conflicts and what stays on disk."""

from __future__ import annotations

import errno
import hashlib
import os
import sqlite3
import subprocess
from pathlib import Path
from typing import Any

import pydicom
import pytest

from pacscli.archive import layout
from pacscli.archive.archive import Archive, IncomingInstance
from pacscli.archive.index import MIGRATIONS, SCHEMA_VERSION, Index
from pacscli.config import StorageSettings
from pacscli.dicom.identity import seek_dataset
from pacscli.errors import ArchiveError, InvalidDicomError, OutOfResourcesError, UsageError
from tests.conftest import pacs_cmd, testdata
from tests.dicom_files import dead_pid


def instance_files(root: Path) -> list[Path]:
    return sorted(p for p in (root / "studies").rglob("*.dcm"))


def test_replace_with_new_study_uid_moves_the_old_file_aside(tmp_path: Path) -> None:
    archive = Archive(tmp_path / "archive", StorageSettings(on_conflict="replace"))
    original = testdata("explicit_le")
    assert archive.put(original).outcome == "stored"
    moved = pydicom.dcmread(original)
    moved.StudyInstanceUID = "1.2.3.4.5.6"  # the same instance, filed under another study
    moved.PatientName = "Moved^Study"
    moved_path = tmp_path / "moved.dcm"
    moved.save_as(moved_path)
    result = archive.put(moved_path)
    assert result.outcome == "replaced"
    files = instance_files(archive.root)
    assert files == [result.path]  # the old file left studies/ ...
    aside = list((archive.root / ".replaced").iterdir())
    assert len(aside) == 1 and pydicom.dcmread(aside[0]).StudyInstanceUID != "1.2.3.4.5.6"  # ... kept
    conn = archive.index.connection()
    assert conn.execute("SELECT count(*) FROM studies").fetchone()[0] == 1  # no empty study left
    assert conn.execute("SELECT count(*) FROM instances").fetchone()[0] == 1
    archive.close()
    verify = subprocess.run(pacs_cmd("verify", "--archive", str(tmp_path / "archive")),
                            capture_output=True, text=True, timeout=120)
    assert verify.returncode == 0, verify.stdout + verify.stderr


def test_keep_policy_leaves_the_archived_instance(tmp_path: Path) -> None:
    archive = Archive(tmp_path / "archive")
    original = testdata("explicit_le")
    first = archive.put(original)
    changed = pydicom.dcmread(original)
    changed.PatientName = "Changed^Name"
    changed.save_as(tmp_path / "changed.dcm")
    assert archive.put(tmp_path / "changed.dcm").outcome == "kept"
    assert archive.put(original).outcome == "duplicate"
    assert instance_files(archive.root) == [first.path]
    assert str(pydicom.dcmread(first.path).PatientName) == "CompressedSamples^CT1"
    archive.close()


def _dataset_bytes(path: Path) -> tuple[bytes, str, str]:
    """A Part 10 file's dataset bytes (after the file meta), transfer syntax and SOP UID."""
    with open(path, "rb") as fp:
        offset = seek_dataset(fp)
    ds = pydicom.dcmread(path, stop_before_pixels=True)
    return path.read_bytes()[offset:], str(ds.file_meta.TransferSyntaxUID), str(ds.SOPInstanceUID)


def test_received_instances_are_settled_by_their_dataset_bytes(tmp_path: Path) -> None:
    """The same dataset from another AE is a duplicate although the file meta differs; a
    dataset of the same length differing in one byte is a conflict, settled by the policy."""
    data, syntax, _ = _dataset_bytes(testdata("explicit_le"))
    keep = Archive(tmp_path / "keep")
    first = keep.put_received(data, transfer_syntax=syntax, source_aet="CT1")
    assert first.outcome == "stored"
    assert keep.put_received(data, transfer_syntax=syntax, source_aet="OTHER").outcome == "duplicate"
    flipped = bytearray(data)
    flipped[-1] ^= 0xFF  # the last pixel byte: same length, same header
    assert keep.put_received(bytes(flipped), transfer_syntax=syntax, source_aet="CT1").outcome == "kept"
    assert first.path.read_bytes().endswith(data)
    keep.close()

    replace = Archive(tmp_path / "replace", StorageSettings(on_conflict="replace"))
    replace.put_received(data, transfer_syntax=syntax, source_aet="CT1")
    result = replace.put_received(bytes(flipped), transfer_syntax=syntax, source_aet="CT1")
    assert result.outcome == "replaced" and result.path.read_bytes().endswith(flipped)
    replace.close()


def test_recorded_sha256_is_the_archived_files(tmp_path: Path) -> None:
    """Small datasets are hashed inline, large ones in a worker thread: both record the
    sha256 of the file as it lies in the archive."""
    archive = Archive(tmp_path / "archive")
    small, syntax, _ = _dataset_bytes(testdata("explicit_le"))
    big_ds = pydicom.dcmread(testdata("explicit_le"))
    big_ds.SOPInstanceUID = "1.2.3.4.5.6.7"
    big_ds.add_new(0x00091010, "OB", b"x" * 600_000)  # over the threshold for hashing in a thread
    big_path = tmp_path / "big.dcm"
    big_ds.save_as(big_path)
    big, _, _ = _dataset_bytes(big_path)
    for data in (small, big):
        result = archive.put_received(data, transfer_syntax=syntax, source_aet="CT1")
        on_disk = hashlib.sha256(result.path.read_bytes()).hexdigest()
        assert result.sha256 == on_disk == archive.index.file_of(result.info.sop_uid).sha256  # type: ignore[union-attr]
    archive.close()
    assert not archive.staging.exists()


def test_schema_2_index_is_migrated_keeping_its_rows(tmp_path: Path) -> None:
    """An index written by the previous release (schema 2, with content_sha256) opens,
    is migrated to the current schema and keeps every row."""
    path = tmp_path / "index.sqlite"
    conn = sqlite3.connect(path)
    for version in (1, 2):
        conn.executescript(MIGRATIONS[version])
    conn.execute("INSERT INTO patients (PatientID, IssuerOfPatientID) VALUES ('P', '')")
    conn.execute("INSERT INTO studies (patient_pk, StudyInstanceUID) VALUES (1, '1.2')")
    conn.execute("INSERT INTO series (study_pk, SeriesInstanceUID) VALUES (1, '1.2.3')")
    conn.execute("INSERT INTO instances (series_pk, SOPInstanceUID, path, size, sha256, "
                 "content_sha256, transfer_syntax, received_at) VALUES "
                 "(1, '1.2.3.4', 'studies/x.dcm', 10, 'aa', 'bb', '1.2.840.10008.1.2', 0)")
    conn.execute("PRAGMA user_version = 2")
    conn.commit()
    conn.close()
    index = Index(path)
    assert index.schema_version() == SCHEMA_VERSION == 4
    row = index.lookup("1.2.3.4")
    assert row is not None and (row.path, row.size, row.sha256) == ("studies/x.dcm", 10, "aa")
    columns = {r[1] for r in index.connection().execute("PRAGMA table_info(instances)")}
    assert "content_sha256" not in columns
    index.close()


def test_schema_3_patients_without_an_id_are_split_per_study(tmp_path: Path) -> None:
    """Schema 3 kept every instance without a Patient ID under one patient row. Migrated,
    each such study has a patient of its own (the merged values, until re-indexed); patients
    with an ID and every reference between the tables are as they were."""
    path = tmp_path / "index.sqlite"
    conn = sqlite3.connect(path)
    for version in (1, 2, 3):
        conn.executescript(MIGRATIONS[version])
    conn.execute("INSERT INTO patients (pk, PatientID, IssuerOfPatientID, PatientName) VALUES "
                 "(1, '', '', 'LAST^WRITTEN'), (2, 'P2', '', 'HAS^ID')")
    conn.execute("INSERT INTO studies (pk, patient_pk, StudyInstanceUID) VALUES "
                 "(1, 1, '1.1'), (2, 1, '1.2'), (3, 2, '1.3')")
    conn.execute("INSERT INTO series (study_pk, SeriesInstanceUID) VALUES (1, '1.1.1'), "
                 "(2, '1.2.1'), (3, '1.3.1')")
    conn.execute("PRAGMA user_version = 3")
    conn.commit()
    conn.close()
    index = Index(path)
    assert index.schema_version() == 4
    rows = index.connection().execute(
        "SELECT st.StudyInstanceUID, p.PatientID, p.patient_key, p.PatientName FROM studies st "
        "JOIN patients p ON p.pk = st.patient_pk ORDER BY st.StudyInstanceUID").fetchall()
    assert [tuple(r) for r in rows] == [("1.1", "", "1.1", "LAST^WRITTEN"),
                                        ("1.2", "", "1.2", "LAST^WRITTEN"),
                                        ("1.3", "P2", "", "HAS^ID")]
    conn = index.connection()
    assert conn.execute("SELECT count(*) FROM patients").fetchone()[0] == 3
    assert conn.execute("PRAGMA foreign_key_check").fetchall() == []
    assert conn.execute("PRAGMA foreign_keys").fetchone()[0] == 1
    index.close()


@pytest.mark.parametrize("received", [False, True])
@pytest.mark.parametrize("failing", ["fdatasync", "replace", "fsync"])
def test_a_failed_sync_or_rename_commits_no_row(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                failing: str, received: bool) -> None:
    """The rows are written while the data flushes; when the flush, the rename or the
    folder's sync fails (an I/O error), they are rolled back: out of resources, nothing
    indexed, nothing placed. The same for a file written while the dataset arrived (serve)."""
    archive = Archive(tmp_path / "archive")
    data, syntax, sop_uid = _dataset_bytes(testdata("explicit_le"))
    sop_class = str(pydicom.dcmread(testdata("explicit_le")).SOPClassUID)

    def broken(*args: object) -> None:
        raise OSError(errno.EIO, "Input/output error")

    monkeypatch.setattr(os, failing, broken)
    receiving = _receive(archive, data, syntax=syntax, sop_class=sop_class,
                         sop_uid=sop_uid) if received else None
    with pytest.raises(OutOfResourcesError):
        archive.put_received(data, transfer_syntax=syntax, source_aet="CT1", receiving=receiving)
    monkeypatch.undo()
    assert archive.index.lookup(sop_uid) is None
    assert instance_files(archive.root) == []
    assert not [p for p in archive.staging.iterdir() if p.stat().st_size]  # no staged data left
    assert archive.put_received(data, transfer_syntax=syntax, source_aet="CT1").outcome == "stored"
    archive.close()


@pytest.mark.parametrize("failing", ["commit", "fsync", "fdatasync", "link"])
def test_a_failed_replace_leaves_the_archived_version(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                      failing: str) -> None:
    """Under on_conflict = replace, a new version that cannot be committed (disk full at the
    COMMIT), synced or set aside fails as a whole: the archived file keeps its name and
    content, as its index row says, and `pacs verify` finds nothing wrong. A failed commit
    used to leave the new file under the name and the old row over it, which verify then
    called a checksum mismatch and --repair dropped from the index."""
    archive = Archive(tmp_path / "archive", StorageSettings(on_conflict="replace"))
    first = archive.put(testdata("explicit_le"))
    changed = pydicom.dcmread(testdata("explicit_le"))
    changed.PatientName = "Changed^Name"
    changed.save_as(tmp_path / "changed.dcm")
    if failing == "commit":
        upsert = archive.index.upsert

        def full_at_commit(*args: Any, before_commit: Any, **kwargs: Any) -> None:
            def then_full() -> None:
                before_commit()
                raise sqlite3.OperationalError("database or disk is full")
            upsert(*args, before_commit=then_full, **kwargs)

        monkeypatch.setattr(archive.index, "upsert", full_at_commit)
    else:
        def broken(*args: object) -> None:
            raise OSError(errno.ENOSPC, "No space left on device")

        monkeypatch.setattr(os, failing, broken)
    with pytest.raises((OutOfResourcesError, ArchiveError)):
        archive.put(tmp_path / "changed.dcm")
    monkeypatch.undo()
    assert instance_files(archive.root) == [first.path]
    assert hashlib.sha256(first.path.read_bytes()).hexdigest() == first.sha256
    assert archive.index.lookup(first.info.sop_uid).sha256 == first.sha256  # type: ignore[union-attr]
    assert not (archive.root / ".replaced").exists() or not list((archive.root / ".replaced").iterdir())
    archive.close()
    verify = subprocess.run(pacs_cmd("verify", "--archive", str(tmp_path / "archive")),
                            capture_output=True, text=True, timeout=120)
    assert verify.returncode == 0, verify.stdout + verify.stderr


def _receive(archive: Archive, data: bytes, *, syntax: str, sop_class: str, sop_uid: str,
             fragment: int = 100_000) -> IncomingInstance:
    """What serve does while a C-STORE dataset arrives: write it through, fragment by fragment."""
    receiving = archive.begin_received(sop_class_uid=sop_class, sop_uid=sop_uid,
                                       transfer_syntax=syntax, source_aet="CT1")
    assert receiving is not None
    for start in range(0, len(data), fragment):
        receiving.write_through(memoryview(data)[start:start + fragment])
    receiving.finish()  # as the association does after the last fragment: the flush starts
    return receiving


@pytest.mark.parametrize("fragment", [100_000, 64])
def test_a_dataset_written_while_it_arrives_becomes_the_archived_file(tmp_path: Path,
                                                                      fragment: int) -> None:
    """When the command named the dataset's own UIDs, the file written during the receive
    is the one renamed into place (same inode), byte for byte what a plain put writes. Its
    identity was read from the first piece when that held the whole header, and after the
    last one otherwise: the same either way."""
    archive = Archive(tmp_path / "archive")
    data, syntax, sop_uid = _dataset_bytes(testdata("explicit_le"))
    sop_class = str(pydicom.dcmread(testdata("explicit_le")).SOPClassUID)
    receiving = _receive(archive, data, syntax=syntax, sop_class=sop_class, sop_uid=sop_uid,
                         fragment=fragment)
    assert (receiving.info is None) == (fragment == 64)
    inode = os.stat(receiving.file.path).st_ino
    result = archive.put_received(data, transfer_syntax=syntax, source_aet="CT1",
                                  receiving=receiving)
    assert result.outcome == "stored"
    assert os.stat(result.path).st_ino == inode
    plain = Archive(tmp_path / "plain")
    plain_result = plain.put_received(data, transfer_syntax=syntax, source_aet="CT1")
    assert result.info == plain_result.info
    assert result.path.read_bytes() == plain_result.path.read_bytes()
    assert result.sha256 == hashlib.sha256(result.path.read_bytes()).hexdigest()
    receiving.discard()  # as serve does once the message is answered: the placed file stays
    assert result.path.exists()
    assert not [p for p in archive.staging.iterdir() if p.stat().st_size]
    plain.close()
    archive.close()


@pytest.mark.parametrize("case", ["other-uid", "short", "write-error", "not-dicom", "duplicate"])
def test_a_written_through_file_that_does_not_fit_is_dropped(tmp_path: Path, case: str) -> None:
    """A command naming another instance than its dataset (dirty devices), a file that
    missed bytes or could not be written (disk full): the put stages the dataset anew.
    A dataset that cannot be stored, or a duplicate: nothing of it stays in staging."""
    archive = Archive(tmp_path / "archive")
    data, syntax, sop_uid = _dataset_bytes(testdata("explicit_le"))
    sop_class = str(pydicom.dcmread(testdata("explicit_le")).SOPClassUID)
    if case == "duplicate":
        archive.put_received(data, transfer_syntax=syntax, source_aet="CT1")
    sent = {"short": data[:-2], "not-dicom": b"\x00" * 64}.get(case, data)
    receiving = _receive(archive, sent, syntax=syntax, sop_class=sop_class,
                         sop_uid="1.2.999" if case == "other-uid" else sop_uid)
    if case == "write-error":
        receiving.file.error = OSError(errno.ENOSPC, "No space left on device")
    held = tmp_path / "held"  # a second name keeps the inode from being reused
    os.link(receiving.file.path, held)
    if case == "not-dicom":
        with pytest.raises(InvalidDicomError):
            archive.put_received(sent, transfer_syntax=syntax, source_aet="CT1",
                                 receiving=receiving)
        assert instance_files(archive.root) == []
    else:
        result = archive.put_received(data, transfer_syntax=syntax, source_aet="CT1",
                                      receiving=receiving)
        assert result.outcome == ("duplicate" if case == "duplicate" else "stored")
        assert os.stat(result.path).st_ino != os.stat(held).st_ino
        assert pydicom.dcmread(result.path).file_meta.MediaStorageSOPInstanceUID == sop_uid
        assert result.path.read_bytes().endswith(data)
    assert not receiving.file.path.exists() and os.stat(held).st_nlink == 1
    assert not [p for p in archive.staging.iterdir() if p.stat().st_size]
    archive.close()


def test_an_archive_path_that_is_a_file_is_a_usage_error(tmp_path: Path) -> None:
    """`--archive` naming a file: said so, exit 2, rather than mkdir's 'File exists' (1)."""
    afile = tmp_path / "afile"
    afile.write_text("x")
    with pytest.raises(UsageError, match="is not a folder"):
        Archive(afile)
    assert afile.read_text() == "x"


def test_a_live_writers_staging_folder_is_told_by_its_lock_not_its_pid(tmp_path: Path) -> None:
    """A writer in another PID namespace (a container sharing the archive) has a PID that
    means nothing here: its staging folder was judged dead and removed under it, and
    verify called its files leftovers. Its lock on the folder tells it is alive."""
    import fcntl
    import time

    from pacscli.archive.staging import OWNER_LOCK
    from pacscli.ops.verify import verify_archive

    root = tmp_path / "archive"
    Archive(root).close()
    other = root / layout.STAGING_DIR / f"{dead_pid()}-0a1b2c3d"  # a PID not running here
    other.mkdir()
    (other / "0.dcm").write_bytes(b"being written")
    lock = os.open(other / OWNER_LOCK, os.O_RDONLY | os.O_CREAT)
    old = time.time() - 3600
    os.utime(other / OWNER_LOCK, (old, old))
    try:
        fcntl.flock(lock, fcntl.LOCK_EX)  # held, as its owner holds it
        Archive(root).close()
        assert (other / "0.dcm").exists()
        *problems, summary = verify_archive(root)
        assert problems == [] and summary["problems"] == 0
    finally:
        os.close(lock)  # the owner is gone
    *problems, _ = verify_archive(root)
    assert [(r["problem"], r["path"]) for r in problems] == [("leftover-temp", str(other / "0.dcm"))]
    Archive(root).close()
    assert not other.exists()
