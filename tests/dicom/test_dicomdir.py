"""Reading a DICOMDIR's references: in its order, without regard to case, never outside."""

from __future__ import annotations

import shutil
from pathlib import Path

import pydicom
import pytest
from pydicom.data import get_testdata_file
from pydicom.fileset import FileSet

from pacscli.dicom.dicomdir import _components, is_dicomdir_name, referenced_files
from pacscli.errors import InvalidDicomError

DICOMDIR = Path(str(get_testdata_file("DICOMDIR")))


def test_references_in_order() -> None:
    found, missing = referenced_files(DICOMDIR)
    assert missing == []
    assert found == [str(i.path) for i in FileSet(pydicom.dcmread(DICOMDIR))]


def test_case_and_iso9660_versions_do_not_matter(tmp_path: Path) -> None:
    media = tmp_path / "media"
    shutil.copytree(DICOMDIR.parent / "TINY_ALPHA", media)
    for path in sorted(media.rglob("IM*")):
        path.rename(path.with_name(path.name.lower() + ";1"))
    found, missing = referenced_files(media / "DICOMDIR")
    assert len(found) == 50 and missing == []
    assert all(f.endswith(";1") for f in found)


def test_unsafe_file_ids_are_refused() -> None:
    for value in (["..", "etc", "passwd"], ["A", "/B"], ["A", ""], "A\\..\\B"):
        with pytest.raises(ValueError):
            _components(value)
    assert _components(["A", "B1"]) == ["A", "B1"]
    assert _components("A\\B") == ["A", "B"]


def test_an_unsafe_reference_is_named_as_a_path(tmp_path: Path) -> None:
    """It was named as a Python list: "['..', '..', 'etc', 'passwd']"."""
    media = tmp_path / "media"
    shutil.copytree(DICOMDIR.parent / "TINY_ALPHA", media)
    ds = pydicom.dcmread(media / "DICOMDIR")
    ds.DirectoryRecordSequence[-1].ReferencedFileID = ["..", "..", "etc", "passwd"]
    ds.save_as(media / "DICOMDIR")
    found, missing = referenced_files(media / "DICOMDIR")
    assert len(found) == 49
    assert missing == [("../../etc/passwd", "unsafe or empty File ID '../../etc/passwd'")]


def test_not_a_dicomdir(tmp_path: Path) -> None:
    junk = tmp_path / "DICOMDIR"
    junk.write_text("nope")
    with pytest.raises(InvalidDicomError):
        referenced_files(junk)
    assert is_dicomdir_name("dicomdir") and not is_dicomdir_name("DICOMDIR.bak")
