"""The constant tables that stand in for pydicom's dictionaries on the fast paths agree with
pydicom's own, and reading a common file with them loads no pydicom."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pydicom
import pynetdicom  # noqa: F401 - it adds the newest transfer syntaxes to pydicom's dictionary
from pydicom.charset import python_encoding
from pydicom.datadict import DicomDictionary, RepeatersDictionary, dictionary_VR, tag_for_keyword
from pydicom.uid import UID, UID_dictionary

from pacscli.dicom import identity
from pacscli.dicom.attributes import ATTRIBUTE_TAGS, INDEXED_ATTRIBUTES
from pacscli.dicom.dictionary import CHARACTER_SET_TERMS, SEQUENCE_TAGS, dictionary_vr
from pacscli.dicom.uids import NATIVE_SYNTAXES, TRANSFER_SYNTAXES, is_encapsulated, uid_name
from tests.conftest import testdata

ROOT = Path(__file__).resolve().parents[2]


def pydicom_vr(tag: int) -> str | None:
    try:
        return str(dictionary_VR(tag))
    except KeyError:
        return None


def test_attribute_tags_are_pydicoms() -> None:
    assert {kw for kws in INDEXED_ATTRIBUTES.values() for kw in kws} <= set(ATTRIBUTE_TAGS)
    assert {kw: (tag_for_keyword(kw), dictionary_VR(kw)) for kw in ATTRIBUTE_TAGS} == ATTRIBUTE_TAGS


def test_sequence_tags_are_pydicoms() -> None:
    theirs = {tag for tag, entry in DicomDictionary.items() if entry[0] == "SQ"}
    assert not theirs - SEQUENCE_TAGS, f"add to SEQUENCE_TAGS: {sorted(map(hex, theirs - SEQUENCE_TAGS))}"
    assert not SEQUENCE_TAGS - theirs, f"drop from SEQUENCE_TAGS: {sorted(map(hex, SEQUENCE_TAGS - theirs))}"


def test_dictionary_vr_is_pydicoms() -> None:
    """Every dictionary tag, every repeating-group entry in even and odd groups, private tags
    in every odd group, and tags in no dictionary."""
    tags = set(DicomDictionary)
    for mask in RepeatersDictionary:
        for fill in ("0", "1", "2", "E", "F"):
            tags.add(int(mask.replace("x", fill), 16))
            tags.add(int(mask.replace("x", fill, 1).replace("x", "1"), 16))
    for group in range(0x0001, 0x10000, 2):
        tags.update((group << 16) | element for element in (0x0000, 0x0010, 0x1010, 0x2600, 0x3000))
    tags.update({0x00080001, 0x00100011, 0x7FE00011, 0xFFFE00E0, 0x00000000})
    wrong = {hex(tag): (dictionary_vr(tag), pydicom_vr(tag)) for tag in sorted(tags)
             if dictionary_vr(tag) != pydicom_vr(tag)}
    assert not wrong


def test_sequences_and_private_tags_need_no_pydicom() -> None:
    code = ("import sys\nfrom pacscli.dicom.dictionary import dictionary_vr\n"
            "assert dictionary_vr(0x00081115) == 'SQ'\nassert dictionary_vr(0x00291010) is None\n"
            "assert dictionary_vr(0x00431029) is None\nassert 'pydicom' not in sys.modules\n"
            "assert dictionary_vr(0x00100010) == 'PN'\nassert 'pydicom' in sys.modules\n")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT)


def test_character_set_terms_are_pydicoms() -> None:
    assert set(python_encoding) == CHARACTER_SET_TERMS


def test_transfer_syntaxes_are_pydicoms() -> None:
    """pydicom's, as pynetdicom extends them: with pynetdicom loaded, as `pacs store` always
    ran before it stopped loading either."""
    theirs = {uid: entry[0] for uid, entry in UID_dictionary.items() if entry[1] == "Transfer Syntax"}
    assert theirs == TRANSFER_SYNTAXES
    assert set(TRANSFER_SYNTAXES) >= NATIVE_SYNTAXES
    for uid in TRANSFER_SYNTAXES:
        assert is_encapsulated(uid) == UID(uid).is_encapsulated, uid
        assert uid_name(uid) == UID(uid).name
    assert uid_name("1.2.840.10008.5.1.4.1.1.2") == "CT Image Storage"
    # out of the table, pydicom answers: an error for what is not a transfer syntax
    for other in ("1.2.3.4", "1.2.840.10008.5.1.4.1.1.2", "", " 1.2.840.10008.1.2.4.50\n"):
        assert outcome(is_encapsulated, other) == outcome(lambda uid: UID(uid).is_encapsulated, other)
    assert outcome(is_encapsulated, "1.2.3.4") == (ValueError, "UID is not a transfer syntax.")
    assert is_encapsulated(" 1.2.840.10008.1.2.4.50\n")  # UID() strips whitespace


def outcome(function: Callable[[str], object], uid: str) -> object:
    try:
        return function(uid)
    except ValueError as exc:
        return type(exc), str(exc)


def test_fast_syntaxes_are_pydicoms_flags() -> None:
    """The walker's syntaxes: little endian and not deflated, by pydicom's own UID flags."""
    theirs = {}
    for uid, (name, kind, *_) in pydicom.uid.UID_dictionary.items():
        if kind == "Transfer Syntax" and "Deflate" not in name:
            syntax = UID(uid)
            if syntax.is_little_endian and not syntax.is_deflated:
                theirs[str(uid)] = bool(syntax.is_implicit_VR)
    assert theirs == identity._FAST_SYNTAXES


def test_reading_common_files_loads_no_pydicom() -> None:
    """The fast paths of identity (a Part 10 file, a received dataset) and the DIMSE command
    codec run without pydicom."""
    code = f"""
import sys
from pathlib import Path
from pacscli.dicom.identity import read_instance_info, read_received_info
from pacscli.net.dimse import C_ECHO_RQ, decode_command, encode_command
for name in ("CT_small.dcm", "MR_small_implicit.dcm", "SC_rgb_jpeg_dcmtk.dcm"):
    path = Path({str(testdata("explicit_le").parent)!r}) / name
    info = read_instance_info(path)
    data = path.read_bytes()[info.dataset_offset:]
    assert read_received_info(data, info.transfer_syntax) == read_instance_info(path).__class__(
        **{{**vars(info), "dataset_offset": 0, "meta_sop_uid": None, "source_aet": None}})
assert decode_command(encode_command(CommandField=C_ECHO_RQ, MessageID=1)).message_id == 1
print(sorted(m for m in sys.modules if m.split(".")[0] in ("pydicom", "pynetdicom", "numpy")))
"""
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"
