"""The archive: one place, `Archive.put`, where an instance enters, whoever brought it.

A put writes the file under a temporary name in the archive's staging folder, flushes it
(fdatasync under the default durability), renames it into place, syncs the folder, and only
then commits its index rows (written while the data was flushing). A crash therefore never
leaves a half-written file under a real name, and the index never points at one.

Bytes in memory (for `pacs serve`, a dataset while it arrives) are written with direct I/O
by a worker thread and hashed by another (see `StreamedFile`): both release the GIL, and in
the association's own thread the hash cost ~0.5 ms and a buffered write ~0.9 ms of every CT
slice.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import logging
import mmap
import os
import shutil
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pacscli.archive import layout
from pacscli.archive.index import Index, InstanceRow, StoredFile, unusable
from pacscli.archive.staging import (
    BlockWriter,
    StagedFile,
    StagingFolder,
    StreamedFile,
    staging_alive,
    staging_name,
)
from pacscli.config import StorageSettings
from pacscli.dicom.header import BytesLike
from pacscli.dicom.identity import (
    InstanceInfo,
    read_instance_info,
    read_received_head,
    read_received_info,
    seek_dataset,
)
from pacscli.dicom.part10 import part10_header
from pacscli.dicom.scan import DEFLATED, mapped, scan_dataset
from pacscli.dicom.uids import require_sop_class
from pacscli.errors import (
    ArchiveError,
    InvalidDicomError,
    OutOfResourcesError,
    PacsError,
    UsageError,
)

try:
    import fcntl
except ImportError:  # pragma: no cover - not POSIX
    fcntl = None  # type: ignore[assignment]

log = logging.getLogger(__name__)

_CHUNK = 1024 * 1024
# Errors that mean "no room or the device failed": reported as out of resources (0xA700).
_RESOURCE_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EIO, errno.EROFS}


@dataclass(frozen=True)
class PutResult:
    """What happened to one instance: stored, duplicate, kept or replaced."""

    info: InstanceInfo
    path: Path
    outcome: str  # "stored" | "duplicate" | "kept" | "replaced"; in place: "indexed" | "updated"
    size: int
    sha256: str
    previous_sha256: str | None = None  # "updated": what the index had for the file before
    warning: str | None = None

    @property
    def status(self) -> str:
        """The record status: a kept conflicting instance, or anything warned of, is a warning."""
        return "warning" if self.outcome == "kept" or self.warning else "ok"

    def record(self) -> dict[str, Any]:
        """The JSON-lines record for this instance."""
        attrs = self.info.attributes
        record: dict[str, Any] = {
            "PatientID": attrs.get("PatientID"),
            "StudyInstanceUID": self.info.study_uid,
            "SeriesInstanceUID": self.info.series_uid,
            "SOPInstanceUID": self.info.sop_uid,
            "SOPClassUID": self.info.sop_class_uid,
            "TransferSyntaxUID": self.info.transfer_syntax,
            "path": str(self.path),
            "size": self.size,
            "sha256": self.sha256,
            "outcome": self.outcome,
            "status": self.status,
        }
        if self.previous_sha256 is not None:
            record["previous_sha256"] = self.previous_sha256
        if self.outcome == "kept":
            record["warning"] = (
                "an instance with this SOP Instance UID but different content is already "
                "archived; kept the archived one (storage.on_conflict = 'keep')"
            )
        elif self.warning:
            record["warning"] = self.warning
        return record


def _version(st: os.stat_result) -> tuple[int, ...]:
    """What changes when a file is written to or replaced."""
    return st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns


def _resource_error(exc: OSError, what: str) -> ArchiveError:
    if exc.errno in _RESOURCE_ERRNOS:
        return OutOfResourcesError(f"{what}: {exc.strerror or exc}")
    return ArchiveError(f"{what}: {exc.strerror or exc}")


class Archive:
    """An archive folder: its files, staging area and index."""

    def __init__(self, root: Path, storage: StorageSettings | None = None) -> None:
        self.root = root.expanduser().absolute()
        self.storage = storage or StorageSettings()
        if self.root.exists() and not self.root.is_dir():
            raise UsageError(f"the archive {self.root} is not a folder")
        try:
            self.root.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise _resource_error(exc, f"cannot create the archive at {self.root}") from exc
        # The index first: an archive whose index cannot be written gets no staging folder.
        self.index = Index(self.root / layout.INDEX_FILE)
        try:
            self.index.check_writable()
            self.staging = self.root / layout.STAGING_DIR / staging_name()
            self._staging_folder = StagingFolder(self.staging)
            self._make_lock_files()
        except OSError as exc:
            self.index.close()
            raise _resource_error(exc, f"cannot create the archive at {self.root}") from exc
        except ArchiveError:
            self.index.close()
            raise
        self._stripes: dict[str, tuple[threading.Lock, int]] = {}  # lock stripe -> (lock, fd)
        self._stripes_guard = threading.Lock()
        self._syncers: ThreadPoolExecutor | None = None
        self._block_writer = BlockWriter()
        self._clean_dead_staging()

    def _make_lock_files(self) -> None:
        """Create the 256 lock files of `instance_lock` now, if missing: made on first use,
        each cost ~0.4 ms of a put here (see staging.py on slow creates)."""
        locks = self.root / layout.LOCKS_DIR
        locks.mkdir(exist_ok=True)
        if len(os.listdir(locks)) >= 256:
            return
        for stripe in range(256):
            os.close(os.open(locks / f"{stripe:02x}.lock", os.O_RDWR | os.O_CREAT, 0o644))

    def close(self) -> None:
        """Close the index and the lock files, and remove this process's staging folder."""
        self.index.close()
        with self._stripes_guard:
            for _, fd in self._stripes.values():
                os.close(fd)
            self._stripes.clear()
            if self._syncers is not None:
                self._syncers.shutdown()
            self._syncers = None
        self._block_writer.close()
        self._staging_folder.close()

    def _clean_dead_staging(self) -> None:
        """Remove staging folders of processes that no longer run (left by a crash)."""
        for entry in (self.root / layout.STAGING_DIR).iterdir():
            if entry == self.staging or entry.is_symlink() or not entry.is_dir():
                continue
            if not staging_alive(entry):
                log.info("removing staging folder %s left by a stopped process", entry)
                shutil.rmtree(entry, ignore_errors=True)

    def prepare_staging(self) -> None:
        """Create the staging file of a coming put now, while the caller would wait anyway
        (`pacs serve`: after answering a C-STORE, while the next instance arrives)."""
        self._staging_folder.prepare()

    def abspath(self, relpath: str) -> Path:
        """The absolute path of an indexed file (paths of in-place files are absolute)."""
        return self.root / relpath

    def put(self, source: Path, *, source_aet: str | None = None, rewrite_meta: bool = False,
            info: InstanceInfo | None = None, checked: os.stat_result | None = None) -> PutResult:
        """Put the instance in `source` (a Part 10 file) into the archive and the index.

        With `rewrite_meta` (instances received over the network), the archived file gets our
        own file meta, naming the dataset's own UIDs and the sending AE; the dataset bytes
        are kept exactly as received. Otherwise the file is copied byte for byte.
        `source` itself is never changed or removed. `checked`, the source's stat when the
        caller checked its bytes, makes a copy of a file changed since then an error.
        Raises InvalidDicomError, UnsafeUIDError, OutOfResourcesError or ArchiveError; when it
        raises, nothing was written under a real name and the index is unchanged.
        """
        info = info or read_instance_info(source)
        # What enters the archive must be servable: its class goes into file metas and
        # negotiations. (Instances already in it are indexed all the same: index_in_place.)
        require_sop_class(info.sop_class_uid)
        header = self._file_meta_bytes(info, source_aet) if rewrite_meta else None
        return self._put(info, source, header, source_aet if rewrite_meta else info.source_aet,
                         checked=checked)

    def begin_received(self, *, sop_class_uid: str, sop_uid: str, transfer_syntax: str,
                       source_aet: str | None) -> IncomingInstance | None:
        """A staging file to write a dataset into while it arrives (`pacs serve`), under the
        file meta its C-STORE command predicts. `put_received` takes it when the dataset's
        own UIDs match that file meta, and stages the dataset anew otherwise.

        Writing and hashing while receiving, and reading the header from the first piece,
        takes them and most of the flush off the time between the last fragment and the
        answer. None when no staging file can be had: the put then stages as usual and
        reports.
        """
        try:
            header = part10_header(sop_class_uid=sop_class_uid, sop_instance_uid=sop_uid,
                                   transfer_syntax=transfer_syntax, source_aet=source_aet)
            fd, path = self._staging_folder.new_file()
        except (OSError, ValueError, UnicodeError):
            return None
        file = StreamedFile(path, fd, header, writer=self._block_writer, flush=self._start_sync)
        return IncomingInstance(file, transfer_syntax)

    def put_received(self, dataset: BytesLike | Path, *, transfer_syntax: str,
                     source_aet: str | None, receiving: IncomingInstance | None = None) -> PutResult:
        """Put a dataset received over the network (its bytes, or a raw dataset file without
        file meta) into the archive, under our own file meta naming the sending AE.

        `receiving` is what `begin_received` gave for it, its file already holding the
        dataset bytes; the file is used when it holds exactly the file this put would write,
        and removed otherwise. The dataset bytes are stored exactly as received. Raises as
        `put` does.
        """
        try:
            _check_whole(dataset, transfer_syntax)
            info = receiving.info if receiving is not None and receiving.info is not None \
                else read_received_info(dataset, transfer_syntax)
            require_sop_class(info.sop_class_uid)
            header = self._file_meta_bytes(info, source_aet)
        except BaseException:
            if receiving is not None:
                receiving.discard()
            raise
        staged: StagedFile | None = None
        if receiving is not None:
            if isinstance(dataset, BytesLike) and receiving.file.holds(header, len(dataset)):
                staged = receiving.file
            else:
                receiving.discard()
        return self._put(info, dataset, header, source_aet, staged)

    def _put(self, info: InstanceInfo, source: BytesLike | Path, header: bytes | None,
             source_aet: str | None, staged: StagedFile | None = None,
             checked: os.stat_result | None = None) -> PutResult:
        """Stage (unless `staged` already holds the file), settle duplicates and conflicts,
        place and index one instance."""
        try:
            relpath = layout.instance_relpath(info.study_uid, info.series_uid, info.sop_uid)
        except BaseException:
            if staged is not None:
                staged.discard()
            raise
        final = self.root / relpath
        if staged is None:
            staged = self._stage(source, info, header, checked)
        try:
            with self.instance_lock(info.sop_uid):  # settle, place and index as one step
                existing = self.index.lookup(info.sop_uid)
                if existing is not None:
                    existing, settled = self._settled(info, existing, source,
                                                      info.dataset_offset)
                    if settled is not None:
                        return settled
                outcome = "stored"
                moved = existing is not None and existing.path != relpath
                aside: Path | None = None  # the old version's link, while the new takes its name
                if existing is not None and self.abspath(existing.path).exists():
                    outcome = "replaced"
                    if not moved:
                        aside = self._set_aside(self.abspath(existing.path), info.sop_uid)
                # The data syncs in another thread while the rows are written (and the
                # sha256 computed); they commit only once the file is durably in place.
                synced = self._sync_later(staged)
                stored = StoredFile(path=relpath, size=staged.size, sha256=staged.sha256(),
                                    received_at=staged.mtime, source_aet=source_aet)
                placed = False

                def place() -> None:
                    nonlocal placed
                    synced()
                    self._place(staged, final)
                    placed = True

                try:
                    # A row of the same instance elsewhere (other study or series UIDs) is
                    # dropped in the same transaction, with the parents it leaves empty.
                    self.index.upsert(info, stored, replacing=moved, before_commit=place)
                except BaseException as exc:
                    # Rolled back: the files go back to what the index still says.
                    if aside is not None:
                        _restore(aside, final, placed)
                    elif placed:
                        final.unlink(missing_ok=True)
                    if isinstance(exc, PacsError) or not isinstance(exc, Exception):
                        raise  # the file could not be placed (disk full...), or we stop
                    raise _index_error(info.sop_uid, exc) from exc
                if moved and outcome == "replaced" and existing is not None:
                    # Now that the index names the new file, the old one leaves studies/.
                    self._set_aside(self.abspath(existing.path), info.sop_uid, move=True)
                return PutResult(info, final, outcome, staged.size, stored.sha256)
        finally:
            staged.discard()

    @contextmanager
    def instance_lock(self, sop_uid: str) -> Iterator[None]:
        """Hold the lock of this SOP Instance UID, across threads and processes, so that
        settling, placing and indexing an instance is one step whoever else stores it too
        (two puts of one instance with different content could otherwise leave the file of
        one under the row of the other). 256 lock files in .locks/ stripe the instances."""
        if fcntl is None:  # not POSIX: no file locks
            yield
            return
        stripe = hashlib.sha1(sop_uid.encode("ascii", "replace")).hexdigest()[:2]
        with self._stripes_guard:
            if stripe not in self._stripes:
                # Opened once and kept: an open per put cost ~0.4 ms here.
                fd = os.open(self.root / layout.LOCKS_DIR / f"{stripe}.lock",
                             os.O_RDWR | os.O_CREAT, 0o644)
                self._stripes[stripe] = (threading.Lock(), fd)
            thread_lock, fd = self._stripes[stripe]
        # flock excludes other processes; threads share the descriptor, so they also take
        # the thread lock.
        with thread_lock:
            fcntl.flock(fd, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(fd, fcntl.LOCK_UN)

    def _settled(self, info: InstanceInfo, existing: InstanceRow, source: BytesLike | Path,
                 source_offset: int) -> tuple[InstanceRow | None, PutResult | None]:
        """`existing` (the indexed instance with the same SOP Instance UID), and the result
        when it settles the matter: its file holds the dataset of `source` (bytes, or a file
        from `source_offset`) byte for byte (duplicate), or another one that on_conflict =
        'keep' keeps (kept). A row whose file is gone settles nothing."""
        if not self.abspath(existing.path).exists():
            return existing, None
        if same_dataset(self.abspath(existing.path), source, source_offset):
            outcome = "duplicate"
        elif self.storage.on_conflict == "keep":
            outcome = "kept"
        else:
            return existing, None
        return existing, PutResult(info, self.abspath(existing.path), outcome, existing.size,
                                   existing.sha256)

    def recorded_path(self, path: Path) -> str:
        """How the index records a file: archive-relative inside the archive, else absolute."""
        path = Path(os.path.abspath(path))
        try:
            return path.relative_to(self.root).as_posix()
        except ValueError:
            return str(path)

    def index_in_place(self, source: Path, *, info: InstanceInfo | None = None,
                       hashes: FileHashes | None = None) -> PutResult:
        """Index the instance in `source` where it lies: only the index is written.

        For `pacs index --in-place` (files on a share, recorded by absolute path), and for
        the archive's own files (`index --rebuild`, `verify --repair`: archive-relative
        paths). The file's mtime is its received_at and its file meta's Source AE title its
        sending AE, so indexing the files put wrote reproduces the rows put made. Outcomes
        are put's ("indexed" where put says "stored"): another file already indexed for the
        instance makes this one a duplicate, or kept aside the index under on_conflict =
        'keep'; under 'replace' the row moves here, and an archive file it recorded before
        moves into .replaced/ (an external one stays where it is). A file indexed here before
        and rewritten since is "updated" (with the sha256 the index had), or, when it now
        holds another instance, "indexed" with a warning naming the instance whose row went.
        `info` and `hashes`, when the caller has them, spare reading the file again.
        """
        source = Path(os.path.abspath(source))
        info = info or read_instance_info(source)
        hashes = hashes or hash_file(source)
        path = self.recorded_path(source)
        stored = StoredFile(path=path, size=hashes.size, sha256=hashes.sha256,
                            received_at=hashes.mtime, source_aet=info.source_aet)
        with self.instance_lock(info.sop_uid):
            existing = self.index.lookup(info.sop_uid)
            outcome, previous = "indexed", None
            if existing is not None and existing.path != path:
                existing, settled = self._settled(info, existing, source, info.dataset_offset)
                if settled is not None:
                    return settled
                if existing is not None and self.abspath(existing.path).exists():
                    outcome = "replaced"
            elif existing is not None and existing.sha256 != hashes.sha256:
                outcome, previous = "updated", existing.sha256
            try:
                dropped = self.index.reindex(info, stored)
            except Exception as exc:
                raise _index_error(info.sop_uid, exc) from exc
            if outcome == "replaced" and existing is not None and \
                    not Path(existing.path).is_absolute():
                self._set_aside(self.abspath(existing.path), info.sop_uid, move=True)
        warning = None
        if dropped:
            warning = (f"this file held SOP Instance UID {', '.join(dropped)} when it was indexed "
                       "before; it holds another instance now, and the index no longer lists that one")
        return PutResult(info, source, outcome, hashes.size, hashes.sha256, previous, warning)

    def _stage(self, source: BytesLike | Path, info: InstanceInfo,
               header: bytes | None, checked: os.stat_result | None = None) -> StagedFile:
        """Write the archive file's bytes to a new staging file.

        `source` is a Part 10 file copied whole (header None) or from its dataset on after
        `header`, or received dataset bytes / a raw dataset file written after `header`.
        A file is hashed as it is copied, and synced only by `_sync_later`, so a duplicate
        costs no sync. Bytes in memory are written as a `StreamedFile`, whose flush starts
        at once.
        """
        try:
            fd, path = self._staging_folder.new_file()
        except OSError as exc:
            raise _resource_error(exc, f"cannot write {info.sop_uid} to the archive") from exc
        if isinstance(source, BytesLike):
            streamed = StreamedFile(path, fd, header or b"", writer=self._block_writer)
            streamed.write_through(source)
            if not streamed.written():
                error = streamed.error or OSError(errno.EIO, "write failed")
                streamed.discard()
                raise _resource_error(error, f"cannot write {info.sop_uid} to the archive")
            return streamed
        staged = StagedFile(path, fd)
        try:
            file_hash = hashlib.sha256()
            with open(source, "rb") as src:
                if header is None:
                    header = src.read(info.dataset_offset)
                src.seek(info.dataset_offset)
                staged.write(header)
                file_hash.update(header)
                copied = len(header)
                while chunk := src.read(_CHUNK):
                    staged.write(chunk)
                    file_hash.update(chunk)
                    copied += len(chunk)
                if checked is not None and (copied != checked.st_size
                                            or _version(os.fstat(src.fileno())) != _version(checked)):
                    # Checked whole, then rewritten (a modality still writing to a share):
                    # the copy is not the file checked, and may be cut short.
                    staged.discard()
                    raise ArchiveError(f"{source} changed while it was read: not archived; "
                                       "index it again once it is written", code="changed")
            digest = file_hash.hexdigest()
            staged.sha256 = lambda: digest
            staged.mtime = os.fstat(fd).st_mtime
        except OSError as exc:
            staged.discard()
            raise _resource_error(exc, f"cannot write {info.sop_uid} to the archive") from exc
        return staged

    @staticmethod
    def _file_meta_bytes(info: InstanceInfo, source_aet: str | None) -> bytes:
        """Preamble, DICM and our file meta, naming the dataset's own UIDs."""
        return part10_header(
            sop_class_uid=info.sop_class_uid,
            sop_instance_uid=info.sop_uid,
            transfer_syntax=info.transfer_syntax,
            source_aet=source_aet,
        )

    def _sync_later(self, staged: StagedFile) -> Callable[[], None]:
        """Start flushing a staged file's data to disk (fdatasync under the default
        durability) in a worker thread, unless its flush already started; return what
        waits for it (raising OutOfResourcesError or ArchiveError), then closes the file.

        fdatasync, not fsync: the data and the size needed to read it back, without the
        timestamp-only journal commit that made fsync ~3x slower here.
        """
        if staged.synced is None:
            staged.synced = self._start_sync(staged)
        synced = staged.synced

        def wait() -> None:
            try:
                synced()
            except OSError as exc:
                raise _resource_error(exc, f"cannot write {staged.path.name} to disk") from exc

        return wait

    def _start_sync(self, staged: StagedFile) -> Callable[[], None]:
        fd = staged.fd
        assert fd is not None, "synced twice"
        if self.storage.durability != "fsync":
            return staged.close
        with self._stripes_guard:
            if self._syncers is None:
                # Mostly waiting on the disk: one per association receiving at once.
                self._syncers = ThreadPoolExecutor(max_workers=16, thread_name_prefix="fdatasync")
            syncers = self._syncers
        future = syncers.submit(os.fdatasync, fd)

        def wait() -> None:
            try:
                future.result()
            finally:
                staged.close()

        return wait

    def _place(self, staged: StagedFile, final: Path) -> None:
        """Rename a synced staged file into place and make the rename durable; when that
        fails, nothing is left under the real name."""
        try:
            created = self._makedirs(final.parent)
            os.replace(staged.path, final)
        except OSError as exc:
            raise _resource_error(exc, f"cannot place {final.name} in the archive") from exc
        try:
            if self.storage.durability == "fsync":
                for folder in [final.parent, *created]:
                    _fsync_dir(folder)
        except OSError as exc:
            with contextlib.suppress(OSError):
                os.replace(final, staged.path)  # back to staging, which the put clears
            raise _resource_error(exc, f"cannot place {final.name} in the archive") from exc

    def _makedirs(self, folder: Path) -> list[Path]:
        """Create `folder` and its missing parents; return the parents whose entries changed."""
        missing: list[Path] = []
        current = folder
        while not current.exists():
            missing.append(current)
            current = current.parent
        for path in reversed(missing):
            path.mkdir(exist_ok=True)
        return [p.parent for p in missing]

    def _set_aside(self, path: Path, sop_uid: str, *, move: bool = False) -> Path:
        """Keep an instance about to be replaced in .replaced/ (nothing is ever deleted):
        a hard link (the replacement then takes its name), or with `move` the file itself.
        Returns the path it has there."""
        aside = self.root / layout.REPLACED_DIR
        target = aside / f"{sop_uid}.{time.time_ns()}{layout.INSTANCE_SUFFIX}"
        try:
            aside.mkdir(exist_ok=True)
            if move:
                os.rename(path, target)
            else:
                os.link(path, target)
        except OSError as exc:
            raise _resource_error(exc, f"cannot set aside {path.name} before replacing it") from exc
        return target


class IncomingInstance:
    """A C-STORE dataset on its way into the archive (`Archive.begin_received`): its staging
    file, written while the dataset arrives, and its identity, read from the first piece
    when that holds the whole header (the common case: reading it after the last fragment
    cost ~0.14 ms of every answer, and kept the file's writer thread from the GIL)."""

    def __init__(self, file: StreamedFile, transfer_syntax: str) -> None:
        self.file = file
        self.info: InstanceInfo | None = None
        self._transfer_syntax = transfer_syntax
        self._first = True

    def write_through(self, data: BytesLike) -> None:
        """Take the next piece of the dataset."""
        self.file.write_through(data)
        if self._first:
            self._first = False
            self.info = read_received_head(data, self._transfer_syntax)

    def finish(self) -> None:
        """The last piece is in."""
        self.file.finish()

    def discard(self) -> None:
        """Drop the file unless it was placed (may be called more than once)."""
        self.file.discard()


def _index_error(sop_uid: str, exc: Exception) -> ArchiveError:
    """The error for an instance the index would not take (a damaged index says so)."""
    if isinstance(exc, sqlite3.DatabaseError):
        error = unusable(exc)
        return ArchiveError(f"cannot index {sop_uid}: {error.message}", code=error.code)
    return ArchiveError(f"cannot index {sop_uid}: {exc}")


def _restore(aside: Path, final: Path, placed: bool) -> None:
    """Undo a replace whose index commit failed: the old version, kept as `aside`, takes
    its name back from the new one (or from nothing, when placing it failed halfway); a
    link never used goes. Best effort: this runs while an error is already on its way."""
    with contextlib.suppress(OSError):
        if placed or not final.exists():
            os.replace(aside, final)
            _fsync_dir(final.parent)
        else:
            aside.unlink()


def _check_whole(dataset: BytesLike | Path, transfer_syntax: str) -> None:
    """Refuse a received dataset that is cut short (a sender's truncated file), raising
    InvalidDicomError: pydicom reads one without complaint, and the archive would serve it
    as whole, or let it replace a whole copy. A deflated dataset is not walked: that would
    inflate it whole in memory, however large it inflates to."""
    if transfer_syntax in DEFLATED:
        return
    if isinstance(dataset, Path):
        with open(dataset, "rb") as fp, mapped(fp) as data:
            scan_dataset(data, 0, transfer_syntax)
    else:
        scan_dataset(memoryview(dataset).cast("B"), 0, transfer_syntax)


def same_dataset(archived: Path, source: BytesLike | Path, source_offset: int = 0) -> bool:
    """True when the archive file `archived` holds the dataset of `source` (bytes, or a file
    from `source_offset`) byte for byte; False too when it cannot be read."""
    try:
        with open(archived, "rb") as old:
            seek_dataset(old)
            if isinstance(source, BytesLike):
                view, position = memoryview(source), 0
                while chunk := old.read(_CHUNK):
                    if view[position:position + len(chunk)] != chunk:
                        return False
                    position += len(chunk)
                return position == len(view)
            with open(source, "rb") as new:
                new.seek(source_offset)
                while True:
                    chunk = old.read(_CHUNK)
                    if chunk != new.read(_CHUNK):
                        return False
                    if not chunk:
                        return True
    except (OSError, InvalidDicomError):
        return False


@dataclass(frozen=True)
class FileHashes:
    """A file's size, sha256 and mtime: what the index records of a file."""

    size: int
    sha256: str
    mtime: float


def hash_bytes(data: bytes | memoryview | mmap.mmap, mtime: float) -> FileHashes:
    """The FileHashes of a file's bytes already in memory (or mapped)."""
    return FileHashes(len(data), hashlib.sha256(data).hexdigest(), mtime)


def hash_file(path: Path) -> FileHashes:
    """The FileHashes of a file, read in chunks."""
    digest = hashlib.sha256()
    size = 0
    with open(path, "rb") as fp:
        mtime = os.fstat(fp.fileno()).st_mtime
        while chunk := fp.read(_CHUNK):
            digest.update(chunk)
            size += len(chunk)
    return FileHashes(size, digest.hexdigest(), mtime)


def _fsync_dir(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
