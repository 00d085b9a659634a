"""Peak memory of `pacs serve` while it receives one ~1 GB multi-frame instance.

Usage: python scripts/bench_memory.py [--frames N] [--keep] [--tmp DIR]

Writes one Multi-frame Grayscale Word Secondary Capture instance of N frames of 512x512
16-bit pixels (default 2,048 frames: 1 GiB of pixel data), Explicit VR Little Endian, without
ever holding it in memory: pydicom writes the header, then the Pixel Data element's header and
value (a 16 MiB block repeated) are appended by hand. It is sent with
`TCP_NODELAY=1 /usr/bin/dcmsend` to `python -m pacscli serve` (default settings: fsync and
index) on 127.0.0.1, while the serve process's VmRSS is sampled every 20 ms; its VmHWM (peak
resident set, from /proc/PID/status) is read before it is stopped.

Prints the resident set before the transfer, the peak, and the target (peak <= 200 MB), and
checks that the instance arrived whole: one index row, whose size is the archived file's size
and whose dataset sha256 is that of the file sent. The temporary folder (the 1 GB file sent
and the archive's copy) is removed at the end unless --keep is given.

Exit status: 0 arrived and the target is met; 1 arrived but the target is missed; 2 it did not
arrive whole or a tool failed. Linux only (/proc).
"""

from __future__ import annotations

import argparse
import hashlib
import sqlite3
import struct
import sys
import threading
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

# `python scripts/bench_memory.py` puts scripts/ on sys.path but not the repository: add it, so the
# `scripts.` imports below work however the script is started.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from scripts.bench_serve import (
    DCMSEND,
    DCMTK_ENV,
    ECHOSCU,
    cores,
    install_cleanup,
    make_tmp,
    require_tools,
    run_in,
    run_timed,
    start_pacs_serve,
)

MULTIFRAME_WORD_SC = "1.2.840.10008.5.1.4.1.1.7.3"  # Multi-frame Grayscale Word SC Image Storage
TARGET_MB = 200.0
_BLOCK_FRAMES = 32  # frames of distinct random pixels, repeated to fill the instance
_CHUNK = 8 * 1024 * 1024


def write_big_instance(path: Path, frames: int, rows: int = 512, cols: int = 512) -> int:
    """Write a multi-frame instance of `frames` frames; return its size.

    Memory stays at one block of frames: pydicom writes everything but the pixel data, then
    the (7FE0,0010) OW element header and its value are appended.
    """
    frame_bytes = rows * cols * 2
    length = frames * frame_bytes
    if length >= 0xFFFFFFFF:
        raise ValueError(f"{frames} frames make {length} bytes: over the 4 GiB element limit")
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = MULTIFRAME_WORD_SC
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.SOPClassUID = MULTIFRAME_WORD_SC
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.StudyDate, ds.StudyTime = "20240101", "120000"
    ds.Modality = "OT"
    ds.ConversionType = "WSD"
    ds.PatientName, ds.PatientID = "BENCH^MEMORY", "BENCHMEM"
    ds.PatientBirthDate = ds.PatientSex = ds.ReferringPhysicianName = ds.AccessionNumber = ""
    ds.Laterality = ds.PatientOrientation = ""
    ds.StudyInstanceUID, ds.SeriesInstanceUID = generate_uid(), generate_uid()
    ds.StudyID, ds.SeriesNumber, ds.InstanceNumber = "1", 1, 1
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.NumberOfFrames = frames
    ds.FrameIncrementPointer = 0x00181063  # Frame Time
    ds.FrameTime = 100.0
    ds.Rows, ds.Columns = rows, cols
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
    ds.BurnedInAnnotation, ds.PresentationLUTShape = "NO", "IDENTITY"
    ds.RescaleIntercept, ds.RescaleSlope, ds.RescaleType = 0, 1, "US"
    ds.save_as(path, enforce_file_format=True)

    rng = np.random.default_rng(2)
    block = rng.integers(0, 4096, size=(min(frames, _BLOCK_FRAMES), rows, cols),
                         dtype=np.uint16).astype("<u2").tobytes()
    with open(path, "ab") as out:
        out.write(struct.pack("<HH2sHI", 0x7FE0, 0x0010, b"OW", 0, length))
        left = length
        while left:
            piece = block[:left] if left < len(block) else block
            out.write(piece)
            left -= len(piece)
    return path.stat().st_size


def dataset_sha256(path: Path) -> tuple[int, str, str]:
    """(size, sha256) of a Part 10 file's dataset (the bytes after its file meta group), and
    the sha256 of the whole file, in one read."""
    with open(path, "rb") as fp:
        head = fp.read(144)
        if head[128:132] != b"DICM" or head[132:136] != b"\x02\x00\x00\x00" or head[136:138] != b"UL":
            raise ValueError(f"{path}: no file meta group length to find the dataset by")
        meta_rest = fp.read(struct.unpack("<I", head[140:144])[0])
        whole = hashlib.sha256(head + meta_rest)
        digest = hashlib.sha256()
        size = 0
        while chunk := fp.read(_CHUNK):
            digest.update(chunk)
            whole.update(chunk)
            size += len(chunk)
    return size, digest.hexdigest(), whole.hexdigest()


def proc_status_kb(pid: int, field: str) -> int | None:
    """A `kB` field of /proc/PID/status (VmRSS, VmHWM), or None once the process is gone."""
    try:
        with open(f"/proc/{pid}/status") as status:
            for line in status:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


class RssSampler(threading.Thread):
    """Polls a process's VmRSS; keeps the highest value seen."""

    def __init__(self, pid: int, interval: float = 0.02) -> None:
        super().__init__(daemon=True)
        self.pid = pid
        self.interval = interval
        self.max_kb = 0
        self.samples = 0
        self._halt = threading.Event()

    def run(self) -> None:
        while not self._halt.is_set():
            kb = proc_status_kb(self.pid, "VmRSS")
            if kb is None:
                return
            self.max_kb = max(self.max_kb, kb)
            self.samples += 1
            self._halt.wait(self.interval)

    def stop(self) -> None:
        """Stop polling and wait for the thread."""
        self._halt.set()
        self.join()


def index_row(archive: Path) -> tuple[int, list[tuple[str, int, str]]]:
    """(row count, [(path, size, sha256)]) of the archive's instances table."""
    conn = sqlite3.connect(f"file:{archive / 'index.sqlite'}?mode=ro", uri=True)
    try:
        rows = conn.execute("SELECT path, size, sha256 FROM instances").fetchall()
    finally:
        conn.close()
    return len(rows), [(str(p), int(s), str(h)) for p, s, h in rows]


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--frames", type=int, default=2048,
                        help="512x512 16-bit frames (default 2048: 1 GiB of pixel data)")
    parser.add_argument("--keep", action="store_true", help="keep the temporary folder")
    parser.add_argument("--tmp", type=Path, default=None,
                        help="where to make the temporary folder (default: the system's); "
                             "needs about 3x the instance's size free")
    args = parser.parse_args(argv)
    if args.frames < 1:
        parser.error("--frames must be at least 1")
    require_tools(DCMSEND, ECHOSCU)
    install_cleanup()

    work = make_tmp(args.tmp, "bench-memory-")

    def measure() -> int:
        big = work / "big.dcm"
        t0 = time.perf_counter()
        size = write_big_instance(big, args.frames)
        sent_size, sent_sha, _ = dataset_sha256(big)
        mb = size / 1e6
        print(f"bench_memory: one instance of {args.frames} frames 512x512 16-bit, {mb:.1f} MB "
              f"({size / 2**30:.2f} GiB), written in {time.perf_counter() - t0:.1f} s; {cores()}",
              flush=True)

        archive = work / "archive"
        server = start_pacs_serve(archive, work / "logs")
        pid = server.proc.pid
        base_kb = proc_status_kb(pid, "VmRSS") or 0
        sampler = RssSampler(pid)
        sampler.start()
        try:
            sent = run_timed([DCMSEND, "-aec", server.aet, "127.0.0.1", str(server.port), str(big)],
                             env=DCMTK_ENV)
            time.sleep(0.2)  # one more sample after the last response
        finally:
            sampler.stop()
            hwm_kb = proc_status_kb(pid, "VmHWM") or 0
            status = server.stop()
        if sent.returncode != 0:
            print(f"dcmsend failed ({sent.returncode}):\n{sent.output[-2000:]}\n"
                  f"--- pacs serve stderr:\n{server.log_tail()}")
            return 2
        if status not in (0, None):
            print(f"warning: pacs serve exited with status {status}:\n{server.log_tail()}",
                  file=sys.stderr)

        peak_mb = max(hwm_kb, sampler.max_kb) / 1024
        print(f"transfer: {sent.seconds:.1f} s, {mb / sent.seconds:.1f} MB/s (dcmsend start to "
              f"exit: receive, copy into the archive, fsync, index)")
        print(f"pacs serve RSS before the transfer: {base_kb / 1024:.1f} MB")
        print(f"pacs serve peak RSS (VmHWM): {hwm_kb / 1024:.1f} MB; highest VmRSS sampled: "
              f"{sampler.max_kb / 1024:.1f} MB ({sampler.samples} samples every 20 ms)")
        met = peak_mb <= TARGET_MB
        print(f"peak {peak_mb:.1f} MB against the target <= {TARGET_MB:.0f} MB: "
              f"{'met' if met else 'NOT met'}")

        count, rows = index_row(archive)
        problems = []
        if count != 1:
            problems.append(f"{count} index rows, expected 1")
        for path, row_size, row_sha in rows:
            archived = archive / path
            if not archived.is_file():
                problems.append(f"indexed file {path} is missing")
                continue
            on_disk = archived.stat().st_size
            if on_disk != row_size:
                problems.append(f"index says {row_size} bytes, the file has {on_disk}")
            got_size, got_sha, file_sha = dataset_sha256(archived)
            if (got_size, got_sha) != (sent_size, sent_sha) or row_sha != file_sha:
                problems.append(f"archived dataset {got_size} bytes sha256 {got_sha[:12]}..., "
                                f"sent {sent_size} bytes {sent_sha[:12]}...; file sha256 "
                                f"{file_sha[:12]}..., index {row_sha[:12]}...")
            else:
                print(f"check: 1 index row; archived file {on_disk} bytes (= index size, its "
                      f"sha256 = index sha256); dataset {got_size} bytes, sha256 equal to the "
                      f"file sent")
        if problems:
            print("CHECK FAILED: " + "; ".join(problems))
            return 2
        return 0 if met else 1

    return run_in(work, args.keep, "bench_memory", measure)


if __name__ == "__main__":
    sys.exit(main())
