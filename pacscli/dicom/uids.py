"""UID checks: which UIDs may name a file in the archive (DESIGN.md section 4)."""

from __future__ import annotations

import re

from pacscli.errors import UnsafeUIDError

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
