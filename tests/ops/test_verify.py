"""`pacs verify` as a library: each kind of problem named, repaired without deleting
anything, files in flight left alone."""

from __future__ import annotations

import hashlib
import json
import os
import sqlite3
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pydicom
import pytest

from pacscli.archive import layout
from pacscli.archive.index import Index
from pacscli.config import StorageSettings
from pacscli.ops.indexer import index_files, rebuild_index
from pacscli.ops.verify import exit_code, verify_archive
from pacscli.records import Record
from tests.conftest import bound_by_file_modes
from tests.dicom_files import archive_contents, dead_pid, write_instance

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


def make_archive(tmp_path: Path, count: int = 6) -> tuple[Path, list[Record]]:
    """An archive of `count` small instances, indexed through `pacs index`."""
    src = tmp_path / "src"
    for number in range(count):
        write_instance(src / f"{number}.dcm", number=number, rows=16)
    root = tmp_path / "archive"
    records = list(index_files(root, StorageSettings(), [str(src)], jobs=2))
    assert [r["outcome"] for r in records] == ["stored"] * count
    return root, sorted(records, key=lambda r: r["path"])


def run_verify(root: Path, **options: object) -> tuple[list[Record], Record]:
    records = list(verify_archive(root, **options))  # type: ignore[arg-type]
    assert records[-1]["summary"] is True
    return records[:-1], records[-1]


def test_a_whole_archive_verifies(tmp_path: Path) -> None:
    root, _ = make_archive(tmp_path)
    for quick in (False, True):
        problems, summary = run_verify(root, quick=quick, jobs=2)
        assert problems == []
        assert summary["status"] == "ok" and summary["indexed"] == summary["files"] == 6
        assert exit_code(summary) == 0


def test_each_problem_named_then_repaired_and_nothing_deleted(tmp_path: Path) -> None:
    root, stored = make_archive(tmp_path)
    corrupt, grown, deleted = (Path(r["path"]) for r in stored[:3])
    data = bytearray(corrupt.read_bytes())
    data[-7] ^= 0xFF  # a byte of pixel data: same size, other content
    corrupt.write_bytes(bytes(data))
    with grown.open("ab") as fp:
        fp.write(b"\0\0")
    deleted.unlink()
    dropped = write_instance(root / layout.STUDIES_DIR / "dropped" / "in.dcm")
    stray = root / layout.STUDIES_DIR / "notes.txt"
    stray.write_text("not DICOM")
    temp = root / layout.STAGING_DIR / str(dead_pid()) / "tmpk3j2_x.dcm"
    temp.parent.mkdir(parents=True)
    temp.write_bytes(b"half a file")
    before = archive_contents(root)

    problems, summary = run_verify(root, jobs=2)
    found = {r["path"]: r for r in problems}
    assert {path: r["problem"] for path, r in found.items()} == {
        str(corrupt): "checksum-mismatch",
        str(grown): "size-mismatch",
        str(deleted): "missing",
        str(dropped): "unindexed",
        str(stray): "unindexed",
        str(temp): "leftover-temp",
    }
    sops = {r["path"]: r["SOPInstanceUID"] for r in stored}
    for path in (corrupt, grown, deleted):
        assert found[str(path)]["SOPInstanceUID"] == sops[str(path)]
    assert found[str(dropped)]["SOPInstanceUID"]  # read from the file
    assert all(r["status"] == "failed" and r["error"]["message"] for r in problems)
    assert summary["problems"] == 6 and exit_code(summary) == 1
    assert archive_contents(root) == before  # verify alone writes nothing

    repaired, summary = run_verify(root, repair=True)
    actions = {r["path"]: r.get("repair") for r in repaired}
    assert actions == {
        str(corrupt): "quarantined",
        str(grown): "quarantined",
        str(deleted): "dropped-row",
        str(dropped): "indexed",
        str(stray): "quarantined",
        str(temp): "quarantined",
    }
    assert all(r["status"] == "warning" for r in repaired)
    assert exit_code(summary) == 1  # something was wrong, even if mended
    for record in repaired:
        if record["repair"] == "quarantined":
            moved = Path(record["quarantine_path"])
            assert moved.is_file() and layout.QUARANTINE_DIR in moved.parts

    problems, summary = run_verify(root)
    assert problems == [] and exit_code(summary) == 0
    assert summary["indexed"] == 4  # 6 - corrupt - grown - deleted + dropped
    assert before - archive_contents(root) == Counter()  # every file still there, somewhere
    # later runs leave the quarantine alone
    problems, summary = run_verify(root, repair=True)
    assert problems == [] and exit_code(summary) == 0


def test_quick_checks_sizes_only(tmp_path: Path) -> None:
    root, stored = make_archive(tmp_path)
    path = Path(stored[0]["path"])
    data = bytearray(path.read_bytes())
    data[-3] ^= 1
    path.write_bytes(bytes(data))
    assert run_verify(root, quick=True)[0] == []
    assert [r["problem"] for r in run_verify(root)[0]] == ["checksum-mismatch"]


def test_a_row_that_disagrees_with_a_good_file_is_indexed_again(tmp_path: Path) -> None:
    root, stored = make_archive(tmp_path)
    with sqlite3.connect(root / layout.INDEX_FILE) as conn:
        conn.execute("UPDATE instances SET SOPInstanceUID = '1.2.3.999' WHERE path LIKE ?",
                     (f"%{stored[0]['SOPInstanceUID']}.dcm",))
    problems, _ = run_verify(root)
    assert [(r["problem"], r["SOPInstanceUID"]) for r in problems] == [
        ("uid-mismatch", "1.2.3.999")]
    assert "SOPInstanceUID" in problems[0]["error"]["message"]
    repaired, _ = run_verify(root, repair=True)
    assert [r["repair"] for r in repaired] == ["reindexed"]
    problems, summary = run_verify(root)
    assert problems == [] and summary["indexed"] == 6


def test_truncated_and_unparseable_files_are_named(tmp_path: Path) -> None:
    """A file cut short with its row made to match (as an older pacscli might have indexed
    it) still fails the structural check."""
    root, stored = make_archive(tmp_path)
    path = Path(stored[0]["path"])
    path.write_bytes(path.read_bytes()[:-20])
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    with sqlite3.connect(root / layout.INDEX_FILE) as conn:
        conn.execute("UPDATE instances SET size = ?, sha256 = ? WHERE SOPInstanceUID = ?",
                     (path.stat().st_size, digest, stored[0]["SOPInstanceUID"]))
    problems, _ = run_verify(root)
    assert [r["problem"] for r in problems] == ["truncated"]


def test_files_in_flight_are_not_problems(tmp_path: Path) -> None:
    root, _ = make_archive(tmp_path)
    writer = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        staging = root / layout.STAGING_DIR / str(writer.pid)
        staging.mkdir(parents=True)
        (staging / "tmp_receiving.dcm").write_bytes(b"partial")
        # placed a moment ago by a live writer that has not committed its row yet
        placed = write_instance(root / layout.STUDIES_DIR / "aa" / "bb" / "placed.dcm")
        problems, summary = run_verify(root)
        assert problems == [] and summary["in_flight"] == 1 and exit_code(summary) == 0
    finally:
        writer.kill()
        writer.wait()
    # the writer is gone: its leftovers and the unindexed file are problems now
    problems, _ = run_verify(root)
    assert sorted(r["problem"] for r in problems) == ["leftover-temp", "unindexed"]
    assert any(r["path"] == str(placed) for r in problems)


def test_no_archive_is_a_usage_error(tmp_path: Path) -> None:
    from pacscli.errors import UsageError

    with pytest.raises(UsageError, match="no archive"):
        list(verify_archive(tmp_path / "nowhere"))
    assert not (tmp_path / "nowhere").exists()


def test_missing_in_place_file_drops_its_row_and_leaves_the_share_alone(tmp_path: Path) -> None:
    """A share's file gone or cut short: its row is dropped, the file left where it is. One
    rewritten but still a whole instance is indexed again: its row was dropped too, and a
    valid instance left the index."""
    share = tmp_path / "share"
    kept, gone, changed, cut = (write_instance(share / f"{n}.dcm", number=n) for n in range(4))
    root = tmp_path / "archive"
    assert all(r["outcome"] == "indexed" for r in
               index_files(root, StorageSettings(), [str(share)], in_place=True))
    gone.unlink()
    changed.write_bytes(changed.read_bytes()[:-1] + b"\x01")
    cut.write_bytes(cut.read_bytes()[:-1])
    problems, _ = run_verify(root)
    assert {r["path"]: r["problem"] for r in problems} == {
        str(gone): "missing", str(changed): "checksum-mismatch", str(cut): "size-mismatch"}
    repaired, _ = run_verify(root, repair=True)
    assert {r["path"]: r["repair"] for r in repaired} == {
        str(gone): "dropped-row", str(changed): "reindexed", str(cut): "dropped-row"}
    assert changed.exists() and kept.exists() and cut.exists()  # never moved out of the share
    assert run_verify(root)[0] == []
    assert sorted(os.listdir(share)) == ["0.dcm", "2.dcm", "3.dcm"]


def test_the_core_loads_no_cli_and_verify_no_pydicom() -> None:
    """The core never loads typer or rich (pydicom loads tqdm itself); `pacs verify` starts
    without pydicom."""
    code = ("import sys, pacscli.ops.verify, pacscli.ops.indexer; "
            "print(sorted(m for m in ('typer', 'rich') if m in sys.modules))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "[]"
    code = "import sys, pacscli.ops.verify; print('pydicom' in sys.modules)"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "False"


def test_a_repair_keeps_the_row_of_an_instance_received_again_since_the_check(tmp_path: Path) -> None:
    """verify found a file missing; before the repair, serve received the instance again and
    committed its row. The repair must not drop that row (it did, so the sender's instance
    was on disk but never found by C-FIND)."""
    from pacscli.archive.archive import Archive
    from pacscli.archive.index import Index
    from pacscli.ops.verify import _Repairer, check_file

    root, stored = make_archive(tmp_path, count=2)
    gone = Path(stored[0]["path"])
    sop = stored[0]["SOPInstanceUID"]
    kept = tmp_path / "copy.dcm"
    kept.write_bytes(gone.read_bytes())
    gone.unlink()
    index = Index(root / layout.INDEX_FILE)
    row = index.file_of(sop)
    assert row is not None
    record = check_file(str(root), row, quick=False)
    assert record is not None and record["problem"] == "missing"

    archive = Archive(root)  # the instance arrives again, as serve would put it
    assert archive.put(kept).outcome == "stored"
    archive.close()

    fixer = _Repairer(root, StorageSettings(), index)
    try:
        fixer.repair(record)
    finally:
        fixer.close()
    assert record["repair"] == "fixed-meanwhile"
    assert index.file_of(sop) is not None and gone.is_file()
    index.close()
    problems, _ = run_verify(root)
    assert problems == []


def _unlistable(folder: Path) -> list[str]:
    """A command prefix under which `folder` cannot be listed."""
    folder.chmod(0)
    return bound_by_file_modes()


def test_what_is_not_a_file_among_the_instances_is_named_never_opened(tmp_path: Path) -> None:
    """A FIFO hung verify and index --rebuild for ever (opening it waits for a writer); a
    link to itself ended verify in a traceback, and a dangling link passed unreported."""
    root, stored = make_archive(tmp_path, count=2)
    folder = Path(stored[0]["path"]).parent
    os.mkfifo(folder / "fifo")
    (folder / "loop").symlink_to("loop")
    (folder / "dangling.dcm").symlink_to(tmp_path / "nowhere")
    old = 1_000_000_000  # not in flight
    for name in ("fifo", "loop", "dangling.dcm"):
        os.utime(folder / name, (old, old), follow_symlinks=False)
    problems, summary = run_verify(root)
    assert {(r["problem"], Path(r["path"]).name, r["error"]["message"]) for r in problems} == {
        ("unindexed", "fifo", "a FIFO in the archive, not a file"),
        ("unindexed", "loop", "a symbolic link in the archive, not a file"),
        ("unindexed", "dangling.dcm", "a symbolic link in the archive, not a file")}
    assert exit_code(summary) == 1

    rebuilt = subprocess.run([sys.executable, "-m", "pacscli", "index", "--rebuild",
                              "--archive", str(root)], capture_output=True, text=True,
                             timeout=60, stdin=subprocess.DEVNULL)
    records = [json.loads(line) for line in rebuilt.stdout.splitlines()]
    assert {Path(r["path"]).name for r in records if r["status"] == "skipped"} == {
        "fifo", "loop", "dangling.dcm"}
    assert sum(r.get("outcome") == "indexed" for r in records) == 2

    problems, summary = run_verify(root, repair=True)
    assert {r["repair"] for r in problems} == {"quarantined"}
    assert sorted(os.listdir(folder)) == [Path(stored[0]["path"]).name]
    assert run_verify(root)[0] == []


def test_a_folder_that_cannot_be_listed_is_a_problem_and_fails_a_rebuild(tmp_path: Path) -> None:
    """Its files went unchecked with exit 0, and a rebuild dropped its instances from the
    index with exit 0: only a log line said so. A rebuild now changes nothing."""
    root, stored = make_archive(tmp_path, count=3)
    folder = Path(stored[0]["path"]).parent
    prefix = _unlistable(folder)
    try:
        runs = {}
        for args in (["verify"], ["index", "--rebuild"]):
            result = subprocess.run([*prefix, sys.executable, "-m", "pacscli", *args,
                                     "--archive", str(root)], capture_output=True, text=True,
                                    timeout=60, stdin=subprocess.DEVNULL)
            runs[args[0]] = (result.returncode,
                             [json.loads(line) for line in result.stdout.splitlines()])
            rebuild_stderr = [result.stderr]
    finally:
        folder.chmod(0o755)
    code, records = runs["verify"]
    assert code == 1
    assert sorted((r["problem"], r["path"]) for r in records[:-1]) == [
        ("unlistable", str(folder)), ("unreadable", stored[0]["path"])]  # its indexed file
    code, records = runs["index"]
    assert code == 1 and records == []
    assert f"cannot list {folder} (Permission denied): the rebuilt index would lack its " \
           "instances, so nothing was changed" in rebuild_stderr[0]
    assert len(Index(root / layout.INDEX_FILE).dump()["instances"]) == 3  # nothing dropped


def test_repair_quarantines_an_unindexed_file_cut_short(tmp_path: Path) -> None:
    """`--repair` indexed such a file where it lay (it read only the header), and the
    archive then served it as whole."""
    root, stored = make_archive(tmp_path, count=2)
    cut = Path(stored[0]["path"]).parent / "cut.dcm"
    cut.write_bytes(Path(stored[1]["path"]).read_bytes()[:-1])
    os.utime(cut, (1_000_000_000, 1_000_000_000))
    problems, _ = run_verify(root, repair=True)
    [record] = problems
    assert (record["problem"], record["repair"]) == ("unindexed", "quarantined")
    assert record["repair_reason"].startswith("truncated")
    assert run_verify(root)[0] == []


def test_repair_of_a_share_file_now_holding_another_indexed_instance_drops_its_row(
        tmp_path: Path) -> None:
    """It was said 'reindexed' on every run, the row left as it was: index_in_place found
    the file a duplicate of the other instance's and changed nothing."""
    share = tmp_path / "share"
    first, second = (write_instance(share / f"{n}.dcm", number=n) for n in range(2))
    root = tmp_path / "archive"
    list(index_files(root, StorageSettings(), [str(share)], in_place=True))
    first.write_bytes(second.read_bytes())  # a whole instance, another one's copy
    repaired, _ = run_verify(root, repair=True)
    assert [(Path(r["path"]).name, r["repair"]) for r in repaired] == [("0.dcm", "dropped-row")]
    assert run_verify(root)[0] == []


def test_a_share_file_behind_a_link_is_reindexed_like_any_other(tmp_path: Path) -> None:
    """index --in-place follows a link to a file; repair did not, and dropped its row."""
    real, share = tmp_path / "real", tmp_path / "share"
    target = write_instance(real / "a.dcm", number=1)
    share.mkdir()
    (share / "a.dcm").symlink_to(target)
    root = tmp_path / "archive"
    [record] = index_files(root, StorageSettings(), [str(share)], in_place=True)
    assert record["outcome"] == "indexed"
    ds = pydicom.dcmread(target)
    ds.PatientName = "Changed^Name"
    ds.save_as(target, enforce_file_format=True)
    repaired, _ = run_verify(root, repair=True)
    assert [r["repair"] for r in repaired] == ["reindexed"]
    assert run_verify(root)[0] == []


def test_a_live_staging_folder_named_with_our_own_pid_is_another_writer(tmp_path: Path) -> None:
    """Processes in two PID namespaces may have one PID: verify took a live folder whose
    name began with its own PID for its own, saw no writer, and called a file in flight
    unindexed."""
    import fcntl

    from pacscli.archive.staging import OWNER_LOCK

    root, _ = make_archive(tmp_path, count=1)
    other = root / layout.STAGING_DIR / f"{os.getpid()}-feedbeef"
    other.mkdir()
    lock = os.open(other / OWNER_LOCK, os.O_RDONLY | os.O_CREAT)
    try:
        fcntl.flock(lock, fcntl.LOCK_EX)
        write_instance(root / layout.STUDIES_DIR / "aa" / "bb" / "placed.dcm")
        problems, summary = run_verify(root)
        assert problems == [] and summary["in_flight"] == 1
    finally:
        os.close(lock)


def test_a_link_in_staging_is_moved_itself_never_followed(tmp_path: Path) -> None:
    """--repair followed a link in .staging/ and moved every file it pointed at into the
    quarantine, emptying folders outside the archive."""
    root, _ = make_archive(tmp_path, count=1)
    outside = tmp_path / "outside"
    (outside / "sub").mkdir(parents=True)
    (outside / "sub" / "keep.txt").write_text("mine")
    link = root / layout.STAGING_DIR / "evil"
    link.symlink_to(outside)
    problems, _ = run_verify(root, repair=True)
    assert [(r["problem"], r["path"], r["repair"]) for r in problems] == [
        ("leftover-temp", str(link), "quarantined")]
    assert (outside / "sub" / "keep.txt").read_text() == "mine"


def test_a_rebuild_keeps_archived_instances_whatever_their_sop_class(tmp_path: Path) -> None:
    """serve and index refuse a SOP Class UID that is not a UID, but files of earlier
    versions hold such instances: a rebuild dropped them from the index (and repair then
    quarantined them)."""
    root, _ = make_archive(tmp_path, count=1)
    ds = pydicom.dcmread(write_instance(tmp_path / "x.dcm", number=5))
    ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.2."
    placed = root / layout.STUDIES_DIR / "aa" / "bb" / "old.dcm"
    placed.parent.mkdir(parents=True)
    ds.save_as(placed, enforce_file_format=True)
    records = list(rebuild_index(root, StorageSettings()))
    assert [r["outcome"] for r in records] == ["indexed", "indexed"]
    assert run_verify(root)[0] == []
