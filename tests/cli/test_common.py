"""What every command shares (pacscli.cli.common): here, keeping pydicom quiet."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

# pydicom imported after quiet_pydicom, as `pacs store` imports it only to rewrite a file;
# its import resets its logger's level to WARNING.
QUIET_THEN_IMPORT = """
import logging, sys, warnings
from pacscli.cli.common import quiet_pydicom, setup_logging
setup_logging({verbose})
quiet_pydicom({verbose})
assert "pydicom" not in sys.modules
import pydicom
logging.getLogger("pydicom").warning("pydicom-warning")
logging.getLogger("pydicom.pixels.utils").warning("pixels-warning")
logging.getLogger("pydicom").critical("pydicom-critical")
logging.getLogger("pacscli.net.store").warning("our-warning")
warnings.warn_explicit("pydicom-userwarning", UserWarning, "valuerep.py", 1, module="pydicom.valuerep")
"""


@pytest.mark.parametrize("verbose", [0, 1])
def test_quiet_pydicom_holds_when_pydicom_loads_later(verbose: int) -> None:
    result = subprocess.run([sys.executable, "-c", QUIET_THEN_IMPORT.format(verbose=verbose)],
                            capture_output=True, text=True, cwd=ROOT)
    assert result.returncode == 0, result.stderr
    assert "our-warning" in result.stderr and "pydicom-critical" in result.stderr
    pydicom_words = ("pydicom-warning", "pixels-warning", "pydicom-userwarning")
    if verbose:
        assert all(word in result.stderr for word in pydicom_words), result.stderr
    else:
        assert not any(word in result.stderr for word in pydicom_words), result.stderr
