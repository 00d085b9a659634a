"""Staging: where the archive writes each file before renaming it into place.

`StagingFolder` is a process's folder in `.staging/`. Creating a file was measured at 0.3 to
0.5 ms of a received instance here, in that one `open`. (This VM's ext4 runs without a
journal; `perf` put the time in the kernel's skipping of recently freed inodes, which makes
creates slow for minutes after many deletions.) `prepare` lets a caller make a batch when it
would otherwise wait: `pacs serve` calls it after answering a C-STORE, while the sender sends
the next instance into the socket buffer, and puts take files ready-made. (A background
thread creating them slowed the put's own write as much as it saved: the two contend in the
filesystem.)

`StagedFile` is a file being written there; `StreamedFile` one whose bytes a worker thread
hashes and writes, with direct I/O, while the caller receives the rest.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import itertools
import mmap
import os
import queue
import secrets
import shutil
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import NamedTuple

from pacscli.archive.layout import INSTANCE_SUFFIX
from pacscli.dicom.header import BytesLike

try:
    import fcntl
except ImportError:  # pragma: no cover - not POSIX
    fcntl = None  # type: ignore[assignment]

# Files made by one `prepare` when none is ready.
BATCH = 16
# A StreamedFile's unit of writing: page-aligned, a multiple of any device's block size.
BLOCK = 128 * 1024
# Direct I/O wants offsets and lengths in whole logical blocks (512 or 4096 bytes).
_DIRECT_ALIGN = 4096
# Blocks of one StreamedFile queued or being written at once: the caller waits beyond that.
_IN_FLIGHT = 4

# In each staging folder: the file its owner holds locked (flock) for as long as it lives.
OWNER_LOCK = ".owner.lock"
_BEING_MADE = 60.0  # s: a folder without its OWNER_LOCK younger than this is being made


def staging_name() -> str:
    """A new staging folder's name: the PID and a random part. The PID alone is not unique:
    processes in other PID namespaces (containers sharing the archive) may have the same."""
    return f"{os.getpid()}-{secrets.token_hex(4)}"


def staging_alive(folder: Path) -> bool:
    """Whether the process that made staging folder `folder` still runs: it holds the lock
    on the folder's OWNER_LOCK. A PID says nothing across PID namespaces (another process
    judged a live writer's folder dead, and removed it); it is read only for a folder made
    by an older pacscli, named by its PID alone with no lock file."""
    try:
        fd = os.open(folder / OWNER_LOCK, os.O_RDONLY)
    except FileNotFoundError:
        if folder.name.isdigit():
            return _pid_alive(folder.name)
        try:  # its owner puts the lock in place, locked, just after making the folder
            return time.time() - folder.stat().st_mtime < _BEING_MADE
        except OSError:
            return False
    except OSError:
        return True  # cannot tell: leave it be
    try:
        if fcntl is None:  # pragma: no cover - not POSIX
            return True
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            return True
        return False
    finally:
        os.close(fd)  # releases our lock, if we got it


def _pid_alive(name: str) -> bool:
    try:
        os.kill(int(name), 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # someone else's
    return True


class StagingFolder:
    """This process's folder in `.staging/`, handing out new empty files to write. Its
    OWNER_LOCK is held locked until `close`, for others to see it in use."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        folder.mkdir(parents=True, exist_ok=True)
        # Locked before it takes its name, so that no one ever finds it unlocked while we live.
        making = folder / f"{OWNER_LOCK}.new"
        self._owner = os.open(making, os.O_RDONLY | os.O_CREAT, 0o644)
        if fcntl is not None:
            fcntl.flock(self._owner, fcntl.LOCK_EX)  # a new folder: nobody else holds it
        os.rename(making, folder / OWNER_LOCK)
        self._names = itertools.count()
        self._ready: list[tuple[int, Path]] = []
        self._lock = threading.Lock()

    def new_file(self) -> tuple[int, Path]:
        """A new empty file, open for writing: its descriptor (the caller closes it) and path."""
        with self._lock:
            if self._ready:
                return self._ready.pop()
        return self._create()

    def prepare(self) -> None:
        """When no file is ready, make a batch for later `new_file` calls. An error (disk
        full) is left for the put that needs a file to report."""
        with self._lock:
            if self._ready:
                return
        made = []
        try:
            for _ in range(BATCH):
                made.append(self._create())
        except OSError:
            pass
        with self._lock:
            self._ready.extend(made)

    def close(self) -> None:
        """Close the files made ahead and remove the folder with whatever is left in it."""
        with self._lock:
            for fd, _ in self._ready:
                os.close(fd)
            self._ready.clear()
        shutil.rmtree(self.folder, ignore_errors=True)
        with contextlib.suppress(OSError):
            os.close(self._owner)

    def _create(self) -> tuple[int, Path]:
        while True:
            with self._lock:
                number = next(self._names)
            path = self.folder / f"{number}{INSTANCE_SUFFIX}"
            try:
                # O_EXCL: never write into a file an earlier process of the same PID left.
                return os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644), path
            except FileExistsError:
                continue


class StagedFile:
    """A file being written in staging: its path, open descriptor, size so far, its sha256
    (a call that may wait for the thread computing it) and, once a flush of it has started,
    what waits for that flush (raising OSError when it failed)."""

    def __init__(self, path: Path, fd: int) -> None:
        self.path = path
        self.fd: int | None = fd
        self.size = 0
        self.mtime = 0.0  # once written: the received_at the index records
        self.sha256: Callable[[], str] = lambda: ""
        self.synced: Callable[[], None] | None = None

    def write(self, data: BytesLike) -> None:
        """Append all of `data`."""
        assert self.fd is not None
        _write_all(self.fd, memoryview(data), self.size)
        self.size += len(data)

    def close(self) -> None:
        """Close the descriptor (once)."""
        if self.fd is not None:
            fd, self.fd = self.fd, None
            os.close(fd)

    def discard(self) -> None:
        """Close and remove the file, if it is still in staging."""
        if self.synced is not None:  # never close the descriptor under a running fdatasync
            with contextlib.suppress(OSError):
                self.synced()
        self.close()
        self.path.unlink(missing_ok=True)


class BlockWriter:
    """What every StreamedFile of an archive shares: page-aligned blocks of BLOCK bytes,
    reused file after file (touching a fresh block's pages cost about what a buffered write
    of it did), and two threads, started on first use. One writes the blocks in the order
    they come; the other then hashes them and hands them back. hashlib and the writes
    release the GIL, so both run beside the association that fills the next block.
    """

    def __init__(self, keep: int = 64) -> None:
        self._keep = keep  # free blocks kept for reuse; more are unmapped
        self._free: list[mmap.mmap] = []
        self._lock = threading.Lock()
        self._writes: queue.SimpleQueue[_Job | None] = queue.SimpleQueue()
        self._hashes: queue.SimpleQueue[_Job | None] = queue.SimpleQueue()
        self._threads: list[threading.Thread] = []

    def take(self) -> mmap.mmap:
        """A block, reused or new."""
        with self._lock:
            if self._free:
                return self._free.pop()
        return mmap.mmap(-1, BLOCK)

    def give(self, block: mmap.mmap) -> None:
        """Return a block nothing reads or writes any more."""
        with self._lock:
            if len(self._free) < self._keep:
                self._free.append(block)
                return
        _unmap(block)

    def submit(self, job: _Job) -> None:
        """Write, then hash, the block of `job`."""
        with self._lock:
            if not self._threads:
                self._threads = [
                    threading.Thread(target=self._loop, args=(self._writes, _Job.write),
                                     name="block-write", daemon=True),
                    threading.Thread(target=self._loop, args=(self._hashes, _Job.hash),
                                     name="block-hash", daemon=True)]
                for thread in self._threads:
                    thread.start()
        self._writes.put(job)

    def close(self) -> None:
        """Stop the threads once the blocks submitted are done; unmap the free blocks."""
        with self._lock:
            threads, self._threads = self._threads, []
        if threads:
            self._writes.put(None)
            for thread in threads:
                thread.join()
        with self._lock:
            for block in self._free:
                _unmap(block)
            self._free.clear()

    def _loop(self, jobs: queue.SimpleQueue[_Job | None], step: Callable[[_Job], None]) -> None:
        while (job := jobs.get()) is not None:
            try:
                step(job)
            except Exception as exc:
                job.file.failed(OSError(errno.EIO, f"{type(exc).__name__}: {exc}"))
            if step is _Job.write:
                self._hashes.put(job)
        if step is _Job.write:
            self._hashes.put(None)


class _Job(NamedTuple):
    """One block of a StreamedFile, on its way to disk."""

    file: StreamedFile
    block: mmap.mmap
    length: int
    offset: int  # in the file
    last: bool

    def write(self) -> None:
        self.file._write(self)

    def hash(self) -> None:
        self.file._hash_block(self)


class StreamedFile(StagedFile):
    """A staging file whose bytes arrive piece by piece (`pacs serve`: a C-STORE dataset
    while it is received, after the file meta its command predicts).

    The caller copies each piece into page-aligned blocks; the BlockWriter's threads write
    each full block with direct I/O (O_DIRECT), then hash it, while the next one fills.
    Measured here for 512 KiB CT slices: a buffered write cost ~0.9 ms of kernel time,
    mostly allocating the page cache, an O_DIRECT one ~0.13 ms, and the fdatasync then
    has only the metadata left to write. Where the filesystem refuses direct I/O, the same
    blocks go through the page cache. With `flush`, the file's fdatasync starts as soon as
    its last block is written; without, the put flushes it as any other staged file.

    A write error (disk full) is kept in `error`, not raised: the sender's stream must be
    read to its end anyway, and the put then stages the dataset the usual way, which reports
    it.
    """

    def __init__(self, path: Path, fd: int, header: bytes, *, writer: BlockWriter,
                 flush: Callable[[StagedFile], Callable[[], None]] | None = None) -> None:
        super().__init__(path, fd)
        self.header = header  # the file's first bytes (a Part 10 file meta)
        self.error: OSError | None = None
        self.sha256 = self._hexdigest
        self._writer = writer
        self._flush = flush  # starts the fdatasync, once the last block is written
        self._direct = _set_direct(fd, True)
        self._held: list[mmap.mmap] = []  # every block this file took, returned at the end
        self._spare: queue.SimpleQueue[mmap.mmap] = queue.SimpleQueue()  # blocks done with
        self._block = self._next_block()
        self._fill = 0  # bytes in the current block
        self._offset = 0  # file offset of the current block
        self._finished = False  # the last block is submitted
        self._stopped = False  # discarded: what is left is skipped
        self._hash = hashlib.sha256()
        self._digest = ""
        self._written = threading.Event()  # every block written (or skipped)
        self._hashed = threading.Event()  # every block hashed and handed back
        self.write_through(header)

    def write_through(self, data: BytesLike) -> None:
        """Append a piece (copied: the caller may reuse `data` at once)."""
        if self.error is not None or self._finished:
            return
        view = memoryview(data).cast("B")
        self.size += len(view)
        while view:
            room = min(len(view), BLOCK - self._fill)
            self._block[self._fill:self._fill + room] = view[:room]
            self._fill += room
            view = view[room:]
            if self._fill == BLOCK:
                self._submit(last=False)

    def finish(self) -> None:
        """The last piece is in: write the rest now, while the put reads the header."""
        if not self._finished:
            self._submit(last=True)

    def written(self) -> bool:
        """Wait until every byte is written (not flushed); True when all went well."""
        self.finish()
        self._written.wait()
        return self.error is None and not self._stopped

    def holds(self, header: bytes, dataset_size: int) -> bool:
        """Whether the file is exactly `header` and a dataset of `dataset_size` bytes, all
        written."""
        return self.written() and header == self.header and \
            self.size == len(header) + dataset_size

    def failed(self, error: OSError) -> None:
        """Keep the first write error; the blocks after it are skipped."""
        if self.error is None:
            self.error = error

    def discard(self) -> None:
        """Stop writing, close and remove the file (unless it was placed), and return the
        blocks. May be called more than once."""
        self._stopped = True
        self.finish()
        self._hashed.wait()
        super().discard()
        for block in self._held:
            self._writer.give(block)
        self._held.clear()

    def _hexdigest(self) -> str:
        self.finish()
        self._hashed.wait()
        return self._digest

    def _submit(self, *, last: bool) -> None:
        self._finished = last
        self._writer.submit(_Job(self, self._block, self._fill, self._offset, last))
        self._offset += self._fill
        if not last:
            self._block, self._fill = self._next_block(), 0

    def _next_block(self) -> mmap.mmap:
        if len(self._held) < _IN_FLIGHT:
            self._held.append(self._writer.take())
            return self._held[-1]
        return self._spare.get()  # the writer's threads never wait on us: one comes back

    # -- in the BlockWriter's threads -------------------------------------------------------

    def _write(self, job: _Job) -> None:
        try:
            if self.error is None and not self._stopped:
                with memoryview(job.block) as block:
                    self._write_block(block[:job.length], job.offset)
                if job.last:
                    assert self.fd is not None
                    self.mtime = os.fstat(self.fd).st_mtime
                    if self._flush is not None:
                        self.synced = self._flush(self)
        except OSError as exc:
            # A fresh error: this one's traceback holds views of the block, which must
            # be free to be reused or unmapped.
            self.failed(OSError(exc.errno, exc.strerror))
        finally:
            if job.last:
                self._written.set()

    def _hash_block(self, job: _Job) -> None:
        try:
            if self.error is None and not self._stopped:
                with memoryview(job.block) as block:
                    self._hash.update(block[:job.length])
                if job.last:
                    self._digest = self._hash.hexdigest()
        finally:
            self._spare.put(job.block)
            if job.last:
                self._hashed.set()

    def _write_block(self, piece: memoryview, offset: int) -> None:
        assert self.fd is not None
        whole = len(piece) // _DIRECT_ALIGN * _DIRECT_ALIGN if self._direct else len(piece)
        if whole:
            try:
                _write_all(self.fd, piece[:whole], offset)
            except OSError as exc:
                if exc.errno != errno.EINVAL or not self._direct:
                    raise
                self._direct = _set_direct(self.fd, False)  # a device with larger blocks
                _write_all(self.fd, piece[:whole], offset)
        if whole < len(piece):  # the file's unaligned end goes through the page cache
            if self._direct:
                self._direct = _set_direct(self.fd, False)
            _write_all(self.fd, piece[whole:], offset + whole)


def _unmap(block: mmap.mmap) -> None:
    """Unmap a block now, or when the last view of it goes (one an error's traceback
    holds, say)."""
    with contextlib.suppress(BufferError):
        block.close()


def _write_all(fd: int, data: memoryview, offset: int) -> None:
    """Write all of `data` at `offset` (a write may take less than asked)."""
    while data:
        written = os.pwrite(fd, data, offset)
        data, offset = data[written:], offset + written


def _set_direct(fd: int, on: bool) -> bool:
    """Turn direct I/O on or off for `fd`; return whether it is on."""
    if fcntl is None or not hasattr(os, "O_DIRECT"):
        return False
    try:
        flags = fcntl.fcntl(fd, fcntl.F_GETFL)
        fcntl.fcntl(fd, fcntl.F_SETFL, flags | os.O_DIRECT if on else flags & ~os.O_DIRECT)
    except OSError:
        return False
    return on
