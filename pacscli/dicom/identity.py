"""What the archive needs to know about an instance, read without touching its pixel data.

`INDEXED_ATTRIBUTES` (the attributes the index keeps) and `InstanceInfo` live in
`pacscli.dicom.attributes`, which does not load pydicom; they are imported here too.
"""

from __future__ import annotations

import struct
import zlib
from io import BytesIO
from pathlib import Path
from typing import Any, BinaryIO

import pydicom
from pydicom.datadict import tag_for_keyword
from pydicom.errors import InvalidDicomError as PydicomInvalidDicomError
from pydicom.filereader import _read_file_meta_info, read_dataset, read_preamble

from pacscli.dicom.attributes import INDEXED_ATTRIBUTES as INDEXED_ATTRIBUTES
from pacscli.dicom.attributes import InstanceInfo as InstanceInfo
from pacscli.dicom.uids import clean_uid, require_safe_uid
from pacscli.errors import InvalidDicomError

_KEYWORD_TAGS = [(kw, tag_for_keyword(kw)) for kws in INDEXED_ATTRIBUTES.values() for kw in kws]
_READ_TAGS = [tag for _, tag in _KEYWORD_TAGS] + [tag_for_keyword("SpecificCharacterSet")]
_PIXEL_DATA_GROUP = 0x7FE0


def _before_pixels(tag: Any, vr: Any, length: int) -> bool:
    return bool(tag.group >= _PIXEL_DATA_GROUP)


def read_header(fp: BinaryIO, transfer_syntax: str, *, part10: bool) -> pydicom.Dataset:
    """The dataset's elements before the pixel data, read from fp (at the dataset start).

    Reads on from the file meta already parsed instead of a second dcmread: this runs once
    per received instance. A deflated raw dataset is inflated first; in a Part 10 file,
    deflated and unknown syntaxes take pydicom's full reader.
    """
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


def read_file_meta(fp: BinaryIO) -> tuple[pydicom.dataset.FileMetaDataset, int]:
    """The file meta of a Part 10 file and the offset of its dataset; fp is left there."""
    try:
        read_preamble(fp, False)
        meta = _read_file_meta_info(fp)
    except (PydicomInvalidDicomError, EOFError) as exc:
        raise InvalidDicomError(f"not a DICOM Part 10 file: {exc}") from exc
    except Exception as exc:  # pydicom raises many kinds on garbage
        raise InvalidDicomError(f"unreadable DICOM file meta: {exc}") from exc
    return meta, fp.tell()


_GROUP_LENGTH = b"\x02\x00\x00\x00UL\x04\x00"  # (0002,0000) UL, length 4


def seek_dataset(fp: BinaryIO) -> int:
    """Move fp (at the start of a Part 10 file) to its dataset; return the offset.

    Files that begin their file meta with its group length, as the archive's all do, are
    done with one small read; others take `read_file_meta`. A retrieve sends each
    instance's dataset, and parsing the meta with pydicom cost more than the read.
    """
    head = fp.read(144)
    if len(head) == 144 and head[128:132] == b"DICM" and head[132:140] == _GROUP_LENGTH:
        offset = 144 + int(struct.unpack_from("<I", head, 140)[0])
        fp.seek(offset)
        return offset
    fp.seek(0)
    return read_file_meta(fp)[1]


_LONG_VRS = {b"OB", b"OD", b"OF", b"OL", b"OV", b"OW", b"SQ", b"SV", b"UC", b"UN", b"UR", b"UT", b"UV"}


def read_meta_values(fp: BinaryIO) -> tuple[dict[int, bytes], int]:
    """The raw values of a Part 10 file's meta elements by tag, and its dataset offset (fp
    left there): for callers that need a few UIDs as stored, padding included.

    Reads the explicit VR little endian group 0002 directly; anything unusual (no group
    length first, implicit VR meta) goes through `read_file_meta`. Raises InvalidDicomError.
    """
    head = fp.read(144)
    if len(head) < 144 or head[128:132] != b"DICM" or head[132:140] != _GROUP_LENGTH:
        fp.seek(0)
        meta, offset = read_file_meta(fp)
        return {int(elem.tag): _raw(elem.value) for elem in meta}, offset
    end = 144 + int(struct.unpack_from("<I", head, 140)[0])
    body = fp.read(end - 144)
    values: dict[int, bytes] = {}
    position = 0
    while position + 8 <= len(body):
        group, element = struct.unpack_from("<HH", body, position)
        vr = body[position + 4:position + 6]
        if vr in _LONG_VRS:
            length = int(struct.unpack_from("<I", body, position + 8)[0])
            position += 12
        else:
            length = int(struct.unpack_from("<H", body, position + 6)[0])
            position += 8
        values[(group << 16) | element] = body[position:position + length]
        position += length
    if position != len(body):
        raise InvalidDicomError("the file meta group length does not match its elements")
    fp.seek(end)
    return values, end


def _raw(value: object) -> bytes:
    if isinstance(value, bytes):
        return value
    return str(value).encode("latin-1", "replace")


def read_instance_info(path: Path) -> InstanceInfo:
    """Read an instance's identity from a Part 10 file, stopping before the pixel data.

    Raises InvalidDicomError for anything that is not a usable Part 10 instance and
    UnsafeUIDError when a Study, Series or SOP Instance UID could not safely name a file.
    """
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
    return _instance_info(ds, transfer_syntax, offset, meta)


def read_received_info(dataset: bytes | Path, transfer_syntax: str) -> InstanceInfo:
    """Read the identity of a dataset received over the network: its bytes, or a raw
    dataset file (no preamble or file meta) in `transfer_syntax`."""
    try:
        with BytesIO(dataset) if isinstance(dataset, bytes) else open(dataset, "rb") as fp:
            ds = read_header(fp, transfer_syntax, part10=False)
    except OSError as exc:
        raise InvalidDicomError(f"cannot read the received dataset: {exc.strerror or exc}") from exc
    except Exception as exc:
        raise InvalidDicomError(f"unreadable DICOM dataset: {exc}") from exc
    return _instance_info(ds, transfer_syntax, 0, None)


def _instance_info(ds: pydicom.Dataset, transfer_syntax: str, offset: int,
                   meta: pydicom.dataset.FileMetaDataset | None) -> InstanceInfo:
    """The InstanceInfo of a parsed header; checks the UIDs that will name files."""
    try:
        attributes = {kw: _text(ds[tag].value) if tag in ds else None
                      for kw, tag in _KEYWORD_TAGS}
        charset = _text(ds["SpecificCharacterSet"].value) if "SpecificCharacterSet" in ds else None
    except Exception as exc:  # a value that does not decode under its VR
        raise InvalidDicomError(f"unreadable attribute value: {exc}") from exc
    study_uid = require_safe_uid(attributes["StudyInstanceUID"], "StudyInstanceUID")
    series_uid = require_safe_uid(attributes["SeriesInstanceUID"], "SeriesInstanceUID")
    sop_uid = require_safe_uid(attributes["SOPInstanceUID"], "SOPInstanceUID")
    attributes.update(StudyInstanceUID=study_uid, SeriesInstanceUID=series_uid, SOPInstanceUID=sop_uid)
    meta = meta if meta is not None else pydicom.dataset.FileMetaDataset()
    sop_class = clean_uid(attributes["SOPClassUID"] or meta.get("MediaStorageSOPClassUID"))
    if not sop_class:
        raise InvalidDicomError("the instance has no SOP Class UID")
    attributes["SOPClassUID"] = sop_class
    source = meta.get("SourceApplicationEntityTitle")
    return InstanceInfo(
        study_uid=study_uid,
        series_uid=series_uid,
        sop_uid=sop_uid,
        sop_class_uid=sop_class,
        transfer_syntax=transfer_syntax,
        dataset_offset=offset,
        specific_character_set=charset,
        attributes=attributes,
        meta_sop_uid=clean_uid(meta.get("MediaStorageSOPInstanceUID")) or None,
        source_aet=str(source).strip() if source else None,
    )
