"""A fast structural check of a Part 10 file (or of a received dataset), without pydicom:
is it whole?

pydicom reads a file cut short inside its pixel data without complaint, and stops early on
others; `scan_part10` walks every element header of the file meta and the dataset (nested
sequences and encapsulated pixel data included), checks each declared length against the
bytes that remain, and returns the transfer syntax, where the dataset starts, and the values
of a few top-level elements asked for (the UIDs `pacs verify` compares with the index).

A file cut exactly between two elements looks whole, to this walk as to any reader; the one
such cut it catches is the commonest, before the pixel data of an image (Rows without Pixel
Data). It imports nothing heavy, so `pacs verify` starts fast. Errors are InvalidDicomError with a
code: `empty`, `not-dicom`, `no-preamble` (a raw dataset without preamble and file meta),
`truncated` or `invalid-dicom`.
"""

from __future__ import annotations

import mmap
import os
import struct
import zlib
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO

from pacscli.dicom.uids import (
    DEFLATED_EXPLICIT_VR_LITTLE_ENDIAN,
    EXPLICIT_VR_BIG_ENDIAN,
    IMPLICIT_VR_LITTLE_ENDIAN,
    MEDIA_STORAGE_DIRECTORY,
)
from pacscli.errors import InvalidDicomError

# Tags callers ask for
SOP_INSTANCE_UID = 0x00080018
STUDY_INSTANCE_UID = 0x0020000D
SERIES_INSTANCE_UID = 0x0020000E

# Transfer syntaxes whose dataset is deflated (PS3.5 A.5, A.7.2, A.7.4)
DEFLATED = {DEFLATED_EXPLICIT_VR_LITTLE_ENDIAN, "1.2.840.10008.1.2.4.95", "1.2.840.10008.1.2.4.205"}

_ROWS = 0x00280010
_PIXEL_DATA = 0x7FE00010  # or Float / Double Float Pixel Data (7FE0,0008/0009)
_PIXEL_DATA_PROVIDER = 0x00287FE0  # JPIP: the pixel data lives elsewhere
_IMAGE_TAGS = frozenset({_ROWS, _PIXEL_DATA_PROVIDER})
_PREAMBLE = 128
_META_START = _PREAMBLE + 4
_ITEM = 0xFFFEE000
_ITEM_END = 0xFFFEE00D
_SEQUENCE_END = 0xFFFEE0DD
_UNDEFINED = 0xFFFFFFFF
_MAX_DEPTH = 64
# Files up to this size are read into memory; bigger ones are mapped.
_READ_LIMIT = 64 * 1024 * 1024
_HEAD_FIRST = 1024 * 1024  # bigger files: their first bytes are checked before the rest is read
# Explicit VRs with a 2-byte reserved field and a 4-byte length (as pydicom has them)
_LONG_VRS = frozenset(
    vr.encode() for vr in ("OB", "OD", "OF", "OL", "OV", "OW", "SQ", "SV", "UC", "UN", "UR",
                           "UT", "UV")
)
_LE_LONG = struct.Struct("<I")
_BE_LONG = struct.Struct(">I")
_LE_ITEM = struct.Struct("<HHI")
_LE_META = struct.Struct("<HH2sH")  # an explicit VR element's header (short form)
_BE_EXPLICIT = struct.Struct(">HH2sH")
_META_WANTED = frozenset({0x0002, 0x0010})  # SOP class and transfer syntax, in group 0002
_BE_ITEM = struct.Struct(">HHI")

Buffer = bytes | mmap.mmap


def _truncated(message: str) -> InvalidDicomError:
    return InvalidDicomError(f"truncated: {message}", code="truncated")


def _invalid(message: str) -> InvalidDicomError:
    return InvalidDicomError(message, code="invalid-dicom")


@dataclass
class ScanResult:
    """What a scan learnt: the file meta's facts and the values asked for."""

    transfer_syntax: str
    dataset_offset: int
    media_sop_class: str = ""
    values: dict[int, bytes] = field(default_factory=dict)

    @property
    def is_dicomdir(self) -> bool:
        """True for a DICOMDIR (Media Storage Directory), which is not an instance."""
        return self.media_sop_class == MEDIA_STORAGE_DIRECTORY

    def text(self, tag: int) -> str:
        """A scanned value as text without padding ('' when absent)."""
        return _text(self.values.get(tag, b""))


def _text(raw: bytes) -> str:
    return raw.decode("ascii", "replace").strip(" \x00")


class _Walker:
    """Walks element headers over a buffer, checking every length against its end."""

    def __init__(self, buf: Buffer | memoryview, end: int, little: bool,
                 want: frozenset[int]) -> None:
        self.buf = buf
        self.end = end
        self.little = little
        self.want = want
        self.values: dict[int, bytes] = {}
        self.seen: set[int] = set()  # top-level Rows, Pixel Data, Pixel Data Provider URL
        self.implicit_struct = self.item_struct = _LE_ITEM if little else _BE_ITEM
        self.explicit_struct = _LE_META if little else _BE_EXPLICIT
        self.long_struct = _LE_LONG if little else _BE_LONG

    def dataset(self, pos: int, implicit: bool, in_item: bool, depth: int) -> int:
        """Walk a dataset from pos to the end (or to its item delimiter); return the end."""
        if depth > _MAX_DEPTH:
            raise _invalid("sequences nested deeper than 64 levels")
        buf, end = self.buf, self.end
        unpack_implicit = self.implicit_struct.unpack_from
        unpack_explicit = self.explicit_struct.unpack_from
        unpack_long = self.long_struct.unpack_from
        top = depth == 0
        want = self.want if top else ()
        while pos < end:
            if pos + 8 > end:
                raise _truncated(f"the file ends inside an element header at byte {pos}")
            if implicit:
                group, elem, length = unpack_implicit(buf, pos)
                vr = b""
                header = 8
            else:
                group, elem, vr, length = unpack_explicit(buf, pos)
                header = 8
                if vr in _LONG_VRS:
                    if pos + 12 > end:
                        raise _truncated(f"the file ends inside an element header at byte {pos}")
                    length = unpack_long(buf, pos + 8)[0]
                    header = 12
                elif not b"AA" <= vr <= b"ZZ":  # some writers switch to implicit VR inside
                    length = unpack_long(buf, pos + 4)[0]  # a dataset (as pydicom reads)
                    vr = b""
            tag = group << 16 | elem
            if group == 0xFFFE:
                if tag == _ITEM_END and in_item:
                    return pos + 8
                raise _invalid(f"unexpected delimiter ({group:04X},{elem:04X}) at byte {pos}")
            if top and (group == 0x7FE0 or tag in _IMAGE_TAGS):
                self.seen.add(_PIXEL_DATA if group == 0x7FE0 else tag)
            pos += header
            if length == _UNDEFINED:
                # encapsulated pixel data; or a sequence (SQ, implicit VR, or UN holding an
                # implicit VR little endian one)
                fragments = vr in (b"OB", b"OW")
                pos = self.sequence(pos, implicit or vr == b"UN", fragments, depth)
                continue
            if pos + length > end:
                raise _truncated(
                    f"element ({group:04X},{elem:04X}) declares {length} bytes, "
                    f"{end - pos} remain (the file is cut short, or the length is garbled)"
                )
            if tag in want:
                self.values[tag] = bytes(buf[pos:pos + length])
            pos += length
        if in_item:
            raise _truncated("the file ends inside a sequence item")
        return pos

    def sequence(self, pos: int, implicit: bool, fragments: bool, depth: int) -> int:
        """Walk the items of an undefined-length sequence or pixel data up to its delimiter."""
        buf, end = self.buf, self.end
        unpack_item = self.item_struct.unpack_from
        while True:
            if pos + 8 > end:
                raise _truncated("the file ends inside a sequence or the pixel data")
            group, elem, length = unpack_item(buf, pos)
            tag = group << 16 | elem
            pos += 8
            if tag == _SEQUENCE_END:
                return pos
            if tag != _ITEM:
                raise _invalid(f"({group:04X},{elem:04X}) where a sequence item belongs, "
                               f"at byte {pos - 8}")
            if length == _UNDEFINED:
                if fragments:
                    raise _invalid("a pixel data fragment of undefined length")
                pos = self.dataset(pos, implicit, in_item=True, depth=depth + 1)
            elif pos + length > end:
                raise _truncated(f"a sequence item declares {length} bytes, {end - pos} remain")
            else:
                pos += length


def _classify_without_dicm(buf: Buffer, size: int) -> InvalidDicomError:
    """Why a file without the DICM prefix is not read as Part 10: a raw dataset, or not DICOM."""
    head = bytes(buf[:8])
    if len(head) >= 8:
        for fmt in ("<HH", ">HH"):
            group, _ = struct.unpack(fmt, head[:4])
            if group in (0x0002, 0x0008) and (head[4:6].isalpha() or head[6:8] == b"\x00\x00"):
                return InvalidDicomError(
                    "a DICOM dataset without the Part 10 preamble and file meta (a raw "
                    "dataset)", code="no-preamble")
    return InvalidDicomError(f"not a DICOM file (no DICM prefix at byte 128; {size} bytes)",
                             code="not-dicom")


def check_part10_head(head: Buffer, size: int | None = None) -> None:
    """Raise the InvalidDicomError of a file whose first bytes are not a Part 10 header."""
    if not head:
        raise InvalidDicomError("an empty file (0 bytes)", code="empty")
    if len(head) < _META_START or head[_PREAMBLE:_META_START] != b"DICM":
        raise _classify_without_dicm(head, len(head) if size is None else size)


def scan_part10(buf: Buffer, want: Iterable[int] = ()) -> ScanResult:
    """Check the structure of a whole Part 10 file held in `buf`; see the module's doc."""
    size = len(buf)
    check_part10_head(buf[:_META_START], size)
    # The file meta: explicit VR little endian elements of group 0002
    meta: dict[int, bytes] = {}
    pos = _META_START
    unpack = _LE_META.unpack_from
    while True:
        if pos + 8 > size:  # no dataset after the meta, or an element header cut short
            raise _truncated("the file ends inside the file meta")
        group, elem, vr, length = unpack(buf, pos)
        if group != 0x0002:
            break
        header = 8
        if vr in _LONG_VRS:
            if pos + 12 > size:
                raise _truncated("the file ends inside the file meta")
            length, header = _LE_LONG.unpack_from(buf, pos + 8)[0], 12
        if length == _UNDEFINED or pos + header + length > size:
            raise _truncated("the file ends inside the file meta")
        if elem in _META_WANTED:
            meta[elem] = bytes(buf[pos + header:pos + header + length])
        pos += header + length
    transfer_syntax = _text(meta.get(0x0010, b""))
    if not transfer_syntax:
        raise _invalid("the file meta has no Transfer Syntax UID")
    result = ScanResult(
        transfer_syntax=transfer_syntax,
        dataset_offset=pos,
        media_sop_class=_text(meta.get(0x0002, b"")),
    )
    result.values = scan_dataset(buf, pos, transfer_syntax, want)
    return result


def scan_dataset(buf: Buffer | memoryview, start: int, transfer_syntax: str,
                 want: Iterable[int] = ()) -> dict[int, bytes]:
    """Check the structure of the dataset in buf[start:] (encoded in `transfer_syntax`) as
    `scan_part10` does; return the values of the top-level tags in `want`. `pacs serve`
    checks each received dataset so, before storing it."""
    body: Buffer | memoryview = buf
    end = len(buf)
    if transfer_syntax in DEFLATED:
        inflater = zlib.decompressobj(-zlib.MAX_WBITS)
        try:
            body = inflater.decompress(bytes(buf[start:])) + inflater.flush()
        except zlib.error as exc:
            raise _invalid(f"the deflated dataset does not inflate: {exc}") from exc
        if not inflater.eof:
            raise _truncated("the deflated dataset ends before its end-of-stream")
        start, end = 0, len(body)
    little = transfer_syntax != EXPLICIT_VR_BIG_ENDIAN
    implicit = transfer_syntax == IMPLICIT_VR_LITTLE_ENDIAN
    if end - start >= 6 and not implicit:
        vr = bytes(body[start + 4:start + 6])
        implicit = not (b"AA" <= vr <= b"ZZ")  # mislabelled files (as pydicom reads them)
    walker = _Walker(body, end, little, want if isinstance(want, frozenset) else frozenset(want))
    walker.dataset(start, implicit, in_item=False, depth=0)
    if _ROWS in walker.seen and not walker.seen & {_PIXEL_DATA, _PIXEL_DATA_PROVIDER}:
        # An image without pixel data: cut short exactly between two elements before them
        raise _truncated("the image has Rows but no Pixel Data")
    return walker.values


@contextmanager
def mapped(fp: BinaryIO) -> Iterator[Buffer]:
    """The bytes of an open file, mapped read-only, so that a walk of its element headers
    reads little more than the pages they are on. An empty file, which mmap refuses, gives
    b"" (its walk then finds nothing, or that it is empty)."""
    if os.fstat(fp.fileno()).st_size == 0:
        yield b""
        return
    with mmap.mmap(fp.fileno(), 0, access=mmap.ACCESS_READ) as data:
        yield data


class Part10File:
    """A Part 10 file's bytes, read whole (small files) or mapped (big ones); a context.

    Raises InvalidDicomError (`empty`, `not-dicom`, `no-preamble`) from its first 132 bytes
    alone, so a big file that is not DICOM is not read, unless `check_head` is false (the
    caller wants the bytes whatever they are); OSError when it cannot be read.
    """

    def __init__(self, path: Path | str, *, check_head: bool = True) -> None:
        self.path = path
        with open(path, "rb") as fp:
            st = os.fstat(fp.fileno())
            self.stat = st  # what was read is this version of the file
            self.mtime = st.st_mtime
            self.data: Buffer
            if st.st_size <= _HEAD_FIRST:  # small: one read, then the checks
                self.data = fp.read()
                if check_head:
                    check_part10_head(self.data)
            else:
                if check_head:
                    check_part10_head(fp.read(_META_START), st.st_size)
                if st.st_size > _READ_LIMIT:
                    self.data = mmap.mmap(fp.fileno(), 0, access=mmap.ACCESS_READ)
                else:
                    fp.seek(0)
                    self.data = fp.read()
            self.size = len(self.data)  # the bytes we hold, should the file change meanwhile

    def __enter__(self) -> Part10File:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Release a mapping (nothing to do for bytes)."""
        if isinstance(self.data, mmap.mmap):
            self.data.close()

    def scan(self, want: Iterable[int] = ()) -> ScanResult:
        """`scan_part10` of the file's bytes."""
        return scan_part10(self.data, want)
