"""Staging: new files, made ahead when a caller has time, nothing left behind; files streamed
in block by block."""

from __future__ import annotations

import errno
import fcntl
import hashlib
import os
import shutil
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from pacscli.archive import staging
from pacscli.archive.staging import (
    BATCH,
    BLOCK,
    OWNER_LOCK,
    BlockWriter,
    StagedFile,
    StagingFolder,
    StreamedFile,
)


def _open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def test_new_files_are_empty_distinct_and_removed_with_the_folder(tmp_path: Path) -> None:
    before = _open_fds()
    folder = StagingFolder(tmp_path / "staging" / "123")
    made = [folder.new_file() for _ in range(20)]
    assert len({path for _, path in made}) == 20
    for fd, path in made:
        assert path.parent == folder.folder and path.stat().st_size == 0
        os.write(fd, b"x")
        os.close(fd)
    for _ in range(3):
        folder.prepare()
    files = [p for p in folder.folder.iterdir() if p.name != OWNER_LOCK]
    assert len(files) == 20 + BATCH  # one batch while files are ready
    folder.close()
    assert not folder.folder.exists()
    assert _open_fds() == before  # the files made ahead were closed too


def test_prepared_files_are_the_next_ones_handed_out(tmp_path: Path) -> None:
    folder = StagingFolder(tmp_path / "staging" / "5")
    folder.prepare()
    prepared = {p for p in folder.folder.iterdir() if p.name != OWNER_LOCK}
    handed = set()
    for _ in range(BATCH):
        fd, path = folder.new_file()
        os.close(fd)
        handed.add(path)
    assert handed == prepared and len(prepared) == BATCH
    fd, path = folder.new_file()  # the batch used up: made on the spot
    os.close(fd)
    assert path not in prepared
    folder.close()


def test_a_file_left_by_an_earlier_process_is_never_reused(tmp_path: Path) -> None:
    target = tmp_path / "staging" / "7"
    target.mkdir(parents=True)
    left = target / "0.dcm"
    left.write_bytes(b"partial receive of a process that crashed with the same pid")
    folder = StagingFolder(target)
    fd, path = folder.new_file()
    os.close(fd)
    assert path != left
    assert left.read_bytes().startswith(b"partial")
    folder.close()


def test_a_failed_prepare_leaves_the_error_to_the_put(tmp_path: Path) -> None:
    """Preparing ahead never raises (here the folder vanished, as on a broken disk); the put
    that needs a file gets the error and reports it; once the folder is back, files come."""
    folder = StagingFolder(tmp_path / "staging" / "9")
    shutil.rmtree(folder.folder)
    folder.prepare()
    with pytest.raises(FileNotFoundError):
        folder.new_file()
    folder.folder.mkdir(parents=True)
    fd, path = folder.new_file()
    os.close(fd)
    assert path.exists()
    folder.close()


# --- StreamedFile: written block by block with direct I/O, hashed on the way -------------

HEADER = b"\x00" * 128 + b"DICM" + b"file meta" * 7  # any first bytes: not a multiple of 4096


def _stream(folder: StagingFolder, writer: BlockWriter, pieces: list[bytes],
            flush: Callable[[StagedFile], Callable[[], None]] | None = None) -> StreamedFile:
    fd, path = folder.new_file()
    streamed = StreamedFile(path, fd, HEADER, writer=writer, flush=flush)
    for piece in pieces:
        streamed.write_through(memoryview(piece))
    return streamed


@pytest.mark.parametrize("sizes", [
    [],  # the header alone
    [1, BLOCK - len(HEADER) - 1, 1, BLOCK, 3 * BLOCK + 17, 5000],  # across and on boundaries
    [BLOCK - len(HEADER)],  # a file of exactly one block: nothing left for the page cache
    [70_000] * 20,
])
def test_a_streamed_file_holds_exactly_its_pieces(tmp_path: Path, sizes: list[int]) -> None:
    """Whatever the pieces' sizes, the file is the header and the pieces in order, and its
    size, sha256 and mtime are those of the file on disk."""
    folder, writer = StagingFolder(tmp_path / "staging"), BlockWriter()
    pieces = [os.urandom(size) for size in sizes]
    streamed = _stream(folder, writer, pieces)
    assert streamed.holds(HEADER, sum(sizes))
    expected = HEADER + b"".join(pieces)
    assert streamed.path.read_bytes() == expected
    assert streamed.sha256() == hashlib.sha256(expected).hexdigest()
    assert streamed.size == len(expected)
    assert streamed.mtime == streamed.path.stat().st_mtime
    assert not streamed.holds(HEADER, sum(sizes) + 1) and not streamed.holds(b"other", sum(sizes))
    streamed.discard()
    assert not streamed.path.exists()
    writer.close()
    folder.close()


@pytest.mark.parametrize("refusal", ["setfl", "write"])
def test_a_filesystem_without_direct_io_gets_the_same_file(tmp_path: Path,
                                                           monkeypatch: pytest.MonkeyPatch,
                                                           refusal: str) -> None:
    """Direct I/O refused when it is asked for (fcntl), or by the first write (EINVAL, a
    device whose blocks are larger than ours): the blocks go through the page cache."""
    if refusal == "setfl":
        monkeypatch.setattr(staging, "_set_direct", lambda fd, on: False)
    else:
        real_pwrite = os.pwrite

        def pwrite(fd: int, data: memoryview, offset: int) -> int:
            if fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_DIRECT:
                raise OSError(errno.EINVAL, "Invalid argument")
            return real_pwrite(fd, data, offset)

        monkeypatch.setattr(os, "pwrite", pwrite)
    folder, writer = StagingFolder(tmp_path / "staging"), BlockWriter()
    data = os.urandom(3 * BLOCK + 999)
    streamed = _stream(folder, writer, [data])
    assert streamed.written()
    assert streamed.path.read_bytes() == HEADER + data
    assert streamed.sha256() == hashlib.sha256(HEADER + data).hexdigest()
    streamed.discard()
    writer.close()
    folder.close()


def test_a_write_error_is_kept_and_the_file_dropped(tmp_path: Path,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    """The disk fills after the first block: the error is kept for the put (which stages
    anew and reports it), the rest is not written, and discarding leaves nothing."""
    real_pwrite, calls = os.pwrite, 0

    def pwrite(fd: int, data: memoryview, offset: int) -> int:
        nonlocal calls
        calls += 1
        if calls > 1:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_pwrite(fd, data, offset)

    monkeypatch.setattr(os, "pwrite", pwrite)
    folder, writer = StagingFolder(tmp_path / "staging"), BlockWriter()
    streamed = _stream(folder, writer, [os.urandom(4 * BLOCK)])
    assert not streamed.written()
    assert streamed.error is not None and streamed.error.errno == errno.ENOSPC
    assert not streamed.holds(HEADER, 4 * BLOCK)
    assert calls == 2  # the blocks after the failed one were skipped
    streamed.discard()
    assert not streamed.path.exists()
    writer.close()
    folder.close()


def test_a_file_discarded_before_its_end_is_removed(tmp_path: Path) -> None:
    """A dataset that spills to a file, or an association that breaks, drops its streamed
    file half-way: the blocks already sent are finished with, the file goes."""
    folder, writer = StagingFolder(tmp_path / "staging"), BlockWriter()
    streamed = _stream(folder, writer, [os.urandom(2 * BLOCK + 5)])
    streamed.discard()
    streamed.discard()  # again, as ReceivedDataset may
    assert not streamed.path.exists()
    assert not streamed.written()
    writer.close()
    folder.close()


def test_files_streamed_at_once_share_the_writer(tmp_path: Path) -> None:
    """Eight associations receiving together: one writer thread, every file right."""
    folder, writer = StagingFolder(tmp_path / "staging"), BlockWriter()
    datasets = [os.urandom(500_000 + n) for n in range(8)]

    def one(data: bytes) -> tuple[bytes, str]:
        pieces = [data[i:i + 16_378] for i in range(0, len(data), 16_378)]
        streamed = _stream(folder, writer, pieces)
        assert streamed.written()
        content, digest = streamed.path.read_bytes(), streamed.sha256()
        streamed.discard()
        return content, digest

    with ThreadPoolExecutor(max_workers=8) as pool:
        results = list(pool.map(one, datasets))
    for data, (content, digest) in zip(datasets, results, strict=True):
        assert content == HEADER + data
        assert digest == hashlib.sha256(content).hexdigest()
    writer.close()
    folder.close()


def test_the_flush_starts_once_the_last_block_is_written(tmp_path: Path) -> None:
    """`flush` is called once, for the whole file, and what it returns is what the put
    waits on."""
    folder, writer = StagingFolder(tmp_path / "staging"), BlockWriter()
    flushed: list[bytes] = []

    def flush(staged: StagedFile) -> Callable[[], None]:
        flushed.append(staged.path.read_bytes())
        return lambda: None

    data = os.urandom(BLOCK + 10)
    streamed = _stream(folder, writer, [data], flush=flush)
    assert streamed.written()
    assert flushed == [HEADER + data]
    assert streamed.synced is not None
    streamed.discard()
    writer.close()
    folder.close()
