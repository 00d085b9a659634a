"""Change how a whole dataset is encoded: decompress it for peers that accept no compressed
transfer syntax, and repair encapsulated pixel data that strict peers refuse."""

from __future__ import annotations

import struct
from pathlib import Path

import numpy as np
from pydicom.dataset import Dataset
from pydicom.filewriter import dcmwrite
from pydicom.uid import UID

from pacscli.errors import PacsError

ITEM_TAG = b"\xfe\xff\x00\xe0"  # (FFFE,E000) little endian

# Byte width of the words of the binary VRs whose bytes follow the dataset's byte order.
_WORD_SIZE = {"OW": 2, "OF": 4, "OL": 4, "OD": 8, "OV": 8}


class TranscodeError(PacsError):
    """A dataset could not be decoded or re-encoded (no decoder for it, corrupt data)."""

    code = "cannot-convert"


def transfer_syntax(ds: Dataset) -> UID:
    """The dataset's transfer syntax, from its file meta."""
    return UID(str(ds.file_meta.TransferSyntaxUID).strip(" \x00"))


def convert(ds: Dataset, target: UID) -> None:
    """Re-encode `ds` in place as `target`, an uncompressed little endian transfer syntax.

    Compressed pixel data is decoded (pylibjpeg plugins); the SOP Instance UID is kept, since a
    change of transfer syntax leaves the same instance.
    """
    source = transfer_syntax(ds)
    if source.is_encapsulated and "PixelData" in ds:
        try:
            ds.decompress(generate_instance_uid=False)
        except Exception as exc:  # no plugin for the syntax, or corrupt codestream
            detail = " ".join(str(exc).split())  # the plugins' reports span several lines
            raise TranscodeError(f"cannot decompress {source.name} pixel data: {detail}") from exc
    elif not source.is_little_endian:
        _swap_words_to_little_endian(ds)
    ds.file_meta.TransferSyntaxUID = target


def _swap_words_to_little_endian(ds: Dataset) -> None:
    """Byte-swap OW/OF/OL/OD/OV values read from a big endian dataset.

    pydicom re-encodes numbers in the new byte order but writes these binary values as they
    were read, so they must be swapped here. Walking also decodes every raw element.
    """

    def swap(dataset: Dataset, elem: object) -> None:
        size = _WORD_SIZE.get(getattr(elem, "VR", ""), 0)
        value = getattr(elem, "value", None)
        if size and isinstance(value, bytes) and len(value) % size == 0:
            words = np.frombuffer(value, dtype=f">u{size}")
            elem.value = words.astype(f"<u{size}").tobytes()  # type: ignore[attr-defined]

    ds.walk(swap)
    ds.set_original_encoding(False, True, ds.original_character_set)


def pad_odd_fragments(value: bytes) -> tuple[bytes, int]:
    """Encapsulated pixel data with each odd-length fragment padded with a trailing 0x00.

    Returns the new value and how many fragments were padded. Offsets of a Basic Offset Table
    are moved to where their fragments now start.
    """
    items: list[bytes] = []
    pos = 0
    while pos + 8 <= len(value) and value[pos:pos + 4] == ITEM_TAG:
        length = struct.unpack_from("<I", value, pos + 4)[0]
        items.append(value[pos + 8:pos + 8 + length])
        pos += 8 + length
    if not items:
        raise TranscodeError("encapsulated pixel data has no items")
    bot, fragments = items[0], items[1:]
    new_offset: dict[int, int] = {}
    old = new = padded = 0
    out: list[bytes] = []
    for fragment in fragments:
        new_offset[old] = new
        old += 8 + len(fragment)
        if len(fragment) % 2:
            fragment += b"\x00"
            padded += 1
        new += 8 + len(fragment)
        out.append(ITEM_TAG + struct.pack("<I", len(fragment)) + fragment)
    offsets = struct.unpack(f"<{len(bot) // 4}I", bot[: len(bot) // 4 * 4])
    if all(o in new_offset for o in offsets):
        bot = struct.pack(f"<{len(offsets)}I", *(new_offset[o] for o in offsets))
    else:  # a table that points between items is wrong already: an empty one is valid
        bot = b""
    return ITEM_TAG + struct.pack("<I", len(bot)) + bot + b"".join(out), padded


def fix_odd_fragments(ds: Dataset) -> int:
    """Pad odd-length pixel data fragments of `ds` in place; returns how many were padded."""
    if "PixelData" not in ds or not transfer_syntax(ds).is_encapsulated:
        return 0
    value, padded = pad_odd_fragments(ds.PixelData)
    if padded:
        ds.PixelData = value
        ds["PixelData"].is_undefined_length = True
        # Extended offsets would now point wrong; the table is optional.
        for keyword in ("ExtendedOffsetTable", "ExtendedOffsetTableLengths"):
            if keyword in ds:
                del ds[keyword]
    return padded


def write_part10(ds: Dataset, path: Path) -> None:
    """Write `ds` as a Part 10 file in the transfer syntax of its file meta."""
    try:
        dcmwrite(path, ds, enforce_file_format=True)
    except Exception as exc:
        # pydicom's "With tag (gggg,eeee) got exception: ..." carries the whole traceback
        detail = " ".join(str(exc).split("\nTraceback", 1)[0].split())
        raise TranscodeError(f"cannot encode the dataset as "
                             f"{transfer_syntax(ds).name}: {detail}") from exc

