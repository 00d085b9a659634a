"""Benchmark `pacs index` against DCMTK's dcmqridx indexing the same files, same run.

Usage: python scripts/bench_index.py [--count N] [--repeat R] [--jobs J] [--batch B]
                                     [--keep] [--tmp DIR]

Writes N synthetic CT slices (64x64, 16-bit, Explicit VR Little Endian; default 10,000) with
scripts/benchdata.make_ct_series into a temporary folder, then, R times (default 3; the order
alternates between runs; `sync` runs before each, so that neither pays for the writeback of
what came before), indexes them all with

  (a) `python -m pacscli index DATA --archive FRESH --format jsonl [--jobs J]` (copies each
      file into a fresh archive through its insert path, hashes it and indexes it in SQLite;
      timed from the start of the Python process to its exit, start-up included; --jobs
      defaults to one worker per core);
  (b) `/usr/bin/dcmqridx AREA FILE...` into fresh dcmqrscp storage areas (registers each
      file in place in its index.dat). Its index file is capped at 32 MiB (about 4,100
      instances; past that it fails on every insert), so the files go to storage areas of B
      files each (default 2,500), one dcmqridx after another; their times add up.

Prints files/s of each (the median run by duration) and the ratio pacs/dcmqridx against the
target (>= 2.0x). Checks that `pacs index` exited 0 with one `ok` record per file and N rows
in its index, and that dcmqridx exited 0 and lists N instances.

Exit status: 0 all indexed and the target is met; 1 all indexed but the target is missed;
2 something was not indexed (said plainly).
"""

from __future__ import annotations

import argparse
import os
import shutil
import sqlite3
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

# `python scripts/bench_index.py` puts scripts/ on sys.path but not the repository: add it, so the
# `scripts.` imports below work however the script is started.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from scripts.bench_serve import (
    cores,
    make_tmp,
    median_run,
    ok_records,
    require_tools,
    run_timed,
    tree_bytes,
)
from scripts.benchdata import make_ct_series

DCMQRIDX = "/usr/bin/dcmqridx"
INDEX_TARGET = 2.0


@dataclass
class Run:
    """One indexer's result in one run."""

    seconds: float
    indexed: int

    def rate(self, count: int) -> float:
        """Files per second."""
        return count / self.seconds


def pacs_env() -> dict[str, str]:
    """Our environment without PACS_* settings."""
    return {k: v for k, v in os.environ.items() if not k.startswith("PACS_")}


def run_pacs_index(data: Path, work: Path, run: int, jobs: int | None) -> Run:
    archive = work / f"archive-{run}"
    config = work / "empty-config.toml"
    config.write_text("")
    records = work / f"pacs-index-{run}.jsonl"
    cmd = [sys.executable, "-m", "pacscli", "index", str(data), "--archive", str(archive),
           "--format", "jsonl", "--config", str(config)]
    if jobs:
        cmd += ["--jobs", str(jobs)]
    done = run_timed(cmd, env=pacs_env(), stdout=records)
    if done.returncode != 0:
        raise RuntimeError(f"`pacs index` exited {done.returncode}: {done.output[-2000:]}")
    ok = ok_records(records)
    with sqlite3.connect(archive / "index.sqlite") as conn:
        rows = int(conn.execute("SELECT count(*) FROM instances").fetchone()[0])
    if ok != rows:
        raise RuntimeError(f"`pacs index`: {ok} ok records but {rows} rows")
    shutil.rmtree(archive)
    return Run(done.seconds, rows)


def run_dcmqridx(files: list[Path], work: Path, run: int, batch: int) -> Run:
    seconds = 0.0
    indexed = 0
    for number, start in enumerate(range(0, len(files), batch)):
        area = work / f"dcmqridx-{run}" / f"area{number}"
        area.mkdir(parents=True)
        names = [p.name for p in files[start:start + batch]]
        began = time.perf_counter()
        done = subprocess.run([DCMQRIDX, str(area), *names], cwd=files[0].parent,
                              capture_output=True, stdin=subprocess.DEVNULL)
        seconds += time.perf_counter() - began
        if done.returncode != 0 or done.stderr:
            raise RuntimeError(f"dcmqridx exited {done.returncode}: {done.stderr[-2000:]!r}")
        listing = subprocess.run([DCMQRIDX, "-p", str(area)], capture_output=True, text=True)
        indexed += listing.stdout.count("SOPInstanceUID")
    shutil.rmtree(work / f"dcmqridx-{run}")
    return Run(seconds, indexed)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--count", type=int, default=10_000, help="files (default 10000)")
    parser.add_argument("--repeat", type=int, default=3,
                        help="runs per indexer; the median run is reported (default 3)")
    parser.add_argument("--jobs", type=int, default=None,
                        help="pass --jobs to pacs index (default: its own, one per core)")
    parser.add_argument("--batch", type=int, default=2500,
                        help="files per dcmqridx storage area (default 2500; its cap is ~4100)")
    parser.add_argument("--keep", action="store_true", help="keep the temporary folder")
    parser.add_argument("--tmp", type=Path, default=None,
                        help="where to make the temporary folder (default: the system's)")
    args = parser.parse_args(argv)
    if args.count < 1 or args.repeat < 1 or args.batch < 1:
        parser.error("--count, --repeat and --batch must be at least 1")
    require_tools(DCMQRIDX)
    work = make_tmp(args.tmp, "bench-index-")
    try:
        t0 = time.perf_counter()
        files = make_ct_series(work / "data", args.count, rows=64, cols=64)
        print(f"bench_index: {args.count} CT images 64x64 16-bit, "
              f"{tree_bytes(files) / 1e6:.1f} MB, written in {time.perf_counter() - t0:.1f} s; "
              f"{cores()}, {args.repeat} run(s) each, median run reported", flush=True)
        pacs_runs: list[Run] = []
        dcmtk_runs: list[Run] = []
        for run in range(args.repeat):
            order = ("pacs", "dcmqridx") if run % 2 == 0 else ("dcmqridx", "pacs")
            for who in order:
                os.sync()  # neither indexer pays for the writeback of what came before
                if who == "pacs":
                    result = run_pacs_index(work / "data", work, run, args.jobs)
                    pacs_runs.append(result)
                else:
                    result = run_dcmqridx(files, work, run, args.batch)
                    dcmtk_runs.append(result)
                if result.indexed != args.count:
                    print(f"bench_index: {who} indexed {result.indexed} of {args.count} files")
                    return 2
                print(f"  run {run + 1}: {who:8s} {result.seconds:7.2f} s  "
                      f"{result.rate(args.count):8.0f} files/s", flush=True)
        pacs, dcmtk = median_run(pacs_runs), median_run(dcmtk_runs)
        ratio = pacs.rate(args.count) / dcmtk.rate(args.count)
        print(f"pacs index: {pacs.rate(args.count):.0f} files/s ({pacs.seconds:.2f} s)")
        print(f"dcmqridx:   {dcmtk.rate(args.count):.0f} files/s ({dcmtk.seconds:.2f} s, "
              f"storage areas of {args.batch})")
        met = ratio >= INDEX_TARGET
        print(f"ratio: {ratio:.2f}x (target >= {INDEX_TARGET}x: {'met' if met else 'MISSED'})")
        return 0 if met else 1
    except RuntimeError as exc:
        print(f"bench_index: {exc}")
        return 2
    finally:
        if args.keep:
            print(f"kept {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
