"""The staging folder: new files, made ahead when a caller has time, nothing left behind."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

from pacscli.archive.staging import BATCH, StagingFolder


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
    assert len(list(folder.folder.iterdir())) == 20 + BATCH  # one batch while files are ready
    folder.close()
    assert not folder.folder.exists()
    assert _open_fds() == before  # the files made ahead were closed too


def test_prepared_files_are_the_next_ones_handed_out(tmp_path: Path) -> None:
    folder = StagingFolder(tmp_path / "staging" / "5")
    folder.prepare()
    prepared = set(folder.folder.iterdir())
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
