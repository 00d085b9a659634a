"""UID checks (which UIDs may name a file in the archive, DESIGN.md section 4), and the
transfer syntaxes pydicom knows, as constants, so that `pacs store` needs no pydicom to
tell a clean file's encoding."""

from __future__ import annotations

import re

from pacscli.errors import InvalidDicomError, UnsafeUIDError

# Digits and dots, no empty component. Leading zeros are tolerated: real devices send them.
_SAFE_UID = re.compile(r"^[0-9]+(\.[0-9]+)*$")


def clean_uid(value: object) -> str:
    """A UID value without the space or NUL padding some devices add."""
    return str(value if value is not None else "").strip(" \x00")


def is_safe_uid(uid: str) -> bool:
    """True when `uid` is 1-64 characters of digits and dots with no empty component."""
    return 1 <= len(uid) <= 64 and _SAFE_UID.match(uid) is not None


def require_safe_uid(value: object, keyword: str) -> str:
    """The cleaned UID, or UnsafeUIDError naming the attribute and why."""
    uid = clean_uid(value)
    if not uid:
        raise UnsafeUIDError(f"{keyword} is missing or empty")
    if len(uid) > 64:
        raise UnsafeUIDError(f"{keyword} is {len(uid)} characters long (at most 64): {uid!r}")
    if not is_safe_uid(uid):
        raise UnsafeUIDError(f"{keyword} {uid!r} is not digits and dots with no empty component")
    return uid


def require_sop_class(uid: str) -> str:
    """`uid` (cleaned) when it can be a SOP Class UID: it goes into file metas and into
    association negotiation, where only a UID will do. Raises InvalidDicomError."""
    if not is_safe_uid(uid):
        raise InvalidDicomError(f"the SOP Class UID {uid!r} is not a UID (1 to 64 characters "
                                "of digits and dots)")
    return uid


IMPLICIT_VR_LITTLE_ENDIAN = "1.2.840.10008.1.2"
EXPLICIT_VR_LITTLE_ENDIAN = "1.2.840.10008.1.2.1"
DEFLATED_EXPLICIT_VR_LITTLE_ENDIAN = "1.2.840.10008.1.2.1.99"
EXPLICIT_VR_BIG_ENDIAN = "1.2.840.10008.1.2.2"
MEDIA_STORAGE_DIRECTORY = "1.2.840.10008.1.3.10"  # the SOP class of a DICOMDIR
# The syntaxes pydicom does not take as compressed (UID.is_compressed); it takes every other
# transfer syntax it knows as encapsulated.
NATIVE_SYNTAXES = frozenset({IMPLICIT_VR_LITTLE_ENDIAN, EXPLICIT_VR_LITTLE_ENDIAN,
                             DEFLATED_EXPLICIT_VR_LITTLE_ENDIAN, EXPLICIT_VR_BIG_ENDIAN})
# What a compressed file is converted to for a peer that takes no compressed syntax, in order
# of preference.
UNCOMPRESSED_SYNTAXES = (EXPLICIT_VR_LITTLE_ENDIAN, IMPLICIT_VR_LITTLE_ENDIAN)

# Every transfer syntax in pydicom's UID dictionary, with its name, as pynetdicom extends it
# when loaded (with the newer ones: JPEG XL, Deflated Image Frame Compression); `pacs store`
# and `pacs serve` always ran with pynetdicom loaded. Held equal to pydicom.uid.UID_dictionary
# by tests/dicom/test_tables.py.
TRANSFER_SYNTAXES: dict[str, str] = {
    "1.2.840.10008.1.2": "Implicit VR Little Endian",
    "1.2.840.10008.1.2.1": "Explicit VR Little Endian",
    "1.2.840.10008.1.2.1.98": "Encapsulated Uncompressed Explicit VR Little Endian",
    "1.2.840.10008.1.2.1.99": "Deflated Explicit VR Little Endian",
    "1.2.840.10008.1.2.2": "Explicit VR Big Endian",
    "1.2.840.10008.1.2.4.50": "JPEG Baseline (Process 1)",
    "1.2.840.10008.1.2.4.51": "JPEG Extended (Process 2 and 4)",
    "1.2.840.10008.1.2.4.52": "JPEG Extended (Process 3 and 5)",
    "1.2.840.10008.1.2.4.53": "JPEG Spectral Selection, Non-Hierarchical (Process 6 and 8)",
    "1.2.840.10008.1.2.4.54": "JPEG Spectral Selection, Non-Hierarchical (Process 7 and 9)",
    "1.2.840.10008.1.2.4.55": "JPEG Full Progression, Non-Hierarchical (Process 10 and 12)",
    "1.2.840.10008.1.2.4.56": "JPEG Full Progression, Non-Hierarchical (Process 11 and 13)",
    "1.2.840.10008.1.2.4.57": "JPEG Lossless, Non-Hierarchical (Process 14)",
    "1.2.840.10008.1.2.4.58": "JPEG Lossless, Non-Hierarchical (Process 15)",
    "1.2.840.10008.1.2.4.59": "JPEG Extended, Hierarchical (Process 16 and 18)",
    "1.2.840.10008.1.2.4.60": "JPEG Extended, Hierarchical (Process 17 and 19)",
    "1.2.840.10008.1.2.4.61": "JPEG Spectral Selection, Hierarchical (Process 20 and 22)",
    "1.2.840.10008.1.2.4.62": "JPEG Spectral Selection, Hierarchical (Process 21 and 23)",
    "1.2.840.10008.1.2.4.63": "JPEG Full Progression, Hierarchical (Process 24 and 26)",
    "1.2.840.10008.1.2.4.64": "JPEG Full Progression, Hierarchical (Process 25 and 27)",
    "1.2.840.10008.1.2.4.65": "JPEG Lossless, Hierarchical (Process 28)",
    "1.2.840.10008.1.2.4.66": "JPEG Lossless, Hierarchical (Process 29)",
    "1.2.840.10008.1.2.4.70":
        "JPEG Lossless, Non-Hierarchical, First-Order Prediction (Process 14 [Selection Value 1])",
    "1.2.840.10008.1.2.4.80": "JPEG-LS Lossless Image Compression",
    "1.2.840.10008.1.2.4.81": "JPEG-LS Lossy (Near-Lossless) Image Compression",
    "1.2.840.10008.1.2.4.90": "JPEG 2000 Image Compression (Lossless Only)",
    "1.2.840.10008.1.2.4.91": "JPEG 2000 Image Compression",
    "1.2.840.10008.1.2.4.92": "JPEG 2000 Part 2 Multi-component Image Compression (Lossless Only)",
    "1.2.840.10008.1.2.4.93": "JPEG 2000 Part 2 Multi-component Image Compression",
    "1.2.840.10008.1.2.4.94": "JPIP Referenced",
    "1.2.840.10008.1.2.4.95": "JPIP Referenced Deflate",
    "1.2.840.10008.1.2.4.100": "MPEG2 Main Profile / Main Level",
    "1.2.840.10008.1.2.4.100.1": "Fragmentable MPEG2 Main Profile / Main Level",
    "1.2.840.10008.1.2.4.101": "MPEG2 Main Profile / High Level",
    "1.2.840.10008.1.2.4.101.1": "Fragmentable MPEG2 Main Profile / High Level",
    "1.2.840.10008.1.2.4.102": "MPEG-4 AVC/H.264 High Profile / Level 4.1",
    "1.2.840.10008.1.2.4.102.1": "Fragmentable MPEG-4 AVC/H.264 High Profile / Level 4.1",
    "1.2.840.10008.1.2.4.103": "MPEG-4 AVC/H.264 BD-compatible High Profile / Level 4.1",
    "1.2.840.10008.1.2.4.103.1": "Fragmentable MPEG-4 AVC/H.264 BD-compatible High Profile / Level 4.1",
    "1.2.840.10008.1.2.4.104": "MPEG-4 AVC/H.264 High Profile / Level 4.2 For 2D Video",
    "1.2.840.10008.1.2.4.104.1": "Fragmentable MPEG-4 AVC/H.264 High Profile / Level 4.2 For 2D Video",
    "1.2.840.10008.1.2.4.105": "MPEG-4 AVC/H.264 High Profile / Level 4.2 For 3D Video",
    "1.2.840.10008.1.2.4.105.1": "Fragmentable MPEG-4 AVC/H.264 High Profile / Level 4.2 For 3D Video",
    "1.2.840.10008.1.2.4.106": "MPEG-4 AVC/H.264 Stereo High Profile / Level 4.2",
    "1.2.840.10008.1.2.4.106.1": "Fragmentable MPEG-4 AVC/H.264 Stereo High Profile / Level 4.2",
    "1.2.840.10008.1.2.4.107": "HEVC/H.265 Main Profile / Level 5.1",
    "1.2.840.10008.1.2.4.108": "HEVC/H.265 Main 10 Profile / Level 5.1",
    "1.2.840.10008.1.2.4.110": "JPEG XL Lossless",
    "1.2.840.10008.1.2.4.111": "JPEG XL JPEG Recompression",
    "1.2.840.10008.1.2.4.112": "JPEG XL",
    "1.2.840.10008.1.2.4.201": "High-Throughput JPEG 2000 Image Compression (Lossless Only)",
    "1.2.840.10008.1.2.4.202":
        "High-Throughput JPEG 2000 with RPCL Options Image Compression (Lossless Only)",
    "1.2.840.10008.1.2.4.203": "High-Throughput JPEG 2000 Image Compression",
    "1.2.840.10008.1.2.4.204": "JPIP HTJ2K Referenced",
    "1.2.840.10008.1.2.4.205": "JPIP HTJ2K Referenced Deflate",
    "1.2.840.10008.1.2.5": "RLE Lossless",
    "1.2.840.10008.1.2.6.1": "RFC 2557 MIME encapsulation",
    "1.2.840.10008.1.2.6.2": "XML Encoding",
    "1.2.840.10008.1.2.7.1": "SMPTE ST 2110-20 Uncompressed Progressive Active Video",
    "1.2.840.10008.1.2.7.2": "SMPTE ST 2110-20 Uncompressed Interlaced Active Video",
    "1.2.840.10008.1.2.7.3": "SMPTE ST 2110-30 PCM Digital Audio",
    "1.2.840.10008.1.2.8.1": "Deflated Image Frame Compression",
    "1.2.840.10008.1.20": "Papyrus 3 Implicit VR Little Endian",
}


def is_encapsulated(transfer_syntax: str) -> bool:
    """pydicom's `UID(transfer_syntax).is_encapsulated`: from the table for a syntax it
    knows, from pydicom itself otherwise (which raises ValueError for a UID that is not a
    transfer syntax)."""
    if transfer_syntax in TRANSFER_SYNTAXES:
        return transfer_syntax not in NATIVE_SYNTAXES
    from pydicom.uid import UID

    return bool(UID(transfer_syntax).is_encapsulated)


def uid_name(uid: str) -> str:
    """A UID's name for people ("JPEG Baseline (Process 1)", "CT Image Storage"), or the UID
    when it has none: transfer syntaxes from the table, any other UID from pydicom's
    dictionary (loaded for this, on error paths only)."""
    if uid in TRANSFER_SYNTAXES:
        return TRANSFER_SYNTAXES[uid]
    from pydicom.uid import UID

    return str(UID(uid).name)
