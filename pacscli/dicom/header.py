"""A small element walker for the header of a little endian dataset (no pydicom).

`collect_top_level` reads the elements before the pixel data and keeps the raw values of a
few top-level tags. It covers the common case only and raises `Unusual` for anything else
(unknown VRs, undefined-length values that are not sequences, structures that do not add
up): the caller then takes pydicom's reader, so every answer given here is one pydicom
would give. It mirrors what `pydicom.filereader.read_dataset(..., stop_when=<group >=
0x7FE0>, specific_tags=...)` walks over: defined-length elements are skipped by length,
undefined-length sequences are walked item by item, and the first tag of group 0x7FE0 or
above ends the header.
"""

from __future__ import annotations

import struct
from collections.abc import Callable

# Explicit VR: these VRs have 2 reserved bytes and a 4-byte length, the others a 2-byte length.
LONG_VRS = frozenset({b"OB", b"OD", b"OF", b"OL", b"OV", b"OW", b"SQ", b"SV", b"UC", b"UN", b"UR",
                      b"UT", b"UV"})
KNOWN_VRS = LONG_VRS | frozenset({b"AE", b"AS", b"AT", b"CS", b"DA", b"DS", b"DT", b"FD", b"FL", b"IS",
                                  b"LO", b"LT", b"PN", b"SH", b"SL", b"SS", b"ST", b"TM", b"UI", b"UL",
                                  b"US"})

_UNDEFINED = 0xFFFFFFFF
_ITEM = 0xFFFEE000
_ITEM_END = 0xFFFEE00D
_SEQUENCE_END = 0xFFFEE0DD
_PIXEL_DATA_GROUP = 0x7FE0
_MAX_DEPTH = 32  # nesting of undefined-length sequences; deeper is not the common case

_TAG = struct.Struct("<HH")
_U32 = struct.Struct("<I")
_ELEMENT = struct.Struct("<HHI")  # implicit VR header, and item / delimiter headers
_EXPLICIT = struct.Struct("<HH2sH")  # explicit VR header (a long VR's length follows)


class Unusual(Exception):
    """The bytes are not the common case this walker covers: use pydicom's reader."""


class NeedMore(Exception):
    """The walk needs the bytes up to `end` (exclusive) and the buffer is only a head."""

    def __init__(self, end: int) -> None:
        super().__init__(end)
        self.end = end


# Dataset bytes however they are held: received datasets are views of a reused buffer.
BytesLike = bytes | bytearray | memoryview

# The dictionary VR of a tag ("SQ", "OB", ...) or None when unknown (private, unlisted).
VrLookup = Callable[[int], str | None]


class _Walk:
    """State shared by the nested steps of one walk."""

    def __init__(self, data: BytesLike, implicit: bool, complete: bool, vr_of: VrLookup) -> None:
        self.data = data
        self.implicit = implicit
        self.complete = complete
        self.vr_of = vr_of

    def need(self, end: int) -> None:
        """Make sure data[:end] exists: past the end of a complete dataset is malformed."""
        if end > len(self.data):
            if self.complete:
                raise Unusual(f"the dataset ends before byte {end}")
            raise NeedMore(end)

    def header(self, pos: int) -> tuple[int, bytes | None, int, int]:
        """The element header at pos: tag, VR (b"" in implicit VR, None when the explicit VR
        bytes are no known VR), length (0 when the VR is None) and where the value starts."""
        data = self.data
        if pos + 8 > len(data):
            self.need(pos + 8)
        if self.implicit:
            group, element, length = _ELEMENT.unpack_from(data, pos)
            return group << 16 | element, b"", length, pos + 8
        group, element, vr, length = _EXPLICIT.unpack_from(data, pos)
        if vr in LONG_VRS:
            self.need(pos + 12)
            return group << 16 | element, vr, _U32.unpack_from(data, pos + 8)[0], pos + 12
        if vr in KNOWN_VRS:
            return group << 16 | element, vr, length, pos + 8
        # pydicom would switch to implicit VR here or guess a 2-byte length: only a
        # delimiter or the end of the header may look like this
        return group << 16 | element, None, 0, pos + 8

    def undefined_length(self, tag: int, vr: bytes | None, pos: int, depth: int) -> int:
        """Skip the undefined-length value starting at pos; return the position after it.

        Only sequences are walked: explicit VR "SQ"; in implicit VR a tag whose dictionary
        VR is SQ, or an unknown tag whose value starts with an item (pydicom's look-ahead).
        Anything else pydicom scans for a delimiter or reinterprets: not the common case.
        """
        if self.implicit:
            vr_name = self.vr_of(tag)
            if vr_name is None:
                self.need(pos + 4)
                group, element = _TAG.unpack_from(self.data, pos)
                is_sequence = (group << 16 | element) == _ITEM
            else:
                is_sequence = vr_name == "SQ"
        else:
            is_sequence = vr == b"SQ"  # UN of undefined length holds implicit VR data: unusual
        if not is_sequence:
            raise Unusual(f"undefined length value of ({tag >> 16:04X},{tag & 0xFFFF:04X}) not a sequence")
        return self.sequence(pos, depth + 1)

    def sequence(self, pos: int, depth: int) -> int:
        """Walk the items of an undefined-length sequence; return the position after it."""
        if depth > _MAX_DEPTH:
            raise Unusual("sequences nested too deep")
        while True:
            self.need(pos + 8)
            group, element, length = _ELEMENT.unpack_from(self.data, pos)
            tag = group << 16 | element
            pos += 8
            if tag == _SEQUENCE_END:
                return pos
            if tag != _ITEM:
                raise Unusual(f"({group:04X},{element:04X}) where a sequence item should be")
            pos = self.item(pos, None if length == _UNDEFINED else pos + length, depth)

    def item(self, pos: int, end: int | None, depth: int) -> int:
        """Walk the elements of an item up to end, or to its delimiter when end is None.

        Defined-length items are walked too, not skipped: pydicom reads them element by
        element, so only contents that add up to the item's length are the common case.
        """
        while True:
            if end is not None and pos >= end:
                if pos > end:
                    raise Unusual("an element runs past the end of its item")
                return pos
            tag, vr, length, value = self.header(pos)
            if tag == _ITEM_END:
                if end is not None or _U32.unpack_from(self.data, pos + 4)[0] != 0:
                    raise Unusual("unexpected item delimiter")
                return value
            if vr is None:
                raise Unusual(f"unknown VR in ({tag >> 16:04X},{tag & 0xFFFF:04X})")
            if tag >> 16 == 0xFFFE:
                raise Unusual("a delimiter among the elements of an item")
            pos = value + length if length != _UNDEFINED else self.undefined_length(tag, vr, value, depth)


def collect_top_level(data: BytesLike, start: int, implicit: bool, wanted: frozenset[int], *,
                      complete: bool, vr_of: VrLookup) -> dict[int, tuple[bytes, bytes]]:
    """The raw values of the `wanted` top-level elements of the dataset at data[start:].

    Returns {tag: (VR as written, b"" in implicit VR; value bytes)}, the last one when a tag
    repeats (as pydicom keeps). `complete` says data holds the whole dataset; when it is
    only a head, NeedMore asks for more. Raises Unusual for anything out of the common case.
    """
    return walk_top_level(data, start, implicit, wanted, complete=complete, vr_of=vr_of)[0]


def walk_top_level(data: BytesLike, start: int, implicit: bool, wanted: frozenset[int], *,
                   complete: bool, vr_of: VrLookup) -> tuple[dict[int, tuple[bytes, bytes]], int]:
    """`collect_top_level`, and where the header ends in data: at the first element of group
    0x7FE0 or above, or at the end of a dataset without one (where pydicom's reader, told to
    stop before the pixel data, leaves its file)."""
    walk = _Walk(data, implicit, complete, vr_of)
    # pydicom checks the first element's VR bytes and switches encoding when they disagree
    # with the transfer syntax.
    walk.need(start + 6)
    looks_explicit = 0x40 < data[start + 4] < 0x5B and 0x40 < data[start + 5] < 0x5B
    if looks_explicit == implicit:
        raise Unusual("the dataset's VR encoding differs from its transfer syntax")
    found: dict[int, tuple[bytes, bytes]] = {}
    size = len(data)
    pos = start
    while True:
        if pos == size and complete:
            return found, pos  # a dataset without pixel data
        tag, vr, length, value = walk.header(pos)
        group = tag >> 16
        if group >= _PIXEL_DATA_GROUP:
            return found, pos
        if vr is None:
            raise Unusual(f"unknown VR in ({group:04X},{tag & 0xFFFF:04X})")
        if group == 0x0002:  # file meta in the dataset: the meta and dataset disagree
            raise Unusual("a file meta element in the dataset")
        if length == _UNDEFINED:
            if tag in wanted:
                raise Unusual("an undefined-length indexed attribute")
            pos = walk.undefined_length(tag, vr, value, 0)
            continue
        pos = value + length
        if tag in wanted:
            walk.need(pos)
            found[tag] = (vr, bytes(data[value:pos]))
