"""Synthetic CT series for the benchmarks: N slices of 512x512 16-bit, Explicit VR LE.

Usage: python scripts/benchdata.py OUT_DIR [N]
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid


def make_ct_series(out: Path, count: int, rows: int = 512, cols: int = 512) -> list[Path]:
    """Write `count` CT slices of one series into `out`; return their paths."""
    out.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(1)
    pixels = rng.integers(0, 4096, size=(rows, cols), dtype=np.uint16).tobytes()
    study, series = generate_uid(), generate_uid()
    paths = []
    for number in range(1, count + 1):
        sop = generate_uid()
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = CTImageStorage
        meta.MediaStorageSOPInstanceUID = sop
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds = Dataset()
        ds.file_meta = meta
        ds.SpecificCharacterSet = "ISO_IR 100"
        ds.SOPClassUID = CTImageStorage
        ds.SOPInstanceUID = sop
        ds.StudyDate, ds.StudyTime = "20240101", "120000"
        ds.Modality = "CT"
        ds.PatientName, ds.PatientID = "BENCH^CT", "BENCH1"
        ds.StudyInstanceUID, ds.SeriesInstanceUID = study, series
        ds.StudyID, ds.SeriesNumber, ds.InstanceNumber = "1", 1, number
        ds.ImagePositionPatient = [0, 0, number]
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.Rows, ds.Columns = rows, cols
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
        ds.PixelData = pixels
        path = out / f"CT{number:05d}.dcm"
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    return paths


if __name__ == "__main__":
    make_ct_series(Path(sys.argv[1]), int(sys.argv[2]) if len(sys.argv) > 2 else 1000)
