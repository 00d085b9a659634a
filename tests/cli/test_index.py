"""`pacs index` as a command: records, exit codes, stdin, and a rebuild after `pacs serve`."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path
from typing import Any

import pydicom
import pytest
from pydicom.data import get_testdata_file

from pacscli.archive import layout
from pacscli.archive.index import Index
from tests.conftest import DCMTK_ENV, TESTDATA, pacs_cmd, require, start_server, testdata
from tests.dicom_files import bulk_bytes, junk_folder, make_dataset, write_instance

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


def pacs(tmp_path: Path, *args: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    """Run `pacs` with an empty config, stdin closed unless given."""
    config = tmp_path / "config.toml"
    if not config.exists():
        config.write_text("")
    from tests.conftest import pacs_cmd

    return subprocess.run(pacs_cmd(*args), input=stdin if stdin is not None else "",
                          capture_output=True, text=True, timeout=300,
                          env={**os.environ, "PACS_CONFIG": str(config)})


def lines(result: subprocess.CompletedProcess[str]) -> list[dict[str, Any]]:
    return [json.loads(line) for line in result.stdout.splitlines()]


def dump(archive: Path) -> dict[str, list[tuple[object, ...]]]:
    index = Index(archive / layout.INDEX_FILE)
    try:
        return index.dump()
    finally:
        index.close()


def test_records_and_the_exit_code_rule(tmp_path: Path) -> None:
    good = tmp_path / "good"
    written = [write_instance(good / f"{n}.dcm", number=n) for n in range(3)]
    junk = tmp_path / "junk"
    expected = junk_folder(junk)
    archive = str(tmp_path / "archive")

    result = pacs(tmp_path, "index", "--archive", archive, "--jobs", "2", str(good), str(junk))
    assert result.returncode == 0, result.stderr  # skips are not failures
    records = lines(result)
    assert len(records) == len(written) + len(expected)
    assert sorted(r["source"] for r in records if r["status"] == "ok") == \
        sorted(map(str, written))
    skipped = {Path(str(r["path"])).name: r for r in records if r["status"] == "skipped"}
    assert {n: r["reason_code"] for n, r in skipped.items() if expected[n] != "any"} == \
        {n: c for n, c in expected.items() if c != "any"}
    assert "3 instances (3 stored)" in result.stderr and "0 failed" in result.stderr

    strict = pacs(tmp_path, "index", "--archive", archive, "--strict", str(good), str(junk))
    assert strict.returncode == 1  # skipped files count as failures when asked
    assert {r["outcome"] for r in lines(strict) if r["status"] == "ok"} == {"unchanged"}

    only_dicomdir = pacs(tmp_path, "index", "--archive", archive, "--strict",
                         str(get_testdata_file("DICOMDIR")))
    assert only_dicomdir.returncode == 0  # a DICOMDIR is never an instance: not a skip
    assert len(lines(only_dicomdir)) == 32

    missing = pacs(tmp_path, "index", "--archive", archive, str(tmp_path / "nowhere"),
                   str(good))
    assert missing.returncode == 1
    assert [r["error"]["code"] for r in lines(missing) if r["status"] == "failed"] == \
        ["not-found"]


def test_dicom_json(tmp_path: Path) -> None:
    """`--dicom-json`: each instance's record carries its dataset as PS3.18 JSON, pixel data
    left out; a file that is not DICOM is skipped without one."""
    text = tmp_path / "notes.txt"
    text.write_text("not DICOM")
    source = testdata("explicit_le")
    result = pacs(tmp_path, "index", "--archive", str(tmp_path / "archive"), "--dicom-json",
                  str(source), str(text))
    assert result.returncode == 0, result.stderr
    stored, skipped = sorted(lines(result), key=lambda r: str(r["status"]))
    dataset = pydicom.dcmread(source, stop_before_pixels=True)
    # GE's private 2 KB value is named in the archived copy, not inlined
    bulk = stored["dicom"].pop("00431029")
    assert bulk["BulkDataURI"].startswith(Path(stored["path"]).as_uri() + "?offset=")
    assert bulk_bytes(bulk["BulkDataURI"]) == dataset[0x00431029].value
    del dataset[0x00431029]
    assert stored["status"] == "ok" and stored["dicom"] == dataset.to_json_dict()
    assert skipped["status"] == "skipped" and "dicom" not in skipped


def test_paths_and_records_from_stdin(tmp_path: Path) -> None:
    files = [write_instance(tmp_path / "src" / f"{n}.dcm", number=n) for n in range(2)]
    archive = str(tmp_path / "archive")
    stdin = f"{files[0]}\n" + json.dumps({"path": str(files[1]), "PatientID": "x"}) + "\n"
    result = pacs(tmp_path, "index", "--archive", archive, "-", stdin=stdin)
    assert result.returncode == 0, result.stderr
    assert [r["outcome"] for r in lines(result)] == ["stored", "stored"]


def test_an_instance_named_dicomdir_is_indexed(tmp_path: Path) -> None:
    """A file is a DICOMDIR by its content, not its name: a CT slice called DICOMDIR was
    skipped as "a DICOMDIR ... 0 files" (`pacs store` sent it)."""
    ct = write_instance(tmp_path / "src" / "DICOMDIR")
    result = pacs(tmp_path, "index", "--archive", str(tmp_path / "archive"), str(ct.parent))
    assert result.returncode == 0, result.stderr
    [record] = lines(result)
    assert (record["status"], record["outcome"], record["source"]) == ("ok", "stored", str(ct))


def test_usage_errors(tmp_path: Path) -> None:
    archive = str(tmp_path / "archive")
    assert pacs(tmp_path, "index", "--archive", archive).returncode == 2  # nothing to index
    both = pacs(tmp_path, "index", "--archive", archive, "--rebuild", str(tmp_path))
    assert both.returncode == 2 and "--rebuild" in both.stderr
    assert pacs(tmp_path, "index", "--archive", archive, "--jobs", "0", ".").returncode == 2


def test_in_place(tmp_path: Path) -> None:
    share = tmp_path / "share"
    files = [write_instance(share / f"{n}.dcm", number=n) for n in range(3)]
    archive = tmp_path / "archive"
    result = pacs(tmp_path, "index", "--archive", str(archive), "--in-place", str(share))
    assert result.returncode == 0, result.stderr
    assert [r["path"] for r in lines(result)] == [str(p) for p in files]
    assert not (archive / layout.STUDIES_DIR).exists()
    again = pacs(tmp_path, "index", "--archive", str(archive), "--in-place", str(share))
    assert [r["outcome"] for r in lines(again)] == ["unchanged"] * 3


def test_in_place_names_the_instance_of_a_file_broken_since(tmp_path: Path) -> None:
    """Share files indexed, then cut short or overwritten with junk: a re-run skipped them
    (exit 0) while the index still named them for their instances. Each is now a failure
    naming the instance, and `verify --repair` drops the rows."""
    share, archive = tmp_path / "share", tmp_path / "archive"
    cut, junk = write_instance(share / "a.dcm", number=1), write_instance(share / "b.dcm", number=2)
    before = {r["path"]: r for r in lines(pacs(tmp_path, "index", "--archive", str(archive),
                                                "--in-place", str(share)))}
    cut.write_bytes(cut.read_bytes()[:-100])
    junk.write_text("junk\n")
    fifo = write_instance(share / "c.dcm", number=3)
    before.update({r["path"]: r for r in lines(pacs(tmp_path, "index", "--archive", str(archive),
                                                     "--in-place", str(fifo)))})
    fifo.unlink()
    os.mkfifo(fifo)  # never opened: a FIFO in its place is broken too
    result = pacs(tmp_path, "index", "--archive", str(archive), "--in-place", str(share))
    assert result.returncode == 1, result.stderr
    after = {r["path"]: r for r in lines(result)}
    for path, starts in ((cut, "truncated: "), (junk, "not a DICOM file"),
                         (fifo, "not a regular file")):
        record = after[str(path)]
        assert record["status"] == "failed" and record["error"]["code"] == "indexed-file-broken"
        assert record["SOPInstanceUID"] == before[str(path)]["SOPInstanceUID"]
        assert record["error"]["message"].startswith(starts)
        assert f"indexed for instance {record['SOPInstanceUID']}" in record["error"]["message"]
    repaired = pacs(tmp_path, "verify", "--archive", str(archive), "--repair")
    assert {r.get("repair") for r in lines(repaired)[:-1]} == {"dropped-row"}
    assert pacs(tmp_path, "verify", "--archive", str(archive)).returncode == 0


def test_in_place_says_what_changed_in_a_rewritten_file(tmp_path: Path) -> None:
    """A file indexed in place, then rewritten: with other content for its instance it is
    "updated" (the old sha256 in the record); holding another instance, the record warns
    that the instance it held is no longer indexed."""
    share, archive = tmp_path / "share", tmp_path / "archive"
    first = write_instance(share / "a.dcm", number=1)
    second = write_instance(share / "b.dcm", number=2)
    before = lines(pacs(tmp_path, "index", "--archive", str(archive), "--in-place", str(share)))
    old = {r["path"]: r for r in before}

    edited = pydicom.dcmread(first)
    edited.PatientName = "Changed^Name"
    edited.save_as(first, enforce_file_format=True)
    other = make_dataset(number=3, patient_id="PID2")
    write_instance(second, other)
    result = pacs(tmp_path, "index", "--archive", str(archive), "--in-place", str(share))
    assert result.returncode == 0, result.stderr
    after = {r["path"]: r for r in lines(result)}

    updated = after[str(first)]
    assert updated["outcome"] == "updated" and updated["status"] == "ok"
    assert updated["previous_sha256"] == old[str(first)]["sha256"] != updated["sha256"]
    replaced = after[str(second)]
    assert replaced["outcome"] == "indexed" and replaced["status"] == "warning"
    assert old[str(second)]["SOPInstanceUID"] in replaced["warning"]
    assert "1 indexed, 1 updated" in result.stderr

    index = Index(archive / "index.sqlite")
    try:
        uids = {row[0] for row in index.connection().execute("SELECT SOPInstanceUID FROM instances")}
        names = {row[0] for row in index.connection().execute("SELECT PatientName FROM patients")}
    finally:
        index.close()
    assert uids == {old[str(first)]["SOPInstanceUID"], other.SOPInstanceUID}
    assert "Changed^Name" in names


def test_rebuild_equals_the_index_serve_built(tmp_path: Path) -> None:
    """Files received by `pacs serve` (dcmsend keeps each file's transfer syntax), then the
    index dropped and rebuilt from the files alone: the same rows."""
    server = start_server(tmp_path / "serve")
    try:
        sent = sorted({testdata(name) for name in TESTDATA.values()})
        sent += sorted(p for p in (Path(str(get_testdata_file("DICOMDIR"))).parent
                                   / "98892001").rglob("*") if p.is_file())
        for path in sent:  # one at a time: the receive order is the mtime order
            result = subprocess.run(
                [require("dcmsend"), "-aet", "MODALITY", "-aec", server.aet, "127.0.0.1",
                 str(server.port), str(path)],
                capture_output=True, text=True, env=DCMTK_ENV, timeout=60)
            assert result.returncode == 0, result.stderr
    finally:
        assert server.stop() == 0
    before = dump(server.archive)
    assert len(before["instances"]) >= 10
    assert all("MODALITY" in row for row in before["instances"])

    result = pacs(tmp_path, "index", "--rebuild", "--archive", str(server.archive))
    assert result.returncode == 0, result.stderr
    assert {r["outcome"] for r in lines(result)} == {"indexed"}
    assert dump(server.archive) == before


@pytest.mark.parametrize("fmt", ["table", "csv", "json"])
def test_other_formats(tmp_path: Path, fmt: str) -> None:
    path = write_instance(tmp_path / "one.dcm")
    result = pacs(tmp_path, "index", "--archive", str(tmp_path / "a"), "--format", fmt, str(path))
    assert result.returncode == 0, result.stderr
    assert "stored" in result.stdout


def test_a_file_name_that_is_not_utf8_gives_a_valid_record(tmp_path: Path) -> None:
    """A name with a Latin-1 byte: the record is valid UTF-8 JSON (it held the raw byte,
    or under a UTF-8 locale the command crashed), and its source names the file again.
    In place, where the index would have to record that name, the file fails plainly."""
    src = tmp_path / "src"
    source = write_instance(src / "plain.dcm")
    odd = os.path.join(os.fsencode(src), b"lat\xe9.dcm")
    os.rename(source, odd)
    for env in ({}, {"PYTHONIOENCODING": "utf-8"}):
        for in_place in ([], ["--in-place"]):
            archive = tmp_path / f"archive{len(env)}{len(in_place)}"
            result = subprocess.run(pacs_cmd("index", "--archive", str(archive), *in_place, str(src)),
                                    capture_output=True, env={**os.environ, **env}, timeout=120,
                                    stdin=subprocess.DEVNULL)
            assert b"Traceback" not in result.stderr, result.stderr
            [record] = [json.loads(line) for line in result.stdout.decode("utf-8").splitlines()]
            if in_place:
                assert result.returncode == 1 and record["error"]["code"] == "bad-path"
                assert os.fsencode(record["path"]) == odd
            else:
                assert result.returncode == 0 and record["outcome"] == "stored"
                assert os.fsencode(record["source"]) == odd


def test_a_path_holding_a_nul_fails_as_a_record(tmp_path: Path) -> None:
    result = pacs(tmp_path, "index", "--archive", str(tmp_path / "archive"),
                  stdin=json.dumps({"path": "/tmp/x\u0000y"}) + "\n")
    assert "Traceback" not in result.stderr and result.returncode == 1
    [record] = lines(result)
    assert record["error"]["code"] == "bad-path"  # type: ignore[index]


def test_sigterm_to_a_parallel_index_prints_no_worker_traceback(tmp_path: Path) -> None:
    """`timeout` (SIGTERM) stops `pacs index -j 2`: exit 130 and one line, no traceback
    from each worker (they inherited the handler that turns SIGTERM into Ctrl-C)."""
    import signal
    import time

    src = tmp_path / "src"
    for n in range(1500):
        write_instance(src / f"{n}.dcm", number=n, rows=4)
    archive = tmp_path / "archive"
    proc = subprocess.Popen(pacs_cmd("index", "--archive", str(archive), "-j", "2", str(src)),
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 60
    while not list((archive / "studies").glob("*/*/*")) and time.monotonic() < deadline:
        time.sleep(0.05)  # until the workers are at work
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    if proc.returncode == 0:
        pytest.skip("the index finished before the signal")
    assert proc.returncode == 130 and "Traceback" not in err, err
