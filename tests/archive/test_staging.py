"""The staging folder: new files made ahead in the background, nothing left behind."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

from pacscli.archive.staging import StagingFolder


def _open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def test_new_files_are_empty_distinct_and_removed_with_the_folder(tmp_path: Path) -> None:
    before = _open_fds()
    folder = StagingFolder(tmp_path / "staging" / "123")
    made = [folder.new_file() for _ in range(20)]
    paths = [path for _, path in made]
    assert len(set(paths)) == 20
    for fd, path in made:
        assert path.parent == folder.folder and path.stat().st_size == 0
        os.write(fd, b"x")
        os.close(fd)
    folder.close()
    assert not folder.folder.exists()
    assert _open_fds() == before  # the files made ahead were closed too


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


def test_files_are_made_again_once_the_folder_is_writable_again(tmp_path: Path) -> None:
    """When creating ahead fails (here the folder vanished, as on a full or broken disk),
    new_file raises the error at the caller, who reports it; once the folder can be
    written again, new files come again."""
    folder = StagingFolder(tmp_path / "staging" / "9")
    fd, _ = folder.new_file()
    os.close(fd)
    while folder.folder.exists():  # the filler may add a file while it goes
        shutil.rmtree(folder.folder, ignore_errors=True)
    with pytest.raises(FileNotFoundError):
        for _ in range(10):  # files already made ahead come first; then the error
            fd, _ = folder.new_file()
            os.close(fd)
    folder.folder.mkdir(parents=True)
    again = [folder.new_file() for _ in range(6)]  # a file made before the loss may still come
    for fd, _ in again:
        os.close(fd)
    assert again[-1][1].exists()
    folder.close()
