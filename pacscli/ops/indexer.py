"""`pacs index`: bring existing files into the archive, or rebuild its index from its files.

Each file under the given paths is checked whole (`dicom.scan`: preamble, every element's
length, so a file cut short inside its pixel data is caught too), its identity read
(`read_instance_info`), and then it enters the archive through `Archive.put`, byte for byte;
or, `in_place`, only the index records it where it lies (`Archive.index_in_place`). A folder
holding a DICOMDIR is read through it, then walked for anything it does not reference.

One record per file (DESIGN.md section 2):

- ok: `outcome` stored, duplicate (already archived from another file), replaced, indexed
  (in place), or unchanged (indexed before and not changed since: not copied again);
- warning: kept (another instance with this SOP Instance UID is archived; storage.on_conflict);
- skipped: not an instance we can index; `reason` says why and `reason_code` is one of
  SKIP_CODES (empty, not-dicom, no-preamble, dicomdir, truncated, invalid-dicom,
  unsafe-uid, not-a-file);
- failed: what should have been done was not: not-found (a path given), missing-file (named
  by a DICOMDIR), unreadable (I/O error), archive or out-of-resources (writing), internal.

The exit code (`IndexTally.exit_code`): 1 when any file failed; with `strict`, also when any
was skipped, DICOMDIRs apart (they are never instances); else 0.
"""

from __future__ import annotations

import functools
import hashlib
import logging
import os
import sqlite3
import stat
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from contextlib import closing
from dataclasses import dataclass, field
from itertools import chain
from pathlib import Path

from pacscli.archive import layout
from pacscli.archive.archive import Archive, FileHashes, hash_bytes
from pacscli.archive.index import IndexedFile, unusable
from pacscli.config import StorageSettings
from pacscli.dicom.dicomdir import is_dicomdir_name, referenced_files
from pacscli.dicom.identity import InstanceInfo, read_instance_info
from pacscli.dicom.scan import SOP_INSTANCE_UID, Part10File, ScanResult
from pacscli.errors import ArchiveError, ExitCode, InvalidDicomError, PacsError, UsageError
from pacscli.inputs import not_a_file, walk
from pacscli.ops.verify import Quarantine, archive_files
from pacscli.ops.workers import parallel_map
from pacscli.records import Record, failed, skipped

log = logging.getLogger(__name__)

Progress = Callable[[int, int], None]

SKIP_CODES = frozenset({"empty", "not-dicom", "no-preamble", "dicomdir", "truncated",
                        "invalid-dicom", "unsafe-uid", "not-a-file"})
# Skips that `strict` does not count as failures: a DICOMDIR is never an instance.
LENIENT_SKIPS = frozenset({"dicomdir"})


@dataclass
class IndexTally:
    """Counts of what a run did, its exit code and a line for people."""

    statuses: Counter[str] = field(default_factory=Counter)
    outcomes: Counter[str] = field(default_factory=Counter)
    skips: Counter[str] = field(default_factory=Counter)

    def add(self, record: Record) -> None:
        """Count one record."""
        status = str(record.get("status"))
        self.statuses[status] += 1
        if status == "skipped":
            self.skips[str(record.get("reason_code"))] += 1
        elif record.get("outcome"):
            self.outcomes[str(record["outcome"])] += 1

    def exit_code(self, strict: bool = False) -> int:
        """1 when a file failed, or (strict) was skipped other than as a DICOMDIR; else 0."""
        if self.statuses["failed"]:
            return ExitCode.PARTIAL
        if strict and set(self.skips) - LENIENT_SKIPS:
            return ExitCode.PARTIAL
        return ExitCode.OK

    def summary(self) -> str:
        """E.g. `10 instances (8 stored, 2 unchanged), 3 skipped (2 not-dicom, 1 truncated),
        0 failed`."""
        def detail(counts: Counter[str]) -> str:
            return f" ({', '.join(f'{n} {k}' for k, n in sorted(counts.items()))})" if counts else ""
        instances = self.statuses["ok"] + self.statuses["warning"]
        return (f"{instances} instances{detail(self.outcomes)}, "
                f"{self.statuses['skipped']} skipped{detail(self.skips)}, "
                f"{self.statuses['failed']} failed")


def _internal(root: str, path: str) -> bool:
    """True for the archive's own machinery (dot-folders, the index), never indexed."""
    if not (path == root or path.startswith(root + os.sep)):
        return False
    rel = os.path.relpath(path, root)
    return rel != "." and (layout.is_hidden(rel) or rel.startswith(layout.INDEX_FILE))


class _Collector:
    """The files under the given paths, each once, in a repeatable order; and the records
    of what will not reach a worker (missing paths, DICOMDIRs and their dangling references,
    special files)."""

    def __init__(self, archive_root: Path) -> None:
        self.root = str(archive_root)
        self.files: list[str] = []
        self.records: list[Record] = []
        self._seen: set[str] = set()

    def add_path(self, raw: str) -> None:
        path = os.path.abspath(raw)
        try:
            mode = os.stat(path).st_mode
        except FileNotFoundError:
            self.records.append(failed(
                PacsError(f"{raw}: no such file or folder", code="not-found"), path=raw))
            return
        except OSError as exc:
            self.records.append(failed(PacsError(
                f"{raw}: {exc.strerror or exc}", code="unreadable"), path=raw))
            return
        except ValueError:  # a NUL in the path, which no file's name can hold
            self.records.append(failed(PacsError(
                f"{raw!r}: not a usable path (it holds a NUL character)", code="bad-path"), path=raw))
            return
        if stat.S_ISDIR(mode):
            self._walk(path)
        elif not stat.S_ISREG(mode):
            self.records.append(not_a_file(path))
        elif is_dicomdir_name(os.path.basename(path)):
            self._dicomdir(path)
        else:
            self.add_file(path)

    def add_file(self, path: str) -> None:
        if path not in self._seen and not _internal(self.root, path):
            self._seen.add(path)
            self.files.append(path)

    def _walk(self, top: str) -> None:
        if _internal(self.root, top):
            return
        for files in walk(top, exclude=lambda path: _internal(self.root, path)):
            if not isinstance(files, list):
                self.records.append(files)
                continue
            for path in files:  # a DICOMDIR first: its references come in its order
                if is_dicomdir_name(os.path.basename(path)):
                    self._dicomdir(path)
            for path in files:
                if not is_dicomdir_name(os.path.basename(path)):
                    self.add_file(path)

    def _dicomdir(self, path: str) -> None:
        if path in self._seen or _internal(self.root, path):
            return
        try:
            found, missing = referenced_files(Path(path))
        except InvalidDicomError:
            self.add_file(path)  # a worker says what it is
            return
        self._seen.add(path)
        self.records.append(skipped(
            path, "dicomdir",
            f"a DICOMDIR (media directory): read for the {len(found)} files it references",
            referenced=len(found)))
        folder = os.path.dirname(path)
        for file_id, why in missing:
            self.records.append(failed(PacsError(f"{file_id}: {why}", code="missing-file"),
                                       path=os.path.join(folder, file_id), dicomdir=path))
        for file in found:
            self.add_file(file)


@dataclass(frozen=True)
class _Prepared:
    """A file read and hashed by a worker, for the main process to index in place."""

    path: str
    info: InstanceInfo
    hashes: FileHashes


def _instance_scan(f: Part10File) -> ScanResult:
    """The scan of a whole, readable Part 10 file that is not a DICOMDIR."""
    scan = f.scan((SOP_INSTANCE_UID,))
    if scan.is_dicomdir:
        raise InvalidDicomError("a DICOMDIR (media directory), not an instance", code="dicomdir")
    return scan


def _guarded(path: str, work: Callable[[str], Record | _Prepared]) -> Record | _Prepared:
    """`work(path)`, with whatever goes wrong as the file's record: never a crash."""
    try:
        return work(path)
    except InvalidDicomError as exc:
        return skipped(path, exc.code if exc.code in SKIP_CODES else "invalid-dicom", exc.message)
    except PacsError as exc:
        return failed(exc, path=path)
    except OSError as exc:
        return failed(PacsError(f"cannot read {path}: {exc.strerror or exc}", code="unreadable"),
                      path=path)
    except sqlite3.DatabaseError as exc:
        return failed(unusable(exc), path=path)
    except Exception as exc:  # a bug of ours or a library's: report it, go on
        log.exception("unexpected error indexing %s", path)
        return failed(PacsError(f"unexpected error: {exc!r}", code="internal"), path=path)


def _unchanged(known: IndexedFile, archive: Archive, source: str) -> Record:
    return {
        "PatientID": known.patient_id,
        "StudyInstanceUID": known.study_uid,
        "SeriesInstanceUID": known.series_uid,
        "SOPInstanceUID": known.sop_uid,
        "path": str(archive.abspath(known.path)),
        "size": known.size,
        "sha256": known.sha256,
        "outcome": "unchanged",
        "status": "ok",
        "source": source,
    }


class _Worker:
    """What each worker process holds: an Archive to put into (copy mode), or nothing."""

    def __init__(self, root: Path, storage: StorageSettings, copy: bool) -> None:
        self.archive = Archive(root, storage) if copy else None

    def close(self) -> None:
        if self.archive is not None:
            self.archive.close()

    def copy(self, path: str) -> Record | _Prepared:
        return _guarded(path, self._copy)

    def _copy(self, path: str) -> Record:
        assert self.archive is not None
        with Part10File(path) as f:
            scan = _instance_scan(f)
            known = self._known(scan, f)
            if known is not None:
                return _unchanged(known, self.archive, path)
            info = read_instance_info(Path(path))
        put = self.archive.put(Path(path), info=info, checked=f.stat)
        return {**put.record(), "source": path}

    def _known(self, scan: ScanResult, f: Part10File) -> IndexedFile | None:
        """The indexed file with these very bytes, if any (a re-run has nothing to copy)."""
        assert self.archive is not None
        sop = scan.text(SOP_INSTANCE_UID)
        known = self.archive.index.file_of(sop) if sop else None
        if known is None or known.size != f.size or \
                hashlib.sha256(f.data).hexdigest() != known.sha256 or \
                not self.archive.abspath(known.path).is_file():
            return None
        return known

    def prepare(self, path: str) -> Record | _Prepared:
        return _guarded(path, _prepare)


def _prepare(path: str) -> _Prepared:
    with Part10File(path) as f:
        _instance_scan(f)
        info = read_instance_info(Path(path))
        return _Prepared(path, info, hash_bytes(f.data, f.mtime))


def _ticking(records: Iterable[Record], total: int, progress: Progress | None) -> Iterator[Record]:
    for done, record in enumerate(records, start=1):
        yield record
        if progress is not None:
            progress(done, total)


def index_files(root: Path, storage: StorageSettings, paths: Iterable[str], *,
                in_place: bool = False, jobs: int = 1,
                progress: Progress | None = None) -> Iterator[Record]:
    """Index the files under `paths` into the archive at `root`: one record per file.

    Files are copied in through `Archive.put` by `jobs` worker processes; `in_place`
    records them where they lie instead (read by the workers, indexed here in their order).
    `progress(done, total)` is called after each record.
    """
    root = root.expanduser().absolute()
    collector = _Collector(root)
    for path in paths:
        collector.add_path(path)
    files = collector.files
    total = len(collector.records) + len(files)
    yield from _ticking(_index(root, storage, collector.records, files, in_place, jobs),
                        total, progress)


def _index(root: Path, storage: StorageSettings, early: list[Record], files: list[str],
           in_place: bool, jobs: int) -> Iterator[Record]:
    if in_place:
        with closing(Archive(root, storage)) as archive:
            # a path indexed before that is now no file (a FIFO, a link to nothing)
            yield from (_broken_since(archive, r) if r["status"] in ("skipped", "failed")
                        and "path" in r else r for r in early)
            yield from _index_in_place(archive, files, jobs, check_unchanged=True)
        return
    yield from early
    # Create (or migrate) the archive once, before the workers fork.
    Archive(root, storage).close()
    factory = functools.partial(_Worker, root, storage, True)
    yield from parallel_map(factory, "copy", files, jobs, ordered=False)


def _index_in_place(archive: Archive, files: list[str], jobs: int,
                    check_unchanged: bool) -> Iterator[Record]:
    todo: list[str] = []
    for path in files:
        if not path.isascii() and not _utf8(path):
            yield failed(PacsError(f"{path!r}: the file's name is not UTF-8, which the index "
                                   "cannot record: rename it, or index a copy (without "
                                   "--in-place)", code="bad-path"), path=path)
            continue
        known = _unchanged_in_place(archive, path) if check_unchanged else None
        if known is not None:
            yield _unchanged(known, archive, path)
        else:
            todo.append(path)
    factory = functools.partial(_Worker, archive.root, archive.storage, False)
    for item in parallel_map(factory, "prepare", todo, jobs, ordered=True):
        if isinstance(item, _Prepared):
            item = _guarded(item.path, functools.partial(_commit, archive, item))
        assert isinstance(item, dict)
        if check_unchanged and item["status"] in ("skipped", "failed"):
            item = _broken_since(archive, item)
        yield item


def _broken_since(archive: Archive, record: Record) -> Record:
    """The record of a file that cannot be indexed (now): a failure naming the instance
    when an earlier run indexed it there (a share's file since cut short or overwritten),
    whose row now names a file that does not hold it."""
    known = archive.index.file_at(archive.recorded_path(Path(record["path"])))
    if known is None:
        return record
    why = record.get("reason") or record.get("error", {}).get("message", "")
    error = PacsError(f"{why}; this file was indexed for instance {known.sop_uid}, whose row "
                      "now names a file that does not hold it: `pacs verify --repair` drops "
                      "the row", code="indexed-file-broken")
    return failed(error, path=record["path"], PatientID=known.patient_id,
                  StudyInstanceUID=known.study_uid, SeriesInstanceUID=known.series_uid,
                  SOPInstanceUID=known.sop_uid)


def _utf8(text: str) -> bool:
    """Whether a path decoded by os.fsdecode is valid UTF-8 (no surrogates for odd bytes)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _commit(archive: Archive, prepared: _Prepared, path: str) -> Record:
    # `source` names the file indexed, as in copy mode: a duplicate or kept record's `path`
    # is the file already indexed, which the source conflicts with.
    result = archive.index_in_place(Path(path), info=prepared.info, hashes=prepared.hashes)
    return {**result.record(), "source": path}


def _unchanged_in_place(archive: Archive, path: str) -> IndexedFile | None:
    """The row of a file indexed where it lies and not changed since (same size and mtime)."""
    known = archive.index.file_at(archive.recorded_path(Path(path)))
    if known is None:
        return None
    try:
        st = os.stat(path)
    except OSError:
        return None
    return known if known.size == st.st_size and known.received_at == st.st_mtime else None


def rebuild_index(root: Path, storage: StorageSettings, *, jobs: int = 1,
                  progress: Progress | None = None) -> Iterator[Record]:
    """Drop the index of the archive at `root` and build it again from the archive's files.

    Files are indexed where they lie, in the order they were written (mtime, then path), so
    the rows equal those `Archive.put` made as the files arrived; files the old index had
    indexed in place outside the archive are indexed again where they are. Best run while
    nothing else writes to the archive.
    """
    root = root.expanduser().absolute()
    if not root.is_dir():
        raise UsageError(f"no archive at {root}")
    unlistable: list[tuple[Path, OSError]] = []
    on_disk = archive_files(root, unlistable)  # before the index is emptied
    if unlistable:
        folder, exc = unlistable[0]
        raise ArchiveError(f"cannot list {folder} ({exc.strerror or exc}): the rebuilt index "
                           "would lack its instances, so nothing was changed",
                           code="unreadable")
    notes: list[Record] = []
    archive, external = _emptied(root, storage, notes)
    with closing(archive):
        files = []
        for rel in on_disk:
            if _regular(root / rel):
                files.append(str(root / rel))
            else:  # never opened: a FIFO would block for ever
                notes.append(not_a_file(str(root / rel)))
        for path in external:
            if os.path.isfile(path):
                files.append(path)
            else:
                notes.append({"path": path, "status": "warning", "outcome": "dropped",
                              "warning": "indexed in place before, but no longer there"})
        files.sort(key=_mtime_key)
        yield from _ticking(
            chain(notes, _index_in_place(archive, files, jobs, check_unchanged=False)),
            len(notes) + len(files), progress)


def _emptied(root: Path, storage: StorageSettings, notes: list[Record]) -> tuple[Archive, list[str]]:
    """The archive with its index emptied, and the files the old index had indexed in place
    outside it. An index SQLite cannot open, or too damaged to empty, is set aside (a note
    says so) for a new one."""
    try:
        archive = Archive(root, storage)
    except ArchiveError as exc:
        notes.append(_set_aside_index(root, exc))
        return Archive(root, storage), []
    external: list[str] = []
    try:
        external = sorted({f.path for f in archive.index.iter_files() if os.path.isabs(f.path)})
    except (sqlite3.Error, ArchiveError) as exc:
        log.warning("cannot read the old index's in-place files: %s", exc)
    try:
        archive.index.reset()
    except (sqlite3.Error, ArchiveError) as exc:
        archive.close()
        notes.append(_set_aside_index(root, exc))
        archive = Archive(root, storage)
    return archive, external


def _regular(path: Path) -> bool:
    try:
        return stat.S_ISREG(path.lstat().st_mode)
    except OSError:
        return False


def _mtime_key(path: str) -> tuple[float, str]:
    try:
        return os.stat(path).st_mtime, path
    except OSError:
        return 0.0, path


def _set_aside_index(root: Path, why: Exception) -> Record:
    """Move an index SQLite cannot open into the quarantine folder (nothing is deleted)."""
    quarantine = Quarantine(root)
    moved = [quarantine.move(root / f"{layout.INDEX_FILE}{suffix}")
             for suffix in ("", "-wal", "-shm", "-journal")
             if (root / f"{layout.INDEX_FILE}{suffix}").exists()]
    return {"path": str(moved[0]), "status": "warning", "outcome": "set-aside",
            "warning": f"the old index could not be opened ({why}); moved aside"}
