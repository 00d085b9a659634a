"""The DICOM JSON model of PS3.18 F.2, which `--dicom-json` adds to records under `dicom`.

A record naming a DICOM file (`path`: what `store`, `index`, `get` and `serve` report) gets its
file's dataset, read without its pixel data; the file meta is not part of the model. Any other
record (a `find` match) gets the model of its own DICOM values, with each keyword's VR from the
data dictionary.

Real files hold values pydicom cannot convert (a DS of "abc", a NaN where JSON has no number
for it): such an element is left out, at any depth, with a warning naming it, and the rest of
the model is kept.
"""

from __future__ import annotations

import logging
import math
import warnings
from pathlib import Path
from typing import Any

from pydicom import dcmread
from pydicom.datadict import dictionary_VR, tag_for_keyword
from pydicom.dataelem import DataElement
from pydicom.dataset import Dataset

from pacscli.records import Record

log = logging.getLogger(__name__)


def dataset_json(dataset: Dataset) -> dict[str, Any]:
    """The JSON model of `dataset`: {"00100020": {"vr": "LO", "Value": [...]}, ...}, keys in
    tag order. An element that cannot be put in the model is left out (logged)."""
    model: dict[str, Any] = {}
    with warnings.catch_warnings(action="ignore"):  # pydicom warns on odd values: the log says what counts
        for tag in sorted(dataset.keys()):
            try:
                model[f"{tag:08X}"] = _element_json(dataset[tag])  # converted here, may raise
            except Exception as exc:  # pydicom raises many kinds on values it cannot convert
                log.warning("--dicom-json: element %s left out: %s", tag, exc)
    return model


def _element_json(element: DataElement) -> dict[str, Any]:
    if element.VR == "SQ":
        items = [dataset_json(item) for item in element.value]
        return {"vr": "SQ", "Value": items} if items else {"vr": "SQ"}
    encoded: dict[str, Any] = element.to_json_dict(None, 1024)
    values = encoded.get("Value")
    if isinstance(values, list) and any(isinstance(v, float) and not math.isfinite(v)
                                        for v in values):
        raise ValueError("a number JSON cannot hold (NaN or infinity)")
    return encoded


def file_json(path: Path) -> dict[str, Any]:
    """The JSON model of a DICOM file's dataset, without its pixel data. Raises whatever
    pydicom raises on a file it cannot read."""
    with warnings.catch_warnings(action="ignore"):
        dataset = dcmread(path, stop_before_pixels=True)
    return dataset_json(dataset)


def record_json(record: Record) -> dict[str, Any]:
    """The JSON model of a record's DICOM values (keys that are DICOM keywords)."""
    dataset = Dataset()
    tagged = [(tag, key, value) for key, value in record.items()
              if (tag := tag_for_keyword(key)) is not None and not isinstance(value, dict)]
    for tag, key, value in sorted(tagged):  # in tag order, as in a file
        vr = dictionary_VR(tag).split(" or ")[0]  # "US or SS": either reads a plain number
        if vr == "SQ":
            continue
        try:
            with warnings.catch_warnings(action="ignore"):
                dataset.add_new(tag, vr, "" if value is None else value)
        except Exception as exc:  # a value its VR cannot hold ("abc" for an IS)
            log.warning("--dicom-json: %s left out: %s", key, exc)
    return dataset_json(dataset)


def with_dicom_json(record: Record) -> Record:
    """`record` with its JSON model under `dicom`: its file's when it names a readable DICOM
    file, else its own values'. Failed and skipped records are given none."""
    if record.get("status") in ("failed", "skipped"):
        return record
    path = record.get("path")
    if isinstance(path, str):
        try:
            return {**record, "dicom": file_json(Path(path))}
        except Exception as exc:  # what pydicom raises on a damaged file varies (zlib.error...)
            log.warning("--dicom-json: cannot read %s (%s); the record's own values are used",
                        path, exc)
    return {**record, "dicom": record_json(record)}
