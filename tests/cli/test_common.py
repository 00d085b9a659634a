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

import pytest

from pacscli.cli.common import BackgroundOutput

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


def wait_for(text: str, caplog: pytest.LogCaptureFixture) -> None:
    deadline = time.monotonic() + 10
    while text not in caplog.text and time.monotonic() < deadline:
        time.sleep(0.01)


def test_background_output_drops_past_its_backlog_and_says_so(
        caplog: pytest.LogCaptureFixture) -> None:
    """A reader that reads nothing: emit never waits; past the backlog, records are dropped
    with a warning; once the reader reads again, the rest arrive in order and stderr says
    how many were dropped."""
    read_fd, write_fd = os.pipe()
    try:
        out = BackgroundOutput("jsonl", [], fd=write_fd, backlog=5)
        out.emit({"n": 0, "pad": "x" * 200_000})  # more than the pipe holds: the writer waits
        for n in range(1, 21):
            out.emit({"n": n})  # returns at once, full queue or not
        assert "records are dropped until it is" in caplog.text
        chunks: list[bytes] = []
        reader = threading.Thread(target=lambda: chunks.extend(iter(lambda: os.read(read_fd, 65536), b"")))
        reader.start()
        out.close(deadline=time.monotonic() + 10)
    finally:
        os.close(write_fd)
    reader.join(10)
    os.close(read_fd)
    numbers = [json.loads(line)["n"] for line in b"".join(chunks).decode().splitlines()]
    assert numbers == list(range(len(numbers)))
    assert len(numbers) in (5, 6)  # the backlog, and the first when the writer took it early
    dropped = 21 - len(numbers)
    assert f"{dropped} records were dropped while stdout was not read" in caplog.text
    assert "not written" not in caplog.text


def test_background_output_gives_up_on_a_stuck_reader_in_time(
        caplog: pytest.LogCaptureFixture) -> None:
    """close() waits while the writing moves on, but not past its deadline, nor long once it
    stalls; stderr counts the records not written, the one stuck in the pipe included."""
    read_fd, write_fd = os.pipe()
    try:
        out = BackgroundOutput("jsonl", [], fd=write_fd, backlog=5)
        out.emit({"n": 0, "pad": "x" * 200_000})  # stuck in the pipe: the reader reads nothing
        for n in range(1, 4):
            out.emit({"n": n})
        started = time.monotonic()
        out.close(deadline=started + 0.5, stall=5)
        assert time.monotonic() - started < 1.5
        started = time.monotonic()
        out.close(deadline=started + 10, stall=0.3)
        assert time.monotonic() - started < 1.5
        assert "stdout is not being read: 4 records were not written" in caplog.text
    finally:
        os.close(read_fd)  # the writer's stuck write fails now, and the writer ends...
        wait_for("broken pipe", caplog)
        os.close(write_fd)  # ...before its descriptor goes (its number could be reused)


def test_background_output_closed_late_with_all_written_says_nothing(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """serve's stop past its 13.5 s gives close() a deadline already gone: with every record
    written, it warned "stdout is not being read: 0 records were not written"."""
    path = tmp_path / "out.jsonl"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT)
    try:
        out = BackgroundOutput("jsonl", [], fd=fd, backlog=5)
        out.emit({"n": 0})
        deadline = time.monotonic() + 10
        while out._written < 1 and time.monotonic() < deadline:  # counted once written
            time.sleep(0.01)
        out.close(deadline=time.monotonic() - 1)
    finally:
        os.close(fd)
    assert path.read_text() == '{"n":0}\n'
    assert "not being read" not in caplog.text


@pytest.mark.parametrize("fmt", ["jsonl", "json", "csv"])
def test_background_output_into_a_file_writes_every_record(tmp_path: Path, fmt: str) -> None:
    """Into a file nothing is dropped or cut short, a JSON array of 20,000 records
    included, written at the end in one piece."""
    path = tmp_path / f"out.{fmt}"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT)
    try:
        out = BackgroundOutput(fmt, ["n"], fd=fd, backlog=25_000)
        for n in range(20_000):
            out.emit({"n": n, "status": "ok"})
        out.close(deadline=time.monotonic() + 30)
    finally:
        os.close(fd)
    text = path.read_text()
    if fmt == "json":
        numbers = [r["n"] for r in json.loads(text)]
    elif fmt == "jsonl":
        numbers = [json.loads(line)["n"] for line in text.splitlines()]
    else:
        numbers = [int(line) for line in text.splitlines()[1:]]
    assert numbers == list(range(20_000))


@pytest.mark.parametrize(("target", "says"), [
    ("pipe", "stdout closed (broken pipe)"),
    ("/dev/full", "cannot write to stdout (No space left on device)"),
])
def test_background_output_ends_with_one_warning_when_writing_fails(
        caplog: pytest.LogCaptureFixture, target: str, says: str) -> None:
    """A reader gone, a full disk: one warning (no traceback), then records are let go
    without queuing, without the warnings of a reader that only stopped reading, and
    close() does not wait."""
    if target == "pipe":
        read_fd, fd = os.pipe()
        os.close(read_fd)
    else:
        fd = os.open(target, os.O_WRONLY)
    try:
        out = BackgroundOutput("jsonl", [], fd=fd, backlog=5)
        out.emit({"n": 0})
        wait_for(says, caplog)
        for n in range(1, 50):
            out.emit({"n": n})
        started = time.monotonic()
        out.close(deadline=started + 5)
        assert time.monotonic() - started < 1
    finally:
        os.close(fd)
    assert caplog.text.count(f"{says}: records are no longer written") == 1
    assert "not being read" not in caplog.text and "dropped" not in caplog.text
    assert "Traceback" not in caplog.text


def test_background_output_waits_for_a_slow_reader_of_one_big_array(
        caplog: pytest.LogCaptureFixture) -> None:
    """A JSON array far larger than the pipe, read slowly but steadily: close() waits for
    all of it (it gave up after 2 s, the whole array having been one blocked write)."""
    read_fd, write_fd = os.pipe()
    chunks: list[bytes] = []

    def slow_reader() -> None:
        while data := os.read(read_fd, 16384):
            chunks.append(data)
            time.sleep(0.05)  # ~300 KB/s

    try:
        out = BackgroundOutput("json", [], fd=write_fd)
        for n in range(3000):
            out.emit({"n": n, "pad": "x" * 200})  # ~700 KB in all
        reader = threading.Thread(target=slow_reader)
        reader.start()
        out.close(deadline=time.monotonic() + 30, stall=1.0)
    finally:
        os.close(write_fd)
    reader.join(30)
    os.close(read_fd)
    assert "not written" not in caplog.text  # close() did not give up on it
    assert [r["n"] for r in json.loads(b"".join(chunks))] == list(range(3000))
