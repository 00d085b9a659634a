"""The index's rows stay right whoever else writes them: another connection (another
`pacs` process, or another association's thread), a removal, a rolled-back put."""

from __future__ import annotations

import multiprocessing
import sqlite3
from pathlib import Path
from typing import Any

import pytest

from pacscli.archive.index import Index, StoredFile
from pacscli.dicom.attributes import InstanceInfo

STUDY, SERIES = "1.2.3", "1.2.3.4"


def _info(sop_uid: str, description: str, patient: str = "P1") -> InstanceInfo:
    return InstanceInfo(
        study_uid=STUDY, series_uid=SERIES, sop_uid=sop_uid, sop_class_uid="1.2.840.10008.5.1.4.1.1.2",
        transfer_syntax="1.2.840.10008.1.2.1", dataset_offset=0,
        attributes={"PatientID": patient, "StudyInstanceUID": STUDY, "SeriesInstanceUID": SERIES,
                    "SOPInstanceUID": sop_uid, "SeriesDescription": description})


def _stored(sop_uid: str) -> StoredFile:
    return StoredFile(path=f"studies/{sop_uid}.dcm", size=1, sha256="0" * 64, received_at=0.0,
                      source_aet=None)


def _put(index: Index, sop_uid: str, description: str, patient: str = "P1") -> None:
    index.upsert(_info(sop_uid, description, patient), _stored(sop_uid))


def _series(index: Index) -> list[tuple[str, str]]:
    return [(row[0], row[1]) for row in index.connection().execute(
        "SELECT SeriesInstanceUID, SeriesDescription FROM series")]


def test_another_connections_change_to_a_series_is_seen(tmp_path: Path) -> None:
    """The newest instance's values win even when another connection wrote the series row
    since this one last did."""
    one, other = Index(tmp_path / "index.sqlite"), Index(tmp_path / "index.sqlite")
    _put(one, "1.1", "first")
    _put(other, "1.2", "second")
    _put(one, "1.3", "first")
    assert _series(one) == [(SERIES, "first")]
    one.close()
    other.close()


def test_a_series_removed_elsewhere_is_made_again(tmp_path: Path) -> None:
    """Another connection removes the series' last instance (and so the series): the next
    instance of it brings the series back rather than naming a row that is gone."""
    one, other = Index(tmp_path / "index.sqlite"), Index(tmp_path / "index.sqlite")
    _put(one, "1.1", "first")
    assert other.remove(["1.1"]) == 1
    _put(one, "1.2", "first")
    assert _series(one) == [(SERIES, "first")]
    assert one.lookup("1.2") is not None
    one.close()
    other.close()


def test_rows_removed_or_rolled_back_on_this_connection_are_made_again(tmp_path: Path) -> None:
    index = Index(tmp_path / "index.sqlite")
    _put(index, "1.1", "first")
    index.remove(["1.1"])
    _put(index, "1.2", "first")
    assert _series(index) == [(SERIES, "first")]

    def fail() -> None:
        raise OSError("the file could not be placed")

    with pytest.raises(OSError):  # a new patient and its rows, rolled back
        index.upsert(_info("1.3", "first", patient="P2"), _stored("1.3"), before_commit=fail)
    _put(index, "1.4", "first", patient="P2")
    assert index.lookup("1.4") is not None and index.lookup("1.3") is None
    patients = [row[0] for row in index.connection().execute("SELECT PatientID FROM patients")]
    assert sorted(patients) == ["P1", "P2"]
    index.close()


def test_a_failed_commit_leaves_no_transaction_open(tmp_path: Path) -> None:
    """A COMMIT that fails keeps SQLite's transaction open (a deferred constraint, here):
    it is rolled back, and the next put starts afresh."""
    index = Index(tmp_path / "index.sqlite")
    conn = index.connection()
    with pytest.raises(sqlite3.IntegrityError), index.transaction():
        conn.execute("PRAGMA defer_foreign_keys = ON")
        conn.execute("INSERT INTO series (study_pk, SeriesInstanceUID) VALUES (999, '5.5')")
    assert not conn.in_transaction
    _put(index, "1.1", "first")
    assert index.lookup("1.1") is not None
    assert [uid for uid, _ in _series(index)] == [SERIES]
    index.close()


def _open_index(path: str, start: Any, results: Any) -> None:
    start.wait()
    try:
        Index(Path(path)).close()
        results.put("ok")
    except Exception as exc:
        results.put(f"{type(exc).__name__}: {exc}")


def test_processes_opening_a_new_index_at_once_all_succeed(tmp_path: Path) -> None:
    """Two `pacs serve` (or `pacs index`) starting on a new archive at the same moment: the
    switch to WAL mode used to fail one of them with "database is locked" (2 of 90 opens
    here, 3 processes at a time)."""
    context = multiprocessing.get_context("fork")
    failures = []
    for round_ in range(30):
        path = str(tmp_path / f"{round_}.sqlite")
        start, results = context.Barrier(3), context.Queue()
        procs = [context.Process(target=_open_index, args=(path, start, results)) for _ in range(3)]
        for proc in procs:
            proc.start()
        outcomes = [results.get(timeout=60) for _ in procs]
        for proc in procs:
            proc.join()
        failures += [outcome for outcome in outcomes if outcome != "ok"]
    assert failures == []


def test_a_full_disk_under_the_index_is_out_of_resources() -> None:
    """A commit that found the disk full was reported as an unusable index."""
    from pacscli.archive.index import unusable
    from pacscli.errors import OutOfResourcesError

    full = sqlite3.OperationalError("database or disk is full")
    full.sqlite_errorcode = sqlite3.SQLITE_FULL
    error = unusable(full)
    assert isinstance(error, OutOfResourcesError) and error.code == "out-of-resources"
    damaged = sqlite3.DatabaseError("database disk image is malformed")
    damaged.sqlite_errorcode = sqlite3.SQLITE_CORRUPT
    assert unusable(damaged).code == "index-unusable"
