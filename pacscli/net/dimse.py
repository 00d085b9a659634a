"""DIMSE command sets (PS3.7 Annex E), encoded and decoded by hand.

A command set is a short Implicit VR Little Endian dataset of group 0000. pynetdicom builds
each one through pydicom's Dataset machinery, which cost milliseconds per C-STORE; these
functions take microseconds. Only the elements the services we implement use are known.
Query identifiers are datasets of any kind: pydicom reads and writes them, loaded by the
functions that need it, so that C-STORE alone never loads it.
"""

from __future__ import annotations

import struct
import zlib
from dataclasses import dataclass, field
from io import BytesIO
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from pydicom.dataset import Dataset

# Command Field values (PS3.7 E.1)
C_STORE_RQ, C_STORE_RSP = 0x0001, 0x8001
C_GET_RQ, C_GET_RSP = 0x0010, 0x8010
C_FIND_RQ, C_FIND_RSP = 0x0020, 0x8020
C_MOVE_RQ, C_MOVE_RSP = 0x0021, 0x8021
C_ECHO_RQ, C_ECHO_RSP = 0x0030, 0x8030
C_CANCEL_RQ = 0x0FFF

NO_DATASET = 0x0101
HAS_DATASET = 0x0000

# tag -> (keyword, kind): kind "UI"/"AE" strings, "US" unsigned short
ELEMENTS: dict[int, tuple[str, str]] = {
    0x00000002: ("AffectedSOPClassUID", "UI"),
    0x00000003: ("RequestedSOPClassUID", "UI"),
    0x00000100: ("CommandField", "US"),
    0x00000110: ("MessageID", "US"),
    0x00000120: ("MessageIDBeingRespondedTo", "US"),
    0x00000600: ("MoveDestination", "AE"),
    0x00000700: ("Priority", "US"),
    0x00000800: ("CommandDataSetType", "US"),
    0x00000900: ("Status", "US"),
    0x00000902: ("ErrorComment", "LO"),
    0x00001000: ("AffectedSOPInstanceUID", "UI"),
    0x00001001: ("RequestedSOPInstanceUID", "UI"),
    0x00001020: ("NumberOfRemainingSuboperations", "US"),
    0x00001021: ("NumberOfCompletedSuboperations", "US"),
    0x00001022: ("NumberOfFailedSuboperations", "US"),
    0x00001023: ("NumberOfWarningSuboperations", "US"),
    0x00001030: ("MoveOriginatorApplicationEntityTitle", "AE"),
    0x00001031: ("MoveOriginatorMessageID", "US"),
}
_TAGS = {keyword: (tag, kind) for tag, (keyword, kind) in ELEMENTS.items()}


class CommandError(ValueError):
    """A command set that cannot be decoded."""


@dataclass
class Command:
    """A decoded command set: its known elements by keyword."""

    values: dict[str, int | str] = field(default_factory=dict)

    @property
    def field(self) -> int:
        return int(self.values.get("CommandField", -1))

    @property
    def message_id(self) -> int:
        return int(self.values.get("MessageID", 0))

    @property
    def has_dataset(self) -> bool:
        return int(self.values.get("CommandDataSetType", NO_DATASET)) != NO_DATASET

    def get(self, keyword: str, default: str = "") -> str:
        """A string element's value without padding."""
        return str(self.values.get(keyword, default))

    def number(self, keyword: str, default: int = 0) -> int:
        """A US element's value."""
        return int(self.values.get(keyword, default))


def decode_command(data: bytes) -> Command:
    """Decode an Implicit VR Little Endian command set, keeping the elements we know."""
    values: dict[str, int | str] = {}
    offset, end = 0, len(data)
    while offset < end:
        if end - offset < 8:
            raise CommandError("truncated command set element header")
        group, element, length = struct.unpack_from("<HHI", data, offset)
        offset += 8
        if offset + length > end:
            raise CommandError("command set element runs past the end")
        tag = (group << 16) | element
        known = ELEMENTS.get(tag)
        if known is not None:
            keyword, kind = known
            raw = data[offset:offset + length]
            if kind == "US":
                if length != 2:
                    raise CommandError(f"{keyword} has length {length}, not 2")
                values[keyword] = struct.unpack("<H", raw)[0]
            else:
                values[keyword] = raw.decode("ascii", "replace").strip(" \x00")
        offset += length
    if "CommandField" not in values:
        raise CommandError("command set without a Command Field")
    return Command(values)


def _value(kind: str, value: int | str) -> bytes:
    if kind == "US":
        return struct.pack("<H", int(value))
    raw = str(value).encode("ascii", "replace")
    if len(raw) % 2:
        raw += b"\x00" if kind == "UI" else b" "
    return raw


def encode_command(**elements: int | str | None) -> bytes:
    """Encode a command set from keyword=value pairs (None values are left out)."""
    body = bytearray()
    for tag, (keyword, kind) in sorted(ELEMENTS.items()):
        value = elements.pop(keyword, None)
        if value is None:
            continue
        raw = _value(kind, value)
        body += struct.pack("<HHI", tag >> 16, tag & 0xFFFF, len(raw)) + raw
    if elements:
        raise CommandError(f"unknown command elements: {', '.join(elements)}")
    return struct.pack("<HHII", 0, 0, 4, len(body)) + bytes(body)


def decode_identifier(data: bytes, transfer_syntax: str) -> Dataset:
    """A query/retrieve identifier (or any small dataset) received in `transfer_syntax`."""
    from pydicom.filereader import read_dataset
    from pydicom.uid import UID, ExplicitVRLittleEndian

    uid = UID(transfer_syntax)
    if uid.is_deflated:
        data = zlib.decompress(data, -zlib.MAX_WBITS)
        uid = UID(ExplicitVRLittleEndian)
    ds = read_dataset(BytesIO(data), uid.is_implicit_VR, uid.is_little_endian)
    ds.set_original_encoding(uid.is_implicit_VR, uid.is_little_endian, ds._character_set)
    return ds


def encode_identifier(ds: Dataset, transfer_syntax: str) -> bytes:
    """Encode a response identifier in the context's `transfer_syntax`."""
    from pydicom.filebase import DicomBytesIO
    from pydicom.filewriter import write_dataset
    from pydicom.uid import UID

    uid = UID(transfer_syntax)
    fp = DicomBytesIO()
    deflated = uid.is_deflated
    fp.is_implicit_VR = False if deflated else uid.is_implicit_VR
    fp.is_little_endian = True if deflated else uid.is_little_endian
    write_dataset(fp, ds)
    data: bytes = fp.getvalue()
    if deflated:
        compressor = zlib.compressobj(zlib.Z_DEFAULT_COMPRESSION, zlib.DEFLATED, -zlib.MAX_WBITS)
        data = compressor.compress(data) + compressor.flush()
    return data
