"""The DICOM JSON model of PS3.18 F.2, which `--dicom-json` adds to records under `dicom`.

A record naming a DICOM file (`path`: what `store`, `index`, `get` and `serve` report) gets its
file's dataset, read without its pixel data; the file meta is not part of the model. Any other
record (a `find` match) gets the model of its own DICOM values, with each keyword's VR from the
data dictionary.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from pydicom import dcmread
from pydicom.datadict import dictionary_VR, tag_for_keyword
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError

from pacscli.records import Record

log = logging.getLogger(__name__)


def dataset_json(dataset: Dataset) -> dict[str, Any]:
    """The JSON model of `dataset`: {"00100020": {"vr": "LO", "Value": [...]}, ...}. An
    element whose value cannot be put in the model (a malformed number, say) is left out."""
    model: dict[str, Any] = dataset.to_json_dict(suppress_invalid_tags=True)
    return model


def file_json(path: Path) -> dict[str, Any]:
    """The JSON model of a DICOM file's dataset, without its pixel data. Raises OSError or
    InvalidDicomError when the file cannot be read as DICOM."""
    return dataset_json(dcmread(path, stop_before_pixels=True))


def record_json(record: Record) -> dict[str, Any]:
    """The JSON model of a record's DICOM values (keys that are DICOM keywords)."""
    dataset = Dataset()
    tagged = [(tag, value) for key, value in record.items()
              if (tag := tag_for_keyword(key)) is not None and not isinstance(value, dict)]
    for tag, value in sorted(tagged):  # in tag order, as in a file
        vr = dictionary_VR(tag).split(" or ")[0]  # "US or SS": either reads a plain number
        if vr != "SQ":
            dataset.add_new(tag, vr, "" if value is None else value)
    return dataset_json(dataset)


def with_dicom_json(record: Record) -> Record:
    """`record` with its JSON model under `dicom`: its file's when it names a readable DICOM
    file, else its own values'. A failed record is given none."""
    if record.get("status") == "failed":
        return record
    path = record.get("path")
    if isinstance(path, str):
        try:
            return {**record, "dicom": file_json(Path(path))}
        except (OSError, InvalidDicomError, ValueError) as exc:
            if record.get("status") == "skipped":  # not DICOM, and said so already
                return record
            log.warning("--dicom-json: cannot read %s (%s); the record's own values are used",
                        path, exc)
    return {**record, "dicom": record_json(record)}
