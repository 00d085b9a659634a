"""The files that path arguments name (`pacs store`, `pacs index`): a folder is walked, and
whatever in it will not be read is reported, never passed over in silence.

A FIFO is never opened (reading one waits for ever); links to files are followed, links to
folders are not (they can loop); a folder that cannot be listed is a failure, since the
files in it are missed.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator

from pacscli.errors import PacsError
from pacscli.records import Record, failed, skipped


def walk(top: str, *, exclude: Callable[[str], bool] = lambda path: False) -> Iterator[list[str] | Record]:
    """Walk the folder `top` depth first, each folder's entries in name order. For each
    folder, yield the records of its entries that will not be read (skipped, or failed when
    a subfolder cannot be listed), then the list of its regular files, before its
    subfolders. Paths `exclude` accepts are passed over without a word (the archive's own
    folders when indexing in place)."""
    stack = [top]
    while stack:
        folder = stack.pop()
        try:
            entries = sorted(os.scandir(folder), key=lambda e: e.name)
        except OSError as exc:
            yield failed(PacsError(f"cannot list {folder}: {exc.strerror or exc}",
                                   code="unreadable"), path=folder)
            continue
        files, folders = [], []
        for entry in entries:
            if exclude(entry.path):
                continue
            try:
                if entry.is_dir(follow_symlinks=False):
                    folders.append(entry.path)
                elif entry.is_file():
                    files.append(entry.path)
                else:
                    yield not_a_file(entry.path)
            except OSError as exc:
                yield skipped(entry.path, "not-a-file", f"cannot stat: {exc.strerror or exc}")
        yield files
        stack.extend(reversed(folders))


def not_a_file(path: str) -> Record:
    """The record of a path that is not a regular file, saying what it is."""
    if os.path.isdir(path):
        reason = "a link to a folder (not followed)" if os.path.islink(path) else "a folder"
    elif os.path.islink(path) and not os.path.exists(path):
        reason = "a symbolic link to nothing"
    else:
        reason = "not a regular file (a FIFO, socket or device)"
    return skipped(path, "not-a-file", reason)
