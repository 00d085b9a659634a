"""Records as JSON lines."""

from __future__ import annotations

import json

from pydicom.valuerep import DSfloat

from pacscli.records import element_value, to_json_line


def test_a_number_json_cannot_hold_stays_a_string() -> None:
    """A DS of "NaN" was written as a bare NaN: not JSON, which strict readers refuse."""
    line = to_json_line({"PatientWeight": element_value(DSfloat("NaN")),
                         "PatientSize": element_value(DSfloat("1.75"))})
    assert json.loads(line, parse_constant=lambda c: 1 / 0) == {"PatientWeight": "NaN",
                                                                "PatientSize": 1.75}
