"""Archive.put, the single insert path: conflicts and what stays on disk."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pydicom

from pacscli.archive.archive import Archive
from pacscli.config import StorageSettings
from tests.conftest import pacs_cmd, testdata


def instance_files(root: Path) -> list[Path]:
    return sorted(p for p in (root / "studies").rglob("*.dcm"))


def test_replace_with_new_study_uid_moves_the_old_file_aside(tmp_path: Path) -> None:
    archive = Archive(tmp_path / "archive", StorageSettings(on_conflict="replace"))
    original = testdata("explicit_le")
    assert archive.put(original).outcome == "stored"
    moved = pydicom.dcmread(original)
    moved.StudyInstanceUID = "1.2.3.4.5.6"  # the same instance, filed under another study
    moved.PatientName = "Moved^Study"
    moved_path = tmp_path / "moved.dcm"
    moved.save_as(moved_path)
    result = archive.put(moved_path)
    assert result.outcome == "replaced"
    files = instance_files(archive.root)
    assert files == [result.path]  # the old file left studies/ ...
    aside = list((archive.root / ".replaced").iterdir())
    assert len(aside) == 1 and pydicom.dcmread(aside[0]).StudyInstanceUID != "1.2.3.4.5.6"  # ... kept
    conn = archive.index.connection()
    assert conn.execute("SELECT count(*) FROM studies").fetchone()[0] == 1  # no empty study left
    assert conn.execute("SELECT count(*) FROM instances").fetchone()[0] == 1
    archive.close()
    verify = subprocess.run(pacs_cmd("verify", "--archive", str(tmp_path / "archive")),
                            capture_output=True, text=True, timeout=120)
    assert verify.returncode == 0, verify.stdout + verify.stderr


def test_keep_policy_leaves_the_archived_instance(tmp_path: Path) -> None:
    archive = Archive(tmp_path / "archive")
    original = testdata("explicit_le")
    first = archive.put(original)
    changed = pydicom.dcmread(original)
    changed.PatientName = "Changed^Name"
    changed.save_as(tmp_path / "changed.dcm")
    assert archive.put(tmp_path / "changed.dcm").outcome == "kept"
    assert archive.put(original).outcome == "duplicate"
    assert instance_files(archive.root) == [first.path]
    assert str(pydicom.dcmread(first.path).PatientName) == "CompressedSamples^CT1"
    archive.close()
