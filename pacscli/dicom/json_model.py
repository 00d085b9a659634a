"""The DICOM JSON model of PS3.18 F.2, which `--dicom-json` adds to records under `dicom`.

A record naming a DICOM file (`path`: what `store`, `index`, `get` and `serve` report) gets its
file's dataset, read without its pixel data; the file meta is not part of the model. A binary
value over BULK_DATA_THRESHOLD bytes (an encapsulated PDF, a waveform, an overlay) is not
inlined as base64 but named by a BulkDataURI: `file:///path/x.dcm?offset=N&length=M`, where
its bytes are in the file, as the file encodes them (dcm4che's dcm2json names bulk data the
same way); a deflated file has no such offsets, so its values stay inline, as do values of
undefined length (encapsulated). Any other record (a `find` match) gets the model of its own
DICOM values, with each keyword's VR from the data dictionary.

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
from pydicom.dataelem import RawDataElement
from pydicom.dataset import Dataset
from pydicom.filereader import read_file_meta_info
from pydicom.sequence import Sequence as DicomSequence

from pacscli.dicom.scan import DEFLATED
from pacscli.records import Record

log = logging.getLogger(__name__)

# Binary values longer than this go by BulkDataURI when they come from a file (pydicom's
# own default threshold).
BULK_DATA_THRESHOLD = 1024
_BINARY_VRS = frozenset({"OB", "OD", "OF", "OL", "OV", "OW", "UN"})
_UNDEFINED_LENGTH = 0xFFFFFFFF


def dataset_json(dataset: Dataset, *, source: Path | None = None, base: int = 0) -> dict[str, Any]:
    """The JSON model of `dataset`: {"00100020": {"vr": "LO", "Value": [...]}, ...}, keys in
    tag order. An element that cannot be put in the model is left out (logged). With
    `source`, the file `dataset` was read from (not deflated), long binary values are given
    as BulkDataURIs into it; `base` is where the offsets pydicom gives its elements start in
    that file (inside a sequence, see _element_json)."""
    model: dict[str, Any] = {}
    with warnings.catch_warnings(action="ignore"):  # pydicom warns on odd values: the log says what counts
        for tag in sorted(dataset.keys()):
            try:
                model[f"{tag:08X}"] = _element_json(dataset, tag, source, base)  # may raise
            except Exception as exc:  # pydicom raises many kinds on values it cannot convert
                log.warning("--dicom-json: element %s left out: %s", tag, exc)
    return model


def _element_json(dataset: Dataset, tag: int, source: Path | None, base: int) -> dict[str, Any]:
    raw = dataset.get_item(tag, keep_deferred=True)  # before conversion: where its value is
    at = None  # the value's offset in `source`, when known
    if source is not None and isinstance(raw, RawDataElement) and raw.value_tell is not None:
        at = base + raw.value_tell
        if BULK_DATA_THRESHOLD < raw.length < _UNDEFINED_LENGTH and \
                (vr := _settled_vr(dataset, tag, raw)) in _BINARY_VRS:
            return {"vr": vr,
                    "BulkDataURI": f"{source.absolute().as_uri()}?offset={at}&length={raw.length}"}
    element = dataset[tag]  # converted here, with the VR pydicom settles on; may raise
    if element.VR == "SQ":
        # pydicom reads the items of a sequence of undefined length from the file as it goes
        # (their offsets count from where this element's do), those of a defined length from
        # its value alone (from where that value is)
        items_base = None
        if source is not None and element.is_undefined_length:
            items_base = base
        elif at is not None and raw.length != _UNDEFINED_LENGTH:
            items_base = at
        items = [dataset_json(item, source=source if items_base is not None else None,
                              base=items_base or 0) for item in element.value]
        return {"vr": "SQ", "Value": items} if items else {"vr": "SQ"}
    encoded: dict[str, Any] = element.to_json_dict(None, BULK_DATA_THRESHOLD)
    values = encoded.get("Value")
    if isinstance(values, list) and any(isinstance(v, float) and not math.isfinite(v)
                                        for v in values):
        raise ValueError("a number JSON cannot hold (NaN or infinity)")
    return encoded


def _settled_vr(dataset: Dataset, tag: int, raw: RawDataElement) -> str:
    """The VR pydicom gives `raw` once converted (the dictionary's for implicit VR or UN,
    OW or OB for "OB or OW"), learned from an empty copy: a long value left unread is not
    read."""
    dataset[tag] = raw._replace(value=b"", length=0)
    try:
        return str(dataset[tag].VR)
    finally:
        dataset[tag] = raw


def file_json(path: Path) -> dict[str, Any]:
    """The JSON model of a DICOM file's dataset, without its pixel data, long binary values
    named by BulkDataURIs. Raises whatever pydicom raises on a file it cannot read."""
    with warnings.catch_warnings(action="ignore"):
        deflated = read_file_meta_info(path).get("TransferSyntaxUID") in DEFLATED
        # Long values are left unread, only their place in the file kept; a deflated file's
        # places are in the inflated stream, so it is read whole.
        dataset = dcmread(path, stop_before_pixels=True,
                          defer_size=None if deflated else BULK_DATA_THRESHOLD + 1)
    return dataset_json(dataset, source=None if deflated else path)


def record_json(record: Record) -> dict[str, Any]:
    """The JSON model of a record's DICOM values (keys that are DICOM keywords), sequences
    (lists of such records) included."""
    return dataset_json(_record_dataset(record))


def _record_dataset(record: Record) -> Dataset:
    dataset = Dataset()
    tagged = [(tag, key, value) for key, value in record.items()
              if (tag := tag_for_keyword(key)) is not None and not isinstance(value, dict)]
    for tag, key, value in sorted(tagged):  # in tag order, as in a file
        vr = dictionary_VR(tag).split(" or ")[0]  # "US or SS": either reads a plain number
        try:
            if vr == "SQ":
                items = [_record_dataset(item) for item in value or [] if isinstance(item, dict)]
                dataset.add_new(tag, vr, DicomSequence(items))
                continue
            with warnings.catch_warnings(action="ignore"):
                dataset.add_new(tag, vr, "" if value is None else value)
        except Exception as exc:  # a value its VR cannot hold ("abc" for an IS)
            log.warning("--dicom-json: %s left out: %s", key, exc)
    return dataset


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
