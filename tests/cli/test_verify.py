"""`pacs verify` as a command: problems named, exit codes for cron, repair, and a run while
`pacs serve` receives."""

from __future__ import annotations

import os
import sqlite3
import subprocess
import threading
from collections import Counter
from pathlib import Path

import pytest

from pacscli.archive import layout
from pacscli.ops.verify import verify_archive
from scripts.benchdata import make_ct_series
from tests.cli.test_index import lines, pacs
from tests.conftest import DCMTK_ENV, bound_by_file_modes, pacs_cmd, require, start_server
from tests.dicom_files import archive_contents, dead_pid, write_instance

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


def test_names_each_problem_exits_1_repairs_then_exits_0(tmp_path: Path) -> None:
    src = tmp_path / "src"
    for n in range(4):
        write_instance(src / f"{n}.dcm", number=n)
    archive = tmp_path / "archive"
    stored = lines(pacs(tmp_path, "index", "--archive", str(archive), str(src)))
    assert pacs(tmp_path, "verify", "--archive", str(archive)).returncode == 0

    corrupt, deleted = Path(str(stored[0]["path"])), Path(str(stored[1]["path"]))
    data = bytearray(corrupt.read_bytes())
    data[-1] ^= 0x55
    corrupt.write_bytes(bytes(data))
    deleted.unlink()
    unindexed = write_instance(archive / layout.STUDIES_DIR / "x" / "dropped.dcm")
    temp = archive / layout.STAGING_DIR / str(dead_pid()) / "tmp0001.dcm"
    temp.parent.mkdir(parents=True)
    temp.write_bytes(b"partial")
    before = archive_contents(archive)

    result = pacs(tmp_path, "verify", "--archive", str(archive))
    assert result.returncode == 1
    *problems, summary = lines(result)
    assert {r["path"]: r["problem"] for r in problems} == {
        str(corrupt): "checksum-mismatch", str(deleted): "missing",
        str(unindexed): "unindexed", str(temp): "leftover-temp"}
    by_path = {r["path"]: r for r in problems}
    assert by_path[str(corrupt)]["SOPInstanceUID"] == stored[0]["SOPInstanceUID"]
    assert by_path[str(deleted)]["SOPInstanceUID"] == stored[1]["SOPInstanceUID"]
    assert summary["problems"] == 4
    assert "4 problems (1 checksum-mismatch, 1 leftover-temp, 1 missing, 1 unindexed)" in \
        result.stderr

    quick = pacs(tmp_path, "verify", "--archive", str(archive), "--quick")
    assert quick.returncode == 1  # the checksum is not looked at, the rest still is
    assert {r.get("problem") for r in lines(quick)[:-1]} == {"missing", "unindexed",
                                                               "leftover-temp"}

    repair = pacs(tmp_path, "verify", "--archive", str(archive), "--repair")
    assert repair.returncode == 1
    assert {r["path"]: r["repair"] for r in lines(repair)[:-1]} == {
        str(corrupt): "quarantined", str(deleted): "dropped-row",
        str(unindexed): "indexed", str(temp): "quarantined"}

    again = pacs(tmp_path, "verify", "--archive", str(archive))
    assert again.returncode == 0, again.stdout
    assert lines(again) == [lines(again)[-1]] and lines(again)[-1]["problems"] == 0
    assert before - archive_contents(archive) == Counter()  # nothing was deleted

    table = pacs(tmp_path, "verify", "--archive", str(archive), "--format", "table")
    assert table.returncode == 0 and "0 problems" in table.stderr


def test_no_archive_exits_2(tmp_path: Path) -> None:
    result = pacs(tmp_path, "verify", "--archive", str(tmp_path / "none"))
    assert result.returncode == 2 and "no archive" in result.stderr


def test_safe_while_serve_receives(tmp_path: Path) -> None:
    """Files in flight (being received, renamed but not yet indexed) are not problems: verify
    runs over and over, in this process and as the command, while dcmsend sends."""
    series = make_ct_series(tmp_path / "series", 600, rows=64, cols=64)
    server = start_server(tmp_path / "serve", "--any-called-aet")
    done = threading.Event()
    failures: list[str] = []

    def send() -> None:
        try:
            for start in range(0, len(series), 100):
                result = subprocess.run(
                    [require("dcmsend"), "-aec", server.aet, "127.0.0.1", str(server.port),
                     *map(str, series[start:start + 100])],
                    capture_output=True, text=True, env=DCMTK_ENV, timeout=120)
                if result.returncode != 0:
                    failures.append(result.stderr)
        finally:
            done.set()

    sender = threading.Thread(target=send)
    sender.start()
    seen: set[int] = set()
    try:
        command = pacs(tmp_path, "verify", "--archive", str(server.archive))
        assert command.returncode == 0, command.stdout
        while not done.is_set():
            *problems, summary = verify_archive(server.archive)
            assert problems == []
            seen.add(summary["indexed"])
    finally:
        sender.join()
        assert server.stop() == 0
    assert failures == []
    assert len(seen) >= 3  # it did run while files arrived
    final = lines(pacs(tmp_path, "verify", "--archive", str(server.archive)))
    assert final[-1]["problems"] == 0 and final[-1]["indexed"] == 600


def test_an_archive_in_a_folder_that_cannot_be_written_is_still_read(tmp_path: Path) -> None:
    """A read-only archive (a share, a copy on a CD) whose index has no -wal file: SQLite
    cannot create the -shm a WAL database is read through, so find and verify said "cannot
    open the index". They now read it; --repair names what it cannot repair. Root ignores
    file modes, so the folder is made immutable (chattr +i) instead."""
    src = tmp_path / "src"
    for n in range(3):
        write_instance(src / f"{n}.dcm", number=n)
    archive = tmp_path / "archive"
    stored = lines(pacs(tmp_path, "index", "--archive", str(archive), str(src)))
    index = archive / layout.INDEX_FILE
    conn = sqlite3.connect(index)  # the last connection to close removes -wal and -shm
    conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    conn.close()
    assert not index.with_name(index.name + "-wal").exists()
    missing = Path(str(stored[0]["path"]))
    missing.unlink()
    locked = ["chattr", "+i", str(archive)] if os.geteuid() == 0 else ["chmod", "a-w", str(archive)]
    if subprocess.run(locked, capture_output=True).returncode != 0:
        pytest.skip("cannot make a folder read-only here")
    try:
        found = pacs(tmp_path, "find", "--archive", str(archive), "--level", "image")
        assert found.returncode == 0, found.stderr
        assert {r["SOPInstanceUID"] for r in lines(found)} == {r["SOPInstanceUID"] for r in stored}

        checked = pacs(tmp_path, "verify", "--archive", str(archive))
        assert checked.returncode == 1, checked.stderr
        *problems, summary = lines(checked)
        assert [(r["problem"], r["path"]) for r in problems] == [("missing", str(missing))]
        assert summary["indexed"] == 3 and summary["files"] == 2

        repair = pacs(tmp_path, "verify", "--archive", str(archive), "--repair")
        assert repair.returncode == 1 and "Traceback" not in repair.stderr
        *problems, summary = lines(repair)
        assert [r.get("repair") for r in problems] == [None]
        assert "cannot write the index" in problems[0]["error"]["message"] + repair.stderr
        assert summary["repaired"] == {}
    finally:
        subprocess.run(["chattr", "-i", str(archive)] if os.geteuid() == 0
                       else ["chmod", "u+w", str(archive)], check=True)
    assert len(lines(pacs(tmp_path, "find", "--archive", str(archive), "--level", "image"))) == 3


def test_an_archive_in_a_folder_we_may_not_write_is_read(tmp_path: Path) -> None:
    """The folder's mode, not chattr: SQLite says READONLY_DIRECTORY there, not CANTOPEN,
    and find and verify still could not open the index."""
    src = tmp_path / "src"
    write_instance(src / "a.dcm")
    archive = tmp_path / "archive"
    assert pacs(tmp_path, "index", "--archive", str(archive), str(src)).returncode == 0
    conn = sqlite3.connect(archive / layout.INDEX_FILE)
    conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    conn.close()
    archive.chmod(0o555)
    prefix = bound_by_file_modes()
    (tmp_path / "config.toml").write_text("")
    env = {**os.environ, "PACS_CONFIG": str(tmp_path / "config.toml")}
    try:
        for args in (["find", "--archive", str(archive), "--level", "image"],
                     ["verify", "--archive", str(archive)]):
            result = subprocess.run([*prefix, *pacs_cmd(*args)], capture_output=True, text=True,
                                    timeout=60, stdin=subprocess.DEVNULL, env=env)
            assert result.returncode == 0, result.stderr
            assert len(lines(result)) == 1
    finally:
        archive.chmod(0o755)


def test_a_damaged_index_is_named_with_what_to_do(tmp_path: Path) -> None:
    """Pages of index.sqlite overwritten: verify says the index is damaged and how to
    rebuild it (it used to end in a traceback), index gives failed records saying the
    same, and `index --rebuild` brings it back."""
    src = tmp_path / "src"
    for n in range(20):
        write_instance(src / f"{n}.dcm", number=n)
    archive = tmp_path / "archive"
    assert pacs(tmp_path, "index", "--archive", str(archive), str(src)).returncode == 0
    index = archive / layout.INDEX_FILE
    with sqlite3.connect(index) as conn:  # every page in the file, none left in the WAL
        conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    data = bytearray(index.read_bytes())
    for page in range(2 * 4096, len(data), 4096):
        data[page + 8:page + 308] = b"\xa5" * 300  # the cell pointers after each page header
    index.write_bytes(bytes(data))

    result = pacs(tmp_path, "verify", "--archive", str(archive))
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert "index cannot be used: database disk image is malformed" in result.stderr
    assert "pacs index --rebuild" in result.stderr
    result = pacs(tmp_path, "index", "--archive", str(archive), str(src))
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert "index-unusable" in {r.get("error", {}).get("code") for r in lines(result)}

    assert pacs(tmp_path, "index", "--archive", str(archive), "--rebuild").returncode == 0
    assert pacs(tmp_path, "verify", "--archive", str(archive)).returncode == 0


def test_quiet_says_nothing_when_all_is_well_and_the_summary_when_not(tmp_path: Path) -> None:
    """For cron: with -q, index and verify write nothing on stderr when all went well, and
    their summary when something did not (exit 1)."""
    src = tmp_path / "src"
    for n in range(2):
        write_instance(src / f"{n}.dcm", number=n)
    archive = tmp_path / "archive"
    indexed = pacs(tmp_path, "index", "--archive", str(archive), "-q", str(src))
    assert indexed.returncode == 0 and indexed.stderr == ""
    checked = pacs(tmp_path, "verify", "--archive", str(archive), "-q")
    assert checked.returncode == 0 and checked.stderr == ""
    stored = [Path(str(r["path"])) for r in lines(indexed)]
    stored[0].unlink()
    checked = pacs(tmp_path, "verify", "--archive", str(archive), "-q")
    assert checked.returncode == 1 and "pacs verify: 1 problem" in checked.stderr
    failing = pacs(tmp_path, "index", "--archive", str(archive), "-q", str(tmp_path / "nowhere"))
    assert failing.returncode == 1 and "pacs index: " in failing.stderr
