"""The hand-rolled readers of identity.py agree with pydicom's on real files.

`read_instance_info` and `read_received_info` take a fast element walker
(pacscli.dicom.header) in the common case and pydicom's reader otherwise; the index rows
`serve` writes and `index --rebuild` recreates depend on both giving the same answer, so
these tests compare the two paths value by value (`_pydicom_instance_info` and
`_pydicom_received_info` are the pydicom path on its own).
"""

from __future__ import annotations

import random
import struct
from collections.abc import Callable
from dataclasses import replace
from io import BytesIO
from pathlib import Path
from typing import Any

import pydicom
import pytest
from pydicom.charset import python_encoding
from pydicom.data import get_charset_files, get_testdata_file, get_testdata_files
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian
from pydicom.valuerep import EXPLICIT_VR_LENGTH_32, STANDARD_VR

from pacscli.dicom import identity
from pacscli.dicom.header import KNOWN_VRS, LONG_VRS
from pacscli.dicom.identity import (
    InstanceInfo,
    _fast_instance_info,
    _fast_received_info,
    _pydicom_instance_info,
    _pydicom_received_info,
    read_file_meta,
    read_instance_info,
    read_meta_values,
    read_raw_top_level,
    read_received_head,
    read_received_info,
    seek_dataset,
)
from pacscli.errors import InvalidDicomError, UnsafeUIDError

TEST_FILES = sorted(Path(str(get_testdata_file("CT_small.dcm"))).parent.glob("*.dcm"))
# Every file pydicom ships for its tests, DICOM or not, character set samples included.
ALL_FILES = sorted({Path(f) for f in get_testdata_files() + get_charset_files() if Path(f).is_file()})

IMPLICIT, EXPLICIT = str(ImplicitVRLittleEndian), str(ExplicitVRLittleEndian)
CT_CLASS = b"1.2.840.10008.5.1.4.1.1.2"

pytestmark = pytest.mark.filterwarnings("ignore")  # pydicom warns about its odd test files

Outcome = InstanceInfo | None | tuple[type, str]


def outcome(func: Callable[..., InstanceInfo | None], *args: Any) -> Outcome:
    """What a reader gives: the InstanceInfo, or the error's type and message."""
    try:
        return func(*args)
    except (InvalidDicomError, UnsafeUIDError) as exc:
        return type(exc), str(exc)


def received_alike(data: bytes, syntax: str) -> Outcome:
    """read_received_info's outcome on data, checked equal to the pydicom path's."""
    result = outcome(read_received_info, data, syntax)
    assert result == outcome(_pydicom_received_info, data, syntax)
    return result


# --- raw datasets, written by hand so that nothing normalises them ---------------------

def element(tag: int, vr: str, value: bytes, implicit: bool = False) -> bytes:
    group, number = tag >> 16, tag & 0xFFFF
    if implicit:
        return struct.pack("<HHI", group, number, len(value)) + value
    if vr.encode() in LONG_VRS:
        return struct.pack("<HH2sHI", group, number, vr.encode(), 0, len(value)) + value
    return struct.pack("<HH2sH", group, number, vr.encode(), len(value)) + value


def item(content: bytes, defined: bool) -> bytes:
    if defined:
        return struct.pack("<HHI", 0xFFFE, 0xE000, len(content)) + content
    return struct.pack("<HHI", 0xFFFE, 0xE000, 0xFFFFFFFF) + content + struct.pack("<HHI", 0xFFFE, 0xE00D, 0)


def sequence(tag: int, items: bytes, implicit: bool, defined: bool = False) -> bytes:
    """An SQ element holding the given items, of defined or undefined length."""
    if defined:
        return element(tag, "SQ", items, implicit)
    head = struct.pack("<HHI", tag >> 16, tag & 0xFFFF, 0xFFFFFFFF) if implicit else \
        struct.pack("<HH2sHI", tag >> 16, tag & 0xFFFF, b"SQ", 0, 0xFFFFFFFF)
    return head + items + struct.pack("<HHI", 0xFFFE, 0xE0DD, 0)


def identity_elements(implicit: bool, **values: bytes) -> bytes:
    """The UIDs and a few indexed attributes, in tag order, overridable by keyword."""
    defaults = {
        "SpecificCharacterSet": b"ISO_IR 100", "SOPClassUID": CT_CLASS, "SOPInstanceUID": b"1.2.3.3",
        "Modality": b"CT", "PatientName": b"OUTER^NAME", "PatientID": b"OUTER",
        "StudyInstanceUID": b"1.2.3.1", "SeriesInstanceUID": b"1.2.3.2", "SeriesNumber": b"7 ",
    }
    defaults.update(values)
    parts = []
    for keyword, value in defaults.items():
        tag = pydicom.datadict.tag_for_keyword(keyword)
        assert tag is not None
        parts.append((tag, element(tag, pydicom.datadict.dictionary_VR(tag), value, implicit)))
    return b"".join(part for _, part in sorted(parts))


def pixel_data(implicit: bool, length: int = 16) -> bytes:
    return element(0x7FE00010, "OW", bytes(length), implicit)


def nested_sequences(implicit: bool) -> bytes:
    """Undefined-length sequences (nested, mixed item kinds) holding indexed tags, before
    the top-level ones: (0008,1140) sorts before (0010,0010)."""
    inner = (element(0x00100010, "PN", b"INNER^NAME", implicit)
             + sequence(0x0040A730, item(element(0x00100020, "LO", b"DEEP", implicit), True)
                        + item(b"", False) + item(b"", True), implicit))
    items = (item(element(0x00100020, "LO", b"INNER", implicit) + inner, False)
             + item(element(0x0020000D, "UI", b"9.9.9", implicit), True)
             + item(sequence(0x00081199, item(element(0x00080018, "UI", b"8.8", implicit), False),
                             implicit), True))
    return sequence(0x00081140, items, implicit)


def part10(dataset: bytes, syntax: bytes = EXPLICIT.encode(), meta: bytes = b"",
           sop_uid: bytes = b"1.2.3.3") -> bytes:
    """A Part 10 file: preamble, DICM, a file meta with its group length, the dataset."""
    body = (element(0x00020001, "OB", b"\x00\x01") + element(0x00020002, "UI", CT_CLASS)
            + element(0x00020003, "UI", sop_uid) + element(0x00020010, "UI", syntax) + meta)
    return bytes(128) + b"DICM" + element(0x00020000, "UL", struct.pack("<I", len(body))) + body + dataset


# --- real files -------------------------------------------------------------------------

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
        vrs: dict[int, bytes] = {}
        values, fast_offset = read_meta_values(fp, vrs)
        assert fp.tell() == offset
    with path.open("rb") as fp:
        assert seek_dataset(fp) == offset == fast_offset
    for elem in meta:
        if elem.tag == 0x00020000:  # the group length is how the fast reader finds the end
            continue
        assert vrs[int(elem.tag)].decode() == elem.VR, elem.keyword
        raw = values[int(elem.tag)]
        expected = elem.value if isinstance(elem.value, bytes) else str(elem.value)
        if isinstance(expected, str):
            assert raw.decode("latin-1").rstrip(" \x00") == expected.rstrip(" \x00"), elem.keyword
        else:
            assert raw == expected, elem.keyword


@pytest.mark.parametrize("path", ALL_FILES, ids=lambda p: p.name)
def test_instance_info_of_every_test_file_matches_pydicom(path: Path, tmp_path: Path) -> None:
    expected = outcome(_pydicom_instance_info, path)
    assert outcome(read_instance_info, path) == expected
    if not isinstance(expected, InstanceInfo):
        return
    # the same dataset as received: the bytes after the file meta, and as a raw file
    data = path.read_bytes()[expected.dataset_offset:]
    syntax = expected.transfer_syntax
    received = received_alike(data, syntax)
    raw_file = tmp_path / "received.raw"
    raw_file.write_bytes(data)
    assert outcome(read_received_info, raw_file, syntax) == received
    if isinstance(received, InstanceInfo):  # the dataset's own attributes, meta aside
        assert received.attributes == expected.attributes
        assert (received.study_uid, received.sop_uid) == (expected.study_uid, expected.sop_uid)


def _fast_outcome(path: Path) -> str:
    try:
        return "fallback" if _fast_instance_info(path) is None else "fast"
    except (InvalidDicomError, UnsafeUIDError):
        return "fast"  # the same UID checks as the pydicom path, on the same values


def test_the_fast_path_covers_the_common_files_and_leaves_the_rest() -> None:
    taken = {path.name: _fast_outcome(path) for path in ALL_FILES}
    assert sum(kind == "fast" for kind in taken.values()) >= 120  # the comparisons are not vacuous
    for name in ("CT_small.dcm", "MR_small_implicit.dcm", "JPEG2000.dcm", "MR_small_RLE.dcm",
                 "test-SR.dcm", "rtplan.dcm", "rtdose_rle.dcm", "chrSQEncoding.dcm"):
        assert taken[name] == "fast", name  # rtdose_rle writes UN for its indexed tags
    for name in ("MR_small_bigendian.dcm", "image_dfl.dcm", "no_meta.dcm", "no_meta_group_length.dcm",
                 "chrH31.dcm", "chrX1.dcm", "badVR.dcm", "SC_rgb_jpeg.dcm", "UN_sequence.dcm"):
        assert taken[name] == "fallback", name


@pytest.mark.parametrize("name", ["rtplan.dcm", "test-SR.dcm", "CT_small.dcm", "nested_priv_SQ.dcm",
                                  "priv_SQ.dcm", "rtdose.dcm"])
@pytest.mark.parametrize("implicit", [True, False], ids=["implicit", "explicit"])
def test_rewritten_files_with_undefined_lengths_match_pydicom(name: str, implicit: bool) -> None:
    """Real nested structures, every sequence and item rewritten with undefined length."""
    ds = pydicom.dcmread(get_testdata_file(name))

    def undefined(dataset: pydicom.Dataset) -> None:
        for elem in dataset:
            if elem.VR == "SQ":
                elem.is_undefined_length = True
                for child in elem.value:
                    child.is_undefined_length_sequence_item = True
                    undefined(child)

    undefined(ds)
    for keyword, uid in (("SOPClassUID", CT_CLASS.decode()), ("SOPInstanceUID", "1.2.3.3"),
                         ("StudyInstanceUID", "1.2.3.1"), ("SeriesInstanceUID", "1.2.3.2")):
        if keyword not in ds:  # the private-sequence samples have no identity
            setattr(ds, keyword, uid)
    syntax = IMPLICIT if implicit else EXPLICIT
    ds.file_meta = pydicom.dataset.FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.file_meta.TransferSyntaxUID = syntax
    fp = BytesIO()
    ds.save_as(fp, enforce_file_format=True)
    fp.seek(0)
    data = fp.getvalue()[seek_dataset(fp):]
    fast = _fast_received_info(data, syntax)
    assert fast is not None, "the walker should handle these sequences"
    assert fast == received_alike(data, syntax)


# --- hand-made edge cases ------------------------------------------------------------------

@pytest.mark.parametrize("implicit", [True, False], ids=["implicit", "explicit"])
def test_nested_sequences_are_skipped_and_their_tags_not_collected(implicit: bool) -> None:
    # a private sequence (implicit VR: an unknown tag whose value starts with an item) and a
    # defined-length one, both holding PatientID
    private = (element(0x00090010, "LO", b"ACME", implicit)
               + sequence(0x00091010, item(element(0x00100020, "LO", b"PRIVATE", implicit), False), implicit))
    defined = sequence(0x00081110, item(element(0x00100020, "LO", b"DEFINED", implicit), True),
                       implicit, defined=True)
    data = _sorted_top_level(nested_sequences(implicit) + private + defined + identity_elements(implicit),
                             implicit) + pixel_data(implicit)
    syntax = IMPLICIT if implicit else EXPLICIT
    fast = _fast_received_info(data, syntax)
    assert fast is not None, "the walker should handle these sequences"
    assert fast == received_alike(data, syntax)
    assert fast.attributes["PatientID"] == "OUTER"
    assert fast.attributes["PatientName"] == "OUTER^NAME"
    assert fast.study_uid == "1.2.3.1" and fast.sop_uid == "1.2.3.3"

    # without the top-level ones, a tag inside a sequence is still not taken
    bare = _sorted_top_level(nested_sequences(implicit)
                             + identity_elements(implicit, PatientID=b"", PatientName=b""), implicit)
    fast = _fast_received_info(bare, syntax)
    assert fast is not None and fast == received_alike(bare, syntax)
    assert fast.attributes["PatientID"] is None and fast.attributes["PatientName"] is None


def _sorted_top_level(data: bytes, implicit: bool) -> bytes:
    """The top-level elements of data in tag order, as a real writer would put them."""
    elements: list[tuple[int, bytes]] = []
    pos = 0
    while pos < len(data):
        end = _element_end(data, pos, implicit)
        group, number = struct.unpack_from("<HH", data, pos)
        elements.append(((group << 16) | number, data[pos:end]))
        pos = end
    return b"".join(raw for _, raw in sorted(elements, key=lambda e: e[0]))


def _element_end(data: bytes, pos: int, implicit: bool) -> int:
    """Where the element at pos ends (undefined-length sequences walked with pydicom)."""
    fp = BytesIO(data)
    fp.seek(pos)
    generator = pydicom.filereader.data_element_generator(fp, implicit, True)
    next(generator)
    return fp.tell()


@pytest.mark.parametrize("implicit", [True, False], ids=["implicit", "explicit"])
def test_truncated_datasets_read_as_pydicom_reads_them(implicit: bool) -> None:
    data = _sorted_top_level(nested_sequences(implicit) + identity_elements(implicit), implicit)
    syntax = IMPLICIT if implicit else EXPLICIT
    whole = received_alike(data + pixel_data(implicit), syntax)
    assert isinstance(whole, InstanceInfo)
    outcomes = {cut: received_alike(data[:cut], syntax) for cut in range(len(data))}
    assert any(not isinstance(result, InstanceInfo) for result in outcomes.values())
    assert _fast_received_info(data[:-3], syntax) is None  # cut inside a value: pydicom decides


def test_non_ascii_values_take_pydicom_and_decode_by_their_character_set() -> None:
    for charset, name, expected in [
        (b"ISO_IR 100", "Müller^Hans".encode("latin-1"), "Müller^Hans"),
        (b"ISO_IR 192", "Ärzte^Ö".encode(), "Ärzte^Ö"),
        (b"\\ISO 2022 IR 87", b"Yamada^Tarou=\x1b$B;3ED\x1b(B^\x1b$BB@O:\x1b(B", "Yamada^Tarou=山田^太郎"),
    ]:
        for implicit in (True, False):
            data = identity_elements(implicit, SpecificCharacterSet=charset, PatientName=name)
            syntax = IMPLICIT if implicit else EXPLICIT
            assert _fast_received_info(data, syntax) is None
            info = received_alike(data, syntax)
            assert isinstance(info, InstanceInfo)
            assert info.attributes["PatientName"] == expected
            assert info.specific_character_set == charset.decode().rstrip()


def test_the_walker_knows_the_vrs_pydicom_knows() -> None:
    """Explicit VR headers are parsed as pydicom parses them (2- or 4-byte lengths)."""
    assert {vr.encode() for vr in STANDARD_VR} == KNOWN_VRS
    assert {vr.encode() for vr in EXPLICIT_VR_LENGTH_32} == LONG_VRS


def test_ascii_decodes_alike_in_every_character_set_pydicom_knows() -> None:
    """Why the fast path may decode ASCII values without their character set (bar ESC)."""
    text = bytes(b for b in range(128) if b != 0x1B)
    for encoding in python_encoding.values():
        assert text.decode(encoding) == text.decode("ascii"), encoding


@pytest.mark.parametrize("implicit", [True, False], ids=["implicit", "explicit"])
def test_uid_padding_and_leading_zeros(implicit: bool) -> None:
    data = identity_elements(implicit, StudyInstanceUID=b"1.2.03\x00", SeriesInstanceUID=b"1.2.3 ",
                             SOPInstanceUID=b"01.2.3\x00", SOPClassUID=CT_CLASS + b"\x00")
    syntax = IMPLICIT if implicit else EXPLICIT
    fast = _fast_received_info(data, syntax)
    assert fast is not None and fast == received_alike(data, syntax)
    assert (fast.study_uid, fast.series_uid, fast.sop_uid) == ("1.2.03", "1.2.3", "01.2.3")
    assert fast.sop_class_uid == CT_CLASS.decode()


@pytest.mark.parametrize(("raw", "expected", "fast"), [
    (b" 12", "12", True), (b"007", "007", True), (b"12 ", "12", True), (b"12\x00", "12", True),
    (b"", None, True), (b" ", None, True), (b"1\\ 2", "1\\2", True), (b" \\12", " \\12", True),
    (b"+3", "+3", True), (b"1 \\", "1\\", True), (b"1.0", "1.0", False), (b"1A", "1A", False),
])
def test_integer_strings_as_pydicom_gives_them(raw: bytes, expected: str | None, fast: bool) -> None:
    for implicit in (True, False):
        data = identity_elements(implicit, SeriesNumber=raw, InstanceNumber=raw, NumberOfFrames=raw)
        syntax = IMPLICIT if implicit else EXPLICIT
        assert (_fast_received_info(data, syntax) is not None) is fast
        info = received_alike(data, syntax)
        assert isinstance(info, InstanceInfo)
        assert info.attributes["SeriesNumber"] == info.attributes["InstanceNumber"] == expected
        assert info.attributes["NumberOfFrames"] == expected


@pytest.mark.parametrize(("keyword", "raw", "expected"), [
    ("PatientName", b"Doe^John  ", "Doe^John"), ("PatientName", b"Doe^John==\x00", "Doe^John"),
    ("PatientName", b"A^B\\C^D ", "A^B\\C^D"), ("PatientName", b"  ", None),
    ("PatientID", b"  ID 1 \x00", "  ID 1"), ("OtherPatientIDs", b"A \\B \\ ", "A\\B\\"),
    ("StudyDate", b"20240101 ", "20240101"), ("StudyTime", b"1200 \\13 ", "1200 \\13"),
    ("Modality", b"CT\x00", "CT"), ("SeriesDescription", b"\t", "\t"), ("AccessionNumber", b"\x00", None),
])
def test_text_values_as_pydicom_gives_them(keyword: str, raw: bytes, expected: str | None) -> None:
    for implicit in (True, False):
        data = identity_elements(implicit, **{keyword: raw})
        syntax = IMPLICIT if implicit else EXPLICIT
        fast = _fast_received_info(data, syntax)
        assert fast is not None and fast == received_alike(data, syntax)
        assert fast.attributes[keyword] == expected


@pytest.mark.parametrize("implicit", [True, False], ids=["implicit", "explicit"])
def test_a_repeated_tag_reads_as_pydicom_reads_it(implicit: bool) -> None:
    data = identity_elements(implicit) + element(0x00100020, "LO", b"SECOND", implicit)
    syntax = IMPLICIT if implicit else EXPLICIT
    fast = _fast_received_info(data, syntax)
    assert fast is not None and fast == received_alike(data, syntax)
    assert fast.attributes["PatientID"] == "SECOND"


def test_unusual_encodings_fall_back() -> None:
    implicit_data = identity_elements(True)
    explicit_data = identity_elements(False)
    cases = [
        (explicit_data, IMPLICIT),  # explicit VR bytes under an implicit syntax: pydicom switches
        (implicit_data, EXPLICIT),
        (explicit_data, "1.2.840.10008.1.2.2"),  # big endian
        (explicit_data, "1.2.840.10008.1.2.1.99"),  # deflated
        (explicit_data, "1.2.3.4"),  # not a transfer syntax
        # PatientName written as LO: pydicom converts by the VR written
        (explicit_data.replace(b"\x10\x00\x10\x00PN", b"\x10\x00\x10\x00LO"), EXPLICIT),
        # an undefined-length OB before the indexed tags: pydicom scans for its delimiter
        (sequence(0x00091010, b"", False).replace(b"SQ", b"OB") + explicit_data, EXPLICIT),
        (identity_elements(False, SpecificCharacterSet=b"ISO-8859-1"), EXPLICIT),  # unknown term
        (identity_elements(False, StudyDate=b"2024\x1b0101"), EXPLICIT),  # an ESC
    ]
    for data, syntax in cases:
        assert _fast_received_info(data, syntax) is None, syntax
        received_alike(data, syntax)


@pytest.mark.parametrize("implicit", [False, True])
def test_raw_top_level_values_are_the_bytes_as_stored(implicit: bool) -> None:
    syntax = IMPLICIT if implicit else EXPLICIT
    data = (nested_sequences(implicit) + identity_elements(implicit, SOPInstanceUID=b"1.2.3.3\x00 ")
            + pixel_data(implicit) + element(0x00100020, "LO", b"AFTER", implicit))
    wanted = frozenset({0x00080018, 0x0020000D, 0x00100020, 0x00080050})
    fp = BytesIO(b"meta" + data)
    fp.seek(4)
    raw = read_raw_top_level(fp, syntax, wanted)
    # top-level values only, read up to the pixel data; absent tags are left out
    assert raw == {0x00080018: b"1.2.3.3\x00 ", 0x0020000D: b"1.2.3.1", 0x00100020: b"OUTER"}
    ds = pydicom.filereader.read_dataset(BytesIO(data), implicit, True, specific_tags=list(wanted),
                                         stop_when=identity._before_pixels)
    assert raw == {tag: ds.get_item(tag).value for tag in wanted if tag in ds}


def test_raw_top_level_leaves_the_unusual_to_pydicom() -> None:
    explicit_data = identity_elements(False)
    wanted = frozenset({0x00080018})
    for data, syntax in [
        (explicit_data, "1.2.840.10008.1.2.2"),  # big endian
        (explicit_data, "1.2.840.10008.1.2.1.99"),  # deflated
        (explicit_data, "1.2.3.4"),  # not a transfer syntax
        (explicit_data, IMPLICIT),  # the VR encoding disagrees with the syntax
        (explicit_data[:-3], EXPLICIT),  # truncated
        (sequence(0x00091010, b"", False).replace(b"SQ", b"OB") + explicit_data, EXPLICIT),
    ]:
        assert read_raw_top_level(BytesIO(data), syntax, wanted) is None, syntax


@pytest.mark.parametrize("path", ALL_FILES, ids=lambda p: p.name)
def test_a_head_gives_the_whole_datasets_identity_or_none(path: Path) -> None:
    """`serve` reads a dataset's identity from its first piece while the rest arrives: cut
    anywhere, a head gives exactly the whole dataset's answer, or None (then the whole
    dataset is read after its last fragment). A head holding the whole header of an
    image gives the answer."""
    try:
        info = read_instance_info(path)
    except InvalidDicomError:
        return
    data = path.read_bytes()[info.dataset_offset:]
    received = outcome(read_received_info, data, info.transfer_syntax)
    pixel_data = data.find(b"\xe0\x7f\x10\x00")
    for cut in sorted({16, 256, 1024, 4096, len(data) // 2, len(data)}):
        head = read_received_head(data[:cut], info.transfer_syntax)
        assert head is None or head == received, cut
        if isinstance(received, InstanceInfo) and pixel_data > 0 and pixel_data + 12 <= cut \
                and _fast_received_info(data, info.transfer_syntax) is not None:
            assert head == received, cut


def test_a_head_with_an_unsafe_uid_gives_none() -> None:
    """The error is the whole dataset's to report, once it is in."""
    data = identity_elements(False, SOPInstanceUID=b"1..2") + element(0x7FE00010, "OW", b"\0" * 8)
    assert read_received_head(data, EXPLICIT) is None
    with pytest.raises(UnsafeUIDError):
        read_received_info(data, EXPLICIT)


def test_unsafe_and_missing_uids_raise_as_pydicom_does() -> None:
    for values in ({"StudyInstanceUID": b"1.2.a"}, {"SeriesInstanceUID": b""}, {"SOPInstanceUID": b"1..2"},
                   {"SOPClassUID": b""}, {"SOPInstanceUID": b"1" * 65}):
        data = identity_elements(False, **values)
        result = received_alike(data, EXPLICIT)
        assert isinstance(result, tuple), values
        with pytest.raises(result[0], match="UID"):
            read_received_info(data, EXPLICIT)


def test_non_default_pydicom_settings_take_pydicom(monkeypatch: pytest.MonkeyPatch) -> None:
    data = identity_elements(False, StudyDate=b"20240101")
    monkeypatch.setattr(pydicom.config, "datetime_conversion", True)
    assert _fast_received_info(data, EXPLICIT) is None
    assert received_alike(data, EXPLICIT).attributes["StudyDate"] == "20240101"  # type: ignore[union-attr]


# --- files: the meta, long headers, huge pixel data --------------------------------------

def test_part10_meta_values_and_padding(tmp_path: Path) -> None:
    meta = element(0x00020012, "UI", b"1.2.9") + element(0x00020016, "AE", b" STORESCU  ")
    path = tmp_path / "padded.dcm"
    path.write_bytes(part10(identity_elements(False) + pixel_data(False), EXPLICIT.encode() + b"\x00", meta,
                            sop_uid=b"1.2.3.3\t\x00"))  # UID() strips the tab too
    fast = _fast_instance_info(path)
    assert fast is not None and fast == outcome(_pydicom_instance_info, path)
    assert (fast.meta_sop_uid, fast.source_aet, fast.transfer_syntax) == ("1.2.3.3", "STORESCU", EXPLICIT)


@pytest.mark.parametrize("change", [-30, -8, 8, 100])
def test_a_wrong_group_length_is_read_as_pydicom_reads_it(tmp_path: Path, change: int) -> None:
    """The file meta is walked element by element, as pydicom does, whatever its group
    length says (`pacs store` used to skip such a file, which `pacs index` archives)."""
    data = bytearray(part10(identity_elements(False)))
    struct.pack_into("<I", data, 140, struct.unpack_from("<I", data, 140)[0] + change)
    path = tmp_path / "wrong_meta.dcm"
    path.write_bytes(bytes(data))
    expected = outcome(_pydicom_instance_info, path)
    assert isinstance(expected, InstanceInfo)
    assert _fast_instance_info(path) == expected
    assert outcome(read_instance_info, path) == expected
    with open(path, "rb") as fp:
        assert read_meta_values(fp)[1] == expected.dataset_offset


@pytest.mark.parametrize("name", ["CT_small.dcm", "MR_small_implicit.dcm", "JPEG2000.dcm",
                                  "MR_small_bigendian.dcm"])
@pytest.mark.parametrize("change", [-16, -8, 8, 18, 1000])
def test_the_dataset_is_found_whatever_the_group_length_says(tmp_path: Path, name: str,
                                                            change: int) -> None:
    """A group length off by whole elements (the meta's last one left out, the dataset's
    first one counted in) used to be believed: `pacs store` and serve's retrieves sent the
    dataset from the wrong byte, with a success status."""
    data = bytearray(Path(str(get_testdata_file(name))).read_bytes())
    struct.pack_into("<I", data, 140, struct.unpack_from("<I", data, 140)[0] + change)
    path = tmp_path / name
    path.write_bytes(bytes(data))
    with path.open("rb") as fp:
        expected = read_file_meta(fp)[1]
    with path.open("rb") as fp:
        assert read_meta_values(fp)[1] == expected == fp.tell()
    with path.open("rb") as fp:
        assert seek_dataset(fp) == expected == fp.tell()


@pytest.mark.parametrize("head", [64 * 1024, 512, 16])
def test_headers_longer_than_the_first_read(tmp_path: Path, head: int,
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(identity, "_HEAD", head)
    blob = element(0x00091010, "OB", bytes(100_000))  # a private blob before the indexed tags
    data = _sorted_top_level(struct.pack("<HH2sH", 9, 0x10, b"LO", 4) + b"ACME" + blob
                             + nested_sequences(False) + identity_elements(False), False)
    path = tmp_path / "long.dcm"
    path.write_bytes(part10(data + pixel_data(False)))
    raw = tmp_path / "long.raw"  # as received: no file meta
    raw.write_bytes(data + pixel_data(False))
    fast = _fast_instance_info(path)
    if head < 300:  # the first read does not even hold the file meta
        assert fast is None
        fast = read_instance_info(path)
    assert fast is not None and fast == outcome(_pydicom_instance_info, path)
    assert _fast_received_info(raw, EXPLICIT) == replace(fast, dataset_offset=0, meta_sop_uid=None)
    monkeypatch.setattr(identity, "_MAX_HEAD", 50_000)  # past it, pydicom reads (and seeks)
    assert _fast_instance_info(path) is None
    assert read_instance_info(path) == fast


def test_a_huge_file_is_read_no_further_than_its_header(tmp_path: Path,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "huge.dcm"
    with path.open("wb") as fp:
        fp.write(part10(identity_elements(False) + struct.pack("<HH2sHI", 0x7FE0, 0x10, b"OW", 0, 2**30)))
        fp.truncate(fp.tell() + 2**30)  # sparse: 1 GiB of pixel data
    read = 0
    real_open = open

    class Counting:
        def __init__(self, *args: Any) -> None:
            self.fp = real_open(*args)

        def __enter__(self) -> Counting:
            return self

        def __exit__(self, *exc: object) -> None:
            self.fp.close()

        def read(self, size: int = -1) -> bytes:
            nonlocal read
            data: bytes = self.fp.read(size)
            read += len(data)
            return data

    monkeypatch.setattr(identity, "open", Counting, raising=False)
    info = read_instance_info(path)
    assert read <= 64 * 1024 and info.sop_uid == "1.2.3.3"


# --- randomised: values and damaged headers -----------------------------------------------

def test_random_values_read_as_pydicom_reads_them() -> None:
    """Random ASCII values (padding, NULs, backslashes, '=', signs) in every indexed tag."""
    rng = random.Random(20240601)
    keywords = [kw for kws in identity.INDEXED_ATTRIBUTES.values() for kw in kws]
    text, integers = "0123456789 .\\=^\x00+-AbZ\t", "00112233445566778899  \\\x00+-"
    taken = 0
    for _ in range(400):
        implicit = rng.random() < 0.5
        values = {kw: "".join(rng.choice(integers if kw.endswith(("Number", "Frames")) else text)
                              for _ in range(rng.choice([0, 1, 2, 5, 9]))).encode()
                  for kw in keywords if rng.random() < 0.8}
        for kw in ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID"):
            if rng.random() < 0.8:
                values[kw] = rng.choice([b"1.2.3", b"1.2.03\x00", b" 1.2", b"1.2 ", b"01.2\t"])
        values["SpecificCharacterSet"] = rng.choice([b"", b"ISO_IR 100", b"ISO_IR 192 ", b"\\ISO 2022 IR 87"])
        data = identity_elements(implicit, **values)
        syntax = IMPLICIT if implicit else EXPLICIT
        expected = outcome(_pydicom_received_info, data, syntax)
        fast = outcome(_fast_received_info, data, syntax)
        if fast is not None:
            taken += 1
            assert fast == expected, values
    assert taken >= 150, taken


def test_damaged_headers_read_as_pydicom_reads_them() -> None:
    """Real headers with bytes changed, removed or cut: the fast path either gives pydicom's
    answer or leaves the dataset to pydicom."""
    rng = random.Random(7)
    bases = []
    for name in ("CT_small.dcm", "MR_small_implicit.dcm", "rtplan.dcm", "test-SR.dcm", "JPEG2000.dcm"):
        path = Path(str(get_testdata_file(name)))
        info = _pydicom_instance_info(path)
        bases.append((path.read_bytes()[info.dataset_offset:][:8000], info.transfer_syntax))
    taken = 0
    for _ in range(500):
        data, syntax = rng.choice(bases)
        damaged = bytearray(data)
        for _ in range(rng.choice([1, 2, 4])):
            pos = rng.randrange(min(len(damaged), 2500))
            if rng.random() < 0.8:
                damaged[pos] = rng.choice([rng.randrange(256), 0x00, 0xFF, 0xFE, 0xE0, 0xDD, 0x0D])
            else:
                del damaged[pos:pos + rng.randrange(1, 9)]
        if rng.random() < 0.2:
            damaged = damaged[:rng.randrange(len(damaged))]
        expected = outcome(_pydicom_received_info, bytes(damaged), syntax)
        fast = outcome(_fast_received_info, bytes(damaged), syntax)
        if fast is not None:
            taken += 1
            assert fast == expected
    assert taken >= 150, taken
