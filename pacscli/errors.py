"""Errors the core raises, each with a stable code slug and the exit code it maps to.

The core never prints or exits; the CLI turns a PacsError into a message on stderr and
its exit code (DESIGN.md section 2).
"""

from __future__ import annotations

from enum import IntEnum
from typing import Any


class ExitCode(IntEnum):
    """Exit codes shared by every command."""

    OK = 0
    PARTIAL = 1  # some items failed, the rest were done
    USAGE = 2  # usage error or bad input
    CONNECT = 3  # could not connect, or the association was rejected
    PEER_FAILED = 4  # the peer answered the whole request with a failure status
    INTERRUPTED = 130


class PacsError(Exception):
    """Base error: `code` is a slug for machines, `message` a sentence for people."""

    code = "error"
    exit_code = ExitCode.PARTIAL

    def __init__(self, message: str, *, code: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        if code is not None:
            self.code = code

    def to_record(self) -> dict[str, Any]:
        """The `error` object of a failed record."""
        return {"code": self.code, "message": self.message}


class UsageError(PacsError):
    """Bad options, arguments, configuration or input."""

    code = "usage"
    exit_code = ExitCode.USAGE


class ConfigError(UsageError):
    """The configuration file or a remote name is wrong."""

    code = "config"


class InvalidDicomError(PacsError):
    """A file is not DICOM, is truncated, or lacks what we need."""

    code = "invalid-dicom"


class UnsafeUIDError(InvalidDicomError):
    """A Study, Series or SOP Instance UID that could not safely name a file."""

    code = "unsafe-uid"


class ArchiveError(PacsError):
    """The archive could not store or read an instance (I/O error, disk full)."""

    code = "archive"


class OutOfResourcesError(ArchiveError):
    """Disk full or an I/O error while writing: nothing was stored."""

    code = "out-of-resources"


class NetworkError(PacsError):
    """Could not reach the peer, or it refused the association."""

    code = "network"
    exit_code = ExitCode.CONNECT


class PeerFailure(PacsError):
    """The peer answered the whole request with a failure status."""

    code = "peer-failure"
    exit_code = ExitCode.PEER_FAILED
