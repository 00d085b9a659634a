"""What every command shares (pacscli.cli.common): keeping pydicom quiet, and serve's
output that never waits for its reader."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import TextIO, cast

import pytest

from pacscli.cli.common import BackgroundOutput, FdStream, Output

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


def test_background_output_drops_past_its_backlog_and_says_so(
        caplog: pytest.LogCaptureFixture) -> None:
    """A reader that reads nothing: emit never waits; past the backlog, records are dropped
    with a warning; once the reader reads again, the rest arrive in order and stderr says
    how many were dropped."""
    read_fd, write_fd = os.pipe()
    try:
        out = BackgroundOutput(Output("jsonl", [], stream=cast(TextIO, FdStream(write_fd))),
                               backlog=5)
        out.emit({"n": 0, "pad": "x" * 200_000})  # more than the pipe holds: the writer waits
        for n in range(1, 21):
            out.emit({"n": n})  # returns at once, full queue or not
        assert "records are dropped until it is" in caplog.text
        chunks: list[bytes] = []
        reader = threading.Thread(target=lambda: chunks.extend(iter(lambda: os.read(read_fd, 65536), b"")))
        reader.start()
        out.close(timeout=10)
    finally:
        os.close(write_fd)
    reader.join(10)
    os.close(read_fd)
    numbers = [json.loads(line)["n"] for line in b"".join(chunks).decode().splitlines()]
    assert numbers == list(range(len(numbers)))
    assert len(numbers) in (5, 6)  # the backlog, and the first when the writer took it early
    dropped = 21 - len(numbers)
    assert f"{dropped} records were dropped while stdout was not read" in caplog.text


def test_background_output_ends_quietly_when_its_reader_goes_away(
        caplog: pytest.LogCaptureFixture) -> None:
    """A broken pipe: one warning, then records are let go without queuing, without the
    warnings of a reader that only stopped reading, and close() does not wait."""
    read_fd, write_fd = os.pipe()
    os.close(read_fd)
    try:
        out = BackgroundOutput(Output("jsonl", [], stream=cast(TextIO, FdStream(write_fd))),
                               backlog=5)
        out.emit({"n": 0})
        deadline = time.monotonic() + 10
        while "broken pipe" not in caplog.text and time.monotonic() < deadline:
            time.sleep(0.01)  # the writer meets the broken pipe
        for n in range(1, 50):
            out.emit({"n": n})
        started = time.monotonic()
        out.close(timeout=5)
        assert time.monotonic() - started < 1
    finally:
        os.close(write_fd)
    assert caplog.text.count("stdout closed (broken pipe): records are no longer written") == 1
    assert "not being read" not in caplog.text and "dropped" not in caplog.text
