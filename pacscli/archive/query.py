"""The query engine over the archive's index: C-FIND matching in SQL, and what to send for a
C-MOVE or C-GET. Used by `pacs find --archive` and by the C-FIND/C-MOVE/C-GET SCPs.

`find` turns an identifier into one SQL statement over the index and streams one response
dataset per match. Keys the index holds (`INDEXED_ATTRIBUTES`) and the ones it computes
(ModalitiesInStudy, NumberOf...Related..., SOPClassesInStudy) are matched in SQL, with
index-friendly forms for UIDs, exact values, wildcard prefixes and date ranges. Other keys,
sequences among them, are answered from one instance file of each candidate (its first
instance): correct, but a file read per result, so the default keys never need it.

Matching is relational: a key of any level above the one queried may be used (Study Root's
patient keys at study level, a StudyDate at series level); keys of lower levels are ignored
and returned empty, as PS3.4 lets an SCP do with keys it does not support.
"""

from __future__ import annotations

import logging
import sqlite3
from collections.abc import Generator, Iterator, Mapping
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any, NamedTuple

import pydicom
from pydicom.dataelem import DataElement
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence as DicomSequence
from pydicom.tag import BaseTag, Tag

from pacscli.archive import layout
from pacscli.archive.index import Index
from pacscli.dicom.attributes import INDEXED_ATTRIBUTES
from pacscli.dicom.query import (
    LEVELS,
    SERVICE_KEYS,
    UNIQUE_KEYS,
    InvalidQueryError,
    Match,
    Query,
    check_level,
    identifier_record,
    is_multi_valued,
    level_of,
    matcher,
    matches,
    name_of,
    sequence_matches,
    value_list,
)
from pacscli.errors import PacsError, UsageError
from pacscli.records import Record

log = logging.getLogger(__name__)

_ALIAS = {"PATIENT": "p", "STUDY": "st", "SERIES": "se", "IMAGE": "i"}
_INDEX_LEVEL = {"PATIENT": "patient", "STUDY": "study", "SERIES": "series", "IMAGE": "instance"}

_FROM = {
    "PATIENT": "patients p",
    "STUDY": "studies st JOIN patients p ON p.pk = st.patient_pk",
    "SERIES": "series se JOIN studies st ON st.pk = se.study_pk "
              "JOIN patients p ON p.pk = st.patient_pk",
    "IMAGE": "instances i JOIN series se ON se.pk = i.series_pk "
             "JOIN studies st ON st.pk = se.study_pk JOIN patients p ON p.pk = st.patient_pk",
}

# keyword -> (level, column expression) of every indexed attribute
_COLUMNS: dict[str, tuple[str, str]] = {
    kw: (level, f"{_ALIAS[level]}.{kw}")
    for level in LEVELS for kw in INDEXED_ATTRIBUTES[_INDEX_LEVEL[level]]
}

# Computed attributes: (level, SELECT expression, is a list)
_COMPUTED: dict[str, tuple[str, str, bool]] = {
    "NumberOfPatientRelatedStudies": (
        "PATIENT", "(SELECT count(*) FROM studies x WHERE x.patient_pk = p.pk)", False),
    "NumberOfPatientRelatedSeries": (
        "PATIENT", "(SELECT count(*) FROM studies x JOIN series y ON y.study_pk = x.pk "
                   "WHERE x.patient_pk = p.pk)", False),
    "NumberOfPatientRelatedInstances": (
        "PATIENT", "(SELECT count(*) FROM studies x JOIN series y ON y.study_pk = x.pk "
                   "JOIN instances z ON z.series_pk = y.pk WHERE x.patient_pk = p.pk)", False),
    "ModalitiesInStudy": (
        "STUDY", "(SELECT group_concat(DISTINCT y.Modality) FROM series y "
                 "WHERE y.study_pk = st.pk)", True),
    "SOPClassesInStudy": (
        "STUDY", "(SELECT group_concat(DISTINCT z.SOPClassUID) FROM series y "
                 "JOIN instances z ON z.series_pk = y.pk WHERE y.study_pk = st.pk)", True),
    "NumberOfStudyRelatedSeries": (
        "STUDY", "(SELECT count(*) FROM series y WHERE y.study_pk = st.pk)", False),
    "NumberOfStudyRelatedInstances": (
        "STUDY", "(SELECT count(*) FROM series y JOIN instances z ON z.series_pk = y.pk "
                 "WHERE y.study_pk = st.pk)", False),
    "NumberOfSeriesRelatedInstances": (
        "SERIES", "(SELECT count(*) FROM instances z WHERE z.series_pk = se.pk)", False),
    "AvailableTransferSyntaxUID": ("IMAGE", "i.transfer_syntax", False),
}

# Computed attributes that can be matched: (template with {cond}, column the cond is on)
_COMPUTED_MATCH: dict[str, tuple[str, str]] = {
    "ModalitiesInStudy": ("EXISTS (SELECT 1 FROM series y WHERE y.study_pk = st.pk AND {cond})",
                          "y.Modality"),
    "SOPClassesInStudy": ("EXISTS (SELECT 1 FROM series y JOIN instances z ON z.series_pk = y.pk "
                          "WHERE y.study_pk = st.pk AND {cond})", "z.SOPClassUID"),
    "AvailableTransferSyntaxUID": ("{cond}", "i.transfer_syntax"),
}

# One instance file of each entity: where keys the index does not hold are read from.
_REPRESENTATIVE = {
    "PATIENT": "(SELECT z.path FROM studies x JOIN series y ON y.study_pk = x.pk "
               "JOIN instances z ON z.series_pk = y.pk WHERE x.patient_pk = p.pk LIMIT 1)",
    "STUDY": "(SELECT z.path FROM series y JOIN instances z ON z.series_pk = y.pk "
             "WHERE y.study_pk = st.pk LIMIT 1)",
    "SERIES": "(SELECT z.path FROM instances z WHERE z.series_pk = se.pk LIMIT 1)",
    "IMAGE": "i.path",
}


# --- SQL for one key ----------------------------------------------------------------------------

@lru_cache(maxsize=1024)
def _cached_matcher(vr: str, query: str, ci: bool) -> Match:
    return matcher(vr, query, case_insensitive_names=ci)


def _sql_match(value: str | None, vr: str, query: str, ci: int) -> int:
    """SQL function pacs_match(value, vr, query, ci): DICOM matching of a (multi-valued) value."""
    if value is None:
        return 0
    return int(_cached_matcher(vr, query, bool(ci)).test_any(value.split("\\")))


def _glob(pattern: str) -> str:
    """A DICOM wildcard pattern as a GLOB pattern: only `[` is special to GLOB and not DICOM."""
    return pattern.replace("[", "[[]")


def _after(prefix: str) -> str:
    """The smallest string greater than every string starting with `prefix`."""
    return prefix[:-1] + chr(ord(prefix[-1]) + 1)


def _ascii_prefix(text: str) -> str:
    """The leading ASCII run of a text, lower-cased: what SQLite's lower() folds alike."""
    out = []
    for char in text:
        if not char.isascii() or char in "*?":
            break
        out.append(char.lower())
    return "".join(out)


@dataclass
class _Where:
    """WHERE clauses and their parameters."""

    clauses: list[str] = field(default_factory=list)
    params: list[Any] = field(default_factory=list)

    def add(self, clause: str, *params: Any) -> None:
        self.clauses.append(clause)
        self.params.extend(params)


def _condition(expr: str, match: Match, query_text: str, multi: bool) -> tuple[str, list[Any]]:
    """SQL for one key's match on a column expression (not universal)."""
    if multi or (match.case_insensitive and match.kind in ("single", "wildcard", "list")):
        # Multi-valued columns and Unicode case folding: an exact test in Python, after an
        # index-friendly prefilter on the ASCII prefix of a case-insensitive name.
        parts = ["pacs_match(" + expr + ", ?, ?, ?)"]
        params: list[Any] = [match.vr, query_text, int(match.case_insensitive)]
        single_alternative = match.kind in ("single", "wildcard")
        if match.case_insensitive and not multi and single_alternative:
            prefix = _ascii_prefix(match.value)
            if prefix:
                parts.insert(0, f"lower({expr}) >= ? AND lower({expr}) < ?")
                params[:0] = [prefix, _after(prefix)]
        return " AND ".join(parts), params
    if match.kind == "single":
        return f"{expr} = ?", [match.value]
    if match.kind == "wildcard":
        prefix = match.prefix
        if prefix:
            return f"{expr} >= ? AND {expr} < ? AND {expr} GLOB ?", [prefix, _after(prefix),
                                                                    _glob(match.value)]
        return f"{expr} GLOB ?", [_glob(match.value)]
    if match.kind == "range":
        clauses, params = [], []
        if match.low is not None:
            clauses.append(f"{expr} >= ?")
            params.append(match.low)
        if match.high is not None:
            if match.vr == "DA":
                clauses.append(f"{expr} <= ?")
            else:  # TM/DT: '-1300' includes 13:00:59 (compare at the bound's precision)
                clauses.append(f"substr({expr}, 1, {len(match.high)}) <= ?")
            params.append(match.high)
        return " AND ".join(clauses), params
    if match.kind == "list":
        singles = [a.value for a in match.alternatives if a.kind == "single"]
        others = [a for a in match.alternatives if a.kind != "single"]
        clauses = []
        params = []
        if singles:
            clauses.append(f"{expr} IN ({', '.join('?' * len(singles))})")
            params.extend(singles)
        for alt in others:
            clause, alt_params = _condition(expr, alt, alt.value, False)
            clauses.append(f"({clause})")
            params.extend(alt_params)
        return "(" + " OR ".join(clauses) + ")", params
    raise AssertionError(match.kind)


# --- the plan of one query ----------------------------------------------------------------------

@dataclass
class _Field:
    """How one element of a response is filled."""

    tag: BaseTag
    vr: str
    source: str  # column | list | level | retrieve_aet | availability | empty | file
    index: int = -1  # position in the SELECT list


@dataclass
class _Plan:
    level: str
    sql: str
    params: list[Any]
    fields: list[_Field]
    file_identifier: Dataset | None  # the keys answered from an instance file
    file_matching: bool  # and whether some of them match (so SQL LIMIT cannot be used)
    path_index: int = -1


def _plan(level: str, identifier: Dataset, model: str, ci: bool, retrieve_aet: str | None) -> _Plan:
    rank = LEVELS.index(level)
    selects: list[str] = []
    fields: list[_Field] = []
    where = _Where()
    file_identifier = Dataset()
    file_matching = False

    def select(expr: str) -> int:
        selects.append(expr)
        return len(selects) - 1

    for elem in identifier:
        tag, vr, keyword = elem.tag, elem.VR, elem.keyword or ""
        if tag.group in (0x0000, 0x0002):
            continue
        if keyword in SERVICE_KEYS:
            source = {"QueryRetrieveLevel": "level", "SpecificCharacterSet": "charset",
                      "RetrieveAETitle": "retrieve_aet" if retrieve_aet else "empty",
                      "InstanceAvailability": "availability"}.get(keyword, "empty")
            if source != "charset":
                fields.append(_Field(tag, vr, source))
            continue
        if tag.is_private_creator:
            # It reserves a block for the private keys after it, matches nothing (a vendor
            # workstation sends its own with every query): returned as the instance has it.
            fields.append(_Field(tag, vr, "file"))
            file_identifier.add(DataElement(tag, vr, None))
            continue
        owner = level_of(keyword, model) if keyword else None
        if keyword in _COLUMNS and vr != "SQ":
            column_level, expr = _COLUMNS[keyword]
            if LEVELS.index(column_level) > rank:
                fields.append(_Field(tag, vr, "empty"))  # a lower level's key: not supported
                continue
            fields.append(_Field(tag, vr, "column", select(expr)))
            match = matcher(vr, elem.value, case_insensitive_names=ci)
            if match.kind != "universal":
                query_text = "\\".join(value_list(elem.value))
                clause, params = _condition(expr, match, query_text, is_multi_valued(tag))
                where.add(clause, *params)
            continue
        if keyword in _COMPUTED:
            computed_level, expr, is_list = _COMPUTED[keyword]
            if LEVELS.index(computed_level) > rank:
                fields.append(_Field(tag, vr, "empty"))
                continue
            fields.append(_Field(tag, vr, "list" if is_list else "column", select(expr)))
            match = matcher(vr, elem.value)
            if match.kind != "universal":
                if keyword in _COMPUTED_MATCH:
                    template, column = _COMPUTED_MATCH[keyword]
                    clause, params = _condition(column, match, "\\".join(value_list(elem.value)),
                                                False)
                    where.add(template.format(cond=clause), *params)
                else:
                    log.debug("matching on %s is not supported: universal matching", keyword)
            continue
        if owner is not None and LEVELS.index(owner) > rank:
            fields.append(_Field(tag, vr, "empty"))
            continue
        # Not in the index: answered from an instance file.
        fields.append(_Field(tag, vr, "file"))
        file_identifier.add(elem)
        if vr == "SQ":
            file_matching = file_matching or not sequence_matches(elem.value, None)
        elif matcher(vr, elem.value).kind != "universal":
            file_matching = True

    if "QueryRetrieveLevel" not in identifier:  # every response names its level
        fields.append(_Field(Tag(0x0008, 0x0052), "CS", "level"))
    alias = _ALIAS[level]
    path_index = select(_REPRESENTATIVE[level]) if len(file_identifier) else -1
    sql = f"SELECT {', '.join(selects) or alias + '.pk'} FROM {_FROM[level]}"
    if where.clauses:
        sql += " WHERE " + " AND ".join(where.clauses)
    return _Plan(level, sql, where.params, fields,
                 file_identifier if len(file_identifier) else None, file_matching, path_index)


# --- find ---------------------------------------------------------------------------------------

def _register_functions(conn: sqlite3.Connection) -> None:
    """Give a connection pacs_match(), once: SQLite refuses to replace a function while a
    statement runs (a query inside another one's loop)."""
    try:
        conn.execute("SELECT pacs_match(NULL, '', '', 0)").fetchone()
    except sqlite3.OperationalError:
        conn.create_function("pacs_match", 4, _sql_match, deterministic=True)


def find(index: Index, level: str, identifier: Dataset, *, model: str = "study",
         case_insensitive_names: bool = False, limit: int | None = None,
         retrieve_aet: str | None = None) -> Generator[Dataset, None, None]:
    """Stream the C-FIND responses of `identifier` at `level` over the index: one dataset per
    match, holding every key of the identifier (empty when there is no value), with
    QueryRetrieveLevel and, when a value needs it, SpecificCharacterSet 'ISO_IR 192'.

    `model` is "study" (Study Root) or "patient" (Patient Root); the patient level needs the
    latter. `case_insensitive_names` matches person names regardless of case (PS3.4 leaves
    PN case to the SCP; the default is exact). `retrieve_aet` fills a RetrieveAETitle key.
    Raises InvalidQueryError (a UsageError) for an unknown level or one the model lacks.
    """
    level, model_name = check_level(level, model)
    if limit is not None and limit < 1:
        raise UsageError(f"--limit must be 1 or more, not {limit}")
    plan = _plan(level, identifier, model_name, case_insensitive_names, retrieve_aet)
    sql, params = plan.sql, list(plan.params)
    if limit is not None and not plan.file_matching:
        sql += " LIMIT ?"
        params.append(limit)
    conn = index.connection()
    _register_functions(conn)
    root = index.path.parent
    log.debug("find %s: %s %s", level, sql, params)
    cursor = conn.execute(sql, params)
    produced = 0
    try:
        for row in cursor:
            found: Dataset | None = None
            if plan.file_identifier is not None:
                found = _read_instance(root, row[plan.path_index], plan.file_identifier)
                if plan.file_matching and (found is None or not matches(
                        plan.file_identifier, found, case_insensitive_names=case_insensitive_names)):
                    continue
            yield _response(plan, row, found, retrieve_aet, case_insensitive_names)
            produced += 1
            if limit is not None and produced >= limit:
                return
    finally:
        cursor.close()


def _read_instance(root: Path, relpath: str | None, keys: Dataset) -> Dataset | None:
    """The keys' elements of an instance file, None when it cannot be read."""
    if not relpath:
        return None
    tags = [elem.tag for elem in keys] + [0x00080005]
    try:
        return pydicom.dcmread(root / relpath, stop_before_pixels=True, specific_tags=tags)
    except Exception as exc:  # a file gone or damaged: `pacs verify` reports it
        log.warning("cannot read %s for a query: %s", root / relpath, exc)
        return None


def _response(plan: _Plan, row: Any, found: Dataset | None, retrieve_aet: str | None,
              ci: bool) -> Dataset:
    ds = Dataset()
    non_ascii = False
    for fld in plan.fields:
        value: Any = None
        if fld.source == "column":
            raw = row[fld.index]
            value = None if raw is None else str(raw)
        elif fld.source == "list":
            raw = row[fld.index]
            value = sorted(set(str(raw).split(","))) if raw else None
        elif fld.source == "level":
            value = plan.level
        elif fld.source == "retrieve_aet":
            value = retrieve_aet
        elif fld.source == "availability":
            value = "ONLINE"
        elif fld.source == "file":
            _copy_from_file(ds, fld, found, plan.file_identifier, ci, plan.level)
            continue
        if isinstance(value, str) and not value.isascii():
            non_ascii = True
        _add_value(ds, fld, value, plan.level)
    if non_ascii or (found is not None and _has_non_ascii(ds)):
        ds.SpecificCharacterSet = "ISO_IR 192"
    return ds


def _add_value(ds: Dataset, fld: _Field, value: Any, level: str) -> None:
    """Put a response value as archived, unvalidated (a date written '1997.04.24' goes back
    so, without a warning per response). One its VR cannot hold at all (an IS of '1A', as a
    device wrote it) goes back empty, with a warning: one bad file does not end the query."""
    try:
        ds.add(DataElement(fld.tag, fld.vr, value, validation_mode=pydicom.config.IGNORE))
    except (ValueError, TypeError, OverflowError):
        log.warning("%s %r at the %s level in the archive is not a valid %s: returned empty",
                    name_of(fld.tag), value, level.lower(), fld.vr)
        ds.add_new(fld.tag, fld.vr, None)


def _has_non_ascii(ds: Dataset) -> bool:
    for elem in ds:
        if elem.VR == "SQ":
            found = any(_has_non_ascii(item) for item in elem.value)
        else:
            text = elem.value if isinstance(elem.value, str) or \
                type(elem.value).__name__ == "PersonName" else ""
            found = not str(text).isascii()
        if found:
            return True
    return False


def _copy_from_file(ds: Dataset, fld: _Field, found: Dataset | None, keys: Dataset | None,
                    ci: bool, level: str) -> None:
    """A response element from the instance file: the value, or for a sequence the items that
    match the query item, with the query item's keys (all of an item when it asks for none)."""
    try:
        elem = found.get(fld.tag) if found is not None else None
    except (ValueError, TypeError, OverflowError):  # a value its VR cannot hold: as empty
        log.warning("%s in an archived file at the %s level cannot be read: returned empty",
                    name_of(fld.tag), level.lower())
        elem = None
    if elem is not None and fld.vr == "UN" and elem.VR not in ("UN", "SQ"):
        # a private key, whose VR the query could not give: the instance knows it
        _add_value(ds, _Field(fld.tag, elem.VR, fld.source), elem.value, level)
        return
    if elem is None or (fld.vr not in (elem.VR, "SQ")):
        ds.add_new(fld.tag, fld.vr, DicomSequence([]) if fld.vr == "SQ" else None)
        return
    if fld.vr != "SQ":
        _add_value(ds, fld, elem.value, level)
        return
    query_items = keys[fld.tag].value if keys is not None and fld.tag in keys else []
    items = list(elem.value) if elem.VR == "SQ" else []
    if query_items and len(query_items[0]):
        wanted = query_items[0]
        chosen = [item for item in items if matches(wanted, item, case_insensitive_names=ci)]
        projected = []
        for item in chosen:
            out = Dataset()
            for key in wanted:
                sub = item.get(key.tag)
                out.add_new(key.tag, key.VR, sub.value if sub is not None else None)
            projected.append(out)
        items = projected
    ds.add_new(fld.tag, "SQ", DicomSequence(items))


def find_records(index: Index, query: Query, *, case_insensitive_names: bool = False,
                 limit: int | None = None) -> Iterator[Record]:
    """`find`, each result as a JSON-lines record (the same records as a remote C-FIND)."""
    for ds in find(index, query.level, query.identifier, model=query.model,
                   case_insensitive_names=case_insensitive_names, limit=limit):
        yield identifier_record(ds, query.order)


def open_index(root: Path) -> Index:
    """The index of an existing archive, for queries; UsageError when there is none."""
    path = root.expanduser() / layout.INDEX_FILE
    if not path.is_file():
        raise UsageError(f"no archive at {root}: {path.name} not found (give --archive DIR "
                         "or set PACS_ARCHIVE)")
    return Index(path)


# --- retrieve -----------------------------------------------------------------------------------

class RetrieveItem(NamedTuple):
    """An instance to send for a C-MOVE or C-GET."""

    path: Path
    sop_class_uid: str
    sop_instance_uid: str
    transfer_syntax: str


_UID_COLUMNS = {"PatientID": "p.PatientID", "IssuerOfPatientID": "p.IssuerOfPatientID",
                "StudyInstanceUID": "st.StudyInstanceUID",
                "SeriesInstanceUID": "se.SeriesInstanceUID", "SOPInstanceUID": "i.SOPInstanceUID"}


def _identifier_values(identifier: Dataset | Mapping[str, Any], keyword: str) -> list[str]:
    if isinstance(identifier, Dataset):
        values = value_list(identifier.get(keyword))
    else:
        raw = identifier.get(keyword)
        if raw is None:
            values = []
        elif isinstance(raw, list | tuple):
            values = [str(v) for v in raw]
        else:
            values = str(raw).split("\\")
    return [v.strip() for v in values if v and v.strip()]


def instances_for_retrieve(index: Index, level: str,
                           identifier: Dataset | Mapping[str, Any], *,
                           model: str = "study") -> list[RetrieveItem]:
    """The instances a C-MOVE or C-GET of `identifier` at `level` retrieves, in study, series
    and instance-number order; paths are absolute.

    The identifier (a Dataset, or a mapping of keywords to a UID, a backslash list or a list)
    must hold the unique key of the level (PatientID, StudyInstanceUID, SeriesInstanceUID or
    SOPInstanceUID, UID lists allowed); unique keys of the levels above, when present, narrow
    the match. Raises InvalidQueryError (a UsageError) otherwise.
    """
    level, _ = check_level(level, model)
    key = UNIQUE_KEYS[level]
    if not _identifier_values(identifier, key):
        raise InvalidQueryError(f"a {level} retrieve needs {key} in the identifier")
    where = _Where()
    for keyword, column in _UID_COLUMNS.items():
        values = _identifier_values(identifier, keyword)
        if values:
            where.add(f"{column} IN ({', '.join('?' * len(values))})", *values)
    sql = (f"SELECT i.path, i.SOPClassUID, i.SOPInstanceUID, i.transfer_syntax "
           f"FROM {_FROM['IMAGE']} WHERE {' AND '.join(where.clauses)} "
           "ORDER BY st.pk, se.pk, CAST(i.InstanceNumber AS INTEGER), i.pk")
    root = index.path.parent
    return [RetrieveItem(root / row[0], row[1], row[2], row[3])
            for row in index.connection().execute(sql, where.params)]


def record_level(record: Mapping[str, Any]) -> str:
    """The level at which a record names instances: its QueryRetrieveLevel, else the level
    of the deepest unique key it has. UsageError (code no-path) when it has none."""
    level = str(record.get("QueryRetrieveLevel") or "").strip().upper()
    if not level:
        level = next((name for name in ("IMAGE", "SERIES", "STUDY", "PATIENT")
                      if _identifier_values(record, UNIQUE_KEYS[name])), "")
    if not level:
        raise UsageError("no UID to look up in the archive", code="no-path")
    return level


def files_for_record(index: Index, record: Mapping[str, Any], level: str) -> list[Path]:
    """The archived files of what a record names by its UIDs (a `pacs find` record, say), at
    `level` (its `record_level`). Raises PacsError (code not-in-archive) when the archive
    holds none of what it names."""
    try:
        items = instances_for_retrieve(index, level, record,
                                       model="patient" if level == "PATIENT" else "study")
    except sqlite3.OperationalError as exc:  # a UID list longer than SQLite takes, say
        raise PacsError(f"cannot look it up in the archive's index: {exc}",
                        code="lookup-failed") from exc
    if not items:
        raise PacsError(f"the archive {index.path.parent} has no instance of this "
                        f"{level.lower()}", code="not-in-archive")
    return [item.path for item in items]
