"""JSON-lines records: the one format every command reads and writes (DESIGN.md section 2).

DICOM values use their attribute keywords (`PatientID`, `SOPInstanceUID`); our own fields are
snake_case (`path`, `status`, `error`). `status` is one of ok|warning|pending|failed|skipped.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Iterator
from typing import Any, Literal, TextIO

from pacscli.errors import PacsError, UsageError

Status = Literal["ok", "warning", "pending", "failed", "skipped"]
Record = dict[str, Any]


def element_value(value: Any) -> Any:
    """A pydicom element value as plain JSON: strings, numbers, or a list of them."""
    if value is None:
        return None
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)  # a DS of "NaN": JSON has no number for it
    if isinstance(value, str | int | float | bool):
        return value
    if isinstance(value, bytes):
        return None  # binary values do not belong in records
    if isinstance(value, list | tuple) or type(value).__name__ == "MultiValue":
        return [element_value(v) for v in value]
    if type(value).__name__ == "PersonName":
        return str(value)
    if isinstance(value, int):
        return int(value)
    try:
        return float(value) if "." in str(value) or "e" in str(value).lower() else int(value)
    except (TypeError, ValueError):
        return str(value)


def failed(error: PacsError, **fields: Any) -> Record:
    """A record for one item that failed; the run goes on."""
    return {**fields, "status": "failed", "error": error.to_record()}


def skipped(path: str, code: str, reason: str, **fields: Any) -> Record:
    """A record for an input that is not an item to act on (not DICOM, a FIFO...), with why
    in words and as a `reason_code`; not a failure."""
    return {"path": path, **fields, "status": "skipped", "reason": reason, "reason_code": code}


def to_json_line(record: Record) -> str:
    """One record as one line of JSON (no trailing newline).

    A path whose name is not UTF-8 reaches us with its odd bytes as lone surrogates
    (os.fsdecode). Written raw, they made the line invalid UTF-8, or an encoding error: such a
    record is written all in ASCII, the surrogates as JSON escapes, which `json.loads`
    reads back and `os.fsencode` turns into the file's name again.
    """
    line = json.dumps(record, ensure_ascii=False, separators=(",", ":"), default=str)
    try:
        line.encode("utf-8")
    except UnicodeEncodeError:
        return json.dumps(record, ensure_ascii=True, separators=(",", ":"), default=str)
    return line


def write_record(stream: TextIO, record: Record) -> None:
    """Write one record and flush, so the next command in a pipe starts at once."""
    stream.write(to_json_line(record) + "\n")
    stream.flush()


def read_records(lines: Iterable[str]) -> Iterator[Record]:
    """Records from JSON lines; a line that is not a JSON object is taken as a path.

    `find . -name '*.dcm' | pacs store X` therefore works as well as a pipe of records.
    """
    for number, raw in enumerate(lines, start=1):
        line = raw.strip()
        if not line:
            continue
        if line.startswith("{"):
            try:
                record = json.loads(line)
            except json.JSONDecodeError as exc:
                raise UsageError(f"stdin line {number} is not valid JSON: {exc}") from exc
            if not isinstance(record, dict):
                raise UsageError(f"stdin line {number} is not a JSON object")
            yield record
        else:
            yield {"path": line}
