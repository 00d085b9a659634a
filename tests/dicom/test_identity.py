"""The hand-rolled readers of identity.py agree with pydicom's on real files."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydicom.data import get_testdata_file

from pacscli.dicom.identity import read_file_meta, read_meta_values, seek_dataset
from pacscli.errors import InvalidDicomError

TEST_FILES = sorted(Path(str(get_testdata_file("CT_small.dcm"))).parent.glob("*.dcm"))


@pytest.mark.parametrize("path", TEST_FILES, ids=lambda p: p.name)
def test_meta_values_and_dataset_offset_match_pydicom(path: Path) -> None:
    try:
        with path.open("rb") as fp:
            meta, offset = read_file_meta(fp)
    except InvalidDicomError:
        with path.open("rb") as fp, pytest.raises(InvalidDicomError):
            read_meta_values(fp)
        return
    with path.open("rb") as fp:
        values, fast_offset = read_meta_values(fp)
        assert fp.tell() == offset
    with path.open("rb") as fp:
        assert seek_dataset(fp) == offset == fast_offset
    for elem in meta:
        if elem.tag == 0x00020000:  # the group length is how the fast reader finds the end
            continue
        raw = values[int(elem.tag)]
        expected = elem.value if isinstance(elem.value, bytes) else str(elem.value)
        text = raw.decode("latin-1") if isinstance(expected, str) else raw
        if isinstance(expected, str):
            assert text.rstrip(" \x00") == expected.rstrip(" \x00"), elem.keyword
        else:
            assert text == expected, elem.keyword
