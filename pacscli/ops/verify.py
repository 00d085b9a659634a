"""`pacs verify`: prove the archive whole, or name what is wrong; `repair` mends it.

For every indexed file: it exists, has the recorded size (`quick` stops there) and sha256,
parses (the structural walk of `dicom.scan`: preamble, file meta, every element's length)
and carries the Study, Series and SOP Instance UIDs the index says. Then: files in the
archive the index does not know, and files left in staging by processes no longer running.

One record per problem (`problem` is one of PROBLEMS; `status` failed, or warning once
repaired), naming the file's path and, where known, its UIDs; then a summary record.
`exit_code`: 1 when anything was wrong (repaired or not), else 0.

Safe while `serve` receives: staging folders of live processes are in flight; a file the
index does not know yet, changed in the last IN_FLIGHT_SECONDS while a writer runs, is
counted as in flight (the next run looks again); a mismatch is confirmed against the index
as it is now before it is reported. Without `repair` nothing is written.

`repair`: rows of missing files are dropped; corrupt archive files move to
`.quarantine/<run>/<their path>` and their rows are dropped (a file indexed in place outside
the archive is left where it is); a good file whose row disagrees is indexed again; files the
index does not know are indexed where they lie (`Archive.index_in_place`), or quarantined when
they cannot be (not an instance, or a duplicate or conflicting copy of an indexed one);
leftover temporary files are quarantined. Nothing is ever deleted; later runs leave the
quarantine alone.
"""

from __future__ import annotations

import functools
import hashlib
import logging
import os
import stat
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pacscli.archive import layout
from pacscli.archive.index import Index, IndexedFile
from pacscli.archive.staging import OWNER_LOCK, staging_alive
from pacscli.config import StorageSettings
from pacscli.dicom.scan import (
    SERIES_INSTANCE_UID,
    SOP_INSTANCE_UID,
    STUDY_INSTANCE_UID,
    Part10File,
    scan_part10,
)
from pacscli.errors import ExitCode, InvalidDicomError, PacsError, UsageError
from pacscli.ops.workers import parallel_map
from pacscli.records import Record

if TYPE_CHECKING:
    from pacscli.archive.archive import Archive

log = logging.getLogger(__name__)

Progress = Callable[[int, int], None]

PROBLEMS = ("missing", "unreadable", "size-mismatch", "checksum-mismatch", "empty", "not-dicom",
            "no-preamble", "truncated", "invalid-dicom", "uid-mismatch", "unindexed",
            "leftover-temp", "unlistable")
# Problems of a file whose bytes are not those indexed, or do not parse: quarantined.
_CORRUPT = frozenset(PROBLEMS) - {"missing", "unreadable", "uid-mismatch", "unindexed",
                                  "leftover-temp", "unlistable"}
IN_FLIGHT_SECONDS = 90.0  # longer than a writer can wait for the index (60 s busy timeout)
_RANGE = 256  # rows per unit of work
_UIDS = ((STUDY_INSTANCE_UID, "StudyInstanceUID", "study_uid"),
         (SERIES_INSTANCE_UID, "SeriesInstanceUID", "series_uid"),
         (SOP_INSTANCE_UID, "SOPInstanceUID", "sop_uid"))
_UID_TAGS = frozenset(tag for tag, _, _ in _UIDS)


@dataclass
class VerifySummary:
    """What a run found, for its closing record."""

    root: Path
    quick: bool
    indexed: int = 0
    files: int = 0
    in_flight: int = 0
    problems: Counter[str] = field(default_factory=Counter)
    repaired: Counter[str] = field(default_factory=Counter)
    started: float = field(default_factory=time.monotonic)

    @property
    def total(self) -> int:
        return sum(self.problems.values())

    def record(self) -> Record:
        """The closing record."""
        return {
            "summary": True,
            "status": "failed" if self.total else "ok",
            "archive": str(self.root),
            "mode": "quick" if self.quick else "full",
            "indexed": self.indexed,
            "files": self.files,
            "problems": self.total,
            "by_problem": dict(sorted(self.problems.items())),
            "repaired": dict(sorted(self.repaired.items())),
            "in_flight": self.in_flight,
            "seconds": round(time.monotonic() - self.started, 3),
        }


def problem(code: str, message: str, path: Path | str, row: IndexedFile | None = None,
            **fields: Any) -> Record:
    """The record of one problem."""
    record: Record = {"problem": code, "path": str(path)}
    if row is not None:
        record.update(PatientID=row.patient_id, StudyInstanceUID=row.study_uid,
                      SeriesInstanceUID=row.series_uid, SOPInstanceUID=row.sop_uid)
    record.update(fields)
    record.update(status="failed", error={"code": code, "message": message})
    return record


def check_file(root: str, row: IndexedFile, quick: bool) -> Record | None:
    """The problem with one indexed file, or None when it is as the index says."""
    path = os.path.join(root, row.path)  # an absolute row.path (in place) stays itself
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return problem("missing", "the indexed file is missing", path, row)
    except OSError as exc:
        return problem("unreadable", f"cannot stat: {exc.strerror or exc}", path, row)
    if not stat.S_ISREG(st.st_mode):
        return problem("missing", "the indexed path is not a regular file", path, row)
    if st.st_size != row.size:
        return problem("size-mismatch", f"{st.st_size} bytes, the index says {row.size}",
                       path, row)
    if quick:
        return None
    try:
        with Part10File(path, check_head=False) as f:
            digest = hashlib.sha256(f.data).hexdigest()
            if digest != row.sha256:
                return problem("checksum-mismatch", "the sha256 differs from the indexed one",
                               path, row, sha256=digest)
            scan = scan_part10(f.data, _UID_TAGS)
    except InvalidDicomError as exc:
        return problem(exc.code, exc.message, path, row)
    except OSError as exc:
        return problem("unreadable", f"cannot read: {exc.strerror or exc}", path, row)
    for tag, keyword, attr in _UIDS:
        found, expected = scan.text(tag), getattr(row, attr)
        if found != expected:
            return problem("uid-mismatch", f"{keyword} is {found!r}, the index says {expected!r}",
                           path, row)
    return None


class _Checker:
    """A worker's state: its own connection to the index, to check ranges of rows."""

    def __init__(self, root: Path, quick: bool) -> None:
        self.root = root
        self.quick = quick
        self.index = Index(root / layout.INDEX_FILE)

    def close(self) -> None:
        self.index.close()

    def check_range(self, pks: tuple[int, int]) -> tuple[int, list[tuple[Record, IndexedFile]]]:
        """Check the rows with pk in [lo, hi): how many there were, and the problems."""
        rows = self.index.files_between(*pks)
        found = []
        for row in rows:
            bad = check_file(str(self.root), row, self.quick)
            if bad is not None:
                found.append((bad, row))
        return len(rows), found


def _staging(root: Path) -> tuple[list[Path], bool]:
    """Files left in staging by processes no longer running; and whether another live
    process has a staging folder (a writer is at work)."""
    staging = root / layout.STAGING_DIR
    leftovers: list[Path] = []
    writer = False
    if not staging.is_dir():
        return leftovers, writer
    for entry in sorted(staging.iterdir()):
        if entry.is_symlink():  # never followed: a repair would move what it points at
            leftovers.append(entry)
            continue
        if entry.is_dir() and staging_alive(entry):
            # Another process's: verify holds no staging folder yet, and a PID would not
            # tell (a writer in another PID namespace may have ours).
            writer = True
            continue
        if entry.is_dir():
            leftovers.extend(sorted(p for p in entry.rglob("*")
                                    if not p.is_dir() and not p.name.startswith(OWNER_LOCK)))
        else:
            leftovers.append(entry)
    return leftovers, writer


def archive_files(root: Path, unlistable: list[tuple[Path, OSError]]) -> list[str]:
    """Archive-relative paths of the files among the instances: everything outside the
    dot-folders, but the index. Folders that cannot be listed are added to `unlistable`
    (with why): their files are not there to check, or to index."""
    found: list[str] = []
    stack = [""]
    while stack:
        rel = stack.pop()
        try:
            entries = list(os.scandir(root / rel if rel else root))
        except OSError as exc:
            unlistable.append((root / rel, exc))
            continue
        for entry in entries:
            if entry.name.startswith("."):
                continue
            child = f"{rel}/{entry.name}" if rel else entry.name
            if entry.is_dir(follow_symlinks=False):
                stack.append(child)
            elif rel or not entry.name.startswith(layout.INDEX_FILE):
                found.append(child)
    return sorted(found)


class Quarantine:
    """Moves files into `.quarantine/<run>/`, keeping their archive-relative paths."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.run = root / layout.QUARANTINE_DIR / (
            time.strftime("%Y%m%dT%H%M%SZ", time.gmtime()) + f"-{os.getpid()}")

    def move(self, path: Path) -> Path:
        """Move `path` (inside the archive) into this run's folder; return where it went."""
        target = self.run / path.relative_to(self.root)
        target.parent.mkdir(parents=True, exist_ok=True)
        os.rename(path, target)
        return target


def verify_archive(root: Path, storage: StorageSettings | None = None, *, quick: bool = False,
                   repair: bool = False, jobs: int = 1,
                   progress: Progress | None = None) -> Iterator[Record]:
    """Check the archive at `root`: one record per problem, then the summary record.

    The last record is the summary's (`summary: true`); its `problems` count decides the
    exit code (`exit_code`).
    """
    root = root.expanduser().absolute()
    if not (root / layout.INDEX_FILE).is_file():
        raise UsageError(f"no archive at {root}: it has no {layout.INDEX_FILE}")
    summary = VerifySummary(root, quick)
    # Staging first: opening an Archive (a repair may) clears staging folders of dead
    # processes, so leftovers are found, and repaired, before anything else.
    leftovers, writer = _staging(root)
    unlistable: list[tuple[Path, OSError]] = []
    on_disk = archive_files(root, unlistable)
    summary.files = len(on_disk)
    index = Index(root / layout.INDEX_FILE)
    fixer = _Repairer(root, storage or StorageSettings(), index) if repair else None

    def found(record: Record) -> Record:
        summary.problems[record["problem"]] += 1
        if fixer is not None:
            fixer.repair(record)
            if record.get("repair"):
                summary.repaired[record["repair"]] += 1
        return record

    try:
        for folder, exc in unlistable:
            yield found(problem("unlistable", f"a folder of the archive that cannot be listed "
                                f"({exc.strerror or exc}): its files were not checked", folder))
        for path in leftovers:
            yield found(problem("leftover-temp", "a temporary file left by a process that no "
                                "longer runs", path))
        ranges = _pk_ranges(index)
        checker = functools.partial(_Checker, root, quick)
        results = parallel_map(checker, "check_range", ranges, jobs, ordered=False)
        for done, (checked, bad) in enumerate(results, start=1):
            summary.indexed += checked
            for record, row in bad:
                confirmed = _confirm(root, index, record, row, quick)
                if confirmed is not None:
                    yield found(confirmed)
            if progress is not None:
                progress(done, len(ranges))
        for record in _unindexed(root, index, on_disk, writer, summary):
            yield found(record)
    finally:
        if fixer is not None:
            fixer.close()
        index.close()
    yield summary.record()


def summary_line(summary: Record) -> str:
    """The summary record in words, for people."""
    count = summary.get("problems", 0)
    found = ", ".join(f"{n} {k}" for k, n in summary.get("by_problem", {}).items())
    text = (f"{count} problem{'' if count == 1 else 's'}{f' ({found})' if found else ''} in "
            f"{summary.get('archive')}: {summary.get('indexed')} indexed files checked "
            f"({summary.get('mode')}), {summary.get('files')} files in the archive")
    if summary.get("repaired"):
        text += "; repaired: " + ", ".join(f"{n} {k}" for k, n in summary["repaired"].items())
    if summary.get("in_flight"):
        text += f"; {summary['in_flight']} in flight, not checked"
    return text


def exit_code(summary: Record) -> int:
    """The exit code a run's summary record calls for: 1 when anything was wrong."""
    return ExitCode.PARTIAL if summary.get("problems") else ExitCode.OK


def _pk_ranges(index: Index) -> list[tuple[int, int]]:
    low, high = index.connection().execute(
        "SELECT min(pk), max(pk) FROM instances").fetchone()
    if low is None:
        return []
    return [(lo, lo + _RANGE) for lo in range(int(low), int(high) + 1, _RANGE)]


def _confirm(root: Path, index: Index, record: Record, row: IndexedFile,
             quick: bool) -> Record | None:
    """The problem as the index says now: a row changed meanwhile (a replace while `serve`
    receives, a repair) is checked again; a row gone is no problem."""
    now = index.file_of(row.sop_uid)
    if now is None:
        return None
    if now == row:
        return record
    return check_file(str(root), now, quick)


def _unindexed(root: Path, index: Index, on_disk: list[str], writer: bool,
               summary: VerifySummary) -> Iterator[Record]:
    """Problems for the archive's files the index does not know (files in flight apart)."""
    indexed = index.paths()
    candidates = [rel for rel in on_disk if rel not in indexed]
    now = time.time()
    for rel in candidates:
        path = root / rel
        try:
            st = path.lstat()  # a link is not followed: to a loop, nowhere, or out of the archive
        except FileNotFoundError:
            continue  # gone meanwhile (a put that failed and cleaned up)
        except OSError as exc:
            yield problem("unreadable", f"cannot look at the file: {exc.strerror or exc}", path)
            continue
        if index.file_at(rel) is not None:
            continue  # indexed meanwhile
        if writer and now - st.st_ctime < IN_FLIGHT_SECONDS:
            summary.in_flight += 1
            log.info("%s is not indexed yet but may be in flight: not reported", path)
            continue
        if not stat.S_ISREG(st.st_mode):  # never opened: a FIFO would block for ever
            yield problem("unindexed", f"{_kind(st.st_mode)} in the archive, not a file", path)
            continue
        record = problem("unindexed", "a file in the archive the index does not know", path)
        try:
            with Part10File(path) as f:
                sop = scan_part10(f.data, [SOP_INSTANCE_UID]).text(SOP_INSTANCE_UID)
            if sop:
                record["SOPInstanceUID"] = sop
        except (InvalidDicomError, OSError):
            pass
        yield record


def _kind(mode: int) -> str:
    """'a symbolic link', 'a FIFO'...: what a path that is not a regular file is."""
    kinds = ((stat.S_ISLNK, "a symbolic link"), (stat.S_ISFIFO, "a FIFO"),
             (stat.S_ISSOCK, "a socket"), (stat.S_ISCHR, "a character device"),
             (stat.S_ISBLK, "a block device"))
    return next((name for test, name in kinds if test(mode)), "something")


def _check_whole(path: Path, *, follow: bool = False) -> None:
    """Raise InvalidDicomError unless `path` is a regular file holding a whole Part 10
    instance, as `pacs index` checks it: `Archive.index_in_place` reads only the header.
    A link is followed only when `follow` (a share's file, as `index --in-place` reads it;
    never one among the archive's own files)."""
    st = path.stat() if follow else path.lstat()
    if not stat.S_ISREG(st.st_mode):
        raise InvalidDicomError(f"{_kind(st.st_mode)}, not a file", code="not-a-file")
    with Part10File(path) as f:
        scan_part10(f.data)


def _whole(path: Path, *, follow: bool = False) -> bool:
    try:
        _check_whole(path, follow=follow)
    except (InvalidDicomError, OSError):
        return False
    return True


class _Repairer:
    """The repairs of `verify --repair`: moves, row drops and in-place indexing."""

    def __init__(self, root: Path, storage: StorageSettings, index: Index) -> None:
        self.root = root
        self.storage = storage
        self.index = index
        self.quarantine = Quarantine(root)
        self._archive: Archive | None = None

    @property
    def archive(self) -> Archive:
        """The archive, opened on first need (after leftovers are quarantined)."""
        if self._archive is None:
            from pacscli.archive.archive import Archive

            self._archive = Archive(self.root, self.storage)
        return self._archive

    def close(self) -> None:
        if self._archive is not None:
            self._archive.close()

    def repair(self, record: Record) -> None:
        """Mend one problem; note what was done in the record (`repair`, and `status`
        warning), or why not (`repair_error`)."""
        code = record["problem"]
        path = Path(record["path"])
        sops = [record["SOPInstanceUID"]] if record.get("SOPInstanceUID") else []
        internal = path.is_relative_to(self.root)
        try:
            if code in ("size-mismatch", "checksum-mismatch") and not internal and \
                    _whole(path, follow=True) and \
                    self.archive.index_in_place(path).outcome in ("indexed", "updated", "replaced"):
                # A file on a share rewritten since, still a whole instance: its row is
                # brought up to date, not dropped (a valid instance left the index). One now
                # holding a copy of another indexed instance has its row dropped below.
                record.update(repair="reindexed", status="warning")
                return
            drops = code == "missing" or (code in _CORRUPT | {"unreadable"} and not internal)
            if (drops or code in _CORRUPT) and sops:
                # Under the instance's lock, and only if the problem is still there: a put
                # of the instance since the check (serve receiving it again) keeps its row.
                with self.archive.instance_lock(sops[0]):
                    if not self._still(code, sops[0]):
                        done = "fixed-meanwhile"
                    elif drops:
                        self.index.remove(sops)
                        done = "dropped-row"
                    else:
                        record["quarantine_path"] = str(self.quarantine.move(path))
                        self.index.remove(sops)
                        done = "quarantined"
            elif drops:
                done = "nothing-to-drop"  # no SOP Instance UID: no row to drop
            elif code in _CORRUPT:
                record["quarantine_path"] = str(self.quarantine.move(path))
                done = "quarantined"
            elif code == "uid-mismatch":
                _check_whole(path, follow=not internal)
                self.archive.index_in_place(path)
                done = "reindexed"
            elif code == "unindexed":
                done = self._index_or_quarantine(path, record)
            elif code == "leftover-temp":
                record["quarantine_path"] = str(self.quarantine.move(path))
                _remove_empty(path.parent, self.root / layout.STAGING_DIR)
                done = "quarantined"
            else:
                return  # unreadable: an I/O error to look into, not ours to move
        except (PacsError, OSError) as exc:
            message = exc.message if isinstance(exc, PacsError) else str(exc)
            record["repair_error"] = message
            log.error("cannot repair %s: %s", path, message)
            return
        record.update(repair=done, status="warning")

    def _still(self, code: str, sop_uid: str) -> bool:
        """Whether the instance's file still has the problem `code` (its row may have
        changed, or gone, since it was checked)."""
        row = self.index.file_of(sop_uid)
        if row is None:
            return False
        now = check_file(str(self.root), row, quick=code == "missing")
        return now is not None and now["problem"] == code

    def _index_or_quarantine(self, path: Path, record: Record) -> str:
        try:
            _check_whole(path)
            result = self.archive.index_in_place(path)
        except InvalidDicomError as exc:
            record["repair_reason"] = exc.message
        else:
            if result.outcome in ("indexed", "updated", "replaced"):
                record["SOPInstanceUID"] = result.info.sop_uid
                return "indexed"
            record["repair_reason"] = (
                "a copy of an instance indexed at another path" if result.outcome == "duplicate"
                else "another version of an instance indexed at another path (kept)")
        record["quarantine_path"] = str(self.quarantine.move(path))
        return "quarantined"


def _remove_empty(folder: Path, stop: Path) -> None:
    """Remove `folder` and its parents up to `stop` while they are empty (no file goes)."""
    while folder != stop and folder.is_relative_to(stop):
        try:
            folder.rmdir()
        except OSError:
            return
        folder = folder.parent
