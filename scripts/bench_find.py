"""Benchmark of the archive's query engine (the C-FIND SCP and `pacs find --archive`).

Fills an index directly through SQL with 10,000 studies of 4 series of 25 instances
(1,000,000 instances) of 5,000 patients, then times study-level queries with the default
return keys (ModalitiesInStudy and the NumberOfStudyRelated... counts included) through
`pacscli.archive.query.find`, every result built as a dataset:

  - an exact PatientID                       target: median <= 20 ms
  - PatientName=SMI* (about 1% of patients)  target: median <= 100 ms
  - a StudyDate range matching 100 studies   target: median <= 100 ms

Usage: python scripts/bench_find.py [WORKDIR] [--runs N]
(WORKDIR defaults to a temporary folder; an index already filled there is reused.)
"""

from __future__ import annotations

import argparse
import datetime
import random
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from pacscli.archive.index import Index
from pacscli.archive.query import find
from pacscli.dicom.query import build_query

STUDIES = 10_000
PATIENTS = 5_000
SERIES_PER_STUDY = 4
INSTANCES_PER_SERIES = 25
STUDIES_PER_DAY = 10
FIRST_DAY = datetime.date(2020, 1, 1)
ROOT = "1.2.826.0.1.3680043.10.543"
# 200 surnames, two of them SMI*: PatientName=SMI* matches about 1% of patients.
_OTHER_SURNAMES = [f"{a}{b}NAME" for a in "ABCDEFGHIJKLMNOPQRTUVWXYZ" for b in "AEIOUYLMNR"]
SURNAMES = ["SMITH", "SMIRNOVA", *_OTHER_SURNAMES[:198]]
GIVEN = ["JOHN", "MARY", "PAUL", "ANNA", "LUC", "EVA", "OMAR", "LI", "SARA", "IVAN"]
MODALITIES = ["CT", "MR", "US", "CR", "DX", "MG", "NM", "PT"]
CT_IMAGE = "1.2.840.10008.5.1.4.1.1.2"
EXPLICIT_LE = "1.2.840.10008.1.2.1"


def study_date(study: int) -> str:
    return (FIRST_DAY + datetime.timedelta(days=study // STUDIES_PER_DAY)).strftime("%Y%m%d")


def fill(index: Index) -> None:
    """Insert the synthetic archive with executemany, in one transaction."""
    rng = random.Random(7)
    conn = index.connection()
    conn.execute("PRAGMA synchronous=OFF")
    with index.transaction() as tx:
        tx.executemany(
            "INSERT INTO patients (pk, PatientID, IssuerOfPatientID, PatientName, PatientBirthDate, "
            "PatientSex) VALUES (?, ?, '', ?, ?, ?)",
            ((p + 1, f"PID{p:07d}", f"{rng.choice(SURNAMES)}^{rng.choice(GIVEN)}",
              f"19{rng.randint(30, 99)}0{rng.randint(1, 9)}1{rng.randint(0, 9)}",
              rng.choice("MF")) for p in range(PATIENTS)))
        tx.executemany(
            "INSERT INTO studies (pk, patient_pk, StudyInstanceUID, StudyDate, StudyTime, "
            "AccessionNumber, StudyID, StudyDescription, ReferringPhysicianName) "
            "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
            ((s + 1, s % PATIENTS + 1, f"{ROOT}.1.{s}", study_date(s),
              f"{8 + s % 10:02d}{s % 60:02d}00", f"ACC{s:08d}", str(s), "CHEST CT",
              "REFERRING^DOC") for s in range(STUDIES)))

        def series_rows() -> Iterator[tuple[object, ...]]:
            for s in range(STUDIES):
                for n in range(SERIES_PER_STUDY):
                    pk = s * SERIES_PER_STUDY + n + 1
                    yield (pk, s + 1, f"{ROOT}.2.{s}.{n}", MODALITIES[(s + n // 2) % 8], str(n + 1),
                           f"SERIES {n + 1}", study_date(s))

        tx.executemany(
            "INSERT INTO series (pk, study_pk, SeriesInstanceUID, Modality, SeriesNumber, "
            "SeriesDescription, SeriesDate) VALUES (?, ?, ?, ?, ?, ?, ?)", series_rows())

        def instance_rows() -> Iterator[tuple[object, ...]]:
            pk = 0
            for s in range(STUDIES):
                for n in range(SERIES_PER_STUDY):
                    series_pk = s * SERIES_PER_STUDY + n + 1
                    for i in range(INSTANCES_PER_SERIES):
                        pk += 1
                        sop = f"{ROOT}.3.{s}.{n}.{i}"
                        yield (pk, series_pk, sop, CT_IMAGE, str(i + 1),
                               f"studies/00/00/{ROOT}.1.{s}/{ROOT}.2.{s}.{n}/{sop}.dcm",
                               500_000, f"{pk:064x}", EXPLICIT_LE, 1.7e9, "CT1")

        tx.executemany(
            "INSERT INTO instances (pk, series_pk, SOPInstanceUID, SOPClassUID, InstanceNumber, "
            "path, size, sha256, transfer_syntax, received_at, source_aet) "
            "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)", instance_rows())
    conn.execute("ANALYZE")


def timed(label: str, runs: int, make_keys: Callable[[int], list[str]], target_ms: float,
          index: Index) -> tuple[float, int]:
    """Median latency (ms) of a study-level query, and how many studies it matched."""
    times, counts = [], []
    for run in range(runs):
        query = build_query("study", make_keys(run))
        started = time.perf_counter()
        results = list(find(index, query.level, query.identifier))
        times.append((time.perf_counter() - started) * 1000)
        counts.append(len(results))
    median = statistics.median(times)
    verdict = "ok" if median <= target_ms else "SLOW"
    print(f"{label:<34} median {median:7.2f} ms  (min {min(times):6.2f}, max {max(times):7.2f}; "
          f"{statistics.median(counts):.0f} studies; target <= {target_ms:g} ms) {verdict}")
    return median, int(statistics.median(counts))


def count_instances(index: Index) -> int:
    """How many instance rows the index holds."""
    return int(index.connection().execute("SELECT count(*) FROM instances").fetchone()[0])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("workdir", nargs="?", type=Path)
    parser.add_argument("--runs", type=int, default=21)
    args = parser.parse_args()
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="bench-find-"))
    workdir.mkdir(parents=True, exist_ok=True)
    index = Index(workdir / "index.sqlite")
    if count_instances(index) == 0:
        started = time.perf_counter()
        fill(index)
        print(f"filled {count_instances(index):,} instances in {STUDIES:,} studies in "
              f"{time.perf_counter() - started:.1f} s ({workdir / 'index.sqlite'})")
    else:
        print(f"reusing {count_instances(index):,} instances in {workdir / 'index.sqlite'}")
    rng = random.Random(11)
    patients = [rng.randrange(PATIENTS) for _ in range(args.runs)]

    def date_range(run: int) -> list[str]:
        first = rng.randrange(STUDIES // STUDIES_PER_DAY - 10)
        low = FIRST_DAY + datetime.timedelta(days=first)
        high = low + datetime.timedelta(days=100 // STUDIES_PER_DAY - 1)
        return [f"StudyDate={low:%Y%m%d}-{high:%Y%m%d}"]

    results = [
        timed("PatientID exact", args.runs, lambda run: [f"PatientID=PID{patients[run]:07d}"],
              20, index),
        timed("PatientName=SMI*", args.runs, lambda run: ["PatientName=SMI*"], 100, index),
        timed("StudyDate range (100 studies)", args.runs, date_range, 100, index),
    ]
    index.close()
    return 0 if all(m <= t for (m, _), t in zip(results, (20, 100, 100), strict=True)) else 1


if __name__ == "__main__":
    sys.exit(main())
