"""Query/retrieve test data and peers: a corpus of pydicom test files plus small synthetic
studies, DCMTK's dcmqrscp holding them, and DCMTK's storescp as a move destination."""

from __future__ import annotations

import json
import os
import signal
import subprocess
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pydicom
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, MRImageStorage

from tests.conftest import DCMTK_ENV, free_port, pacs_cmd, require, testdata, wait_for_port

# Uncompressed pydicom test files with distinct studies (dcmqrscp accepts uncompressed only).
PYDICOM_FILES = (
    "CT_small.dcm",  # CompressedSamples^CT1, 1CT1, 20040119, CT
    "MR_small.dcm",  # CompressedSamples^MR1, 4MR1, 20040826, MR
    "examples_rgb_color.dcm",  # CompressedSamples^US1, 13US1, 20040826, US
    "SC_rgb_small_odd.dcm",  # Lestrade^G, ID1, 20170101: two instances of one series
    "SC_ybr_full_422_uncompressed.dcm",
    "rtdose.dcm",  # Lastname^Firstname, id11111, 20030805
    "rtplan.dcm",  # Last^First^mid^pre, id00001, 20030716
    "examples_overlay.dcm",  # Sssssss^Jsssss, 021234567, 20051130, MR
    "waveform_ecg.dcm",  # Anonymous, 642341, 20130125
    "liver_1frame.dcm",  # JANCT000, 99000, 20030417
)

UID_ROOT = "1.2.826.0.1.3680043.10.543.77"
HOLMES_STUDY_1 = f"{UID_ROOT}.1.1"  # 20240115: CT series of 2 instances + CT series of 1
HOLMES_STUDY_2 = f"{UID_ROOT}.1.2"  # 20240220: MR, 1 instance
WATSON_STUDY = f"{UID_ROOT}.1.3"  # 20240301: CT, 1 instance
HOLMES_SERIES_1 = f"{UID_ROOT}.2.1"
HOLMES_SERIES_2 = f"{UID_ROOT}.2.2"
HOLMES_SERIES_3 = f"{UID_ROOT}.2.3"
WATSON_SERIES = f"{UID_ROOT}.2.4"
CT1_STUDY = "1.3.6.1.4.1.5962.1.2.1.20040119072730.12322"
MR1_STUDY = "1.3.6.1.4.1.5962.1.2.4.20040826185059.5457"
US1_STUDY = "1.3.6.1.4.1.5962.1.2.13.20040826185059.5457"
LESTRADE_STUDY = "1.2.826.0.1.3680043.8.498.12406831542731051035295345080039845114"
LESTRADE_SERIES = "1.2.826.0.1.3680043.8.498.16157229083793556332623330502397121062"


def synthetic(study: str, series: str, sop: str, *, name: str, patient_id: str, date: str,
              modality: str, number: int, **extra: Any) -> Dataset:
    """A tiny image instance (4x4, 16 bits) with the given identity."""
    ds = Dataset()
    ds.SpecificCharacterSet = "ISO_IR 192"
    ds.SOPClassUID = MRImageStorage if modality == "MR" else CTImageStorage
    ds.SOPInstanceUID = sop
    ds.StudyInstanceUID, ds.SeriesInstanceUID = study, series
    ds.PatientName, ds.PatientID = name, patient_id
    ds.PatientBirthDate, ds.PatientSex = "18540106", "M"
    ds.StudyDate, ds.StudyTime = date, "093000"
    ds.AccessionNumber, ds.StudyID = f"ACC{study[-1]}", study[-1]
    ds.StudyDescription = "STUDY " + study[-1]
    ds.Modality, ds.SeriesNumber, ds.InstanceNumber = modality, int(series[-1]), number
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.Rows = ds.Columns = 4
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
    ds.PixelData = bytes(32)
    for key, value in extra.items():
        setattr(ds, key, value)
    return ds


def save(ds: Dataset, path: Path) -> Path:
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = ds.SOPClassUID
    meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta = meta
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path, enforce_file_format=True)
    return path


def holmes_files(folder: Path) -> list[Path]:
    """Two patients: Holmes (two studies, three series, four instances) and Watson."""
    holmes = {"name": "Holmes^Sherlock", "patient_id": "HOLMES1"}
    specs = [
        (HOLMES_STUDY_1, HOLMES_SERIES_1, 1, "20240115", "CT", holmes),
        (HOLMES_STUDY_1, HOLMES_SERIES_1, 2, "20240115", "CT", holmes),
        (HOLMES_STUDY_1, HOLMES_SERIES_2, 1, "20240115", "CT", holmes),
        (HOLMES_STUDY_2, HOLMES_SERIES_3, 1, "20240220", "MR", holmes),
        (WATSON_STUDY, WATSON_SERIES, 1, "20240301", "CT",
         {"name": "Watson^John", "patient_id": "WATSON1"}),
    ]
    paths = []
    for study, series, number, date, modality, who in specs:
        sop = f"{UID_ROOT}.3.{series.rsplit('.', 1)[1]}.{number}"
        ds = synthetic(study, series, sop, date=date, modality=modality, number=number, **who)
        paths.append(save(ds, folder / f"{sop}.dcm"))
    return paths


def corpus(folder: Path) -> list[Path]:
    """The pydicom test files and the synthetic studies."""
    return [testdata(name) for name in PYDICOM_FILES] + holmes_files(folder)


def sop_uid(path: Path) -> str:
    return str(pydicom.dcmread(path, stop_before_pixels=True).SOPInstanceUID)


def sop_uids_of_studies(paths: Iterable[Path], studies: Iterable[str]) -> set[str]:
    """The SOP Instance UIDs of the files that belong to these studies."""
    wanted = set(studies)
    found = set()
    for path in paths:
        ds = pydicom.dcmread(path, stop_before_pixels=True)
        if str(ds.StudyInstanceUID) in wanted:
            found.add(str(ds.SOPInstanceUID))
    return found


@dataclass
class Dcmqrscp:
    """DCMTK dcmqrscp (AE QRSCP) on a free loopback port, holding the corpus."""

    workdir: Path
    destinations: dict[str, int] = field(default_factory=dict)  # move destinations AET -> port
    port: int = 0
    proc: subprocess.Popen[bytes] | None = None
    aet: str = "QRSCP"

    @property
    def remote(self) -> str:
        return f"{self.aet}@127.0.0.1:{self.port}"

    def start(self, files: Iterable[Path]) -> Dcmqrscp:
        self.port = free_port()
        storage = self.workdir / "db"
        storage.mkdir(parents=True, exist_ok=True)
        hosts = "\n".join(f"dest{n} = ({aet}, 127.0.0.1, {port})"
                          for n, (aet, port) in enumerate(self.destinations.items()))
        config = self.workdir / "dcmqrscp.cfg"
        config.write_text(
            f"NetworkTCPPort = {self.port}\nMaxPDUSize = 16384\nMaxAssociations = 16\n\n"
            f"HostTable BEGIN\n{hosts}\nHostTable END\n\nVendorTable BEGIN\nVendorTable END\n\n"
            f"AETable BEGIN\n{self.aet} {storage} RW (200, 1024mb) ANY\nAETable END\n")
        log = (self.workdir / "dcmqrscp.log").open("wb")
        self.proc = subprocess.Popen([require("dcmqrscp"), "-c", str(config), str(self.port)],
                                     cwd=self.workdir, env=DCMTK_ENV, stdout=log,
                                     stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        wait_for_port(self.port, proc=self.proc)
        result = subprocess.run([require("dcmsend"), "-aec", self.aet, "127.0.0.1", str(self.port),
                                 *map(str, files)], capture_output=True, text=True,
                                env=DCMTK_ENV, timeout=120)
        assert result.returncode == 0, result.stdout + result.stderr
        return self

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


@dataclass
class StoreSCP:
    """DCMTK storescp (AE STORESCP) writing what it receives into a folder."""

    folder: Path
    port: int
    proc: subprocess.Popen[bytes] | None = None

    def start(self) -> StoreSCP:
        self.folder.mkdir(parents=True, exist_ok=True)
        self.proc = subprocess.Popen([require("storescp"), "--aetitle", "STORESCP", "-od",
                                      str(self.folder), str(self.port)],
                                     env=DCMTK_ENV, stdout=subprocess.DEVNULL,
                                     stderr=subprocess.DEVNULL, stdin=subprocess.DEVNULL)
        wait_for_port(self.port, proc=self.proc)
        return self

    def received(self) -> set[str]:
        """The SOP Instance UIDs of the files received so far."""
        return {sop_uid(p) for p in self.folder.iterdir() if p.is_file()}

    def clear(self) -> None:
        for path in self.folder.iterdir():
            path.unlink()

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(10)


def run_pacs(workdir: Path, *args: str, stdin: str | None = None,
             env: dict[str, str] | None = None, timeout: float = 120
             ) -> subprocess.CompletedProcess[str]:
    """Run `pacs ARGS` with an empty config (or workdir's config.toml), stdout a pipe."""
    config = workdir / "config.toml"
    if not config.exists():
        workdir.mkdir(parents=True, exist_ok=True)
        config.write_text("")
    return subprocess.run(pacs_cmd(*args), capture_output=True, text=True, timeout=timeout,
                          input=stdin, stdin=None if stdin is not None else subprocess.DEVNULL,
                          env={**os.environ, "PACS_CONFIG": str(config), **(env or {})})


def records(result: subprocess.CompletedProcess[str]) -> list[dict[str, Any]]:
    return [json.loads(line) for line in result.stdout.splitlines() if line.strip()]
