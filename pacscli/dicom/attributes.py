"""What the index keeps of an instance, without pydicom: the attributes it indexes per Q/R
level, their tags and VRs, and `InstanceInfo`.

`INDEXED_ATTRIBUTES` lists, per Q/R level, the attributes the index keeps (PS3.4 C.6 unique,
required and commonly used optional keys); the index schema is derived from it. None of
this needs pydicom, so that the index, `pacs verify` and `pacs store` load without it.
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

# Tag and dictionary VR of each attribute read by keyword without pydicom: the indexed ones,
# the Specific Character Set, and the file meta elements `pacs store` reads. Held equal to
# pydicom's data dictionary by tests/dicom/test_tables.py.
ATTRIBUTE_TAGS: dict[str, tuple[int, str]] = {
    "PatientID": (0x00100020, "LO"),
    "IssuerOfPatientID": (0x00100021, "LO"),
    "PatientName": (0x00100010, "PN"),
    "PatientBirthDate": (0x00100030, "DA"),
    "PatientSex": (0x00100040, "CS"),
    "OtherPatientIDs": (0x00101000, "LO"),
    "StudyInstanceUID": (0x0020000D, "UI"),
    "StudyDate": (0x00080020, "DA"),
    "StudyTime": (0x00080030, "TM"),
    "AccessionNumber": (0x00080050, "SH"),
    "StudyID": (0x00200010, "SH"),
    "StudyDescription": (0x00081030, "LO"),
    "ReferringPhysicianName": (0x00080090, "PN"),
    "SeriesInstanceUID": (0x0020000E, "UI"),
    "Modality": (0x00080060, "CS"),
    "SeriesNumber": (0x00200011, "IS"),
    "SeriesDescription": (0x0008103E, "LO"),
    "SeriesDate": (0x00080021, "DA"),
    "SeriesTime": (0x00080031, "TM"),
    "BodyPartExamined": (0x00180015, "CS"),
    "SOPInstanceUID": (0x00080018, "UI"),
    "SOPClassUID": (0x00080016, "UI"),
    "InstanceNumber": (0x00200013, "IS"),
    "ContentDate": (0x00080023, "DA"),
    "ContentTime": (0x00080033, "TM"),
    "NumberOfFrames": (0x00280008, "IS"),
    "SpecificCharacterSet": (0x00080005, "CS"),
    "MediaStorageSOPClassUID": (0x00020002, "UI"),
    "MediaStorageSOPInstanceUID": (0x00020003, "UI"),
    "TransferSyntaxUID": (0x00020010, "UI"),
    "SourceApplicationEntityTitle": (0x00020016, "AE"),
}


def tag_of(keyword: str) -> int:
    """The tag of an attribute of ATTRIBUTE_TAGS, by keyword."""
    return ATTRIBUTE_TAGS[keyword][0]


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
