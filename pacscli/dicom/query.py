"""Query identifiers and DICOM matching (PS3.4 C.2.2.2, C.6): pure dataset work, no network.

- `tag_path` / `parse_key`: `-k KEY=VALUE` with keywords or `(gggg,eeee)` tags, and simple
  sequence paths (`ProcedureCodeSequence[0].CodeValue=X`); `KEY` or `KEY=` asks for a return key.
- `build_query`: the identifier of a query at a level of a model (Patient Root or Study Root),
  with the level's default return keys (PS3.4 C.6 required keys and commonly used optional ones).
- `Match` / `matcher`: how one key matches (universal, single value, list, wildcard, range),
  testable in memory (`matches`) and translated to SQL by `pacscli.archive.query`.
- `identifier_record`: a query result as a JSON-lines record (DICOM keywords), the same for
  C-FIND responses and local index results.
"""

from __future__ import annotations

import copy
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any, Literal

from pydicom import config
from pydicom.datadict import dictionary_VM, dictionary_VR, keyword_for_tag, tag_for_keyword
from pydicom.dataelem import DataElement
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence as DicomSequence
from pydicom.tag import BaseTag, Tag

from pacscli.dicom.attributes import INDEXED_ATTRIBUTES
from pacscli.errors import UsageError
from pacscli.records import Record, element_value

LEVELS = ("PATIENT", "STUDY", "SERIES", "IMAGE")
MODELS = ("study", "patient")
Model = Literal["study", "patient"]

# Query/Retrieve information models (PS3.4 C.6.1 and C.6.2): SOP class UIDs per service.
QR_MODELS: dict[str, dict[str, str]] = {
    "patient": {"find": "1.2.840.10008.5.1.4.1.2.1.1", "move": "1.2.840.10008.5.1.4.1.2.1.2",
                "get": "1.2.840.10008.5.1.4.1.2.1.3"},
    "study": {"find": "1.2.840.10008.5.1.4.1.2.2.1", "move": "1.2.840.10008.5.1.4.1.2.2.2",
              "get": "1.2.840.10008.5.1.4.1.2.2.3"},
}

# The unique key of each level (PATIENT: Patient ID, unique with its issuer).
UNIQUE_KEYS = {"PATIENT": "PatientID", "STUDY": "StudyInstanceUID",
               "SERIES": "SeriesInstanceUID", "IMAGE": "SOPInstanceUID"}

# Attributes the archive computes from the index rather than storing them (PS3.4 C.6.1.1).
COMPUTED_ATTRIBUTES: dict[str, tuple[str, ...]] = {
    "PATIENT": ("NumberOfPatientRelatedStudies", "NumberOfPatientRelatedSeries",
                "NumberOfPatientRelatedInstances"),
    "STUDY": ("ModalitiesInStudy", "SOPClassesInStudy", "NumberOfStudyRelatedSeries",
              "NumberOfStudyRelatedInstances"),
    "SERIES": ("NumberOfSeriesRelatedInstances",),
    "IMAGE": ("AvailableTransferSyntaxUID",),
}

# Keys of the Q/R service itself: never matched against instances, never read from files.
SERVICE_KEYS = frozenset({
    "QueryRetrieveLevel", "RetrieveAETitle", "InstanceAvailability", "SpecificCharacterSet",
    "StorageMediaFileSetID", "StorageMediaFileSetUID", "QueryRetrieveView",
    "TimezoneOffsetFromUTC",
})

# The level each commonly queried attribute belongs to (PS3.4 C.6.1.1, Patient Root view).
# Attributes not listed are taken to belong to the level queried.
_EXTRA_LEVEL_ATTRIBUTES: dict[str, tuple[str, ...]] = {
    "PATIENT": ("OtherPatientNames", "PatientBirthTime", "EthnicGroup", "PatientComments",
                "PatientMotherBirthName", "IssuerOfPatientIDQualifiersSequence",
                "OtherPatientIDsSequence", "ResponsiblePerson", "PatientSpeciesDescription"),
    "STUDY": ("PatientAge", "PatientSize", "PatientWeight", "Occupation",
              "AdditionalPatientHistory", "NameOfPhysiciansReadingStudy",
              "AdmittingDiagnosesDescription", "ProcedureCodeSequence", "ReferencedStudySequence",
              "IssuerOfAccessionNumberSequence", "OtherStudyNumbers", "PhysiciansOfRecord",
              "ReferencedPatientSequence"),
    "SERIES": ("ProtocolName", "OperatorsName", "PerformingPhysicianName", "Laterality",
               "PerformedProcedureStepStartDate", "PerformedProcedureStepStartTime",
               "RequestAttributesSequence", "StationName", "InstitutionName",
               "InstitutionalDepartmentName", "Manufacturer", "ManufacturerModelName"),
    "IMAGE": ("ImageType", "AcquisitionDate", "AcquisitionTime", "AcquisitionNumber",
              "ConceptNameCodeSequence", "CompletionFlag", "VerificationFlag",
              "ContentTemplateSequence", "Rows", "Columns", "BitsAllocated"),
}


def _attribute_levels() -> dict[str, str]:
    levels: dict[str, str] = {}
    for level, index_level in zip(LEVELS, ("patient", "study", "series", "instance"), strict=True):
        for keyword in (*INDEXED_ATTRIBUTES[index_level], *COMPUTED_ATTRIBUTES[level],
                        *_EXTRA_LEVEL_ATTRIBUTES[level]):
            levels[keyword] = level
    return levels


ATTRIBUTE_LEVELS: dict[str, str] = _attribute_levels()

# Default return keys per model and level: PS3.4 C.6 required keys (R) and unique keys (U),
# and commonly used optional keys (O) a PACS user expects to see.
_PATIENT_KEYS = ("PatientName", "PatientID", "PatientBirthDate", "PatientSex")
_STUDY_KEYS = ("StudyInstanceUID", "StudyDate", "StudyTime", "AccessionNumber", "StudyID",
               "StudyDescription", "ReferringPhysicianName", "ModalitiesInStudy",
               "NumberOfStudyRelatedSeries", "NumberOfStudyRelatedInstances")
_SERIES_KEYS = ("SeriesInstanceUID", "Modality", "SeriesNumber", "SeriesDescription",
                "SeriesDate", "SeriesTime", "BodyPartExamined", "NumberOfSeriesRelatedInstances")
_IMAGE_KEYS = ("SOPInstanceUID", "SOPClassUID", "InstanceNumber", "ContentDate", "ContentTime",
               "NumberOfFrames")

DEFAULT_KEYS: dict[str, dict[str, tuple[str, ...]]] = {
    "study": {
        "STUDY": (*_PATIENT_KEYS, *_STUDY_KEYS),
        "SERIES": ("StudyInstanceUID", *_SERIES_KEYS),
        "IMAGE": ("StudyInstanceUID", "SeriesInstanceUID", *_IMAGE_KEYS),
    },
    "patient": {
        "PATIENT": ("PatientName", "PatientID", "IssuerOfPatientID", "PatientBirthDate",
                    "PatientSex", *COMPUTED_ATTRIBUTES["PATIENT"]),
        "STUDY": ("PatientID", *_STUDY_KEYS),
        "SERIES": ("PatientID", "StudyInstanceUID", *_SERIES_KEYS),
        "IMAGE": ("PatientID", "StudyInstanceUID", "SeriesInstanceUID", *_IMAGE_KEYS),
    },
}

# VRs that take `*` and `?` wildcards (PS3.4 C.2.2.2.4).
WILDCARD_VRS = frozenset({"AE", "CS", "LO", "LT", "PN", "SH", "ST", "UC", "UR", "UT"})
RANGE_VRS = frozenset({"DA", "TM", "DT"})
_BINARY_INT_VRS = frozenset({"US", "SS", "UL", "SL", "UV", "SV"})
_BINARY_FLOAT_VRS = frozenset({"FL", "FD"})


class InvalidQueryError(UsageError):
    """A query identifier that cannot be answered: unknown level, a key from a lower level..."""

    code = "invalid-query"


def normalize_level(level: str) -> str:
    """'study', 'STUDY' -> 'STUDY'; 'instance' is taken for 'IMAGE'."""
    text = str(level).strip().upper()
    text = "IMAGE" if text == "INSTANCE" else text
    if text not in LEVELS:
        raise InvalidQueryError(f"unknown query level {level!r}: choose patient, study, series "
                                "or image")
    return text


def normalize_model(model: str) -> Model:
    """'study' or 'patient' (Study Root or Patient Root)."""
    text = str(model).strip().lower().replace("-root", "").replace("_root", "")
    if text not in MODELS:
        raise InvalidQueryError(f"unknown query model {model!r}: choose study or patient "
                                "(Study Root or Patient Root)")
    return text  # type: ignore[return-value]


def check_level(level: str, model: str) -> tuple[str, Model]:
    """The normalized level and model; the patient level exists only in Patient Root."""
    level, model = normalize_level(level), normalize_model(model)
    if level == "PATIENT" and model == "study":
        raise InvalidQueryError("the patient level exists only in the Patient Root model "
                                "(use --model patient)")
    return level, model


def level_of(keyword: str, model: str = "study") -> str | None:
    """The level an attribute belongs to (patient attributes are study level in Study Root)."""
    level = ATTRIBUTE_LEVELS.get(keyword)
    if level == "PATIENT" and model == "study":
        return "STUDY"
    return level


# --- keys: keywords, tags and `-k KEY=VALUE` ------------------------------------------------

_TAG_RE = re.compile(r"^\(?\s*([0-9A-Fa-f]{4})\s*,?\s*([0-9A-Fa-f]{4})\s*\)?$")
_ITEM_RE = re.compile(r"^(?P<name>.+?)(?:\[(?P<item>\d+)\])?$")


def tag_of(name: str) -> BaseTag:
    """A tag from a keyword, `(gggg,eeee)`, `gggg,eeee` or `ggggeeee`."""
    text = name.strip()
    match = _TAG_RE.match(text)
    if match:
        return Tag(int(match[1], 16), int(match[2], 16))
    tag = tag_for_keyword(text)
    if tag is None:
        raise UsageError(f"unknown DICOM attribute {name!r}: give a keyword (e.g. PatientName) "
                         "or a tag as (gggg,eeee)")
    return Tag(tag)


def vr_of(tag: BaseTag) -> str:
    """The dictionary VR of a tag; the first one where the dictionary gives a choice. A
    private creator is LO; other private tags, whose VR only their creator knows, UN."""
    if tag.is_private:
        return "LO" if tag.is_private_creator else "UN"
    try:
        vr = str(dictionary_VR(tag))
    except KeyError:
        raise UsageError(f"attribute {tag} is not in the DICOM dictionary: its value "
                         "representation is unknown") from None
    return vr.split(" or ")[0]


def name_of(tag: BaseTag) -> str:
    """A tag's keyword, or `(gggg,eeee)` for one without."""
    return keyword_for_tag(tag) or f"({tag.group:04X},{tag.element:04X})"


def tag_path(key: str) -> list[BaseTag]:
    """`PatientName` -> [tag]; `ProcedureCodeSequence[0].CodeValue` -> [sequence, item key].

    Items other than the first are refused: a query sequence has a single item."""
    path: list[BaseTag] = []
    parts = key.strip().split(".")
    for number, part in enumerate(parts):
        match = _ITEM_RE.match(part.strip())
        if not match or not match["name"]:
            raise UsageError(f"invalid key {key!r}")
        tag = tag_of(match["name"])
        if match["item"] is not None and int(match["item"]) != 0:
            raise UsageError(f"invalid key {key!r}: a query sequence has one item, [0]")
        if number < len(parts) - 1 and vr_of(tag) != "SQ":
            raise UsageError(f"invalid key {key!r}: {name_of(tag)} is not a sequence")
        path.append(tag)
    return path


def parse_key(text: str) -> tuple[list[BaseTag], str]:
    """`KEY=VALUE` -> (tag path, value); `KEY` and `KEY=` ask for a return key (value '')."""
    key, _, value = text.partition("=")
    if not key.strip():
        raise UsageError(f"invalid key {text!r}: expected KEY=VALUE (a keyword or (gggg,eeee))")
    return tag_path(key), value.strip()


def _typed(vr: str, value: str) -> Any:
    """A query value as pydicom wants it for its VR (None for a return key)."""
    if value == "":
        return None
    if vr == "UN":
        raise UsageError(f"{value!r}: a private attribute's VR is known only to its creator, "
                         "so it can be asked for (KEY without a value), not matched on")
    if vr in _BINARY_INT_VRS:
        try:
            return int(value)
        except ValueError:
            raise UsageError(f"{value!r} is not an integer (VR {vr})") from None
    if vr in _BINARY_FLOAT_VRS:
        try:
            return float(value)
        except ValueError:
            raise UsageError(f"{value!r} is not a number (VR {vr})") from None
    return value


def set_key(ds: Dataset, path: Sequence[BaseTag], value: str) -> None:
    """Put a key (a return key when value is '') into an identifier, sequences included."""
    tag, rest = path[0], path[1:]
    vr = vr_of(tag)
    if not rest:
        if vr == "SQ":
            if value:
                raise UsageError(f"{name_of(tag)} is a sequence: give keys of its item, as "
                                 f"{name_of(tag)}[0].Keyword=VALUE")
            ds.add_new(tag, "SQ", DicomSequence([]))
        else:
            if vr in RANGE_VRS and value:
                _check_range_value(vr, value, name_of(tag))
            try:  # unvalidated: ranges, wildcards and lists are not VR syntax
                ds.add(DataElement(tag, vr, _typed(vr, value), validation_mode=config.IGNORE))
            except (ValueError, OverflowError):  # '1-3' for an IS: no range matching there
                raise UsageError(f"{value!r} is not a valid {vr} value for "
                                 f"{name_of(tag)}") from None
        return
    if tag not in ds or not ds[tag].value:
        ds.add_new(tag, "SQ", DicomSequence([Dataset()]))
    set_key(ds[tag].value[0], rest, value)


@dataclass
class Query:
    """A query: its level, model, identifier and the order its keys are shown in."""

    level: str
    model: Model
    identifier: Dataset
    order: list[str] = field(default_factory=list)


def build_query(level: str, keys: Iterable[str] = (), *, model: str = "study",
                defaults: bool = True) -> Query:
    """The identifier of a query: QueryRetrieveLevel, the level's default return keys (unless
    `defaults` is false) and the `-k KEY=VALUE` keys, later ones winning.

    Raises UsageError for an unknown level or key and for a key of a level below the one
    queried (hierarchical models; at study level ModalitiesInStudy stands for Modality).
    """
    level, model_name = check_level(level, model)
    ds = Dataset()
    order: list[str] = ["QueryRetrieveLevel"]
    ds.QueryRetrieveLevel = level
    wanted = list(DEFAULT_KEYS[model_name][level]) if defaults else []
    # The unique keys of this level and the ones above it, so that results can be retrieved.
    for upper in LEVELS[LEVELS.index(level)::-1]:
        if upper == "PATIENT" and model_name == "study":
            continue
        if UNIQUE_KEYS[upper] not in wanted:
            wanted.insert(0, UNIQUE_KEYS[upper])
    for keyword in wanted:
        set_key(ds, [tag_of(keyword)], "")
        order.append(keyword)
    for text in keys:
        path, value = parse_key(text)
        keyword = name_of(path[0])
        if keyword == "QueryRetrieveLevel":
            raise UsageError("give the query level with --level, not as a key")
        owner = level_of(keyword, model_name)
        if owner is not None and LEVELS.index(owner) > LEVELS.index(level):
            hint = (" (at study level, ModalitiesInStudy matches studies by the modality of "
                    "their series)" if keyword == "Modality" else "")
            article = "an" if owner == "IMAGE" else "a"
            raise UsageError(f"{keyword} is {article} {owner.lower()}-level key: query --level "
                             f"{owner.lower()} to match on it{hint}")
        if value and keyword in _RETURN_ONLY:
            raise UsageError(f"{keyword} is computed by the peer: a return key only (PS3.4 "
                             f"C.6), give it without a value (-k {keyword})")
        if path[0] in ds and len(path) == 1:
            del ds[path[0]]
        set_key(ds, path, value)
        if keyword not in order:
            order.append(keyword)
    if "SpecificCharacterSet" not in ds and not _all_text(ds).isascii():
        ds.SpecificCharacterSet = "ISO_IR 192"
    return Query(level, model_name, ds, order)


def levels_of(model: str, level: str) -> list[str]:
    """The levels of a model from its top down to `level`: ['STUDY', 'SERIES'] in Study Root."""
    top = 0 if model == "patient" else 1
    return list(LEVELS[top:LEVELS.index(level) + 1])


def relational_levels(query: Query) -> list[str]:
    """The levels above the query's own whose keys the query matches on, other than their
    unique keys (one UID, or a list of them). A hierarchical query may not match on such
    keys (PS3.4 C.4.1.2.1): only a peer that agrees to relational queries (C.4.1.2.2)
    honours them. Empty when the query is hierarchical."""
    found = []
    for elem in query.identifier:
        keyword = elem.keyword or ""
        owner = level_of(keyword, query.model)
        if keyword in SERVICE_KEYS or owner is None or \
                LEVELS.index(owner) >= LEVELS.index(query.level):
            continue
        if elem.VR == "SQ":
            matching = bool(elem.value) and has_matching_keys(elem.value[0])
        else:
            matching = not is_universal(elem.value, elem.VR)
        # Unique keys given as UIDs are what hierarchical peers match on (lists included,
        # which dcmqrscp and the like take): a walk for them cost a C-FIND per parent.
        if matching and not (keyword == UNIQUE_KEYS[owner] and _uid_values(elem)):
            found.append(owner)
    return sorted(set(found), key=LEVELS.index)


def _uid_values(elem: DataElement) -> bool:
    text = value_text(elem.value)
    return text is not None and not any(c in text for c in "*?")


def level_identifier(query: Query, level: str, parent: Mapping[str, Any]) -> Dataset:
    """The identifier asking `level` for its part of a relational `query`, hierarchically:
    the keys of that level (a key of no known level goes with the query's own level), the
    unique key of each level above as `parent` (a record of the levels above) gives it,
    and the level's own unique key."""
    ds = Dataset()
    ds.QueryRetrieveLevel = level
    for elem in query.identifier:
        keyword = elem.keyword or ""
        if keyword in ("QueryRetrieveLevel", "SpecificCharacterSet"):
            continue
        if (level_of(keyword, query.model) or query.level) == level:
            ds.add(copy.deepcopy(elem))
    for upper in levels_of(query.model, level)[:-1]:
        set_key(ds, [tag_of(UNIQUE_KEYS[upper])], record_text(parent, UNIQUE_KEYS[upper]) or "")
    if UNIQUE_KEYS[level] not in ds:
        set_key(ds, [tag_of(UNIQUE_KEYS[level])], "")
    if "SpecificCharacterSet" in query.identifier:
        ds.SpecificCharacterSet = query.identifier.SpecificCharacterSet
    elif not _all_text(ds).isascii():  # a parent's value ("MÜ3") must say its encoding
        ds.SpecificCharacterSet = "ISO_IR 192"
    return ds


# Computed attributes that are return keys only (no matching key type in PS3.4 C.6): peers
# ignore a value given for them, and the query would seem to filter when it does not.
_RETURN_ONLY = frozenset(keyword for keywords in COMPUTED_ATTRIBUTES.values() for keyword in keywords
                         if keyword.startswith("NumberOf") or keyword == "AvailableTransferSyntaxUID")


def _all_text(ds: Dataset) -> str:
    parts: list[str] = []
    for elem in ds:
        if elem.VR == "SQ":
            parts.extend(_all_text(item) for item in elem.value)
        elif elem.value is not None and not isinstance(elem.value, bytes):
            parts.append(str(elem.value))
    return "".join(parts)


# --- matching ---------------------------------------------------------------------------------

MatchKind = Literal["universal", "single", "list", "wildcard", "range"]


@dataclass(frozen=True)
class Match:
    """How one key's value matches a candidate value (PS3.4 C.2.2.2)."""

    kind: MatchKind
    vr: str
    value: str = ""  # single: the value; wildcard: the pattern
    low: str | None = None  # range bounds (inclusive), None when open
    high: str | None = None
    alternatives: tuple[Match, ...] = ()  # list: any of these
    case_insensitive: bool = False

    @property
    def prefix(self) -> str:
        """The literal text a wildcard pattern starts with (what an index can seek to)."""
        return re.split(r"[*?]", self.value, maxsplit=1)[0] if self.kind == "wildcard" else ""

    def test(self, candidate: str | None) -> bool:
        """Does one candidate value match? An empty candidate matches universal matching only."""
        if self.kind == "universal":
            return True
        if candidate is None or candidate.strip() == "":
            return False
        value = candidate.strip()
        if self.kind == "list":
            return any(alt.test(value) for alt in self.alternatives)
        if self.kind == "range":
            if self.low is not None and value < self.low:
                return False
            return self.high is None or value[:len(self.high)] <= self.high
        if self.case_insensitive:
            value = value.casefold()
        if self.kind == "wildcard":
            return _wildcard_regex(self.value, self.case_insensitive).fullmatch(value) is not None
        return value == (self.value.casefold() if self.case_insensitive else self.value)

    def test_any(self, candidates: Iterable[str | None]) -> bool:
        """Does any value of a multi-valued candidate match?"""
        if self.kind == "universal":
            return True
        return any(self.test(c) for c in candidates)


@lru_cache(maxsize=256)
def _wildcard_regex(pattern: str, case_insensitive: bool) -> re.Pattern[str]:
    text = pattern.casefold() if case_insensitive else pattern
    body = "".join(".*" if c == "*" else "." if c == "?" else re.escape(c) for c in text)
    return re.compile(body, re.DOTALL)


def matcher(vr: str, value: Any, *, case_insensitive_names: bool = False) -> Match:
    """The Match of a key with this VR and query value (its DICOM string form)."""
    text = value_text(value)
    ci = case_insensitive_names and vr == "PN"
    if text is None or text.strip() == "":
        return Match("universal", vr)
    parts = [p.strip() for p in text.split("\\")]
    if len(parts) > 1:
        alternatives = tuple(_single(vr, p, ci) for p in parts if p)
        if any(a.kind == "universal" for a in alternatives):
            return Match("universal", vr)
        return Match("list", vr, alternatives=alternatives, case_insensitive=ci)
    return _single(vr, parts[0], ci)


# A DT value: YYYY[MM[DD[HH[MM[SS[.F{1,6}]]]]]] and an optional UTC offset &HHMM (PS3.5
# 6.2), whose '-' is not a range's: offsets run from -1200 to +1400.
_DT_VALUE = re.compile(r"\d{4}(?:\d{2}){0,5}(?:\.\d{1,6})?(?:[+-](?:0\d|1[0-4])[0-5]\d)?")


def _dt_range(text: str) -> tuple[str, str] | None:
    """The bounds of a DT range `low-high` (either may be empty), or None when `text` is one
    DT value, a negative UTC offset included ("20200101120000-0500")."""
    if _DT_VALUE.fullmatch(text):
        return None
    for at, char in enumerate(text):
        low, high = text[:at], text[at + 1:]
        if char == "-" and all(not b or _DT_VALUE.fullmatch(b) for b in (low, high)):
            return low, high
    return None


def _single(vr: str, text: str, ci: bool) -> Match:
    text = text.strip()
    if text == "" or (vr in WILDCARD_VRS and set(text) == {"*"}):
        return Match("universal", vr)
    bounds = _dt_range(text) if vr == "DT" else None
    if bounds is None and vr in RANGE_VRS and vr != "DT" and "-" in text:
        low, _, high = text.partition("-")
        bounds = low, high
    if bounds is not None:
        low, high = bounds
        if not low.strip() and not high.strip():
            return Match("universal", vr)
        return Match("range", vr, low=low.strip() or None, high=high.strip() or None)
    if vr in WILDCARD_VRS and ("*" in text or "?" in text):
        return Match("wildcard", vr, value=text.casefold() if ci else text, case_insensitive=ci)
    if vr == "TM" or (vr == "DT" and not any(c in text for c in "+-")):
        # At the value's precision, as its ranges are: '0930' is 09:30:00 to 09:30:59.999999.
        return Match("range", vr, low=text, high=text)
    return Match("single", vr, value=text.casefold() if ci else text, case_insensitive=ci)


_DA_VALUE = re.compile(r"\d{8}")
_TM_VALUE = re.compile(r"\d{2}(?:\d{2}(?:\d{2}(?:\.\d{1,6})?)?)?")
_RANGE_FORMS = {"DA": "YYYYMMDD", "TM": "HH[MM[SS[.FFFFFF]]]",
                "DT": "YYYY[MM[DD[HH[MM[SS[.FFFFFF]]]]]][&ZZXX]"}


def _check_range_value(vr: str, text: str, keyword: str) -> None:
    """Raise UsageError unless `text` is a DA, TM or DT query value: single values and
    ranges (either end may be left out), several separated by backslashes."""
    form = {"DA": _DA_VALUE, "TM": _TM_VALUE, "DT": _DT_VALUE}[vr]
    for part in (p.strip() for p in text.split("\\")):
        if not part:
            continue
        bounds = _dt_range(part) if vr == "DT" else (
            tuple(part.split("-", 1)) if "-" in part else None)
        values = [b.strip() for b in bounds if b.strip()] if bounds else [part]  # '-': all
        if not all(form.fullmatch(v) for v in values):
            shape = _RANGE_FORMS[vr]
            raise UsageError(f"{text!r} is not a valid {vr} value for {keyword}: give {shape}, "
                             f"or a range {shape}-{shape} (either end may be left out)")


def value_text(value: Any) -> str | None:
    """An element value in its DICOM string form: several values joined by backslash."""
    if value is None:
        return None
    if isinstance(value, bytes):
        return None
    if isinstance(value, list | tuple) or type(value).__name__ == "MultiValue":
        return "\\".join(str(v) for v in value)
    return str(value)


def value_list(value: Any) -> list[str]:
    """An element value as a list of strings (several values kept apart)."""
    if value is None or isinstance(value, bytes):
        return []
    if isinstance(value, list | tuple) or type(value).__name__ == "MultiValue":
        return [str(v) for v in value]
    return [str(value)]


def is_universal(elem_value: Any, vr: str) -> bool:
    """True when a key asks for a value only (universal matching)."""
    return matcher(vr, elem_value).kind == "universal"


def matches(identifier: Dataset, candidate: Dataset, *,
            case_insensitive_names: bool = False) -> bool:
    """Does a dataset match every matching key of an identifier? Service keys are ignored;
    a sequence key matches when one item of the candidate's sequence matches its item."""
    for elem in identifier:
        keyword = elem.keyword or ""
        if keyword in SERVICE_KEYS or elem.tag.group in (0x0000, 0x0002):
            continue
        if elem.VR == "SQ":
            if not sequence_matches(elem.value, candidate.get(elem.tag),
                                    case_insensitive_names=case_insensitive_names):
                return False
            continue
        match = matcher(elem.VR, elem.value, case_insensitive_names=case_insensitive_names)
        if match.kind == "universal":
            continue
        found = candidate.get(elem.tag)
        if found is None or not match.test_any(value_list(found.value)):
            return False
    return True


def sequence_matches(query_items: Any, found: Any, *, case_insensitive_names: bool = False) -> bool:
    """Sequence matching: universal for an empty query item, else any candidate item matches."""
    if not query_items or not has_matching_keys(query_items[0]):
        return True
    if found is None or found.VR != "SQ":
        return False
    return any(matches(query_items[0], item, case_insensitive_names=case_insensitive_names)
               for item in found.value)


def has_matching_keys(identifier: Dataset) -> bool:
    """Does an identifier (or sequence item) hold any key that is not universal matching?"""
    for elem in identifier:
        if (elem.keyword or "") in SERVICE_KEYS:
            continue
        if elem.VR == "SQ":
            if elem.value and has_matching_keys(elem.value[0]):
                return True
        elif not is_universal(elem.value, elem.VR):
            return True
    return False


def is_multi_valued(tag: BaseTag) -> bool:
    """Can the attribute hold several values (VM other than 1)?"""
    try:
        return str(dictionary_VM(tag)) != "1"
    except KeyError:
        return False


# --- records ----------------------------------------------------------------------------------

def _record_value(elem: Any) -> Any:
    if elem.VR == "SQ":
        return [dataset_record(item) for item in elem.value] or None
    value = element_value(elem.value)
    if value == "" or value == []:
        return None
    return value


def dataset_record(ds: Dataset) -> Record:
    """Every element of a dataset by keyword (sequences as lists of such records)."""
    return {name_of(elem.tag): _record_value(elem) for elem in ds
            if elem.tag.group not in (0x0000, 0x0002) and elem.keyword != "SpecificCharacterSet"}


def identifier_record(ds: Dataset, order: Sequence[str] = ()) -> Record:
    """A query result as a record: the keys of `order` first (null when the peer left one out),
    then whatever else it returned; SpecificCharacterSet is dropped (values are text already)."""
    found = dataset_record(ds)
    record: Record = {key: found.pop(key, None) for key in order if key != "SpecificCharacterSet"}
    record.update(found)
    return record


def record_text(record: Mapping[str, Any], key: str) -> str | None:
    """A record's value as DICOM text (lists joined by backslash), None when absent or empty."""
    value = record.get(key)
    if value is None or value == "" or value == []:
        return None
    if isinstance(value, list):
        return "\\".join(str(v) for v in value)
    return str(value).strip() or None
