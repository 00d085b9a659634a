"""Where things live in an archive folder.

    ARCHIVE/
      index.sqlite                     the SQLite index (WAL mode), derived from the files
      studies/AB/CD/STUDY/SERIES/SOP.dcm
      .staging/PID/                    files being received or written by process PID
      .replaced/                       earlier versions of instances replaced under on_conflict=replace
      .quarantine/                     corrupt files moved aside by `pacs verify --repair`
      .locks/                          lock files serialising puts of the same instance

AB and CD are the first four hex digits of the SHA-1 of the Study Instance UID, so the two
fan-out levels hold at most 256 entries each, whatever the number of studies. Every UID is
checked (digits and dots, 1-64 characters) before it names a folder, so no UID can escape.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

INDEX_FILE = "index.sqlite"
STUDIES_DIR = "studies"
STAGING_DIR = ".staging"
REPLACED_DIR = ".replaced"
QUARANTINE_DIR = ".quarantine"
LOCKS_DIR = ".locks"
INSTANCE_SUFFIX = ".dcm"


def instance_relpath(study_uid: str, series_uid: str, sop_uid: str) -> str:
    """The archive-relative path of an instance; the UIDs must already be checked as safe."""
    digest = hashlib.sha1(study_uid.encode("ascii")).hexdigest()
    return f"{STUDIES_DIR}/{digest[:2]}/{digest[2:4]}/{study_uid}/{series_uid}/{sop_uid}{INSTANCE_SUFFIX}"


def is_hidden(relpath: Path | str) -> bool:
    """True for anything inside a dot-folder (staging, quarantine...) of the archive."""
    return any(part.startswith(".") for part in Path(relpath).parts)
