"""What the archive needs to know about an instance, read without touching its pixel data.

`INDEXED_ATTRIBUTES` (the attributes the index keeps) and `InstanceInfo` live in
`pacscli.dicom.attributes`, which does not load pydicom; they are imported here too.

Two readers give the same InstanceInfo: in the common case (little endian, plain ASCII
values, pydicom's default settings) the element walker of `pacscli.dicom.header` and the
value conversions at the end of this module, about ten times faster; for everything else,
and for every error, pydicom (`_pydicom_instance_info`, `_pydicom_received_info`).

pydicom is imported only on its paths: the fast path takes what it needs of pydicom's
dictionaries from constant tables (`attributes`, `dictionary`, `uids`), so that `pacs store`
and `pacs serve` read common files without loading it (~0.3 s of start-up).
"""

from __future__ import annotations

import io
import os
import re
import struct
import sys
import zlib
from collections.abc import Callable
from io import BytesIO
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING, Any, BinaryIO

from pacscli.dicom.attributes import ATTRIBUTE_TAGS, tag_of
from pacscli.dicom.attributes import INDEXED_ATTRIBUTES as INDEXED_ATTRIBUTES
from pacscli.dicom.attributes import InstanceInfo as InstanceInfo
from pacscli.dicom.dictionary import CHARACTER_SET_TERMS, dictionary_vr
from pacscli.dicom.header import (
    KNOWN_VRS,
    LONG_VRS,
    BytesLike,
    NeedMore,
    Unusual,
    collect_top_level,
    walk_top_level,
)
from pacscli.dicom.scan import check_part10_head
from pacscli.dicom.uids import (
    DEFLATED_EXPLICIT_VR_LITTLE_ENDIAN,
    EXPLICIT_VR_BIG_ENDIAN,
    IMPLICIT_VR_LITTLE_ENDIAN,
    TRANSFER_SYNTAXES,
    clean_uid,
    require_safe_uid,
)
from pacscli.errors import InvalidDicomError

if TYPE_CHECKING:
    from pydicom import Dataset
    from pydicom.dataset import FileMetaDataset

_KEYWORD_TAGS = [(kw, tag_of(kw)) for kws in INDEXED_ATTRIBUTES.values() for kw in kws]
_READ_TAGS = [tag for _, tag in _KEYWORD_TAGS] + [tag_of("SpecificCharacterSet")]
_PIXEL_DATA_GROUP = 0x7FE0


def _before_pixels(tag: Any, vr: Any, length: int) -> bool:
    return bool(tag.group >= _PIXEL_DATA_GROUP)


def read_header(fp: BinaryIO, transfer_syntax: str, *, part10: bool) -> Dataset:
    """The dataset's elements before the pixel data, read from fp (at the dataset start),
    with pydicom.

    Reads on from the file meta already parsed instead of a second dcmread: this runs once
    per received instance. A deflated raw dataset is inflated first; in a Part 10 file,
    deflated and unknown syntaxes take pydicom's full reader.
    """
    import pydicom
    from pydicom.filereader import read_dataset

    uid = pydicom.uid.UID(transfer_syntax)
    if uid.is_deflated and not part10:
        fp = BytesIO(zlib.decompress(fp.read(), -zlib.MAX_WBITS))
        uid = pydicom.uid.ExplicitVRLittleEndian
    if not part10 or (uid.is_transfer_syntax and not uid.is_deflated):
        ds = read_dataset(fp, uid.is_implicit_VR, uid.is_little_endian,
                          stop_when=_before_pixels, specific_tags=_READ_TAGS)
        ds.set_original_encoding(uid.is_implicit_VR, uid.is_little_endian, ds._character_set)
        return ds
    fp.seek(0)
    return pydicom.dcmread(fp, stop_before_pixels=True, specific_tags=_READ_TAGS)


def _text(value: Any) -> str | None:
    """An attribute value as its DICOM string form (several values joined by backslash)."""
    if value is None or value == "":
        return None
    if isinstance(value, list | tuple) or type(value).__name__ == "MultiValue":
        return "\\".join(str(v) for v in value)
    return str(value)


def read_file_meta(fp: BinaryIO) -> tuple[FileMetaDataset, int]:
    """The file meta of a Part 10 file and the offset of its dataset, read with pydicom; fp
    is left there."""
    from pydicom.errors import InvalidDicomError as PydicomInvalidDicomError
    from pydicom.filereader import _read_file_meta_info, read_preamble

    try:
        read_preamble(fp, False)
        meta = _read_file_meta_info(fp)
    except (PydicomInvalidDicomError, EOFError) as exc:
        raise InvalidDicomError(f"not a DICOM Part 10 file: {exc}") from exc
    except Exception as exc:  # pydicom raises many kinds on garbage
        raise InvalidDicomError(f"unreadable DICOM file meta: {exc}") from exc
    return meta, fp.tell()


_GROUP_LENGTH = b"\x02\x00\x00\x00UL\x04\x00"  # (0002,0000) UL, length 4
_META_READ = 4096  # file metas take a few hundred bytes: a longer one goes to pydicom


def _walk_meta(fp: BinaryIO) -> tuple[dict[int, bytes], dict[int, bytes], int] | None:
    """The file meta in its common form (explicit VR little endian, its group length
    first), walked element by element up to the first element outside group 0002, as
    pydicom reads it, whatever the group length says (real devices get it wrong): the
    values, the VRs as written, and the dataset's offset. None for any other meta."""
    fp.seek(0)
    data = fp.read(132 + _META_READ)
    if len(data) < 144 or data[128:132] != b"DICM" or data[132:140] != _GROUP_LENGTH:
        return None
    values: dict[int, bytes] = {}
    vrs: dict[int, bytes] = {}
    position = 132
    while position + 8 <= len(data):
        group, element = struct.unpack_from("<HH", data, position)
        if group != 0x0002:
            return values, vrs, position
        vr = data[position + 4:position + 6]
        if not vr.isalpha():
            return None
        if vr in LONG_VRS:
            if position + 12 > len(data):
                return None
            length, header = int(struct.unpack_from("<I", data, position + 8)[0]), 12
        else:
            length, header = int(struct.unpack_from("<H", data, position + 6)[0]), 8
        if position + header + length > len(data):
            return None  # longer than read, or cut short: pydicom says which
        values[(group << 16) | element] = data[position + header:position + header + length]
        vrs[(group << 16) | element] = vr
        position += header + length
    if position == len(data) < 132 + _META_READ:  # the file ends with its meta
        return values, vrs, position
    return None


def _meta_values_by_pydicom(fp: BinaryIO, vrs: dict[int, bytes] | None) -> tuple[dict[int, bytes], int]:
    """read_meta_values for a file meta out of the common mould, read by pydicom."""
    fp.seek(0)
    meta, offset = read_file_meta(fp)
    if vrs is not None:
        vrs.update((int(elem.tag), str(elem.VR).encode("ascii", "replace")) for elem in meta)
    return {int(elem.tag): _raw(elem.value) for elem in meta}, offset


def seek_dataset(fp: BinaryIO) -> int:
    """Move fp (at the start of a Part 10 file) to its dataset; return the offset.

    The common file meta is walked from one small read; others take `read_file_meta`. A
    retrieve sends each instance's dataset, and parsing the meta with pydicom cost more
    than the read.
    """
    walked = _walk_meta(fp)
    if walked is None:
        fp.seek(0)
        return read_file_meta(fp)[1]
    fp.seek(walked[2])
    return walked[2]


def read_meta_values(fp: BinaryIO, vrs: dict[int, bytes] | None = None) -> tuple[dict[int, bytes], int]:
    """The raw values of a Part 10 file's meta elements by tag, and its dataset offset (fp
    left there): for callers that need a few UIDs as stored, padding included. When given,
    `vrs` receives each element's VR as written.

    Walks the common file meta directly (see _walk_meta); anything unusual (no group length
    first, implicit VR meta) goes through `read_file_meta`. Raises InvalidDicomError.
    """
    walked = _walk_meta(fp)
    if walked is None:
        fp.seek(0)
        head = fp.read(144)
        if head[128:132] != b"DICM":  # said as `pacs index` says it: not DICOM, empty, raw
            try:
                size: int | None = os.fstat(fp.fileno()).st_size
            except (AttributeError, OSError, io.UnsupportedOperation):  # not a file
                size = None
            check_part10_head(head, size)
        return _meta_values_by_pydicom(fp, vrs)
    values, written, offset = walked
    if vrs is not None:
        vrs.update(written)
    fp.seek(offset)
    return values, offset


def _raw(value: object) -> bytes:
    if isinstance(value, bytes):
        return value
    return str(value).encode("latin-1", "replace")


def read_instance_info(path: Path) -> InstanceInfo:
    """Read an instance's identity from a Part 10 file, stopping before the pixel data.

    Raises InvalidDicomError for anything that is not a usable Part 10 instance and
    UnsafeUIDError when a Study, Series or SOP Instance UID could not safely name a file.
    The common case takes the element walker of `pacscli.dicom.header`; anything else
    (and every error) comes from pydicom's reader, so both give the same answer.
    """
    info = _fast_instance_info(path)
    return info if info is not None else _pydicom_instance_info(path)


def read_received_info(dataset: BytesLike | Path, transfer_syntax: str) -> InstanceInfo:
    """Read the identity of a dataset received over the network: its bytes, or a raw
    dataset file (no preamble or file meta) in `transfer_syntax`. Raises as
    `read_instance_info` does, and takes the same fast path when it can."""
    info = _fast_received_info(dataset, transfer_syntax)
    return info if info is not None else _pydicom_received_info(dataset, transfer_syntax)


def read_received_head(head: BytesLike, transfer_syntax: str) -> InstanceInfo | None:
    """`read_received_info` of a dataset from its first bytes only, while the rest is still
    arriving: None unless `head` holds the whole header (everything before the pixel data)
    and the fast path can read it. The answer is then the same as for the whole dataset,
    whose reading stops at the pixel data too."""
    try:
        return _fast_received_info(head, transfer_syntax, complete=False)
    except InvalidDicomError:  # an unsafe UID, say: reading the whole dataset reports it
        return None


def _pydicom_instance_info(path: Path) -> InstanceInfo:
    """`read_instance_info` with pydicom's reader: for everything out of the common case."""
    try:
        with open(path, "rb") as fp:
            meta, offset = read_file_meta(fp)
            transfer_syntax = clean_uid(meta.get("TransferSyntaxUID"))
            if not transfer_syntax:
                raise InvalidDicomError("the file meta has no Transfer Syntax UID")
            ds = read_header(fp, transfer_syntax, part10=True)
    except OSError as exc:
        raise InvalidDicomError(f"cannot read {path}: {exc.strerror or exc}") from exc
    except InvalidDicomError:
        raise
    except Exception as exc:
        raise InvalidDicomError(f"unreadable DICOM dataset: {exc}") from exc
    attributes, charset = _dataset_attributes(ds)
    source = meta.get("SourceApplicationEntityTitle")
    return _build_info(attributes, charset, transfer_syntax, offset,
                       meta_sop_class=clean_uid(meta.get("MediaStorageSOPClassUID")),
                       meta_sop_uid=clean_uid(meta.get("MediaStorageSOPInstanceUID")) or None,
                       source_aet=str(source).strip() if source else None)


def _pydicom_received_info(dataset: BytesLike | Path, transfer_syntax: str) -> InstanceInfo:
    """`read_received_info` with pydicom's reader: for everything out of the common case."""
    try:
        with BytesIO(dataset) if isinstance(dataset, BytesLike) else open(dataset, "rb") as fp:
            ds = read_header(fp, transfer_syntax, part10=False)
    except OSError as exc:
        raise InvalidDicomError(f"cannot read the received dataset: {exc.strerror or exc}") from exc
    except Exception as exc:
        raise InvalidDicomError(f"unreadable DICOM dataset: {exc}") from exc
    attributes, charset = _dataset_attributes(ds)
    return _build_info(attributes, charset, transfer_syntax, 0, meta_sop_class="", meta_sop_uid=None,
                       source_aet=None)


def _dataset_attributes(ds: Dataset) -> tuple[dict[str, str | None], str | None]:
    """The indexed attributes and Specific Character Set of a header pydicom parsed."""
    try:
        attributes = {kw: _text(ds[tag].value) if tag in ds else None
                      for kw, tag in _KEYWORD_TAGS}
        charset = _text(ds["SpecificCharacterSet"].value) if "SpecificCharacterSet" in ds else None
    except Exception as exc:  # a value that does not decode under its VR
        raise InvalidDicomError(f"unreadable attribute value: {exc}") from exc
    return attributes, charset


def _build_info(attributes: dict[str, str | None], charset: str | None, transfer_syntax: str,
                offset: int, *, meta_sop_class: str, meta_sop_uid: str | None,
                source_aet: str | None) -> InstanceInfo:
    """The InstanceInfo of an instance's attribute strings; checks the UIDs that will name
    files. meta_sop_class is the file meta's SOP Class UID, cleaned ("" when absent)."""
    study_uid = require_safe_uid(attributes["StudyInstanceUID"], "StudyInstanceUID")
    series_uid = require_safe_uid(attributes["SeriesInstanceUID"], "SeriesInstanceUID")
    sop_uid = require_safe_uid(attributes["SOPInstanceUID"], "SOPInstanceUID")
    attributes.update(StudyInstanceUID=study_uid, SeriesInstanceUID=series_uid, SOPInstanceUID=sop_uid)
    sop_class = clean_uid(attributes["SOPClassUID"] or meta_sop_class)
    if not sop_class:
        raise InvalidDicomError("the instance has no SOP Class UID")
    attributes["SOPClassUID"] = sop_class
    return InstanceInfo(
        study_uid=study_uid,
        series_uid=series_uid,
        sop_uid=sop_uid,
        sop_class_uid=sop_class,
        transfer_syntax=transfer_syntax,
        dataset_offset=offset,
        specific_character_set=charset,
        attributes=attributes,
        meta_sop_uid=meta_sop_uid,
        source_aet=source_aet,
    )


# The fast path: the element walker of pacscli.dicom.header plus the conversions below,
# which give exactly `_text(ds[tag].value)` for plain ASCII values under pydicom's default
# settings. Whatever they do not cover raises Unusual and takes the pydicom path above.

_HEAD = 64 * 1024  # read first from a file: most headers are a few KiB
_MAX_HEAD = 16 * 1024 * 1024  # a longer header (huge private blobs) is left to pydicom
_WANTED = frozenset(int(tag) for tag in _READ_TAGS)
_CHARSET_TAG = 0x00080005
_TAG_VRS = {tag: vr for tag, vr in ATTRIBUTE_TAGS.values() if tag in _WANTED}
_TAG_VR_BYTES = {tag: vr.encode("ascii") for tag, vr in _TAG_VRS.items()}
_META_TS, _META_SOP_CLASS, _META_SOP_UID, _META_SOURCE = (
    tag_of("TransferSyntaxUID"), tag_of("MediaStorageSOPClassUID"), tag_of("MediaStorageSOPInstanceUID"),
    tag_of("SourceApplicationEntityTitle"))

# Little endian, not deflated transfer syntaxes pydicom knows, and whether each is implicit
# VR, as pydicom's UID flags have them (read_header uses the same): only Implicit VR Little
# Endian is implicit, only Explicit VR Big Endian big endian.
_FAST_SYNTAXES = {uid: uid == IMPLICIT_VR_LITTLE_ENDIAN for uid, name in TRANSFER_SYNTAXES.items()
                  if "Deflate" not in name
                  and uid not in (EXPLICIT_VR_BIG_ENDIAN, DEFLATED_EXPLICIT_VR_LITTLE_ENDIAN)}
_IS_NUMBER = re.compile(r" *[+-]?[0-9]{1,12} *")  # what IS() takes as an int, kept as written


def _pydicom_config() -> ModuleType | None:
    """pydicom's settings module when pydicom is loaded; None when it is not, and its
    settings are therefore still the defaults."""
    return sys.modules.get("pydicom.config")


def _pydicom_defaults() -> bool:
    """The conversions below are pydicom's under its default settings only."""
    config = _pydicom_config()
    return config is None or (not config.datetime_conversion and not config.use_IS_numpy
                              and config.settings.reading_validation_mode != config.RAISE)


def _replace_un_with_known_vr() -> bool:
    """pydicom's replace_un_with_known_vr setting (True by default)."""
    config = _pydicom_config()
    return config is None or bool(config.replace_un_with_known_vr)


def _collect(fp: BinaryIO, data: bytes, start: int, implicit: bool,
             wanted: frozenset[int] = _WANTED) -> tuple[dict[int, tuple[bytes, bytes]], int]:
    """Walk the header at data[start:], data being the first bytes of fp (a read of
    _HEAD bytes, fp left after them); read on when the header is longer. Returns the
    walker's values and where in data the header ends."""
    complete = len(data) < _HEAD
    while True:
        try:
            return walk_top_level(data, start, implicit, wanted, complete=complete, vr_of=dictionary_vr)
        except NeedMore as more:
            want = max(more.end, 2 * len(data))
            if want > _MAX_HEAD:
                raise Unusual("the header is too long for the fast path") from None
            extra = fp.read(want - len(data))
            complete = len(extra) < want - len(data)
            data += extra


def read_raw_top_level(fp: BinaryIO, transfer_syntax: str,
                       tags: frozenset[int]) -> dict[int, bytes] | None:
    """The values of the top-level `tags` of the dataset at fp's position, as stored
    (padding included), read by the element walker; the last one when a tag repeats, as
    pydicom keeps. None when the walker does not cover the dataset (a syntax other than
    little endian and not deflated, or anything unusual): the caller then reads it with
    pydicom, whose raw element values are these same bytes. fp is left anywhere."""
    header = read_raw_header(fp, transfer_syntax, tags)
    return None if header is None else header[0]


def read_raw_header(fp: BinaryIO, transfer_syntax: str,
                    tags: frozenset[int]) -> tuple[dict[int, bytes], int] | None:
    """`read_raw_top_level`, and the length of the header from fp's position: up to the
    first element of group 0x7FE0 or above (the pixel data), or the whole dataset when
    there is none; where pydicom's reader, stopping before the pixel data, leaves its file."""
    implicit = _FAST_SYNTAXES.get(transfer_syntax)
    if implicit is None:
        return None
    try:
        raw, end = _collect(fp, fp.read(_HEAD), 0, implicit, tags)
    except OSError:
        raise
    except Exception:  # Unusual, malformed: pydicom's reader gives the answer
        return None
    return {tag: value for tag, (_, value) in raw.items()}, end


def _fast_instance_info(path: Path) -> InstanceInfo | None:
    """read_instance_info's common case, or None for the pydicom path."""
    if not _pydicom_defaults():
        return None
    try:
        with open(path, "rb") as fp:
            data = fp.read(_HEAD)
            if len(data) < 144 or data[128:132] != b"DICM" or data[132:140] != _GROUP_LENGTH:
                return None  # no group length first: pydicom reads such a meta
            vrs: dict[int, bytes] = {}
            meta, offset = read_meta_values(BytesIO(data), vrs)
            # pydicom reads the meta up to the first tag outside group 0002 and checks VRs
            # on the way; the group length must agree with that (the walker refuses a group
            # 0002 element at the dataset start).
            if any(tag >> 16 != 2 for tag in meta) or not all(vr in KNOWN_VRS for vr in vrs.values()):
                return None
            transfer_syntax = clean_uid(_meta_text(meta, vrs, _META_TS, b"UI"))
            implicit = _FAST_SYNTAXES.get(transfer_syntax)
            if implicit is None:
                return None
            raw = _collect(fp, data, offset, implicit)[0]
        attributes, charset = _raw_attributes(raw, implicit)
        meta_sop_class = clean_uid(_meta_text(meta, vrs, _META_SOP_CLASS, b"UI"))
        meta_sop_uid = clean_uid(_meta_text(meta, vrs, _META_SOP_UID, b"UI")) or None
        source = _meta_text(meta, vrs, _META_SOURCE, b"AE")
    except Exception:  # Unusual, unreadable, malformed: pydicom's reader gives today's answer
        return None
    return _build_info(attributes, charset, transfer_syntax, offset, meta_sop_class=meta_sop_class,
                       meta_sop_uid=meta_sop_uid, source_aet=source.strip() if source else None)


def _fast_received_info(dataset: BytesLike | Path, transfer_syntax: str, *,
                        complete: bool = True) -> InstanceInfo | None:
    """read_received_info's common case, or None for the pydicom path (or, for bytes that
    are not `complete`, when the header goes on past them)."""
    implicit = _FAST_SYNTAXES.get(transfer_syntax)
    if implicit is None or not _pydicom_defaults():
        return None
    try:
        if isinstance(dataset, BytesLike):
            raw = collect_top_level(dataset, 0, implicit, _WANTED, complete=complete,
                                    vr_of=dictionary_vr)
        else:
            with open(dataset, "rb") as fp:
                raw = _collect(fp, fp.read(_HEAD), 0, implicit)[0]
        attributes, charset = _raw_attributes(raw, implicit)
    except Exception:  # Unusual, unreadable, malformed: pydicom's reader gives today's answer
        return None
    return _build_info(attributes, charset, transfer_syntax, 0, meta_sop_class="", meta_sop_uid=None,
                       source_aet=None)


def _meta_text(meta: dict[int, bytes], vrs: dict[int, bytes], tag: int, vr: bytes) -> str | None:
    """A UI or AE file meta value as pydicom gives it (None when absent): a UID without
    trailing NULs and spaces, then stripped by UID(); an AE title stripped."""
    raw = meta.get(tag)
    if raw is None:
        return None
    if vrs.get(tag) != vr or not raw.isascii() or b"\\" in raw:
        raise Unusual("an unusual file meta value")
    text = raw.decode("ascii")
    return text.rstrip(" \x00").strip() if vr == b"UI" else text.strip()


def _raw_attributes(raw: dict[int, tuple[bytes, bytes]],
                    implicit: bool) -> tuple[dict[str, str | None], str | None]:
    """`_dataset_attributes` from the walker's raw values; raises Unusual when unsure."""
    if not implicit:
        for tag, (vr, value) in raw.items():
            # pydicom converts by the VR as written, except that it reads a short UN value
            # of a known tag by its dictionary VR (as in implicit VR)
            if vr != _TAG_VR_BYTES[tag] and not (vr == b"UN" and len(value) < 0xFFFF
                                                 and _replace_un_with_known_vr()):
                raise Unusual("an indexed attribute with an unexpected VR")
    charset_value = raw.get(_CHARSET_TAG, (b"", b""))[1]
    charset = _string_text(_ascii(charset_value)) if charset_value else None
    # Plain ASCII decodes alike in every character set pydicom knows (tested); an unknown
    # term makes pydicom guess and warn.
    if charset is not None and not all(term in CHARACTER_SET_TERMS for term in charset.split("\\")):
        raise Unusual("an unknown Specific Character Set term")
    attributes: dict[str, str | None] = dict.fromkeys(_KEYWORDS)
    for tag, (_, value) in raw.items():
        if value and tag != _CHARSET_TAG:  # an empty value is pydicom's "" or None: None
            keyword, convert = _CONVERTERS[tag]
            attributes[keyword] = convert(_ascii(value))
    return attributes, charset


# `_text(ds[tag].value)` for a non-empty ASCII value, by VR, as pydicom's converters
# (pydicom.values) and value classes give it.

def _ascii(value: bytes) -> str:
    if not value.isascii() or b"\x1b" in value:
        raise Unusual("a value needing its character set")  # ESC switches ISO 2022 sets
    return value.decode("ascii")


def _uid_text(text: str) -> str | None:
    """convert_UI: the whole value loses trailing NULs and spaces, then UID() strips each
    value's whitespace."""
    values = [part.strip() for part in text.rstrip(" \x00").split("\\")]
    return "\\".join(values) if len(values) > 1 or values[0] else None


def _string_text(text: str) -> str | None:
    """multi_string (CS, DA, TM): the whole value loses trailing spaces and NULs; values
    keep theirs."""
    return text.rstrip(" \x00") or None


def _long_string_text(text: str) -> str | None:
    """convert_text (LO, SH): each value loses its trailing spaces and NULs."""
    values = [part.rstrip("\x00 ") for part in text.split("\\")]
    return "\\".join(values) if len(values) > 1 or values[0] else None


def _person_name_text(text: str) -> str | None:
    """convert_PN: the whole value loses trailing NULs and spaces, then each PersonName
    drops empty trailing component groups ("A^B==" is "A^B")."""
    values = [_person_name(part) for part in text.rstrip("\x00 ").split("\\")]
    return "\\".join(values) if len(values) > 1 or values[0] else None


def _person_name(value: str) -> str:
    groups = value.split("=")
    while groups and not groups[-1]:
        groups.pop()
    return "=".join(groups)


def _integer_string_text(text: str) -> str | None:
    """multi_string(IS): str(IS(" 12 ")) is "12", "007" stays "007", a blank value stays as
    written; anything else (floats, signs alone) is left to pydicom."""
    text = text.rstrip(" \x00")
    if not text:
        return None
    values = text.split("\\")
    for index, part in enumerate(values):
        if part.strip():  # IS() returns a blank value as it is
            if not _IS_NUMBER.fullmatch(part):
                raise Unusual("an IS value that is not a plain integer")
            values[index] = part.strip()
    return "\\".join(values)


def _no_conversion(text: str) -> str | None:
    raise Unusual("no fast conversion for this VR")


_BY_VR: dict[str, Callable[[str], str | None]] = {
    "UI": _uid_text, "CS": _string_text, "DA": _string_text, "TM": _string_text,
    "LO": _long_string_text, "SH": _long_string_text, "PN": _person_name_text, "IS": _integer_string_text,
}
_KEYWORDS = [kw for kw, _ in _KEYWORD_TAGS]
_CONVERTERS = {int(tag): (kw, _BY_VR.get(_TAG_VRS[int(tag)], _no_conversion)) for kw, tag in _KEYWORD_TAGS}
