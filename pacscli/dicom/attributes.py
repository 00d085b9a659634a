"""What the index keeps of an instance, without pydicom: the attributes it indexes per Q/R
level, and `InstanceInfo`.

`INDEXED_ATTRIBUTES` lists, per Q/R level, the attributes the index keeps (PS3.4 C.6 unique,
required and commonly used optional keys); the index schema is derived from it. Apart from
`identity` (which reads files with pydicom) so that the index, and `pacs verify`, load
without pydicom.
"""

from __future__ import annotations

from dataclasses import dataclass, field

INDEXED_ATTRIBUTES: dict[str, tuple[str, ...]] = {
    "patient": (
        "PatientID",
        "IssuerOfPatientID",
        "PatientName",
        "PatientBirthDate",
        "PatientSex",
        "OtherPatientIDs",
    ),
    "study": (
        "StudyInstanceUID",
        "StudyDate",
        "StudyTime",
        "AccessionNumber",
        "StudyID",
        "StudyDescription",
        "ReferringPhysicianName",
    ),
    "series": (
        "SeriesInstanceUID",
        "Modality",
        "SeriesNumber",
        "SeriesDescription",
        "SeriesDate",
        "SeriesTime",
        "BodyPartExamined",
    ),
    "instance": (
        "SOPInstanceUID",
        "SOPClassUID",
        "InstanceNumber",
        "ContentDate",
        "ContentTime",
        "NumberOfFrames",
    ),
}


@dataclass
class InstanceInfo:
    """An instance's UIDs, indexed attributes and where its dataset starts in the file."""

    study_uid: str
    series_uid: str
    sop_uid: str
    sop_class_uid: str
    transfer_syntax: str
    dataset_offset: int
    specific_character_set: str | None = None
    attributes: dict[str, str | None] = field(default_factory=dict)
    meta_sop_uid: str | None = None
    source_aet: str | None = None
