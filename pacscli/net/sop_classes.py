"""SOP class lists for presentation contexts."""

from __future__ import annotations

from functools import cache

from pydicom.uid import UID
from pynetdicom.sop_class import _STORAGE_CLASSES


@cache
def storage_sop_classes() -> tuple[UID, ...]:
    """Every storage SOP class pynetdicom knows (PS3.4 Annex B)."""
    return tuple(UID(uid) for uid in _STORAGE_CLASSES.values())
