"""Reading DICOM media: the files a DICOMDIR references (PS3.10 8, PS3.3 F.3).

File IDs on media are up to eight components of uppercase letters, digits and underscores,
without a suffix. Mounted media do not always keep the case or drop ISO 9660's `;1`
version, so each component is matched against the folder's entries without regard to case.
"""

from __future__ import annotations

import os
from pathlib import Path

from pacscli.dicom.uids import MEDIA_STORAGE_DIRECTORY
from pacscli.errors import InvalidDicomError

DICOMDIR_NAME = "DICOMDIR"


def is_dicomdir_name(name: str) -> bool:
    """True for a file named DICOMDIR (any case), the name media give their directory."""
    return name.upper() == DICOMDIR_NAME


def _normal(name: str) -> str:
    """A directory entry's name as a File ID component compares with it."""
    name = name.upper()
    if name.endswith(";1"):
        name = name[:-2]
    return name.rstrip(".")


class _Resolver:
    """Finds the file a File ID names under a folder, matching components without case."""

    def __init__(self, root: str) -> None:
        self.root = root
        self._listings: dict[str, dict[str, str]] = {}

    def _entries(self, folder: str) -> dict[str, str]:
        if folder not in self._listings:
            try:
                names = sorted(os.listdir(folder))
            except OSError:
                names = []
            self._listings[folder] = {_normal(n): n for n in reversed(names)}
        return self._listings[folder]

    def resolve(self, components: list[str]) -> str | None:
        current = self.root
        for component in components:
            exact = os.path.join(current, component)
            if os.path.exists(exact):
                current = exact
                continue
            match = self._entries(current).get(_normal(component))
            if match is None:
                return None
            current = os.path.join(current, match)
        return current if os.path.isfile(current) else None


def _components(value: object) -> list[str]:
    """A ReferencedFileID's components, refusing any that could leave the file-set's folder."""
    raw = value.split("\\") if isinstance(value, str) else value  # a str or a MultiValue
    parts = [str(p).strip() for p in raw]  # type: ignore[attr-defined]
    if not parts or any(not p or p in (".", "..") or any(c in p for c in "/\\\x00:")
                        for p in parts):
        raise ValueError(f"unsafe or empty File ID {'/'.join(parts)!r}")
    return parts


def referenced_files(dicomdir: Path) -> tuple[list[str], list[tuple[str, str]]]:
    """The files a DICOMDIR references, in its order, found under its folder; and the
    references that name no file there, as (file ID, why).

    Raises InvalidDicomError when the DICOMDIR itself cannot be read, or is an instance
    that only bears the name.
    """
    import pydicom

    try:
        ds = pydicom.dcmread(dicomdir, defer_size=256)
        records = ds.get("DirectoryRecordSequence") or []
        media_class = ds.file_meta.get("MediaStorageSOPClassUID")
    except Exception as exc:  # pydicom raises many kinds on a damaged file
        raise InvalidDicomError(f"unreadable DICOMDIR: {exc}") from exc
    if media_class != MEDIA_STORAGE_DIRECTORY and "DirectoryRecordSequence" not in ds:
        raise InvalidDicomError(f"not a DICOMDIR: its SOP class is {media_class}")
    resolver = _Resolver(os.path.dirname(os.path.abspath(dicomdir)))
    found: list[str] = []
    missing: list[tuple[str, str]] = []
    seen: set[str] = set()
    for record in records:
        try:
            value = record.get("ReferencedFileID")
        except Exception:  # a value that does not decode
            continue
        if not value:
            continue
        try:
            components = _components(value)
        except ValueError as exc:  # named as written, its components joined by '/'
            raw = value.split("\\") if isinstance(value, str) else list(value)
            missing.append(("/".join(str(p).strip() for p in raw), str(exc)))
            continue
        path = resolver.resolve(components)
        if path is None:
            missing.append(("/".join(components), "referenced by the DICOMDIR but not found"))
        elif path not in seen:
            seen.add(path)
            found.append(path)
    return found, missing
