"""The archive's SQLite index: patients, studies, series and instances, in WAL mode.

The index is derived data: every column can be rebuilt from the files alone
(`pacs index --rebuild`). Each thread gets its own connection; writers serialise on
SQLite's own lock (BEGIN IMMEDIATE with a busy timeout).
"""

from __future__ import annotations

import sqlite3
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pacscli.dicom.attributes import INDEXED_ATTRIBUTES, InstanceInfo
from pacscli.errors import ArchiveError, OutOfResourcesError

SCHEMA_VERSION = 4

_LEVEL_TABLES = {"patient": "patients", "study": "studies", "series": "series", "instance": "instances"}


def _columns(level: str) -> str:
    return "".join(f",\n    {kw} TEXT" for kw in INDEXED_ATTRIBUTES[level] if kw not in _KEY_COLUMNS)


def _names(level: str, prefix: str = "") -> str:
    """', a, b' for the attribute columns of a level (those `_columns` creates)."""
    return "".join(f", {prefix}{kw}" for kw in INDEXED_ATTRIBUTES[level] if kw not in _KEY_COLUMNS)


# Columns that identify a row: NOT NULL so that UNIQUE constraints see '' as one value.
_KEY_COLUMNS = {"PatientID", "IssuerOfPatientID", "StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID"}
# Rows a thread knows the content of: (table, key values) -> (pk, the row's values in order).
_KnownRows = dict[tuple[str, tuple[object, ...]], tuple[int, tuple[object, ...]]]

# Migrations from version N-1 to N, in order. Version 1 creates the schema.
MIGRATIONS: dict[int, str] = {
    1: f"""
CREATE TABLE patients (
    pk INTEGER PRIMARY KEY,
    PatientID TEXT NOT NULL,
    IssuerOfPatientID TEXT NOT NULL{_columns("patient")},
    UNIQUE (PatientID, IssuerOfPatientID)
);
CREATE TABLE studies (
    pk INTEGER PRIMARY KEY,
    patient_pk INTEGER NOT NULL REFERENCES patients(pk),
    StudyInstanceUID TEXT NOT NULL UNIQUE{_columns("study")}
);
CREATE TABLE series (
    pk INTEGER PRIMARY KEY,
    study_pk INTEGER NOT NULL REFERENCES studies(pk),
    SeriesInstanceUID TEXT NOT NULL UNIQUE{_columns("series")}
);
CREATE TABLE instances (
    pk INTEGER PRIMARY KEY,
    series_pk INTEGER NOT NULL REFERENCES series(pk),
    SOPInstanceUID TEXT NOT NULL UNIQUE{_columns("instance")},
    SpecificCharacterSet TEXT,
    path TEXT NOT NULL UNIQUE,
    size INTEGER NOT NULL,
    sha256 TEXT NOT NULL,
    content_sha256 TEXT NOT NULL,
    transfer_syntax TEXT NOT NULL,
    received_at REAL NOT NULL,
    source_aet TEXT
);
CREATE INDEX patients_name ON patients(PatientName);
CREATE INDEX studies_patient ON studies(patient_pk);
CREATE INDEX studies_date ON studies(StudyDate);
CREATE INDEX studies_accession ON studies(AccessionNumber);
CREATE INDEX series_study ON series(study_pk);
CREATE INDEX instances_series ON instances(series_pk);
""",
    # Case-insensitive person name matching (`pacs find --ci-names`, C-FIND fuzzy matching):
    # an ASCII prefix of a name seeks in this index before the exact Unicode comparison.
    2: """
CREATE INDEX IF NOT EXISTS patients_name_lower ON patients(lower(PatientName));
""",
    # The dataset's own sha256 told a re-received instance from a changed one. Hashing every
    # received instance twice cost more than its fdatasync; the rare conflict now compares
    # the two datasets byte for byte instead.
    3: """
ALTER TABLE instances DROP COLUMN content_sha256;
""",
    # Instances without a Patient ID all went to one patient row, whose name was that of the
    # last one stored: a study-level answer gave most of those studies another patient's name.
    # Each study without a Patient ID now has a patient of its own, told apart by
    # patient_key (its Study Instance UID; '' for a patient with an ID). Rows merged before
    # are split with the merged values, which the next instance stored or `pacs index
    # --rebuild` corrects. SQLite changes a UNIQUE constraint only by copying the table.
    4: f"""
CREATE TABLE patients_new (
    pk INTEGER PRIMARY KEY,
    PatientID TEXT NOT NULL,
    IssuerOfPatientID TEXT NOT NULL,
    patient_key TEXT NOT NULL DEFAULT ''{_columns("patient")},
    UNIQUE (PatientID, IssuerOfPatientID, patient_key)
);
INSERT INTO patients_new (pk, PatientID, IssuerOfPatientID{_names("patient")})
    SELECT pk, PatientID, IssuerOfPatientID{_names("patient")} FROM patients;
DROP TABLE patients;
ALTER TABLE patients_new RENAME TO patients;
CREATE INDEX patients_name ON patients(PatientName);
CREATE INDEX patients_name_lower ON patients(lower(PatientName));
INSERT INTO patients (PatientID, IssuerOfPatientID, patient_key{_names("patient")})
    SELECT p.PatientID, p.IssuerOfPatientID, st.StudyInstanceUID{_names("patient", "p.")}
    FROM studies st JOIN patients p ON p.pk = st.patient_pk
    WHERE p.PatientID = '' AND p.patient_key = '';
UPDATE studies SET patient_pk = (
    SELECT own.pk FROM patients own JOIN patients merged ON merged.pk = studies.patient_pk
    WHERE own.PatientID = '' AND own.IssuerOfPatientID = merged.IssuerOfPatientID
      AND own.patient_key = studies.StudyInstanceUID)
    WHERE patient_pk IN (SELECT pk FROM patients WHERE PatientID = '' AND patient_key = '');
DELETE FROM patients WHERE PatientID = '' AND patient_key = ''
""",
}


@dataclass(frozen=True)
class StoredFile:
    """The file facts the index keeps beside an instance's attributes."""

    path: str  # relative to the archive root, or absolute for files indexed in place
    size: int
    sha256: str
    received_at: float
    source_aet: str | None


@dataclass(frozen=True)
class InstanceRow:
    """An indexed instance, as far as the insert path needs to know it."""

    sop_uid: str
    path: str
    size: int
    sha256: str


@dataclass(frozen=True)
class IndexedFile:
    """An indexed instance's file and UIDs: what `pacs verify` checks a file against."""

    pk: int
    sop_uid: str
    series_uid: str
    study_uid: str
    patient_id: str
    path: str
    size: int
    sha256: str
    received_at: float


_FILE_QUERY = (
    "SELECT i.pk, i.SOPInstanceUID, se.SeriesInstanceUID, st.StudyInstanceUID, p.PatientID, "
    "i.path, i.size, i.sha256, i.received_at FROM instances i "
    "JOIN series se ON se.pk = i.series_pk JOIN studies st ON st.pk = se.study_pk "
    "JOIN patients p ON p.pk = st.patient_pk"
)

# How `dump` names a row's parent: by its natural key instead of its pk.
_PARENTS = {
    "studies": ("patient_pk", "patients", ("PatientID", "IssuerOfPatientID")),
    "series": ("study_pk", "studies", ("StudyInstanceUID",)),
    "instances": ("series_pk", "series", ("SeriesInstanceUID",)),
}


def unusable(exc: sqlite3.DatabaseError) -> ArchiveError:
    """The error to report for an index SQLite cannot use, with what to do when damaged."""
    if getattr(exc, "sqlite_errorcode", None) == sqlite3.SQLITE_FULL:
        return OutOfResourcesError(f"cannot write the archive's index: {exc}")
    message = f"the archive's index cannot be used: {exc}"
    if getattr(exc, "sqlite_errorcode", None) in (sqlite3.SQLITE_CORRUPT, sqlite3.SQLITE_NOTADB):
        message += ("; it is damaged: rebuild it from the archive's files with "
                    "`pacs index --rebuild --archive DIR`")
    return ArchiveError(message, code="index-unusable")


def _when_free(conn: sqlite3.Connection, statement: str, wait: float = 60.0) -> None:
    """Execute `statement`, trying again while another process holds the database.

    Switching a new index to WAL mode takes an exclusive lock without going through the busy
    handler: two processes opening a new archive at once (two `pacs serve`, say) saw one fail
    with "database is locked".
    """
    deadline = time.monotonic() + wait
    while True:
        try:
            conn.execute(statement)
            return
        except sqlite3.OperationalError as exc:
            busy = exc.sqlite_errorcode in (sqlite3.SQLITE_BUSY, sqlite3.SQLITE_LOCKED)
            if not busy or time.monotonic() > deadline:
                raise
            time.sleep(0.01)


class Index:
    """The SQLite index of one archive."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._local = threading.local()
        self._connections: list[sqlite3.Connection] = []
        self._lock = threading.Lock()
        # Writers of this process queue here rather than in SQLite's busy handler, which
        # sleeps 1, 2, 5... ms between tries while another thread holds the write lock.
        self._write_lock = threading.Lock()
        self.migrate()

    def connection(self) -> sqlite3.Connection:
        """This thread's connection, opened on first use."""
        conn: sqlite3.Connection | None = getattr(self._local, "conn", None)
        if conn is None:
            try:
                conn = self._open()
            except sqlite3.Error as exc:
                raise ArchiveError(f"cannot open the index {self.path}: {exc}") from exc
            self._local.conn = conn
            with self._lock:
                self._connections.append(conn)
        return conn

    def _open(self) -> sqlite3.Connection:
        conn = sqlite3.connect(self.path, timeout=60, isolation_level=None,
                               check_same_thread=False)
        conn.row_factory = sqlite3.Row
        try:
            _when_free(conn, "PRAGMA journal_mode=WAL")
        except sqlite3.OperationalError as exc:
            conn.close()
            # CANTOPEN in a folder no one may write (chattr +i, a read-only mount);
            # READONLY_DIRECTORY in one we may not (its mode, another user's)
            primary = exc.sqlite_errorcode & 0xFF
            if primary not in (sqlite3.SQLITE_CANTOPEN, sqlite3.SQLITE_READONLY) \
                    or not self.path.is_file() \
                    or self.path.with_name(self.path.name + "-wal").exists():
                raise
            # A WAL database is read through its -shm file, which SQLite cannot create in a
            # folder it may not write (a read-only share, a CD). With no -wal file, every
            # commit is in the database file itself: read it as it is, without the -shm.
            conn = sqlite3.connect(f"{self.path.resolve().as_uri()}?mode=ro&immutable=1",
                                   uri=True, isolation_level=None, check_same_thread=False)
            conn.row_factory = sqlite3.Row
            conn.execute("PRAGMA foreign_keys=ON")
            return conn
        # NORMAL in WAL mode: a commit survives a process crash; a power cut may lose
        # the last commits, which `pacs verify --repair` re-indexes from the files.
        conn.execute("PRAGMA synchronous=NORMAL")
        conn.execute("PRAGMA foreign_keys=ON")
        return conn

    def close(self) -> None:
        """Close every thread's connection."""
        with self._lock:
            for conn in self._connections:
                conn.close()
            self._connections.clear()
        self._local = threading.local()

    @contextmanager
    def transaction(self) -> Iterator[sqlite3.Connection]:
        """A write transaction: BEGIN IMMEDIATE ... COMMIT, rolled back on error."""
        conn = self.connection()
        with self._write_lock:
            conn.execute("BEGIN IMMEDIATE")
            try:
                yield conn
                conn.execute("COMMIT")
            except BaseException:
                self._forget_parents()  # it may name rows that are not there any more
                if conn.in_transaction:  # a failed COMMIT may have rolled back already
                    conn.execute("ROLLBACK")
                raise

    def schema_version(self) -> int:
        """The schema version this index file has."""
        return int(self.connection().execute("PRAGMA user_version").fetchone()[0])

    def migrate(self) -> None:
        """Bring the schema up to SCHEMA_VERSION, in one transaction."""
        conn = self.connection()
        try:
            # Off outside the transaction (SQLite ignores it inside) while a table that others
            # refer to is copied; foreign_key_check then proves every reference still holds.
            conn.execute("PRAGMA foreign_keys=OFF")
            with self.transaction() as conn:
                version = int(conn.execute("PRAGMA user_version").fetchone()[0])
                if version > SCHEMA_VERSION:
                    raise ArchiveError(
                        f"the index {self.path} has schema version {version}, newer than this "
                        f"pacscli knows ({SCHEMA_VERSION}): upgrade pacscli"
                    )
                for target in range(version + 1, SCHEMA_VERSION + 1):
                    for statement in MIGRATIONS[target].split(";\n"):
                        if statement.strip():
                            conn.execute(statement)
                    conn.execute(f"PRAGMA user_version = {target}")
                if version < SCHEMA_VERSION and \
                        conn.execute("PRAGMA foreign_key_check").fetchone() is not None:
                    raise ArchiveError(f"migrating the index {self.path} broke a reference "
                                       "between its tables: nothing was changed")
        except sqlite3.Error as exc:
            raise ArchiveError(f"cannot prepare the index {self.path}: {exc}") from exc
        finally:
            conn.execute("PRAGMA foreign_keys=ON")

    def check_writable(self) -> None:
        """Raise ArchiveError when the index cannot be written (a read-only file, its folder
        or its WAL): better said once at start than as a failure of every instance."""
        conn = self.connection()
        try:
            with self._write_lock:
                conn.execute("BEGIN IMMEDIATE")
                try:  # a write of what is there already, undone: SQLite refuses it on a
                    # read-only database, where BEGIN IMMEDIATE alone succeeds
                    version = int(conn.execute("PRAGMA user_version").fetchone()[0])
                    conn.execute(f"PRAGMA user_version = {version}")
                finally:
                    conn.execute("ROLLBACK")
        except sqlite3.Error as exc:
            raise ArchiveError(f"cannot write the index {self.path}: {exc}") from exc

    def lookup(self, sop_uid: str) -> InstanceRow | None:
        """The indexed instance with this SOP Instance UID, if any."""
        row = self.connection().execute(
            "SELECT SOPInstanceUID, path, size, sha256 FROM instances "
            "WHERE SOPInstanceUID = ?",
            (sop_uid,),
        ).fetchone()
        return InstanceRow(*row) if row else None

    def upsert(self, info: InstanceInfo, stored: StoredFile, *, replacing: bool = False,
               before_commit: Callable[[], None] | None = None) -> None:
        """Insert or update an instance and its series, study and patient rows; `replacing`
        first drops the instance's old row and the parents it leaves empty (its study or
        series UIDs changed), in the same transaction. `before_commit` runs once the rows
        are written and before they commit: if it raises, nothing is committed."""
        with self.transaction() as conn:
            if replacing:
                self._remove_in(conn, [info.sop_uid])
            self._upsert_in(conn, info, stored)
            if before_commit is not None:
                before_commit()

    def _upsert_in(self, conn: sqlite3.Connection, info: InstanceInfo, stored: StoredFile) -> None:
        """The rows of `upsert`, inside the caller's transaction."""
        attrs = info.attributes
        parents = self._known_parents(conn)
        patient_attrs = {kw: attrs.get(kw) or "" if kw in _KEY_COLUMNS else attrs.get(kw)
                         for kw in INDEXED_ATTRIBUTES["patient"]}
        # A patient without an ID is the patient of this study alone (see migration 4).
        patient_key = "" if patient_attrs["PatientID"] else attrs.get("StudyInstanceUID") or ""
        patient_pk = self._upsert_row(
            conn, "patient", ("PatientID", "IssuerOfPatientID", "patient_key"),
            patient_attrs, {"patient_key": patient_key}, parents,
        )
        study_pk = self._upsert_row(
            conn, "study", ("StudyInstanceUID",),
            {kw: attrs.get(kw) for kw in INDEXED_ATTRIBUTES["study"]},
            {"patient_pk": patient_pk}, parents,
        )
        series_pk = self._upsert_row(
            conn, "series", ("SeriesInstanceUID",),
            {kw: attrs.get(kw) for kw in INDEXED_ATTRIBUTES["series"]},
            {"study_pk": study_pk}, parents,
        )
        self._upsert_row(
            conn, "instance", ("SOPInstanceUID",),
            {kw: attrs.get(kw) for kw in INDEXED_ATTRIBUTES["instance"]},
            {
                "series_pk": series_pk,
                "SpecificCharacterSet": info.specific_character_set,
                "path": stored.path,
                "size": stored.size,
                "sha256": stored.sha256,
                "transfer_syntax": info.transfer_syntax,
                "received_at": stored.received_at,
                "source_aet": stored.source_aet,
            },
        )

    def _known_parents(self, conn: sqlite3.Connection) -> _KnownRows:
        """This thread's record of the patient, study and series rows it last wrote or
        found, emptied when another connection has committed since (SQLite's data_version
        says so)."""
        version = conn.execute("PRAGMA data_version").fetchone()[0]
        known: _KnownRows | None = getattr(self._local, "parents", None)
        if known is None or self._local.parents_version != version or len(known) > 10_000:
            known = self._local.parents = {}
            self._local.parents_version = version
        return known

    def _forget_parents(self) -> None:
        self._local.parents = None

    @staticmethod
    def _upsert_row(
        conn: sqlite3.Connection,
        level: str,
        keys: tuple[str, ...],
        attributes: dict[str, str | None],
        extra: dict[str, object],
        known: _KnownRows | None = None,
    ) -> int:
        """Insert a row or update the existing one (the newest instance's values win).

        A row whose values are already these is left alone: most instances repeat their
        series', study's and patient's values, and rewriting those rows made every commit
        write their pages again. A row in `known` with these values is not even read (its
        SELECT cost ~0.02 ms of every instance received).
        """
        table = _LEVEL_TABLES[level]
        values = {**attributes, **extra}
        current = tuple(values.values())
        key = (table, tuple(values[k] for k in keys))
        if known is not None and (row_known := known.get(key)) is not None \
                and row_known[1] == current:
            return row_known[0]
        pk = Index._write_row(conn, table, keys, values)
        if known is not None:
            known[key] = (pk, current)
        return pk

    @staticmethod
    def _write_row(conn: sqlite3.Connection, table: str, keys: tuple[str, ...],
                   values: dict[str, object]) -> int:
        """Insert the row, or update it when its values differ; return its pk."""
        names = list(values)
        columns = [n for n in names if n not in keys]
        where = " AND ".join(f"{k} = ?" for k in keys)
        key_values = [values[k] for k in keys]
        row = conn.execute(f"SELECT pk, {', '.join(columns)} FROM {table} WHERE {where}",
                           key_values).fetchone()
        if row is None:
            cursor = conn.execute(
                f"INSERT INTO {table} ({', '.join(names)}) VALUES ({', '.join('?' * len(names))})",
                [values[n] for n in names])
            return int(cursor.lastrowid or 0)
        if any(row[n] != values[n] for n in columns):
            conn.execute(f"UPDATE {table} SET {', '.join(f'{n} = ?' for n in columns)} WHERE pk = ?",
                         [*(values[n] for n in columns), row["pk"]])
        return int(row["pk"])

    # Whole-index operations: `pacs index --rebuild` and `pacs verify`.

    def iter_files(self, batch: int = 1000) -> Iterator[IndexedFile]:
        """Every indexed file, in pk order, read in batches (no long-held read snapshot)."""
        conn = self.connection()
        last = 0
        while True:
            rows = conn.execute(f"{_FILE_QUERY} WHERE i.pk > ? ORDER BY i.pk LIMIT ?",
                                (last, batch)).fetchall()
            if not rows:
                return
            for row in rows:
                yield IndexedFile(*row)
            last = int(rows[-1][0])

    def files_between(self, low: int, high: int) -> list[IndexedFile]:
        """The indexed files whose pk is in [low, high): a unit of `pacs verify`'s work."""
        rows = self.connection().execute(f"{_FILE_QUERY} WHERE i.pk >= ? AND i.pk < ?",
                                         (low, high)).fetchall()
        return [IndexedFile(*row) for row in rows]

    def file_of(self, sop_uid: str) -> IndexedFile | None:
        """The indexed file of an instance, as the index says now."""
        row = self.connection().execute(f"{_FILE_QUERY} WHERE i.SOPInstanceUID = ?",
                                        (sop_uid,)).fetchone()
        return IndexedFile(*row) if row else None

    def file_at(self, path: str) -> IndexedFile | None:
        """The indexed file recorded at `path` (archive-relative, or absolute), if any."""
        row = self.connection().execute(f"{_FILE_QUERY} WHERE i.path = ?", (path,)).fetchone()
        return IndexedFile(*row) if row else None

    def paths(self) -> set[str]:
        """The recorded path of every indexed file."""
        return {row[0] for row in self.connection().execute("SELECT path FROM instances")}

    def reindex(self, info: InstanceInfo, stored: StoredFile) -> list[str]:
        """`upsert`, first dropping in the same transaction a row of another instance recorded
        at the same path (a file indexed where it lies, since rewritten); return the SOP
        Instance UIDs of the rows dropped."""
        with self.transaction() as conn:
            stale = [row[0] for row in conn.execute(
                "SELECT SOPInstanceUID FROM instances WHERE path = ? AND SOPInstanceUID != ?",
                (stored.path, info.sop_uid))]
            self._remove_in(conn, stale)
            self._upsert_in(conn, info, stored)
        return stale

    def remove(self, sop_uids: list[str]) -> int:
        """Drop the rows of these instances, and the series, studies and patients they leave
        empty (files are not touched); return how many instance rows went."""
        with self.transaction() as conn:
            return self._remove_in(conn, sop_uids)

    def _remove_in(self, conn: sqlite3.Connection, sop_uids: list[str]) -> int:
        self._forget_parents()  # parents left empty go
        removed = 0
        for sop_uid in sop_uids:
            row = conn.execute(
                "DELETE FROM instances WHERE SOPInstanceUID = ? RETURNING series_pk", (sop_uid,)
            ).fetchone()
            if row is None:
                continue
            removed += 1
            parent = conn.execute(
                "DELETE FROM series WHERE pk = ? AND NOT EXISTS (SELECT 1 FROM instances "
                "WHERE series_pk = ?) RETURNING study_pk", (row[0], row[0])).fetchone()
            if parent is not None:
                parent = conn.execute(
                    "DELETE FROM studies WHERE pk = ? AND NOT EXISTS (SELECT 1 FROM series "
                    "WHERE study_pk = ?) RETURNING patient_pk", (parent[0], parent[0])).fetchone()
            if parent is not None:
                conn.execute("DELETE FROM patients WHERE pk = ? AND NOT EXISTS (SELECT 1 FROM "
                             "studies WHERE patient_pk = ?)", (parent[0], parent[0]))
        return removed

    def reset(self) -> None:
        """Drop every table and create the schema afresh (`pacs index --rebuild`)."""
        self._forget_parents()
        try:
            with self.transaction() as conn:
                for table in ("instances", "series", "studies", "patients"):
                    conn.execute(f"DROP TABLE IF EXISTS {table}")
                conn.execute("PRAGMA user_version = 0")
        except sqlite3.Error as exc:
            raise ArchiveError(f"cannot reset the index {self.path}: {exc}") from exc
        self.migrate()

    def dump(self) -> dict[str, list[tuple[Any, ...]]]:
        """Every row of every table without its pk, parents named by their natural keys,
        sorted: two indexes of the same files dump equal, whatever order built them."""
        conn = self.connection()
        dumped: dict[str, list[tuple[Any, ...]]] = {}
        for table in ("patients", "studies", "series", "instances"):
            columns = [row[1] for row in conn.execute(f"PRAGMA table_info({table})")
                       if row[1] != "pk"]
            select = [f"t.{c}" for c in columns]
            join = ""
            if table in _PARENTS:
                fk, parent, keys = _PARENTS[table]
                select = [f"t.{c}" for c in columns if c != fk] + [f"p.{k}" for k in keys]
                join = f" JOIN {parent} p ON p.pk = t.{fk}"
            rows = conn.execute(f"SELECT {', '.join(select)} FROM {table} t{join}").fetchall()
            dumped[table] = sorted((tuple(row) for row in rows), key=repr)
        return dumped
