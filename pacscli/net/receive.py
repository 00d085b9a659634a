"""Chunked receive of C-STORE datasets straight into the archive's staging folder.

pynetdicom (with `_config.STORE_RECV_CHUNKED_DATASET`) writes each incoming dataset, PDV by
PDV, to a file it opens with `tempfile.NamedTemporaryFile` in the DUL thread. A write error
there (disk full) would abort the association, and the sender would never hear 0xA700. We
give pynetdicom a file of our own instead: it lives in the archive's staging folder (same
filesystem, so the archive's rename is cheap) and remembers a write error rather than
raising it, so the C-STORE handler can answer "out of resources" and lose nothing else.
"""

from __future__ import annotations

import logging
import os
import tempfile
from pathlib import Path
from typing import Any

from pynetdicom import _config, dimse_messages

log = logging.getLogger(__name__)


class StagingFile:
    """The file-like pynetdicom writes a received dataset to; keeps the first write error."""

    def __init__(self, folder: Path) -> None:
        fd, self.name = tempfile.mkstemp(suffix=".dcm", dir=folder)
        self._raw = os.fdopen(fd, "wb")
        self.error: OSError | None = None

    @property
    def file(self) -> StagingFile:
        """pynetdicom flushes through `.file.flush()`, as on a NamedTemporaryFile."""
        return self

    def write(self, data: bytes) -> int:
        """Write, or after an error drop the data (the handler reports the error)."""
        if self.error is None:
            try:
                self._raw.write(data)
            except OSError as exc:
                log.error("cannot write received data to %s: %s", self.name, exc)
                self.error = exc
        return len(data)

    def flush(self) -> None:
        """Flush to the OS, keeping any error for the handler."""
        if self.error is None:
            try:
                self._raw.flush()
            except OSError as exc:
                self.error = exc

    def close(self) -> None:
        """Close, keeping the error a failed final flush raises."""
        try:
            self._raw.close()
        except OSError as exc:
            self.error = self.error or exc


def install_staging_receiver(folder: Path) -> None:
    """Make pynetdicom receive C-STORE datasets in chunks into files in `folder`.

    Process-wide (pynetdicom's config is global): `pacs serve` and the receiving side of
    `pacs move --receive` own their process.
    """
    folder.mkdir(parents=True, exist_ok=True)
    _config.STORE_RECV_CHUNKED_DATASET = True

    def factory(*args: Any, **kwargs: Any) -> StagingFile:
        return StagingFile(folder)

    dimse_messages.NamedTemporaryFile = factory  # type: ignore[attr-defined]


def receive_error(request: Any) -> OSError | None:
    """The write error met while receiving this C-STORE request's dataset, if any."""
    staging = getattr(request, "_dataset_file", None)
    return staging.error if isinstance(staging, StagingFile) else None
