"""pacscli: a PACS as a command-line toolkit of composable DICOM utilities."""

__version__ = "0.1.0"
# A UUID-derived UID (PS3.5 B.2): ours without registering an org root.
IMPLEMENTATION_CLASS_UID = "2.25.174057893900782618402594753632890562285"
IMPLEMENTATION_VERSION_NAME = "PACSCLI_010"
