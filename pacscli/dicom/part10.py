"""Encoding the Part 10 header (preamble, DICM, file meta) of the files we write.

Written by hand rather than through pydicom's dataset machinery: it runs once per received
instance, and building a FileMetaDataset cost more than a millisecond each time.
"""

from __future__ import annotations

import struct

from pacscli import IMPLEMENTATION_CLASS_UID, IMPLEMENTATION_VERSION_NAME

PREAMBLE = b"\x00" * 128 + b"DICM"


def _element(element: int, vr: bytes, value: bytes) -> bytes:
    """One explicit VR little endian element of group 0002."""
    if vr == b"OB":
        return struct.pack("<HH2sHI", 0x0002, element, vr, 0, len(value)) + value
    return struct.pack("<HH2sH", 0x0002, element, vr, len(value)) + value


def _padded(text: str, pad: bytes) -> bytes:
    raw = text.encode("ascii")
    return raw + pad if len(raw) % 2 else raw


def part10_header(*, sop_class_uid: str, sop_instance_uid: str, transfer_syntax: str,
                  source_aet: str | None = None) -> bytes:
    """Preamble, DICM prefix and file meta group (PS3.10 7.1) for one instance."""
    body = b"".join([
        _element(0x0001, b"OB", b"\x00\x01"),
        _element(0x0002, b"UI", _padded(sop_class_uid, b"\x00")),
        _element(0x0003, b"UI", _padded(sop_instance_uid, b"\x00")),
        _element(0x0010, b"UI", _padded(transfer_syntax, b"\x00")),
        _element(0x0012, b"UI", _padded(IMPLEMENTATION_CLASS_UID, b"\x00")),
        _element(0x0013, b"SH", _padded(IMPLEMENTATION_VERSION_NAME, b" ")),
        _element(0x0016, b"AE", _padded(source_aet, b" ")) if source_aet else b"",
    ])
    group_length = struct.pack("<HH2sHI", 0x0002, 0x0000, b"UL", 4, len(body))
    return PREAMBLE + group_length + body
